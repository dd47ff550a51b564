//! Pod names for pod UIDs, and the node's pod IPs: a kube-rs watch of the pods scheduled to
//! this node.
//!
//! Optional: without a cluster the agent reports cgroup paths and pod UIDs only.

use std::{
    collections::{BTreeSet, HashMap},
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

/// At most this many pod IPs are reported (a node runs at most a few hundred pods, two
/// addresses each when dual-stack); beyond it the lowest addresses are kept.
pub const MAX_POD_ADDRESSES: usize = 1_024;

#[derive(Debug, Default)]
struct Pods {
    names: HashMap<String, PodName>,
    /// Pod UID → its IPs (hostNetwork pods and finished pods have none of their own).
    ips: HashMap<String, Vec<String>>,
    /// Bumped whenever the set of pod IPs changes.
    generation: u64,
    addresses: Vec<String>,
}

impl Pods {
    fn refresh_addresses(&mut self) {
        let set: BTreeSet<&String> = self.ips.values().flatten().collect();
        let addresses: Vec<String> = set.into_iter().take(MAX_POD_ADDRESSES).cloned().collect();
        if addresses != self.addresses {
            self.addresses = addresses;
            self.generation += 1;
        }
    }
}

/// The IPs a pod owns: none for hostNetwork pods (their address is the node's) or pods that
/// finished (their IPs are released).
pub fn own_ips(pod: &Pod) -> Vec<String> {
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return Vec::new();
    }
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Vec::new();
    }
    let mut ips: Vec<String> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.clone())
        .chain(status.pod_ip.clone())
        .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// Pod UID → name, and the node's pod IPs, shared between the watch task and the window builder.
#[derive(Debug, Clone, Default)]
pub struct PodDirectory {
    inner: Arc<RwLock<Pods>>,
}

impl PodDirectory {
    pub fn get(&self, uid: &str) -> Option<PodName> {
        self.inner.read().ok().and_then(|pods| pods.names.get(uid).cloned())
    }

    pub fn len(&self) -> usize {
        self.inner.read().map_or(0, |pods| pods.names.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The node's pod IPs (sorted, at most [`MAX_POD_ADDRESSES`]) and their generation, which
    /// changes whenever the set does (0: never filled).
    pub fn pod_addresses(&self) -> (u64, Vec<String>) {
        self.inner
            .read()
            .map(|pods| (pods.generation, pods.addresses.clone()))
            .unwrap_or_default()
    }

    /// The generation of [`Self::pod_addresses`] alone (cheap).
    pub fn pod_addresses_generation(&self) -> u64 {
        self.inner.read().map_or(0, |pods| pods.generation)
    }

    /// Applies one watch event (public for tests).
    pub fn apply(&self, event: watcher::Event<Pod>) {
        let Ok(mut pods) = self.inner.write() else { return };
        let pods = &mut *pods;
        let ips_changed = match &event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => match pod.metadata.uid.clone() {
                Some(uid) => {
                    let ips = own_ips(pod);
                    if ips.is_empty() {
                        pods.ips.remove(&uid).is_some()
                    } else {
                        pods.ips.insert(uid, ips.clone()).as_ref() != Some(&ips)
                    }
                }
                None => false,
            },
            watcher::Event::Delete(pod) => pod
                .metadata
                .uid
                .as_ref()
                .is_some_and(|uid| pods.ips.remove(uid).is_some()),
            // A relist: the set is rebuilt from the InitApply events before InitDone.
            watcher::Event::Init => {
                pods.ips.clear();
                false
            }
            watcher::Event::InitDone => true,
        };
        // During a relist the set is incomplete: publish it at InitDone only.
        if ips_changed && !matches!(event, watcher::Event::InitApply(_)) {
            pods.refresh_addresses();
        }
        let map = &mut pods.names;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, host_network: bool, phase: &str, ips: &[&str]) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"uid": uid, "name": uid, "namespace": "ns"},
            "spec": {"hostNetwork": host_network, "containers": []},
            "status": {"phase": phase, "podIPs": ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect::<Vec<_>>()},
        }))
        .expect("a Pod")
    }

    /// EKS VPC CNI pod IPs (secondary ENI addresses, in no pod CIDR) are what the agent reports;
    /// hostNetwork pods (the node's own address) and finished pods are not, and the generation
    /// moves only when the set changes.
    #[test]
    fn pod_ips_are_the_node_pods_own_and_change_only_when_the_set_does() {
        let dir = PodDirectory::default();
        assert_eq!(dir.pod_addresses(), (0, Vec::new()));
        dir.apply(watcher::Event::Init);
        dir.apply(watcher::Event::InitApply(pod(
            "a",
            false,
            "Running",
            &["192.168.77.10", "2600:1f18::a"],
        )));
        dir.apply(watcher::Event::InitApply(pod("h", true, "Running", &["192.168.0.5"])));
        dir.apply(watcher::Event::InitApply(pod(
            "done",
            false,
            "Succeeded",
            &["192.168.77.11"],
        )));
        assert_eq!(dir.pod_addresses_generation(), 0, "nothing published mid-relist");
        dir.apply(watcher::Event::InitDone);
        let (generation, addresses) = dir.pod_addresses();
        assert_eq!(addresses, vec!["192.168.77.10".to_owned(), "2600:1f18::a".to_owned()]);
        assert_eq!(
            dir.get("h").map(|p| p.name).as_deref(),
            Some("h"),
            "names still resolve"
        );
        // An update that changes no IP: same generation.
        dir.apply(watcher::Event::Apply(pod(
            "a",
            false,
            "Running",
            &["2600:1f18::a", "192.168.77.10"],
        )));
        assert_eq!(dir.pod_addresses_generation(), generation);
        dir.apply(watcher::Event::Apply(pod("b", false, "Running", &["192.168.77.12"])));
        assert_eq!(dir.pod_addresses().1.len(), 3);
        dir.apply(watcher::Event::Delete(pod("a", false, "Running", &[])));
        let (last, addresses) = dir.pod_addresses();
        assert_eq!(addresses, vec!["192.168.77.12".to_owned()]);
        assert!(last > generation);
    }
}
