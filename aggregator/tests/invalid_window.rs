//! Issue 16.1: the aggregator refuses a window with more than `ingest.max_peers` peers and ends
//! the stream; the agent replayed that same window first on every reconnect, so nothing after it
//! was ever accepted. The real report client against the real aggregator: the refused window is
//! dropped and counted, the windows after it are accepted.

mod common;

use std::{collections::BTreeSet, sync::atomic::Ordering, time::Duration};

use common::*;
use graywatch_agent::report::{ReportConfig, Reporter};
use graywatch_proto::v1::PeerStats;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_refused_as_invalid_is_dropped_and_the_next_ones_are_accepted() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(3, 3).await? else {
        return Ok(());
    };
    let agg = Aggregator::spawn(&cluster, "agg-0", &config(""));
    let reporter = Reporter::spawn(ReportConfig {
        endpoint: agg.endpoint(),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        ..Default::default()
    });
    let quiet = BTreeSet::new();
    reporter.push(summary(0, 3, 1, &quiet));
    // Window 2 carries 5,000 peers: more than the aggregator's 4,096.
    let mut oversized = summary(0, 3, 2, &quiet);
    oversized.peers = (0..5_000u32)
        .map(|i| PeerStats {
            remote_addr: std::net::Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + u128::from(i))
                .to_string(),
            rtt_samples: 1,
            rtt_p50_us: 100.0,
            rtt_p99_us: 100.0,
            segments_out: 1,
            ..Default::default()
        })
        .collect();
    reporter.push(oversized);
    for seq in 3..=5 {
        reporter.push(summary(0, 3, seq, &quiet));
    }
    eventually(30, "every window acknowledged or dropped", || async {
        (reporter.buffered() == 0).then_some(())
    })
    .await;
    assert_eq!(
        reporter.stats().invalid.load(Ordering::Relaxed),
        1,
        "the oversized window"
    );
    // 1, 3, 4, 5 ingested; 2 refused once (not on every reconnect).
    assert_eq!(
        agg.metric("graywatch_aggregator_summaries_total{result=\"new\"}").await,
        Some(4.0)
    );
    assert_eq!(
        agg.metric("graywatch_aggregator_rejected_total{result=\"InvalidArgument\"}")
            .await,
        Some(1.0)
    );
    reporter.shutdown().await;
    Ok(())
}
