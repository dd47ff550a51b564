//! The chart's whole lifecycle on a real kubelet (`cargo xtask cluster up`: etcd, apiserver with
//! RBAC and projected tokens, controller-manager, scheduler, kube-proxy, kubelet, containerd,
//! CNI), with the images `cargo xtask image` builds, as a user runs it:
//!
//! 1. `helm install` with the default image references, token-review auth and TLS: the agent
//!    DaemonSet is Ready, the aggregator runs 2 replicas with one Lease holder, the agents are
//!    authenticated with their projected tokens and the Node gets `graywatch.io/Healthy=True`;
//! 2. a fault the node's own agent sees (memory thrash in a pod under a memory limit) turns
//!    `MemoryPressureHealthy` False, and True again once it stops;
//! 3. `rollout restart` of the agent DaemonSet keeps every condition True: the old agent's
//!    stop notice (SIGTERM) reaches the aggregator replicas, which hold the node's conditions
//!    until the new agent reports (the node has no agent between the old pod's deletion, which
//!    this kubelet confirms 5–19 s after the agent exits, once 60 s, and the new agent's first
//!    window), and the new agent's windows are ingested as new, not dropped as replays;
//! 4. `rollout restart` of the aggregator leaves no gap in decisions longer than the Lease;
//! 5. `helm upgrade` nrc → direct-taint → nrc → dry-run leaves no taint of a mode no longer
//!    active;
//! 6. `helm uninstall` removes every graywatch taint and condition (pre-delete cleanup hook).
//!
//! `cargo xtask test` brings the cluster up, loads the images and sets
//! `GRAYWATCH_CLUSTER_KUBECONFIG`; without it the test says so and does nothing (a plain
//! `cargo test`), unless `GRAYWATCH_REQUIRE_CLUSTER=1`.

