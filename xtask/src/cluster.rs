//! `cargo xtask cluster up | down | status`: a real single-node Kubernetes cluster on this machine.
//!
//! etcd (Debian `etcd-server`), kube-apiserver, kube-controller-manager, kube-scheduler,
//! kube-proxy and kubelet v1.20.2 (built from the same Debian `kubernetes` source tree as
//! `cargo xtask k8s build`), containerd + runc + the CNI reference plugins from Debian. Real
//! authentication (x509 client certificates per component, the admin in `system:masters`), real
//! authorization (`Node,RBAC`), ServiceAccount admission and bound (projected) ServiceAccount tokens.
//!
//! Everything the cluster writes lives under `~/.cache/graywatch/cluster/run` (deleted by `down`);
//! the built binaries and the pause image are cached under `~/.cache/graywatch`. The node has its
//! own address (`gw-node0`, 10.250.0.1/32, on a dummy interface, or a port-less bridge on kernels
//! without the dummy driver) because a kubelet's node IP must not be loopback; it never carries
//! traffic off the machine. `down` removes every process, mount, interface, iptables chain,
//! cgroup, sysctl change and host directory the cluster made; `up` checks root, the kernel and the
//! ports first, and a failed `up` runs `down`.
//!
//! Integration tests: `ensure_up()` (or the command `cargo xtask cluster up`, idempotent) and the
//! kubeconfig it returns; images from `cargo xtask image` (target/images/) are loaded at `up`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::TcpListener,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use graywatch_k8s_testkit as kit;

use crate::util::{cache_dir, describe, ensure_debian_packages, is_root, run_cmd, succeeds, workspace_root};

/// Node name, and the dummy interface carrying its address.
pub const NODE_NAME: &str = "gw-node0";
/// The node's InternalIP: private, on a dummy interface, never routed off the machine.
pub const NODE_IP: &str = "10.250.0.1";
/// The sandbox image, built from the source tree's build/pause/linux/pause.c.
pub const PAUSE_IMAGE: &str = "localhost/pause:3.4.1";
/// Ports, away from `cargo xtask k8s start` (16443/12379/12380), the testkit's ephemeral ones and
/// the upstream defaults (10250...), so that this cluster runs next to all of them.
pub const API_PORT: u16 = 17443;
const ETCD_PORT: u16 = 17379;
const ETCD_PEER_PORT: u16 = 17380;
const KUBELET_PORT: u16 = 17250;
const KUBELET_HEALTHZ_PORT: u16 = 17248;
const PROXY_HEALTHZ_PORT: u16 = 17256;
const PROXY_METRICS_PORT: u16 = 17249;

const BRIDGE: &str = "cni0";
const CNI_NETWORK: &str = "graywatch-cluster";
const POD_CIDR: &str = "10.244.0.0/24";
const CLUSTER_CIDR: &str = "10.244.0.0/16";
const SERVICE_CIDR: &str = "10.96.0.0/24";
const SERVICE_IP: &str = "10.96.0.1";
const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// 1.20 mounts a Secret-based token unless this (beta in 1.21) is on; real clusters project it.
const FEATURE_GATES: &str = "BoundServiceAccountTokenVolume=true";

/// Built from the kube-apiserver's source tree with the same toolchain (k8s.rs).
const BUILT: [&str; 4] = ["kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy"];

/// Start order; `down` stops them in reverse.
const COMPONENTS: [&str; 7] = [
    "etcd",
    "kube-apiserver",
    "containerd",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
];

/// Sysctls kubelet, kube-proxy and the CNI bridge plugin change; `down` puts them back.
const SYSCTLS: [&str; 9] = [
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// Host paths kubelet/containerd/CNI create outside their configured directories (hard-coded in
/// these versions); `down` removes the ones that did not exist before `up`.
const HOST_PATHS: [&str; 7] = [
    "/run/containerd",
    "/etc/cni",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/var/lib/kubelet",
    "/opt/cni",
];

#[derive(clap::Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(clap::Subcommand)]
pub enum ClusterCommand {
    /// Start the cluster (builds the binaries once, ~10 min cold on 2 cores) and wait until the Node is Ready.
    Up,
    /// Stop everything and remove every trace: processes, mounts, interfaces, iptables rules.
    Down,
    /// Show the components and the node's readiness.
    Status,
}

pub fn run(args: &ClusterArgs) -> anyhow::Result<()> {
    match args.command {
        ClusterCommand::Up => {
            let info = ensure_up()?;
            println!("export KUBECONFIG={}", info.kubeconfig.display());
            Ok(())
        }
        ClusterCommand::Down => down(),
        ClusterCommand::Status => status(),
    }
}

/// What a caller needs to use a running cluster.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    /// Admin kubeconfig (client certificate in `system:masters`).
    pub kubeconfig: PathBuf,
    pub server: String,
    pub node: String,
    /// containerd's socket, for `ctr -n k8s.io -a <socket> images import`.
    pub containerd_socket: PathBuf,
}

/// Files and directories of the cluster.
struct Paths {
    run: PathBuf,
    images: PathBuf,
    bin: PathBuf,
}

