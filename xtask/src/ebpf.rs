//! `cargo xtask build-ebpf`: build the kernel programs and the agent that embeds them.
//! `cargo xtask lint-ebpf`: clippy on the kernel crate.
//!
//! The kernel crate itself is compiled by agent/build.rs (Debian rustc + bpf-linker); this
//! command makes a missing toolchain an error instead of a stub build.

use std::{env, path::PathBuf, process::Command};

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

/// rustfmt and clippy on agent-ebpf (its own workspace, so `cargo fmt --all` and the workspace's
/// clippy do not reach it), warnings denied. rustfmt is the workspace's; clippy must be
/// Debian's clippy: rustup's toolchains have no `core` for bpfel-unknown-none, and the kernel
/// crate is built by Debian's rustc of the same version. Checking does not link, so no bpf-linker.
pub fn lint() -> anyhow::Result<()> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = workspace_root().join("agent-ebpf/Cargo.toml");
    run_cmd(
        Command::new(cargo)
            .arg("fmt")
            .arg("--manifest-path")
            .arg(&manifest)
            .args(["--", "--check"]),
    )?;
    crate::util::ensure_debian_packages(setup::EBPF_PACKAGES)?;
    let mut cmd = Command::new("/usr/bin/cargo-clippy");
    cmd.current_dir(workspace_root().join("agent-ebpf"))
        .args(["clippy", "--release", "--", "-D", "warnings"]);
    // As in agent/build.rs: this cargo's settings (target dir, rustup's cargo in CARGO) must not
    // reach the Debian toolchain, whose binaries come first on PATH.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO") || key.starts_with("RUSTC") || key.starts_with("RUSTUP") || key == "RUSTFLAGS" {
            cmd.env_remove(key.as_ref());
        }
    }
    let mut path = vec![PathBuf::from("/usr/bin")];
    path.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    cmd.env("PATH", env::join_paths(path)?).env("RUSTC_BOOTSTRAP", "1");
    run_cmd(&mut cmd)
}
