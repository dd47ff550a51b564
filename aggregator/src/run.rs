//! Wiring: gRPC ingest, metrics server, Node watch, leader election and the decision loop, all
//! stopped by one cancellation token.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use graywatch_proto::v1::ingest_server::IngestServer;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{
    actuate::Actuator,
    cluster::ClusterReader,
    config::FileConfig,
    core::engine::{Engine, Settling},
    ingest::{FleetStore, IngestService, now_ms},
    leader::LeaderElector,
    metrics::Metrics,
};

/// Runs the aggregator until `shutdown` is cancelled.
pub async fn run(cfg: FileConfig, client: Client, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let store = FleetStore::default();

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
    let mut gate = cfg.security.gate(&client, metrics.clone());
    gate.known_nodes = Some({
        let known = known_nodes.clone();
        Arc::new(move |node: &str| known.get().is_some_and(|f| f(node)))
    });
    let svc = IngestService {
        store: store.clone(),
        gate,
        metrics: metrics.clone(),
        max_peers: cfg.ingest.max_peers,
        report_interval_ms: cfg.ingest.report_interval_ms,
        agent_settings: cfg.ingest.agent_settings.clone(),
        shutdown: shutdown.clone(),
    };
    let mut grpc_server = cfg.security.server()?;
    let grpc_task = {
        let shutdown = shutdown.clone();
        let server = IngestServer::new(svc)
            .max_decoding_message_size(cfg.ingest.max_message_bytes)
            .max_encoding_message_size(cfg.ingest.max_message_bytes);
        tokio::spawn(async move {
            grpc_server
                .add_service(server)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(grpc),
                    shutdown.cancelled_owned(),
                )
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
    .with_pod_addresses(store.clone())
    .with_event_namespace(cfg.event_namespace.clone());
    let actuator = Actuator::new(client, &cfg);

    let mut engine: Option<Engine> = None;
    let mut seen_windows: std::collections::HashMap<String, crate::core::model::WindowId> =
        std::collections::HashMap::new();
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
        let kept = store.retain_nodes(|n| is_node(n));
        store.publish_peer_book(reader.peer_book());
        metrics.fleet_reports.set(i64::try_from(kept).unwrap_or(i64::MAX));
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
        let mut input = reader.read(now, store.snapshot(), failures).await;
        if engine.is_none() {
            // A new engine (start, restart, new leader) inherits the action budget spent
            // before: never act on a fresh one.
            match reader.past_actions(now, cfg.policy.rate_window_ms).await {
                Ok(past) => {
                    tracing::info!(
                        actions = past.len(),
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
        let decided = now_ms();
        for (node, r) in &input.reports {
            let key = r.window_id();
            if seen_windows.get(node) != Some(&key) {
                // Windows that were already stale (e.g. ingested while we were a follower) are
                // not latency samples.
                let age = (decided - r.received_ms).max(0);
                if age <= cfg.policy.stale_after_ms {
                    metrics.ingest_to_decision.observe(age as f64 / 1000.0);
                }
                seen_windows.insert(node.clone(), key);
            }
        }
        metrics.step_duration.observe(step_started.elapsed().as_secs_f64());
    }
    tracing::info!("shutting down");
    release_lease.cancel();
    let _ = leader_task.await;
    // Streams end on the token; bound the drain anyway so a stuck client cannot hold us.
    let drain = Duration::from_secs(5);
    match tokio::time::timeout(drain, grpc_task).await {
        Ok(r) => r.context("grpc task")?.context("grpc server")?,
        Err(_) => tracing::warn!("gRPC connections did not drain within 5 s; exiting anyway"),
    }
    match tokio::time::timeout(drain, http_task).await {
        Ok(r) => r.context("http task")?.context("http server")?,
        Err(_) => tracing::warn!("HTTP connections did not drain within 5 s; exiting anyway"),
    }
    tracing::info!("stopped");
    Ok(())
}
