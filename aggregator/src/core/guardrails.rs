//! Guardrails and the node actions they guard: the circuit breaker, group verdicts, the rate
//! limiter, the blast radius, and the taint phase (direct mode).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::{
    model::{Millis, NodeView},
    plan::{EventKind, EventTarget, Plan, PlannedEvent, TaintChange},
    policy::{Policy, TaintMode},
    state_machine::{NodeState, Num, Phase, Suppressed},
    step::{INTENT_GRACE_MS, StepCtx},
};

/// A (label, value) group, e.g. ("topology.kubernetes.io/zone", "zone-a").
pub type Group = (String, String);

/// What the guardrails remember between steps.
#[derive(Debug, Clone, Default)]
pub struct Guardrails {
    /// Group verdicts in force.
    pub verdicts: BTreeSet<Group>,
    /// Groups whose fresh nodes meet a new verdict's bar right now (Degraded with confidence):
    /// a new NodePool exclusion needs its group here.
    pub confident_groups: BTreeSet<Group>,
    /// Groups without a verdict where enough nodes are unhealthy (Suspect included) that one
    /// may be forming: a new taint in them waits. Nodes hit by a zone-wide fault cross into
    /// Degraded a window or two apart, and the first would otherwise be tainted just before
    /// the verdict that replaces node verdicts.
    pub forming_groups: BTreeSet<Group>,
    /// Times of the disruptive actions within the rate window.
    pub actions: VecDeque<Millis>,
    pub breaker_open: bool,
}

impl Guardrails {
    /// Whether the rate limit leaves room for one more action.
    #[must_use]
    pub fn rate_allows(&self, p: &Policy) -> bool {
        self.actions.len() < p.rate_limit as usize
    }

    /// Forgets actions older than the rate window.
    pub fn expire_actions(&mut self, p: &Policy, now: Millis) {
        while self.actions.front().is_some_and(|t| now - *t >= p.rate_window_ms) {
            self.actions.pop_front();
        }
    }

    /// Opens the breaker when most fresh nodes are degraded (probably our bug or a fleet-wide
    /// event, not a gray node) or the actuators keep failing.
    pub(super) fn update_breaker(&mut self, nodes: &BTreeMap<String, NodeState>, ctx: &StepCtx) {
        let p = ctx.policy;
        let fresh_count = ctx.fresh.len();
        let degraded_count = ctx
            .fresh
            .keys()
            .filter(|n| nodes.get(**n).is_some_and(|s| s.overall() == Phase::Degraded))
            .count();
        let fleet_tripped = ctx.settled
            && fresh_count >= p.verdict_min_nodes
            && degraded_count as f64 > p.breaker_fleet_fraction * fresh_count as f64;
        self.breaker_open = fleet_tripped || ctx.input.actuator_failures >= p.breaker_failures;
    }

    /// Group verdicts (zone / instance type): many nodes degraded together are one verdict. A
    /// new verdict needs Degraded nodes with at least `min_action_confidence` (Suspect after one
    /// bad window is not enough) in a group while the rest of the fleet is healthy; it is lifted
    /// when at most `verdict_recover_fraction` of the group is still unhealthy.
    pub(super) fn update_verdicts(&mut self, nodes: &BTreeMap<String, NodeState>, ctx: &StepCtx) {
        let p = ctx.policy;
        self.confident_groups.clear();
        self.forming_groups.clear();
        if !ctx.settled {
            return;
        }
        for label in &p.verdict_labels {
            // Per value: (fresh nodes, unhealthy, degraded with confidence).
            let mut by_value: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
            for n in ctx.fresh.keys() {
                let Some(v) = ctx.input.nodes.get(*n).and_then(|v| v.labels.get(label)) else {
                    continue;
                };
                let e = by_value.entry(v.as_str()).or_default();
                e.0 += 1;
                if let Some(st) = nodes.get(*n) {
                    e.1 += usize::from(st.counts_unhealthy());
                    e.2 += usize::from(st.degraded_with_confidence(p.min_action_confidence));
                }
            }
            let (all_n, all_bad) = by_value.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            for (value, (n, bad, confident)) in &by_value {
                let key = (label.clone(), (*value).to_string());
                let rest_n = all_n - n;
                let rest_bad = all_bad - bad;
                let rest_ok =
                    rest_n >= p.verdict_min_nodes && (rest_bad as f64) < p.verdict_fraction / 2.0 * rest_n as f64;
                // A group that could get a verdict: big enough, and the rest of the fleet healthy.
                let eligible = *n >= p.verdict_min_nodes && rest_ok;
                let meets = eligible && *confident as f64 / (*n).max(1) as f64 >= p.verdict_fraction;
                if meets {
                    self.confident_groups.insert(key.clone());
                }
                let unhealthy_share = *bad as f64 / (*n).max(1) as f64;
                if self.verdicts.contains(&key) {
                    if unhealthy_share <= p.verdict_recover_fraction {
                        self.verdicts.remove(&key);
                    }
                } else if meets {
                    self.verdicts.insert(key);
                } else if eligible && unhealthy_share >= p.verdict_fraction {
                    self.forming_groups.insert(key);
                }
            }
        }
    }

