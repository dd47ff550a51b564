//! Reading the few `struct sock` / `struct sk_buff` fields the programs need, at offsets the
//! agent resolved from BTF.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use graywatch_common::{AF_INET, AF_INET6, KernelOffsets, LostEvent};

use crate::maps::count_lost;

#[inline(always)]
unsafe fn read<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel validates the address; a bad one is an Err, not a fault.
    unsafe { bpf_probe_read_kernel(base.add(offset as usize).cast::<T>()) }
}

/// cgroup v2 id of the socket's owner: `sk->sk_cgrp_data.cgroup->kn->id`, the same value
/// `bpf_get_current_cgroup_id` returns for a task in that cgroup.
#[inline(always)]
pub fn socket_cgroup_id(offsets: &KernelOffsets, sk: *const u8) -> Option<u64> {
    let id = (|| -> Result<u64, i32> {
        // SAFETY: all reads go through bpf_probe_read_kernel.
        unsafe {
            let cgroup: *const u8 = read(sk, offsets.sock_cgroup)?;
            let kn: *const u8 = read(cgroup, offsets.cgroup_kn)?;
            read(kn, offsets.kernfs_node_id)
        }
    })();
    if let Ok(id) = id {
        Some(id)
    } else {
        count_lost(LostEvent::KernelReadFailed);
        None
    }
}

/// `skc_state` of a socket that is only a `sock_common` (an `inet_timewait_sock`).
const TCP_TIME_WAIT: u8 = 6;
/// `skc_state` of a `request_sock` (a connection still in its handshake).
const TCP_NEW_SYN_RECV: u8 = 12;

/// Whether `sk` is a full `struct sock`. A `TIME_WAIT` or `NEW_SYN_RECV` socket (as a packet
/// dropped at it names) is only a `sock_common`: reading a full socket's fields there (its
/// cgroup) reads another object's memory. `sock_common` fields (family, addresses, ports) are
/// valid on all three.
#[inline(always)]
pub fn socket_is_full(offsets: &KernelOffsets, sk: *const u8) -> bool {
    // SAFETY: bpf_probe_read_kernel.
    if let Ok(state) = unsafe { read::<u8>(sk, offsets.sock_state) } {
        state != TCP_TIME_WAIT && state != TCP_NEW_SYN_RECV
    } else {
        count_lost(LostEvent::KernelReadFailed);
        false
    }
}

/// The socket's peer address as (family, IPv6 or IPv4-mapped address); `None` for a socket of
/// another family (a Unix socket's dropped packet), which is no failed read.
#[inline(always)]
pub fn socket_peer(offsets: &KernelOffsets, sk: *const u8) -> Option<(u16, [u8; 16])> {
    // SAFETY: all reads go through bpf_probe_read_kernel.
    let peer = unsafe {
        match read::<u16>(sk, offsets.sock_family) {
            Ok(AF_INET) => read(sk, offsets.sock_daddr).map(|a| Some((AF_INET, ipv4_mapped(a)))),
            Ok(AF_INET6) => read(sk, offsets.sock_v6_daddr).map(|a| Some((AF_INET6, a))),
            Ok(_) => Ok(None),
            Err(e) => Err(e),
        }
    };
    peer.unwrap_or_else(|_| {
        count_lost(LostEvent::KernelReadFailed);
        None
    })
}

/// `sock_common.skc_cookie`: 0 until the kernel first needed the socket's cookie.
#[inline(always)]
pub fn socket_cookie(offsets: &KernelOffsets, sk: *const u8) -> Option<u64> {
    // SAFETY: bpf_probe_read_kernel.
    unsafe { read(sk, offsets.sock_cookie).ok() }
}

