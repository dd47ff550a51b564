//! Bounded peers: the window's flows folded by remote address, then into node-level peers
//! (every address that maps to a Node by InternalIP, pod CIDR or pod IP), a bounded top-N of
//! other addresses, and one "external" bucket for the rest. Computed once per window and shared
//! by the local scorer and the wire summary.
//!
//! The address → node book comes from the Kubernetes API (a watch of the Nodes, kept as
//! addresses and CIDRs only) when the agent has a client; without one every address is "other".
//! Addresses it does not map (pod IPs outside any pod CIDR) are asked of the aggregator, which
//! knows every agent's pod IPs ([`AddressAnswers`]).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use tracing::{info, warn};

use crate::summary::{Direction, RttBuckets, WindowSummary};

/// How many peers a window carries at most (besides the external bucket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLimits {
    /// Node-level peers, busiest first; the rest go to the external bucket.
    pub max_nodes: usize,
    /// Addresses that map to no node, busiest first; the rest go to the external bucket.
    pub max_others: usize,
}

impl Default for PeerLimits {
    /// 2,048 + 256 + 1 entries: under the aggregator's 4,096 peers, and ~150 B each on the wire.
    fn default() -> Self {
        Self {
            max_nodes: 2_048,
            max_others: 256,
        }
    }
}

/// An address prefix (network address truncated to `len` bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Prefix {
    net: IpAddr,
    len: u8,
}

fn truncate(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len.min(32)))
            };
            IpAddr::V4((bits & mask).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len.min(128)))
            };
            IpAddr::V6((bits & mask).into())
        }
    }
}

fn parse_cidr(text: &str) -> Option<Prefix> {
    let (addr, len) = text.split_once('/')?;
    let addr: IpAddr = addr.trim().parse().ok()?;
    let len: u8 = len.trim().parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then(|| Prefix {
        net: truncate(addr, len),
        len,
    })
}

/// What one Node contributes to the book.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAddresses {
    pub internal_ips: Vec<IpAddr>,
    pub pod_cidrs: Vec<String>,
}

