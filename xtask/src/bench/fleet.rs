//! `cargo xtask bench fleet`: graywatch-aggregator under N simulated agents.
//!
//! A private etcd + kube-apiserver (the cached v1.20.2 build) gets N Node objects (zones,
//! instance types, InternalIPs); the release aggregator runs against it (its kube actuator writes
//! to that apiserver, or dry-run); one process opens N gRPC `Report` streams, one per virtual
//! agent, each sending a realistic `NodeSummary` once per `--interval-ms` (five families, local scores,
//! eight peers with RTT percentiles; its 30 pod IPs on its first window, and the pod IPs of its
//! peers asked about on its first window and every 300th, as an agent on EKS's VPC CNI does). Measured over a window after warm-up: ingest rate (the
//! aggregator's own counter), send → Ack latency per summary, decision steps, the aggregator's CPU
//! and RSS, and apiserver writes per minute (the aggregator's applied actions and the apiserver's
//! own count of mutating requests).

use std::fmt::Write as _;
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use graywatch_k8s_testkit as kit;
use graywatch_proto::v1::{Family, NodeSummary, PeerStats, directive, ingest_client::IngestClient};
use serde_json::{Value, json};

use super::{
    CommonArgs, finite, fmt, log_tail, median,
    observer::{clock_ticks, cpu_ticks},
    output_dir, print_table, verdict, write_result,
};
use crate::{
    k8s,
    util::{run_cmd, workspace_root},
};

#[derive(clap::Args)]
pub struct FleetArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Fleet sizes (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub nodes: Vec<usize>,
    /// Sizes from which the aggregator runs in dry-run (decides, writes nothing).
    #[arg(long, default_value_t = 10_000)]
    pub dry_run_from: usize,
    /// Seconds of warm-up (streams open, first windows) before measuring.
    #[arg(long)]
    pub warmup_seconds: Option<u64>,
    /// Seconds measured per fleet size.
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Aggregator `--max-concurrent-writes` values to compare (comma-separated; each fleet size
    /// runs once per value, in this order). Empty: the aggregator's default.
    #[arg(long, value_delimiter = ',')]
    pub write_concurrency: Vec<usize>,
    /// Each virtual agent's report interval in ms (1000: 1 Hz; 5000: the 0.2 Hz of fleets past
    /// 10,000 nodes).
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Aggregator binaries to compare, `label=path` (comma-separated; nothing is built): every
    /// configuration runs once per binary, alternating, `--rounds` times. Default: the release
    /// build of the working tree.
    #[arg(long, value_delimiter = ',')]
    pub aggregator: Vec<String>,
    /// How many times each configuration runs (alternating the binaries of `--aggregator`).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
}

const P99_BUDGET_MS: f64 = 50.0;
/// The aggregator's ingest → decision histogram (leader, windows seen for the first time).
const DECISION_HISTOGRAM: &str = "graywatch_aggregator_ingest_to_decision_seconds";
/// The aggregator's decision step wall time histogram (cluster read, decision, writes).
const STEP_HISTOGRAM: &str = "graywatch_aggregator_decision_step_seconds";
const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];
const INSTANCE_TYPES: [&str; 4] = ["m5.large", "m5.xlarge", "c5.2xlarge", "r5.large"];
const PEERS_PER_NODE: usize = 8;
/// Pod IPs each virtual agent reports (EKS VPC CNI: addresses in no pod CIDR).
const PODS_PER_NODE: usize = 30;
/// Pod IPs of each peer a virtual agent asks the aggregator about (`address_lookups`): on its
/// first window, then once per `LOOKUP_PERIOD` windows, at its own phase, as a real agent
/// re-asks when its answers expire.
const LOOKUPS_PER_PEER: usize = 4;
const LOOKUP_PERIOD: u64 = 300;
/// The aggregator's default `ingest.max_nodes` (`graywatch_aggregator::ingest::DEFAULT_MAX_NODES`;
/// xtask does not link the aggregator).
const AGGREGATOR_DEFAULT_MAX_NODES: usize = 20_000;
/// Virtual agents per HTTP/2 connection (stays under the server's concurrent-stream limit).
const STREAMS_PER_CONNECTION: usize = 100;