use std::fmt::Write as _;
use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use graywatch_chart_tests::{chart_dir, helm_binary};
use graywatch_k8s_testkit::{Pki, Usage};
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    coordination::v1::Lease,
    core::v1::{Node, Pod, Secret},
};
use kube::{
    Api, Client, Config,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

const RELEASE: &str = "graywatch";
const NAMESPACE: &str = "graywatch-lifecycle";
const TLS_SECRET: &str = "graywatch-aggregator-tls";
/// Windows the new agent must get ingested as new (not dropped as replays) after its rollout.
const NEW_AGENT_WINDOWS: u64 = 10;
const LEASE_SECONDS: i64 = 15;
/// A guard against a hung step (a test bug or a broken cluster), never a measurement.
const STEP_DEADLINE: Duration = Duration::from_mins(4);

const HEALTHY: &str = "graywatch.io/Healthy";
const MEMORY: &str = "graywatch.io/MemoryPressureHealthy";
const TAINT: &str = "graywatch.io/degraded";

struct Cluster {
    kubeconfig: PathBuf,
    client: Client,
    node: String,
}

impl Cluster {
    async fn from_env() -> Option<Self> {
        let Some(path) = std::env::var_os("GRAYWATCH_CLUSTER_KUBECONFIG") else {
            assert!(
                std::env::var_os("GRAYWATCH_REQUIRE_CLUSTER").is_none_or(|v| v != "1"),
                "GRAYWATCH_REQUIRE_CLUSTER=1 but GRAYWATCH_CLUSTER_KUBECONFIG is unset"
            );
            eprintln!(
                "SKIPPED chart lifecycle: GRAYWATCH_CLUSTER_KUBECONFIG is unset (`cargo xtask test` starts the \
                 local cluster with `cargo xtask cluster up` and sets it)"
            );
            return None;
        };
        let kubeconfig = PathBuf::from(path);
        let config = Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&kubeconfig).expect("read the cluster's kubeconfig"),
            &KubeConfigOptions::default(),
        )
        .await
        .expect("kubeconfig");
        let client = Client::try_from(config).expect("client");
        let nodes = Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await
            .expect("list nodes");
        assert_eq!(nodes.items.len(), 1, "the local cluster has one node");
        let node = nodes.items[0].metadata.name.clone().expect("node name");
        Some(Self {
            kubeconfig,
            client,
            node,
        })
    }

    fn helm(&self, args: &[&str]) -> anyhow::Result<String> {
        let helm = helm_binary()?;
        let out = Command::new(&helm)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .with_context(|| format!("running {}", helm.display()))?;
        if !out.status.success() {
            bail!(
                "helm {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    fn pods(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }

    async fn condition(&self, kind: &str) -> Option<String> {
        let node = self.nodes().get(&self.node).await.ok()?;
        condition_of(&node, kind)
    }

    async fn tainted(&self) -> bool {
        let Ok(node) = self.nodes().get(&self.node).await else {
            return false;
        };
        node.spec
            .and_then(|s| s.taints)
            .unwrap_or_default()
            .iter()
            .any(|t| t.key == TAINT)
    }

    /// Waits until the Node's condition `kind` has `status`, by watching the Node.
    #[expect(clippy::match_wild_err_arm, reason = "the only error is the deadline passing")]
    async fn await_condition(&self, kind: &str, status: &str) {
        let (kind2, status2) = (kind.to_owned(), status.to_owned());
        let cond = move |node: Option<&Node>| node.and_then(|n| condition_of(n, &kind2)).as_deref() == Some(&status2);
        let wait = kube::runtime::wait::await_condition(self.nodes(), &self.node, cond);
        match tokio::time::timeout(STEP_DEADLINE, wait).await {
            Ok(result) => {
                result.expect("watch the node");
            }
            Err(_) => panic!(
                "{kind} never became {status} (now {:?});\n{}",
                self.condition(kind).await,
                self.diagnostics().await
            ),
        }
    }

    /// graywatch's pods with their phase and restarts, and the aggregators' logs.
    async fn diagnostics(&self) -> String {
        let mut out = String::new();
        if let Ok(list) = self.pods(NAMESPACE).list(&ListParams::default()).await {
            for pod in list.items {
                let status = pod.status.unwrap_or_default();
                let restarts: i32 = status
                    .container_statuses
                    .unwrap_or_default()
                    .iter()
                    .map(|c| c.restart_count)
                    .sum();
                let _ = writeln!(
                    out,
                    "pod {} phase {:?} restarts {restarts}",
                    pod.metadata.name.unwrap_or_default(),
                    status.phase
                );
            }
        }
        if let Ok(node) = self.nodes().get(&self.node).await {
            for c in node.status.and_then(|s| s.conditions).unwrap_or_default() {
                if c.type_.starts_with("graywatch.io/") {
                    let _ = writeln!(
                        out,
                        "node condition {} {} {}: {}",
                        c.type_,
                        c.status,
                        c.reason.unwrap_or_default(),
                        c.message.unwrap_or_default()
                    );
                }
            }
        }
        out.push_str(&self.aggregator_logs().await);
        out
    }

    /// Every aggregator replica's recent log lines (for failure messages).
    async fn aggregator_logs(&self) -> String {
        let pods = self.pods(NAMESPACE);
        let Ok(list) = pods
            .list(&ListParams::default().labels("app.kubernetes.io/component=aggregator"))
            .await
        else {
            return String::new();
        };
        let mut out = String::new();
        for pod in list.items {
            let name = pod.metadata.name.unwrap_or_default();
            let params = kube::api::LogParams {
                tail_lines: Some(40),
                ..Default::default()
            };
            let text = pods.logs(&name, &params).await.unwrap_or_else(|e| e.to_string());
            let _ = writeln!(out, "--- {name}\n{text}");
        }
        out
    }

    async fn pod_ips(&self, selector: &str) -> Vec<(String, String)> {
        let list = self
            .pods(NAMESPACE)
            .list(&ListParams::default().labels(selector))
            .await
            .expect("list pods");
        list.items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| Some((p.metadata.name?, p.status?.pod_ip?)))
            .collect()
    }

    /// Sum of a counter (all label sets matching `labels`) over every aggregator replica.
    async fn aggregator_metric(&self, name: &str, labels: &str) -> f64 {
        let mut total = 0.0;
        for (_, ip) in self.pod_ips("app.kubernetes.io/component=aggregator").await {
            total += scrape(&ip, 9090, name, labels).ok().flatten().unwrap_or(0.0);
        }
        total
    }
}

fn condition_of(node: &Node, kind: &str) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

/// The value of `name{labels…}` summed over matching series in Prometheus text from `ip:port`;
/// `None` when no series matches.
fn scrape(ip: &str, port: u16, name: &str, labels: &str) -> anyhow::Result<Option<f64>> {
    let mut stream = TcpStream::connect((ip, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {ip}\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    Ok((!values.is_empty()).then(|| values.iter().sum()))
}

/// Polls `probe` once a second until it returns true (API reads that have no watchable event,
/// such as a metric); false after [`STEP_DEADLINE`].
async fn poll_until<F, Fut>(mut probe: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + STEP_DEADLINE;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if probe().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
    }
}

/// [`poll_until`], failing the test with `what` and the state of graywatch's pods.
async fn eventually<F, Fut>(cluster: &Cluster, what: &str, probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        poll_until(probe).await,
        "timed out waiting for: {what}\n{}",
        cluster.diagnostics().await
    );
}

/// Waits until the (current) agent pod's detectors are warm: its memory family has a local
/// score. They learn a baseline first, and a fault injected before is learnt as normal.
async fn await_agent_warm(cluster: &Cluster) {
    let agent_ip = cluster
        .pod_ips("app.kubernetes.io/component=agent")
        .await
        .first()
        .map(|(_, ip)| ip.clone())
        .expect("an agent pod");
    eventually(cluster, "the agent scores memory pressure", || {
        let ip = agent_ip.clone();
        async move {
            scrape(&ip, 9101, "graywatch_local_score", "family=\"MemoryPressure\"").is_ok_and(|v| v.is_some())
        }
    })
    .await;
}

/// A self-signed CA and a serving certificate for the aggregator's Service name, as a Secret.
async fn create_tls_secret(cluster: &Cluster, dir: &Path) {
    let service = format!("{RELEASE}-aggregator.{NAMESPACE}.svc");
    let sans = [
        format!("DNS:{service}"),
        format!("DNS:{RELEASE}-aggregator-replicas.{NAMESPACE}.svc"),
    ];
    let pki = Pki::create(dir, "/CN=graywatch-test-ca").expect("CA");
    pki.sign("tls", &format!("/CN={service}"), Usage::Server, &[&sans[0], &sans[1]])
        .expect("serving certificate");
    let read = |f: &str| pki.read(f).expect("read pem");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": TLS_SECRET, "namespace": NAMESPACE},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": read("tls.crt"), "tls.key": read("tls.key"), "ca.crt": read("ca.crt")},
    }))
    .expect("secret");
    Api::<Secret>::namespaced(cluster.client.clone(), NAMESPACE)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create the TLS secret");
}

