//! The README demo: a real etcd + kube-apiserver, Node objects for a few network-namespace
//! "nodes" with real traffic between them, one graywatch-agent per node, the aggregator, an
//! injected gray failure on one node, and the resulting conditions, Events and taint. With
//! scenarios, the same cluster runs the gray-failure matrix instead (see [`scenarios`]).
//!
//! The nodes share this machine's kernel, so each agent takes its node-level figures from its
//! node's cgroup (`--cgroup-scope` with `--node-figures-from-scope`): pressure from the cgroup's
//! PSI files, run-queue delay from the cgroups below it, as a real node's come from its kernel.
//! CPU steal is the one figure the bench nodes share: a hypervisor steals from the whole kernel.

pub mod scenarios;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use graywatch_k8s_testkit::{NodeBuilder, TestApiserver};
use k8s_openapi::api::core::v1::{Event, Node};
use kube::{Api, Client, api::ListParams};

use graywatch_testbench::{
    fault::{LinkEmulator, LinkSpec},
    netns::{Bench, TestCgroup2, exec_in},
};

/// Label values of the demo's zones (the first `DemoOptions::zones` of them).
const ZONES: [&str; 3] = ["demo-zone-a", "demo-zone-b", "demo-zone-c"];
const TRAFFIC_PORT: u16 = 7000;

/// The zone of node `i` of `nodes`: consecutive nodes share a zone, the zones as even as can be.
fn zone_of(i: usize, nodes: usize, zones: u8) -> &'static str {
    let zones = usize::from(zones).clamp(1, ZONES.len());
    ZONES[(i * zones / nodes.max(1)).min(zones - 1)]
}

/// Everything the demo needs to know.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub nodes: u8,
    /// 2 or 3.
    pub zones: u8,
    pub target: Option<String>,
    pub fault: LinkSpec,
    pub baseline: Duration,
    /// Give up waiting for a reaction after this long.
    pub max_wait: Duration,
    pub keep: bool,
    pub bin_dir: PathBuf,
    /// Aggregator config file (TOML) with demo-speed thresholds.
    pub aggregator_config: Option<PathBuf>,
    /// Run these scenarios (each `runs` times) after the baseline instead of the single fault.
    pub scenarios: Vec<scenarios::Scenario>,
    pub runs: usize,
}

/// Measured outcome.
#[derive(Debug, Clone, Default)]
pub struct DemoResult {
    pub fault_to_condition: Option<Duration>,
    pub fault_to_taint: Option<Duration>,
    pub recovery: Option<Duration>,
    /// One document per scenario run (see [`scenarios::run_matrix`]).
    pub scenarios: Vec<serde_json::Value>,
    /// What the aggregator did during the clean baseline, before any fault: a false alarm each.
    pub baseline_alarms: Vec<String>,
    /// Nodes × baseline hours: the denominator of false alarms per node-hour.
    pub baseline_node_hours: f64,
}

/// Event reasons that are an alarm: a detection, an action, or an action held back. Seen before
/// any fault is injected, each is a false alarm.
const ALARM_REASONS: [&str; 7] = [
    "GrayFailureDetected",
    "GrayFailureTaint",
    "ActionSuppressed",
    "UncorroboratedVantage",
    "LinkDegraded",
    "NodeClaimReplaced",
    "NetworkingFault",
];

/// Our alarm Events so far (each repetition the apiserver folded into one Event counts).
async fn alarm_events(events: &Api<Event>) -> anyhow::Result<Vec<String>> {
    let mut alarms = Vec::new();
    for event in events.list(&ListParams::default()).await? {
        let reason = event.reason.clone().unwrap_or_default();
        if !ALARM_REASONS.contains(&reason.as_str()) {
            continue;
        }
        let object = event.involved_object.name.clone().unwrap_or_default();
        let message = event.message.clone().unwrap_or_default();
        let repeats = usize::try_from(event.count.unwrap_or(1).max(1)).unwrap_or(1);
        alarms.extend(std::iter::repeat_n(format!("{reason} on {object}: {message}"), repeats));
    }
    Ok(alarms)
}

