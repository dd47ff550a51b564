//! The per-window summary the agent prints (`--output json`), exports and streams.
//!
//! A signal that could not be measured is `None` (JSON `null`) with the reason in
//! [`WindowSummary::unavailable`], never a zero.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use graywatch_common::{RTT_BUCKETS, rtt_bucket_bounds};
use serde::Serialize;

/// Everything one node measured in one window.
#[derive(Debug, Clone, Serialize)]
pub struct WindowSummary {
    pub node: String,
    /// Window start and length.
    pub window_start_unix_ms: u64,
    pub window_seconds: f64,
    pub network: NetworkWindow,
    /// CPU steal and run-queue latency per workload.
    pub cpu: CpuWindow,
    /// Reclaim stalls and OOM kills per workload.
    pub memory: MemoryWindow,
    /// PSI of the node and of pod (or watched) cgroups, with their OOM/high events and throttling.
    pub pressure: PressureWindow,
    /// Events the kernel programs could not record, by kind (cumulative since start).
    pub lost_events: BTreeMap<String, u64>,
    /// Signals that are not available on this host, with why.
    pub unavailable: BTreeMap<String, String>,
    /// The node's local score per family (filled in after scoring; absent while warming up).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub local_scores: Vec<LocalScoreView>,
    /// Failures forecast within the horizon, soonest first (filled in after scoring, see
    /// `crate::predict`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub predictions: Vec<Prediction>,
}

/// A failure forecast before it happens: a figure rising steadily towards its limit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub family: graywatch_detect::Family,
    /// Pod `namespace/name` when known, else pod UID, else the cgroup path; `node` for a
    /// node-level figure.
    pub workload: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_path: Option<String>,
    /// Seconds until the forecast crosses the limit.
    pub eta_seconds: f64,
    /// In [0, 1]: R² of the recent rise.
    pub confidence: f64,
    pub value: f64,
    pub limit: f64,
    pub unit: &'static str,
    pub reason: String,
}

/// One family's local score as printed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocalScoreView {
    pub family: String,
    pub score: f64,
    pub reason: String,
    /// An anomaly that started in the last window and lasted into this one: its score and
    /// series as of its first window (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub onset: Option<AnomalyOnset>,
}

/// The start of an anomaly in one of a family's series: the scorer's onset
/// (`SignalScorer::onset`) at or over the score a sample needs to count as elevated, in a series
/// still elevated a window later.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnomalyOnset {
    pub score: f64,
    /// The series that started it, with its figures.
    pub reason: String,
}

/// Who a measurement belongs to: a cgroup, and the pod when the cgroup is a pod's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Workload {
    pub cgroup_id: u64,
    /// Path in the cgroup v2 hierarchy; `None` if the cgroup vanished before we could resolve it.
    pub cgroup_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PodRef {
    pub uid: String,
    /// Filled in from the API server when the agent runs in a cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct NetworkWindow {
    /// Per workload × remote address.
    pub flows: Vec<FlowWindow>,
    /// Per workload, all remotes together.
    pub workloads: Vec<WorkloadNetWindow>,
    /// Kernel packet drops by workload, remote and reason.
    pub drops: Vec<DropWindow>,
    /// Where the kernel keeps the drop counters; `None` when drops are unavailable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_places: Option<PlaceCounts>,
}

/// Latency distribution of one window, in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RttSummary {
    pub samples: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// Who opened a connection, judged by its ports (see `graywatch_common::flow_direction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// This workload connected out: its RTT is the network's.
    Outbound,
    /// This workload accepted the connection: its RTT includes the client's think time.
    Inbound,
    Unknown,
}

