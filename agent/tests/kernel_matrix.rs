//! The agent on the EKS kernel lines: Debian's 6.1 and 6.12 cloud kernels (the lines AL2023 and
//! Bottlerocket ship, cgroup v2 only) booted in a QEMU guest (TCG) whose initramfs holds this
//! build's agent, busybox and stress-ng. Inside the guest a load runs (loopback TCP, a memory
//! hog over a cgroup memory limit) while the agent takes one window; the test asserts which
//! programs attached and that every signal the load exercises is measured (non-null).
//!
//! `cargo xtask test` fetches the kernels (`GRAYWATCH_KERNELS`); without them the test says so
//! and passes only when that variable is unset (a plain `cargo test` on a laptop).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_graywatch-agent");

/// The kernel lines, as `xtask/src/kernels.rs` lays them out.
const LINES: &[&str] = &["6.1", "6.12"];

/// A guest that has not powered off by then is hung (TCG boots in seconds); not a measurement.
const GUEST_DEADLINE: Duration = Duration::from_mins(5);

/// What the guest runs as /init. Markers delimit the agent's output on the serial console.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tracefs nodev /sys/kernel/tracing
mount -t cgroup2 none /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
# Kernel messages (the hog's OOM kills) would interleave with the window on the console.
dmesg -n 1
mkdir -p /tmp
ip link set lo up
echo "+memory +cpu" > /sys/fs/cgroup/cgroup.subtree_control
mkdir /sys/fs/cgroup/load
echo 48M > /sys/fs/cgroup/load/memory.max
# Loopback TCP: a bulk sender and a sink, for RTT, segments and (kernel) drops. The sink's
# stdin must stay open: busybox nc closes the connection when its stdin ends.
sleep 100000 | nc -l -p 9000 > /dev/null &
sleep 1
yes graywatch-kernel-matrix | nc 127.0.0.1 9000 &
# A memory hog over its cgroup's limit: reclaim stalls, PSI, OOM kills.
sh -c 'echo $$ > /sys/fs/cgroup/load/cgroup.procs; exec /stress-ng --vm 1 --vm-bytes 96M --vm-keep --timeout 120s -q' &
RUST_LOG=info /graywatch-agent --once --output json --kube off --listen off --interval 4s --node-name guest > /tmp/window.json 2> /tmp/agent.log
echo "GRAYWATCH_AGENT_EXIT=$?"
echo "GRAYWATCH_BEGIN_WINDOW"
cat /tmp/window.json
echo "GRAYWATCH_END_WINDOW"
echo "GRAYWATCH_BEGIN_LOG"
cat /tmp/agent.log
echo "GRAYWATCH_END_LOG"
echo "GRAYWATCH_KERNEL=$(uname -r)"
poweroff -f
"#;

#[test]
fn the_agent_runs_and_measures_on_the_eks_kernel_lines() {
    let Some(kernels) = kernels_dir() else { return };
    let work = std::env::temp_dir().join(format!("graywatch-kernel-matrix-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let initrd = build_initramfs(&work);
    let mut matrix = Vec::new();
    for line in LINES {
        let vmlinuz = kernels.join(line).join("vmlinuz");
        assert!(
            vmlinuz.exists(),
            "{} missing: run `cargo xtask test`",
            vmlinuz.display()
        );
        let run = boot(&work, line, &vmlinuz, &initrd);
        matrix.push(check(line, &run));
    }
    eprintln!("\nkernel matrix:");
    for row in &matrix {
        eprintln!("{row}");
    }
    let _ = std::fs::remove_dir_all(&work);
}

fn kernels_dir() -> Option<PathBuf> {
    let Some(dir) = std::env::var_os("GRAYWATCH_KERNELS") else {
        eprintln!(
            "SKIPPED kernel matrix: GRAYWATCH_KERNELS is unset (`cargo xtask test` fetches the 6.1 and 6.12 kernels)"
        );
        return None;
    };
    Some(PathBuf::from(dir))
}

/// The initramfs: busybox, the agent (debug info stripped), stress-ng, their shared libraries,
/// and /init.
fn build_initramfs(work: &Path) -> PathBuf {
    let root = work.join("root");
    for dir in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(dir)).expect("initramfs dirs");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    let agent = root.join("graywatch-agent");
    let stripped = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(AGENT)
        .arg(&agent)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(AGENT, &agent).expect("copy the agent");
    }
    let stress = which("stress-ng");
    std::fs::copy(&stress, root.join("stress-ng")).expect("copy stress-ng");
    for binary in [Path::new(AGENT), stress.as_path()] {
        for lib in shared_libraries(binary) {
            let target = root.join(lib.strip_prefix("/").expect("absolute"));
            std::fs::create_dir_all(target.parent().expect("parent")).expect("lib dir");
            std::fs::copy(&lib, &target).unwrap_or_else(|e| panic!("copy {}: {e}", lib.display()));
        }
    }
    let init = root.join("init");
    std::fs::write(&init, INIT).expect("write /init");
    make_executable(&init);
    let initrd = work.join("initrd.gz");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find . | cpio -o -H newc --quiet | gzip -1 > {}",
            initrd.display()
        ))
        .current_dir(&root)
        .status()
        .expect("run cpio");
    assert!(status.success(), "cpio failed");
    initrd
}

fn which(program: &str) -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .expect("sh");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(!path.is_empty(), "{program} is not installed (cargo xtask setup)");
    PathBuf::from(path)
}

