//! Memory pressure: how long tasks stall in reclaim, per cgroup, for global direct reclaim (the
//! node is short) and memcg reclaim (the pod hit its own limit), and every OOM kill with the
//! victim's cgroup, pid and comm.
//!
//! Reclaim begin/end fire in the stalling task's own context, so `current` is the right task;
//! `oom:mark_victim` runs in whoever triggered the OOM, so the victim is read from the raw
//! tracepoint's task pointer instead.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{HashMap, LruHashMap, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use graywatch_common::{
    CGROUP_V2, LostEvent, MAX_OOM_CGROUPS, MAX_RECLAIM_KEYS, MAX_RECLAIMING_TASKS, OOM_RING_BYTES, OomEvent,
    ReclaimEndFields, ReclaimKey, ReclaimKind, ReclaimStart, ReclaimStats, rtt_bucket,
};

use crate::{
    cpu_contention::{task_cgroup_id, task_offsets},
    maps::{add_u32, add_u64, count_lost},
};

/// Cumulative reclaim stalls per (cgroup, kind).
#[map]
pub static RECLAIM: HashMap<ReclaimKey, ReclaimStats> = HashMap::with_max_entries(MAX_RECLAIM_KEYS, 0);

/// Tasks currently in reclaim, by `pid_tgid`. LRU so a missed end event cannot pin an entry.
#[map]
static RECLAIMING: LruHashMap<u64, ReclaimStart> = LruHashMap::with_max_entries(MAX_RECLAIMING_TASKS, 0);

/// Cumulative OOM kills per victim cgroup: the count survives a full ring buffer.
#[map]
pub static OOM_KILLS: HashMap<u64, u64> = HashMap::with_max_entries(MAX_OOM_CGROUPS, 0);

/// One record per OOM kill, for the agent to log and attribute.
#[map]
pub static OOM_EVENTS: RingBuf = RingBuf::with_byte_size(OOM_RING_BYTES, 0);

#[unsafe(no_mangle)]
static RECLAIM_END_FIELDS: ReclaimEndFields = ReclaimEndFields {
    nr_reclaimed: 8,
    _pad: 0,
};

/// 1 when `oom:mark_victim`'s first argument is the victim's `task_struct *` (kernels whose
/// event carries comm/uid), 0 when it is only the pid (older kernels); set by the agent.
#[unsafe(no_mangle)]
static OOM_ARG_IS_TASK: u32 = 1;

static ZERO_RECLAIM: ReclaimStats = ReclaimStats::ZERO;

#[tracepoint]
pub fn direct_reclaim_begin(_ctx: TracePointContext) -> u32 {
    reclaim_begin(ReclaimKind::Direct);
    0
}

#[tracepoint]
pub fn memcg_reclaim_begin(_ctx: TracePointContext) -> u32 {
    reclaim_begin(ReclaimKind::Memcg);
    0
}

