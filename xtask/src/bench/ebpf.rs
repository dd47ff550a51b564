//! `cargo xtask bench ebpf`: the kernel's own cost accounting (`bpf_stats`: `run_time_ns` / `run_cnt`)
//! of every program graywatch attaches, side by side with a peer observer on the same hooks, under
//! one fixed TCP load (request/response, then bulk) on the veth bench; the same load with nothing
//! attached is the floor. Configurations alternate round by round.

use std::{collections::BTreeMap, time::Duration};

use serde_json::{Value, json};

use super::{
    Binaries, CommonArgs, binaries, finite, fmt,
    kernel::{BpfStats, Counters, hook_label},
    load::{ClientResult, Rr, TrafficBed, total},
    median, median_ci, min_max,
    observer::{Kind, Observer, peer_unavailable},
    print_table, verdict, write_result,
};

#[derive(clap::Args)]
pub struct EbpfArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Rounds; each runs the load once per configuration (none, graywatch, peer), order rotating.
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Request/response transactions per run (64-byte request, 64-byte response, one connection).
    #[arg(long)]
    pub rr_count: Option<u64>,
    /// Bytes of the bulk transfer per run.
    #[arg(long)]
    pub bulk_bytes: Option<u64>,
    /// Delay (µs) the link emulator adds to the second request/response path, a stand-in for a
    /// real network's RTT; 0 leaves that path out.
    #[arg(long, default_value_t = 50)]
    pub link_delay_us: u64,
    /// Request/response transactions per run over the delayed path.
    #[arg(long)]
    pub delayed_rr_count: Option<u64>,
    /// UDP datagrams per run to a port where nothing listens: kernel drops, so `kfree_skb` runs
    /// often enough for a per-event cost (a TCP load drops almost nothing); 0 leaves it out.
    #[arg(long)]
    pub drop_count: Option<u64>,
    /// The CPU the load's server and clients are pinned to (default: the last one; the link
    /// emulator stays unpinned).
    #[arg(long)]
    pub load_cpu: Option<usize>,
}

/// One program's share of one run.
#[derive(Debug, Clone)]
struct ProgramRun {
    hook: String,
    program: String,
    events: u64,
    run_time_ns: u64,
}

struct Run {
    round: usize,
    kind: Kind,
    rr: ClientResult,
    /// Request/response over the path with the emulated delay (when there is one).
    rr_delayed: Option<ClientResult>,
    bulk: ClientResult,
    programs: Vec<ProgramRun>,
}

/// The aggregate over rounds of one observer's program on one hook.
#[derive(Default)]
struct HookCost {
    program: String,
    events: u64,
    run_time_ns: u64,
}

impl HookCost {
    fn ns_per_event(&self) -> f64 {
        if self.events > 0 {
            self.run_time_ns as f64 / self.events as f64
        } else {
            f64::NAN
        }
    }
}

/// The hooks on which the budget "< 100 ns/event" applies: every packet or every context switch.
const HOT_HOOKS: &[&str] = &["tcp_probe", "kfree_skb", "sched_wakeup", "sched_switch"];
const BUDGET_NS: f64 = 100.0;
/// Fewer events than this on either side and a hook's per-event cost is first-touch noise (a
/// retransmission or two per run): shown, not judged.
const MIN_EVENTS_TO_JUDGE: u64 = 1_000;
/// Table order: network hooks, scheduler hooks, then the rest by name.
const HOOK_ORDER: &[&str] = &[
    "tcp_probe",
    "tcp_retransmit_skb",
    "kfree_skb",
    "inet_sock_set_state",
    "sched_wakeup",
    "sched_wakeup_new",
    "sched_switch",
];

