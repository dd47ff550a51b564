//! What watches the kernel during a run: nothing (the floor), graywatch-agent, or a peer observer
//! built from standard tools attached to the same kernel events (bpftrace one-liners on the TCP
//! tracepoints, libbpf-tools `runqlat` on the scheduler hooks).

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::{
    Binaries, ensure_tool,
    kernel::{self, Attachment, Counters},
    log_tail, output_dir,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Nothing attached: the floor.
    None,
    Graywatch,
    Peer,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::None, Kind::Graywatch, Kind::Peer];

    pub fn label(self) -> &'static str {
        match self {
            Kind::None => "none",
            Kind::Graywatch => "graywatch",
            Kind::Peer => "peer",
        }
    }
}

/// The peer observer's bpftrace program: the same three TCP tracepoints graywatch uses, keyed
/// like graywatch keys them (cgroup × remote end), aggregating in kernel maps.
pub const BPFTRACE_SCRIPT: &str = "tracepoint:tcp:tcp_probe { @srtt_us[cgroup, args->dport] = hist(args->srtt >> 3); } \
tracepoint:tcp:tcp_retransmit_skb { @retrans[cgroup, ntop(args->daddr)] = count(); } \
tracepoint:skb:kfree_skb { @drops[args->reason] = count(); }";

/// One peer tool: how it is run and which hooks it should attach. SIGINT makes each of them
/// print its maps and exit.
struct PeerTool {
    name: &'static str,
    /// The Debian package that ships it (installed on first use).
    package: &'static str,
    args: &'static [&'static str],
    hooks: &'static [&'static str],
}

const PEER_TOOLS: &[PeerTool] = &[
    PeerTool {
        name: "bpftrace",
        package: "bpftrace",
        args: &["-e", BPFTRACE_SCRIPT],
        hooks: &["tcp_probe", "tcp_retransmit_skb", "kfree_skb"],
    },
    PeerTool {
        name: "runqlat",
        package: "libbpf-tools",
        args: &[],
        hooks: &["sched_wakeup", "sched_wakeup_new", "sched_switch"],
    },
];

