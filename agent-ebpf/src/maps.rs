//! Maps shared by the programs, the globals the loader fills in, and the small helpers that
//! update them.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xchg};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_MMAPABLE, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use aya_log_ebpf::warn;
use graywatch_common::{
    DROP_SLOT_CLAIMING, DROP_SLOT_COUNT, DROP_SLOT_FREE, DROP_SLOT_HELD, DropKey, DropSlot, FlowKey, FlowStats,
    KernelOffsets, LostEvent, MAX_CONNECTING, MAX_DROP_KEYS, MAX_FLOWS, MAX_TRACKED_SOCKETS, NetSettings,
    SOCKET_KEY_ADDRESS, SOCKET_KEY_COOKIE, SocketState, TCP_PROBE_RECORD_MAX, drop_slot_index, same_words,
};

/// Cumulative network statistics per (cgroup, remote address). Shared (not per-CPU) with atomic
/// adds: a per-CPU map of histograms would cost `MAX_FLOWS` × 900 B × CPUs of kernel memory.
#[map]
pub static FLOWS: HashMap<FlowKey, FlowStats> = HashMap::with_max_entries(MAX_FLOWS, 0);

/// Cumulative drop counts per (cgroup, remote, protocol, reason), at the key's fixed slot (see
/// [`DropSlot`]). Mmapable: the agent reads it without a syscall per slot.
#[map]
pub static DROP_SLOTS: Array<DropSlot> = Array::with_max_entries(DROP_SLOT_COUNT, BPF_F_MMAPABLE);

/// Cumulative drop counts of the keys whose slot in [`DROP_SLOTS`] another key holds.
#[map]
pub static DROPS: HashMap<DropKey, u64> = HashMap::with_max_entries(MAX_DROP_KEYS, 0);

/// Per-socket state by socket cookie: the socket's flow (resolved once), when it last added an
/// RTT sample, and the last `tcp_sock.data_segs_out`, to turn the kernel's cumulative counter
/// into deltas. Entries go when the connection leaves ESTABLISHED; LRU eviction covers the rest.
#[map]
pub static SOCKETS: LruHashMap<u64, SocketState> = LruHashMap::with_max_entries(MAX_TRACKED_SOCKETS, 0);

/// Connection attempts in flight: when each socket (by `struct sock` address) entered
/// `SYN_SENT`. The entry goes when the socket leaves `SYN_SENT` (connected, refused, failed or
/// abandoned), so an address reused later finds none. A plain hash, not an LRU: an attempt that
/// finds no room is counted as lost instead of silently pushing out another one's start.
#[map]
pub static CONNECTING: HashMap<u64, u64> = HashMap::with_max_entries(MAX_CONNECTING, 0);

/// The sockets this CPU last saw in `tcp:tcp_probe` and the tick in which each last added an RTT
/// sample: most probes within that tick end here without a hash lookup. Several slots, because
/// the two ends of a local connection (or a request and its response) alternate on one CPU, and
/// with one slot every probe missed. Only ever behind `SOCKETS` (a stale entry makes a probe skip
/// a sample that `SOCKETS` would also have skipped).
#[map]
pub static LAST_PROBED: PerCpuArray<LastProbed> = PerCpuArray::with_max_entries(1, 0);

/// Sockets remembered per CPU in [`LAST_PROBED`].
pub const LAST_PROBED_SLOTS: usize = 4;

#[repr(C)]
pub struct LastProbed {
    pub slots: [ProbedSocket; LAST_PROBED_SLOTS],
    /// The slot the next socket not in `slots` replaces (round robin).
    pub next: usize,
}

#[repr(C)]
pub struct ProbedSocket {
    pub cookie: u64,
    /// See `SocketState::last_sample_tick`.
    pub last_sample_tick: u64,
}

/// Per-CPU scratch space for the copy of a `tcp:tcp_probe` record (too big for the 512-byte stack
/// next to everything else).
#[map]
pub static TCP_PROBE_SCRATCH: PerCpuArray<[u8; TCP_PROBE_RECORD_MAX]> = PerCpuArray::with_max_entries(1, 0);

