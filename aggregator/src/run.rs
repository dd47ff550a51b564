//! Wiring: gRPC ingest, metrics server, Node watch, leader election and the decision loop, all
//! stopped by one cancellation token.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use graywatch_proto::v1::ingest_server::IngestServer;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity as TlsIdentity, Server, ServerTlsConfig, server::TcpIncoming};

use crate::{
    actuate::Actuator,
    cluster::ClusterReader,
    config::FileConfig,
    core::{
        engine::{Engine, Settling},
        model::{Millis, NodeReport},
    },
    gate::Gate,
    ingest::{FleetStore, IngestService, now_ms},
    leader::LeaderElector,
    metrics::Metrics,
    security::SecurityConfig,
};

/// A gRPC server builder, with TLS (and client-certificate verification) when configured.
fn grpc_server(sec: &SecurityConfig) -> anyhow::Result<Server> {
    // Half-open connections (a partitioned agent) are found by HTTP/2 PINGs (and TCP keepalive,
    // see `ingest_incoming`) and closed: their streams end and free their per-identity slots.
    let builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_millis(sec.keepalive_interval_ms)))
        .http2_keepalive_timeout(Some(Duration::from_millis(sec.keepalive_timeout_ms)));
    let (Some(cert), Some(key)) = (&sec.tls_cert_file, &sec.tls_key_file) else {
        tracing::warn!("INSECURE: the ingest stream is plaintext (set security.tls_cert_file and tls_key_file)");
        return Ok(builder);
    };
    let read = |p: &std::path::PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut tls = ServerTlsConfig::new().identity(TlsIdentity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &sec.tls_client_ca_file {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    tracing::info!(cert = %cert.display(), mtls = sec.tls_client_ca_file.is_some(), "ingest stream uses TLS");
    builder
        .tls_config(tls)
        .context("configuring TLS for the ingest stream (certificate/key)")
}

/// The ingest listener's connections, with the socket options tonic's own `serve` would set:
/// on a listener we bound ourselves (`serve_with_incoming*`), tonic ignores its builder's TCP
/// settings. Without `TCP_NODELAY`, an Ack written while the previous one is unacknowledged
/// waits for the agent's delayed ACK: 1 in 8 Acks took 40–48 ms at 10,000 agents (BENCHMARKS.md,
/// "fleet", fourteenth session).
fn ingest_incoming(listener: TcpListener, sec: &SecurityConfig) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_millis(sec.keepalive_interval_ms)))
}

/// The window of each node a leader step last saw, so that each window is one latency sample.
/// Holds the nodes of the last step's reports only: a deleted Node's entry goes with its report.
/// A window is its report's `Arc`: the fleet store replaces it for a new window only, so a step
/// compares pointers and allocates nothing for the windows it has seen.
#[derive(Debug, Default)]
struct SeenWindows(HashMap<String, Arc<NodeReport>>);

