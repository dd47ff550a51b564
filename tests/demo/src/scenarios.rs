//! The gray-failure scenario matrix (`cargo xtask bench detect --scenarios …`): on one demo
//! cluster, after the baseline, each scenario in turn is injected, watched until the faulty
//! node(s) are acted on (or a bounded wait ends), removed, and watched until everything is
//! healthy again. Every run prints one `scenario_result=<json>` line: which conditions reacted,
//! fault → condition False / taint / zone verdict, recovery, and every action on a node that was
//! not faulted.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context;
use graywatch_testbench::{
    cgroup::{Layout, Limits, TestCgroup},
    fault::{LinkEmulator, LinkSpec, RateLimit},
    netns::Bench,
};
use serde_json::json;

/// What is done to a faulty node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Link emulation (delay, jitter, loss) on the node's packets towards every peer, or only
    /// towards one.
    Link { spec: &'static str, one_peer: bool },
    /// CPU hogs inside the node's cgroup: run-queue contention.
    CpuHogs,
    /// Anonymous memory plus page-cache re-reads under a memory limit, inside the node's cgroup.
    MemoryThrash,
    /// A process leaking [`LEAK_MIB_PER_SECOND`] under a [`LEAK_LIMIT_MIB`] limit until the OOM
    /// killer ends it: the memory condition should go False with reason `PredictedFailure`
    /// before the kill (see [`run_matrix`]: this one measures the lead time).
    MemoryLeak,
    /// The node's egress capped ([`EGRESS_RATE`], a [`EGRESS_QUEUE`] queue) while bulk senders
    /// in its cgroup try to send more: a node past its bandwidth allowance (EC2's
    /// `bw_out_allowance_exceeded`), whose own traffic queues and is dropped with everyone's.
    EgressSaturated,
}

/// The egress cap and its queue: far above what the node's RPC traffic needs, far under what
/// [`BULK_SENDERS`] bulk transfers send.
const EGRESS_RATE: &str = "20mbit";
const EGRESS_QUEUE: &str = "20ms";
const BULK_SENDERS: usize = 4;

/// The leak's rate and limit: the kill comes ~2 minutes in, after the forecast's 30 s warm-up.
const LEAK_MIB_PER_SECOND: &str = "2";
const LEAK_LIMIT_MIB: u64 = 256;

/// The cgroup (relative to node `cgroup`'s) of the leak of run `run`: the demo's agents watch
/// these paths (a scoped agent reports pods and watched cgroups only).
#[must_use]
pub fn leak_cgroup(node_cgroup: &str, run: usize) -> String {
    format!("{}/memory-leak-{run}", node_cgroup.trim_end_matches('/'))
}

/// Which nodes are faulty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Targets {
    /// The demo's target node.
    One,
    /// The link between the demo's target node and one peer (the fault is on the target's
    /// packets towards that peer): expected to be reported as a degraded link, with no action on
    /// either end, since both ends measure the same round trips.
    OneLink,
    /// The target and a node of the other zone.
    Two,
    /// Every node of the last zone, towards every node outside it: expected to give one zone
    /// verdict, not a taint per node.
    Zone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    pub name: &'static str,
    pub fault: Fault,
    pub targets: Targets,
    /// 5 s on, 5 s off, for as long as the reaction is awaited.
    pub flapping: bool,
    /// The conditions the fault is about, when it has some (a load in the node's cgroup, a
    /// loss, a saturated link): the reaction is awaited until one of them is False too, not
    /// only until the first family that reacts (a side effect of the fault may come first).
    pub conditions: &'static [&'static str],
}

const fn link(name: &'static str, spec: &'static str) -> Scenario {
    Scenario {
        name,
        fault: Fault::Link { spec, one_peer: false },
        targets: Targets::One,
        flapping: false,
        conditions: &[],
    }
}

