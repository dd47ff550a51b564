//! Agent identity on the real apiserver: a projected ServiceAccount token bound to a pod on
//! node-0 (TokenRequest with our audience and a boundObjectRef) is verified by the aggregator
//! with TokenReview + a pod lookup. The stream may report for node-0 only: a summary claiming
//! node-1 is refused with `PERMISSION_DENIED` and counted; missing, foreign-audience and
//! stale-pod tokens are refused too; per-identity stream and rate limits answer
//! `RESOURCE_EXHAUSTED`.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

mod common;

use std::{
    collections::BTreeSet,
    io::{Read, Write},
};

use common::*;
use graywatch_proto::v1::ingest_client::IngestClient;
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Pod, ServiceAccount},
};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use tonic::Code;

const AUDIENCE: &str = "graywatch-test";

async fn agent_pod(cluster: &Cluster, name: &str, node: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), NS);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"nodeName": node, "serviceAccountName": "agent",
                 "containers": [{"name": "agent", "image": "graywatch-agent:test"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap()
}

/// A token for ServiceAccount graywatch/agent bound to `pod`, for `audience`.
async fn token_for(cluster: &Cluster, pod: &Pod, audience: &str) -> String {
    token_with_lifetime(cluster, pod, audience, 3600).await
}

/// Like [`token_for`] with the given lifetime (tokens of one pod differ by it).
async fn token_with_lifetime(cluster: &Cluster, pod: &Pod, audience: &str, secs: i64) -> String {
    let sas: Api<ServiceAccount> = Api::namespaced(cluster.client.clone(), NS);
    let req = TokenRequest {
        metadata: ObjectMeta::default(),
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            expiration_seconds: Some(secs),
        },
        status: None,
    };
    let out = sas
        .create_token_request("agent", &PostParams::default(), &req)
        .await
        .unwrap();
    out.status.unwrap().token
}

/// The aggregator's /metrics (its HTTP port is in the "listening" log line).
fn metrics(agg: &Aggregator) -> String {
    let log = strip_ansi(&agg.log());
    let addr = log
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .expect("listening line with http=")
        .to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "counters are whole non-negative numbers printed as floats"
)]
fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

