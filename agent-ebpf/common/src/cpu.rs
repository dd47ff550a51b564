//! CPU contention: run-queue latency per cgroup (`RUNQ` map), and the task/cgroup layout facts
//! the scheduler and memory programs share to find the cgroup of a task that is not `current`.

use crate::RTT_BUCKETS;

/// Selects the v2 (default hierarchy) cgroup of a task instead of a v1 controller's.
pub const CGROUP_V2: u32 = u32::MAX;

/// Byte offsets of task and cgroup members (from BTF), and which hierarchy to attribute to.
///
/// A task's cgroup id is `task->cgroups->dfl_cgrp->kn->id` (v2, the id `bpf_get_current_cgroup_id`
/// returns) or, on a v1-only host, `task->cgroups->subsys[i]->cgroup->kn->id` for the cpu or
/// memory controller's index `i` (`enum cgroup_subsys_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskOffsets {
    /// `task_struct.pid` (`pid_t`: the thread id).
    pub task_pid: u32,
    /// `task_struct.tgid` (the process id).
    pub task_tgid: u32,
    /// `task_struct.comm` (char[16]).
    pub task_comm: u32,
    /// `task_struct.cgroups` (`struct css_set *`).
    pub task_cgroups: u32,
    /// `css_set.dfl_cgrp` (`struct cgroup *`).
    pub css_set_dfl_cgrp: u32,
    /// `css_set.subsys` (array of `struct cgroup_subsys_state *`).
    pub css_set_subsys: u32,
    /// `cgroup_subsys_state.cgroup`.
    pub css_cgroup: u32,
    /// `cgroup.kn`.
    pub cgroup_kn: u32,
    /// `kernfs_node.id`.
    pub kernfs_node_id: u32,
    /// `task_struct.sched_info.last_queued` (`CONFIG_SCHED_INFO`): when the task joined its run
    /// queue (the queue's clock, ns), 0 while it is not waiting.
    pub task_last_queued: u32,
    /// `task_struct.se.cfs_rq` (`CONFIG_FAIR_GROUP_SCHED`): the task's CFS queue on its CPU.
    pub task_cfs_rq: u32,
    /// `cfs_rq.rq`: the CPU's run queue.
    pub cfs_rq_rq: u32,
    /// `rq.clock`: the run queue's clock, the one `last_queued` was read from.
    pub rq_clock: u32,
    /// Hierarchy for CPU attribution: [`CGROUP_V2`] or the v1 cpu controller's subsys index.
    pub cpu_hierarchy: u32,
    /// Hierarchy for memory attribution: [`CGROUP_V2`] or the v1 memory controller's index.
    pub memory_hierarchy: u32,
    #[expect(
        clippy::pub_underscore_fields,
        reason = "explicit padding, public so both sides build the value; kernel and user layouts match byte for byte"
    )]
    pub _pad: u32,
}

/// Cumulative run-queue latency of one cgroup: time from a task becoming runnable (wakeup, or
/// preemption while still runnable) to it being switched in. CFS bandwidth throttling shows up
/// here too: a throttled task is runnable but not picked.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RunqStats {
    pub sum_us: u64,
    /// Log-linear histogram of the latency in µs (same buckets as RTT, see [`crate::rtt_bucket`]).
    /// Also the sample count (its sum): one shared counter fewer to update per context switch.
    pub buckets: [u32; RTT_BUCKETS],
}

impl RunqStats {
    pub const ZERO: RunqStats = RunqStats {
        sum_us: 0,
        buckets: [0; RTT_BUCKETS],
    };
}

/// Bound on cgroups with run-queue stats in the `RUNQ` hash (the cgroups whose
/// [`RunqSlot`] another cgroup holds).
pub const MAX_RUNQ_CGROUPS: u32 = 4_096;

/// log2 of the number of [`RunqSlot`]s.
pub const RUNQ_SLOT_BITS: u32 = 10;
/// Slots of the direct-mapped `RUNQ_SLOTS` array: a few times the cgroups that run on a node
/// (pods' containers, system services), so most find their slot free.
pub const RUNQ_SLOT_COUNT: u32 = 1 << RUNQ_SLOT_BITS;
/// [`RunqSlot::owner`] of a slot no cgroup holds.
pub const RUNQ_SLOT_FREE: u64 = 0;
/// [`RunqSlot::owner`] while the agent clears a slot it took back (no cgroup id is `u64::MAX`).
pub const RUNQ_SLOT_RELEASING: u64 = u64::MAX;

/// One slot of the direct-mapped run-queue array: the stats of the cgroup that holds it.
///
/// Why not only a hash: a hash lookup is most of what the per-context-switch program costs
/// (41–44 ns of ~120 ns). An array slot at a fixed index is found with a multiply and an
/// inlined bounds check. The program claims a free slot for a cgroup (compare-and-swap of
/// `owner` from [`RUNQ_SLOT_FREE`]); a cgroup whose slot another holds falls back to the
/// `RUNQ` hash. The agent takes back the slots of idle cgroups: it sets `owner` to
/// [`RUNQ_SLOT_RELEASING`], zeroes `stats`, then frees it, so a claimed slot always starts at zero.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RunqSlot {
    /// The cgroup id whose stats these are, or [`RUNQ_SLOT_FREE`] / [`RUNQ_SLOT_RELEASING`].
    pub owner: u64,
    pub stats: RunqStats,
}

/// The slot of `cgroup_id` in `RUNQ_SLOTS` (Fibonacci hashing: cgroup ids are inode numbers,
/// allocated in strides, which a plain modulo would crowd onto a few slots).
#[inline]
pub const fn runq_slot_index(cgroup_id: u64) -> u32 {
    // The shift leaves RUNQ_SLOT_BITS bits: the cast keeps them all.
    (cgroup_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - RUNQ_SLOT_BITS)) as u32
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] integers and arrays, explicit padding.
    unsafe impl aya::Pod for super::TaskOffsets {}
    unsafe impl aya::Pod for super::RunqStats {}
    unsafe impl aya::Pod for super::RunqSlot {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<TaskOffsets>(), 16 * 4);
        assert_eq!(core::mem::size_of::<RunqStats>(), 8 + 4 * RTT_BUCKETS);
        // The kernel rounds an mmapable array's values up to 8 bytes; the agent maps them as is.
        assert_eq!(core::mem::size_of::<RunqSlot>() % 8, 0);
    }

    #[test]
    fn slot_indices_spread_strided_ids() {
        // Cgroup directories take inode numbers a few dozen apart (their files take the rest).
        let mut used = [false; RUNQ_SLOT_COUNT as usize];
        let mut distinct = 0;
        for n in 0..256u64 {
            let index = runq_slot_index(1_000 + n * 48) as usize;
            assert!(index < RUNQ_SLOT_COUNT as usize);
            if !used[index] {
                used[index] = true;
                distinct += 1;
            }
        }
        // Random placement of 256 ids in 1024 slots leaves ~227 distinct; strides must not do worse.
        assert!(distinct >= 220, "{distinct}");
    }
}
