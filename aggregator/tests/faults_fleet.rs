//! Fault tests with real processes: the aggregator binary, a real apiserver, and the agent's
//! real report client (buffering, replay, reconnect) behind per-agent loopback proxies.
//! In every scenario the cluster's whole history is recorded and the expected outcome is the
//! same: no wrong condition or taint (only the faulted node is ever False or tainted), missing
//! data reads as Unknown, agents replay what they measured meanwhile, and decisions resume
//! without flapping.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

mod common;
mod faults_support;

use std::{collections::BTreeSet, time::Duration};

use common::*;
use faults_support::*;

const N: usize = 10;

async fn fault_on(cluster: &Cluster, fleet: &AgentFleet, node: usize) {
    fleet.set_bad(&[node]);
    eventually(60, &format!("node-{node} tainted"), || async {
        cluster.tainted().await.contains(&node_name(node)).then_some(())
    })
    .await;
}

async fn fault_off(cluster: &Cluster, fleet: &AgentFleet, node: usize) {
    fleet.set_bad(&[]);
    eventually(60, &format!("node-{node} untainted"), || async {
        cluster.tainted().await.is_empty().then_some(())
    })
    .await;
    all_true(cluster, 0..N).await;
}

/// Exactly one detect/taint/untaint/clear for `node` and no action on any other node.
async fn assert_one_clean_episode(cluster: &Cluster, node: usize) {
    let name = node_name(node);
    // The audit Events follow the Node writes the caller waited for: await the last of them.
    eventually(
        30,
        &format!("{name}'s GrayFailureCleared and GrayFailureUntaint Events"),
        || async {
            let acts = actions(cluster).await;
            let has = |reason: &str| acts.iter().any(|(n, r)| *n == name && r == reason);
            (has("GrayFailureCleared") && has("GrayFailureUntaint")).then_some(())
        },
    )
    .await;
    let acts = actions(cluster).await;
    let others: Vec<_> = acts.iter().filter(|(n, _)| *n != name).collect();
    assert!(others.is_empty(), "actions on healthy nodes: {others:?}");
    for reason in [
        "GrayFailureDetected",
        "GrayFailureTaint",
        "GrayFailureUntaint",
        "GrayFailureCleared",
    ] {
        let c = acts.iter().filter(|(n, r)| *n == name && r == reason).count();
        assert_eq!(c, 1, "{reason} on {name} (flapping?): {acts:?}");
    }
}

fn assert_only_acted_on(history: &History, expected: &[usize]) {
    let want: BTreeSet<String> = expected.iter().map(|i| node_name(*i)).collect();
    assert_eq!(history.acted_on(), want, "nodes ever False or tainted");
}

