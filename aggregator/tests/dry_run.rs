//! Dry-run (shadow) mode writes nothing but Events saying what it would do.

mod common;

use common::*;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, api::ListParams};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_writes_only_events() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(10, 5).await? else {
        return Ok(());
    };
    let original = cluster.with_nodepool().await?;
    let before: Vec<_> = cluster.nodes().list(&ListParams::default()).await?.items;
    let agg = Aggregator::spawn(&cluster, "agg-0", &config("dry_run = true"));
    let fleet = Fleet::start(10, vec![agg.endpoint()]);

    fleet.set_bad(&[3]);
    eventually(40, "dry-run taint Event for node-3", || async {
        (cluster.count_events("node-3", "DryRunGrayFailureTaint").await == 1).then_some(())
    })
    .await;
    let events = cluster.events().await;
    assert!(
        events
            .iter()
            .all(|(_, r, m)| r.starts_with("DryRun") && m.starts_with("dry-run, would:")),
        "{events:?}"
    );

    // Zone-wide: would exclude the zone, but the NodePool stays untouched.
    fleet.set_bad(&[0, 1, 2, 3]);
    eventually(40, "dry-run NodePool Event", || async {
        (cluster.count_events("default", "DryRunNodePoolExcluded").await == 1).then_some(())
    })
    .await;

    // Nothing but Events was written: Nodes unchanged (no conditions, no taints), pool unchanged,
    // no snapshot.
    let after: Vec<_> = cluster.nodes().list(&ListParams::default()).await?.items;
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            b.metadata.resource_version, a.metadata.resource_version,
            "{:?} was written",
            a.metadata.name
        );
    }
    assert!(cluster.tainted().await.is_empty());
    assert_eq!(cluster.pools().get("default").await?.data["spec"], original);
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), NS);
    assert!(cms.get_opt("graywatch-nodepool-default").await?.is_none());
    Ok(())
}
