//! Reads the cluster into the core's plain data: Nodes (from a watch-fed reflector store),
//! Karpenter NodePools / NodeClaims and our NodePool snapshots (listed each step; few objects).

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{ConfigMap, Event, Node},
    apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio_util::sync::CancellationToken;

use crate::core::{
    model::{
        CondStatus, Input, Millis, NodeReport, NodeView, ObservedCondition, PastAction, PoolEdits, PoolSnapshot,
        PoolView,
    },
    policy::Policy,
    step::EKS_NETWORKING_CONDITION,
};

/// An action Event of ours (taint added, NodePool excluded, NodeClaim deleted; not their
/// dry-run shadows) within the rate window, as a past action.
#[must_use]
pub fn past_action(e: &Event, now_ms: Millis, window_ms: Millis) -> Option<PastAction> {
    if e.source.as_ref().and_then(|s| s.component.as_deref()) != Some(FIELD_MANAGER) {
        return None;
    }
    let reason = e.reason.as_deref()?;
    let claim_deletion = reason == "NodeClaimReplaced";
    if !matches!(reason, "GrayFailureTaint" | "NodePoolExcluded") && !claim_deletion {
        return None;
    }
    let at = e
        .last_timestamp
        .as_ref()
        .or(e.first_timestamp.as_ref())
        .map(|t| t.0.as_millisecond())
        .or_else(|| e.event_time.as_ref().map(|t| t.0.as_millisecond()))?;
    if now_ms - at >= window_ms && !claim_deletion {
        return None;
    }
    let node = (e.involved_object.kind.as_deref() == Some("Node"))
        .then(|| e.involved_object.name.clone())
        .flatten();
    Some(PastAction {
        at_ms: at,
        node,
        claim_deletion,
    })
}

/// The one field manager for everything the aggregator writes (and the Event source it lists
/// its own actions by).
pub const FIELD_MANAGER: &str = "graywatch-aggregator";

/// Label on our snapshot ConfigMaps naming the NodePool.
pub const SNAPSHOT_LABEL: &str = "graywatch.io/snapshot-of-nodepool";
/// Annotation on our snapshot ConfigMaps: the SHA-256 of their data (see [`snapshot_digest`]).
pub const SNAPSHOT_DIGEST_ANNOTATION: &str = "graywatch.io/snapshot-sha256";

/// The digest of a snapshot's data: hex SHA-256 of its keys and values in key order (JSON).
#[must_use]
pub fn snapshot_digest(data: &BTreeMap<String, String>) -> String {
    let text = serde_json::to_string(data).unwrap_or_default();
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

/// The data of the snapshot ConfigMap recording `snapshot`.
#[must_use]
pub fn snapshot_data(snapshot: &PoolSnapshot) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "excluded".to_string(),
            serde_json::to_string(&snapshot.excluded).unwrap_or_default(),
        ),
        (
            "added".to_string(),
            serde_json::to_string(&snapshot.added).unwrap_or_default(),
        ),
    ])
}

/// The snapshot ConfigMap of `pool` recording `snapshot` (server-side apply body).
#[must_use]
pub fn snapshot_configmap(namespace: &str, pool: &str, snapshot: &PoolSnapshot) -> serde_json::Value {
    let data = snapshot_data(snapshot);
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": snapshot_name(pool),
            "namespace": namespace,
            "labels": {SNAPSHOT_LABEL: pool, "app.kubernetes.io/managed-by": FIELD_MANAGER},
            "annotations": {SNAPSHOT_DIGEST_ANNOTATION: snapshot_digest(&data)},
        },
        "data": data,
    })
}

