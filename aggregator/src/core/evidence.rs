//! Evidence against a node beyond its own detectors:
//! * peer: robust z of the node's figure against its peer group (median / MAD);
//! * vantage: what other nodes measure towards this node's addresses (Pingmesh / 007-style vote,
//!   each observer judged against its own median towards everyone, so a slow observer does not
//!   accuse the fleet).

use std::collections::BTreeMap;

use graywatch_proto::LossSpan;

pub use super::model::AddressBook;
use super::model::{Family, NodeReport};

/// Floor of the MAD-based scale per family, so an idle, perfectly uniform group does not turn
/// tiny differences into huge z: the family's peer scale floor, or a fraction of the median.
fn scale_floor(family: Family, median: f64) -> f64 {
    let rel = if family == Family::CpuSteal { 0.1 } else { 0.2 };
    family.peer_scale_floor().max(rel * median.abs())
}

/// Median of a non-empty slice (NaNs must be filtered out by the caller).
#[must_use]
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        f64::midpoint(values[n / 2 - 1], values[n / 2])
    }
}

/// Median and robust scale of a peer group, computed once per step and group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupStats {
    pub median: f64,
    /// 1.4826·MAD, floored per family.
    pub scale: f64,
    pub n: usize,
}

/// Floor of the sustained loss figure's group scale, in points. A quarter of the per-window
/// floor: the figure pools ten windows (noise down by √10) and caps each window's share.
const SUSTAINED_LOSS_SCALE_FLOOR: f64 = 0.05;

/// The background loss assumed when a node's peers lose (almost) nothing, in percent: the
/// sampling noise of a node's sustained figure is judged at least at this rate.
const SUSTAINED_LOSS_BACKGROUND_PCT: f64 = 0.01;

impl GroupStats {
    /// `None` for an empty group (non-finite values are ignored).
    #[must_use]
    pub fn of(family: Family, group: &[f64]) -> Option<Self> {
        Self::with_floor(group, |median| scale_floor(family, median))
    }

    /// Group stats of the nodes' sustained loss figures (percent over their spans).
    #[must_use]
    pub fn of_sustained_loss(group: &[f64]) -> Option<Self> {
        Self::with_floor(group, |median| SUSTAINED_LOSS_SCALE_FLOOR.max(0.2 * median.abs()))
    }

    /// Robust z of a node's sustained loss against this group (see [`Self::of_sustained_loss`]).
    /// The spread is the larger of the group's and the node's own sampling noise: a node that
    /// sent few segments has a noisier figure than its peers' spread says (binomial at the
    /// group's rate, never below [`SUSTAINED_LOSS_BACKGROUND_PCT`]). 0 for a span too short or
    /// too quiet to judge.
    #[must_use]
    pub fn sustained_loss_z(&self, span: &LossSpan) -> f64 {
        if !span.is_judgeable() {
            return 0.0;
        }
        let p = self.median.max(SUSTAINED_LOSS_BACKGROUND_PCT) / 100.0;
        let sampling = 100.0 * (p * (1.0 - p) / span.sent as f64).sqrt();
        let z = (span.pct() - self.median) / self.scale.max(sampling);
        if z.is_finite() { z } else { 0.0 }
    }

    fn with_floor(group: &[f64], floor: impl Fn(f64) -> f64) -> Option<Self> {
        let mut g: Vec<f64> = group.iter().copied().filter(|v| v.is_finite()).collect();
        if g.is_empty() {
            return None;
        }
        let med = median(&mut g);
        let mut dev: Vec<f64> = g.iter().map(|v| (v - med).abs()).collect();
        let mad = median(&mut dev);
        let scale = (1.4826 * mad).max(floor(med));
        Some(Self {
            median: med,
            scale,
            n: g.len(),
        })
    }

    /// Robust z of `x` (0 for non-finite input or result).
    #[must_use]
    pub fn z(&self, x: f64) -> f64 {
        if !x.is_finite() {
            return 0.0;
        }
        let z = (x - self.median) / self.scale;
        if z.is_nan() { 0.0 } else { z }
    }
}

