//! `graywatch-aggregator cleanup` (the chart's pre-delete hook) on a real apiserver: our taint,
//! conditions and NodePool exclusion (made by the aggregator's own actuator code) are removed,
//! everything foreign stays; a second run changes nothing; a failed step gives a non-zero exit.

mod common;

use std::{collections::BTreeMap, process::Command};

use common::*;
use graywatch_aggregator::{
    actuate::{Actuator, FIELD_MANAGER},
    config::FileConfig,
    core::{engine::with_exclusions, model::PoolSnapshot, plan::PoolChange},
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

fn cond(ty: &str, status: &str) -> serde_json::Value {
    json!({"type": ty, "status": status, "reason": "Test", "message": "test",
           "lastTransitionTime": "2026-11-22T12:00:00Z", "lastHeartbeatTime": "2026-11-22T12:00:00Z"})
}

/// Applies `conds` to node i's status as `manager` (server-side apply, as the aggregator does).
async fn apply_conditions(
    cluster: &Cluster,
    i: usize,
    manager: &str,
    conds: &[serde_json::Value],
) -> anyhow::Result<()> {
    let body = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node_name(i)},
                      "status": {"conditions": conds}});
    cluster
        .nodes()
        .patch_status(
            &node_name(i),
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&body),
        )
        .await?;
    Ok(())
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
            snapshot: PoolSnapshot {
                requirements: original_reqs.clone(),
                excluded: excluded.clone(),
            },
            requirements: with_exclusions(&original_reqs, &excluded),
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
