//! `cargo xtask bench <name>`: benchmarks against the budgets in DESIGN.md.
//!
//! Every benchmark measures its baseline in the same invocation, alternating configurations
//! round by round so that drift (other work on the machine) hits all of them alike, prints a
//! table of measured figures and ratios, and writes everything it measured to
//! `target/bench/<name>.json`. No figure is invented: a peer tool that cannot run on this kernel
//! is reported as unavailable, with the reason.

mod detect;
mod ebpf;
mod fleet;
mod kernel;
mod load;
mod observer;
mod overhead;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::util::{is_root, run_cmd, succeeds, workspace_root};

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub bench: Which,
}

#[derive(clap::Subcommand)]
pub enum Which {
    /// Per-program kernel cost (`bpf_stats` `run_time_ns` / `run_cnt`) of graywatch's programs and of a
    /// peer observer (bpftrace, libbpf-tools) under one fixed TCP load, with nothing attached as the floor.
    Ebpf(ebpf::EbpfArgs),
    /// TCP request/response rate with no agent, graywatch-agent and the peer observer (ratios from
    /// alternating runs), and the agent's CPU and peak RSS at 10k / 50k / 100k TCP events per second.
    Overhead(overhead::OverheadArgs),
    /// The aggregator under N simulated agents (gRPC streams at 1 Hz) against a private apiserver:
    /// ingest rate, send → Ack latency, CPU, RSS and apiserver writes per minute.
    Fleet(fleet::FleetArgs),
    /// Time from fault injection to condition False and to taint on the demo topology, repeated.
    Detect(detect::DetectArgs),
}

/// Options every benchmark takes.
#[derive(clap::Args, Clone, Debug)]
pub struct CommonArgs {
    /// A short run (smoke check, about a minute): fewer rounds, smaller loads. Figures are noisy.
    #[arg(long)]
    pub quick: bool,
    /// Use the release binaries already in target/release instead of building them.
    #[arg(long)]
    pub no_build: bool,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmarks load eBPF programs, enable bpf_stats and create network namespaces: run as root");
    }
    match &args.bench {
        Which::Ebpf(args) => ebpf::run(args),
        Which::Overhead(args) => overhead::run(args),
        Which::Fleet(args) => fleet::run(args),
        Which::Detect(args) => detect::run(args),
    }
}

/// The release binaries a benchmark runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub agent: PathBuf,
    pub traffic: PathBuf,
    /// graywatch-chaos, whose link emulator adds delay to a path.
    pub chaos: PathBuf,
}

/// Builds graywatch-agent (with its kernel programs) and graywatch-traffic in release mode.
pub fn binaries(common: &CommonArgs) -> anyhow::Result<Binaries> {
    let root = workspace_root();
    if !common.no_build {
        run_cmd(
            Command::new("cargo")
                .current_dir(&root)
                .args([
                    "build",
                    "--release",
                    "-p",
                    "graywatch-agent",
                    "-p",
                    "graywatch-testbench",
                    "--bins",
                ])
                .env("GRAYWATCH_REQUIRE_EBPF", "1"),
        )?;
    }
    // Run private copies, so that a rebuild in the shared target dir cannot swap them mid-run.
    let release = target_dir().join("release");
    let bin = output_dir()?.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    let copy = |name: &str| -> anyhow::Result<PathBuf> {
        let from = release.join(name);
        if !from.is_file() {
            bail!(
                "{} is missing: build it with `cargo build --release -p graywatch-agent -p graywatch-testbench`",
                from.display()
            );
        }
        let to = bin.join(name);
        std::fs::copy(&from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        Ok(to)
    };
    Ok(Binaries {
        agent: copy("graywatch-agent")?,
        traffic: copy("graywatch-traffic")?,
        chaos: copy("graywatch-chaos")?,
    })
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// `target/bench/`, created on first use; logs of the processes a benchmark starts go to `logs/`.
pub fn output_dir() -> anyhow::Result<PathBuf> {
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(dir.join("logs")).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Writes a benchmark's result document to `target/bench/<name>.json`.
/// A `--quick` run writes `<name>-quick.json`, so a smoke check never replaces full figures.
pub fn write_result(name: &str, quick: bool, mut result: Value) -> anyhow::Result<PathBuf> {
    if let Value::Object(map) = &mut result {
        map.insert("benchmark".into(), json!(name));
        map.insert("quick".into(), json!(quick));
        map.insert("machine".into(), machine());
        map.insert("finished_unix".into(), json!(unix_now()));
    }
    let file = if quick {
        format!("{name}-quick.json")
    } else {
        format!("{name}.json")
    };
    let path = output_dir()?.join(file);
    let text = serde_json::to_string_pretty(&result)?;
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    println!("\nresult: {}", path.display());
    Ok(path)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What the figures were measured on.
pub fn machine() -> Value {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let loadavg = loadavg();
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "cpu_model": cpu_model,
        "kernel": kernel,
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "loadavg_at_end": loadavg,
    })
}

/// `/proc/loadavg` as the kernel prints it (the machine's business during a measurement).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Installs Debian packages whose binary is missing (peer observers); failures are reported by the
/// caller as "unavailable", not fatal.
pub fn ensure_tool(binary: &str, package: &str) -> Result<PathBuf, String> {
    if let Some(path) = which(binary) {
        return Ok(path);
    }
    eprintln!("+ apt-get install -y {package}  (for {binary})");
    let installed = succeeds(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", package])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    );
    match which(binary) {
        Some(path) => Ok(path),
        None if installed => Err(format!("Debian package {package} installed but has no `{binary}`")),
        None => Err(format!(
            "`apt-get install {package}` failed (is the package index reachable?)"
        )),
    }
}

pub fn which(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].iter().map(PathBuf::from))
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
}

/// Median of a non-empty slice (mean of the middle two for even lengths); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        f64::midpoint(v[mid - 1], v[mid])
    }
}