/// Cuts a watched Node down to what [`node_view`] reads before the watch's store keeps it: a
/// kubelet's Node carries its image list, capacity, annotations and every writer's
/// managedFields, several KiB each, for every Node of the fleet. Of managedFields only the
/// entries that own part of the EKS `NetworkingReady` condition stay, reduced to that part
/// ([`condition_managers`]).
pub fn prune_node(node: &mut Node) {
    let key = condition_field_key(EKS_NETWORKING_CONDITION);
    let meta = &mut node.metadata;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(entries) = meta.managed_fields.as_mut() {
        entries.retain_mut(|m| {
            let owns = owns_condition(m, &key);
            m.fields_v1 =
                owns.then(|| FieldsV1(serde_json::json!({ "f:status": { "f:conditions": { key.as_str(): {} } } })));
            owns
        });
    }
    if let Some(status) = node.status.as_mut() {
        status.images = None;
        status.node_info = None;
        status.capacity = None;
        status.allocatable = None;
        status.volumes_attached = None;
        status.volumes_in_use = None;
        status.daemon_endpoints = None;
        status.config = None;
        status.features = None;
        status.runtime_handlers = None;
    }
}

/// The field managers that own any part of the Node's condition of type `ty` (managedFields).
#[must_use]
pub fn condition_managers<'a>(node: &'a Node, ty: &str) -> Vec<&'a str> {
    let key = condition_field_key(ty);
    node.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| owns_condition(m, &key))
        .filter_map(|m| m.manager.as_deref())
        .collect()
}

/// The managedFields key of the condition of type `ty` in `status.conditions` (a list keyed by
/// `type`).
fn condition_field_key(ty: &str) -> String {
    format!("k:{}", serde_json::json!({ "type": ty }))
}

/// Whether the managedFields entry owns any part of the condition whose key is `key`
/// ([`condition_field_key`]).
fn owns_condition(entry: &ManagedFieldsEntry, key: &str) -> bool {
    entry
        .fields_v1
        .as_ref()
        .is_some_and(|f| !f.0["f:status"]["f:conditions"][key].is_null())
}

#[must_use]
pub fn nodepool_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("karpenter.sh", "v1", "NodePool"), "nodepools")
}

#[must_use]
pub fn nodeclaim_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("karpenter.sh", "v1", "NodeClaim"), "nodeclaims")
}

#[must_use]
pub fn snapshot_name(pool: &str) -> String {
    format!("graywatch-nodepool-{pool}")
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("listing {what}: {source}")]
    List { what: &'static str, source: kube::Error },
    #[error("snapshot ConfigMap {name}: {problem}")]
    Snapshot { name: String, problem: String },
}

pub struct ClusterReader {
    client: Client,
    namespace: String,
    policy: Policy,
    nodes: reflector::Store<Node>,
    /// Where our Events are (config `event_namespace`).
    event_namespace: String,
}

