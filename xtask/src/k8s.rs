//! `cargo xtask k8s`: the local etcd + kube-apiserver (v1.20.2 from Debian's archive).
//!
//! `build` compiles kube-apiserver from Debian bookworm's `kubernetes` source package
//! (1.20.5+really1.20.2-1.1+deb12u1, full upstream tree with vendor/) with Debian's golang-1.19,
//! the way debian/rules builds kubectl (`make WHAT=cmd/...`), and caches the binary under
//! `~/.cache/graywatch/k8s/v1.20.2/bin/` (keyed by version). Only Debian's archive is used: a
//! private apt configuration under the cache adds deb-src; /etc is untouched.
//! `start`/`stop` run one etcd + apiserver on loopback for manual use and demos; integration
//! tests start their own instances through `graywatch-k8s-testkit`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use graywatch_k8s_testkit as kit;

use crate::util::{is_root, run_cmd, succeeds};

const DEB_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";
const ORIG_TARBALL: &str = "kubernetes_1.20.5+really1.20.2.orig.tar.gz";
const SRC_DIRNAME: &str = "kubernetes-1.20.2";
const REFLECT2_DEB: &str = "golang-github-modern-go-reflect2-dev=1.0.2-2";
const REFLECT2_DEB_FILE: &str = "golang-github-modern-go-reflect2-dev_1.0.2-2_all.deb";
const GO_BIN: &str = "/usr/lib/go-1.19/bin";
/// Ports of the `start` instance (tests use random free ports instead).
const API_PORT: u16 = 16443;
const ETCD_PORT: u16 = 12379;
const ETCD_PEER_PORT: u16 = 12380;

#[derive(clap::Args)]
pub struct K8sArgs {
    #[command(subcommand)]
    pub command: K8sCommand,
}

#[derive(clap::Subcommand)]
pub enum K8sCommand {
    /// Build kube-apiserver v1.20.2 once (about 4 min on 2 cores) and cache it.
    Build,
    /// Start etcd + kube-apiserver on 127.0.0.1:16443; prints `export KUBECONFIG=...`.
    Start,
    /// Stop the instance started by `start` and delete its data.
    Stop,
    /// Print the path of the cached kube-apiserver binary (fails if it is not built).
    Path,
}

pub fn run(args: &K8sArgs) -> anyhow::Result<()> {
    match args.command {
        K8sCommand::Build => ensure_apiserver().map(|_| ()),
        K8sCommand::Start => start(),
        K8sCommand::Stop => stop(),
        K8sCommand::Path => {
            let bin = kit::apiserver_binary();
            if !bin.exists() {
                bail!("{} is not built; run `{}`", bin.display(), kit::BUILD_COMMAND);
            }
            println!("{}", bin.display());
            Ok(())
        }
    }
}

/// Builds the apiserver unless the cached binary for this version is already there.
pub fn ensure_apiserver() -> anyhow::Result<PathBuf> {
    let bin = kit::apiserver_binary();
    if bin.exists() {
        return Ok(bin);
    }
    if !is_root() {
        bail!(
            "building kube-apiserver needs apt-get (packages and sources): run `{}` as root",
            kit::BUILD_COMMAND
        );
    }
    let k = kit::k8s_cache_dir();
    ensure_build_packages()?;
    let src = fetch_source(&k)?;
    patch_for_go119(&k, &src)?;
    eprintln!(
        "k8s: building kube-apiserver {} (about 4 min on 2 cores)",
        kit::K8S_VERSION
    );
    make(&src, "cmd/kube-apiserver")?;
    let built = src.join("_output/bin/kube-apiserver");
    let parent = bin.parent().context("binary path has no parent")?;
    std::fs::create_dir_all(parent)?;
    // Copy to a temporary name first so an interrupted copy never looks like a cached binary.
    let tmp = parent.join("kube-apiserver.partial");
    std::fs::copy(&built, &tmp).with_context(|| format!("copying {}", built.display()))?;
    std::fs::rename(&tmp, &bin)?;
    run_cmd(Command::new(&bin).arg("--version"))?;
    Ok(bin)
}

/// The prepared kubernetes source tree (kept after the apiserver build for the cluster's).
pub fn source_dir() -> PathBuf {
    kit::k8s_cache_dir().join("src").join(SRC_DIRNAME)
}

/// `make WHAT=<what>` in the prepared source tree with Debian's Go 1.19, offline.
pub fn make(src: &Path, what: &str) -> anyhow::Result<()> {
    let path = format!("{GO_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    run_cmd(
        Command::new("make")
            .arg(format!("WHAT={what}"))
            .current_dir(src)
            .env("PATH", path)
            .env("CGO_ENABLED", "0")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            // Version stamping like an upstream release (hack/lib/version.sh reads these without .git).
            .env("KUBE_GIT_VERSION", kit::K8S_VERSION)
            .env("KUBE_GIT_MAJOR", "1")
            .env("KUBE_GIT_MINOR", "20")
            .env("KUBE_GIT_TREE_STATE", "clean"),
    )
}

fn ensure_build_packages() -> anyhow::Result<()> {
    let mut need = Vec::new();
    if !Path::new(GO_BIN).join("go").exists() {
        need.push("golang-1.19-go");
    }
    for (tool, pkg) in [
        ("make", "make"),
        ("rsync", "rsync"),
        ("tar", "tar"),
        ("etcd", "etcd-server"),
        ("openssl", "openssl"),
    ] {
        if !succeeds(Command::new("sh").args(["-c", &format!("command -v {tool}")])) {
            need.push(pkg);
        }
    }
    if need.is_empty() {
        return Ok(());
    }
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&need)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn apt_opts(k: &Path) -> Vec<String> {
    let apt = k.join("apt");
    vec![
        "-o".into(),
        format!("Dir::Etc::SourceList={}", apt.join("sources.list").display()),
        "-o".into(),
        "Dir::Etc::SourceParts=/dev/null".into(),
        "-o".into(),
        format!("Dir::State::Lists={}", apt.join("lists").display()),
        "-o".into(),
        format!("Dir::Cache={}", apt.join("cache").display()),
    ]
}

