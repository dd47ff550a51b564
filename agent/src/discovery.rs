//! Aggregator replicas from the Kubernetes API instead of cluster DNS.
//!
//! DNS is itself a frequent gray failure (and some clusters have no cluster DNS at all), so the
//! agent can watch the `Endpoints` of the aggregator's headless Service (core/v1, served by every
//! Kubernetes version; EndpointSlice needs 1.21) and stream to every ready address. The view is
//! published on a watch channel; [`crate::fanout::Fanout`] falls back to DNS whenever it holds no
//! address (API unreachable, access denied, not synced yet, or no ready replica).
//!
//! Needs RBAC in the Service's namespace: `endpoints` `get`, `list`, `watch`.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Endpoints;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::watch;
use tracing::{info, warn};

/// The Service whose Endpoints list the aggregator replicas: `namespace/service[:port-name]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    /// The Endpoints port to dial, by name; `None`: the only port, or the one numbered as in
    /// the aggregator URL.
    pub port_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not <namespace>/<service>[:<port-name>] (e.g. graywatch/graywatch-aggregator-replicas:grpc)")]
pub struct BadServiceRef(String);

impl FromStr for ServiceRef {
    type Err = BadServiceRef;

    fn from_str(s: &str) -> Result<Self, BadServiceRef> {
        let bad = || BadServiceRef(s.to_owned());
        let (namespace, rest) = s.split_once('/').ok_or_else(bad)?;
        let (name, port_name) = match rest.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (rest, None),
        };
        // DNS-1123 labels (namespaces and Service names); port names are IANA_SVC_NAMEs,
        // lowercase alphanumerics and '-' as well.
        let label = |v: &str| {
            !v.is_empty()
                && v.len() <= 63
                && v.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !v.starts_with('-')
                && !v.ends_with('-')
        };
        if !label(namespace) || !label(name) || port_name.is_some_and(|p| !label(p)) {
            return Err(bad());
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            port_name: port_name.map(str::to_owned),
        })
    }
}

impl std::fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if let Some(port) = &self.port_name {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

/// Ready addresses of `endpoints` on the port named `port_name` (or, unnamed, the subset's only
/// port or the one numbered `url_port`). Not-ready addresses and unparsable IPs are left out.
#[must_use]
pub fn ready_addresses(endpoints: &Endpoints, port_name: Option<&str>, url_port: u16) -> BTreeSet<SocketAddr> {
    let mut out = BTreeSet::new();
    for subset in endpoints.subsets.iter().flatten() {
        let ports = subset.ports.as_deref().unwrap_or_default();
        let port = match port_name {
            Some(name) => ports.iter().find(|p| p.name.as_deref() == Some(name)),
            None if ports.len() == 1 => ports.first(),
            None => ports.iter().find(|p| u16::try_from(p.port).ok() == Some(url_port)),
        };
        let Some(port) = port.and_then(|p| u16::try_from(p.port).ok()) else {
            continue;
        };
        for address in subset.addresses.iter().flatten() {
            if let Ok(ip) = address.ip.parse::<IpAddr>() {
                out.insert(SocketAddr::new(ip, port));
            }
        }
    }
    out
}

/// What changes from the streams running (`current`) to the replicas listed (`wanted`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressDiff {
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
}

#[must_use]
pub fn diff<'a>(current: impl IntoIterator<Item = &'a SocketAddr>, wanted: &BTreeSet<SocketAddr>) -> AddressDiff {
    let current: BTreeSet<SocketAddr> = current.into_iter().copied().collect();
    AddressDiff {
        added: wanted.difference(&current).copied().collect(),
        removed: current.difference(wanted).copied().collect(),
    }
}

/// The API's view of the replicas: `None` while it has none to offer (not synced yet, or the
/// watch is failing), so the agent uses DNS meanwhile.
pub type ApiView = Option<BTreeSet<SocketAddr>>;

/// Watches `service`'s Endpoints until the receiver is dropped or `shutdown` fires.
pub fn spawn_watch(
    client: Client,
    service: ServiceRef,
    url_port: u16,
    shutdown: tokio_util::sync::CancellationToken,
) -> watch::Receiver<ApiView> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        tokio::select! {
            () = watch_endpoints(client, &service, url_port, &tx) => {}
            () = shutdown.cancelled() => {}
            () = tx.closed() => {}
        }
    });
    rx
}

