//! The graywatch-agent binary as a user runs it (as root, on the real kernel): help, config
//! errors, a standalone `--once` window, /metrics + /healthz, and a clean SIGTERM shutdown.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
};

const AGENT: &str = env!("CARGO_BIN_EXE_graywatch-agent");

#[test]
fn help_explains_the_standalone_mode() {
    let output = Command::new(AGENT).arg("--help").output().expect("run --help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "--once",
        "--interval",
        "--output",
        "--listen",
        "--cgroup-scope",
        "NODE_NAME",
    ] {
        assert!(help.contains(expected), "--help should mention {expected}:\n{help}");
    }
}

#[test]
fn bad_config_exits_with_usage_code_and_names_the_field() {
    let output = Command::new(AGENT)
        .args(["--node-name", "n", "--interval", "5ms"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`interval`"), "{stderr}");

    let dir = std::env::temp_dir().join(format!("graywatch-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("agent.toml");
    std::fs::write(&file, "interval = \"1s\"\nlisten_address = \"x\"\n").expect("write config");
    let output = Command::new(AGENT).arg("--config").arg(&file).output().expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("listen_address") && stderr.contains("agent.toml"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn once_prints_one_json_window() {
    let output = Command::new(AGENT)
        .args([
            "--once",
            "--node-name",
            "cli-test",
            "--interval",
            "300ms",
            "--listen",
            "off",
        ])
        .output()
        .expect("run --once");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one window: {stdout}");
    let window: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON window");
    assert_eq!(window["node"], "cli-test");
    assert!(window["window_seconds"].as_f64().is_some_and(|s| s > 0.25), "{window}");
    assert!(window["network"]["flows"].is_array());
    assert!(window["lost_events"]["flow_map_full"].is_u64());
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response))
}

#[test]
fn serves_metrics_and_health_then_stops_on_sigterm() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut agent = Command::new(AGENT)
        .args([
            "--node-name",
            "cli-test",
            "--interval",
            "200ms",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--log", "graywatch_agent=debug"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start agent");
    let mut stderr = BufReader::new(agent.stderr.take().expect("stderr"));
    // The debug log line "window" follows the metrics update of each window.
    let mut line = String::new();
    let mut serving = false;
    loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).expect("agent log") > 0,
            "agent exited early"
        );
        // Piped, as under a kubelet: no terminal colour codes in the log.
        assert!(!line.contains('\x1b'), "colour codes in a piped log: {line:?}");
        serving |= line.contains("serving /metrics");
        if serving && line.contains(" window") && line.contains("flows") {
            break;
        }
    }
    let (status, metrics) = http_get(port, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    assert!(!metrics.contains("graywatch_windows_total 0"), "{metrics}");
    for family in [
        "graywatch_ebpf_lost_events",
        "graywatch_signal_available",
        "graywatch_window_collect_seconds",
    ] {
        assert!(metrics.contains(family), "missing {family}");
    }
    let (status, _) = http_get(port, "/healthz").expect("GET /healthz");
    assert_eq!(status, 200);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id().cast_signed()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("send SIGTERM");
    let status = agent.wait().expect("agent exits");
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    assert!(status.success(), "graceful exit expected: {status}\n{rest}");
    assert!(rest.contains("SIGTERM") && rest.contains("stopped"), "{rest}");
}