pub fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold((f64::NAN, f64::NAN), |(lo, hi), x| (lo.min(x), hi.max(x)))
}

/// A distribution-free confidence interval of the median of `values`: the order statistics
/// (x₍ₖ₎, x₍ₙ₊₁₋ₖ₎) with the largest k whose coverage, 1 − 2·P(Binomial(n, ½) < k), is still at
/// least `level`. Returns (low, high, coverage), or None when even (min, max) covers less than
/// `level` (n < 6 at 95 %).
pub fn median_ci(values: &[f64], level: f64) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let all = 0.5f64.powi(i32::try_from(n).ok()?);
    // P(Binomial(n, ½) < k), accumulated term by term: C(n, i) / 2ⁿ.
    let (mut below, mut term) = (0.0, all);
    let mut chosen = None;
    for k in 1..=n / 2 {
        below += term;
        term *= (n - (k - 1)) as f64 / k as f64;
        let coverage = 1.0 - 2.0 * below;
        if coverage < level {
            break;
        }
        chosen = Some((v[k - 1], v[n - k], coverage));
    }
    chosen
}

/// A plain text table: a header row and rows of cells, columns padded to their widest cell.
pub fn print_table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.len());
            }
        }
    }
    println!("\n{title}");
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect();
        println!("  {}", parts.join("  "));
    };
    line(header.to_vec());
    println!(
        "  {}",
        widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  ")
    );
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Formats a figure for a table; "—" for what was not measured.
pub fn fmt(value: f64, decimals: usize) -> String {
    if value.is_finite() {
        format!("{value:.decimals$}")
    } else {
        "—".to_owned()
    }
}

/// Last lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A goal's verdict as printed.
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// JSON has no NaN: unmeasured figures are null.
pub fn finite(value: f64) -> Value {
    if value.is_finite() { json!(value) } else { Value::Null }
}

#[cfg(test)]
mod tests {
    use super::median_ci;

    #[test]
    fn median_ci_uses_the_widest_order_statistics_the_level_needs() {
        let values: Vec<f64> = (1..=10).map(f64::from).collect();
        // n = 10: (x₂, x₉) covers 1 − 2·11/1024 ≈ 0.979; (x₃, x₈) only 0.891.
        let (lo, hi, coverage) = median_ci(&values, 0.95).expect("n = 10 is enough");
        assert_eq!((lo, hi), (2.0, 9.0));
        assert!((coverage - (1.0 - 22.0 / 1024.0)).abs() < 1e-12);
        // n = 6: only (min, max), 1 − 2/64.
        assert_eq!(median_ci(&values[..6], 0.95).map(|(l, h, _)| (l, h)), Some((1.0, 6.0)));
        // n = 5: even (min, max) covers only 0.9375.
        assert_eq!(median_ci(&values[..5], 0.95), None);
        assert_eq!(median_ci(&[], 0.95), None);
    }
}
