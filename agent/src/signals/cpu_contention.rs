//! CPU contention: reads the kernel's cumulative run-queue latency per cgroup (`RUNQ`) each
//! window and turns it into per-window counts and percentiles ([`RunqWindow`]).
//!
//! Also resolves what the scheduler and memory programs need before load: task/cgroup member
//! offsets from BTF, where the kernel keeps each task's run-queue accounting
//! ([`run_queue_offsets`]), and which cgroup hierarchy to attribute to ([`task_offsets`]).

use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use graywatch_common::{CGROUP_V2, RTT_BUCKETS, RunqStats, TaskOffsets, rtt_bucket_bounds};

use crate::{
    kernel_layout::{KernelLayout, LayoutError},
    summary::RunqWindow,
};

/// Name of the map this module reads.
pub const RUNQ_MAP: &str = "RUNQ";

#[derive(Debug, thiserror::Error)]
pub enum ProcCgroupsError {
    #[error("{file}:{line}: {reason}")]
    Malformed { file: String, line: usize, reason: String },
}

/// Controller names of `/proc/cgroups` in subsystem-id order (the kernel prints them by
/// `enum cgroup_subsys_id`), so a controller's position is the index into `css_set.subsys`.
pub fn parse_proc_cgroups(text: &str, file: &str) -> Result<Vec<String>, ProcCgroupsError> {
    let mut names = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        if fields.len() != 4 || fields[1..].iter().any(|f| f.parse::<u64>().is_err()) {
            return Err(ProcCgroupsError::Malformed {
                file: file.to_owned(),
                line: index + 1,
                reason: format!("expected `name hierarchy num_cgroups enabled`, got {line:?}"),
            });
        }
        names.push(fields[0].to_owned());
    }
    Ok(names)
}

/// Which hierarchy the programs attribute CPU and memory to: the v2 one when it exists (pure or
/// hybrid, matching the network programs and the PSI files), else the v1 cpu / memory
/// controllers' own hierarchies found by their index in `/proc/cgroups`.
pub fn choose_hierarchies(has_v2: bool, proc_cgroups: &[String]) -> (u32, u32) {
    if has_v2 {
        return (CGROUP_V2, CGROUP_V2);
    }
    let index = |name: &str| {
        proc_cgroups
            .iter()
            .position(|n| n == name)
            .and_then(|i| u32::try_from(i).ok())
    };
    (index("cpu").unwrap_or(CGROUP_V2), index("memory").unwrap_or(CGROUP_V2))
}

/// Where the kernel keeps what the run-queue program reads: each task's enqueue time
/// (`task_struct.sched_info.last_queued`, `CONFIG_SCHED_INFO`) and the clock it was read from
/// (`task_struct.se.cfs_rq` → `cfs_rq.rq` → `rq.clock`, `CONFIG_FAIR_GROUP_SCHED`), as
/// `[task_last_queued, task_cfs_rq, cfs_rq_rq, rq_clock]`. `Err` names what this kernel lacks.
pub fn run_queue_offsets(layout: &KernelLayout) -> Result<[u32; 4], String> {
    let member = |path: &str, needs: &str| {
        layout
            .offset_of(path)
            .map_err(|e| format!("no run-queue accounting in this kernel ({needs}): {e}"))
    };
    Ok([
        member("task_struct.sched_info.last_queued", "CONFIG_SCHED_INFO")?,
        member("task_struct.se.cfs_rq", "CONFIG_FAIR_GROUP_SCHED")?,
        member("cfs_rq.rq", "CONFIG_FAIR_GROUP_SCHED")?,
        member("rq.clock", "struct rq")?,
    ])
}

/// Task and cgroup member offsets for the `TASK_OFFSETS` global (the run-queue ones zero: see
/// [`run_queue_offsets`]).
pub fn task_offsets(
    layout: &KernelLayout,
    cpu_hierarchy: u32,
    memory_hierarchy: u32,
) -> Result<TaskOffsets, LayoutError> {
    Ok(TaskOffsets {
        task_pid: layout.offset_of("task_struct.pid")?,
        task_tgid: layout.offset_of("task_struct.tgid")?,
        task_comm: layout.offset_of("task_struct.comm")?,
        task_cgroups: layout.offset_of("task_struct.cgroups")?,
        css_set_dfl_cgrp: layout.offset_of("css_set.dfl_cgrp")?,
        css_set_subsys: layout.offset_of("css_set.subsys")?,
        css_cgroup: layout.offset_of("cgroup_subsys_state.cgroup")?,
        cgroup_kn: layout.offset_of("cgroup.kn")?,
        kernfs_node_id: layout.offset_of("kernfs_node.id")?,
        task_last_queued: 0,
        task_cfs_rq: 0,
        cfs_rq_rq: 0,
        rq_clock: 0,
        cpu_hierarchy,
        memory_hierarchy,
        _pad: 0,
    })
}