impl Direction {
    pub fn from_kernel(direction: u8) -> Self {
        match direction {
            graywatch_common::DIRECTION_OUTBOUND => Direction::Outbound,
            graywatch_common::DIRECTION_INBOUND => Direction::Inbound,
            _ => Direction::Unknown,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FlowWindow {
    pub workload: Workload,
    pub remote: IpAddr,
    pub direction: Direction,
    /// `None` when no RTT sample arrived in the window.
    pub rtt: Option<RttSummary>,
    /// Data segments sent (`tcp_sock.data_segs_out`: pure ACKs not counted).
    pub segments_sent: u64,
    pub retransmits: u64,
    /// retransmits / data segments sent; `None` when nothing was sent.
    pub retransmit_ratio: Option<f64>,
    /// Connection attempts nobody answered: each closed from `SYN_SENT` with neither an answer
    /// nor a refusal ([`graywatch_common::connect_unanswered`]).
    pub unanswered_connects: u64,
    /// The window's RTT distribution as the kernel's bucket counts (small: the per-flow HDR
    /// histograms of ~24 KiB each were most of a busy node's memory), for peers and scoring.
    #[serde(skip)]
    pub rtt_buckets: RttBuckets,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadNetWindow {
    pub workload: Workload,
    pub rtt: Option<RttSummary>,
    pub segments_sent: u64,
    pub retransmits: u64,
    pub retransmit_ratio: Option<f64>,
    pub unanswered_connects: u64,
    pub remotes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct DropWindow {
    /// `None` when the packet belonged to no socket (e.g. nobody listening).
    pub workload: Option<Workload>,
    /// `None` when the drop names no peer: neither its socket (unconnected, as most UDP
    /// senders are) nor, without a socket, the packet.
    pub remote: Option<IpAddr>,
    /// The kernel's name for the reason (`NO_SOCKET`, `NETFILTER_DROP`, …).
    pub reason: String,
    pub reason_code: u32,
    pub count: u64,
}

/// retransmits / segments, or `None` without segments.
pub fn ratio(retransmits: u64, segments: u64) -> Option<f64> {
    (segments > 0).then(|| retransmits as f64 / segments as f64)
}

/// CPU figures of one window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuWindow {
    /// `None` on the first window or when the kernel has no steal column.
    pub steal: Option<StealWindow>,
    pub run_queue: Vec<WorkloadRunq>,
    /// Where the kernel keeps the cgroups' run-queue counters; `None` without the program.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_queue_places: Option<PlaceCounts>,
}

/// Keys with counters in the kernel (run-queue cgroups, drop keys), by place: a slot of the
/// direct-mapped array, or the fallback hash (for a key whose slot another holds; each of its
/// events pays a hash lookup).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PlaceCounts {
    pub slot: usize,
    pub hash: usize,
}

impl PlaceCounts {
    /// Counts places, each `true` for a slot and `false` for the hash.
    pub fn tally(in_slot: impl IntoIterator<Item = bool>) -> Self {
        in_slot.into_iter().fold(Self::default(), |counts, slot| Self {
            slot: counts.slot + usize::from(slot),
            hash: counts.hash + usize::from(!slot),
        })
    }
}

impl CpuWindow {
    /// The worst workload's run-queue p99 (µs); `None` without run-queue figures.
    pub fn worst_run_queue_p99_us(&self) -> Option<f64> {
        let worst = self.run_queue.iter().map(|w| w.latency.p99_us).fold(f64::NAN, f64::max);
        worst.is_finite().then_some(worst)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadRunq {
    pub workload: Workload,
    #[serde(flatten)]
    pub latency: RunqWindow,
}

/// Memory figures of one window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryWindow {
    pub reclaim: Vec<WorkloadReclaim>,
    pub oom_kills: Vec<WorkloadOomKill>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadReclaim {
    pub workload: Workload,
    #[serde(flatten)]
    pub stalls: ReclaimWindow,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadOomKill {
    pub workload: Workload,
    #[serde(flatten)]
    pub kill: OomKill,
}

/// Pressure stall information: the node's and each watched/pod cgroup's (with its OOM/high
/// events and CPU throttling).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PressureWindow {
    pub node: NodePsi,
    pub cgroups: Vec<CgroupWindow>,
}

/// Steal over one window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StealWindow {
    /// Steal as % of the node's CPU wall time (all CPUs together).
    pub node_pct: f64,
    /// Steal seconds summed over CPUs during the window.
    pub node_seconds: f64,
    /// (cpu, steal %) for CPUs present in both readings.
    pub per_cpu_pct: Vec<(u32, f64)>,
}

/// One cgroup's run-queue latency over one window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunqWindow {
    pub cgroup_id: u64,
    /// Times a task of this cgroup was switched in after waiting.
    pub samples: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Sum of waiting time, ms: how much CPU time the cgroup's tasks wanted but did not get.
    pub total_wait_ms: f64,
}

/// One (cgroup, reclaim kind) over one window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReclaimWindow {
    pub cgroup_id: u64,
    /// `direct` (node short of memory) or `memcg` (cgroup at its limit).
    pub kind: &'static str,
    pub events: u64,
    pub pages_reclaimed: u64,
    pub total_stall_ms: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// An OOM kill as reported by the kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OomKill {
    /// Victim's cgroup id in the attributed hierarchy (v2 when the host has one).
    pub cgroup_id: u64,
    pub cgroup_v2_id: u64,
    pub pid: u32,
    pub tgid: u32,
    pub comm: String,
    pub timestamp_ns: u64,
}

/// One `some` or `full` line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PsiLine {
    /// Percentage of the last 10 s in which at least one task (some) / all tasks (full) stalled.
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    /// Cumulative stall time in microseconds.
    pub total_us: u64,
}

/// A whole PSI file. `full` is `None` when the kernel does not report it (cpu before 5.13).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Psi {
    pub some: PsiLine,
    pub full: Option<PsiLine>,
}

