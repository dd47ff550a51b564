//! The conditions phase of a step: the Node conditions each node's state calls for, written when
//! they change (with an Event for the transitions that matter), when someone else changed them,
//! or when a refresh is due (`condition_refresh_ms`, 5 min: the only write of an idle node).

use std::collections::BTreeMap;

use super::{
    model::{CondStatus, Family, Millis, NodeView},
    plan::{ConditionWrite, DesiredCondition, EventKind, EventTarget, Plan, PlannedEvent},
    policy::Policy,
    prediction,
    state_machine::{FamilyState, NodeState, Phase},
    step::{EKS_NETWORKING_CONDITION, INTENT_GRACE_MS, StepCtx},
};

/// Condition type names, built once per step.
pub(super) struct ConditionTypes {
    families: BTreeMap<Family, String>,
    overall: String,
}

impl ConditionTypes {
    pub(super) fn new(p: &Policy) -> Self {
        Self {
            families: Family::ALL.iter().map(|f| (*f, p.family_condition(*f))).collect(),
            overall: p.overall_condition(),
        }
    }
}

fn reason_of_phase(phase: Phase, fs: &FamilyState) -> &'static str {
    match phase {
        Phase::Healthy => "Healthy",
        Phase::Suspect => "Suspect",
        Phase::Degraded => "GrayFailure",
        Phase::Recovering => "Recovering",
        Phase::Unknown => fs.unknown_reason.as_str(),
    }
}

/// Which of a node's conditions a [`Head`] is, to write its message.
#[derive(Debug, Clone, Copy)]
enum Subject {
    Family(Family),
    Overall,
    /// The EKS `NetworkingReady`, with the network family whose detail it carries.
    Eks(Family),
}

/// A condition a node's state calls for, without its message: what the step compares with
/// what it wrote, for every node every second. The message (the numbers behind the verdict)
/// is written only for a write.
#[derive(Debug, Clone, Copy)]
struct Head<'t> {
    type_: &'t str,
    status: CondStatus,
    reason: &'static str,
    subject: Subject,
}

/// The conditions `st` calls for on `view`'s Node, into `out`. The EKS `NetworkingReady` (with
/// `mirror_eks`) is never one another field manager writes (the EKS node monitoring agent's own
/// verdict is not ours to overwrite), and is ours only while the network families are not
/// healthy: we add our evidence to node repair, we do not vouch for the node.
fn desired_heads<'t>(st: &NodeState, view: &NodeView, p: &Policy, types: &'t ConditionTypes, out: &mut Vec<Head<'t>>) {
    out.clear();
    for (f, fs) in &st.families {
        let Some(condition) = types.families.get(f) else {
            continue;
        };
        let (status, reason) = if prediction::in_force(fs, p).is_some() {
            (CondStatus::False, prediction::REASON)
        } else {
            (fs.phase.status(), reason_of_phase(fs.phase, fs))
        };
        out.push(Head {
            type_: condition,
            status,
            reason,
            subject: Subject::Family(*f),
        });
    }
    let overall = st.overall();
    let reason = match overall {
        Phase::Unknown => st
            .families
            .values()
            .next()
            .map_or("NoReport", |f| f.unknown_reason.as_str()),
        Phase::Healthy => "Healthy",
        _ => reason_of_phase(overall, &FamilyState::new(overall)),
    };
    out.push(Head {
        type_: &types.overall,
        status: overall.status(),
        reason,
        subject: Subject::Overall,
    });
    if p.mirror_eks && !view.foreign_conditions.contains(EKS_NETWORKING_CONDITION) {
        let net = [Family::NetworkLatency, Family::PacketLoss]
            .into_iter()
            .filter_map(|f| st.families.get(&f).map(|fs| (f, fs)))
            .max_by_key(|(_, fs)| fs.phase);
        if let Some((f, fs)) = net.filter(|(_, fs)| fs.phase.status() == CondStatus::False) {
            out.push(Head {
                type_: EKS_NETWORKING_CONDITION,
                status: CondStatus::False,
                reason: reason_of_phase(fs.phase, fs),
                subject: Subject::Eks(f),
            });
        }
    }
}

