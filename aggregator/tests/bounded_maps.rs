//! Issue 16, point 2, on the real apiserver with the real binary and gRPC clients: the maps
//! that grow with nodes and streams shrink again (`map_entries{map}`):
//! * a deleted Node's report, pod IPs and latency bookkeeping are gone;
//! * streams that open, report and close leave no entry in the per-identity limiter once their
//!   bucket has refilled (the reconnect grace).

#![allow(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

mod common;

use std::collections::BTreeSet;

use common::*;
use graywatch_proto::v1::PodAddresses;
use kube::api::DeleteParams;

const N: usize = 3;

/// Refills one token per millisecond: an ended stream's identity may be forgotten at once.
const FAST_REFILL: &str = "summaries_per_second = 1000.0\nsummary_burst = 5\n";

async fn entries(agg: &Aggregator, map: &str) -> Option<f64> {
    agg.metric(&format!("graywatch_aggregator_map_entries{{map=\"{map}\"}}"))
        .await
}

async fn until_entries(agg: &Aggregator, want: &[(&str, f64)], what: &str) {
    eventually(30, what, || async {
        for (map, n) in want {
            let got = entries(agg, map).await;
            if got != Some(*n) {
                eprintln!("{what}: {map} has {got:?} entries, waiting for {n}");
                return None;
            }
        }
        Some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_nodes_and_ended_streams_leave_no_entries() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(N, N).await? else {
        return Ok(());
    };
    let agg = Aggregator::spawn(&cluster, "agg-0", &config_with_security("dry_run = true", FAST_REFILL));
    eventually(30, "the aggregator leads", || async {
        (cluster.lease_holder().await.as_deref() == Some("agg-0")).then_some(())
    })
    .await;

    // One stream per node, each with a window and its pod IPs.
    let mut streams = Vec::new();
    for i in 0..N {
        let mut stream = open_stream(&agg.endpoint()).await.expect("stream opens");
        let mut s = summary(i, N, 1, &BTreeSet::new());
        s.pod_addresses = Some(PodAddresses {
            addresses: vec![format!("192.168.100.{}", i + 1)],
        });
        send_summary(&mut stream, s).await.expect("acked");
        streams.push(stream);
    }
    let all = f64::from(u32::try_from(N).unwrap());
    until_entries(
        &agg,
        &[
            ("fleet_reports", all),
            ("pod_addresses", all),
            ("seen_windows", all),
            ("limiter_identities", all),
        ],
        "every node in every map",
    )
    .await;

    // node-2 is deleted: its entries go (its stream, still open, keeps its limiter slot).
    cluster.nodes().delete(&node_name(2), &DeleteParams::default()).await?;
    until_entries(
        &agg,
        &[
            ("fleet_reports", all - 1.0),
            ("pod_addresses", all - 1.0),
            ("seen_windows", all - 1.0),
            ("limiter_identities", all),
        ],
        "node-2's entries evicted",
    )
    .await;

    // The streams end: nothing is left in the limiter.
    drop(streams);
    until_entries(&agg, &[("limiter_identities", 0.0)], "ended streams forgotten").await;

    // Many streams open, report and close (up to the per-identity maximum, default 4):
    // back to empty again.
    for round in 0..3u64 {
        let mut open = Vec::new();
        for i in 0..N - 1 {
            for _ in 0..4 {
                let mut stream = open_stream(&agg.endpoint()).await.expect("stream opens");
                send_summary(&mut stream, summary(i, N, 2 + round, &BTreeSet::new()))
                    .await
                    .expect("acked");
                open.push(stream);
            }
        }
        until_entries(&agg, &[("limiter_identities", 2.0)], "one identity per node").await;
        drop(open);
        until_entries(&agg, &[("limiter_identities", 0.0)], "streams of the round forgotten").await;
    }
    assert_eq!(
        agg.metric("graywatch_aggregator_map_full_total{map=\"limiter_identities\"}")
            .await,
        None,
        "no cap was hit"
    );
    Ok(())
}
