//! Per node and family state machines, and the phase of a step that feeds them: each new window
//! is scored (own detector, peer group, vantage) and advances its node's machines once.

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
};

use graywatch_proto::LossSpan;

use super::{
    evidence::{self, AddressBook, VantageEvidence},
    model::{CondStatus, Family, Millis, NodeReport, NodeView, PREDICTED_FAILURE_REASON, Prediction, WindowId},
    plan::{EventKind, EventTarget, Plan, PlannedEvent},
    policy::Policy,
    step::{EKS_NETWORKING_CONDITION, StepCtx},
};

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

    /// Not healthy (counts towards keeping a group verdict).
    #[must_use]
    pub fn is_unhealthy(self) -> bool {
        matches!(self, Phase::Suspect | Phase::Degraded | Phase::Recovering)
    }
}

/// Why a family is Unknown; also the condition reason then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownReason {
    /// No report from the agent yet.
    NoReport,
    /// The agent's last report is older than `stale_after_ms`.
    AgentStale,
    /// The agent said it was stopping (a rollout, a node shutdown) and no agent has reported
    /// since, for longer than `restart_grace_ms`.
    AgentStopped,
    /// The agent reports nothing for this family.
    NoData,
}

impl UnknownReason {
    /// The condition reason (CamelCase).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            UnknownReason::NoReport => "NoReport",
            UnknownReason::AgentStale => "AgentStale",
            UnknownReason::AgentStopped => "AgentStopped",
            UnknownReason::NoData => "NoData",
        }
    }

    /// From a condition reason found on a Node (anything else: no report).
    #[must_use]
    pub fn from_reason(reason: &str) -> Self {
        match reason {
            "AgentStale" => UnknownReason::AgentStale,
            "AgentStopped" => UnknownReason::AgentStopped,
            "NoData" => UnknownReason::NoData,
            _ => UnknownReason::NoReport,
        }
    }

    /// The condition message.
    #[must_use]
    pub fn message(self, p: &Policy) -> String {
        match self {
            UnknownReason::AgentStale => format!("no report for more than {} s", p.stale_after_ms / 1000),
            UnknownReason::AgentStopped => format!(
                "the agent stopped (a rollout or a node shutdown) and no agent has reported within {} s",
                p.restart_grace_ms.max(p.stale_after_ms) / 1000
            ),
            UnknownReason::NoData => "the agent reports no data for this family".into(),
            UnknownReason::NoReport => "no report from the graywatch agent yet".into(),
        }
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
    /// Why the phase is Unknown, if it is.
    pub unknown_reason: UnknownReason,
    /// Observers whose vantage evidence alone would make this family bad, without corroboration
    /// by the node's own measurements or a majority of its traffic partners (empty = none). Such
    /// evidence raises Suspect at most: no False condition, no action, no group verdict.
    pub uncorroborated: Vec<String>,
    /// The peers whose link to this node both ends blame (empty = none): neither end of a
    /// broken link is acted on, since which end is at fault cannot be told. Such a family is
    /// Suspect at most.
    pub link: Vec<String>,
    /// The peers that blamed their link to this node back in the last window with such
    /// evidence (to tell the same link from a different one each window).
    pub link_candidates: Vec<String>,
    /// Of the current run of bad windows, how many in a row (the latest) the node's own
    /// detector or a majority of its traffic partners backed (see `advance`).
    pub backed_streak: u32,
    /// Windows in which both ends of a link blamed it, counted up (to twice `degrade_windows`)
    /// and worn down by one per window without that evidence.
    pub link_streak: u32,
    /// The agent's latest forecast failure for this family, if any (see `prediction`).
    pub prediction: Option<Prediction>,
    /// Windows in a row without a forecast since `prediction` was last confirmed.
    pub prediction_misses: u32,
}

impl FamilyState {
    #[must_use]
    pub fn new(phase: Phase) -> Self {
        Self {
            phase,
            bad_streak: 0,
            backed_streak: 0,
            good_streak: 0,
            confidence: 0.0,
            detail: String::new(),
            unknown_reason: UnknownReason::NoReport,
            uncorroborated: Vec::new(),
            link: Vec::new(),
            link_candidates: Vec::new(),
            link_streak: 0,
            prediction: None,
            prediction_misses: 0,
        }
    }

