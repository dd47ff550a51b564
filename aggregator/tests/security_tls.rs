//! TLS on the ingest stream (rustls via tonic) with certificates generated here: the aggregator
//! serves TLS and requires client certificates from our CA (mTLS). Plaintext clients, clients
//! that do not trust the server's CA and clients without a certificate are refused at the
//! handshake; a properly configured client is acknowledged.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

mod common;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use common::*;
use graywatch_k8s_testkit::{Pki, Usage};
use graywatch_proto::v1::{directive, ingest_client::IngestClient};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate (the testkit's
/// generator).
///
/// # Panics
/// If the certificates cannot be generated.
pub fn gen_certs(dir: &Path, ca_name: &str) -> PathBuf {
    let pki = Pki::create(dir, &format!("/CN={ca_name}")).unwrap();
    pki.sign(
        "server",
        "/CN=graywatch-server",
        Usage::Server,
        &["IP:127.0.0.1", "DNS:localhost", "DNS:graywatch-aggregator"],
    )
    .unwrap();
    pki.sign(
        "client",
        "/CN=graywatch-client",
        Usage::Client,
        &["DNS:graywatch-agent"],
    )
    .unwrap();
    dir.to_path_buf()
}

fn read(dir: &Path, f: &str) -> Vec<u8> {
    std::fs::read(dir.join(f)).unwrap()
}

/// Sends one summary over `endpoint` and returns whether it was acknowledged.
async fn report_once(endpoint: Endpoint) -> Result<(), String> {
    let channel = endpoint.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    let mut client = IngestClient::new(channel);
    let s = summary(0, 2, 1, &BTreeSet::default());
    let resp = client
        .report(tokio_stream::iter(vec![s]))
        .await
        .map_err(|e| format!("report: {e:?}"))?;
    let mut stream = resp.into_inner();
    while let Some(d) = stream.message().await.map_err(|e| format!("stream: {e:?}"))? {
        if matches!(d.kind, Some(directive::Kind::Ack(a)) if a.seq == 1) {
            return Ok(());
        }
    }
    Err("stream ended without an ack".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_stream_requires_tls_and_client_certificates() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(2, 2).await? else {
        return Ok(());
    };
    let base = std::env::temp_dir().join(format!("graywatch-tls-{}", std::process::id()));
    let pki = gen_certs(&base.join("good"), "graywatch-test-ca");
    let rogue = gen_certs(&base.join("rogue"), "rogue-ca");
    let security = format!(
        "insecure_allow_acting_without_identity = true\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntls_client_ca_file = \"{}\"\n",
        pki.join("server.crt").display(),
        pki.join("server.key").display(),
        pki.join("ca.crt").display()
    );
    let agg = Aggregator::spawn(&cluster, "agg-0", &config_with_security("", &security));
    let https = format!("https://{}", agg.grpc);
    let tls = |ca: &Path, client: Option<&Path>| {
        let mut t = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(ca, "ca.crt")))
            .domain_name("localhost");
        if let Some(c) = client {
            t = t.identity(Identity::from_pem(read(c, "client.crt"), read(c, "client.key")));
        }
        Endpoint::from_shared(https.clone()).unwrap().tls_config(t).unwrap()
    };

    // The good client (our CA, our client certificate), once the server is up.
    eventually(30, "TLS ingest acknowledges a summary", || async {
        report_once(tls(&pki, Some(&pki))).await.ok()
    })
    .await;

    // Plaintext h2 to the TLS port: no stream.
    let plain = Endpoint::from_shared(format!("http://{}", agg.grpc)).unwrap();
    let e = report_once(plain).await.expect_err("plaintext refused");
    assert!(!e.contains("ack"), "{e}");
    // Client that trusts another CA: the server certificate is refused.
    let e = report_once(tls(&rogue, Some(&rogue)))
        .await
        .expect_err("unknown server CA");
    assert!(e.to_lowercase().contains("certificate") || e.contains("connect"), "{e}");
    // No client certificate, or one from another CA: the server refuses the handshake.
    report_once(tls(&pki, None)).await.expect_err("no client certificate");
    let mixed = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&pki, "ca.crt")))
        .domain_name("localhost")
        .identity(Identity::from_pem(
            read(&rogue, "client.crt"),
            read(&rogue, "client.key"),
        ));
    let mixed = Endpoint::from_shared(https.clone()).unwrap().tls_config(mixed).unwrap();
    report_once(mixed)
        .await
        .expect_err("client certificate from another CA");

    // Still serving the good client, and the node got its conditions through TLS.
    report_once(tls(&pki, Some(&pki))).await.expect("good client");
    eventually(30, "node-0 has conditions", || async {
        cluster.overall(0).await.map(|_| ())
    })
    .await;
    assert!(agg.log().contains("ingest stream uses TLS"));
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
