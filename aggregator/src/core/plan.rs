//! The plan: plain data the actuators apply. Nothing here does I/O.

use super::model::{CondStatus, Millis, PoolEdits};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub dry_run: bool,
    pub conditions: Vec<ConditionWrite>,
    pub taints: Vec<TaintChange>,
    pub pools: Vec<PoolChange>,
    pub claim_deletions: Vec<ClaimDeletion>,
    /// One audit Event per action or suppressed action (dry-run: what would have been done).
    pub events: Vec<PlannedEvent>,
    pub breaker_open: bool,
    /// The fleet view is settled (see `Settling`); until then no new action is taken.
    pub settled: bool,
    /// Group verdicts in force, as (label, value).
    pub verdicts: Vec<(String, String)>,
    /// Node pairs (sorted) whose link alone looks degraded from both ends: no action on either.
    pub degraded_links: Vec<(String, String)>,
}

impl Plan {
    /// Whether applying the plan changes anything but Events.
    #[must_use]
    pub fn writes(&self) -> bool {
        !(self.conditions.is_empty()
            && self.taints.is_empty()
            && self.pools.is_empty()
            && self.claim_deletions.is_empty())
    }
}

/// The full set of our conditions for one node (server-side apply owns exactly these).
#[derive(Debug, Clone, PartialEq)]
pub struct ConditionWrite {
    pub node: String,
    pub conditions: Vec<DesiredCondition>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DesiredCondition {
    pub type_: String,
    pub status: CondStatus,
    pub reason: String,
    pub message: String,
    pub last_transition_ms: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaintChange {
    pub node: String,
    pub add: bool,
}

/// A change of our exclusions on a NodePool. The actuator edits the pool as it reads it:
/// it takes out exactly what we added before and puts in ours, so edits others made stay.
#[derive(Debug, Clone, PartialEq)]
pub enum PoolChange {
    /// Set our exclusions to `excluded`: take out `remove` (what we added before), put in
    /// `add`. What is really added is saved first (the snapshot ConfigMap), then the pool is
    /// patched and read back to verify.
    Exclude {
        pool: String,
        excluded: Vec<(String, String)>,
        remove: PoolEdits,
        add: PoolEdits,
    },
    /// Take out exactly what we added (`remove`), verify, then delete the snapshot.
    Restore { pool: String, remove: PoolEdits },
}

/// A [`PoolChange`] as the steps every applier takes: the pool, what to take out, what to put
/// in, and (for an exclusion) the verdicts its snapshot records.
pub struct PoolChangeParts<'a> {
    pub pool: &'a str,
    pub remove: &'a PoolEdits,
    pub add: PoolEdits,
    pub excluded: Option<&'a [(String, String)]>,
}

impl PoolChange {
    #[must_use]
    pub fn parts(&self) -> PoolChangeParts<'_> {
        match self {
            PoolChange::Exclude {
                pool,
                excluded,
                remove,
                add,
            } => PoolChangeParts {
                pool,
                remove,
                add: add.clone(),
                excluded: Some(excluded),
            },
            PoolChange::Restore { pool, remove } => PoolChangeParts {
                pool,
                remove,
                add: PoolEdits::default(),
                excluded: None,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimDeletion {
    pub node: String,
    pub claim: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventTarget {
    Node(String),
    NodePool(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Normal,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedEvent {
    pub target: EventTarget,
    pub kind: EventKind,
    /// CamelCase.
    pub reason: String,
    pub action: String,
    pub note: String,
}