/// Bucket counts of one window of a log-linear histogram (see `graywatch_common::rtt_bucket`).
pub type BucketDeltas = [u64; RTT_BUCKETS];

/// The `q` quantile (0..=1) of a histogram in µs: the midpoint of the bucket holding it, so
/// within ~6% of the true value. `None` for an empty histogram.
pub fn quantile_us(buckets: &BucketDeltas, q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    // Rank of the sample we want, 1-based: the smallest count c with c/total >= q.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "q is clamped to [0, 1], so the rank is in 0..=total"
    )]
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (index, count) in buckets.iter().enumerate() {
        seen += count;
        if seen >= rank {
            let (low, width) = rtt_bucket_bounds(index);
            return Some(if width == 1 {
                low as f64
            } else {
                low as f64 + width as f64 / 2.0
            });
        }
    }
    None
}

/// Per-bucket difference of two cumulative histograms (a bucket going backwards counts 0).
pub fn bucket_deltas(prev: Option<&[u32; RTT_BUCKETS]>, now: &[u32; RTT_BUCKETS]) -> BucketDeltas {
    let mut out = [0u64; RTT_BUCKETS];
    for (i, slot) in out.iter_mut().enumerate() {
        let before = prev.map_or(0, |p| p[i]);
        *slot = u64::from(now[i].wrapping_sub(before));
    }
    out
}

/// Window of one cgroup from two cumulative readings; `None` when nothing was scheduled.
pub fn runq_window(cgroup_id: u64, prev: Option<&RunqStats>, now: &RunqStats) -> Option<RunqWindow> {
    // The kernel keeps no sample counter: the histogram's deltas add up to it.
    let buckets = bucket_deltas(prev.map(|p| &p.buckets), &now.buckets);
    let samples: u64 = buckets.iter().sum();
    if samples == 0 {
        return None;
    }
    let sum_us = now.sum_us.wrapping_sub(prev.map_or(0, |p| p.sum_us));
    Some(RunqWindow {
        cgroup_id,
        samples,
        mean_us: sum_us as f64 / samples as f64,
        p50_us: quantile_us(&buckets, 0.50)?,
        p99_us: quantile_us(&buckets, 0.99)?,
        total_wait_ms: sum_us as f64 / 1_000.0,
    })
}

/// Reads `RUNQ` once per window. Blocking (map syscalls): call from `spawn_blocking`.
pub struct RunqReader {
    map: BpfHashMap<MapData, u64, RunqStats>,
    last: HashMap<u64, RunqStats>,
    /// Set by the first (baseline) call; the map counts from zero at load, so a cgroup first
    /// seen later is compared against zero.
    primed: bool,
    /// Consecutive windows without a new sample, per cgroup.
    idle: HashMap<u64, u32>,
}

/// Windows a cgroup may stay without samples before its entry leaves the kernel map.
const IDLE_WINDOWS_BEFORE_EVICTION: u32 = 120;

impl std::fmt::Debug for RunqReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunqReader")
            .field("cgroups", &self.last.len())
            .finish_non_exhaustive()
    }
}

impl RunqReader {
    pub fn new(map: BpfHashMap<MapData, u64, RunqStats>) -> Self {
        Self {
            map,
            last: HashMap::new(),
            primed: false,
            idle: HashMap::new(),
        }
    }

