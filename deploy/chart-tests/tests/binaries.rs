//! The aggregator's own cluster code — config loading, leader election, the cluster reader and
//! the actuators (aggregator/src/{config,leader,cluster,actuate}.rs) — run against a real
//! kube-apiserver with RBAC enforced, as the ServiceAccount the chart creates, with the
//! configuration the chart renders. In each mode the writes that mode makes succeed and the writes
//! it must not make are refused.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context;
use graywatch_aggregator::{
    actuate::Actuator,
    auth::{AuthError, AuthMode, Authenticator, TokenReviewAuthenticator},
    cluster::ClusterReader,
    config::FileConfig,
    core::{
        karpenter::{exclusion_edits, with_exclusions},
        model::{CondStatus, PoolEdits},
        plan::{
            ClaimDeletion, ConditionWrite, DesiredCondition, EventKind, EventTarget, Plan, PlannedEvent, PoolChange,
            TaintChange,
        },
    },
    leader::LeaderElector,
    metrics::Metrics,
};
use graywatch_chart_tests::{apiserver_with_crds, create, create_namespace, find, render};
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    coordination::v1::Lease,
    core::v1::{ConfigMap, Container, Event, Node, Pod, PodSpec, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, ObjectMeta, PostParams},
    discovery::Discovery,
};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const NODE: &str = "ip-10-0-1-17.eu-west-1.compute.internal";
const ZONE: &str = "topology.kubernetes.io/zone";
const IDENTITY: &str = "graywatch-aggregator-0";
const WAIT: Duration = Duration::from_secs(30);

fn pool_ar() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("karpenter.sh", "v1", "NodePool"), "nodepools")
}

fn claim_ar() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("karpenter.sh", "v1", "NodeClaim"), "nodeclaims")
}

/// A release of the chart, installed (as the admin) into its own namespace; returns the
/// aggregator config the chart rendered, loaded and validated by the aggregator's own code.
async fn install(
    admin: &Client,
    discovery: &Discovery,
    release: &str,
    namespace: &str,
    set: &[&str],
) -> anyhow::Result<FileConfig> {
    create_namespace(admin, namespace).await?;
    let mut args = vec!["--kube-version", "1.20.2"];
    for s in set {
        args.extend(["--set", s]);
    }
    let objs = render(release, namespace, &args)?;
    for o in &objs {
        create(admin, discovery, o, false).await?;
    }
    let text = find(&objs, "ConfigMap", "-aggregator")?["data"]["aggregator.toml"]
        .as_str()
        .context("toml")?;
    let mut cfg =
        FileConfig::from_toml(text).with_context(|| format!("the aggregator refuses the chart's config:\n{text}"))?;
    // What the Deployment's POD_NAME / POD_NAMESPACE give it.
    cfg.identity = IDENTITY.into();
    cfg.namespace = namespace.into();
    cfg.validate()
        .context("the aggregator's validation of the chart's config")?;
    Ok(cfg)
}

async fn impersonate(
    server: &graywatch_k8s_testkit::TestApiserver,
    namespace: &str,
    release: &str,
) -> anyhow::Result<Client> {
    server
        .impersonating(&format!(
            "system:serviceaccount:{namespace}:{release}-graywatch-aggregator"
        ))
        .await
}

/// Leader election as the chart's ServiceAccount: returns the leadership receiver (true once the
/// Lease is ours), the shutdown token and the elector's task.
async fn lead(
    client: &Client,
    cfg: &FileConfig,
) -> anyhow::Result<(watch::Receiver<bool>, CancellationToken, tokio::task::JoinHandle<()>)> {
    let elector = LeaderElector {
        api: Api::namespaced(client.clone(), &cfg.namespace),
        lease_name: cfg.leader.lease_name.clone(),
        identity: cfg.identity.clone(),
        lease_duration: Duration::from_millis(cfg.leader.lease_duration_ms),
        renew_interval: Duration::from_millis(cfg.leader.renew_interval_ms),
        renew_deadline: Duration::from_millis(cfg.leader.renew_deadline_ms()),
    };
    let (tx, mut rx) = watch::channel(false);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(elector.run(tx, shutdown.clone()));
    tokio::time::timeout(WAIT, rx.wait_for(|leader| *leader))
        .await
        .context("no leadership within 30 s: the chart's Role does not let the elector create/read its Lease")??;
    Ok((rx, shutdown, task))
}

/// Stops the elector and checks (as the admin) that it released the Lease — a Lease update.
async fn step_down(
    admin: &Client,
    cfg: &FileConfig,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
) -> anyhow::Result<()> {
    shutdown.cancel();
    task.await?;
    let lease = Api::<Lease>::namespaced(admin.clone(), &cfg.namespace)
        .get(&cfg.leader.lease_name)
        .await?;
    let holder = lease.spec.and_then(|s| s.holder_identity);
    assert_eq!(
        holder, None,
        "the Lease was not released: the chart's Role does not allow updating it"
    );
    Ok(())
}

