//! Network latency: the smoothed RTT of every established TCP socket, sampled by `tcp:tcp_probe`
//! (which fires as segments arrive) at most once per socket and scheduler tick (`SocketState::last_sample_tick`), into
//! a log-linear histogram per (cgroup, remote address). The same hook accumulates data segments
//! sent, the denominator of the retransmit ratio; `sock:inet_sock_set_state` hands over what a
//! socket still holds when it leaves ESTABLISHED (and tells connection attempts' outcomes to
//! [`crate::net_loss`]).

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_jiffies64, bpf_probe_read_kernel_buf},
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use graywatch_common::{
    AF_INET, AF_INET6, FlowKey, LostEvent, SockStateFields, SocketState, TCP_PROBE_RECORD_MAX, TcpProbeFields,
    flow_direction, rtt_bucket,
};

use crate::{
    maps::{
        LAST_PROBED, LAST_PROBED_SLOTS, SOCKETS, TCP_PROBE_SCRATCH, add_u32, add_u64, count_lost, ephemeral_port_min,
        flow_stats, kernel_offsets, socket_key_is_address,
    },
    net_loss::{TCP_SYN_SENT, connect_progress},
    sock::{ipv4_mapped, socket_cgroup_id, socket_cookie, socket_peer, socket_ports, tcp_data_segs_out, tcp_srtt_us},
};

#[unsafe(no_mangle)]
static TCP_PROBE_FIELDS: TcpProbeFields = TcpProbeFields {
    daddr: 0,
    family: 0,
    srtt: 0,
    skaddr: 0,
    sock_cookie: 0,
    sport: 0,
    dport: 0,
    record_len: 0,
};

#[unsafe(no_mangle)]
static SOCK_STATE_FIELDS: SockStateFields = SockStateFields {
    skaddr: 0,
    oldstate: 0,
    newstate: 0,
    protocol: 0,
    family: 0,
    sport: 0,
    dport: 0,
    daddr: 0,
    daddr_v6: 0,
};

const TCP_ESTABLISHED: i32 = 1;
const IPPROTO_TCP: u16 = 6;

#[tracepoint]
pub fn tcp_probe(ctx: TracePointContext) -> u32 {
    match try_tcp_probe(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

/// Copies `N` bytes at `offset` out of the record copy (bounds-checked, so the verifier agrees).
#[inline(always)]
fn field<const N: usize>(record: &[u8; TCP_PROBE_RECORD_MAX], offset: u32) -> Result<[u8; N], ()> {
    let start = offset as usize;
    let bytes = record.get(start..start + N).ok_or(())?;
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    Ok(out)
}

/// Where `sock_cookie` sits in the record on the kernels we know (6.x). The verifier only allows
/// direct loads from a tracepoint record at offsets fixed in the instruction, not at the
/// loader-patched ones; when this kernel's format file agrees (a .rodata constant, so the
/// verifier drops the untaken branch), the hot path reads the cookie with one load instead of a
/// `bpf_probe_read_kernel` call.
const USUAL_SOCK_COOKIE_OFFSET: u32 = 112;

#[inline(always)]
#[expect(
    clippy::cast_ptr_alignment,
    reason = "the record is 8-byte aligned and its offset, 112, a multiple of 8"
)]
fn sock_cookie(ctx: &TracePointContext, fields: &TcpProbeFields) -> Result<u64, ()> {
    if fields.sock_cookie == USUAL_SOCK_COOKIE_OFFSET {
        // SAFETY: the record is at least `record_len` > 112 + 8 bytes (its format file says so).
        Ok(unsafe {
            core::ptr::read_volatile(
                (ctx.as_ptr() as *const u8)
                    .add(USUAL_SOCK_COOKIE_OFFSET as usize)
                    .cast::<u64>(),
            )
        })
    } else {
        // SAFETY: the offset comes from this kernel's tracepoint format file.
        unsafe { ctx.read_at(fields.sock_cookie as usize).map_err(|_| ()) }
    }
}

fn try_tcp_probe(ctx: &TracePointContext) -> Result<(), ()> {
    // SAFETY: a static in .rodata written by the loader.
    let fields = unsafe { core::ptr::read_volatile(&raw const TCP_PROBE_FIELDS) };
    let cookie = sock_cookie(ctx, &fields)?;
    sample_socket(
        ctx,
        cookie,
        || first_probe(ctx, &fields),
        // SAFETY: the offset comes from this kernel's tracepoint format file.
        || unsafe { ctx.read_at(fields.srtt as usize).map_err(|_| ()) },
    )
}

