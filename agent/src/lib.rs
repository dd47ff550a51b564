//! graywatch node agent: kernel programs (agent-ebpf) plus procfs/cgroup readers measure
//! gray-failure signals per pod; each window becomes a [`summary::WindowSummary`].
//!
//! Where to find a signal: kernel program `agent-ebpf/src/<family>.rs`, reader
//! `agent/src/signals/<family>.rs`, detector in the `graywatch-detect` crate, condition in the
//! aggregator.

pub mod app;
pub mod cgroups;
pub mod config;
pub mod discovery;
pub mod ebpf;
pub mod fanout;
pub mod http;
pub mod kernel_layout;
pub mod metrics;
pub mod peers;
pub mod pods;
pub mod predict;
pub mod report;
pub mod scoring;
pub mod signals;
pub mod stream_security;
pub mod summary;
pub mod tracefs;
pub mod wire;
