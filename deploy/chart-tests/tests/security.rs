//! Issue 15, point 2, in the chart: `helm install` of an acting mode (nrc, direct-taint) with
//! `security.auth=insecure-none` fails with the reason unless the loudly named override is set
//! (and then the rendered config carries it, so the binary starts); the aggregator's gRPC port
//! gets a NetworkPolicy admitting the agents only, checked on a real apiserver.

use anyhow::Context;
use graywatch_aggregator::config::FileConfig;
use graywatch_chart_tests::{apiserver_with_crds, create, create_namespace, find, render, render_text};
use serde_json::json;

fn set_args<'a>(set: &[&'a str]) -> Vec<&'a str> {
    set.iter().flat_map(|s| ["--set", *s]).collect()
}

/// The aggregator.toml the chart renders for `set`, parsed and validated like the binary does.
fn rendered_config(set: &[&str]) -> anyhow::Result<Result<(), String>> {
    let objs = render("gw", "graywatch", &set_args(set))?;
    let cm = find(&objs, "ConfigMap", "-aggregator")?;
    let toml = cm["data"]["aggregator.toml"].as_str().context("aggregator.toml")?;
    let cfg = FileConfig::from_toml(toml)?;
    Ok(cfg.validate().map_err(|e| e.to_string()))
}

#[test]
fn acting_modes_refuse_insecure_auth_unless_loudly_allowed() -> anyhow::Result<()> {
    for mode in ["nrc", "direct-taint"] {
        let m = format!("mode={mode}");
        let err = render_text("gw", "graywatch", &set_args(&[&m]))?.expect_err("insecure acting install must fail");
        assert!(
            err.contains(&format!("mode={mode} with security.auth=insecure-none")),
            "{err}"
        );
        assert!(
            err.contains("security.insecureAllowActingWithoutIdentity=true"),
            "{err}"
        );
        // Authenticated agents: installs, and the binary accepts the rendered config.
        assert_eq!(
            rendered_config(&[&m, "security.auth=token-review", "security.tls.secretName=gw-tls"])?,
            Ok(())
        );
        // The override is rendered, so the binary starts too.
        assert_eq!(
            rendered_config(&[&m, "security.insecureAllowActingWithoutIdentity=true"])?,
            Ok(())
        );
    }
    // Dry-run decides nothing: insecure-none is allowed there.
    assert_eq!(rendered_config(&[])?, Ok(()));
    Ok(())
}

#[test]
fn bearer_tokens_over_plaintext_are_refused_unless_loudly_allowed() -> anyhow::Result<()> {
    let err = render_text("gw", "graywatch", &set_args(&["security.auth=token-review"]))?
        .expect_err("token-review without TLS must fail");
    assert!(err.contains("security.tls.secretName"), "{err}");
    assert!(err.contains("security.insecureAllowPlaintextTokens=true"), "{err}");
    assert_eq!(
        rendered_config(&[
            "security.auth=token-review",
            "security.insecureAllowPlaintextTokens=true"
        ])?,
        Ok(())
    );
    // The agent is told too (it refuses to send a token to an http:// aggregator otherwise).
    let objs = render(
        "gw",
        "graywatch",
        &set_args(&[
            "security.auth=token-review",
            "security.insecureAllowPlaintextTokens=true",
        ]),
    )?;
    let ds = find(&objs, "DaemonSet", "-agent")?;
    let args = ds["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    assert!(
        args.as_array()
            .context("agent args")?
            .iter()
            .any(|a| a == "--aggregator-insecure-plaintext-token"),
        "{args}"
    );
    assert_eq!(
        rendered_config(&["security.auth=token-review", "security.tls.secretName=gw-tls"])?,
        Ok(())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_port_admits_the_agents_only() -> anyhow::Result<()> {
    let err = render_text("gw", "graywatch", &set_args(&["networkPolicy.enabled=true"]))?.expect_err("no agent CIDRs");
    assert!(err.contains("networkPolicy.agentCIDRs"), "{err}");

    let set = [
        "networkPolicy.enabled=true",
        "networkPolicy.agentCIDRs={10.0.0.0/16,10.1.0.0/16}",
    ];
    let objs = render("gw", "graywatch", &set_args(&set))?;
    let np = find(&objs, "NetworkPolicy", "-aggregator")?;
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "aggregator"
    );
    assert_eq!(np["spec"]["policyTypes"], json!(["Ingress"]));
    let rules = np["spec"]["ingress"].as_array().context("ingress")?;
    assert_eq!(rules.len(), 2, "{rules:?}");
    assert_eq!(rules[0]["ports"], json!([{"protocol": "TCP", "port": 7443}]));
    assert_eq!(
        rules[0]["from"],
        json!([
            {"podSelector": {"matchLabels": {
                "app.kubernetes.io/name": "graywatch",
                "app.kubernetes.io/instance": "gw",
                "app.kubernetes.io/component": "agent"}}},
            {"ipBlock": {"cidr": "10.0.0.0/16"}},
            {"ipBlock": {"cidr": "10.1.0.0/16"}},
        ])
    );
    // Metrics and probes: the HTTP port only, from anyone unless metricsFrom says otherwise.
    assert_eq!(rules[1]["ports"], json!([{"protocol": "TCP", "port": 9090}]));
    assert!(rules[1].get("from").is_none(), "{:?}", rules[1]);
    // Off by default (agentCIDRs cannot be guessed).
    let objs = render("gw", "graywatch", &[])?;
    assert!(objs.iter().all(|o| o["kind"] != "NetworkPolicy"));

    // The real apiserver accepts the object as rendered.
    let (_server, admin, discovery) = apiserver_with_crds().await?;
    create_namespace(&admin, "graywatch").await?;
    create(&admin, &discovery, np, false).await?;
    Ok(())
}
