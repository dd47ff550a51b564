//! `cargo xtask test`: the README's test command. Sets the machine up, builds the kernel
//! programs, then runs every test: unit and property tests, and integration tests that load the
//! real programs into this kernel and drive real traffic through network namespaces (root).

use std::process::Command;

use anyhow::bail;

use crate::{
    cluster, ebpf, image, k8s, kernels, setup,
    util::{is_root, run_cmd, workspace_root},
};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Extra arguments for `cargo test` (e.g. --no-fail-fast, -p graywatch-agent, a test filter).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub cargo_args: Vec<String>,
}

pub fn run(args: &TestArgs) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the integration tests load eBPF programs and create network namespaces: run as root");
    }
    setup::run(&setup::SetupArgs::default())?;
    ebpf::run(&ebpf::BuildEbpfArgs::default())?;
    // The aggregator's integration tests each start a real etcd + kube-apiserver (v1.20.2, built
    // once from Debian's source package and cached); with GRAYWATCH_REQUIRE_K8S=1 they fail
    // instead of skipping when it is missing.
    k8s::ensure_apiserver()?;
    // The kernel-matrix test boots the EKS kernel lines (6.1, 6.12) in QEMU guests with the agent.
    let kernels = kernels::ensure()?;
    // The end-to-end demo test runs the agent, aggregator and traffic binaries.
    run_cmd(
        Command::new("cargo")
            .current_dir(workspace_root())
            .args(["build", "--workspace", "--bins"])
            .env("GRAYWATCH_REQUIRE_EBPF", "1"),
    )?;
    // One test at a time: the bench tests share the kernel and time-sensitive traffic. The
    // chart's lifecycle runs afterwards, on its own: the local cluster's kube-proxy and CNI
    // rules (bridge netfilter, FORWARD chains) must not sit under the network-namespace bench.
    run_cmd(
        Command::new("cargo")
            .current_dir(workspace_root())
            .args(["test", "--workspace"])
            .args(&args.cargo_args)
            .args(["--", "--test-threads=1", "--skip", LIFECYCLE_TEST])
            .env("GRAYWATCH_REQUIRE_EBPF", "1")
            .env("GRAYWATCH_REQUIRE_K8S", "1")
            .env("GRAYWATCH_KERNELS", &kernels),
    )?;
    if args.cargo_args.is_empty() || args.cargo_args.iter().any(|a| a.contains("lifecycle")) {
        chart_lifecycle()?;
    }
    Ok(())
}

/// The chart lifecycle test (deploy/chart-tests/tests/lifecycle.rs).
const LIFECYCLE_TEST: &str = "the_chart_runs_on_a_real_kubelet_through_its_whole_lifecycle";

/// The images from this tree, a real single-node cluster (`cargo xtask cluster up`, left
/// running if it already was), and the chart's whole lifecycle on it.
fn chart_lifecycle() -> anyhow::Result<()> {
    image::run(&image::ImageArgs {
        load: false,
        test_images: true,
    })?;
    let was_running = cluster::running().is_some();
    let info = cluster::ensure_up()?;
    let result = (|| {
        if was_running {
            // `up` loads target/images/ itself; a cluster that was already up has older ones.
            for archive in cluster::project_images()? {
                cluster::import_image(&info.containerd_socket, &archive)?;
            }
        }
        run_cmd(
            Command::new("cargo")
                .current_dir(workspace_root())
                .args(["test", "-p", "graywatch-chart-tests", "--test", "lifecycle"])
                .args(["--", "--nocapture", LIFECYCLE_TEST])
                .env("GRAYWATCH_CLUSTER_KUBECONFIG", &info.kubeconfig)
                .env("GRAYWATCH_REQUIRE_CLUSTER", "1"),
        )
    })();
    if !was_running {
        // Leave the machine as it was, whatever the result.
        if let Err(error) = cluster::down() {
            eprintln!("cluster down after the lifecycle test failed: {error:#}");
        }
    }
    result
}