/// A loss on every link of the node: awaited until `PacketLossHealthy` is False too. Loss also
/// inflates the RTT the kernel measures (with timestamps, the ACKs sent while a lost segment is
/// recovered echo an older segment), so `NetworkLatencyHealthy` may react first.
const fn lossy(name: &'static str, spec: &'static str) -> Scenario {
    Scenario {
        conditions: &["PacketLossHealthy"],
        ..link(name, spec)
    }
}

/// The default link fault of the demo, for the scenarios about who is faulty and when.
const DEMO_FAULT: Fault = Fault::Link {
    spec: "delay=30ms,loss=1%",
    one_peer: false,
};

/// Every scenario, in the order they run.
pub const ALL: &[Scenario] = &[
    link("delay-5ms", "delay=5ms"),
    link("delay-20ms", "delay=20ms"),
    link("delay-100ms", "delay=100ms"),
    lossy("loss-0.5%", "loss=0.5%"),
    lossy("loss-2%", "loss=2%"),
    lossy("loss-10%", "loss=10%"),
    Scenario {
        name: "blackhole-one-peer",
        fault: Fault::Link {
            spec: "loss=100%",
            one_peer: true,
        },
        targets: Targets::OneLink,
        flapping: false,
        conditions: &[],
    },
    Scenario {
        name: "asymmetric-a-to-b",
        fault: Fault::Link {
            spec: "delay=30ms",
            one_peer: true,
        },
        targets: Targets::OneLink,
        flapping: false,
        conditions: &[],
    },
    link("jitter-only", "delay=10ms,jitter=10ms"),
    Scenario {
        name: "run-queue",
        fault: Fault::CpuHogs,
        targets: Targets::One,
        flapping: false,
        conditions: &["CpuContentionHealthy"],
    },
    Scenario {
        name: "memory-pressure",
        fault: Fault::MemoryThrash,
        targets: Targets::One,
        flapping: false,
        conditions: &["MemoryPressureHealthy"],
    },
    Scenario {
        name: "memory-leak",
        fault: Fault::MemoryLeak,
        targets: Targets::One,
        flapping: false,
        conditions: &["MemoryPressureHealthy"],
    },
    Scenario {
        name: "egress-saturated",
        fault: Fault::EgressSaturated,
        targets: Targets::One,
        flapping: false,
        // Past its bandwidth allowance the node's own traffic queues and is dropped; the bulk
        // senders may first show as run-queue contention on a small machine.
        conditions: &["NetworkLatencyHealthy", "PacketLossHealthy"],
    },
    Scenario {
        name: "zone-wide",
        fault: DEMO_FAULT,
        targets: Targets::Zone,
        flapping: false,
        conditions: &[],
    },
    Scenario {
        name: "two-nodes",
        fault: DEMO_FAULT,
        targets: Targets::Two,
        flapping: false,
        conditions: &[],
    },
    Scenario {
        name: "flapping",
        fault: DEMO_FAULT,
        targets: Targets::One,
        flapping: true,
        conditions: &[],
    },
];

/// `all`, or scenario names separated by commas.
pub fn select(list: &str) -> Result<Vec<Scenario>, String> {
    if list.trim() == "all" {
        return Ok(ALL.to_vec());
    }
    list.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|name| {
            ALL.iter().find(|s| s.name == name).copied().ok_or_else(|| {
                let names: Vec<&str> = ALL.iter().map(|s| s.name).collect();
                format!("unknown scenario `{name}` (known: all, {})", names.join(", "))
            })
        })
        .collect()
}

/// What the matrix needs of the running demo.
pub struct Cluster<'a> {
    pub bench: &'a Bench,
    pub names: &'a [String],
    pub zones: &'a [&'static str],
    /// Each node's cgroup, relative to the v2 root (`/graywatch-bench/demo-node-a-…`).
    pub node_cgroups: Vec<String>,
    pub target: usize,
    pub aggregator_http: u16,
    pub max_wait: Duration,
    /// Where graywatch-traffic is (the leak).
    pub bin_dir: PathBuf,
}

