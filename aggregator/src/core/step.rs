//! What every phase of a decision step shares: the step's context and the constants more than
//! one phase reads. A leaf of `core`, so the phases depend on it rather than on `engine`, which
//! calls them.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    model::{Input, Millis, NodeReport},
    policy::Policy,
};

/// How long a planned taint change is trusted over an observed state that does not show it yet
/// (the shell reads Nodes from a watch, which lags our own writes a little).
pub const INTENT_GRACE_MS: Millis = 30_000;

/// Condition type Karpenter's EKS node repair watches for networking.
pub const EKS_NETWORKING_CONDITION: &str = "NetworkingReady";

/// What every phase of one step reads.
pub(super) struct StepCtx<'a> {
    pub policy: &'a Policy,
    pub input: &'a Input,
    pub now: Millis,
    /// Time of the engine's first step.
    pub started: Millis,
    /// The reports of existing nodes no older than `stale_after_ms`.
    pub fresh: BTreeMap<&'a str, &'a NodeReport>,
    /// Existing nodes without a fresh report whose agent said it was stopping on purpose no
    /// longer than `restart_grace_ms` ago: their state is held for the next agent, neither
    /// updated nor made Unknown. They count as neither fresh nor stale evidence.
    pub restarting: BTreeSet<&'a str>,
    /// The view is settled (set once the state machines have seen this step's windows).
    pub settled: bool,
}
