//! EKS VPC CNI: pod IPs are secondary ENI addresses from the VPC subnet, outside any podCIDR.
//! Every agent reports its node's pod IPs; what the others measure towards those IPs is then
//! evidence about that node (vantage), as it is for InternalIPs and pod CIDRs.

mod common;

use std::{collections::BTreeSet, time::Duration};

use common::*;
use graywatch_proto::v1::{NodeSummary, PodAddresses, directive, ingest_client::IngestClient};
use tokio::sync::mpsc;

const N: usize = 6;

/// Node `i`'s one pod: an address in no podCIDR (the nodes' are 10.244.i.0/24).
fn pod_ip(i: usize) -> String {
    format!("192.168.{}.17", 100 + i)
}

/// `summary` with every peer named by the remote node's pod IP, and this node's pod IP.
fn pod_summary(i: usize, seq: u64, bad: &BTreeSet<usize>) -> NodeSummary {
    let mut s = summary(i, N, seq, bad);
    let others: Vec<usize> = (0..N).filter(|j| *j != i).collect();
    for (peer, j) in s.peers.iter_mut().zip(others) {
        peer.remote_addr = pod_ip(j);
    }
    s.pod_addresses = Some(PodAddresses {
        addresses: vec![pod_ip(i)],
    });
    s
}

async fn open(endpoint: &str) -> Option<mpsc::Sender<NodeSummary>> {
    let mut client = IngestClient::connect(endpoint.to_string()).await.ok()?;
    let (tx, rx) = mpsc::channel(64);
    let mut resp = client
        .report(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .ok()?
        .into_inner();
    tokio::spawn(async move { while let Ok(Some(_)) = resp.message().await {} });
    Some(tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_named_by_pod_ips_outside_any_pod_cidr_are_evidence_about_their_node() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(N, 3).await? else {
        return Ok(());
    };
    let agg = Aggregator::spawn(&cluster, "agg-0", &config(""));
    let endpoint = agg.endpoint();
    let bad = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let fleet_bad = bad.clone();
    let fleet = tokio::spawn(async move {
        let mut streams: Vec<Option<mpsc::Sender<NodeSummary>>> = vec![None; N];
        for seq in 1u64.. {
            let bad = fleet_bad.lock().map(|b| b.clone()).unwrap_or_default();
            for (i, stream) in streams.iter_mut().enumerate() {
                let s = pod_summary(i, seq, &bad);
                let sent = match stream {
                    Some(tx) => tx.send(s.clone()).await.is_ok(),
                    None => false,
                };
                if !sent {
                    *stream = open(&endpoint).await;
                    if let Some(tx) = stream {
                        let _ = tx.send(s).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    });

    for i in 0..N {
        eventually(30, &format!("node-{i} Healthy=True"), || async {
            (cluster.overall(i).await.as_deref() == Some("True")).then_some(())
        })
        .await;
    }
    if let Ok(mut b) = bad.lock() {
        b.insert(3);
    }
    let message = eventually(30, "node-3 NetworkLatencyHealthy=False", || async {
        let n = cluster.node(3).await;
        let c = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "graywatch.io/NetworkLatencyHealthy"))
            .cloned()?;
        (c.status == "False").then(|| c.message.unwrap_or_default())
    })
    .await;
    // Every other node measured node-3 only through its pod IP: without the reported pod IPs
    // no observer maps to node-3 and the message has no vantage part.
    assert!(
        message.contains(&format!("{}/{} peers see it degraded", N - 1, N - 1)),
        "vantage evidence through pod IPs: {message}"
    );
    // The aggregator hands the agents its peer book: node-3's reported pod IP is in node-3's
    // entry, so the agents fold traffic to it into node-3's peer.
    let mut client = IngestClient::connect(agg.endpoint()).await?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(pod_summary(0, 1_000_000, &BTreeSet::new())).await?;
    let mut directives = client
        .report(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let wanted = format!("{}/32", pod_ip(3));
    // In pages: the first resets, the last has `more` unset.
    let entry = tokio::time::timeout(Duration::from_secs(30), async {
        let mut held = std::collections::BTreeMap::new();
        let mut pages = 0;
        while let Some(d) = directives.message().await? {
            let Some(directive::Kind::PeerBookDelta(page)) = d.kind else {
                continue;
            };
            assert_eq!(page.reset, pages == 0, "only the first page after connect resets");
            pages += 1;
            for name in &page.remove {
                held.remove(name);
            }
            held.extend(page.upsert.into_iter().map(|n| (n.node_name.clone(), n)));
            if !page.more
                && let Some(node) = held.remove("node-3")
            {
                return Ok::<_, tonic::Status>(Some(node));
            }
        }
        Ok(None)
    })
    .await??
    .expect("a peer book on the stream");
    assert!(entry.pod_cidrs.contains(&wanted), "{entry:?}");
    assert_eq!(entry.addresses, vec![node_ip(3)], "InternalIPs");
    drop(tx);
    fleet.abort();
    Ok(())
}
