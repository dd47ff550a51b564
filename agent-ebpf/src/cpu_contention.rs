//! CPU contention: run-queue latency per cgroup, the runqlat method. A task's clock starts when
//! it becomes runnable (`sched_wakeup`, `sched_wakeup_new`, or being preempted while still
//! runnable in `sched_switch`) and stops when `sched_switch` picks it. The delay lands in a
//! log-linear histogram of the *picked* task's cgroup, so a noisy neighbour or a CFS quota shows
//! up on the pod that waits, not on whoever happened to be running.
//!
//! BTF tracepoints (`tp_btf`), because the classic ones give a pid but not the task pointer:
//! the task pointer finds the task's clock in task-local storage (no hashing, freed with the
//! task) and its cgroup, whose chain is read with offsets the agent resolved from BTF.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_map, btf_tracepoint, map},
    maps::{HashMap, PerCpuArray},
    programs::BtfTracePointContext,
};
use graywatch_common::{CGROUP_V2, LostEvent, MAX_RUNQ_CGROUPS, RunqStats, TaskOffsets, rtt_bucket};

use crate::maps::{TaskStorage, add_u32, add_u64, count_lost};

/// Cumulative run-queue latency per cgroup id.
#[map]
pub static RUNQ: HashMap<u64, RunqStats> = HashMap::with_max_entries(MAX_RUNQ_CGROUPS, 0);

/// When each runnable task started waiting, in the task's own storage: a pointer chase instead
/// of a hash lookup per switch (the program's main cost with a hash map), and no bound to size:
/// the kernel frees a task's value when the task exits. The value is kept (the cached cgroup id
/// is worth keeping) but the stamp is cleared when the task is picked, so a switch-in that no
/// traced wakeup or preemption preceded (a task already runnable when the agent started, a
/// wakeup path the tracepoints do not see) is skipped instead of measured from a stale stamp.
#[btf_map]
static RUNNABLE: TaskStorage<RunnableTask> = TaskStorage::new();

/// This CPU's idle task (its `task_struct` address), learnt when it switches out: a switch to it
/// ends no wait (the idle task is never runnable in our sense), so it needs no `RUNNABLE` lookup.
/// On a machine that idles between requests every other switch is one to the idle task.
#[map]
static IDLE_TASK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per-task state of the run-queue clock (kernel side only).
#[repr(C)]
#[derive(Clone, Copy)]
struct RunnableTask {
    /// When the task last became runnable.
    since_ns: u64,
    /// The task's cgroup id, cached: reading it is a chain of four kernel reads, and tasks
    /// rarely change cgroup (re-read at most once per [`CGROUP_RECHECK_NS`]).
    cgroup_id: u64,
    cgroup_checked_ns: u64,
}

/// How long a cached task cgroup id is trusted; bounds misattribution after a task is moved
/// (e.g. a container's init process, which runc forks and then moves into the pod's cgroup).
const CGROUP_RECHECK_NS: u64 = 1_000_000_000;

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
    cpu_hierarchy: CGROUP_V2,
    memory_hierarchy: CGROUP_V2,
    _pad: 0,
};

/// Zeroed value to insert new cgroups from (larger than the BPF stack allows).
static ZERO_RUNQ: RunqStats = RunqStats::ZERO;

/// `TASK_RUNNING`: a task switched out in this state is still runnable (preempted).
const TASK_RUNNING: u64 = 0;

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

/// The task's cgroup id in `hierarchy` ([`CGROUP_V2`] or a v1 controller's subsys index).
#[inline(always)]
pub fn task_cgroup_id(o: &TaskOffsets, task: *const u8, hierarchy: u32) -> Option<u64> {
    let id = (|| -> Result<u64, i32> {
        // SAFETY: all reads go through bpf_probe_read_kernel.
        unsafe {
            let css_set: *const u8 = read(task, o.task_cgroups)?;
            let cgroup: *const u8 = if hierarchy == CGROUP_V2 {
                read(css_set, o.css_set_dfl_cgrp)?
            } else {
                // Bounded so the verifier sees a constant-range offset.
                let index = hierarchy & 0x3f;
                let css: *const u8 = read(css_set, o.css_set_subsys + index * 8)?;
                read(css, o.css_cgroup)?
            };
            let kn: *const u8 = read(cgroup, o.cgroup_kn)?;
            read(kn, o.kernfs_node_id)
        }
    })();
    if let Ok(id) = id {
        Some(id)
    } else {
        count_lost(LostEvent::TaskReadFailed);
        None
    }
}