#[expect(clippy::too_many_lines, reason = "one benchmark, its steps in order")]
pub fn run(args: &FleetArgs) -> anyhow::Result<()> {
    let quick = args.common.quick;
    let sizes = if args.nodes.is_empty() {
        if quick { vec![200] } else { vec![1_000, 5_000, 10_000] }
    } else {
        args.nodes.clone()
    };
    let warmup = Duration::from_secs(args.warmup_seconds.unwrap_or(if quick { 5 } else { 15 }));
    let window = Duration::from_secs(args.seconds.unwrap_or(if quick { 10 } else { 30 }));
    let interval = Duration::from_millis(args.interval_ms.max(1));
    let binaries = aggregator_binaries(args)?;
    k8s::ensure_apiserver()?;
    println!(
        "fleet: {sizes:?} virtual agents, one summary each per {} ms; warm-up {} s, measured {} s each; dry-run from {}; builds {:?}, {} round(s)",
        interval.as_millis(),
        warmup.as_secs(),
        window.as_secs(),
        args.dry_run_from,
        binaries.iter().map(|(label, _)| label.as_str()).collect::<Vec<_>>(),
        args.rounds.max(1)
    );
    let mut rows = Vec::new();
    let mut out = Vec::new();
    let mut met = None;
    let concurrencies: Vec<Option<usize>> = if args.write_concurrency.is_empty() {
        vec![None]
    } else {
        args.write_concurrency.iter().copied().map(Some).collect()
    };
    // Each configuration `rounds` times, alternating the binaries.
    let rounds = args.rounds.max(1);
    let mut runs = Vec::new();
    for &n in &sizes {
        for &c in &concurrencies {
            for _ in 0..rounds {
                runs.extend((0..binaries.len()).map(|b| (n, c, b)));
            }
        }
    }
    for (n, writes, b) in runs {
        let (label, aggregator) = &binaries[b];
        let dry_run = n >= args.dry_run_from;
        let api = Apiserver::start()?;
        api.create_namespace("graywatch")?;
        let started = Instant::now();
        api.create_nodes(n)?;
        println!("  {n} Node objects created in {:.1} s", started.elapsed().as_secs_f64());
        let agg = Aggregator::start(aggregator, &api, dry_run, writes, n, interval)?;
        let m = measure(n, &agg, &api, warmup, window, interval)?;
        let writes_per_min = m.actions as f64 / window.as_secs_f64() * 60.0;
        let api_writes_per_min = m.apiserver_writes as f64 / window.as_secs_f64() * 60.0;
        // CPU per summary ingested (the decision steps included), and memory per node.
        let cpu_us_per_summary = m.cpu_percent / 100.0 * 1e6 / m.ingest_per_s;
        let rss_kib_per_node = m.rss_mib * 1024.0 / n as f64;
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let load: Vec<&str> = load.split_whitespace().take(3).collect();
        if n == 10_000 && interval == Duration::from_secs(1) {
            met = Some(m.cpu_percent < 100.0 && m.p99_ms < P99_BUDGET_MS && m.ingest_per_s >= 0.95 * n as f64);
        }
        let row = vec![
            label.clone(),
            format!("{n}{}", if dry_run { " (dry-run)" } else { "" }),
            fmt(interval.as_secs_f64(), 1),
            writes.map_or_else(|| "default".to_owned(), |w| w.to_string()),
            fmt(m.ingest_per_s, 0),
            fmt(m.p50_ms, 2),
            fmt(m.p99_ms, 2),
            fmt(m.steps as f64, 0),
            le(m.decision_p50_ms),
            le(m.decision_p99_ms),
            le(m.step_p99_ms),
            fmt(m.cpu_percent, 1),
            fmt(cpu_us_per_summary, 1),
            fmt(m.simulator_cpu_percent, 1),
            fmt(m.rss_mib, 1),
            fmt(m.peak_rss_mib, 1),
            fmt(rss_kib_per_node, 1),
            fmt(writes_per_min, 1),
            fmt(api_writes_per_min, 1),
            m.errors.to_string(),
            fmt(m.answered_per_s, 0),
            load.join(" "),
        ];
        // As each run ends: a later run that fails keeps the earlier figures.
        println!("  {}", row.join(" | "));
        rows.push(row);
        out.push(json!({
            "build": label, "aggregator": aggregator.display().to_string(), "interval_ms": u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            "load_average": load,
            "aggregator_cpu_us_per_summary": finite(cpu_us_per_summary), "aggregator_rss_kib_per_node": finite(rss_kib_per_node),
            "nodes": n, "dry_run": dry_run, "max_concurrent_writes": writes,
            "decision_step_ms": {"p99": le_json(m.step_p99_ms)}, "seconds": window.as_secs(), "ingest_per_s": finite(m.ingest_per_s),
            "ack_latency_ms": {"p50": finite(m.p50_ms), "p99": finite(m.p99_ms), "samples": m.samples},
            "decision_steps": m.steps,
            "ingest_to_decision_ms": {"p50": le_json(m.decision_p50_ms), "p99": le_json(m.decision_p99_ms)},
            "aggregator_cpu_percent_of_core": finite(m.cpu_percent),
            "aggregator_rss_mib": m.rss_mib, "aggregator_peak_rss_mib": m.peak_rss_mib,
            "aggregator_writes_per_min": writes_per_min, "apiserver_mutating_requests_per_min": api_writes_per_min,
            "simulator_cpu_percent_of_core": finite(m.simulator_cpu_percent), "stream_errors": m.errors,
            "address_lookups_answered_per_s": finite(m.answered_per_s),
        }));
        drop(agg);
        drop(api);
    }
    print_table(
        "Aggregator under N virtual agents (send → Ack latency; measured window)",
        &[
            "build",
            "agents",
            "interval s",
            "writes in flight",
            "ingest/s",
            "p50 ms",
            "p99 ms",
            "decision steps",
            "ingest→decision p50 ms",
            "p99 ms",
            "step p99 ms",
            "agg CPU % core",
            "agg CPU µs/summary",
            "sim CPU % core",
            "RSS MiB",
            "peak RSS MiB",
            "RSS KiB/node",
            "agg writes/min",
            "apiserver writes/min",
            "stream errors",
            "lookups answered/s",
            "load 1/5/15",
        ],
        &rows,
    );
    println!(
        "\nLatency is send → Ack (the summary is validated and stored in the fleet view). Ingest → decision \
         is the aggregator's own histogram (time from storing a window to the end of the first decision \
         step that used it, its plan applied; steps run every 1 s tick); it and the step duration are \
         shown as the upper bound of the bucket holding the quantile."
    );
    println!(
        "Goal: 10,000 nodes at 1 Hz on one core with p99 < {P99_BUDGET_MS} ms: {}",
        met.map_or("not measured (no 10k size)", verdict)
    );
    write_result(
        "fleet",
        quick,
        json!({
            "config": {"sizes": sizes, "warmup_seconds": warmup.as_secs(), "seconds": window.as_secs(),
                       "interval_ms": u64::try_from(interval.as_millis()).unwrap_or(u64::MAX), "rounds": args.rounds.max(1),
                       "dry_run_from": args.dry_run_from, "peers_per_node": PEERS_PER_NODE,
                       "streams_per_connection": STREAMS_PER_CONNECTION},
            "runs": out,
            "goals": {"ten_thousand_on_one_core_p99_under_50ms": met},
        }),
    )?;
    Ok(())
}