/// Child processes killed (and reaped) on drop.
#[derive(Default)]
struct Processes(Vec<(String, Child)>);

impl Processes {
    fn spawn(&mut self, name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<()> {
        let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.0.push((name.to_owned(), child));
        Ok(())
    }

    /// Fails if any process has exited (with the name and the tail of its log).
    fn check(&mut self, logs: &Path) -> anyhow::Result<()> {
        for (name, child) in &mut self.0 {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                bail!("{name} exited ({status}); last log lines:\n{}", tail.join("\n"));
            }
        }
        Ok(())
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            // SIGTERM first so agents detach their programs and the aggregator drains.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id().cast_signed()),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for (_, child) in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn step(n: u8, total: u8, what: &str) {
    println!("\n[{n}/{total}] {what}");
    let _ = std::io::stdout().flush();
}

/// One line per node: zone, our conditions, taint.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeView {
    zone: String,
    conditions: BTreeMap<String, (String, String)>,
    /// Condition reasons by type (prefix trimmed, as in `conditions`).
    reasons: BTreeMap<String, String>,
    tainted: bool,
}

async fn node_views(nodes: &Api<Node>, prefix: &str, taint_key: &str) -> anyhow::Result<BTreeMap<String, NodeView>> {
    let mut views = BTreeMap::new();
    for node in nodes
        .list(&ListParams::default().labels("graywatch.io/demo=true"))
        .await?
    {
        let name = node.metadata.name.clone().unwrap_or_default();
        let zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("topology.kubernetes.io/zone").cloned())
            .unwrap_or_default();
        let ours: Vec<_> = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .filter(|c| c.type_.starts_with(prefix))
            .collect();
        let kind = |c: &k8s_openapi::api::core::v1::NodeCondition| c.type_.trim_start_matches(prefix).to_owned();
        let conditions = ours
            .iter()
            .map(|c| (kind(c), (c.status.clone(), c.message.clone().unwrap_or_default())))
            .collect();
        let reasons = ours
            .iter()
            .map(|c| (kind(c), c.reason.clone().unwrap_or_default()))
            .collect();
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|ts| ts.iter().any(|t| t.key == taint_key));
        views.insert(
            name,
            NodeView {
                zone,
                conditions,
                reasons,
                tainted,
            },
        );
    }
    Ok(views)
}

fn print_view(elapsed: Duration, views: &BTreeMap<String, NodeView>) {
    println!(
        "  t={:>5.1}s   condition=status(confidence) per family; Overall = graywatch.io/Healthy",
        elapsed.as_secs_f64()
    );
    for (name, view) in views {
        let conditions: Vec<String> = view
            .conditions
            .iter()
            .map(|(kind, (status, message))| {
                let family = kind.trim_end_matches("Healthy");
                let family = if family.is_empty() { "Overall" } else { family };
                match confidence(message) {
                    Some(c) => format!("{family}={status}({c})"),
                    None => format!("{family}={status}"),
                }
            })
            .collect();
        let conditions = if conditions.is_empty() {
            "(no graywatch conditions yet)".to_owned()
        } else {
            conditions.join(" ")
        };
        println!(
            "    {name:<8} {:<12} {conditions}{}",
            view.zone,
            if view.tainted { "  TAINTED" } else { "" }
        );
    }
    let _ = std::io::stdout().flush();
}

/// The aggregator's confidence from a condition message ("confidence 0.93: …").
fn confidence(message: &str) -> Option<&str> {
    let rest = message.split("confidence ").nth(1)?;
    rest.split(|c: char| c == ':' || c.is_whitespace()).next()
}

/// The condition messages of one node (the reasons, with the numbers).
fn print_reasons(name: &str, view: &NodeView) {
    for (kind, (status, message)) in &view.conditions {
        if status != "True" {
            println!("    {name} {kind}={status}: {message}");
        }
    }
}

