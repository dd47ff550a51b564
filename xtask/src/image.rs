//! `cargo xtask image`: the agent and aggregator container images, built without a daemon.
//!
//! Release binaries (the agent with its eBPF object embedded), debug info stripped, in `scratch`
//! images holding only the binary and the shared libraries `ldd` names, made with Debian's
//! buildah in a private storage under ~/.cache/graywatch/buildah. Tagged exactly as the chart's
//! defaults (`ghcr.io/graywatch/<name>:<Chart appVersion>`) and written as docker archives to
//! target/images/, which `cargo xtask cluster up` loads into the cluster's containerd.
//! The Containerfile at the repository root builds the same layout for CI releases.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::{
    oci::{ScratchImage, build_scratch, stage_binary},
    util::{ensure_debian_packages, run_cmd, workspace_root},
};

pub const REGISTRY: &str = "ghcr.io/graywatch";
/// Debian packages for building images without a daemon.
const PACKAGES: [&str; 2] = ["buildah", "skopeo"];
/// The aggregator needs no privileges: the conventional "nonroot" uid/gid of distroless images.
const NONROOT: &str = "65532:65532";

#[derive(clap::Args, Default)]
pub struct ImageArgs {
    /// Also import the images into the running `cargo xtask cluster` containerd.
    #[arg(long)]
    pub load: bool,
    /// Also build the test-only load image (`localhost/graywatch-stress:test`: Debian's
    /// stress-ng in a scratch image) that the chart's lifecycle test runs as a faulty pod.
    #[arg(long)]
    pub test_images: bool,
}

/// The lifecycle test's load generator: not a product image, never pushed.
pub const STRESS_IMAGE: &str = "localhost/graywatch-stress:test";

struct Spec {
    package: &'static str,
    bin: &'static str,
    user: Option<&'static str>,
    description: &'static str,
}

const SPECS: [Spec; 2] = [
    Spec {
        package: "graywatch-agent",
        bin: "graywatch-agent",
        // Loads eBPF programs: the chart grants the capabilities; the uid stays root.
        user: None,
        description: "graywatch node agent: eBPF gray-failure signals",
    },
    Spec {
        package: "graywatch-aggregator",
        bin: "graywatch-aggregator",
        user: Some(NONROOT),
        description: "graywatch aggregator: fleet-wide gray-failure decisions",
    },
];

pub fn run(args: &ImageArgs) -> anyhow::Result<()> {
    ensure_debian_packages(&PACKAGES)?;
    let root = workspace_root();
    let version = chart_app_version(&root)?;
    let revision = git_output(&root, &["rev-parse", "HEAD"])?;
    let source = repository_url(&root)?;

    let mut build = Command::new("cargo");
    build.args(["build", "--release"]).current_dir(&root);
    for s in &SPECS {
        build.args(["-p", s.package]);
    }
    // A stub eBPF object in an image would only fail at run time: make it a build error.
    run_cmd(build.env("GRAYWATCH_REQUIRE_EBPF", "1"))
        .context("building release binaries (needs `cargo xtask setup`)")?;

    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let out = root.join("target/images");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut built = Vec::new();
    for s in &SPECS {
        let tag = format!("{REGISTRY}/{}:{version}", s.bin);
        let rootfs = out.join(format!("{}.rootfs", s.bin));
        let _ = std::fs::remove_dir_all(&rootfs);
        let dest = Path::new("usr/local/bin").join(s.bin);
        stage_binary(&target_dir.join("release").join(s.bin), &rootfs, &dest)?;
        let labels = vec![
            ("org.opencontainers.image.source".to_string(), source.clone()),
            ("org.opencontainers.image.version".to_string(), version.clone()),
            ("org.opencontainers.image.revision".to_string(), revision.clone()),
            ("org.opencontainers.image.title".to_string(), s.bin.to_string()),
            (
                "org.opencontainers.image.description".to_string(),
                s.description.to_string(),
            ),
            (
                "org.opencontainers.image.licenses".to_string(),
                "Apache-2.0".to_string(),
            ),
        ];
        let archive = out.join(format!("{}-{version}.tar", s.bin));
        let entry = format!("/{}", dest.display());
        build_scratch(
            &ScratchImage {
                tag: &tag,
                rootfs: &rootfs,
                entrypoint: &[&entry],
                user: s.user,
                labels: &labels,
            },
            &archive,
        )?;
        let _ = std::fs::remove_dir_all(&rootfs);
        built.push((tag, archive));
    }
    if args.test_images {
        built.push((STRESS_IMAGE.to_owned(), build_stress_image(&out)?));
    }
    println!("{:<48} {:>10} {:>12}  archive", "image", "size", "gzip");
    for (tag, archive) in &built {
        let size = std::fs::metadata(archive)?.len();
        println!(
            "{tag:<48} {:>10} {:>12}  {}",
            human(size),
            human(gzip_size(archive)?),
            archive.display()
        );
    }
    if args.load {
        match crate::cluster::running() {
            Some(info) => {
                for (_, archive) in &built {
                    crate::cluster::import_image(&info.containerd_socket, archive)?;
                }
            }
            None => bail!("--load: no cluster is running; `cargo xtask cluster up` loads target/images/ itself"),
        }
    }
    Ok(())
}

/// Debian's stress-ng (installed by `cargo xtask setup`) and its libraries in a scratch image.
fn build_stress_image(out: &Path) -> anyhow::Result<PathBuf> {
    let rootfs = out.join("graywatch-stress.rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    let dest = Path::new("usr/bin/stress-ng");
    stage_binary(Path::new("/usr/bin/stress-ng"), &rootfs, dest)?;
    // stress-ng's --hdd workers write their files into the working directory.
    std::fs::create_dir_all(rootfs.join("tmp"))?;
    let archive = out.join("graywatch-stress-test.tar");
    build_scratch(
        &ScratchImage {
            tag: STRESS_IMAGE,
            rootfs: &rootfs,
            entrypoint: &["/usr/bin/stress-ng", "--temp-path", "/tmp"],
            user: None,
            labels: &[(
                "org.opencontainers.image.description".to_string(),
                "graywatch test load (stress-ng); not a product image".to_string(),
            )],
        },
        &archive,
    )?;
    let _ = std::fs::remove_dir_all(&rootfs);
    Ok(archive)
}

/// `appVersion` of deploy/helm/graywatch/Chart.yaml: the chart's default image tag.
fn chart_app_version(root: &Path) -> anyhow::Result<String> {
    let chart = root.join("deploy/helm/graywatch/Chart.yaml");
    let text = std::fs::read_to_string(&chart).with_context(|| format!("reading {}", chart.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_string())
        .filter(|v| !v.is_empty())
        .with_context(|| format!("no appVersion in {}", chart.display()))
}

fn repository_url(root: &Path) -> anyhow::Result<String> {
    let manifest = root.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("repository"))
        .and_then(|rest| rest.split('"').nth(1))
        .map(str::to_string)
        .with_context(|| format!("no repository in {}", manifest.display()))
}

fn git_output(root: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(root)
        .output()
        .context("running git")?;
    if !out.status.success() {
        bail!("git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn gzip_size(path: &Path) -> anyhow::Result<u64> {
    let out = Command::new("sh")
        .arg("-c")
        .arg("gzip -c \"$1\" | wc -c")
        .arg("sh")
        .arg(path)
        .output()
        .context("running gzip")?;
    String::from_utf8_lossy(&out.stdout).trim().parse().context("gzip size")
}

fn human(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1_000_000.0)
}