impl Paths {
    fn new() -> Self {
        let cache = cache_dir();
        // Canonical, because mount points in /proc are canonical and `down` matches on them.
        let cache = std::fs::canonicalize(&cache).unwrap_or(cache);
        let root = cache.join("cluster");
        Self {
            run: root.join("run"),
            images: root.join("images"),
            bin: kit::k8s_cache_dir().join("bin"),
        }
    }
    fn pki(&self, file: &str) -> PathBuf {
        self.run.join("pki").join(file)
    }
    fn pid_file(&self, name: &str) -> PathBuf {
        self.run.join(format!("{name}.pid"))
    }
    fn log(&self, name: &str) -> PathBuf {
        self.run.join(format!("{name}.log"))
    }
    fn kubeconfig(&self, who: &str) -> PathBuf {
        self.run.join(format!("{who}.kubeconfig"))
    }
    fn containerd_socket(&self) -> PathBuf {
        self.run.join("containerd/containerd.sock")
    }
    fn bin_of(&self, name: &str) -> PathBuf {
        match name {
            "etcd" => kit::etcd_binary(),
            "containerd" => PathBuf::from("/usr/bin/containerd"),
            _ => self.bin.join(name),
        }
    }
    fn info(&self) -> ClusterInfo {
        ClusterInfo {
            kubeconfig: self.kubeconfig("admin"),
            server: server(),
            node: NODE_NAME.into(),
            containerd_socket: self.containerd_socket(),
        }
    }
}

fn server() -> String {
    format!("https://{NODE_IP}:{API_PORT}")
}

/// The running cluster, if every component is alive.
pub fn running() -> Option<ClusterInfo> {
    let p = Paths::new();
    COMPONENTS
        .iter()
        .all(|c| component_pid(&p, c).is_some())
        .then(|| p.info())
}

/// Returns the running cluster, or starts one.
pub fn ensure_up() -> anyhow::Result<ClusterInfo> {
    if let Some(info) = running() {
        eprintln!("cluster: already running ({}; node {})", info.server, info.node);
        return Ok(info);
    }
    up()
}

