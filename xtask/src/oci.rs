//! Daemonless `FROM scratch` images with Debian's buildah (in a private store under
//! ~/.cache/graywatch/buildah): a binary and the shared libraries it needs, as one layer, written
//! as a docker archive. Used by `cargo xtask image` (graywatch's images) and `cargo xtask cluster`
//! (the pause image).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::util::{cache_dir, run_cmd};

/// Copies `bin` (debug info stripped, symbols kept for backtraces) to `rootfs/dest` and every
/// shared library `ldd` names, the dynamic loader included, to the same path in `rootfs`.
pub fn stage_binary(bin: &Path, rootfs: &Path, dest: &Path) -> anyhow::Result<()> {
    let target = rootfs.join(dest);
    std::fs::create_dir_all(target.parent().context("binary path has a parent")?)?;
    run_cmd(Command::new("objcopy").arg("--strip-debug").arg(bin).arg(&target))
        .with_context(|| format!("stripping {} (is it built?)", bin.display()))?;
    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let out = Command::new("ldd").arg(bin).output().context("running ldd")?;
    for lib in ldd_paths(&String::from_utf8_lossy(&out.stdout)) {
        let to = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
        std::fs::create_dir_all(to.parent().context("library path has a parent")?)?;
        // fs::copy follows the symlinks (libc.so.6 -> ...), so the image holds real files.
        std::fs::copy(&lib, &to).with_context(|| format!("copying {}", lib.display()))?;
    }
    Ok(())
}

/// Absolute library paths in `ldd` output (`libc.so.6 => /lib/.../libc.so.6 (0x..)`,
/// `/lib64/ld-linux-x86-64.so.2 (0x..)`; the vdso has none).
fn ldd_paths(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l.split_once("=>").map_or(l, |(_, r)| r.trim());
            rest.split_whitespace()
                .next()
                .filter(|p| p.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect()
}

/// A `FROM scratch` image: the contents of `rootfs` as its one layer.
pub struct ScratchImage<'a> {
    pub tag: &'a str,
    pub rootfs: &'a Path,
    pub entrypoint: &'a [&'a str],
    pub user: Option<&'a str>,
    pub labels: &'a [(String, String)],
}

fn buildah() -> Command {
    let store = cache_dir().join("buildah");
    let mut c = Command::new("buildah");
    // A private vfs store: no overlay mounts left behind, nothing in /var/lib/containers.
    c.arg("--root")
        .arg(store.join("storage"))
        .arg("--runroot")
        .arg(store.join("run"))
        .args(["--storage-driver", "vfs"]);
    c
}

fn buildah_output(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = buildah();
    cmd.args(args);
    let out = cmd.output().context("running buildah (Debian package `buildah`)")?;
    if !out.status.success() {
        bail!("buildah {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Builds `img` with buildah and writes it to `archive` as a docker archive tagged `img.tag`
/// (an oci-archive without a reference name imports into containerd as nothing).
pub fn build_scratch(img: &ScratchImage, archive: &Path) -> anyhow::Result<()> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    // Without --cni-config-dir, `from` creates /etc/cni/net.d/cni.lock (its network backend).
    let cni_dir = cache_dir().join("buildah/cni");
    let cni_dir = cni_dir.display().to_string();
    let ctr = buildah_output(&["from", "--cni-config-dir", &cni_dir, "scratch"])?;
    let result = (|| -> anyhow::Result<()> {
        let src = format!("{}/", img.rootfs.display());
        buildah_output(&["copy", &ctr, &src, "/"])?;
        let entrypoint = serde_json::to_string(img.entrypoint)?;
        let mut config: Vec<String> = vec![
            "config".into(),
            "--entrypoint".into(),
            entrypoint,
            "--os".into(),
            "linux".into(),
            "--arch".into(),
            arch.into(),
            "--workingdir".into(),
            "/".into(),
        ];
        if let Some(user) = img.user {
            config.extend(["--user".into(), user.into()]);
        }
        for (k, v) in img.labels {
            config.extend(["--label".into(), format!("{k}={v}")]);
        }
        config.push(ctr.clone());
        let config: Vec<&str> = config.iter().map(String::as_str).collect();
        buildah_output(&config)?;
        buildah_output(&["commit", "--rm", &ctr, img.tag])?;
        Ok(())
    })();
    if result.is_err() {
        let _ = buildah_output(&["rm", &ctr]);
    }
    result?;
    // docker-archive refuses to write over an existing file.
    let _ = std::fs::remove_file(archive);
    let dest = format!("docker-archive:{}:{}", archive.display(), img.tag);
    let pushed = buildah_output(&["push", "--quiet", img.tag, &dest]);
    // The archive is the product; the store only holds copies.
    let _ = buildah_output(&["rmi", img.tag]);
    pushed?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_names_libraries_and_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x2)\n\t/lib64/ld-linux-x86-64.so.2 (0x3)\n";
        let paths = ldd_paths(text);
        assert_eq!(
            paths,
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }
}