/// PSI of one resource over one window.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PsiWindow {
    /// The kernel's own averages at the end of the window.
    pub now: Psi,
    /// Stall time during the window as % of wall time (`total` delta / window length), `None`
    /// on the first window (no previous total yet).
    pub some_pct: Option<f64>,
    pub full_pct: Option<f64>,
}

/// One collection of node PSI; a resource the kernel lacks is `None`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NodePsi {
    pub memory: Option<PsiWindow>,
    pub cpu: Option<PsiWindow>,
    pub io: Option<PsiWindow>,
}

impl NodePsi {
    pub fn get(&self, resource: Resource) -> Option<&PsiWindow> {
        match resource {
            Resource::Memory => self.memory.as_ref(),
            Resource::Cpu => self.cpu.as_ref(),
            Resource::Io => self.io.as_ref(),
        }
    }
}

/// The three node-level resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resource {
    Memory,
    Cpu,
    Io,
}

impl Resource {
    pub const ALL: [Resource; 3] = [Resource::Memory, Resource::Cpu, Resource::Io];

    pub const fn file_name(self) -> &'static str {
        match self {
            Resource::Memory => "memory",
            Resource::Cpu => "cpu",
            Resource::Io => "io",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.file_name())
    }
}

/// A cgroup's figures over one window. Deltas are `None` on the first window and when the source
/// is missing.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CgroupWindow {
    pub path: String,
    pub pod_uid: Option<String>,
    pub memory_pressure: Option<PsiWindow>,
    pub cpu_pressure: Option<PsiWindow>,
    pub oom_kills: Option<u64>,
    pub memory_high_events: Option<u64>,
    pub throttled_periods: Option<u64>,
    /// Throttled periods / elapsed periods in the window, in %.
    pub throttled_pct: Option<f64>,
    pub throttled_ms: Option<f64>,
    /// Memory usage less inactive page cache at the end of the window (bytes).
    pub memory_working_set_bytes: Option<u64>,
    /// The cgroup's memory limit; `None` without a limit (or without a reading).
    pub memory_limit_bytes: Option<u64>,
}

/// Midpoint (µs) of kernel RTT bucket `index`, clamped to what the buckets report.
fn bucket_midpoint(index: usize) -> u64 {
    let (low, width) = rtt_bucket_bounds(index);
    (low + width / 2).clamp(1, MAX_RTT_US)
}

/// A window's RTT distribution as the kernel's log-linear bucket counts, kept sparse: a few
/// dozen bytes per flow where an HDR histogram costs ~24 KiB.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RttBuckets {
    /// (bucket index, count), ascending by index, counts > 0.
    counts: Vec<(u16, u64)>,
}

impl RttBuckets {
    /// The non-zero buckets of a dense array.
    pub fn from_dense(buckets: &[u64; RTT_BUCKETS]) -> Self {
        let counts = buckets
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .filter_map(|(i, c)| Some((u16::try_from(i).ok()?, *c)))
            .collect();
        Self { counts }
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    pub fn samples(&self) -> u64 {
        self.counts.iter().map(|(_, c)| c).sum()
    }

    /// Adds `other`'s counts (a merge of two sorted lists).
    pub fn add(&mut self, other: &RttBuckets) {
        if other.is_empty() {
            return;
        }
        let mut merged = Vec::with_capacity(self.counts.len() + other.counts.len());
        let (mut a, mut b) = (self.counts.iter().peekable(), other.counts.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.0 == y.0 => {
                    merged.push((x.0, x.1 + y.1));
                    a.next();
                    b.next();
                }
                (Some(x), Some(y)) if x.0 < y.0 => {
                    merged.push(**x);
                    a.next();
                }
                (_, Some(y)) => {
                    merged.push(**y);
                    b.next();
                }
                (Some(x), None) => {
                    merged.push(**x);
                    a.next();
                }
                (None, None) => break,
            }
        }
        self.counts = merged;
    }

    /// The value (bucket midpoint, µs) at quantile `q`; `None` without samples.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total = self.samples();
        if total == 0 {
            return None;
        }
        // Same rank rule as HDR's value_at_quantile: the smallest value with at least
        // ceil(q * total) samples at or below it (at least one).
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "q is clamped to [0, 1], so the rank is in 0..=total"
        )]
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, count) in &self.counts {
            seen += count;
            if seen >= rank {
                return Some(bucket_midpoint(usize::from(*index)));
            }
        }
        self.counts.last().map(|(i, _)| bucket_midpoint(usize::from(*i)))
    }

    /// Sum of the samples at their bucket midpoints (µs).
    pub fn sum_us(&self) -> u64 {
        self.counts
            .iter()
            .map(|(i, c)| c.saturating_mul(bucket_midpoint(usize::from(*i))))
            .fold(0u64, u64::saturating_add)
    }
}

/// Highest RTT the buckets report (10 minutes); larger samples are clamped.
const MAX_RTT_US: u64 = 600_000_000;