/// Starts the cluster and waits until the Node is Ready and the default ServiceAccount exists.
/// On failure everything started so far is removed again.
pub fn up() -> anyhow::Result<ClusterInfo> {
    let t0 = Instant::now();
    let p = Paths::new();
    if !is_root() {
        bail!(
            "`cargo xtask cluster up` must run as root: it creates a network interface, mounts, \
             cgroups and iptables rules (kubelet, containerd, kube-proxy)"
        );
    }
    if let Some(info) = running() {
        eprintln!("cluster: already running ({})", info.server);
        return Ok(info);
    }
    if p.run.exists() {
        eprintln!(
            "cluster: a stopped or partial cluster is left in {}; cleaning it up first",
            p.run.display()
        );
        down()?;
    }
    ensure_debian_packages(crate::setup::CLUSTER_PACKAGES)?;
    let node_link = preflight()?;
    ensure_binaries(&p)?;
    let pause = ensure_pause_image(&p)?;
    eprintln!(
        "cluster: starting (binaries ready after {:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    let result = start(&p, &pause, node_link);
    if let Err(e) = result {
        eprintln!("cluster: start failed; removing what was started");
        if let Err(e2) = down() {
            eprintln!("cluster: cleanup after the failed start also failed: {e2:#}");
        }
        return Err(e);
    }
    eprintln!(
        "cluster: node {NODE_NAME} Ready after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(p.info())
}

/// Checks the kernel and the ports before anything is started, so a failure names its reason.
/// Returns the link type for the node address.
fn preflight() -> anyhow::Result<&'static str> {
    let filesystems = std::fs::read_to_string("/proc/filesystems").context("reading /proc/filesystems")?;
    if !filesystems.contains("\toverlay") {
        bail!("the kernel has no overlay file system (containerd's snapshotter needs CONFIG_OVERLAY_FS)");
    }
    if !Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
        && !Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
    {
        bail!("no memory cgroup controller mounted under /sys/fs/cgroup (kubelet needs it)");
    }
    if !Path::new("/dev/kmsg").exists() {
        bail!("/dev/kmsg is missing (kubelet's OOM watcher reads it)");
    }
    if !succeeds(Command::new("iptables").args(["-w", "-t", "nat", "-S"])) {
        bail!("`iptables -t nat -S` fails: the kernel lacks the nat table (kube-proxy and CNI portmap need it)");
    }
    // Probe the link types by creating throw-away ones, so a failure names the missing module.
    // The node address goes on a dummy interface, or on a port-less bridge where the kernel has
    // no dummy driver (this VM's): either way it is a local address that routes nowhere.
    let probe = |kind: &str| -> anyhow::Result<Result<(), String>> {
        let out = Command::new("ip")
            .args(["link", "add", "gw-probe0", "type", kind])
            .output()
            .context("running ip (iproute2)")?;
        if !out.status.success() {
            return Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        let _ = succeeds(Command::new("ip").args(["link", "del", "gw-probe0"]));
        Ok(Ok(()))
    };
    if let Err(why) = probe("bridge")? {
        bail!(
            "cannot create a bridge interface ({why}); the kernel lacks CONFIG_BRIDGE (the CNI bridge plugin needs it)"
        );
    }
    let node_link = if probe("dummy")?.is_ok() { "dummy" } else { "bridge" };
    if Path::new("/sys/class/net").join(NODE_NAME).exists() || Path::new("/sys/class/net").join(BRIDGE).exists() {
        bail!(
            "interface {NODE_NAME} or {BRIDGE} already exists but no cluster is recorded; \
             remove it (`ip link del ...`) or run `cargo xtask cluster down`"
        );
    }
    for (port, what) in [
        (ETCD_PORT, "etcd"),
        (ETCD_PEER_PORT, "etcd peer"),
        (API_PORT, "kube-apiserver"),
        (KUBELET_PORT, "kubelet"),
        (KUBELET_HEALTHZ_PORT, "kubelet healthz"),
        (PROXY_HEALTHZ_PORT, "kube-proxy healthz"),
        (PROXY_METRICS_PORT, "kube-proxy metrics"),
    ] {
        // The wildcard bind fails if any address of this port has a listener.
        if let Err(e) = TcpListener::bind(("0.0.0.0", port)) {
            bail!("port {port} ({what}) is in use: {e}; stop whatever listens there (`ss -ltnp 'sport = {port}'`)");
        }
    }
    Ok(node_link)
}

/// kubelet, kube-controller-manager, kube-scheduler and kube-proxy from the kube-apiserver's
/// prepared source tree (same Go toolchain and env), cached next to it.
fn ensure_binaries(p: &Paths) -> anyhow::Result<()> {
    crate::k8s::ensure_apiserver()?;
    if BUILT.iter().all(|b| p.bin.join(b).exists()) {
        return Ok(());
    }
    let src = crate::k8s::source_dir();
    if !src.join("Makefile").exists() {
        bail!(
            "the kubernetes source tree {} is gone; remove {} and run `cargo xtask k8s build` to fetch it again",
            src.display(),
            kit::apiserver_binary().display()
        );
    }
    eprintln!("cluster: building kubelet, controller-manager, scheduler, kube-proxy (~2 min after the apiserver)");
    let what: Vec<String> = BUILT.iter().map(|b| format!("cmd/{b}")).collect();
    crate::k8s::make(&src, &what.join(" "))?;
    std::fs::create_dir_all(&p.bin)?;
    for b in BUILT {
        let built = src.join("_output/bin").join(b);
        // A partial name first, so an interrupted copy never looks like a cached binary.
        let tmp = p.bin.join(format!("{b}.partial"));
        std::fs::copy(&built, &tmp).with_context(|| format!("copying {}", built.display()))?;
        std::fs::rename(&tmp, p.bin.join(b))?;
    }
    Ok(())
}

/// The pause image as a docker-archive, built once: there is no registry to pull it from.
fn ensure_pause_image(p: &Paths) -> anyhow::Result<PathBuf> {
    let archive = p.images.join("pause-3.4.1.tar");
    if archive.exists() {
        return Ok(archive);
    }
    let work = p.images.join("pause-rootfs");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let src = crate::k8s::source_dir().join("build/pause/linux/pause.c");
    run_cmd(
        Command::new("gcc")
            .args(["-Os", "-Wall", "-Werror", "-static", "-DVERSION=v3.4.1"])
            .arg("-o")
            .arg(work.join("pause"))
            .arg(&src),
    )
    .context("compiling pause.c (needs gcc and libc6-dev)")?;
    let partial = p.images.join("pause-3.4.1.tar.partial");
    crate::oci::build_scratch(
        &crate::oci::ScratchImage {
            tag: PAUSE_IMAGE,
            rootfs: &work,
            entrypoint: &["/pause"],
            user: Some("65535:65535"),
            labels: &[],
        },
        &partial,
    )?;
    std::fs::rename(&partial, &archive)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(archive)
}

fn start(p: &Paths, pause: &Path, node_link: &str) -> anyhow::Result<()> {
    let t0 = Instant::now();
    std::fs::create_dir_all(p.run.join("pki"))?;
    // Private keys and kubeconfigs with client keys live here: owner only.
    std::fs::set_permissions(&p.run, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    record_host_state(p)?;
    // The node address.
    run_cmd(Command::new("ip").args(["link", "add", NODE_NAME, "type", node_link]))?;
    run_cmd(Command::new("ip").args(["addr", "add", &format!("{NODE_IP}/32"), "dev", NODE_NAME]))?;
    run_cmd(Command::new("ip").args(["link", "set", NODE_NAME, "up"]))?;

    gen_pki(&p.run.join("pki"))?;
    for (who, cert) in [
        ("admin", "admin"),
        ("kube-controller-manager", "kube-controller-manager"),
        ("kube-scheduler", "kube-scheduler"),
        ("kube-proxy", "kube-proxy"),
        ("kubelet", "kubelet"),
    ] {
        write_kubeconfig(p, who, cert)?;
    }
    write_containerd_config(p)?;
    write_kubelet_config(p)?;

    spawn(
        p,
        "etcd",
        Command::new(kit::etcd_binary()).args(kit::etcd_args(&p.run, ETCD_PORT, ETCD_PEER_PORT)),
    )?;
    spawn(
        p,
        "kube-apiserver",
        Command::new(p.bin_of("kube-apiserver")).args(apiserver_args(p)),
    )?;
    // containerd does not need the apiserver: start it while the apiserver comes up.
    spawn(
        p,
        "containerd",
        Command::new("containerd")
            .arg("--config")
            .arg(p.run.join("containerd/config.toml")),
    )?;
    wait_for(
        p,
        "the apiserver's /readyz",
        Duration::from_secs(90),
        &["etcd", "kube-apiserver"],
        || {
            kubectl(p)
                .args(["get", "--raw", "/readyz"])
                .output()
                .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"ok"))
        },
    )?;
    eprintln!("cluster: apiserver ready after {:.1} s", t0.elapsed().as_secs_f64());

    wait_for(
        p,
        "containerd's socket",
        Duration::from_secs(30),
        &["containerd"],
        || succeeds(ctr(p).arg("version")),
    )?;
    import_image(&p.containerd_socket(), pause)?;
    for archive in project_images()? {
        import_image(&p.containerd_socket(), &archive)?;
    }
    eprintln!(
        "cluster: containerd ready, images imported after {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let pki = |f: &str| p.pki(f).display().to_string();
    spawn(
        p,
        "kube-controller-manager",
        Command::new(p.bin_of("kube-controller-manager")).args([
            format!("--kubeconfig={}", p.kubeconfig("kube-controller-manager").display()),
            "--leader-elect=false".into(),
            "--port=0".into(),
            "--secure-port=0".into(),
            "--controllers=*,-nodeipam".into(),
            "--use-service-account-credentials=true".into(),
            format!("--service-account-private-key-file={}", pki("sa.key")),
            format!("--root-ca-file={}", pki("ca.crt")),
            format!("--cluster-signing-cert-file={}", pki("ca.crt")),
            format!("--cluster-signing-key-file={}", pki("ca.key")),
            format!("--cert-dir={}", pki("generated")),
            format!("--feature-gates={FEATURE_GATES}"),
        ]),
    )?;
    spawn(
        p,
        "kube-scheduler",
        Command::new(p.bin_of("kube-scheduler")).args([
            format!("--kubeconfig={}", p.kubeconfig("kube-scheduler").display()),
            "--leader-elect=false".into(),
            "--port=0".into(),
            "--secure-port=0".into(),
            format!("--cert-dir={}", pki("generated")),
        ]),
    )?;
    let sock = format!("unix://{}", p.containerd_socket().display());
    let kubelet_dir = p.run.join("kubelet");
    spawn(
        p,
        "kubelet",
        Command::new(p.bin_of("kubelet")).args([
            format!("--config={}", kubelet_dir.join("config.yaml").display()),
            format!("--kubeconfig={}", p.kubeconfig("kubelet").display()),
            "--container-runtime=remote".into(),
            format!("--container-runtime-endpoint={sock}"),
            format!("--image-service-endpoint={sock}"),
            format!("--root-dir={}", kubelet_dir.join("root").display()),
            // Both default to /var/lib/kubelet/... whatever --root-dir says.
            format!("--cert-dir={}", kubelet_dir.join("pki").display()),
            format!("--seccomp-profile-root={}", kubelet_dir.join("seccomp").display()),
            format!("--hostname-override={NODE_NAME}"),
            format!("--node-ip={NODE_IP}"),
            format!("--pod-infra-container-image={PAUSE_IMAGE}"),
        ]),
    )?;
    spawn(
        p,
        "kube-proxy",
        Command::new(p.bin_of("kube-proxy")).args([
            format!("--kubeconfig={}", p.kubeconfig("kube-proxy").display()),
            format!("--hostname-override={NODE_NAME}"),
            format!("--bind-address={NODE_IP}"),
            "--proxy-mode=iptables".into(),
            format!("--cluster-cidr={CLUSTER_CIDR}"),
            format!("--healthz-bind-address=127.0.0.1:{PROXY_HEALTHZ_PORT}"),
            format!("--metrics-bind-address=127.0.0.1:{PROXY_METRICS_PORT}"),
            // 0 = leave the host's conntrack table settings alone.
            "--conntrack-max-per-core=0".into(),
            "--conntrack-tcp-timeout-established=0".into(),
            "--conntrack-tcp-timeout-close-wait=0".into(),
            // Negative values need CAP_SYS_RESOURCE, which this sandbox lacks.
            "--oom-score-adj=0".into(),
        ]),
    )?;

    wait_for(p, "the Node to be Ready", Duration::from_secs(180), &COMPONENTS, || {
        node_ready(p).as_deref() == Some("True")
    })?;
    // Pods in `default` are rejected until the controller-manager created its ServiceAccount.
    wait_for(
        p,
        "the default ServiceAccount",
        Duration::from_secs(60),
        &COMPONENTS,
        || succeeds(kubectl(p).args(["get", "serviceaccount", "default", "-n", "default"])),
    )?;
    Ok(())
}

/// Records what `down` must restore: sysctl values and which host paths already existed.
fn record_host_state(p: &Paths) -> anyhow::Result<()> {
    let mut sysctls = String::new();
    for s in SYSCTLS {
        if let Ok(v) = std::fs::read_to_string(Path::new("/proc/sys").join(s)) {
            sysctls.push_str(&format!("{s}={}\n", v.trim()));
        }
    }
    std::fs::write(p.run.join("sysctl.saved"), sysctls)?;
    let existing: Vec<&str> = HOST_PATHS.iter().copied().filter(|h| Path::new(h).exists()).collect();
    let mut text = existing.join("\n");
    for ctl in cgroup_controllers() {
        if ctl.join("kubepods").exists() {
            text.push_str(&format!("\n{}", ctl.join("kubepods").display()));
        }
    }
    std::fs::write(p.run.join("host-paths.existing"), text)?;
    Ok(())
}

fn apiserver_args(p: &Paths) -> Vec<String> {
    let pki = |f: &str| p.pki(f).display().to_string();
    vec![
        format!("--etcd-servers=http://127.0.0.1:{ETCD_PORT}"),
        format!("--bind-address={NODE_IP}"),
        format!("--advertise-address={NODE_IP}"),
        format!("--secure-port={API_PORT}"),
        "--insecure-port=0".into(),
        format!("--tls-cert-file={}", pki("apiserver.crt")),
        format!("--tls-private-key-file={}", pki("apiserver.key")),
        format!("--client-ca-file={}", pki("ca.crt")),
        "--authorization-mode=Node,RBAC".into(),
        "--enable-admission-plugins=NodeRestriction".into(),
        format!("--service-account-issuer={SA_ISSUER}"),
        format!("--service-account-signing-key-file={}", pki("sa.key")),
        format!("--service-account-key-file={}", pki("sa.pub")),
        format!("--api-audiences={SA_ISSUER}"),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        format!("--kubelet-client-certificate={}", pki("apiserver-kubelet-client.crt")),
        format!("--kubelet-client-key={}", pki("apiserver-kubelet-client.key")),
        "--kubelet-preferred-address-types=InternalIP".into(),
        // The agent DaemonSet runs privileged-capable pods.
        "--allow-privileged=true".into(),
        format!("--feature-gates={FEATURE_GATES}"),
        format!("--cert-dir={}", pki("generated")),
    ]
}

/// A CA, the apiserver's serving certificate, one client certificate per component (their
/// RBAC identities) and the ServiceAccount signing key (the testkit's one generator).
fn gen_pki(dir: &Path) -> anyhow::Result<()> {
    let pki = kit::Pki::create(dir, "/CN=graywatch-cluster-ca")?;
    let node_ip = format!("IP:{NODE_IP}");
    let service_ip = format!("IP:{SERVICE_IP}");
    pki.sign(
        "apiserver",
        "/CN=kube-apiserver",
        kit::Usage::Server,
        &[
            "IP:127.0.0.1",
            &service_ip,
            &node_ip,
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
        ],
    )?;
    let node_subject = format!("/O=system:nodes/CN=system:node:{NODE_NAME}");
    for (name, subject) in [
        ("admin", "/O=system:masters/CN=graywatch-admin"),
        ("kube-controller-manager", "/CN=system:kube-controller-manager"),
        ("kube-scheduler", "/CN=system:kube-scheduler"),
        ("kube-proxy", "/CN=system:kube-proxy"),
        ("kubelet", &node_subject),
        (
            "apiserver-kubelet-client",
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
        ),
    ] {
        pki.sign(name, subject, kit::Usage::Client, &[])?;
    }
    pki.service_account_keys()
}

fn write_kubeconfig(p: &Paths, who: &str, cert: &str) -> anyhow::Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: graywatch\n  cluster:\n    server: {}\n    \
         certificate-authority: {}\nusers:\n- name: {who}\n  user:\n    client-certificate: {}\n    \
         client-key: {}\ncontexts:\n- name: graywatch\n  context: {{cluster: graywatch, user: {who}}}\n\
         current-context: graywatch\n",
        server(),
        p.pki("ca.crt").display(),
        p.pki(&format!("{cert}.crt")).display(),
        p.pki(&format!("{cert}.key")).display(),
    );
    let path = p.kubeconfig(who);
    std::fs::write(&path, text)?;
    // helm and kubectl warn about group/world-readable kubeconfigs.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(())
}

