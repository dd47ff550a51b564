//! Window summary → `graywatch.v1.NodeSummary`, the message streamed to the aggregator.

use graywatch_proto::{
    PROTOCOL_VERSION,
    v1::{Family, FamilyFigures, LocalScore, NodeIdentity, NodeSummary, PeerStats, Prediction, Window},
};

use graywatch_detect::LossSpan;

use crate::{
    peers::PeerWindow,
    scoring::LocalFamilyScore,
    summary::{RttBuckets, WindowSummary},
};

/// Who is reporting (stable for the agent's lifetime).
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub node_name: String,
    pub boot_id: String,
    pub addresses: Vec<String>,
    /// This agent incarnation: when it started, in ns of `CLOCK_BOOTTIME` (see [`boottime_ns`]).
    pub agent_started_ns: u64,
}

/// Now on the node's `CLOCK_BOOTTIME`, in ns (0 if the clock cannot be read, which the aggregator
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

/// Builds the wire summary of window `seq` from the window and its peers (computed once per
/// window, see [`crate::peers::peers`]).
pub fn node_summary(
    identity: &Identity,
    seq: u64,
    summary: &WindowSummary,
    peers: &[PeerWindow],
    scores: &[LocalFamilyScore],
    sustained_loss: Option<LossSpan>,
) -> NodeSummary {
    let families = family_figures(summary, peers, sustained_loss);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "the window is a validated positive config value of at most an hour; `as` saturates"
    )]
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
                segments_out: p.segments_out,
                retransmits: p.retransmits,
                unanswered_connects: p.unanswered_connects,
                node_name: p.node.as_deref().unwrap_or_default().to_owned(),
                remote_addresses: p.addresses,
                external: p.external,
            })
            .collect(),
        pod_addresses: None,
        lost_events: summary.lost_events.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        // Families still warming up send no score: the aggregator treats that as no evidence.
        scores: scores
            .iter()
            .filter_map(|s| {
                s.score.map(|score| LocalScore {
                    family: Family::from(s.family).into(),
                    score,
                    reason: s.reason.clone(),
                })
            })
            .collect(),
        predictions: predictions(summary),
        // Set by the window loop, which holds the aggregator's earlier answers.
        address_lookups: Vec::new(),
        // Only the reporter's stop notice sets it (report.rs).
        stopping: false,
    }
}

/// The window's headline figure per family (larger = worse); a family the window measured
/// nothing of has none.
fn family_figures(
    summary: &WindowSummary,
    peers: &[PeerWindow],
    sustained_loss: Option<LossSpan>,
) -> Vec<FamilyFigures> {
    let mut families = Vec::new();
    // Network latency: the node's RTT p99 over every peer's merged distribution.
    let mut all_rtt = RttBuckets::default();
    for rtt in peers.iter().filter_map(|p| p.rtt.as_ref()) {
        all_rtt.add(rtt);
    }
    if let Some(p99) = all_rtt.quantile_us(0.99) {
        families.push(FamilyFigures {
            family: Family::NetworkLatency.into(),
            value: p99 as f64,
            unit: "us".into(),
            samples: all_rtt.samples(),
            ..Default::default()
        });
    }
    let segments: u64 = peers.iter().map(|p| p.segments_out).sum();
    let retransmits: u64 = peers.iter().map(|p| p.retransmits).sum();
    let unanswered: u64 = peers.iter().map(|p| p.unanswered_connects).sum();
    if segments > 0 || retransmits > 0 || unanswered > 0 {
        families.push(FamilyFigures {
            family: Family::PacketLoss.into(),
            value: graywatch_detect::loss_pct(retransmits, unanswered, segments),
            unit: "percent".into(),
            samples: segments,
            span_lost: sustained_loss.map_or(0, |s| s.lost),
            span_sent: sustained_loss.map_or(0, |s| s.sent),
            span_windows: sustained_loss.map_or(0, |s| s.windows),
        });
    }
    if let Some(steal) = &summary.cpu.steal {
        families.push(FamilyFigures {
            family: Family::CpuSteal.into(),
            value: steal.node_pct,
            unit: "percent".into(),
            samples: 1,
            ..Default::default()
        });
    }
    if let Some(worst_runq) = summary.cpu.worst_run_queue_p99_us() {
        families.push(FamilyFigures {
            family: Family::CpuContention.into(),
            value: worst_runq,
            unit: "us".into(),
            samples: summary.cpu.run_queue.iter().map(|w| w.latency.samples).sum(),
            ..Default::default()
        });
    }
    if let Some(pct) = summary.pressure.node.memory.as_ref().and_then(|m| m.some_pct) {
        families.push(FamilyFigures {
            family: Family::MemoryPressure.into(),
            value: pct,
            unit: "percent".into(),
            samples: 1,
            ..Default::default()
        });
    }
    families
}

