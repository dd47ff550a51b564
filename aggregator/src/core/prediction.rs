//! Predicted failures: an agent's forecast that a family will fail (a workload's working set
//! reaching its memory limit within the horizon) becomes that family's condition False with
//! reason `PredictedFailure`, so a NodeReadinessRule can steer new pods away before workloads
//! suffer. Advice only: the family's phase is untouched, so the prediction alone never makes
//! the overall condition False, taints in direct mode, counts towards a group verdict or
//! replaces a NodeClaim. A real degradation takes precedence (reason `GrayFailure`).

use super::{
    model::{CondStatus, Family, Prediction},
    plan::{DesiredCondition, EventKind, EventTarget, PlannedEvent},
    policy::Policy,
    state_machine::{FamilyState, NodeState, Phase, UnknownReason},
};

/// The condition reason of a predicted failure.
pub use super::model::PREDICTED_FAILURE_REASON as REASON;

/// The prediction a family's condition shows: the policy predicts, one is held (see [`super::state_machine::note_predictions`]),
/// and the family is not failing already (a Degraded or Recovering family shows `GrayFailure`;
/// Unknown for want of a fresh report shows that).
#[must_use]
pub fn in_force<'a>(fs: &'a FamilyState, p: &Policy) -> Option<&'a Prediction> {
    let open = match fs.phase {
        Phase::Healthy | Phase::Suspect => true,
        // The agent reports nothing else for this family (e.g. no PSI on a v1 host).
        Phase::Unknown => fs.unknown_reason == UnknownReason::NoData,
        Phase::Degraded | Phase::Recovering => false,
    };
    fs.prediction.as_ref().filter(|_| p.predict_failures && open)
}

/// The message of the condition a prediction in force calls for (status False, reason
/// [`REASON`]).
pub(super) fn message(prediction: &Prediction) -> String {
    format!(
        "predicted failure in {:.0} s (confidence {:.2}): {}",
        prediction.eta_secs, prediction.confidence, prediction.reason
    )
}

/// A note for the overall condition's message: which families have a prediction in force.
pub(super) fn overall_note(st: &NodeState, p: &Policy) -> Option<String> {
    let notes: Vec<String> = st
        .families
        .iter()
        .filter_map(|(f, fs)| in_force(fs, p).map(|pr| format!("{} in {:.0} s", f.as_str(), pr.eta_secs)))
        .collect();
    (!notes.is_empty()).then(|| format!("predicted failure: {}", notes.join(", ")))
}

/// The Event a family condition's change of reason deserves: into `PredictedFailure`, and out
/// of it other than into a real degradation (which the overall condition's Event announces).
pub(super) fn transition_event(
    node: &str,
    family: Family,
    prev_reason: Option<&str>,
    desired: &DesiredCondition,
) -> Option<PlannedEvent> {
    let was = prev_reason == Some(REASON);
    let is = desired.reason == REASON;
    let (kind, reason) = match (was, is) {
        (false, true) => (EventKind::Warning, REASON),
        (true, false) if desired.status != CondStatus::False => (EventKind::Normal, "PredictedFailureCleared"),
        _ => return None,
    };
    Some(PlannedEvent {
        target: EventTarget::Node(node.to_owned()),
        kind,
        reason: reason.into(),
        action: "SetCondition".into(),
        note: format!(
            "{} {} ({}): {}",
            desired.type_,
            desired.status.as_str(),
            family.as_str(),
            desired.message
        ),
    })
}
