//! Malformed, oversized and wrong-version messages are rejected with a clear status; the
//! aggregator keeps serving.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

mod common;

use std::collections::BTreeSet;

use common::*;
use graywatch_proto::v1::{NodeSummary, ingest_client::IngestClient};
use tonic::Code;

/// A message that is not a `NodeSummary` on the wire: field 2 (node) as a varint.
#[derive(Clone, PartialEq, prost::Message)]
struct Garbage {
    #[prost(uint64, tag = "2")]
    node: u64,
}

async fn first_error<T>(endpoint: &str, msg: T, path: &'static str) -> tonic::Status
where
    T: prost::Message + Clone + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(
        tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<T, graywatch_proto::v1::Directive>::default();
    let req = tonic::Request::new(tokio_stream::iter(vec![msg]));
    match grpc
        .streaming(req, http::uri::PathAndQuery::from_static(path), codec)
        .await
    {
        Err(s) => s,
        Ok(resp) => {
            let mut stream = resp.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("stream ended without an error"),
                    Err(s) => return s,
                }
            }
        }
    }
}

const PATH: &str = "/graywatch.v1.Ingest/Report";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_clear_statuses_and_nothing_panics() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(2, 2).await? else {
        return Ok(());
    };
    let agg = Aggregator::spawn(&cluster, "agg-0", &config(""));
    let ep = agg.endpoint();
    eventually(30, "gRPC up", || async {
        IngestClient::connect(ep.clone()).await.ok().map(|_| ())
    })
    .await;

    let good = summary(0, 2, 1, &BTreeSet::default());

    let wrong_version = NodeSummary {
        protocol_version: 7,
        ..good.clone()
    };
    let s = first_error(&ep, wrong_version, PATH).await;
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(
        s.message().contains("unsupported protocol_version 7"),
        "{}",
        s.message()
    );

    let s = first_error(&ep, Garbage { node: 5 }, PATH).await;
    assert_eq!(s.code(), Code::Internal, "{s:?}");
    assert!(s.message().to_lowercase().contains("decode"), "{}", s.message());

    let mut huge = good.clone();
    huge.peers[0].node_name = "n".repeat(2 * 1024 * 1024);
    let s = first_error(&ep, huge, PATH).await;
    assert!(matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted), "{s:?}");

    let mut bad_addr = good.clone();
    bad_addr.peers[0].remote_addr = "not-an-ip".into();
    let s = first_error(&ep, bad_addr, PATH).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().starts_with("peers[0].remote_addr"), "{}", s.message());

    let mut bad_name = good.clone();
    if let Some(n) = bad_name.node.as_mut() {
        n.node_name = "Not A Node!".into();
    }
    let s = first_error(&ep, bad_name, PATH).await;
    assert_eq!(s.code(), Code::InvalidArgument);

    // Still serving: a good stream is accepted and the node gets its conditions.
    let mut client = IngestClient::connect(ep.clone()).await?;
    let resp = client.report(tokio_stream::iter(vec![good])).await?;
    let mut stream = resp.into_inner();
    let mut acked = false;
    while let Some(d) = stream.message().await? {
        if matches!(d.kind, Some(graywatch_proto::v1::directive::Kind::Ack(a)) if a.seq == 1) {
            acked = true;
            break;
        }
    }
    assert!(acked, "good summary acknowledged");
    eventually(30, "node-0 has conditions", || async {
        cluster.overall(0).await.map(|_| ())
    })
    .await;
    Ok(())
}
