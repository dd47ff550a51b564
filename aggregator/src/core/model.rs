//! Plain data the decision core works on: what the cluster looks like, what the agents reported,
//! and the policy. No I/O, no clocks (time is an input).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (an input; the core never reads a clock).
pub type Millis = i64;

/// The condition reason of a family whose failure is forecast, not observed (see `prediction`).
pub const PREDICTED_FAILURE_REASON: &str = "PredictedFailure";

/// The signal families; one Node condition each (defined once, shared with agent and wire).
pub use graywatch_proto::Family;
use graywatch_proto::{LossSpan, loss_pct};

/// What the cluster says about one Node (from a watch of Nodes), including what we wrote before.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeView {
    pub name: String,
    /// Label values by label key (only the ones the policy groups by are needed).
    pub labels: BTreeMap<String, String>,
    pub internal_ips: Vec<IpAddr>,
    pub pod_cidrs: Vec<ipnet::IpNet>,
    /// Our own conditions currently on the Node, by type.
    pub conditions: BTreeMap<String, ObservedCondition>,
    /// Whether our taint is on the Node.
    pub tainted: bool,
    /// The Karpenter NodeClaim backing this Node, if any.
    pub nodeclaim: Option<String>,
    /// Condition types on the Node that another field manager writes (from managedFields; only
    /// the EKS `NetworkingReady` is looked at): never ours to write, whatever we measure.
    pub foreign_conditions: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedCondition {
    pub status: CondStatus,
    pub reason: String,
    pub message: String,
    pub last_transition_ms: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CondStatus {
    True,
    False,
    Unknown,
}

impl CondStatus {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            CondStatus::True => "True",
            CondStatus::False => "False",
            CondStatus::Unknown => "Unknown",
        }
    }

    #[must_use]
    pub fn parse(s: &str) -> Self {
        match s {
            "True" => CondStatus::True,
            "False" => CondStatus::False,
            _ => CondStatus::Unknown,
        }
    }
}

/// The latest window an agent reported, reduced to what the core needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeReport {
    /// Window sequence number (per agent boot); the state machines advance once per new window.
    pub seq: u64,
    /// Agent boot id; a change restarts the sequence.
    pub boot_id: String,
    /// When the reporting agent process started (ns of the node's `CLOCK_BOOTTIME`; 0 = unknown):
    /// the agent incarnation. A restarted agent restarts the sequence too.
    pub agent_started_ns: u64,
    /// When the aggregator received it.
    pub received_ms: Millis,
    /// When this agent incarnation said it was stopping on purpose (its last message, a rollout
    /// or a node shutdown), as the aggregator received that: the node's conditions are held for
    /// `restart_grace_ms` from then, waiting for the next incarnation.
    pub stopped_ms: Option<Millis>,
    /// Headline figure per family (larger = worse).
    pub figures: BTreeMap<Family, f64>,
    /// The node's sustained loss: lost and sent segments over its agent's last windows (see
    /// `graywatch_detect::loss`), when the agent sent it.
    pub sustained_loss: Option<LossSpan>,
    /// The agent's own detector scores in [0,1] with reasons.
    pub local: BTreeMap<Family, (f64, String)>,
    /// Failures the agent forecasts (the soonest per family).
    pub predictions: BTreeMap<Family, Prediction>,
    /// What this node measured towards remote addresses.
    pub peers: Vec<PeerObservation>,
    /// Events the agent's kernel programs could not record since it started, by kind.
    pub lost_events_total: BTreeMap<String, u64>,
    /// Of those, the ones lost since the previous window of the same agent incarnation (all of
    /// them on a restarted agent's first window, none on the aggregator's first sight of the
    /// node): filled in by the fleet store.
    pub lost_events: BTreeMap<String, u64>,
}

impl NodeReport {
    /// Which window of which agent incarnation this is.
    #[must_use]
    pub fn window_id(&self) -> WindowId {
        WindowId {
            boot_id: self.boot_id.clone(),
            agent_started_ns: self.agent_started_ns,
            seq: self.seq,
        }
    }
}

/// A failure an agent forecasts: a figure rising steadily towards its limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Seconds from the end of the window until the forecast crosses the limit.
    pub eta_secs: f64,
    /// In [0, 1]: how steadily the figure has been rising.
    pub confidence: f64,
    /// The agent's words: workload, figure, limit.
    pub reason: String,
}

/// Identifies one window: (boot id, agent incarnation, seq).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WindowId {
    pub boot_id: String,
    pub agent_started_ns: u64,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PeerObservation {
    pub addr: IpAddr,
    pub rtt_samples: u64,
    pub rtt_p99_us: f64,
    pub segments_out: u64,
    pub retransmits: u64,
    /// Connection attempts towards the peer nobody answered.
    pub unanswered_connects: u64,
}

impl PeerObservation {
    /// Lost / sent segments in percent, unanswered connection attempts included
    /// ([`loss_pct`]; 0 when nothing was sent).
    #[must_use]
    pub fn loss_pct(&self) -> f64 {
        loss_pct(self.retransmits, self.unanswered_connects, self.segments_out)
    }
}

