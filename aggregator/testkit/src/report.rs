//! A builder for the agent's report window (`NodeSummary`) as the simulated agents of the tests
//! and the fleet bench send it.

use graywatch_proto::{
    PROTOCOL_VERSION,
    v1::{Family, FamilyFigures, LocalScore, NodeIdentity, NodeSummary, PeerStats, Window},
};

/// Window `seq` of node `name`'s agent; boot `boot-1`, agent version `test`, window 0–1000 ms
/// unless set.
#[derive(Clone, Debug)]
pub struct ReportBuilder {
    summary: NodeSummary,
}

impl ReportBuilder {
    #[must_use]
    pub fn new(node: &str, seq: u64) -> Self {
        Self {
            summary: NodeSummary {
                protocol_version: PROTOCOL_VERSION,
                node: Some(NodeIdentity {
                    node_name: node.into(),
                    boot_id: "boot-1".into(),
                    agent_version: "test".into(),
                    ..Default::default()
                }),
                window: Some(Window {
                    seq,
                    start_unix_ms: 0,
                    end_unix_ms: 1000,
                }),
                ..Default::default()
            },
        }
    }

    fn identity(&mut self) -> &mut NodeIdentity {
        self.summary.node.get_or_insert_with(NodeIdentity::default)
    }

    #[must_use]
    pub fn boot_id(mut self, boot_id: &str) -> Self {
        self.identity().boot_id = boot_id.into();
        self
    }

    #[must_use]
    pub fn agent_version(mut self, version: &str) -> Self {
        self.identity().agent_version = version.into();
        self
    }

    /// `NodeIdentity.agent_started_ns`: one value per agent incarnation.
    #[must_use]
    pub fn agent_started_ns(mut self, ns: u64) -> Self {
        self.identity().agent_started_ns = ns;
        self
    }

    /// One of the node's own addresses.
    #[must_use]
    pub fn address(mut self, address: &str) -> Self {
        self.identity().addresses.push(address.into());
        self
    }

    #[must_use]
    pub fn window_ms(mut self, start_unix_ms: i64, end_unix_ms: i64) -> Self {
        if let Some(w) = self.summary.window.as_mut() {
            w.start_unix_ms = start_unix_ms;
            w.end_unix_ms = end_unix_ms;
        }
        self
    }

    /// A family's figure for this window.
    #[must_use]
    pub fn family(mut self, family: Family, value: f64, unit: &str, samples: u64) -> Self {
        self.summary.families.push(FamilyFigures {
            family: family as i32,
            value,
            unit: unit.into(),
            samples,
            ..Default::default()
        });
        self
    }

    /// The agent's local score for a family.
    #[must_use]
    pub fn score(mut self, family: Family, score: f64, reason: &str) -> Self {
        self.summary.scores.push(LocalScore {
            family: family as i32,
            score,
            reason: reason.into(),
        });
        self
    }

    /// Per-peer figures, in order.
    #[must_use]
    pub fn peers(mut self, peers: impl IntoIterator<Item = PeerStats>) -> Self {
        self.summary.peers.extend(peers);
        self
    }

    #[must_use]
    pub fn build(self) -> NodeSummary {
        self.summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_carries_identity_window_families_scores_and_peers() {
        let s = ReportBuilder::new("n-1", 7)
            .address("10.0.0.1")
            .agent_started_ns(5)
            .window_ms(1000, 2000)
            .family(Family::PacketLoss, 0.5, "%", 10)
            .score(Family::PacketLoss, 0.1, "normal")
            .peers([PeerStats {
                remote_addr: "10.0.0.2".into(),
                ..Default::default()
            }])
            .build();
        let node = s.node.expect("identity");
        assert_eq!((node.node_name.as_str(), node.agent_started_ns), ("n-1", 5));
        assert_eq!(node.addresses, ["10.0.0.1"]);
        assert_eq!(
            s.window.map(|w| (w.seq, w.start_unix_ms, w.end_unix_ms)),
            Some((7, 1000, 2000))
        );
        assert_eq!(s.families[0].family, Family::PacketLoss as i32);
        assert_eq!(s.scores[0].reason, "normal");
        assert_eq!(s.peers[0].remote_addr, "10.0.0.2");
        assert_eq!(s.protocol_version, PROTOCOL_VERSION);
    }
}
