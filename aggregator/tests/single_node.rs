//! 10 nodes in 2 zones; one node's RTT and retransmits degrade → only that node gets condition
//! False, an Event and (direct mode) the taint; recovery removes them after hysteresis.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_degraded_node_gets_condition_event_and_taint_then_recovers() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(10, 5).await? else {
        return Ok(());
    };
    let agg = Aggregator::spawn(&cluster, "agg-0", &config(""));
    let fleet = Fleet::start(10, vec![agg.endpoint()]);

    // Healthy fleet first: every node gets our conditions, True.
    all_true(&cluster, 0..10).await;
    let n = cluster.node(3).await;
    for fam in ["NetworkLatency", "PacketLoss", "CpuSteal"] {
        assert_eq!(
            condition(&n, &format!("graywatch.io/{fam}Healthy")).as_deref(),
            Some("True"),
            "{fam}"
        );
    }
    // Families the agent does not report are Unknown, never False.
    assert_eq!(
        condition(&n, "graywatch.io/MemoryPressureHealthy").as_deref(),
        Some("Unknown")
    );

    fleet.set_bad(&[3]);
    eventually(30, "node-3 tainted", || async {
        cluster.tainted().await.contains("node-3").then_some(())
    })
    .await;
    let n = cluster.node(3).await;
    assert_eq!(condition(&n, OVERALL).as_deref(), Some("False"));
    assert_eq!(
        condition(&n, "graywatch.io/NetworkLatencyHealthy").as_deref(),
        Some("False")
    );
    assert_eq!(
        condition(&n, "graywatch.io/PacketLossHealthy").as_deref(),
        Some("False")
    );
    assert_eq!(condition(&n, "graywatch.io/CpuStealHealthy").as_deref(), Some("True"));
    let msg = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "graywatch.io/NetworkLatencyHealthy"))
        .and_then(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        msg.contains("peers see it degraded"),
        "message carries the evidence: {msg}"
    );
    eventually(10, "taint Event on node-3", || async {
        (cluster.count_events("node-3", "GrayFailureTaint").await == 1).then_some(())
    })
    .await;
    assert_eq!(cluster.count_events("node-3", "GrayFailureDetected").await, 1);
    // Only node-3.
    assert_eq!(cluster.tainted().await.len(), 1);
    for i in (0..10).filter(|i| *i != 3) {
        assert_eq!(cluster.overall(i).await.as_deref(), Some("True"), "node-{i}");
    }
    let events = cluster.events().await;
    assert!(
        events.iter().all(|(o, _, _)| o == "node-3"),
        "events only about node-3: {events:?}"
    );

    // Recovery: taint and False go away after the recovery hysteresis, each with an Event.
    fleet.set_bad(&[]);
    eventually(30, "node-3 untainted", || async {
        cluster.tainted().await.is_empty().then_some(())
    })
    .await;
    assert_eq!(cluster.overall(3).await.as_deref(), Some("True"));
    eventually(10, "untaint Event", || async {
        (cluster.count_events("node-3", "GrayFailureUntaint").await == 1).then_some(())
    })
    .await;
    assert_eq!(cluster.count_events("node-3", "GrayFailureTaint").await, 1);
    // Every window reached a decision step; the latency histogram has samples.
    let samples = agg
        .metric("graywatch_aggregator_ingest_to_decision_seconds_count")
        .await;
    assert!(samples.is_some_and(|n| n > 0.0), "{samples:?}");
    // Every leader step is timed, the ones that wrote the taint and its Events among them.
    let steps = agg.metric("graywatch_aggregator_decision_step_seconds_count").await;
    assert!(steps.is_some_and(|n| n > 0.0), "{steps:?}");
    drop(agg);
    Ok(())
}