    fn unknown(reason: UnknownReason) -> Self {
        Self {
            unknown_reason: reason,
            ..Self::new(Phase::Unknown)
        }
    }
}

/// One step of the state machine for a new window with confidence `conf`.
pub fn advance(st: &mut FamilyState, conf: f64, backed: bool, p: &Policy) {
    let bad = conf >= p.degrade_confidence;
    let good = conf < p.recover_confidence;
    st.confidence = conf;
    if bad {
        st.bad_streak = st.bad_streak.saturating_add(1);
        st.backed_streak = if backed { st.backed_streak.saturating_add(1) } else { 0 };
        st.good_streak = 0;
    } else if good {
        st.good_streak = st.good_streak.saturating_add(1);
        st.bad_streak = 0;
        st.backed_streak = 0;
    } else {
        // In the hysteresis band: neither streak grows, a bad run is broken.
        st.bad_streak = 0;
        st.backed_streak = 0;
    }
    st.phase = match st.phase {
        Phase::Unknown | Phase::Healthy | Phase::Suspect if bad => {
            // Backed by the node's own detector or by its partners: `degrade_windows` in a
            // row; by its place in its peer group alone: `peer_only_degrade_windows`.
            if st.backed_streak >= p.degrade_windows || st.bad_streak >= p.peer_only_degrade_windows {
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

/// Why an action on a node is held back, remembered to emit one Event per change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Suppressed {
    /// Found degraded but untainted on start: a predecessor already announced why.
    Inherited,
    /// The guardrail that held it back, in words.
    Held(String),
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
    /// The guardrail that last held back an action on this node.
    pub suppressed: Option<Suppressed>,
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

impl NodeState {
    /// A node first seen, from the conditions and taint already on it: a restarted or newly
    /// elected aggregator neither flaps conditions nor repeats actions.
    #[must_use]
    pub fn from_view(view: &NodeView, p: &Policy, now: Millis) -> Self {
        let mut families = BTreeMap::new();
        let mut written = BTreeMap::new();
        for f in Family::ALL {
            let ty = p.family_condition(f);
            let mut fs = match view.conditions.get(&ty) {
                Some(c) => {
                    written.insert(ty, (c.status, c.reason.clone()));
                    let phase = match c.status {
                        CondStatus::True => Phase::Healthy,
                        // A forecast, not a failure: the next window says whether it holds.
                        CondStatus::False if c.reason == PREDICTED_FAILURE_REASON => Phase::Healthy,
                        // Keep a node we found degraded degraded until it recovers through hysteresis.
                        CondStatus::False => Phase::Degraded,
                        CondStatus::Unknown => Phase::Unknown,
                    };
                    FamilyState {
                        unknown_reason: UnknownReason::from_reason(&c.reason),
                        ..FamilyState::new(phase)
                    }
                }
                None => FamilyState::new(Phase::Unknown),
            };
            if fs.phase == Phase::Degraded {
                fs.bad_streak = p.degrade_windows;
            }
            families.insert(f, fs);
        }
        for ty in [p.overall_condition(), EKS_NETWORKING_CONDITION.to_string()] {
            // Another manager's condition was never ours, whatever it says.
            if view.foreign_conditions.contains(&ty) {
                continue;
            }
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
            suppressed: (degraded && !view.tainted).then_some(Suppressed::Inherited),
            shadow_tainted: view.tainted,
            taint_intent_ms: None,
            claim_deleted: false,
            lost_events: None,
            lost_events_written: None,
        }
    }

    /// Worst phase over the families that have data (Unknown if none has).
    #[must_use]
    pub fn overall(&self) -> Phase {
        overall_phase(self)
    }

    /// The highest confidence of any family (what the node-level guardrails judge).
    #[must_use]
    pub fn confidence(&self) -> f64 {
        self.families.values().map(|f| f.confidence).fold(0.0, f64::max)
    }

    /// Degraded (not merely Suspect or Recovering) with a Degraded family at or above `min`:
    /// what a new group verdict needs.
    #[must_use]
    pub fn degraded_with_confidence(&self, min: f64) -> bool {
        self.families
            .values()
            .any(|f| f.phase == Phase::Degraded && f.confidence >= min)
    }

    /// Unhealthy for keeping a group verdict: a family Suspect only on uncorroborated vantage
    /// evidence (other nodes' words must not hold a zone excluded either) or on a broken link
    /// does not count.
    #[must_use]
    pub fn counts_unhealthy(&self) -> bool {
        self.families.values().any(|f| {
            f.phase.is_unhealthy() && (f.phase != Phase::Suspect || (f.uncorroborated.is_empty() && f.link.is_empty()))
        })
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

/// A figure in a condition message: whole numbers from 100 up, two decimals below. Displayed
/// in place, so a message is written without a String per figure (the step writes one message
/// per node and family every second).
#[derive(Debug, Clone, Copy)]
pub(super) struct Num(pub f64);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.abs() >= 100.0 {
            write!(f, "{:.0}", self.0)
        } else {
            write!(f, "{:.2}", self.0)
        }
    }
}

/// Appends one part of a family's detail, `; `-separated.
fn push_part(parts: &mut String, args: fmt::Arguments<'_>) {
    if !parts.is_empty() {
        parts.push_str("; ");
    }
    let _ = parts.write_fmt(args);
}

/// [`push_part`] with `format!`'s arguments.
macro_rules! part {
    ($parts:expr, $($arg:tt)*) => {
        push_part($parts, format_args!($($arg)*))
    };
}

/// Peer groups and vantage evidence of one step, computed once over the fresh reports.
struct Evidence<'a> {
    /// Each fresh node's peer group: the index of its values of `peer_group_labels` among the
    /// step's distinct ones (a number per node instead of a copy of its labels per lookup).
    group_of: BTreeMap<&'a str, usize>,
    groups: BTreeMap<(Family, usize), evidence::GroupStats>,
    /// Per peer group, its nodes' sustained loss figures (spans that can be judged only).
    sustained_loss: BTreeMap<usize, evidence::GroupStats>,
    vantage: BTreeMap<Family, BTreeMap<String, VantageEvidence>>,
}

impl<'a> Evidence<'a> {
    fn of(ctx: &StepCtx<'a>) -> Self {
        let p = ctx.policy;
        let mut ids: BTreeMap<Vec<&'a str>, usize> = BTreeMap::new();
        let mut key: Vec<&'a str> = Vec::with_capacity(p.peer_group_labels.len());
        let mut group_of = BTreeMap::new();
        let mut groups: BTreeMap<(Family, usize), Vec<f64>> = BTreeMap::new();
        let mut sustained: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        for (n, r) in &ctx.fresh {
            let Some(view) = ctx.input.nodes.get(*n) else {
                continue;
            };
            key.clear();
            key.extend(
                p.peer_group_labels
                    .iter()
                    .map(|l| view.labels.get(l).map_or("", String::as_str)),
            );
            let group = if let Some(g) = ids.get(key.as_slice()) {
                *g
            } else {
                let next = ids.len();
                ids.insert(key.clone(), next);
                next
            };
            group_of.insert(*n, group);
            for (f, v) in &r.figures {
                if v.is_finite() {
                    groups.entry((*f, group)).or_default().push(*v);
                }
            }
            if let Some(span) = r.sustained_loss.filter(LossSpan::is_judgeable) {
                sustained.entry(group).or_default().push(span.pct());
            }
        }
        // Median and scale once per group (O(fleet log fleet) per step, not per node).
        let groups = groups
            .into_iter()
            .filter_map(|(k, vals)| evidence::GroupStats::of(k.0, &vals).map(|g| (k, g)))
            .collect();
        let sustained_loss = sustained
            .into_iter()
            .filter_map(|(k, vals)| evidence::GroupStats::of_sustained_loss(&vals).map(|g| (k, g)))
            .collect();
        let book = ctx
            .input
            .address_book
            .clone()
            .unwrap_or_else(|| std::sync::Arc::new(AddressBook::new(ctx.input.nodes.values())));
        let vantage = Family::ALL
            .into_iter()
            .filter(|f| f.has_vantage())
            .map(|f| {
                (
                    f,
                    evidence::vantage(f, &book, ctx.fresh.iter().map(|(n, r)| (*n, *r)), p.vantage_ratio),
                )
            })
            .collect();
        Self {
            group_of,
            groups,
            sustained_loss,
            vantage,
        }
    }
}

/// The state machines' phase of a step: every node with a new window advances once; a node
/// without a fresh report goes Unknown (after the start grace).
pub(super) fn observe(nodes: &mut BTreeMap<String, NodeState>, ctx: &StepCtx, plan: &mut Plan) {
    let ev = Evidence::of(ctx);
    // One scratch buffer for every family's detail parts, so a step in steady state writes its
    // messages into strings it already has.
    let mut parts = String::new();
    for name in ctx.input.nodes.keys() {
        let Some(st) = nodes.get_mut(name) else {
            continue;
        };
        let Some(report) = ctx.fresh.get(name.as_str()) else {
            // Its agent stopped on purpose: what was last known holds until the next one reports.
            if !ctx.restarting.contains(name.as_str()) {
                go_unknown(st, name, ctx);
            }
            continue;
        };
        let window = report.window_id();
        if st.last_window.as_ref() == Some(&window) {
            continue;
        }
        st.last_window = Some(window);
        st.last_window_received_ms = Some(report.received_ms);
        note_lost_events(st, report);
        for f in Family::ALL {
            if let Some(fs) = st.families.get_mut(&f)
                && let Some(event) = score_family(fs, f, name, report, &ev, ctx.policy, &mut parts)
            {
                plan.events.push(event);
            }
        }
        note_predictions(st, report, ctx.policy);
        if st.overall() == Phase::Degraded {
            st.degraded_windows = st.degraded_windows.saturating_add(1);
        } else {
            st.degraded_windows = 0;
        }
    }
}

/// Node pairs whose link is blamed by both ends (in any family), each pair once, sorted.
pub(super) fn degraded_links(nodes: &BTreeMap<String, NodeState>) -> Vec<(String, String)> {
    let blames = |node: &str, peer: &str| {
        nodes
            .get(node)
            .is_some_and(|st| st.families.values().any(|fs| fs.link.iter().any(|n| n == peer)))
    };
    let mut links: Vec<(String, String)> = nodes
        .iter()
        .flat_map(|(name, st)| {
            st.families
                .values()
                .flat_map(|fs| fs.link.iter())
                .map(move |peer| (name, peer))
        })
        .filter(|(name, peer)| name.as_str() < peer.as_str() && blames(peer, name))
        .map(|(name, peer)| (name.clone(), peer.clone()))
        .collect();
    links.sort();
    links.dedup();
    links
}

fn go_unknown(st: &mut NodeState, name: &str, ctx: &StepCtx) {
    let reported = ctx.input.reports.contains_key(name);
    // Just started and no report yet: keep what we found on the Node.
    if !reported && ctx.now - ctx.started < ctx.policy.stale_after_ms {
        return;
    }
    let stopped = ctx.input.reports.get(name).is_some_and(|r| r.stopped_ms.is_some());
    let reason = if stopped {
        UnknownReason::AgentStopped
    } else if reported {
        UnknownReason::AgentStale
    } else {
        UnknownReason::NoReport
    };
    for fs in st.families.values_mut() {
        *fs = FamilyState::unknown(reason);
    }
    st.degraded_windows = 0;
}

fn note_lost_events(st: &mut NodeState, report: &NodeReport) {
    if report.lost_events.is_empty() {
        st.lost_events = st
            .lost_events
            .take()
            .and_then(|(kinds, left)| (left > 1).then(|| (kinds, left - 1)));
    } else {
        let kinds = report.lost_events.keys().cloned().collect::<Vec<_>>().join(", ");
        st.lost_events = Some((kinds, LOST_EVENTS_NOTE_WINDOWS));
    }
}

/// The peer-group part of a family's evidence: how far the node's `figure` sits from its
/// group's (0 when the group is too small to judge).
/// For `PacketLoss`, the larger of the window's figure and the sustained loss (`sustained`).
fn peer_evidence(
    f: Family,
    figure: Option<f64>,
    sustained: Option<LossSpan>,
    group: Option<usize>,
    ev: &Evidence,
    p: &Policy,
    detail: &mut String,
) -> f64 {
    let window = figure.map_or(0.0, |x| window_peer_evidence(f, x, group, ev, p, detail));
    if f == Family::PacketLoss {
        window.max(sustained_loss_evidence(sustained, group, ev, p, detail))
    } else {
        window
    }
}

/// [`peer_evidence`] of one window's figure.
fn window_peer_evidence(
    f: Family,
    figure: f64,
    group: Option<usize>,
    ev: &Evidence,
    p: &Policy,
    detail: &mut String,
) -> f64 {
    let Some(group) = group
        .and_then(|g| ev.groups.get(&(f, g)))
        .filter(|group| group.n >= p.peer_min_group)
    else {
        return 0.0;
    };
    let z = group.z(figure);
    let (median, n) = (group.median, group.n);
    part!(
        detail,
        "{} vs peer median {} (z {}, {n} peers)",
        Num(figure),
        Num(median),
        Num(z)
    );
    evidence::ramp(z, p.peer_z_low, p.peer_z_high)
}

/// The peer-group part of the node's sustained loss (its last windows' lost over sent, see
/// `graywatch_detect::loss`) against its group's: how a light steady loss stands out that
/// each window's figure hides in noise.
fn sustained_loss_evidence(
    span: Option<LossSpan>,
    group: Option<usize>,
    ev: &Evidence,
    p: &Policy,
    detail: &mut String,
) -> f64 {
    // A span too short or too quiet to judge has z 0 (`sustained_loss_z`).
    let Some((span, group)) = span.zip(
        group
            .and_then(|g| ev.sustained_loss.get(&g))
            .filter(|group| group.n >= p.peer_min_group),
    ) else {
        return 0.0;
    };
    let z = group.sustained_loss_z(&span);
    let score = evidence::ramp(z, p.peer_z_low, p.peer_z_high);
    if score > 0.0 {
        part!(
            detail,
            "sustained loss {} % over {} windows vs peer median {} % (z {}, {} peers)",
            Num(span.pct()),
            span.windows,
            Num(group.median),
            Num(z),
            group.n
        );
    }
    score
}

/// Judges this window's link evidence: the peers that blame their link to this node back
/// (`mutual`). Returns the links the family blames after this window, and whether this window's
/// figures are explained by a link: the same peer blamed back two windows in a row, or a link
/// already blamed. A node that is weakly bad towards everyone has a different peer stand out in
/// each window; a broken link is the same peer every time. A broken link is measured only when
/// traffic crosses it (a blackholed connection retransmits ever more rarely): windows without
/// the evidence wear the streak down one at a time instead of resetting it.
fn judge_link(fs: &mut FamilyState, mutual: Vec<String>, p: &Policy) -> (Vec<String>, bool) {
    if mutual.is_empty() {
        fs.link_streak = fs.link_streak.saturating_sub(1);
        if fs.link_streak == 0 {
            fs.link_candidates.clear();
            return (Vec::new(), false);
        }
        return (fs.link.clone(), false);
    }
    let again = mutual.iter().any(|peer| fs.link_candidates.contains(peer));
    fs.link_streak = if again {
        fs.link_streak
            .saturating_add(1)
            .min(p.degrade_windows.saturating_mul(2))
    } else {
        1
    };
    let explained = again || !fs.link.is_empty();
    fs.link_candidates.clone_from(&mutual);
    let blamed = if fs.link_streak >= p.degrade_windows {
        mutual
    } else {
        fs.link.clone()
    };
    (blamed, explained)
}

/// The peers in `link` whose own evidence blames their link to `name` in turn.
fn blamed_back(ev: &Evidence, f: Family, name: &str, link: &[String]) -> Vec<String> {
    let of_family = ev.vantage.get(&f);
    link.iter()
        .filter(|peer| {
            of_family
                .and_then(|m| m.get(peer.as_str()))
                .is_some_and(|v| v.link_partners.iter().any(|n| n == name))
        })
        .cloned()
        .collect()
}

/// The `LinkDegraded` Event when the links both ends blame for a family change (once per
/// change, not per window).
fn link_event(before: &[String], blamed: &[String], f: Family, name: &str) -> Option<PlannedEvent> {
    (!blamed.is_empty() && before != blamed).then(|| PlannedEvent {
        target: EventTarget::Node(name.to_string()),
        kind: EventKind::Warning,
        reason: "LinkDegraded".into(),
        action: "None".into(),
        note: format!(
            "{}: only its link to {} looks degraded, seen from both ends, while the other nodes see both healthy: no action on either end (which end is at fault cannot be told)",
            f.as_str(),
            blamed.join(", ")
        ),
    })
}

/// `confidence …: <parts>` into `out`, reusing its buffer.
fn write_detail(out: &mut String, conf: f64, parts: &mut String) {
    if parts.is_empty() {
        parts.push_str("nothing stands out (own detector, peer group and observers)");
    }
    out.clear();
    let _ = write!(out, "confidence {}: {parts}", Num(conf));
}

/// Scores one family of one new window and advances its machine; the Event announcing
/// uncorroborated vantage evidence or a degraded link, if this window brings it.
fn score_family(
    fs: &mut FamilyState,
    f: Family,
    name: &str,
    report: &NodeReport,
    ev: &Evidence,
    p: &Policy,
    detail: &mut String,
) -> Option<PlannedEvent> {
    let figure = report.figures.get(&f).copied().filter(|v| v.is_finite());
    let local = report.local.get(&f);
    if figure.is_none() && local.is_none() {
        *fs = FamilyState::unknown(UnknownReason::NoData);
        return None;
    }
    detail.clear();
    let local_score = local.map_or(0.0, |(s, r)| {
        if *s > 0.0 {
            part!(detail, "local {} ({r})", Num(*s));
        }
        *s
    });
    let group = ev.group_of.get(name).copied();
    let peer_score = peer_evidence(f, figure, report.sustained_loss, group, ev, p, detail);
    // Vantage evidence counts only when corroborated: by the node's own measurements (its
    // detector, its position in its peer group, or its own view of everyone) or by a strict
    // majority of the nodes it reports traffic with. Other nodes' words alone raise Suspect at
    // most.
    let mut vantage_score = 0.0;
    let mut raw_vantage = 0.0;
    let mut observers_alone: Option<&VantageEvidence> = None;
    // The node's own detector, or a majority of the nodes it talks with, back a bad window;
    // its peer-group position alone must last longer (`peer_only_degrade_windows`).
    let local_backs = local_score >= p.recover_confidence;
    let mut backed = local_backs;
    if let Some(v) = ev.vantage.get(&f).and_then(|m| m.get(name)) {
        raw_vantage = v.score(p.vantage_min_observers);
        if v.observers > 0 {
            part!(detail, "{}/{} peers see it degraded", v.flagged, v.observers);
        }
        let partners_agree = v.majority_of_partners(p.vantage_min_observers);
        backed |= partners_agree;
        let own = local_backs || peer_score > 0.0 || v.own_link_slow;
        if own || partners_agree {
            vantage_score = raw_vantage;
        } else if raw_vantage > 0.0 {
            observers_alone = Some(v);
            let (flagged, partners) = (v.flagged_partners, v.partners);
            part!(
                detail,
                "not corroborated (own figures healthy, {flagged} of its {partners} traffic partners agree)"
            );
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
    // One broken link is no broken node: when all this node sees, and all that is seen of it,
    // is its link to one or a few peers, neither end is acted on.
    let link: &[String] = ev
        .vantage
        .get(&f)
        .and_then(|m| m.get(name))
        .map_or(&[], |v| v.link_partners.as_slice());
    // What a link explains is no evidence against the node, whatever its confidence. The link
    // itself is reported (Suspect, an Event) when both of its ends blame it, once that has held
    // for `degrade_windows` windows in a row; a healthy node's link to a slow node is the slow
    // node's story, told on that node.
    let link_shaped = !link.is_empty();
    let (blamed, explained) = judge_link(fs, blamed_back(ev, f, name, link), p);
    let explained = link_shaped && explained;
    advance(fs, if explained { 0.0 } else { conf }, backed, p);
    fs.confidence = conf;
    if explained {
        let links = link.join(", ");
        part!(
            detail,
            "explained by its link to {links}: only that link looks degraded, no action"
        );
    }
    if !blamed.is_empty() && fs.phase == Phase::Healthy {
        fs.phase = Phase::Suspect;
    }
    write_detail(&mut fs.detail, conf, detail);
    let alone: Vec<String> = match observers_alone {
        Some(v) if !explained && raw_conf >= p.degrade_confidence && conf < p.degrade_confidence => {
            v.flagged_by.clone()
        }
        _ => Vec::new(),
    };
    let mut event = link_event(&fs.link, &blamed, f, name);
    fs.link = blamed;
    if !alone.is_empty() {
        if fs.phase == Phase::Healthy {
            fs.phase = Phase::Suspect;
        }
        if fs.uncorroborated.is_empty() {
            event = Some(PlannedEvent {
                target: EventTarget::Node(name.to_string()),
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
    event
}

/// Takes in the window's predictions: a family holds its agent's latest one that is confident
/// enough and within the horizon, and keeps holding it until `predict_clear_windows` windows in
/// a row bring none (a forecast at the edge of the confidence floor or of the horizon would
/// otherwise flap the condition, an Event and a Node write each time).
fn note_predictions(st: &mut NodeState, report: &NodeReport, p: &Policy) {
    let horizon_secs = p.predict_horizon_ms as f64 / 1000.0;
    for (f, fs) in &mut st.families {
        let fresh = report
            .predictions
            .get(f)
            .filter(|pr| pr.confidence >= p.predict_confidence && pr.eta_secs <= horizon_secs);
        if let Some(pr) = fresh {
            fs.prediction = Some(pr.clone());
            fs.prediction_misses = 0;
        } else if fs.prediction.is_some() {
            fs.prediction_misses = fs.prediction_misses.saturating_add(1);
            if fs.prediction_misses >= p.predict_clear_windows {
                fs.prediction = None;
                fs.prediction_misses = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::ObservedCondition;

    #[test]
    fn unknown_reasons_round_trip_through_condition_reasons() {
        for r in [
            UnknownReason::NoReport,
            UnknownReason::AgentStale,
            UnknownReason::AgentStopped,
            UnknownReason::NoData,
        ] {
            assert_eq!(UnknownReason::from_reason(r.as_str()), r);
        }
        assert_eq!(UnknownReason::from_reason("GrayFailure"), UnknownReason::NoReport);
    }

    /// A node found degraded and untainted: Degraded with a full bad streak, and the reason it
    /// is untainted was announced by a predecessor; another manager's condition is not ours.
    #[test]
    fn a_node_is_taken_over_from_what_is_on_it() {
        let p = Policy::default();
        let found = |status| ObservedCondition {
            status,
            reason: "x".into(),
            message: String::new(),
            last_transition_ms: 0,
        };
        let mut view = NodeView::default();
        view.conditions
            .insert(p.family_condition(Family::PacketLoss), found(CondStatus::False));
        view.conditions
            .insert(p.family_condition(Family::CpuSteal), found(CondStatus::True));
        view.conditions
            .insert(EKS_NETWORKING_CONDITION.into(), found(CondStatus::False));
        view.foreign_conditions.insert(EKS_NETWORKING_CONDITION.into());
        let st = NodeState::from_view(&view, &p, 7);
        assert_eq!(st.families[&Family::PacketLoss].phase, Phase::Degraded);
        assert_eq!(st.families[&Family::PacketLoss].bad_streak, p.degrade_windows);
        assert_eq!(st.families[&Family::CpuSteal].phase, Phase::Healthy);
        assert_eq!(st.families[&Family::MemoryPressure].phase, Phase::Unknown);
        assert_eq!(st.suppressed, Some(Suppressed::Inherited));
        assert_eq!(st.last_write_ms, Some(7));
        assert!(!st.written.contains_key(EKS_NETWORKING_CONDITION));
        view.tainted = true;
        assert_eq!(NodeState::from_view(&view, &p, 7).suppressed, None);
    }
}
