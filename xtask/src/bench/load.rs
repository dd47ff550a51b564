//! The TCP load: two network namespaces joined by a veth pair, a `graywatch-traffic` server in
//! one and clients in the other (the same topology as the fault bench in tests/src/netns.rs,
//! kept here so that xtask does not link the bench crate and, through it, the agent).

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use serde_json::Value;

use super::Binaries;
use crate::util::describe;

const PORT: u16 = 7000;

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

/// Server in one namespace, clients in the other. Dropping it stops the server and deletes both
/// namespaces (and with them the veth pair).
pub struct TrafficBed {
    server: Option<Child>,
    traffic: std::path::PathBuf,
    client_ns: String,
    server_ns: String,
}

impl TrafficBed {
    pub fn new(binaries: &Binaries) -> anyhow::Result<Self> {
        let tag = std::process::id() % 100_000;
        let client_ns = format!("gwbench-{tag}-c");
        let server_ns = format!("gwbench-{tag}-s");
        remove_leftovers();
        ip(&["netns", "add", &client_ns])?;
        // From here on the bed exists, so Drop cleans up whatever the next steps leave.
        let mut bed = Self {
            server: None,
            traffic: binaries.traffic.clone(),
            client_ns,
            server_ns,
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
        let mut server = Command::new("nice")
            .args(LOAD_NICE)
            .args(["ip", "netns", "exec", &bed.server_ns])
            .arg(&bed.traffic)
            .args(["server", "--listen", &listen])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting graywatch-traffic server")?;
        let stdout = server.stdout.take().context("server stdout")?;
        bed.server = Some(server);
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        while !line.starts_with("listening") {
            line.clear();
            if reader
                .read_line(&mut line)
                .context("reading the traffic server's output")?
                == 0
            {
                bail!("graywatch-traffic server exited before listening on {listen}");
            }
        }
        Ok(bed)
    }

    fn client_command(&self, args: &[String]) -> Command {
        let mut cmd = Command::new("nice");
        cmd.args(LOAD_NICE)
            .args(["ip", "netns", "exec", &self.client_ns])
            .arg(&self.traffic)
            .args(["client", "--connect", &format!("{SERVER_ADDR}:{PORT}")])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `clients` request/response connections at once and returns each one's result.
    pub fn rr(&self, clients: usize, load: &Rr) -> anyhow::Result<Vec<ClientResult>> {
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
                let mut cmd = self.client_command(&args);
                cmd.stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("starting graywatch-traffic client")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        children.into_iter().map(finish).collect()
    }

    /// One bulk transfer of `bytes`.
    pub fn bulk(&self, bytes: u64) -> anyhow::Result<ClientResult> {
        let mut cmd = self.client_command(&["--bulk".to_owned(), bytes.to_string()]);
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

impl Drop for TrafficBed {
    fn drop(&mut self) {
        if let Some(server) = &mut self.server {
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