    /// The guardrail that holds back a new taint on `view`'s node, in words.
    fn taint_block(
        &self,
        st: &NodeState,
        view: &NodeView,
        tainted: &BTreeSet<String>,
        ctx: &StepCtx,
    ) -> Option<String> {
        let p = ctx.policy;
        let conf = st.confidence();
        if conf < p.min_action_confidence {
            return Some(format!(
                "confidence {} below min_action_confidence {}",
                Num(conf),
                p.min_action_confidence
            ));
        }
        if self.breaker_open {
            return Some("circuit breaker open".into());
        }
        if let Some((l, v)) = group_in(&self.verdicts, view, p) {
            return Some(format!("group verdict on {l}={v} replaces node verdicts"));
        }
        if let Some((l, v)) = group_in(&self.forming_groups, view, p) {
            return Some(format!(
                "most nodes with {l}={v} are unhealthy: waiting to see whether the group as a whole gets a verdict"
            ));
        }
        if let Some(why) = blast_radius_block(p, &ctx.input.nodes, tainted, view) {
            return Some(why);
        }
        if !self.rate_allows(p) {
            return Some(format!(
                "rate limit {} actions per {} s",
                p.rate_limit,
                p.rate_window_ms / 1000
            ));
        }
        None
    }
}

/// The first of `view`'s verdict groups (label, value) that is in `groups`.
fn group_in(groups: &BTreeSet<Group>, view: &NodeView, p: &Policy) -> Option<Group> {
    p.verdict_labels
        .iter()
        .filter_map(|l| view.labels.get(l).map(|v| (l.clone(), v.clone())))
        .find(|k| groups.contains(k))
}

/// Allowed number of nodes acted on in a group of `n` (at least one).
#[must_use]
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "fraction is a validated share in [0, 1], so the product is in 0..=n"
)]
pub fn blast_allowance(fraction: f64, n: usize) -> usize {
    ((fraction * n as f64).floor() as usize).max(1)
}

/// Nodes carrying `label=value`.
pub(super) fn members<'a>(nodes: &'a BTreeMap<String, NodeView>, label: &str, value: &str) -> Vec<&'a String> {
    nodes
        .iter()
        .filter(|(_, v)| v.labels.get(label).is_some_and(|x| x == value))
        .map(|(n, _)| n)
        .collect()
}

fn blast_radius_block(
    p: &Policy,
    nodes: &BTreeMap<String, NodeView>,
    tainted: &BTreeSet<String>,
    view: &NodeView,
) -> Option<String> {
    for label in &p.blast_radius_labels {
        let Some(value) = view.labels.get(label) else {
            continue;
        };
        let members = members(nodes, label, value);
        let acted = members.iter().filter(|n| tainted.contains(n.as_str())).count();
        let allowed = blast_allowance(p.blast_radius, members.len());
        if acted + 1 > allowed {
            return Some(format!(
                "blast radius: {acted} of {} nodes with {label}={value} already acted on (max {allowed})",
                members.len()
            ));
        }
    }
    None
}

/// Whether the node carries our taint as far as we know: our own recent intent wins over a
/// watch that has not caught up with it; in dry-run only the shadow counts.
fn believed_tainted(st: Option<&NodeState>, view: Option<&NodeView>, ctx: &StepCtx) -> bool {
    if ctx.policy.dry_run {
        return st.is_some_and(|s| s.shadow_tainted);
    }
    let observed = view.is_some_and(|v| v.tainted);
    match st {
        Some(s) if s.taint_intent_ms.is_some_and(|t| ctx.now - t < INTENT_GRACE_MS) && s.shadow_tainted != observed => {
            s.shadow_tainted
        }
        _ => observed,
    }
}

