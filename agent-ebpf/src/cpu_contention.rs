//! CPU contention: run-queue latency per cgroup. The kernel already measures it per task
//! (`task_struct.sched_info`, `CONFIG_SCHED_INFO`, the figures behind `/proc/<pid>/schedstat`):
//! `run_delay` is the total time the task spent runnable but waiting for a CPU, from wakeup or
//! preemption until it ran, and `pcount` the number of such waits. `sched_switch` reads them as a
//! task leaves the CPU: what they grew since it last left is the wait that preceded this run. The
//! delay lands in a log-linear histogram of that task's cgroup, so a noisy neighbour or a CFS
//! quota shows up on the pod that waits, not on whoever happened to be running. No clock is read
//! and nothing runs on the wakeup path: that was most of the cost of timing waits ourselves.
//!
//! A BTF tracepoint (`tp_btf`), because its task argument is typed: it finds the task's last
//! reading in task-local storage (no hashing, freed with the task). Task and cgroup fields are
//! read with offsets the agent resolved from BTF.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_probe_read_kernel,
    macros::{btf_map, btf_tracepoint, map},
    maps::HashMap,
    programs::BtfTracePointContext,
};
use graywatch_common::{
    CGROUP_V2, LostEvent, MAX_RUNQ_CGROUPS, RunqStats, TaskOffsets, rtt_bucket,
};

use crate::maps::{TaskStorage, add_u32, add_u64, count_lost};

/// Cumulative run-queue latency per cgroup id.
#[map]
pub static RUNQ: HashMap<u64, RunqStats> = HashMap::with_max_entries(MAX_RUNQ_CGROUPS, 0);

/// Each task's `sched_info` counters when it last left the CPU, and its cgroup, in the task's own
/// storage (the kernel frees it when the task exits).
#[btf_map]
static TASK_RUNQ: TaskStorage<TaskRunq> = TaskStorage::new();

/// Per-task state (kernel side only).
#[repr(C)]
#[derive(Clone, Copy)]
struct TaskRunq {
    /// `sched_info.pcount` and `sched_info.run_delay` (ns) when last read.
    pcount: u64,
    run_delay_ns: u64,
    /// The task's cgroup id, cached: reading it is a chain of four kernel reads, and tasks
    /// rarely change cgroup (re-read at most once per [`CGROUP_RECHECK_NS`]).
    cgroup_id: u64,
    /// `sched_info.last_arrival` (the run queue's clock, ns) when the cgroup id was read.
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
    task_sched_info: 0,
    sched_info_pcount: 0,
    sched_info_run_delay: 0,
    sched_info_last_arrival: 0,
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

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
/// unsigned int prev_state)`: `prev` leaves the CPU.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> u32 {
    match try_sched_switch(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

fn try_sched_switch(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let prev: *mut c_void = ctx.arg(1);
    let o = task_offsets();
    // `prev` is a BTF task pointer: its fields load directly (the verifier checks each load
    // against the kernel's BTF and makes it fault-safe), no helper call per field.
    #[expect(
        clippy::cast_ptr_alignment,
        reason = "BTF offsets of u64 and pid_t members of task_struct, aligned to their types"
    )]
    let field = |offset: u32| -> u64 {
        // SAFETY: a field of `struct task_struct` at an offset this kernel's BTF gave.
        unsafe { core::ptr::read_volatile(prev.cast::<u8>().add(offset as usize).cast::<u64>()) }
    };
    #[expect(clippy::cast_ptr_alignment, reason = "as above")]
    // SAFETY: as above (`pid_t`).
    let pid = unsafe { core::ptr::read_volatile(prev.cast::<u8>().add(o.task_pid as usize).cast::<i32>()) };
    // pid 0 is this CPU's idle task, which never waits for a CPU.
    if pid == 0 {
        return Ok(());
    }
    let pcount = field(o.task_sched_info + o.sched_info_pcount);
    let run_delay_ns = field(o.task_sched_info + o.sched_info_run_delay);
    let mut first = TaskRunq {
        pcount,
        run_delay_ns,
        cgroup_id: 0,
        cgroup_checked_ns: 0,
    };
    let Some(entry) = TASK_RUNQ.get_or_insert(prev, &mut first) else {
        // No memory for a new value, or a storage call already running on this CPU.
        count_lost(LostEvent::TaskStateMissing);
        return Err(());
    };
    // SAFETY: the task's own value, written only while the task switches out on this CPU.
    let task = unsafe { &mut *entry };
    let waits = pcount.wrapping_sub(task.pcount);
    if waits == 0 {
        // No wait since it last left (it ran on, or this is its first reading); a delay the
        // kernel added without counting a wait (a migration) joins the next counted one.
        return Ok(());
    }
    let delay_grew_ns = run_delay_ns.wrapping_sub(task.run_delay_ns);
    task.pcount = pcount;
    task.run_delay_ns = run_delay_ns;
    if waits > MAX_WAITS_BETWEEN_READS || delay_grew_ns > MAX_DELAY_BETWEEN_READS_NS {
        // Counters that went backwards: start again from these, record nothing.
        return Ok(());
    }
    // Normally one wait; several only if switches were missed (the mean of them then).
    let wait_us = delay_grew_ns / waits / 1_000;
    let now = field(o.task_sched_info + o.sched_info_last_arrival);
    if task.cgroup_id == 0 || now.wrapping_sub(task.cgroup_checked_ns) > CGROUP_RECHECK_NS {
        task.cgroup_id = task_cgroup_id(&o, prev.cast_const().cast(), o.cpu_hierarchy).ok_or(())?;
        task.cgroup_checked_ns = now;
    }
    let stats = runq_stats(task.cgroup_id).ok_or(())?;
    // SAFETY: `stats` points into a live RUNQ value; fields are updated atomically. (No sample
    // counter: the agent sums the histogram, one shared atomic add fewer per switch.)
    unsafe {
        add_u64(&raw mut (*stats).sum_us, wait_us);
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

/// More waits, or more delay, than this between two readings of one task means a counter that
/// went backwards (wrapped), not waits.
const MAX_WAITS_BETWEEN_READS: u64 = 1 << 20;
const MAX_DELAY_BETWEEN_READS_NS: u64 = 1 << 62;

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
