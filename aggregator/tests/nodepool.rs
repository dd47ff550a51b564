//! Issue 16.3: NodePool exclusion guardrails, partial writes and bad reads, on a real apiserver
//! with Karpenter's CRDs (the zone verdict itself, its drift budget and a restore that keeps
//! others' edits are in zone.rs).

mod common;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use common::*;
use graywatch_aggregator::{
    cluster::{
        FIELD_MANAGER, SNAPSHOT_DIGEST_ANNOTATION, SNAPSHOT_LABEL, snapshot_data, snapshot_digest, snapshot_name,
    },
    core::model::{PoolEdits, PoolSnapshot},
};
use graywatch_proto::v1::{Directive, NodeSummary};
use k8s_openapi::{
    api::core::v1::ConfigMap, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::sync::mpsc;

const POOL: &str = "default";

/// The test's own agents: one stream per node, a window per node only when the test says, so
/// a single bad window is exactly one.
struct Agents {
    n: usize,
    seq: u64,
    streams: Vec<(mpsc::Sender<NodeSummary>, tonic::Streaming<Directive>)>,
}

impl Agents {
    async fn connect(agg: &Aggregator, n: usize) -> Self {
        eventually(30, "aggregator listening", || async {
            tokio::net::TcpStream::connect(agg.grpc).await.ok().map(|_| ())
        })
        .await;
        let mut streams = Vec::new();
        for i in 0..n {
            let endpoint = agg.endpoint();
            // Refused until the aggregator's Node watch knows the name: open again.
            let s = eventually(30, &format!("node-{i} stream accepted"), || {
                let endpoint = endpoint.clone();
                async move {
                    let mut s = open_stream(&endpoint).await.ok()?;
                    send_summary(&mut s, summary(i, n, 1, &BTreeSet::new())).await.ok()?;
                    Some(s)
                }
            })
            .await;
            streams.push(s);
        }
        Self { n, seq: 1, streams }
    }

    /// One window from every node, acknowledged.
    async fn round(&mut self, bad: &BTreeSet<usize>) {
        self.seq += 1;
        for (i, s) in self.streams.iter_mut().enumerate() {
            send_summary(s, summary(i, self.n, self.seq, bad))
                .await
                .expect("window acknowledged");
        }
    }

    /// Healthy rounds until `done` holds (checked after each round; fails after `secs`).
    async fn rounds_until<F, Fut>(&mut self, secs: u64, what: &str, mut done: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            self.round(&BTreeSet::new()).await;
            if done().await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {secs} s waiting for: {what}"
            );
            // Pacing of the simulated agents (their report interval), not synchronisation.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The black-box run of the issue: 10 Nodes in two zones and a NodePool, production defaults
/// (3 bad windows to Degraded), every agent healthy except one bad window on 3 of zone-a's 5
/// nodes. They go Suspect and back; the NodePool is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_window_on_three_of_five_nodes_excludes_nothing() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(10, 5).await? else {
        return Ok(());
    };
    let original = cluster.with_nodepool().await?;
    // A long stale timeout: the one bad window stays the latest while we look at its result.
    let cfg = config("").replace("stale_after_ms = 2500", "stale_after_ms = 20000");
    let agg = Aggregator::spawn(&cluster, "agg-0", &cfg);
    let mut agents = Agents::connect(&agg, 10).await;
    agents
        .rounds_until(40, "settled fleet view, every node Healthy=True", || async {
            let mut all = agg.metric("graywatch_aggregator_fleet_view_settled").await == Some(1.0);
            for i in 0..10 {
                all &= cluster.overall(i).await.as_deref() == Some("True");
            }
            all
        })
        .await;

    agents.round(&BTreeSet::from([0, 1, 2])).await;
    for i in 0..3 {
        eventually(20, &format!("node-{i} Suspect"), || async {
            (condition_reason(&cluster.node(i).await, OVERALL).as_deref() == Some("Suspect")).then_some(())
        })
        .await;
    }
    agents
        .rounds_until(40, "nodes 0-2 Healthy again", || async {
            let mut all = true;
            for i in 0..3 {
                all &= condition_reason(&cluster.node(i).await, OVERALL).as_deref() == Some("Healthy");
            }
            all
        })
        .await;
    // The steps that saw the Suspects were applied in full before the later condition writes.
    assert_eq!(cluster.count_events(POOL, "NodePoolExcluded").await, 0);
    assert_eq!(cluster.count_events(POOL, "NodePoolRestored").await, 0);
    assert_eq!(cluster.pools().get(POOL).await?.data["spec"], original);
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), NS);
    assert!(cms.get_opt(&snapshot_name(POOL)).await?.is_none());
    Ok(())
}

