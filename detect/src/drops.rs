//! Which kernel packet drops say something about the node's health, by the kernel's drop reason
//! (`enum skb_drop_reason`, named without its `SKB_DROP_REASON_` prefix).
//!
//! Most drops are the network working as configured: nothing listens on a port (`NO_SOCKET`), a
//! NetworkPolicy or firewall rule (`NETFILTER_DROP`), a packet for another host, a TCP segment
//! outside the window. They come and go with workloads and say nothing about the node, so they
//! are never scored. Two kinds do:
//! - the node's own data path running out of room: memory, the per-CPU backlog, a device ring,
//!   a qdisc's queue, an unresolved neighbour's queue. Packets are lost on the node whatever the
//!   protocol, UDP (DNS) included, where no retransmit ever shows it;
//! - corrupt packets: checksum or header errors, a NIC, link or hypervisor damaging traffic.
//!
//! Per-socket limits (`SOCKET_RCVBUFF`, `SOCKET_BACKLOG`, `TCP_OFO_QUEUE_PRUNE`) are left out: one
//! slow reader fills its own buffer on a healthy node. Reasons this list does not know (a newer
//! kernel's) are not scored either; the drop is still counted in the agent's metrics by name.

/// What a drop reason says about the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropClass {
    /// The node's data path ran out of room (memory, backlog, ring, qdisc, neighbour queue).
    NoRoom,
    /// The packet arrived damaged (checksum, truncated or malformed header).
    Corrupt,
    /// Policy, protocol state or an application's own limits: not the node's health.
    Unscored,
}

/// Reasons of [`DropClass::NoRoom`] besides the qdisc families (`QDISC_*`, `FQ_*`, `CAKE_*`,
/// `DUALPI2_*`: a queue discipline dropping is the node's egress queue overflowing).
const NO_ROOM: &[&str] = &[
    "NOMEM",
    "PROTO_MEM",
    "PFMEMALLOC",
    "CPU_BACKLOG",
    "FULL_RING",
    "DEV_READY",
    "NEIGH_QUEUEFULL",
    "NEIGH_FAILED",
    "NEIGH_CREATEFAIL",
];

const QDISC_PREFIXES: &[&str] = &["QDISC_", "FQ_", "CAKE_", "DUALPI2_"];

const CORRUPT: &[&str] = &[
    "TCP_CSUM",
    "UDP_CSUM",
    "IP_CSUM",
    "ICMP_CSUM",
    "SKB_CSUM",
    "IP_INHDR",
    "HDR_TRUNC",
    "DEV_HDR",
];

/// The class of the kernel's drop reason `reason` (e.g. `CPU_BACKLOG`).
#[must_use]
pub fn drop_class(reason: &str) -> DropClass {
    if NO_ROOM.contains(&reason) || QDISC_PREFIXES.iter().any(|p| reason.starts_with(p)) {
        DropClass::NoRoom
    } else if CORRUPT.contains(&reason) {
        DropClass::Corrupt
    } else {
        DropClass::Unscored
    }
}

/// Dropped packets per second below which a scored class is never called a change: a few
/// drops a second from a full backlog or a bad checksum happen on healthy busy nodes.
pub const NO_ROOM_MIN_CHANGE_PER_S: f64 = 20.0;
/// Corrupt packets are rarer on a healthy node than lack of room, so fewer of them matter.
pub const CORRUPT_MIN_CHANGE_PER_S: f64 = 5.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nodes_own_data_path_and_damaged_packets_are_scored() {
        for reason in [
            "CPU_BACKLOG",
            "NOMEM",
            "FULL_RING",
            "QDISC_DROP",
            "QDISC_OVERLIMIT",
            "FQ_FLOW_LIMIT",
        ] {
            assert_eq!(drop_class(reason), DropClass::NoRoom, "{reason}");
        }
        for reason in ["TCP_CSUM", "UDP_CSUM", "IP_INHDR"] {
            assert_eq!(drop_class(reason), DropClass::Corrupt, "{reason}");
        }
    }

    #[test]
    fn policy_protocol_and_per_socket_drops_are_not() {
        for reason in [
            "NOT_SPECIFIED",
            "NO_SOCKET",
            "NETFILTER_DROP",
            "OTHERHOST",
            "SOCKET_RCVBUFF",
            "SOCKET_BACKLOG",
            "TCP_OFO_QUEUE_PRUNE",
            "TCP_INVALID_SEQUENCE",
            "SOME_REASON_OF_A_NEWER_KERNEL",
            "",
        ] {
            assert_eq!(drop_class(reason), DropClass::Unscored, "{reason}");
        }
    }
}