#[tracepoint]
pub fn direct_reclaim_end(ctx: TracePointContext) -> u32 {
    match reclaim_end(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

#[tracepoint]
pub fn memcg_reclaim_end(ctx: TracePointContext) -> u32 {
    match reclaim_end(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

#[inline(always)]
fn reclaim_begin(kind: ReclaimKind) {
    let start = ReclaimStart {
        // SAFETY: a helper without preconditions.
        start_ns: unsafe { bpf_ktime_get_ns() },
        kind: kind as u32,
        _pad: 0,
    };
    if RECLAIMING.insert(bpf_get_current_pid_tgid(), start, 0).is_err() {
        count_lost(LostEvent::ReclaimMapFull);
    }
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "the stall is clamped to u32::MAX first; the verifier rejects the program when this is written with try_from"
)]
fn reclaim_end(ctx: &TracePointContext) -> Result<(), ()> {
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let id = bpf_get_current_pid_tgid();
    // SAFETY: value copied out of a live entry.
    let start = unsafe { RECLAIMING.get(id) }.copied().ok_or(())?;
    let _ = RECLAIMING.remove(id);
    // SAFETY: a static in .rodata written by the loader.
    let fields = unsafe { core::ptr::read_volatile(&raw const RECLAIM_END_FIELDS) };
    // SAFETY: offset from this kernel's format file.
    let pages = unsafe { ctx.read_at::<u64>(fields.nr_reclaimed as usize) }.unwrap_or(0);
    let key = ReclaimKey {
        cgroup_id: current_memory_cgroup()?,
        kind: start.kind,
        _pad: 0,
    };
    let stats = reclaim_stats(&key).ok_or(())?;
    let stalled_us = now.saturating_sub(start.start_ns) / 1_000;
    // SAFETY: `stats` points into a live RECLAIM value; fields are updated atomically.
    unsafe {
        add_u64(&raw mut (*stats).events, 1);
        add_u64(&raw mut (*stats).sum_us, stalled_us);
        add_u64(&raw mut (*stats).pages_reclaimed, pages);
        if let Some(slot) = (*stats)
            .buckets
            .get_mut(rtt_bucket(stalled_us.min(u64::from(u32::MAX)) as u32))
        {
            add_u32(slot, 1);
        }
    }
    Ok(())
}

#[inline(always)]
fn current_memory_cgroup() -> Result<u64, ()> {
    let o = task_offsets();
    if o.memory_hierarchy == CGROUP_V2 {
        // SAFETY: a helper without preconditions.
        return Ok(unsafe { bpf_get_current_cgroup_id() });
    }
    // SAFETY: a helper without preconditions; the task is read through bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    task_cgroup_id(task, o.memory_hierarchy).ok_or(())
}

#[inline(always)]
fn reclaim_stats(key: &ReclaimKey) -> Option<*mut ReclaimStats> {
    if let Some(stats) = RECLAIM.get_ptr_mut(key) {
        return Some(stats);
    }
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by reference, not copied onto the 512-byte BPF stack"
    )]
    let _ = RECLAIM.insert(key, &ZERO_RECLAIM, u64::from(BPF_NOEXIST));
    let stats = RECLAIM.get_ptr_mut(key);
    if stats.is_none() {
        count_lost(LostEvent::ReclaimMapFull);
    }
    stats
}

/// `mark_victim(struct task_struct *task, uid_t uid)`.
#[raw_tracepoint(tracepoint = "mark_victim")]
pub fn mark_victim(ctx: RawTracePointContext) -> u32 {
    match try_mark_victim(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

#[expect(
    clippy::cast_ptr_alignment,
    clippy::cast_possible_truncation,
    reason = "bpf_probe_read_kernel copies bytes, so the field pointers need no alignment; \
              on older kernels the u64 argument holds a 32-bit pid"
)]
fn try_mark_victim(ctx: &RawTracePointContext) -> Result<(), ()> {
    let o = task_offsets();
    // SAFETY: a static in .rodata written by the loader.
    let arg_is_task = unsafe { core::ptr::read_volatile(&raw const OOM_ARG_IS_TASK) } != 0;
    let arg0: u64 = ctx.arg(0);
    let mut event = OomEvent {
        // SAFETY: a helper without preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        ..OomEvent::default()
    };
    if arg_is_task {
        let task = arg0 as *const u8;
        event.cgroup_id = task_cgroup_id(task, o.memory_hierarchy).ok_or(())?;
        event.cgroup_v2_id = task_cgroup_id(task, CGROUP_V2).unwrap_or(0);
        // SAFETY: reads go through bpf_probe_read_kernel.
        unsafe {
            event.pid = bpf_probe_read_kernel(task.add(o.task_pid as usize).cast::<u32>()).unwrap_or(0);
            event.tgid = bpf_probe_read_kernel(task.add(o.task_tgid as usize).cast::<u32>()).unwrap_or(0);
            event.comm = bpf_probe_read_kernel(task.add(o.task_comm as usize).cast::<[u8; 16]>()).unwrap_or([0; 16]);
        }
    } else {
        // Older kernels pass only the pid; the OOM was triggered inside the victim's memory
        // cgroup, so the triggering task's cgroup is the victim's.
        event.pid = arg0 as u32;
        event.tgid = event.pid;
        event.cgroup_id = current_memory_cgroup()?;
        // SAFETY: a helper without preconditions.
        event.cgroup_v2_id = unsafe { bpf_get_current_cgroup_id() };
    }
    count_oom(event.cgroup_id);
    if OOM_EVENTS.output::<OomEvent>(&event, 0).is_err() {
        count_lost(LostEvent::OomRingFull);
    }
    Ok(())
}

#[inline(always)]
fn count_oom(cgroup_id: u64) {
    if let Some(count) = OOM_KILLS.get_ptr_mut(cgroup_id) {
        add_u64(count, 1);
        return;
    }
    let _ = OOM_KILLS.insert(cgroup_id, 0u64, u64::from(BPF_NOEXIST));
    match OOM_KILLS.get_ptr_mut(cgroup_id) {
        Some(count) => add_u64(count, 1),
        None => {
            count_lost(LostEvent::ReclaimMapFull);
        }
    }
}