/// A fault in force; dropping it removes it.
enum Injected {
    Link(#[expect(dead_code, reason = "held for its Drop, which restores the node's routing")] LinkEmulator),
    Rate(#[expect(dead_code, reason = "held for its Drop, which removes the qdisc")] RateLimit),
    /// Held for its Drop, which kills the load.
    Load(Load),
}

impl Injected {
    /// A load stopped before its fault was removed: the bench broke, not the detection (a
    /// load that cannot start would otherwise read as a fault nobody detected).
    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Self::Load(load) = self
            && let Some(status) = load.child.try_wait().context("checking the fault's load")?
        {
            anyhow::bail!(
                "the fault's load in {} ended while the fault was on: {status}",
                load.cgroup.rel()
            );
        }
        Ok(())
    }
}

/// A load running in a cgroup inside a node; dropping it kills and reaps it.
struct Load {
    cgroup: TestCgroup,
    child: std::process::Child,
    _file: Option<TempFile>,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.cgroup.kill_all();
        let _ = self.child.wait();
    }
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Cluster<'_> {
    fn targets(&self, targets: Targets) -> Vec<usize> {
        let n = self.names.len();
        match targets {
            Targets::One | Targets::OneLink => vec![self.target],
            Targets::Two => {
                // The second one in the other zone, so that neither zone has a majority faulty.
                let zone = self.zones[self.target];
                let other = (0..n)
                    .rev()
                    .find(|&i| self.zones[i] != zone)
                    .unwrap_or((self.target + 1) % n);
                vec![self.target, other]
            }
            Targets::Zone => {
                let last = self.zones[n - 1];
                (0..n).filter(|&i| self.zones[i] == last).collect()
            }
        }
    }

    /// Injects `fault` on every target. `spare` nodes are not faulted towards: for a zone-wide
    /// fault, the zone's own nodes (its links to the rest of the fleet are what is slow).
    fn inject(&self, fault: Fault, targets: &[usize], spare: &[usize], run: usize) -> anyhow::Result<Vec<Injected>> {
        let mut injected = Vec::new();
        for &t in targets {
            let node = self.bench.node(t);
            match fault {
                Fault::Link { spec, one_peer } => {
                    let spec = LinkSpec::parse(spec).map_err(anyhow::Error::msg)?;
                    let peers: Vec<_> = self
                        .peers_of(t, spare)
                        .take(if one_peer { 1 } else { usize::MAX })
                        .collect();
                    injected.push(Injected::Link(LinkEmulator::start(
                        &node.netns,
                        node.ipv4,
                        "eth0",
                        &peers,
                        spec,
                    )?));
                }
                Fault::CpuHogs => {
                    let cgroup = self.load_cgroup(t, "cpu-hogs", run, Limits::default())?;
                    // Two busy workers per CPU of this machine, each waiting for the other: the
                    // node's workload is oversubscribed twice over. At the idle scheduling class,
                    // so that the other nodes, which share this machine's CPUs but would not share
                    // a real node's, preempt them at once instead of waiting behind them (CI
                    // missed the fault when the hogs' delay spread to every node: each was then
                    // hardly an outlier).
                    let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
                    let child = cgroup.spawn(
                        Command::new("stress-ng")
                            .args(["--cpu", &(2 * cpus).to_string(), "--sched", "idle", "--quiet"])
                            .stdout(std::process::Stdio::null()),
                    )?;
                    injected.push(Injected::Load(Load {
                        cgroup,
                        child,
                        _file: None,
                    }));
                }
                Fault::MemoryThrash => {
                    let cgroup = self.load_cgroup(
                        t,
                        "memory-thrash",
                        run,
                        Limits {
                            cpu_quota: None,
                            memory_max: Some(256 << 20),
                        },
                    )?;
                    let file = TempFile(PathBuf::from(format!(
                        "/var/tmp/graywatch-demo-thrash-{}-{t}.dat",
                        std::process::id()
                    )));
                    // 220 MiB of anonymous memory kept resident (no swap: it cannot be
                    // reclaimed), and four readers re-reading a 64 MiB file through the ~36 MiB
                    // left under the 256 MiB limit: the file's pages are the working set, so
                    // each refault is a workingset refault, which the kernel counts as a memory
                    // stall. Measured on a hybrid-cgroup host: memory PSI some 12–23 % (one
                    // reader of a 128 MiB file, the earlier load: 0.2 %, which is no pressure).
                    let script = format!(
                        "stress-ng --vm 1 --vm-bytes 220M --vm-keep --quiet & \
                         dd if=/dev/zero of={f} bs=1M count=64 status=none; \
                         for reader in 1 2 3 4; do \
                         (while :; do cat {f} > /dev/null; done) & done; wait",
                        f = file.0.display()
                    );
                    let child = cgroup.spawn(Command::new("sh").args(["-c", &script]))?;
                    injected.push(Injected::Load(Load {
                        cgroup,
                        child,
                        _file: Some(file),
                    }));
                }
                Fault::MemoryLeak => injected.push(Injected::Load(self.start_leak(t, run)?)),
                Fault::EgressSaturated => {
                    injected.push(Injected::Rate(RateLimit::with_queue(
                        &node.netns,
                        "eth0",
                        EGRESS_RATE,
                        EGRESS_QUEUE,
                    )?));
                    let peer = self.peers_of(t, spare).next().context("no peer to send to")?;
                    let cgroup = self.load_cgroup(t, "bulk-senders", run, Limits::default())?;
                    // Bulk transfers that never end, to the peer's traffic server; TCP's
                    // congestion control keeps the queue full. One shell in the node's network
                    // namespace starts them all (killed with the cgroup).
                    let script = format!(
                        "for sender in $(seq {BULK_SENDERS}); do \
                         {traffic} client --connect {peer}:{port} --bulk 1000000000000 > /dev/null & done; wait",
                        traffic = self.bin_dir.join("graywatch-traffic").display(),
                        port = crate::TRAFFIC_PORT,
                    );
                    let child = cgroup.spawn(node.command("sh", &[])?.args(["-c", &script]))?;
                    injected.push(Injected::Load(Load {
                        cgroup,
                        child,
                        _file: None,
                    }));
                }
            }
        }
        Ok(injected)
    }

