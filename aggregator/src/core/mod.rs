//! The pure decision core: (fleet view, observed cluster objects, policy) → plan.
//!
//! `engine` runs a step as a sequence of phases, each in its own module over its own state:
//! `state_machine` (windows → per node and family phases), `conditions` (Node conditions and
//! their Events), `guardrails` (breaker, group verdicts, rate limit, blast radius, taints) and
//! `karpenter` (NodePool exclusion, NodeClaim replacement); `prediction` turns an agent's
//! forecast into a family condition (advice for a NodeReadinessRule, never an action).

pub mod conditions;
pub mod engine;
pub mod evidence;
pub mod guardrails;
pub mod karpenter;
pub mod model;
pub mod plan;
pub mod policy;
pub mod prediction;
pub mod state_machine;
pub mod step;

#[cfg(test)]
mod tests;
