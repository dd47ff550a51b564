//! Fault-test harness (on top of `common`): the aggregator binary on a fixed gRPC port (so it
//! can be restarted where the agents look for it), a fleet of the agent's real report clients (bounded buffer, replay,
//! reconnect with backoff) each behind its own loopback TCP proxy (pass / blackhole / refuse),
//! per-node clock skew, and a recorder of every condition and taint the cluster ever showed.

#![allow(
    dead_code,
    clippy::unwrap_used,
    reason = "shared by many test binaries, each using a part; a test fails loudly on anything unexpected"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use graywatch_agent::report::{ReportConfig, Reporter};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::common::{Aggregator, Cluster, OVERALL, TAINT, condition, node_name, summary};

// Moved to `common`; still reachable here for tests that name it `faults_support::all_true`.
#[allow(unused_imports, reason = "not every test binary that includes this module names it")]
pub use crate::common::all_true;

/// The start every fault test shares: `n` Nodes (5 per zone), a recorder of what the cluster
/// showed, the aggregator `agg-0` on a fixed gRPC port (the last value) and the agents, each
/// behind its proxy. `None` only when the run asked to skip real-apiserver tests.
pub async fn start_fault_scene(n: usize) -> anyhow::Result<Option<(Cluster, History, AggProc, AgentFleet, u16)>> {
    let Some(cluster) = Cluster::start(n, 5).await? else {
        return Ok(None);
    };
    let history = History::record(&cluster);
    let [port, _, _] = graywatch_k8s_testkit::free_ports()?;
    let agg = AggProc::spawn(&cluster, "agg-0", &crate::common::config(""), port);
    let fleet = AgentFleet::start(n, agg.grpc).await;
    Ok(Some((cluster, history, agg, fleet, port)))
}

/// The aggregator binary on a given gRPC port (where the agents look for it across a restart)
/// and a free HTTP port; `SIGKILLed` on drop.
pub struct AggProc(Aggregator);

impl AggProc {
    pub fn spawn(cluster: &Cluster, identity: &str, config_text: &str, grpc_port: u16) -> Self {
        Self::spawn_via(&cluster.api.kubeconfig_path(), identity, config_text, grpc_port)
    }

    /// Like [`AggProc::spawn`], talking to the apiserver through `kubeconfig` (e.g. an
    /// [`ApiProxy`]).
    pub fn spawn_via(kubeconfig: &std::path::Path, identity: &str, config_text: &str, grpc_port: u16) -> Self {
        let [http_port, _, _] = graywatch_k8s_testkit::free_ports().unwrap();
        Self(Aggregator::spawn_via(
            kubeconfig,
            identity,
            config_text,
            grpc_port,
            http_port,
        ))
    }
}

impl std::ops::Deref for AggProc {
    type Target = Aggregator;
    fn deref(&self) -> &Aggregator {
        &self.0
    }
}

impl std::ops::DerefMut for AggProc {
    fn deref_mut(&mut self) -> &mut Aggregator {
        &mut self.0
    }
}

/// A plaintext HTTP/1.1 proxy in front of the apiserver (forwarding with the test's admin
/// client) that can stall the `coordination.k8s.io` Lease calls only: they hang, unanswered,
/// while every other call (Node watch and reads, condition and taint writes, Events) passes.
/// The case of a Lease renew hung on one connection while writes on others succeed.
pub struct ApiProxy {
    pub kubeconfig: std::path::PathBuf,
    stall: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ApiProxy {
    pub async fn start(cluster: &Cluster) -> Self {
        use http_body_util::BodyExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = cluster.client.clone();
        let (stall, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let rx = rx.clone();
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let upstream = upstream.clone();
                    let mut rx = rx.clone();
                    async move {
                        if req.uri().path().contains("/leases") {
                            // Stalled: no answer for as long as the stall lasts.
                            while *rx.borrow_and_update() {
                                if rx.changed().await.is_err() {
                                    break;
                                }
                            }
                        }
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                        upstream
                            .send(http::Request::from_parts(parts, kube::client::Body::from(body)))
                            .await
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(conn), svc)
                        .await;
                });
            }
        });
        let kubeconfig =
            std::env::temp_dir().join(format!("graywatch-apiproxy-{}-{}", std::process::id(), addr.port()));
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: proxy\n  cluster:\n    server: http://{addr}\n\
                 contexts:\n- name: proxy\n  context: {{cluster: proxy, user: proxy}}\ncurrent-context: proxy\n\
                 users:\n- name: proxy\n  user: {{}}\n"
            ),
        )
        .unwrap();
        Self {
            kubeconfig,
            stall,
            task,
        }
    }

    /// Lease calls hang from now on (`true`) or pass again (`false`).
    pub fn stall_leases(&self, on: bool) {
        self.stall.send_replace(on);
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// What a proxy does with an agent's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Pass,
    /// Connections stay open but no byte moves (a partition: the stream is blocked).
    Blackhole,
    /// Existing connections are closed and new ones refused (the agent is disconnected).
    Refuse,
}

