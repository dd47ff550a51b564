//! The peer book's connect burst is bounded: at most `ingest.max_streams_paging_book` streams
//! page the book at once. A stream waiting for its turn still acks its summaries, and an agent
//! that stops reading its directives while it is owed the book loses its stream instead of
//! holding the slot from everyone else.

mod common;

use std::{collections::BTreeSet, time::Duration};

use common::*;
use graywatch_proto::v1::{Directive, NodeSummary, PodAddresses, directive, ingest_client::IngestClient};
use tokio::sync::mpsc;
use tonic::Streaming;

/// Nodes whose agents report many pod IPs (their book entries are a page each).
const FEEDERS: usize = 5;
/// The agent that stops reading, and the one that waits behind it.
const STALLED: usize = FEEDERS;
const WAITING: usize = FEEDERS + 1;
const N: usize = FEEDERS + 2;
/// Pod IPs per feeder: about 120 KB of book entry each, so the whole book is far more than a
/// stream buffers (two queued pages and HTTP/2's 64 KiB window).
const PODS: u16 = 4000;

fn with_pods(i: usize, mut s: NodeSummary) -> NodeSummary {
    s.pod_addresses = Some(PodAddresses {
        addresses: (0..PODS).map(|p| format!("fd00:0:0:{i}::{p:x}")).collect(),
    });
    s
}

/// A stream whose first window is `first`. With `small_window` the client grants only HTTP/2's
/// initial 64 KiB flow-control window (hyper's client default is 2 MiB per stream, more than
/// the whole book here), so a client that stops reading soon stops the server's pages.
async fn open(
    endpoint: &str,
    first: NodeSummary,
    small_window: bool,
) -> anyhow::Result<(mpsc::Sender<NodeSummary>, Streaming<Directive>)> {
    let mut channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?;
    if small_window {
        channel = channel
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535);
    }
    let mut client = IngestClient::new(channel.connect().await?);
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await?;
    let directives = client
        .report(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, directives))
}

fn page_of(d: &Directive) -> Option<&graywatch_proto::v1::PeerBookDelta> {
    match &d.kind {
        Some(directive::Kind::PeerBookDelta(page)) => Some(page),
        _ => None,
    }
}

/// Reads `stream` to its end: whether the last book page it held said more was to come.
async fn last_page_says_more(stream: &mut Streaming<Directive>) -> bool {
    let mut more = true;
    while let Ok(Some(d)) = stream.message().await {
        if let Some(page) = page_of(&d) {
            more = page.more;
        }
    }
    more
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_page_the_book_in_turn_and_a_stalled_one_gives_its_turn_up() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(N, 3).await? else {
        return Ok(());
    };
    let agg = Aggregator::spawn(
        &cluster,
        "agg-0",
        &format!("{}\n[ingest]\nmax_streams_paging_book = 1\n", config("")),
    );
    let endpoint = agg.endpoint();
    eventually(30, "gRPC up", || async {
        IngestClient::connect(endpoint.clone()).await.ok().map(|_| ())
    })
    .await;

    // The feeders report their pod IPs and read everything they are sent; the first of them
    // tells when its book holds every feeder's pods.
    let (complete_tx, mut complete) = tokio::sync::watch::channel(false);
    let mut feeders = Vec::new();
    for i in 0..FEEDERS {
        let (tx, mut directives) = open(&endpoint, with_pods(i, summary(i, N, 1, &BTreeSet::new())), false).await?;
        let complete_tx = complete_tx.clone();
        feeders.push((
            tx,
            tokio::spawn(async move {
                let mut held = std::collections::BTreeMap::new();
                while let Ok(Some(d)) = directives.message().await {
                    let Some(page) = page_of(&d) else { continue };
                    for name in &page.remove {
                        held.remove(name);
                    }
                    held.extend(page.upsert.iter().map(|e| (e.node_name.clone(), e.pod_cidrs.len())));
                    let full = (0..FEEDERS).all(|f| held.get(&node_name(f)).is_some_and(|n| *n >= usize::from(PODS)));
                    if i == 0 && full && !page.more {
                        let _ = complete_tx.send(true);
                    }
                }
            }),
        ));
    }
    tokio::time::timeout(Duration::from_mins(1), complete.wait_for(|c| *c)).await??;

    // An agent takes the only paging slot, reads its first page and then nothing more: its pager
    // is stuck with the rest of the book.
    let (_stalled_tx, mut stalled) = open(&endpoint, summary(STALLED, N, 1, &BTreeSet::new()), true).await?;
    let first = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stalled.message().await? {
                Some(d) if page_of(&d).is_some() => return Ok::<_, tonic::Status>(d),
                Some(_) => {}
                None => return Err(tonic::Status::aborted("stream ended before a page")),
            }
        }
    })
    .await??;
    assert!(
        page_of(&first).is_some_and(|p| p.reset && p.more),
        "the first of several pages"
    );

    // The next agent waits for the slot, and meanwhile its summaries are acked.
    let (waiting_tx, mut waiting) = open(&endpoint, summary(WAITING, N, 1, &BTreeSet::new()), false).await?;
    for seq in 1..=3 {
        let d = tokio::time::timeout(Duration::from_secs(30), waiting.message())
            .await??
            .expect("stream open");
        assert!(
            page_of(&d).is_none(),
            "no page while the stalled stream holds the only slot (got one of {} entries)",
            page_of(&d).map_or(0, |p| p.upsert.len())
        );
        assert!(
            matches!(d.kind, Some(directive::Kind::Ack(ref a)) if a.seq == seq),
            "ack of window {seq}"
        );
        waiting_tx.send(summary(WAITING, N, seq + 1, &BTreeSet::new())).await?;
    }

    // The stalled agent's stream is closed (it read nothing while owed the book), which frees
    // the slot: the waiting agent gets the whole book.
    let book = tokio::time::timeout(Duration::from_mins(1), async {
        let mut held = std::collections::BTreeMap::new();
        loop {
            let Some(d) = waiting.message().await? else {
                return Err(tonic::Status::aborted("stream ended"));
            };
            if let Some(page) = page_of(&d) {
                held.extend(page.upsert.iter().map(|e| (e.node_name.clone(), e.pod_cidrs.len())));
                if !page.more {
                    return Ok::<_, tonic::Status>(held);
                }
            }
        }
    })
    .await??;
    for f in 0..FEEDERS {
        assert!(
            book.get(&node_name(f)).is_some_and(|n| *n >= usize::from(PODS)),
            "{book:?}"
        );
    }
    // What the stalled agent still gets is what was buffered before its stream was closed: never
    // the end of the book.
    assert!(
        last_page_says_more(&mut stalled).await,
        "the stalled stream was cut off before the last page"
    );
    for (tx, task) in feeders {
        drop(tx);
        task.abort();
    }
    Ok(())
}
