//! An agent rollout (`kubectl rollout restart` of the DaemonSet) restarts every agent on the
//! same kernel boot: the new process' window seq starts again at 1. Its windows are new data,
//! not replays of the old process': the node keeps reporting and its condition stays True.
//! The old process says it is stopping, so a new one slower to start than the stale timeout
//! (a kubelet that deletes the old pod late, an image pull) leaves the node's conditions as they
//! were; an agent that goes silent without a word goes Unknown.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

mod common;
mod faults_support;

use common::*;
use faults_support::*;

const N: usize = 10;
const ROLLED: usize = 4;
const REPLAYS: &str = "graywatch_aggregator_summaries_total{result=\"replay\"}";
const STOP_NOTICES: &str = "graywatch_aggregator_summaries_total{result=\"stopping\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_starting_again_at_seq_1_is_ingested() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(N, 5).await? else {
        return Ok(());
    };
    let agg = Aggregator::spawn(&cluster, "agg-0", &config(""));
    let fleet = AgentFleet::start(N, agg.grpc).await;
    all_true(&cluster, 0..N).await;
    // The old agent has run for a while: with 150 ms windows, catching up to seq 40 from 1
    // takes far longer than the stale timeout (2.5 s), so windows dropped as replays would
    // leave the node Unknown on the way.
    eventually(60, "the old agent reached seq 40", || async {
        (fleet.seq(ROLLED) >= 40).then_some(())
    })
    .await;
    eventually(30, "the old agent's windows acknowledged", || async {
        (fleet.buffered(ROLLED) == 0).then_some(())
    })
    .await;
    let history = History::record(&cluster);
    let replays_before = agg.metric(REPLAYS).await.unwrap_or(0.0);

    let old_seq = fleet.restart(ROLLED).await;
    // The new agent runs until it is past where the old one stopped, every window acknowledged.
    eventually(60, "the new agent passed the old agent's seq", || async {
        (fleet.seq(ROLLED) > old_seq + 3 && fleet.buffered(ROLLED) == 0).then_some(())
    })
    .await;
    assert_eq!(
        history.statuses(ROLLED),
        ["True".to_string()].into(),
        "node-{ROLLED} through the rollout (never Unknown, never False)"
    );
    assert_eq!(
        cluster.overall(ROLLED).await.as_deref(),
        Some("True"),
        "node-{ROLLED} after the rollout"
    );
    let replays = agg.metric(REPLAYS).await.unwrap_or(0.0) - replays_before;
    assert!(
        replays < old_seq as f64,
        "the new agent's windows 1..={old_seq} were dropped as replays ({replays} replays)"
    );
    let noticed = agg
        .log()
        .lines()
        .any(|l| l.contains("agent restarted") && l.contains(&node_name(ROLLED)));
    assert!(
        noticed,
        "the aggregator logged the new incarnation of node-{ROLLED}'s agent"
    );
    Ok(())
}

/// The successor of `SLOW`'s agent starts only once `SILENT`'s agent, silent since the same
/// moment without a stop notice, has been found stale: `SLOW` stays True all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_holds_its_node_until_a_late_successor_reports() -> anyhow::Result<()> {
    const SLOW: usize = 3;
    const SILENT: usize = 7;
    let Some(cluster) = Cluster::start(N, 5).await? else {
        return Ok(());
    };
    let agg = Aggregator::spawn(&cluster, "agg-0", &config("restart_grace_ms = 120000"));
    let fleet = AgentFleet::start(N, agg.grpc).await;
    all_true(&cluster, 0..N).await;
    let history = History::record(&cluster);

    fleet.pause(&[SLOW, SILENT]);
    let old_seq = fleet.restart(SLOW).await;
    eventually(30, "the old agent's stop notice taken", || async {
        (agg.metric(STOP_NOTICES).await.unwrap_or(0.0) >= 1.0).then_some(())
    })
    .await;
    eventually(30, &format!("the silent node-{SILENT} Unknown"), || async {
        (cluster.overall(SILENT).await.as_deref() == Some("Unknown")).then_some(())
    })
    .await;
    assert_eq!(
        cluster.overall(SLOW).await.as_deref(),
        Some("True"),
        "node-{SLOW}, its agent stopped on purpose as long ago"
    );
    fleet.resume(&[SLOW, SILENT]);
    eventually(60, "the new agent's first windows acknowledged", || async {
        (fleet.seq(SLOW) > 3 && fleet.buffered(SLOW) == 0).then_some(())
    })
    .await;
    eventually(30, &format!("node-{SILENT} True again"), || async {
        (cluster.overall(SILENT).await.as_deref() == Some("True")).then_some(())
    })
    .await;
    assert_eq!(
        history.statuses(SLOW),
        ["True".to_string()].into(),
        "node-{SLOW} through its slow rollout (never Unknown, never False)"
    );
    assert!(old_seq > 0, "the old agent had reported");
    let logged = agg
        .log()
        .lines()
        .any(|l| l.contains("agent stopping") && l.contains(&node_name(SLOW)));
    assert!(logged, "the aggregator logged node-{SLOW}'s stop notice");
    Ok(())
}