async fn watch_endpoints(client: Client, service: &ServiceRef, url_port: u16, tx: &watch::Sender<ApiView>) {
    let api: Api<Endpoints> = Api::namespaced(client, &service.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", service.name));
    let mut stream = watcher(api, config).default_backoff().boxed();
    let port_name = service.port_name.as_deref();
    // Addresses gathered during a (re-)list, published at InitDone.
    let mut listing: Option<BTreeSet<SocketAddr>> = None;
    let mut failing = false;
    while let Some(event) = stream.next().await {
        let view = match event {
            Ok(watcher::Event::Init) => {
                listing = Some(BTreeSet::new());
                continue;
            }
            Ok(watcher::Event::InitApply(endpoints)) => {
                listing
                    .get_or_insert_default()
                    .extend(ready_addresses(&endpoints, port_name, url_port));
                continue;
            }
            Ok(watcher::Event::InitDone) => listing.take().unwrap_or_default(),
            Ok(watcher::Event::Apply(endpoints)) => ready_addresses(&endpoints, port_name, url_port),
            Ok(watcher::Event::Delete(_)) => BTreeSet::new(),
            Err(error) => {
                if !failing {
                    warn!(%service, %error, "watching the aggregator's Endpoints failed; using DNS until it recovers");
                }
                failing = true;
                tx.send_replace(None);
                continue;
            }
        };
        if failing {
            info!(%service, "watching the aggregator's Endpoints again");
            failing = false;
        }
        tx.send_if_modified(|current| {
            let changed = current.as_ref() != Some(&view);
            if changed {
                info!(%service, replicas = view.len(), "aggregator replicas from the API");
                *current = Some(view);
            }
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{EndpointAddress, EndpointPort, EndpointSubset};

    use super::*;

    /// (ready IPs, not-ready IPs, (port name, port)) per subset.
    type Subset<'a> = (Vec<&'a str>, Vec<&'a str>, Vec<(&'a str, i32)>);

    fn endpoints(subsets: Vec<Subset<'_>>) -> Endpoints {
        let address = |ip: &&str| EndpointAddress {
            ip: (*ip).to_owned(),
            ..Default::default()
        };
        Endpoints {
            subsets: Some(
                subsets
                    .into_iter()
                    .map(|(ready, not_ready, ports)| EndpointSubset {
                        addresses: Some(ready.iter().map(address).collect()),
                        not_ready_addresses: Some(not_ready.iter().map(address).collect()),
                        ports: Some(
                            ports
                                .into_iter()
                                .map(|(name, port)| EndpointPort {
                                    name: Some(name.to_owned()),
                                    port,
                                    ..Default::default()
                                })
                                .collect(),
                        ),
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn addrs(list: &[&str]) -> BTreeSet<SocketAddr> {
        list.iter().map(|a| a.parse().expect("socket address")).collect()
    }

    #[test]
    fn service_refs_parse_and_bad_ones_are_named() {
        let s: ServiceRef = "graywatch/graywatch-aggregator-replicas:grpc".parse().expect("valid");
        assert_eq!(s.namespace, "graywatch");
        assert_eq!(s.name, "graywatch-aggregator-replicas");
        assert_eq!(s.port_name.as_deref(), Some("grpc"));
        assert_eq!(s.to_string(), "graywatch/graywatch-aggregator-replicas:grpc");
        let s: ServiceRef = "ns/svc".parse().expect("valid");
        assert_eq!(s.port_name, None);
        for bad in ["svc", "/svc", "ns/", "ns/Svc", "ns/svc:", "ns/a/b", "http://ns/svc"] {
            let err = bad.parse::<ServiceRef>().expect_err(bad);
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn only_ready_addresses_on_the_named_port() {
        let ep = endpoints(vec![
            (
                vec!["10.1.0.5", "10.1.0.6"],
                vec!["10.1.0.7"],
                vec![("grpc", 7443), ("metrics", 9102)],
            ),
            (vec!["fd00::9", "not-an-ip"], vec![], vec![("grpc", 7444)]),
        ]);
        assert_eq!(
            ready_addresses(&ep, Some("grpc"), 1),
            addrs(&["10.1.0.5:7443", "10.1.0.6:7443", "[fd00::9]:7444"])
        );
        // Unnamed: a single-port subset's port, else the URL's port number.
        assert_eq!(
            ready_addresses(&ep, None, 9102),
            addrs(&["10.1.0.5:9102", "10.1.0.6:9102", "[fd00::9]:7444"])
        );
        assert_eq!(ready_addresses(&ep, Some("nope"), 7443), BTreeSet::new());
        assert_eq!(ready_addresses(&Endpoints::default(), None, 7443), BTreeSet::new());
    }

    #[test]
    fn diff_starts_new_replicas_and_stops_vanished_ones() {
        let current = addrs(&["10.1.0.5:7443", "10.1.0.6:7443"]);
        let d = diff(&current, &addrs(&["10.1.0.6:7443", "10.1.0.8:7443"]));
        assert_eq!(d.added, vec!["10.1.0.8:7443".parse().expect("addr")]);
        assert_eq!(d.removed, vec!["10.1.0.5:7443".parse().expect("addr")]);
        assert_eq!(diff(&current, &current), AddressDiff::default());
        let d = diff(&BTreeSet::new(), &current);
        assert_eq!((d.added.len(), d.removed.len()), (2, 0));
    }
}
