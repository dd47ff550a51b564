//! Issue 15, point 3: a leader whose Lease renew hangs (a proxy in front of the apiserver
//! stalls the Lease calls only; its Node reads and writes still pass) stops acting once its
//! renew deadline passes, before the lease expires for the standby, so the two never lead at
//! once; and the standby that takes over does not get a fresh action budget.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

mod common;
mod faults_support;

use common::*;
use faults_support::{AggProc, ApiProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_with_a_hung_renew_stops_acting_before_the_standby_takes_over() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(6, 3).await? else {
        return Ok(());
    };
    let proxy = ApiProxy::start(&cluster).await;
    let [port_a, port_b, _] = graywatch_k8s_testkit::free_ports()?;
    let a = AggProc::spawn_via(&proxy.kubeconfig, "agg-a", &config(""), port_a);
    cluster.await_leader("agg-a").await;
    let b = AggProc::spawn(&cluster, "agg-b", &config(""), port_b);
    let _fleet = Fleet::start(6, vec![format!("http://{}", a.grpc), format!("http://{}", b.grpc)]);
    faults_support::all_true(&cluster, 0..6).await;
    assert_eq!(a.metric("graywatch_aggregator_is_leader").await, Some(1.0));

    // agg-a's renew hangs from now on; everything else it does still reaches the apiserver.
    proxy.stall_leases(true);
    // The standby takes over once the lease has expired on its clock. At the moment it is first
    // seen holding the Lease, agg-a must already have stopped acting.
    eventually(30, "agg-b takes over", || async {
        let a_leads = a.metric("graywatch_aggregator_is_leader").await;
        if cluster.lease_holder().await.as_deref() == Some("agg-b") {
            assert_ne!(a_leads, Some(1.0), "agg-a still acting while agg-b holds the Lease");
            return Some(());
        }
        None
    })
    .await;
    eventually(30, "agg-b acting", || async {
        (b.metric("graywatch_aggregator_is_leader").await == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(a.metric("graywatch_aggregator_is_leader").await, Some(0.0));
    assert!(a.log().contains("stepping down"), "agg-a log:\n{}", a.log());
    drop(proxy);
    Ok(())
}
