//! Window summary → `graywatch.v1.NodeSummary`, the message streamed to the aggregator.

use graywatch_detect::Family as DetectFamily;
use graywatch_proto::{
    PROTOCOL_VERSION,
    v1::{Family, FamilyFigures, LocalScore, NodeIdentity, NodeSummary, PeerStats, Window},
};
use hdrhistogram::serialization::{Serializer, V2Serializer};

use crate::{
    scoring::{LocalFamilyScore, peers},
    summary::WindowSummary,
};

/// Who is reporting (stable for the agent's lifetime).
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub node_name: String,
    pub boot_id: String,
    pub addresses: Vec<String>,
    /// This agent incarnation: when it started, in ns of CLOCK_BOOTTIME (see [`boottime_ns`]).
    pub agent_started_ns: u64,
}

/// Now on the node's CLOCK_BOOTTIME, in ns (0 if the clock cannot be read, which the aggregator
/// treats as "incarnation unknown").
///
/// The clock is the kernel's, shared by every container on the node and monotonic for the whole
/// boot (suspend included, no wall-clock steps), so an agent started later on the same boot id
/// always reads a larger value: the aggregator orders agent incarnations by it.
#[must_use]
pub fn boottime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).map_or(0, |t| {
        let ns = i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec());
        u64::try_from(ns).unwrap_or(0)
    })
}