/// containerd with every directory private, runc behind the oom_score_adj clamp, CNI from Debian.
fn write_containerd_config(p: &Paths) -> anyhow::Result<()> {
    let dir = p.run.join("containerd");
    let cni = p.run.join("cni");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(cni.join("net.d"))?;
    // This sandbox lacks CAP_SYS_RESOURCE: the kubelet's -998 for sandboxes (and negative values
    // for Guaranteed pods) cannot be written, and runc dies with "can't get final child's PID
    // from pipe". The wrapper clamps them to 0 in the bundle and runs runc; test harness only.
    let wrapper = dir.join("runc-wrapper");
    std::fs::write(
        &wrapper,
        r#"#!/bin/sh
prev=
for a in "$@"; do
  case "$prev" in
    --bundle|-b) f="$a/config.json"; [ -f "$f" ] && sed -i -E 's/"oomScoreAdj": *-[0-9]+/"oomScoreAdj":0/' "$f" ;;
    --process|-p) [ -f "$a" ] && sed -i -E 's/"oomScoreAdj": *-[0-9]+/"oomScoreAdj":0/' "$a" ;;
  esac
  prev="$a"
done
exec /usr/bin/runc "$@"
"#,
    )?;
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let d = |s: &str| dir.join(s).display().to_string();
    let config = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
