//! 60% of one zone degrades → one zone verdict: no node taints beyond the blast radius, the
//! NodePool gets `zone NotIn` and a drift budget of one NodeClaim at a time, what we added is
//! saved in a ConfigMap; recovery removes exactly that (an edit someone else made meanwhile
//! stays) and the snapshot.

mod common;

use common::*;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{Patch, PatchParams},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_degradation_excludes_zone_within_a_drift_budget_and_restores_only_ours() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(10, 5).await? else {
        return Ok(());
    };
    let original = cluster.with_nodepool().await?;
    let agg = Aggregator::spawn(&cluster, "agg-0", &config(""));
    let fleet = Fleet::start(10, vec![agg.endpoint()]);
    all_true(&cluster, 0..10).await;

    // 3 of the 5 nodes of zone-a.
    fleet.set_bad(&[0, 1, 2]);
    let pools = cluster.pools();
    let excluded = eventually(40, "NodePool excludes zone-a", || async {
        let p = pools.get("default").await.ok()?;
        let reqs = p.data["spec"]["template"]["spec"]["requirements"].as_array()?.clone();
        reqs.iter()
            .any(|r| r["key"] == ZONE && r["operator"] == "NotIn" && r["values"] == serde_json::json!(["zone-a"]))
            .then_some(reqs)
    })
    .await;
    // The original requirements are kept, the exclusion is added.
    for r in original["template"]["spec"]["requirements"]
        .as_array()
        .expect("requirements")
    {
        assert!(excluded.contains(r), "{r} kept");
    }
    // Karpenter may replace one NodeClaim of the pool at a time for the drift this causes.
    let budget = serde_json::json!({"nodes": "1", "reasons": ["Drifted"]});
    let p = pools.get("default").await?;
    let budgets = p.data["spec"]["disruption"]["budgets"]
        .as_array()
        .expect("budgets")
        .clone();
    assert!(budgets.contains(&budget), "{budgets:?}");
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), NS);
    let snap = cms.get("graywatch-nodepool-default").await?;
    let data = snap.data.unwrap_or_default();
    let added: serde_json::Value = serde_json::from_str(&data["added"])?;
    assert_eq!(
        added,
        serde_json::json!({"requirements": [{"key": ZONE, "operator": "NotIn", "values": ["zone-a"]}], "budgets": [budget]})
    );
    eventually(10, "NodePoolExcluded Event", || async {
        (cluster.count_events("default", "NodePoolExcluded").await == 1).then_some(())
    })
    .await;
    // Conditions tell the truth per node; taints stay within the blast radius (20% of 5 = 1).
    for i in 0..3 {
        eventually(20, &format!("node-{i} False"), || async {
            (cluster.overall(i).await.as_deref() == Some("False")).then_some(())
        })
        .await;
    }
    let tainted = cluster.tainted().await;
    assert!(tainted.len() <= 1, "blast radius: {tainted:?}");
    for i in 5..10 {
        assert_eq!(cluster.overall(i).await.as_deref(), Some("True"), "zone-b node-{i}");
    }

    // Someone else edits the NodePool while it is excluded.
    let theirs = serde_json::json!({"key": "example.com/team", "operator": "In", "values": ["payments"]});
    let mut reqs = pools.get("default").await?.data["spec"]["template"]["spec"]["requirements"].clone();
    reqs.as_array_mut().expect("array").push(theirs.clone());
    pools
        .patch(
            "default",
            &PatchParams::apply("platform-team").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "karpenter.sh/v1", "kind": "NodePool", "metadata": {"name": "default"},
                "spec": {"template": {"spec": {"requirements": reqs}}, "limits": {"cpu": "2000"}}})),
        )
        .await?;
    let mut expected = original.clone();
    expected["template"]["spec"]["requirements"]
        .as_array_mut()
        .expect("array")
        .push(theirs);
    expected["limits"]["cpu"] = "2000".into();

    // Recovery removes exactly our requirement and budget and the snapshot; their edit stays.
    fleet.set_bad(&[]);
    eventually(40, "NodePool restored", || async {
        let p = pools.get("default").await.ok()?;
        (p.data["spec"] == expected).then_some(())
    })
    .await;
    eventually(10, "snapshot deleted", || async {
        cms.get_opt("graywatch-nodepool-default")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    eventually(10, "NodePoolRestored Event", || async {
        (cluster.count_events("default", "NodePoolRestored").await == 1).then_some(())
    })
    .await;
    eventually(30, "no taints", || async {
        cluster.tainted().await.is_empty().then_some(())
    })
    .await;
    assert_eq!(cluster.count_events("default", "NodePoolExcluded").await, 1);
    Ok(())
}