impl Identity {
    /// The node's identity from the host: boot id from procfs and non-loopback addresses; the
    /// incarnation is now.
    pub fn from_host(node_name: &str, procfs: &std::path::Path) -> Self {
        let boot_id = std::fs::read_to_string(procfs.join("sys/kernel/random/boot_id"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let mut addresses: Vec<String> = nix::ifaddrs::getifaddrs()
            .map(|ifaddrs| {
                ifaddrs
                    .filter_map(|ifa| ifa.address)
                    .filter_map(|addr| {
                        addr.as_sockaddr_in()
                            .map(|v4| std::net::IpAddr::V4(v4.ip()))
                            .or_else(|| addr.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
                    })
                    .filter(|ip| !ip.is_loopback())
                    .map(|ip| ip.to_string())
                    .collect()
            })
            .unwrap_or_default();
        addresses.sort();
        addresses.dedup();
        Self {
            node_name: node_name.to_owned(),
            boot_id,
            addresses,
            agent_started_ns: boottime_ns(),
        }
    }
}

pub fn proto_family(family: DetectFamily) -> Family {
    match family {
        DetectFamily::NetworkLatency => Family::NetworkLatency,
        DetectFamily::PacketLoss => Family::PacketLoss,
        DetectFamily::CpuContention => Family::CpuContention,
        DetectFamily::MemoryPressure => Family::MemoryPressure,
    }
}

fn serialize(histogram: &hdrhistogram::Histogram<u64>) -> Vec<u8> {
    let mut bytes = Vec::new();
    // Serializing into a Vec cannot fail for histograms we built ourselves; an empty payload
    // just means "no distribution" on the wire.
    if V2Serializer::new().serialize(histogram, &mut bytes).is_err() {
        bytes.clear();
    }
    bytes
}

/// Builds the wire summary of window `seq`.
pub fn node_summary(
    identity: &Identity,
    seq: u64,
    summary: &WindowSummary,
    scores: &[LocalFamilyScore],
) -> NodeSummary {
    let peers = peers(summary);
    let mut families = Vec::new();

    // Network latency: the node's RTT p99 over every peer, with the merged distribution.
    let mut all_rtt: Option<hdrhistogram::Histogram<u64>> = None;
    let mut rtt_samples = 0;
    for peer in &peers {
        if let Some(h) = &peer.rtt_histogram {
            rtt_samples += peer.rtt_samples;
            match &mut all_rtt {
                Some(total) => {
                    let _ = total.add(h);
                }
                None => all_rtt = Some(h.clone()),
            }
        }
    }
    if let Some(h) = &all_rtt {
        families.push(FamilyFigures {
            family: Family::NetworkLatency.into(),
            value: h.value_at_quantile(0.99) as f64,
            unit: "us".into(),
            samples: rtt_samples,
            hdr_histogram: serialize(h),
        });
    }
    let segments: u64 = peers.iter().map(|p| p.segments_out).sum();
    if segments > 0 {
        let retransmits: u64 = peers.iter().map(|p| p.retransmits).sum();
        families.push(FamilyFigures {
            family: Family::PacketLoss.into(),
            value: 100.0 * retransmits as f64 / segments as f64,
            unit: "percent".into(),
            samples: segments,
            hdr_histogram: Vec::new(),
        });
    }
    if let Some(steal) = &summary.cpu.steal {
        families.push(FamilyFigures {
            family: Family::CpuSteal.into(),
            value: steal.node_pct,
            unit: "percent".into(),
            samples: 1,
            hdr_histogram: Vec::new(),
        });
    }
    let runq_samples: u64 = summary.cpu.run_queue.iter().map(|w| w.latency.samples).sum();
    let worst_runq = summary
        .cpu
        .run_queue
        .iter()
        .map(|w| w.latency.p99_us)
        .fold(f64::NAN, f64::max);
    if worst_runq.is_finite() {
        families.push(FamilyFigures {
            family: Family::CpuContention.into(),
            value: worst_runq,
            unit: "us".into(),
            samples: runq_samples,
            hdr_histogram: Vec::new(),
        });
    }
    if let Some(pct) = summary.pressure.node.memory.as_ref().and_then(|m| m.some_pct) {
        families.push(FamilyFigures {
            family: Family::MemoryPressure.into(),
            value: pct,
            unit: "percent".into(),
            samples: 1,
            hdr_histogram: Vec::new(),
        });
    }

    let end = summary.window_start_unix_ms + (summary.window_seconds * 1000.0) as u64;
    NodeSummary {
        protocol_version: PROTOCOL_VERSION,
        node: Some(NodeIdentity {
            node_name: identity.node_name.clone(),
            boot_id: identity.boot_id.clone(),
            addresses: identity.addresses.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            agent_started_ns: identity.agent_started_ns,
        }),
        window: Some(Window {
            seq,
            start_unix_ms: i64::try_from(summary.window_start_unix_ms).unwrap_or(i64::MAX),
            end_unix_ms: i64::try_from(end).unwrap_or(i64::MAX),
        }),
        families,
        peers: peers
            .iter()
            .map(|p| PeerStats {
                remote_addr: p.remote.to_string(),
                rtt_samples: p.rtt_samples,
                rtt_p50_us: p.rtt_p50_us.unwrap_or(0.0),
                rtt_p99_us: p.rtt_p99_us.unwrap_or(0.0),
                rtt_hdr_histogram: p.rtt_histogram.as_ref().map(serialize).unwrap_or_default(),
                segments_out: p.segments_out,
                retransmits: p.retransmits,
            })
            .collect(),
        // Families still warming up send no score: the aggregator treats that as no evidence.
        scores: scores
            .iter()
            .filter_map(|s| {
                s.score.map(|score| LocalScore {
                    family: proto_family(s.family).into(),
                    score,
                    reason: s.reason.clone(),
                })
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hdrhistogram::serialization::Deserializer;

    use super::*;
    use crate::scoring::tests::window_with;

    #[test]
    fn a_later_incarnation_reads_a_larger_boottime() {
        let first = Identity::from_host("n", std::path::Path::new("/proc"));
        let second = Identity::from_host("n", std::path::Path::new("/proc"));
        assert!(first.agent_started_ns > 0);
        assert!(second.agent_started_ns > first.agent_started_ns);
        assert_eq!(first.boot_id, second.boot_id);
    }

    #[test]
    fn summary_carries_figures_peers_and_ready_scores_only() {
        let window = window_with(Ipv4Addr::new(10, 0, 0, 9), 2_000, 40, 1_000, 25);
        let scores = vec![
            LocalFamilyScore {
                family: DetectFamily::NetworkLatency,
                score: Some(0.9),
                reason: "rtt".into(),
            },
            LocalFamilyScore {
                family: DetectFamily::MemoryPressure,
                score: None,
                reason: "warming up".into(),
            },
        ];
        let identity = Identity {
            node_name: "node-a".into(),
            boot_id: "b".into(),
            addresses: vec!["10.0.0.1".into()],
            agent_started_ns: 11,
        };
        let msg = node_summary(&identity, 7, &window, &scores);
        assert_eq!(msg.protocol_version, PROTOCOL_VERSION);
        assert_eq!(msg.node.as_ref().map(|n| n.agent_started_ns), Some(11));
        assert_eq!(msg.window.as_ref().map(|w| (w.seq, w.end_unix_ms)), Some((7, 2_000)));
        let latency = msg
            .families
            .iter()
            .find(|f| f.family == i32::from(Family::NetworkLatency))
            .expect("latency");
        assert!((latency.value - 2_000.0).abs() < 140.0, "{latency:?}");
        let histogram: hdrhistogram::Histogram<u64> = Deserializer::new()
            .deserialize(&mut latency.hdr_histogram.as_slice())
            .expect("valid HDR payload");
        assert_eq!(histogram.len(), 40);
        let loss = msg
            .families
            .iter()
            .find(|f| f.family == i32::from(Family::PacketLoss))
            .expect("loss");
        assert!((loss.value - 2.5).abs() < 1e-9);
        assert_eq!(msg.peers.len(), 1);
        assert_eq!(msg.peers[0].remote_addr, "10.0.0.9");
        assert_eq!(msg.scores.len(), 1, "warming-up families send no score");
        // Nothing measured for CPU or memory: no figures invented.
        assert!(
            !msg.families
                .iter()
                .any(|f| f.family == i32::from(Family::MemoryPressure))
        );
    }
}
