//! `cargo xtask bench overhead`: what watching costs the workload and the node.
//!
//! 1. TCP request/response rate (closed loop, one connection, 64 B/64 B, like netperf `TCP_RR`)
//!    with no observer, with graywatch-agent and with the peer observer, alternating within each
//!    round; each figure is a ratio to "none" of the same round.
//! 2. graywatch-agent's own CPU (utime + stime from /proc/<pid>/stat, % of one core) and RSS
//!    (`VmRSS`, peak `VmHWM`) while paced TCP load produces a target rate of TCP events (10k / 50k /
//!    100k per second, counted by the kernel's `run_cnt` of the agent's TCP programs), plus the
//!    in-kernel time of its programs (which runs on the workload's CPUs, not the agent's).
//! 3. The same agent's CPU and RSS while the node talks with 1k / 5k / 20k distinct remote
//!    addresses (a swarm of IPv6 connections, one byte each per 100 ms), against the same agent
//!    idle in the same run, and its peak RSS against the chart's memory limit.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use super::{
    Binaries, CommonArgs, binaries, finite, fmt,
    kernel::{BpfStats, Counters, is_tcp_hook},
    load::{Rr, TrafficBed, total},
    median, min_max,
    observer::{Kind, Observer, clock_ticks, cpu_ticks},
    print_table, verdict, write_result,
};

#[derive(clap::Args)]
pub struct OverheadArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Rounds of (none, graywatch, peer) request/response runs, order rotating.
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Seconds per request/response run.
    #[arg(long)]
    pub rr_seconds: Option<u64>,
    /// Target TCP events per second for the agent CPU/RSS part (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<u64>,
    /// Seconds of load per target rate.
    #[arg(long)]
    pub rate_seconds: Option<u64>,
    /// Distinct remote addresses for the agent's many-remotes part (comma-separated; 0 skips).
    #[arg(long, value_delimiter = ',')]
    pub remotes: Vec<u32>,
    /// Seconds of steady traffic per remote count, once every connection is up.
    #[arg(long)]
    pub remotes_seconds: Option<u64>,
}

/// The agent container's memory limit in the chart (deploy/helm/graywatch/values.yaml).
const CHART_AGENT_MEMORY_LIMIT_MIB: f64 = 128.0;

const CPU_BUDGET_PERCENT: f64 = 0.5;
const RSS_BUDGET_MIB: f64 = 40.0;
const RR_BUDGET_RATIO: f64 = 0.98;
/// The most transactions per second asked of one paced connection.
const MAX_TPS_PER_CONNECTION: f64 = 8_000.0;

pub fn run(args: &OverheadArgs) -> anyhow::Result<()> {
    let quick = args.common.quick;
    let rounds = args.rounds.unwrap_or(if quick { 1 } else { 6 }).max(1);
    let rr_seconds = args.rr_seconds.unwrap_or(if quick { 3 } else { 5 });
    let rate_seconds = args.rate_seconds.unwrap_or(if quick { 4 } else { 20 });
    let rates = if args.rates.is_empty() {
        vec![10_000, 50_000, 100_000]
    } else {
        args.rates.clone()
    };
    let binaries = binaries(&args.common)?;
    let _stats = BpfStats::enable()?;
    let bed = TrafficBed::new(&binaries, None)?;

    println!(
        "overhead: TCP_RR {rounds} round(s) × (none, graywatch, peer) × {rr_seconds} s; agent at {rates:?} TCP events/s × {rate_seconds} s"
    );
    let load = Rr {
        count: None,
        duration: Some(Duration::from_secs(rr_seconds)),
        rate: None,
        request: 64,
        response: 64,
    };
    bed.rr(
        1,
        &Rr {
            duration: Some(Duration::from_secs(1)),
            ..load
        },
    )?;
    let (rr_json, rr_met, unavailable) = tcp_rr(&binaries, &bed, rounds, &load)?;
    let (agent_json, agent_met) = agent_at_rates(&binaries, &bed, &rates, Duration::from_secs(rate_seconds))?;
    let remotes = match args.remotes.as_slice() {
        [] if quick => vec![1_000],
        [] => vec![1_000, 5_000, 20_000],
        [0] => Vec::new(),
        counts => counts.to_vec(),
    };
    let remotes_seconds = Duration::from_secs(args.remotes_seconds.unwrap_or(if quick { 5 } else { 20 }));
    let (remotes_json, remotes_met) = if remotes.is_empty() {
        (Value::Null, None)
    } else {
        let (json, met) = agent_with_remotes(&binaries, &bed, &remotes, remotes_seconds)?;
        (json, Some(met))
    };
    if !unavailable.is_empty() {
        println!("\nPeer tools unavailable on this kernel (peer column without them):");
        for (tool, why) in &unavailable {
            println!("  - {tool}: {why}");
        }
    }
    println!(
        "\nGoals: TCP_RR ≥ {RR_BUDGET_RATIO} × none: {}; agent < {CPU_BUDGET_PERCENT}% of a core and < {RSS_BUDGET_MIB} MiB RSS at 50k events/s: {}",
        verdict(rr_met),
        agent_met.map_or("not measured (no 50k target)", verdict)
    );
    println!(
        "Agent peak RSS within the chart's {CHART_AGENT_MEMORY_LIMIT_MIB} MiB limit at every remote count: {}",
        remotes_met.map_or("not measured (--remotes 0)", verdict)
    );
    write_result(
        "overhead",
        quick,
        json!({
            "config": {"rounds": rounds, "rr_seconds": rr_seconds, "rr_request_bytes": 64, "rr_response_bytes": 64,
                       "rates": rates, "rate_seconds": rate_seconds, "remotes": remotes,
                       "remotes_seconds": remotes_seconds.as_secs()},
            "tcp_rr": rr_json,
            "agent": agent_json,
            "agent_with_remotes": remotes_json,
            "peer_unavailable": unavailable.iter().map(|(t, w)| json!({"tool": t, "why": w})).collect::<Vec<_>>(),
            "goals": {"tcp_rr_at_least_0_98": rr_met, "agent_cpu_rss_at_50k": agent_met,
                      "agent_rss_within_chart_limit_with_remotes": remotes_met},
        }),
    )?;
    Ok(())
}

