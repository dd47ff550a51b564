//! `graywatch-aggregator cleanup` (the chart's pre-delete hook) on a real apiserver: our taint,
//! conditions and NodePool exclusion (made by the aggregator's own actuator code) are removed,
//! everything foreign stays; a second run changes nothing; a failed step gives a non-zero exit.

mod common;

use std::{collections::BTreeMap, process::Command};

use common::*;
use graywatch_aggregator::{
    actuate::Actuator,
    cluster::FIELD_MANAGER,
    config::FileConfig,
    core::{karpenter::exclusion_edits, model::PoolEdits, plan::PoolChange},
};
use k8s_openapi::api::{
    coordination::v1::{Lease, LeaseSpec},
    core::v1::{ConfigMap, Node},
};
use kube::{
    Api,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::json;

const IDENTITY: &str = "graywatch-cleanup-test";
const SNAPSHOT: &str = "graywatch-nodepool-default";

fn taints(n: &Node) -> Vec<String> {
    n.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .map(|ts| ts.iter().map(|t| t.key.clone()).collect())
        .unwrap_or_default()
}

fn conditions(n: &Node) -> Vec<String> {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|cs| cs.iter().map(|c| c.type_.clone()).collect())
        .unwrap_or_default()
}

async fn add_taints(cluster: &Cluster, i: usize, keys: &[&str]) -> anyhow::Result<()> {
    let ts: Vec<_> = keys
        .iter()
        .map(|k| json!({"key": k, "value": "x", "effect": "NoSchedule"}))
        .collect();
    cluster
        .nodes()
        .patch(
            &node_name(i),
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"taints": ts}})),
        )
        .await?;
    Ok(())
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn cleanup(cluster: &Cluster, config: &std::path::Path) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_graywatch-aggregator"))
        .arg("--config")
        .arg(config)
        .args(["--identity", IDENTITY, "--log-json", "cleanup"])
        .env("KUBECONFIG", cluster.api.kubeconfig_path())
        .env("RUST_LOG", "info")
        .output()
        .expect("run graywatch-aggregator cleanup");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn resource_versions(cluster: &Cluster) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for i in 0..3 {
        let n = cluster.nodes().get(&node_name(i)).await?;
        out.insert(node_name(i), n.metadata.resource_version.unwrap_or_default());
    }
    let pool = cluster.pools().get("default").await?;
    out.insert("pool".into(), pool.metadata.resource_version.unwrap_or_default());
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_ours_and_keeps_everything_else() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(3, 3).await? else {
        return Ok(());
    };
    let original_spec = cluster.with_nodepool().await?;
    let original_reqs = original_spec["template"]["spec"]["requirements"].clone();

    // node-0: ours (overall, a family, NetworkingReady) + a foreign condition and taint.
    apply_conditions(
        &cluster,
        0,
        FIELD_MANAGER,
        &[
            cond("graywatch.io/Healthy", "False"),
            cond("graywatch.io/NetworkLatencyHealthy", "False"),
            cond("NetworkingReady", "False"),
        ],
    )
    .await?;
    apply_conditions(&cluster, 0, "disk-checker", &[cond("example.com/DiskHealthy", "True")]).await?;
    add_taints(&cluster, 0, &[TAINT, "example.com/maintenance"]).await?;
    // node-1: ours only.
    apply_conditions(
        &cluster,
        1,
        FIELD_MANAGER,
        &[
            cond("graywatch.io/Healthy", "True"),
            cond("graywatch.io/CpuStealHealthy", "True"),
        ],
    )
    .await?;
    add_taints(&cluster, 1, &[TAINT]).await?;
    // node-2: NetworkingReady owned by EKS's agent stays; a graywatch.io/ condition is ours
    // whoever wrote it.
    apply_conditions(
        &cluster,
        2,
        "eks-node-monitoring-agent",
        &[cond("NetworkingReady", "True")],
    )
    .await?;
    apply_conditions(
        &cluster,
        2,
        "someone",
        &[cond("graywatch.io/PacketLossHealthy", "True")],
    )
    .await?;

    // The NodePool exclusion exactly as the aggregator makes it: snapshot, then requirements.
    let cfg = FileConfig {
        namespace: NS.into(),
        identity: "agg-0".into(),
        ..FileConfig::default()
    };
    let excluded = vec![(ZONE.to_string(), "zone-a".to_string())];
    Actuator::new(cluster.client.clone(), &cfg)
        .change_pool(&PoolChange::Exclude {
            pool: "default".into(),
            excluded: excluded.clone(),
            remove: PoolEdits::default(),
            add: exclusion_edits(&excluded, 1),
        })
        .await?;
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), NS);
    assert!(cms.get_opt(SNAPSHOT).await?.is_some());
    assert_ne!(
        cluster.pools().get("default").await?.data["spec"]["template"]["spec"]["requirements"],
        original_reqs
    );
    // A ConfigMap of someone else in our namespace.
    let foreign: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "not-ours", "namespace": NS},
        "data": {"k": "v"}}))?;
    cms.create(&PostParams::default(), &foreign).await?;
    // A live leader's Lease: the cleanup takes it over.
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), NS);
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("graywatch-aggregator".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("agg-0".into()),
            lease_duration_seconds: Some(2),
            ..LeaseSpec::default()
        }),
    };
    leases.create(&PostParams::default(), &lease).await?;

    let dir = std::env::temp_dir().join(format!("graywatch-cleanup-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config_path = dir.join("aggregator.toml");
    std::fs::write(&config_path, config("karpenter_exclude = true"))?;

    let run = cleanup(&cluster, &config_path);
    assert_eq!(run.code, Some(0), "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("taints removed: 2 (node-0, node-1)"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("conditions removed: 6 ("), "{}", run.stdout);
    assert!(run.stdout.contains("nodepools restored: 1 (default)"), "{}", run.stdout);
    assert!(
        run.stdout.contains(&format!("snapshots deleted: 1 ({SNAPSHOT})")),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("errors: 0"), "{}", run.stdout);
    // Structured log lines name each object.
    let logged = |message: &str, field: &str, value: &str| {
        run.stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|l| l["fields"]["message"] == message && l["fields"][field] == value)
    };
    assert!(logged("removed taint", "node", "node-0"), "{}", run.stderr);
    assert!(logged("removed taint", "node", "node-1"), "{}", run.stderr);
    assert!(logged("removed conditions", "node", "node-2"), "{}", run.stderr);
    assert!(logged("restored nodepool", "pool", "default"), "{}", run.stderr);
    assert!(logged("deleted snapshot", "snapshot", SNAPSHOT), "{}", run.stderr);
    assert!(
        logged(
            "took the leader lease; waiting until the previous leader has stopped writing",
            "previous",
            "agg-0"
        ),
        "{}",
        run.stderr
    );

    let n0 = cluster.node(0).await;
    assert_eq!(taints(&n0), ["example.com/maintenance"]);
    assert_eq!(conditions(&n0), ["Ready", "example.com/DiskHealthy"]);
    let n1 = cluster.node(1).await;
    assert!(taints(&n1).is_empty(), "{:?}", taints(&n1));
    assert_eq!(conditions(&n1), ["Ready"]);
    let n2 = cluster.node(2).await;
    assert_eq!(conditions(&n2), ["Ready", "NetworkingReady"]);
    let pool = cluster.pools().get("default").await?;
    assert_eq!(pool.data["spec"]["template"]["spec"]["requirements"], original_reqs);
    assert!(cms.get_opt(SNAPSHOT).await?.is_none(), "snapshot deleted");
    assert!(cms.get_opt("not-ours").await?.is_some(), "foreign ConfigMap kept");
    assert_eq!(cluster.lease_holder().await.as_deref(), Some(IDENTITY));
    let held = leases.get("graywatch-aggregator").await?;
    assert_eq!(held.spec.and_then(|s| s.lease_duration_seconds), Some(300));

    // Idempotent: nothing left to do, nothing written.
    let before = resource_versions(&cluster).await?;
    let again = cleanup(&cluster, &config_path);
    assert_eq!(again.code, Some(0), "{}\n{}", again.stdout, again.stderr);
    for line in [
        "taints removed: 0 (-)",
        "conditions removed: 0 (-)",
        "nodepools restored: 0 (-)",
        "snapshots deleted: 0 (-)",
        "errors: 0",
    ] {
        assert!(again.stdout.contains(line), "{line}: {}", again.stdout);
    }
    assert_eq!(resource_versions(&cluster).await?, before);

    // A step that fails (an unreadable snapshot is not guessed at) → exit code 1, the rest done.
    let bad: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "graywatch-nodepool-broken", "namespace": NS,
                     "labels": {"graywatch.io/snapshot-of-nodepool": "broken"}},
        "data": {"requirements": "not json", "excluded": "[]"}}))?;
    cms.create(&PostParams::default(), &bad).await?;
    add_taints(&cluster, 1, &[TAINT]).await?;
    let failed = cleanup(&cluster, &config_path);
    assert_eq!(failed.code, Some(1), "{}\n{}", failed.stdout, failed.stderr);
    assert!(failed.stdout.contains("errors: 1"), "{}", failed.stdout);
    assert!(failed.stdout.contains("graywatch-nodepool-broken"), "{}", failed.stdout);
    assert!(
        failed.stdout.contains("taints removed: 1 (node-1)"),
        "{}",
        failed.stdout
    );
    assert!(taints(&cluster.node(1).await).is_empty());
    assert!(
        cms.get_opt("graywatch-nodepool-broken").await?.is_some(),
        "kept for a human"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Mode nrc: the chart's NodeReadinessRules go first (else the Node Readiness Controller would
/// taint every node once our conditions are gone), and so do their taints; other rules and
/// their taints stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_our_node_readiness_rules_and_their_taints() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(2, 2).await? else {
        return Ok(());
    };
    cluster.api.install_crds().await?;
    let rules: Api<kube::api::DynamicObject> = Api::all_with(
        cluster.client.clone(),
        &graywatch_aggregator::cleanup::node_readiness_rule_resource(),
    );
    for (name, key, ty) in [
        (
            "graywatch-gray-failure",
            "readiness.k8s.io/graywatch-gray-failure",
            "graywatch.io/Healthy",
        ),
        ("cni-ready", "readiness.k8s.io/cni", "example.net/CNIReady"),
    ] {
        let rule = serde_json::from_value(json!({
            "apiVersion": "readiness.node.x-k8s.io/v1alpha1", "kind": "NodeReadinessRule",
            "metadata": {"name": name},
            "spec": {"conditions": [{"type": ty, "requiredStatus": "True"}],
                     "taint": {"key": key, "value": "x", "effect": "NoSchedule"},
                     "enforcementMode": "continuous", "nodeSelector": {}}}))?;
        rules.create(&PostParams::default(), &rule).await?;
    }
    add_taints(
        &cluster,
        0,
        &["readiness.k8s.io/graywatch-gray-failure", "readiness.k8s.io/cni", TAINT],
    )
    .await?;
    add_taints(&cluster, 1, &["readiness.k8s.io/graywatch-gray-failure"]).await?;
    apply_conditions(&cluster, 0, FIELD_MANAGER, &[cond("graywatch.io/Healthy", "False")]).await?;

    let dir = std::env::temp_dir().join(format!("graywatch-cleanup-nrc-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config_path = dir.join("aggregator.toml");
    std::fs::write(&config_path, config("taint_mode = \"nrc\""))?;
    let out = Command::new(env!("CARGO_BIN_EXE_graywatch-aggregator"))
        .arg("--config")
        .arg(&config_path)
        .args(["--identity", IDENTITY, "cleanup"])
        // The second one does not exist (already deleted): nothing to do for it.
        .args([
            "--node-readiness-rule=graywatch-gray-failure",
            "--node-readiness-rule=graywatch-network",
        ])
        .env("KUBECONFIG", cluster.api.kubeconfig_path())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("nodereadinessrules deleted: 1 (graywatch-gray-failure)"),
        "{stdout}"
    );
    assert!(stdout.contains("their taints removed: 2 ("), "{stdout}");
    assert!(stdout.contains("taints removed: 1 (node-0)"), "{stdout}");
    assert!(stdout.contains("errors: 0"), "{stdout}");
    assert!(rules.get_opt("graywatch-gray-failure").await?.is_none());
    assert!(rules.get_opt("cni-ready").await?.is_some(), "someone else's rule kept");
    assert_eq!(taints(&cluster.node(0).await), ["readiness.k8s.io/cni"]);
    assert!(taints(&cluster.node(1).await).is_empty());
    assert_eq!(conditions(&cluster.node(0).await), ["Ready"]);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The aggregator Deployment the mode-change tests stop, with `replicas` and a selector.
async fn create_deployment(cluster: &Cluster, replicas: i32) -> anyhow::Result<()> {
    let dep: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "graywatch-aggregator", "namespace": NS},
        "spec": {"replicas": replicas,
                 "selector": {"matchLabels": {"app.kubernetes.io/component": "aggregator"}},
                 "template": {"metadata": {"labels": {"app.kubernetes.io/component": "aggregator"}},
                              "spec": {"containers": [{"name": "aggregator", "image": "x"}]}}}}))?;
    Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(cluster.client.clone(), NS)
        .create(&PostParams::default(), &dep)
        .await?;
    Ok(())
}

