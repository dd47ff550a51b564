//! The TCP load: two network namespaces joined by a veth pair, a `graywatch-traffic` server in
//! one and clients in the other (the same topology as the fault bench in tests/src/netns.rs,
//! kept here so that xtask does not link the bench crate and, through it, the agent).

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use serde_json::Value;

use super::Binaries;
use crate::util::describe;

const PORT: u16 = 7000;
/// A server port nothing listens on (the drop load's target).
const CLOSED_PORT: u16 = 7009;

/// What one client reported.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientResult {
    pub transactions: u64,
    pub bytes: u64,
    pub elapsed_seconds: f64,
}

impl ClientResult {
    pub fn transactions_per_second(&self) -> f64 {
        if self.elapsed_seconds > 0.0 {
            self.transactions as f64 / self.elapsed_seconds
        } else {
            f64::NAN
        }
    }

    pub fn gbit_per_second(&self) -> f64 {
        if self.elapsed_seconds > 0.0 {
            self.bytes as f64 * 8.0 / self.elapsed_seconds / 1e9
        } else {
            f64::NAN
        }
    }
}

/// Request/response parameters for one client.
#[derive(Debug, Clone, Copy)]
pub struct Rr {
    pub count: Option<u64>,
    pub duration: Option<Duration>,
    /// Transactions per second for this connection (None: closed loop, as fast as possible).
    pub rate: Option<f64>,
    pub request: u32,
    pub response: u32,
}

/// Addresses inside the bench's own namespaces (not routed anywhere else).
/// The load runs at a raised priority so that other work on a shared machine (niced builds)
/// perturbs it less; the observers run at the default priority, as in production.
const LOAD_NICE: [&str; 2] = ["-n", "-5"];

const CLIENT_ADDR: &str = "10.239.0.1";
const SERVER_ADDR: &str = "10.239.0.2";
/// The server's second address, reached through the link emulator (see `delayed_path`).
const DELAYED_SERVER_ADDR: &str = "10.239.0.3";
const CLIENT_ADDR6: &str = "fd00:239::1";
const SERVER_ADDR6: &str = "fd00:239::2";
/// The swarm's source addresses: a whole /64 local to the client namespace, routed to it.
const SWARM_PREFIX: &str = "fd00:239:1::";
/// The swarm's sinks (IPv6) listen beside the request/response server, one port per chunk.
const SWARM_PORT: u16 = PORT + 1;
/// The most connections one swarm process opens.
const SWARM_CHUNK: u32 = 15_000;

/// Server in one namespace, clients in the other. Dropping it stops the server and deletes both
/// namespaces (and with them the veth pair).
pub struct TrafficBed {
    server: Option<Child>,
    /// The IPv6 sinks for swarms (one per chunk of a swarm), started as swarms need them.
    sinks: std::cell::RefCell<Vec<Child>>,
    traffic: std::path::PathBuf,
    client_ns: String,
    server_ns: String,
    /// The CPU the request/response server and clients are pinned to, if any.
    cpu: Option<usize>,
}

