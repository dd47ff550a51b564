//! gRPC ingest: the `graywatch.v1.Ingest/Report` stream. Each summary is validated, reduced to
//! a [`NodeReport`] and stored in the [`FleetStore`]; replays (same boot id and agent incarnation,
//! seq not newer) and windows of a superseded agent incarnation are acknowledged and dropped
//! (see [`classify`]). A bad message ends the stream with a status naming the problem:
//! `FAILED_PRECONDITION` for an unsupported protocol version, `INVALID_ARGUMENT` for content;
//! tonic itself answers `OUT_OF_RANGE` for oversized and INTERNAL for undecodable messages.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
};

use futures::{Stream, StreamExt};
use graywatch_proto::{
    Family, LossSpan, MAX_ADDRESS_LOOKUPS, PROTOCOL_VERSION, family_from_wire,
    v1::{self, Directive, NodeSummary, directive, ingest_server::Ingest},
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    core::{
        evidence::AddressBook,
        model::{Millis, NodeReport, PeerObservation, Prediction},
    },
    metrics::Metrics,
};

/// Latest report per node, shared by the ingest streams and the decision loop.
///
/// Bounded: at most `max_nodes` nodes (config `ingest.max_nodes`; a new node beyond it is
/// refused with [`Stored::Full`]), and the gate admits names of Node objects only; the decision
/// loop evicts a node's entries when its Node is deleted ([`FleetStore::retain_nodes`]). A
/// Node's entries live as long as the Node: an agent that stopped reporting leaves its last
/// report, which the engine marks stale.
///
/// Reports are behind `Arc`s and shared with the decision loop's snapshot (no deep copy): the
/// lock is held only to copy pointers, since at 10,000 agents a deep copy under the lock once a
/// second stalled every summary arriving meanwhile.
#[derive(Debug, Clone)]
pub struct FleetStore {
    inner: Arc<Mutex<Fleet>>,
    max_nodes: usize,
    /// Which Node each address belongs to (InternalIPs, pod CIDRs, reported pod IPs), published
    /// by the decision loop once per tick: the streams answer their agents' address lookups
    /// from it.
    address_book: AddressBookChannel,
}

/// Both per-node maps under one lock, so they are evicted together.
#[derive(Debug, Default)]
struct Fleet {
    reports: BTreeMap<String, Arc<NodeReport>>,
    /// The pod IPs each node's agent reported last (sent on changes only, so kept apart from
    /// the per-window reports): how remote pod IPs outside any pod CIDR map to nodes. Only
    /// for nodes with a report (its keys are a subset of `reports`').
    pod_addresses: BTreeMap<String, Arc<[IpAddr]>>,
}

/// Default `ingest.max_nodes`: four times Kubernetes' supported maximum of 5,000 Nodes.
pub const DEFAULT_MAX_NODES: usize = 20_000;

impl Default for FleetStore {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_NODES)
    }
}

/// The latest address book for the ingest streams.
#[derive(Debug, Clone, Default)]
struct AddressBookChannel(Arc<tokio::sync::watch::Sender<Arc<AddressBook>>>);

/// At most this many kinds of lost events per summary (the agent has a handful).
pub const MAX_LOST_EVENT_KINDS: usize = 32;

/// At most this many pod IPs per node are accepted (a node runs at most a few hundred pods).
pub const MAX_POD_ADDRESSES: usize = 4_096;

/// The pod IPs a summary carries: `None` when absent (unchanged), an error naming the first bad
/// entry otherwise.
pub fn pod_addresses(s: &NodeSummary) -> Result<Option<Vec<IpAddr>>, Status> {
    let Some(pods) = &s.pod_addresses else {
        return Ok(None);
    };
    if pods.addresses.len() > MAX_POD_ADDRESSES {
        return Err(Status::invalid_argument(format!(
            "pod_addresses: {} entries, at most {MAX_POD_ADDRESSES}",
            pods.addresses.len()
        )));
    }
    let mut out = Vec::with_capacity(pods.addresses.len());
    for (i, a) in pods.addresses.iter().enumerate() {
        out.push(
            a.parse()
                .map_err(|_| Status::invalid_argument(format!("pod_addresses[{i}]: {a:?} is not an IP address")))?,
        );
    }
    out.sort_unstable();
    out.dedup();
    Ok(Some(out))
}