fn condition_write(status: CondStatus) -> ConditionWrite {
    ConditionWrite {
        node: NODE.into(),
        conditions: vec![DesiredCondition {
            type_: "graywatch.io/Healthy".into(),
            status,
            reason: "GrayFailure".into(),
            message: "NetworkLatency: p99 RTT 41 ms, peers 2 ms".into(),
            last_transition_ms: 1_767_225_600_000,
        }],
    }
}

fn event(reason: &str) -> PlannedEvent {
    PlannedEvent {
        target: EventTarget::Node(NODE.into()),
        kind: EventKind::Warning,
        reason: reason.into(),
        action: "SetCondition".into(),
        note: "chart RBAC check".into(),
    }
}

async fn node_events(admin: &Client, reason: &str) -> anyhow::Result<usize> {
    let list = Api::<Event>::namespaced(admin.clone(), "default")
        .list(&ListParams::default())
        .await?;
    Ok(list
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .count())
}

async fn our_condition(admin: &Client) -> anyhow::Result<Option<String>> {
    let n = Api::<Node>::all(admin.clone()).get(NODE).await?;
    Ok(n.status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "graywatch.io/Healthy")
        .map(|c| c.status))
}

/// A pod of `service_account` on NODE and a token for it, as the kubelet would project it.
async fn agent_token(admin: &Client, namespace: &str, service_account: &str, audience: &str) -> anyhow::Result<String> {
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(format!("{service_account}-x7k2p")),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(service_account.into()),
            node_name: Some(NODE.into()),
            containers: vec![Container {
                name: "agent".into(),
                image: Some("agent".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    let pod = Api::<Pod>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &pod)
        .await?;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            expiration_seconds: Some(3600),
        },
        ..TokenRequest::default()
    };
    let out = Api::<ServiceAccount>::namespaced(admin.clone(), namespace)
        .create_token_request(service_account, &PostParams::default(), &request)
        .await?;
    Ok(out.status.context("TokenRequest without status")?.token)
}