/// Robust z of `x` against `group` (median and 1.4826·MAD, scale floored).
#[must_use]
pub fn robust_z(family: Family, x: f64, group: &[f64]) -> f64 {
    GroupStats::of(family, group).map_or(0.0, |g| g.z(x))
}

/// Linear ramp of `z` between `low` (0) and `high` (1).
#[must_use]
pub fn ramp(z: f64, low: f64, high: f64) -> f64 {
    if !z.is_finite() {
        return 0.0;
    }
    ((z - low) / (high - low)).clamp(0.0, 1.0)
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PeerEvidence {
    pub z: f64,
    pub median: f64,
    pub group_size: usize,
}

/// Vantage tally for one target node and family.
///
/// Other nodes' words alone never degrade a node (see the security section of the README):
/// the tally also carries what is needed to check corroboration, either by the target's own
/// view (`own_link_slow`) or by a strict majority of the nodes the target itself reports
/// traffic with (`partners`, `flagged_partners`): a node cannot be made to list traffic with an
/// observer it never talked to, whereas any authenticated agent can claim to observe anyone.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VantageEvidence {
    /// Reliable observers reporting a figure towards the target.
    pub observers: usize,
    /// Of those, how many flag it.
    pub flagged: usize,
    /// Names of the flagging observers (sorted), for the audit trail.
    pub flagged_by: Vec<String>,
    /// Fresh reporters the target itself reports traffic with in this family (its partners).
    pub partners: usize,
    /// Flagging observers among the target's partners.
    pub flagged_partners: usize,
    /// The target's own measurements towards everyone sit far above the fleet's (its own link is
    /// slow; TCP RTT and retransmits are seen by both ends of a connection).
    pub own_link_slow: bool,
    /// The peers (sorted) whose links explain what the target sees and what is seen of it: it
    /// sees fewer than half of its peers degraded, fewer than half of its observers see it
    /// degraded, and at least one of those sees it in turn. Empty when the evidence is not
    /// link-shaped. Both ends of a broken link see the same figures (TCP measures the round
    /// trip), so which end is at fault cannot be told; neither node is to blame. (A node slow
    /// towards everyone sees everyone slow and is seen slow by everyone.)
    pub link_partners: Vec<String>,
}

impl VantageEvidence {
    #[must_use]
    pub fn score(&self, min_observers: usize) -> f64 {
        if self.observers < min_observers.max(1) {
            0.0
        } else {
            self.flagged as f64 / self.observers as f64
        }
    }

    /// A strict majority of the target's own traffic partners flag it, and at least
    /// `min_observers` of them do.
    #[must_use]
    pub fn majority_of_partners(&self, min_observers: usize) -> bool {
        self.flagged_partners >= min_observers.max(1) && 2 * self.flagged_partners > self.partners
    }
}

/// Minimum absolute excess over the observer's baseline before a flag counts (µs / percent).
fn vantage_floor(family: Family) -> f64 {
    match family {
        Family::NetworkLatency => 200.0,
        Family::PacketLoss => 1.0,
        _ => f64::INFINITY,
    }
}

fn peer_figure(family: Family, p: &super::model::PeerObservation) -> Option<f64> {
    match family {
        Family::NetworkLatency if p.rtt_samples > 0 && p.rtt_p99_us.is_finite() => Some(p.rtt_p99_us),
        Family::PacketLoss if p.segments_out > 0 || p.retransmits > 0 || p.unanswered_connects > 0 => {
            Some(p.loss_pct())
        }
        _ => None,
    }
}