    /// The addresses node `t`'s fault is towards: every other node but the `spare` ones, in
    /// bench order.
    fn peers_of<'s>(&'s self, t: usize, spare: &'s [usize]) -> impl Iterator<Item = std::net::Ipv4Addr> + 's {
        self.bench
            .nodes
            .iter()
            .enumerate()
            .filter(move |(i, _)| *i != t && !spare.contains(i))
            .map(|(_, n)| n.ipv4)
    }

    /// The leak in node `t`'s cgroup, at [`leak_cgroup`].
    fn start_leak(&self, t: usize, run: usize) -> anyhow::Result<Load> {
        let rel = leak_cgroup(&self.node_cgroups[t], run);
        let cgroup = TestCgroup::create_at(
            &rel,
            Limits {
                cpu_quota: None,
                memory_max: Some(LEAK_LIMIT_MIB << 20),
            },
        )
        .with_context(|| format!("creating cgroup {rel}"))?;
        let child = cgroup.spawn(
            Command::new(self.bin_dir.join("graywatch-traffic"))
                .args(["leak", "--mib-per-second", LEAK_MIB_PER_SECOND])
                .stdout(std::process::Stdio::null()),
        )?;
        Ok(Load {
            cgroup,
            child,
            _file: None,
        })
    }

    /// A cgroup for a load inside node `t`'s cgroup (so its figures are that node's).
    fn load_cgroup(&self, t: usize, name: &str, run: usize, limits: Limits) -> anyhow::Result<TestCgroup> {
        let rel = format!("{}/{name}-{run}", self.node_cgroups[t]);
        TestCgroup::create_at(&rel, limits).with_context(|| format!("creating cgroup {rel}"))
    }

