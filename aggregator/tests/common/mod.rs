//! Shared harness for the aggregator's integration tests: a real apiserver (testkit), the real
//! `graywatch-aggregator` binary as a child process, and a fleet of simulated agents speaking
//! the real gRPC stream.

#![allow(
    dead_code,
    clippy::unwrap_used,
    reason = "shared by many test binaries, each using a part; a test fails loudly on anything unexpected"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use graywatch_k8s_testkit::{NodeBuilder, ReportBuilder, TestApiserver};
use graywatch_proto::v1::{Family, NodeSummary, PeerStats, ingest_client::IngestClient};
use k8s_openapi::api::core::v1::{Event, Namespace, Node};
use kube::{
    Api, Client,
    api::{DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use tokio::sync::mpsc;

pub const NS: &str = "graywatch";
pub const TAINT: &str = "graywatch.io/degraded";
pub const OVERALL: &str = "graywatch.io/Healthy";
pub const ZONE: &str = graywatch_k8s_testkit::node::ZONE_LABEL;

pub struct Cluster {
    pub api: TestApiserver,
    pub client: Client,
}

pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

pub fn node_ip(i: usize) -> String {
    format!("10.0.0.{}", i + 1)
}

impl Cluster {
    /// A fresh apiserver with `n` Nodes (`per_zone` per zone, one NodePool "default") and our
    /// namespace. `None` only when the run asked to skip real-apiserver tests.
    pub async fn start(n: usize, per_zone: usize) -> anyhow::Result<Option<Self>> {
        let Some(api) = TestApiserver::start().await? else {
            return Ok(None);
        };
        let client = api.client().await?;
        let c = Self { api, client };
        let ns: Api<Namespace> = Api::all(c.client.clone());
        ns.create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(NS.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
        let nodes: Vec<NodeBuilder> = (0..n)
            .map(|i| {
                let cidr = format!("10.244.{i}.0/24");
                NodeBuilder::new(&node_name(i))
                    .zone(&format!(
                        "zone-{}",
                        char::from(b'a' + u8::try_from(i / per_zone).expect("under 26 zones"))
                    ))
                    .nodepool("default")
                    .instance_type("m5.large")
                    .pod_cidr(&cidr)
                    .internal_ip(&node_ip(i))
                    .address("Hostname", &node_name(i))
            })
            .collect();
        c.api.create_nodes(&nodes).await?;
        Ok(Some(c))
    }

    /// Installs the Karpenter/NRC CRDs and creates NodePool "default"; returns its spec.
    pub async fn with_nodepool(&self) -> anyhow::Result<serde_json::Value> {
        self.api.install_crds().await?;
        let pool: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "karpenter.sh/v1", "kind": "NodePool", "metadata": {"name": "default"},
            "spec": {"template": {"spec": {
                "nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "default"},
                "requirements": [
                    {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]},
                    {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand", "spot"]}]}},
             "disruption": {"consolidationPolicy": "WhenEmptyOrUnderutilized", "consolidateAfter": "1m"},
             "limits": {"cpu": "1000"}}
        }))?;
        let created = self.pools().create(&PostParams::default(), &pool).await?;
        Ok(created.data["spec"].clone())
    }

    pub fn pools(&self) -> Api<DynamicObject> {
        Api::all_with(self.client.clone(), &graywatch_aggregator::cluster::nodepool_resource())
    }

    pub fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    pub async fn node(&self, i: usize) -> Node {
        self.nodes().get(&node_name(i)).await.unwrap()
    }

    /// Our overall condition status on node i ("True"/"False"/"Unknown"), if present.
    pub async fn overall(&self, i: usize) -> Option<String> {
        condition(&self.node(i).await, OVERALL)
    }

    pub async fn tainted(&self) -> BTreeSet<String> {
        let list = self.nodes().list(&ListParams::default()).await.unwrap();
        list.items
            .iter()
            .filter(|n| {
                n.spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .is_some_and(|ts| ts.iter().any(|t| t.key == TAINT))
            })
            .filter_map(|n| n.metadata.name.clone())
            .collect()
    }

    /// Events by (object name, reason).
    pub async fn events(&self) -> Vec<(String, String, String)> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), "default");
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|e| {
                (
                    e.involved_object.name.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.message.unwrap_or_default(),
                )
            })
            .collect()
    }

    pub async fn count_events(&self, object: &str, reason: &str) -> usize {
        self.events()
            .await
            .iter()
            .filter(|(o, r, _)| o == object && r == reason)
            .count()
    }

    /// Waits until `identity` holds the aggregator's Lease.
    pub async fn await_leader(&self, identity: &str) {
        eventually(60, &format!("{identity} holds the lease"), || async {
            (self.lease_holder().await.as_deref() == Some(identity)).then_some(())
        })
        .await;
    }

    pub async fn lease_holder(&self) -> Option<String> {
        let api: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(self.client.clone(), NS);
        api.get_opt("graywatch-aggregator")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty())
    }
}