/// Why peer tools that the issue names cannot be part of the peer observer on this kernel,
/// checked on this machine (the tool is run, or its prerequisite looked up).
pub fn peer_unavailable() -> Vec<(String, String)> {
    let mut out = Vec::new();
    // libbpf-tools tcprtt: attaches fentry or kprobe on tcp_rcv_established.
    match ensure_tool("tcprtt", "libbpf-tools") {
        Ok(path) => {
            let result = Command::new(&path).args(["-d", "1"]).stdin(Stdio::null()).output();
            match result {
                Ok(o) if !o.status.success() => {
                    let stderr = String::from_utf8_lossy(&o.stderr);
                    let why = stderr
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                        .take(2)
                        .collect::<Vec<_>>()
                        .join("; ");
                    out.push(("libbpf-tools tcprtt".to_owned(), format!("fails to attach: {why}")));
                }
                Ok(_) => {}
                Err(error) => out.push(("libbpf-tools tcprtt".to_owned(), format!("cannot start: {error}"))),
            }
        }
        Err(why) => out.push(("libbpf-tools tcprtt".to_owned(), why)),
    }
    // libbpf-tools 0.26 (Debian) ships no tcpretrans; bcc's needs kernel headers to compile.
    if super::which("tcpretrans").is_none() {
        out.push((
            "libbpf-tools tcpretrans".to_owned(),
            "not shipped by Debian's libbpf-tools".to_owned(),
        ));
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let headers = Path::new("/lib/modules").join(&release).join("build");
    if !headers.exists() && !Path::new("/sys/kernel/kheaders.tar.xz").exists() {
        out.push((
            "bcc (bpfcc-tools: tcpretrans, runqlat, tcprtt)".to_owned(),
            format!(
                "bcc compiles its programs against kernel headers at run time: none here ({} missing, no CONFIG_IKHEADERS)",
                headers.display()
            ),
        ));
    }
    out
}

/// A running observer and the kernel attachments its processes hold.
pub struct Observer {
    children: Vec<(String, Child, PathBuf)>,
    pub attachments: Vec<Attachment>,
    /// Peer tools that failed to start or attach here: (tool, why).
    pub unavailable: Vec<(String, String)>,
}

impl Observer {
    /// Starts the observer and waits until its programs are attached.
    pub fn start(kind: Kind, binaries: &Binaries) -> anyhow::Result<Self> {
        let mut observer = Self {
            children: Vec::new(),
            attachments: Vec::new(),
            unavailable: Vec::new(),
        };
        match kind {
            Kind::None => {}
            Kind::Graywatch => {
                let mut cmd = Command::new(&binaries.agent);
                cmd.args(["--output", "none", "--listen", "off", "--kube", "off", "--log", "warn"]);
                let child = observer.spawn("graywatch-agent", cmd)?;
                // Network (3) + scheduler (3) programs at least; memory programs follow.
                observer.await_attached(child, 6)?;
            }
            Kind::Peer => {
                for tool in PEER_TOOLS {
                    let path = match ensure_tool(tool.name, tool.package) {
                        Ok(path) => path,
                        Err(why) => {
                            observer.unavailable.push((tool.name.to_owned(), why));
                            continue;
                        }
                    };
                    let mut cmd = Command::new(path);
                    cmd.args(tool.args);
                    let child = observer.spawn(tool.name, cmd)?;
                    if let Err(error) = observer.await_attached(child, tool.hooks.len()) {
                        observer.unavailable.push((tool.name.to_owned(), format!("{error:#}")));
                    }
                }
            }
        }
        observer.settle();
        Ok(observer)
    }

    /// Waits until the observer's processes are quiet (start-up work done: below 5% of a core
    /// over half a second), at most 15 s, so that a run measures the steady state.
    fn settle(&mut self) {
        let pids: Vec<u32> = self.children.iter().map(|(_, c, _)| c.id()).collect();
        if pids.is_empty() {
            return;
        }
        let started = Instant::now();
        let window = Duration::from_millis(500);
        while started.elapsed() < Duration::from_secs(15) {
            let before: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
            std::thread::sleep(window);
            let after: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
            let percent = (after - before.min(after)) as f64 / clock_ticks() / window.as_secs_f64() * 100.0;
            if percent < 5.0 {
                return;
            }
        }
        eprintln!("observer still busy after 15 s; measuring anyway");
    }

    fn spawn(&mut self, name: &str, mut cmd: Command) -> anyhow::Result<usize> {
        let log = output_dir()?.join("logs").join(format!("{name}.log"));
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.children.push((name.to_owned(), child, log));
        Ok(self.children.len() - 1)
    }

    /// Waits until child `index` holds at least `expected` attachments and their number is stable.
    fn await_attached(&mut self, index: usize, expected: usize) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut last = 0;
        let mut stable_since = Instant::now();
        loop {
            let (name, child, log) = &mut self.children[index];
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{name} exited ({status}) before attaching; log {}:\n{}",
                    log.display(),
                    log_tail(log, 8)
                );
            }
            let pid = child.id();
            let found = kernel::attachments(&[pid])?;
            if found.len() != last {
                last = found.len();
                stable_since = Instant::now();
            }
            if found.len() >= expected && stable_since.elapsed() >= Duration::from_millis(1500) {
                self.attachments.extend(found);
                return Ok(());
            }
            if started.elapsed() > Duration::from_mins(1) {
                bail!(
                    "{name} attached {} of {expected} programs within 60 s; log {}",
                    found.len(),
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The process id of the first process (the agent, for `Kind::Graywatch`).
    pub fn main_pid(&self) -> Option<u32> {
        self.children.first().map(|(_, child, _)| child.id())
    }

    /// Current cumulative counters of every attachment, keyed by (hook, prog id).
    pub fn counters(&self) -> anyhow::Result<BTreeMap<(String, u32), (String, Counters)>> {
        let programs = kernel::programs()?;
        Ok(self
            .attachments
            .iter()
            .map(|a| {
                let (name, counters) = programs
                    .get(&a.prog_id)
                    .cloned()
                    .unwrap_or_else(|| ("?".to_owned(), Counters::default()));
                let tool = self.tool_of(a.pid);
                let label = if tool == "graywatch-agent" {
                    name
                } else {
                    format!("{tool}/{name}")
                };
                ((a.hook.clone(), a.prog_id), (label, counters))
            })
            .collect())
    }

    fn tool_of(&self, pid: u32) -> &str {
        self.children
            .iter()
            .find(|(_, c, _)| c.id() == pid)
            .map_or("?", |(name, _, _)| name.as_str())
    }

    /// Stops every process (SIGTERM for the agent, SIGINT for the tools), waiting for each.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_all()
    }

    fn stop_all(&mut self) -> anyhow::Result<()> {
        for (name, child, log) in self.children.drain(..).rev() {
            stop_child(&name, child, &log)?;
        }
        Ok(())
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        if let Err(error) = self.stop_all() {
            eprintln!("stopping observer: {error:#}");
        }
    }
}

fn stop_child(name: &str, mut child: Child, log: &Path) -> anyhow::Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    let is_agent = name == "graywatch-agent";
    let signal = if is_agent { libc::SIGTERM } else { libc::SIGINT };
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    // SAFETY: kill(2) on the pid of a child we started and have not reaped yet.
    unsafe { libc::kill(pid, signal) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().ok();
    child.wait().ok();
    // Our agent must honour SIGTERM (a DaemonSet rollout depends on it): that is a failure. A
    // peer tool slow to exit after its figures were taken (bpftrace detaching hundreds of probes
    // on a busy machine) does not change what was measured: killed, said, and the run goes on.
    if is_agent {
        bail!(
            "{name} did not stop within 15 s of signal {signal}; killed (log {})",
            log.display()
        )
    }
    eprintln!(
        "warning: {name} did not stop within 15 s of signal {signal}; killed it (log {})",
        log.display()
    );
    Ok(())
}

/// utime + stime of a process in clock ticks; 0 when it is gone.
pub fn cpu_ticks(pid: u32) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some((_, rest)) = text.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}
