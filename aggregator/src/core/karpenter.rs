//! The Karpenter phases of a step: NodePool exclusion of groups with a verdict (and its
//! restoration), and NodeClaim replacement of nodes degraded for long. Plus the pure edits of a
//! NodePool's lists the actuator applies: we add exactly our entries and remove exactly those,
//! so edits others make meanwhile stay.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{
    guardrails::{Group, Guardrails, blast_allowance, members},
    model::{PoolEdits, PoolView},
    plan::{ClaimDeletion, EventKind, EventTarget, Plan, PlannedEvent, PoolChange},
    policy::Policy,
    state_machine::{NodeState, Phase},
    step::StepCtx,
};

/// The disruption reason Karpenter replaces NodeClaims for when a NodePool's requirements no
/// longer admit them.
pub const DRIFT_REASON: &str = "Drifted";

/// What the Karpenter phases remember between steps.
#[derive(Debug, Clone, Default)]
pub struct KarpenterState {
    /// Dry-run: exclusions we would have applied per pool.
    shadow_pools: BTreeMap<String, Vec<Group>>,
    /// The reason last announced per pool for leaving it alone or holding back a change (one
    /// Event per change of reason).
    announced: BTreeMap<String, String>,
    /// The verdicts our snapshots record were taken over (first step that could read them).
    seeded: bool,
}

/// The requirement entries and drift budget that exclude `excluded` from a pool: one `NotIn`
/// per label, and a `Drifted` budget of `budget` nodes.
#[must_use]
pub fn exclusion_edits(excluded: &[Group], budget: usize) -> PoolEdits {
    let mut by_label: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (l, v) in excluded {
        by_label.entry(l.as_str()).or_default().push(v.as_str());
    }
    PoolEdits {
        requirements: by_label
            .into_iter()
            .map(|(l, mut vs)| {
                vs.sort_unstable();
                vs.dedup();
                serde_json::json!({"key": l, "operator": "NotIn", "values": vs})
            })
            .collect(),
        budgets: vec![serde_json::json!({"nodes": budget.to_string(), "reasons": [DRIFT_REASON]})],
    }
}

/// `base` requirements plus one `NotIn` requirement per excluded label.
#[must_use]
pub fn with_exclusions(base: &Value, excluded: &[Group]) -> Value {
    let (reqs, _) = edit_list(base, &[], &exclusion_edits(excluded, 0).requirements);
    Value::Array(reqs)
}

/// `current` (a JSON array; anything else counts as empty) without one copy of each entry of
/// `remove`, plus each entry of `add` that is not there yet. Returns the new list and the
/// entries actually added: an equal entry someone else put there stays theirs.
#[must_use]
pub fn edit_list(current: &Value, remove: &[Value], add: &[Value]) -> (Vec<Value>, Vec<Value>) {
    let mut out: Vec<Value> = current.as_array().cloned().unwrap_or_default();
    for r in remove {
        if let Some(i) = out.iter().position(|x| x == r) {
            out.remove(i);
        }
    }
    let mut added = Vec::new();
    for a in add {
        if !out.contains(a) {
            out.push(a.clone());
            added.push(a.clone());
        }
    }
    (out, added)
}

/// Whether every entry of `edits` is in the pool's lists (our change is in effect).
#[must_use]
pub fn edits_present(edits: &PoolEdits, requirements: &Value, budgets: &Value) -> bool {
    let has = |list: &Value, x: &Value| list.as_array().is_some_and(|l| l.contains(x));
    edits.requirements.iter().all(|r| has(requirements, r)) && edits.budgets.iter().all(|b| has(budgets, b))
}

/// Whether no entry of `edits` is left in the pool's lists (our restore is in effect).
#[must_use]
pub fn edits_absent(edits: &PoolEdits, requirements: &Value, budgets: &Value) -> bool {
    let has = |list: &Value, x: &Value| list.as_array().is_some_and(|l| l.contains(x));
    !edits.requirements.iter().any(|r| has(requirements, r)) && !edits.budgets.iter().any(|b| has(budgets, b))
}

impl KarpenterState {
    /// First step that can read the pools: group verdicts already acted on (our snapshots) stay
    /// in force until the data says otherwise, so a restart does not restore a NodePool it
    /// should keep excluded.
    pub(super) fn seed_verdicts(&mut self, guard: &mut Guardrails, ctx: &StepCtx) {
        if self.seeded || ctx.input.pools_unreadable {
            return;
        }
        for pool in ctx.input.pools.values() {
            if let Some(snap) = &pool.snapshot {
                guard.verdicts.extend(snap.excluded.iter().cloned());
            }
        }
        self.seeded = true;
    }

    /// Announces `why` a pool is held back or left alone, once per change of reason.
    fn announce(&mut self, pool: &str, reason: &str, why: String, plan: &mut Plan) {
        if self.announced.get(pool) == Some(&why) {
            return;
        }
        plan.events.push(PlannedEvent {
            target: EventTarget::NodePool(pool.to_string()),
            kind: EventKind::Warning,
            reason: reason.into(),
            action: "PatchNodePool".into(),
            note: why.clone(),
        });
        self.announced.insert(pool.to_string(), why);
    }