/// The addresses a summary asks about (`address_lookups`): an error naming the first bad entry,
/// or too many of them.
pub fn address_lookups(s: &NodeSummary) -> Result<Vec<IpAddr>, Status> {
    if s.address_lookups.len() > MAX_ADDRESS_LOOKUPS {
        return Err(Status::invalid_argument(format!(
            "address_lookups: {} entries, at most {MAX_ADDRESS_LOOKUPS}",
            s.address_lookups.len()
        )));
    }
    s.address_lookups
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.parse()
                .map_err(|_| Status::invalid_argument(format!("address_lookups[{i}]: {a:?} is not an IP address")))
        })
        .collect()
}

/// The answer to `lookups` from `book`: each address under its node, or unknown.
#[must_use]
pub fn answer_lookups(book: &AddressBook, lookups: &[IpAddr]) -> v1::AddressAnswers {
    let mut answers = v1::AddressAnswers::default();
    for addr in lookups {
        match book.node_of(addr) {
            Some(node) => answers.owners.push(v1::AddressOwner {
                address: addr.to_string(),
                node_name: node.to_owned(),
            }),
            None => answers.unknown.push(addr.to_string()),
        }
    }
    answers
}

/// What storing a summary did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// A newer window (of the same incarnation, a restarted agent, or a rebooted node): stored.
    New,
    /// Already seen (seq not newer within the same incarnation): dropped.
    Replay,
    /// From an agent incarnation older than the one last stored for this boot (a late replay
    /// of an agent that has since been restarted): dropped, so state never rolls back.
    Superseded,
    /// A node not yet in the store while it holds `max_nodes` nodes: refused.
    Full,
}

/// Whether `next` replaces `prev`, the latest stored report of the same node.
///
/// * Another boot id: the node rebooted; `next` is new (a boot id cannot be ordered, and a
///   reboot restarts every agent).
/// * Same boot, a later-started agent (`agent_started_ns` larger): a restarted agent whose seq
///   started again at 1; new whatever its seq.
/// * Same boot, an earlier-started agent: superseded, dropped (the old process' replay after the
///   new one started must not roll the node back).
/// * Same incarnation: new only if seq is larger.
///
/// `agent_started_ns` 0 is an agent that predates the field: it cannot be ordered against a
/// known incarnation, so it is compared by seq alone (the former behaviour).
#[must_use]
pub fn classify(prev: &NodeReport, next: &NodeReport) -> Stored {
    use std::cmp::Ordering;
    if prev.boot_id != next.boot_id {
        return Stored::New;
    }
    match next.agent_started_ns.cmp(&prev.agent_started_ns) {
        Ordering::Greater => Stored::New,
        Ordering::Less if next.agent_started_ns != 0 => Stored::Superseded,
        Ordering::Less | Ordering::Equal if next.seq > prev.seq => Stored::New,
        Ordering::Less | Ordering::Equal => Stored::Replay,
    }
}

impl FleetStore {
    /// A store of at most `max_nodes` nodes.
    #[must_use]
    pub fn new(max_nodes: usize) -> Self {
        Self {
            inner: Arc::default(),
            max_nodes,
            address_book: AddressBookChannel::default(),
        }
    }