/// Vantage evidence for every node from the fresh observers' reports.
#[must_use]
pub fn vantage<'a>(
    family: Family,
    book: &AddressBook,
    fresh_reports: impl IntoIterator<Item = (&'a str, &'a NodeReport)>,
    ratio: f64,
) -> BTreeMap<String, VantageEvidence> {
    // Pass 1: each observer's figure per target node (worst of its addresses) and its baseline.
    // Every fresh reporter that maps to a node also lists its traffic partners (whatever its
    // number of targets), so a target's partner set comes from its own report only.
    struct Observer {
        id: usize,
        per_target: Vec<(usize, f64)>,
        base: Option<f64>,
    }
    let mut observers: Vec<Observer> = Vec::new();
    for (observer, report) in fresh_reports {
        let Some(me) = book.by_name.get(observer).copied() else {
            continue;
        };
        let mut per_target: Vec<(usize, f64)> = report
            .peers
            .iter()
            .filter_map(|p| Some((book.id_of(&p.addr)?, peer_figure(family, p)?)))
            .filter(|(t, _)| *t != me)
            .collect();
        per_target.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
        per_target.dedup_by_key(|(t, _)| *t);
        // A baseline needs a few targets; otherwise this observer abstains.
        let base = (per_target.len() >= 3).then(|| {
            let mut vals: Vec<f64> = per_target.iter().map(|(_, v)| *v).collect();
            median(&mut vals)
        });
        observers.push(Observer {
            id: me,
            per_target,
            base,
        });
    }
    // An observer that sees (almost) everyone as bad is itself the problem (its own link is
    // slow): it abstains instead of diluting the vote against the nodes that are bad.
    let mut bases: Vec<f64> = observers.iter().filter_map(|o| o.base).collect();
    let fleet_base = median(&mut bases);
    let mut tally = vec![VantageEvidence::default(); book.names.len()];
    let mut flagged_sets: Vec<Vec<usize>> = vec![Vec::new(); book.names.len()];
    // What each reliable observer flags, and how many targets it measured.
    let mut flags_of: Vec<Option<(Vec<usize>, usize)>> = vec![None; book.names.len()];
    let reporting: Vec<bool> = {
        let mut r = vec![false; book.names.len()];
        for o in &observers {
            r[o.id] = true;
        }
        r
    };
    for o in &observers {
        let Some(base) = o.base else {
            continue;
        };
        if observer_unreliable(family, base, fleet_base, ratio) {
            tally[o.id].own_link_slow = true;
            continue;
        }
        let mut flags = Vec::new();
        for (target, v) in &o.per_target {
            let e = &mut tally[*target];
            e.observers += 1;
            if *v >= base * ratio && *v - base >= vantage_floor(family) {
                e.flagged += 1;
                flagged_sets[*target].push(o.id);
                flags.push(*target);
            }
        }
        flags_of[o.id] = Some((flags, o.per_target.len()));
    }
    for o in &observers {
        let e = &mut tally[o.id];
        let partners: Vec<usize> = o.per_target.iter().map(|(t, _)| *t).filter(|t| reporting[*t]).collect();
        e.partners = partners.len();
        e.flagged_partners = flagged_sets[o.id]
            .iter()
            .filter(|f| partners.binary_search(f).is_ok())
            .count();
    }
    for (id, flags) in flags_of.iter().enumerate() {
        let Some((flags, measured)) = flags else { continue };
        // Link-shaped: a minority of its links look bad from its end, a minority of its
        // observers see it bad, and some of them are at the other end of its bad links (flags
        // is sorted: per_target is). Noise on a busy node flags the odd link; the tallies are
        // judged against halves, not exact sets, so one noisy window does not undo it.
        let flaggers = &flagged_sets[id];
        let few_seen_bad = 2 * flags.len() < *measured;
        let few_see_it_bad = 2 * flaggers.len() < tally[id].observers;
        let mutual = flaggers.iter().any(|o| flags.binary_search(o).is_ok());
        if few_seen_bad && few_see_it_bad && mutual {
            tally[id].link_partners = flags.iter().map(|t| book.names[*t].clone()).collect();
            tally[id].link_partners.sort();
        }
    }
    tally
        .into_iter()
        .zip(flagged_sets)
        .enumerate()
        .filter(|(_, (e, _))| e.observers > 0 || e.own_link_slow || !e.link_partners.is_empty())
        .map(|(id, (mut e, flagged))| {
            let mut names: Vec<String> = flagged.into_iter().map(|f| book.names[f].clone()).collect();
            names.sort();
            e.flagged_by = names;
            (book.names[id].clone(), e)
        })
        .collect()
}

fn observer_unreliable(family: Family, base: f64, fleet_base: f64, ratio: f64) -> bool {
    base >= fleet_base * ratio && base - fleet_base >= vantage_floor(family)
}