pub fn run(args: &EbpfArgs) -> anyhow::Result<()> {
    let quick = args.common.quick;
    // Ten rounds: from nine on, the 95 % interval of the median ratio is narrower than
    // (min, max), i.e. one outlying round does not set it (see `median_ci`).
    let rounds = args.rounds.unwrap_or(if quick { 1 } else { 10 }).max(1);
    let rr_count = args.rr_count.unwrap_or(if quick { 20_000 } else { 200_000 });
    let bulk_bytes = args
        .bulk_bytes
        .unwrap_or(if quick { 500_000_000 } else { 2_000_000_000 });
    let drop_count = args.drop_count.unwrap_or(if quick { 50_000 } else { 200_000 });
    let binaries = binaries(&args.common)?;
    let _stats = BpfStats::enable()?;
    let not_runnable = peer_unavailable();
    let bed = TrafficBed::new(
        &binaries,
        Some(
            args.load_cpu
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(0, |n| n.get() - 1)),
        ),
    )?;
    let load = Rr {
        count: Some(rr_count),
        duration: None,
        rate: None,
        request: 64,
        response: 64,
    };
    let delay = Duration::from_micros(args.link_delay_us);
    // The delayed path lives as long as `_delayed_path` (its emulator is stopped on drop).
    let (_delayed_path, delayed) = if delay.is_zero() {
        (None, None)
    } else {
        let rr = Rr {
            count: Some(args.delayed_rr_count.unwrap_or(if quick { 5_000 } else { 30_000 })),
            ..load
        };
        (Some(bed.delayed_path(&binaries.chaos, delay)?), Some(rr))
    };
    println!(
        "ebpf: {rounds} round(s) × (none, graywatch, peer); load per run: {rr_count} RR transactions (64 B/64 B, 1 connection) + {} MB bulk{}{}",
        bulk_bytes / 1_000_000,
        delayed.map_or(String::new(), |d| format!(
            " + {} RR transactions on a path with {} µs added by the link emulator",
            d.count.unwrap_or(0),
            args.link_delay_us
        )),
        if drop_count > 0 {
            format!(" + {drop_count} UDP datagrams to a closed port (dropped by the kernel)")
        } else {
            String::new()
        }
    );
    // Warm-up, unobserved: first connections, page cache, CPU frequency.
    bed.rr(
        1,
        &Rr {
            count: Some(rr_count / 10),
            ..load
        },
    )?;
    if let Some(delayed) = &delayed {
        bed.rr_delayed(
            1,
            &Rr {
                count: delayed.count.map(|c| c / 10),
                ..*delayed
            },
        )?;
    }

    let mut runs = Vec::new();
    let mut unavailable = not_runnable.clone();
    for round in 0..rounds {
        for offset in 0..Kind::ALL.len() {
            let kind = Kind::ALL[(round + offset) % Kind::ALL.len()];
            let loads = Loads {
                rr: &load,
                rr_delayed: delayed.as_ref(),
                bulk_bytes,
                drop_count,
            };
            let run = one_run(&binaries, &bed, kind, round, &loads, &mut unavailable)?;
            println!(
                "  round {round} {:<9}  RR {:>8.0} tx/s  delayed RR {:>8.0} tx/s  bulk {:>6.2} Gbit/s  programs {}",
                kind.label(),
                run.rr.transactions_per_second(),
                run.rr_delayed.map_or(f64::NAN, |r| r.transactions_per_second()),
                run.bulk.gbit_per_second(),
                run.programs.len()
            );
            runs.push(run);
        }
    }
    unavailable.sort();
    unavailable.dedup();
    let config = json!({"rounds": rounds, "rr_transactions": rr_count, "rr_request_bytes": 64, "rr_response_bytes": 64, "bulk_bytes": bulk_bytes, "dropped_datagrams": drop_count,
        "link_delay_us": args.link_delay_us, "delayed_rr_transactions": delayed.and_then(|d| d.count),
        "peer": {"bpftrace": super::observer::BPFTRACE_SCRIPT, "runqlat": "libbpf-tools runqlat (default: one histogram)"}});
    report(&runs, &unavailable, rounds, args.link_delay_us, &config, quick)
}

/// The load of one run.
struct Loads<'a> {
    rr: &'a Rr,
    rr_delayed: Option<&'a Rr>,
    bulk_bytes: u64,
    drop_count: u64,
}

fn one_run(
    binaries: &Binaries,
    bed: &TrafficBed,
    kind: Kind,
    round: usize,
    loads: &Loads<'_>,
    unavailable: &mut Vec<(String, String)>,
) -> anyhow::Result<Run> {
    let observer = Observer::start(kind, binaries)?;
    unavailable.extend(observer.unavailable.iter().cloned());
    let before = observer.counters()?;
    let rr = total(&bed.rr(1, loads.rr)?);
    let rr_delayed = match loads.rr_delayed {
        Some(load) => Some(total(&bed.rr_delayed(1, load)?)),
        None => None,
    };
    let bulk = bed.bulk(loads.bulk_bytes)?;
    if loads.drop_count > 0 {
        bed.unreachable(loads.drop_count)?;
    }
    let after = observer.counters()?;
    observer.stop()?;
    let programs = after
        .iter()
        .map(|((hook, id), (program, now))| {
            let then = before
                .get(&(hook.clone(), *id))
                .map_or(Counters::default(), |(_, c)| *c);
            ProgramRun {
                hook: hook.clone(),
                program: program.clone(),
                events: now.run_cnt.saturating_sub(then.run_cnt),
                run_time_ns: now.run_time_ns.saturating_sub(then.run_time_ns),
            }
        })
        .collect();
    Ok(Run {
        round,
        kind,
        rr,
        rr_delayed,
        bulk,
        programs,
    })
}

