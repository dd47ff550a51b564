//! Network latency and loss: reads the `FLOWS`, `DROP_SLOTS` (mapped into memory), `DROPS` and
//! `LOST_EVENTS` maps each window and turns the kernel's cumulative counters into per-window
//! deltas ([`NetDelta`]), then into the attributed [`NetworkWindow`] (pure, testable without a
//! kernel).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray};
use graywatch_common::{
    AF_INET, DROP_SLOT_COUNT, DROP_SLOT_FREE, DROP_SLOT_HELD, DROP_SLOT_RELEASING, DropKey, DropSlot, FlowKey,
    FlowStats, LostEvent, RTT_BUCKETS, rtt_bucket_bounds,
};
use tracing::{info, warn};

use super::{IdleEviction, slots::MappedSlots};
use crate::{
    ebpf::{EbpfError, KernelPrograms, typed_map},
    summary::{
        Direction, DropWindow, FlowWindow, NetworkWindow, PlaceCounts, RttBuckets, RttSummary, Workload,
        WorkloadNetWindow, ratio,
    },
};

/// Windows an entry may stay unchanged before it is evicted from the kernel map.
const IDLE_WINDOWS_BEFORE_EVICTION: u32 = 120;

/// What changed in one (cgroup, remote) flow during a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowDelta {
    pub rtt_samples: u64,
    pub rtt_sum_us: u64,
    pub segments_sent: u64,
    pub retransmits: u64,
    /// Connection attempts nobody answered ([`graywatch_common::connect_unanswered`]).
    pub unanswered_connects: u64,
    pub rtt_buckets: Box<[u64; RTT_BUCKETS]>,
}

impl FlowDelta {
    fn add(&mut self, other: &FlowDelta) {
        self.rtt_samples += other.rtt_samples;
        self.rtt_sum_us += other.rtt_sum_us;
        self.segments_sent += other.segments_sent;
        self.retransmits += other.retransmits;
        self.unanswered_connects += other.unanswered_connects;
        for (total, more) in self.rtt_buckets.iter_mut().zip(other.rtt_buckets.iter()) {
            *total += more;
        }
    }

    fn is_empty(&self) -> bool {
        self.rtt_samples == 0 && self.segments_sent == 0 && self.retransmits == 0 && self.unanswered_connects == 0
    }

    /// `now - before`, or `now` alone if the kernel entry was recreated. Recreation is what the
    /// entry's creation stamp says, or a u64 counter going back (never a wrap: 2^64 segments);
    /// the u32 RTT buckets wrap on long-lived flows and are subtracted wrapping, so a wrap is
    /// one window's samples, not the flow's lifetime. The RTT sample count and sum come from the
    /// histogram (bucket midpoints).
    pub fn between(before: Option<&FlowStats>, now: &FlowStats) -> Self {
        let restarted = before.is_some_and(|b| {
            (b.created_ns != 0 && now.created_ns != 0 && b.created_ns != now.created_ns)
                || now.data_segs_out < b.data_segs_out
                || now.retransmits < b.retransmits
                || now.unanswered_connects < b.unanswered_connects
        });
        let before = if restarted { None } else { before };
        let mut rtt_buckets = Box::new([0u64; RTT_BUCKETS]);
        let (mut rtt_samples, mut rtt_sum_us) = (0u64, 0u64);
        for (i, slot) in rtt_buckets.iter_mut().enumerate() {
            let earlier = before.map_or(0, |b| b.rtt_buckets[i]);
            // u32 bucket counters wrap after 4 billion samples; wrapping_sub keeps deltas right.
            *slot = u64::from(now.rtt_buckets[i].wrapping_sub(earlier));
            let (low, width) = rtt_bucket_bounds(i);
            rtt_samples += *slot;
            rtt_sum_us += *slot * (low + width / 2);
        }
        Self {
            rtt_samples,
            rtt_sum_us,
            segments_sent: now.data_segs_out - before.map_or(0, |b| b.data_segs_out),
            retransmits: now.retransmits - before.map_or(0, |b| b.retransmits),
            unanswered_connects: now.unanswered_connects - before.map_or(0, |b| b.unanswered_connects),
            rtt_buckets,
        }
    }
}

