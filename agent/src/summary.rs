//! The per-window summary the agent prints (`--output json`), exports and streams.
//!
//! A signal that could not be measured is `None` (JSON `null`) with the reason in
//! [`WindowSummary::unavailable`], never a zero.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

use crate::cgroups::PodCgroup;

/// Everything one node measured in one window.
#[derive(Debug, Clone, Serialize)]
pub struct WindowSummary {
    pub node: String,
    /// Window start and length.
    pub window_start_unix_ms: u64,
    pub window_seconds: f64,
    pub network: NetworkWindow,
    /// CPU steal and run-queue latency per workload.
    pub cpu: crate::signals::host::CpuWindow,
    /// Reclaim stalls and OOM kills per workload.
    pub memory: crate::signals::host::MemoryWindow,
    /// PSI of the node and of pod (or watched) cgroups, with their OOM/high events and throttling.
    pub pressure: crate::signals::host::PressureWindow,
    /// Events the kernel programs could not record, by kind (cumulative since start).
    pub lost_events: BTreeMap<String, u64>,
    /// Signals that are not available on this host, with why.
    pub unavailable: BTreeMap<String, String>,
    /// The node's local score per family (filled in after scoring; absent while warming up).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub local_scores: Vec<LocalScoreView>,
}

/// One family's local score as printed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocalScoreView {
    pub family: String,
    pub score: f64,
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

impl From<PodCgroup> for PodRef {
    fn from(p: PodCgroup) -> Self {
        PodRef {
            uid: p.uid,
            namespace: None,
            name: None,
            container_id: p.container_id,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct NetworkWindow {
    /// Per workload × remote address.
    pub flows: Vec<FlowWindow>,
    /// Per workload, all remotes together.
    pub workloads: Vec<WorkloadNetWindow>,
    /// Kernel packet drops by workload, remote and reason.
    pub drops: Vec<DropWindow>,
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
    pub segments_sent: u64,
    pub retransmits: u64,
    /// retransmits / segments sent; `None` when nothing was sent.
    pub retransmit_ratio: Option<f64>,
    /// The window's RTT distribution as the kernel's bucket counts (small: the per-flow HDR
    /// histograms of ~24 KiB each were most of a busy node's memory), for the wire summary.
    #[serde(skip)]
    pub rtt_buckets: crate::signals::net::RttBuckets,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadNetWindow {
    pub workload: Workload,
    pub rtt: Option<RttSummary>,
    pub segments_sent: u64,
    pub retransmits: u64,
    pub retransmit_ratio: Option<f64>,
    pub remotes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct DropWindow {
    /// `None` when the packet belonged to no socket (e.g. nobody listening).
    pub workload: Option<Workload>,
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