    /// Whether a group verdict, and a degraded link, are in force, from the aggregator's metrics.
    async fn verdict_and_link(&self) -> anyhow::Result<(bool, bool)> {
        let text = crate::http_get_local(self.aggregator_http, "/metrics").await?;
        let positive = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map(|v| v > 0.0)
                .with_context(|| format!("no {name} in the aggregator's metrics"))
        };
        Ok((
            positive("graywatch_aggregator_verdicts")?,
            positive("graywatch_aggregator_degraded_links")?,
        ))
    }
}

/// Per node: Overall False, the family conditions that are False, tainted.
pub type FleetView = BTreeMap<String, (bool, BTreeSet<String>, bool)>;

/// The state of the fleet at one instant, as the matrix judges it.
struct Snapshot {
    nodes: FleetView,
    verdict: bool,
    link: bool,
}

impl Snapshot {
    fn clean(&self) -> bool {
        !self.verdict && !self.link && self.nodes.values().all(|(bad, _, tainted)| !bad && !tainted)
    }

    /// Records every action on a node outside `targets`.
    fn false_actions(&self, targets: &BTreeSet<&str>, into: &mut BTreeSet<String>) {
        for (name, (bad, families, tainted)) in &self.nodes {
            if targets.contains(name.as_str()) {
                continue;
            }
            if *bad {
                let families: Vec<&str> = families.iter().map(String::as_str).collect();
                into.insert(format!("{name} condition False ({})", families.join(", ")));
            }
            if *tainted {
                into.insert(format!("{name} tainted"));
            }
        }
    }
}

/// What one run of a scenario saw.
#[derive(Default)]
struct Outcome {
    condition: Option<Duration>,
    taint: Option<Duration>,
    verdict: Option<Duration>,
    link: Option<Duration>,
    expected: Option<Duration>,
    recovery: Option<Duration>,
    reacted: BTreeSet<String>,
    tainted_targets: BTreeSet<String>,
    false_actions: BTreeSet<String>,
}

impl Outcome {
    /// Takes in one snapshot taken `elapsed` after the injection.
    fn observe(
        &mut self,
        s: &Snapshot,
        scenario: &Scenario,
        targets: &BTreeSet<&str>,
        blamable: &BTreeSet<&str>,
        elapsed: Duration,
    ) {
        s.false_actions(blamable, &mut self.false_actions);
        let mut all_false = true;
        for name in targets {
            let (bad, families, tainted) = s.nodes.get(*name).cloned().unwrap_or_default();
            all_false &= bad;
            self.reacted.extend(families);
            if tainted {
                self.tainted_targets.insert((*name).to_owned());
            }
        }
        if all_false {
            self.condition.get_or_insert(elapsed);
        }
        if !self.tainted_targets.is_empty() {
            self.taint.get_or_insert(elapsed);
        }
        if s.verdict {
            self.verdict.get_or_insert(elapsed);
        }
        if s.link {
            self.link.get_or_insert(elapsed);
        }
        if scenario.conditions.iter().any(|c| self.reacted.contains(*c)) {
            self.expected.get_or_insert(elapsed);
        }
    }

    /// The reaction the scenario waits for has happened.
    fn complete(&self, scenario: &Scenario) -> bool {
        let acted = match scenario.targets {
            Targets::Zone => self.verdict.is_some() && self.condition.is_some(),
            Targets::One | Targets::Two => self.condition.is_some() && self.taint.is_some(),
            Targets::OneLink => self.link.is_some(),
        };
        acted && (scenario.conditions.is_empty() || self.expected.is_some())
    }

    fn document(
        &self,
        scenario: &Scenario,
        run: usize,
        targets: &BTreeSet<&str>,
        clean_before: bool,
    ) -> serde_json::Value {
        let secs = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 10.0).round() / 10.0);
        json!({
            "scenario": scenario.name,
            "run": run,
            "targets": targets,
            "clean_before": clean_before,
            "reacted": self.reacted,
            "condition_seconds": secs(self.condition),
            "taint_seconds": secs(self.taint),
            "expected_conditions": scenario.conditions,
            "expected_condition_seconds": secs(self.expected),
            "verdict_seconds": secs(self.verdict),
            "link_seconds": secs(self.link),
            "recovery_seconds": secs(self.recovery),
            "tainted_targets": self.tainted_targets,
            "false_actions": self.false_actions,
        })
    }
}

