//! The EKS kernel lines for the kernel-matrix test: Debian's 6.1 and 6.12 cloud kernels (the
//! lines AL2023 and Bottlerocket ship), fetched from the package archive and unpacked, not
//! installed. The test boots each in a QEMU guest with the agent in an initramfs.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, bail};

use crate::util::{cache_dir, is_root, run_cmd};

/// (directory name, Debian meta package that depends on the line's newest kernel).
const KERNEL_LINES: &[(&str, &str)] = &[
    ("6.1", "linux-image-cloud-amd64"),
    ("6.12", "linux-image-6.12-cloud-amd64"),
];

/// What the guest needs besides a kernel: the emulator, a static shell, and cpio for the
/// initramfs.
const GUEST_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio"];

/// Where the unpacked kernels live: `<dir>/<line>/vmlinuz` and `<dir>/<line>/version`.
pub fn kernels_dir() -> PathBuf {
    cache_dir().join("kernels")
}

/// Fetches each kernel line's current cloud kernel (skipped when the cached one is current)
/// and the guest's packages.
pub fn ensure() -> anyhow::Result<PathBuf> {
    crate::util::ensure_debian_packages(GUEST_PACKAGES)?;
    let dir = kernels_dir();
    for (line, meta) in KERNEL_LINES {
        let package = current_package(meta)?;
        let line_dir = dir.join(line);
        let version_file = line_dir.join("version");
        if std::fs::read_to_string(&version_file).is_ok_and(|v| v.trim() == package) {
            continue;
        }
        if !is_root() {
            bail!("fetching kernel {package} needs apt-get as root: run `cargo xtask test` as root");
        }
        let download = dir.join("download");
        let _ = std::fs::remove_dir_all(&download);
        std::fs::create_dir_all(&download).with_context(|| format!("creating {}", download.display()))?;
        run_cmd(
            Command::new("apt-get")
                .args(["download", "-q", &package])
                .current_dir(&download),
        )?;
        let deb = std::fs::read_dir(&download)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download {package} left no .deb in {}", download.display()))?;
        let unpacked = download.join("root");
        run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
        let vmlinuz = std::fs::read_dir(unpacked.join("boot"))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .with_context(|| format!("{package} has no boot/vmlinuz-*"))?;
        let _ = std::fs::remove_dir_all(&line_dir);
        std::fs::create_dir_all(&line_dir)?;
        std::fs::copy(&vmlinuz, line_dir.join("vmlinuz")).with_context(|| format!("copying {}", vmlinuz.display()))?;
        std::fs::write(&version_file, format!("{package}\n"))?;
        std::fs::remove_dir_all(&download)?;
        eprintln!("kernels: {line} is {package}");
    }
    Ok(dir)
}

/// The kernel package a meta package currently points at.
fn current_package(meta: &str) -> anyhow::Result<String> {
    let output = Command::new("apt-cache")
        .args(["depends", meta])
        .output()
        .with_context(|| format!("running apt-cache depends {meta}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let found = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && !p.contains("meta"));
    match found {
        Some(package) => Ok(package.trim().to_owned()),
        None => {
            bail!(
                "apt-cache knows no kernel behind {meta} (run `apt-get update`?): {}",
                text.trim()
            )
        }
    }
}
