//! Small process and path helpers shared by the xtask commands.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// The workspace root (parent of xtask/). `cargo run` sets `CARGO_MANIFEST_DIR` at run time too;
/// that value wins over the compiled-in one, which is stale when a target dir shared between
/// checkouts holds an xtask built in another one.
pub fn workspace_root() -> PathBuf {
    let xtask_dir =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    xtask_dir.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Where graywatch caches tools and builds between runs (bpf-linker, kube-apiserver).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GRAYWATCH_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/graywatch")
}

/// Runs `cmd`, echoing it, and fails with its exit status.
pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns whether it succeeded, without echoing (for probes).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
