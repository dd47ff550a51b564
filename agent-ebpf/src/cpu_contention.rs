//! CPU contention: run-queue latency per cgroup. The kernel already times each task's wait
//! (`task_struct.sched_info`, `CONFIG_SCHED_INFO`, the figures behind `/proc/<pid>/schedstat`):
//! `last_queued` is the run queue's clock when the task became runnable (wakeup, or preemption
//! while still runnable), and when the task is switched in the kernel adds `clock - last_queued`
//! to its `run_delay`. `sched_switch` fires just before that: the same difference, read from the
//! incoming task and its run queue's clock, is the wait that ends here. It lands in a log-linear
//! histogram of that task's cgroup, so a noisy neighbour or a CFS quota shows up on the pod that
//! waits, not on whoever happened to be running. No clock is read, no per-task state is kept and
//! nothing runs on the wakeup path: those were most of the cost of timing waits ourselves.
//!
//! A BTF tracepoint (`tp_btf`), because its task arguments are typed: the task's, its cgroup's
//! and its run queue's fields are plain loads the verifier checks against the kernel's BTF (and
//! makes fault-safe), at offsets the agent resolved from BTF.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_NOEXIST},
    helpers::bpf_probe_read_kernel,
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap},
    programs::BtfTracePointContext,
};
use graywatch_common::{
    CGROUP_V2, LostEvent, MAX_RUNQ_CGROUPS, RUNQ_SLOT_COUNT, RUNQ_SLOT_FREE, RunqSlot, RunqStats, TaskOffsets,
    rtt_bucket, runq_slot_index,
};

use crate::maps::{add_u32, add_u64, btf_field, compare_and_swap, count_lost};

/// Cumulative run-queue latency per cgroup, at the cgroup's fixed slot (see [`RunqSlot`]).
/// Mmapable: the agent reads it without a syscall per slot.
#[map]
pub static RUNQ_SLOTS: Array<RunqSlot> = Array::with_max_entries(RUNQ_SLOT_COUNT, BPF_F_MMAPABLE);

/// Cumulative run-queue latency of the cgroups whose slot in [`RUNQ_SLOTS`] another one holds.
#[map]
pub static RUNQ: HashMap<u64, RunqStats> = HashMap::with_max_entries(MAX_RUNQ_CGROUPS, 0);

/// Filled in by the agent from BTF before load.
#[unsafe(no_mangle)]
static TASK_OFFSETS: TaskOffsets = TaskOffsets {
    task_pid: 0,
    task_tgid: 0,
    task_comm: 0,
    task_cgroups: 0,
    css_set_dfl_cgrp: 0,
    css_set_subsys: 0,
    css_cgroup: 0,
    cgroup_kn: 0,
    kernfs_node_id: 0,
    task_last_queued: 0,
    task_cfs_rq: 0,
    cfs_rq_rq: 0,
    rq_clock: 0,
    cpu_hierarchy: CGROUP_V2,
    memory_hierarchy: CGROUP_V2,
    _pad: 0,
};

/// Zeroed value to insert new cgroups from (larger than the BPF stack allows).
static ZERO_RUNQ: RunqStats = RunqStats::ZERO;

#[inline(always)]
pub fn task_offsets() -> TaskOffsets {
    // SAFETY: a static in .rodata; volatile so the compiler cannot fold the initialiser.
    unsafe { core::ptr::read_volatile(&raw const TASK_OFFSETS) }
}

#[inline(always)]
unsafe fn read<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel validates the address; a bad one is an Err, not a fault.
    unsafe { bpf_probe_read_kernel(base.add(offset as usize).cast::<T>()) }
}

/// One member of [`TASK_OFFSETS`], loaded alone: the per-switch program needs a few of its 16.
macro_rules! task_offset {
    ($member:ident) => {
        // SAFETY: a static in .rodata; volatile so the compiler cannot fold the initialiser.
        unsafe { core::ptr::read_volatile(&raw const TASK_OFFSETS.$member) }
    };
}

/// The cgroup id of `task` in `hierarchy` ([`CGROUP_V2`] or a v1 controller's subsys index):
/// `task->cgroups->dfl_cgrp->kn->id`, or `task->cgroups->subsys[i]->cgroup->kn->id`. Each step
/// is `load(base, offset)`: a helper read for an untyped task pointer, a plain load for a
/// BTF-typed one (see [`btf_field`]).
#[inline(always)]
fn cgroup_chain<E>(
    task: *const u8,
    hierarchy: u32,
    load: impl Fn(*const u8, u32) -> Result<*const u8, E>,
) -> Result<u64, E> {
    let css_set = load(task, task_offset!(task_cgroups))?;
    let cgroup = if hierarchy == CGROUP_V2 {
        load(css_set, task_offset!(css_set_dfl_cgrp))?
    } else {
        // Bounded so the verifier sees a constant-range offset.
        let css = load(css_set, task_offset!(css_set_subsys) + (hierarchy & 0x3f) * 8)?;
        load(css, task_offset!(css_cgroup))?
    };
    let kn = load(cgroup, task_offset!(cgroup_kn))?;
    // `kernfs_node.id` is a u64, loaded as the pointer-sized word it is.
    Ok(load(kn, task_offset!(kernfs_node_id))? as u64)
}

