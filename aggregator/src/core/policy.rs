//! The decision policy: thresholds, hysteresis, guardrails. Part of the config file (`[policy]`).

use serde::{Deserialize, Serialize};

use super::model::Millis;

/// Default `condition_refresh_ms`: the kubelet's own `nodeStatusReportFrequency` (5 min), so an
/// idle fleet costs the apiserver no more Node status writes than the kubelets do (10,000 nodes:
/// 33 writes/s, where a 60 s refresh cost 167).
pub const NODE_STATUS_REPORT_MS: Millis = 300_000;

/// How the aggregator acts on a degraded node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TaintMode {
    /// We put our own NoSchedule taint on the node.
    #[default]
    Direct,
    /// Conditions only; a NodeReadinessRule (deploy/helm/graywatch/nrc/) turns them into taints.
    Nrc,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent yes/no switches of the config file"
)]
pub struct Policy {
    /// Log and emit Events of what would be done; write nothing else.
    pub dry_run: bool,
    pub taint_mode: TaintMode,
    /// Our taint key (direct mode).
    pub taint_key: String,
    /// Condition type prefix, e.g. "graywatch.io/" → "graywatch.io/NetworkLatencyHealthy".
    pub condition_prefix: String,
    /// Also write the EKS node-repair condition `NetworkingReady` mirroring the network families.
    pub mirror_eks: bool,
    /// Node labels that form the peer group a node is compared against.
    pub peer_group_labels: Vec<String>,
    /// Labels whose values can get a group-wide verdict (zone, instance type).
    pub verdict_labels: Vec<String>,
    /// Label naming the node's Karpenter NodePool.
    pub nodepool_label: String,
    /// Groups the blast radius is enforced in (each separately): pool and zone by default.
    pub blast_radius_labels: Vec<String>,
    /// No report for this long → conditions Unknown.
    pub stale_after_ms: Millis,
    /// After an agent said it was stopping on purpose (a rollout, a node shutdown), its node's
    /// conditions are held this long from then (when longer than `stale_after_ms`) for the next
    /// agent to report: a new pod can take longer than `stale_after_ms` to start (image pull, a
    /// slow kubelet) and an ordinary rollout should not make every node Unknown. 0: no hold.
    pub restart_grace_ms: Millis,
    /// Confidence at or above which a window counts as bad.
    pub degrade_confidence: f64,
    /// Confidence below which a window counts as good.
    pub recover_confidence: f64,
    /// Consecutive bad windows before Degraded (Suspect in between), when the node's own
    /// detector (local score at least `recover_confidence`) or a majority of its traffic
    /// partners (vantage) back them.
    pub degrade_windows: u32,
    /// Consecutive bad windows before Degraded when nothing but the node's place in its peer
    /// group says so (its own detector sees nothing unusual against its own baseline, and no
    /// majority of its partners sees it degraded). A node that was always worse than its peers
    /// is still found, but a few windows of shared load or noise that put one node above the
    /// median (2026-12-06 soak: 2 of 3 false taints) are not acted on.
    pub peer_only_degrade_windows: u32,
    /// Consecutive good windows before Healthy again (Recovering in between).
    pub recover_windows: u32,
    /// Minimum confidence to take an action (taint, claim deletion); conditions are written anyway.
    pub min_action_confidence: f64,
    /// Max fraction of a pool or of a zone acted on (tainted / replaced) at once. Karpenter's
    /// own node-repair stops at 20% unhealthy; never configure higher.
    pub blast_radius: f64,
    /// Max new disruptive actions per `rate_window_ms`.
    pub rate_limit: u32,
    pub rate_window_ms: Millis,
    /// Circuit breaker: if more than this fraction of fresh nodes is degraded, stop all new
    /// disruptive actions (probably our bug or a fleet-wide event, not a gray node).
    pub breaker_fleet_fraction: f64,
    /// Circuit breaker: open after this many consecutive actuator failures.
    pub breaker_failures: u32,
    /// A group (zone, instance type) with at least this many fresh nodes can get a verdict.
    pub verdict_min_nodes: usize,
    /// Fraction of a group's nodes that are not healthy → group verdict.
    pub verdict_fraction: f64,
    /// Group verdict is lifted when at most this fraction is degraded.
    pub verdict_recover_fraction: f64,
    /// Exclude a group with a verdict from Karpenter NodePools (`NotIn` requirement).
    pub karpenter_exclude: bool,
    /// How many NodeClaims Karpenter may replace at once because of an exclusion (its `NotIn`
    /// drifts every NodeClaim in the excluded group): set as a `Drifted` disruption budget on the
    /// NodePool while excluded, lowered to the pool's blast radius allowance. 0 = new capacity
    /// avoids the group, existing nodes are not replaced for it.
    pub exclude_drift_budget: u32,
    /// Delete the NodeClaim of a node degraded for `replace_after_windows` windows (off by default).
    pub karpenter_replace: bool,
    pub replace_after_windows: u32,
    /// Peer evidence: robust z at which the peer score starts / saturates.
    pub peer_z_low: f64,
    pub peer_z_high: f64,
    /// Minimum fresh peers in a group for peer evidence.
    pub peer_min_group: usize,
    /// Vantage evidence: an observer flags a node when its figure towards it is at least this
    /// multiple of the observer's own median towards all nodes.
    pub vantage_ratio: f64,
    /// Minimum observers for vantage evidence.
    pub vantage_min_observers: usize,
    /// Weights of the three evidence sources in the noisy-or combination.
    pub weight_local: f64,
    pub weight_peer: f64,
    pub weight_vantage: f64,
    /// Condition refresh interval when nothing changed (≤ 1 write per node per this period):
    /// it refreshes `lastHeartbeatTime` and the figures in the messages. Status and reason
    /// changes are written at once whatever it says.
    pub condition_refresh_ms: Millis,
    /// Show an agent's forecast failure (a workload's working set reaching its memory limit)
    /// as the family condition False with reason `PredictedFailure` (never an action by itself).
    pub predict_failures: bool,
    /// Minimum confidence (R² of the rise, from the agent) for a prediction to show.
    pub predict_confidence: f64,
    /// A prediction further away than this is not shown (the agent's own horizon is 10 min).
    pub predict_horizon_ms: Millis,
    /// A prediction shown stays until this many windows in a row bring none (damps a forecast
    /// at the edge of the confidence floor or the horizon).
    pub predict_clear_windows: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            dry_run: false,
            taint_mode: TaintMode::Direct,
            taint_key: "graywatch.io/degraded".into(),
            condition_prefix: "graywatch.io/".into(),
            mirror_eks: false,
            peer_group_labels: vec![
                "karpenter.sh/nodepool".into(),
                "node.kubernetes.io/instance-type".into(),
            ],
            verdict_labels: vec![
                "topology.kubernetes.io/zone".into(),
                "node.kubernetes.io/instance-type".into(),
            ],
            nodepool_label: "karpenter.sh/nodepool".into(),
            blast_radius_labels: vec!["karpenter.sh/nodepool".into(), "topology.kubernetes.io/zone".into()],
            stale_after_ms: 60_000,
            restart_grace_ms: 300_000,
            degrade_confidence: 0.75,
            recover_confidence: 0.4,
            degrade_windows: 3,
            peer_only_degrade_windows: 30,
            recover_windows: 3,
            min_action_confidence: 0.8,
            blast_radius: 0.2,
            rate_limit: 5,
            rate_window_ms: 600_000,
            breaker_fleet_fraction: 0.5,
            breaker_failures: 5,
            verdict_min_nodes: 3,
            verdict_fraction: 0.5,
            verdict_recover_fraction: 0.2,
            karpenter_exclude: true,
            exclude_drift_budget: 1,
            karpenter_replace: false,
            replace_after_windows: 30,
            peer_z_low: 3.0,
            peer_z_high: 6.0,
            peer_min_group: 4,
            vantage_ratio: 3.0,
            vantage_min_observers: 3,
            weight_local: 0.6,
            weight_peer: 0.8,
            weight_vantage: 0.9,
            condition_refresh_ms: NODE_STATUS_REPORT_MS,
            predict_failures: true,
            predict_confidence: 0.8,
            predict_horizon_ms: 600_000,
            predict_clear_windows: 5,
        }
    }
}