/// One window of raw network deltas, keyed as the kernel keys them.
#[derive(Debug, Clone, Default)]
pub struct NetDelta {
    pub flows: Vec<(FlowKey, FlowDelta)>,
    pub drops: Vec<(DropKey, u64)>,
    /// Where the drop counters are; `None` when drops are unavailable.
    pub drop_places: Option<PlaceCounts>,
    /// Cumulative lost events by kind.
    pub lost_events: BTreeMap<String, u64>,
}

struct Tracked<V> {
    value: V,
    idle_windows: u32,
}

/// Owns the network maps and the previous window's cumulative values.
pub struct NetCollector {
    flows: BpfHashMap<MapData, FlowKey, FlowStats>,
    /// `None` when the drop slots cannot be mapped (the drop signal is then reported unavailable).
    drops: Option<DropReader>,
    lost: PerCpuArray<MapData, u64>,
    previous_flows: HashMap<FlowKey, Tracked<Box<FlowStats>>>,
    /// Evicting idle flows failed in the last window that had any to evict: said once, at the
    /// first failure, not every window the retry fails again.
    eviction_failing: bool,
}

impl NetCollector {
    pub fn new(programs: &mut KernelPrograms) -> Result<Self, EbpfError> {
        let hash = typed_map(programs.take_map(DROPS_MAP)?, DROPS_MAP)?;
        let drops = match MappedSlots::new(programs.take_map(DROP_SLOTS_MAP)?, DROP_SLOTS_MAP, DROP_SLOT_COUNT) {
            Ok(slots) => Some(DropReader::new(slots, hash)),
            // The program counts but its figures cannot all be read: say so, measure the rest.
            Err(error) => {
                programs.mark_unavailable("drops", error.to_string());
                None
            }
        };
        Ok(Self {
            flows: typed_map(programs.take_map("FLOWS")?, "FLOWS")?,
            drops,
            lost: typed_map(programs.take_map("LOST_EVENTS")?, "LOST_EVENTS")?,
            previous_flows: HashMap::new(),
            eviction_failing: false,
        })
    }

    /// The drop reader (tests and diagnostics); `None` when drops are unavailable.
    pub fn drop_reader(&mut self) -> Option<&mut DropReader> {
        self.drops.as_mut()
    }

    /// Reads the maps and returns what changed since the last call. Blocking (map syscalls).
    pub fn collect(&mut self) -> Result<NetDelta, MapError> {
        let mut delta = NetDelta::default();

        let mut seen = HashSet::new();
        for entry in &self.flows {
            let (key, stats) = entry?;
            seen.insert(key);
            let previous = self.previous_flows.get_mut(&key);
            let change = FlowDelta::between(previous.as_ref().map(|p| &*p.value), &stats);
            match previous {
                Some(tracked) if change.is_empty() => tracked.idle_windows += 1,
                Some(tracked) => {
                    *tracked.value = stats;
                    tracked.idle_windows = 0;
                }
                None => {
                    self.previous_flows.insert(
                        key,
                        Tracked {
                            value: Box::new(stats),
                            idle_windows: 0,
                        },
                    );
                }
            }
            if !change.is_empty() {
                delta.flows.push((key, change));
            }
        }
        // Forget flows the kernel no longer has, and evict long-idle ones to keep the map small.
        self.previous_flows.retain(|key, _| seen.contains(key));
        let idle: Vec<FlowKey> = self
            .previous_flows
            .iter()
            .filter(|(_, t)| t.idle_windows >= IDLE_WINDOWS_BEFORE_EVICTION)
            .map(|(k, _)| *k)
            .collect();
        let mut failed = 0usize;
        let mut first_error = None;
        let to_evict = idle.len();
        for key in idle {
            // A concurrent update between our read and this delete is lost; it is at most one
            // window of an idle flow.
            if let Err(error) = self.flows.remove(&key)
                && !already_gone(&error)
            {
                // Still in the kernel: remembered, so its counts are not taken for new ones.
                failed += 1;
                first_error.get_or_insert(error);
                continue;
            }
            self.previous_flows.remove(&key);
        }
        if let Some(error) = first_error {
            if !self.eviction_failing {
                warn!(
                    %error,
                    failed,
                    idle = to_evict,
                    "could not evict idle flows from the kernel map; retrying every window (said again when it recovers)"
                );
            }
            self.eviction_failing = true;
        } else if to_evict > 0 && self.eviction_failing {
            info!(evicted = to_evict, "idle flows evicted from the kernel map again");
            self.eviction_failing = false;
        }

        if let Some(drops) = &mut self.drops {
            delta.drops = drops.collect()?;
            delta.drop_places = Some(drops.place_counts());
        }

        for kind in LostEvent::ALL {
            let total = self.lost.get(&(kind as u32), 0)?.iter().sum();
            delta.lost_events.insert(kind.label().to_owned(), total);
        }
        Ok(delta)
    }
}