/// Events a program could not record, indexed by [`LostEvent`].
#[map]
pub static LOST_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(LostEvent::COUNT, 0);

/// Filled in by the agent from BTF before load.
#[unsafe(no_mangle)]
pub(crate) static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    sock_family: 0,
    sock_daddr: 0,
    sock_v6_daddr: 0,
    sock_cgroup: 0,
    cgroup_kn: 0,
    kernfs_node_id: 0,
    tcp_sock_data_segs_out: 0,
    skb_sk: 0,
    skb_head: 0,
    skb_network_header: 0,
    skb_tcp_gso_segs: 0,
    sock_cookie: 0,
    tcp_sock_srtt_us: 0,
    sock_dport: 0,
    sock_num: 0,
    sock_state: 0,
    sock_err: 0,
    skb_protocol: 0,
};

/// Filled in by the agent from sysctls before load.
#[unsafe(no_mangle)]
static NET_SETTINGS: NetSettings = NetSettings {
    ephemeral_port_min: 32_768,
    socket_key: SOCKET_KEY_COOKIE,
};

#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "the loader writes a port (at most 65535) from ip_local_port_range"
)]
pub fn ephemeral_port_min() -> u16 {
    // SAFETY: a static in .rodata written by the loader.
    let settings = unsafe { core::ptr::read_volatile(&raw const NET_SETTINGS) };
    settings.ephemeral_port_min as u16
}

/// Whether per-socket state is keyed by the socket's address rather than its cookie
/// ([`graywatch_common::SOCKET_KEY_ADDRESS`]).
#[inline(always)]
pub fn socket_key_is_address() -> bool {
    // SAFETY: a static in .rodata written by the loader.
    let settings = unsafe { core::ptr::read_volatile(&raw const NET_SETTINGS) };
    settings.socket_key == SOCKET_KEY_ADDRESS
}

#[inline(always)]
pub fn kernel_offsets() -> KernelOffsets {
    // SAFETY: a static in .rodata; volatile so the compiler cannot fold the zero initialiser.
    unsafe { core::ptr::read_volatile(&raw const KERNEL_OFFSETS) }
}

/// One member of [`KERNEL_OFFSETS`], loaded alone. A load from the frozen `.rodata` map is a
/// constant to the verifier, which a BTF-typed load ([`btf_field`]) needs for its offset.
macro_rules! kernel_offset {
    ($member:ident) => {
        // SAFETY: a static in .rodata; volatile so the compiler cannot fold the initialiser.
        unsafe { core::ptr::read_volatile(&raw const $crate::maps::KERNEL_OFFSETS.$member) }
    };
}
pub(crate) use kernel_offset;

/// A field of the kernel object at `base`, at an offset this kernel's BTF gave.
///
/// `base` must be a BTF-typed pointer (a `tp_btf` argument, or a struct pointer loaded from
/// one): the verifier checks each such load against BTF and turns a fault into a zero, and a
/// loaded struct pointer keeps its BTF type, so chains of them need no helper call. (A pointer
/// to anything else, like `sk_buff.head`, loads as a plain number: read through it with a
/// helper.)
#[inline(always)]
pub fn btf_field<T>(base: *const u8, offset: u32) -> T {
    // SAFETY: see above; the verifier refuses the program if an offset is not such a member.
    unsafe { core::ptr::read_volatile(base.add(offset as usize).cast::<T>()) }
}

/// Zeroed value to insert new flows from: a global, because `FlowStats` is larger than the
/// 512-byte BPF stack.
static ZERO_FLOW: FlowStats = FlowStats::ZERO;

/// Counts a lost event; returns true the first time this CPU loses one of this kind, so the
/// caller can log once instead of flooding the log ring.
#[inline(always)]
pub fn count_lost(event: LostEvent) -> bool {
    match LOST_EVENTS.get_ptr_mut(event as u32) {
        Some(counter) => {
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            unsafe {
                *counter += 1;
                *counter == 1
            }
        }
        None => false,
    }
}