async fn wait_up(agg: &Aggregator) {
    let ep = agg.endpoint();
    eventually(30, "gRPC up", || async {
        IngestClient::connect(ep.clone()).await.ok().map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(clippy::too_many_lines, reason = "one end-to-end scenario, read top to bottom")]
async fn a_node_claiming_another_node_is_refused() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(2, 2).await? else {
        return Ok(());
    };
    let sas: Api<ServiceAccount> = Api::namespaced(cluster.client.clone(), NS);
    sas.create(
        &PostParams::default(),
        &ServiceAccount {
            metadata: ObjectMeta {
                name: Some("agent".into()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await?;
    let pod_a = agent_pod(&cluster, "agent-a", &node_name(0)).await;
    let token_a = token_for(&cluster, &pod_a, AUDIENCE).await;

    let security = format!(
        "auth = \"token-review\"\ntoken_audience = \"{AUDIENCE}\"\nallowed_service_accounts = [\"{NS}:agent\"]\n\
         insecure_allow_plaintext_tokens = true\n"
    );
    let agg = Aggregator::spawn(&cluster, "agg-0", &config_with_security("", &security));
    wait_up(&agg).await;
    let ep = agg.endpoint();
    let none = BTreeSet::default();

    // The honest agent: its own node is accepted and acknowledged.
    let mut honest = open_stream_with_token(&ep, Some(&token_a)).await.expect("admitted");
    assert_eq!(
        send_summary(&mut honest, summary(0, 2, 1, &none)).await.expect("ack"),
        1
    );

    // The same identity claiming node-1: PERMISSION_DENIED naming both nodes.
    let mut liar = open_stream_with_token(&ep, Some(&token_a)).await.expect("admitted");
    let s = send_summary(&mut liar, summary(1, 2, 1, &none))
        .await
        .expect_err("refused");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("\"node-1\"") && s.message().contains("\"node-0\""),
        "{}",
        s.message()
    );
    // Also mid-stream: an admitted stream that switches to another node is cut off.
    assert_eq!(
        send_summary(&mut honest, summary(0, 2, 2, &none)).await.expect("ack"),
        2
    );
    let s = send_summary(&mut honest, summary(1, 2, 3, &none))
        .await
        .expect_err("refused");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");

    // No token, a token for another audience, garbage: UNAUTHENTICATED.
    let s = open_stream_with_token(&ep, None).await.expect_err("no token");
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let other = token_for(&cluster, &pod_a, "some-other-audience").await;
    let s = open_stream_with_token(&ep, Some(&other)).await.expect_err("audience");
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = open_stream_with_token(&ep, Some("not-a-token"))
        .await
        .expect_err("garbage");
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");

    // The pod is deleted: a token of it that was never reviewed admits no one. One reviewed
    // before stays admitted from the review cache (for its own node only) until the token or
    // the cache entry (security.review_cache_max_ms) expires: the documented bound.
    let pod_b = agent_pod(&cluster, "agent-b", &node_name(1)).await;
    let token_b = token_for(&cluster, &pod_b, AUDIENCE).await;
    let unused_b = token_with_lifetime(&cluster, &pod_b, AUDIENCE, 3000).await;
    let mut ok_b = open_stream_with_token(&ep, Some(&token_b)).await.expect("admitted");
    assert_eq!(send_summary(&mut ok_b, summary(1, 2, 1, &none)).await.expect("ack"), 1);
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), NS);
    pods.delete("agent-b", &DeleteParams::default().grace_period(0)).await?;
    eventually(30, "pod agent-b gone", || async {
        pods.get_opt("agent-b").await.unwrap().is_none().then_some(())
    })
    .await;
    let s = open_stream_with_token(&ep, Some(&unused_b))
        .await
        .expect_err("deleted pod");
    assert!(
        matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied),
        "{s:?}"
    );
    let mut cached_b = open_stream_with_token(&ep, Some(&token_b))
        .await
        .expect("cached review");
    let s = send_summary(&mut cached_b, summary(0, 2, 1, &none))
        .await
        .expect_err("still bound to node-1");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");

    // The honest node got its conditions from its own data.
    eventually(30, "node-0 has conditions", || async {
        cluster.overall(0).await.map(|_| ())
    })
    .await;

    let m = metrics(&agg);
    assert_eq!(
        metric(&m, "graywatch_aggregator_denied_total{reason=\"node_mismatch\"}"),
        3,
        "{m}"
    );
    assert_eq!(
        metric(&m, "graywatch_aggregator_denied_total{reason=\"missing_token\"}"),
        1,
        "{m}"
    );
    assert!(
        metric(&m, "graywatch_aggregator_denied_total{reason=\"token_rejected\"}") >= 1,
        "{m}"
    );
    assert!(
        metric(&m, "graywatch_aggregator_rejected_total{result=\"PermissionDenied\"}") >= 2,
        "{m}"
    );
    assert!(agg.log().contains("node_mismatch"), "refusals are logged");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_identity_stream_and_rate_limits() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(2, 2).await? else {
        return Ok(());
    };
    let sas: Api<ServiceAccount> = Api::namespaced(cluster.client.clone(), NS);
    sas.create(
        &PostParams::default(),
        &ServiceAccount {
            metadata: ObjectMeta {
                name: Some("agent".into()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await?;
    let pod_a = agent_pod(&cluster, "agent-a", &node_name(0)).await;
    let token_a = token_for(&cluster, &pod_a, AUDIENCE).await;
    // Rate ~0: the burst is all there is, so the count is exact whatever the timing.
    let security = format!(
        "auth = \"token-review\"\ntoken_audience = \"{AUDIENCE}\"\nmax_streams_per_identity = 1\n\
         summaries_per_second = 0.0001\nsummary_burst = 3\ninsecure_allow_plaintext_tokens = true\n"
    );
    let agg = Aggregator::spawn(&cluster, "agg-0", &config_with_security("", &security));
    wait_up(&agg).await;
    let ep = agg.endpoint();
    let none = BTreeSet::default();

    let mut first = open_stream_with_token(&ep, Some(&token_a)).await.expect("admitted");
    assert_eq!(send_summary(&mut first, summary(0, 2, 1, &none)).await.expect("ack"), 1);
    let s = open_stream_with_token(&ep, Some(&token_a))
        .await
        .expect_err("second stream");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("at most 1"), "{}", s.message());

    assert_eq!(send_summary(&mut first, summary(0, 2, 2, &none)).await.expect("ack"), 2);
    assert_eq!(send_summary(&mut first, summary(0, 2, 3, &none)).await.expect("ack"), 3);
    let s = send_summary(&mut first, summary(0, 2, 4, &none))
        .await
        .expect_err("over the burst");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("summaries"), "{}", s.message());

    // The first stream ended, so its slot is free again (but the bucket is still empty).
    let mut again = eventually(30, "slot released", || async {
        open_stream_with_token(&ep, Some(&token_a)).await.ok()
    })
    .await;
    let s = send_summary(&mut again, summary(0, 2, 5, &none))
        .await
        .expect_err("bucket shared across streams");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");

    let m = metrics(&agg);
    assert!(
        metric(&m, "graywatch_aggregator_denied_total{reason=\"too_many_streams\"}") >= 1,
        "{m}"
    );
    assert_eq!(
        metric(&m, "graywatch_aggregator_denied_total{reason=\"rate_limited\"}"),
        2,
        "{m}"
    );
    Ok(())
}

/// Issue 15, point 4: streams without a token are refused without a TokenReview and do not spend
/// the global review budget; a reconnecting agent is admitted from the review cache, so a budget
/// of 2 reviews admits it any number of times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenless_streams_spend_no_review_budget_and_reviews_are_cached() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(2, 2).await? else {
        return Ok(());
    };
    let sas: Api<ServiceAccount> = Api::namespaced(cluster.client.clone(), NS);
    sas.create(
        &PostParams::default(),
        &ServiceAccount {
            metadata: ObjectMeta {
                name: Some("agent".into()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await?;
    let pod_a = agent_pod(&cluster, "agent-a", &node_name(0)).await;
    let token_a = token_for(&cluster, &pod_a, AUDIENCE).await;
    // Rate ~0: two reviews is all the budget there is.
    let security = format!(
        "auth = \"token-review\"\ntoken_audience = \"{AUDIENCE}\"\ninsecure_allow_plaintext_tokens = true\n\
         auth_attempts_per_second = 0.0001\nauth_attempt_burst = 2\n"
    );
    let agg = Aggregator::spawn(&cluster, "agg-0", &config_with_security("", &security));
    wait_up(&agg).await;
    let ep = agg.endpoint();
    let none = BTreeSet::default();

    for _ in 0..20 {
        let s = open_stream_with_token(&ep, None).await.expect_err("no token");
        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    }
    for seq in 1..=6 {
        let mut stream = open_stream_with_token(&ep, Some(&token_a))
            .await
            .expect("the agent is admitted");
        assert_eq!(
            send_summary(&mut stream, summary(0, 2, seq, &none)).await.expect("ack"),
            seq
        );
    }
    let m = metrics(&agg);
    assert_eq!(metric(&m, "graywatch_aggregator_token_reviews_total"), 1, "{m}");
    assert_eq!(
        metric(&m, "graywatch_aggregator_token_review_cache_hits_total"),
        5,
        "{m}"
    );
    assert_eq!(
        metric(&m, "graywatch_aggregator_denied_total{reason=\"missing_token\"}"),
        20,
        "{m}"
    );
    assert_eq!(
        metric(&m, "graywatch_aggregator_denied_total{reason=\"auth_rate_limited\"}"),
        0,
        "{m}"
    );
    Ok(())
}