type RrOutcome = (Value, bool, Vec<(String, String)>);

fn tcp_rr(binaries: &Binaries, bed: &TrafficBed, rounds: usize, load: &Rr) -> anyhow::Result<RrOutcome> {
    let mut tps: Vec<(usize, Kind, f64)> = Vec::new();
    let mut unavailable = Vec::new();
    for round in 0..rounds {
        for offset in 0..Kind::ALL.len() {
            let kind = Kind::ALL[(round + offset) % Kind::ALL.len()];
            let observer = Observer::start(kind, binaries)?;
            unavailable.extend(observer.unavailable.iter().cloned());
            let result = total(&bed.rr(1, load)?);
            observer.stop()?;
            println!(
                "  round {round} {:<9}  {:>8.0} tx/s",
                kind.label(),
                result.transactions_per_second()
            );
            tps.push((round, kind, result.transactions_per_second()));
        }
    }
    unavailable.sort();
    unavailable.dedup();
    let floor = |round: usize| {
        tps.iter()
            .find(|(r, k, _)| *r == round && *k == Kind::None)
            .map(|(_, _, v)| *v)
    };
    let mut rows = Vec::new();
    let mut out = Vec::new();
    let mut met = true;
    for kind in Kind::ALL {
        let values: Vec<f64> = tps.iter().filter(|(_, k, _)| *k == kind).map(|(_, _, v)| *v).collect();
        let ratios: Vec<f64> = tps
            .iter()
            .filter(|(_, k, _)| *k == kind)
            .filter_map(|(r, _, v)| floor(*r).map(|f| v / f))
            .collect();
        let (lo, hi) = min_max(&ratios);
        if kind == Kind::Graywatch && median(&ratios) < RR_BUDGET_RATIO {
            met = false;
        }
        rows.push(vec![
            kind.label().to_owned(),
            fmt(median(&values), 0),
            fmt(median(&ratios), 3),
            format!("{}–{}", fmt(lo, 3), fmt(hi, 3)),
        ]);
        out.push(json!({"observer": kind.label(), "tps": values, "ratio_to_none": ratios, "median_ratio": finite(median(&ratios))}));
    }
    print_table(
        &format!("TCP_RR (1 connection, 64 B/64 B; medians over {rounds} alternating round(s))"),
        &["observer", "tx/s", "×none", "×none min–max"],
        &rows,
    );
    Ok((json!(out), met, unavailable))
}