impl ClusterReader {
    /// Starts the Node watch (until `shutdown`) and waits for its first full list.
    pub async fn start(client: Client, namespace: String, policy: Policy, shutdown: CancellationToken) -> Self {
        let (store, writer) = reflector::store();
        let stream = reflector(
            writer,
            watcher(Api::<Node>::all(client.clone()), watcher::Config::default()).modify(prune_node),
        )
        .default_backoff()
        .touched_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    ev = stream.next() => match ev {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => tracing::warn!(error = %e, "node watch error (retrying with backoff)"),
                        None => return,
                    },
                }
            }
        });
        let _ = store.wait_until_ready().await;
        Self {
            client,
            namespace,
            policy,
            nodes: store,
            event_namespace: crate::config::EVENT_NAMESPACE.into(),
        }
    }

    /// Every Node as the core sees it. No API call: the Node watch's store. Built once per tick,
    /// for both the address book (with the agents' pod IPs:
    /// [`crate::core::evidence::AddressBook::with_pod_addresses`]) and the decision step
    /// ([`Self::read_views`]).
    #[must_use]
    pub fn node_views(&self) -> BTreeMap<String, NodeView> {
        self.nodes
            .state()
            .iter()
            .map(|n| (n.name_any(), node_view(n, &self.policy)))
            .collect()
    }

    /// Reads our Events in `namespace` (config `event_namespace`) rather than the default.
    #[must_use]
    pub fn with_event_namespace(mut self, namespace: String) -> Self {
        self.event_namespace = namespace;
        self
    }

    /// One consistent-enough view for a decision step ([`Self::read_views`] of the Nodes now).
    pub async fn read(
        &self,
        now_ms: Millis,
        reports: BTreeMap<String, std::sync::Arc<NodeReport>>,
        actuator_failures: u32,
    ) -> Input {
        self.read_views(now_ms, reports, self.node_views(), actuator_failures)
            .await
    }

    /// The decision step's input from `nodes` ([`Self::node_views`]) and what else the cluster
    /// holds. A Karpenter read that fails (NodePools, our snapshots of them, NodeClaims) is
    /// flagged in the input and costs only the Karpenter part of the step: conditions and taints
    /// go on.
    pub async fn read_views(
        &self,
        now_ms: Millis,
        reports: BTreeMap<String, std::sync::Arc<NodeReport>>,
        mut nodes: BTreeMap<String, NodeView>,
        actuator_failures: u32,
    ) -> Input {
        let mut input = Input {
            now_ms,
            reports,
            actuator_failures,
            ..Input::default()
        };
        if self.policy.karpenter_exclude || self.policy.karpenter_replace {
            match self.pools().await {
                Ok(pools) => input.pools = pools,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the NodePools; no NodePool change this step");
                    input.pools_unreadable = true;
                }
            }
            if let Err(e) = self.claims(&mut nodes).await {
                tracing::warn!(error = %e, "cannot read the NodeClaims; no NodeClaim change this step");
                input.claims_unreadable = true;
            }
        }
        input.nodes = nodes;
        input
    }

    /// The NodePools with our verified snapshots (none without Karpenter).
    async fn pools(&self) -> Result<BTreeMap<String, PoolView>, ReadError> {
        let pool_api: Api<DynamicObject> = Api::all_with(self.client.clone(), &nodepool_resource());
        let list = match pool_api.list(&ListParams::default()).await {
            Ok(list) => list,
            // No Karpenter in this cluster.
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(BTreeMap::new()),
            Err(source) => {
                return Err(ReadError::List {
                    what: "NodePools",
                    source,
                });
            }
        };
        let mut snaps: BTreeMap<String, Result<PoolSnapshot, ReadError>> = BTreeMap::new();
        for s in list_snapshots(&self.client, &self.namespace).await? {
            snaps.insert(s.pool, s.snapshot);
        }
        let mut pools = BTreeMap::new();
        for p in list {
            let name = p.name_any();
            let list_at = |v: &serde_json::Value| {
                if v.is_array() { v.clone() } else { serde_json::json!([]) }
            };
            let (snapshot, snapshot_refused) = match snaps.remove(&name) {
                None => (None, None),
                Some(Ok(s)) => (Some(s), None),
                Some(Err(e)) => {
                    tracing::warn!(pool = %name, error = %e, "NodePool snapshot refused; leaving the NodePool alone");
                    (None, Some(e.to_string()))
                }
            };
            pools.insert(
                name.clone(),
                PoolView {
                    requirements: list_at(&p.data["spec"]["template"]["spec"]["requirements"]),
                    budgets: list_at(&p.data["spec"]["disruption"]["budgets"]),
                    name,
                    snapshot,
                    snapshot_refused,
                },
            );
        }
        Ok(pools)
    }

    /// Marks each Node with the NodeClaim that launched it.
    async fn claims(&self, nodes: &mut BTreeMap<String, NodeView>) -> Result<(), ReadError> {
        let claim_api: Api<DynamicObject> = Api::all_with(self.client.clone(), &nodeclaim_resource());
        match claim_api.list(&ListParams::default()).await {
            Ok(list) => {
                for c in list {
                    if let Some(node) = c.data["status"]["nodeName"].as_str()
                        && let Some(v) = nodes.get_mut(node)
                    {
                        v.nodeclaim = Some(c.name_any());
                    }
                }
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(source) => Err(ReadError::List {
                what: "NodeClaims",
                source,
            }),
        }
    }

    /// The actions taken before (by any replica or incarnation) within `window_ms` of `now_ms`,
    /// from our audit Events: a new engine starts with that budget spent. Events live at least
    /// the apiserver's `--event-ttl` (1 h by default), longer than the rate window (10 min).
    pub async fn past_actions(&self, now_ms: Millis, window_ms: Millis) -> Result<Vec<PastAction>, ReadError> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.event_namespace);
        let lp = ListParams::default().fields(&format!("source={FIELD_MANAGER}"));
        let list = api.list(&lp).await.map_err(|source| ReadError::List {
            what: "our Events",
            source,
        })?;
        Ok(list
            .items
            .iter()
            .filter_map(|e| past_action(e, now_ms, window_ms))
            .collect())
    }

    /// Whether a name is a Node, from the Node watch (the ingest gate refuses other names; the
    /// decision loop evicts the reports of deleted Nodes).
    #[must_use]
    pub fn node_lookup(&self) -> crate::gate::NodeLookup {
        let nodes = self.nodes.clone();
        std::sync::Arc::new(move |name: &str| nodes.get(&reflector::ObjectRef::new(name)).is_some())
    }
}