#[expect(clippy::too_many_lines, reason = "prints one table, one block per row")]
fn report(
    runs: &[Run],
    unavailable: &[(String, String)],
    rounds: usize,
    link_delay_us: u64,
    config: &Value,
    quick: bool,
) -> anyhow::Result<()> {
    // Per observer and hook, summed over rounds.
    let mut costs: BTreeMap<(Kind, String), HookCost> = BTreeMap::new();
    for run in runs {
        for p in &run.programs {
            let cost = costs.entry((run.kind, p.hook.clone())).or_default();
            cost.program.clone_from(&p.program);
            cost.events += p.events;
            cost.run_time_ns += p.run_time_ns;
        }
    }
    let mut hooks: Vec<String> = costs.keys().map(|(_, h)| h.clone()).collect();
    hooks.sort_by_key(|h| {
        (
            HOOK_ORDER.iter().position(|o| o == h).unwrap_or(HOOK_ORDER.len()),
            h.clone(),
        )
    });
    hooks.dedup();

    let mut rows = Vec::new();
    let mut hook_json = Vec::new();
    let mut budget_met = true;
    let mut peer_met = true;
    let mut not_judged = Vec::new();
    for hook in &hooks {
        let gw = costs.get(&(Kind::Graywatch, hook.clone()));
        let peer = costs.get(&(Kind::Peer, hook.clone()));
        let gw_ns = gw.map_or(f64::NAN, HookCost::ns_per_event);
        let peer_ns = peer.map_or(f64::NAN, HookCost::ns_per_event);
        let ratio = gw_ns / peer_ns;
        let hot = HOT_HOOKS.contains(&hook.as_str());
        let judged = |cost: Option<&HookCost>| cost.is_some_and(|c| c.events >= MIN_EVENTS_TO_JUDGE);
        if gw.is_some() && !(judged(gw) && (peer.is_none() || judged(peer))) {
            not_judged.push(hook_label(hook));
        } else {
            if hot && gw_ns.is_finite() && gw_ns >= BUDGET_NS {
                budget_met = false;
            }
            if ratio.is_finite() && ratio > 1.0 {
                peer_met = false;
            }
        }
        rows.push(vec![
            format!("{}{}", hook_label(hook), if hot { " *" } else { "" }),
            gw.map_or("—".into(), |c| c.program.clone()),
            gw.map_or("—".into(), |c| c.events.to_string()),
            fmt(gw_ns, 1),
            peer.map_or("—".into(), |c| c.program.clone()),
            peer.map_or("—".into(), |c| c.events.to_string()),
            fmt(peer_ns, 1),
            fmt(ratio, 2),
        ]);
        hook_json.push(json!({
            "hook": hook_label(hook),
            "hot": hot,
            "graywatch": gw.map(|c| json!({"program": c.program, "events": c.events, "run_time_ns": c.run_time_ns, "ns_per_event": finite(c.ns_per_event())})),
            "peer": peer.map(|c| json!({"program": c.program, "events": c.events, "run_time_ns": c.run_time_ns, "ns_per_event": finite(c.ns_per_event())})),
            "graywatch_over_peer": finite(ratio),
        }));
    }
    print_table(
        &format!(
            "Kernel cost per event (bpf_stats, summed over {rounds} round(s); * = hot hook, budget < {BUDGET_NS} ns)"
        ),
        &[
            "hook",
            "graywatch program",
            "events",
            "ns/event",
            "peer program",
            "events",
            "ns/event",
            "gw/peer",
        ],
        &rows,
    );

    // The load itself under each observer, as ratios to the floor of the same round.
    let mut load_rows = Vec::new();
    let mut load_json = Vec::new();
    for kind in Kind::ALL {
        let mine = || runs.iter().filter(move |r| r.kind == kind);
        let of = |f: &dyn Fn(&Run) -> Option<f64>| -> Vec<f64> { mine().filter_map(f).collect() };
        let ratio_of = |f: &dyn Fn(&Run) -> Option<f64>| -> Vec<f64> {
            mine()
                .filter_map(|r| {
                    let floor = runs.iter().find(|b| b.kind == Kind::None && b.round == r.round)?;
                    Some(f(r)? / f(floor)?)
                })
                .collect()
        };
        let rr = |r: &Run| Some(r.rr.transactions_per_second());
        let rr_delayed = |r: &Run| r.rr_delayed.map(|d| d.transactions_per_second());
        let bulk_of = |r: &Run| Some(r.bulk.gbit_per_second());
        let rr_tps = of(&rr);
        let rr_delayed_tps = of(&rr_delayed);
        let bulk = of(&bulk_of);
        let rr_ratio = ratio_of(&rr);
        let rr_delayed_ratio = ratio_of(&rr_delayed);
        let bulk_ratio = ratio_of(&bulk_of);
        let program_ms: Vec<f64> = mine()
            .map(|r| r.programs.iter().map(|p| p.run_time_ns).sum::<u64>() as f64 / 1e6)
            .collect();
        let mut row = vec![kind.label().to_owned(), fmt(median(&rr_tps), 0), ratio_cell(&rr_ratio)];
        if link_delay_us > 0 {
            row.extend([fmt(median(&rr_delayed_tps), 0), ratio_cell(&rr_delayed_ratio)]);
        }
        row.extend([
            fmt(median(&bulk), 2),
            fmt(median(&bulk_ratio), 3),
            fmt(median(&program_ms), 1),
        ]);
        load_rows.push(row);
        load_json.push(json!({
            "observer": kind.label(),
            "rr_tps": rr_tps,
            "rr_ratio_to_none": rr_ratio,
            "rr_ratio_median_ci95": ci_json(&rr_ratio),
            "rr_delayed_tps": rr_delayed_tps,
            "rr_delayed_ratio_to_none": rr_delayed_ratio,
            "rr_delayed_ratio_median_ci95": ci_json(&rr_delayed_ratio),
            "bulk_gbit_s": bulk,
            "bulk_ratio_to_none": bulk_ratio,
            "program_time_ms_per_run": program_ms,
        }));
    }
    let delayed_label = format!("RR +{link_delay_us} µs tx/s");
    let mut header = vec!["observer", "RR tx/s", "×none (median, 95% CI, [min–max])"];
    if link_delay_us > 0 {
        header.extend([delayed_label.as_str(), "×none (median, 95% CI, [min–max])"]);
    }
    header.extend(["bulk Gbit/s", "×none", "program ms/run"]);
    print_table(
        "The fixed load under each observer (medians over rounds; ratio to `none` of the same round; \
         CI: order statistics of the per-round ratios, distribution-free)",
        &header,
        &load_rows,
    );
    if !unavailable.is_empty() {
        println!("\nPeer tools that do not run on this kernel (not part of the peer column):");
        for (tool, why) in unavailable {
            println!("  - {tool}: {why}");
        }
    }
    println!(
        "\nGoals: < {BUDGET_NS} ns/event on hot hooks: {}; ≤ peer's cost on the same hooks: {}",
        verdict(budget_met),
        verdict(peer_met)
    );
    if !not_judged.is_empty() {
        println!(
            "  not judged (under {MIN_EVENTS_TO_JUDGE} events on a side, so first-touch noise): {}",
            not_judged.join(", ")
        );
    }
    let runs_json: Vec<Value> = runs
        .iter()
        .map(|r| {
            json!({
                "round": r.round,
                "observer": r.kind.label(),
                "rr": {"transactions": r.rr.transactions, "seconds": r.rr.elapsed_seconds, "tps": finite(r.rr.transactions_per_second())},
                "rr_delayed": r.rr_delayed.map(|d| json!({"transactions": d.transactions, "seconds": d.elapsed_seconds, "tps": finite(d.transactions_per_second())})),
                "bulk": {"bytes": r.bulk.bytes, "seconds": r.bulk.elapsed_seconds, "gbit_s": finite(r.bulk.gbit_per_second())},
                "programs": r.programs.iter().map(|p| json!({"hook": hook_label(&p.hook), "program": p.program, "events": p.events, "run_time_ns": p.run_time_ns})).collect::<Vec<_>>(),
            })
        })
        .collect();
    write_result(
        "ebpf",
        quick,
        json!({
            "config": config,
            "hooks": hook_json,
            "load": load_json,
            "peer_unavailable": unavailable.iter().map(|(t, w)| json!({"tool": t, "why": w})).collect::<Vec<_>>(),
            "goals": {"hot_hooks_under_100ns": budget_met, "not_above_peer": peer_met, "not_judged": not_judged},
            "runs": runs_json,
        }),
    )?;
    Ok(())
}

/// The 95 % confidence level of the intervals of median ratios.
const CI_LEVEL: f64 = 0.95;

/// "median [CI low–high] (min–max)" of per-round ratios; the CI is left out when there are too
/// few rounds for one.
fn ratio_cell(ratios: &[f64]) -> String {
    let (lo, hi) = min_max(ratios);
    match median_ci(ratios, CI_LEVEL) {
        Some((ci_lo, ci_hi, _)) => format!(
            "{} CI {}–{} [{}–{}]",
            fmt(median(ratios), 3),
            fmt(ci_lo, 3),
            fmt(ci_hi, 3),
            fmt(lo, 3),
            fmt(hi, 3)
        ),
        None => format!("{} [{}–{}]", fmt(median(ratios), 3), fmt(lo, 3), fmt(hi, 3)),
    }
}

fn ci_json(ratios: &[f64]) -> Value {
    median_ci(ratios, CI_LEVEL).map_or(Value::Null, |(lo, hi, coverage)| {
        json!({"low": lo, "high": hi, "coverage": coverage, "method": "order statistics (binomial), distribution-free"})
    })
}