/// Names of the drop maps.
pub const DROPS_MAP: &str = "DROPS";
pub const DROP_SLOTS_MAP: &str = "DROP_SLOTS";

/// Where a drop key's count lives: its slot in `DROP_SLOTS`, or the `DROPS` hash (its slot was
/// held by another key when it first dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropPlace {
    Slot(u32),
    Hash,
}

type DropReadings = HashMap<(DropPlace, DropKey), u64>;

/// Reads the drop counts (`DROP_SLOTS` and `DROPS`) once per window and takes back the places of
/// keys idle for long, so neither fills up with keys of gone pods and old remotes.
pub struct DropReader {
    slots: MappedSlots<DropSlot>,
    map: BpfHashMap<MapData, DropKey, u64>,
    last: DropReadings,
    idle: IdleEviction<(DropPlace, DropKey)>,
}

impl std::fmt::Debug for DropReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DropReader")
            .field("places", &self.last.len())
            .finish_non_exhaustive()
    }
}

impl DropReader {
    pub fn new(slots: MappedSlots<DropSlot>, map: BpfHashMap<MapData, DropKey, u64>) -> Self {
        Self {
            slots,
            map,
            last: HashMap::new(),
            idle: IdleEviction::new(IDLE_WINDOWS_BEFORE_EVICTION),
        }
    }

    /// Takes places back after `windows` unchanged windows instead of the default (tests).
    pub fn set_idle_windows_before_eviction(&mut self, windows: u32) {
        self.idle = IdleEviction::new(windows);
    }

    /// Where each key's count was at the last reading (tests and diagnostics).
    pub fn places(&self) -> Vec<(DropPlace, DropKey)> {
        let mut places: Vec<_> = self.last.keys().copied().collect();
        places.sort_unstable_by_key(|(place, key)| (*place, key.words()));
        places
    }

    /// How many keys had their counts in a slot and in the hash at the last reading.
    pub fn place_counts(&self) -> PlaceCounts {
        PlaceCounts::tally(self.last.keys().map(|(place, _)| *place != DropPlace::Hash))
    }

    /// Slot `index`'s state word as the kernel has it now (tests and diagnostics).
    pub fn slot_state(&self, index: u32) -> u64 {
        self.slots.read(index).0
    }

    /// Drops per key since the previous call (every drop since load on the first).
    pub fn collect(&mut self) -> Result<Vec<(DropKey, u64)>, MapError> {
        let mut now: DropReadings = HashMap::with_capacity(self.last.len());
        for index in 0..self.slots.count() {
            // A slot being claimed is read once it is held, its first drop included.
            let (state, slot) = self.slots.read(index);
            if state == DROP_SLOT_HELD {
                now.insert((DropPlace::Slot(index), slot.key), slot.count);
            }
        }
        for entry in &self.map {
            let (key, count) = entry?;
            now.insert((DropPlace::Hash, key), count);
        }
        let changes = drop_changes(&self.last, &now);
        let expired = self.idle.observe(
            now.iter()
                .map(|(place, count)| (*place, self.last.get(place) != Some(count))),
        );
        for place in expired {
            match place {
                (DropPlace::Slot(index), _) => {
                    self.slots
                        .release(index, DROP_SLOT_HELD, DROP_SLOT_RELEASING, DROP_SLOT_FREE, |slot| {
                            // SAFETY: a slot inside the mapping, which the kernel leaves alone
                            // while releasing.
                            unsafe {
                                std::ptr::write_volatile(&raw mut (*slot).key, DropSlot::FREE.key);
                                std::ptr::write_volatile(&raw mut (*slot).count, 0);
                            }
                        });
                }
                (DropPlace::Hash, key) => {
                    // A drop between our read and this delete is lost: at most one drop of a
                    // key idle for minutes.
                    if let Err(error) = self.map.remove(&key)
                        && !already_gone(&error)
                    {
                        // Still in the kernel: its reading is kept, so its whole count is not
                        // taken for new drops; the idle tracking tries again later.
                        warn!(%error, "could not evict an idle drop key from the kernel map; keeping it");
                        continue;
                    }
                }
            }
            now.remove(&place);
        }
        self.last = now;
        Ok(changes)
    }
}