/// The libraries `ldd` names for `binary`, the dynamic loader included.
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(binary).output().expect("run ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Boots `vmlinuz` with the initramfs and returns the serial console's text.
fn boot(work: &Path, line: &str, vmlinuz: &Path, initrd: &Path) -> String {
    let log = work.join(format!("serial-{line}.log"));
    // `timeout` ends a hung guest (TCG boots in seconds): a guard, not a measurement.
    let status = Command::new("timeout")
        .arg(GUEST_DEADLINE.as_secs().to_string())
        .arg("qemu-system-x86_64")
        // KVM hangs on this VM; TCG is slower but boots in seconds.
        .args([
            "-cpu",
            "qemu64",
            "-m",
            "1024",
            "-smp",
            "1",
            "-no-reboot",
            "-display",
            "none",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("qemu-system-x86_64 is installed (cargo xtask test installs it)");
    assert!(
        status.success(),
        "the {line} guest did not power off cleanly ({status}); serial console:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    std::fs::read_to_string(&log).expect("serial log")
}

fn between<'a>(text: &'a str, begin: &str, end: &str) -> Option<&'a str> {
    let start = text.find(begin)? + begin.len();
    let stop = start + text[start..].find(end)?;
    Some(text[start..stop].trim())
}

/// Asserts what the agent attached and measured on one kernel; returns the matrix row.
fn check(line: &str, serial: &str) -> String {
    let context = || format!("kernel {line}, serial console:\n{serial}");
    let kernel = serial
        .lines()
        .find_map(|l| l.trim().strip_prefix("GRAYWATCH_KERNEL="))
        .unwrap_or_else(|| panic!("the guest never finished; {}", context()));
    assert!(kernel.starts_with(line), "booted {kernel}, expected the {line} line");
    let exit = serial
        .lines()
        .find_map(|l| l.trim().strip_prefix("GRAYWATCH_AGENT_EXIT="))
        .unwrap_or_default();
    assert_eq!(exit.trim(), "0", "the agent failed; {}", context());
    let log = between(serial, "GRAYWATCH_BEGIN_LOG", "GRAYWATCH_END_LOG").unwrap_or_default();
    let window: Value =
        serde_json::from_str(between(serial, "GRAYWATCH_BEGIN_WINDOW", "GRAYWATCH_END_WINDOW").unwrap_or_default())
            .unwrap_or_else(|e| panic!("no JSON window ({e}); {}", context()));

    let attached = log
        .lines()
        .find(|l| l.contains("kernel programs attached"))
        .unwrap_or_else(|| panic!("no 'kernel programs attached' line; {}", context()));
    // 6.1's tcp:tcp_probe record has no socket address: RTT comes from the raw tracepoint.
    let rtt_program = if line == "6.1" {
        "raw_tp:tcp_probe"
    } else {
        "tcp:tcp_probe"
    };
    for program in [
        rtt_program,
        "tcp:tcp_retransmit_skb",
        "tp_btf:kfree_skb",
        "sock:inet_sock_set_state",
        "tp_btf:sched_switch",
        "vmscan:mm_vmscan_memcg_reclaim_begin",
    ] {
        assert!(
            attached.contains(program),
            "{program} not attached on {kernel}: {attached}"
        );
    }
    let unavailable = window["unavailable"].as_object().cloned().unwrap_or_default();
    for signal in [
        "rtt",
        "segments_sent",
        "retransmits",
        "drops",
        "segments_sent_at_close",
        "run_queue",
        "reclaim",
        "oom_kill",
        "psi_memory",
        "cgroup_pressure",
    ] {
        assert!(
            !unavailable.contains_key(signal),
            "{signal} unavailable on {kernel}: {unavailable:?}"
        );
    }

    let flows = window["network"]["flows"].as_array().cloned().unwrap_or_default();
    let loopback = flows
        .iter()
        .find(|f| f["remote"] == "127.0.0.1" && !f["rtt"].is_null())
        .unwrap_or_else(|| panic!("no loopback flow with RTT on {kernel}: {flows:?}"));
    let segments = loopback["segments_sent"].as_u64().unwrap_or_default();
    assert!(segments > 0, "no segments counted on {kernel}: {loopback}");
    let run_queue = window["cpu"]["run_queue"].as_array().map_or(0, Vec::len);
    assert!(run_queue > 0, "no run-queue latency on {kernel}");
    let psi = &window["pressure"]["node"]["memory"];
    assert!(!psi.is_null(), "no memory PSI on {kernel}");
    let reclaim = window["memory"]["reclaim"].as_array().map_or(0, Vec::len);
    let oom_kills = window["memory"]["oom_kills"].as_array().map_or(0, Vec::len);
    assert!(
        reclaim > 0 || oom_kills > 0,
        "the memory hog left no reclaim or OOM kill on {kernel}: {}",
        window["memory"]
    );
    format!(
        "  {kernel}: attached [{}]; loopback rtt p50 {} µs, {segments} segments; run-queue workloads {run_queue}; \
         memory PSI some {}; reclaim workloads {reclaim}; OOM-killed workloads {oom_kills}; unavailable {:?}",
        attached.find("[\"").map_or(attached, |at| &attached[at..]),
        loopback["rtt"]["p50_us"],
        psi["some_pct"],
        unavailable.keys().collect::<Vec<_>>()
    )
}