/// The status of condition `ty` on `n`.
pub fn condition(n: &Node, ty: &str) -> Option<String> {
    node_condition(n, ty).map(|c| c.status.clone())
}

/// The reason of condition `ty` on `n`.
pub fn condition_reason(n: &Node, ty: &str) -> Option<String> {
    node_condition(n, ty).and_then(|c| c.reason.clone())
}

fn node_condition<'a>(n: &'a Node, ty: &str) -> Option<&'a k8s_openapi::api::core::v1::NodeCondition> {
    n.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == ty)
}

/// A Node condition as another controller would write it.
pub fn cond(ty: &str, status: &str) -> serde_json::Value {
    serde_json::json!({"type": ty, "status": status, "reason": "Test", "message": "test",
           "lastTransitionTime": "2026-11-22T12:00:00Z", "lastHeartbeatTime": "2026-11-22T12:00:00Z"})
}

/// Applies `conds` to node i's status as `manager` (server-side apply, as the aggregator does).
pub async fn apply_conditions(
    cluster: &Cluster,
    i: usize,
    manager: &str,
    conds: &[serde_json::Value],
) -> anyhow::Result<()> {
    let body = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node_name(i)},
                      "status": {"conditions": conds}});
    cluster
        .nodes()
        .patch_status(
            &node_name(i),
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&body),
        )
        .await?;
    Ok(())
}

/// Polls `f` until it returns `Some`, failing after `secs` with `what`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every node in `nodes` has our overall condition True.
pub async fn all_true(cluster: &Cluster, nodes: impl IntoIterator<Item = usize>) {
    for i in nodes {
        eventually(60, &format!("node-{i} Healthy=True"), || async {
            (cluster.overall(i).await.as_deref() == Some("True")).then_some(())
        })
        .await;
    }
}

/// Test-speed config: short ticks, lease and stale timeout. Hysteresis stays in windows. The
/// simulated agents are not authenticated, so acting modes need the loudly named override.
pub fn config(extra_policy: &str) -> String {
    config_with_security(extra_policy, "insecure_allow_acting_without_identity = true\n")
}

/// Like [`config`] with the given `[security]` section body (nothing insecure allowed unless
/// it says so).
pub fn config_with_security(extra_policy: &str, security: &str) -> String {
    format!(
        "tick_ms = 200\nnamespace = \"{NS}\"\n[leader]\nlease_duration_ms = 2000\nrenew_interval_ms = 500\n\
         [security]\n{security}\n[policy]\nstale_after_ms = 2500\ndegrade_windows = 3\nrecover_windows = 3\n{extra_policy}\n"
    )
}

/// A running `graywatch-aggregator` child process.
pub struct Aggregator {
    child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub identity: String,
    dir: std::path::PathBuf,
}

impl Aggregator {
    pub fn spawn(cluster: &Cluster, identity: &str, config_text: &str) -> Self {
        let [grpc_port, http_port, _] = graywatch_k8s_testkit::free_ports().unwrap();
        Self::spawn_on(cluster, identity, config_text, grpc_port, http_port)
    }

    /// Like [`Aggregator::spawn`] on given ports (a restart keeps its address).
    pub fn spawn_on(cluster: &Cluster, identity: &str, config_text: &str, grpc_port: u16, http_port: u16) -> Self {
        Self::spawn_via(
            &cluster.api.kubeconfig_path(),
            identity,
            config_text,
            grpc_port,
            http_port,
        )
    }

