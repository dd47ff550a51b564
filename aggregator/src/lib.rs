//! graywatch aggregator: ingests node summaries over gRPC, keeps a fleet view, scores gray
//! failures with peer and vantage evidence, and applies guarded plans to the cluster.
//!
//! `core` is the pure decision core; `cluster` reads and `actuate` writes the cluster;
//! `ingest` is the gRPC server (it also answers the agents' address lookups); `leader` the Lease election; `run` wires them together;
//! `cleanup` undoes every write (the chart's uninstall hook); `stop` scales the aggregator
//! Deployment down for the chart's mode-change hook.

pub mod actuate;
pub mod auth;
pub mod cleanup;
pub mod cluster;
pub mod config;
pub mod core;
pub mod gate;
pub mod ingest;
pub mod leader;
pub mod limits;
pub mod metrics;
pub mod run;
pub mod security;
pub mod stop;