/// `tcp_probe` where the tracepoint record has no socket address (6.1: `skaddr` came later):
/// the raw tracepoint hands over the `struct sock *` itself, and everything is read from it at
/// BTF offsets. Per-socket state is then keyed by that address (see `socket_key_is_address`).
#[raw_tracepoint(tracepoint = "tcp_probe")]
pub fn tcp_probe_raw(ctx: RawTracePointContext) -> u32 {
    match try_tcp_probe_raw(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

fn try_tcp_probe_raw(ctx: &RawTracePointContext) -> Result<(), ()> {
    // TP_PROTO(struct sock *sk, struct sk_buff *skb)
    let sk: u64 = ctx.arg(0);
    let offsets = kernel_offsets();
    sample_socket(
        ctx,
        sk,
        || {
            let sk_ptr = sk as *const u8;
            let (family, remote_addr) = socket_peer(&offsets, sk_ptr).ok_or(())?;
            let (sport, dport) = socket_ports(&offsets, sk_ptr).ok_or(())?;
            let cgroup_id = socket_cgroup_id(&offsets, sk_ptr).ok_or(())?;
            let flow = FlowKey {
                cgroup_id,
                remote_addr,
                family,
                direction: flow_direction(sport, dport, ephemeral_port_min()),
                _pad: [0; 5],
            };
            Ok((flow, sk, tcp_srtt_us(&offsets, sk_ptr).ok_or(())?))
        },
        || tcp_srtt_us(&offsets, sk as *const u8).ok_or(()),
    )
}

/// One probe of socket `key`: at most one RTT sample per socket and scheduler tick.
/// `first` resolves a socket seen for the first time to (flow, `struct sock` address, srtt);
/// `srtt` reads the smoothed RTT of a known one.
#[inline(always)]
fn sample_socket<C: EbpfContext>(
    ctx: &C,
    key: u64,
    first: impl FnOnce() -> Result<(FlowKey, u64, u32), ()>,
    srtt: impl FnOnce() -> Result<u32, ()>,
) -> Result<(), ()> {
    // The tick counter, not a clock read (in a VM a pvclock read): see
    // `SocketState::last_sample_tick`. (`bpf_ktime_get_coarse_ns` would do too, but tracing
    // programs may not call it.)
    // SAFETY: bpf_jiffies64 has no preconditions.
    let now = unsafe { bpf_jiffies64() };
    let cache = LAST_PROBED.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's slots, used only while this program runs on it.
    let cache = unsafe { &mut *cache };
    let mut hit = None;
    for (i, slot) in cache.slots.iter().enumerate() {
        if slot.cookie == key {
            if slot.last_sample_tick == now {
                return Ok(());
            }
            hit = Some(i);
            break;
        }
    }
    let index = hit.unwrap_or_else(|| {
        let victim = cache.next % LAST_PROBED_SLOTS;
        cache.next = cache.next.wrapping_add(1);
        victim
    });
    let last = cache.slots.get_mut(index).ok_or(())?;
    last.cookie = key;
    let Some(state) = SOCKETS.get_ptr_mut(key) else {
        last.last_sample_tick = now;
        // Remember the socket, and take its first RTT sample.
        let (flow, sk, srtt) = first()?;
        let (segs, data_segs_out) = SocketState::first_data_segs(tcp_data_segs_out(&kernel_offsets(), sk as *const u8));
        let state = SocketState {
            flow,
            sk,
            last_sample_tick: now,
            data_segs_out,
            _pad: 0,
        };
        if SOCKETS.insert(key, state, 0).is_err() {
            count_lost(LostEvent::SocketMapFull);
        }
        return record_sample(ctx, &flow, segs, srtt);
    };
    // SAFETY: value pointer of a live LRU entry; a socket's probes (and its state changes) are
    // serialised by the socket lock.
    let state = unsafe { &mut *state };
    if state.last_sample_tick == now {
        last.last_sample_tick = now;
        return Ok(());
    }
    state.last_sample_tick = now;
    last.last_sample_tick = now;
    let segs = state.take_data_segs_sent(tcp_data_segs_out(&kernel_offsets(), state.sk as *const u8));
    let flow = state.flow;
    record_sample(ctx, &flow, segs, srtt()?)
}

/// A socket seen for the first time by `tcp:tcp_probe`: its flow, address and srtt from the
/// record (copied once instead of a kernel read per field) and the socket.
fn first_probe(ctx: &TracePointContext, fields: &TcpProbeFields) -> Result<(FlowKey, u64, u32), ()> {
    let scratch = TCP_PROBE_SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's scratch slot, used only while this program runs on it.
    let record = unsafe { &mut *scratch };
    let len = (fields.record_len as usize).min(TCP_PROBE_RECORD_MAX);
    // SAFETY: the tracepoint record is at least `record_len` bytes (from its format file).
    unsafe { bpf_probe_read_kernel_buf(ctx.as_ptr() as *const u8, &mut record[..len]).map_err(|_| ())? };
    let record: &[u8; TCP_PROBE_RECORD_MAX] = record;
    let family = u16::from_ne_bytes(field(record, fields.family)?);
    let srtt = u32::from_ne_bytes(field(record, fields.srtt)?);
    let sk = u64::from_ne_bytes(field(record, fields.skaddr)?);
    let sport = u16::from_ne_bytes(field(record, fields.sport)?);
    let dport = u16::from_ne_bytes(field(record, fields.dport)?);
    // daddr is a sockaddr_in (address at byte 4) or sockaddr_in6 (address at byte 8).
    let remote_addr = match family {
        AF_INET => ipv4_mapped(field(record, fields.daddr + 4)?),
        AF_INET6 => field(record, fields.daddr + 8)?,
        _ => return Err(()),
    };
    // Three dependent kernel reads, once per socket.
    let cgroup_id = socket_cgroup_id(&kernel_offsets(), sk as *const u8).ok_or(())?;
    let flow = FlowKey {
        cgroup_id,
        remote_addr,
        family,
        direction: flow_direction(sport, dport, ephemeral_port_min()),
        _pad: [0; 5],
    };
    Ok((flow, sk, srtt))
}

/// Adds `segs` data segments sent and (if non-zero) one RTT sample to the flow's entry.
#[inline(always)]
fn record_sample<C: EbpfContext>(ctx: &C, flow: &FlowKey, segs: u32, srtt: u32) -> Result<(), ()> {
    let stats = flow_stats(ctx, flow).ok_or(())?;
    // SAFETY: `stats` points into a live FLOWS value; fields are updated atomically.
    unsafe {
        if segs > 0 {
            add_u64(&raw mut (*stats).data_segs_out, u64::from(segs));
        }
        if srtt > 0 {
            // The volatile read hides the index's derivation from LLVM so the bounds check in
            // get_mut survives: the verifier loses track of bounds through the shifts above.
            let bucket = rtt_bucket(srtt);
            let bucket = core::ptr::read_volatile(&raw const bucket);
            if let Some(slot) = (*stats).rtt_buckets.get_mut(bucket) {
                add_u32(slot, 1);
            }
        }
    }
    Ok(())
}

/// A TCP socket changing state. Leaving ESTABLISHED: add the segments it sent since its last
/// sample to its flow (a connection shorter than the sampling interval would otherwise count
/// none) and forget it. Entering or leaving `SYN_SENT`: a connection attempt's start and outcome
/// ([`crate::net_loss::connect_progress`]).
#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    match try_inet_sock_set_state(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), ()> {
    // SAFETY: a static in .rodata written by the loader.
    let fields = unsafe { core::ptr::read_volatile(&raw const SOCK_STATE_FIELDS) };
    // SAFETY: offsets come from this kernel's tracepoint format file.
    let (protocol, oldstate, newstate) = unsafe {
        (
            ctx.read_at::<u16>(fields.protocol as usize).map_err(|_| ())?,
            ctx.read_at::<i32>(fields.oldstate as usize).map_err(|_| ())?,
            ctx.read_at::<i32>(fields.newstate as usize).map_err(|_| ())?,
        )
    };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    // SAFETY: as above.
    let sk = unsafe { ctx.read_at::<u64>(fields.skaddr as usize).map_err(|_| ())? } as *const u8;
    if oldstate == TCP_SYN_SENT || newstate == TCP_SYN_SENT {
        return connect_progress(ctx, &fields, sk, oldstate, newstate);
    }
    if oldstate != TCP_ESTABLISHED {
        return Ok(());
    }
    let offsets = kernel_offsets();
    let key = if socket_key_is_address() {
        sk as u64
    } else {
        // A socket tcp_probe never saw has no cookie yet (0) and no state.
        socket_cookie(&offsets, sk).ok_or(())?
    };
    if key == 0 {
        return Ok(());
    }
    let Some(state) = SOCKETS.get_ptr_mut(key) else {
        return Ok(());
    };
    // SAFETY: value pointer of a live LRU entry, under the socket lock.
    let (flow, segs) = unsafe {
        let state = &mut *state;
        (state.flow, state.take_data_segs_sent(tcp_data_segs_out(&offsets, sk)))
    };
    let _ = SOCKETS.remove(key);
    record_sample(ctx, &flow, segs, 0)
}