    /// The NodePool phase: exclude groups with a verdict from the pools that have nodes in them
    /// (`NotIn`, with a drift budget), restore on recovery; retry what is not in effect.
    pub(super) fn plan_pools(&mut self, guard: &mut Guardrails, ctx: &StepCtx, plan: &mut Plan) {
        let p = ctx.policy;
        // Without the pools we know neither what is excluded nor what is ours: wait.
        if !ctx.settled || !p.karpenter_exclude || ctx.input.pools_unreadable {
            return;
        }
        for (pool_name, pool) in &ctx.input.pools {
            if let Some(why) = &pool.snapshot_refused {
                self.announce(
                    pool_name,
                    "NodePoolSnapshotRefused",
                    format!("not changing this NodePool: {why}"),
                    plan,
                );
                continue;
            }
            let recorded: Vec<Group> = if p.dry_run {
                self.shadow_pools.get(pool_name).cloned().unwrap_or_default()
            } else {
                pool.snapshot.as_ref().map(|s| s.excluded.clone()).unwrap_or_default()
            };
            let desired = desired_exclusions(pool_name, &recorded, guard, ctx);
            // Our entries are all in the pool (a patch that failed after its snapshot was saved
            // is not: it is tried again).
            let in_effect = pool
                .snapshot
                .as_ref()
                .is_none_or(|s| edits_present(&s.added, &pool.requirements, &pool.budgets));
            let nothing_to_do = if p.dry_run {
                desired == recorded
            } else if pool.snapshot.is_some() {
                !desired.is_empty() && desired == recorded && in_effect
            } else {
                desired.is_empty()
            };
            if nothing_to_do {
                self.announced.remove(pool_name);
                continue;
            }
            let new: Vec<&Group> = desired.iter().filter(|d| !recorded.contains(d)).collect();
            let adds = !new.is_empty() || (!desired.is_empty() && !in_effect && !p.dry_run);
            if adds && let Some(why) = exclusion_block(guard, &new, p) {
                self.announce(
                    pool_name,
                    "ActionSuppressed",
                    format!(
                        "not excluding {:?}: {why}",
                        if new.is_empty() { desired.iter().collect() } else { new }
                    ),
                    plan,
                );
                continue;
            }
            self.announced.remove(pool_name);
            if !new.is_empty() {
                guard.actions.push_back(ctx.now);
            }
            let budget = drift_budget(pool_name, ctx);
            let change = plan_change(pool_name, pool, &desired, budget);
            if desired != recorded {
                plan.events.push(pool_event(pool_name, &recorded, &desired, budget));
            }
            if p.dry_run {
                self.shadow_pools.insert(pool_name.clone(), desired);
            } else {
                plan.pools.push(change);
            }
        }
    }
}

/// The exclusions a pool should carry: the verdicts on groups it has nodes in, and those it
/// carries already whose verdict is still on (even if the pool has no nodes left there).
fn desired_exclusions(pool_name: &str, recorded: &[Group], guard: &Guardrails, ctx: &StepCtx) -> Vec<Group> {
    let p = ctx.policy;
    let mut desired: Vec<Group> = guard
        .verdicts
        .iter()
        .filter(|(l, v)| {
            ctx.input
                .nodes
                .values()
                .any(|n| n.labels.get(&p.nodepool_label).is_some_and(|x| x == pool_name) && n.labels.get(l) == Some(v))
        })
        .cloned()
        .collect();
    for c in recorded {
        if guard.verdicts.contains(c) && !desired.contains(c) {
            desired.push(c.clone());
        }
    }
    desired.sort();
    desired
}

/// The guardrail that holds back new exclusions (or the retry of one not in effect), in words.
fn exclusion_block(guard: &Guardrails, new: &[&Group], p: &Policy) -> Option<String> {
    if guard.breaker_open {
        return Some("circuit breaker open".into());
    }
    if let Some(g) = new.iter().find(|g| !guard.confident_groups.contains(**g)) {
        return Some(format!(
            "{}={} has too few nodes Degraded with confidence of at least min_action_confidence {}",
            g.0, g.1, p.min_action_confidence
        ));
    }
    if !new.is_empty() && !guard.rate_allows(p) {
        return Some(format!(
            "rate limit {} actions per {} s",
            p.rate_limit,
            p.rate_window_ms / 1000
        ));
    }
    None
}

/// How many NodeClaims of the pool Karpenter may replace at once for drift while excluded:
/// `exclude_drift_budget`, at most the pool's blast radius allowance.
fn drift_budget(pool_name: &str, ctx: &StepCtx) -> usize {
    let p = ctx.policy;
    let size = members(&ctx.input.nodes, &p.nodepool_label, pool_name).len();
    (p.exclude_drift_budget as usize).min(blast_allowance(p.blast_radius, size))
}

