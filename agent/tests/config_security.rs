//! The aggregator-stream security flags: https needs a CA bundle (and a CA needs https), client
//! certificate and key go together, and the token file is passed through to the report client.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

use clap::Parser;
use graywatch_agent::config::{Cli, Config, ConfigError, FileConfig};

fn merge(extra: &[&str]) -> Result<Config, ConfigError> {
    let mut args = vec!["graywatch-agent", "--node-name", "n1"];
    args.extend_from_slice(extra);
    Config::merge(&Cli::try_parse_from(args).unwrap(), FileConfig::default())
}

#[test]
fn https_needs_a_ca_and_a_ca_needs_https() {
    let e = merge(&["--aggregator", "https://agg:7443"]).unwrap_err();
    assert!(e.to_string().contains("aggregator_ca_file"), "{e}");
    let e = merge(&["--aggregator", "http://agg:7443", "--aggregator-ca-file", "/ca.crt"]).unwrap_err();
    assert!(e.to_string().contains("aggregator_ca_file"), "{e}");
    let e = merge(&[
        "--aggregator",
        "https://agg:7443",
        "--aggregator-ca-file",
        "/ca.crt",
        "--aggregator-client-cert-file",
        "/c.crt",
    ])
    .unwrap_err();
    assert!(e.to_string().contains("aggregator_client_cert_file"), "{e}");

    let c = merge(&[
        "--aggregator",
        "https://agg:7443",
        "--aggregator-ca-file",
        "/ca.crt",
        "--aggregator-tls-server-name",
        "graywatch-aggregator.graywatch.svc",
        "--aggregator-token-file",
        "/var/run/secrets/graywatch/token",
    ])
    .unwrap();
    let s = &c.aggregator_security;
    assert!(s.tls());
    assert_eq!(s.ca_file.as_deref(), Some(std::path::Path::new("/ca.crt")));
    assert_eq!(s.tls_server_name.as_deref(), Some("graywatch-aggregator.graywatch.svc"));
    assert_eq!(
        s.token_file.as_deref(),
        Some(std::path::Path::new("/var/run/secrets/graywatch/token"))
    );
    // A token over plaintext is refused, naming the field and the explicit way out…
    let err = merge(&["--aggregator", "http://agg:7443", "--aggregator-token-file", "/t"])
        .expect_err("a bearer token must not cross the network in plaintext by default");
    assert!(err.to_string().contains("aggregator_token_file"), "{err}");
    // …which a service mesh that encrypts the hop may take.
    let c = merge(&[
        "--aggregator",
        "http://agg:7443",
        "--aggregator-token-file",
        "/t",
        "--aggregator-insecure-plaintext-token",
    ])
    .unwrap();
    assert!(!c.aggregator_security.tls());
}

#[test]
fn the_file_can_carry_the_same_settings() {
    let file: FileConfig = toml::from_str(
        "aggregator = \"https://agg:7443\"\naggregator_ca_file = \"/ca.crt\"\naggregator_token_file = \"/t\"\n",
    )
    .unwrap();
    let cli = Cli::try_parse_from(["graywatch-agent", "--node-name", "n1"]).unwrap();
    let c = Config::merge(&cli, file).unwrap();
    assert!(c.aggregator_security.tls());
    assert_eq!(
        c.aggregator_security.token_file.as_deref(),
        Some(std::path::Path::new("/t"))
    );
}
