//! The kit itself: a real apiserver starts, serves Nodes and the CRDs, and is gone after drop.

use graywatch_k8s_testkit::TestApiserver;
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
