//! The agent's report stream over TLS (our CA, generated here) with its projected token: the
//! aggregator stand-in sees `authorization: Bearer <token>` on every stream, and a rotated
//! token file is picked up on the next connection. A client without the CA never gets through.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

use std::{
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{Stream, StreamExt};
use graywatch_agent::{
    report::{ReportConfig, Reporter},
    stream_security::StreamSecurity,
};
use graywatch_k8s_testkit::{Pki, Usage};
use graywatch_proto::{
    PROTOCOL_VERSION,
    v1::{Ack, Directive, NodeSummary, directive, ingest_server},
};
use tonic::transport::{Identity, Server, ServerTlsConfig};

/// A CA and a server certificate for 127.0.0.1/localhost (the testkit's generator).
fn gen_certs(dir: &Path) {
    let pki = Pki::create(dir, "/CN=gw-test-ca").unwrap();
    pki.sign("server", "/CN=agg", Usage::Server, &["IP:127.0.0.1", "DNS:localhost"])
        .unwrap();
}

/// Records the bearer of every stream and the seqs; acks each summary, then ends the stream.
#[derive(Clone, Default)]
struct Recorder {
    bearers: Arc<Mutex<Vec<String>>>,
    seqs: Arc<Mutex<Vec<u64>>>,
}

type Out = Pin<Box<dyn Stream<Item = Result<Directive, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl ingest_server::Ingest for Recorder {
    type ReportStream = Out;
    async fn report(
        &self,
        req: tonic::Request<tonic::Streaming<NodeSummary>>,
    ) -> Result<tonic::Response<Out>, tonic::Status> {
        let bearer = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        self.bearers.lock().unwrap().push(bearer);
        let mut inbound = req.into_inner();
        let seqs = self.seqs.clone();
        let out = async_stream_once(async move {
            let s = inbound.next().await?.ok()?;
            let seq = s.window.map_or(0, |w| w.seq);
            seqs.lock().unwrap().push(seq);
            Some(Directive {
                protocol_version: PROTOCOL_VERSION,
                kind: Some(directive::Kind::Ack(Ack { seq })),
            })
        });
        Ok(tonic::Response::new(out))
    }
}

/// A stream of at most one directive, then end.
fn async_stream_once(f: impl std::future::Future<Output = Option<Directive>> + Send + 'static) -> Out {
    Box::pin(futures::stream::once(f).filter_map(|d| async move { d.map(Ok) }))
}

fn window(seq: u64) -> NodeSummary {
    graywatch_k8s_testkit::ReportBuilder::new("n1", seq)
        .boot_id("b")
        .window_ms(0, 1)
        .build()
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_stream_carries_the_current_token() {
    let dir = std::env::temp_dir().join(format!("gw-agent-tls-{}", std::process::id()));
    gen_certs(&dir);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rec = Recorder::default();
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(
        std::fs::read(dir.join("server.crt")).unwrap(),
        std::fs::read(dir.join("server.key")).unwrap(),
    ));
    let server = Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(ingest_server::IngestServer::new(rec.clone()))
        .serve_with_incoming(tokio_stream_incoming(listener));
    tokio::spawn(server);

    let token = dir.join("token");
    std::fs::write(&token, "tok-1\n").unwrap();
    let cfg = |security: StreamSecurity| ReportConfig {
        endpoint: format!("https://{addr}"),
        buffer_windows: 16,
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(2),
        security,
        ..Default::default()
    };
    let good = StreamSecurity {
        token_file: Some(token.clone()),
        ca_file: Some(dir.join("ca.crt")),
        tls_server_name: Some("localhost".into()),
        ..Default::default()
    };

    // A client that trusts another CA never delivers anything.
    gen_certs(&dir.join("rogue"));
    let untrusting = Reporter::spawn(cfg(StreamSecurity {
        ca_file: Some(dir.join("rogue/ca.crt")),
        ..good.clone()
    }));
    untrusting.push(window(100));

    let rep = Reporter::spawn(cfg(good));
    rep.push(window(1));
    until("window 1 acked", || rep.buffered() == 0).await;
    // The kubelet rotates the token; the next connection presents the new one.
    std::fs::write(&token, "tok-2\n").unwrap();
    rep.push(window(2));
    until("window 2 acked", || rep.buffered() == 0).await;
    rep.push(window(3));
    until("a stream with the rotated token", || {
        rec.bearers.lock().unwrap().iter().any(|b| b == "Bearer tok-2")
    })
    .await;
    until("window 3 acked", || rep.buffered() == 0).await;
    until("the untrusting client retried", || {
        untrusting.stats().reconnects.load(std::sync::atomic::Ordering::Relaxed) >= 2
    })
    .await;

    let bearers = rec.bearers.lock().unwrap().clone();
    assert_eq!(bearers.first().map(String::as_str), Some("Bearer tok-1"), "{bearers:?}");
    assert!(bearers.iter().all(|b| b.starts_with("Bearer tok-")), "{bearers:?}");
    let seqs = rec.seqs.lock().unwrap().clone();
    assert!([1, 2, 3].iter().all(|s| seqs.contains(s)), "{seqs:?}");
    assert!(!seqs.contains(&100), "the untrusting client got through: {seqs:?}");
    assert_eq!(untrusting.buffered(), 1);
    rep.shutdown().await;
    untrusting.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn tokio_stream_incoming(
    listener: tokio::net::TcpListener,
) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}
