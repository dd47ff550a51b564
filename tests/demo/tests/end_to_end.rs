//! The README demo as a test: real apiserver, aggregator, agents on netns nodes, a real injected
//! fault. Passes only if the faulted node's condition goes False, it is tainted, and it recovers
//! (each within the demo's bounded wait), and no other node is touched.

use std::process::Command;

#[test]
fn injected_gray_failure_is_detected_tainted_and_recovered() {
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_graywatch-demo"))
        .parent()
        .expect("bin dir")
        .to_owned();
    // The agent, aggregator and traffic binaries are built by `cargo xtask test` (cargo builds
    // only this package's binaries for its tests).
    for bin in ["graywatch-agent", "graywatch-aggregator", "graywatch-traffic"] {
        assert!(
            bin_dir.join(bin).exists(),
            "{bin} missing in {}: run via `cargo xtask test`",
            bin_dir.display()
        );
    }
    // cargo's run-time value first: the compiled-in one can come from another checkout sharing
    // the target dir.
    let config = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), std::path::PathBuf::from)
        .join("aggregator.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_graywatch-demo"))
        .args([
            "--baseline",
            "30s",
            "--max-wait",
            "60s",
            "--fault",
            "delay=30ms,loss=1%",
            "--node",
            "node-c",
        ])
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--aggregator-config")
        .arg(config)
        .output()
        .expect("run graywatch-demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let value = |key: &str| -> f64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no numeric {key}= line in:\n{stdout}"))
    };
    let (condition, taint, recovery) = (
        value("fault_to_condition_seconds"),
        value("fault_to_taint_seconds"),
        value("recovery_seconds"),
    );
    eprintln!("fault→condition {condition}s, fault→taint {taint}s, recovery {recovery}s");
    assert!(taint >= condition, "the taint follows the condition");
    // Only the faulted node was acted on.
    assert!(stdout.contains("GrayFailureTaint on node-c"), "{stdout}");
    for other in ["node-a", "node-b", "node-d", "node-e"] {
        assert!(
            !stdout.contains(&format!("GrayFailureTaint on {other}")),
            "{other} must not be tainted:\n{stdout}"
        );
    }
}
