//! Issue 16, point 1: a busy node must not wedge its own reporting. The real agent (kernel
//! programs loaded) streams to the real aggregator (on a real apiserver) from a netns node that
//! serves 5,000 TCP connections from 5,000 distinct IPv6 addresses, one byte each per 100 ms.
//! Every window must be accepted, and the agent's peak RSS must stay under the chart's 128 MiB
//! memory limit. The figures (peers per window, addresses folded, RSS) are printed.
//!
//! Needs the `graywatch-agent` (built with its kernel programs) and `graywatch-aggregator`
//! binaries next to this test's executable: `cargo build -p graywatch-agent -p
//! graywatch-aggregator` first (`cargo xtask test` does). `GRAYWATCH_AGENT_BIN` runs another
//! agent binary (e.g. a release build, for the figures a node would see).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv6Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use graywatch_testbench::{
    netns::{Bench, TestCgroup2, ip_in, spawn_piped},
    traffic::await_line,
};
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, Patch, PatchParams, PostParams};

const TRAFFIC: &str = env!("CARGO_BIN_EXE_graywatch-traffic");
const REMOTES: u32 = 5_000;
const PORT: u16 = 7000;
/// The chart's memory limit for the agent container.
const CHART_LIMIT_BYTES: u64 = 128 << 20;

/// A binary of another workspace package, built into the same target directory.
fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(name))
        .expect("target directory");
    assert!(
        path.exists(),
        "{} missing: build it first (cargo build -p {name})",
        path.display()
    );
    path
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    graywatch_k8s_testkit::free_port().expect("a free port")
}

/// GET `path` from 127.0.0.1:`port` (`None` while nothing answers).
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .ok()?;
    let mut body = String::new();
    conn.read_to_string(&mut body).ok()?;
    Some(body)
}

/// The value of the first sample of metric `name` whose labels contain `labels`.
fn metric(body: &str, name: &str, labels: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (metric_name, rest) = series.split_once('{').unwrap_or((series, ""));
        (metric_name == name && rest.contains(labels)).then(|| value.trim().parse().ok())?
    })
}

