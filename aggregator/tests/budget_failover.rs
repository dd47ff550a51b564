//! Issue 15, point 3: the action budget survives a restart. With `rate_limit = 1` per 10 min,
//! one taint spends it; the aggregator is `SIGKILLed` and started again (a new engine, as on a
//! failover) and a second node degrades in another zone (within the blast radius): it must be
//! held by the rate limit (read back from our Events), not tainted on a fresh budget.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_grant_a_fresh_action_budget() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(10, 5).await? else {
        return Ok(());
    };
    let cfg = config("rate_limit = 1\nrate_window_ms = 600000");
    let [grpc_port, http_port, _] = graywatch_k8s_testkit::free_ports()?;
    let mut agg = Aggregator::spawn_on(&cluster, "agg-0", &cfg, grpc_port, http_port);
    let fleet = Fleet::start(10, vec![agg.endpoint()]);
    fleet.set_bad(&[1]);
    eventually(60, "node-1 tainted", || async {
        cluster.tainted().await.contains("node-1").then_some(())
    })
    .await;

    agg.kill();
    let agg = Aggregator::spawn_on(&cluster, "agg-0", &cfg, grpc_port, http_port);
    fleet.set_bad(&[1, 6]);
    let note = eventually(60, "node-6's taint held back", || async {
        cluster
            .events()
            .await
            .into_iter()
            .find(|(o, r, _)| o == "node-6" && r == "ActionSuppressed")
            .map(|(_, _, m)| m)
    })
    .await;
    assert!(note.contains("rate limit"), "{note}");
    assert!(!cluster.tainted().await.contains("node-6"));
    assert_eq!(cluster.count_events("node-6", "GrayFailureTaint").await, 0);
    assert!(
        agg.log().contains("action budget rebuilt from our Events"),
        "{}",
        agg.log()
    );
    Ok(())
}