/// (local, remote) port in host order: `skc_num` is kept in host order, `skc_dport` in network
/// order.
#[inline(always)]
pub fn socket_ports(offsets: &KernelOffsets, sk: *const u8) -> Option<(u16, u16)> {
    // SAFETY: bpf_probe_read_kernel.
    let ports = unsafe {
        let local: u16 = read(sk, offsets.sock_num).ok()?;
        let remote: u16 = read(sk, offsets.sock_dport).ok()?;
        Some((local, u16::from_be(remote)))
    };
    if ports.is_none() {
        count_lost(LostEvent::KernelReadFailed);
    }
    ports
}

/// Smoothed RTT in µs, as `tcp:tcp_probe` reports it (`tcp_sock.srtt_us` keeps it << 3).
#[inline(always)]
pub fn tcp_srtt_us(offsets: &KernelOffsets, sk: *const u8) -> Option<u32> {
    // SAFETY: bpf_probe_read_kernel.
    unsafe { read::<u32>(sk, offsets.tcp_sock_srtt_us).ok().map(|v| v >> 3) }
}

/// `tcp_sock.data_segs_out`: segments with payload sent, retransmissions included.
#[inline(always)]
pub fn tcp_data_segs_out(offsets: &KernelOffsets, sk: *const u8) -> Option<u32> {
    // SAFETY: bpf_probe_read_kernel.
    unsafe { read(sk, offsets.tcp_sock_data_segs_out).ok() }
}

/// `sock.sk_err`: the error the kernel failed the socket with (0 if none).
#[inline(always)]
pub fn socket_error(offsets: &KernelOffsets, sk: *const u8) -> Option<i32> {
    // SAFETY: bpf_probe_read_kernel.
    let err = unsafe { read(sk, offsets.sock_err).ok() };
    if err.is_none() {
        count_lost(LostEvent::KernelReadFailed);
    }
    err
}

/// `skb->sk`, null when the packet belongs to no socket.
#[inline(always)]
pub fn skb_socket(offsets: &KernelOffsets, skb: *const u8) -> *const u8 {
    // SAFETY: bpf_probe_read_kernel.
    unsafe { read(skb, offsets.skb_sk).unwrap_or(core::ptr::null()) }
}

/// Segments in a TCP skb (`tcp_skb_pcount`), 0 if unreadable.
#[inline(always)]
pub fn skb_tcp_segments(offsets: &KernelOffsets, skb: *const u8) -> u16 {
    // SAFETY: bpf_probe_read_kernel.
    unsafe { read(skb, offsets.skb_tcp_gso_segs).unwrap_or(0) }
}

/// Source address of the IP packet in `skb` (the far end of a received packet).
#[inline(always)]
pub fn skb_source(offsets: &KernelOffsets, skb: *const u8) -> Option<(u16, [u8; 16])> {
    // SAFETY: bpf_probe_read_kernel.
    let (head, network_header): (*const u8, u16) = unsafe {
        (
            read(skb, offsets.skb_head).ok()?,
            read(skb, offsets.skb_network_header).ok()?,
        )
    };
    // SAFETY: only an address to read from; `ip_source` reads through a helper.
    ip_source(unsafe { head.add(usize::from(network_header)) })
}

/// Source address of the IP packet whose header starts at `ip`, in one read: up to the end of
/// an IPv6 source address (byte 24). An IPv4 header is at least 20 bytes, and a packet's buffer
/// goes on past it.
#[inline(always)]
pub fn ip_source(ip: *const u8) -> Option<(u16, [u8; 16])> {
    // SAFETY: bpf_probe_read_kernel validates the address.
    let header: [u8; 24] = unsafe { bpf_probe_read_kernel(ip.cast()) }.ok()?;
    match header[0] >> 4 {
        // IPv4 source at byte 12, IPv6 source at byte 8.
        4 => Some((AF_INET, ipv4_mapped([header[12], header[13], header[14], header[15]]))),
        6 => {
            let mut addr = [0u8; 16];
            addr.copy_from_slice(&header[8..24]);
            Some((AF_INET6, addr))
        }
        _ => None,
    }
}

/// `::ffff:a.b.c.d` from an IPv4 address in network order.
#[inline(always)]
pub fn ipv4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
    ]
}