/// A map delete that failed because the entry is not there (the kernel or a previous delete
/// removed it): nothing is left to count twice.
fn already_gone(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Drops per key between two readings of every place: a key can have counts in a slot and in
/// the hash (it fell back to the hash while its slot was held, then claimed the freed slot),
/// and one total comes out. A place first seen counts from zero (slots and hash entries start
/// there; the reader forgets a place when it takes it back). A count below the last reading,
/// which that protocol never produces, is taken as counted from zero rather than as negative.
pub fn drop_changes(last: &DropReadings, now: &DropReadings) -> Vec<(DropKey, u64)> {
    let mut by_key: HashMap<DropKey, u64> = HashMap::new();
    for (place, count) in now {
        let before = last.get(place).copied().unwrap_or(0);
        let change = if *count >= before { count - before } else { *count };
        if change > 0 {
            *by_key.entry(place.1).or_default() += change;
        }
    }
    let mut changes: Vec<_> = by_key.into_iter().collect();
    changes.sort_unstable_by_key(|(key, _)| key.words());
    changes
}

/// The remote address of a key, IPv4-mapped addresses shown as IPv4.
pub fn remote_addr(family: u16, addr: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None if family == AF_INET => IpAddr::V4(Ipv4Addr::new(addr[12], addr[13], addr[14], addr[15])),
        None => IpAddr::V6(v6),
    }
}

/// Percentiles of `buckets`; the mean from the bucket midpoints (`sum_us` / `samples`).
pub fn rtt_summary(buckets: &RttBuckets, samples: u64, sum_us: u64) -> Option<RttSummary> {
    if samples == 0 || buckets.is_empty() {
        return None;
    }
    Some(RttSummary {
        samples,
        mean_us: sum_us as f64 / samples as f64,
        p50_us: buckets.quantile_us(0.5)?,
        p90_us: buckets.quantile_us(0.9)?,
        p99_us: buckets.quantile_us(0.99)?,
        max_us: buckets.quantile_us(1.0)?,
    })
}

/// One workload's flows added up.
struct WorkloadTotals {
    workload: Workload,
    buckets: RttBuckets,
    rtt_samples: u64,
    rtt_sum_us: u64,
    segments_sent: u64,
    retransmits: u64,
    unanswered_connects: u64,
    remotes: usize,
}