async fn print_new_events(events: &Api<Event>, seen: &mut BTreeSet<String>) -> anyhow::Result<()> {
    for event in events.list(&ListParams::default()).await? {
        let uid = event.metadata.uid.clone().unwrap_or_default();
        if !seen.insert(uid) {
            continue;
        }
        let object = event.involved_object.name.clone().unwrap_or_default();
        println!(
            "    EVENT {} {} on {}: {}",
            event.type_.clone().unwrap_or_default(),
            event.reason.clone().unwrap_or_default(),
            object,
            event.message.clone().unwrap_or_default()
        );
    }
    Ok(())
}

fn overall(view: &NodeView) -> Option<&str> {
    view.conditions
        .get("GrayFailureHealthy")
        .or_else(|| view.conditions.get("Healthy"))
        .map(|(s, _)| s.as_str())
}

/// Runs the demo end to end and returns the measured times. Requires root.
#[expect(clippy::too_many_lines, reason = "the demo's steps in the order they are shown")]
pub async fn run(options: &DemoOptions) -> anyhow::Result<DemoResult> {
    const STEPS: u8 = 7;
    let started = Instant::now();
    let work = std::env::temp_dir().join(format!("graywatch-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;

    step(
        1,
        STEPS,
        "starting etcd + kube-apiserver v1.20.2 (built from Debian's source package)",
    );
    let apiserver = TestApiserver::start()
        .await?
        .context("the apiserver binary is missing: run `cargo xtask k8s build`")?;
    apiserver.install_crds().await?;
    let client: Client = apiserver.client().await?;
    println!(
        "  ready at {} ({:.1}s); KUBECONFIG={}",
        apiserver.url(),
        started.elapsed().as_secs_f64(),
        apiserver.kubeconfig_path().display()
    );

    step(
        2,
        STEPS,
        &format!(
            "creating {} nodes: a network namespace each, joined by a bridge, and a Node object",
            options.nodes
        ),
    );
    let bench = Bench::new(options.nodes)?;
    let names: Vec<String> = (0..options.nodes)
        .map(|i| format!("node-{}", char::from(b'a' + i)))
        .collect();
    let nodes_api: Api<Node> = Api::all(client.clone());
    let zones: Vec<&'static str> = (0..bench.nodes.len())
        .map(|i| zone_of(i, bench.nodes.len(), options.zones))
        .collect();
    for (i, node) in bench.nodes.iter().enumerate() {
        let zone = zones[i];
        // Play kubelet: the node Ready with its InternalIP (the netns address).
        apiserver
            .create_nodes(&[NodeBuilder::new(&names[i])
                .label("graywatch.io/demo", "true")
                .zone(zone)
                .instance_type("m7i.large")
                .nodepool("default")
                .internal_ip(&node.ipv4.to_string())])
            .await?;
        println!("  {} = netns {} ({}), {zone}", names[i], node.netns, node.ipv4);
    }

    step(
        3,
        STEPS,
        "starting traffic: every node serves TCP and calls every other node 50 times per second (1 s deadline)",
    );
    let cgroup_root = graywatch_agent::cgroups::find_unified_mount(&std::fs::read_to_string("/proc/self/mountinfo")?)
        .map(|(root, _)| root)
        .context("no cgroup v2 hierarchy")?;
    let cgroups: Vec<TestCgroup2> = names
        .iter()
        .map(|name| TestCgroup2::create(&cgroup_root, &format!("demo-{name}")))
        .collect::<Result<_, _>>()?;
    let traffic = options.bin_dir.join("graywatch-traffic");
    let mut processes = Processes::default();
    for (i, node) in bench.nodes.iter().enumerate() {
        let mut cmd = node.command(&traffic, &[cgroups[i].procs()])?;
        cmd.args(["server", "--listen", &format!("0.0.0.0:{TRAFFIC_PORT}")]);
        processes.spawn(
            &format!("server-{}", names[i]),
            &mut cmd,
            &logs.join(format!("server-{}.log", names[i])),
        )?;
    }
    // Give the servers their listen sockets before clients connect (clients retry anyway).
    wait_for_listeners(&bench, Duration::from_secs(10))?;
    for (i, node) in bench.nodes.iter().enumerate() {
        for (j, peer) in bench.nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            let mut cmd = node.command(&traffic, &[cgroups[i].procs()])?;
            cmd.args([
                "client",
                "--connect",
                &format!("{}:{TRAFFIC_PORT}", peer.ipv4),
                "--rate",
                "50",
                "--duration",
                "2h",
                // As a service client with a deadline: a peer that stops answering keeps
                // seeing new attempts (a blackholed link stays measured from both ends).
                "--request-timeout",
                "1s",
            ]);
            let name = format!("client-{}-{}", names[i], names[j]);
            processes.spawn(&name, &mut cmd, &logs.join(format!("{name}.log")))?;
        }
    }

    step(
        4,
        STEPS,
        "starting graywatch-aggregator (direct-taint mode) and one graywatch-agent per node",
    );
    let grpc_port = graywatch_k8s_testkit::free_port()?;
    let http_port = graywatch_k8s_testkit::free_port()?;
    let mut aggregator = Command::new(options.bin_dir.join("graywatch-aggregator"));
    aggregator
        .env("KUBECONFIG", apiserver.kubeconfig_path())
        .args([
            "--grpc-listen",
            &format!("127.0.0.1:{grpc_port}"),
            "--http-listen",
            &format!("127.0.0.1:{http_port}"),
        ])
        .args(["--identity", "demo-aggregator", "--namespace", "default"]);
    if let Some(config) = &options.aggregator_config {
        aggregator.arg("--config").arg(config);
    }
    processes.spawn("aggregator", &mut aggregator, &logs.join("aggregator.log"))?;
    // Each agent's /metrics tells when its detectors are warm (a family's local score appears).
    let agent_metrics_ports: Vec<u16> = names
        .iter()
        .map(|_| graywatch_k8s_testkit::free_port())
        .collect::<Result<_, _>>()?;
    for (i, name) in names.iter().enumerate() {
        let mut agent = Command::new(options.bin_dir.join("graywatch-agent"));
        agent
            .args([
                "--node-name",
                name,
                "--interval",
                "1s",
                "--listen",
                &format!("127.0.0.1:{}", agent_metrics_ports[i]),
                "--kube",
                "off",
            ])
            .args([
                "--cgroup-scope",
                &cgroups[i].cgroup_path,
                "--node-figures-from-scope",
                "--aggregator",
                &format!("http://127.0.0.1:{grpc_port}"),
            ]);
        // A scoped agent reports pods and watched cgroups only: the memory-leak runs' cgroups.
        if options
            .scenarios
            .iter()
            .any(|s| s.fault == scenarios::Fault::MemoryLeak)
        {
            let leaks: Vec<String> = (0..options.runs)
                .map(|run| scenarios::leak_cgroup(&cgroups[i].cgroup_path, run))
                .collect();
            agent.arg("--watch-cgroups").arg(leaks.join(","));
        }
        processes.spawn(
            &format!("agent-{name}"),
            &mut agent,
            &logs.join(format!("agent-{name}.log")),
        )?;
    }

    let policy_prefix = "graywatch.io/";
    let taint_key = "graywatch.io/degraded";
    let events_api: Api<Event> = Api::all(client.clone());
    let mut seen_events = BTreeSet::new();

    step(
        5,
        STEPS,
        &format!(
            "learning the baseline for {}s, and until every agent's detectors are warm",
            options.baseline.as_secs()
        ),
    );
    // A fault injected while a detector still learns its baseline is learned as normal: the
    // fault waits for the warm-up, however slowly the agents started.
    let baseline_started = Instant::now();
    let baseline_until = baseline_started + options.baseline;
    let warm_limit = baseline_until + WARM_UP_LIMIT;
    let mut cold = cold_agents(&names, &agent_metrics_ports).await;
    let mut last_print = Instant::now();
    while Instant::now() < baseline_until || !cold.is_empty() {
        processes.check(&logs)?;
        if Instant::now() > warm_limit {
            bail!(
                "agents still warming up {}s after they started: {}",
                baseline_started.elapsed().as_secs(),
                cold.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_secs(if cold.is_empty() { 5 } else { 1 })).await;
        let was_cold = !cold.is_empty();
        cold = cold_agents(&names, &agent_metrics_ports).await;
        if was_cold && cold.is_empty() {
            println!(
                "  every agent's detectors are warm ({:.0}s after the agents started)",
                baseline_started.elapsed().as_secs_f64()
            );
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            print_view(
                started.elapsed(),
                &node_views(&nodes_api, policy_prefix, taint_key).await?,
            );
        }
    }

    let baseline_alarms = alarm_events(&events_api).await?;
    let baseline_node_hours = bench.nodes.len() as f64 * baseline_started.elapsed().as_secs_f64() / 3600.0;
    println!(
        "  baseline: {} false alarm(s) over {:.2} node-hours",
        baseline_alarms.len(),
        baseline_node_hours
    );
    for alarm in &baseline_alarms {
        println!("    FALSE ALARM {alarm}");
    }

    let target_index = match &options.target {
        Some(t) => names
            .iter()
            .position(|n| n == t)
            .with_context(|| format!("--node {t}: the demo's nodes are {names:?}"))?,
        None => 1,
    };
    let target = &names[target_index];
    if !options.scenarios.is_empty() {
        let cluster = scenarios::Cluster {
            bench: &bench,
            names: &names,
            zones: &zones,
            node_cgroups: cgroups.iter().map(|c| c.cgroup_path.clone()).collect(),
            target: target_index,
            aggregator_http: http_port,
            max_wait: options.max_wait,
            bin_dir: options.bin_dir.clone(),
        };
        let observe = || {
            let api = nodes_api.clone();
            async move {
                let views = node_views(&api, policy_prefix, taint_key).await?;
                Ok(views
                    .into_iter()
                    .map(|(name, view)| {
                        let families = view
                            .conditions
                            .iter()
                            .filter(|(kind, (status, _))| {
                                status == "False" && !matches!(kind.as_str(), "GrayFailureHealthy" | "Healthy")
                            })
                            .map(|(kind, _)| match view.reasons.get(kind) {
                                Some(reason) if reason == "PredictedFailure" => format!("{kind}:{reason}"),
                                _ => kind.clone(),
                            })
                            .collect();
                        (name, (overall(&view) == Some("False"), families, view.tainted))
                    })
                    .collect())
            }
        };
        step(6, STEPS, "running the scenario matrix");
        let results = scenarios::run_matrix(&cluster, &options.scenarios, options.runs, observe).await;
        processes.check(&logs)?;
        print_new_events(&events_api, &mut seen_events).await?;
        return Ok(DemoResult {
            scenarios: results?,
            baseline_alarms,
            baseline_node_hours,
            ..DemoResult::default()
        });
    }
    let target_node = bench.node(target_index);
    let peers: Vec<_> = bench
        .nodes
        .iter()
        .filter(|n| n.netns != target_node.netns)
        .map(|n| n.ipv4)
        .collect();
    step(
        6,
        STEPS,
        &format!(
            "injecting a gray failure on {target}: {:?} towards every peer",
            options.fault
        ),
    );
    let fault = LinkEmulator::start(&target_node.netns, target_node.ipv4, "eth0", &peers, options.fault)?;
    let injected = Instant::now();
    let mut result = DemoResult {
        baseline_alarms,
        baseline_node_hours,
        ..DemoResult::default()
    };
    let mut last_print = Instant::now();
    while injected.elapsed() < options.max_wait
        && (result.fault_to_condition.is_none() || result.fault_to_taint.is_none())
    {
        processes.check(&logs)?;
        tokio::time::sleep(Duration::from_millis(250)).await;
        let views = node_views(&nodes_api, policy_prefix, taint_key).await?;
        if last_print.elapsed() >= Duration::from_secs(2) {
            print_view(started.elapsed(), &views);
            last_print = Instant::now();
        }
        if let Some(view) = views.get(target) {
            if result.fault_to_condition.is_none() && overall(view) == Some("False") {
                result.fault_to_condition = Some(injected.elapsed());
                println!(
                    "  >> {target}: condition False after {:.1}s",
                    injected.elapsed().as_secs_f64()
                );
                print_view(started.elapsed(), &views);
                print_reasons(target, view);
                print_new_events(&events_api, &mut seen_events).await?;
            }
            if result.fault_to_taint.is_none() && view.tainted {
                result.fault_to_taint = Some(injected.elapsed());
                println!(
                    "  >> {target}: tainted {taint_key}:NoSchedule after {:.1}s",
                    injected.elapsed().as_secs_f64()
                );
                print_view(started.elapsed(), &views);
                print_new_events(&events_api, &mut seen_events).await?;
            }
        }
    }

    step(7, STEPS, "removing the fault; waiting for recovery (hysteresis)");
    drop(fault);
    let removed = Instant::now();
    while removed.elapsed() < options.max_wait * 3 {
        processes.check(&logs)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let views = node_views(&nodes_api, policy_prefix, taint_key).await?;
        if views
            .get(target)
            .is_some_and(|v| overall(v) == Some("True") && !v.tainted)
        {
            result.recovery = Some(removed.elapsed());
            print_view(started.elapsed(), &views);
            print_new_events(&events_api, &mut seen_events).await?;
            break;
        }
    }

    if options.keep {
        println!(
            "\n--keep: everything stays up. KUBECONFIG={} ; logs in {}",
            apiserver.kubeconfig_path().display(),
            logs.display()
        );
        println!("press Ctrl-C to clean up");
        tokio::signal::ctrl_c().await?;
    }
    drop(processes);
    drop(cgroups);
    drop(bench);
    drop(apiserver);
    Ok(result)
}

fn wait_for_listeners(bench: &Bench, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    for node in &bench.nodes {
        loop {
            let out = exec_in(&node.netns, "ss", &["-Hltn", &format!("sport = :{TRAFFIC_PORT}")])?;
            if !out.stdout.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!("traffic server in {} did not start listening", node.netns);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// The families every demo agent scores from its node's traffic and cgroup (steal is the
/// hypervisor's, and not every VM has it).
const WARM_FAMILIES: [&str; 4] = ["NetworkLatency", "PacketLoss", "CpuContention", "MemoryPressure"];

/// How long past the baseline the demo waits for the agents' detectors to warm up.
const WARM_UP_LIMIT: Duration = Duration::from_mins(2);

/// The agents whose detectors are still warming up, each with the families that have no local
/// score yet (or why its metrics could not be read).
async fn cold_agents(names: &[String], metrics_ports: &[u16]) -> Vec<String> {
    let mut cold = Vec::new();
    for (name, port) in names.iter().zip(metrics_ports) {
        match http_get_local(*port, "/metrics").await {
            Ok(text) => {
                let missing: Vec<&str> = WARM_FAMILIES
                    .into_iter()
                    .filter(|family| {
                        let series = format!("graywatch_local_score{{family=\"{family}\"}}");
                        !text.lines().any(|l| l.starts_with(&series))
                    })
                    .collect();
                if !missing.is_empty() {
                    cold.push(format!("{name}: no local score yet for {}", missing.join(", ")));
                }
            }
            Err(error) => cold.push(format!("{name}: metrics unreadable ({error:#})")),
        }
    }
    cold
}

/// The body of a plain HTTP GET to `127.0.0.1:port`.
pub(crate) async fn http_get_local(port: u16, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}
