//! Issue 15, point 2, on the real apiserver with the real binary and gRPC clients:
//! * an acting mode (direct taint, nrc) with `auth = "insecure-none"` refuses to start, naming
//!   the field and the loudly named override; dry-run still starts unauthenticated;
//! * a summary for a name that is no Node is refused (`NOT_FOUND`, `denied{reason="unknown_node"}`);
//! * the reports of a deleted Node are evicted from the fleet view (`fleet_reports`).

#![allow(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

mod common;

use std::collections::BTreeSet;

use common::*;
use kube::api::DeleteParams;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acting_without_identity_refuses_to_start_unless_loudly_allowed() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(2, 2).await? else {
        return Ok(());
    };
    for mode in ["direct", "nrc"] {
        let mut agg = Aggregator::spawn(
            &cluster,
            &format!("agg-{mode}"),
            &config_with_security(&format!("taint_mode = \"{mode}\""), ""),
        );
        let status = agg.exited(30).await;
        assert_eq!(status.code(), Some(2), "{mode}: {}", agg.log());
        let log = agg.log();
        assert!(log.contains("security.auth"), "{mode}: {log}");
        assert!(log.contains("insecure_allow_acting_without_identity"), "{mode}: {log}");
    }
    assert_eq!(cluster.lease_holder().await, None, "a refused aggregator never led");
    // Dry-run decides nothing: it may run unauthenticated.
    let _shadow = Aggregator::spawn(&cluster, "agg-shadow", &config_with_security("dry_run = true", ""));
    cluster.await_leader("agg-shadow").await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_node_names_are_refused_and_deleted_nodes_evicted() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(3, 3).await? else {
        return Ok(());
    };
    let agg = Aggregator::spawn(&cluster, "agg-0", &config(""));
    let fleet = Fleet::start(3, vec![agg.endpoint()]);
    eventually(30, "3 reports in the fleet view", || async {
        (agg.metric("graywatch_aggregator_fleet_reports").await == Some(3.0)).then_some(())
    })
    .await;

    // A made-up node name with a fresh boot id: refused, counted.
    let mut s = summary(0, 3, 1, &BTreeSet::new());
    if let Some(n) = s.node.as_mut() {
        n.node_name = "node-99".into();
        n.boot_id = "fresh".into();
    }
    let mut stream = open_stream(&agg.endpoint()).await.expect("stream opens");
    let err = send_summary(&mut stream, s).await.expect_err("node-99 is no Node");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("node-99"), "{}", err.message());
    assert_eq!(
        agg.metric("graywatch_aggregator_denied_total{reason=\"unknown_node\"}")
            .await,
        Some(1.0)
    );

    // node-2 is deleted while its agent keeps reporting: its report is evicted and new ones
    // are refused.
    cluster.nodes().delete(&node_name(2), &DeleteParams::default()).await?;
    eventually(30, "node-2's report evicted", || async {
        (agg.metric("graywatch_aggregator_fleet_reports").await == Some(2.0)).then_some(())
    })
    .await;
    eventually(30, "node-2's summaries refused", || async {
        agg.metric("graywatch_aggregator_denied_total{reason=\"unknown_node\"}")
            .await
            .filter(|v| *v >= 2.0)
    })
    .await;
    assert!(!cluster.tainted().await.contains("node-2"));
    drop(fleet);
    Ok(())
}
