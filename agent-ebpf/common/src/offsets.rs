//! Layout facts the kernel programs need but cannot learn themselves.
//!
//! rustc emits no CO-RE relocations, so the agent reads tracepoint field offsets from tracefs
//! `format` files and kernel struct member offsets from BTF (`/sys/kernel/btf/vmlinux`) at load
//! time, and writes them into these globals before the programs are loaded.

/// Byte offsets of kernel struct members, resolved from BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct sock_common.skc_family` (u16) within `struct sock`.
    pub sock_family: u32,
    /// `struct sock_common.skc_daddr` (IPv4 peer, network order).
    pub sock_daddr: u32,
    /// `struct sock_common.skc_v6_daddr` (IPv6 peer).
    pub sock_v6_daddr: u32,
    /// `struct sock.sk_cgrp_data.cgroup` (a `struct cgroup *`).
    pub sock_cgroup: u32,
    /// `struct cgroup.kn` (a `struct kernfs_node *`).
    pub cgroup_kn: u32,
    /// `struct kernfs_node.id` (u64, the cgroup id user space sees as the directory inode).
    pub kernfs_node_id: u32,
    /// `struct tcp_sock.data_segs_out` (u32): segments with payload sent, retransmissions
    /// included.
    pub tcp_sock_data_segs_out: u32,
    /// `struct sk_buff.sk`.
    pub skb_sk: u32,
    /// `struct sk_buff.head`.
    pub skb_head: u32,
    /// `struct sk_buff.network_header` (u16 offset from `head`).
    pub skb_network_header: u32,
    /// `struct sk_buff.cb` + `struct tcp_skb_cb.tcp_gso_segs` (u16): segments in a TCP skb.
    pub skb_tcp_gso_segs: u32,
    /// `struct sock_common.skc_cookie` (u64; 0 until the kernel first needs the cookie).
    pub sock_cookie: u32,
    /// `struct tcp_sock.srtt_us` (u32, smoothed RTT in µs << 3): read directly where the
    /// `tcp:tcp_probe` record cannot be used (see [`NetSettings::socket_key`]).
    pub tcp_sock_srtt_us: u32,
    /// `struct sock_common.skc_dport` (__be16, remote port).
    pub sock_dport: u32,
    /// `struct sock_common.skc_num` (u16, local port in host order).
    pub sock_num: u32,
    /// `struct sock_common.skc_state` (u8): a `TIME_WAIT` or `NEW_SYN_RECV` socket is only a
    /// `sock_common` (an `inet_timewait_sock` / `request_sock`), with no full-socket fields.
    pub sock_state: u32,
    /// `struct sock.sk_err` (int): why the kernel failed a connection attempt (`ECONNREFUSED`,
    /// `ETIMEDOUT`, `EHOSTUNREACH`, …), set before the socket goes to `CLOSE`.
    pub sock_err: u32,
    /// `struct sk_buff.protocol` (__be16, the Ethernet protocol of the packet).
    pub skb_protocol: u32,
}

/// Field offsets inside the `tcp:tcp_probe` tracepoint record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpProbeFields {
    /// `__u8 daddr[28]`: a `sockaddr_in` or `sockaddr_in6`.
    pub daddr: u32,
    pub family: u32,
    /// `__u32 srtt`: smoothed RTT in µs (the tracepoint already shifts out `tcp_sock`'s <<3).
    pub srtt: u32,
    pub skaddr: u32,
    /// `__u64 sock_cookie`: unique for the socket's lifetime, unlike its address.
    pub sock_cookie: u32,
    /// `__u16 sport` / `dport` (host order).
    pub sport: u32,
    pub dport: u32,
    /// Bytes from the record start that cover every field above (read in one go).
    pub record_len: u32,
}

/// The largest `tcp:tcp_probe` record prefix the program copies (6.18 needs 136 bytes).
pub const TCP_PROBE_RECORD_MAX: usize = 192;

/// Host network settings the programs need.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetSettings {
    /// Low end of `net.ipv4.ip_local_port_range`: ports at or above it are ephemeral.
    pub ephemeral_port_min: u32,
    /// How the programs key per-socket state: [`SOCKET_KEY_COOKIE`] when RTT comes from the
    /// `tcp:tcp_probe` tracepoint record (it carries the socket cookie), [`SOCKET_KEY_ADDRESS`]
    /// when it comes from the raw tracepoint (kernels whose record has no socket address, 6.1).
    pub socket_key: u32,
}

/// Per-socket state is keyed by the socket cookie (unique for the socket's lifetime).
pub const SOCKET_KEY_COOKIE: u32 = 0;
/// Per-socket state is keyed by the `struct sock` address: the raw tracepoint sees no cookie
/// (the kernel makes one lazily, and only the tracepoint record's assignment asks for it).
/// An address can be reused after the socket is freed; entries leave when the socket leaves
/// ESTABLISHED, so a reuse finds no stale entry unless that hand-over was missed (LRU then).
pub const SOCKET_KEY_ADDRESS: u32 = 1;

/// Field offsets inside the `tcp:tcp_retransmit_skb` tracepoint record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpRetransmitFields {
    pub skbaddr: u32,
    pub skaddr: u32,
    pub family: u32,
    pub daddr: u32,
    pub daddr_v6: u32,
    pub sport: u32,
    pub dport: u32,
    /// `int err` of the retransmission (kernel ≥ 6.x); [`KfreeSkbFields::ABSENT`] if missing.
    pub err: u32,
}

/// Field offsets inside the `sock:inet_sock_set_state` tracepoint record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockStateFields {
    pub skaddr: u32,
    /// `int oldstate` (`TCP_ESTABLISHED` = 1, …).
    pub oldstate: u32,
    /// `int newstate` (`TCP_SYN_SENT` = 2, `TCP_CLOSE` = 7, …).
    pub newstate: u32,
    /// `__u16 protocol` (`IPPROTO_TCP` = 6).
    pub protocol: u32,
    /// `__u16 family`, `__u16 sport` / `dport` (host order), `__u8 daddr[4]`, `__u8
    /// daddr_v6[16]`: the record keeps them from before the change. The socket's own `skc_num`
    /// is already 0 when a socket that goes to `CLOSE` fires it (its port is released first).
    pub family: u32,
    pub sport: u32,
    pub dport: u32,
    pub daddr: u32,
    pub daddr_v6: u32,
}

/// Field offsets inside the `skb:kfree_skb` tracepoint record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KfreeSkbFields {
    pub skbaddr: u32,
    /// `rx_sk` (kernel ≥ 6.10); [`KfreeSkbFields::ABSENT`] when the kernel lacks it.
    pub rx_sk: u32,
    pub protocol: u32,
    pub reason: u32,
}

impl KfreeSkbFields {
    /// Marks an optional field the running kernel does not have.
    pub const ABSENT: u32 = u32::MAX;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] structs of u32 only.
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::TcpProbeFields {}
    unsafe impl aya::Pod for super::NetSettings {}
    unsafe impl aya::Pod for super::TcpRetransmitFields {}
    unsafe impl aya::Pod for super::KfreeSkbFields {}
    unsafe impl aya::Pod for super::SockStateFields {}
}