    /// Like [`Aggregator::spawn_on`], talking to the apiserver through `kubeconfig` (e.g. a
    /// proxy's).
    pub fn spawn_via(
        kubeconfig: &std::path::Path,
        identity: &str,
        config_text: &str,
        grpc_port: u16,
        http_port: u16,
    ) -> Self {
        let dir = std::env::temp_dir().join(format!("graywatch-agg-{}-{identity}-{grpc_port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("config.toml");
        std::fs::write(&cfg, config_text).unwrap();
        let log = std::fs::File::create(dir.join("aggregator.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_graywatch-aggregator"))
            .arg("--config")
            .arg(&cfg)
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
            .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
            .args(["--identity", identity])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            child,
            grpc: SocketAddr::from(([127, 0, 0, 1], grpc_port)),
            http: SocketAddr::from(([127, 0, 0, 1], http_port)),
            identity: identity.into(),
            dir,
        }
    }

    /// SIGKILL: no lease release, no cleanup (a crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status once the process has drained (bounded wait).
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM {pid}");
        let child = &mut self.child;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "aggregator did not exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The exit status once the process has exited by itself (bounded wait), e.g. refusing its
    /// configuration.
    pub async fn exited(&mut self, secs: u64) -> std::process::ExitStatus {
        let child = &mut self.child;
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "aggregator still running after {secs} s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A counter or gauge from /metrics (`None` if not served yet or absent).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(self.http).await.ok()?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        conn.read_to_string(&mut body).await.ok()?;
        body.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("aggregator.log")).unwrap_or_default()
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- aggregator {} log ---\n{}", self.identity, self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the simulated fleet does this round.
#[derive(Debug, Default, Clone)]
pub struct FleetState {
    pub bad: BTreeSet<usize>,
    pub silent: BTreeSet<usize>,
    /// (liars, victim): the liars report the victim at 20 ms with 6% retransmits while no
    /// honest node exchanges traffic with it and the victim's own figures stay healthy.
    pub lies: Option<(BTreeSet<usize>, usize)>,
}

/// Simulated agents: one gRPC stream per node per aggregator, a window per node every round.
pub struct Fleet {
    pub state: Arc<Mutex<FleetState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Fleet {
    pub fn start(n: usize, endpoints: Vec<String>) -> Self {
        Self::start_shaped(n, endpoints, |_, _, _| {})
    }

    /// Like [`Fleet::start`], with `shape(node, seq, window)` applied to every window before it
    /// is sent (a test's own figures on top of the fleet's).
    pub fn start_shaped(
        n: usize,
        endpoints: Vec<String>,
        mut shape: impl FnMut(usize, u64, &mut NodeSummary) + Send + 'static,
    ) -> Self {
        let state = Arc::new(Mutex::new(FleetState::default()));
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut streams: BTreeMap<(usize, usize), mpsc::Sender<NodeSummary>> = BTreeMap::new();
            let mut seq = 0u64;
            loop {
                seq += 1;
                let cur = st.lock().unwrap().clone();
                for i in (0..n).filter(|i| !cur.silent.contains(i)) {
                    let mut s = summary(i, n, seq, &cur.bad);
                    if let Some((liars, victim)) = &cur.lies {
                        lie(&mut s, i, liars, *victim);
                    }
                    shape(i, seq, &mut s);
                    for (e, ep) in endpoints.iter().enumerate() {
                        let key = (e, i);
                        let alive = match streams.get(&key) {
                            Some(tx) => tx.send(s.clone()).await.is_ok(),
                            None => false,
                        };
                        if !alive {
                            streams.remove(&key);
                            if let Some(tx) = open(ep).await {
                                let _ = tx.send(s.clone()).await;
                                streams.insert(key, tx);
                            }
                        }
                    }
                }
                // Streams of silent nodes are closed, like a dead agent.
                streams.retain(|(_, i), _| !cur.silent.contains(i));
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        });
        Self { state, task }
    }

    pub fn set_bad(&self, bad: &[usize]) {
        self.state.lock().unwrap().bad = bad.iter().copied().collect();
    }

    pub fn set_lies(&self, liars: &[usize], victim: usize) {
        self.state.lock().unwrap().lies = Some((liars.iter().copied().collect(), victim));
    }

    pub fn set_silent(&self, silent: &[usize]) {
        self.state.lock().unwrap().silent = silent.iter().copied().collect();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A summary sender on a fresh ingest stream whose directives are drained (`None` when the
/// aggregator cannot be reached).
pub async fn open(endpoint: &str) -> Option<mpsc::Sender<NodeSummary>> {
    let mut client = IngestClient::connect(endpoint.to_string()).await.ok()?;
    let (tx, rx) = mpsc::channel(64);
    let mut resp = client
        .report(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .ok()?
        .into_inner();
    tokio::spawn(async move { while let Ok(Some(_)) = resp.message().await {} });
    Some(tx)
}

/// An open ingest stream: the summary sender and the directives.
pub type Stream = (
    mpsc::Sender<NodeSummary>,
    tonic::Streaming<graywatch_proto::v1::Directive>,
);

/// One raw ingest stream (real gRPC client): the summary sender and the directives, or the
/// status that refused the stream.
pub async fn open_stream(endpoint: &str) -> Result<Stream, tonic::Status> {
    open_stream_with_token(endpoint, None).await
}

/// Like [`open_stream`], presenting `token` as `authorization: Bearer <token>`.
pub async fn open_stream_with_token(endpoint: &str, token: Option<&str>) -> Result<Stream, tonic::Status> {
    let mut client = IngestClient::connect(endpoint.to_string()).await.unwrap();
    let (tx, rx) = mpsc::channel(64);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let resp = client.report(req).await?;
    Ok((tx, resp.into_inner()))
}

/// Sends `s` on an open stream; the acknowledged seq, or the status that ended the stream.
pub async fn send_summary(stream: &mut Stream, s: NodeSummary) -> Result<u64, tonic::Status> {
    stream.0.send(s).await.unwrap();
    loop {
        match stream.1.message().await? {
            Some(graywatch_proto::v1::Directive {
                kind: Some(graywatch_proto::v1::directive::Kind::Ack(a)),
                ..
            }) => return Ok(a.seq),
            Some(_) => {}
            None => panic!("stream ended without status"),
        }
    }
}

/// Rewrites node `i`'s window for [`FleetState::lies`]: a sparse victim (its own report lists
/// no node; honest nodes list no traffic with it) that only the liars claim to see degraded.
pub fn lie(s: &mut NodeSummary, i: usize, liars: &BTreeSet<usize>, victim: usize) {
    let victim_addrs = [node_ip(victim), format!("10.244.{victim}.17")];
    if i == victim {
        s.peers.clear();
    } else if liars.contains(&i) {
        for p in s.peers.iter_mut().filter(|p| victim_addrs.contains(&p.remote_addr)) {
            p.rtt_p50_us = 15_000.0;
            p.rtt_p99_us = 20_000.0;
            p.retransmits = 120;
        }
    } else {
        s.peers.retain(|p| !victim_addrs.contains(&p.remote_addr));
    }
}

/// One window of node `i`: RTT/retransmit figures and per-peer stats towards every other node;
/// links touching a bad node are slow and lossy.
pub fn summary(i: usize, n: usize, seq: u64, bad: &BTreeSet<usize>) -> NodeSummary {
    let slow = bad.contains(&i);
    let peers: Vec<PeerStats> = (0..n)
        .filter(|j| *j != i)
        .map(|j| {
            let s = slow || bad.contains(&j);
            PeerStats {
                remote_addr: if j % 2 == 0 {
                    node_ip(j)
                } else {
                    format!("10.244.{j}.17")
                },
                rtt_samples: 40,
                rtt_p50_us: if s { 6000.0 } else { 250.0 },
                rtt_p99_us: if s { 9000.0 } else { 300.0 + (j % 5) as f64 * 6.0 },
                segments_out: 2000,
                retransmits: if s { 120 } else { 1 },
                ..Default::default()
            }
        })
        .collect();
    ReportBuilder::new(&node_name(i), seq)
        .address(&node_ip(i))
        // One incarnation per simulated agent for the whole test (see `AgentFleet::restart`).
        .agent_started_ns(1)
        .family(
            Family::NetworkLatency,
            if slow { 9000.0 } else { 300.0 + (i % 4) as f64 * 5.0 },
            "us",
            400,
        )
        .family(Family::PacketLoss, if slow { 6.0 } else { 0.05 }, "%", 2000)
        .family(Family::CpuSteal, 0.3, "%", 1)
        .peers(peers)
        .build()
}
