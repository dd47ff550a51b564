//! `cargo xtask bench detect`: time from fault injection to the node's condition turning False
//! and to its taint, on the demo topology (`graywatch-demo`: a real apiserver, nodes as network
//! namespaces with traffic, one agent per node, the aggregator in direct-taint mode), repeated;
//! reports median, min and max. Each repetition is a fresh demo run.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, bail};
use serde_json::json;

use super::{CommonArgs, finite, fmt, median, min_max, output_dir, print_table, verdict, write_result};
use crate::util::{run_cmd, workspace_root};

#[derive(clap::Args)]
pub struct DetectArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Repetitions.
    #[arg(long)]
    pub repetitions: Option<usize>,
    /// The fault, as graywatch-demo takes it.
    #[arg(long, default_value = "delay=30ms,loss=1%")]
    pub fault: String,
    /// Baseline learning time before the fault, as graywatch-demo takes it.
    #[arg(long)]
    pub baseline: Option<String>,
}

const BUDGET_SECONDS: f64 = 10.0;

#[expect(clippy::too_many_lines, reason = "one benchmark, its steps in order")]
pub fn run(args: &DetectArgs) -> anyhow::Result<()> {
    let quick = args.common.quick;
    let repetitions = args.repetitions.unwrap_or(if quick { 1 } else { 5 }).max(1);
    let baseline = args
        .baseline
        .clone()
        .unwrap_or_else(|| if quick { "20s" } else { "40s" }.to_owned());
    let root = workspace_root();
    if !args.common.no_build {
        run_cmd(
            Command::new("cargo")
                .current_dir(&root)
                .args(["build", "--release", "--bins"])
                .args([
                    "-p",
                    "graywatch-agent",
                    "-p",
                    "graywatch-aggregator",
                    "-p",
                    "graywatch-testbench",
                ])
                .args(["-p", "graywatch-demo"])
                .env("GRAYWATCH_REQUIRE_EBPF", "1"),
        )?;
    }
    let bin_dir = root.join("target/release");
    let demo = bin_dir.join("graywatch-demo");
    if !demo.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p graywatch-demo`",
            demo.display()
        );
    }
    println!(
        "detect: {repetitions} demo run(s), fault {}, baseline {baseline}",
        args.fault
    );
    let mut runs = Vec::new();
    for rep in 0..repetitions {
        let log = output_dir()?.join(format!("logs/demo-{rep}.log"));
        let started = Instant::now();
        let mut child = Command::new(&demo)
            .arg("--bin-dir")
            .arg(&bin_dir)
            .arg("--aggregator-config")
            .arg(root.join("tests/demo/aggregator.toml"))
            .args(["--fault", &args.fault, "--baseline", &baseline])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting graywatch-demo")?;
        let stdout = child.stdout.take().context("demo stdout")?;
        let mut text = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            text.push_str(&line);
            text.push('\n');
        }
        let status = child.wait()?;
        std::fs::write(&log, &text).with_context(|| format!("writing {}", log.display()))?;
        let figure = |key: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        let condition = figure("fault_to_condition_seconds=");
        let taint = figure("fault_to_taint_seconds=");
        let recovery = figure("recovery_seconds=");
        println!(
            "  run {rep}: condition False after {} s, taint after {} s, recovery {} s ({}; {:.0} s; log {})",
            fmt(condition, 1),
            fmt(taint, 1),
            fmt(recovery, 1),
            status,
            started.elapsed().as_secs_f64(),
            log.display()
        );
        runs.push((condition, taint, recovery, status.success()));
    }
    let column = |f: fn(&(f64, f64, f64, bool)) -> f64| -> Vec<f64> { runs.iter().map(f).collect() };
    let mut rows = Vec::new();
    let mut out = serde_json::Map::new();
    for (name, values) in [
        ("fault → condition False", column(|r| r.0)),
        ("fault → taint", column(|r| r.1)),
        ("fault removed → recovered", column(|r| r.2)),
    ] {
        let (lo, hi) = min_max(&values);
        let measured = values.iter().filter(|v| v.is_finite()).count();
        rows.push(vec![
            name.to_owned(),
            fmt(median(&values), 1),
            fmt(lo, 1),
            fmt(hi, 1),
            format!("{measured}/{}", values.len()),
        ]);
        out.insert(
            name.to_owned(),
            json!({"seconds": values.iter().map(|v| finite(*v)).collect::<Vec<_>>(), "median": finite(median(&values)),
                   "min": finite(lo), "max": finite(hi)}),
        );
    }
    print_table(
        &format!(
            "Detection on the demo topology ({repetitions} run(s), fault {})",
            args.fault
        ),
        &["interval", "median s", "min s", "max s", "reacted"],
        &rows,
    );
    let conditions = column(|r| r.0);
    let met = conditions.iter().all(|c| c.is_finite()) && median(&conditions) < BUDGET_SECONDS;
    println!(
        "\nGoal: detection < {BUDGET_SECONDS} s (median fault → condition False): {}",
        verdict(met)
    );
    write_result(
        "detect",
        quick,
        json!({
            "config": {"repetitions": repetitions, "fault": args.fault, "baseline": baseline},
            "intervals": out,
            "goals": {"detection_under_10s": met},
        }),
    )?;
    Ok(())
}