/// The cgroup id of `task` (read through helpers) in `hierarchy` (see [`cgroup_chain`]).
#[inline(always)]
pub fn task_cgroup_id(task: *const u8, hierarchy: u32) -> Option<u64> {
    // SAFETY: bpf_probe_read_kernel validates every address.
    let helper_read = |base, offset| unsafe { read::<*const u8>(base, offset) };
    let id = cgroup_chain(task, hierarchy, helper_read).ok();
    if id.is_none() {
        count_lost(LostEvent::TaskReadFailed);
    }
    id
}

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
/// unsigned int prev_state)`: `next` is about to run on this CPU.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> u32 {
    match try_sched_switch(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

/// `task`'s cgroup id for CPU attribution, `task` a BTF-typed pointer (see [`cgroup_chain`]).
#[inline(always)]
fn btf_task_cpu_cgroup_id(task: *const u8) -> u64 {
    let loaded = cgroup_chain(task, task_offset!(cpu_hierarchy), |base, offset| {
        Ok::<_, core::convert::Infallible>(btf_field::<*const u8>(base, offset))
    });
    match loaded {
        Ok(id) => id,
        Err(never) => match never {},
    }
}

fn try_sched_switch(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let next: *const u8 = ctx.arg(2);
    let last_queued_ns: u64 = btf_field(next, task_offset!(task_last_queued));
    // 0: the task did not wait (or is this CPU's idle task, which the kernel does not account).
    if last_queued_ns == 0 {
        return Ok(());
    }
    let cfs_rq: *const u8 = btf_field(next, task_offset!(task_cfs_rq));
    let rq: *const u8 = btf_field(cfs_rq, task_offset!(cfs_rq_rq));
    let now_ns: u64 = btf_field(rq, task_offset!(rq_clock));
    let delay_ns = now_ns.wrapping_sub(last_queued_ns);
    if delay_ns > MAX_WAIT_NS {
        // A clock behind the enqueue time (a read that faulted to zero): nothing to record.
        return Ok(());
    }
    let cgroup_id = btf_task_cpu_cgroup_id(next);
    if cgroup_id == 0 {
        count_lost(LostEvent::TaskReadFailed);
        return Err(());
    }
    let wait_us = delay_ns / 1_000;
    let stats = runq_stats(cgroup_id).ok_or(())?;
    // SAFETY: `stats` points into a live RUNQ value; fields are updated atomically. (No sample
    // counter: the agent sums the histogram, one shared atomic add fewer per switch.)
    unsafe {
        // Most waits are under a microsecond: they add nothing to the sum, so skip the add.
        if wait_us != 0 {
            add_u64(&raw mut (*stats).sum_us, wait_us);
        }
        #[expect(
            clippy::cast_possible_truncation,
            reason = "clamped to u32::MAX first; the verifier rejects the program when this is written with try_from"
        )]
        let bucket = rtt_bucket(wait_us.min(u64::from(u32::MAX)) as u32);
        if let Some(slot) = (*stats).buckets.get_mut(bucket) {
            add_u32(slot, 1);
        }
    }
    Ok(())
}

/// A wait longer than this is a clock read that went wrong, not a wait (2^62 ns is 146 years).
const MAX_WAIT_NS: u64 = 1 << 62;

#[inline(always)]
fn runq_stats(cgroup_id: u64) -> Option<*mut RunqStats> {
    if let Some(slot) = RUNQ_SLOTS.get_ptr_mut(runq_slot_index(cgroup_id)) {
        // SAFETY: `slot` points into a live array value; `owner` is 8-byte aligned.
        let owner = unsafe { &raw mut (*slot).owner };
        // SAFETY: as above (a plain load: the agent's and other CPUs' writes are single stores).
        let holder = unsafe { core::ptr::read_volatile(owner) };
        if holder == cgroup_id || (holder == RUNQ_SLOT_FREE && compare_and_swap(owner, RUNQ_SLOT_FREE, cgroup_id)) {
            // SAFETY: as above.
            return Some(unsafe { &raw mut (*slot).stats });
        }
    }
    if let Some(stats) = RUNQ.get_ptr_mut(cgroup_id) {
        return Some(stats);
    }
    // Concurrent first inserts of one cgroup: NOEXIST lets one win harmlessly.
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by reference, not copied onto the 512-byte BPF stack"
    )]
    let _ = RUNQ.insert(cgroup_id, &ZERO_RUNQ, u64::from(BPF_NOEXIST));
    let stats = RUNQ.get_ptr_mut(cgroup_id);
    if stats.is_none() {
        count_lost(LostEvent::RunqMapFull);
    }
    stats
}
