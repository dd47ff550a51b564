//! The async side: one running etcd + kube-apiserver per test, with kube clients.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use kube::{
    Api, Client, Config,
    api::{DynamicObject, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    core::{ApiResource, GroupVersionKind},
};
use serde_json::Value;

use crate::{
    ApiserverOptions, KARPENTER_NODECLAIM_CRD, KARPENTER_NODEPOOL_CRD, NRC_RULE_CRD, NodeBuilder,
    launch::{Instance, READY_TIMEOUT},
};

/// A running etcd + kube-apiserver, ready. Both processes are killed and the data removed on drop.
pub struct TestApiserver {
    instance: Instance,
}

impl TestApiserver {
    /// Starts a fresh instance (`AlwaysAllow` authorization) and waits for `/readyz`.
    ///
    /// Returns `Ok(None)` only when the binary is missing and `GRAYWATCH_SKIP_K8S=1` is set
    /// (and `GRAYWATCH_REQUIRE_K8S` is not); a missing binary is otherwise an error naming the
    /// build command.
    pub async fn start() -> anyhow::Result<Option<Self>> {
        Self::start_with(ApiserverOptions::default()).await
    }

    /// Like [`TestApiserver::start`] with `opts` (e.g. [`ApiserverOptions::rbac`]).
    pub async fn start_with(opts: ApiserverOptions) -> anyhow::Result<Option<Self>> {
        if let Some(msg) = Instance::missing_binaries() {
            let skip = std::env::var("GRAYWATCH_SKIP_K8S").is_ok_and(|v| v == "1")
                && !std::env::var("GRAYWATCH_REQUIRE_K8S").is_ok_and(|v| v == "1");
            if skip {
                eprintln!("SKIPPING real-apiserver test (GRAYWATCH_SKIP_K8S=1): {msg}");
                return Ok(None);
            }
            bail!(msg);
        }
        let mut me = Self {
            instance: Instance::start("graywatch-k8s", &opts)?,
        };
        me.wait_ready().await?;
        Ok(Some(me))
    }

    /// `https://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        self.instance.url()
    }

    /// A kubeconfig file for this instance (static admin token, its own CA).
    #[must_use]
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.instance.kubeconfig_path()
    }

    /// The processes (pids, logs, kill and restart of the apiserver).
    #[must_use]
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// See [`TestApiserver::instance`].
    pub fn instance_mut(&mut self) -> &mut Instance {
        &mut self.instance
    }

    /// A kube client as the static admin (group system:masters).
    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::try_from(self.config().await?)?)
    }

    /// A client that impersonates `user` (e.g. `system:serviceaccount:ns:name`): with
    /// [`ApiserverOptions::rbac`] every request is authorized against that user's bindings.
    pub async fn impersonating(&self, user: &str) -> anyhow::Result<Client> {
        let mut cfg = self.config().await?;
        cfg.auth_info.impersonate = Some(user.to_string());
        Ok(Client::try_from(cfg)?)
    }

    async fn config(&self) -> anyhow::Result<Config> {
        let kc = Kubeconfig::read_from(self.kubeconfig_path())?;
        Ok(Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)
    }

    /// Creates the Karpenter (NodePool, NodeClaim) and NRC (NodeReadinessRule) CRDs and waits
    /// until they are Established.
    pub async fn install_crds(&self) -> anyhow::Result<()> {
        self.install_crds_from(&[KARPENTER_NODEPOOL_CRD, KARPENTER_NODECLAIM_CRD, NRC_RULE_CRD])
            .await
    }

    /// Creates CRDs (YAML) with POST (server-side apply of CRDs fails on 1.20) and waits until
    /// each is Established.
    pub async fn install_crds_from(&self, crds: &[&str]) -> anyhow::Result<()> {
        let client = self.client().await?;
        let mut names = Vec::new();
        for crd in crds {
            let v: Value = serde_yaml::from_str(crd).context("parsing a CRD")?;
            let name = v["metadata"]["name"]
                .as_str()
                .context("CRD without a name")?
                .to_string();
            let req = kube::api::Request::new("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
                .create(&PostParams::default(), crd.as_bytes().to_vec())?;
            let (mut parts, body) = req.into_parts();
            parts
                .headers
                .insert("content-type", http::HeaderValue::from_static("application/yaml"));
            client
                .request_text(http::Request::from_parts(parts, body))
                .await
                .with_context(|| format!("creating CRD {name}"))?;
            names.push(name);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for name in names {
            let path = format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}");
            loop {
                let v: Value = client
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
                // The apiserver has no notification for this; poll its status.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Creates the Nodes (status included: the apiserver takes a Node's status on create).
    pub async fn create_nodes(&self, nodes: &[NodeBuilder]) -> anyhow::Result<()> {
        let client = self.client().await?;
        let api: Api<DynamicObject> =
            Api::all_with(client, &ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "Node")));
        for node in nodes {
            let object: DynamicObject = serde_json::from_value(node.build())?;
            api.create(&PostParams::default(), &object)
                .await
                .with_context(|| format!("creating Node {}", node.name()))?;
        }
        Ok(())
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = self.client().await?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(text) = client.request_text(http_get("/readyz")?).await
                && text.trim() == "ok"
            {
                return Ok(());
            }
            self.instance.check_deadline(deadline)?;
            // A process without readiness notification: poll it.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn http_get(path: &str) -> anyhow::Result<http::Request<Vec<u8>>> {
    Ok(http::Request::get(path).body(Vec::new())?)
}
