//! `cargo xtask <command>`: the one entry point for building, testing and running graywatch.
//!
//! Every command installs what it needs (idempotently, cached under ~/.cache/graywatch), so a
//! fresh machine only needs the two commands in README.md.

mod bench;
mod cluster;
mod demo;
mod ebpf;
mod eval;
mod fuzz;
mod image;
mod k8s;
mod kernels;
mod oci;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "graywatch build, test, bench and demo automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole loop on this machine: apiserver, aggregator, agents on netns nodes, a fault.
    Demo(demo::DemoArgs),
    /// Install the toolchain and system packages graywatch needs (apt, bpf-linker, tracefs).
    Setup(setup::SetupArgs),
    /// Build the kernel programs (agent-ebpf) with Debian's rustc + bpf-linker.
    BuildEbpf(ebpf::BuildEbpfArgs),
    /// rustfmt (check) and clippy on the kernel programs (agent-ebpf), warnings denied.
    LintEbpf,
    /// Run the whole test suite: unit, property and integration tests on the real kernel.
    Test(test::TestArgs),
    /// Score detectors on labelled data (NAB format, Microsoft cloud-monitoring set).
    Eval(eval::EvalArgs),
    /// Build, start and stop the local etcd + kube-apiserver used by tests and the demo.
    K8s(k8s::K8sArgs),
    /// Benchmarks against the performance budgets (ebpf, overhead, fleet, detect); results in target/bench/.
    Bench(bench::BenchArgs),
    /// Container images of the agent and aggregator (buildah, from scratch) into target/images/.
    Image(image::ImageArgs),
    /// A real single-node cluster: control plane, containerd, kubelet, kube-proxy, CNI.
    Cluster(cluster::ClusterArgs),
    /// Fuzz targets (bounded proptest over untrusted input) with many cases, optimised.
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo(args) => demo::run(&args),
        Command::Setup(args) => setup::run(&args),
        Command::BuildEbpf(args) => ebpf::run(&args),
        Command::LintEbpf => ebpf::lint(),
        Command::Test(args) => test::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::K8s(args) => k8s::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Image(args) => image::run(&args),
        Command::Cluster(args) => cluster::run(&args),
    }
}