/// The taint phase (direct mode, settled view only): untaint nodes no longer degraded, taint
/// newly Degraded ones the guardrails let through, one Event per taint, untaint or change of
/// the reason an action is held back.
pub(super) fn plan_taints(
    guard: &mut Guardrails,
    nodes: &mut BTreeMap<String, NodeState>,
    ctx: &StepCtx,
    plan: &mut Plan,
) {
    let p = ctx.policy;
    if !ctx.settled || p.taint_mode != TaintMode::Direct {
        return;
    }
    let input = ctx.input;
    let mut now_tainted: BTreeSet<String> = input
        .nodes
        .keys()
        .filter(|n| believed_tainted(nodes.get(*n), input.nodes.get(*n), ctx))
        .cloned()
        .collect();
    for (name, view) in &input.nodes {
        let Some(st) = nodes.get_mut(name) else {
            continue;
        };
        let phase = st.overall();
        let is_tainted = now_tainted.contains(name);
        let want = matches!(phase, Phase::Degraded | Phase::Recovering);
        if is_tainted && !want {
            now_tainted.remove(name);
            plan.taints.push(TaintChange {
                node: name.clone(),
                add: false,
            });
            plan.events.push(PlannedEvent {
                target: EventTarget::Node(name.clone()),
                kind: EventKind::Normal,
                reason: "GrayFailureUntaint".into(),
                action: "RemoveTaint".into(),
                note: format!("removed taint {}: node is {phase:?}", p.taint_key),
            });
            st.shadow_tainted = false;
            st.taint_intent_ms = Some(ctx.now);
            st.suppressed = None;
            continue;
        }
        // New actions need fresh evidence (a restarted engine only has what it found).
        if is_tainted || phase != Phase::Degraded || !ctx.fresh.contains_key(name.as_str()) {
            continue;
        }
        if let Some(why) = guard.taint_block(st, view, &now_tainted, ctx) {
            match &st.suppressed {
                // A predecessor already announced why; do not repeat it.
                Some(Suppressed::Inherited) => {}
                Some(Suppressed::Held(prev)) if *prev == why => {}
                _ => plan.events.push(PlannedEvent {
                    target: EventTarget::Node(name.clone()),
                    kind: EventKind::Warning,
                    reason: "ActionSuppressed".into(),
                    action: "AddTaint".into(),
                    note: format!("not tainting: {why}"),
                }),
            }
            st.suppressed = Some(Suppressed::Held(why));
        } else {
            st.suppressed = None;
            st.shadow_tainted = true;
            st.taint_intent_ms = Some(ctx.now);
            now_tainted.insert(name.clone());
            guard.actions.push_back(ctx.now);
            plan.taints.push(TaintChange {
                node: name.clone(),
                add: true,
            });
            let detail = st
                .families
                .values()
                .filter(|f| f.phase == Phase::Degraded)
                .map(|f| f.detail.clone())
                .collect::<Vec<_>>()
                .join(" | ");
            plan.events.push(PlannedEvent {
                target: EventTarget::Node(name.clone()),
                kind: EventKind::Warning,
                reason: "GrayFailureTaint".into(),
                action: "AddTaint".into(),
                note: format!("tainted {}:NoSchedule: {detail}", p.taint_key),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::{Family, Input, NodeReport};

    /// 5 nodes in zone-a, 5 in zone-b; `zone_a` gives the (phase, confidence) of zone-a's first
    /// nodes, the rest are healthy.
    fn verdicts_after(guard: &mut Guardrails, zone_a: &[(Phase, f64)]) -> BTreeSet<Group> {
        let p = Policy::default();
        let mut input = Input::default();
        let mut nodes = BTreeMap::new();
        for i in 0..10 {
            let name = format!("node-{i}");
            let mut view = NodeView::default();
            let zone = if i < 5 { "zone-a" } else { "zone-b" };
            view.labels.insert("topology.kubernetes.io/zone".into(), zone.into());
            let mut st = NodeState::from_view(&view, &p, 0);
            for fs in st.families.values_mut() {
                fs.phase = Phase::Healthy;
            }
            if let Some((phase, conf)) = zone_a.get(i) {
                let fs = st.families.get_mut(&Family::PacketLoss).expect("family");
                fs.phase = *phase;
                fs.confidence = *conf;
            }
            nodes.insert(name.clone(), st);
            input.nodes.insert(name.clone(), view);
            input.reports.insert(name, std::sync::Arc::new(NodeReport::default()));
        }
        let ctx = StepCtx {
            policy: &p,
            input: &input,
            now: 0,
            started: 0,
            fresh: input.reports.iter().map(|(n, r)| (n.as_str(), &**r)).collect(),
            restarting: BTreeSet::new(),
            settled: true,
        };
        guard.update_verdicts(&nodes, &ctx);
        guard.verdicts.clone()
    }

    #[test]
    fn a_new_group_verdict_needs_degraded_nodes_with_action_confidence() {
        let zone_a = || BTreeSet::from([("topology.kubernetes.io/zone".to_string(), "zone-a".to_string())]);
        let mut g = Guardrails::default();
        assert!(
            verdicts_after(&mut g, &[(Phase::Suspect, 0.95); 3]).is_empty(),
            "Suspect"
        );
        assert!(
            verdicts_after(&mut g, &[(Phase::Recovering, 0.95); 3]).is_empty(),
            "Recovering"
        );
        assert!(
            verdicts_after(&mut g, &[(Phase::Degraded, 0.5); 3]).is_empty(),
            "low confidence"
        );
        assert!(
            verdicts_after(&mut g, &[(Phase::Degraded, 0.95); 2]).is_empty(),
            "2 of 5"
        );
        assert!(g.confident_groups.is_empty());
        assert_eq!(verdicts_after(&mut g, &[(Phase::Degraded, 0.95); 3]), zone_a());
        assert_eq!(g.confident_groups, zone_a());
        // Kept while more than verdict_recover_fraction is still unhealthy (Suspect counts),
        // no longer confident; lifted at 1 of 5.
        assert_eq!(verdicts_after(&mut g, &[(Phase::Suspect, 0.95); 2]), zone_a());
        assert!(g.confident_groups.is_empty());
        assert!(verdicts_after(&mut g, &[(Phase::Recovering, 0.1); 1]).is_empty());
    }
}