#[expect(
    clippy::too_many_lines,
    reason = "one benchmark loop over the rates, its steps in order"
)]
fn agent_at_rates(
    binaries: &Binaries,
    bed: &TrafficBed,
    rates: &[u64],
    seconds: Duration,
) -> anyhow::Result<(Value, Option<bool>)> {
    let observer = Observer::start(Kind::Graywatch, binaries)?;
    let pid = observer.main_pid().context("agent pid")?;
    // The agent sees every TCP socket on the machine: measure the background rate first, so the
    // paced load adds only what is missing to reach each target.
    let before = observer.counters()?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let (background_events, _, _) = delta(&before, &observer.counters()?);
    let background = background_events as f64 / started.elapsed().as_secs_f64();
    // Calibrate: TCP events per transaction on this path (tcp_probe on each side per segment).
    let probe = Rr {
        count: None,
        duration: Some(Duration::from_secs(2)),
        rate: Some(4_000.0),
        request: 64,
        response: 64,
    };
    let before = observer.counters()?;
    let started = Instant::now();
    let calib = total(&bed.rr(1, &probe)?);
    let after = observer.counters()?;
    let (tcp_events, _, _) = delta(&before, &after);
    let ours = tcp_events as f64 - background * started.elapsed().as_secs_f64();
    let per_tx = (ours / calib.transactions.max(1) as f64).max(0.5);
    println!(
        "\nagent: background {background:.0} TCP events/s from other work on the machine; {per_tx:.2} TCP events per \
         transaction (calibration: {} transactions)",
        calib.transactions
    );

    // The start-up peak (BTF parsing, map creation) is reported apart from the per-rate peaks.
    let (_, startup_peak) = memory_kib(pid)?;
    println!(
        "agent: peak RSS since start (start-up included) {:.1} MiB",
        startup_peak as f64 / 1024.0
    );
    let mut rows = Vec::new();
    let mut out = Vec::new();
    let mut met = None;
    let mut targets: Vec<u64> = vec![0];
    targets.extend(rates);
    for target in targets {
        let tps = (target as f64 - background).max(0.0) / per_tx;
        let connections = (tps / MAX_TPS_PER_CONNECTION).ceil().max(1.0);
        let before = observer.counters()?;
        reset_peak_rss(pid)?;
        let cpu_before = cpu_ticks(pid);
        let sched_before = schedstat_ns(pid);
        let started = Instant::now();
        if target == 0 || tps < 1.0 {
            std::thread::sleep(seconds);
        } else {
            let load = Rr {
                count: None,
                duration: Some(seconds),
                rate: Some(tps / connections),
                request: 64,
                response: 64,
            };
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "connections is a small whole number held as f64 for the rate division"
            )]
            bed.rr(connections as usize, &load)?;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu_after = cpu_ticks(pid);
        let sched_after = schedstat_ns(pid);
        let after = observer.counters()?;
        let (tcp_events, tcp_ns, all_ns) = delta(&before, &after);
        let (rss, hwm) = memory_kib(pid)?;
        let cpu_percent = (cpu_after - cpu_before) as f64 / clock_ticks() / elapsed * 100.0;
        // Threads' on-CPU nanoseconds: finer than clock ticks (misses threads that exited).
        let sched_percent = sched_after.saturating_sub(sched_before) as f64 / 1e9 / elapsed * 100.0;
        let events_per_s = tcp_events as f64 / elapsed;
        let tcp_kernel_percent = tcp_ns as f64 / 1e9 / elapsed * 100.0;
        let all_kernel_percent = all_ns as f64 / 1e9 / elapsed * 100.0;
        let short = target > 0 && events_per_s < 0.9 * target as f64;
        if target == 50_000 {
            met = Some(!short && cpu_percent < CPU_BUDGET_PERCENT && (hwm as f64 / 1024.0) < RSS_BUDGET_MIB);
        }
        rows.push(vec![
            if target == 0 {
                "idle".to_owned()
            } else {
                format!("{}k", target / 1000)
            },
            format!("{}{}", fmt(events_per_s, 0), if short { " (short)" } else { "" }),
            fmt(cpu_percent, 3),
            fmt(sched_percent, 3),
            fmt(rss as f64 / 1024.0, 1),
            fmt(hwm as f64 / 1024.0, 1),
            fmt(tcp_kernel_percent, 2),
            fmt(all_kernel_percent, 2),
        ]);
        out.push(json!({
            "target_events_per_s": target, "measured_tcp_events_per_s": finite(events_per_s), "connections": connections,
            "seconds": elapsed, "agent_cpu_percent_of_core": finite(cpu_percent),
            "agent_cpu_percent_of_core_schedstat": finite(sched_percent), "rss_mib": rss as f64 / 1024.0,
            "peak_rss_mib": hwm as f64 / 1024.0, "tcp_programs_percent_of_core": finite(tcp_kernel_percent),
            "all_programs_percent_of_core": finite(all_kernel_percent),
        }));
    }
    observer.stop()?;
    print_table(
        "graywatch-agent at target TCP event rates (agent process only; kernel programs run on the workload's CPUs)",
        &[
            "target/s",
            "TCP events/s",
            "agent CPU % (stat)",
            "(schedstat)",
            "RSS MiB",
            "peak RSS MiB in run",
            "TCP progs % core",
            "all progs % core",
        ],
        &rows,
    );
    Ok((
        json!({"tcp_events_per_transaction": per_tx, "background_tcp_events_per_s": background, "startup_peak_rss_mib": startup_peak as f64 / 1024.0, "rates": out}),
        met,
    ))
}

