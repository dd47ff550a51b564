//! Packet loss: TCP retransmissions (`tcp:tcp_retransmit_skb`) and connection attempts nobody
//! answered (`sock:inet_sock_set_state`, from [`crate::net_latency`]'s program) per (cgroup, remote
//! address), and kernel packet drops with the kernel's own reason (`skb:kfree_skb`).

use core::mem::MaybeUninit;

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use graywatch_common::{
    AF_INET, AF_INET6, DropKey, FlowKey, KernelOffsets, KfreeSkbFields, LostEvent, SockStateFields,
    TcpRetransmitFields, connect_unanswered, flow_direction,
};

use crate::{
    maps::{
        CONNECTING, SOCKETS, add_u64, btf_field, count_drop, count_lost, ephemeral_port_min, flow_stats, kernel_offset,
        kernel_offsets, socket_key_is_address,
    },
    sock::{
        ip_source, ipv4_mapped, skb_socket, skb_source, skb_tcp_segments, socket_cgroup_id, socket_cookie,
        socket_error, socket_is_full, socket_peer, tcp_data_segs_out,
    },
};

/// `TCP_SYN_SENT`: a connection attempt waiting for its answer.
pub const TCP_SYN_SENT: i32 = 2;
const TCP_CLOSE: i32 = 7;

#[unsafe(no_mangle)]
static TCP_RETRANSMIT_FIELDS: TcpRetransmitFields = TcpRetransmitFields {
    skbaddr: 0,
    skaddr: 0,
    family: 0,
    daddr: 0,
    daddr_v6: 0,
    sport: 0,
    dport: 0,
    err: 0,
};

