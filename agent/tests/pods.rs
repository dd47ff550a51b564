//! Pod names for pod UIDs from a real kube-apiserver: the agent's watch sees only pods bound to
//! its own node, and forgets deleted ones.

use std::time::{Duration, Instant};

use graywatch_agent::pods::{PodDirectory, PodName};
use graywatch_k8s_testkit::TestApiserver;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};

fn pod(name: &str, node: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node, "automountServiceAccountToken": false,
                 "containers": [{"name": "c", "image": "registry.invalid/none:1"}]},
    }))
    .expect("valid pod")
}

/// Waits (bounded) until `check` holds for the directory.
async fn until(directory: &PodDirectory, what: &str, check: impl Fn(&PodDirectory) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check(directory) {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resolves_this_nodes_pods_only() {
    let Some(apiserver) = TestApiserver::start().await.expect("start the test apiserver") else {
        return; // skipped loudly by the testkit (GRAYWATCH_SKIP_K8S=1 without GRAYWATCH_REQUIRE_K8S)
    };
    let client = apiserver.client().await.expect("client");
    // No controller-manager on the test apiserver: create the default ServiceAccount ourselves.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    let account = serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}})).expect("sa");
    let _ = accounts.create(&PostParams::default(), &account).await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mine = pods
        .create(&PostParams::default(), &pod("web-1", "node-x"))
        .await
        .expect("create pod");
    let other = pods
        .create(&PostParams::default(), &pod("web-2", "node-y"))
        .await
        .expect("create pod");
    let (mine_uid, other_uid) = (mine.metadata.uid.expect("uid"), other.metadata.uid.expect("uid"));

    let directory = PodDirectory::default();
    let watch = tokio::spawn(directory.clone().watch(client.clone(), "node-x".into()));
    until(&directory, "web-1 resolved", |d| d.get(&mine_uid).is_some()).await;
    assert_eq!(
        directory.get(&mine_uid),
        Some(PodName {
            namespace: "default".into(),
            name: "web-1".into()
        })
    );
    assert_eq!(directory.get(&other_uid), None, "a pod on another node is not ours");

    let late = pods
        .create(&PostParams::default(), &pod("web-3", "node-x"))
        .await
        .expect("create pod");
    let late_uid = late.metadata.uid.expect("uid");
    until(&directory, "web-3 resolved", |d| d.get(&late_uid).is_some()).await;

    pods.delete("web-1", &DeleteParams::default())
        .await
        .expect("delete pod");
    // Without a kubelet the pod stays terminating until its grace period is forced to zero.
    pods.delete(
        "web-1",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .ok();
    until(&directory, "web-1 forgotten", |d| d.get(&mine_uid).is_none()).await;
    assert_eq!(directory.len(), 1);
    watch.abort();
}