/// Noisy-or of weighted evidence scores: 1 − Π(1 − wᵢ·sᵢ).
#[must_use]
pub fn combine(parts: &[(f64, f64)]) -> f64 {
    let miss: f64 = parts
        .iter()
        .map(|(w, s)| {
            let s = if s.is_finite() { s.clamp(0.0, 1.0) } else { 0.0 };
            1.0 - w.clamp(0.0, 1.0) * s
        })
        .product();
    (1.0 - miss).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use std::{net::IpAddr, sync::Arc};

    use super::*;
    use crate::core::model::{NodeView, PeerObservation};

    #[test]
    fn robust_z_flags_outlier_not_inliers() {
        let g = [300.0, 310.0, 305.0, 290.0, 4000.0, 300.0, 295.0];
        assert!(robust_z(Family::NetworkLatency, 4000.0, &g) > 10.0);
        assert!(robust_z(Family::NetworkLatency, 310.0, &g).abs() < 1.0);
    }

    #[test]
    fn robust_z_of_uniform_group_uses_floor() {
        let g = [300.0; 8];
        let z = robust_z(Family::NetworkLatency, 301.0, &g);
        assert!(z.abs() < 0.1, "{z}");
    }

    /// Steal across a fleet sits at 0: a node 10 points over idle peers is a full-weight
    /// outlier (`peer_z_high` is 6), although on its own series 5 points is the smallest step.
    #[test]
    fn ten_points_of_steal_over_idle_peers_is_a_strong_outlier() {
        let peers = [0.0, 0.1, 0.0, 0.2, 0.0, 0.0, 0.1, 0.0];
        let z = robust_z(Family::CpuSteal, 10.0, &peers);
        assert!(z >= 6.0, "{z}");
    }

    /// Retransmits across a healthy fleet sit at or near 0: a node losing 2 % of its segments
    /// (1.4 % in its weakest windows on the bench) is a full-weight outlier, a node at 0.5 %
    /// (one lost segment in 200) is not one at all.
    #[test]
    fn two_percent_of_retransmits_over_clean_peers_is_a_strong_outlier() {
        let peers = [0.0, 0.0, 0.08, 0.0, 0.0, 0.0, 0.0, 0.0];
        let z = robust_z(Family::PacketLoss, 1.4, &peers);
        assert!(z >= 5.5, "{z}");
        let z = robust_z(Family::PacketLoss, 2.0, &peers);
        assert!(z >= 6.0, "{z}");
        let z = robust_z(Family::PacketLoss, 0.5, &peers);
        assert!(z < 3.0, "{z}");
    }

    #[test]
    fn address_book_prefers_exact_then_longest_prefix() {
        let a = NodeView {
            name: "a".into(),
            internal_ips: vec!["10.0.0.1".parse().expect("ip")],
            pod_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
            ..Default::default()
        };
        let b = NodeView {
            name: "b".into(),
            pod_cidrs: vec!["10.244.1.0/24".parse().expect("cidr")],
            ..Default::default()
        };
        let book = AddressBook::new([&a, &b]);
        assert_eq!(book.node_of(&"10.0.0.1".parse().expect("ip")), Some("a"));
        assert_eq!(book.node_of(&"10.244.1.7".parse().expect("ip")), Some("b"));
        assert_eq!(book.node_of(&"10.244.2.7".parse().expect("ip")), Some("a"));
        assert_eq!(book.node_of(&"192.168.0.1".parse().expect("ip")), None);
    }

    /// Reported pod IPs, in both families: the first claim holds until another node claims the
    /// same address (then neither, however many claims follow); an InternalIP or a host pod
    /// CIDR is never taken over; a node's claim on its own InternalIP changes nothing.
    #[test]
    fn pod_ip_claims_yield_to_node_addresses_and_contested_ones_map_nowhere() {
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let view = |name: &str, internal: &str, host_cidr: &str| NodeView {
            name: name.into(),
            internal_ips: vec![ip(internal)],
            pod_cidrs: vec![host_cidr.parse().expect("cidr")],
            ..Default::default()
        };
        let nodes: BTreeMap<String, NodeView> = [
            view("a", "10.0.0.1", "fd00::a/128"),
            view("b", "10.0.0.2", "fd00::b/128"),
            view("c", "10.0.0.3", "10.9.9.9/32"),
        ]
        .into_iter()
        .map(|n| (n.name.clone(), n))
        .collect();
        let list = |addrs: &[&str]| -> Arc<[IpAddr]> { addrs.iter().map(|a| ip(a)).collect() };
        let reported: BTreeMap<String, Arc<[IpAddr]>> = [
            (
                "a",
                list(&["10.1.0.1", "fd01::1", "10.0.0.2", "10.7.0.1", "10.0.0.1", "fd00::b"]),
            ),
            ("b", list(&["10.1.0.2", "fd01::2", "10.7.0.1", "fd01::7", "10.9.9.9"])),
            ("c", list(&["10.7.0.1", "fd01::7", "fd01::3"])),
        ]
        .into_iter()
        .map(|(n, l)| (n.to_owned(), l))
        .collect();
        let book = AddressBook::with_pod_addresses(&nodes, &reported);
        for (addr, owner) in [
            ("10.1.0.1", Some("a")),
            ("fd01::1", Some("a")),
            ("10.1.0.2", Some("b")),
            ("fd01::2", Some("b")),
            ("fd01::3", Some("c")),
            ("10.0.0.1", Some("a")),
            ("10.0.0.2", Some("b")),
            ("fd00::b", Some("b")),
            ("10.9.9.9", Some("c")),
            ("10.7.0.1", None),
            ("fd01::7", None),
        ] {
            assert_eq!(book.node_of(&ip(addr)), owner, "{addr}");
        }
    }

    fn node(i: u8) -> NodeView {
        NodeView {
            name: format!("n{i}"),
            internal_ips: vec![IpAddr::from([10, 0, 0, i])],
            ..Default::default()
        }
    }

    fn report_towards(targets: &[(u8, f64)]) -> NodeReport {
        NodeReport {
            peers: targets
                .iter()
                .map(|(i, rtt)| PeerObservation {
                    addr: IpAddr::from([10, 0, 0, *i]),
                    rtt_samples: 100,
                    rtt_p99_us: *rtt,
                    segments_out: 1000,
                    retransmits: 0,
                    unanswered_connects: 0,
                })
                .collect(),
            ..Default::default()
        }
    }

    /// `NetworkLatency` vantage of `n1..=n{size}`, each reporting every other at `rtt(i, j)` µs.
    fn full_mesh_vantage(size: u8, rtt: impl Fn(u8, u8) -> f64) -> BTreeMap<String, VantageEvidence> {
        let nodes: Vec<NodeView> = (1..=size).map(node).collect();
        let book = AddressBook::new(&nodes);
        let reports: BTreeMap<String, NodeReport> = (1..=size)
            .map(|i| {
                let t: Vec<(u8, f64)> = (1..=size).filter(|j| *j != i).map(|j| (j, rtt(i, j))).collect();
                (format!("n{i}"), report_towards(&t))
            })
            .collect();
        vantage(
            Family::NetworkLatency,
            &book,
            reports.iter().map(|(k, r)| (k.as_str(), r)),
            3.0,
        )
    }

    #[test]
    fn vantage_votes_against_the_slow_node_only() {
        // n5 is slow: everyone sees it slow; n5 sees everyone slow (its own link).
        let v = full_mesh_vantage(5, |i, j| if i == 5 || j == 5 { 5000.0 } else { 300.0 });
        assert_eq!((v["n5"].observers, v["n5"].flagged), (4, 4));
        assert_eq!(v["n5"].flagged_by, ["n1", "n2", "n3", "n4"]);
        // n5 talked with all four, all four flag it: a majority of its partners.
        assert_eq!((v["n5"].partners, v["n5"].flagged_partners), (4, 4));
        assert!(v["n5"].majority_of_partners(3));
        // Its own view corroborates too: it sees everyone slow.
        assert!(v["n5"].own_link_slow);
        for i in 1..=4 {
            assert_eq!(v[&format!("n{i}")].flagged, 0, "n{i}");
            assert!(!v[&format!("n{i}")].own_link_slow, "n{i}");
            // n5 sees everyone slow and abstains: no link is blamed back, it is n5's story.
            assert!(v[&format!("n{i}")].link_partners.is_empty(), "n{i}");
        }
        assert!(v["n5"].link_partners.is_empty(), "the slow node is no link fault");
    }

    /// n1 ↔ n2 broken (each sees the other slow), everything else fine: both ends are
    /// link-explained, by each other; nobody else is.
    #[test]
    fn one_broken_link_blames_the_link_not_either_end() {
        let v = full_mesh_vantage(5, |i, j| {
            if (i, j) == (1, 2) || (i, j) == (2, 1) {
                5000.0
            } else {
                300.0
            }
        });
        assert_eq!(v["n1"].link_partners, ["n2"]);
        assert_eq!(v["n2"].link_partners, ["n1"]);
        assert_eq!((v["n1"].flagged, v["n2"].flagged), (1, 1));
        for i in 3..=5 {
            assert!(v[&format!("n{i}")].link_partners.is_empty(), "n{i}");
        }
    }

    /// n1 ↔ n2 blackholed: neither end can connect to the other, so there is no RTT, nothing
    /// sent and nothing retransmitted between them, only connection attempts nobody answered.
    /// Those are total loss, and the link is blamed from both ends.
    #[test]
    fn connects_nobody_answers_blame_the_link() {
        let nodes: Vec<NodeView> = (1..=5).map(node).collect();
        let book = AddressBook::new(&nodes);
        let reports: BTreeMap<String, NodeReport> = (1..=5u8)
            .map(|i| {
                let mut report = report_towards(
                    &(1..=5u8)
                        .filter(|j| *j != i && (i, *j) != (1, 2) && (i, *j) != (2, 1))
                        .map(|j| (j, 300.0))
                        .collect::<Vec<_>>(),
                );
                if let Some(other) = match i {
                    1 => Some(2),
                    2 => Some(1),
                    _ => None,
                } {
                    report.peers.push(PeerObservation {
                        addr: IpAddr::from([10, 0, 0, other]),
                        rtt_samples: 0,
                        rtt_p99_us: 0.0,
                        segments_out: 0,
                        retransmits: 0,
                        unanswered_connects: 2,
                    });
                }
                (format!("n{i}"), report)
            })
            .collect();
        let v = vantage(
            Family::PacketLoss,
            &book,
            reports.iter().map(|(k, r)| (k.as_str(), r)),
            3.0,
        );
        assert_eq!(v["n1"].link_partners, ["n2"]);
        assert_eq!(v["n2"].link_partners, ["n1"]);
        for i in 3..=5 {
            assert!(v[&format!("n{i}")].link_partners.is_empty(), "n{i}");
            assert_eq!(v[&format!("n{i}")].flagged, 0, "n{i}");
        }
    }

    /// n1 ↔ n2 broken in six nodes, and a noisy n3 also sees n1 slow in this window: still the
    /// link (two of five observers is a minority).
    #[test]
    fn a_noisy_observer_does_not_turn_a_link_into_a_node() {
        let v = full_mesh_vantage(6, |i, j| match (i, j) {
            (1, 2) | (2, 1) => 5000.0,
            (3, 1) => 1500.0,
            _ => 300.0,
        });
        assert_eq!(v["n1"].flagged_by, ["n2", "n3"]);
        assert_eq!(v["n1"].link_partners, ["n2"]);
        assert_eq!(v["n2"].link_partners, ["n1"]);
    }

    /// A node slow towards 4 of its 8 peers, and flagged by them: half of its links, so the
    /// node, not its links.
    #[test]
    fn many_bad_links_are_the_node() {
        let slow = |i: u8, j: u8| (i == 1 && (2..=5).contains(&j)) || (j == 1 && (2..=5).contains(&i));
        let v = full_mesh_vantage(9, |i, j| match (i, j) {
            // n1 sees n2 far worse than the rest, so it does flag one link.
            (1, 2) => 50_000.0,
            _ if slow(i, j) => 5000.0,
            _ => 300.0,
        });
        assert_eq!(v["n1"].flagged_by, ["n2", "n3", "n4", "n5"]);
        assert!(v["n1"].link_partners.is_empty(), "{:?}", v["n1"]);
        // n1 sees half its peers slow: its own view is unreliable, so nobody's link to it is
        // blamed back; their view of it is n1's story.
        assert!(v["n1"].own_link_slow);
        assert!(v["n2"].link_partners.is_empty(), "{:?}", v["n2"]);
    }

    /// n1..n3 lie about n9 (20 ms towards it, 300 µs towards the rest); n4..n8 are honest and
    /// never talk to n9; n9 itself talks only with n4 and n5 and sees them fine.
    fn liars_fleet(liar_base: f64) -> BTreeMap<String, NodeReport> {
        let mut reports = BTreeMap::new();
        for i in 1..=3u8 {
            let t: Vec<(u8, f64)> = (1..=8u8)
                .filter(|j| *j != i)
                .map(|j| (j, liar_base))
                .chain([(9, 20_000.0)])
                .collect();
            reports.insert(format!("n{i}"), report_towards(&t));
        }
        for i in 4..=8u8 {
            let mut t: Vec<(u8, f64)> = (1..=8u8).filter(|j| *j != i).map(|j| (j, 300.0)).collect();
            if i <= 5 {
                t.push((9, 300.0));
            }
            reports.insert(format!("n{i}"), report_towards(&t));
        }
        reports.insert("n9".into(), report_towards(&[(4, 300.0), (5, 300.0), (6, 300.0)]));
        reports
    }

    #[test]
    fn liars_who_never_talked_with_the_target_are_not_its_partners() {
        let nodes: Vec<NodeView> = (1..=9).map(node).collect();
        let book = AddressBook::new(&nodes);
        for liar_base in [300.0, 10.0] {
            let reports = liars_fleet(liar_base);
            let v = vantage(
                Family::NetworkLatency,
                &book,
                reports.iter().map(|(k, r)| (k.as_str(), r)),
                3.0,
            );
            let e = &v["n9"];
            assert_eq!(e.flagged_by, ["n1", "n2", "n3"], "base {liar_base}");
            // Its partners are n4, n5, n6 (from its own report); none of them flags it.
            assert_eq!((e.partners, e.flagged_partners), (3, 0), "base {liar_base}");
            assert!(!e.majority_of_partners(3));
            assert!(!e.own_link_slow);
        }
    }

    #[test]
    fn a_majority_of_partners_needs_more_liars_than_honest_partners() {
        let e = |partners, flagged_partners| VantageEvidence {
            partners,
            flagged_partners,
            ..VantageEvidence::default()
        };
        assert!(!e(6, 3).majority_of_partners(3));
        assert!(e(5, 3).majority_of_partners(3));
        assert!(!e(2, 2).majority_of_partners(3));
    }

    proptest! {
        #[test]
        fn combine_is_monotone_and_bounded(a in 0.0..=1.0f64, b in 0.0..=1.0f64, d in 0.0..=1.0f64) {
            let c1 = combine(&[(0.8, a), (0.9, b)]);
            let c2 = combine(&[(0.8, (a + d).min(1.0)), (0.9, b)]);
            prop_assert!((0.0..=1.0).contains(&c1));
            prop_assert!(c2 >= c1 - 1e-12);
        }

        #[test]
        fn robust_z_is_shift_invariant(xs in proptest::collection::vec(0.0..1e4f64, 3..20), shift in 0.0..1e3f64, x in 0.0..1e4f64) {
            // With a purely absolute floor (medians small relative to it this is not exact), check sign only.
            let z1 = robust_z(Family::NetworkLatency, x, &xs);
            let shifted: Vec<f64> = xs.iter().map(|v| v + shift).collect();
            let z2 = robust_z(Family::NetworkLatency, x + shift, &shifted);
            prop_assert_eq!(z1 > 0.0, z2 > 0.0);
        }

        #[test]
        fn robust_z_never_nan(xs in proptest::collection::vec(prop::num::f64::ANY, 0..10), x in prop::num::f64::ANY) {
            prop_assert!(!robust_z(Family::PacketLoss, x, &xs).is_nan());
        }
    }
}
