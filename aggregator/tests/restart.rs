//! A restarted aggregator reads what is on the cluster (conditions, taints, NodePool snapshot)
//! and neither flaps nor repeats: the excluded zone stays excluded, no Event is repeated, and
//! recovery still restores the NodePool exactly once.

mod common;

use common::*;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;

const STEPS: &str = "graywatch_aggregator_leader_steps_total";
const SETTLED: &str = "graywatch_aggregator_fleet_view_settled";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_does_not_flap_or_repeat_actions() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(10, 5).await? else {
        return Ok(());
    };
    let original = cluster.with_nodepool().await?;
    let [grpc_port, http_port, _] = graywatch_k8s_testkit::free_ports()?;
    let mut agg = Aggregator::spawn_on(&cluster, "agg-0", &config(""), grpc_port, http_port);
    let fleet = Fleet::start(10, vec![agg.endpoint()]);
    fleet.set_bad(&[0, 1, 2]);
    let pools = cluster.pools();
    let excluded = |p: &kube::api::DynamicObject| {
        p.data["spec"]["template"]["spec"]["requirements"]
            .as_array()
            .is_some_and(|rs| rs.iter().any(|r| r["key"] == ZONE && r["operator"] == "NotIn"))
    };
    eventually(40, "zone-a excluded", || async {
        pools.get("default").await.ok().filter(|p| excluded(p)).map(|_| ())
    })
    .await;
    for i in 0..3 {
        eventually(20, &format!("node-{i} False"), || async {
            (cluster.overall(i).await.as_deref() == Some("False")).then_some(())
        })
        .await;
    }
    // A plan's Events are written after its other writes; a few more completed steps make sure
    // everything the first process had to say is on the server.
    let s0 = agg.metric(STEPS).await.unwrap_or(0.0);
    eventually(20, "3 more decision steps", || async {
        agg.metric(STEPS).await.filter(|v| *v >= s0 + 3.0).map(|_| ())
    })
    .await;
    let events_before = cluster.events().await.len();

    // Crash and restart on the same address (agents reconnect on their own).
    agg.kill();
    let agg = Aggregator::spawn_on(&cluster, "agg-0", &config(""), grpc_port, http_port);
    // The new process takes no action until every agent is back and judged against the whole
    // fleet; from then on it acts, so let it decide for a while, still with zone-a degraded.
    eventually(40, "restarted aggregator settled its fleet view", || async {
        #[expect(clippy::float_cmp, reason = "a 0/1 gauge")]
        agg.metric(SETTLED).await.filter(|v| *v == 1.0).map(|_| ())
    })
    .await;
    let s1 = agg.metric(STEPS).await.unwrap_or(0.0);
    eventually(40, "restarted aggregator made 10 settled decision steps", || async {
        agg.metric(STEPS).await.filter(|v| *v >= s1 + 10.0).map(|_| ())
    })
    .await;
    assert!(excluded(&pools.get("default").await?), "still excluded after restart");
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), NS);
    assert!(cms.get_opt("graywatch-nodepool-default").await?.is_some());
    for i in 0..3 {
        assert_eq!(
            cluster.overall(i).await.as_deref(),
            Some("False"),
            "node-{i} did not flap"
        );
    }
    let events = cluster.events().await;
    assert_eq!(events.len(), events_before, "no Event repeated: {events:?}");

    fleet.set_bad(&[]);
    eventually(40, "NodePool restored", || async {
        (pools.get("default").await.ok()?.data["spec"] == original).then_some(())
    })
    .await;
    eventually(10, "one restore Event", || async {
        (cluster.count_events("default", "NodePoolRestored").await == 1).then_some(())
    })
    .await;
    assert_eq!(cluster.count_events("default", "NodePoolExcluded").await, 1);
    Ok(())
}