async fn fleet_drained(fleet: &AgentFleet) {
    eventually(60, "every agent's buffer acknowledged", || async {
        (fleet.max_buffered() <= 2).then_some(())
    })
    .await;
    assert_eq!(fleet.dropped(), 0, "no measured window was lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_killed_and_restarted_mid_fault() -> anyhow::Result<()> {
    let Some((cluster, history, mut agg, fleet, port)) = start_fault_scene(N).await? else {
        return Ok(());
    };
    all_true(&cluster, 0..N).await;
    fault_on(&cluster, &fleet, 3).await;
    // The taint's audit Event is written after the taint; crash once both are there.
    eventually(30, "the taint's Event", || async {
        (cluster.count_events(&node_name(3), "GrayFailureTaint").await == 1).then_some(())
    })
    .await;

    // Crash mid-fault; the agents keep measuring into their buffers.
    agg.kill();
    let mut agg = AggProc::spawn(&cluster, "agg-1", &config(""), port);
    cluster.await_leader("agg-1").await;
    fleet_drained(&fleet).await;
    // The fault is still there: the new leader keeps the taint (no untaint/re-taint), and it
    // does decide: lifting the fault untaints.
    fault_off(&cluster, &fleet, 3).await;
    assert_one_clean_episode(&cluster, 3).await;
    assert_only_acted_on(&history, &[3]);
    agg.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_the_agents_disconnect_at_once() -> anyhow::Result<()> {
    let Some((cluster, history, _agg, fleet, _)) = start_fault_scene(N).await? else {
        return Ok(());
    };
    all_true(&cluster, 0..N).await;

    // All of zone-a (nodes 0..5) at once: worst case for a group verdict.
    let gone: Vec<usize> = (0..5).collect();
    fleet.link(&gone, Link::Refuse);
    for i in &gone {
        eventually(60, &format!("node-{i} Unknown"), || async {
            (cluster.overall(*i).await.as_deref() == Some("Unknown")).then_some(())
        })
        .await;
    }
    for i in 5..N {
        assert_eq!(cluster.overall(i).await.as_deref(), Some("True"), "node-{i}");
    }
    assert!(cluster.tainted().await.is_empty());

    fleet.link(&gone, Link::Pass);
    all_true(&cluster, 0..N).await;
    fleet_drained(&fleet).await;
    assert!(actions(&cluster).await.is_empty(), "{:?}", actions(&cluster).await);
    assert_only_acted_on(&history, &[]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_agent_goes_unknown_then_replays() -> anyhow::Result<()> {
    let Some((cluster, history, _agg, fleet, _)) = start_fault_scene(N).await? else {
        return Ok(());
    };
    all_true(&cluster, 0..N).await;
    history.reset();

    // node-6's stream is blocked (connections open, no byte moves).
    fleet.link(&[6], Link::Blackhole);
    eventually(60, "node-6 Unknown", || async {
        (cluster.overall(6).await.as_deref() == Some("Unknown")).then_some(())
    })
    .await;
    eventually(60, "node-6's agent buffers while blocked", || async {
        (fleet.buffered(6) > 20).then_some(())
    })
    .await;
    fleet.link(&[6], Link::Pass);
    all_true(&cluster, [6]).await;
    fleet_drained(&fleet).await;

    // Decisions work after the partition: a real fault there is found, on that node only.
    fault_on(&cluster, &fleet, 6).await;
    fault_off(&cluster, &fleet, 6).await;
    assert_one_clean_episode(&cluster, 6).await;
    assert_only_acted_on(&history, &[6]);
    assert!(history.statuses(6).contains("Unknown"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_between_agents_and_aggregator() -> anyhow::Result<()> {
    let Some((cluster, history, _agg, fleet, _)) = start_fault_scene(N).await? else {
        return Ok(());
    };
    // One agent an hour ahead, one an hour behind, one a day behind, from the start.
    fleet.set_skew(2, 3_600_000);
    fleet.set_skew(7, -3_600_000);
    fleet.set_skew(8, -86_400_000);
    all_true(&cluster, 0..N).await;
    // From here on (before the first report every node is Unknown).
    history.reset();
    // A fault on a skewed node is still found (and only there), and cleared.
    fault_on(&cluster, &fleet, 7).await;
    fault_off(&cluster, &fleet, 7).await;
    assert_one_clean_episode(&cluster, 7).await;
    assert_only_acted_on(&history, &[7]);
    for i in [2, 7, 8] {
        assert!(
            !history.statuses(i).contains("Unknown"),
            "skewed node-{i} read as stale"
        );
    }
    fleet_drained(&fleet).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_stopped_for_60_seconds_mid_fault() -> anyhow::Result<()> {
    let Some((cluster, history, _agg, fleet, _)) = start_fault_scene(N).await? else {
        return Ok(());
    };
    all_true(&cluster, 0..N).await;
    fault_on(&cluster, &fleet, 3).await;

    // The apiserver freezes (SIGSTOP: connections hang, nothing answers) for 60 s; the outage's
    // length is the scenario, not a synchronisation.
    let pid = cluster.api.instance().apiserver_pid();
    signal(pid, "STOP");
    tokio::time::sleep(Duration::from_mins(1)).await;
    signal(pid, "CONT");

    fleet_drained(&fleet).await;
    cluster.await_leader("agg-0").await;
    fault_off(&cluster, &fleet, 3).await;
    assert_one_clean_episode(&cluster, 3).await;
    assert_only_acted_on(&history, &[3]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_down_for_60_seconds_mid_fault() -> anyhow::Result<()> {
    let Some((mut cluster, history, agg, fleet, _)) = start_fault_scene(N).await? else {
        return Ok(());
    };
    all_true(&cluster, 0..N).await;
    fault_on(&cluster, &fleet, 3).await;

    // The apiserver process dies (connections refused) and comes back 60 s later with the same
    // etcd; the outage's length is the scenario, not a synchronisation.
    cluster.api.instance_mut().kill_apiserver();
    tokio::time::sleep(Duration::from_mins(1)).await;
    cluster.api.instance_mut().restart_apiserver()?;
    eventually(90, "apiserver back", || async {
        cluster
            .nodes()
            .list(&kube::api::ListParams::default())
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let log = agg.log();
    assert!(
        ["stepping down", "lease update failed", "reading the cluster failed"]
            .iter()
            .any(|w| log.contains(w)),
        "the aggregator saw the outage:\n{log}"
    );

    fleet_drained(&fleet).await;
    cluster.await_leader("agg-0").await;
    // Still tainted after the outage (nothing was undone), then decisions resume.
    assert!(cluster.tainted().await.contains(&node_name(3)));
    fault_off(&cluster, &fleet, 3).await;
    assert_one_clean_episode(&cluster, 3).await;
    assert_only_acted_on(&history, &[3]);
    Ok(())
}
