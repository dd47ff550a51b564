//! graywatch's test bench: network namespaces as nodes, real TCP traffic between them, fault
//! injection without netem, and the kernel's own counters as ground truth. Used by the
//! integration tests, the demo and the benchmarks; `graywatch-chaos` exposes the injector.

pub mod cgroup;
pub mod fault;
pub mod ground_truth;
pub mod netns;
pub mod traffic;