#[unsafe(no_mangle)]
static KFREE_SKB_FIELDS: KfreeSkbFields = KfreeSkbFields {
    skbaddr: 0,
    rx_sk: 0,
    protocol: 0,
    reason: 0,
};

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    match try_tcp_retransmit_skb(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

fn try_tcp_retransmit_skb(ctx: &TracePointContext) -> Result<(), ()> {
    // SAFETY: a static in .rodata written by the loader.
    let fields = unsafe { core::ptr::read_volatile(&raw const TCP_RETRANSMIT_FIELDS) };
    let offsets = kernel_offsets();
    // SAFETY: offsets come from this kernel's tracepoint format file.
    let (family, sk, skb, sport, dport) = unsafe {
        (
            ctx.read_at::<u16>(fields.family as usize).map_err(|_| ())?,
            ctx.read_at::<u64>(fields.skaddr as usize).map_err(|_| ())? as *const u8,
            ctx.read_at::<u64>(fields.skbaddr as usize).map_err(|_| ())? as *const u8,
            ctx.read_at::<u16>(fields.sport as usize).map_err(|_| ())?,
            ctx.read_at::<u16>(fields.dport as usize).map_err(|_| ())?,
        )
    };
    // A failed retransmission sent nothing (the kernel does not count it either).
    if fields.err != KfreeSkbFields::ABSENT {
        // SAFETY: offset from the format file.
        let err = unsafe { ctx.read_at::<i32>(fields.err as usize).map_err(|_| ())? };
        if err != 0 {
            return Ok(());
        }
    }
    let remote_addr = record_remote(ctx, family, fields.daddr, fields.daddr_v6)?.ok_or(())?;
    let cgroup_id = socket_cgroup_id(&offsets, sk).ok_or(())?;
    // Same key as tcp_probe's, so retransmits and segments sent land in one entry.
    let direction = flow_direction(sport, dport, ephemeral_port_min());
    let key = FlowKey {
        cgroup_id,
        remote_addr,
        family,
        direction,
        _pad: [0; 5],
    };
    let stats = flow_stats(ctx, &key).ok_or(())?;
    let segments = u64::from(skb_tcp_segments(&offsets, skb).max(1));
    // Segments sent are otherwise handed over when an ACK arrives (tcp_probe): towards a peer
    // that stopped answering (a blackhole) none arrives, so hand them over here as well, or the
    // loss ratio of the worst gray failure would have no denominator.
    let sent = segments_sent_at_retransmit(&offsets, sk, segments);
    // SAFETY: `stats` points into a live FLOWS value.
    unsafe {
        add_u64(&raw mut (*stats).retransmits, segments);
        if sent > 0 {
            add_u64(&raw mut (*stats).data_segs_out, sent);
        }
    }
    Ok(())
}

/// Data segments `sk` sent since its flow was last brought up to date: from its `SOCKETS` state
/// and `tcp_sock.data_segs_out` (which counts the retransmission just made). A socket
/// `tcp_probe` has not seen yet has no state: its retransmitted segments are what it is known to
/// have sent.
#[inline(always)]
fn segments_sent_at_retransmit(offsets: &KernelOffsets, sk: *const u8, retransmitted: u64) -> u64 {
    let key = if socket_key_is_address() {
        sk as u64
    } else {
        socket_cookie(offsets, sk).unwrap_or(0)
    };
    let state = if key == 0 { None } else { SOCKETS.get_ptr_mut(key) };
    match state {
        // SAFETY: value pointer of a live LRU entry; the retransmit runs under the socket lock,
        // as tcp_probe and the state change do.
        Some(state) => u64::from(unsafe { (*state).take_data_segs_sent(tcp_data_segs_out(offsets, sk)) }),
        None => retransmitted,
    }
}

/// The far end of a TCP tracepoint record as an IPv6 or IPv4-mapped address, from its `daddr` /
/// `daddr_v6` fields (offsets from the format file); `None` for another family.
#[inline(always)]
fn record_remote(ctx: &TracePointContext, family: u16, daddr: u32, daddr_v6: u32) -> Result<Option<[u8; 16]>, ()> {
    // SAFETY: offsets come from this kernel's tracepoint format file.
    unsafe {
        Ok(match family {
            AF_INET => Some(ipv4_mapped(ctx.read_at(daddr as usize).map_err(|_| ())?)),
            AF_INET6 => Some(ctx.read_at(daddr_v6 as usize).map_err(|_| ())?),
            _ => None,
        })
    }
}

/// A connection attempt's progress (`sk` entered or left `SYN_SENT`): its start is remembered;
/// an attempt that closes unanswered (see [`connect_unanswered`]) counts towards its flow. One
/// that began before the agent has no start and is not judged.
#[inline(always)]
pub fn connect_progress(
    ctx: &TracePointContext,
    fields: &SockStateFields,
    sk: *const u8,
    oldstate: i32,
    newstate: i32,
) -> Result<(), ()> {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = sk as u64;
    if newstate == TCP_SYN_SENT {
        if CONNECTING.insert(key, now, 0).is_err() {
            count_lost(LostEvent::ConnectMapFull);
        }
        return Ok(());
    }
    // SAFETY: a plain u64 copied out of the entry at once.
    let started = unsafe { CONNECTING.get(key).copied() };
    let _ = CONNECTING.remove(key);
    let Some(started) = started else { return Ok(()) };
    if oldstate != TCP_SYN_SENT || newstate != TCP_CLOSE {
        return Ok(());
    }
    let offsets = kernel_offsets();
    if !connect_unanswered(socket_error(&offsets, sk).ok_or(())?, now.wrapping_sub(started)) {
        return Ok(());
    }
    // From the record: the socket's port is already released (see `SockStateFields`).
    // SAFETY: offsets come from this kernel's tracepoint format file.
    let (family, sport, dport) = unsafe {
        (
            ctx.read_at::<u16>(fields.family as usize).map_err(|_| ())?,
            ctx.read_at::<u16>(fields.sport as usize).map_err(|_| ())?,
            ctx.read_at::<u16>(fields.dport as usize).map_err(|_| ())?,
        )
    };
    let Some(remote_addr) = record_remote(ctx, family, fields.daddr, fields.daddr_v6)? else {
        return Ok(());
    };
    let flow = FlowKey {
        cgroup_id: socket_cgroup_id(&offsets, sk).ok_or(())?,
        remote_addr,
        family,
        direction: flow_direction(sport, dport, ephemeral_port_min()),
        _pad: [0; 5],
    };
    let stats = flow_stats(ctx, &flow).ok_or(())?;
    // SAFETY: `stats` points into a live FLOWS value.
    unsafe { add_u64(&raw mut (*stats).unanswered_connects, 1) };
    Ok(())
}

#[tracepoint]
pub fn kfree_skb(ctx: TracePointContext) -> u32 {
    match try_kfree_skb(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

fn try_kfree_skb(ctx: &TracePointContext) -> Result<(), ()> {
    // SAFETY: a static in .rodata written by the loader.
    let fields = unsafe { core::ptr::read_volatile(&raw const KFREE_SKB_FIELDS) };
    let offsets = kernel_offsets();
    // SAFETY: offsets come from this kernel's tracepoint format file.
    let (skb, protocol, reason) = unsafe {
        (
            ctx.read_at::<u64>(fields.skbaddr as usize).map_err(|_| ())? as *const u8,
            ctx.read_at::<u16>(fields.protocol as usize).map_err(|_| ())?,
            ctx.read_at::<u32>(fields.reason as usize).map_err(|_| ())?,
        )
    };
    // The receiving socket if the kernel names one, else the socket the skb is charged to.
    let mut sk: *const u8 = core::ptr::null();
    if fields.rx_sk != KfreeSkbFields::ABSENT {
        // SAFETY: offset from the format file.
        sk = unsafe { ctx.read_at::<u64>(fields.rx_sk as usize).unwrap_or(0) as *const u8 };
    }
    if sk.is_null() {
        sk = skb_socket(&offsets, skb);
    }
    count_skb_drop(sk, protocol, reason, || skb_source(&offsets, skb));
    Ok(())
}

/// Counts one dropped packet by workload, remote address, protocol and reason: charged to
/// `sk`'s workload and named by its peer when there is a socket, else named by the packet's
/// source (`packet_source`).
#[inline(always)]
fn count_skb_drop(sk: *const u8, protocol: u16, reason: u32, packet_source: impl Fn() -> Option<(u16, [u8; 16])>) {
    let mut slot = MaybeUninit::<DropKey>::uninit();
    let key = slot.as_mut_ptr();
    // SAFETY: `key` points at this frame's `slot`, zeroed word by word before the fields are
    // written (four aligned words cover the key, which has no padding). The zeros are volatile
    // stores: zeroing the key as a value is merged into a `memset`, which a kernel program calls
    // as a byte-by-byte loop (~130 instructions).
    unsafe {
        for i in 0..4 {
            core::ptr::write_volatile(key.cast::<u64>().add(i), 0);
        }
        (*key).protocol = protocol;
        (*key).reason = reason;
    }
    let peer = if sk.is_null() {
        packet_source()
    } else {
        // Only a drop with a socket needs the socket offsets (a datagram to a closed port has none).
        let offsets = kernel_offsets();
        // A `TIME_WAIT` or handshake socket has no cgroup of its own: charged to no workload.
        if socket_is_full(&offsets, sk) {
            // SAFETY: as above.
            unsafe { (*key).cgroup_id = socket_cgroup_id(&offsets, sk).unwrap_or(0) };
        }
        socket_peer(&offsets, sk).or_else(packet_source)
    };
    // Filled in only where there is an address: a select between the peer and zeros would read
    // the payload of a `None`, a register the verifier rejects as never written.
    if let Some((family, addr)) = peer
        && (family == AF_INET || family == AF_INET6)
    {
        // SAFETY: as above.
        unsafe {
            (*key).family = family;
            (*key).remote_addr = addr;
        }
    }
    // SAFETY: every byte of the key was written above.
    count_drop(unsafe { slot.assume_init_ref() });
}

/// `kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason)` as a BTF
/// tracepoint (kernels before 6.11, whose tracepoint has no `rx_sk`). The preferred form: the
/// arguments and the skb's fields are plain loads the verifier checks, where the `skb:kfree_skb`
/// program above pays a helper call for each (~30 ns apiece, most of its cost).
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb_btf(ctx: BtfTracePointContext) -> u32 {
    let skb: *const u8 = ctx.arg(0);
    let reason: u64 = ctx.arg(2);
    record_drop(skb, reason, core::ptr::null());
    0
}

/// As [`kfree_skb_btf`], for kernels whose tracepoint also names the receiving socket
/// (`struct sock *rx_sk`, 6.11+): a separate program, since a BTF tracepoint program may only
/// read the arguments the kernel's prototype has.
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb_btf_rx_sk(ctx: BtfTracePointContext) -> u32 {
    let skb: *const u8 = ctx.arg(0);
    let reason: u64 = ctx.arg(2);
    let rx_sk: *const u8 = ctx.arg(3);
    record_drop(skb, reason, rx_sk);
    0
}

/// Counts one dropped `skb` (a BTF pointer): the skb's socket, protocol, head and network header
/// are plain loads; only the IP header is a helper read (`head` is not a BTF struct pointer).
#[inline(always)]
fn record_drop(skb: *const u8, reason: u64, rx_sk: *const u8) {
    // The receiving socket if the kernel names one, else the socket the skb is charged to.
    let sk: *const u8 = if rx_sk.is_null() {
        btf_field(skb, kernel_offset!(skb_sk))
    } else {
        rx_sk
    };
    // The tracepoint record holds the protocol in host order; the skb in network order.
    let protocol = u16::from_be(btf_field(skb, kernel_offset!(skb_protocol)));
    #[expect(clippy::cast_possible_truncation, reason = "an enum value in a 64-bit argument slot")]
    let reason = reason as u32;
    count_skb_drop(sk, protocol, reason, || {
        let head: *const u8 = btf_field(skb, kernel_offset!(skb_head));
        let network_header: u16 = btf_field(skb, kernel_offset!(skb_network_header));
        // SAFETY: only an address to read from; `ip_source` reads through a helper.
        ip_source(unsafe { head.add(usize::from(network_header)) })
    });
}
