//! SIGTERM: the leader drains, releases its Lease and exits 0; the other replica takes over and
//! carries on (removes the taint on recovery) without repeating what was done.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_lease_and_the_follower_continues() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(10, 5).await? else {
        return Ok(());
    };
    let mut a = Aggregator::spawn(&cluster, "agg-a", &config(""));
    let mut b = Aggregator::spawn(&cluster, "agg-b", &config(""));
    let fleet = Fleet::start(10, vec![a.endpoint(), b.endpoint()]);
    let first = eventually(30, "a leader", || async { cluster.lease_holder().await }).await;
    fleet.set_bad(&[8]);
    eventually(40, "node-8 tainted", || async {
        cluster.tainted().await.contains("node-8").then_some(())
    })
    .await;

    let (leader, survivor) = if first == a.identity {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    let status = leader.terminate().await;
    assert!(status.success(), "clean exit: {status:?}\n{}", leader.log());
    assert!(leader.log().contains("released the lease"), "{}", leader.log());
    // Open agent streams were ended by the server, not cut by the drain timeout.
    assert!(!leader.log().contains("did not drain"), "{}", leader.log());
    cluster.await_leader(survivor.identity.as_str()).await;
    fleet.set_bad(&[]);
    eventually(40, "node-8 untainted", || async {
        cluster.tainted().await.is_empty().then_some(())
    })
    .await;
    eventually(10, "one untaint Event", || async {
        (cluster.count_events("node-8", "GrayFailureUntaint").await == 1).then_some(())
    })
    .await;
    assert_eq!(cluster.count_events("node-8", "GrayFailureTaint").await, 1);
    Ok(())
}
