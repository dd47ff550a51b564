//! The decision engine: fleet view + observed cluster objects + policy → plan.
//!
//! Pure: no I/O and no clock; time comes in as `Input::now_ms`. The engine keeps plain-data state
//! between steps (per node and family state machines, group verdicts, the action log for rate
//! limiting, and in dry-run mode a shadow of what it would have changed). A fresh engine
//! initialises each node from the conditions and taint already on it, so a restarted or newly
//! elected aggregator neither flaps conditions nor repeats actions.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::{
    evidence::{self, AddressBook, VantageEvidence},
    model::{CondStatus, Family, Input, Millis, NodeReport, NodeView, PoolSnapshot, WindowId},
    plan::{
        ClaimDeletion, ConditionWrite, DesiredCondition, EventKind, EventTarget, Plan, PlannedEvent, PoolChange,
        TaintChange,
    },
    policy::{Policy, TaintMode},
};

/// How long a planned taint change is trusted over an observed state that does not show it yet
/// (the shell reads Nodes from a watch, which lags our own writes a little).
pub const INTENT_GRACE_MS: Millis = 30_000;

/// Condition type Karpenter's EKS node repair watches for networking.
pub const EKS_NETWORKING_CONDITION: &str = "NetworkingReady";

/// Per node and family: Healthy → Suspect → Degraded → Recovering → Healthy; Unknown when stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    Unknown,
    Healthy,
    Suspect,
    Recovering,
    Degraded,
}

impl Phase {
    /// Condition status with positive polarity (True = healthy).
    #[must_use]
    pub fn status(self) -> CondStatus {
        match self {
            Phase::Healthy | Phase::Suspect => CondStatus::True,
            Phase::Degraded | Phase::Recovering => CondStatus::False,
            Phase::Unknown => CondStatus::Unknown,
        }
    }