fn fetch_source(k: &Path) -> anyhow::Result<PathBuf> {
    let src_root = k.join("src");
    let src = src_root.join(SRC_DIRNAME);
    if src.join("Makefile").exists() {
        return Ok(src);
    }
    let apt = k.join("apt");
    std::fs::create_dir_all(apt.join("lists/partial"))?;
    std::fs::create_dir_all(apt.join("cache/archives/partial"))?;
    std::fs::create_dir_all(&src_root)?;
    std::fs::write(
        apt.join("sources.list"),
        "deb-src http://deb.debian.org/debian bookworm main\n\
         deb-src http://deb.debian.org/debian-security bookworm-security main\n",
    )?;
    run_cmd(Command::new("apt-get").args(apt_opts(k)).arg("update"))?;
    run_cmd(
        Command::new("apt-get")
            .args(apt_opts(k))
            .args(["source", "--download-only", &format!("kubernetes={DEB_VERSION}")])
            .current_dir(&src_root),
    )?;
    run_cmd(Command::new("tar").args(["xzf", ORIG_TARBALL]).current_dir(&src_root))?;
    Ok(src)
}

/// Two fixes so the 1.20 tree works when built with Go 1.19 (see the reference recipe).
fn patch_for_go119(k: &Path, src: &Path) -> anyhow::Result<()> {
    // 1. Go >= 1.18 crashes the vendored modern-go/reflect2 v1.0.1 (SIGSEGV in mapiterinit on the
    //    first JSON encode of a map): swap in v1.0.2 from Debian, which has go_above_118.go.
    let r2 = src.join("vendor/github.com/modern-go/reflect2");
    if !r2.join("go_above_118.go").exists() {
        let debs = k.join("debs");
        std::fs::create_dir_all(&debs)?;
        run_cmd(
            Command::new("apt-get")
                .args(["download", REFLECT2_DEB])
                .current_dir(&debs),
        )?;
        let x = debs.join("x");
        let _ = std::fs::remove_dir_all(&x);
        run_cmd(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(debs.join(REFLECT2_DEB_FILE))
                .arg(&x),
        )?;
        for entry in std::fs::read_dir(&r2)? {
            let p = entry?.path();
            if p.extension().is_some_and(|e| e == "go" || e == "s") {
                std::fs::remove_file(&p)?;
            }
        }
        let from = x.join("usr/share/gocode/src/github.com/modern-go/reflect2");
        for entry in std::fs::read_dir(&from).with_context(|| format!("reading {}", from.display()))? {
            let p = entry?.path();
            if p.extension().is_some_and(|e| e == "go") {
                std::fs::copy(&p, r2.join(p.file_name().context("file name")?))?;
            }
        }
    }
    // 2. Go >= 1.18 breaks go-openapi's "zero value" test in the CRD schema validator
    //    (reflect.DeepEqual of two reflect.Value structs is true for ""), so every empty string in
    //    a custom resource is rejected as null. Upstream later changed the test to `data == nil`.
    #[expect(
        clippy::items_after_statements,
        reason = "declared next to the comment that explains it"
    )]
    const OLD: &str =
        "if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {";
    for f in [
        "vendor/github.com/go-openapi/validate/type.go",
        "vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go",
    ] {
        let path = src.join(f);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let patched = text.replace(OLD, "if data == nil {");
        if !patched.contains("if data == nil {") {
            bail!(
                "{} does not contain the expected zero-value test; source changed?",
                path.display()
            );
        }
        std::fs::write(&path, patched)?;
    }
    Ok(())
}

fn run_dir() -> PathBuf {
    kit::k8s_cache_dir().join("run")
}

fn start() -> anyhow::Result<()> {
    ensure_apiserver()?;
    let dir = run_dir();
    if dir.join("kube-apiserver.pid").exists() {
        bail!(
            "an instance is already running (pid files in {}); `cargo xtask k8s stop` first",
            dir.display()
        );
    }
    let mut instance = kit::Instance::start_in(
        &dir,
        [API_PORT, ETCD_PORT, ETCD_PEER_PORT],
        &kit::ApiserverOptions::default(),
    )?;
    let t0 = Instant::now();
    if let Err(e) = instance.wait_ready() {
        drop(instance);
        let _ = std::fs::remove_dir_all(dir.join("etcd-data"));
        return Err(e);
    }
    eprintln!("k8s: apiserver ready in {} ms", t0.elapsed().as_millis());
    let [etcd, api] = instance.detach();
    std::fs::write(dir.join("etcd.pid"), etcd.to_string())?;
    std::fs::write(dir.join("kube-apiserver.pid"), api.to_string())?;
    println!("export KUBECONFIG={}", dir.join("kubeconfig").display());
    Ok(())
}

fn stop() -> anyhow::Result<()> {
    let dir = run_dir();
    for name in ["kube-apiserver", "etcd"] {
        let pid_file = dir.join(format!("{name}.pid"));
        let Ok(text) = std::fs::read_to_string(&pid_file) else {
            continue;
        };
        let pid: i32 = text
            .trim()
            .parse()
            .with_context(|| format!("bad pid in {}", pid_file.display()))?;
        // SAFETY: kill(2) with a pid we started and recorded; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        // SAFETY: signal 0 only probes for existence.
        while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        std::fs::remove_file(&pid_file)?;
    }
    let _ = std::fs::remove_dir_all(dir.join("etcd-data"));
    Ok(())
}