/// The message of `head`, a condition `st` calls for.
fn message(head: &Head, st: &NodeState, p: &Policy) -> String {
    let family_detail = |f: &Family| st.families.get(f).map(|fs| fs.detail.clone()).unwrap_or_default();
    let message = match head.subject {
        Subject::Family(f) => match st.families.get(&f) {
            Some(fs) => match prediction::in_force(fs, p) {
                Some(predicted) => prediction::message(predicted),
                None if fs.phase == Phase::Unknown => fs.unknown_reason.message(p),
                None => fs.detail.clone(),
            },
            None => String::new(),
        },
        Subject::Eks(f) => family_detail(&f),
        Subject::Overall => match st.overall() {
            Phase::Unknown => "no fresh data from the graywatch agent".to_string(),
            Phase::Healthy => prediction::overall_note(st, p).map_or_else(
                || "all reported families healthy".into(),
                |note| format!("all reported families healthy; {note}"),
            ),
            overall => st
                .families
                .iter()
                .filter(|(_, fs)| fs.phase == overall)
                .map(|(f, fs)| format!("{}: {}", f.as_str(), fs.detail))
                .collect::<Vec<_>>()
                .join(" | "),
        },
    };
    // An agent that loses kernel events measures less than happens: said in the overall
    // condition's message, never a verdict by itself.
    match (&head.subject, &st.lost_events) {
        (Subject::Overall, Some((kinds, _))) => {
            format!("{message}; the agent is losing kernel events ({kinds}): its figures may undercount")
        }
        _ => message,
    }
}

/// The conditions `st` calls for on `view`'s Node, messages included.
#[cfg(test)]
pub(super) fn desired_conditions(
    st: &NodeState,
    view: &NodeView,
    p: &Policy,
    types: &ConditionTypes,
) -> Vec<DesiredCondition> {
    let mut heads = Vec::new();
    desired_heads(st, view, p, types, &mut heads);
    heads.iter().map(|h| with_message(h, st, p)).collect()
}

fn with_message(head: &Head, st: &NodeState, p: &Policy) -> DesiredCondition {
    DesiredCondition {
        type_: head.type_.to_owned(),
        status: head.status,
        reason: head.reason.to_owned(),
        message: message(head, st, p),
        last_transition_ms: 0,
    }
}

/// The Event a change of the overall condition deserves: into False, out of False, and losing a
/// known state. First sight and Unknown → True are routine.
fn transition_event(prev: Option<CondStatus>, now: CondStatus) -> Option<(EventKind, &'static str)> {
    match (prev, now) {
        (_, CondStatus::False) => Some((EventKind::Warning, "GrayFailureDetected")),
        (Some(CondStatus::False), CondStatus::True) => Some((EventKind::Normal, "GrayFailureCleared")),
        (Some(CondStatus::True | CondStatus::False), CondStatus::Unknown) => {
            Some((EventKind::Warning, "HealthUnknown"))
        }
        _ => None,
    }
}

/// When an unchanged node's conditions are due again after a write at `last_write`: the first
/// point of the node's own phase in the refresh period at least 0.9 × `refresh` after it (so
/// 0.9–1.9 periods after a write that a change caused; exactly `refresh` apart while nothing
/// changes: a refresh is written at the first step after its phase point, up to a tick later,
/// and the next phase point is one period after the point, not after the write). The
/// phases (a hash of the name) spread an idle fleet's refreshes evenly over the period: without
/// them every node written in one step (a new leader's first) is due in one step again, a burst
/// of the whole fleet per period that holds the decision loop while it is written.
pub(super) fn refresh_due_at(node: &str, last_write: Millis, refresh: Millis) -> Millis {
    let refresh = refresh.max(1);
    // FNV-1a: stable across builds and runs, unlike the std hasher.
    let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let phase = Millis::try_from(hash % refresh.unsigned_abs()).unwrap_or(0);
    let earliest = last_write.saturating_add(refresh - refresh / 10);
    earliest.saturating_add((phase - earliest).rem_euclid(refresh))
}

/// Whether the Node shows a condition we wrote with another status or reason, or not at all:
/// someone else changed it. Only once our last write is [`INTENT_GRACE_MS`] old, since the Node
/// watch lags our own writes. Conditions another manager owns (`foreign_conditions`) are theirs.
fn overwritten(st: &NodeState, view: &NodeView, now: Millis) -> bool {
    st.last_write_ms.is_some_and(|t| now - t >= INTENT_GRACE_MS)
        && st.written.iter().any(|(ty, (status, reason))| {
            !view.foreign_conditions.contains(ty)
                && view
                    .conditions
                    .get(ty)
                    .is_none_or(|c| c.status != *status || c.reason != *reason)
        })
}