/// The agent's CPU and RSS with the node talking to each of `counts` distinct remote addresses,
/// and idle first, in the same run; whether its peak stayed within the chart's memory limit.
fn agent_with_remotes(
    binaries: &Binaries,
    bed: &TrafficBed,
    counts: &[u32],
    seconds: Duration,
) -> anyhow::Result<(Value, bool)> {
    let observer = Observer::start(Kind::Graywatch, binaries)?;
    let pid = observer.main_pid().context("agent pid")?;
    let mut rows = Vec::new();
    let mut out = Vec::new();
    let mut idle: Option<(f64, f64)> = None;
    let mut within_limit = true;
    for count in std::iter::once(0).chain(counts.iter().copied()) {
        // The connections open first (a burst of handshakes); the figures are of the steady
        // state after, while every connection sends a byte each 100 ms.
        let swarm = (count > 0).then(|| bed.swarm(count, seconds)).transpose()?;
        reset_peak_rss(pid)?;
        let cpu_before = cpu_ticks(pid);
        let sched_before = schedstat_ns(pid);
        let started = Instant::now();
        match swarm {
            Some(swarm) => {
                let connected = swarm.connected;
                swarm.finish()?;
                if connected < count {
                    anyhow::bail!("only {connected} of {count} swarm connections came up");
                }
            }
            None => std::thread::sleep(seconds),
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu_percent = cpu_ticks(pid).saturating_sub(cpu_before) as f64 / clock_ticks() / elapsed * 100.0;
        let sched_percent = schedstat_ns(pid).saturating_sub(sched_before) as f64 / 1e9 / elapsed * 100.0;
        let (rss, hwm) = memory_kib(pid)?;
        let (rss_mib, peak_mib) = (rss as f64 / 1024.0, hwm as f64 / 1024.0);
        within_limit &= peak_mib < CHART_AGENT_MEMORY_LIMIT_MIB;
        let (idle_cpu, idle_peak) = *idle.get_or_insert((sched_percent, peak_mib));
        rows.push(vec![
            if count == 0 {
                "idle".to_owned()
            } else {
                count.to_string()
            },
            fmt(cpu_percent, 3),
            fmt(sched_percent, 3),
            fmt(sched_percent / idle_cpu, 2),
            fmt(rss_mib, 1),
            fmt(peak_mib, 1),
            fmt(peak_mib / idle_peak, 2),
        ]);
        out.push(json!({
            "remote_addresses": count, "seconds": elapsed, "agent_cpu_percent_of_core": finite(cpu_percent),
            "agent_cpu_percent_of_core_schedstat": finite(sched_percent),
            "cpu_ratio_to_idle_schedstat": finite(sched_percent / idle_cpu), "rss_mib": rss_mib, "peak_rss_mib": peak_mib,
            "peak_rss_ratio_to_idle": finite(peak_mib / idle_peak),
        }));
    }
    observer.stop()?;
    print_table(
        &format!(
            "graywatch-agent with many remote addresses (one byte per connection per 100 ms, {} s each; ratios to the idle agent of this run)",
            seconds.as_secs()
        ),
        &[
            "remotes",
            "agent CPU % (stat)",
            "(schedstat)",
            "× idle",
            "RSS MiB",
            "peak RSS MiB",
            "peak × idle",
        ],
        &rows,
    );
    Ok((
        json!({"runs": out, "chart_memory_limit_mib": CHART_AGENT_MEMORY_LIMIT_MIB}),
        within_limit,
    ))
}

/// (TCP-hook events, TCP-hook run time, all-program run time) between two snapshots.
fn delta(
    before: &std::collections::BTreeMap<(String, u32), (String, Counters)>,
    after: &std::collections::BTreeMap<(String, u32), (String, Counters)>,
) -> (u64, u64, u64) {
    let mut out = (0, 0, 0);
    for (key, (_, now)) in after {
        let then = before.get(key).map_or(Counters::default(), |(_, c)| *c);
        let events = now.run_cnt.saturating_sub(then.run_cnt);
        let ns = now.run_time_ns.saturating_sub(then.run_time_ns);
        if is_tcp_hook(&key.0) {
            out.0 += events;
            out.1 += ns;
        }
        out.2 += ns;
    }
    out
}

/// Sum of on-CPU nanoseconds of the process's live threads (/proc/<pid>/task/*/schedstat).
fn schedstat_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// Resets `VmHWM` to the current RSS (`echo 5 > /proc/<pid>/clear_refs`), so the next read is the
/// peak within one run.
fn reset_peak_rss(pid: u32) -> anyhow::Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").with_context(|| format!("resetting the peak RSS ({path})"))
}

/// (`VmRSS`, `VmHWM`) in KiB.
fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let get = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((get("VmRSS:"), get("VmHWM:")))
}
