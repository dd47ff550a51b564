//! Two aggregator replicas: kill the leader → the other takes over and no action is duplicated.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_follower_takes_over_without_duplicate_actions() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(10, 5).await? else {
        return Ok(());
    };
    let mut a = Aggregator::spawn(&cluster, "agg-a", &config(""));
    let mut b = Aggregator::spawn(&cluster, "agg-b", &config(""));
    // Agents report to both replicas (followers ingest too).
    let fleet = Fleet::start(10, vec![a.endpoint(), b.endpoint()]);
    let first = eventually(30, "a leader", || async { cluster.lease_holder().await }).await;
    all_true(&cluster, 0..10).await;

    fleet.set_bad(&[4]);
    eventually(40, "node-4 tainted", || async {
        cluster.tainted().await.contains("node-4").then_some(())
    })
    .await;
    eventually(10, "one taint Event", || async {
        (cluster.count_events("node-4", "GrayFailureTaint").await == 1).then_some(())
    })
    .await;

    // Crash the leader (SIGKILL: no lease release).
    let (dead, survivor) = if first == a.identity {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    dead.kill();
    cluster.await_leader(survivor.identity.as_str()).await;

    // The new leader acts on recovery (so it is deciding), and repeats nothing it found done.
    fleet.set_bad(&[]);
    eventually(40, "node-4 untainted by the new leader", || async {
        cluster.tainted().await.is_empty().then_some(())
    })
    .await;
    eventually(10, "one untaint Event", || async {
        (cluster.count_events("node-4", "GrayFailureUntaint").await == 1).then_some(())
    })
    .await;
    assert_eq!(cluster.count_events("node-4", "GrayFailureTaint").await, 1);
    assert_eq!(cluster.count_events("node-4", "GrayFailureDetected").await, 1);
    assert_eq!(cluster.count_events("node-4", "GrayFailureCleared").await, 1);
    assert!(survivor.log().contains("became leader"));
    Ok(())
}