impl SeenWindows {
    /// The age at `decided` of every window in `reports` not seen before; windows that were
    /// already stale (e.g. ingested while we were a follower) are not latency samples.
    fn first_seen(
        &mut self,
        reports: &BTreeMap<String, Arc<NodeReport>>,
        decided: Millis,
        stale_after: Millis,
    ) -> Vec<Millis> {
        self.0.retain(|node, _| reports.contains_key(node));
        let mut ages = Vec::new();
        for (node, r) in reports {
            let seen = self.0.get_mut(node);
            if seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, r)) {
                continue;
            }
            let age = (decided - r.received_ms).max(0);
            if age <= stale_after {
                ages.push(age);
            }
            match seen {
                Some(s) => *s = r.clone(),
                None => {
                    self.0.insert(node.clone(), r.clone());
                }
            }
        }
        ages
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Runs the aggregator until `shutdown` is cancelled.
#[expect(
    clippy::too_many_lines,
    reason = "the aggregator's wiring in start-up order, then the drain"
)]
pub async fn run(cfg: FileConfig, client: Client, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let store = FleetStore::new(cfg.ingest.max_nodes);

    let grpc = TcpListener::bind(cfg.grpc_listen)
        .await
        .with_context(|| format!("binding grpc_listen {}", cfg.grpc_listen))?;
    let http = TcpListener::bind(cfg.http_listen)
        .await
        .with_context(|| format!("binding http_listen {}", cfg.http_listen))?;
    tracing::info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, identity = %cfg.identity, dry_run = cfg.policy.dry_run, "listening");

    // Reports are accepted for Nodes only; the lookup is the Node watch, started below (until
    // its first list, every name is refused and the agents retry).
    let known_nodes: Arc<std::sync::OnceLock<crate::gate::NodeLookup>> = Arc::default();
    let mut gate = Gate::new(&cfg.security, cfg.ingest.max_nodes, &client, metrics.clone());
    gate.known_nodes = Some({
        let known = known_nodes.clone();
        Arc::new(move |node: &str| known.get().is_some_and(|f| f(node)))
    });
    let svc = IngestService {
        store: store.clone(),
        gate: gate.clone(),
        metrics: metrics.clone(),
        max_peers: cfg.ingest.max_peers,
        shutdown: shutdown.clone(),
    };
    let mut grpc_server = grpc_server(&cfg.security)?;
    let incoming = ingest_incoming(grpc, &cfg.security);
    let grpc_task = {
        let shutdown = shutdown.clone();
        let server = IngestServer::new(svc)
            .max_decoding_message_size(cfg.ingest.max_message_bytes)
            .max_encoding_message_size(cfg.ingest.max_message_bytes);
        tokio::spawn(async move {
            grpc_server
                .add_service(server)
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await
        })
    };
    let http_task = tokio::spawn(crate::metrics::serve(http, metrics.clone(), shutdown.clone()));

    let (leader_tx, leader_rx) = watch::channel(false);
    let elector = LeaderElector {
        api: Api::<Lease>::namespaced(client.clone(), &cfg.namespace),
        lease_name: cfg.leader.lease_name.clone(),
        identity: cfg.identity.clone(),
        lease_duration: Duration::from_millis(cfg.leader.lease_duration_ms),
        renew_interval: Duration::from_millis(cfg.leader.renew_interval_ms),
        renew_deadline: Duration::from_millis(cfg.leader.renew_deadline_ms()),
    };
    // The Lease outlives the decision loop: on shutdown the step in flight finishes applying its
    // plan (an applied taint keeps its Event) while we still lead, and only then is the Lease
    // released. Cancelling the elector together with the loop would drop the rest of that plan.
    let release_lease = CancellationToken::new();
    let leader_task = tokio::spawn(elector.run(leader_tx, release_lease.clone()));

    let reader = ClusterReader::start(
        client.clone(),
        cfg.namespace.clone(),
        cfg.policy.clone(),
        shutdown.clone(),
    )
    .await
    .with_event_namespace(cfg.event_namespace.clone());
    let actuator = Actuator::new(client, &cfg);

    let mut engine: Option<Engine> = None;
    let mut seen_windows = SeenWindows::default();
    let mut failures = 0u32;
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.tick_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        metrics.steps.inc();
        let is_node = known_nodes.get_or_init(|| reader.node_lookup());
        let (kept, pods) = store.retain_nodes(|n| is_node(n));
        gate.prune(|n| is_node(n));
        // Once per tick, for the agents' address lookups and (as leader) the decision step; off
        // the runtime's worker like the step (milliseconds of CPU over 10,000 Nodes).
        let (views, address_book) = tokio::task::block_in_place(|| {
            let views = reader.node_views();
            let book = Arc::new(crate::core::evidence::AddressBook::with_pod_addresses(
                &views,
                &store.pod_addresses(),
            ));
            store.publish_address_book(book.clone());
            (views, book)
        });
        metrics.fleet_reports.set(i64::try_from(kept).unwrap_or(i64::MAX));
        metrics.map_entries("fleet_reports", kept);
        metrics.map_entries("pod_addresses", pods);
        let leader = *leader_rx.borrow();
        metrics.is_leader.set(i64::from(leader));
        if !leader {
            // Followers ingest but never decide or write; a new leader starts from the cluster.
            engine = None;
            metrics.fleet_view_settled.set(0);
            continue;
        }
        let step_started = std::time::Instant::now();
        let now = now_ms();
        let mut input = reader.read_views(now, store.snapshot(), views, failures).await;
        input.address_book = Some(address_book);
        if engine.is_none() {
            // A new engine (start, restart, new leader) inherits the action budget spent
            // before: never act on a fresh one.
            match reader.past_actions(now, cfg.policy.rate_window_ms).await {
                Ok(mut past) => {
                    let unrecorded = with_unrecorded_taints(&mut past, &input.nodes, now);
                    tracing::info!(
                        actions = past.len(),
                        unrecorded_taints = unrecorded,
                        window_ms = cfg.policy.rate_window_ms,
                        "action budget rebuilt from our Events"
                    );
                    input.past_actions = past;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read our past actions; not deciding until it can");
                    continue;
                }
            }
        }
        metrics.nodes.set(i64::try_from(input.nodes.len()).unwrap_or(i64::MAX));
        let eng = engine.get_or_insert_with(|| Engine::new(cfg.policy.clone()));
        let was_settled = eng.settling() == Settling::Settled;
        // A step over a large fleet is tens of milliseconds of CPU: let the runtime move the
        // ingest streams waiting on this worker to another one meanwhile.
        let plan = tokio::task::block_in_place(|| eng.step(&input));
        metrics.leader_steps.inc();
        metrics.breaker_open.set(i64::from(plan.breaker_open));
        if plan.settled && !was_settled {
            tracing::info!(
                nodes = input.nodes.len(),
                reporting = input.reports.len(),
                "fleet view settled: taking actions from now on"
            );
        }
        metrics.fleet_view_settled.set(i64::from(plan.settled));
        metrics
            .verdicts
            .set(i64::try_from(plan.verdicts.len()).unwrap_or(i64::MAX));
        metrics
            .degraded_links
            .set(i64::try_from(plan.degraded_links.len()).unwrap_or(i64::MAX));
        if plan.breaker_open {
            tracing::warn!("circuit breaker open: no new disruptive actions");
        }
        let applied = actuator.apply(&plan, now, &leader_rx, &metrics).await;
        for n in &applied.failed_condition_nodes {
            eng.condition_write_failed(n);
        }
        failures = if applied.errors == 0 {
            0
        } else {
            failures.saturating_add(applied.errors)
        };
        // Ingest → decision latency of every window this step saw for the first time, up to
        // the end of applying the plan: a step stalled on slow writes shows as latency.
        for age in seen_windows.first_seen(&input.reports, now_ms(), cfg.policy.stale_after_ms) {
            metrics.ingest_to_decision.observe(age as f64 / 1000.0);
        }
        metrics.map_entries("seen_windows", seen_windows.len());
        metrics.step_duration.observe(step_started.elapsed().as_secs_f64());
    }
    tracing::info!("shutting down");
    release_lease.cancel();
    let _ = leader_task.await;
    // Streams end on the token; bound the drain anyway so a stuck client cannot hold us.
    let drain = Duration::from_secs(5);
    if let Ok(r) = tokio::time::timeout(drain, grpc_task).await {
        r.context("grpc task")?.context("grpc server")?;
    } else {
        tracing::warn!("gRPC connections did not drain within 5 s; exiting anyway");
    }
    if let Ok(r) = tokio::time::timeout(drain, http_task).await {
        r.context("http task")?.context("http server")?;
    } else {
        tracing::warn!("HTTP connections did not drain within 5 s; exiting anyway");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Our taints on Nodes with no taint Event of ours in `past` are spent actions too: a crash
/// between the taint and its audit Event (the taint is written first) must not hand the next
/// engine a fresh budget. They count as taken `now` (conservative: the real time is unknown).
/// Returns how many were added.
fn with_unrecorded_taints(
    past: &mut Vec<crate::core::model::PastAction>,
    nodes: &std::collections::BTreeMap<String, crate::core::model::NodeView>,
    now: crate::core::model::Millis,
) -> usize {
    let before = past.len();
    for (name, view) in nodes {
        let recorded = past
            .iter()
            .any(|a| !a.claim_deletion && a.node.as_deref() == Some(name.as_str()));
        if view.tainted && !recorded {
            tracing::info!(node = %name, "our taint has no audit Event (a restart between the two): counted as spent");
            past.push(crate::core::model::PastAction {
                at_ms: now,
                node: Some(name.clone()),
                claim_deletion: false,
            });
        }
    }
    past.len() - before
}

#[cfg(test)]
mod unrecorded_taint_tests {
    use std::collections::BTreeMap;

    use super::with_unrecorded_taints;
    use crate::core::model::{NodeView, PastAction};

    #[test]
    fn a_taint_without_its_event_is_a_spent_action() {
        let view = |tainted| NodeView {
            tainted,
            ..NodeView::default()
        };
        let nodes: BTreeMap<String, NodeView> = [
            ("recorded".to_owned(), view(true)),
            ("unrecorded".to_owned(), view(true)),
            ("clean".to_owned(), view(false)),
        ]
        .into();
        let mut past = vec![PastAction {
            at_ms: 5,
            node: Some("recorded".into()),
            claim_deletion: false,
        }];
        assert_eq!(with_unrecorded_taints(&mut past, &nodes, 100), 1);
        assert_eq!(
            past[1],
            PastAction {
                at_ms: 100,
                node: Some("unrecorded".into()),
                claim_deletion: false
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(seq: u64, received_ms: Millis) -> Arc<NodeReport> {
        Arc::new(NodeReport {
            boot_id: "b".into(),
            seq,
            received_ms,
            ..NodeReport::default()
        })
    }

    /// `SOL_SOCKET`/`IPPROTO_TCP` option `name` of `stream`, as the kernel holds it.
    fn socket_option(stream: &tokio::net::TcpStream, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        use std::os::fd::AsRawFd;
        let mut value: libc::c_int = 0;
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).expect("an int's size");
        // SAFETY: a live socket, and a buffer of the option's size with its length.
        let rc = unsafe { libc::getsockopt(stream.as_raw_fd(), level, name, (&raw mut value).cast(), &raw mut len) };
        assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
        value
    }

    #[tokio::test]
    async fn ingest_connections_send_acks_at_once_and_are_kept_alive() {
        use futures::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let sec = SecurityConfig::default();
        let mut incoming = ingest_incoming(listener, &sec);
        let _client = tokio::net::TcpStream::connect(address).await.expect("connect");
        let accepted = incoming.next().await.expect("a connection").expect("accepted");
        assert!(accepted.nodelay().expect("TCP_NODELAY"), "Nagle would hold Acks back");
        assert_eq!(socket_option(&accepted, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        let idle_s = i64::from(socket_option(&accepted, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE));
        assert_eq!(idle_s * 1000, i64::try_from(sec.keepalive_interval_ms).expect("ms"));
    }

    #[test]
    fn each_window_is_one_sample_and_deleted_nodes_are_forgotten() {
        let mut seen = SeenWindows::default();
        let mut reports = BTreeMap::from([
            ("node-0".to_owned(), report(1, 900)),
            ("node-1".to_owned(), report(1, 0)),
        ]);
        // node-1's window is older than the stale timeout: no sample, but seen.
        assert_eq!(seen.first_seen(&reports, 1000, 500), vec![100]);
        assert_eq!(seen.first_seen(&reports, 1100, 500), Vec::<Millis>::new());
        reports.insert("node-0".into(), report(2, 1150));
        assert_eq!(seen.first_seen(&reports, 1200, 500), vec![50]);
        assert_eq!(seen.len(), 2);
        // node-1 was deleted (its report evicted): its entry goes too.
        reports.remove("node-1");
        assert_eq!(seen.first_seen(&reports, 1300, 500), Vec::<Millis>::new());
        assert_eq!(seen.len(), 1);
    }
}
