//! Memory pressure from the kernel programs: reclaim stalls per (cgroup, kind) from `RECLAIM`,
//! and OOM kills from the `OOM_EVENTS` ring buffer (with `OOM_KILLS` counters as the
//! loss-proof total).

use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, RingBuf};
use graywatch_common::{OomEvent, ReclaimKey, ReclaimKind, ReclaimStats};
use serde::Serialize;

use super::{
    IdleEviction,
    cpu_contention::{bucket_deltas, quantile_us},
};
use crate::{
    summary::{OomKill, ReclaimWindow},
    tracefs::EventFormat,
};

/// Names of the maps this module reads (the programs: `host::HOST_PROGRAMS`).
pub const RECLAIM_MAP: &str = "RECLAIM";
pub const OOM_KILLS_MAP: &str = "OOM_KILLS";
pub const OOM_EVENTS_MAP: &str = "OOM_EVENTS";

/// Whether `oom:mark_victim`'s first raw argument is the victim's task pointer: kernels that
/// pass the task also record its comm in the event (a `comm` field in the format).
pub fn oom_arg_is_task(mark_victim: &EventFormat) -> bool {
    mark_victim.field("comm").is_ok()
}

pub fn reclaim_window(key: &ReclaimKey, prev: Option<&ReclaimStats>, now: &ReclaimStats) -> Option<ReclaimWindow> {
    let events = now.events.wrapping_sub(prev.map_or(0, |p| p.events));
    if events == 0 {
        return None;
    }
    let buckets = bucket_deltas(prev.map(|p| &p.buckets), &now.buckets);
    Some(ReclaimWindow {
        cgroup_id: key.cgroup_id,
        kind: ReclaimKind::from_u32(key.kind).map_or("unknown", ReclaimKind::label),
        events,
        pages_reclaimed: now.pages_reclaimed.wrapping_sub(prev.map_or(0, |p| p.pages_reclaimed)),
        total_stall_ms: now.sum_us.wrapping_sub(prev.map_or(0, |p| p.sum_us)) as f64 / 1_000.0,
        p50_us: quantile_us(&buckets, 0.5)?,
        p99_us: quantile_us(&buckets, 0.99)?,
    })
}

impl From<&OomEvent> for OomKill {
    fn from(e: &OomEvent) -> Self {
        let end = e.comm.iter().position(|b| *b == 0).unwrap_or(e.comm.len());
        OomKill {
            cgroup_id: e.cgroup_id,
            cgroup_v2_id: e.cgroup_v2_id,
            pid: e.pid,
            tgid: e.tgid,
            comm: String::from_utf8_lossy(&e.comm[..end]).into_owned(),
            timestamp_ns: e.timestamp_ns,
        }
    }
}

/// Decodes one ring buffer record; `None` if it is too short (never trusted blindly).
pub fn decode_oom_event(bytes: &[u8]) -> Option<OomEvent> {
    if bytes.len() < std::mem::size_of::<OomEvent>() {
        return None;
    }
    // SAFETY: length checked; OomEvent is plain integers (any bit pattern valid); unaligned read.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<OomEvent>()) })
}

/// Memory figures of one window.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MemoryKernelWindow {
    pub reclaim: Vec<ReclaimWindow>,
    pub oom_kills: Vec<OomKill>,
    /// OOM kills per cgroup during the window from the counters (includes any the ring lost).
    pub oom_kill_counts: Vec<(u64, u64)>,
}

/// Windows a `RECLAIM` or `OOM_KILLS` entry may stay unchanged before it is evicted from the
/// kernel map (as `FLOWS` entries are): pods come and go, and a full map loses new cgroups.
pub const IDLE_WINDOWS_BEFORE_EVICTION: u32 = 120;

/// Reads the memory maps once per window. Blocking: call from `spawn_blocking`.
pub struct MemoryPressureReader {
    reclaim: BpfHashMap<MapData, ReclaimKey, ReclaimStats>,
    oom_kills: BpfHashMap<MapData, u64, u64>,
    oom_events: RingBuf<MapData>,
    last_reclaim: HashMap<ReclaimKey, ReclaimStats>,
    last_oom: HashMap<u64, u64>,
    idle_reclaim: IdleEviction<ReclaimKey>,
    idle_oom: IdleEviction<u64>,
    primed: bool,
}

impl std::fmt::Debug for MemoryPressureReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryPressureReader")
            .field("reclaim_keys", &self.last_reclaim.len())
            .finish_non_exhaustive()
    }
}

impl MemoryPressureReader {
    pub fn new(
        reclaim: BpfHashMap<MapData, ReclaimKey, ReclaimStats>,
        oom_kills: BpfHashMap<MapData, u64, u64>,
        oom_events: RingBuf<MapData>,
    ) -> Self {
        Self {
            reclaim,
            oom_kills,
            oom_events,
            last_reclaim: HashMap::new(),
            last_oom: HashMap::new(),
            idle_reclaim: IdleEviction::new(IDLE_WINDOWS_BEFORE_EVICTION),
            idle_oom: IdleEviction::new(IDLE_WINDOWS_BEFORE_EVICTION),
            primed: false,
        }
    }

    /// Evicts entries after `windows` unchanged windows instead of the default (tests).
    pub fn set_idle_windows_before_eviction(&mut self, windows: u32) {
        self.idle_reclaim = IdleEviction::new(windows);
        self.idle_oom = IdleEviction::new(windows);
    }

    /// Keys in the kernel's `RECLAIM` map now (tests and diagnostics).
    pub fn reclaim_keys(&self) -> Vec<ReclaimKey> {
        self.reclaim.keys().filter_map(Result::ok).collect()
    }