fn requirements(pool: &DynamicObject) -> Vec<serde_json::Value> {
    pool.data["spec"]["template"]["spec"]["requirements"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn excludes_zone_a(reqs: &[serde_json::Value]) -> bool {
    reqs.iter()
        .any(|r| r["key"] == ZONE && r["operator"] == "NotIn" && r["values"] == json!(["zone-a"]))
}

/// An exclusion whose NodePool patch fails after its snapshot is saved (here: the CRD's limit
/// of 100 requirements) is tried again until it is in effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_nodepool_patch_is_retried() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(10, 5).await? else {
        return Ok(());
    };
    cluster.with_nodepool().await?;
    let pools = cluster.pools();
    let mut full = requirements(&pools.get(POOL).await?);
    for k in full.len()..100 {
        full.push(json!({"key": format!("example.com/r{k}"), "operator": "In", "values": ["x"]}));
    }
    let admin = PatchParams::apply("platform-team").force();
    let set_requirements = |reqs: Vec<serde_json::Value>| {
        Patch::Apply(
            json!({"apiVersion": "karpenter.sh/v1", "kind": "NodePool", "metadata": {"name": POOL},
                            "spec": {"template": {"spec": {"requirements": reqs}}}}),
        )
    };
    pools.patch(POOL, &admin, &set_requirements(full.clone())).await?;

    let agg = Aggregator::spawn(&cluster, "agg-0", &config(""));
    let fleet = Fleet::start(10, vec![agg.endpoint()]);
    for i in 0..10 {
        eventually(30, &format!("node-{i} Healthy=True"), || async {
            (cluster.overall(i).await.as_deref() == Some("True")).then_some(())
        })
        .await;
    }
    fleet.set_bad(&[0, 1, 2]);
    // The snapshot is saved before the patch, which the CRD refuses (101 requirements).
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), NS);
    eventually(40, "snapshot saved", || async {
        cms.get_opt(&snapshot_name(POOL)).await.ok()?.map(|_| ())
    })
    .await;
    eventually(20, "the refused patch counted as a failed action", || async {
        (agg.metric("graywatch_aggregator_action_errors_total{kind=\"NodePool\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(requirements(&pools.get(POOL).await?), full);

    // Room again: the next attempt goes through.
    full.pop();
    pools.patch(POOL, &admin, &set_requirements(full.clone())).await?;
    let reqs = eventually(40, "NodePool excludes zone-a", || async {
        let reqs = requirements(&pools.get(POOL).await.ok()?);
        excludes_zone_a(&reqs).then_some(reqs)
    })
    .await;
    assert_eq!(reqs[..full.len()], full[..], "their requirements kept");
    assert_eq!(cluster.count_events(POOL, "NodePoolExcluded").await, 1);
    Ok(())
}

/// Snapshot ConfigMaps we cannot verify are never restored from: one written by someone else
/// (valid digest), one under our field manager whose data does not match its digest. Both
/// claim zone-a excluded and our addition to be the pool's own arch requirement; the zone is
/// healthy, so restoring from them would take that requirement out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unverified_snapshots_are_refused() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(10, 5).await? else {
        return Ok(());
    };
    let original = cluster.with_nodepool().await?;
    let pools = cluster.pools();
    let mut other: DynamicObject = pools.get(POOL).await?;
    other.metadata = kube::api::ObjectMeta {
        name: Some("other".into()),
        ..Default::default()
    };
    pools.create(&PostParams::default(), &other).await?;
    let claim = PoolSnapshot {
        excluded: vec![(ZONE.into(), "zone-a".into())],
        added: PoolEdits {
            requirements: vec![original["template"]["spec"]["requirements"][0].clone()],
            budgets: vec![],
        },
    };
    let data = snapshot_data(&claim);
    let cm = |pool: &str, digest: String| -> ConfigMap {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": snapshot_name(pool), "namespace": NS, "labels": {SNAPSHOT_LABEL: pool},
                         "annotations": {SNAPSHOT_DIGEST_ANNOTATION: digest}},
            "data": data}))
        .expect("a ConfigMap")
    };
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), NS);
    // Someone else's, digest and all.
    let pp = PostParams {
        field_manager: Some("kubectl-create".into()),
        ..PostParams::default()
    };
    cms.create(&pp, &cm(POOL, snapshot_digest(&data))).await?;
    // Under our field manager, but its data is not what its digest says.
    let tampered = cm(
        "other",
        snapshot_digest(&snapshot_data(&PoolSnapshot {
            excluded: vec![],
            ..claim.clone()
        })),
    );
    cms.patch(
        &snapshot_name("other"),
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&tampered),
    )
    .await?;

    let agg = Aggregator::spawn(&cluster, "agg-0", &config(""));
    let _fleet = Fleet::start(10, vec![agg.endpoint()]);
    for pool in [POOL, "other"] {
        eventually(40, &format!("{pool}: NodePoolSnapshotRefused Event"), || async {
            (cluster.count_events(pool, "NodePoolSnapshotRefused").await == 1).then_some(())
        })
        .await;
    }
    let (_, _, note) = cluster
        .events()
        .await
        .into_iter()
        .find(|(o, r, _)| o == POOL && r == "NodePoolSnapshotRefused")
        .expect("event");
    assert!(note.contains("kubectl-create"), "{note}");
    for pool in [POOL, "other"] {
        assert_eq!(pools.get(pool).await?.data["spec"], original, "{pool} untouched");
        assert!(
            cms.get_opt(&snapshot_name(pool)).await?.is_some(),
            "{pool}: snapshot kept"
        );
    }
    assert_eq!(cluster.count_events(POOL, "NodePoolRestored").await, 0);
    Ok(())
}