/// The stats slot for `key`, created zeroed on first use. `None` (counted as lost) when full.
#[inline(always)]
pub fn flow_stats<C: EbpfContext>(ctx: &C, key: &FlowKey) -> Option<*mut FlowStats> {
    if let Some(stats) = FLOWS.get_ptr_mut(key) {
        return Some(stats);
    }
    // Another CPU may insert the same key concurrently: NOEXIST makes one of us lose harmlessly.
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by reference, not copied onto the 512-byte BPF stack"
    )]
    let _ = FLOWS.insert(key, &ZERO_FLOW, u64::from(BPF_NOEXIST));
    let stats = FLOWS.get_ptr_mut(key);
    if let Some(stats) = stats {
        // SAFETY: `stats` points into a live FLOWS value. Both racing creators write a time of
        // the same instant; the agent only compares it with the value of the previous window.
        unsafe {
            if (*stats).created_ns == 0 {
                (*stats).created_ns = bpf_ktime_get_ns();
            }
        }
    }
    if stats.is_none() && count_lost(LostEvent::FlowMapFull) {
        warn!(
            ctx,
            "FLOWS map is full ({} entries): new flows are counted as lost", MAX_FLOWS
        );
    }
    stats
}

#[inline(always)]
pub fn add_u64(slot: *mut u64, value: u64) {
    // SAFETY: `slot` points into a map value that lives as long as the map. The BPF target has
    // no `AtomicU64::fetch_add` (no compare-and-swap); the intrinsic lowers to `lock +=`.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, value) };
}

#[inline(always)]
pub fn add_u32(slot: *mut u32, value: u32) {
    // SAFETY: as for add_u64.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(slot, value) };
}

#[inline(always)]
pub fn count_drop(key: &DropKey) {
    let words = key.words();
    if let Some(slot) = DROP_SLOTS.get_ptr_mut(drop_slot_index(&words)) {
        // SAFETY: `slot` points into a live array value; `state` and `count` are 8-byte aligned.
        let (state, count) = unsafe { (&raw mut (*slot).state, &raw mut (*slot).count) };
        // SAFETY: as above (a plain load; every writer of `state` stores it whole).
        match unsafe { core::ptr::read_volatile(state) } {
            DROP_SLOT_HELD => {
                // SAFETY: as above; the key was written before `state` became HELD.
                if same_words(&unsafe { (*slot).key.words() }, &words) {
                    add_u64(count, 1);
                    return;
                }
            }
            DROP_SLOT_FREE if compare_and_swap(state, DROP_SLOT_FREE, DROP_SLOT_CLAIMING) => {
                // SAFETY: as above; this program holds the slot while it is CLAIMING, and the
                // agent left it zeroed when it freed it.
                unsafe {
                    (*slot).key = *key;
                    core::ptr::write_volatile(count, 1);
                    // Publishes the key and the count: an exchange is ordered after them.
                    atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(state, DROP_SLOT_HELD);
                }
                return;
            }
            _ => {}
        }
    }
    if let Some(count) = DROPS.get_ptr_mut(key) {
        add_u64(count, 1);
        return;
    }
    let _ = DROPS.insert(key, 0u64, u64::from(BPF_NOEXIST));
    match DROPS.get_ptr_mut(key) {
        Some(count) => add_u64(count, 1),
        None => {
            count_lost(LostEvent::DropMapFull);
        }
    }
}

/// Sets `*cell` from `expected` to `new` if it still holds `expected`: how a program claims a
/// free slot (`RUNQ_SLOTS`, `DROP_SLOTS`); `false` when another CPU changed it first.
#[inline(always)]
pub fn compare_and_swap(cell: *mut u64, expected: u64, new: u64) -> bool {
    // SAFETY: `cell` points into a live map value and is 8-byte aligned. (The BPF target has no
    // `AtomicU64::compare_exchange`; the intrinsic is the kernel's `BPF_CMPXCHG`.)
    let (_, swapped) =
        unsafe { atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(cell, expected, new) };
    swapped
}
