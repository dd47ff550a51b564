//! Issue 15, point 4: a half-open agent connection (partitioned: the TCP connection stays open,
//! no byte moves) no longer holds its stream slot forever. The server PINGs idle HTTP/2
//! connections and drops the ones that do not answer, which ends their streams and frees their
//! per-identity slots, so the agent's new stream is admitted.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

mod common;
mod faults_support;

use std::collections::BTreeSet;

use common::*;
use faults_support::{Link, Proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_stream_frees_its_slot() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(2, 2).await? else {
        return Ok(());
    };
    // One stream per node (insecure mode: per claimed node); short keepalive for the test.
    let agg = Aggregator::spawn(
        &cluster,
        "agg-0",
        &config_with_security(
            "dry_run = true",
            "max_streams_per_identity = 1\nkeepalive_interval_ms = 300\nkeepalive_timeout_ms = 300\n",
        ),
    );
    let none = BTreeSet::new();
    let proxy = Proxy::start(agg.grpc).await;
    let mut partitioned = eventually(30, "stream through the proxy", || async {
        open_stream(&format!("http://{}", proxy.addr)).await.ok()
    })
    .await;
    assert_eq!(
        send_summary(&mut partitioned, summary(0, 2, 1, &none)).await.unwrap(),
        1
    );

    // The link goes dark (half-open): the agent reconnects directly and must get its slot.
    proxy.set(Link::Blackhole);
    let seq = eventually(30, "the new stream is admitted", || async {
        let mut stream = open_stream(&agg.endpoint()).await.ok()?;
        send_summary(&mut stream, summary(0, 2, 2, &none)).await.ok()
    })
    .await;
    assert_eq!(seq, 2);
    assert!(
        agg.metric("graywatch_aggregator_denied_total{reason=\"too_many_streams\"}")
            .await
            .is_some_and(|v| v >= 1.0),
        "the slot was held while the dead stream was alive"
    );
    drop(partitioned);
    Ok(())
}