/// How a predicted memory failure shows in a [`FleetView`]'s family set (the observer appends
/// the reason to a False family condition whose reason is `PredictedFailure`).
pub const PREDICTED_MEMORY: &str = "MemoryPressureHealthy:PredictedFailure";

/// The memory-leak run: the leak in the target until the OOM killer ends it (or 6 × the
/// scenario wait), watching for the memory condition's `PredictedFailure`; then until the fleet
/// is clean again. The lead time is kill − prediction, both from the injection, on one clock.
async fn run_leak<S, SF>(
    cluster: &Cluster<'_>,
    run: usize,
    target_names: &BTreeSet<&str>,
    clean_before: bool,
    snapshot: &S,
) -> anyhow::Result<serde_json::Value>
where
    S: Fn() -> SF,
    SF: std::future::Future<Output = anyhow::Result<Snapshot>>,
{
    let tick = Duration::from_millis(250);
    let name = cluster.names[cluster.target].as_str();
    let mut leak = cluster.start_leak(cluster.target, run)?;
    let started = Instant::now();
    let mut outcome = Outcome::default();
    let (mut predicted, mut killed, mut exit) = (None, None, None);
    let (mut overall_false, mut tainted) = (false, false);
    while started.elapsed() < cluster.max_wait * 6 {
        let s = snapshot().await?;
        s.false_actions(target_names, &mut outcome.false_actions);
        if let Some((bad, families, taint)) = s.nodes.get(name) {
            overall_false |= *bad;
            tainted |= *taint;
            outcome.reacted.extend(families.iter().cloned());
            if predicted.is_none() && families.contains(PREDICTED_MEMORY) {
                predicted = Some(started.elapsed());
                println!(
                    "  >> {name}: MemoryPressureHealthy False (PredictedFailure) {:.1}s after the leak started",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        if let Some(status) = leak.child.try_wait()? {
            killed = Some(started.elapsed());
            exit = Some(status);
            println!(
                "  >> the leak ended ({status}) {:.1}s after it started",
                started.elapsed().as_secs_f64()
            );
            break;
        }
        tokio::time::sleep(tick).await;
    }
    let oom_kills = oom_kills(&leak.cgroup);
    drop(leak);
    let removed = Instant::now();
    while removed.elapsed() < cluster.max_wait * 3 {
        let s = snapshot().await?;
        s.false_actions(target_names, &mut outcome.false_actions);
        let still = s.nodes.get(name).is_some_and(|n| n.1.contains(PREDICTED_MEMORY));
        if s.clean() && !still {
            outcome.recovery = Some(removed.elapsed());
            break;
        }
        tokio::time::sleep(tick).await;
    }
    let secs = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 10.0).round() / 10.0);
    let lead_secs = match (predicted, killed) {
        (Some(p), Some(k)) => Some(k.as_secs_f64() - p.as_secs_f64()),
        _ => None,
    };
    Ok(json!({
        "scenario": "memory-leak",
        "run": run,
        "targets": target_names,
        "clean_before": clean_before,
        "leak_mib_per_second": LEAK_MIB_PER_SECOND,
        "limit_mib": LEAK_LIMIT_MIB,
        "reacted": outcome.reacted,
        "predicted_seconds": secs(predicted),
        "oom_kill_seconds": secs(killed),
        "killed_by_signal": exit.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
        "cgroup_oom_kills": oom_kills,
        "predicted_lead_seconds": lead_secs.map(|l| (l * 10.0).round() / 10.0),
        "overall_false": overall_false,
        "tainted": tainted,
        "recovery_seconds": secs(outcome.recovery),
        "false_actions": outcome.false_actions,
    }))
}

/// The cgroup's OOM kill count (v2 `memory.events`, v1 `memory.oom_control`), if readable.
fn oom_kills(cgroup: &TestCgroup) -> Option<u64> {
    let file = match cgroup.layout() {
        Layout::V2 { .. } => cgroup.v2_dir()?.join("memory.events"),
        Layout::Hybrid { root, .. } | Layout::V1 { root } => {
            root.join("memory").join(cgroup.rel()).join("memory.oom_control")
        }
    };
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
}

/// Runs `scenarios` `runs` times each (all scenarios once, then again), printing one result line
/// per run. `observe` reads the fleet.
pub async fn run_matrix<F, Fut>(
    cluster: &Cluster<'_>,
    scenarios: &[Scenario],
    runs: usize,
    observe: F,
) -> anyhow::Result<Vec<serde_json::Value>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<FleetView>>,
{
    let snapshot = || async {
        let (verdict, link) = cluster.verdict_and_link().await?;
        anyhow::Ok(Snapshot {
            nodes: observe().await?,
            verdict,
            link,
        })
    };
    let tick = Duration::from_millis(250);
    let mut results = Vec::new();
    for run in 0..runs {
        for scenario in scenarios {
            // Start from a healthy fleet: the previous fault's hysteresis must have run out.
            let settle = Instant::now();
            let mut clean_before = false;
            while settle.elapsed() < cluster.max_wait * 3 {
                if snapshot().await?.clean() {
                    clean_before = true;
                    break;
                }
                tokio::time::sleep(tick).await;
            }
            let targets = cluster.targets(scenario.targets);
            let target_names: BTreeSet<&str> = targets.iter().map(|&t| cluster.names[t].as_str()).collect();
            // Nodes an action on is no false action: none for a link fault (neither end is to
            // blame), the faulty nodes otherwise.
            let blamable: BTreeSet<&str> = if scenario.targets == Targets::OneLink {
                BTreeSet::new()
            } else {
                target_names.clone()
            };
            println!(
                "\n== scenario {} (run {}/{runs}) on {target_names:?}{}",
                scenario.name,
                run + 1,
                if clean_before {
                    ""
                } else {
                    " — the fleet was NOT healthy before it"
                }
            );
            if scenario.fault == Fault::MemoryLeak {
                let result = run_leak(cluster, run, &target_names, clean_before, &snapshot).await?;
                println!("scenario_result={result}");
                results.push(result);
                continue;
            }
            let spare = if scenario.targets == Targets::Zone {
                targets.clone()
            } else {
                Vec::new()
            };
            let mut injected = Some(cluster.inject(scenario.fault, &targets, &spare, run)?);
            let started = Instant::now();
            let mut flip = started;
            let mut outcome = Outcome::default();
            while started.elapsed() < cluster.max_wait && !outcome.complete(scenario) {
                if scenario.flapping && flip.elapsed() >= Duration::from_secs(5) {
                    flip = Instant::now();
                    injected = match injected {
                        Some(_) => None,
                        None => Some(cluster.inject(scenario.fault, &targets, &spare, run)?),
                    };
                }
                outcome.observe(
                    &snapshot().await?,
                    scenario,
                    &target_names,
                    &blamable,
                    started.elapsed(),
                );
                if !outcome.complete(scenario) {
                    tokio::time::sleep(tick).await;
                }
            }
            for fault in injected.iter_mut().flatten() {
                fault.ensure_running()?;
            }
            drop(injected);
            let removed = Instant::now();
            while removed.elapsed() < cluster.max_wait * 3 {
                let s = snapshot().await?;
                s.false_actions(&blamable, &mut outcome.false_actions);
                for name in &target_names {
                    if s.nodes.get(*name).is_some_and(|n| n.2) {
                        outcome.tainted_targets.insert((*name).to_owned());
                    }
                }
                if s.clean() {
                    outcome.recovery = Some(removed.elapsed());
                    break;
                }
                tokio::time::sleep(tick).await;
            }
            let result = outcome.document(scenario, run, &target_names, clean_before);
            println!("scenario_result={result}");
            results.push(result);
        }
    }
    Ok(results)
}