    /// Cgroup ids in the kernel's `OOM_KILLS` map now.
    pub fn oom_kill_cgroups(&self) -> Vec<u64> {
        self.oom_kills.keys().filter_map(Result::ok).collect()
    }

    /// Everything since the previous call. The first call sets the baseline for cumulative
    /// counters (earlier stalls are not this window's); OOM events are always reported.
    pub fn collect(&mut self) -> Result<MemoryKernelWindow, MapError> {
        let mut out = MemoryKernelWindow::default();
        while let Some(item) = self.oom_events.next() {
            if let Some(event) = decode_oom_event(&item) {
                let kill = OomKill::from(&event);
                tracing::warn!(cgroup_id = kill.cgroup_id, pid = kill.pid, comm = %kill.comm, "OOM kill");
                out.oom_kills.push(kill);
            } else {
                tracing::warn!(len = item.len(), "short OOM event record ignored");
            }
        }
        let mut reclaim = HashMap::with_capacity(self.last_reclaim.len());
        for entry in &self.reclaim {
            let (key, stats) = entry?;
            reclaim.insert(key, stats);
        }
        let mut oom = HashMap::with_capacity(self.last_oom.len());
        for entry in &self.oom_kills {
            let (id, count) = entry?;
            oom.insert(id, count);
        }
        if self.primed {
            out.reclaim = reclaim
                .iter()
                .filter_map(|(k, s)| reclaim_window(k, self.last_reclaim.get(k), s))
                .collect();
            out.reclaim.sort_by_key(|w| (w.cgroup_id, w.kind));
            out.oom_kill_counts = oom
                .iter()
                .filter_map(|(id, n)| {
                    let d = n.wrapping_sub(self.last_oom.get(id).copied().unwrap_or(0));
                    (d > 0).then_some((*id, d))
                })
                .collect();
            out.oom_kill_counts.sort_unstable();
        }
        // Evict entries unchanged for long (their cgroup is idle or gone). An update between our
        // read and the delete is lost: at most one window of an idle cgroup. The previous value
        // goes too, so a recreated entry counts from zero.
        let changed_reclaim: Vec<(ReclaimKey, bool)> = reclaim
            .iter()
            .map(|(k, s)| (*k, self.last_reclaim.get(k).is_none_or(|p| p.events != s.events)))
            .collect();
        for key in self.idle_reclaim.observe(changed_reclaim) {
            if let Err(error) = self.reclaim.remove(&key) {
                tracing::warn!(%error, cgroup_id = key.cgroup_id, "could not evict an idle RECLAIM entry");
            }
            reclaim.remove(&key);
        }
        let changed_oom: Vec<(u64, bool)> = oom
            .iter()
            .map(|(id, n)| (*id, self.last_oom.get(id) != Some(n)))
            .collect();
        for id in self.idle_oom.observe(changed_oom) {
            if let Err(error) = self.oom_kills.remove(&id) {
                tracing::warn!(%error, cgroup_id = id, "could not evict an idle OOM_KILLS entry");
            }
            oom.remove(&id);
        }
        self.primed = true;
        self.last_reclaim = reclaim;
        self.last_oom = oom;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use graywatch_common::rtt_bucket;

    use super::*;

    #[test]
    fn reclaim_window_is_a_delta() {
        let key = ReclaimKey {
            cgroup_id: 9,
            kind: ReclaimKind::Memcg as u32,
            _pad: 0,
        };
        let mut before = ReclaimStats::ZERO;
        before.events = 2;
        before.sum_us = 100;
        before.buckets[rtt_bucket(50)] = 2;
        let mut after = before;
        after.events = 5;
        after.sum_us = 100 + 3 * 2_000;
        after.pages_reclaimed = 96;
        after.buckets[rtt_bucket(2_000)] = 3;
        let w = reclaim_window(&key, Some(&before), &after).expect("window");
        assert_eq!((w.kind, w.events, w.pages_reclaimed), ("memcg", 3, 96));
        assert!((w.total_stall_ms - 6.0).abs() < 1e-9);
        assert!((w.p50_us - 2_000.0).abs() / 2_000.0 < 0.07);
        assert!(reclaim_window(&key, Some(&after), &after).is_none());
    }

    #[test]
    fn idle_entries_are_evicted_and_busy_ones_kept() {
        let mut idle = IdleEviction::new(3);
        assert!(idle.observe([(1u64, true), (2, true)]).is_empty());
        assert!(idle.observe([(1u64, false), (2, true)]).is_empty());
        assert!(idle.observe([(1u64, false), (2, true)]).is_empty());
        assert_eq!(idle.observe([(1u64, false), (2, false)]), vec![1]);
        // Forgotten once evicted: a recreated entry starts over.
        assert!(idle.observe([(1u64, false), (2, false)]).is_empty());
        assert_eq!(idle.observe([(1u64, false), (2, false)]), vec![2]);
    }

    #[test]
    fn oom_events_decode_and_reject_short_records() {
        let mut event = OomEvent {
            cgroup_id: 42,
            cgroup_v2_id: 42,
            timestamp_ns: 1,
            pid: 7,
            tgid: 7,
            comm: [0; 16],
        };
        event.comm[..4].copy_from_slice(b"tail");
        // SAFETY: viewing a plain #[repr(C)] value as bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts((&raw const event).cast::<u8>(), std::mem::size_of::<OomEvent>()) };
        let kill = OomKill::from(&decode_oom_event(bytes).expect("full record"));
        assert_eq!((kill.cgroup_id, kill.pid, kill.comm.as_str()), (42, 7, "tail"));
        assert!(decode_oom_event(&bytes[..10]).is_none());
    }
}