/// The conditions phase: plans a write per node whose conditions changed or are due a refresh.
pub(super) fn plan_conditions(nodes: &mut BTreeMap<String, NodeState>, ctx: &StepCtx, plan: &mut Plan) {
    let p = ctx.policy;
    let types = ConditionTypes::new(p);
    let mut heads = Vec::new();
    for (name, view) in &ctx.input.nodes {
        let Some(st) = nodes.get_mut(name) else {
            continue;
        };
        desired_heads(st, view, p, &types, &mut heads);
        let as_written =
            |h: &Head| st.written.get(h.type_).map(|(s, r)| (*s, r.as_str())) == Some((h.status, h.reason));
        // The lost-events note is news: written now, not at the next refresh.
        let mut changed = st.lost_events.as_ref().map(|(k, _)| k) != st.lost_events_written.as_ref();
        // A condition we wrote and no longer want (the EKS mirror after recovery, or once
        // another manager writes it) goes with the next write.
        changed |= st
            .written
            .keys()
            .any(|ty| !heads.iter().any(|h| h.type_ == ty.as_str()));
        changed |= !heads.iter().all(as_written);
        // A condition of ours that someone else changed or removed is put back now, not at the
        // next refresh.
        changed |= !p.dry_run && overwritten(st, view, ctx.now);
        // Unchanged: at most one write per refresh period (keeps `lastHeartbeatTime` and the
        // message figures fresh), at the node's own phase of it.
        let refresh_due = st
            .last_write_ms
            .is_none_or(|t| ctx.now >= refresh_due_at(name, t, p.condition_refresh_ms));
        if !(changed || refresh_due) {
            continue;
        }
        // Each condition's message is built once, for the write and for the Events of the
        // conditions that changed.
        let conditions = heads
            .iter()
            .map(|h| {
                let d = with_message(h, st, p);
                let keep = view.conditions.get(&d.type_).filter(|c| c.status == d.status);
                DesiredCondition {
                    last_transition_ms: keep.map_or(ctx.now, |c| c.last_transition_ms),
                    ..d
                }
            })
            .collect::<Vec<_>>();
        for (head, d) in heads.iter().zip(&conditions).filter(|(h, _)| !as_written(h)) {
            let prev = st.written.get(&d.type_);
            if let Subject::Family(family) = head.subject
                && let Some(event) = prediction::transition_event(name, family, prev.map(|(_, r)| r.as_str()), d)
            {
                plan.events.push(event);
            }
            let prev_status = prev.map(|(s, _)| *s);
            if !matches!(head.subject, Subject::Overall) || prev_status == Some(d.status) {
                continue;
            }
            if let Some((kind, reason)) = transition_event(prev_status, d.status) {
                plan.events.push(PlannedEvent {
                    target: EventTarget::Node(name.clone()),
                    kind,
                    reason: reason.into(),
                    action: "SetCondition".into(),
                    note: format!("{} {}: {}", d.type_, d.status.as_str(), d.message),
                });
            }
        }
        st.written = conditions
            .iter()
            .map(|c| (c.type_.clone(), (c.status, c.reason.clone())))
            .collect();
        st.last_write_ms = Some(ctx.now);
        st.lost_events_written = st.lost_events.as_ref().map(|(k, _)| k.clone());
        if !p.dry_run {
            plan.conditions.push(ConditionWrite {
                node: name.clone(),
                conditions,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_that_get_an_event() {
        use CondStatus::{False, True, Unknown};
        let reason = |prev, now| transition_event(prev, now).map(|(_, r)| r);
        assert_eq!(reason(None, False), Some("GrayFailureDetected"));
        assert_eq!(reason(Some(True), False), Some("GrayFailureDetected"));
        assert_eq!(reason(Some(False), True), Some("GrayFailureCleared"));
        assert_eq!(reason(Some(True), Unknown), Some("HealthUnknown"));
        assert_eq!(reason(Some(False), Unknown), Some("HealthUnknown"));
        assert_eq!(reason(None, True), None, "first sight is routine");
        assert_eq!(reason(Some(Unknown), True), None);
        assert_eq!(reason(None, Unknown), None);
    }

    /// `NetworkingReady`: ours only while the network families are not healthy, never another
    /// manager's.
    #[test]
    fn networking_ready_only_while_degraded_and_never_anothers() {
        let p = Policy {
            mirror_eks: true,
            ..Policy::default()
        };
        let types = ConditionTypes::new(&p);
        let mut st = NodeState::from_view(&NodeView::default(), &p, 0);
        let eks = |st: &NodeState, view: &NodeView| {
            desired_conditions(st, view, &p, &types)
                .into_iter()
                .find(|c| c.type_ == EKS_NETWORKING_CONDITION)
                .map(|c| c.status)
        };
        let mut view = NodeView::default();
        for phase in [Phase::Healthy, Phase::Suspect, Phase::Unknown] {
            st.families.get_mut(&Family::PacketLoss).expect("family").phase = phase;
            assert_eq!(eks(&st, &view), None, "{phase:?}");
        }
        for phase in [Phase::Degraded, Phase::Recovering] {
            st.families.get_mut(&Family::PacketLoss).expect("family").phase = phase;
            assert_eq!(eks(&st, &view), Some(CondStatus::False), "{phase:?}");
        }
        view.foreign_conditions.insert(EKS_NETWORKING_CONDITION.into());
        assert_eq!(eks(&st, &view), None, "another manager's");
    }
}