/// NodePools that cannot be listed (here: a stored version whose conversion webhook is
/// unreachable) cost only the NodePool part of a step: conditions are written, a degraded node
/// is tainted and untainted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodepool_list_error_still_writes_conditions_and_untaints() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(5, 5).await? else {
        return Ok(());
    };
    cluster.with_nodepool().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(cluster.client.clone());
    let name = "nodepools.karpenter.sh";
    let mut crd = serde_json::to_value(crds.get(name).await?)?;
    let versions = crd["spec"]["versions"].as_array_mut().expect("versions");
    for v in versions.iter_mut() {
        v["storage"] = false.into();
    }
    versions.push(json!({"name": "v1beta1", "served": true, "storage": true,
        "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}));
    crd["spec"]["conversion"] = json!({"strategy": "Webhook", "webhook": {
        "conversionReviewVersions": ["v1"], "clientConfig": {"url": "https://127.0.0.1:1/convert"}}});
    crds.replace(name, &PostParams::default(), &serde_json::from_value(crd)?)
        .await?;
    let legacy = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("karpenter.sh", "v1beta1", "NodePool"),
        "nodepools",
    );
    let legacy_api: Api<DynamicObject> = Api::all_with(cluster.client.clone(), &legacy);
    eventually(30, "a NodePool stored as v1beta1", || async {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "karpenter.sh/v1beta1", "kind": "NodePool", "metadata": {"name": "legacy"}, "spec": {}}))
        .ok()?;
        legacy_api.create(&PostParams::default(), &obj).await.ok().map(|_| ())
    })
    .await;
    eventually(30, "listing NodePools (v1) fails", || async {
        cluster
            .pools()
            .list(&ListParams::default())
            .await
            .is_err()
            .then_some(())
    })
    .await;

    let agg = Aggregator::spawn(&cluster, "agg-0", &config(""));
    let fleet = Fleet::start(5, vec![agg.endpoint()]);
    for i in 0..5 {
        eventually(30, &format!("node-{i} Healthy=True"), || async {
            (cluster.overall(i).await.as_deref() == Some("True")).then_some(())
        })
        .await;
    }
    fleet.set_bad(&[3]);
    eventually(30, "node-3 tainted", || async {
        (cluster.tainted().await == BTreeSet::from(["node-3".to_string()])).then_some(())
    })
    .await;
    assert_eq!(cluster.overall(3).await.as_deref(), Some("False"));
    fleet.set_bad(&[]);
    eventually(40, "node-3 untainted", || async {
        cluster.tainted().await.is_empty().then_some(())
    })
    .await;
    assert!(
        cluster.pools().list(&ListParams::default()).await.is_err(),
        "still unreadable"
    );
    Ok(())
}