/// The binaries to run, labelled: those of `--aggregator`, or the working tree's release build.
fn aggregator_binaries(args: &FleetArgs) -> anyhow::Result<Vec<(String, PathBuf)>> {
    if args.aggregator.is_empty() {
        return Ok(vec![("tree".to_owned(), aggregator_binary(&args.common)?)]);
    }
    args.aggregator
        .iter()
        .map(|spec| {
            let (label, path) = spec.split_once('=').unwrap_or((spec.as_str(), spec.as_str()));
            let path = PathBuf::from(path);
            if !path.is_file() {
                bail!("--aggregator {spec}: {} is not a file", path.display());
            }
            // The bench reads CPU time and RSS from /proc/<pid> of the process it starts, and
            // stops that process: under a wrapper script it would measure (and stop) the shell.
            let mut magic = [0u8; 2];
            let read = std::fs::File::open(&path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic));
            if read.is_ok() && &magic == b"#!" {
                bail!(
                    "--aggregator {spec}: {} is a script; give the aggregator binary itself (the bench measures and stops the process it starts; attach a profiler to its pid instead, e.g. heaptrack -p)",
                    path.display()
                );
            }
            Ok((label.to_owned(), path))
        })
        .collect()
}

fn aggregator_binary(common: &CommonArgs) -> anyhow::Result<PathBuf> {
    if !common.no_build {
        run_cmd(Command::new("cargo").current_dir(workspace_root()).args([
            "build",
            "--release",
            "-p",
            "graywatch-aggregator",
            "--bins",
        ]))?;
    }
    let from = super::target_dir().join("release/graywatch-aggregator");
    if !from.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p graywatch-aggregator`",
            from.display()
        );
    }
    let to = output_dir()?.join("bin/graywatch-aggregator");
    std::fs::create_dir_all(to.parent().unwrap_or(Path::new(".")))?;
    std::fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
    Ok(to)
}

/// A private etcd + kube-apiserver (the testkit's) on free loopback ports; stopped and deleted
/// on drop.
struct Apiserver {
    instance: kit::Instance,
}

impl Apiserver {
    fn start() -> anyhow::Result<Self> {
        let mut instance = kit::Instance::start("graywatch-bench-k8s", &kit::ApiserverOptions::default())?;
        instance.wait_ready()?;
        Ok(Self { instance })
    }

    fn create_namespace(&self, name: &str) -> anyhow::Result<()> {
        let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}).to_string();
        self.instance.curl(
            "/api/v1/namespaces",
            &["-X", "POST", "-H", "Content-Type: application/json", "-d", &body],
        )?;
        Ok(())
    }

    /// Creates `n` Node objects with one curl process (a config file of requests, run in parallel
    /// over reused connections).
    fn create_nodes(&self, n: usize) -> anyhow::Result<()> {
        let mut config = String::new();
        let auth = format!("Authorization: Bearer {}", kit::TOKEN);
        let ca = self.instance.ca_path().display().to_string();
        for i in 0..n {
            let node = node_object(i);
            let escaped = node.to_string().replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(
                config,
                "url = \"{}/api/v1/nodes\"\ncacert = \"{ca}\"\nheader = \"Content-Type: application/json\"\nheader = \"{auth}\"\ndata = \"{escaped}\"\noutput = \"/dev/null\"\nwrite-out = \"%{{http_code}}\\n\"",
                self.instance.url()
            );
            if i + 1 < n {
                config.push_str("next\n");
            }
        }
        let path = self.instance.dir().join("nodes.curl");
        std::fs::write(&path, config)?;
        let output = Command::new("curl")
            .args(["-sS", "--parallel", "--parallel-max", "16", "--cacert"])
            .arg(self.instance.ca_path())
            .arg("-K")
            .arg(&path)
            .output()
            .context("running curl to create Nodes")?;
        let codes = String::from_utf8_lossy(&output.stdout);
        let created = codes.lines().filter(|l| l.trim() == "201").count();
        if created != n {
            bail!(
                "created {created} of {n} Nodes; curl: {}",
                String::from_utf8_lossy(&output.stderr)
                    .lines()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        Ok(())
    }

    /// Mutating requests the apiserver has served (POST, PUT, PATCH, APPLY — server-side apply —,
    /// DELETE), from its metrics.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "apiserver counters are whole non-negative numbers printed as floats"
    )]
    fn mutating_requests(&self) -> anyhow::Result<u64> {
        let text = self.instance.curl("/metrics", &[])?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with("apiserver_request_total{"))
            .filter(|l| {
                [
                    "verb=\"POST\"",
                    "verb=\"PUT\"",
                    "verb=\"PATCH\"",
                    "verb=\"APPLY\"",
                    "verb=\"DELETE\"",
                ]
                .iter()
                .any(|v| l.contains(v))
            })
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum::<f64>() as u64)
    }
}

fn node_name(i: usize) -> String {
    format!("sim-{i:05}")
}

fn node_ip(i: usize) -> String {
    // Synthetic addresses (data only; nothing is sent to them).
    format!("100.64.{}.{}", i / 250, i % 250 + 1)
}

fn node_object(i: usize) -> Value {
    kit::NodeBuilder::new(&node_name(i))
        .zone(ZONES[i % ZONES.len()])
        .instance_type(INSTANCE_TYPES[i % INSTANCE_TYPES.len()])
        .nodepool("default")
        .label(kit::node::HOSTNAME_LABEL, &node_name(i))
        .internal_ip(&node_ip(i))
        .build()
}

struct Aggregator {
    child: Child,
    http: SocketAddr,
    grpc: SocketAddr,
    log: PathBuf,
}

impl Aggregator {
    fn start(
        bin: &Path,
        api: &Apiserver,
        dry_run: bool,
        writes: Option<usize>,
        nodes: usize,
        interval: Duration,
    ) -> anyhow::Result<Self> {
        let [grpc_port, http_port, _] = kit::free_ports()?;
        let grpc = SocketAddr::from(([127, 0, 0, 1], grpc_port));
        let http = SocketAddr::from(([127, 0, 0, 1], http_port));
        let log = output_dir()?.join("logs/graywatch-aggregator.log");
        let mut cmd = Command::new(bin);
        cmd.args(["--grpc-listen", &grpc.to_string(), "--http-listen", &http.to_string()])
            .args(["--identity", "bench", "--namespace", "graywatch"])
            .env("KUBECONFIG", api.instance.kubeconfig_path())
            .env("RUST_LOG", "warn");
        if dry_run {
            cmd.arg("--dry-run");
        } else {
            // The simulated agents carry no ServiceAccount tokens.
            cmd.arg("--insecure-allow-acting-without-identity");
        }
        if let Some(w) = writes {
            cmd.args(["--max-concurrent-writes", &w.to_string()]);
        }
        // Configured as a fleet of that size would be (README, "Large fleets"): the decision
        // period follows the agents' report interval (a step more often sees no new window),
        // and past the fleet view's default cap the cap is raised. At 1 Hz and up to the cap
        // these are the aggregator's defaults.
        let tick_ms = interval.as_millis();
        let max_nodes = nodes.max(AGGREGATOR_DEFAULT_MAX_NODES);
        let config = output_dir()?.join(format!("aggregator-{nodes}-{tick_ms}.toml"));
        std::fs::write(
            &config,
            format!("tick_ms = {tick_ms}\n\n[ingest]\nmax_nodes = {max_nodes}\n"),
        )?;
        cmd.arg("--config").arg(&config);
        let child = kit::spawn_logged(&mut cmd, &log)?;
        let mut agg = Self { child, http, grpc, log };
        let started = Instant::now();
        // Ready once it serves metrics and leads (one replica takes the Lease).
        loop {
            if let Some(status) = agg.child.try_wait()? {
                bail!("graywatch-aggregator exited ({status}):\n{}", log_tail(&agg.log, 10));
            }
            if let Ok(m) = agg.metrics()
                && m.get("graywatch_aggregator_is_leader").copied().unwrap_or(0.0) >= 1.0
            {
                return Ok(agg);
            }
            if started.elapsed() > Duration::from_mins(1) {
                bail!(
                    "graywatch-aggregator not leading within 60 s; log {}",
                    agg.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The aggregator's /metrics as name{labels} → value, with sums per metric name too.
    fn metrics(&self) -> anyhow::Result<HashMap<String, f64>> {
        let mut stream = TcpStream::connect_timeout(&self.http, Duration::from_secs(2))?;
        // A starved aggregator (10,000 streams on 2 shared cores) can take seconds to answer.
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", self.http)?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let mut out = HashMap::new();
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else { continue };
            let name = key.split('{').next().unwrap_or(key).to_owned();
            if name.len() != key.len() {
                out.insert(key.to_owned(), value);
            }
            *out.entry(name).or_insert(0.0) += value;
        }
        Ok(out)
    }
}

/// Where a quantile of a Prometheus histogram lies, in ms: as coarse as the buckets.
#[derive(Clone, Copy)]
enum Bound {
    /// In the bucket with this upper bound.
    AtMost(f64),
    /// Past the last finite bucket, whose bound this is.
    Above(f64),
}

/// A bucket bound for the table: "≤ N", "> N", "—" unmeasured.
fn le(bound: Option<Bound>) -> String {
    match bound {
        Some(Bound::AtMost(ms)) => format!("≤ {ms:.0}"),
        Some(Bound::Above(ms)) => format!("> {ms:.0}"),
        None => "—".to_owned(),
    }
}

/// The same for JSON: {"`at_most"`: N}, {"above": N}, or null.
fn le_json(bound: Option<Bound>) -> Value {
    match bound {
        Some(Bound::AtMost(ms)) => json!({"at_most": ms}),
        Some(Bound::Above(ms)) => json!({"above": ms}),
        None => Value::Null,
    }
}

/// The bucket of histogram `name` holding quantile `q` of the observations made between two
/// scrapes; `None` without observations. A bound, not an interpolation.
fn bucket_quantile(before: &HashMap<String, f64>, after: &HashMap<String, f64>, name: &str, q: f64) -> Option<Bound> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = after
        .iter()
        .filter_map(|(key, count)| {
            let le = key.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((bound, count - before.get(key).copied().unwrap_or(0.0)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let index = buckets.iter().position(|(_, cumulative)| *cumulative >= q * total)?;
    let bound_ms = buckets[index].0 * 1000.0;
    if bound_ms.is_finite() {
        Some(Bound::AtMost(bound_ms))
    } else {
        let last = index.checked_sub(1).map_or(0.0, |i| buckets[i].0 * 1000.0);
        Some(Bound::Above(last))
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

struct Measured {
    ingest_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    samples: usize,
    steps: u64,
    cpu_percent: f64,
    simulator_cpu_percent: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
    actions: u64,
    apiserver_writes: u64,
    errors: u64,
    /// Lookups answered with a node per second (the aggregator's answers the agents received).
    answered_per_s: f64,
    /// Ingest → decision (the aggregator's histogram), bucket upper bounds in ms.
    decision_p50_ms: Option<Bound>,
    decision_p99_ms: Option<Bound>,
    /// Leader decision step wall time (read + decide + apply), bucket upper bound in ms.
    step_p99_ms: Option<Bound>,
}

/// Shared state of the virtual agents.
#[derive(Default)]
struct Sim {
    recording: AtomicBool,
    stop: AtomicBool,
    latencies_us: Mutex<Vec<u32>>,
    errors: AtomicU64,
    /// Addresses answered with a node while recording.
    answered: AtomicU64,
}

fn measure(
    n: usize,
    agg: &Aggregator,
    api: &Apiserver,
    warmup: Duration,
    window: Duration,
    interval: Duration,
) -> anyhow::Result<Measured> {
    let sim = Arc::new(Sim::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the simulator runtime")?;
    let grpc = agg.grpc;
    let driver = {
        let sim = sim.clone();
        runtime.spawn(async move { simulate(n, grpc, interval, sim).await })
    };
    std::thread::sleep(warmup);
    let pid = agg.child.id();
    let metric = |m: &HashMap<String, f64>, name: &str| m.get(name).copied().unwrap_or(0.0);
    // The apiserver's count brackets the aggregator's (scraped first, and last), so a burst of
    // writes at the window's edge is never counted by the aggregator but not by the apiserver.
    let api_before = api.mutating_requests()?;
    let before = agg.metrics()?;
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").context("resetting the aggregator's peak RSS")?;
    let cpu_before = cpu_ticks(pid);
    let self_before = cpu_ticks(std::process::id());
    sim.recording.store(true, Ordering::Relaxed);
    let started = Instant::now();
    std::thread::sleep(window);
    sim.recording.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = cpu_ticks(pid);
    let self_after = cpu_ticks(std::process::id());
    let after = agg.metrics()?;
    let api_after = api.mutating_requests()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    sim.stop.store(true, Ordering::Relaxed);
    runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), driver).await })
        .ok();
    runtime.shutdown_timeout(Duration::from_secs(5));
    let mut lat: Vec<f64> = sim
        .latencies_us
        .lock()
        .map_err(|_| anyhow::anyhow!("latency lock poisoned"))?
        .iter()
        .map(|us| f64::from(*us) / 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an index into lat: p is in [0, 1]"
    )]
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let idx = ((lat.len() - 1) as f64 * p).round() as usize;
        lat[idx.min(lat.len() - 1)]
    };
    let delta = |name: &str| (metric(&after, name) - metric(&before, name)).max(0.0);
    Ok(Measured {
        ingest_per_s: delta("graywatch_aggregator_summaries_total") / elapsed,
        p50_ms: if lat.is_empty() { f64::NAN } else { median(&lat) },
        p99_ms: pct(0.99),
        samples: lat.len(),
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a counter delta, whole and non-negative"
        )]
        steps: delta("graywatch_aggregator_leader_steps_total") as u64,
        cpu_percent: (cpu_after - cpu_before) as f64 / clock_ticks() / elapsed * 100.0,
        simulator_cpu_percent: (self_after - self_before) as f64 / clock_ticks() / elapsed * 100.0,
        rss_mib: kib("VmRSS:") / 1024.0,
        peak_rss_mib: kib("VmHWM:") / 1024.0,
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a counter delta, whole and non-negative"
        )]
        actions: delta("graywatch_aggregator_actions_total") as u64,
        apiserver_writes: api_after.saturating_sub(api_before),
        errors: sim.errors.load(Ordering::Relaxed),
        answered_per_s: sim.answered.load(Ordering::Relaxed) as f64 / elapsed,
        decision_p50_ms: bucket_quantile(&before, &after, DECISION_HISTOGRAM, 0.5),
        decision_p99_ms: bucket_quantile(&before, &after, DECISION_HISTOGRAM, 0.99),
        step_p99_ms: bucket_quantile(&before, &after, STEP_HISTOGRAM, 0.99),
    })
}

