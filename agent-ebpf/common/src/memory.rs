//! Memory pressure: reclaim stalls per cgroup (`RECLAIM` map) and OOM kills (`OOM_EVENTS` ring
//! buffer, `OOM_KILLS` counters).

use crate::RTT_BUCKETS;

/// Which reclaim path a stall was in.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReclaimKind {
    /// Global direct reclaim (`vmscan:mm_vmscan_direct_reclaim_*`): the node is short of memory.
    Direct = 0,
    /// Reclaim forced by a cgroup limit (`vmscan:mm_vmscan_memcg_reclaim_*`): the pod is.
    Memcg = 1,
}

impl ReclaimKind {
    pub const fn label(self) -> &'static str {
        match self {
            ReclaimKind::Direct => "direct",
            ReclaimKind::Memcg => "memcg",
        }
    }

    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(ReclaimKind::Direct),
            1 => Some(ReclaimKind::Memcg),
            _ => None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ReclaimKey {
    /// cgroup id of the task that stalled (hierarchy per `TaskOffsets::memory_hierarchy`).
    pub cgroup_id: u64,
    /// A [`ReclaimKind`].
    pub kind: u32,
    #[expect(
        clippy::pub_underscore_fields,
        reason = "explicit padding, public so both sides build the value; kernel and user layouts match byte for byte"
    )]
    pub _pad: u32,
}

/// Cumulative reclaim stalls of one (cgroup, kind).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ReclaimStats {
    pub events: u64,
    pub sum_us: u64,
    /// Pages reclaimed (the `nr_reclaimed` of the end tracepoint).
    pub pages_reclaimed: u64,
    /// Log-linear histogram of stall length in µs (see [`crate::rtt_bucket`]).
    pub buckets: [u32; RTT_BUCKETS],
}

impl ReclaimStats {
    pub const ZERO: ReclaimStats = ReclaimStats {
        events: 0,
        sum_us: 0,
        pages_reclaimed: 0,
        buckets: [0; RTT_BUCKETS],
    };
}

/// When a task entered reclaim, keyed by `pid_tgid`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReclaimStart {
    pub start_ns: u64,
    pub kind: u32,
    #[expect(
        clippy::pub_underscore_fields,
        reason = "explicit padding, public so both sides build the value; kernel and user layouts match byte for byte"
    )]
    pub _pad: u32,
}

/// One OOM kill, as `oom:mark_victim` saw it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OomEvent {
    /// The victim's cgroup id (memory hierarchy).
    pub cgroup_id: u64,
    /// The victim's v2 cgroup id (same as `cgroup_id` on v2/hybrid hosts).
    pub cgroup_v2_id: u64,
    /// `bpf_ktime_get_ns` at the kill.
    pub timestamp_ns: u64,
    pub pid: u32,
    pub tgid: u32,
    pub comm: [u8; 16],
}

/// Offsets inside the reclaim-end tracepoint record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReclaimEndFields {
    /// `unsigned long nr_reclaimed`.
    pub nr_reclaimed: u32,
    #[expect(
        clippy::pub_underscore_fields,
        reason = "explicit padding, public so both sides build the value; kernel and user layouts match byte for byte"
    )]
    pub _pad: u32,
}

pub const MAX_RECLAIM_KEYS: u32 = 4_096;
pub const MAX_RECLAIMING_TASKS: u32 = 8_192;
pub const MAX_OOM_CGROUPS: u32 = 1_024;
/// Ring buffer bytes for OOM events (a power of two, a multiple of the page size).
pub const OOM_RING_BYTES: u32 = 64 * 1024;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] integers and arrays, explicit padding.
    unsafe impl aya::Pod for super::ReclaimKey {}
    unsafe impl aya::Pod for super::ReclaimStats {}
    unsafe impl aya::Pod for super::ReclaimStart {}
    unsafe impl aya::Pod for super::OomEvent {}
    unsafe impl aya::Pod for super::ReclaimEndFields {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<ReclaimKey>(), 16);
        assert_eq!(core::mem::size_of::<ReclaimStats>(), 24 + 4 * RTT_BUCKETS);
        assert_eq!(core::mem::size_of::<ReclaimStart>(), 16);
        assert_eq!(core::mem::size_of::<OomEvent>(), 48);
    }
}
