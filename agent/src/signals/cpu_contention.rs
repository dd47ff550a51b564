//! CPU contention: reads the kernel's cumulative run-queue latency per cgroup (`RUNQ_SLOTS`,
//! mapped into memory, and the `RUNQ` hash for cgroups whose slot another holds) each window and
//! turns it into per-window counts and percentiles ([`RunqWindow`]).
//!
//! Also resolves what the scheduler and memory programs need before load: task/cgroup member
//! offsets from BTF, where the kernel keeps each task's run-queue accounting
//! ([`run_queue_offsets`]), and which cgroup hierarchy to attribute to ([`task_offsets`]).

use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError};
use graywatch_common::{
    CGROUP_V2, RTT_BUCKETS, RUNQ_SLOT_COUNT, RUNQ_SLOT_FREE, RUNQ_SLOT_RELEASING, RunqSlot, RunqStats, TaskOffsets,
    rtt_bucket_bounds,
};

use super::{
    IdleEviction,
    slots::{MappedSlots, SlotsError},
};
use crate::{
    kernel_layout::{KernelLayout, LayoutError},
    summary::{PlaceCounts, RunqWindow},
};

/// Names of the maps this module reads.
pub const RUNQ_MAP: &str = "RUNQ";
pub const RUNQ_SLOTS_MAP: &str = "RUNQ_SLOTS";

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
    RunqDelta::between(prev, now).window(cgroup_id)
}

/// What one cgroup added between two readings.
#[derive(Clone, Debug)]
pub struct RunqDelta {
    buckets: BucketDeltas,
    sum_us: u64,
}

impl RunqDelta {
    fn between(prev: Option<&RunqStats>, now: &RunqStats) -> Self {
        Self {
            buckets: bucket_deltas(prev.map(|p| &p.buckets), &now.buckets),
            sum_us: now.sum_us.wrapping_sub(prev.map_or(0, |p| p.sum_us)),
        }
    }

    fn add(&mut self, other: &RunqDelta) {
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *mine += theirs;
        }
        self.sum_us = self.sum_us.wrapping_add(other.sum_us);
    }

    /// `None` when nothing was scheduled.
    fn window(&self, cgroup_id: u64) -> Option<RunqWindow> {
        // The kernel keeps no sample counter: the histogram's deltas add up to it.
        let samples: u64 = self.buckets.iter().sum();
        if samples == 0 {
            return None;
        }
        Some(RunqWindow {
            cgroup_id,
            samples,
            mean_us: self.sum_us as f64 / samples as f64,
            p50_us: quantile_us(&self.buckets, 0.50)?,
            p99_us: quantile_us(&self.buckets, 0.99)?,
            total_wait_ms: self.sum_us as f64 / 1_000.0,
        })
    }
}

/// Where the kernel keeps one cgroup's counters: its slot in `RUNQ_SLOTS`, or the `RUNQ` hash.
/// A cgroup can have both (it waited in the hash while its slot was held, then took the slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RunqPlace {
    Slot(u32),
    Hash,
}

/// One cumulative reading per (place, cgroup).
pub type RunqReadings = HashMap<(RunqPlace, u64), RunqStats>;

/// Windows of every cgroup that had tasks switched in between two sets of readings, one per
/// cgroup (its places summed), sorted by cgroup id. A place first seen in `now` counts from zero:
/// the kernel zeroes a slot before it is claimed and a hash entry starts at zero.
pub fn runq_windows(prev: &RunqReadings, now: &RunqReadings) -> Vec<RunqWindow> {
    let mut per_cgroup: HashMap<u64, RunqDelta> = HashMap::new();
    for (key, stats) in now {
        let delta = RunqDelta::between(prev.get(key), stats);
        match per_cgroup.entry(key.1) {
            std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().add(&delta),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(delta);
            }
        }
    }
    let mut out: Vec<RunqWindow> = per_cgroup.iter().filter_map(|(id, delta)| delta.window(*id)).collect();
    out.sort_by_key(|w| w.cgroup_id);
    out
}

/// The kernel's `RUNQ_SLOTS` array, mapped into the agent's memory.
#[derive(Debug)]
pub struct RunqSlots(MappedSlots<RunqSlot>);

impl RunqSlots {
    pub fn new(map: Map) -> Result<Self, SlotsError> {
        MappedSlots::new(map, RUNQ_SLOTS_MAP, RUNQ_SLOT_COUNT).map(Self)
    }

    /// Slot `index`'s owner and counters as they are, free or not.
    fn raw(&self, index: u32) -> (u64, RunqStats) {
        let (owner, slot) = self.0.read(index);
        (owner, slot.stats)
    }

    /// The cgroup holding slot `index` and its counters, or `None` for a free slot.
    fn read(&self, index: u32) -> Option<(u64, RunqStats)> {
        let (owner, stats) = self.raw(index);
        (owner != RUNQ_SLOT_FREE && owner != RUNQ_SLOT_RELEASING).then_some((owner, stats))
    }

