//! The kernel's own accounting of eBPF programs: `kernel.bpf_stats_enabled`, per-program
//! `run_time_ns` / `run_cnt` (bpftool prog show), and which process attached which program to
//! which hook (bpftool perf show).

use std::{collections::HashMap, process::Command};

use anyhow::{Context, bail};
use serde_json::Value;

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns `kernel.bpf_stats_enabled` on (put back on drop) and also holds a `BPF_ENABLE_STATS`
/// file descriptor: the kernel counts that as a reference of its own, so statistics stay on for
/// the whole run even if another process on the machine writes 0 to the sysctl meanwhile.
#[derive(Debug)]
pub struct BpfStats {
    previous: String,
    _fd: Option<std::os::fd::OwnedFd>,
}

impl BpfStats {
    pub fn enable() -> anyhow::Result<Self> {
        let previous = std::fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS} (kernel without BPF statistics?)"))?
            .trim()
            .to_owned();
        if previous != "1" {
            std::fs::write(BPF_STATS, "1")
                .with_context(|| format!("sysctl kernel.bpf_stats_enabled=1 ({BPF_STATS})"))?;
        }
        Ok(Self {
            previous,
            _fd: enable_stats_fd(),
        })
    }
}

/// `bpf(BPF_ENABLE_STATS, { type = BPF_STATS_RUN_TIME })`; None if the kernel refuses it.
fn enable_stats_fd() -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr's enable_stats member: one u32 (BPF_STATS_RUN_TIME = 0), zero padded.
    let attr = [0u32; 2];
    // SAFETY: a valid pointer to an initialised 8-byte attr for the duration of the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if self.previous != "1"
            && let Err(error) = std::fs::write(BPF_STATS, &self.previous)
        {
            eprintln!("could not restore kernel.bpf_stats_enabled={}: {error}", self.previous);
        }
    }
}

/// Cumulative counters of one program.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// `prog id → (name, counters)` for every program loaded in the kernel.
pub fn programs() -> anyhow::Result<HashMap<u32, (String, Counters)>> {
    let json = bpftool(&["prog", "show"])?;
    let Value::Array(list) = json else {
        bail!("bpftool prog show: expected a JSON array")
    };
    let mut out = HashMap::new();
    for prog in list {
        let Some(id) = prog
            .get("id")
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
        else {
            continue;
        };
        let name = prog.get("name").and_then(Value::as_str).unwrap_or("?").to_owned();
        let counters = Counters {
            run_time_ns: prog.get("run_time_ns").and_then(Value::as_u64).unwrap_or(0),
            run_cnt: prog.get("run_cnt").and_then(Value::as_u64).unwrap_or(0),
        };
        out.insert(id, (name, counters));
    }
    Ok(out)
}

/// One program attached to one kernel hook by one process.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub pid: u32,
    pub prog_id: u32,
    /// The tracepoint name as the kernel reports it (`tcp_probe`, `sched_switch`, …).
    pub hook: String,
}

/// The attachments held by `pids`: bpf links (`/proc/<pid>/fdinfo`: `link_type`, `tp_name`,
/// `prog_id` — how aya and libbpf attach) and perf-event attachments without a link (bpftool perf
/// show — how bpftrace attaches).
pub fn attachments(pids: &[u32]) -> anyhow::Result<Vec<Attachment>> {
    let mut out: Vec<Attachment> = Vec::new();
    for &pid in pids {
        let dir = format!("/proc/{pid}/fdinfo");
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            let field = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key).map(|v| v.trim_start_matches(':').trim().to_owned()))
            };
            if let (Some(_), Some(hook), Some(prog_id)) = (
                field("link_type"),
                field("tp_name"),
                field("prog_id").and_then(|v| v.parse().ok()),
            ) {
                out.push(Attachment { pid, prog_id, hook });
            }
        }
    }
    if let Value::Array(list) = bpftool(&["perf", "show"])? {
        for entry in &list {
            let parsed = (|| {
                let pid = u32::try_from(entry.get("pid")?.as_u64()?).ok()?;
                let prog_id = u32::try_from(entry.get("prog_id")?.as_u64()?).ok()?;
                let hook = entry.get("tracepoint")?.as_str()?.to_owned();
                Some(Attachment { pid, prog_id, hook })
            })();
            if let Some(a) = parsed
                && pids.contains(&a.pid)
                && !out
                    .iter()
                    .any(|b| b.pid == a.pid && b.prog_id == a.prog_id && b.hook == a.hook)
            {
                out.push(a);
            }
        }
    }
    Ok(out)
}

fn bpftool(args: &[&str]) -> anyhow::Result<Value> {
    let output = Command::new("bpftool")
        .args(args)
        .arg("--json")
        .output()
        .context("running bpftool (Debian package bpftool; `cargo xtask setup` installs it)")?;
    if !output.status.success() {
        bail!(
            "bpftool {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    if output.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_slice(&output.stdout).with_context(|| format!("parsing `bpftool {} --json`", args.join(" ")))
}

/// The kernel category of a tracepoint name, for display (`tcp:tcp_probe`).
pub fn hook_label(hook: &str) -> String {
    let category = match hook {
        h if h.starts_with("tcp_") => "tcp",
        "kfree_skb" | "consume_skb" => "skb",
        "inet_sock_set_state" => "sock",
        h if h.starts_with("sched_") => "sched",
        h if h.starts_with("mm_vmscan") => "vmscan",
        "mark_victim" => "oom",
        _ => return hook.to_owned(),
    };
    format!("{category}:{hook}")
}

/// Whether a hook carries TCP events (the agent's network programs).
pub fn is_tcp_hook(hook: &str) -> bool {
    matches!(hook, "tcp_probe" | "tcp_retransmit_skb" | "kfree_skb")
}