/// Builds the attributed window from raw deltas. `workload_of` resolves a cgroup id.
#[expect(
    clippy::implicit_hasher,
    reason = "the agent has one drop-reason map, built with the default hasher"
)]
pub fn network_window(
    delta: &NetDelta,
    drop_reasons: &HashMap<u32, String>,
    mut workload_of: impl FnMut(u64) -> Workload,
) -> NetworkWindow {
    let mut window = NetworkWindow {
        drop_places: delta.drop_places,
        ..NetworkWindow::default()
    };
    let mut per_workload: BTreeMap<u64, WorkloadTotals> = BTreeMap::new();

    // Dual-stack sockets report IPv4 peers as IPv4-mapped IPv6: merge them with IPv4 keys.
    let mut merged: BTreeMap<(u64, IpAddr, Direction), FlowDelta> = BTreeMap::new();
    for (key, change) in &delta.flows {
        let id = (
            key.cgroup_id,
            remote_addr(key.family, key.remote_addr),
            Direction::from_kernel(key.direction),
        );
        match merged.get_mut(&id) {
            Some(total) => total.add(change),
            None => {
                merged.insert(id, change.clone());
            }
        }
    }

    for ((cgroup_id, remote, direction), change) in &merged {
        let workload = workload_of(*cgroup_id);
        let buckets = RttBuckets::from_dense(&change.rtt_buckets);
        let totals = per_workload.entry(*cgroup_id).or_insert_with(|| WorkloadTotals {
            workload: workload.clone(),
            buckets: RttBuckets::default(),
            rtt_samples: 0,
            rtt_sum_us: 0,
            segments_sent: 0,
            retransmits: 0,
            unanswered_connects: 0,
            remotes: 0,
        });
        totals.buckets.add(&buckets);
        totals.rtt_samples += change.rtt_samples;
        totals.rtt_sum_us += change.rtt_sum_us;
        totals.segments_sent += change.segments_sent;
        totals.retransmits += change.retransmits;
        totals.unanswered_connects += change.unanswered_connects;
        totals.remotes += 1;
        window.flows.push(FlowWindow {
            workload,
            remote: *remote,
            direction: *direction,
            rtt: rtt_summary(&buckets, change.rtt_samples, change.rtt_sum_us),
            segments_sent: change.segments_sent,
            retransmits: change.retransmits,
            retransmit_ratio: ratio(change.retransmits, change.segments_sent),
            unanswered_connects: change.unanswered_connects,
            rtt_buckets: buckets,
        });
    }
    window
        .flows
        .sort_by(|a, b| (&a.workload, a.remote, a.direction).cmp(&(&b.workload, b.remote, b.direction)));

    for totals in per_workload.into_values() {
        window.workloads.push(WorkloadNetWindow {
            rtt: rtt_summary(&totals.buckets, totals.rtt_samples, totals.rtt_sum_us),
            retransmit_ratio: ratio(totals.retransmits, totals.segments_sent),
            workload: totals.workload,
            segments_sent: totals.segments_sent,
            retransmits: totals.retransmits,
            unanswered_connects: totals.unanswered_connects,
            remotes: totals.remotes,
        });
    }

    for (key, count) in &delta.drops {
        window.drops.push(DropWindow {
            workload: (key.cgroup_id != 0).then(|| workload_of(key.cgroup_id)),
            // An unconnected socket (most UDP senders) has no peer address: 0.0.0.0 is none.
            remote: (key.family != 0)
                .then(|| remote_addr(key.family, key.remote_addr))
                .filter(|remote| !remote.is_unspecified()),
            reason: drop_reasons
                .get(&key.reason)
                .cloned()
                .unwrap_or_else(|| format!("REASON_{}", key.reason)),
            reason_code: key.reason,
            count: *count,
        });
    }
    window
        .drops
        .sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.reason.cmp(&b.reason)));
    window
}