/// (`VmRSS`, `VmHWM`) of `pid` in bytes.
fn rss(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    clippy::float_cmp,
    reason = "one end-to-end scenario, read top to bottom; the counters compared are whole numbers"
)]
async fn a_node_serving_5000_remote_addresses_keeps_reporting_within_its_memory_limit() -> anyhow::Result<()> {
    let Some(api) = graywatch_k8s_testkit::TestApiserver::start().await? else {
        return Ok(());
    };
    let client = api.client().await?;
    let bench = Bench::new(2)?;
    let (server_node, clients_node) = (bench.node(0).clone(), bench.node(1).clone());

    // The Node the agent reports as, with the bench node's address.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "graywatch"}}))?,
        )
        .await?;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "busy-node"}}))?,
        )
        .await?;
    let status =
        serde_json::json!({"status": {"addresses": [{"type": "InternalIP", "address": server_node.ipv4.to_string()}]}});
    nodes
        .patch_status("busy-node", &PatchParams::default(), &Patch::Merge(&status))
        .await?;

    // 5,000 client addresses: a whole /64 is local to the clients' namespace and routed to it.
    let segments = clients_node.ipv6.segments();
    let prefix = Ipv6Addr::new(0xfd00, 0x7777, segments[2], 0, 0, 0, 0, 0);
    ip_in(
        &clients_node.netns,
        &["-6", "route", "add", "local", &format!("{prefix}/64"), "dev", "lo"],
    )?;
    // Binding to an address of a local route (not of an interface) needs non-local binds.
    graywatch_testbench::netns::exec_in(&clients_node.netns, "sysctl", &["-qw", "net.ipv6.ip_nonlocal_bind=1"])?;
    ip_in(
        &server_node.netns,
        &[
            "-6",
            "route",
            "add",
            &format!("{prefix}/64"),
            "via",
            &clients_node.ipv6.to_string(),
        ],
    )?;

    // The aggregator.
    let dir = std::env::temp_dir().join(format!("graywatch-busy-node-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("aggregator.toml");
    std::fs::write(
        &config,
        // Shadow mode: this test is about ingest, and its agent is not authenticated.
        "tick_ms = 500\nnamespace = \"graywatch\"\n[leader]\nlease_duration_ms = 2000\nrenew_interval_ms = 500\n\
         [policy]\ndry_run = true\n",
    )?;
    let (grpc, agg_http) = (free_port(), free_port());
    let mut aggregator = Killed(
        Command::new(sibling_binary("graywatch-aggregator"))
            .arg("--config")
            .arg(&config)
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
            .args(["--http-listen", &format!("127.0.0.1:{agg_http}")])
            .args(["--identity", "agg-0"])
            .env("KUBECONFIG", api.kubeconfig_path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("aggregator.log"))?)
            .stderr(std::fs::File::create(dir.join("aggregator.err"))?)
            .spawn()?,
    );

    // The server, in a cgroup the agent is scoped to.
    let root = graywatch_agent::cgroups::CgroupResolver::discover(None, std::path::Path::new("/proc/self/mountinfo"))?
        .root()
        .expect("this machine has a cgroup v2 hierarchy")
        .to_owned();
    let cgroup = TestCgroup2::create(&root, "busy-node")?;
    let mut cmd = server_node.command(TRAFFIC, &[cgroup.procs()])?;
    cmd.args(["server", "--listen", &format!("[::]:{PORT}")]);
    let mut server = Killed(spawn_piped(&mut cmd)?);
    let stdout = server.0.stdout.take().expect("piped stdout");
    await_line(&mut BufReader::new(stdout), "listening")?;

    // The agent.
    let agent_http = free_port();
    let mut agent = Killed(
        Command::new(
            std::env::var_os("GRAYWATCH_AGENT_BIN").map_or_else(|| sibling_binary("graywatch-agent"), PathBuf::from),
        )
        .args(["--node-name", "busy-node", "--interval", "1s", "--output", "none"])
        .args(["--listen", &format!("127.0.0.1:{agent_http}")])
        .args(["--cgroup-scope", &cgroup.cgroup_path])
        .args(["--aggregator", &format!("http://127.0.0.1:{grpc}")])
        .args(["--kube", "off"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.err"))?)
        .spawn()?,
    );
    let agent_pid = agent.0.id();

    // The swarm: it prints "connected 5000" once every connection is up, then runs 60 s.
    let mut cmd = clients_node.command(TRAFFIC, &[])?;
    cmd.args([
        "swarm",
        "--connect",
        &SocketAddr::new(server_node.ipv6.into(), PORT).to_string(),
    ])
    .args(["--first-source", &Ipv6Addr::from(u128::from(prefix) + 1).to_string()])
    .args([
        "--count",
        &REMOTES.to_string(),
        "--interval",
        "100ms",
        "--duration",
        "60s",
    ]);
    let mut swarm = Killed(spawn_piped(&mut cmd)?);
    let mut swarm_out = BufReader::new(swarm.0.stdout.take().expect("piped stdout"));
    await_line(&mut swarm_out, "connected")?;

    // Watch the windows go by until the swarm ends (its report line is the event), taking the
    // figures of each scrape.
    let (line_tx, mut line_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = swarm_out.read_line(&mut line);
        let _ = line_tx.send(line);
    });
    let mut figures = Vec::new();
    let report = loop {
        if let Ok(line) = line_rx.try_recv() {
            break line;
        }
        if let Some(body) = http_get(agent_http, "/metrics") {
            let addresses = metric(&body, "graywatch_window_remote_addresses", "").unwrap_or(0.0);
            let peers: f64 = ["node", "address", "external"]
                .iter()
                .filter_map(|k| metric(&body, "graywatch_window_peers", &format!("kind=\"{k}\"")))
                .sum();
            if let Some((now, _)) = rss(agent_pid) {
                figures.push((addresses, peers, now));
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let status = swarm.0.wait()?;
    assert!(status.success(), "swarm: {report}");

    // One scrape counts a window the moment it is made, and in the buffer only once the
    // reporter has it, and a window sent but not yet acknowledged is in neither: scrape until a
    // scrape falls between two windows (the agent keeps making one per second), or give up.
    let windows_of = |body: &str| metric(body, "graywatch_windows_total", "").unwrap_or(0.0);
    let acked_of = |body: &str| metric(body, "graywatch_report_windows_total", "kind=\"acked\"").unwrap_or(0.0);
    let buffered_of = |body: &str| metric(body, "graywatch_report_buffered_windows", "").unwrap_or(0.0);
    let settle_deadline = std::time::Instant::now() + Duration::from_secs(30);
    let agent_metrics = loop {
        let body = http_get(agent_http, "/metrics").expect("agent metrics");
        if acked_of(&body) + buffered_of(&body) == windows_of(&body) || std::time::Instant::now() >= settle_deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (_, peak) = rss(agent_pid).expect("agent alive");
    let windows_kind = |kind: &str| {
        metric(
            &agent_metrics,
            "graywatch_report_windows_total",
            &format!("kind=\"{kind}\""),
        )
        .unwrap_or(0.0)
    };
    let windows = windows_of(&agent_metrics);
    let acked = acked_of(&agent_metrics);
    let buffered = buffered_of(&agent_metrics);
    let busiest = figures.iter().map(|f| f.0).fold(0.0, f64::max);
    let most_peers = figures.iter().map(|f| f.1).fold(0.0, f64::max);
    let agg_metrics = http_get(agg_http, "/metrics").unwrap_or_default();
    let accepted = metric(&agg_metrics, "graywatch_aggregator_summaries_total", "result=\"new\"")
        .or_else(|| metric(&agg_metrics, "summaries_total", "result=\"new\""))
        .unwrap_or(-1.0);
    println!(
        "busy node: {busiest} remote addresses in a window, at most {most_peers} peers per window; \
         windows {windows}, acked {acked}, buffered {buffered}, rejected streams {}, invalid dropped {}, \
         aggregator accepted {accepted}; agent RSS peak {:.1} MiB, last {:.1} MiB",
        windows_kind("rejected"),
        windows_kind("invalid_dropped"),
        peak as f64 / f64::from(1 << 20),
        figures.last().map_or(0.0, |f| f.2 as f64 / f64::from(1 << 20)),
    );
    assert!(busiest >= f64::from(REMOTES), "the node saw {busiest} remote addresses");
    assert!(
        most_peers <= 4_096.0,
        "peers per window stay under the aggregator's limit"
    );
    assert_eq!(windows_kind("rejected"), 0.0, "no stream ended by the aggregator");
    assert_eq!(windows_kind("invalid_dropped"), 0.0, "no window refused as invalid");
    assert_eq!(windows_kind("dropped"), 0.0, "no window lost from a full buffer");
    assert!(
        aggregator.0.try_wait()?.is_none(),
        "the aggregator exited: {}",
        std::fs::read_to_string(dir.join("aggregator.err")).unwrap_or_default()
    );
    assert!(
        accepted >= acked && acked > 0.0,
        "the aggregator accepted {accepted}, the agent saw {acked} acks"
    );
    // Every window was acknowledged, but the last one or two still in flight at the scrape.
    assert!(buffered <= 2.0, "{buffered} windows wait for an acknowledgement");
    assert_eq!(acked + buffered, windows, "every window acknowledged or in flight");
    assert!(
        peak < CHART_LIMIT_BYTES,
        "agent peak RSS {peak} B over the chart's limit"
    );
    // The agent is still running and healthy.
    assert!(agent.0.try_wait()?.is_none(), "the agent exited");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
