//! The one test kit: a real etcd + kube-apiserver per test, on loopback, killed on drop
//! ([`TestApiserver`] with a kube client, [`Instance`] blocking), with options
//! ([`ApiserverOptions`]: RBAC), the one certificate generator ([`Pki`]) and builders for Nodes
//! ([`NodeBuilder`]) and agent reports ([`ReportBuilder`]).
//!
//! The apiserver is v1.20.2 built from Debian's `kubernetes` source package by
//! `cargo xtask k8s build` and cached under `~/.cache/graywatch/k8s/v1.20.2/bin` (override with
//! `GRAYWATCH_KUBE_APISERVER` or `GRAYWATCH_CACHE`); etcd is Debian's `etcd-server`. Each instance
//! gets its own ports, data directory, CA and static bearer token. If the binary is missing the
//! start fails loudly with the exact command to build it; `GRAYWATCH_SKIP_K8S=1` turns that into a
//! loud skip (ignored when `GRAYWATCH_REQUIRE_K8S=1`, which `cargo xtask test` sets).

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

#[cfg(feature = "client")]
mod client;
mod launch;
pub mod node;
mod pki;
mod report;
#[cfg(feature = "client")]
pub use client::TestApiserver;
pub use launch::Instance;
pub use node::NodeBuilder;
pub use pki::{Pki, Usage};
pub use report::ReportBuilder;

/// The Kubernetes version the tests run against (the Debian bookworm source package).
pub const K8S_VERSION: &str = "v1.20.2";
/// Bearer token of the `system:masters` user every instance accepts.
pub const TOKEN: &str = "graywatch-test-token";
/// The command that builds the apiserver binary.
pub const BUILD_COMMAND: &str = "cargo xtask k8s build";

/// CRDs the tests install (upstream copies, see crds/SOURCES.md).
pub const KARPENTER_NODEPOOL_CRD: &str = include_str!("../crds/karpenter.sh_nodepools.yaml");
pub const KARPENTER_NODECLAIM_CRD: &str = include_str!("../crds/karpenter.sh_nodeclaims.yaml");
pub const NRC_RULE_CRD: &str = include_str!("../crds/readiness.node.x-k8s.io_nodereadinessrules.yaml");

/// Root of graywatch's cache (`GRAYWATCH_CACHE` or `~/.cache/graywatch`).
#[must_use]
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GRAYWATCH_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/graywatch")
}

/// Directory of everything cached for [`K8S_VERSION`] (apt lists, sources, the binary).
#[must_use]
pub fn k8s_cache_dir() -> PathBuf {
    cache_dir().join("k8s").join(K8S_VERSION)
}

/// Where the built kube-apiserver lives.
#[must_use]
pub fn apiserver_binary() -> PathBuf {
    std::env::var_os("GRAYWATCH_KUBE_APISERVER")
        .map_or_else(|| k8s_cache_dir().join("bin/kube-apiserver"), PathBuf::from)
}

/// Debian's etcd (`etcd-server`), or `ETCD`.
#[must_use]
pub fn etcd_binary() -> PathBuf {
    std::env::var_os("ETCD").map_or_else(|| PathBuf::from("/usr/bin/etcd"), PathBuf::from)
}

/// The etcd command line for a data dir and ports (loopback only).
#[must_use]
pub fn etcd_args(dir: &Path, client_port: u16, peer_port: u16) -> Vec<String> {
    let client = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    vec![
        "--name=test".into(),
        format!("--data-dir={}", dir.join("etcd-data").display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=test={peer}"),
        "--quota-backend-bytes=1073741824".into(),
    ]
}

/// How a test apiserver is set up beyond the common command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApiserverOptions {
    /// `--authorization-mode=RBAC` instead of `AlwaysAllow`: requests are checked against the
    /// bootstrap roles and whatever the test creates (e.g. a chart's ServiceAccount roles).
    pub rbac: bool,
}

impl ApiserverOptions {
    /// RBAC authorization (see [`ApiserverOptions::rbac`]).
    #[must_use]
    pub fn rbac() -> Self {
        Self { rbac: true }
    }
}

