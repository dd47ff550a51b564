//! Issue 16.5: `aggregator.eventNamespace` was ignored: Events always went to "default" while
//! the chart's Events RBAC followed the value, so any other value made every Event fail (403)
//! and the failures opened the circuit breaker. The configured namespace is used now. The API
//! server takes Events about cluster-scoped objects in "default" or (with an eventTime)
//! "kube-system" only, so those are the two values the aggregator accepts.

mod common;

use common::*;
use k8s_openapi::api::core::v1::{Event, Namespace};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};

const EVENTS_NS: &str = "kube-system";

async fn reasons(cluster: &Cluster, namespace: &str, node: &str) -> Vec<String> {
    let api: Api<Event> = Api::namespaced(cluster.client.clone(), namespace);
    api.list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|e| e.involved_object.name.as_deref() == Some(node))
                .filter_map(|e| e.reason)
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_to_the_configured_namespace() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(10, 5).await? else {
        return Ok(());
    };
    // The apiserver creates kube-system itself; make sure it is there before acting.
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    if namespaces.get_opt(EVENTS_NS).await?.is_none() {
        namespaces
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta {
                        name: Some(EVENTS_NS.into()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await?;
    }
    let agg = Aggregator::spawn(
        &cluster,
        "agg-0",
        &format!("event_namespace = \"{EVENTS_NS}\"\n{}", config("")),
    );
    let fleet = Fleet::start(10, vec![agg.endpoint()]);
    all_true(&cluster, 0..10).await;
    fleet.set_bad(&[3]);
    eventually(
        30,
        "GrayFailureDetected on node-3 in the configured namespace",
        || async {
            reasons(&cluster, EVENTS_NS, "node-3")
                .await
                .iter()
                .any(|r| r == "GrayFailureDetected")
                .then_some(())
        },
    )
    .await;
    assert!(
        reasons(&cluster, "default", "node-3").await.is_empty(),
        "nothing in \"default\""
    );
    Ok(())
}