fn plan_change(pool_name: &str, pool: &PoolView, desired: &[Group], budget: usize) -> PoolChange {
    let remove = pool.snapshot.as_ref().map(|s| s.added.clone()).unwrap_or_default();
    if desired.is_empty() {
        PoolChange::Restore {
            pool: pool_name.to_string(),
            remove,
        }
    } else {
        PoolChange::Exclude {
            pool: pool_name.to_string(),
            excluded: desired.to_vec(),
            remove,
            add: exclusion_edits(desired, budget),
        }
    }
}

fn pool_event(pool_name: &str, recorded: &[Group], desired: &[Group], budget: usize) -> PlannedEvent {
    let (kind, reason, note) = if desired.is_empty() {
        (
            EventKind::Normal,
            "NodePoolRestored",
            format!("removed our requirements NotIn {recorded:?} and drift budget; other edits kept"),
        )
    } else {
        (
            EventKind::Warning,
            "NodePoolExcluded",
            format!(
                "requirements NotIn {desired:?}; Karpenter may replace at most {budget} NodeClaims of this pool at once for drift (disruption budget); what we added is saved to a ConfigMap"
            ),
        )
    };
    PlannedEvent {
        target: EventTarget::NodePool(pool_name.to_string()),
        kind,
        reason: reason.into(),
        action: "PatchNodePool".into(),
        note,
    }
}

/// The NodeClaim phase (off by default): delete the NodeClaim of a node degraded for
/// `replace_after_windows` windows, once, within the guardrails.
pub(super) fn plan_claims(
    guard: &mut Guardrails,
    nodes: &mut BTreeMap<String, NodeState>,
    ctx: &StepCtx,
    plan: &mut Plan,
) {
    let p = ctx.policy;
    if !ctx.settled || !p.karpenter_replace || ctx.input.claims_unreadable {
        return;
    }
    let input = ctx.input;
    for (name, view) in &input.nodes {
        let Some(st) = nodes.get(name) else {
            continue;
        };
        let Some(claim) = view.nodeclaim.clone() else {
            continue;
        };
        let degraded_windows = st.degraded_windows;
        if st.claim_deleted || degraded_windows < p.replace_after_windows {
            continue;
        }
        if st.confidence() < p.min_action_confidence || guard.breaker_open || !guard.rate_allows(p) {
            continue;
        }
        // Karpenter refuses repair above 20% unhealthy in a pool; we stay within our radius.
        let pool = view.labels.get(&p.nodepool_label);
        let in_pool: Vec<&String> = input
            .nodes
            .iter()
            .filter(|(_, v)| v.labels.get(&p.nodepool_label) == pool)
            .map(|(n, _)| n)
            .collect();
        let unhealthy = in_pool
            .iter()
            .filter(|n| nodes.get(n.as_str()).is_some_and(|s| s.overall() == Phase::Degraded))
            .count();
        if unhealthy as f64 > p.blast_radius * in_pool.len() as f64 {
            continue;
        }
        guard.actions.push_back(ctx.now);
        if let Some(s) = nodes.get_mut(name) {
            s.claim_deleted = true;
        }
        plan.events.push(PlannedEvent {
            target: EventTarget::Node(name.clone()),
            kind: EventKind::Warning,
            reason: "NodeClaimReplaced".into(),
            action: "DeleteNodeClaim".into(),
            note: format!("deleted NodeClaim {claim}: degraded for {degraded_windows} windows"),
        });
        if !p.dry_run {
            plan.claim_deletions.push(ClaimDeletion {
                node: name.clone(),
                claim,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn exclusion_edits_are_one_not_in_per_label_and_a_drift_budget() {
        let zone = "topology.kubernetes.io/zone".to_string();
        let it = "node.kubernetes.io/instance-type".to_string();
        let edits = exclusion_edits(
            &[
                (zone.clone(), "b".into()),
                (it.clone(), "c5.xlarge".into()),
                (zone.clone(), "a".into()),
            ],
            2,
        );
        assert_eq!(
            edits.requirements,
            vec![
                json!({"key": it, "operator": "NotIn", "values": ["c5.xlarge"]}),
                json!({"key": zone, "operator": "NotIn", "values": ["a", "b"]}),
            ]
        );
        assert_eq!(edits.budgets, vec![json!({"nodes": "2", "reasons": ["Drifted"]})]);
        let reqs = json!([{"key": "x", "operator": "In", "values": ["y"]}]);
        let budgets = json!([{"nodes": "10%"}]);
        assert!(edits_absent(&edits, &reqs, &budgets));
        assert!(!edits_present(&edits, &reqs, &budgets));
        let (r, _) = edit_list(&reqs, &[], &edits.requirements);
        let (b, _) = edit_list(&budgets, &[], &edits.budgets);
        assert!(edits_present(&edits, &Value::Array(r), &Value::Array(b)));
        assert!(edits_present(&PoolEdits::default(), &Value::Null, &Value::Null));
    }
}