    /// Windows of every cgroup that had tasks switched in since the previous call. The first
    /// call only sets the baseline for cgroups already in the map.
    pub fn collect(&mut self) -> Result<Vec<RunqWindow>, MapError> {
        let first = !self.primed;
        self.primed = true;
        let mut now = HashMap::with_capacity(self.last.len());
        for entry in &self.map {
            let (id, stats) = entry?;
            now.insert(id, stats);
        }
        let mut out: Vec<RunqWindow> = if first {
            Vec::new()
        } else {
            now.iter()
                .filter_map(|(id, stats)| runq_window(*id, self.last.get(id), stats))
                .collect()
        };
        out.sort_by_key(|w| w.cgroup_id);
        // Cgroups idle for long (typically deleted pods) leave the bounded kernel map; if one
        // comes back its counters restart from zero and are compared against zero.
        for (id, stats) in &now {
            let unchanged = self.last.get(id).is_some_and(|p| p.buckets == stats.buckets);
            let idle = self.idle.entry(*id).or_insert(0);
            *idle = if unchanged { *idle + 1 } else { 0 };
        }
        let expired: Vec<u64> = self
            .idle
            .iter()
            .filter(|(_, n)| **n >= IDLE_WINDOWS_BEFORE_EVICTION)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let _ = self.map.remove(&id);
            now.remove(&id);
            self.idle.remove(&id);
        }
        self.idle.retain(|id, _| now.contains_key(id));
        self.last = now;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use graywatch_common::rtt_bucket;

    use super::*;

    /// The run-queue program's chain from a task to its run queue's clock resolves here: four
    /// distinct members, the pointers 8-byte aligned.
    #[test]
    fn run_queue_offsets_resolve_on_this_kernel() {
        let layout =
            KernelLayout::from_file(std::path::Path::new("/sys/kernel/btf/vmlinux")).expect("parse vmlinux BTF");
        let [last_queued, cfs_rq, rq, clock] = run_queue_offsets(&layout).expect("run-queue offsets resolve");
        assert!(last_queued > 0 && cfs_rq > 0 && last_queued != cfs_rq);
        for offset in [last_queued, cfs_rq, rq, clock] {
            assert_eq!(offset % 8, 0, "{offset}");
        }
    }

    fn stats(samples_us: &[u32]) -> RunqStats {
        let mut s = RunqStats::ZERO;
        for us in samples_us {
            s.sum_us += u64::from(*us);
            s.buckets[rtt_bucket(*us)] += 1;
        }
        s
    }

    #[test]
    fn quantiles_are_within_a_bucket() {
        let mut values: Vec<u32> = (1..=1000).collect();
        values.push(100_000);
        let w = runq_window(7, None, &stats(&values)).expect("window");
        assert_eq!(w.samples, 1001);
        assert!((w.p50_us - 500.0).abs() / 500.0 < 0.07, "{}", w.p50_us);
        assert!((w.p99_us - 991.0).abs() / 991.0 < 0.07, "{}", w.p99_us);
    }

    #[test]
    fn window_is_the_difference_of_two_readings() {
        let before = stats(&[10; 100]);
        let mut after_values = vec![10u32; 100];
        after_values.extend([80_000u32; 10]);
        let after = stats(&after_values);
        let w = runq_window(1, Some(&before), &after).expect("window");
        assert_eq!(w.samples, 10);
        assert!((w.p50_us - 80_000.0).abs() / 80_000.0 < 0.07);
        assert!(
            runq_window(1, Some(&after), &after).is_none(),
            "no samples: no invented zero"
        );
    }

    #[test]
    fn empty_histogram_has_no_quantile() {
        assert_eq!(quantile_us(&[0; RTT_BUCKETS], 0.5), None);
    }

    #[test]
    fn proc_cgroups_gives_subsystem_indices() {
        let text = include_str!("../../tests/fixtures/proc/cgroups");
        let names = parse_proc_cgroups(text, "/proc/cgroups").expect("fixture parses");
        assert_eq!(names.iter().position(|n| n == "cpu"), Some(1));
        assert_eq!(choose_hierarchies(false, &names), (1, 4));
        assert_eq!(choose_hierarchies(true, &names), (CGROUP_V2, CGROUP_V2));
        match parse_proc_cgroups("#h\ncpu 1 x 1\n", "f") {
            Err(ProcCgroupsError::Malformed { line, .. }) => assert_eq!(line, 2),
            other => panic!("{other:?}"),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]
        #[test]
        fn quantiles_are_monotonic(values in proptest::collection::vec(0u32..10_000_000, 1..200)) {
            let s = stats(&values);
            let w = runq_window(1, None, &s).expect("non-empty");
            proptest::prop_assert!(w.p50_us <= w.p99_us);
            let max = f64::from(*values.iter().max().unwrap_or(&0));
            proptest::prop_assert!(w.p99_us <= max * 1.07 + 1.0);
        }

        #[test]
        fn proc_cgroups_never_panics(text in "\\PC{0,200}") {
            let _ = parse_proc_cgroups(&text, "fuzz");
        }
    }
}
