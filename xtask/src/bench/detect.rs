//! `cargo xtask bench detect`: time from fault injection to the node's condition turning False
//! and to its taint, on the demo topology (`graywatch-demo`: a real apiserver, nodes as network
//! namespaces with traffic, one agent per node, the aggregator in direct-taint mode), repeated;
//! reports median, min and max. Each repetition is a fresh demo run.
//!
//! With `--scenarios`, the gray-failure matrix instead: one demo cluster (`--zones` of 3 nodes)
//! runs every scenario `--runs` times and the table has one row per scenario: the conditions
//! that reacted, fault → condition False and → taint (median, min, max), recovery, and every
//! action on a node that was not faulted. A scenario that is not detected is a row that says so.

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
    /// Run the scenario matrix: `all` or scenario names (graywatch-demo --scenarios).
    #[arg(long)]
    pub scenarios: Option<String>,
    /// With --scenarios: runs of each scenario.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// With --scenarios: zones of three nodes each (3: 9 nodes; 2: 6 nodes, on which a zone-wide
    /// fault is symmetric between the zones and cannot be told from a fault of the other zone).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=3))]
    pub zones: u8,
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
    let bin_dir = super::target_dir().join("release");
    let demo = bin_dir.join("graywatch-demo");
    if !demo.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p graywatch-demo`",
            demo.display()
        );
    }
    if let Some(scenarios) = &args.scenarios {
        return matrix(args, scenarios, &demo, &baseline);
    }
    println!(
        "detect: {repetitions} demo run(s), fault {}, baseline {baseline}",
        args.fault
    );
    let mut runs = Vec::new();
    for rep in 0..repetitions {
        let log = output_dir()?.join(format!("logs/demo-{rep}.log"));
        let started = Instant::now();
        let mut child = demo_command(&demo)?
            .args(["--fault", &args.fault, "--baseline", &baseline])
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

/// graywatch-demo with the binaries beside it and the demo's aggregator config, its stdout piped.
fn demo_command(demo: &std::path::Path) -> anyhow::Result<Command> {
    let mut command = Command::new(demo);
    command
        .arg("--bin-dir")
        .arg(demo.parent().context("demo binary directory")?)
        .arg("--aggregator-config")
        .arg(workspace_root().join("tests/demo/aggregator.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    Ok(command)
}

/// One scenario run as graywatch-demo reports it (`scenario_result=` lines).
#[derive(serde::Deserialize)]
struct ScenarioRun {
    scenario: String,
    #[serde(default)]
    reacted: Vec<String>,
    condition_seconds: Option<f64>,
    taint_seconds: Option<f64>,
    /// For a load in the node's cgroup: when the condition of its own family went False.
    expected_condition_seconds: Option<f64>,
    verdict_seconds: Option<f64>,
    /// For a fault on one link: when the aggregator reported the link degraded.
    #[serde(default)]
    link_seconds: Option<f64>,
    /// For a forecast failure (the memory leak): how long before the OOM kill the family's
    /// condition said `PredictedFailure`.
    #[serde(default)]
    predicted_lead_seconds: Option<f64>,
    recovery_seconds: Option<f64>,
    #[serde(default)]
    tainted_targets: Vec<String>,
    #[serde(default)]
    false_actions: Vec<String>,
    #[serde(default)]
    clean_before: bool,
}

fn matrix(args: &DetectArgs, scenarios: &str, demo: &std::path::Path, baseline: &str) -> anyhow::Result<()> {
    let runs = args.runs.max(1);
    let (zones, nodes) = (args.zones, 3 * args.zones);
    let load_before = super::loadavg();
    println!("detect: scenario matrix `{scenarios}`, {runs} run(s) each, baseline {baseline}, load {load_before}");
    let log = output_dir()?.join("logs/detect-matrix.log");
    let started = Instant::now();
    let mut child = demo_command(demo)?
        // Zones of three: a zone verdict needs three nodes in the zone and three outside.
        .args(["--nodes", &nodes.to_string(), "--zones", &zones.to_string()])
        .args(["--baseline", baseline, "--max-wait", "60s"])
        .args(["--scenarios", scenarios, "--runs", &runs.to_string()])
        .spawn()
        .context("starting graywatch-demo")?;
    let stdout = child.stdout.take().context("demo stdout")?;
    let mut text = String::new();
    let mut results: Vec<ScenarioRun> = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        text.push_str(&line);
        text.push('\n');
        if let Some(doc) = line.strip_prefix("scenario_result=") {
            let run: ScenarioRun = serde_json::from_str(doc).with_context(|| format!("parsing {doc}"))?;
            println!(
                "  {}: condition False {} s, taint {} s, verdict {} s, recovery {} s, reacted {:?}, false actions {:?}",
                run.scenario,
                fmt(run.condition_seconds.unwrap_or(f64::NAN), 1),
                fmt(run.taint_seconds.unwrap_or(f64::NAN), 1),
                fmt(run.verdict_seconds.unwrap_or(f64::NAN), 1),
                fmt(run.recovery_seconds.unwrap_or(f64::NAN), 1),
                run.reacted,
                run.false_actions
            );
            results.push(run);
        }
    }
    let status = child.wait()?;
    std::fs::write(&log, &text).with_context(|| format!("writing {}", log.display()))?;
    let load_after = super::loadavg();
    if !status.success() {
        bail!("graywatch-demo failed ({status}); log {}", log.display());
    }
    let mut names: Vec<&str> = Vec::new();
    for r in &results {
        if !names.contains(&r.scenario.as_str()) {
            names.push(&r.scenario);
        }
    }
    let mut rows = Vec::new();
    let mut docs = Vec::new();
    for name in names {
        let of: Vec<&ScenarioRun> = results.iter().filter(|r| r.scenario == name).collect();
        let (row, doc) = summarise(name, &of);
        rows.push(row);
        docs.push(doc);
    }
    print_table(
        &format!(
            "Gray-failure scenarios on the netns bench ({nodes} nodes, {zones} zones; {runs} run(s) each; load {load_before} → {load_after}; {:.0} s)",
            started.elapsed().as_secs_f64()
        ),
        &[
            "scenario",
            "reacted",
            "detected",
            "→ False s med (min–max)",
            "→ taint s",
            "zone verdict / link",
            "recovery s",
            "false actions elsewhere",
        ],
        &rows,
    );
    write_result(
        "detect",
        args.common.quick,
        json!({
            "config": {"scenarios": scenarios, "runs": runs, "baseline": baseline, "nodes": nodes, "zones": zones,
                       "loadavg_at_start": load_before},
            "scenarios": docs,
        }),
    )?;
    Ok(())
}

/// One scenario's table row and result document from its runs.
fn summarise(name: &str, of: &[&ScenarioRun]) -> (Vec<String>, serde_json::Value) {
    let figures =
        |f: fn(&ScenarioRun) -> Option<f64>| -> Vec<f64> { of.iter().map(|r| f(r).unwrap_or(f64::NAN)).collect() };
    let (condition, taint, verdict, link, lead, recovery) = (
        figures(|r| r.condition_seconds),
        figures(|r| r.taint_seconds),
        figures(|r| r.verdict_seconds),
        figures(|r| r.link_seconds),
        figures(|r| r.predicted_lead_seconds),
        figures(|r| r.recovery_seconds),
    );
    let spread = |v: &[f64]| {
        let (lo, hi) = min_max(v);
        format!("{} ({}–{})", fmt(median(v), 1), fmt(lo, 1), fmt(hi, 1))
    };
    // Detected: the faulty node went False, (a fault on one link) the link was reported, or (a
    // forecast failure) the failure was predicted before it happened.
    let detected = (0..of.len())
        .filter(|&i| condition[i].is_finite() || link[i].is_finite() || lead[i].is_finite())
        .count();
    let predicted = lead.iter().filter(|v| v.is_finite()).count();
    let mut reacted: Vec<String> = of.iter().flat_map(|r| r.reacted.iter().cloned()).collect();
    reacted.sort();
    reacted.dedup();
    let reacted = reacted
        .iter()
        .map(|c| c.trim_end_matches("Healthy"))
        .collect::<Vec<_>>();
    let mut false_actions: Vec<String> = of.iter().flat_map(|r| r.false_actions.iter().cloned()).collect();
    false_actions.sort();
    false_actions.dedup();
    let runs_with_false = of.iter().filter(|r| !r.false_actions.is_empty()).count();
    let verdicts = verdict.iter().filter(|v| v.is_finite()).count();
    let links = link.iter().filter(|v| v.is_finite()).count();
    let row = vec![
        name.to_owned(),
        match (reacted.is_empty(), links > 0) {
            (true, false) => "NOT DETECTED".to_owned(),
            (true, true) => "link".to_owned(),
            (false, true) => format!("link, {}", reacted.join("+")),
            (false, false) => reacted.join("+"),
        },
        format!("{detected}/{}", of.len()),
        spread(&condition),
        spread(&taint),
        match (verdicts, links) {
            (0, 0) if predicted > 0 => format!(
                "predicted {predicted}/{}, lead {} before the kill",
                of.len(),
                spread(&lead)
            ),
            (0, 0) => "—".to_owned(),
            (0, _) => format!("link {links}/{} ({})", of.len(), fmt(median(&link), 1)),
            _ => format!("{verdicts}/{} ({})", of.len(), fmt(median(&verdict), 1)),
        },
        spread(&recovery),
        if false_actions.is_empty() {
            "none".to_owned()
        } else {
            format!("{runs_with_false}/{} runs: {}", of.len(), false_actions.join("; "))
        },
    ];
    let series = |v: &[f64]| {
        let (lo, hi) = min_max(v);
        json!({"seconds": v.iter().map(|x| finite(*x)).collect::<Vec<_>>(), "median": finite(median(v)),
               "min": finite(lo), "max": finite(hi)})
    };
    let doc = json!({
        "scenario": name,
        "runs": of.len(),
        "detected_runs": detected,
        "reacted": reacted,
        "fault_to_condition_false": series(&condition),
        "fault_to_taint": series(&taint),
        "fault_to_own_family_condition_false": series(&figures(|r| r.expected_condition_seconds)),
        "fault_to_zone_verdict": series(&verdict),
        "fault_to_degraded_link": series(&link),
        "predicted_lead_before_failure": series(&lead),
        "recovery": series(&recovery),
        "tainted_targets": of.iter().map(|r| r.tainted_targets.clone()).collect::<Vec<_>>(),
        "false_actions": false_actions,
        "runs_with_false_actions": runs_with_false,
        "runs_not_starting_clean": of.iter().filter(|r| !r.clean_before).count(),
    });
    (row, doc)
}