impl TrafficBed {
    /// The bed, with the request/response server and clients pinned to `cpu` if given: both ends
    /// on one CPU make every transaction take the same path (two context switches, the softirq
    /// in the sender's context), where unpinned runs on 2 CPUs swing by 2× between rounds
    /// depending on where the scheduler put the two processes.
    pub fn new(binaries: &Binaries, cpu: Option<usize>) -> anyhow::Result<Self> {
        let tag = std::process::id() % 100_000;
        let client_ns = format!("gwbench-{tag}-c");
        let server_ns = format!("gwbench-{tag}-s");
        remove_leftovers();
        ip(&["netns", "add", &client_ns])?;
        // From here on the bed exists, so Drop cleans up whatever the next steps leave.
        let mut bed = Self {
            server: None,
            sinks: std::cell::RefCell::new(Vec::new()),
            traffic: binaries.traffic.clone(),
            client_ns,
            server_ns,
            cpu,
        };
        ip(&["netns", "add", &bed.server_ns])?;
        ip(&[
            "-n",
            &bed.client_ns,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &bed.server_ns,
        ])?;
        for (ns, addr) in [(&bed.client_ns, CLIENT_ADDR), (&bed.server_ns, SERVER_ADDR)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let listen = format!("{SERVER_ADDR}:{PORT}");
        bed.server = Some(bed.start_listener("server", &listen)?);
        Ok(bed)
    }

    /// `graywatch-traffic <mode> --listen <listen>` in the server namespace, once it listens.
    fn start_listener(&self, mode: &str, listen: &str) -> anyhow::Result<Child> {
        let mut server = self
            .load_command()
            .args(["ip", "netns", "exec", &self.server_ns])
            .arg(&self.traffic)
            .args([mode, "--listen", listen])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting graywatch-traffic {mode}"))?;
        let stdout = server.stdout.take().context("server stdout")?;
        let listening = line_where(&mut BufReader::new(stdout), |l| l.starts_with("listening"))
            .context("reading the traffic server's output")?;
        if listening.is_none() {
            server.kill().ok();
            server.wait().ok();
            bail!("graywatch-traffic {mode} exited before listening on {listen}");
        }
        Ok(server)
    }

    /// Gives both namespaces an IPv6 address, the client namespace a local /64 for the swarm's
    /// sources, and the server namespace a route back to it.
    fn add_ipv6(&self) -> anyhow::Result<()> {
        for (ns, addr) in [(&self.client_ns, CLIENT_ADDR6), (&self.server_ns, SERVER_ADDR6)] {
            ip(&[
                "-n",
                ns,
                "-6",
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        ip(&[
            "-n",
            &self.client_ns,
            "-6",
            "route",
            "add",
            "local",
            &format!("{SWARM_PREFIX}/64"),
            "dev",
            "lo",
        ])?;
        ip(&[
            "-n",
            &self.server_ns,
            "-6",
            "route",
            "add",
            &format!("{SWARM_PREFIX}/64"),
            "via",
            CLIENT_ADDR6,
        ])?;
        // Binding to an address of a local route (not of an interface) needs non-local binds.
        let sysctl = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.client_ns,
                "sysctl",
                "-qw",
                "net.ipv6.ip_nonlocal_bind=1",
            ])
            .status()
            .context("running sysctl in the client namespace")?;
        if !sysctl.success() {
            bail!(
                "sysctl net.ipv6.ip_nonlocal_bind=1 failed in {} ({sysctl})",
                self.client_ns
            );
        }
        Ok(())
    }

    /// Starts `count` connections from as many IPv6 source addresses, each sending a byte every
    /// 100 ms for `duration` once all are up; returns when they are (the swarm's "connected"
    /// line). The first call gives the namespaces their IPv6 addresses and routes.
    pub fn swarm(&self, count: u32, duration: Duration) -> anyhow::Result<Swarm> {
        if self.sinks.borrow().is_empty() {
            self.add_ipv6()?;
        }
        // One process holds at most SWARM_CHUNK sockets (a container's hard open-file limit is
        // often 20,000): larger swarms run as several, each towards its own sink.
        let chunks = count.div_ceil(SWARM_CHUNK).max(1);
        // Held from the first spawn on, so that an error later kills every process started.
        let mut swarm = Swarm {
            parts: Vec::new(),
            connected: 0,
        };
        for chunk in 0..chunks {
            let port = SWARM_PORT + u16::try_from(chunk).context("too many swarm chunks")?;
            if self.sinks.borrow().len() <= chunk as usize {
                let sink = self.start_listener("sink", &format!("[::]:{port}"))?;
                self.sinks.borrow_mut().push(sink);
            }
            let size = SWARM_CHUNK.min(count - chunk * SWARM_CHUNK);
            let first = std::net::Ipv6Addr::from(
                u128::from(SWARM_PREFIX.parse::<std::net::Ipv6Addr>()?) + 1 + u128::from(chunk * SWARM_CHUNK),
            );
            let mut child = Command::new("nice")
                .args(LOAD_NICE)
                .args(["ip", "netns", "exec", &self.client_ns])
                .arg(&self.traffic)
                .args(["swarm", "--connect", &format!("[{SERVER_ADDR6}]:{port}")])
                .args(["--first-source", &first.to_string()])
                .args(["--count", &size.to_string(), "--interval", "100ms"])
                .args(["--duration", &format!("{}ms", duration.as_millis())])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting graywatch-traffic swarm")?;
            let out = child.stdout.take().map(BufReader::new);
            swarm.parts.push((child, out));
        }
        for (child, out) in &mut swarm.parts {
            let out = out.as_mut().context("swarm stdout")?;
            let Some(line) = line_where(out, |l| l.starts_with("connected")).context("reading the swarm's output")?
            else {
                let status = child.wait().context("waiting for the swarm")?;
                let mut stderr = String::new();
                if let Some(mut err) = child.stderr.take() {
                    std::io::Read::read_to_string(&mut err, &mut stderr).ok();
                }
                bail!(
                    "graywatch-traffic swarm of {count} exited before connecting ({status}): {}",
                    stderr.trim()
                );
            };
            swarm.connected += line
                .trim()
                .strip_prefix("connected")
                .and_then(|n| n.trim().parse::<u32>().ok())
                .context("the swarm's connected line has no count")?;
        }
        Ok(swarm)
    }

    /// `nice -n -5 [taskset -c CPU]`, the prefix of every load process.
    fn load_command(&self) -> Command {
        let mut cmd = Command::new("nice");
        cmd.args(LOAD_NICE);
        if let Some(cpu) = self.cpu {
            cmd.args(["taskset", "-c", &cpu.to_string()]);
        }
        cmd
    }

    fn client_command(&self, server: &str, args: &[String]) -> Command {
        let mut cmd = self.load_command();
        cmd.args(["ip", "netns", "exec", &self.client_ns])
            .arg(&self.traffic)
            .args(["client", "--connect", &format!("{server}:{PORT}")])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// A second path to the server with `delay` added to every client → server packet (so to
    /// the RTT) by graywatch-chaos's userspace link emulator: a second server address, a second
    /// listener on it, and the emulator diverting the client's packets to that address only. The
    /// plain veth path is untouched. Undone when the returned guard (or the bed) goes.
    pub fn delayed_path(&self, chaos: &Path, delay: Duration) -> anyhow::Result<DelayedPath> {
        ip(&[
            "-n",
            &self.server_ns,
            "addr",
            "add",
            &format!("{DELAYED_SERVER_ADDR}/24"),
            "dev",
            "eth0",
        ])?;
        let mut path = DelayedPath {
            listener: Some(self.start_listener("server", &format!("{DELAYED_SERVER_ADDR}:{PORT}"))?),
            emulator: None,
        };
        // The emulator runs real-time (SCHED_FIFO) and off the load's CPU. As a normal task,
        // each delayed packet also waited for a CPU after its timer fired (the 2 vCPUs are busy
        // with the load and the observers), plus the default 50 µs timer slack, so rounds
        // spread far more than the observers' cost (BENCHMARKS.md, "ebpf", fourteenth session).
        let mut command = Command::new("chrt");
        command.args(["--fifo", "10"]);
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let others: Vec<String> = (0..cpus)
            .filter(|c| self.cpu.is_some_and(|load| load != *c))
            .map(|c| c.to_string())
            .collect();
        if !others.is_empty() {
            command.args(["taskset", "-c", &others.join(",")]);
        }
        let mut emulator = command
            .arg(chaos)
            .args(["link", "--netns", &self.client_ns, "--local", CLIENT_ADDR])
            .args(["--to", DELAYED_SERVER_ADDR, "--egress", "eth0"])
            .args(["--fault", &format!("delay={}us", delay.as_micros())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting graywatch-chaos link")?;
        let stderr = emulator.stderr.take().context("graywatch-chaos stderr")?;
        path.emulator = Some(emulator);
        let active = line_where(&mut BufReader::new(stderr), |l| l.contains("fault active"))
            .context("reading graywatch-chaos's output")?;
        if active.is_none() {
            bail!("graywatch-chaos exited before its link emulator was up");
        }
        Ok(path)
    }

    /// Runs `clients` request/response connections at once and returns each one's result.
    pub fn rr(&self, clients: usize, load: &Rr) -> anyhow::Result<Vec<ClientResult>> {
        self.rr_to(SERVER_ADDR, clients, load)
    }

    /// [`TrafficBed::rr`] over the path of [`TrafficBed::delayed_path`] (which must be up).
    pub fn rr_delayed(&self, clients: usize, load: &Rr) -> anyhow::Result<Vec<ClientResult>> {
        self.rr_to(DELAYED_SERVER_ADDR, clients, load)
    }

    fn rr_to(&self, server: &str, clients: usize, load: &Rr) -> anyhow::Result<Vec<ClientResult>> {
        let mut args = vec![
            "--request".to_owned(),
            load.request.to_string(),
            "--response".to_owned(),
            load.response.to_string(),
        ];
        if let Some(count) = load.count {
            args.extend(["--count".to_owned(), count.to_string()]);
        }
        if let Some(duration) = load.duration {
            args.extend(["--duration".to_owned(), format!("{}ms", duration.as_millis())]);
        }
        if let Some(rate) = load.rate {
            args.extend(["--rate".to_owned(), format!("{rate:.3}")]);
        }
        let children = (0..clients)
            .map(|_| -> anyhow::Result<Child> {
                let mut cmd = self.client_command(server, &args);
                cmd.stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("starting graywatch-traffic client")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        children.into_iter().map(finish).collect()
    }

    /// `count` UDP datagrams from the client to a server port where nothing listens: each is
    /// dropped by the server's kernel (`kfree_skb`, reason `NO_SOCKET`).
    pub fn unreachable(&self, count: u64) -> anyhow::Result<ClientResult> {
        let mut cmd = self.load_command();
        cmd.args(["ip", "netns", "exec", &self.client_ns])
            .arg(&self.traffic)
            .args(["unreachable", "--connect", &format!("{SERVER_ADDR}:{CLOSED_PORT}")])
            .args(["--count", &count.to_string()])
            .stdin(Stdio::null());
        finish(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting graywatch-traffic unreachable")?,
        )
    }

    /// One bulk transfer of `bytes`.
    pub fn bulk(&self, bytes: u64) -> anyhow::Result<ClientResult> {
        let mut cmd = self.client_command(SERVER_ADDR, &["--bulk".to_owned(), bytes.to_string()]);
        finish(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting graywatch-traffic client")?,
        )
    }
}

fn finish(child: Child) -> anyhow::Result<ClientResult> {
    let output = child
        .wait_with_output()
        .context("waiting for graywatch-traffic client")?;
    if !output.status.success() {
        bail!(
            "graywatch-traffic client failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .context("graywatch-traffic client printed no report")?;
    let report: Value = serde_json::from_str(line).context("parsing the client report")?;
    let field = |name: &str| report.get(name).and_then(Value::as_f64).unwrap_or(0.0);
    Ok(ClientResult {
        transactions: report.get("transactions").and_then(Value::as_u64).unwrap_or(0),
        bytes: report.get("bytes").and_then(Value::as_u64).unwrap_or(0),
        elapsed_seconds: field("elapsed_seconds"),
    })
}

/// Reads `reader` up to the first line that `wanted` accepts and returns it; `None` when the
/// output ends first (the process exited).
fn line_where(reader: &mut impl BufRead, wanted: impl Fn(&str) -> bool) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if wanted(&line) {
            return Ok(Some(line));
        }
    }
}

/// The delayed path's listener and link emulator; the emulator stops with SIGTERM, so that it
/// removes its routes and rule before the listener goes.
pub struct DelayedPath {
    listener: Option<Child>,
    emulator: Option<Child>,
}

impl Drop for DelayedPath {
    fn drop(&mut self) {
        if let Some(mut emulator) = self.emulator.take() {
            if let Ok(pid) = libc::pid_t::try_from(emulator.id()) {
                // SAFETY: signals our own child, which has not been waited for (so its pid is ours).
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            emulator.wait().ok();
        }
        if let Some(mut listener) = self.listener.take() {
            listener.kill().ok();
            listener.wait().ok();
        }
    }
}

/// A running swarm: `connected` connections up, each sending a byte every 100 ms.
pub struct Swarm {
    /// Each process and its stdout; killed on drop unless [`Swarm::finish`] waited for them.
    parts: Vec<(Child, Option<BufReader<std::process::ChildStdout>>)>,
    pub connected: u32,
}

impl Swarm {
    /// Waits for the swarm's end (each process's report line) and checks that it succeeded.
    pub fn finish(mut self) -> anyhow::Result<()> {
        // Popped one by one: on an error, the processes not yet waited for stay for Drop.
        while let Some((child, out)) = self.parts.pop() {
            if let Some(mut out) = out {
                let mut report = String::new();
                out.read_line(&mut report).context("reading the swarm's report")?;
            }
            let output = child.wait_with_output().context("waiting for the swarm")?;
            if !output.status.success() {
                bail!(
                    "graywatch-traffic swarm failed ({}): {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
        }
        Ok(())
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        for (child, _) in &mut self.parts {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

impl Drop for TrafficBed {
    fn drop(&mut self) {
        for server in self.server.iter_mut().chain(self.sinks.get_mut().iter_mut()) {
            server.kill().ok();
            server.wait().ok();
        }
        for ns in [&self.client_ns, &self.server_ns] {
            if let Err(error) = ip(&["netns", "del", ns]) {
                eprintln!("bench cleanup: {error:#}");
            }
        }
    }
}

/// Sums parallel clients: transactions and bytes add up; elapsed is the longest.
pub fn total(results: &[ClientResult]) -> ClientResult {
    results.iter().fold(ClientResult::default(), |acc, r| ClientResult {
        transactions: acc.transactions + r.transactions,
        bytes: acc.bytes + r.bytes,
        elapsed_seconds: acc.elapsed_seconds.max(r.elapsed_seconds),
    })
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let output = cmd
        .output()
        .with_context(|| format!("running `{}` (iproute2)", describe(&cmd)))?;
    if !output.status.success() {
        bail!(
            "`{}` failed: {}",
            describe(&cmd),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Deletes the namespaces of bench runs that were killed before they could clean up (their
/// name carries the pid of a process that no longer exists, or ours).
fn remove_leftovers() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("gwbench-") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        let ours = pid == (std::process::id() % 100_000).to_string();
        if ours || !std::path::Path::new("/proc").join(pid).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stderr(Stdio::null())
                .status();
        }
    }
}