/// One of our NodePool snapshot ConfigMaps, verified and parsed.
#[derive(Debug)]
pub struct SavedSnapshot {
    /// The ConfigMap's name.
    pub name: String,
    /// The NodePool it is a snapshot of (its `SNAPSHOT_LABEL`).
    pub pool: String,
    /// What it holds, or why it is not trusted.
    pub snapshot: Result<PoolSnapshot, ReadError>,
}

/// Our snapshot ConfigMaps in `namespace` (selected by `SNAPSHOT_LABEL`), each verified and
/// parsed on its own: one refused snapshot does not hide the others. A snapshot is trusted only
/// at its pool's name, written by our field manager alone (managedFields) and with data that
/// matches its digest: anything else may have been made or changed by someone else, and
/// restoring from it could undo their NodePool edits.
pub async fn list_snapshots(client: &Client, namespace: &str) -> Result<Vec<SavedSnapshot>, ReadError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let list = api
        .list(&ListParams::default().labels(SNAPSHOT_LABEL))
        .await
        .map_err(|source| ReadError::List {
            what: "snapshot ConfigMaps",
            source,
        })?;
    Ok(list
        .into_iter()
        .filter_map(|cm| {
            let pool = cm.labels().get(SNAPSHOT_LABEL).cloned()?;
            Some(SavedSnapshot {
                name: cm.name_any(),
                snapshot: verify_snapshot(&cm, &pool),
                pool,
            })
        })
        .collect())
}

/// The snapshot `cm` holds of `pool`, if it is ours and intact (see [`list_snapshots`]).
pub fn verify_snapshot(cm: &ConfigMap, pool: &str) -> Result<PoolSnapshot, ReadError> {
    let name = cm.name_any();
    let refuse = |problem: String| ReadError::Snapshot {
        name: name.clone(),
        problem,
    };
    if name != snapshot_name(pool) {
        return Err(refuse(format!("not the snapshot name of NodePool {pool}")));
    }
    let managers: Vec<&str> = cm
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| m.manager.as_deref().unwrap_or(""))
        .collect();
    if let Some(other) = managers.iter().find(|m| **m != FIELD_MANAGER) {
        return Err(refuse(format!("written by {other:?} too, not by us alone")));
    }
    if managers.is_empty() {
        return Err(refuse("no field manager: not written by us".into()));
    }
    let data: BTreeMap<String, String> = cm.data.clone().unwrap_or_default().into_iter().collect();
    let digest = cm.annotations().get(SNAPSHOT_DIGEST_ANNOTATION);
    if digest != Some(&snapshot_digest(&data)) {
        return Err(refuse("its data does not match its digest".into()));
    }
    let field = |key: &str| data.get(key).ok_or_else(|| refuse(format!("no {key}")));
    let excluded: Vec<(String, String)> =
        serde_json::from_str(field("excluded")?).map_err(|e| refuse(format!("excluded: {e}")))?;
    let added: PoolEdits = serde_json::from_str(field("added")?).map_err(|e| refuse(format!("added: {e}")))?;
    Ok(PoolSnapshot { excluded, added })
}

