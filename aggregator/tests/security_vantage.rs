//! Issue 15, point 1, black-box: a real aggregator on a real apiserver, production policy
//! defaults (direct taint; test timings only), 10 Nodes, real gRPC streams. The victim's own
//! agent reports healthy figures and no honest node exchanges traffic with it; three agents
//! report it at 20 ms with retransmits. Before the fix the victim was tainted within seconds
//! ("3/3 peers see it degraded"); now it is Suspect at most, with one Event per family naming
//! the three observers, and nothing else changes.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

mod common;
mod faults_support;

use common::*;
use faults_support::History;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_lying_agents_change_nothing_about_a_healthy_node() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(10, 5).await? else {
        return Ok(());
    };
    let agg = Aggregator::spawn(&cluster, "agg-0", &config(""));
    let fleet = Fleet::start(10, vec![agg.endpoint()]);
    faults_support::all_true(&cluster, 0..10).await;
    let history = History::record(&cluster);

    fleet.set_lies(&[0, 1, 2], 9);
    let note = eventually(30, "an UncorroboratedVantage Event on node-9", || async {
        cluster
            .events()
            .await
            .into_iter()
            .find(|(o, r, _)| o == "node-9" && r == "UncorroboratedVantage")
            .map(|(_, _, m)| m)
    })
    .await;
    assert!(note.contains("node-0, node-1, node-2"), "{note}");
    let nl = eventually(10, "node-9 NetworkLatencyHealthy Suspect", || async {
        let n = cluster.node(9).await;
        n.status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "graywatch.io/NetworkLatencyHealthy" && c.reason.as_deref() == Some("Suspect"))
    })
    .await;
    assert_eq!(nl.status, "True");
    assert!(nl.message.unwrap_or_default().contains("not corroborated"));

    // Keep lying for many more windows than degrade_windows (3): the aggregator's decision
    // steps are counted, so wait for 25 more of them (the fleet sends a window per 150 ms).
    let steps = |v: Option<f64>| v.unwrap_or(0.0);
    let start = steps(agg.metric("graywatch_aggregator_leader_steps_total").await);
    eventually(60, "25 more decision steps", || async {
        (steps(agg.metric("graywatch_aggregator_leader_steps_total").await) >= start + 25.0).then_some(())
    })
    .await;
    assert!(history.acted_on().is_empty(), "acted on {:?}", history.acted_on());
    assert!(!history.statuses(9).contains("False"), "{:?}", history.statuses(9));
    assert!(cluster.tainted().await.is_empty());
    let actions: Vec<_> = cluster
        .events()
        .await
        .into_iter()
        .filter(|(_, r, _)| r != "UncorroboratedVantage")
        .collect();
    assert!(actions.is_empty(), "{actions:?}");
    assert_eq!(cluster.count_events("node-9", "UncorroboratedVantage").await, 2);
    Ok(())
}