#[cfg(test)]
mod tests {
    use graywatch_common::rtt_bucket;
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn only_a_missing_entry_counts_as_already_gone() {
        let failed = |errno| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_delete_elem",
                io_error: std::io::Error::from_raw_os_error(errno),
            })
        };
        assert!(already_gone(&failed(libc::ENOENT)));
        assert!(!already_gone(&failed(libc::EPERM)));
        assert!(already_gone(&MapError::KeyNotFound));
    }

    fn stats_with(rtts_us: &[u32], segs: u64, retrans: u64) -> FlowStats {
        let mut s = FlowStats::ZERO;
        for &rtt in rtts_us {
            s.rtt_buckets[rtt_bucket(rtt)] += 1;
        }
        s.data_segs_out = segs;
        s.retransmits = retrans;
        s
    }

    fn key(cgroup_id: u64, last_octet: u8) -> FlowKey {
        let mut remote_addr = [0u8; 16];
        remote_addr[10] = 0xff;
        remote_addr[11] = 0xff;
        remote_addr[12..].copy_from_slice(&[10, 0, 0, last_octet]);
        FlowKey {
            cgroup_id,
            remote_addr,
            family: AF_INET,
            direction: graywatch_common::DIRECTION_OUTBOUND,
            _pad: [0; 5],
        }
    }

    #[test]
    fn deltas_subtract_the_previous_window() {
        let before = stats_with(&[100, 200], 10, 1);
        let now = stats_with(&[100, 200, 20_000, 20_000], 30, 4);
        let d = FlowDelta::between(Some(&before), &now);
        assert_eq!((d.rtt_samples, d.segments_sent, d.retransmits), (2, 20, 3));
        // The sum comes from bucket midpoints: within the buckets' ~6%.
        assert!(d.rtt_sum_us.abs_diff(40_000) <= 2_400, "{}", d.rtt_sum_us);
        assert_eq!(d.rtt_buckets[rtt_bucket(20_000)], 2);
        assert_eq!(d.rtt_buckets[rtt_bucket(100)], 0);
    }

    #[test]
    fn a_recreated_entry_counts_from_zero() {
        let before = stats_with(&[100; 10], 100, 5);
        let now = stats_with(&[300], 2, 0);
        let d = FlowDelta::between(Some(&before), &now);
        assert_eq!((d.rtt_samples, d.segments_sent, d.retransmits), (1, 2, 0));
    }

    #[test]
    fn a_wrapped_bucket_is_one_windows_samples_not_a_restart() {
        let mut before = stats_with(&[], 1_000, 2);
        before.created_ns = 7;
        before.rtt_buckets[rtt_bucket(100)] = u32::MAX - 1;
        let mut now = before;
        now.rtt_buckets[rtt_bucket(100)] = 3; // wrapped: +5 samples
        now.data_segs_out = 1_010;
        let d = FlowDelta::between(Some(&before), &now);
        assert_eq!((d.rtt_samples, d.segments_sent, d.retransmits), (5, 10, 0));
    }

    #[test]
    fn a_recreated_entry_is_told_by_its_creation_stamp() {
        let mut before = stats_with(&[100; 10], 0, 0);
        before.created_ns = 7;
        let mut now = stats_with(&[100; 3], 0, 0);
        now.created_ns = 9;
        let d = FlowDelta::between(Some(&before), &now);
        assert_eq!(d.rtt_samples, 3, "counts from zero, not a wrapped difference");
    }

    #[test]
    fn window_percentiles_track_the_samples() {
        let mut rtts = vec![20_000u32; 90];
        rtts.extend([80_000u32; 10]);
        let delta = NetDelta {
            flows: vec![(key(7, 2), FlowDelta::between(None, &stats_with(&rtts, 1000, 20)))],
            ..Default::default()
        };
        let w = network_window(&delta, &HashMap::new(), |id| Workload {
            cgroup_id: id,
            cgroup_path: None,
            pod: None,
        });
        let flow = &w.flows[0];
        assert_eq!(flow.remote, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        let rtt = flow.rtt.as_ref().expect("rtt");
        assert!((rtt.p50_us as f64 - 20_000.0).abs() / 20_000.0 < 0.07, "{rtt:?}");
        assert!((rtt.p99_us as f64 - 80_000.0).abs() / 80_000.0 < 0.07, "{rtt:?}");
        assert!((rtt.mean_us - 26_000.0).abs() / 26_000.0 < 0.07, "{rtt:?}");
        assert_eq!(flow.retransmit_ratio, Some(0.02));
        assert_eq!(w.workloads.len(), 1);
        assert_eq!(w.workloads[0].remotes, 1);
    }

    #[test]
    fn no_samples_means_no_rtt_not_zero() {
        let delta = NetDelta {
            flows: vec![(key(1, 3), FlowDelta::between(None, &stats_with(&[], 0, 2)))],
            ..Default::default()
        };
        let w = network_window(&delta, &HashMap::new(), |id| Workload {
            cgroup_id: id,
            cgroup_path: None,
            pod: None,
        });
        assert!(w.flows[0].rtt.is_none());
        assert_eq!(w.flows[0].retransmit_ratio, None);
    }

    proptest! {
        /// Drops land on random keys, each in its slot or the hash, over several windows; after
        /// some readings places are taken back (their counts gone from the kernel, as the
        /// reader does it: right after reading them). Every drop is counted exactly once.
        #[test]
        fn every_drop_is_counted_once_across_places_and_releases(
            windows in proptest::collection::vec(
                (
                    proptest::collection::vec((0u32..4, any::<bool>()), 0..40),
                    proptest::collection::vec((0u32..4, any::<bool>()), 0..3),
                ),
                1..12,
            )
        ) {
            let key = |reason: u32| DropKey { reason, ..DropKey::default() };
            let place = |reason: u32, in_slot: bool| if in_slot { DropPlace::Slot(reason * 7) } else { DropPlace::Hash };
            let mut kernel: DropReadings = HashMap::new();
            let mut last: DropReadings = HashMap::new();
            let mut dropped: HashMap<DropKey, u64> = HashMap::new();
            let mut counted: HashMap<DropKey, u64> = HashMap::new();
            for (drops, releases) in windows {
                for (reason, in_slot) in drops {
                    *kernel.entry((place(reason, in_slot), key(reason))).or_default() += 1;
                    *dropped.entry(key(reason)).or_default() += 1;
                }
                let mut now = kernel.clone();
                for (k, n) in drop_changes(&last, &now) {
                    prop_assert!(n > 0);
                    *counted.entry(k).or_default() += n;
                }
                for (reason, in_slot) in releases {
                    let at = (place(reason, in_slot), key(reason));
                    kernel.remove(&at);
                    now.remove(&at);
                }
                last = now;
            }
            prop_assert_eq!(counted, dropped);
        }
    }

    #[test]
    fn a_key_in_a_slot_and_the_hash_gives_one_total() {
        let key = |reason| DropKey {
            cgroup_id: 9,
            reason,
            ..DropKey::default()
        };
        let (a, b) = (key(2), key(3));
        let last = HashMap::from([((DropPlace::Hash, a), 5), ((DropPlace::Slot(7), b), 40)]);
        let now = HashMap::from([
            // a: 2 more in the hash, then its freed slot claimed (3 there).
            ((DropPlace::Hash, a), 7),
            ((DropPlace::Slot(1), a), 3),
            // b: its slot taken back and claimed afresh by b (counts restart).
            ((DropPlace::Slot(7), b), 4),
        ]);
        assert_eq!(drop_changes(&last, &now), vec![(a, 5), (b, 4)]);
        assert!(drop_changes(&now, &now).is_empty(), "no change, no drops");
    }

    #[test]
    fn drops_are_named_by_the_kernel_reason() {
        let delta = NetDelta {
            drops: vec![
                (
                    DropKey {
                        cgroup_id: 0,
                        remote_addr: [0; 16],
                        family: 0,
                        protocol: 0x800,
                        reason: 3,
                    },
                    5,
                ),
                (
                    DropKey {
                        cgroup_id: 4,
                        remote_addr: key(4, 9).remote_addr,
                        family: AF_INET,
                        protocol: 0x800,
                        reason: 99,
                    },
                    7,
                ),
            ],
            ..Default::default()
        };
        let reasons = HashMap::from([(3, "NO_SOCKET".to_owned())]);
        let w = network_window(&delta, &reasons, |id| Workload {
            cgroup_id: id,
            cgroup_path: None,
            pod: None,
        });
        assert_eq!(w.drops[0].reason, "REASON_99");
        assert_eq!(w.drops[0].remote, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9))));
        assert_eq!(w.drops[1].reason, "NO_SOCKET");
        assert!(w.drops[1].workload.is_none() && w.drops[1].remote.is_none());
    }

    proptest! {
        #[test]
        fn histogram_median_is_within_bucket_resolution(rtts in prop::collection::vec(1u32..50_000_000, 1..200)) {
            let stats = stats_with(&rtts, 0, 0);
            let buckets = RttBuckets::from_dense(&FlowDelta::between(None, &stats).rtt_buckets);
            prop_assert_eq!(buckets.samples(), rtts.len() as u64);
            let mut sorted = rtts.clone();
            sorted.sort_unstable();
            let min = f64::from(sorted[0]);
            let max = f64::from(sorted[sorted.len() - 1]);
            let p50 = buckets.quantile_us(0.5).expect("samples") as f64;
            // Bucket midpoints stay within ~8% of real samples.
            prop_assert!(p50 >= min * 0.92 && p50 <= max * 1.08, "p50 {} outside [{}, {}]", p50, min, max);
        }

        #[test]
        fn deltas_never_underflow(a in any::<u32>(), b in any::<u32>(), s1 in any::<u64>(), s2 in any::<u64>()) {
            let mut before = FlowStats::ZERO;
            before.rtt_buckets[0] = a;
            before.data_segs_out = s1;
            let mut now = FlowStats::ZERO;
            now.rtt_buckets[0] = b;
            now.data_segs_out = s2;
            let d = FlowDelta::between(Some(&before), &now);
            prop_assert!(d.segments_sent <= s2.max(s2.wrapping_sub(s1)));
        }
    }
}