/// A Karpenter NodePool as the core sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolView {
    pub name: String,
    /// `spec.template.spec.requirements`, verbatim (`[]` when absent).
    pub requirements: serde_json::Value,
    /// `spec.disruption.budgets`, verbatim (`[]` when absent).
    pub budgets: serde_json::Value,
    /// Our verified snapshot, if we changed this pool.
    pub snapshot: Option<PoolSnapshot>,
    /// Why a snapshot ConfigMap naming this pool was refused (not written by us alone, digest
    /// mismatch, unreadable): we do not know what is ours in the pool, so it is left alone.
    pub snapshot_refused: Option<String>,
}

/// Exactly what we added to a NodePool: restoring removes these entries and nothing else, so
/// edits others made meanwhile stay.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolEdits {
    /// Entries of `spec.template.spec.requirements` (one `NotIn` per excluded label).
    pub requirements: Vec<serde_json::Value>,
    /// Entries of `spec.disruption.budgets` (the drift budget of the exclusion).
    pub budgets: Vec<serde_json::Value>,
}

impl PoolEdits {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty() && self.budgets.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSnapshot {
    /// The (label key, value) pairs we excluded, e.g. ("topology.kubernetes.io/zone", "zone-a").
    pub excluded: Vec<(String, String)>,
    /// What we added to the pool for them.
    pub added: PoolEdits,
}

/// Maps remote addresses to nodes via Node InternalIPs and reported pod IPs (exact) and pod
/// CIDRs (longest prefix). Nodes are numbered; lookups cost one hash probe per distinct prefix
/// length (usually one or two), not a scan of the fleet's CIDRs. Built once per tick from the
/// node views ([`Input::address_book`]): it answers the agents' address lookups and maps the
/// peers of every report for the vantage evidence. With 30 pod IPs per node it is the largest
/// per-node structure after the streams, hence the compact entries (a host prefix is an exact
/// entry; ids are `u32`; exact addresses are kept by family).
#[derive(Debug, Default)]
pub struct AddressBook {
    pub(super) names: Vec<String>,
    pub(super) by_name: FastMap<String, usize>,
    exact: ExactAddresses,
    /// By prefix length, longest first: network → node.
    cidrs: BTreeMap<std::cmp::Reverse<u8>, FastMap<ipnet::IpNet, u32>>,
}

/// The book answers about 400,000 lookups per decision step at 10,000 nodes (20 peers × 2
/// families each), where std's `SipHash` took 5 % of the step. foldhash (hashbrown's default) is
/// seeded at random per process and per map: minimally DoS-resistant, which suffices for
/// addresses only authenticated agents report.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Node ids by exact address, one map per family: an IPv4 entry takes 8 bytes where an `IpAddr`
/// key takes 24. At 10,000 nodes with 30 pod IPs each this is 5 MiB instead of 13, and the
/// book is built anew every tick next to the one the streams still read.
#[derive(Debug, Default)]
struct ExactAddresses {
    v4: FastMap<Ipv4Addr, u32>,
    v6: FastMap<Ipv6Addr, u32>,
}

/// While the book is built, marks an id that came from a reported pod IP (which yields to an
/// InternalIP or a host pod CIDR, and to nothing else but a second claim).
const FROM_POD_IP: u32 = 1 << 31;
/// While the book is built, an address reported by two nodes: it maps to neither.
const CLAIMED_TWICE: u32 = u32::MAX;

impl ExactAddresses {
    fn get(&self, addr: &IpAddr) -> Option<u32> {
        match addr {
            IpAddr::V4(a) => self.v4.get(a).copied(),
            IpAddr::V6(a) => self.v6.get(a).copied(),
        }
    }

    /// `addr` maps to `id`, whatever it mapped to before.
    fn insert(&mut self, addr: IpAddr, id: u32) {
        match addr {
            IpAddr::V4(a) => self.v4.insert(a, id),
            IpAddr::V6(a) => self.v6.insert(a, id),
        };
    }

    /// `addr` maps to `id` unless it maps to a node already.
    fn insert_if_absent(&mut self, addr: IpAddr, id: u32) {
        match addr {
            IpAddr::V4(a) => self.v4.entry(a).or_insert(id),
            IpAddr::V6(a) => self.v6.entry(a).or_insert(id),
        };
    }

    /// Records `node`'s claim of a pod IP: first claim wins the address for now, a second
    /// node's claim leaves it to neither; an InternalIP or host pod CIDR keeps it.
    fn claim(&mut self, addr: IpAddr, node: u32) {
        fn claim_in<K: std::hash::Hash + Eq>(map: &mut FastMap<K, u32>, key: K, node: u32) {
            let claimed = node | FROM_POD_IP;
            let slot = map.entry(key).or_insert(claimed);
            if *slot & FROM_POD_IP != 0 && *slot != claimed {
                *slot = CLAIMED_TWICE;
            }
        }
        match addr {
            IpAddr::V4(a) => claim_in(&mut self.v4, a, node),
            IpAddr::V6(a) => claim_in(&mut self.v6, a, node),
        }
    }