impl NodeAddresses {
    pub fn of(node: &Node) -> Self {
        let internal_ips = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .map(|a| {
                a.iter()
                    .filter(|a| a.type_ == "InternalIP")
                    .filter_map(|a| a.address.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let spec = node.spec.as_ref();
        let mut pod_cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
        if let Some(c) = spec.and_then(|s| s.pod_cidr.clone()) {
            pod_cidrs.push(c);
        }
        pod_cidrs.sort();
        pod_cidrs.dedup();
        Self {
            internal_ips,
            pod_cidrs,
        }
    }
}

/// Remote address → Node name.
#[derive(Debug, Default)]
pub struct PeerBook {
    exact: HashMap<IpAddr, Arc<str>>,
    /// By prefix length, longest first.
    cidrs: Vec<(u8, HashMap<IpAddr, Arc<str>>)>,
    /// The address a node-level peer names on the wire (the node's first InternalIP).
    representative: HashMap<Arc<str>, IpAddr>,
}

impl PeerBook {
    /// The book of `nodes` (name → addresses).
    pub fn new<'a>(nodes: impl IntoIterator<Item = (&'a str, &'a NodeAddresses)>) -> Self {
        let mut book = Self::default();
        let mut by_len: HashMap<u8, HashMap<IpAddr, Arc<str>>> = HashMap::new();
        for (name, addresses) in nodes {
            let name: Arc<str> = Arc::from(name);
            for ip in &addresses.internal_ips {
                book.exact.insert(*ip, name.clone());
                book.representative.entry(name.clone()).or_insert(*ip);
            }
            for prefix in addresses.pod_cidrs.iter().filter_map(|c| parse_cidr(c)) {
                by_len.entry(prefix.len).or_default().insert(prefix.net, name.clone());
            }
        }
        book.cidrs = by_len.into_iter().collect();
        book.cidrs.sort_by_key(|c| std::cmp::Reverse(c.0));
        book
    }

    /// The node `addr` belongs to, if any.
    pub fn node_of(&self, addr: &IpAddr) -> Option<&Arc<str>> {
        if let Some(name) = self.exact.get(addr) {
            return Some(name);
        }
        self.cidrs.iter().find_map(|(len, nets)| {
            let max = if addr.is_ipv4() { 32 } else { 128 };
            if *len > max {
                return None;
            }
            nets.get(&truncate(*addr, *len))
        })
    }

    pub fn nodes(&self) -> usize {
        self.representative.len()
    }
}

/// At most this many nodes are held from the aggregator's pages: its own bound (`ingest.max_nodes`
/// default), so a misbehaving aggregator cannot grow the agent's memory without limit.
pub const MAX_BOOK_NODES: usize = 20_000;

/// The aggregator's book as its pages arrive (`Directive.peer_book_delta`): one per stream, as a
/// new stream starts with a `reset` page.
#[derive(Debug, Default)]
pub struct BookPages {
    nodes: std::collections::BTreeMap<String, graywatch_proto::v1::NodePeers>,
}

impl BookPages {
    /// Applies one page; at the end of a run of pages (`more` unset) returns the whole book to
    /// hand to [`SharedPeerBook::set_aggregator_book`], so no half-applied run is ever used.
    pub fn apply(&mut self, page: graywatch_proto::v1::PeerBookDelta) -> Option<graywatch_proto::v1::PeerBook> {
        if page.reset {
            self.nodes.clear();
        }
        for name in &page.remove {
            self.nodes.remove(name);
        }
        for entry in page.upsert {
            if self.nodes.len() < MAX_BOOK_NODES || self.nodes.contains_key(&entry.node_name) {
                self.nodes.insert(entry.node_name.clone(), entry);
            }
        }
        (!page.more).then(|| graywatch_proto::v1::PeerBook {
            nodes: self.nodes.values().cloned().collect(),
        })
    }
}

/// The book shared between its sources and the window builder: the agent's own watch of the
/// Nodes (InternalIPs, pod CIDRs) and the aggregator's book, which adds the pod IPs every agent
/// reports (EKS VPC CNI: pod IPs in no pod CIDR).
#[derive(Debug, Clone, Default)]
pub struct SharedPeerBook {
    book: Arc<RwLock<Arc<PeerBook>>>,
    sources: Arc<std::sync::Mutex<Sources>>,
}

#[derive(Debug, Default)]
struct Sources {
    api: HashMap<String, NodeAddresses>,
    aggregator: HashMap<String, NodeAddresses>,
}

impl SharedPeerBook {
    /// The current book (cheap: a pointer copy).
    pub fn get(&self) -> Arc<PeerBook> {
        self.book.read().map(|b| b.clone()).unwrap_or_default()
    }

    fn rebuild(&self, sources: &Sources) {
        let mut merged: HashMap<&str, NodeAddresses> = HashMap::new();
        // The API's addresses first: a node-level peer is named by its InternalIP.
        for (name, a) in sources.api.iter().chain(sources.aggregator.iter()) {
            let entry = merged.entry(name.as_str()).or_default();
            entry.internal_ips.extend(a.internal_ips.iter().copied());
            entry.pod_cidrs.extend(a.pod_cidrs.iter().cloned());
        }
        let book = PeerBook::new(merged.iter().map(|(n, a)| (*n, a)));
        if let Ok(mut current) = self.book.write() {
            *current = Arc::new(book);
        }
    }

    /// The Nodes as the agent's own watch sees them.
    pub fn set_api_nodes(&self, nodes: HashMap<String, NodeAddresses>) {
        let Ok(mut sources) = self.sources.lock() else { return };
        sources.api = nodes;
        self.rebuild(&sources);
    }

    /// The aggregator's book (from [`BookPages`], or an older aggregator's `Directive.peer_book`);
    /// unparsable entries are skipped.
    pub fn set_aggregator_book(&self, book: &graywatch_proto::v1::PeerBook) {
        let nodes = book
            .nodes
            .iter()
            .map(|n| {
                (
                    n.node_name.clone(),
                    NodeAddresses {
                        internal_ips: n.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                        pod_cidrs: n.pod_cidrs.clone(),
                    },
                )
            })
            .collect();
        let Ok(mut sources) = self.sources.lock() else { return };
        sources.aggregator = nodes;
        self.rebuild(&sources);
    }

    /// Keeps the book in step with the cluster's Nodes until the stream ends (kube-runtime's
    /// backoff on errors; without RBAC to list Nodes the book stays empty and every remote is
    /// an "other" address).
    pub async fn watch_nodes(self, client: Client) {
        let api: Api<Node> = Api::all(client);
        let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
        let mut nodes: HashMap<String, NodeAddresses> = HashMap::new();
        let mut pending: HashMap<String, NodeAddresses> = HashMap::new();
        let mut synced = false;
        while let Some(event) = stream.next().await {
            let changed = match event {
                Ok(watcher::Event::Init) => {
                    pending.clear();
                    false
                }
                Ok(watcher::Event::InitApply(node)) => {
                    pending.insert(node.name_any(), NodeAddresses::of(&node));
                    false
                }
                Ok(watcher::Event::InitDone) => {
                    nodes = std::mem::take(&mut pending);
                    if !synced {
                        info!(nodes = nodes.len(), "peer book synced from the Nodes");
                        synced = true;
                    }
                    true
                }
                Ok(watcher::Event::Apply(node)) => {
                    let addresses = NodeAddresses::of(&node);
                    nodes.insert(node.name_any(), addresses.clone()) != Some(addresses)
                }
                Ok(watcher::Event::Delete(node)) => nodes.remove(&node.name_any()).is_some(),
                Err(watcher::Error::InitialListFailed(kube::Error::Api(status))) if status.code == 403 => {
                    warn!(
                        reason = %status.message,
                        "no permission to list Nodes: peers are not grouped by node (grant the agent nodes list/watch)"
                    );
                    return;
                }
                Err(error) => {
                    warn!(%error, "node watch error (peer book); retrying with backoff");
                    false
                }
            };
            if changed {
                self.set_api_nodes(nodes.clone());
            }
        }
    }
}

/// How long an answer naming a node holds before the address is asked about again (it is still
/// used meanwhile): a pod IP moves to another node only after its pod is gone and the IP is
/// handed out again, which the VPC CNI delays.
pub const OWNER_TTL: Duration = Duration::from_mins(5);
/// How long an "unknown" answer holds: a new pod's IP is unknown until its agent reports it.
pub const UNKNOWN_TTL: Duration = Duration::from_mins(1);
/// An asked address without an answer (no aggregator, or a lost directive) is asked again after
/// this long.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);
/// An address not seen in any window for this long is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_mins(10);
/// At most this many addresses are held; past it new ones are neither asked about nor held
/// (they stay "other" addresses) until old ones are forgotten.
pub const MAX_ANSWERS: usize = 65_536;

/// The aggregator's answers about remote addresses the agent's own book does not map (pod IPs
/// outside any pod CIDR: EKS's VPC CNI), asked for address by address as traffic to them is
/// seen (`NodeSummary.address_lookups`). Each agent holds only the addresses it talks to, where
/// a book of every node's pod IPs sent to every agent would cost O(nodes²) bytes at connect.
#[derive(Debug, Default)]
pub struct AddressAnswers {
    entries: HashMap<IpAddr, Answer>,
}

#[derive(Debug)]
struct Answer {
    /// The node; `None` while unknown to the aggregator or not answered yet.
    node: Option<Arc<str>>,
    /// When the address is due to be asked about (again).
    ask_at: Instant,
    /// When the address was last seen in a window.
    seen_at: Instant,
}

impl AddressAnswers {
    /// The node the aggregator last named for `addr`.
    pub fn node_of(&self, addr: &IpAddr) -> Option<&Arc<str>> {
        self.entries.get(addr).and_then(|a| a.node.as_ref())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Takes in an answer. Only addresses this agent asked about are held (an aggregator cannot
    /// grow the agent's memory by answering what nobody asked); unparsable entries are skipped.
    pub fn absorb(&mut self, answers: &graywatch_proto::v1::AddressAnswers, now: Instant) {
        let owners = answers
            .owners
            .iter()
            .filter_map(|o| Some((o.address.parse().ok()?, Some(o.node_name.as_str()))));
        let unknown = answers.unknown.iter().filter_map(|a| Some((a.parse().ok()?, None)));
        for (addr, node) in owners.chain(unknown) {
            if let Some(entry) = self.entries.get_mut(&addr) {
                entry.node = node.filter(|n| !n.is_empty()).map(Arc::from);
                entry.ask_at = now + if entry.node.is_some() { OWNER_TTL } else { UNKNOWN_TTL };
            }
        }
    }

    /// The window's addresses that the agent's own book does not map (`unmapped`, busiest first)
    /// to ask about now: never asked, or their answer expired, or asked without an answer for
    /// [`RETRY_AFTER`]; at most `max`. Also forgets addresses unseen for [`FORGET_AFTER`].
    pub fn lookups(&mut self, unmapped: &[IpAddr], now: Instant, max: usize) -> Vec<IpAddr> {
        let mut ask = Vec::new();
        for addr in unmapped {
            let due = ask.len() < max;
            let room = self.entries.len() < MAX_ANSWERS;
            match self.entries.get_mut(addr) {
                Some(entry) => {
                    entry.seen_at = now;
                    if due && entry.ask_at <= now {
                        entry.ask_at = now + RETRY_AFTER;
                        ask.push(*addr);
                    }
                }
                None if due && room => {
                    self.entries.insert(
                        *addr,
                        Answer {
                            node: None,
                            ask_at: now + RETRY_AFTER,
                            seen_at: now,
                        },
                    );
                    ask.push(*addr);
                }
                None => {}
            }
        }
        self.entries.retain(|_, a| now.duration_since(a.seen_at) < FORGET_AFTER);
        ask
    }
}

/// A window's peers, and the addresses among them the agent's own book does not map.
#[derive(Debug, Clone, Default)]
pub struct WindowPeers {
    pub peers: Vec<PeerWindow>,
    /// Remote addresses in no Node's InternalIPs or pod CIDRs as the agent's book knows them
    /// (whether or not the aggregator has answered for them), busiest first.
    pub unmapped: Vec<IpAddr>,
}

/// What the node measured towards one peer (a node, one address, or the external bucket), over
/// all its workloads.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerWindow {
    /// The address named on the wire: the address itself, a node's InternalIP, or `::` for the
    /// external bucket.
    pub remote: IpAddr,
    /// Set for a node-level peer.
    pub node: Option<Arc<str>>,
    pub external: bool,
    /// Distinct remote addresses folded into this peer.
    pub addresses: u32,
    pub rtt_samples: u64,
    pub rtt_p50_us: Option<f64>,
    pub rtt_p99_us: Option<f64>,
    pub rtt: Option<RttBuckets>,
    pub segments_out: u64,
    pub retransmits: u64,
    /// Connection attempts towards the peer nobody answered.
    pub unanswered_connects: u64,
}

impl PeerWindow {
    /// How the peer is named in reasons and series: the node, the address, or "external".
    pub fn label(&self) -> String {
        match (&self.node, self.external) {
            (Some(node), _) => format!("node {node}"),
            (None, true) => "external".to_owned(),
            (None, false) => self.remote.to_string(),
        }
    }
}

/// Per-remote accumulation; RTT from outbound connections preferred (see [`peers`]).
#[derive(Debug, Default)]
struct Fold {
    segments_out: u64,
    retransmits: u64,
    unanswered_connects: u64,
    outbound: RttBuckets,
    other: RttBuckets,
    addresses: u32,
}

impl Fold {
    fn add(&mut self, other: &Fold) {
        self.segments_out += other.segments_out;
        self.retransmits += other.retransmits;
        self.unanswered_connects += other.unanswered_connects;
        self.outbound.add(&other.outbound);
        self.other.add(&other.other);
        self.addresses += other.addresses;
    }

    /// How busy the peer was: what ranks peers for the top-N.
    fn weight(&self) -> u64 {
        self.segments_out + self.unanswered_connects + self.outbound.samples() + self.other.samples()
    }

    fn into_peer(self, remote: IpAddr, node: Option<Arc<str>>, external: bool) -> PeerWindow {
        // RTT comes from the connections this node opened when there are any: on accepted
        // connections the smoothed RTT includes the clients' think time.
        let rtt = if self.outbound.is_empty() {
            self.other
        } else {
            self.outbound
        };
        let rtt = (!rtt.is_empty()).then_some(rtt);
        PeerWindow {
            remote,
            node,
            external,
            addresses: self.addresses,
            rtt_samples: rtt.as_ref().map_or(0, RttBuckets::samples),
            rtt_p50_us: rtt.as_ref().and_then(|r| r.quantile_us(0.5)).map(|v| v as f64),
            rtt_p99_us: rtt.as_ref().and_then(|r| r.quantile_us(0.99)).map(|v| v as f64),
            rtt,
            segments_out: self.segments_out,
            retransmits: self.retransmits,
            unanswered_connects: self.unanswered_connects,
        }
    }
}

/// The window's peers: node-level peers (busiest `max_nodes`), the busiest `max_others`
/// addresses that map to no node, and one external bucket with everything else (absent when
/// empty). Node peers first (by name), then addresses, then the external bucket. An address
/// maps to a node through the agent's own `book` first, then through the aggregator's
/// `answers`.
pub fn peers(summary: &WindowSummary, book: &PeerBook, answers: &AddressAnswers, limits: PeerLimits) -> WindowPeers {
    let mut by_remote: HashMap<IpAddr, Fold> = HashMap::new();
    for flow in &summary.network.flows {
        let fold = by_remote.entry(flow.remote).or_insert_with(|| Fold {
            addresses: 1,
            ..Fold::default()
        });
        fold.segments_out += flow.segments_sent;
        fold.retransmits += flow.retransmits;
        fold.unanswered_connects += flow.unanswered_connects;
        if flow.rtt.is_some() {
            if flow.direction == Direction::Outbound {
                fold.outbound.add(&flow.rtt_buckets);
            } else {
                fold.other.add(&flow.rtt_buckets);
            }
        }
    }
    let mut by_node: HashMap<Arc<str>, (IpAddr, Fold)> = HashMap::new();
    let mut others: Vec<(IpAddr, Fold)> = Vec::new();
    let mut unmapped: Vec<(IpAddr, u64)> = Vec::new();
    for (remote, fold) in by_remote {
        let node = book.node_of(&remote).or_else(|| {
            unmapped.push((remote, fold.weight()));
            answers.node_of(&remote)
        });
        match node {
            Some(node) => {
                let representative = book.representative.get(node).copied().unwrap_or(remote);
                by_node
                    .entry(node.clone())
                    .or_insert_with(|| (representative, Fold::default()))
                    .1
                    .add(&fold);
            }
            None => others.push((remote, fold)),
        }
    }
    let mut external = Fold::default();
    let mut nodes: Vec<(Arc<str>, IpAddr, Fold)> = by_node.into_iter().map(|(n, (a, f))| (n, a, f)).collect();
    nodes.sort_by(|a, b| b.2.weight().cmp(&a.2.weight()).then_with(|| a.0.cmp(&b.0)));
    for (_, _, fold) in nodes.drain(limits.max_nodes.min(nodes.len())..) {
        external.add(&fold);
    }
    others.sort_by(|a, b| b.1.weight().cmp(&a.1.weight()).then_with(|| a.0.cmp(&b.0)));
    for (_, fold) in others.drain(limits.max_others.min(others.len())..) {
        external.add(&fold);
    }
    nodes.sort_by(|a, b| a.0.cmp(&b.0));
    others.sort_by_key(|(addr, _)| *addr);
    let mut out: Vec<PeerWindow> = nodes
        .into_iter()
        .map(|(node, addr, fold)| fold.into_peer(addr, Some(node), false))
        .chain(others.into_iter().map(|(addr, fold)| fold.into_peer(addr, None, false)))
        .collect();
    if external.addresses > 0 {
        out.push(external.into_peer(IpAddr::V6(Ipv6Addr::UNSPECIFIED), None, true));
    }
    unmapped.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    WindowPeers {
        peers: out,
        unmapped: unmapped.into_iter().map(|(addr, _)| addr).collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::scoring::tests::{window_with, window_with_flows};

    fn book() -> PeerBook {
        let a = NodeAddresses {
            internal_ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))],
            pod_cidrs: vec!["10.244.1.0/24".into()],
        };
        let b = NodeAddresses {
            internal_ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))],
            pod_cidrs: vec!["fd00:1::/64".into()],
        };
        PeerBook::new([("node-a", &a), ("node-b", &b)])
    }

    /// EKS VPC CNI: the aggregator's book carries every agent's pod IPs (host prefixes), so
    /// traffic to another node's pods folds into that node's peer here too.
    #[test]
    fn the_aggregators_book_adds_reported_pod_ips_to_the_api_view() {
        let shared = SharedPeerBook::default();
        let api = HashMap::from([(
            "node-a".to_owned(),
            NodeAddresses {
                internal_ips: vec![IpAddr::V4(Ipv4Addr::new(192, 168, 0, 10))],
                pod_cidrs: Vec::new(),
            },
        )]);
        shared.set_api_nodes(api);
        let pod: IpAddr = "192.168.77.12".parse().expect("ip");
        assert!(shared.get().node_of(&pod).is_none());
        shared.set_aggregator_book(&graywatch_proto::v1::PeerBook {
            nodes: vec![graywatch_proto::v1::NodePeers {
                node_name: "node-a".into(),
                addresses: vec!["192.168.0.10".into()],
                pod_cidrs: vec!["192.168.77.12/32".into(), "not a cidr".into()],
            }],
        });
        let book = shared.get();
        assert_eq!(
            book.node_of(&pod).map(std::string::ToString::to_string).as_deref(),
            Some("node-a")
        );
        let summary = window_with_flows(&[(pod, 500, 4, 40, 1)]);
        let peers = peers(&summary, &book, &AddressAnswers::default(), PeerLimits::default()).peers;
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].node.as_deref(), Some("node-a"));
        assert_eq!(
            peers[0].remote,
            IpAddr::V4(Ipv4Addr::new(192, 168, 0, 10)),
            "named by its InternalIP"
        );
    }

    fn answers(owners: &[(&str, &str)], unknown: &[&str]) -> graywatch_proto::v1::AddressAnswers {
        graywatch_proto::v1::AddressAnswers {
            owners: owners
                .iter()
                .map(|(a, n)| graywatch_proto::v1::AddressOwner {
                    address: (*a).into(),
                    node_name: (*n).into(),
                })
                .collect(),
            unknown: unknown.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    /// EKS VPC CNI: a pod IP in no pod CIDR is asked of the aggregator once it carries traffic;
    /// once answered, traffic to it folds into its node's peer (named by the node's InternalIP
    /// where the agent's book knows it), and it is not asked again until the answer expires.
    #[test]
    fn an_unmapped_address_is_asked_once_and_its_answer_folds_it_into_its_node() {
        let book = book();
        let pod: IpAddr = "192.168.77.12".parse().expect("ip");
        let summary = window_with_flows(&[(pod, 500, 4, 40, 1)]);
        let mut held = AddressAnswers::default();
        let t0 = Instant::now();

        let first = peers(&summary, &book, &held, PeerLimits::default());
        assert_eq!(first.unmapped, [pod]);
        assert_eq!(first.peers[0].node, None, "not mapped before the answer");
        assert_eq!(held.lookups(&first.unmapped, t0, 256), [pod]);
        // Asked, not answered yet: not asked again in the next windows.
        assert!(
            held.lookups(&first.unmapped, t0 + Duration::from_secs(1), 256)
                .is_empty()
        );

        held.absorb(
            &answers(&[("192.168.77.12", "node-b")], &[]),
            t0 + Duration::from_secs(1),
        );
        let second = peers(&summary, &book, &held, PeerLimits::default());
        assert_eq!(second.peers.len(), 1);
        assert_eq!(second.peers[0].node.as_deref(), Some("node-b"));
        assert_eq!(
            second.peers[0].remote,
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            "node-b's InternalIP"
        );
        assert_eq!(second.unmapped, [pod], "still outside the agent's own book");
        let later = t0 + Duration::from_secs(1) + OWNER_TTL;
        assert!(held.lookups(&second.unmapped, t0 + OWNER_TTL, 256).is_empty());
        // The answer expired: asked again, still folded meanwhile.
        assert_eq!(held.lookups(&second.unmapped, later, 256), [pod]);
        assert_eq!(held.node_of(&pod).map(|n| &**n), Some("node-b"));
    }

    #[test]
    fn unknown_and_unanswered_addresses_are_asked_again_and_unsolicited_answers_ignored() {
        let [ext, lost, stranger]: [IpAddr; 3] =
            ["203.0.113.9", "203.0.113.10", "198.51.100.1"].map(|a| a.parse().expect("ip"));
        let mut held = AddressAnswers::default();
        let t0 = Instant::now();
        assert_eq!(held.lookups(&[ext, lost], t0, 256), [ext, lost]);
        held.absorb(
            &answers(&[("198.51.100.1", "node-a"), ("bogus", "node-a")], &["203.0.113.9"]),
            t0,
        );
        assert_eq!(held.node_of(&stranger), None, "never asked: not held");
        assert_eq!(held.len(), 2);
        let retry = t0 + RETRY_AFTER;
        assert_eq!(
            held.lookups(&[ext, lost], retry, 256),
            [lost],
            "unanswered: asked again"
        );
        assert_eq!(
            held.lookups(&[ext, lost], t0 + UNKNOWN_TTL, 256),
            [ext, lost],
            "unknown: asked again once its answer expired (and the unanswered one once more)"
        );
    }

    #[test]
    fn lookups_are_bounded_per_window_and_unseen_addresses_forgotten() {
        let addrs: Vec<IpAddr> = (0..10u8).map(|i| IpAddr::V4(Ipv4Addr::new(203, 0, 113, i))).collect();
        let mut held = AddressAnswers::default();
        let t0 = Instant::now();
        assert_eq!(held.lookups(&addrs, t0, 4), addrs[..4], "the busiest first");
        assert_eq!(held.lookups(&addrs, t0 + Duration::from_secs(1), 4), addrs[4..8]);
        assert_eq!(held.len(), 8);
        // Only the first address is seen again, after everything else went unseen for long.
        let late = t0 + Duration::from_secs(1) + FORGET_AFTER;
        assert_eq!(
            held.lookups(&addrs[..1], late, 4),
            addrs[..1],
            "still unanswered: asked again"
        );
        assert_eq!(held.len(), 1, "the others are forgotten");
    }

    fn node(name: &str, ip: &str, pods: &[&str]) -> graywatch_proto::v1::NodePeers {
        graywatch_proto::v1::NodePeers {
            node_name: name.into(),
            addresses: vec![ip.into()],
            pod_cidrs: pods.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    fn page(
        reset: bool,
        upsert: Vec<graywatch_proto::v1::NodePeers>,
        remove: &[&str],
        more: bool,
    ) -> graywatch_proto::v1::PeerBookDelta {
        graywatch_proto::v1::PeerBookDelta {
            reset,
            upsert,
            remove: remove.iter().map(|r| (*r).to_owned()).collect(),
            more,
        }
    }

    /// Pages resolve as the whole book did: a reset run is used once complete, then deltas
    /// change and remove single nodes.
    #[test]
    fn the_aggregators_pages_build_the_book_and_deltas_change_it() {
        let shared = SharedPeerBook::default();
        let mut pages = BookPages::default();
        let of = |s: &str| {
            shared
                .get()
                .node_of(&s.parse().expect("ip"))
                .map(std::string::ToString::to_string)
        };
        let first = page(true, vec![node("node-a", "10.0.0.1", &["10.9.0.1/32"])], &[], true);
        assert!(pages.apply(first).is_none(), "a run is not used before its last page");
        let last = page(false, vec![node("node-b", "10.0.0.2", &["10.9.0.2/32"])], &[], false);
        shared.set_aggregator_book(&pages.apply(last).expect("the run is complete"));
        assert_eq!(of("10.9.0.1").as_deref(), Some("node-a"));
        assert_eq!(of("10.9.0.2").as_deref(), Some("node-b"));
        // A delta: node-a's pod IP moved to node-b; node-c joined.
        let delta = page(
            false,
            vec![
                node("node-b", "10.0.0.2", &["10.9.0.2/32", "10.9.0.1/32"]),
                node("node-c", "10.0.0.3", &[]),
            ],
            &["node-a"],
            false,
        );
        shared.set_aggregator_book(&pages.apply(delta).expect("complete"));
        assert_eq!(of("10.9.0.1").as_deref(), Some("node-b"));
        assert_eq!(of("10.0.0.1"), None, "removed");
        assert_eq!(of("10.0.0.3").as_deref(), Some("node-c"));
        // A new stream resets: only what its pages carry is kept.
        let reset = page(true, vec![node("node-c", "10.0.0.3", &[])], &[], false);
        shared.set_aggregator_book(&pages.apply(reset).expect("complete"));
        assert_eq!(of("10.9.0.2"), None);
        assert_eq!(of("10.0.0.3").as_deref(), Some("node-c"));
        assert_eq!(shared.get().nodes(), 1);
    }

    #[test]
    fn the_pages_hold_at_most_max_book_nodes() {
        let mut pages = BookPages::default();
        let many = (0..=MAX_BOOK_NODES)
            .map(|i| node(&format!("n{i}"), "10.0.0.1", &[]))
            .collect();
        let book = pages.apply(page(true, many, &[], false)).expect("complete");
        assert_eq!(book.nodes.len(), MAX_BOOK_NODES);
        let update = page(false, vec![node("n0", "10.0.0.9", &[])], &[], false);
        let book = pages.apply(update).expect("complete");
        assert_eq!(book.nodes[0].addresses, ["10.0.0.9"], "a held node still changes");
    }

    #[test]
    fn the_book_maps_internal_ips_and_pod_cidrs() {
        let book = book();
        let of = |s: &str| {
            book.node_of(&s.parse().expect("ip"))
                .map(std::string::ToString::to_string)
        };
        assert_eq!(of("10.0.0.1").as_deref(), Some("node-a"));
        assert_eq!(of("10.244.1.77").as_deref(), Some("node-a"));
        assert_eq!(of("fd00:1::1234").as_deref(), Some("node-b"));
        assert_eq!(of("10.244.2.1"), None);
        assert_eq!(of("fd00:2::1"), None);
    }

    #[test]
    fn addresses_of_a_node_fold_into_one_node_peer_named_by_its_internal_ip() {
        let summary = window_with_flows(&[
            ("10.244.1.5".parse().expect("ip"), 1_000, 10, 100, 1),
            ("10.244.1.6".parse().expect("ip"), 3_000, 10, 100, 3),
            ("10.0.0.1".parse().expect("ip"), 2_000, 10, 100, 0),
        ]);
        let peers = peers(&summary, &book(), &AddressAnswers::default(), PeerLimits::default()).peers;
        assert_eq!(peers.len(), 1, "{peers:?}");
        let p = &peers[0];
        assert_eq!(p.node.as_deref(), Some("node-a"));
        assert_eq!(p.remote, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(
            (p.addresses, p.segments_out, p.retransmits, p.rtt_samples),
            (3, 300, 4, 30)
        );
    }

    /// The busy node of issue 16: 5,000 distinct remote addresses in one window. The peers stay
    /// bounded (under the aggregator's 4,096) and nothing is lost: every segment is counted in
    /// some peer.
    #[test]
    fn five_thousand_remotes_make_a_bounded_peer_list_that_keeps_every_segment() {
        let flows: Vec<(IpAddr, u32, u32, u64, u64)> = (0..5_000u32)
            .map(|i| {
                let addr = IpAddr::V6(Ipv6Addr::from(
                    0xfd00_0000_0000_0000_0000_0000_0001_0000u128 + u128::from(i),
                ));
                (addr, 500 + i % 100, 2, u64::from(1 + i % 7), u64::from(i % 2))
            })
            .chain(std::iter::once(("10.244.1.9".parse().expect("ip"), 800, 5, 50, 0)))
            .collect();
        let summary = window_with_flows(&flows);
        assert_eq!(summary.network.flows.len(), 5_001);
        let limits = PeerLimits::default();
        let peers = peers(&summary, &book(), &AddressAnswers::default(), limits).peers;
        assert_eq!(peers.len(), 1 + limits.max_others + 1, "node + top-N + external");
        assert_eq!(peers[0].node.as_deref(), Some("node-a"));
        let external = peers.last().expect("external");
        assert!(external.external);
        assert_eq!(external.remote, IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        assert_eq!(
            external.addresses,
            5_000 - u32::try_from(limits.max_others).expect("test limit fits u32")
        );
        let total: u64 = peers.iter().map(|p| p.segments_out).sum();
        let expected: u64 = flows.iter().map(|f| f.3).sum();
        assert_eq!(total, expected);
        // The top-N are the busiest: every individual address sent at least as much as any
        // address folded into the external bucket could have (7 is the most any sent).
        assert!(peers[1..=limits.max_others].iter().all(|p| p.segments_out == 7));
        // Nothing measured: one peer per window, not one per address.
        assert_eq!(
            super::peers(
                &window_with(Ipv4Addr::new(10, 9, 9, 9), 1, 1, 1, 0),
                &book(),
                &AddressAnswers::default(),
                limits
            )
            .peers
            .len(),
            1
        );
    }
}