async fn create_namespace(cluster: &Cluster) {
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).expect("namespace");
    let api = Api::<k8s_openapi::api::core::v1::Namespace>::all(cluster.client.clone());
    // A namespace left by an interrupted earlier run goes first.
    if let Ok(old) = api.get(NAMESPACE).await {
        let _ = cluster.helm(&["uninstall", RELEASE, "-n", NAMESPACE, "--wait"]);
        let _ = api.delete(NAMESPACE, &DeleteParams::default()).await;
        let uid = old.metadata.uid.unwrap_or_default();
        let gone = kube::runtime::wait::conditions::is_deleted(&uid);
        let wait = kube::runtime::wait::await_condition(api.clone(), NAMESPACE, gone);
        let _ = tokio::time::timeout(STEP_DEADLINE, wait).await;
    }
    api.create(&PostParams::default(), &ns).await.expect("create namespace");
}

/// Waits until the DaemonSet / Deployment named `name` has rolled out completely.
async fn await_rollout(cluster: &Cluster, kind: &str, name: &str) {
    let (client, name) = (cluster.client.clone(), name.to_owned());
    let what = format!("{kind} {name} rolled out");
    eventually(cluster, &what, || {
        let (client, name, kind) = (client.clone(), name.clone(), kind.to_owned());
        async move {
            if kind == "DaemonSet" {
                let Ok(ds) = Api::<DaemonSet>::namespaced(client, NAMESPACE).get(&name).await else {
                    return false;
                };
                let generation = ds.metadata.generation;
                ds.status.is_some_and(|s| {
                    s.observed_generation == generation
                        && s.desired_number_scheduled > 0
                        && s.number_ready == s.desired_number_scheduled
                        && s.updated_number_scheduled == Some(s.desired_number_scheduled)
                        && s.number_unavailable.unwrap_or(0) == 0
                })
            } else {
                let Ok(d) = Api::<Deployment>::namespaced(client, NAMESPACE).get(&name).await else {
                    return false;
                };
                let (generation, want) = (d.metadata.generation, d.spec.and_then(|s| s.replicas).unwrap_or(1));
                d.status.is_some_and(|s| {
                    s.observed_generation == generation
                        && s.replicas == Some(want)
                        && s.ready_replicas == Some(want)
                        && s.updated_replicas == Some(want)
                })
            }
        }
    })
    .await;
}