/// The kube-apiserver command line (static token, no controllers; `AlwaysAllow` unless `opts`
/// asks for RBAC).
#[must_use]
pub fn apiserver_args(dir: &Path, port: u16, etcd_port: u16, opts: &ApiserverOptions) -> Vec<String> {
    let pki = dir.join("pki");
    let p = |f: &str| pki.join(f).display().to_string();
    let authorization = if opts.rbac { "RBAC" } else { "AlwaysAllow" };
    vec![
        format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
        "--bind-address=127.0.0.1".into(),
        "--advertise-address=127.0.0.1".into(),
        format!("--secure-port={port}"),
        "--insecure-port=0".into(),
        format!("--tls-cert-file={}", p("apiserver.crt")),
        format!("--tls-private-key-file={}", p("apiserver.key")),
        format!("--client-ca-file={}", p("ca.crt")),
        format!("--token-auth-file={}", p("tokens.csv")),
        format!("--authorization-mode={authorization}"),
        "--service-account-issuer=https://kubernetes.default.svc".into(),
        format!("--service-account-key-file={}", p("sa.pub")),
        format!("--service-account-signing-key-file={}", p("sa.key")),
        "--service-cluster-ip-range=10.0.0.0/24".into(),
        "--endpoint-reconciler-type=none".into(),
        "--disable-admission-plugins=ServiceAccount".into(),
        format!("--cert-dir={}", p("generated")),
    ]
}

/// A CA, a serving certificate for 127.0.0.1/localhost, a service-account key pair and the
/// static token file (one [`Pki`]).
pub fn gen_pki(pki: &Path) -> anyhow::Result<()> {
    let ca = Pki::create(pki, "/CN=graywatch-test-ca")?;
    ca.sign(
        "apiserver",
        "/CN=kube-apiserver",
        Usage::Server,
        &["IP:127.0.0.1", "DNS:localhost", "DNS:kubernetes"],
    )?;
    ca.service_account_keys()?;
    std::fs::write(
        pki.join("tokens.csv"),
        format!("{TOKEN},admin,admin-uid,system:masters\n"),
    )?;
    Ok(())
}

/// Writes `<dir>/kubeconfig` pointing at `https://127.0.0.1:<port>` with the static token.
pub fn write_kubeconfig(dir: &Path, port: u16) -> anyhow::Result<()> {
    let ca = dir.join("pki/ca.crt");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: {TOKEN}\ncontexts:\n- name: local\n  context: {{cluster: local, user: admin}}\ncurrent-context: local\n",
        ca.display()
    );
    std::fs::write(dir.join("kubeconfig"), text)?;
    Ok(())
}

/// Three distinct free loopback ports (see [`free_port`]).
pub fn free_ports() -> anyhow::Result<[u16; 3]> {
    Ok([free_port()?, free_port()?, free_port()?])
}

/// The lowest port the kernel hands out to outgoing connections (`ip_local_port_range`).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A port free on every address now, for a server a test starts later.
///
/// Chosen below the kernel's ephemeral range: a port the kernel picked for us (bind to port 0)
/// is released before the server binds it, and in that gap any outgoing connection of the test
/// (to the apiserver, etcd, an agent's stream) may take it as its local port ("Address already
/// in use"). Ports below the range are never given to outgoing connections, so only another
/// explicit bind can take it; each process walks the range from its own offset, and every port
/// handed out is new within the process.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOWEST: u32 = 20_000;
    static HANDED_OUT: AtomicU32 = AtomicU32::new(0);
    let highest = u32::from(ephemeral_low()).min(30_000);
    anyhow::ensure!(
        highest > LOWEST,
        "the ephemeral port range starts at {highest}: no room below it for test servers"
    );
    let span = highest - LOWEST;
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = HANDED_OUT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOWEST + (offset + n) % span)?;
        // 0.0.0.0 conflicts with a bind to any address on the port, loopback included.
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port in {LOWEST}..{highest}")
}

/// Spawns `cmd` with stdout and stderr appended to `log`.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log)?;
    let err = out.try_clone()?;
    Ok(cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn()?)
}

#[cfg(test)]
mod tests {
    use super::{ephemeral_low, free_port};

    /// Every port handed out is new, free, and one the kernel never gives an outgoing connection.
    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().expect("a free port")).collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port handed out twice: {ports:?}");
        let low = ephemeral_low();
        for port in ports {
            assert!(port < low, "port {port} is in the ephemeral range (from {low})");
            let listener = std::net::TcpListener::bind(("127.0.0.1", port));
            assert!(listener.is_ok(), "port {port} cannot be bound: {listener:?}");
        }
    }
}
