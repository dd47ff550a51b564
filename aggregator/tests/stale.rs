//! An agent that stops reporting → its conditions go Unknown after the stale timeout, never False.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_agent_goes_unknown_never_false() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(10, 5).await? else {
        return Ok(());
    };
    let agg = Aggregator::spawn(&cluster, "agg-0", &config(""));
    let fleet = Fleet::start(10, vec![agg.endpoint()]);
    all_true(&cluster, 0..10).await;
    // node-6 stops reporting; the others now see its links as unreachable-slow too (worst case
    // for a false accusation): vantage evidence alone must not turn missing data into False.
    fleet.set_silent(&[6]);
    eventually(30, "node-6 Unknown", || async {
        (cluster.overall(6).await.as_deref() == Some("Unknown")).then_some(())
    })
    .await;
    let n = cluster.node(6).await;
    for fam in [
        "NetworkLatency",
        "PacketLoss",
        "CpuSteal",
        "CpuContention",
        "MemoryPressure",
    ] {
        assert_eq!(
            condition(&n, &format!("graywatch.io/{fam}Healthy")).as_deref(),
            Some("Unknown"),
            "{fam}"
        );
    }
    let reason = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == OVERALL))
        .and_then(|c| c.reason.clone());
    assert_eq!(reason.as_deref(), Some("AgentStale"));
    // The audit Event is written after the condition the wait above saw: await it.
    eventually(10, "node-6 HealthUnknown Event", || async {
        (cluster.count_events("node-6", "HealthUnknown").await >= 1).then_some(())
    })
    .await;
    assert_eq!(cluster.count_events("node-6", "HealthUnknown").await, 1);
    assert_eq!(cluster.count_events("node-6", "GrayFailureDetected").await, 0);
    assert!(cluster.tainted().await.is_empty());

    // It comes back: True again, without ever having been False.
    fleet.set_silent(&[]);
    eventually(30, "node-6 True again", || async {
        (cluster.overall(6).await.as_deref() == Some("True")).then_some(())
    })
    .await;
    assert_eq!(cluster.count_events("node-6", "GrayFailureDetected").await, 0);
    Ok(())
}
