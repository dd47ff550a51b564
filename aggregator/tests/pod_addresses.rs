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

/// Names every peer of node `i`'s window by the remote node's pod IP and adds this node's pod IP.
fn to_pod_ips(i: usize, s: &mut NodeSummary) {
    let others: Vec<usize> = (0..N).filter(|j| *j != i).collect();
    for (peer, j) in s.peers.iter_mut().zip(others) {
        peer.remote_addr = pod_ip(j);
    }
    s.pod_addresses = Some(PodAddresses {
        addresses: vec![pod_ip(i)],
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_named_by_pod_ips_outside_any_pod_cidr_are_evidence_about_their_node() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(N, 3).await? else {
        return Ok(());
    };
    let agg = Aggregator::spawn(&cluster, "agg-0", &config(""));
    let fleet = Fleet::start_shaped(N, vec![agg.endpoint()], |i, _, s| to_pod_ips(i, s));

    all_true(&cluster, 0..N).await;
    fleet.set_bad(&[3]);
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
    // The agents ask the aggregator about addresses their own Node watch cannot map: node-3's
    // reported pod IP is answered with node-3, so the agents fold traffic to it into node-3's
    // peer; an address of no node is answered unknown, and an InternalIP with its node.
    let mut client = IngestClient::connect(agg.endpoint()).await?;
    let (tx, rx) = mpsc::channel(4);
    let mut own = summary(0, N, 1_000_000, &BTreeSet::new());
    to_pod_ips(0, &mut own);
    own.address_lookups = vec![pod_ip(3), "203.0.113.9".into(), node_ip(2)];
    tx.send(own).await?;
    let mut directives = client
        .report(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let answers = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(d) = directives.message().await? {
            if let Some(directive::Kind::AddressAnswers(answers)) = d.kind {
                return Ok::<_, tonic::Status>(Some(answers));
            }
        }
        Ok(None)
    })
    .await??
    .expect("address answers on the stream");
    let owners: Vec<(&str, &str)> = answers
        .owners
        .iter()
        .map(|o| (o.address.as_str(), o.node_name.as_str()))
        .collect();
    assert_eq!(
        owners,
        [(pod_ip(3).as_str(), "node-3"), (node_ip(2).as_str(), "node-2")],
        "{answers:?}"
    );
    assert_eq!(answers.unknown, ["203.0.113.9"]);
    drop(tx);
    drop(fleet);
    Ok(())
}