/// A loopback TCP proxy in front of the aggregator for one agent.
pub struct Proxy {
    pub addr: SocketAddr,
    link: watch::Sender<Link>,
    task: tokio::task::JoinHandle<()>,
}

async fn wait_pass(link: &mut watch::Receiver<Link>) -> bool {
    loop {
        match *link.borrow_and_update() {
            Link::Pass => return true,
            Link::Refuse => return false,
            Link::Blackhole => {}
        }
        if link.changed().await.is_err() {
            return false;
        }
    }
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !wait_pass(&mut link).await {
            return;
        }
        let n = tokio::select! {
            r = r.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = link.changed() => continue,
        };
        // Bytes read while the link changes are held until it passes again.
        if !wait_pass(&mut link).await || w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (link, rx) = watch::channel(Link::Pass);
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                if *rx.borrow() == Link::Refuse {
                    continue;
                }
                let Ok(up) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(pump(dr, uw, rx.clone()));
                tokio::spawn(pump(ur, dw, rx.clone()));
            }
        });
        Self { addr, link, task }
    }

    pub fn set(&self, l: Link) {
        self.link.send_replace(l);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.link.send_replace(Link::Refuse);
        self.task.abort();
    }
}

#[derive(Debug, Default, Clone)]
pub struct Scenario {
    pub bad: BTreeSet<usize>,
    /// Offset added to a node's window timestamps (its clock), ms.
    pub skew_ms: BTreeMap<usize, i64>,
    /// Nodes whose agent pushes no window (no process running, or a hung one).
    pub paused: BTreeSet<usize>,
}

/// One simulated agent process: the real report client, its window sequence and incarnation.
pub struct Agent {
    pub reporter: Reporter,
    /// The last window seq pushed (the first window of an incarnation is 1).
    pub seq: u64,
    /// `NodeIdentity.agent_started_ns`: the real agent's clock reading (`CLOCK_BOOTTIME`) at start.
    pub started_ns: u64,
}

impl Agent {
    fn start(proxy: &Proxy) -> Self {
        Self {
            reporter: Reporter::spawn(ReportConfig {
                endpoint: format!("http://{}", proxy.addr),
                buffer_windows: 600,
                backoff_initial: Duration::from_millis(100),
                backoff_max: Duration::from_millis(500),
                connect_timeout: Duration::from_secs(2),
                ..Default::default()
            }),
            seq: 0,
            started_ns: graywatch_agent::wire::boottime_ns(),
        }
    }
}

/// `n` agents (the agent's real `Reporter`), one window each every round, each through its
/// own proxy to `aggregator`.
pub struct AgentFleet {
    pub scenario: Arc<Mutex<Scenario>>,
    pub agents: Arc<Mutex<Vec<Agent>>>,
    pub proxies: Vec<Proxy>,
    task: tokio::task::JoinHandle<()>,
}