async fn create_pod(cluster: &Cluster, name: &str, component: &str) -> anyhow::Result<()> {
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app.kubernetes.io/component": component}},
        "spec": {"containers": [{"name": "c", "image": "x"}]}}))?;
    Api::<k8s_openapi::api::core::v1::Pod>::namespaced(cluster.client.clone(), NS)
        .create(&PostParams::default(), &pod)
        .await?;
    Ok(())
}

fn mode_change(cluster: &Cluster, config: &std::path::Path, only: &str, from: &str, to: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_graywatch-aggregator"))
        .arg("--config")
        .arg(config)
        .args(["--identity", IDENTITY, "--log-json", "cleanup"])
        .args([
            format!("--only={only}"),
            "--stop-deployment=graywatch-aggregator".into(),
            format!("--from-mode={from}"),
            format!("--to-mode={to}"),
        ])
        .env("KUBECONFIG", cluster.api.kubeconfig_path())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run graywatch-aggregator cleanup")
}

async fn finish(child: std::process::Child) -> anyhow::Result<Run> {
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    Ok(Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The chart's mode-change hook (direct-taint → nrc): the aggregator Deployment is scaled to 0
/// and nothing is cleaned while one of its pods still exists (it could re-taint); then only our
/// taint goes — the conditions stay for the Node Readiness Controller — and the Lease is
/// released for the upgraded aggregator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::zombie_processes,
    reason = "an early `?` fails the test; the cleanup child is waited for by `finish` on every path that goes on"
)]
async fn mode_change_stops_the_deployment_then_removes_only_the_taint() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(2, 2).await? else {
        return Ok(());
    };
    create_deployment(&cluster, 2).await?;
    // No controllers here: the test plays the ReplicaSet's pod, and someone else's pod.
    create_pod(&cluster, "graywatch-aggregator-7d9f-abcde", "aggregator").await?;
    create_pod(&cluster, "graywatch-agent-xyz12", "agent").await?;
    apply_conditions(
        &cluster,
        0,
        FIELD_MANAGER,
        &[
            cond("graywatch.io/Healthy", "False"),
            cond("graywatch.io/NetworkLatencyHealthy", "False"),
        ],
    )
    .await?;
    add_taints(&cluster, 0, &[TAINT, "example.com/maintenance"]).await?;
    add_taints(&cluster, 1, &[TAINT]).await?;
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), NS);
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("graywatch-aggregator".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("graywatch-aggregator-7d9f-abcde".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                k8s_openapi::jiff::Timestamp::now(),
            )),
            ..LeaseSpec::default()
        }),
    };
    leases.create(&PostParams::default(), &lease).await?;

    let dir = std::env::temp_dir().join(format!("graywatch-mode-change-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config_path = dir.join("aggregator.toml");
    std::fs::write(&config_path, config(""))?;
    let mut child = mode_change(&cluster, &config_path, "taint", "direct-taint", "nrc");

    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(cluster.client.clone(), NS);
    let scaled = kube::runtime::wait::await_condition(
        deployments.clone(),
        "graywatch-aggregator",
        |d: Option<&k8s_openapi::api::apps::v1::Deployment>| d.and_then(|d| d.spec.as_ref()?.replicas) == Some(0),
    );
    tokio::time::timeout(std::time::Duration::from_secs(60), scaled).await??;
    // Scaled down, but its pod is still there: the cleanup waits and has removed nothing.
    assert!(
        child.try_wait()?.is_none(),
        "the cleanup ended while an aggregator pod exists"
    );
    assert_eq!(taints(&cluster.node(0).await), [TAINT, "example.com/maintenance"]);
    assert_eq!(taints(&cluster.node(1).await), [TAINT]);

    // The pod goes (its kubelet confirmed the stop): now the cleanup runs.
    Api::<k8s_openapi::api::core::v1::Pod>::namespaced(cluster.client.clone(), NS)
        .delete("graywatch-aggregator-7d9f-abcde", &kube::api::DeleteParams::default())
        .await?;
    let run = finish(child).await?;
    assert_eq!(run.code, Some(0), "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("mode change: direct-taint → nrc"), "{}", run.stdout);
    assert!(
        run.stdout.contains(
            "deployment stopped: graywatch-aggregator (2 → 0 replicas; pods waited for: graywatch-aggregator-7d9f-abcde)"
        ),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("taints removed: 2 (node-0, node-1)"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("conditions removed: 0 (-)"), "{}", run.stdout);
    assert!(run.stdout.contains("errors: 0"), "{}", run.stdout);
    let logged = |message: &str, field: &str, value: &str| {
        run.stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|l| l["fields"]["message"] == message && l["fields"][field] == value)
    };
    assert!(logged("removed taint", "why", "direct-taint → nrc"), "{}", run.stderr);
    assert!(
        logged(
            "took the leader lease; the previous leader's pod is gone, no wait",
            "previous",
            "graywatch-aggregator-7d9f-abcde"
        ),
        "{}",
        run.stderr
    );

    // Only the taint: conditions kept, the foreign taint and pod kept, the Lease free.
    assert_eq!(taints(&cluster.node(0).await), ["example.com/maintenance"]);
    assert!(taints(&cluster.node(1).await).is_empty());
    assert_eq!(
        conditions(&cluster.node(0).await),
        ["Ready", "graywatch.io/Healthy", "graywatch.io/NetworkLatencyHealthy"]
    );
    assert_eq!(cluster.lease_holder().await, None, "lease released");
    assert!(
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(cluster.client.clone(), NS)
            .get_opt("graywatch-agent-xyz12")
            .await?
            .is_some()
    );
    // Left at 0: Helm's upgrade applies the chart's replica count next.
    let dep = deployments.get("graywatch-aggregator").await?;
    assert_eq!(dep.spec.and_then(|s| s.replicas), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A mode-change cleanup that fails (an unreadable NodePool snapshot is never guessed at) scales
/// the aggregator back to the replicas it had and keeps the Lease: the upgrade fails with the
/// hook and the old mode goes on as before. The rest of `--only all` is still done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_mode_change_scales_the_aggregator_back() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(1, 1).await? else {
        return Ok(());
    };
    create_deployment(&cluster, 3).await?;
    add_taints(&cluster, 0, &[TAINT]).await?;
    apply_conditions(&cluster, 0, FIELD_MANAGER, &[cond("graywatch.io/Healthy", "False")]).await?;
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), NS);
    let bad: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "graywatch-nodepool-broken", "namespace": NS,
                     "labels": {"graywatch.io/snapshot-of-nodepool": "broken"}},
        "data": {"requirements": "not json", "excluded": "[]"}}))?;
    cms.create(&PostParams::default(), &bad).await?;
    let dir = std::env::temp_dir().join(format!("graywatch-mode-change-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config_path = dir.join("aggregator.toml");
    std::fs::write(&config_path, config(""))?;

    let run = finish(mode_change(&cluster, &config_path, "all", "nrc", "dry-run")).await?;
    assert_eq!(run.code, Some(1), "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("graywatch-nodepool-broken"), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("conditions removed: 1 (node-0: graywatch.io/Healthy)"),
        "{}",
        run.stdout
    );
    let dep = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(cluster.client.clone(), NS)
        .get("graywatch-aggregator")
        .await?;
    assert_eq!(dep.spec.and_then(|s| s.replicas), Some(3), "scaled back");
    assert_eq!(cluster.lease_holder().await.as_deref(), Some(IDENTITY), "not released");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