#[inline(always)]
fn mark_runnable(task: *mut c_void, now: u64) {
    let mut init = RunnableTask {
        since_ns: now,
        cgroup_id: 0,
        cgroup_checked_ns: 0,
    };
    match RUNNABLE.get_or_insert(task, &mut init) {
        // SAFETY: the task's own value; a racing writer stores the same kind of value.
        Some(entry) => unsafe { (*entry).since_ns = now },
        // No memory for a new value, or a storage call already running on this CPU.
        None => {
            count_lost(LostEvent::RunnableMapFull);
        }
    }
}

/// `sched_wakeup(struct task_struct *p)`.
#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup(ctx: BtfTracePointContext) -> u32 {
    // SAFETY: a helper without preconditions.
    mark_runnable(ctx.arg(0), unsafe { bpf_ktime_get_ns() });
    0
}

/// `sched_wakeup_new(struct task_struct *p)`.
#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sched_wakeup_new(ctx: BtfTracePointContext) -> u32 {
    // SAFETY: a helper without preconditions.
    mark_runnable(ctx.arg(0), unsafe { bpf_ktime_get_ns() });
    0
}

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
/// unsigned int prev_state)` (`prev_state` is an argument since 5.18).
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> u32 {
    match try_sched_switch(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

fn try_sched_switch(ctx: &BtfTracePointContext) -> Result<(), ()> {
    // The clock is read only when a stamp or a sample needs it: a switch to the idle task, or
    // to a task that was not waiting since a stamp we saw, needs none.
    let mut now = 0u64;
    let mut clock = || {
        if now == 0 {
            // SAFETY: a helper without preconditions.
            now = unsafe { bpf_ktime_get_ns() };
        }
        now
    };
    let preempt: u64 = ctx.arg(0);
    let prev: *mut c_void = ctx.arg(1);
    let next: *mut c_void = ctx.arg(2);
    let prev_state: u64 = ctx.arg(3);
    let idle_task = IDLE_TASK.get_ptr_mut(0).ok_or(())?;
    // The tracepoint fires before the switch, so `current` is still `prev`: its pid comes from a
    // helper, not from a kernel read. (pid 0 is this CPU's idle task.)
    #[expect(clippy::cast_possible_truncation, reason = "the low 32 bits are the thread id")]
    let prev_is_idle = bpf_get_current_pid_tgid() as u32 == 0;
    if prev_is_idle {
        // SAFETY: this CPU's slot, used only while a program runs on it.
        unsafe { *idle_task = prev as u64 };
    } else if preempt & 1 == 1 || prev_state & 0xffff_ffff == TASK_RUNNING {
        // A preempted task is still runnable. So is one that yielded (switched out "running"
        // without preemption), except the idle task, which leaves the CPU that way too.
        mark_runnable(prev, clock());
    }
    // SAFETY: as above.
    if next as u64 == unsafe { *idle_task } {
        return Ok(());
    }
    let o = task_offsets();
    let entry = RUNNABLE.get(next).ok_or(())?;
    // SAFETY: value pointer of a live entry, only this CPU switches `next` in.
    let task = unsafe { &mut *entry };
    let since_ns = task.since_ns;
    if since_ns == 0 {
        // Not waiting since a stamp we saw: no sample rather than a made-up one.
        return Ok(());
    }
    task.since_ns = 0;
    let now = clock();
    let waited_us = now.saturating_sub(since_ns) / 1_000;
    if task.cgroup_id == 0 || now.saturating_sub(task.cgroup_checked_ns) > CGROUP_RECHECK_NS {
        task.cgroup_id = task_cgroup_id(&o, next.cast_const().cast(), o.cpu_hierarchy).ok_or(())?;
        task.cgroup_checked_ns = now;
    }
    let cgroup_id = task.cgroup_id;
    let stats = runq_stats(cgroup_id).ok_or(())?;
    // SAFETY: `stats` points into a live RUNQ value; fields are updated atomically. (No sample
    // counter: the agent sums the histogram, one shared atomic add fewer per switch.)
    unsafe {
        add_u64(&raw mut (*stats).sum_us, waited_us);
        #[expect(
            clippy::cast_possible_truncation,
            reason = "clamped to u32::MAX first; the verifier rejects the program when this is written with try_from"
        )]
        let bucket = rtt_bucket(waited_us.min(u64::from(u32::MAX)) as u32);
        if let Some(slot) = (*stats).buckets.get_mut(bucket) {
            add_u32(slot, 1);
        }
    }
    Ok(())
}

#[inline(always)]
fn runq_stats(cgroup_id: u64) -> Option<*mut RunqStats> {
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