oom_score = 0

[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Sandbox network namespaces under the state dir, not /var/run/netns, so `down` finds them.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{wrapper}"
        Root = "{runc_root}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{conf_dir}"
    max_conf_num = 1
"#,
        root = d("root"),
        state = d("state"),
        sock = p.containerd_socket().display(),
        opt = d("opt"),
        wrapper = wrapper.display(),
        runc_root = d("runc"),
        conf_dir = cni.join("net.d").display(),
    );
    std::fs::write(dir.join("config.toml"), config)?;
    let conflist = serde_json::json!({
        "cniVersion": "0.4.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": POD_CIDR }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": cni.join("ipam").display().to_string(),
                }
            },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    });
    std::fs::write(
        cni.join("net.d/10-graywatch.conflist"),
        serde_json::to_string_pretty(&conflist)?,
    )?;
    Ok(())
}

fn write_kubelet_config(p: &Paths) -> anyhow::Result<()> {
    let dir = p.run.join("kubelet");
    std::fs::create_dir_all(&dir)?;
    let config = format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: {KUBELET_PORT}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {KUBELET_HEALTHZ_PORT}
cgroupDriver: cgroupfs
failSwapOn: false
enforceNodeAllocatable: []
oomScoreAdj: 0
clusterDomain: cluster.local
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: AlwaysAllow}}
# Imported images cannot be pulled again: never garbage-collect them, never evict for disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
volumePluginDir: {plugins}
serializeImagePulls: false
runtimeRequestTimeout: 5m
# The first status after registration is NotReady (PLEG not yet run); the default 10 s until
# the next one is most of a warm `up`.
nodeStatusUpdateFrequency: 2s
"#,
        ca = p.pki("ca.crt").display(),
        plugins = dir.join("volume-plugins").display(),
    );
    std::fs::write(dir.join("config.yaml"), config)?;
    Ok(())
}