async fn tainted(admin: &Client) -> anyhow::Result<bool> {
    let n = Api::<Node>::all(admin.clone()).get(NODE).await?;
    Ok(n.spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .iter()
        .any(|t| t.key == "graywatch.io/degraded"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(clippy::too_many_lines, reason = "one end-to-end scenario, read top to bottom")]
async fn the_aggregator_code_runs_with_the_chart_rbac_in_every_mode() -> anyhow::Result<()> {
    let (server, admin, discovery) = apiserver_with_crds().await?;
    let node = Node {
        metadata: ObjectMeta {
            name: Some(NODE.into()),
            labels: Some(
                [
                    (ZONE.to_string(), "zone-a".to_string()),
                    ("karpenter.sh/nodepool".into(), "default".into()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    Api::<Node>::all(admin.clone())
        .create(&PostParams::default(), &node)
        .await?;
    let original = json!([{"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand"]}]);
    let class = json!({"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "default"});
    let pool = json!({
        "apiVersion": "karpenter.sh/v1", "kind": "NodePool", "metadata": {"name": "default"},
        "spec": {"template": {"spec": {"nodeClassRef": class, "requirements": original}}},
    });
    let pools: Api<DynamicObject> = Api::all_with(admin.clone(), &pool_ar());
    pools
        .create(&PostParams::default(), &serde_json::from_value(pool)?)
        .await?;
    let claim = json!({
        "apiVersion": "karpenter.sh/v1", "kind": "NodeClaim", "metadata": {"name": "default-x7k2p"},
        "spec": {"nodeClassRef": class, "requirements": []},
    });
    let claims: Api<DynamicObject> = Api::all_with(admin.clone(), &claim_ar());
    claims
        .create(&PostParams::default(), &serde_json::from_value(claim)?)
        .await?;
    let metrics = Metrics::default();

    // direct-taint with Karpenter and replacement: every kind of write the aggregator makes.
    let cfg = install(
        &admin,
        &discovery,
        "direct",
        "gw-direct",
        &[
            "mode=direct-taint",
            "karpenter.enabled=true",
            "karpenter.replaceNodes=true",
            "security.auth=token-review",
            "security.tls.secretName=gw-tls",
        ],
    )
    .await?;
    assert!(!cfg.policy.dry_run && cfg.policy.karpenter_exclude && cfg.policy.karpenter_replace);
    let agg = impersonate(&server, "gw-direct", "direct").await?;
    let (leader, shutdown, task) = lead(&agg, &cfg).await?;
    let reader = tokio::time::timeout(
        WAIT,
        ClusterReader::start(agg.clone(), cfg.namespace.clone(), cfg.policy.clone(), shutdown.clone()),
    )
    .await
    .context("the Node watch did not sync as the chart's ServiceAccount")?;
    let input = reader.read(0, BTreeMap::new(), 0).await;
    assert!(
        !input.pools_unreadable && !input.claims_unreadable,
        "reading NodePools, NodeClaims, snapshots as the chart's ServiceAccount"
    );
    assert!(input.nodes.contains_key(NODE), "{:?}", input.nodes.keys());
    // A new leader reads the actions taken before (our Events) as the chart's ServiceAccount.
    reader
        .past_actions(0, cfg.policy.rate_window_ms)
        .await
        .context("listing our Events for the spent action budget")?;
    // Agent authentication (security.auth = token-review): the aggregator's TokenReview
    // authenticator, as its ServiceAccount, accepts the chart's agent and binds it to its node,
    // and refuses a token of any other ServiceAccount.
    assert_eq!(cfg.security.auth, AuthMode::TokenReview);
    assert!(cfg.security.tls_cert_file.is_some() && cfg.security.tls_key_file.is_some());
    let authenticator = TokenReviewAuthenticator {
        client: agg.clone(),
        audience: cfg.security.token_audience.clone(),
        allowed_service_accounts: cfg.security.allowed_service_accounts.clone(),
    };
    let token = agent_token(
        &admin,
        "gw-direct",
        "direct-graywatch-agent",
        &cfg.security.token_audience,
    )
    .await?;
    let who = authenticator
        .authenticate(Some(&token))
        .await
        .map_err(|e| anyhow::anyhow!("agent refused: {e}"))?;
    assert_eq!(who.node.as_deref(), Some(NODE), "{who:?}");
    let other = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("intruder".into()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    Api::<ServiceAccount>::namespaced(admin.clone(), "gw-direct")
        .create(&PostParams::default(), &other)
        .await?;
    let token = agent_token(&admin, "gw-direct", "intruder", &cfg.security.token_audience).await?;
    match authenticator.authenticate(Some(&token)).await {
        Err(AuthError::NotAllowed(who)) => assert_eq!(who, "gw-direct:intruder"),
        other => panic!("a foreign ServiceAccount's token: {other:?}"),
    }
    assert_eq!(input.pools["default"].requirements, original);
    let actuator = Actuator::new(agg.clone(), &cfg);
    let excluded = vec![(ZONE.to_string(), "zone-a".to_string())];
    let plan = Plan {
        conditions: vec![condition_write(CondStatus::False)],
        taints: vec![TaintChange {
            node: NODE.into(),
            add: true,
        }],
        pools: vec![PoolChange::Exclude {
            pool: "default".into(),
            excluded: excluded.clone(),
            remove: PoolEdits::default(),
            add: exclusion_edits(&excluded, 1),
        }],
        claim_deletions: vec![ClaimDeletion {
            node: NODE.into(),
            claim: "default-x7k2p".into(),
        }],
        events: vec![event("GrayFailureTaint")],
        ..Plan::default()
    };
    let applied = actuator.apply(&plan, 1_767_225_600_000, &leader, &metrics).await;
    assert_eq!(applied.errors, 0, "direct-taint writes refused: {applied:?}");
    assert_eq!(our_condition(&admin).await?.as_deref(), Some("False"));
    assert!(tainted(&admin).await?);
    let p = pools.get("default").await?;
    assert_eq!(
        p.data["spec"]["template"]["spec"]["requirements"],
        with_exclusions(&original, &excluded)
    );
    let snapshot = Api::<ConfigMap>::namespaced(admin.clone(), "gw-direct")
        .get("graywatch-nodepool-default")
        .await?;
    assert!(snapshot.data.is_some_and(|d| d.contains_key("added")));
    assert!(
        claims.get_opt("default-x7k2p").await?.is_none(),
        "NodeClaim not deleted"
    );
    assert_eq!(node_events(&admin, "GrayFailureTaint").await?, 1);
    // The reader sees our snapshot (ConfigMap list) on the next step; then recovery.
    let input = reader.read(0, BTreeMap::new(), 0).await;
    let snapshot = input.pools["default"].snapshot.clone().expect("our snapshot, verified");
    assert_eq!(snapshot.excluded, excluded);
    let recover = Plan {
        conditions: vec![condition_write(CondStatus::True)],
        taints: vec![TaintChange {
            node: NODE.into(),
            add: false,
        }],
        pools: vec![PoolChange::Restore {
            pool: "default".into(),
            remove: snapshot.added,
        }],
        ..Plan::default()
    };
    let applied = actuator.apply(&recover, 1_767_225_660_000, &leader, &metrics).await;
    assert_eq!(applied.errors, 0, "recovery writes refused: {applied:?}");
    assert!(!tainted(&admin).await?);
    assert_eq!(
        pools.get("default").await?.data["spec"]["template"]["spec"]["requirements"],
        original
    );
    let cms = Api::<ConfigMap>::namespaced(admin.clone(), "gw-direct");
    assert!(
        cms.get_opt("graywatch-nodepool-default").await?.is_none(),
        "snapshot not deleted"
    );
    step_down(&admin, &cfg, shutdown, task).await?;

    // nrc: conditions and Events, never a taint; no Karpenter access.
    let cfg = install(
        &admin,
        &discovery,
        "nrc",
        "gw-nrc",
        &["mode=nrc", "security.insecureAllowActingWithoutIdentity=true"],
    )
    .await?;
    let agg = impersonate(&server, "gw-nrc", "nrc").await?;
    let (leader, shutdown, task) = lead(&agg, &cfg).await?;
    let reader = tokio::time::timeout(
        WAIT,
        ClusterReader::start(agg.clone(), cfg.namespace.clone(), cfg.policy.clone(), shutdown.clone()),
    )
    .await?;
    assert!(
        reader.read(0, BTreeMap::new(), 0).await.pools.is_empty(),
        "Karpenter off: nothing listed"
    );
    let actuator = Actuator::new(agg.clone(), &cfg);
    let ok = Plan {
        conditions: vec![condition_write(CondStatus::False)],
        events: vec![event("GrayFailureDetected")],
        ..Plan::default()
    };
    assert_eq!(
        actuator.apply(&ok, 1_767_225_720_000, &leader, &metrics).await.errors,
        0
    );
    assert_eq!(our_condition(&admin).await?.as_deref(), Some("False"));
    assert_eq!(node_events(&admin, "GrayFailureDetected").await?, 1);
    let taint = Plan {
        taints: vec![TaintChange {
            node: NODE.into(),
            add: true,
        }],
        ..Plan::default()
    };
    assert_eq!(
        actuator
            .apply(&taint, 1_767_225_720_000, &leader, &metrics)
            .await
            .errors,
        1,
        "nrc may not taint"
    );
    assert!(!tainted(&admin).await?);
    step_down(&admin, &cfg, shutdown, task).await?;

    // dry-run: Events only; condition writes and NodePool changes are refused.
    let cfg = install(
        &admin,
        &discovery,
        "dry",
        "gw-dry",
        &["mode=dry-run", "karpenter.enabled=true"],
    )
    .await?;
    assert!(cfg.policy.dry_run);
    let agg = impersonate(&server, "gw-dry", "dry").await?;
    let (leader, shutdown, task) = lead(&agg, &cfg).await?;
    let reader = tokio::time::timeout(
        WAIT,
        ClusterReader::start(agg.clone(), cfg.namespace.clone(), cfg.policy.clone(), shutdown.clone()),
    )
    .await?;
    assert!(
        reader.read(0, BTreeMap::new(), 0).await.pools.contains_key("default"),
        "dry-run reads NodePools"
    );
    let actuator = Actuator::new(agg.clone(), &cfg);
    let shadow = Plan {
        dry_run: true,
        events: vec![event("DryRunGrayFailureTaint")],
        ..Plan::default()
    };
    assert_eq!(
        actuator
            .apply(&shadow, 1_767_225_780_000, &leader, &metrics)
            .await
            .errors,
        0
    );
    assert_eq!(node_events(&admin, "DryRunGrayFailureTaint").await?, 1);
    let writes = Plan {
        conditions: vec![condition_write(CondStatus::True)],
        pools: vec![PoolChange::Restore {
            pool: "default".into(),
            // Something there to take out, so a patch is tried.
            remove: PoolEdits {
                requirements: original.as_array().cloned().unwrap_or_default(),
                budgets: Vec::new(),
            },
        }],
        ..Plan::default()
    };
    let applied = actuator.apply(&writes, 1_767_225_780_000, &leader, &metrics).await;
    assert_eq!(
        applied.errors, 2,
        "dry-run may not write conditions or NodePools: {applied:?}"
    );
    assert_eq!(
        our_condition(&admin).await?.as_deref(),
        Some("False"),
        "unchanged since the nrc run"
    );
    assert_eq!(
        pools.get("default").await?.data["spec"]["template"]["spec"]["requirements"],
        original
    );
    step_down(&admin, &cfg, shutdown, task).await?;
    Ok(())
}
