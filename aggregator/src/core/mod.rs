//! The pure decision core: (fleet view, observed cluster objects, policy) → plan.

pub mod engine;
pub mod evidence;
pub mod model;
pub mod plan;
pub mod policy;

#[cfg(test)]
mod tests;