/// The window's predictions, the soonest per family (they come sorted soonest first).
fn predictions(summary: &WindowSummary) -> Vec<Prediction> {
    let mut out: Vec<Prediction> = Vec::new();
    for p in &summary.predictions {
        let family = i32::from(Family::from(p.family));
        if out.iter().any(|o| o.family == family) {
            continue;
        }
        out.push(Prediction {
            family,
            eta_seconds: p.eta_seconds,
            confidence: p.confidence,
            reason: p.reason.clone(),
            workload: p.workload.clone(),
            value: p.value,
            limit: p.limit,
            unit: p.unit.into(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::scoring::tests::{peers_of, window_with, window_with_flows};

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
                family: graywatch_proto::Family::NetworkLatency,
                score: Some(0.9),
                reason: "rtt".into(),
                onset: None,
            },
            LocalFamilyScore {
                family: graywatch_proto::Family::MemoryPressure,
                score: None,
                reason: "warming up".into(),
                onset: None,
            },
        ];
        let identity = Identity {
            node_name: "node-a".into(),
            boot_id: "b".into(),
            addresses: vec!["10.0.0.1".into()],
            agent_started_ns: 11,
        };
        let span = LossSpan {
            lost: 12,
            sent: 4_000,
            windows: 10,
        };
        let msg = node_summary(&identity, 7, &window, &peers_of(&window), &scores, Some(span));
        assert_eq!(msg.protocol_version, PROTOCOL_VERSION);
        assert_eq!(msg.node.as_ref().map(|n| n.agent_started_ns), Some(11));
        assert_eq!(msg.window.as_ref().map(|w| (w.seq, w.end_unix_ms)), Some((7, 2_000)));
        let latency = msg
            .families
            .iter()
            .find(|f| f.family == i32::from(Family::NetworkLatency))
            .expect("latency");
        assert!((latency.value - 2_000.0).abs() < 140.0, "{latency:?}");
        assert_eq!(latency.samples, 40);
        let loss = msg
            .families
            .iter()
            .find(|f| f.family == i32::from(Family::PacketLoss))
            .expect("loss");
        assert!((loss.value - 2.5).abs() < 1e-9);
        assert_eq!(
            (loss.span_lost, loss.span_sent, loss.span_windows),
            (12, 4_000, 10),
            "the sustained span rides with the window's figure"
        );
        assert_eq!(msg.peers.len(), 1);
        assert_eq!(msg.peers[0].remote_addr, "10.0.0.9");
        assert_eq!(msg.peers[0].remote_addresses, 1);
        assert_eq!(msg.scores.len(), 1, "warming-up families send no score");
        // Nothing measured for CPU or memory: no figures invented.
        assert!(
            !msg.families
                .iter()
                .any(|f| f.family == i32::from(Family::MemoryPressure))
        );
    }

    /// Predictions go on the wire, the soonest per family only.
    #[test]
    fn the_soonest_prediction_per_family_goes_on_the_wire() {
        let mut window = window_with(Ipv4Addr::new(10, 0, 0, 9), 2_000, 40, 1_000, 0);
        let prediction = |workload: &str, eta_seconds: f64| crate::summary::Prediction {
            family: graywatch_proto::Family::MemoryPressure,
            workload: workload.into(),
            cgroup_path: Some(format!("kubepods/{workload}")),
            eta_seconds,
            confidence: 0.97,
            value: 100.0,
            limit: 256.0,
            unit: "bytes",
            reason: format!("{workload} leaks"),
        };
        window.predictions = vec![prediction("a", 30.0), prediction("b", 90.0)];
        let msg = node_summary(&Identity::default(), 1, &window, &peers_of(&window), &[], None);
        assert_eq!(msg.predictions.len(), 1, "{:?}", msg.predictions);
        let p = &msg.predictions[0];
        assert_eq!(p.family, i32::from(Family::MemoryPressure));
        assert_eq!(
            (p.workload.as_str(), p.eta_seconds, p.unit.as_str()),
            ("a", 30.0, "bytes")
        );
    }

    /// Issue 16: 5,000 remote addresses made a summary of 5,000 peers (the aggregator refuses
    /// more than 4,096, or 1 MiB) that ended the stream; the same window came back on every
    /// reconnect. Now the summary stays within both limits.
    #[test]
    fn five_thousand_remotes_fit_the_aggregators_limits() {
        use prost::Message;
        let flows: Vec<(std::net::IpAddr, u32, u32, u64, u64)> = (0..5_000u32)
            .map(|i| {
                let addr = std::net::Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0000_0002_0000u128 + u128::from(i));
                (addr.into(), 100 + i * 997 % 90_000, 3, 5, 0)
            })
            .collect();
        let window = window_with_flows(&flows);
        let peers = peers_of(&window);
        let msg = node_summary(&Identity::default(), 1, &window, &peers, &[], None);
        assert!(msg.peers.len() <= 4_096, "{} peers", msg.peers.len());
        assert!(msg.encoded_len() < 1024 * 1024, "{} bytes", msg.encoded_len());
        assert!(msg.peers.last().is_some_and(|p| p.external && p.remote_addr == "::"));
        let latency = msg
            .families
            .iter()
            .find(|f| f.family == i32::from(Family::NetworkLatency))
            .expect("latency");
        assert_eq!(latency.samples, 15_000, "every sample counts, external bucket included");
    }
}