/// `kubectl rollout restart`: a new pod-template annotation.
async fn rollout_restart(cluster: &Cluster, kind: &str, name: &str) {
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": format!("{:?}", std::time::SystemTime::now())
    }}}}});
    let params = PatchParams::default();
    if kind == "DaemonSet" {
        Api::<DaemonSet>::namespaced(cluster.client.clone(), NAMESPACE)
            .patch(name, &params, &Patch::Merge(&patch))
            .await
            .expect("restart the DaemonSet");
    } else {
        Api::<Deployment>::namespaced(cluster.client.clone(), NAMESPACE)
            .patch(name, &params, &Patch::Merge(&patch))
            .await
            .expect("restart the Deployment");
    }
}

/// Records every status the Node's graywatch conditions take while it runs, and a timeline of
/// their changes and of the graywatch pods' lives: what a failed rollout step prints, so a
/// flake says which condition went where, why, and what the pods were doing then.
struct ConditionRecorder {
    seen: Arc<Mutex<BTreeSet<(String, String)>>>,
    timeline: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ConditionRecorder {
    fn start(cluster: &Cluster) -> Self {
        let started = std::time::Instant::now();
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let timeline = Arc::new(Mutex::new(Vec::new()));
        let record = {
            let timeline = timeline.clone();
            move |line: String| {
                let at = started.elapsed().as_secs_f64();
                timeline
                    .lock()
                    .expect("timeline lock")
                    .push(format!("{at:6.1}s {line}"));
            }
        };
        let (api, node, sink, note_node) = (cluster.nodes(), cluster.node.clone(), seen.clone(), record.clone());
        let conditions = tokio::spawn(async move {
            let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
            let mut stream = watcher(api, config).applied_objects().boxed();
            let mut last = std::collections::BTreeMap::<String, String>::new();
            while let Ok(Some(node)) = stream.try_next().await {
                let conditions = node.status.and_then(|s| s.conditions).unwrap_or_default();
                let mut seen = sink.lock().expect("recorder lock");
                for c in conditions.into_iter().filter(|c| c.type_.starts_with("graywatch.io/")) {
                    if changed(&mut last, &c.type_, &c.status) {
                        note_node(format!(
                            "{} {} {}: {}",
                            c.type_,
                            c.status,
                            c.reason.clone().unwrap_or_default(),
                            c.message.clone().unwrap_or_default()
                        ));
                    }
                    seen.insert((c.type_, c.status));
                }
            }
        });
        let pods_api = cluster.pods(NAMESPACE);
        let pods = tokio::spawn(async move {
            let mut stream = watcher(pods_api, watcher::Config::default()).boxed();
            let mut last = std::collections::BTreeMap::<String, String>::new();
            while let Ok(Some(event)) = stream.try_next().await {
                let pod = match event {
                    watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => pod,
                    watcher::Event::Delete(pod) => {
                        record(format!("pod {} deleted", pod.metadata.name.unwrap_or_default()));
                        continue;
                    }
                    watcher::Event::Init | watcher::Event::InitDone => continue,
                };
                let name = pod.metadata.name.clone().unwrap_or_default();
                let status = pod.status.unwrap_or_default();
                let ready = status
                    .conditions
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                let state = format!(
                    "{}{}{}",
                    status.phase.unwrap_or_default(),
                    if ready { " ready" } else { "" },
                    if pod.metadata.deletion_timestamp.is_some() {
                        " terminating"
                    } else {
                        ""
                    }
                );
                if changed(&mut last, &name, &state) {
                    record(format!("pod {name} {state}"));
                }
            }
        });
        Self {
            seen,
            timeline,
            tasks: vec![conditions, pods],
        }
    }

    /// (condition, status) pairs other than True seen so far.
    fn not_true(&self) -> Vec<(String, String)> {
        let seen = self.seen.lock().expect("recorder lock");
        seen.iter().filter(|(_, s)| s != "True").cloned().collect()
    }

    /// Asserts that every condition stayed True during `step`; prints the timeline either way.
    fn assert_all_true(&self, step: &str) {
        let timeline = self.timeline.lock().expect("timeline lock").join("\n  ");
        eprintln!("{step}, timeline:\n  {timeline}");
        let not_true = self.not_true();
        assert!(
            not_true.is_empty(),
            "conditions during the {step}: {not_true:?}\n  {timeline}"
        );
    }
}

/// Whether `key`'s state differs from the last one recorded in `last` (which it then becomes).
fn changed(last: &mut std::collections::BTreeMap<String, String>, key: &str, state: &str) -> bool {
    if last.get(key).is_some_and(|s| s == state) {
        return false;
    }
    last.insert(key.to_owned(), state.to_owned());
    true
}

impl Drop for ConditionRecorder {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The memory charged to pod `uid`'s cgroup on this (the only) node: cgroup v2
/// `memory.current`, or v1 `memory.usage_in_bytes` (kernel memory included) on hybrid hosts.
fn pod_memory_bytes(uid: &str) -> Option<u64> {
    fn find(dir: &Path, name: &str, depth: usize) -> Option<PathBuf> {
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            let file = entry.file_name();
            let file = file.to_string_lossy();
            // cgroupfs driver: pod<uid>; systemd driver: kubepods-…-pod<uid with _>.slice.
            if file.contains(name) || file.contains(&name.replace('-', "_")) {
                return Some(path);
            }
            if depth > 0
                && let Some(found) = find(&path, name, depth - 1)
            {
                return Some(found);
            }
        }
        None
    }
    let name = format!("pod{uid}");
    for (root, file) in [
        ("/sys/fs/cgroup/memory", "memory.usage_in_bytes"),
        ("/sys/fs/cgroup", "memory.current"),
    ] {
        let Some(dir) = find(Path::new(root), &name, 4) else {
            continue;
        };
        if let Some(bytes) = std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return Some(bytes);
        }
    }
    None
}

