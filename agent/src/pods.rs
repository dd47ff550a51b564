//! Pod names for pod UIDs: a kube-rs watch of the pods scheduled to this node.
//!
//! Optional: without a cluster the agent reports cgroup paths and pod UIDs only.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tracing::{info, warn};

/// Namespace and name of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
}

/// Pod UID → name, shared between the watch task and the window builder.
#[derive(Debug, Clone, Default)]
pub struct PodDirectory {
    inner: Arc<RwLock<HashMap<String, PodName>>>,
}

impl PodDirectory {
    pub fn get(&self, uid: &str) -> Option<PodName> {
        self.inner.read().ok().and_then(|map| map.get(uid).cloned())
    }

    pub fn len(&self) -> usize {
        self.inner.read().map_or(0, |map| map.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn apply(&self, event: watcher::Event<Pod>) {
        let Ok(mut map) = self.inner.write() else { return };
        let entry = |pod: &Pod| {
            let uid = pod.metadata.uid.clone()?;
            Some((
                uid,
                PodName {
                    namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                    name: pod.metadata.name.clone().unwrap_or_default(),
                },
            ))
        };
        match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                if let Some((uid, name)) = entry(&pod) {
                    map.insert(uid, name);
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some(uid) = pod.metadata.uid {
                    map.remove(&uid);
                }
            }
            watcher::Event::Init => map.clear(),
            watcher::Event::InitDone => info!(pods = map.len(), "pod directory synced"),
        }
    }

    /// Watches pods on `node` until the stream ends; reconnects with kube-runtime's backoff.
    pub async fn watch(self, client: Client, node: String) {
        let pods: Api<Pod> = Api::all(client);
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let mut stream = watcher(pods, config).default_backoff().boxed();
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => self.apply(event),
                Err(error) => warn!(%error, "pod watch error; retrying with backoff"),
            }
        }
    }
}
