//! NRC mode: conditions only (plus the EKS `NetworkingReady` mirror while degraded), never a taint; and every
//! NodeReadinessRule example under deploy/helm/graywatch/nrc/ is accepted by the NRC CRD on a real apiserver.

mod common;

use common::*;
use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, PostParams},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nrc_mode_writes_conditions_only_and_examples_are_valid() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(10, 5).await? else {
        return Ok(());
    };
    cluster.api.install_crds().await?;

    // The shipped examples create cleanly (POST, as kubectl create would).
    let nrr = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("readiness.node.x-k8s.io", "v1alpha1", "NodeReadinessRule"),
        "nodereadinessrules",
    );
    let rules: Api<DynamicObject> = Api::all_with(cluster.client.clone(), &nrr);
    // cargo's run-time value first: the compiled-in one can come from another checkout sharing
    // the target dir.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), std::path::PathBuf::from)
        .join("../deploy/helm/graywatch/nrc");
    let mut created = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let req = kube::api::Request::new("/apis/readiness.node.x-k8s.io/v1alpha1/nodereadinessrules")
            .create(&PostParams::default(), text.into_bytes())?;
        let (mut parts, body) = req.into_parts();
        parts.headers.insert("content-type", "application/yaml".parse()?);
        let resp = cluster
            .client
            .request_text(http::Request::from_parts(parts, body))
            .await;
        assert!(resp.is_ok(), "{} rejected: {resp:?}", path.display());
        created += 1;
    }
    assert_eq!(created, 5);
    let predicted = rules.get("graywatch-predicted-failure").await?;
    assert_eq!(predicted.data["spec"]["taint"]["effect"], "PreferNoSchedule");
    assert_eq!(
        predicted.data["spec"]["conditions"][0]["type"],
        "graywatch.io/MemoryPressureHealthy"
    );
    let rule = rules.get("graywatch-gray-failure").await?;
    assert_eq!(rule.data["spec"]["conditions"][0]["type"], "graywatch.io/Healthy");
    assert!(
        rule.data["spec"]["taint"]["key"]
            .as_str()
            .is_some_and(|k| k.starts_with("readiness.k8s.io/"))
    );

    let agg = Aggregator::spawn(&cluster, "agg-0", &config("taint_mode = \"nrc\"\nmirror_eks = true"));
    let fleet = Fleet::start(10, vec![agg.endpoint()]);
    all_true(&cluster, 0..10).await;
    // Healthy: the mirror adds evidence to node repair, it does not vouch for a node.
    assert_eq!(condition(&cluster.node(2).await, "NetworkingReady"), None);
    fleet.set_bad(&[2]);
    eventually(30, "node-2 False", || async {
        (cluster.overall(2).await.as_deref() == Some("False")).then_some(())
    })
    .await;
    eventually(10, "NetworkingReady False", || async {
        (condition(&cluster.node(2).await, "NetworkingReady").as_deref() == Some("False")).then_some(())
    })
    .await;
    // Events are written after every other action of the same decision step, so once the
    // detection Event is there a direct-mode taint would be too.
    eventually(10, "detection Event", || async {
        (cluster.count_events("node-2", "GrayFailureDetected").await == 1).then_some(())
    })
    .await;
    assert!(cluster.tainted().await.is_empty());
    assert_eq!(cluster.count_events("node-2", "GrayFailureTaint").await, 0);
    // Recovered: our NetworkingReady goes with our evidence.
    fleet.set_bad(&[]);
    eventually(40, "NetworkingReady removed", || async {
        condition(&cluster.node(2).await, "NetworkingReady")
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(cluster.overall(2).await.as_deref(), Some("True"));
    Ok(())
}
