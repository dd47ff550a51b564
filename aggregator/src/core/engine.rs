//! The decision engine: fleet view + observed cluster objects + policy → plan.
//!
//! Pure: no I/O and no clock; time comes in as `Input::now_ms`. The engine keeps plain-data state
//! between steps (per node and family state machines, group verdicts, the action log for rate
//! limiting, and in dry-run mode a shadow of what it would have changed). A fresh engine
//! initialises each node from the conditions and taint already on it, so a restarted or newly
//! elected aggregator neither flaps conditions nor repeats actions.
//!
//! A step is a sequence of phases (see the module docs of `core`): take over what the cluster
//! says, advance the state machines, judge whether the view is settled, plan conditions, update
//! the guardrails, plan taints, NodePool and NodeClaim changes, and rewrite it all for dry-run.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    conditions,
    guardrails::{self, Guardrails},
    karpenter::{self, KarpenterState},
    model::{Input, Millis, NodeReport},
    plan::Plan,
    policy::Policy,
    state_machine::{self, NodeState},
    step::StepCtx,
};
pub use super::{
    guardrails::blast_allowance,
    karpenter::with_exclusions,
    state_machine::{FamilyState, LOST_EVENTS_NOTE_WINDOWS, Phase, Suppressed, UnknownReason, advance, overall_phase},
};

/// The engine; see the module docs.
#[derive(Debug, Clone)]
pub struct Engine {
    policy: Policy,
    nodes: BTreeMap<String, NodeState>,
    guard: Guardrails,
    karpenter: KarpenterState,
    /// Time of the first step: nodes get `stale_after_ms` from here to report before a fresh
    /// engine (restart, new leader with an empty fleet view) calls them Unknown.
    started_ms: Option<Millis>,
    /// See [`Settling`].
    settling: Settling,
}

/// A fresh engine (start, restart, new leader) sees agents come back one by one. Guardrails
/// judged on that partial view are wrong both ways (three bad nodes reporting first trip the
/// fleet breaker; a zone whose healthy nodes report first looks recovered), so until the view is
/// settled the engine writes conditions but takes no new action, keeps the group verdicts it
/// found, and says nothing about suppressed actions. The view is settled once every node has
/// reported and each has had a window judged against that complete view, or when
/// `stale_after_ms` has passed since the first step (nodes silent by then are Unknown anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settling {
    /// Some nodes have not reported yet.
    Gathering,
    /// Every node had reported at this time; waiting for a window from each received after it.
    Confirming {
        complete_ms: Millis,
    },
    Settled,
}