/// Opens `n` Report streams over n / `STREAMS_PER_CONNECTION` connections and runs every virtual
/// agent until `sim.stop`.
async fn simulate(n: usize, grpc: SocketAddr, interval: Duration, sim: Arc<Sim>) -> anyhow::Result<()> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))?;
    let mut channels = Vec::new();
    for _ in 0..n.div_ceil(STREAMS_PER_CONNECTION) {
        channels.push(endpoint.connect().await.context("connecting to the aggregator")?);
    }
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let channel = channels[i / STREAMS_PER_CONNECTION].clone();
        let sim = sim.clone();
        // Spread the agents' phases over the interval, as real agents started at different times.
        let period = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
        let phase = Duration::from_micros((i as u64 * period / n as u64) % period);
        tasks.push(tokio::spawn(async move {
            if let Err(error) = agent(i, n, channel, phase, interval, &sim).await
                && sim.errors.fetch_add(1, Ordering::Relaxed) < 3
            {
                eprintln!("virtual agent {i}: {error:#}");
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}

async fn agent(
    i: usize,
    n: usize,
    channel: tonic::transport::Channel,
    phase: Duration,
    interval: Duration,
    sim: &Sim,
) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel::<NodeSummary>(4);
    let mut client = IngestClient::new(channel);
    tokio::time::sleep(phase).await;
    let response = client.report(tokio_stream::wrappers::ReceiverStream::new(rx)).await?;
    let mut inbound = response.into_inner();
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    let mut seq = 0u64;
    while !sim.stop.load(Ordering::Relaxed) {
        tokio::select! {
            _ = tick.tick() => {
                seq += 1;
                sent.insert(seq, Instant::now());
                let window_ms = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX);
                tx.send(summary(i, n, seq, window_ms)).await.context("stream closed")?;
            }
            msg = inbound.message() => {
                let Some(directive) = msg? else { bail!("the aggregator closed the stream") };
                let recording = sim.recording.load(Ordering::Relaxed);
                match directive.kind {
                    Some(directive::Kind::Ack(ack)) => {
                        if let Some(at) = sent.remove(&ack.seq)
                            && recording
                        {
                            let us = u32::try_from(at.elapsed().as_micros()).unwrap_or(u32::MAX);
                            sim.latencies_us.lock().map_err(|_| anyhow::anyhow!("lock"))?.push(us);
                        }
                    }
                    Some(directive::Kind::AddressAnswers(answers)) if recording => {
                        sim.answered.fetch_add(answers.owners.len() as u64, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

/// A realistic healthy window: five families, local scores, eight peers with RTT figures.
fn summary(i: usize, n: usize, seq: u64, window_ms: i64) -> NodeSummary {
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis()),
    )
    .unwrap_or(0);
    let jitter = ((i as u64).wrapping_mul(2_654_435_761).wrapping_add(seq * 40_503) % 1000) as f64 / 1000.0;
    let families = [
        (Family::CpuSteal, 0.2 + jitter * 0.3, "percent"),
        (Family::CpuContention, 40.0 + jitter * 20.0, "us_p99"),
        (Family::NetworkLatency, 250.0 + jitter * 100.0, "us_p99"),
        (Family::PacketLoss, 0.0005 + jitter * 0.0005, "ratio"),
        (Family::MemoryPressure, jitter * 0.5, "psi_some_avg10"),
    ];
    let report = families.iter().fold(
        kit::ReportBuilder::new(&node_name(i), seq)
            .boot_id(&format!("boot-{i}"))
            .address(&node_ip(i))
            .agent_version("bench")
            .window_ms(now_ms - window_ms, now_ms),
        |r, (family, value, unit)| {
            r.family(*family, *value, unit, 1000)
                .score(*family, 0.05 * jitter, "normal")
        },
    );
    let peer_of = |k: usize| (i + k * 37) % n.max(1);
    let mut summary = report
        .peers((1..=PEERS_PER_NODE).map(|k| {
            let peer = peer_of(k);
            PeerStats {
                remote_addr: node_ip(peer),
                rtt_samples: 200,
                rtt_p50_us: 180.0 + jitter * 40.0,
                rtt_p99_us: 300.0 + jitter * 100.0,
                segments_out: 5000,
                retransmits: 2,
                ..Default::default()
            }
        }))
        .build();
    if seq == 1 {
        summary.pod_addresses = Some(graywatch_proto::v1::PodAddresses {
            addresses: (0..PODS_PER_NODE).map(|p| pod_ip(i, p)).collect(),
        });
    }
    if seq == 1 || (seq + i as u64).is_multiple_of(LOOKUP_PERIOD) {
        summary.address_lookups = (1..=PEERS_PER_NODE)
            .flat_map(|k| (0..LOOKUPS_PER_PEER).map(move |p| pod_ip(peer_of(k), p)))
            .collect();
    }
    summary
}

/// Pod `p` of node `i`: synthetic addresses from 10.0.0.0/8 (data only).
fn pod_ip(i: usize, p: usize) -> String {
    let offset = u32::try_from(i * PODS_PER_NODE + p).unwrap_or(u32::MAX) & 0x00ff_ffff;
    std::net::Ipv4Addr::from((10 << 24) | offset).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(counts: &[(&str, f64)]) -> HashMap<String, f64> {
        counts
            .iter()
            .map(|(le, n)| (format!("h_bucket{{le=\"{le}\"}}"), *n))
            .collect()
    }

    #[test]
    #[expect(clippy::float_cmp, reason = "bucket bounds are passed through unchanged")]
    fn quantiles_come_from_the_bucket_deltas_between_scrapes() {
        let before = scrape(&[("0.1", 10.0), ("1.0", 10.0), ("+Inf", 10.0)]);
        // 100 new observations: 50 ≤ 0.1 s, 49 in (0.1, 1], 1 above 1 s.
        let after = scrape(&[("0.1", 60.0), ("1.0", 109.0), ("+Inf", 110.0)]);
        assert!(matches!(bucket_quantile(&before, &after, "h", 0.5), Some(Bound::AtMost(ms)) if ms == 100.0));
        assert!(matches!(bucket_quantile(&before, &after, "h", 0.99), Some(Bound::AtMost(ms)) if ms == 1000.0));
        assert!(matches!(bucket_quantile(&before, &after, "h", 1.0), Some(Bound::Above(ms)) if ms == 1000.0));
        assert!(
            bucket_quantile(&before, &before, "h", 0.5).is_none(),
            "no new observations"
        );
        assert!(
            bucket_quantile(&before, &after, "other", 0.5).is_none(),
            "no such histogram"
        );
    }
}
