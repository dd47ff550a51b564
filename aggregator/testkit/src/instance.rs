//! The async side: one running etcd + kube-apiserver per test.

use std::{
    process::Child,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::*;

/// A running etcd + kube-apiserver. Both processes are killed and the data removed on drop.
pub struct TestApiserver {
    dir: PathBuf,
    etcd: Child,
    apiserver: Child,
    port: u16,
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);

impl TestApiserver {
    /// Starts a fresh instance and waits for `/readyz`.
    ///
    /// Returns `Ok(None)` only when the binary is missing and `GRAYWATCH_SKIP_K8S=1` is set
    /// (and `GRAYWATCH_REQUIRE_K8S` is not); a missing binary is otherwise an error naming the
    /// build command.
    pub async fn start() -> anyhow::Result<Option<Self>> {
        let bin = apiserver_binary();
        let etcd = etcd_binary();
        if !bin.exists() || !etcd.exists() {
            let msg = format!(
                "kube-apiserver ({}) or etcd ({}) is missing. Build it once with `{BUILD_COMMAND}` \
                 (as root: installs etcd-server and golang-1.19-go from Debian, ~4 min on 2 cores)",
                bin.display(),
                etcd.display()
            );
            let skip = std::env::var("GRAYWATCH_SKIP_K8S").is_ok_and(|v| v == "1")
                && !std::env::var("GRAYWATCH_REQUIRE_K8S").is_ok_and(|v| v == "1");
            if skip {
                eprintln!("SKIPPING real-apiserver test (GRAYWATCH_SKIP_K8S=1): {msg}");
                return Ok(None);
            }
            bail!(msg);
        }
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("graywatch-k8s-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pki")).with_context(|| format!("creating {}", dir.display()))?;
        gen_pki(&dir.join("pki"))?;
        let [api_port, etcd_port, peer_port] = free_ports()?;
        write_kubeconfig(&dir, api_port)?;
        let etcd_child = spawn_logged(
            Command::new(&etcd).args(etcd_args(&dir, etcd_port, peer_port)),
            &dir.join("etcd.log"),
        )
        .context("starting etcd")?;
        let api_child = match spawn_logged(
            Command::new(&bin).args(apiserver_args(&dir, api_port, etcd_port)),
            &dir.join("kube-apiserver.log"),
        ) {
            Ok(c) => c,
            Err(e) => {
                let mut etcd_child = etcd_child;
                let _ = etcd_child.kill();
                return Err(e.context("starting kube-apiserver"));
            }
        };
        let mut me = Self {
            dir,
            etcd: etcd_child,
            apiserver: api_child,
            port: api_port,
        };
        me.wait_ready().await?;
        Ok(Some(me))
    }

    /// `https://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A kubeconfig file for this instance (static token, its own CA).
    #[must_use]
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// A kube client for this instance.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let kc = Kubeconfig::read_from(self.kubeconfig_path())?;
        let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(cfg)?)
    }

    /// Creates the Karpenter (NodePool, NodeClaim) and NRC (NodeReadinessRule) CRDs with POST
    /// (server-side apply of these CRDs fails on 1.20) and waits until they are Established.
    pub async fn install_crds(&self) -> anyhow::Result<()> {
        let client = self.client().await?;
        for crd in [KARPENTER_NODEPOOL_CRD, KARPENTER_NODECLAIM_CRD, NRC_RULE_CRD] {
            let req = kube::api::Request::new("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
                .create(&kube::api::PostParams::default(), crd.as_bytes().to_vec())?;
            let (mut parts, body) = req.into_parts();
            parts.headers.insert(
                "content-type",
                "application/yaml".parse().context("content-type header")?,
            );
            client.request_text(http::Request::from_parts(parts, body)).await?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for name in [
            "nodepools.karpenter.sh",
            "nodeclaims.karpenter.sh",
            "nodereadinessrules.readiness.node.x-k8s.io",
        ] {
            loop {
                let path = format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}");
                let v: serde_json::Value = client
                    .request(http_get(&path)?)
                    .await
                    .with_context(|| format!("reading CRD {name}"))?;
                let established = v["status"]["conditions"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Established" && c["status"] == "True"));
                if established {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("CRD {name} not Established within 30 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = self.client().await?;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(text) = client.request_text(http_get("/readyz")?).await
                && text.trim() == "ok"
            {
                return Ok(());
            }
            for name in ["etcd", "kube-apiserver"] {
                let child = if name == "etcd" {
                    &mut self.etcd
                } else {
                    &mut self.apiserver
                };
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "{name} exited with {status} before the apiserver was ready; log tail:\n{}",
                        self.log_tail(name)
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "apiserver not ready within 90 s; log tail:\n{}",
                    self.log_tail("kube-apiserver")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of a process log (`etcd` or `kube-apiserver`).
    #[must_use]
    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for TestApiserver {
    fn drop(&mut self) {
        let _ = self.apiserver.kill();
        let _ = self.apiserver.wait();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn http_get(path: &str) -> anyhow::Result<http::Request<Vec<u8>>> {
    Ok(http::Request::get(path).body(Vec::new())?)
}