/// Values for a one-node cluster, written once next to the test's other files. One node has no
/// peer group and no vantage: its own detector is all the evidence there is, so it gets full
/// weight (at 0.9, a local score under 0.89 could never reach `min_action_confidence` 0.8).
fn single_node_values() -> PathBuf {
    let path = std::env::temp_dir().join(format!("graywatch-lifecycle-{}-values.yaml", std::process::id()));
    std::fs::write(&path, "extraPolicy:\n  weight_local: 1.0\n").expect("write values");
    path
}

fn install_args<'a>(mode: &'a str, extra: &[&'a str]) -> Vec<String> {
    let chart = chart_dir();
    let mut args: Vec<String> = vec![
        "upgrade".into(),
        "--install".into(),
        RELEASE.into(),
        chart.display().to_string(),
        "-n".into(),
        NAMESPACE.into(),
        "--set".into(),
        format!("mode={mode}"),
        "--set".into(),
        "security.auth=token-review".into(),
        "--set".into(),
        format!("security.tls.secretName={TLS_SECRET}"),
        // The images are loaded into the node's containerd; there is no registry here.
        "--set".into(),
        "agent.image.pullPolicy=Never".into(),
        "--set".into(),
        "aggregator.image.pullPolicy=Never".into(),
        "--set".into(),
        format!("aggregator.leaseDurationMs={}", LEASE_SECONDS * 1000),
        // One node: no peer group and no other vantage point, so the node's own evidence must
        // be able to reach the degrade threshold on its own (a file: `--set` makes 0.9 a string).
        "-f".into(),
        single_node_values().display().to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(clippy::too_many_lines, reason = "one end-to-end scenario, read top to bottom")]
async fn the_chart_runs_on_a_real_kubelet_through_its_whole_lifecycle() {
    let Some(cluster) = Cluster::from_env().await else {
        return;
    };
    let fullname = RELEASE;
    let work = std::env::temp_dir().join(format!("graywatch-lifecycle-{}", std::process::id()));

    // 1. Install.
    eprintln!("== install (nrc, token-review, TLS)");
    create_namespace(&cluster).await;
    create_tls_secret(&cluster, &work.join("tls")).await;
    let args = install_args("nrc", &[]);
    let started = std::time::Instant::now();
    cluster
        .helm(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .expect("helm install");
    await_rollout(&cluster, "DaemonSet", &format!("{fullname}-agent")).await;
    await_rollout(&cluster, "Deployment", &format!("{fullname}-aggregator")).await;
    cluster.await_condition(HEALTHY, "True").await;
    eprintln!(
        "helm install → {HEALTHY}=True in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let lease = Api::<Lease>::namespaced(cluster.client.clone(), NAMESPACE)
        .get(&format!("{fullname}-aggregator"))
        .await
        .expect("the Lease exists");
    let holder = lease.spec.and_then(|s| s.holder_identity).expect("a Lease holder");
    let replicas = cluster.pod_ips("app.kubernetes.io/component=aggregator").await;
    assert_eq!(replicas.len(), 2, "two aggregator replicas: {replicas:?}");
    assert!(
        replicas.iter().any(|(name, _)| *name == holder),
        "the Lease holder {holder} is one of the replicas {replicas:?}"
    );
    let leaders = cluster.aggregator_metric("graywatch_aggregator_is_leader", "").await;
    assert!(
        (leaders - 1.0).abs() < f64::EPSILON,
        "exactly one leader, got {leaders}"
    );
    // token-review: summaries were accepted from an authenticated agent, none denied.
    let denied = cluster.aggregator_metric("graywatch_aggregator_denied_total", "").await;
    assert!(denied.abs() < f64::EPSILON, "no agent was denied: {denied}");

    // What the agent pod's memory cgroup holds (the limit counts it, BPF maps included): a
    // figure for the chart's requests and limit, printed, not asserted.
    let agent_pods = cluster
        .pods(NAMESPACE)
        .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
        .await
        .expect("list agent pods");
    for pod in agent_pods.items {
        let uid = pod.metadata.uid.unwrap_or_default();
        match pod_memory_bytes(&uid) {
            Some(bytes) => eprintln!(
                "agent pod memory cgroup: {:.1} MiB (chart limit 128Mi)",
                bytes as f64 / 1_048_576.0
            ),
            None => eprintln!("agent pod memory cgroup: not found for pod {uid}"),
        }
    }

    // 2. A fault the node's own agent sees.
    eprintln!("== memory thrash in a pod under a memory limit");
    await_agent_warm(&cluster).await;
    let stress: Pod = serde_json::from_value(json!({
        "metadata": {"name": "memory-thrash", "namespace": NAMESPACE},
        "spec": {
            "restartPolicy": "Always",
            "containers": [{
                "name": "stress",
                "image": "localhost/graywatch-stress:test",
                "imagePullPolicy": "Never",
                "args": ["--vm", "1", "--vm-bytes", "230M", "--vm-keep", "--hdd", "1", "--hdd-bytes", "128M", "-q"],
                "resources": {"limits": {"memory": "256Mi"}, "requests": {"memory": "256Mi"}},
            }],
        },
    }))
    .expect("pod");
    let pods = cluster.pods(NAMESPACE);
    pods.create(&PostParams::default(), &stress)
        .await
        .expect("start the memory thrash");
    let fault_at = std::time::Instant::now();
    cluster.await_condition(MEMORY, "False").await;
    eprintln!(
        "memory thrash → {MEMORY}=False in {:.1}s",
        fault_at.elapsed().as_secs_f64()
    );
    pods.delete("memory-thrash", &DeleteParams::default().grace_period(0))
        .await
        .expect("stop the thrash");
    let stopped = std::time::Instant::now();
    cluster.await_condition(MEMORY, "True").await;
    cluster.await_condition(HEALTHY, "True").await;
    eprintln!(
        "thrash stopped → {MEMORY}=True in {:.1}s",
        stopped.elapsed().as_secs_f64()
    );

    // 3. Agent rollout: conditions stay True and the new agent's windows are new.
    eprintln!("== agent rollout restart");
    let recorder = ConditionRecorder::start(&cluster);
    let stop_notices = "result=\"stopping\"";
    let stopping_before = cluster
        .aggregator_metric("graywatch_aggregator_summaries_total", stop_notices)
        .await;
    rollout_restart(&cluster, "DaemonSet", &format!("{fullname}-agent")).await;
    await_rollout(&cluster, "DaemonSet", &format!("{fullname}-agent")).await;
    // The old agent said it was stopping, to each replica (the aggregator pods are the same
    // ones: only the agent rolled).
    let stopping = cluster
        .aggregator_metric("graywatch_aggregator_summaries_total", stop_notices)
        .await
        - stopping_before;
    assert!(
        stopping >= 2.0,
        "stop notices taken by the 2 aggregator replicas during the agent rollout: {stopping}"
    );
    let new_before = cluster
        .aggregator_metric("graywatch_aggregator_summaries_total", "result=\"new\"")
        .await;
    // Before the fix, a restarted agent's windows (seq from 1 again, same boot) were all
    // counted as replays: none would be new.
    let windows = NEW_AGENT_WINDOWS;
    eventually(&cluster, "the new agent's windows are ingested as new", || {
        let cluster = &cluster;
        async move {
            let now = cluster
                .aggregator_metric("graywatch_aggregator_summaries_total", "result=\"new\"")
                .await;
            // Every replica ingests every window.
            now - new_before >= (2 * windows) as f64
        }
    })
    .await;
    recorder.assert_all_true("agent rollout");
    drop(recorder);

    // 4. Aggregator rollout: the Lease changes hands without a gap longer than its duration.
    eprintln!("== aggregator rollout restart");
    let recorder = ConditionRecorder::start(&cluster);
    let renewals = Arc::new(Mutex::new(Vec::<(String, i64)>::new()));
    let lease_watch = {
        let (api, sink) = (
            Api::<Lease>::namespaced(cluster.client.clone(), NAMESPACE),
            renewals.clone(),
        );
        let name = format!("{fullname}-aggregator");
        tokio::spawn(async move {
            let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
            let mut stream = watcher(api, config).applied_objects().boxed();
            while let Ok(Some(lease)) = stream.try_next().await {
                let Some(spec) = lease.spec else { continue };
                if let (Some(holder), Some(renew)) = (spec.holder_identity, spec.renew_time) {
                    sink.lock()
                        .expect("lease lock")
                        .push((holder, renew.0.as_millisecond()));
                }
            }
        })
    };
    let old_replicas: BTreeSet<String> = cluster
        .pod_ips("app.kubernetes.io/component=aggregator")
        .await
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    rollout_restart(&cluster, "Deployment", &format!("{fullname}-aggregator")).await;
    await_rollout(&cluster, "Deployment", &format!("{fullname}-aggregator")).await;
    eventually(&cluster, "a new replica holds and renews the Lease", || {
        let (renewals, old) = (renewals.clone(), old_replicas.clone());
        async move {
            let seen = renewals.lock().expect("lease lock");
            seen.iter().filter(|(h, _)| !old.contains(h)).count() >= 2
        }
    })
    .await;
    lease_watch.abort();
    let seen = renewals.lock().expect("lease lock").clone();
    let longest_gap_ms = seen.windows(2).map(|w| w[1].1 - w[0].1).max().unwrap_or(0);
    let holders: BTreeSet<&String> = seen.iter().map(|(h, _)| h).collect();
    eprintln!("aggregator rollout: Lease holders {holders:?}, longest gap between renewals {longest_gap_ms} ms");
    assert!(
        longest_gap_ms <= LEASE_SECONDS * 1000,
        "decisions stopped for {longest_gap_ms} ms, longer than the Lease ({LEASE_SECONDS} s): {seen:?}"
    );
    recorder.assert_all_true("aggregator rollout");
    drop(recorder);

    // 5. Mode changes: no taint of a mode that is no longer active.
    eprintln!("== helm upgrade nrc → direct-taint (with a fault) → nrc → dry-run");
    let args = install_args("direct-taint", &[]);
    cluster
        .helm(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .expect("helm upgrade to direct-taint");
    await_rollout(&cluster, "Deployment", &format!("{fullname}-aggregator")).await;
    // The agent restarted in step 3 (and a chart upgrade may restart it): a fault injected
    // while its detectors learn their baseline would be learnt as normal.
    await_agent_warm(&cluster).await;
    pods.create(&PostParams::default(), &stress)
        .await
        .expect("start the memory thrash again");
    let tainted_watch = cluster.nodes();
    let node = cluster.node.clone();
    let wait = kube::runtime::wait::await_condition(tainted_watch, &node, |n: Option<&Node>| {
        n.and_then(|n| n.spec.as_ref()?.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TAINT))
    });
    let tainted = tokio::time::timeout(STEP_DEADLINE, wait).await.is_ok();
    let diagnostics = if tainted {
        String::new()
    } else {
        cluster.diagnostics().await
    };
    assert!(
        tainted,
        "direct-taint mode never tainted the degraded node\n{diagnostics}"
    );
    let args = install_args("nrc", &[]);
    cluster
        .helm(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .expect("helm upgrade to nrc");
    await_rollout(&cluster, "Deployment", &format!("{fullname}-aggregator")).await;
    assert!(
        !cluster.tainted().await,
        "our taint stayed after leaving direct-taint mode"
    );
    pods.delete("memory-thrash", &DeleteParams::default().grace_period(0))
        .await
        .expect("stop the thrash");
    cluster.await_condition(HEALTHY, "True").await;
    let args = install_args("dry-run", &[]);
    cluster
        .helm(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .expect("helm upgrade to dry-run");
    await_rollout(&cluster, "Deployment", &format!("{fullname}-aggregator")).await;
    assert!(!cluster.tainted().await, "a taint in dry-run mode");

    // 6. Uninstall: the pre-delete hook removes our conditions (and any taint).
    eprintln!("== helm uninstall");
    let out = cluster
        .helm(&["uninstall", RELEASE, "-n", NAMESPACE, "--wait"])
        .expect("helm uninstall");
    eprintln!("{out}");
    let node = cluster.nodes().get(&cluster.node).await.expect("node");
    let left: Vec<String> = node
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.type_)
        .filter(|t| t.starts_with("graywatch.io/"))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "graywatch conditions left after uninstall");
    assert!(!cluster.tainted().await, "graywatch taint left after uninstall");
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(cluster.client.clone())
        .delete(NAMESPACE, &DeleteParams::default())
        .await;
    let _ = std::fs::remove_dir_all(&work);
}