impl AgentFleet {
    pub async fn start(n: usize, aggregator: SocketAddr) -> Self {
        let mut proxies = Vec::new();
        let mut agents = Vec::new();
        for _ in 0..n {
            let p = Proxy::start(aggregator).await;
            agents.push(Agent::start(&p));
            proxies.push(p);
        }
        let agents = Arc::new(Mutex::new(agents));
        let scenario = Arc::new(Mutex::new(Scenario::default()));
        let (ags, sc) = (agents.clone(), scenario.clone());
        let task = tokio::spawn(async move {
            loop {
                let cur = sc.lock().unwrap().clone();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis();
                let now = i64::try_from(now).expect("now in ms fits i64");
                for (i, agent) in ags.lock().unwrap().iter_mut().enumerate() {
                    if cur.paused.contains(&i) {
                        continue;
                    }
                    // Every agent keeps measuring whatever its link does.
                    agent.seq += 1;
                    let mut s = summary(i, n, agent.seq, &cur.bad);
                    if let Some(node) = s.node.as_mut() {
                        node.agent_started_ns = agent.started_ns;
                    }
                    let skew = cur.skew_ms.get(&i).copied().unwrap_or(0);
                    if let Some(w) = s.window.as_mut() {
                        w.start_unix_ms = now + skew - 150;
                        w.end_unix_ms = now + skew;
                    }
                    agent.reporter.push(s);
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        });
        Self {
            scenario,
            agents,
            proxies,
            task,
        }
    }

    /// Restarts node `i`'s agent as a rollout does: the old process stops (what its stream has
    /// not sent goes out with its stop notice; with the stream down, it is lost) and a new one
    /// starts on the same boot, its window seq again from 1 (from [`Self::resume`] if paused: a
    /// new pod that takes time to start). Returns the last seq the old agent pushed.
    pub async fn restart(&self, i: usize) -> u64 {
        let fresh = Agent::start(&self.proxies[i]);
        let old = std::mem::replace(&mut self.agents.lock().unwrap()[i], fresh);
        old.reporter.shutdown().await;
        old.seq
    }

    /// The last window seq node `i`'s current agent pushed.
    pub fn seq(&self, i: usize) -> u64 {
        self.agents.lock().unwrap()[i].seq
    }

    /// Windows node `i`'s current agent holds unacknowledged.
    pub fn buffered(&self, i: usize) -> usize {
        self.agents.lock().unwrap()[i].reporter.buffered()
    }

    pub fn set_bad(&self, bad: &[usize]) {
        self.scenario.lock().unwrap().bad = bad.iter().copied().collect();
    }

    /// The agents of `nodes` stop pushing windows (until [`Self::resume`]).
    pub fn pause(&self, nodes: &[usize]) {
        self.scenario.lock().unwrap().paused.extend(nodes);
    }

    pub fn resume(&self, nodes: &[usize]) {
        let mut scenario = self.scenario.lock().unwrap();
        for i in nodes {
            scenario.paused.remove(i);
        }
    }

    pub fn set_skew(&self, node: usize, ms: i64) {
        self.scenario.lock().unwrap().skew_ms.insert(node, ms);
    }

    pub fn link(&self, nodes: &[usize], l: Link) {
        for i in nodes {
            self.proxies[*i].set(l);
        }
    }

    /// Windows dropped from full agent buffers, over all agents.
    pub fn dropped(&self) -> u64 {
        self.agents
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.reporter.stats().dropped.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// Most windows any agent holds unacknowledged.
    pub fn max_buffered(&self) -> usize {
        self.agents
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.reporter.buffered())
            .max()
            .unwrap_or(0)
    }
}

impl Drop for AgentFleet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Everything the cluster ever showed: per node the overall condition statuses and whether it
/// was tainted, polled from the apiserver until dropped.
pub struct History {
    pub seen: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl History {
    pub fn record(cluster: &Cluster) -> Self {
        let api: Api<Node> = Api::all(cluster.client.clone());
        let seen: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>> = Arc::default();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Ok(list) = api.list(&ListParams::default()).await {
                    let mut s = s.lock().unwrap();
                    for n in &list.items {
                        let name = n.metadata.name.clone().unwrap_or_default();
                        let e = s.entry(name).or_default();
                        if let Some(c) = condition(n, OVERALL) {
                            e.insert(c);
                        }
                        let tainted = n
                            .spec
                            .as_ref()
                            .and_then(|sp| sp.taints.as_ref())
                            .is_some_and(|ts| ts.iter().any(|t| t.key == TAINT));
                        if tainted {
                            e.insert("Tainted".into());
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { seen, task }
    }

    /// Forgets what was seen so far (e.g. the start-up, when nodes have no report yet).
    pub fn reset(&self) {
        self.seen.lock().unwrap().clear();
    }

    /// Nodes that were ever False or tainted.
    pub fn acted_on(&self) -> BTreeSet<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| s.contains("False") || s.contains("Tainted"))
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn statuses(&self, node: usize) -> BTreeSet<String> {
        self.seen
            .lock()
            .unwrap()
            .get(&node_name(node))
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every graywatch action Event in the cluster as (node, reason).
pub async fn actions(cluster: &Cluster) -> Vec<(String, String)> {
    cluster
        .events()
        .await
        .into_iter()
        .filter(|(_, r, _)| r.starts_with("GrayFailure") || r == "NodeClaimReplaced")
        .map(|(o, r, _)| (o, r))
        .collect()
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}