    /// Its cap on nodes.
    #[must_use]
    pub fn max_nodes(&self) -> usize {
        self.max_nodes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Fleet> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn store(&self, node: &str, mut report: NodeReport) -> Stored {
        let mut fleet = self.lock();
        let map = &mut fleet.reports;
        if map.len() >= self.max_nodes && !map.contains_key(node) {
            return Stored::Full;
        }
        if let Some(prev) = map.get_mut(node) {
            let stored = classify(prev, &report);
            if stored == Stored::New {
                // The agent's counts are cumulative per incarnation: what this window lost.
                if prev.boot_id == report.boot_id && prev.agent_started_ns == report.agent_started_ns {
                    report.lost_events = report
                        .lost_events_total
                        .iter()
                        .map(|(kind, n)| {
                            (
                                kind.clone(),
                                n.saturating_sub(prev.lost_events_total.get(kind).copied().unwrap_or(0)),
                            )
                        })
                        .filter(|(_, n)| *n > 0)
                        .collect();
                }
                if prev.boot_id == report.boot_id && prev.agent_started_ns != report.agent_started_ns {
                    tracing::info!(
                        node,
                        boot_id = %report.boot_id,
                        previous_agent_started_ns = prev.agent_started_ns,
                        agent_started_ns = report.agent_started_ns,
                        seq = report.seq,
                        "agent restarted: its windows replace the previous incarnation's"
                    );
                }
                *prev = Arc::new(report);
            }
            stored
        } else {
            // First sight (e.g. after an aggregator restart): the agent's old losses are its
            // baseline, not this window's.
            report.lost_events.clear();
            map.insert(node.to_string(), Arc::new(report));
            Stored::New
        }
    }

    /// Records that `notice`'s agent incarnation is stopping on purpose (its last message, see
    /// `NodeSummary.stopping`): its latest stored report gets `stopped_ms`. Ignored (false) when
    /// the stored report is of another incarnation (a new agent already reported, or the node
    /// rebooted) or there is none.
    pub fn mark_stopping(&self, node: &str, notice: &NodeReport) -> bool {
        let mut fleet = self.lock();
        let Some(prev) = fleet.reports.get_mut(node) else {
            return false;
        };
        if prev.boot_id != notice.boot_id || prev.agent_started_ns != notice.agent_started_ns {
            return false;
        }
        if prev.stopped_ms.is_none() {
            Arc::make_mut(prev).stopped_ms = Some(notice.received_ms);
        }
        true
    }

    /// Records `node`'s pod IPs (the latest list replaces the previous one); ignored for a node
    /// without a stored report (refused, or evicted meanwhile).
    pub fn set_pod_addresses(&self, node: &str, addresses: Vec<IpAddr>) {
        let mut fleet = self.lock();
        if fleet.reports.contains_key(node) {
            fleet.pod_addresses.insert(node.to_owned(), addresses.into());
        }
    }

    /// Publishes the address book the streams answer lookups from.
    pub fn publish_address_book(&self, book: Arc<AddressBook>) {
        self.address_book.0.send_replace(book);
    }

    /// The current address book (a pointer copy).
    #[must_use]
    pub fn address_book(&self) -> Arc<AddressBook> {
        self.address_book.0.borrow().clone()
    }

    /// Every node's last reported pod IPs.
    #[must_use]
    pub fn pod_addresses(&self) -> BTreeMap<String, Arc<[IpAddr]>> {
        self.lock().pod_addresses.clone()
    }

    /// Forgets the entries of nodes `keep` rejects (deleted Nodes); returns how many reports
    /// and pod address lists remain.
    pub fn retain_nodes(&self, keep: impl Fn(&str) -> bool) -> (usize, usize) {
        let mut fleet = self.lock();
        fleet.reports.retain(|node, _| {
            let kept = keep(node);
            if !kept {
                tracing::info!(node, "Node deleted: its report is evicted from the fleet view");
            }
            kept
        });
        let Fleet { reports, pod_addresses } = &mut *fleet;
        pod_addresses.retain(|node, _| reports.contains_key(node));
        (reports.len(), pod_addresses.len())
    }

    /// Every node's latest report, shared with the store (pointers are copied, not reports).
    #[must_use]
    pub fn snapshot(&self) -> BTreeMap<String, Arc<NodeReport>> {
        self.lock().reports.clone()
    }
}

/// Validates a summary and reduces it to a report. Errors carry the status to send.
#[expect(
    clippy::too_many_lines,
    reason = "one check per field of the wire message, in message order"
)]
pub fn validate(s: &NodeSummary, max_peers: usize, now_ms: Millis) -> Result<(String, NodeReport), Status> {
    if !graywatch_proto::version_supported(s.protocol_version) {
        return Err(Status::failed_precondition(format!(
            "unsupported protocol_version {} (this aggregator accepts {}..={}); upgrade the agent or aggregator",
            s.protocol_version,
            graywatch_proto::MIN_SUPPORTED_PROTOCOL_VERSION,
            PROTOCOL_VERSION
        )));
    }
    let node = s
        .node
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("node: missing"))?;
    let name = node.node_name.as_str();
    let valid_name = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !valid_name {
        return Err(Status::invalid_argument(format!(
            "node.node_name: {name:?} is not a valid Node name"
        )));
    }
    let window = s
        .window
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("window: missing"))?;
    if window.seq == 0 {
        return Err(Status::invalid_argument("window.seq: must start at 1"));
    }
    if window.end_unix_ms < window.start_unix_ms {
        return Err(Status::invalid_argument("window: end_unix_ms before start_unix_ms"));
    }
    if s.peers.len() > max_peers {
        return Err(Status::invalid_argument(format!(
            "peers: {} entries, at most {max_peers}",
            s.peers.len()
        )));
    }
    let mut figures = BTreeMap::new();
    let mut sustained_loss = None;
    for (i, f) in s.families.iter().enumerate() {
        if !f.value.is_finite() || f.value < 0.0 {
            return Err(Status::invalid_argument(format!(
                "families[{i}].value: {} is not a finite figure >= 0",
                f.value
            )));
        }
        if f.span_lost > f.span_sent {
            return Err(Status::invalid_argument(format!(
                "families[{i}].span_lost: {} lost of {} sent",
                f.span_lost, f.span_sent
            )));
        }
        if let Some(fam) = family_from_wire(f.family) {
            figures.insert(fam, f.value);
            if fam == Family::PacketLoss && f.span_windows > 0 {
                sustained_loss = Some(LossSpan {
                    lost: f.span_lost,
                    sent: f.span_sent,
                    windows: f.span_windows,
                });
            }
        }
    }
    let mut local = BTreeMap::new();
    for (i, sc) in s.scores.iter().enumerate() {
        if !(0.0..=1.0).contains(&sc.score) {
            return Err(Status::invalid_argument(format!(
                "scores[{i}].score: {} not in [0, 1]",
                sc.score
            )));
        }
        if let Some(fam) = family_from_wire(sc.family) {
            local.insert(fam, (sc.score, sc.reason.chars().take(256).collect()));
        }
    }
    let mut predictions = BTreeMap::new();
    for (i, p) in s.predictions.iter().enumerate() {
        if !(0.0..=1.0).contains(&p.confidence) {
            return Err(Status::invalid_argument(format!(
                "predictions[{i}].confidence: {} not in [0, 1]",
                p.confidence
            )));
        }
        if !p.eta_seconds.is_finite() || p.eta_seconds < 0.0 {
            return Err(Status::invalid_argument(format!(
                "predictions[{i}].eta_seconds: {} is not a finite figure >= 0",
                p.eta_seconds
            )));
        }
        if let Some(fam) = family_from_wire(p.family) {
            predictions.insert(
                fam,
                Prediction {
                    eta_secs: p.eta_seconds,
                    confidence: p.confidence,
                    reason: p.reason.chars().take(256).collect(),
                },
            );
        }
    }
    if s.lost_events.len() > MAX_LOST_EVENT_KINDS {
        return Err(Status::invalid_argument(format!(
            "lost_events: {} kinds, at most {MAX_LOST_EVENT_KINDS}",
            s.lost_events.len()
        )));
    }
    let lost_events: BTreeMap<String, u64> = s
        .lost_events
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(kind, n)| (kind.chars().take(64).collect(), *n))
        .collect();
    let mut peers = Vec::with_capacity(s.peers.len());
    for (i, p) in s.peers.iter().enumerate() {
        let addr: IpAddr = p.remote_addr.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "peers[{i}].remote_addr: {:?} is not an IP address",
                p.remote_addr
            ))
        })?;
        if !p.rtt_p99_us.is_finite() || p.rtt_p99_us < 0.0 || !p.rtt_p50_us.is_finite() {
            return Err(Status::invalid_argument(format!(
                "peers[{i}]: RTT must be finite and >= 0"
            )));
        }
        peers.push(PeerObservation {
            addr,
            rtt_samples: p.rtt_samples,
            rtt_p99_us: p.rtt_p99_us,
            segments_out: p.segments_out,
            retransmits: p.retransmits,
            unanswered_connects: p.unanswered_connects,
        });
    }
    Ok((
        name.to_string(),
        NodeReport {
            seq: window.seq,
            boot_id: node.boot_id.clone(),
            agent_started_ns: node.agent_started_ns,
            received_ms: now_ms,
            stopped_ms: None,
            figures,
            sustained_loss,
            local,
            predictions,
            peers,
            lost_events: lost_events.clone(),
            lost_events_total: lost_events,
        },
    ))
}

