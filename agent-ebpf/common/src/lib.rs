//! Types shared by graywatch's kernel programs (`agent-ebpf`) and the agent's map readers.
//!
//! Every type here is `#[repr(C)]` with explicit padding and no `bool`, so the kernel and user
//! side agree on the layout byte for byte. With the `user` feature the types implement
//! [`aya::Pod`] so the agent can read them out of maps and write them as program globals.
#![no_std]

pub mod cpu;
pub mod memory;
pub mod net;
pub mod offsets;

pub use cpu::*;
pub use memory::*;
pub use net::*;
pub use offsets::*;

/// Address family numbers as the kernel uses them (`AF_INET`, `AF_INET6`).
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Index of each counter in the `LOST_EVENTS` per-CPU array: events a kernel program could not
/// record (a full map, a failed kernel read). The agent exports them so nothing is lost silently.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostEvent {
    /// `FLOWS` was full when a new (cgroup, remote) pair appeared.
    FlowMapFull = 0,
    /// `DROPS` was full when a new (cgroup, remote, reason) key appeared.
    DropMapFull = 1,
    /// A `bpf_probe_read_kernel` of socket or skb fields failed.
    KernelReadFailed = 2,
    /// `SOCKETS` could not take a new socket (LRU eviction keeps this rare).
    SocketMapFull = 3,
    /// `RUNQ` was full when a new cgroup was switched in.
    RunqMapFull = 4,
    /// `RECLAIM` or `RECLAIMING` was full.
    ReclaimMapFull = 5,
    /// `OOM_EVENTS` ring buffer had no room (the kill is still counted in `OOM_KILLS`).
    OomRingFull = 6,
    /// A `bpf_probe_read_kernel` of task or cgroup fields failed.
    TaskReadFailed = 7,
    /// `CONNECTING` could not take a new connection attempt (its outcome is then not counted).
    ConnectMapFull = 8,
}

impl LostEvent {
    pub const COUNT: u32 = 9;
    pub const ALL: [LostEvent; Self::COUNT as usize] = [
        LostEvent::FlowMapFull,
        LostEvent::DropMapFull,
        LostEvent::KernelReadFailed,
        LostEvent::SocketMapFull,
        LostEvent::RunqMapFull,
        LostEvent::ReclaimMapFull,
        LostEvent::OomRingFull,
        LostEvent::TaskReadFailed,
        LostEvent::ConnectMapFull,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            LostEvent::FlowMapFull => "flow_map_full",
            LostEvent::DropMapFull => "drop_map_full",
            LostEvent::KernelReadFailed => "kernel_read_failed",
            LostEvent::SocketMapFull => "socket_map_full",
            LostEvent::RunqMapFull => "runq_map_full",
            LostEvent::ReclaimMapFull => "reclaim_map_full",
            LostEvent::OomRingFull => "oom_ring_full",
            LostEvent::TaskReadFailed => "task_read_failed",
            LostEvent::ConnectMapFull => "connect_map_full",
        }
    }
}

/// Map sizes: bounded so the agent's kernel memory is known up front.
pub const MAX_FLOWS: u32 = 16_384;
pub const MAX_DROP_KEYS: u32 = 4_096;
pub const MAX_TRACKED_SOCKETS: u32 = 65_536;
/// Connection attempts in flight at once (a socket in `SYN_SENT`).
pub const MAX_CONNECTING: u32 = 16_384;