impl Engine {
    #[must_use]
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            nodes: BTreeMap::new(),
            guard: Guardrails::default(),
            karpenter: KarpenterState::default(),
            started_ms: None,
            settling: Settling::Gathering,
        }
    }

    #[must_use]
    pub fn settling(&self) -> Settling {
        self.settling
    }

    #[must_use]
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    #[must_use]
    pub fn node_state(&self, node: &str) -> Option<&NodeState> {
        self.nodes.get(node)
    }

    #[must_use]
    pub fn verdicts(&self) -> &BTreeSet<(String, String)> {
        &self.guard.verdicts
    }

    /// The shell could not write a node's conditions: forget what we think is there so the next
    /// step writes again.
    pub fn condition_write_failed(&mut self, node: &str) {
        if let Some(st) = self.nodes.get_mut(node) {
            st.written.clear();
            st.last_write_ms = None;
        }
    }

    /// One decision step.
    pub fn step(&mut self, input: &Input) -> Plan {
        let policy = self.policy.clone();
        let now = input.now_ms;
        let started = self.start(input);
        self.track_nodes(input);
        let fresh: BTreeMap<&str, &NodeReport> = input
            .reports
            .iter()
            .filter(|(n, r)| input.nodes.contains_key(n.as_str()) && now - r.received_ms <= policy.stale_after_ms)
            .map(|(n, r)| (n.as_str(), &**r))
            .collect();
        let restarting = input
            .reports
            .iter()
            .filter(|(n, r)| {
                input.nodes.contains_key(n.as_str())
                    && !fresh.contains_key(n.as_str())
                    && r.stopped_ms.is_some_and(|t| now - t <= policy.restart_grace_ms)
            })
            .map(|(n, _)| n.as_str())
            .collect();
        let mut ctx = StepCtx {
            policy: &policy,
            input,
            now,
            started,
            fresh,
            restarting,
            settled: false,
        };
        let mut plan = Plan {
            dry_run: policy.dry_run,
            ..Plan::default()
        };
        self.karpenter.seed_verdicts(&mut self.guard, &ctx);
        state_machine::observe(&mut self.nodes, &ctx, &mut plan);
        plan.degraded_links = state_machine::degraded_links(&self.nodes);
        self.settling = self.next_settling(&ctx);
        ctx.settled = self.settling == Settling::Settled;
        plan.settled = ctx.settled;
        conditions::plan_conditions(&mut self.nodes, &ctx, &mut plan);
        self.guard.update_breaker(&self.nodes, &ctx);
        plan.breaker_open = self.guard.breaker_open;
        self.guard.update_verdicts(&self.nodes, &ctx);
        plan.verdicts = self.guard.verdicts.iter().cloned().collect();
        self.guard.expire_actions(&policy, now);
        guardrails::plan_taints(&mut self.guard, &mut self.nodes, &ctx, &mut plan);
        self.karpenter.plan_pools(&mut self.guard, &ctx, &mut plan);
        karpenter::plan_claims(&mut self.guard, &mut self.nodes, &ctx, &mut plan);
        if policy.dry_run {
            dry_run_rewrite(&mut plan);
        }
        plan
    }

    /// The first step's time; on the first step, the action budget already spent (by a
    /// predecessor, or by us before a restart) stays spent: the rate limiter starts from the
    /// actions still in its window.
    fn start(&mut self, input: &Input) -> Millis {
        if let Some(t) = self.started_ms {
            return t;
        }
        let now = input.now_ms;
        let mut spent: Vec<Millis> = input
            .past_actions
            .iter()
            .map(|a| a.at_ms)
            .filter(|t| now - *t < self.policy.rate_window_ms)
            .collect();
        spent.sort_unstable();
        self.guard.actions.extend(spent);
        self.started_ms = Some(now);
        now
    }

    /// Forgets nodes that no longer exist; takes over new ones from what is on them.
    fn track_nodes(&mut self, input: &Input) {
        self.nodes.retain(|n, _| input.nodes.contains_key(n));
        for (name, view) in &input.nodes {
            if self.nodes.contains_key(name) {
                continue;
            }
            let mut st = NodeState::from_view(view, &self.policy, input.now_ms);
            // A NodeClaim deleted before (any replica, any incarnation) is not deleted again.
            st.claim_deleted = input
                .past_actions
                .iter()
                .any(|a| a.claim_deletion && a.node.as_deref() == Some(name.as_str()));
            self.nodes.insert(name.clone(), st);
        }
    }

    fn next_settling(&self, ctx: &StepCtx) -> Settling {
        if self.settling == Settling::Settled || ctx.now - ctx.started >= self.policy.stale_after_ms {
            return Settling::Settled;
        }
        if !ctx
            .input
            .nodes
            .keys()
            .all(|n| ctx.fresh.contains_key(n.as_str()) || ctx.restarting.contains(n.as_str()))
        {
            return Settling::Gathering;
        }
        match self.settling {
            Settling::Confirming { complete_ms }
                if self
                    .nodes
                    .values()
                    .all(|s| s.last_window_received_ms.is_some_and(|r| r > complete_ms)) =>
            {
                Settling::Settled
            }
            Settling::Confirming { complete_ms } => Settling::Confirming { complete_ms },
            _ => Settling::Confirming { complete_ms: ctx.now },
        }
    }
}

/// Dry-run: every Event says what would have been done; nothing but Events is written.
fn dry_run_rewrite(plan: &mut Plan) {
    for e in &mut plan.events {
        e.reason = format!("DryRun{}", e.reason);
        e.note = format!("dry-run, would: {}", e.note);
    }
    plan.taints.clear();
}
