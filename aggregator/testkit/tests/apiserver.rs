//! The kit itself: a real apiserver starts, serves Nodes and the CRDs, and is gone after drop.

use graywatch_k8s_testkit::{ApiserverOptions, NodeBuilder, TestApiserver, node};
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};

#[tokio::test]
async fn starts_serves_nodes_and_crds_and_stops() -> anyhow::Result<()> {
    let Some(api) = TestApiserver::start().await? else {
        return Ok(());
    };
    let client = api.client().await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some("kit-node".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    nodes.create(&PostParams::default(), &node).await?;
    assert_eq!(nodes.get("kit-node").await?.metadata.name.as_deref(), Some("kit-node"));
    api.install_crds().await?;
    let pools = client
        .request_text(http::Request::get("/apis/karpenter.sh/v1/nodepools").body(Vec::new())?)
        .await?;
    assert!(pools.contains("NodePoolList"), "{pools}");
    let url = api.url();
    drop(api);
    // After drop the port is closed: a fresh connection is refused.
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port in url");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    Ok(())
}

/// With RBAC an impersonated user without bindings is refused, while the admin's Nodes come
/// with the builder's labels, addresses and Ready status in one create.
#[tokio::test]
async fn rbac_refuses_an_unbound_user_and_builds_ready_nodes() -> anyhow::Result<()> {
    let Some(api) = TestApiserver::start_with(ApiserverOptions::rbac()).await? else {
        return Ok(());
    };
    api.create_nodes(&[NodeBuilder::new("kit-node").zone("zone-a").internal_ip("10.1.2.3")])
        .await?;
    let node = Api::<Node>::all(api.client().await?).get("kit-node").await?;
    let labels = node.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get(node::ZONE_LABEL).map(String::as_str), Some("zone-a"));
    let status = node.status.unwrap_or_default();
    assert_eq!(status.addresses.unwrap_or_default()[0].address, "10.1.2.3");
    assert!(
        status
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );
    let nobody = api.impersonating("system:serviceaccount:default:nobody").await?;
    let refused = Api::<Node>::all(nobody).get("kit-node").await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.code == 403),
        "{refused:?}"
    );
    Ok(())
}

/// A killed and restarted apiserver serves the same data (etcd kept it) on the same address.
#[tokio::test]
async fn a_restarted_apiserver_serves_the_same_data() -> anyhow::Result<()> {
    let Some(mut api) = TestApiserver::start().await? else {
        return Ok(());
    };
    api.create_nodes(&[NodeBuilder::new("kept")]).await?;
    let nodes: Api<Node> = Api::all(api.client().await?);
    api.instance_mut().kill_apiserver();
    assert!(nodes.get("kept").await.is_err(), "the apiserver is down");
    api.instance_mut().restart_apiserver()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        // A process without readiness notification: poll it.
        match nodes.get("kept").await {
            Ok(node) => {
                assert_eq!(node.metadata.name.as_deref(), Some("kept"));
                return Ok(());
            }
            Err(e) => assert!(std::time::Instant::now() < deadline, "not back: {e}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