    /// Not healthy (counts towards group verdicts).
    #[must_use]
    pub fn is_unhealthy(self) -> bool {
        matches!(self, Phase::Suspect | Phase::Degraded | Phase::Recovering)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FamilyState {
    pub phase: Phase,
    pub bad_streak: u32,
    pub good_streak: u32,
    pub confidence: f64,
    /// Human text with the numbers behind the last evaluation.
    pub detail: String,
    /// Why the phase is Unknown (CamelCase), if it is.
    pub unknown_reason: &'static str,
    /// Observers whose vantage evidence alone would make this family bad, without corroboration
    /// by the node's own measurements or a majority of its traffic partners (empty = none). Such
    /// evidence raises Suspect at most: no False condition, no action, no group verdict.
    pub uncorroborated: Vec<String>,
}

impl FamilyState {
    fn new(phase: Phase) -> Self {
        Self {
            phase,
            bad_streak: 0,
            good_streak: 0,
            confidence: 0.0,
            detail: String::new(),
            unknown_reason: "NoReport",
            uncorroborated: Vec::new(),
        }
    }
}

/// One step of the state machine for a new window with confidence `conf`.
pub fn advance(st: &mut FamilyState, conf: f64, p: &Policy) {
    let bad = conf >= p.degrade_confidence;
    let good = conf < p.recover_confidence;
    st.confidence = conf;
    if bad {
        st.bad_streak = st.bad_streak.saturating_add(1);
        st.good_streak = 0;
    } else if good {
        st.good_streak = st.good_streak.saturating_add(1);
        st.bad_streak = 0;
    } else {
        // In the hysteresis band: neither streak grows, a bad run is broken.
        st.bad_streak = 0;
    }
    st.phase = match st.phase {
        Phase::Unknown | Phase::Healthy | Phase::Suspect if bad => {
            if st.bad_streak >= p.degrade_windows {
                Phase::Degraded
            } else {
                Phase::Suspect
            }
        }
        Phase::Unknown | Phase::Healthy | Phase::Suspect => Phase::Healthy,
        Phase::Degraded | Phase::Recovering if bad => Phase::Degraded,
        Phase::Degraded | Phase::Recovering if good => {
            if st.good_streak >= p.recover_windows {
                Phase::Healthy
            } else {
                Phase::Recovering
            }
        }
        // Hysteresis band: stay where we are.
        Phase::Degraded => Phase::Degraded,
        Phase::Recovering => Phase::Recovering,
    };
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeState {
    pub families: BTreeMap<Family, FamilyState>,
    /// The last window evaluated.
    pub last_window: Option<WindowId>,
    /// When the aggregator received that window.
    pub last_window_received_ms: Option<Millis>,
    /// Consecutive windows with the overall phase Degraded.
    pub degraded_windows: u32,
    /// What we last wrote (or found on start), by condition type: (status, reason).
    pub written: BTreeMap<String, (CondStatus, String)>,
    pub last_write_ms: Option<Millis>,
    /// The guardrail that last held back an action on this node (to emit one Event per change).
    pub suppressed: Option<String>,
    /// Dry-run: whether we would have tainted it. Otherwise: the taint state we last planned,
    /// trusted over the (possibly lagging) observed state for `INTENT_GRACE_MS` after planning.
    pub shadow_tainted: bool,
    pub taint_intent_ms: Option<Millis>,
    pub claim_deleted: bool,
    /// The kinds of kernel events the agent lost recently, and for how many more windows
    /// without a loss the note stays (damped so an intermittent loss does not flap messages).
    pub lost_events: Option<(String, u32)>,
    /// The lost-events note last written to the conditions.
    pub lost_events_written: Option<String>,
}

/// Windows the lost-events note stays on the conditions after the agent's last loss.
pub const LOST_EVENTS_NOTE_WINDOWS: u32 = 60;

/// The engine; see the module docs.
#[derive(Debug, Clone)]
pub struct Engine {
    policy: Policy,
    nodes: BTreeMap<String, NodeState>,
    verdicts: BTreeSet<(String, String)>,
    actions: VecDeque<Millis>,
    breaker_open: bool,
    /// Dry-run: exclusions we would have applied per pool.
    shadow_pools: BTreeMap<String, Vec<(String, String)>>,
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

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

impl Engine {
    #[must_use]
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            nodes: BTreeMap::new(),
            verdicts: BTreeSet::new(),
            actions: VecDeque::new(),
            breaker_open: false,
            shadow_pools: BTreeMap::new(),
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
        &self.verdicts
    }

    /// The shell could not write a node's conditions: forget what we think is there so the next
    /// step writes again.
    pub fn condition_write_failed(&mut self, node: &str) {
        if let Some(st) = self.nodes.get_mut(node) {
            st.written.clear();
            st.last_write_ms = None;
        }
    }

    fn init_node(&self, view: &NodeView, now: Millis) -> NodeState {
        let p = &self.policy;
        let mut families = BTreeMap::new();
        let mut written = BTreeMap::new();
        for f in Family::ALL {
            let ty = p.family_condition(f);
            let mut unknown_reason = "NoReport";
            let phase = match view.conditions.get(&ty) {
                Some(c) => {
                    unknown_reason = match c.reason.as_str() {
                        "AgentStale" => "AgentStale",
                        "NoData" => "NoData",
                        _ => "NoReport",
                    };
                    written.insert(ty, (c.status, c.reason.clone()));
                    match c.status {
                        CondStatus::True => Phase::Healthy,
                        // Keep a node we found degraded degraded until it recovers through hysteresis.
                        CondStatus::False => Phase::Degraded,
                        CondStatus::Unknown => Phase::Unknown,
                    }
                }
                None => Phase::Unknown,
            };
            let mut fs = FamilyState {
                unknown_reason,
                ..FamilyState::new(phase)
            };
            if phase == Phase::Degraded {
                fs.bad_streak = p.degrade_windows;
            }
            families.insert(f, fs);
        }
        for ty in [p.overall_condition(), EKS_NETWORKING_CONDITION.to_string()] {
            if let Some(c) = view.conditions.get(&ty) {
                written.insert(ty, (c.status, c.reason.clone()));
            }
        }
        let wrote_any = !written.is_empty();
        let degraded = families.values().any(|f: &FamilyState| f.phase == Phase::Degraded);
        NodeState {
            families,
            last_window: None,
            last_window_received_ms: None,
            degraded_windows: 0,
            written,
            // What is on the Node is as good as a write we just made: no rewrite on start.
            last_write_ms: wrote_any.then_some(now),
            suppressed: (degraded && !view.tainted).then(String::new),
            shadow_tainted: view.tainted,
            taint_intent_ms: None,
            claim_deleted: false,
            lost_events: None,
            lost_events_written: None,
        }
    }

    /// One decision step.
    #[allow(clippy::too_many_lines)]
    pub fn step(&mut self, input: &Input) -> Plan {
        let p = self.policy.clone();
        let now = input.now_ms;
        let mut plan = Plan {
            dry_run: p.dry_run,
            ..Plan::default()
        };

        // First step: group verdicts already acted on (snapshots exist) stay in force until the
        // data says otherwise, so a restart does not restore a NodePool it should keep excluded.
        let started = match self.started_ms {
            Some(t) => t,
            None => {
                for pool in input.pools.values() {
                    if let Some(snap) = &pool.snapshot {
                        self.verdicts.extend(snap.excluded.iter().cloned());
                    }
                }
                // The action budget already spent (by a predecessor, or by us before a restart)
                // stays spent: the rate limiter starts from the actions still in its window.
                let mut spent: Vec<Millis> = input
                    .past_actions
                    .iter()
                    .map(|a| a.at_ms)
                    .filter(|t| now - *t < p.rate_window_ms)
                    .collect();
                spent.sort_unstable();
                self.actions.extend(spent);
                self.started_ms = Some(now);
                now
            }
        };

        // Forget nodes that no longer exist.
        self.nodes.retain(|n, _| input.nodes.contains_key(n));
        for (name, view) in &input.nodes {
            if !self.nodes.contains_key(name) {
                let mut st = self.init_node(view, now);
                // A NodeClaim deleted before (any replica, any incarnation) is not deleted again.
                st.claim_deleted = input
                    .past_actions
                    .iter()
                    .any(|a| a.claim_deletion && a.node.as_deref() == Some(name.as_str()));
                self.nodes.insert(name.clone(), st);
            }
        }

        let fresh: BTreeMap<&str, &NodeReport> = input
            .reports
            .iter()
            .filter(|(n, r)| input.nodes.contains_key(n.as_str()) && now - r.received_ms <= p.stale_after_ms)
            .map(|(n, r)| (n.as_str(), &**r))
            .collect();

        // Peer groups.
        let group_key = |v: &NodeView| -> Vec<String> {
            p.peer_group_labels
                .iter()
                .map(|l| v.labels.get(l).cloned().unwrap_or_default())
                .collect()
        };
        let mut groups: BTreeMap<(Family, Vec<String>), Vec<f64>> = BTreeMap::new();
        for (n, r) in &fresh {
            let Some(view) = input.nodes.get(*n) else {
                continue;
            };
            for (f, v) in &r.figures {
                if v.is_finite() {
                    groups.entry((*f, group_key(view))).or_default().push(*v);
                }
            }
        }
        // Median and scale once per group (O(fleet log fleet) per step, not per node).
        let groups: BTreeMap<(Family, Vec<String>), evidence::GroupStats> = groups
            .into_iter()
            .filter_map(|(k, vals)| evidence::GroupStats::of(k.0, &vals).map(|g| (k, g)))
            .collect();

        // Vantage evidence for the network families.
        let book = AddressBook::new(input.nodes.values());
        let mut vantage: BTreeMap<Family, BTreeMap<String, VantageEvidence>> = BTreeMap::new();
        for f in Family::ALL.into_iter().filter(|f| f.has_vantage()) {
            vantage.insert(
                f,
                evidence::vantage(f, &book, fresh.iter().map(|(n, r)| (*n, *r)), p.vantage_ratio),
            );
        }

        // Per node and family state machines (advance once per new window).
        let names: Vec<String> = input.nodes.keys().cloned().collect();
        for name in &names {
            let Some(view) = input.nodes.get(name) else {
                continue;
            };
            let Some(st) = self.nodes.get_mut(name) else {
                continue;
            };
            let Some(report) = fresh.get(name.as_str()) else {
                // Just started and no report yet: keep what we found on the Node.
                if !input.reports.contains_key(name) && now - started < p.stale_after_ms {
                    continue;
                }
                let reason = if input.reports.contains_key(name) {
                    "AgentStale"
                } else {
                    "NoReport"
                };
                for fs in st.families.values_mut() {
                    *fs = FamilyState {
                        unknown_reason: reason,
                        ..FamilyState::new(Phase::Unknown)
                    };
                }
                st.degraded_windows = 0;
                continue;
            };
            let window = report.window_id();
            if st.last_window.as_ref() == Some(&window) {
                continue;
            }
            st.last_window = Some(window);
            st.last_window_received_ms = Some(report.received_ms);
            if report.lost_events.is_empty() {
                st.lost_events = st
                    .lost_events
                    .take()
                    .and_then(|(kinds, left)| (left > 1).then(|| (kinds, left - 1)));
            } else {
                let kinds = report.lost_events.keys().cloned().collect::<Vec<_>>().join(", ");
                st.lost_events = Some((kinds, LOST_EVENTS_NOTE_WINDOWS));
            }
            for f in Family::ALL {
                let Some(fs) = st.families.get_mut(&f) else {
                    continue;
                };
                let figure = report.figures.get(&f).copied().filter(|v| v.is_finite());
                let local = report.local.get(&f);
                if figure.is_none() && local.is_none() {
                    *fs = FamilyState {
                        unknown_reason: "NoData",
                        ..FamilyState::new(Phase::Unknown)
                    };
                    continue;
                }
                let mut detail = Vec::new();
                let local_score = local.map_or(0.0, |(s, r)| {
                    if *s > 0.0 {
                        detail.push(format!("local {} ({r})", fmt_num(*s)));
                    }
                    *s
                });
                let mut peer_score = 0.0;
                if let Some(x) = figure
                    && let Some(g) = groups.get(&(f, group_key(view))).filter(|g| g.n >= p.peer_min_group)
                {
                    let z = g.z(x);
                    peer_score = evidence::ramp(z, p.peer_z_low, p.peer_z_high);
                    detail.push(format!(
                        "{} vs peer median {} (z {}, {} peers)",
                        fmt_num(x),
                        fmt_num(g.median),
                        fmt_num(z),
                        g.n
                    ));
                }
                // Vantage evidence counts only when corroborated: by the node's own measurements
                // (its detector, its position in its peer group, or its own view of everyone) or
                // by a strict majority of the nodes it reports traffic with. Other nodes' words
                // alone raise Suspect at most.
                let mut vantage_score = 0.0;
                let mut raw_vantage = 0.0;
                let mut observers_alone: Option<&VantageEvidence> = None;
                if let Some(v) = vantage.get(&f).and_then(|m| m.get(name)) {
                    raw_vantage = v.score(p.vantage_min_observers);
                    if v.observers > 0 {
                        detail.push(format!("{}/{} peers see it degraded", v.flagged, v.observers));
                    }
                    let own = local_score >= p.recover_confidence || peer_score > 0.0 || v.own_link_slow;
                    if own || v.majority_of_partners(p.vantage_min_observers) {
                        vantage_score = raw_vantage;
                    } else if raw_vantage > 0.0 {
                        observers_alone = Some(v);
                        detail.push(format!(
                            "not corroborated (own figures healthy, {} of its {} traffic partners agree)",
                            v.flagged_partners, v.partners
                        ));
                    }
                }
                let conf = evidence::combine(&[
                    (p.weight_local, local_score),
                    (p.weight_peer, peer_score),
                    (p.weight_vantage, vantage_score),
                ]);
                let raw_conf = evidence::combine(&[
                    (p.weight_local, local_score),
                    (p.weight_peer, peer_score),
                    (p.weight_vantage, raw_vantage),
                ]);
                advance(fs, conf, &p);
                fs.detail = format!("confidence {}: {}", fmt_num(conf), detail.join("; "));
                let alone: Vec<String> = match observers_alone {
                    Some(v) if raw_conf >= p.degrade_confidence && conf < p.degrade_confidence => v.flagged_by.clone(),
                    _ => Vec::new(),
                };
                if !alone.is_empty() {
                    if fs.phase == Phase::Healthy {
                        fs.phase = Phase::Suspect;
                    }
                    if fs.uncorroborated.is_empty() {
                        plan.events.push(PlannedEvent {
                            target: EventTarget::Node(name.clone()),
                            kind: EventKind::Warning,
                            reason: "UncorroboratedVantage".into(),
                            action: "None".into(),
                            note: format!(
                                "{}: {} report it degraded, but neither its own measurements nor a majority of its traffic partners agree: Suspect only, no action",
                                f.as_str(),
                                alone.join(", ")
                            ),
                        });
                    }
                }
                fs.uncorroborated = alone;
            }
            if overall_phase(st) == Phase::Degraded {
                st.degraded_windows = st.degraded_windows.saturating_add(1);
            } else {
                st.degraded_windows = 0;
            }
        }

        self.settling = self.next_settling(input, &fresh, now, started);
        let settled = self.settling == Settling::Settled;
        plan.settled = settled;

        // Conditions (+ transition Events).
        let overall_type = p.overall_condition();
        let types = ConditionTypes::new(&p);
        for name in &names {
            let Some(view) = input.nodes.get(name) else {
                continue;
            };
            let Some(st) = self.nodes.get_mut(name) else {
                continue;
            };
            let desired = desired_conditions(st, &p, &types);
            // The lost-events note is news: written now, not at the next refresh.
            let mut changed = st.lost_events.as_ref().map(|(k, _)| k) != st.lost_events_written.as_ref();
            for d in &desired {
                let prev = st.written.get(&d.type_);
                if prev.map(|(s, r)| (*s, r.as_str())) != Some((d.status, d.reason.as_str())) {
                    changed = true;
                    let prev_status = prev.map(|(s, _)| *s);
                    if d.type_ == overall_type && prev_status != Some(d.status) {
                        // Audit the transitions that matter: into False, out of False, and
                        // losing a known state. First sight and Unknown → True are routine.
                        let ev = match (prev_status, d.status) {
                            (_, CondStatus::False) => Some((EventKind::Warning, "GrayFailureDetected")),
                            (Some(CondStatus::False), CondStatus::True) => {
                                Some((EventKind::Normal, "GrayFailureCleared"))
                            }
                            (Some(CondStatus::True | CondStatus::False), CondStatus::Unknown) => {
                                Some((EventKind::Warning, "HealthUnknown"))
                            }
                            _ => None,
                        };
                        if let Some((kind, reason)) = ev {
                            plan.events.push(PlannedEvent {
                                target: EventTarget::Node(name.clone()),
                                kind,
                                reason: reason.into(),
                                action: "SetCondition".into(),
                                note: format!("{} {}: {}", d.type_, d.status.as_str(), d.message),
                            });
                        }
                    }
                }
            }
            // Unchanged: at most one write per refresh period (keeps the message figures fresh
            // and repairs a condition someone else changed).
            let refresh_due = st.last_write_ms.is_none_or(|t| now - t >= p.condition_refresh_ms);
            if changed || refresh_due {
                let conditions = desired
                    .into_iter()
                    .map(|d| {
                        let keep = view.conditions.get(&d.type_).filter(|c| c.status == d.status);
                        DesiredCondition {
                            last_transition_ms: keep.map_or(now, |c| c.last_transition_ms),
                            ..d
                        }
                    })
                    .collect::<Vec<_>>();
                for c in &conditions {
                    st.written.insert(c.type_.clone(), (c.status, c.reason.clone()));
                }
                st.last_write_ms = Some(now);
                st.lost_events_written = st.lost_events.as_ref().map(|(k, _)| k.clone());
                if !p.dry_run {
                    plan.conditions.push(ConditionWrite {
                        node: name.clone(),
                        conditions,
                    });
                }
            }
        }

        // Circuit breaker.
        let fresh_count = fresh.len();
        let degraded_count = fresh
            .keys()
            .filter(|n| self.nodes.get(**n).is_some_and(|s| overall_phase(s) == Phase::Degraded))
            .count();
        let fleet_tripped = settled
            && fresh_count >= p.verdict_min_nodes
            && degraded_count as f64 > p.breaker_fleet_fraction * fresh_count as f64;
        self.breaker_open = fleet_tripped || input.actuator_failures >= p.breaker_failures;
        plan.breaker_open = self.breaker_open;

        // Group verdicts (zone / instance type): many unhealthy together = one verdict.
        for label in p.verdict_labels.iter().filter(|_| settled) {
            let mut by_value: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
            for n in fresh.keys() {
                let Some(v) = input.nodes.get(*n).and_then(|v| v.labels.get(label)) else {
                    continue;
                };
                let e = by_value.entry(v.as_str()).or_default();
                e.0 += 1;
                if self.nodes.get(*n).is_some_and(counts_unhealthy) {
                    e.1 += 1;
                }
            }
            let (all_n, all_bad) = by_value.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            for (value, (n, bad)) in &by_value {
                let key = (label.clone(), (*value).to_string());
                let frac = *bad as f64 / (*n).max(1) as f64;
                let rest_n = all_n - n;
                let rest_bad = all_bad - bad;
                let rest_ok =
                    rest_n >= p.verdict_min_nodes && (rest_bad as f64) < p.verdict_fraction / 2.0 * rest_n as f64;
                if self.verdicts.contains(&key) {
                    if frac <= p.verdict_recover_fraction {
                        self.verdicts.remove(&key);
                    }
                } else if *n >= p.verdict_min_nodes && frac >= p.verdict_fraction && rest_ok {
                    self.verdicts.insert(key);
                }
            }
        }
        plan.verdicts = self.verdicts.iter().cloned().collect();

        // Rate limiter window.
        while self.actions.front().is_some_and(|t| now - *t >= p.rate_window_ms) {
            self.actions.pop_front();
        }

        // Taints (direct mode).
        if settled && p.taint_mode == TaintMode::Direct {
            let tainted = |eng: &Engine, n: &str| -> bool {
                let st = eng.nodes.get(n);
                let observed = input.nodes.get(n).is_some_and(|v| v.tainted);
                if p.dry_run {
                    return st.is_some_and(|s| s.shadow_tainted);
                }
                match st {
                    Some(s)
                        if s.taint_intent_ms.is_some_and(|t| now - t < INTENT_GRACE_MS)
                            && s.shadow_tainted != observed =>
                    {
                        s.shadow_tainted
                    }
                    _ => observed,
                }
            };
            let mut now_tainted: BTreeSet<String> = names.iter().filter(|n| tainted(self, n)).cloned().collect();
            for name in &names {
                let Some(view) = input.nodes.get(name) else {
                    continue;
                };
                let Some(st) = self.nodes.get(name) else {
                    continue;
                };
                let phase = overall_phase(st);
                let conf = st.families.values().map(|f| f.confidence).fold(0.0, f64::max);
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
                    if let Some(s) = self.nodes.get_mut(name) {
                        s.shadow_tainted = false;
                        s.taint_intent_ms = Some(now);
                        s.suppressed = None;
                    }
                    continue;
                }
                // New actions need fresh evidence (a restarted engine only has what it found).
                if is_tainted || phase != Phase::Degraded || !fresh.contains_key(name.as_str()) {
                    continue;
                }
                // Guardrails, in order.
                let mut held: Option<String> = None;
                if conf < p.min_action_confidence {
                    held = Some(format!(
                        "confidence {} below min_action_confidence {}",
                        fmt_num(conf),
                        p.min_action_confidence
                    ));
                } else if self.breaker_open {
                    held = Some("circuit breaker open".into());
                } else if let Some((l, v)) = p
                    .verdict_labels
                    .iter()
                    .filter_map(|l| view.labels.get(l).map(|v| (l.clone(), v.clone())))
                    .find(|k| self.verdicts.contains(k))
                {
                    held = Some(format!("group verdict on {l}={v} replaces node verdicts"));
                } else if let Some(why) = blast_radius_block(&p, input, &now_tainted, view) {
                    held = Some(why);
                } else if self.actions.len() >= p.rate_limit as usize {
                    held = Some(format!(
                        "rate limit {} actions per {} s",
                        p.rate_limit,
                        p.rate_window_ms / 1000
                    ));
                }
                let Some(st) = self.nodes.get_mut(name) else {
                    continue;
                };
                match held {
                    Some(why) => {
                        // "" = found degraded-but-untainted on start: a predecessor already
                        // announced why; do not repeat it.
                        if st.suppressed.as_deref() == Some("") {
                            st.suppressed = Some(why);
                        } else if st.suppressed.as_deref() != Some(why.as_str()) {
                            plan.events.push(PlannedEvent {
                                target: EventTarget::Node(name.clone()),
                                kind: EventKind::Warning,
                                reason: "ActionSuppressed".into(),
                                action: "AddTaint".into(),
                                note: format!("not tainting: {why}"),
                            });
                            st.suppressed = Some(why);
                        }
                    }
                    None => {
                        st.suppressed = None;
                        st.shadow_tainted = true;
                        st.taint_intent_ms = Some(now);
                        now_tainted.insert(name.clone());
                        self.actions.push_back(now);
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
        }

        // Karpenter NodePools: exclude groups with a verdict, restore on recovery.
        if settled && p.karpenter_exclude {
            for (pool_name, pool) in &input.pools {
                let current: Vec<(String, String)> = if p.dry_run {
                    self.shadow_pools.get(pool_name).cloned().unwrap_or_default()
                } else {
                    pool.snapshot.as_ref().map(|s| s.excluded.clone()).unwrap_or_default()
                };
                let mut desired: Vec<(String, String)> =
                    self.verdicts
                        .iter()
                        .filter(|(l, v)| {
                            input.nodes.values().any(|n| {
                                n.labels.get(&p.nodepool_label) == Some(pool_name) && n.labels.get(l) == Some(v)
                            })
                        })
                        .cloned()
                        .collect();
                // Keep exclusions whose verdict is still on even if the pool has no nodes left there.
                for c in &current {
                    if self.verdicts.contains(c) && !desired.contains(c) {
                        desired.push(c.clone());
                    }
                }
                desired.sort();
                if desired == current {
                    continue;
                }
                let adds_new = desired.iter().any(|d| !current.contains(d));
                if adds_new && (self.breaker_open || self.actions.len() >= p.rate_limit as usize) {
                    continue;
                }
                let base = pool
                    .snapshot
                    .as_ref()
                    .map_or_else(|| pool.requirements.clone(), |s| s.requirements.clone());
                let base = if p.dry_run && current.is_empty() {
                    pool.requirements.clone()
                } else {
                    base
                };
                let change = if desired.is_empty() {
                    PoolChange::Restore {
                        pool: pool_name.clone(),
                        requirements: base.clone(),
                    }
                } else {
                    PoolChange::Exclude {
                        pool: pool_name.clone(),
                        snapshot: PoolSnapshot {
                            requirements: base.clone(),
                            excluded: desired.clone(),
                        },
                        requirements: with_exclusions(&base, &desired),
                    }
                };
                if adds_new {
                    self.actions.push_back(now);
                }
                let (reason, note) = if desired.is_empty() {
                    (
                        "NodePoolRestored",
                        format!("restored requirements saved before excluding {current:?}"),
                    )
                } else {
                    (
                        "NodePoolExcluded",
                        format!("requirements NotIn {desired:?} (prior spec saved to ConfigMap)"),
                    )
                };
                plan.events.push(PlannedEvent {
                    target: EventTarget::NodePool(pool_name.clone()),
                    kind: if desired.is_empty() {
                        EventKind::Normal
                    } else {
                        EventKind::Warning
                    },
                    reason: reason.into(),
                    action: "PatchNodePool".into(),
                    note,
                });
                if p.dry_run {
                    self.shadow_pools.insert(pool_name.clone(), desired);
                } else {
                    plan.pools.push(change);
                }
            }
        }

        // Karpenter NodeClaims: replace nodes degraded for long (off by default).
        if settled && p.karpenter_replace {
            for name in &names {
                let Some(view) = input.nodes.get(name) else {
                    continue;
                };
                let Some(st) = self.nodes.get(name) else {
                    continue;
                };
                let Some(claim) = view.nodeclaim.clone() else {
                    continue;
                };
                let degraded_windows = st.degraded_windows;
                if st.claim_deleted || degraded_windows < p.replace_after_windows {
                    continue;
                }
                let conf = st.families.values().map(|f| f.confidence).fold(0.0, f64::max);
                if conf < p.min_action_confidence || self.breaker_open || self.actions.len() >= p.rate_limit as usize {
                    continue;
                }
                // Karpenter refuses repair above 20% unhealthy in a pool; we stay within our radius.
                let pool = view.labels.get(&p.nodepool_label);
                let in_pool: Vec<&String> = names
                    .iter()
                    .filter(|n| input.nodes.get(*n).and_then(|v| v.labels.get(&p.nodepool_label)) == pool)
                    .collect();
                let unhealthy = in_pool
                    .iter()
                    .filter(|n| {
                        self.nodes
                            .get(n.as_str())
                            .is_some_and(|s| overall_phase(s) == Phase::Degraded)
                    })
                    .count();
                if unhealthy as f64 > p.blast_radius * in_pool.len() as f64 {
                    continue;
                }
                self.actions.push_back(now);
                if let Some(s) = self.nodes.get_mut(name) {
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

        if p.dry_run {
            for e in &mut plan.events {
                e.reason = format!("DryRun{}", e.reason);
                e.note = format!("dry-run, would: {}", e.note);
            }
            plan.taints.clear();
        }
        plan
    }
}

impl Engine {
    fn next_settling(
        &self,
        input: &Input,
        fresh: &BTreeMap<&str, &NodeReport>,
        now: Millis,
        started: Millis,
    ) -> Settling {
        if self.settling == Settling::Settled || now - started >= self.policy.stale_after_ms {
            return Settling::Settled;
        }
        if !input.nodes.keys().all(|n| fresh.contains_key(n.as_str())) {
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
            _ => Settling::Confirming { complete_ms: now },
        }
    }
}

/// Worst phase over the families that have data (Unknown if none has).
#[must_use]
pub fn overall_phase(st: &NodeState) -> Phase {
    st.families
        .values()
        .map(|f| f.phase)
        .filter(|p| *p != Phase::Unknown)
        .max()
        .unwrap_or(Phase::Unknown)
}

/// Unhealthy for group verdicts: a family Suspect only on uncorroborated vantage evidence does
/// not count (other nodes' words must not exclude a zone either).
fn counts_unhealthy(st: &NodeState) -> bool {
    st.families
        .values()
        .any(|f| f.phase.is_unhealthy() && (f.phase != Phase::Suspect || f.uncorroborated.is_empty()))
}

fn reason_of(fs: &FamilyState) -> String {
    match fs.phase {
        Phase::Healthy => "Healthy".into(),
        Phase::Suspect => "Suspect".into(),
        Phase::Degraded => "GrayFailure".into(),
        Phase::Recovering => "Recovering".into(),
        Phase::Unknown => fs.unknown_reason.into(),
    }
}

/// Condition type names, built once per step.
struct ConditionTypes {
    families: BTreeMap<Family, String>,
    overall: String,
}

impl ConditionTypes {
    fn new(p: &Policy) -> Self {
        Self {
            families: Family::ALL.iter().map(|f| (*f, p.family_condition(*f))).collect(),
            overall: p.overall_condition(),
        }
    }
}

fn desired_conditions(st: &NodeState, p: &Policy, types: &ConditionTypes) -> Vec<DesiredCondition> {
    let mut out = Vec::new();
    for (f, fs) in &st.families {
        let message = match fs.phase {
            Phase::Unknown => match fs.unknown_reason {
                "AgentStale" => format!("no report for more than {} s", p.stale_after_ms / 1000),
                "NoData" => "the agent reports no data for this family".into(),
                _ => "no report from the graywatch agent yet".into(),
            },
            _ => fs.detail.clone(),
        };
        out.push(DesiredCondition {
            type_: types.families.get(f).cloned().unwrap_or_else(|| p.family_condition(*f)),
            status: fs.phase.status(),
            reason: reason_of(fs),
            message,
            last_transition_ms: 0,
        });
    }
    let overall = overall_phase(st);
    let worst = st
        .families
        .iter()
        .filter(|(_, fs)| fs.phase == overall)
        .map(|(f, _)| *f)
        .collect::<Vec<_>>();
    let (reason, message) = match overall {
        Phase::Unknown => {
            let r = st.families.values().next().map_or("NoReport", |f| f.unknown_reason);
            (r.to_string(), "no fresh data from the graywatch agent".to_string())
        }
        Phase::Healthy => ("Healthy".into(), "all reported families healthy".into()),
        _ => (
            reason_of(&FamilyState::new(overall)),
            worst
                .iter()
                .map(|f| format!("{}: {}", f.as_str(), st.families[f].detail))
                .collect::<Vec<_>>()
                .join(" | "),
        ),
    };
    // An agent that loses kernel events measures less than happens: said in the message, never
    // a verdict by itself.
    let message = match &st.lost_events {
        Some((kinds, _)) => {
            format!("{message}; the agent is losing kernel events ({kinds}): its figures may undercount")
        }
        None => message,
    };
    out.push(DesiredCondition {
        type_: types.overall.clone(),
        status: overall.status(),
        reason,
        message,
        last_transition_ms: 0,
    });
    if p.mirror_eks {
        let net = [Family::NetworkLatency, Family::PacketLoss]
            .iter()
            .filter_map(|f| st.families.get(f))
            .max_by_key(|f| f.phase);
        if let Some(fs) = net {
            out.push(DesiredCondition {
                type_: EKS_NETWORKING_CONDITION.into(),
                status: fs.phase.status(),
                reason: reason_of(fs),
                message: fs.detail.clone(),
                last_transition_ms: 0,
            });
        }
    }
    out
}

/// Allowed number of nodes acted on in a group of `n` (at least one).
#[must_use]
pub fn blast_allowance(fraction: f64, n: usize) -> usize {
    ((fraction * n as f64).floor() as usize).max(1)
}

fn blast_radius_block(p: &Policy, input: &Input, tainted: &BTreeSet<String>, view: &NodeView) -> Option<String> {
    for label in &p.blast_radius_labels {
        let Some(value) = view.labels.get(label) else {
            continue;
        };
        let members: Vec<&String> = input
            .nodes
            .iter()
            .filter(|(_, v)| v.labels.get(label) == Some(value))
            .map(|(n, _)| n)
            .collect();
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

/// `base` requirements plus one `NotIn` requirement per excluded label.
#[must_use]
pub fn with_exclusions(base: &serde_json::Value, excluded: &[(String, String)]) -> serde_json::Value {
    let mut reqs: Vec<serde_json::Value> = base.as_array().cloned().unwrap_or_default();
    let mut by_label: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (l, v) in excluded {
        by_label.entry(l.as_str()).or_default().push(v.as_str());
    }
    for (l, vs) in by_label {
        reqs.push(serde_json::json!({"key": l, "operator": "NotIn", "values": vs}));
    }
    serde_json::Value::Array(reqs)
}