/// The tonic service.
#[derive(Clone)]
pub struct IngestService {
    pub store: FleetStore,
    /// Authentication, node binding and per-identity limits (gate.rs).
    pub gate: crate::gate::Gate,
    pub metrics: Arc<Metrics>,
    pub max_peers: usize,
    /// Ends every open stream (UNAVAILABLE, "shutting down") so the server can drain.
    pub shutdown: tokio_util::sync::CancellationToken,
}

pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

type DirectiveStream = Pin<Box<dyn Stream<Item = Result<Directive, Status>> + Send>>;

/// What a stream's task queues for its agent, made into a `Directive` (or the ending status) as
/// it is sent. Small on purpose: each stream's queue allocates slots in blocks of 32, and a
/// `Result<Directive, Status>` slot is ~200 bytes (`Status` alone is most of it), ~6 KiB a
/// stream at 10,000 streams; these are 16.
enum Outbound {
    Ack(u64),
    Answers(Box<v1::AddressAnswers>),
    End(Box<Status>),
}

impl Outbound {
    fn into_directive(self) -> Result<Directive, Status> {
        let kind = match self {
            Outbound::Ack(seq) => directive::Kind::Ack(v1::Ack { seq }),
            Outbound::Answers(answers) => directive::Kind::AddressAnswers(*answers),
            Outbound::End(status) => return Err(*status),
        };
        Ok(Directive {
            protocol_version: PROTOCOL_VERSION,
            kind: Some(kind),
        })
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    type ReportStream = DirectiveStream;

    async fn report(&self, request: Request<Streaming<NodeSummary>>) -> Result<Response<Self::ReportStream>, Status> {
        let mut admission = self.gate.admit(&request).await?;
        let mut inbound = request.into_inner();
        // Two directives queued at most (an Ack and an address answer per summary).
        let (tx, rx) = mpsc::channel::<Outbound>(2);
        let this = self.clone();
        tokio::spawn(async move {
            let mut node: Option<String> = None;
            loop {
                let msg = tokio::select! {
                    () = this.shutdown.cancelled() => {
                        let _ = tx.send(Outbound::End(Box::new(Status::unavailable("aggregator shutting down; reconnect")))).await;
                        return;
                    }
                    msg = inbound.next() => match msg {
                        Some(m) => m,
                        None => return,
                    },
                };
                let summary = match msg {
                    Ok(s) => s,
                    Err(status) => {
                        // Decode errors (malformed / oversized) arrive here; tell the agent why.
                        this.metrics.rejected(status.code());
                        tracing::warn!(node = node.as_deref().unwrap_or("?"), code = ?status.code(), message = status.message(), "ingest stream error");
                        let _ = tx.send(Outbound::End(Box::new(status))).await;
                        return;
                    }
                };
                let checked = validate(&summary, this.max_peers, now_ms()).and_then(|(name, report)| {
                    Ok((name, report, pod_addresses(&summary)?, address_lookups(&summary)?))
                });
                match checked {
                    Ok((name, report, pods, lookups)) => {
                        if let Err(status) = this.gate.check(&mut admission, &name) {
                            let _ = tx.send(Outbound::End(Box::new(status))).await;
                            return;
                        }
                        let seq = report.seq;
                        if summary.stopping {
                            let held = this.store.mark_stopping(&name, &report);
                            tracing::info!(
                                node = %name,
                                boot_id = %report.boot_id,
                                agent_started_ns = report.agent_started_ns,
                                held,
                                "agent stopping (a rollout or a node shutdown): its node's conditions are held for the next agent"
                            );
                            this.metrics.stop_notice(held);
                            node = Some(name);
                            if tx.send(Outbound::Ack(seq)).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        let stored = this.store.store(&name, report);
                        if stored == Stored::Full {
                            let cap = this.store.max_nodes();
                            this.metrics.map_full("fleet_reports", cap);
                            this.metrics.denied("fleet_full");
                            let status = Status::resource_exhausted(format!(
                                "the fleet view holds {cap} nodes, its cap (ingest.max_nodes); {name:?} is not stored"
                            ));
                            this.metrics.rejected(status.code());
                            let _ = tx.send(Outbound::End(Box::new(status))).await;
                            return;
                        }
                        // Also from a replay: the agent sends them on a new stream's first window.
                        if let Some(pods) = pods
                            && stored != Stored::Superseded
                        {
                            this.store.set_pod_addresses(&name, pods);
                        }
                        if stored == Stored::Superseded {
                            tracing::debug!(node = %name, seq, "dropped a window of a superseded agent incarnation");
                        }
                        this.metrics.ingested(stored != Stored::New);
                        node = Some(name);
                        if tx.send(Outbound::Ack(seq)).await.is_err() {
                            return;
                        }
                        if !lookups.is_empty() {
                            let answers = answer_lookups(&this.store.address_book(), &lookups);
                            this.metrics
                                .address_lookups(answers.owners.len(), answers.unknown.len());
                            if tx.send(Outbound::Answers(Box::new(answers))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(status) => {
                        this.metrics.rejected(status.code());
                        tracing::warn!(node = node.as_deref().unwrap_or("?"), code = ?status.code(), message = status.message(), "rejected summary");
                        let _ = tx.send(Outbound::End(Box::new(status))).await;
                        return;
                    }
                }
            }
        });
        let out = tokio_stream::wrappers::ReceiverStream::new(rx).map(Outbound::into_directive);
        Ok(Response::new(Box::pin(out) as DirectiveStream))
    }
}

#[cfg(test)]
mod tests {
    use graywatch_proto::v1::{FamilyFigures, LocalScore, NodeIdentity, PeerStats, Window};

    use crate::core::model::Family;
    use proptest::prelude::*;

    use super::*;

    fn good() -> NodeSummary {
        NodeSummary {
            protocol_version: PROTOCOL_VERSION,
            node: Some(NodeIdentity {
                node_name: "node-1".into(),
                boot_id: "b".into(),
                ..Default::default()
            }),
            window: Some(Window {
                seq: 1,
                start_unix_ms: 0,
                end_unix_ms: 1000,
            }),
            families: vec![FamilyFigures {
                family: v1::Family::NetworkLatency as i32,
                value: 300.0,
                ..Default::default()
            }],
            peers: vec![PeerStats {
                remote_addr: "10.0.0.2".into(),
                rtt_samples: 3,
                rtt_p99_us: 300.0,
                ..Default::default()
            }],
            scores: vec![LocalScore {
                family: v1::Family::NetworkLatency as i32,
                score: 0.1,
                reason: "ok".into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    #[expect(clippy::float_cmp, reason = "the figure is passed through unchanged")]
    fn accepts_good_and_rejects_bad_with_clear_codes() {
        let (name, r) = validate(&good(), 10, 5).expect("valid");
        assert_eq!(name, "node-1");
        assert_eq!(r.figures[&Family::NetworkLatency], 300.0);
        let bad_version = NodeSummary {
            protocol_version: 99,
            ..good()
        };
        let e = validate(&bad_version, 10, 5).expect_err("version");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("99"));
        let mut s = good();
        s.peers[0].remote_addr = "not-an-ip".into();
        assert_eq!(
            validate(&s, 10, 5).expect_err("addr").code(),
            tonic::Code::InvalidArgument
        );
        let mut s = good();
        s.scores[0].score = f64::NAN;
        assert!(
            validate(&s, 10, 5)
                .expect_err("nan")
                .message()
                .starts_with("scores[0].score")
        );
        let mut s = good();
        s.predictions.push(graywatch_proto::v1::Prediction {
            family: graywatch_proto::v1::Family::MemoryPressure.into(),
            eta_seconds: 42.0,
            confidence: 0.9,
            reason: "shop/cart-0 leaks".into(),
            ..Default::default()
        });
        let (_, r) = validate(&s, 10, 5).expect("a prediction is valid");
        assert_eq!(r.predictions[&Family::MemoryPressure].eta_secs, 42.0);
        s.predictions[0].confidence = 1.5;
        assert!(
            validate(&s, 10, 5)
                .expect_err("confidence")
                .message()
                .starts_with("predictions[0].confidence")
        );
        s.predictions[0].confidence = 0.9;
        s.predictions[0].eta_seconds = f64::INFINITY;
        assert!(
            validate(&s, 10, 5)
                .expect_err("eta")
                .message()
                .starts_with("predictions[0].eta_seconds")
        );
        let mut s = good();
        s.node = None;
        assert_eq!(validate(&s, 10, 5).expect_err("node").message(), "node: missing");
        assert!(
            validate(&good(), 0, 5)
                .expect_err("peers")
                .message()
                .starts_with("peers:")
        );
    }

    fn incarnation(started_ns: u64, seq: u64) -> NodeReport {
        NodeReport {
            boot_id: "b".into(),
            agent_started_ns: started_ns,
            seq,
            ..Default::default()
        }
    }

    /// A stop notice marks the latest report of its own incarnation only; that incarnation's
    /// next window (it did not stop after all) or its successor's clears the mark.
    #[test]
    fn a_stop_notice_marks_only_its_own_incarnation() {
        let store = FleetStore::default();
        let notice = |started_ns, received_ms| NodeReport {
            received_ms,
            ..incarnation(started_ns, 7)
        };
        assert!(!store.mark_stopping("node-1", &notice(100, 5)), "nothing stored yet");
        assert_eq!(store.store("node-1", incarnation(100, 7)), Stored::New);
        assert!(!store.mark_stopping("node-1", &notice(99, 5)), "an older incarnation's");
        assert_eq!(store.snapshot()["node-1"].stopped_ms, None);
        assert!(store.mark_stopping("node-1", &notice(100, 5)));
        assert!(
            store.mark_stopping("node-1", &notice(100, 9)),
            "a repeated notice of the same incarnation"
        );
        assert_eq!(
            store.snapshot()["node-1"].stopped_ms,
            Some(5),
            "the first notice counts"
        );
        assert_eq!(store.store("node-1", incarnation(200, 1)), Stored::New);
        assert_eq!(store.snapshot()["node-1"].stopped_ms, None, "the successor reports");
        assert!(
            !store.mark_stopping("node-1", &notice(100, 11)),
            "the old one's late notice"
        );
        assert_eq!(store.snapshot()["node-1"].stopped_ms, None);
    }

    #[test]
    fn a_restarted_agent_replaces_the_old_one_whatever_its_seq() {
        let store = FleetStore::default();
        assert_eq!(store.store("node-1", incarnation(100, 500)), Stored::New);
        // The rollout's new agent starts at seq 1 on the same boot.
        assert_eq!(store.store("node-1", incarnation(200, 1)), Stored::New);
        assert_eq!(store.snapshot()["node-1"].seq, 1);
        assert_eq!(store.store("node-1", incarnation(200, 2)), Stored::New);
        assert_eq!(store.store("node-1", incarnation(200, 2)), Stored::Replay);
        // A late replay of the old agent (higher seq) does not roll the node back.
        assert_eq!(store.store("node-1", incarnation(100, 501)), Stored::Superseded);
        let kept = &store.snapshot()["node-1"];
        assert_eq!((kept.agent_started_ns, kept.seq), (200, 2));
        assert_eq!(store.store("node-1", incarnation(200, 3)), Stored::New);
    }

    #[test]
    fn agents_without_an_incarnation_compare_by_seq() {
        // An old agent (0) upgraded to one that sends its start time: the new one wins at seq 1.
        assert_eq!(classify(&incarnation(0, 40), &incarnation(7, 1)), Stored::New);
        // Downgraded back to an old agent: it cannot be ordered, so seq decides as before.
        assert_eq!(classify(&incarnation(7, 40), &incarnation(0, 3)), Stored::Replay);
        assert_eq!(classify(&incarnation(7, 40), &incarnation(0, 41)), Stored::New);
        assert_eq!(classify(&incarnation(0, 4), &incarnation(0, 4)), Stored::Replay);
        // A reboot restarts everything whatever the incarnation says.
        let rebooted = NodeReport {
            boot_id: "c".into(),
            ..incarnation(1, 1)
        };
        assert_eq!(classify(&incarnation(9, 99), &rebooted), Stored::New);
    }

    #[test]
    fn validate_carries_the_incarnation() {
        let mut s = good();
        if let Some(n) = s.node.as_mut() {
            n.agent_started_ns = 42;
        }
        let (_, r) = validate(&s, 10, 5).expect("valid");
        assert_eq!(r.window_id().agent_started_ns, 42);
    }

    #[test]
    fn replays_are_dropped() {
        let store = FleetStore::default();
        let (_, r) = validate(&good(), 10, 5).expect("valid");
        assert_eq!(store.store("node-1", r.clone()), Stored::New);
        assert_eq!(store.store("node-1", r.clone()), Stored::Replay);
        let newer = NodeReport { seq: 2, ..r.clone() };
        assert_eq!(store.store("node-1", newer), Stored::New);
        let rebooted = NodeReport {
            boot_id: "c".into(),
            ..r
        };
        assert_eq!(store.store("node-1", rebooted), Stored::New);
    }

    #[test]
    fn the_store_is_capped_and_forgets_deleted_nodes() {
        let store = FleetStore::new(2);
        assert_eq!(store.store("node-0", incarnation(1, 1)), Stored::New);
        assert_eq!(store.store("node-1", incarnation(1, 1)), Stored::New);
        assert_eq!(store.store("node-2", incarnation(1, 1)), Stored::Full);
        // Nodes already stored keep reporting.
        assert_eq!(store.store("node-0", incarnation(1, 2)), Stored::New);
        let pods = vec![IpAddr::from([10, 244, 0, 7])];
        store.set_pod_addresses("node-0", pods.clone());
        store.set_pod_addresses("node-2", pods.clone());
        assert_eq!(
            store.pod_addresses().keys().collect::<Vec<_>>(),
            ["node-0"],
            "pod IPs only for stored nodes"
        );
        // node-0 is deleted: its report and pod IPs go, and make room for node-2.
        assert_eq!(store.retain_nodes(|n| n != "node-0"), (1, 0));
        assert!(store.pod_addresses().is_empty());
        assert_eq!(store.store("node-2", incarnation(1, 1)), Stored::New);
        assert_eq!(store.snapshot().keys().collect::<Vec<_>>(), ["node-1", "node-2"]);
    }

    #[test]
    fn address_lookups_are_bounded_and_answered_from_the_published_book() {
        let mut s = good();
        s.address_lookups = vec!["10.0.0.2".into(), "not-an-ip".into()];
        let err = address_lookups(&s).expect_err("bad entry");
        assert!(err.message().contains("address_lookups[1]"), "{}", err.message());
        s.address_lookups = vec!["10.0.0.2".into(); MAX_ADDRESS_LOOKUPS + 1];
        let err = address_lookups(&s).expect_err("too many");
        assert!(err.message().contains("at most"), "{}", err.message());

        let store = FleetStore::default();
        let node = crate::core::model::NodeView {
            name: "node-2".into(),
            internal_ips: vec![IpAddr::from([10, 0, 0, 2])],
            pod_cidrs: vec!["192.168.7.9/32".parse().expect("prefix")],
            ..Default::default()
        };
        store.publish_address_book(Arc::new(AddressBook::new([&node])));
        s.address_lookups = vec!["192.168.7.9".into(), "203.0.113.1".into(), "10.0.0.2".into()];
        let answers = answer_lookups(&store.address_book(), &address_lookups(&s).expect("valid"));
        let owners: Vec<(&str, &str)> = answers
            .owners
            .iter()
            .map(|o| (o.address.as_str(), o.node_name.as_str()))
            .collect();
        assert_eq!(owners, [("192.168.7.9", "node-2"), ("10.0.0.2", "node-2")]);
        assert_eq!(answers.unknown, ["203.0.113.1"]);
    }

    #[test]
    fn the_snapshot_shares_the_stored_reports() {
        let store = FleetStore::default();
        store.store("node-0", incarnation(1, 1));
        let a = store.snapshot();
        let b = store.snapshot();
        assert!(Arc::ptr_eq(&a["node-0"], &b["node-0"]), "no copy per snapshot");
        // A new window replaces the pointer; the snapshot taken before keeps its window.
        store.store("node-0", incarnation(1, 2));
        assert_eq!((a["node-0"].seq, store.snapshot()["node-0"].seq), (1, 2));
    }

    proptest! {
        /// Arbitrary field values never panic the validator.
        #[test]
        fn validate_never_panics(
            version in any::<u32>(), name in ".{0,20}", seq in any::<u64>(),
            value in any::<f64>(), score in any::<f64>(), addr in ".{0,20}", rtt in any::<f64>(),
        ) {
            let mut s = good();
            s.protocol_version = version;
            if let Some(n) = s.node.as_mut() { n.node_name = name; }
            if let Some(w) = s.window.as_mut() { w.seq = seq; }
            s.families[0].value = value;
            s.scores[0].score = score;
            s.peers[0].remote_addr = addr;
            s.peers[0].rtt_p99_us = rtt;
            let _ = validate(&s, 10, 0);
        }
    }
}