/// The core's view of one Node.
#[must_use]
pub fn node_view(n: &Node, p: &Policy) -> NodeView {
    let status = n.status.as_ref();
    let spec = n.spec.as_ref();
    let internal_ips = status
        .and_then(|s| s.addresses.as_ref())
        .map(|a| {
            a.iter()
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse::<IpAddr>().ok())
                .collect()
        })
        .unwrap_or_default();
    let mut cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if let Some(c) = spec.and_then(|s| s.pod_cidr.clone()) {
        cidrs.push(c);
    }
    let mut pod_cidrs: Vec<ipnet::IpNet> = cidrs.iter().filter_map(|c| c.parse().ok()).collect();
    pod_cidrs.dedup();
    let conditions = status
        .and_then(|s| s.conditions.as_ref())
        .map(|cs| {
            cs.iter()
                .filter(|c| c.type_.starts_with(&p.condition_prefix) || c.type_ == EKS_NETWORKING_CONDITION)
                .map(|c| {
                    (
                        c.type_.clone(),
                        ObservedCondition {
                            status: CondStatus::parse(&c.status),
                            reason: c.reason.clone().unwrap_or_default(),
                            message: c.message.clone().unwrap_or_default(),
                            last_transition_ms: c.last_transition_time.as_ref().map_or(0, |t| t.0.as_millisecond()),
                        },
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    // The EKS node monitoring agent (or anyone else) writing NetworkingReady makes it theirs.
    let foreign_conditions = [EKS_NETWORKING_CONDITION]
        .into_iter()
        .filter(|ty| condition_managers(n, ty).iter().any(|m| *m != FIELD_MANAGER))
        .map(str::to_string)
        .collect();
    let tainted = spec
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| ts.iter().any(|t| t.key == p.taint_key));
    NodeView {
        name: n.name_any(),
        labels: n.labels().iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        internal_ips,
        pod_cidrs,
        conditions,
        tainted,
        nodeclaim: None,
        foreign_conditions,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::core::evidence::AddressBook;

    fn node(name: &str, ip: &str, pod_cidr: Option<&str>) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": pod_cidr.map_or(serde_json::json!({}), |c| serde_json::json!({"podCIDR": c})),
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
        }))
        .expect("a Node")
    }

    /// EKS VPC CNI: pods get secondary ENI addresses from the VPC subnet, nodes have no
    /// podCIDR. The pod IPs the agents report map remote pod IPs to their nodes.
    #[test]
    fn reported_pod_ips_outside_any_pod_cidr_map_to_their_node() {
        let policy = Policy::default();
        let nodes: BTreeMap<String, NodeView> = [
            node("a", "192.168.0.10", None),
            node("b", "192.168.0.11", None),
            node("c", "192.168.0.12", Some("10.244.2.0/24")),
        ]
        .iter()
        .map(|n| (n.name_any(), node_view(n, &policy)))
        .collect();
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let before = AddressBook::new(nodes.values());
        assert_eq!(before.node_of(&ip("192.168.5.7")), None, "no podCIDR covers it");

        let reported: BTreeMap<String, Arc<[IpAddr]>> = [
            (
                "a".to_owned(),
                Arc::from(vec![ip("192.168.5.7"), ip("2600:1f18::7"), ip("192.168.9.9")]),
            ),
            ("b".to_owned(), Arc::from(vec![ip("192.168.5.8"), ip("192.168.9.9")])),
            ("gone".to_owned(), Arc::from(vec![ip("192.168.5.99")])),
        ]
        .into_iter()
        .collect();
        let book = AddressBook::with_pod_addresses(&nodes, &reported);
        assert_eq!(book.node_of(&ip("192.168.5.7")), Some("a"));
        assert_eq!(book.node_of(&ip("2600:1f18::7")), Some("a"));
        assert_eq!(book.node_of(&ip("192.168.5.8")), Some("b"));
        assert_eq!(
            book.node_of(&ip("192.168.5.6")),
            None,
            "only the reported IPs, not a subnet"
        );
        assert_eq!(book.node_of(&ip("192.168.9.9")), None, "claimed by two nodes: neither");
        assert_eq!(
            book.node_of(&ip("192.168.5.99")),
            None,
            "a node that is gone maps nothing"
        );
        assert_eq!(book.node_of(&ip("10.244.2.3")), Some("c"), "pod CIDRs still map");
        assert_eq!(book.node_of(&ip("192.168.0.11")), Some("b"), "InternalIPs still map");
    }

    /// A kubelet's Node as the watch delivers it, and another manager writing `NetworkingReady`.
    fn kubelet_node() -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "ip-10-0-1-7",
                "labels": {"topology.kubernetes.io/zone": "zone-a", "karpenter.sh/nodepool": "default"},
                "annotations": {"node.alpha.kubernetes.io/ttl": "0", "csi.volume.kubernetes.io/nodeid": "{}"},
                "managedFields": [
                    {"manager": "kubelet", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {
                        "f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}}}, "f:images": {}}}},
                    {"manager": "eks-node-monitoring-agent", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {
                        "f:status": {"f:conditions": {"k:{\"type\":\"NetworkingReady\"}": {".": {}, "f:status": {}}}}}},
                    {"manager": FIELD_MANAGER, "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {
                        "f:status": {"f:conditions": {"k:{\"type\":\"graywatch.io/Healthy\"}": {".": {}}}}}}
                ]
            },
            "spec": {"podCIDR": "10.244.7.0/24", "taints": [{"key": "graywatch.io/degraded", "effect": "NoSchedule"}]},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "10.0.1.7"}, {"type": "Hostname", "address": "ip-10-0-1-7"}],
                "conditions": [
                    {"type": "Ready", "status": "True"},
                    {"type": "NetworkingReady", "status": "False", "reason": "IPAMDNotReady"},
                    {"type": "graywatch.io/Healthy", "status": "True", "reason": "Healthy"}
                ],
                "images": [{"names": ["public.ecr.aws/eks/aws-vpc-cni:v1.19.0"], "sizeBytes": 50_000_000}],
                "capacity": {"cpu": "2", "memory": "8Gi"},
                "allocatable": {"cpu": "1930m", "memory": "7Gi"},
                "nodeInfo": {"machineID": "m", "systemUUID": "s", "bootID": "b", "kernelVersion": "6.1.0",
                    "osImage": "Amazon Linux 2023", "containerRuntimeVersion": "containerd://1.7", "kubeletVersion": "v1.33.0",
                    "kubeProxyVersion": "v1.33.0", "operatingSystem": "linux", "architecture": "amd64"}
            }
        }))
        .expect("a Node")
    }

    #[test]
    fn a_pruned_node_keeps_everything_its_view_reads() {
        let policy = Policy::default();
        let node = kubelet_node();
        let mut pruned = node.clone();
        prune_node(&mut pruned);
        let view = node_view(&node, &policy);
        assert!(
            view.foreign_conditions.contains(EKS_NETWORKING_CONDITION),
            "the fixture exercises ownership"
        );
        assert!(view.tainted && !view.labels.is_empty() && !view.internal_ips.is_empty());
        assert_eq!(node_view(&pruned, &policy), view);
        let managers: Vec<_> = pruned
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter_map(|m| m.manager.as_deref())
            .collect();
        assert_eq!(
            managers,
            ["eks-node-monitoring-agent"],
            "only owners of NetworkingReady stay"
        );
        let status = pruned.status.as_ref().expect("status");
        assert!(status.images.is_none() && status.node_info.is_none() && status.capacity.is_none());
        assert!(pruned.metadata.annotations.is_none());
        assert!(
            serde_json::to_vec(&pruned).expect("json").len() * 2 < serde_json::to_vec(&node).expect("json").len(),
            "pruned to less than half"
        );
    }
}
