//! `cargo xtask build-ebpf`: build the kernel programs and the agent that embeds them.
//!
//! The kernel crate itself is compiled by agent/build.rs (Debian rustc + bpf-linker); this
//! command makes a missing toolchain an error instead of a stub build.

use std::process::Command;

use crate::{
    setup,
    util::{run_cmd, workspace_root},
};

#[derive(clap::Args, Default)]
pub struct BuildEbpfArgs {
    /// Build in release mode.
    #[arg(long)]
    pub release: bool,
}

pub fn run(args: &BuildEbpfArgs) -> anyhow::Result<()> {
    setup::run(&setup::SetupArgs { no_k8s: true })?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["build", "--package", "graywatch-agent", "--bins"])
        .env("GRAYWATCH_REQUIRE_EBPF", "1");
    if args.release {
        cmd.arg("--release");
    }
    run_cmd(&mut cmd)
}