    /// Ends the claims: contested addresses go, the others keep their node.
    fn settle_claims(&mut self) {
        let settle = |id: &mut u32| {
            if *id == CLAIMED_TWICE {
                return false;
            }
            *id &= !FROM_POD_IP;
            true
        };
        self.v4.retain(|_, id| settle(id));
        self.v6.retain(|_, id| settle(id));
    }
}

impl AddressBook {
    #[must_use]
    pub fn new<'a>(nodes: impl IntoIterator<Item = &'a NodeView>) -> Self {
        let mut book = Self::default();
        for n in nodes {
            // Ids leave the top bit for `FROM_POD_IP` (no fleet comes near 2^31 nodes).
            let Some(id) = u32::try_from(book.names.len()).ok().filter(|id| *id < FROM_POD_IP - 1) else {
                break;
            };
            book.by_name.insert(n.name.clone(), book.names.len());
            book.names.push(n.name.clone());
            for ip in &n.internal_ips {
                // An InternalIP wins over another node's pod IP (hostNetwork pods share it).
                book.exact.insert(*ip, id);
            }
            for c in &n.pod_cidrs {
                if c.prefix_len() == c.max_prefix_len() {
                    book.exact.insert_if_absent(c.addr(), id);
                } else {
                    book.cidrs
                        .entry(std::cmp::Reverse(c.prefix_len()))
                        .or_default()
                        .insert(c.trunc(), id);
                }
            }
        }
        book
    }

    /// The book of `nodes` plus the pod IPs each node's agent reported (EKS VPC CNI: pod IPs
    /// are secondary ENI addresses, outside any pod CIDR). Nodes that are gone are skipped; an
    /// address two nodes claim (a pod IP reused after its pod moved) goes to neither until the
    /// stale list is replaced; a node's InternalIP is never taken over by a pod IP.
    #[must_use]
    pub fn with_pod_addresses(nodes: &BTreeMap<String, NodeView>, reported: &BTreeMap<String, Arc<[IpAddr]>>) -> Self {
        let mut book = Self::new(nodes.values());
        let claims: Vec<(u32, &[IpAddr])> = reported
            .iter()
            .filter_map(|(node, addresses)| {
                let id = book.by_name.get(node).and_then(|id| u32::try_from(*id).ok())?;
                Some((id, &addresses[..]))
            })
            .collect();
        // One allocation per family for the whole fleet's pod IPs: the table then never grows
        // (a growing table briefly holds both its old and its new buckets).
        let v4 = claims
            .iter()
            .flat_map(|(_, addresses)| addresses.iter())
            .filter(|a| a.is_ipv4())
            .count();
        let v6 = claims.iter().map(|(_, addresses)| addresses.len()).sum::<usize>() - v4;
        book.exact.v4.reserve(v4);
        book.exact.v6.reserve(v6);
        for (id, addresses) in claims {
            for a in addresses {
                book.exact.claim(*a, id);
            }
        }
        book.exact.settle_claims();
        book
    }

    pub(super) fn id_of(&self, addr: &IpAddr) -> Option<usize> {
        let id = self.exact.get(addr).or_else(|| {
            self.cidrs.iter().find_map(|(len, nets)| {
                let net = ipnet::IpNet::new(*addr, len.0).ok()?.trunc();
                nets.get(&net).copied()
            })
        })?;
        usize::try_from(id).ok()
    }

    #[must_use]
    pub fn node_of(&self, addr: &IpAddr) -> Option<&str> {
        self.id_of(addr).map(|id| self.names[id].as_str())
    }
}

/// Everything the core reads for one step.
#[derive(Debug, Clone, Default)]
pub struct Input {
    pub now_ms: Millis,
    pub nodes: BTreeMap<String, NodeView>,
    /// The address book of `nodes`, when the shell built it already this tick (it also answers
    /// the agents' lookups); `None`: the step builds its own.
    pub address_book: Option<Arc<AddressBook>>,
    /// Shared with the ingest store (its snapshot copies pointers, not reports).
    pub reports: BTreeMap<String, Arc<NodeReport>>,
    pub pools: BTreeMap<String, PoolView>,
    /// The NodePools (or our snapshots of them) could not be read this step: `pools` is empty
    /// for want of data, not because there are none. Only the NodePool part of the step waits.
    pub pools_unreadable: bool,
    /// The NodeClaims could not be read this step: no Node's `nodeclaim` is known.
    pub claims_unreadable: bool,
    /// Consecutive actuator failures reported by the shell (feeds the circuit breaker).
    pub actuator_failures: u32,
    /// Actions this aggregator (any replica, any incarnation) took before, read back from the
    /// cluster (our Events) when an engine starts: a restart or failover inherits the action
    /// budget already spent instead of a fresh one. Read by the first step only.
    pub past_actions: Vec<PastAction>,
}

/// One earlier action, from its audit Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PastAction {
    pub at_ms: Millis,
    /// The node acted on (taint, NodeClaim deletion); `None` for a NodePool exclusion.
    pub node: Option<String>,
    /// Whether it was a NodeClaim deletion (never repeated for the same node).
    pub claim_deletion: bool,
}
