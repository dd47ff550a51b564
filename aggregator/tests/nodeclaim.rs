//! Sustained degradation of one node → its Karpenter NodeClaim is deleted (replacement), once,
//! within the budget, with an Event; other NodeClaims are untouched. Off by default.

mod common;

use common::*;
use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams, PostParams},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_degradation_replaces_the_nodeclaim() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(10, 5).await? else {
        return Ok(());
    };
    cluster.with_nodepool().await?;
    let claims: Api<DynamicObject> = Api::all_with(
        cluster.client.clone(),
        &graywatch_aggregator::cluster::nodeclaim_resource(),
    );
    for i in 0..10 {
        let claim: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "karpenter.sh/v1", "kind": "NodeClaim",
            "metadata": {"name": format!("claim-{i}"), "labels": {"karpenter.sh/nodepool": "default"}},
            "spec": {"nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "default"},
                     "requirements": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]},
        }))?;
        claims.create(&PostParams::default(), &claim).await?;
        // Karpenter would record which Node the claim launched.
        let status =
            serde_json::json!({"status": {"nodeName": node_name(i), "providerID": format!("aws:///zone/i-{i}")}});
        claims
            .patch_status(&format!("claim-{i}"), &PatchParams::default(), &Patch::Merge(&status))
            .await?;
    }
    let agg = Aggregator::spawn(
        &cluster,
        "agg-0",
        &config("karpenter_replace = true\nreplace_after_windows = 6"),
    );
    let fleet = Fleet::start(10, vec![agg.endpoint()]);
    all_true(&cluster, 0..10).await;
    fleet.set_bad(&[7]);
    eventually(40, "claim-7 deleted", || async {
        claims.get_opt("claim-7").await.ok()?.is_none().then_some(())
    })
    .await;
    eventually(10, "replacement Event", || async {
        (cluster.count_events("node-7", "NodeClaimReplaced").await == 1).then_some(())
    })
    .await;
    for i in (0..10).filter(|i| *i != 7) {
        assert!(claims.get_opt(&format!("claim-{i}")).await?.is_some(), "claim-{i} kept");
    }
    Ok(())
}
