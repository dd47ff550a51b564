//! A builder for the Node objects the tests and the fleet bench create: the labels graywatch
//! reads (zone, instance type, Karpenter NodePool), addresses, podCIDR, and a Ready kubelet.

use std::collections::BTreeMap;

use serde_json::{Value, json};

pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const INSTANCE_TYPE_LABEL: &str = "node.kubernetes.io/instance-type";
pub const NODEPOOL_LABEL: &str = "karpenter.sh/nodepool";
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// A Node as its kubelet would have registered it: Ready, with the given labels and addresses.
/// Nodes accept status on create, so one POST of [`NodeBuilder::build`] is the whole setup.
#[derive(Clone, Debug)]
pub struct NodeBuilder {
    name: String,
    labels: BTreeMap<String, String>,
    addresses: Vec<(&'static str, String)>,
    pod_cidr: Option<String>,
}

impl NodeBuilder {
    #[must_use]
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            labels: BTreeMap::new(),
            addresses: Vec::new(),
            pod_cidr: None,
        }
    }

    #[must_use]
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    #[must_use]
    pub fn zone(self, zone: &str) -> Self {
        self.label(ZONE_LABEL, zone)
    }

    #[must_use]
    pub fn instance_type(self, instance_type: &str) -> Self {
        self.label(INSTANCE_TYPE_LABEL, instance_type)
    }

    #[must_use]
    pub fn nodepool(self, pool: &str) -> Self {
        self.label(NODEPOOL_LABEL, pool)
    }

    /// A `status.addresses` entry (`InternalIP`, `Hostname`, …), in call order.
    #[must_use]
    pub fn address(mut self, ty: &'static str, address: &str) -> Self {
        self.addresses.push((ty, address.into()));
        self
    }

    #[must_use]
    pub fn internal_ip(self, ip: &str) -> Self {
        self.address("InternalIP", ip)
    }

    #[must_use]
    pub fn pod_cidr(mut self, cidr: &str) -> Self {
        self.pod_cidr = Some(cidr.into());
        self
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Node object as JSON.
    #[must_use]
    pub fn build(&self) -> Value {
        let addresses: Vec<Value> = self
            .addresses
            .iter()
            .map(|(ty, address)| json!({"type": ty, "address": address}))
            .collect();
        let mut node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.name, "labels": self.labels},
            "status": {
                "addresses": addresses,
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "graywatch testkit",
                                "lastHeartbeatTime": "2026-11-22T12:00:00Z",
                                "lastTransitionTime": "2026-11-22T12:00:00Z"}],
            },
        });
        if let Some(cidr) = &self.pod_cidr {
            node["spec"] = json!({"podCIDR": cidr, "podCIDRs": [cidr]});
        }
        node
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_carries_its_labels_addresses_cidr_and_ready() {
        let node = NodeBuilder::new("n-1")
            .zone("zone-a")
            .nodepool("default")
            .label(HOSTNAME_LABEL, "n-1")
            .internal_ip("10.0.0.1")
            .address("Hostname", "n-1")
            .pod_cidr("10.244.1.0/24")
            .build();
        assert_eq!(node["metadata"]["labels"][ZONE_LABEL], "zone-a");
        assert_eq!(node["metadata"]["labels"][NODEPOOL_LABEL], "default");
        assert_eq!(node["metadata"]["labels"][HOSTNAME_LABEL], "n-1");
        assert_eq!(node["status"]["addresses"][0]["type"], "InternalIP");
        assert_eq!(node["status"]["addresses"][1]["address"], "n-1");
        assert_eq!(node["spec"]["podCIDRs"][0], "10.244.1.0/24");
        assert_eq!(node["status"]["conditions"][0]["status"], "True");
    }
}