/// Docker archives written by `cargo xtask image` (target/images/*.tar).
pub fn project_images() -> anyhow::Result<Vec<PathBuf>> {
    let dir = workspace_root().join("target/images");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for e in entries {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "tar") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Imports a docker archive into the cluster's containerd (namespace k8s.io, where CRI looks).
pub fn import_image(socket: &Path, archive: &Path) -> anyhow::Result<()> {
    run_cmd(
        Command::new("ctr")
            .args(["-n", "k8s.io", "-a"])
            .arg(socket)
            .args(["images", "import"])
            .arg(archive),
    )
    .with_context(|| format!("importing {} into containerd", archive.display()))
}

fn ctr(p: &Paths) -> Command {
    let mut c = Command::new("ctr");
    c.args(["-n", "k8s.io", "-a"]).arg(p.containerd_socket());
    c
}

fn kubectl(p: &Paths) -> Command {
    let mut c = Command::new("kubectl");
    c.arg("--kubeconfig").arg(p.kubeconfig("admin"));
    c
}

fn node_ready(p: &Paths) -> Option<String> {
    let out = kubectl(p)
        .args([
            "get",
            "node",
            NODE_NAME,
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Starts a component in its own process group (a Ctrl-C of `up` must not take it down), logging
/// to run/<name>.log, and records its pid.
fn spawn(p: &Paths, name: &str, cmd: &mut Command) -> anyhow::Result<()> {
    cmd.process_group(0);
    let child = kit::spawn_logged(cmd, &p.log(name)).with_context(|| format!("starting {}", describe(cmd)))?;
    std::fs::write(p.pid_file(name), child.id().to_string())?;
    Ok(())
}

/// Polls `ready` until it holds, failing early (with the log tail) when a watched component exits.
fn wait_for(
    p: &Paths,
    what: &str,
    timeout: Duration,
    watch: &[&str],
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        for c in watch {
            if component_pid(p, c).is_none() {
                bail!(
                    "{c} exited while waiting for {what}; {}:\n{}",
                    p.log(c).display(),
                    log_tail(p, c)
                );
            }
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn log_tail(p: &Paths, name: &str) -> String {
    let text = std::fs::read_to_string(p.log(name)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The pid of a live component (checked against its command line, in case the pid was reused).
fn component_pid(p: &Paths, name: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(p.pid_file(name)).ok()?.trim().parse().ok()?;
    let exe = p.bin_of(name);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = cmdline.split(|&b| b == 0).next()?;
    let matches = Path::new(std::str::from_utf8(argv0).ok()?).file_name() == exe.file_name();
    (matches && !is_zombie(pid)).then_some(pid)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true)
}

fn process_gone(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid)
}

/// SIGTERM, up to `grace` to exit, then SIGKILL.
fn stop_pid(pid: i32, grace: Duration) {
    // SAFETY: kill(2) on a pid this tool recorded or found; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while !process_gone(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !process_gone(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !process_gone(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn status() -> anyhow::Result<()> {
    let p = Paths::new();
    let mut alive = 0;
    for c in COMPONENTS {
        match component_pid(&p, c) {
            Some(pid) => {
                alive += 1;
                println!("  {c:<24} running (pid {pid})");
            }
            None => println!("  {c:<24} not running"),
        }
    }
    if alive == 0 {
        println!("cluster: down");
        return Ok(());
    }
    let ready = node_ready(&p).unwrap_or_else(|| "unknown (apiserver unreachable)".into());
    println!("  node {NODE_NAME:<19} Ready={ready}");
    if alive == COMPONENTS.len() {
        println!("cluster: up at {}", server());
    } else {
        println!(
            "cluster: degraded ({alive}/{} components); `cargo xtask cluster down` cleans it up",
            COMPONENTS.len()
        );
    }
    println!("export KUBECONFIG={}", p.kubeconfig("admin").display());
    Ok(())
}

/// Stops everything and removes every trace of the cluster. Safe to run at any time.
pub fn down() -> anyhow::Result<()> {
    let p = Paths::new();
    if !is_root() {
        bail!("`cargo xtask cluster down` must run as root (it removes interfaces, mounts and iptables rules)");
    }
    let run = p.run.display().to_string();
    // The node agents first, so nothing restarts pods while they are torn down.
    for c in ["kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager"] {
        if let Some(pid) = component_pid(&p, c) {
            stop_pid(pid, Duration::from_secs(10));
        }
    }
    // Deleting the tasks through containerd lets the shims exit cleanly (removing their sockets
    // under /run/containerd/s, which is hard-coded).
    if component_pid(&p, "containerd").is_some()
        && let Ok(out) = ctr(&p).args(["tasks", "ls", "-q"]).output()
    {
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = succeeds(ctr(&p).args(["tasks", "kill", "-a", "-s", "SIGKILL", id]));
        }
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = succeeds(ctr(&p).args(["tasks", "delete", "-f", id]));
        }
    }
    for c in ["containerd", "kube-apiserver", "etcd"] {
        if let Some(pid) = component_pid(&p, c) {
            stop_pid(pid, Duration::from_secs(10));
        }
    }
    // Whatever is left: shims and containers (found by their command line naming our directory,
    // their descendants, and the pod cgroups).
    let leftovers = leftover_processes(&run);
    if !leftovers.is_empty() {
        eprintln!("cluster: killing {} leftover processes", leftovers.len());
        for pid in &leftovers {
            // SAFETY: kill(2) on a pid that belongs to this cluster; no memory is involved.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while leftovers.iter().any(|&pid| !process_gone(pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let mut problems = Vec::new();
    if let Err(e) = unmount_under(&p.run) {
        problems.push(format!("{e:#}"));
    }
    delete_links();
    // kube-proxy's own cleanup first (it knows its rules), then every KUBE-/CNI- chain that kubelet
    // and the CNI plugins (bridge ipMasq, portmap) left.
    let proxy = p.bin_of("kube-proxy");
    if proxy.exists() && p.run.exists() {
        let _ = Command::new(&proxy)
            .arg("--cleanup")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    sweep_iptables();
    let existing = std::fs::read_to_string(p.run.join("host-paths.existing")).ok();
    if let Some(existing) = &existing {
        let existing: BTreeSet<&str> = existing.lines().collect();
        remove_cgroups(&existing);
        for h in HOST_PATHS {
            if !existing.contains(h)
                && Path::new(h).exists()
                && let Err(e) = std::fs::remove_dir_all(h)
            {
                problems.push(format!("removing {h}: {e}"));
            }
        }
    }
    restore_sysctls(&p);
    if p.run.exists()
        && let Err(e) = std::fs::remove_dir_all(&p.run)
    {
        problems.push(format!("removing {}: {e}", p.run.display()));
    }
    if !problems.is_empty() {
        bail!("cluster: down left something behind:\n  {}", problems.join("\n  "));
    }
    eprintln!("cluster: down");
    Ok(())
}

/// Pids whose command line names `dir` (containerd shims), their descendants, and every process
/// in a kubepods cgroup.
fn leftover_processes(dir: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut parent: BTreeMap<i32, i32> = BTreeMap::new();
    let mut roots = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Some(ppid) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.split(' ').nth(1)?.parse().ok()))
        {
            parent.insert(pid, ppid);
        }
        if std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(dir)) {
            roots.insert(pid);
        }
    }
    for ctl in cgroup_controllers() {
        collect_cgroup_procs(&ctl.join("kubepods"), &mut roots);
    }
    // Add descendants until nothing changes.
    let mut all = roots;
    loop {
        let before = all.len();
        for (&pid, ppid) in &parent {
            if all.contains(ppid) {
                all.insert(pid);
            }
        }
        if all.len() == before {
            break;
        }
    }
    all.remove(&me);
    all.into_iter().filter(|&pid| !process_gone(pid)).collect()
}

fn cgroup_controllers() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default()
}

fn collect_cgroup_procs(dir: &Path, out: &mut BTreeSet<i32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                collect_cgroup_procs(&e.path(), out);
            }
        }
    }
}

