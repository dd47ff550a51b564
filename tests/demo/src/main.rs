//! graywatch-demo: the README's main job, usually started by `cargo xtask demo` (which installs
//! and builds everything first). Runs as root on this machine; cleans up after itself.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use graywatch_demo::{DemoOptions, run};
use graywatch_testbench::fault::LinkSpec;

#[derive(Parser)]
#[command(
    name = "graywatch-demo",
    about = "graywatch end to end on this machine: apiserver, aggregator, agents, a fault"
)]
struct Cli {
    /// The gray failure to inject (delay, jitter, loss), e.g. delay=30ms,loss=1%.
    #[arg(long, value_parser = LinkSpec::parse, default_value = "delay=30ms,loss=1%")]
    fault: LinkSpec,
    /// The node to inject it on (node-a, node-b, …).
    #[arg(long)]
    node: Option<String>,
    /// Number of nodes, spread over the zones in order (node-a … first).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(3..=9))]
    nodes: u8,
    /// Number of zones (2 or 3). A fault on every link out of one zone is symmetric between two
    /// zones (each side sees the other slow); a third zone tells which one is faulty.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=3))]
    zones: u8,
    /// How long to learn the baseline before the fault.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "40s")]
    baseline: Duration,
    /// Give up waiting for the condition / taint after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    max_wait: Duration,
    /// Leave everything running at the end (for kubectl) until Ctrl-C.
    #[arg(long)]
    keep: bool,
    /// Where graywatch-agent, graywatch-aggregator and graywatch-traffic are (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Aggregator config (TOML) for the demo's thresholds.
    #[arg(long)]
    aggregator_config: Option<PathBuf>,
    /// Run the gray-failure scenario matrix instead of one fault: `all` or names, comma-separated.
    #[arg(long)]
    scenarios: Option<String>,
    /// How many times each scenario runs.
    #[arg(long, default_value_t = 1)]
    runs: usize,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let bin_dir = cli
        .bin_dir
        .or_else(|| std::env::current_exe().ok().and_then(|p| p.parent().map(PathBuf::from)));
    let Some(bin_dir) = bin_dir else {
        eprintln!("graywatch-demo: cannot find the binaries; pass --bin-dir");
        return ExitCode::from(2);
    };
    let scenarios = match cli.scenarios.as_deref().map(graywatch_demo::scenarios::select) {
        None => Vec::new(),
        Some(Ok(scenarios)) => scenarios,
        Some(Err(error)) => {
            eprintln!("graywatch-demo: --scenarios: {error}");
            return ExitCode::from(2);
        }
    };
    let options = DemoOptions {
        nodes: cli.nodes,
        zones: cli.zones,
        target: cli.node,
        fault: cli.fault,
        baseline: cli.baseline,
        max_wait: cli.max_wait,
        keep: cli.keep,
        bin_dir,
        aggregator_config: cli.aggregator_config,
        scenarios,
        runs: cli.runs.max(1),
    };
    let matrix = !options.scenarios.is_empty();
    match run(&options).await {
        Ok(result) if matrix => {
            // The bench reads the `scenario_result=` lines; a missed scenario is a finding it
            // reports, not a failure of this program.
            println!("\nresults: {} scenario run(s)", result.scenarios.len());
            print_baseline(&result);
            ExitCode::SUCCESS
        }
        Ok(result) => {
            let secs = |d: Option<Duration>| d.map_or_else(|| "none".to_owned(), |d| format!("{:.1}", d.as_secs_f64()));
            println!("\nresults");
            println!("fault_to_condition_seconds={}", secs(result.fault_to_condition));
            println!("fault_to_taint_seconds={}", secs(result.fault_to_taint));
            println!("recovery_seconds={}", secs(result.recovery));
            print_baseline(&result);
            if result.fault_to_condition.is_some() && result.fault_to_taint.is_some() && result.recovery.is_some() {
                ExitCode::SUCCESS
            } else {
                eprintln!("graywatch-demo: the pipeline did not react in time (see the logs printed above)");
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("graywatch-demo: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The clean run before the fault: false alarms and their rate per node-hour.
fn print_baseline(result: &graywatch_demo::DemoResult) {
    let alarms = result.baseline_alarms.len();
    println!("baseline_false_alarms={alarms}");
    println!("baseline_node_hours={:.3}", result.baseline_node_hours);
    if result.baseline_node_hours > 0.0 {
        println!(
            "false_alarms_per_node_hour={:.2}",
            alarms as f64 / result.baseline_node_hours
        );
    }
}