/// A policy field with an invalid value.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("policy.{field}: {problem}")]
pub struct PolicyError {
    pub field: &'static str,
    pub problem: String,
}

impl Policy {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let err = |field: &'static str, problem: &str| {
            Err(PolicyError {
                field,
                problem: problem.into(),
            })
        };
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        if !(self.blast_radius > 0.0 && self.blast_radius <= 0.2) {
            return err(
                "blast_radius",
                "must be in (0, 0.2] (Karpenter's own repair stops at 20%)",
            );
        }
        for (field, v) in [
            ("degrade_confidence", self.degrade_confidence),
            ("recover_confidence", self.recover_confidence),
            ("min_action_confidence", self.min_action_confidence),
            ("breaker_fleet_fraction", self.breaker_fleet_fraction),
            ("verdict_fraction", self.verdict_fraction),
            ("verdict_recover_fraction", self.verdict_recover_fraction),
            ("weight_local", self.weight_local),
            ("weight_peer", self.weight_peer),
            ("weight_vantage", self.weight_vantage),
            ("predict_confidence", self.predict_confidence),
        ] {
            if !unit(v) {
                return err(field, "must be in [0, 1]");
            }
        }
        if self.recover_confidence >= self.degrade_confidence {
            return err("recover_confidence", "must be below degrade_confidence (hysteresis)");
        }
        if self.verdict_recover_fraction >= self.verdict_fraction {
            return err(
                "verdict_recover_fraction",
                "must be below verdict_fraction (hysteresis)",
            );
        }
        if self.degrade_windows == 0 {
            return err("degrade_windows", "must be at least 1");
        }
        if self.recover_windows == 0 {
            return err("recover_windows", "must be at least 1");
        }
        if self.peer_only_degrade_windows < self.degrade_windows {
            return err("peer_only_degrade_windows", "must be at least degrade_windows");
        }
        if self.stale_after_ms <= 0 {
            return err("stale_after_ms", "must be positive");
        }
        if self.restart_grace_ms < 0 {
            return err("restart_grace_ms", "must be 0 (no hold) or positive");
        }
        if self.condition_refresh_ms <= 0 {
            return err("condition_refresh_ms", "must be positive");
        }
        if self.predict_horizon_ms <= 0 {
            return err("predict_horizon_ms", "must be positive");
        }
        if self.predict_clear_windows == 0 {
            return err("predict_clear_windows", "must be at least 1");
        }
        if self.rate_window_ms <= 0 {
            return err("rate_window_ms", "must be positive");
        }
        if self.peer_z_high <= self.peer_z_low {
            return err("peer_z_high", "must be above peer_z_low");
        }
        if self.vantage_ratio <= 1.0 {
            return err("vantage_ratio", "must be above 1");
        }
        if self.taint_key.is_empty() || self.taint_key.starts_with("kubernetes.io/") {
            return err("taint_key", "must be a non-empty key under our own domain");
        }
        if self.condition_prefix.is_empty() || !self.condition_prefix.ends_with('/') {
            return err("condition_prefix", "must be a domain ending in '/'");
        }
        if self.verdict_min_nodes == 0 {
            return err("verdict_min_nodes", "must be at least 1");
        }
        Ok(())
    }

    /// Condition type of one family.
    #[must_use]
    pub fn family_condition(&self, family: super::model::Family) -> String {
        format!("{}{}Healthy", self.condition_prefix, family.as_str())
    }

    /// Condition type of the overall verdict.
    #[must_use]
    pub fn overall_condition(&self) -> String {
        format!("{}Healthy", self.condition_prefix)
    }
}