    /// Takes slot `index` back from `owner` (idle for long): zeroed, then free for the next
    /// cgroup to claim. Nothing happens if another cgroup holds it by now.
    fn release(&self, index: u32, owner: u64) {
        self.0
            .release(index, owner, RUNQ_SLOT_RELEASING, RUNQ_SLOT_FREE, |slot| {
                // SAFETY: a slot inside the mapping, which the kernel leaves alone while releasing.
                unsafe { std::ptr::write_volatile(&raw mut (*slot).stats, RunqStats::ZERO) };
            });
    }
}

/// Reads `RUNQ_SLOTS` and `RUNQ` once per window. Blocking (map syscalls): call from
/// `spawn_blocking`.
pub struct RunqReader {
    slots: RunqSlots,
    map: BpfHashMap<MapData, u64, RunqStats>,
    last: RunqReadings,
    /// Set by the first (baseline) call; the maps count from zero at load, so a cgroup first
    /// seen later is compared against zero.
    primed: bool,
    idle: IdleEviction<(RunqPlace, u64)>,
}

/// Windows a cgroup may stay without samples before its slot or entry is taken back.
const IDLE_WINDOWS_BEFORE_EVICTION: u32 = 120;

impl std::fmt::Debug for RunqReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunqReader")
            .field("places", &self.last.len())
            .finish_non_exhaustive()
    }
}

impl RunqReader {
    pub fn new(slots: RunqSlots, map: BpfHashMap<MapData, u64, RunqStats>) -> Self {
        Self {
            slots,
            map,
            last: HashMap::new(),
            primed: false,
            idle: IdleEviction::new(IDLE_WINDOWS_BEFORE_EVICTION),
        }
    }

    /// Takes places back after `windows` unchanged windows instead of the default (tests).
    pub fn set_idle_windows_before_eviction(&mut self, windows: u32) {
        self.idle = IdleEviction::new(windows);
    }

    /// Slot `index` as the kernel has it now: its owner (or [`RUNQ_SLOT_FREE`]) and the samples
    /// its histogram holds (tests and diagnostics).
    pub fn slot(&self, index: u32) -> (u64, u64) {
        let (owner, stats) = self.slots.raw(index);
        (owner, stats.buckets.iter().map(|b| u64::from(*b)).sum())
    }

    /// How many cgroups had their counters in a slot and in the hash at the last reading.
    pub fn place_counts(&self) -> PlaceCounts {
        PlaceCounts::tally(self.last.keys().map(|(place, _)| *place != RunqPlace::Hash))
    }

    /// Where each cgroup's counters were at the last reading (tests and diagnostics).
    pub fn places(&self) -> Vec<(RunqPlace, u64)> {
        let mut places: Vec<_> = self.last.keys().copied().collect();
        places.sort_unstable();
        places
    }

    /// Windows of every cgroup that had tasks switched in since the previous call. The first
    /// call only sets the baseline for cgroups already in the maps.
    pub fn collect(&mut self) -> Result<Vec<RunqWindow>, MapError> {
        let first = !self.primed;
        self.primed = true;
        let mut now: RunqReadings = HashMap::with_capacity(self.last.len());
        for index in 0..RUNQ_SLOT_COUNT {
            if let Some((owner, stats)) = self.slots.read(index) {
                now.insert((RunqPlace::Slot(index), owner), stats);
            }
        }
        for entry in &self.map {
            let (id, stats) = entry?;
            now.insert((RunqPlace::Hash, id), stats);
        }
        let out = if first {
            Vec::new()
        } else {
            runq_windows(&self.last, &now)
        };
        // Cgroups idle for long (typically deleted pods) give their place back; if one comes
        // back its counters restart from zero and are compared against zero.
        let expired = self.idle.observe(
            now.iter()
                .map(|(key, stats)| (*key, self.last.get(key).is_none_or(|p| p.buckets != stats.buckets))),
        );
        for key in expired {
            match key {
                (RunqPlace::Slot(index), owner) => self.slots.release(index, owner),
                (RunqPlace::Hash, id) => {
                    let _ = self.map.remove(&id);
                }
            }
            now.remove(&key);
        }
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
    fn a_cgroup_in_a_slot_and_the_hash_gives_one_window() {
        let (a, b) = (11u64, 12u64);
        let prev: RunqReadings = HashMap::from([((RunqPlace::Hash, a), stats(&[10; 5]))]);
        let now: RunqReadings = HashMap::from([
            // a waited in the hash, then took its freed slot: both places count.
            ((RunqPlace::Hash, a), stats(&[10; 8])),
            ((RunqPlace::Slot(3), a), stats(&[500; 2])),
            ((RunqPlace::Slot(9), b), stats(&[20; 4])),
        ]);
        let windows = runq_windows(&prev, &now);
        assert_eq!(
            windows.iter().map(|w| (w.cgroup_id, w.samples)).collect::<Vec<_>>(),
            [(a, 5), (b, 4)]
        );
        assert!((windows[0].total_wait_ms - (3.0 * 10.0 + 2.0 * 500.0) / 1_000.0).abs() < 1e-9);
        assert!(windows[0].p99_us > 400.0, "{}", windows[0].p99_us);
        assert!(runq_windows(&now, &now).is_empty(), "nothing new: no window");
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
