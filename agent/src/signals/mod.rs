//! One module per signal family: each reads its kernel maps or procfs/cgroup files and produces
//! its part of the window summary. Kernel programs live in agent-ebpf/src/<family>.rs.

pub mod cgroup_stats;
pub mod cpu_contention;
pub mod cpu_steal;
pub mod host;
pub mod memory_pressure;
pub mod net;
pub mod psi;