/// rmdir the kubepods cgroup trees (deepest first) that did not exist before `up`.
fn remove_cgroups(existing: &BTreeSet<&str>) {
    fn rmdir_tree(dir: &Path) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.path().is_dir() {
                    rmdir_tree(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    for ctl in cgroup_controllers() {
        let k = ctl.join("kubepods");
        if k.exists() && !existing.contains(k.to_string_lossy().as_ref()) {
            rmdir_tree(&k);
        }
    }
}

/// Mount points under `dir`, deepest first (from /proc/self/mountinfo, octal escapes decoded).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mount(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    out.dedup();
    out
}

fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unmount_under(dir: &Path) -> anyhow::Result<()> {
    // Stacked and propagated mounts can need more than one pass.
    for _ in 0..10 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return Ok(());
        }
        for m in mounts {
            let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: umount2 with a valid NUL-terminated path.
            if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
                // Busy (a process still holds it): detach it; it goes with the last user.
                // SAFETY: as above.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
    let left = mounts_under(dir);
    if left.is_empty() {
        Ok(())
    } else {
        bail!("mounts left under {}: {left:?}", dir.display())
    }
}

fn delete_links() {
    // veths of pods whose network namespace is gone disappear by themselves; any still attached
    // to the bridge are removed explicitly.
    if let Ok(rd) = std::fs::read_dir(Path::new("/sys/class/net").join(BRIDGE).join("brif")) {
        for e in rd.flatten() {
            let _ = succeeds(Command::new("ip").args(["link", "del"]).arg(e.file_name()));
        }
    }
    for link in [BRIDGE, NODE_NAME] {
        if Path::new("/sys/class/net").join(link).exists() {
            let _ = succeeds(Command::new("ip").args(["link", "del", link]));
        }
    }
}

fn is_our_chain(chain: &str) -> bool {
    chain.starts_with("KUBE-") || chain.starts_with("CNI-")
}

/// Removes every KUBE-* and CNI-* chain and the rules jumping to them, rule by rule (not a
/// save/restore of whole tables, which would race with other users of the firewall).
fn sweep_iptables() {
    for tool in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle", "raw"] {
            let Ok(out) = Command::new(tool).args(["-w", "-t", table, "-S"]).output() else {
                continue;
            };
            if !out.status.success() {
                continue;
            }
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let mut ours = Vec::new();
            for line in text.lines() {
                let words = split_words(line);
                match words.first().map(String::as_str) {
                    Some("-N") if words.len() > 1 && is_our_chain(&words[1]) => ours.push(words[1].clone()),
                    Some("-A") if words.len() > 1 && !is_our_chain(&words[1]) => {
                        let jumps = words
                            .windows(2)
                            .any(|w| (w[0] == "-j" || w[0] == "-g") && is_our_chain(&w[1]));
                        if jumps {
                            let _ = succeeds(Command::new(tool).args(["-w", "-t", table, "-D"]).args(&words[1..]));
                        }
                    }
                    _ => {}
                }
            }
            for chain in &ours {
                let _ = succeeds(Command::new(tool).args(["-w", "-t", table, "-F", chain]));
            }
            for chain in &ours {
                let _ = succeeds(Command::new(tool).args(["-w", "-t", table, "-X", chain]));
            }
        }
    }
}

/// Splits an `iptables -S` line into arguments (double quotes group, backslash escapes).
fn split_words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut has = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    has = true;
                }
            }
            '"' => {
                in_quotes = !in_quotes;
                has = true;
            }
            ' ' if !in_quotes => {
                if has {
                    out.push(std::mem::take(&mut cur));
                    has = false;
                }
            }
            c => {
                cur.push(c);
                has = true;
            }
        }
    }
    if has {
        out.push(cur);
    }
    out
}

fn restore_sysctls(p: &Paths) {
    let Ok(text) = std::fs::read_to_string(p.run.join("sysctl.saved")) else {
        return;
    };
    for line in text.lines() {
        if let Some((name, value)) = line.split_once('=') {
            let path = Path::new("/proc/sys").join(name);
            if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() != value) {
                let _ = std::fs::write(&path, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_words_keep_quoted_comments() {
        let w = split_words(r#"-A KUBE-SERVICES -m comment --comment "kubernetes service portals" -j KUBE-SVC-X"#);
        assert_eq!(w[4], "--comment");
        assert_eq!(w[5], "kubernetes service portals");
        assert_eq!(w.last().map(String::as_str), Some("KUBE-SVC-X"));
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mount(r"/a\040b/c"), "/a b/c");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }
}
