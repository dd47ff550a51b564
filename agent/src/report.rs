//! Agent → aggregator: the `graywatch.v1.Ingest/Report` client stream.
//!
//! [`Reporter::push`] never blocks the agent: windows go into a bounded buffer of recent windows
//! (oldest dropped first when full, drops counted). A background task keeps one stream open,
//! sends every buffered window it has not sent on this connection, forgets windows the
//! aggregator acknowledged, and on any failure reconnects with exponential backoff and jitter,
//! replaying what is still buffered (the aggregator drops replays it has already seen). The
//! latest peer book directive is published on a watch channel. On [`Reporter::shutdown`] an open
//! stream sends what is still unsent and then a stop notice (`NodeSummary.stopping`), so the
//! aggregator holds the node's conditions for the next agent rather than marking them stale.
//!
//! Depends only on the wire types (graywatch-proto), tokio and tonic.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use graywatch_proto::v1::{AddressAnswers, NodeSummary, PeerBook, directive, ingest_client::IngestClient};
use tokio::sync::{Notify, mpsc, watch};
use tonic::transport::Endpoint;

#[derive(Debug, Clone)]
pub struct ReportConfig {
    /// Aggregator address, e.g. `http://graywatch-aggregator.graywatch:7443`.
    pub endpoint: String,
    /// Windows kept while disconnected (or not yet acknowledged).
    pub buffer_windows: usize,
    /// ...and at most this many bytes of them (encoded): a busy node's windows are larger, and
    /// every aggregator replica has its own buffer.
    pub buffer_bytes: usize,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    /// TLS and the bearer token (see `stream_security.rs`).
    pub security: crate::stream_security::StreamSecurity,
}

impl Default for ReportConfig {
    fn default() -> Self {
        Self {
            endpoint: "http://graywatch-aggregator.graywatch:7443".into(),
            buffer_windows: 120,
            buffer_bytes: 8 << 20,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            security: crate::stream_security::StreamSecurity::default(),
        }
    }
}

/// Cumulative counters for the agent's metrics.
#[derive(Debug, Default)]
pub struct ReportStats {
    /// Windows written to a stream (replays included).
    pub sent: AtomicU64,
    /// Acknowledgements received.
    pub acked: AtomicU64,
    /// Windows dropped from a full buffer (oldest first).
    pub dropped: AtomicU64,
    /// Streams that failed (or could not be opened) and were retried.
    pub reconnects: AtomicU64,
    /// Streams the aggregator ended with an error status (bad message, wrong version, restart).
    pub rejected: AtomicU64,
    /// Windows the aggregator refused as invalid (`INVALID_ARGUMENT`, `OUT_OF_RANGE`): dropped, not
    /// replayed, or one bad window would end every stream for as long as it stays buffered.
    pub invalid: AtomicU64,
}

/// Bounded FIFO of recent windows, ordered by window seq: at most `cap` windows and
/// `cap_bytes` encoded bytes (the newest window is always kept).
#[derive(Debug)]
pub struct WindowBuffer {
    windows: VecDeque<(NodeSummary, usize)>,
    cap: usize,
    cap_bytes: usize,
    bytes: usize,
}

fn seq_of(s: &NodeSummary) -> u64 {
    s.window.as_ref().map_or(0, |w| w.seq)
}

impl WindowBuffer {
    #[must_use]
    pub fn new(cap: usize) -> Self {
        Self::with_byte_cap(cap, usize::MAX)
    }

    #[must_use]
    pub fn with_byte_cap(cap: usize, cap_bytes: usize) -> Self {
        Self {
            windows: VecDeque::with_capacity(cap.min(4096)),
            cap: cap.max(1),
            cap_bytes,
            bytes: 0,
        }
    }

    /// Adds a window; returns how many old windows were dropped to make room.
    pub fn push(&mut self, s: NodeSummary) -> u64 {
        let size = prost::Message::encoded_len(&s);
        let mut dropped = 0;
        while !self.windows.is_empty()
            && (self.windows.len() >= self.cap || self.bytes.saturating_add(size) > self.cap_bytes)
        {
            self.pop_front();
            dropped += 1;
        }
        self.bytes += size;
        self.windows.push_back((s, size));
        dropped
    }

    /// Encoded bytes buffered.
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Removes and returns the oldest window.
    pub fn pop_front(&mut self) -> Option<NodeSummary> {
        let (s, size) = self.windows.pop_front()?;
        self.bytes -= size;
        Some(s)
    }

    /// Forgets windows up to and including `seq`.
    pub fn ack(&mut self, seq: u64) {
        while self.windows.front().is_some_and(|(w, _)| seq_of(w) <= seq) {
            self.pop_front();
        }
    }

    /// Buffered windows with a seq above `after` (all of them for `None`), oldest first.
    #[must_use]
    pub fn after(&self, after: Option<u64>) -> Vec<NodeSummary> {
        self.windows
            .iter()
            .filter(|(w, _)| after.is_none_or(|a| seq_of(w) > a))
            .map(|(w, _)| w.clone())
            .collect()
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

/// Backoff before reconnect attempt `attempt` (0-based): exponential from `initial`, capped at
/// `max`, with jitter: uniform in [d/2, d] from `random` (any u64).
#[must_use]
pub fn backoff(attempt: u32, initial: Duration, max: Duration, random: u64) -> Duration {
    let exp = initial.saturating_mul(2u32.saturating_pow(attempt.min(20))).min(max);
    let half = exp / 2;
    let span = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
    let jitter = if span == 0 { 0 } else { random % (span + 1) };
    half + Duration::from_micros(jitter)
}

struct Shared {
    buf: Mutex<WindowBuffer>,
    notify: Notify,
    closed: AtomicBool,
    /// Set with `closed` when the agent stops: the stream ends with a stop notice.
    stop_notice: AtomicBool,
    stats: ReportStats,
    /// The node's pod IPs and their generation (see [`Reporter::set_pod_addresses`]).
    pod_addresses: Mutex<Option<(u64, Vec<String>)>>,
    /// The latest peer book from an older aggregator (its pages applied, `Directive.peer_book_delta`).
    peer_book: watch::Sender<Option<Arc<PeerBook>>>,
    /// Answers to this agent's address lookups not yet taken (see [`Reporter::take_answers`]);
    /// at most [`MAX_PENDING_ANSWERS`], the oldest dropped first.
    answers: Mutex<std::collections::VecDeque<AddressAnswers>>,
    /// The identity, window and version of the last window pushed: what the stop notice repeats.
    last_pushed: Mutex<Option<NodeSummary>>,
}

/// How long [`Reporter::shutdown`] waits for the last windows and the stop notice to be taken
/// (the aggregator has answered everything, or the stream is gone) before it gives up: well
/// inside the pod's termination grace period.
pub const STOP_NOTICE_TIMEOUT: Duration = Duration::from_secs(3);

/// Answers held for the window loop at most (one arrives per summary that asked; the loop takes
/// them every window).
const MAX_PENDING_ANSWERS: usize = 16;

/// Whether the aggregator refused the window itself (so replaying it can only fail again),
/// rather than the stream (auth, limits, shutdown, version).
fn window_is_invalid(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::InvalidArgument | tonic::Code::OutOfRange)
}

/// The client; see the module docs.
pub struct Reporter {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connecting: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("aggregator status {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("stream closed")]
    Closed,
    #[error(transparent)]
    Security(#[from] crate::stream_security::SecurityError),
}

impl Reporter {
    /// Starts the background stream task (needs a tokio runtime).
    #[must_use]
    pub fn spawn(cfg: ReportConfig) -> Self {
        let shared = Arc::new(Shared {
            buf: Mutex::new(WindowBuffer::with_byte_cap(cfg.buffer_windows, cfg.buffer_bytes)),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            stop_notice: AtomicBool::new(false),
            stats: ReportStats::default(),
            pod_addresses: Mutex::new(None),
            peer_book: watch::Sender::new(None),
            answers: Mutex::new(std::collections::VecDeque::new()),
            last_pushed: Mutex::new(None),
        });
        let task = tokio::spawn(run(shared.clone(), cfg));
        Self { shared, task }
    }

    /// Queues one window; never blocks. The oldest window is dropped (and counted) if full.
    pub fn push(&self, summary: NodeSummary) {
        *self.shared.last_pushed.lock().unwrap_or_else(PoisonError::into_inner) = Some(stop_notice(&summary));
        let dropped = self
            .shared
            .buf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(summary);
        if dropped > 0 {
            self.shared.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        self.shared.notify.notify_one();
    }

    /// The node's pod IPs, generation `generation` (larger = newer). They ride on the first
    /// window of every stream and on the next window after each change, never on every window.
    pub fn set_pod_addresses(&self, generation: u64, addresses: Vec<String>) {
        let mut current = self.shared.pod_addresses.lock().unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_none_or(|(g, _)| *g < generation) {
            *current = Some((generation, addresses));
            drop(current);
            self.shared.notify.notify_one();
        }
    }

    #[must_use]
    pub fn stats(&self) -> &ReportStats {
        &self.shared.stats
    }

    /// Windows buffered (not yet acknowledged).
    #[must_use]
    pub fn buffered(&self) -> usize {
        self.shared.buf.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// The answers to address lookups that arrived since the last call.
    #[must_use]
    pub fn take_answers(&self) -> Vec<AddressAnswers> {
        self.shared
            .answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect()
    }

    /// The latest peer book an older aggregator sent (which addresses belong to which Node).
    #[must_use]
    pub fn peer_book(&self) -> Option<Arc<PeerBook>> {
        self.shared.peer_book.borrow().clone()
    }

    /// Stops the stream task because the agent stops. An open stream first sends the windows
    /// not yet sent on it and the stop notice, then waits until the aggregator has taken them,
    /// for [`STOP_NOTICE_TIMEOUT`] at most; windows still unsent then (the stream was down) are
    /// discarded.
    pub async fn shutdown(self) {
        self.shared.stop_notice.store(true, Ordering::Relaxed);
        self.end().await;
    }

    /// Stops the stream task without a stop notice (the replica is no longer listed; the agent
    /// goes on with the others). Unsent windows are discarded.
    pub async fn close(self) {
        self.end().await;
    }

    async fn end(mut self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        self.shared.notify.notify_one();
        if tokio::time::timeout(STOP_NOTICE_TIMEOUT, &mut self.task).await.is_err() {
            tracing::warn!(
                timeout_ms = STOP_NOTICE_TIMEOUT.as_millis(),
                "the aggregator did not take the last windows in time; stopping the stream without them"
            );
            self.task.abort();
        }
    }
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "only the low 64 bits of the clock seed the jitter"
)]
fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    ((t as u64) ^ (u64::from(std::process::id()) << 32)) | 1
}

/// The stop notice that would follow `summary`: its identity, window and version, nothing else.
fn stop_notice(summary: &NodeSummary) -> NodeSummary {
    NodeSummary {
        protocol_version: summary.protocol_version,
        node: summary.node.clone(),
        window: summary.window,
        stopping: true,
        ..NodeSummary::default()
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

async fn run(shared: Arc<Shared>, cfg: ReportConfig) {
    let mut rng = seed();
    let mut attempt = 0u32;
    while !shared.closed.load(Ordering::Relaxed) {
        let mut healthy = false;
        match session(&shared, &cfg, &mut healthy).await {
            Ok(()) => return,
            Err(e) => {
                if let SessionError::Status(status) = &e {
                    shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    if window_is_invalid(status) {
                        // The aggregator takes windows in order and acknowledged every one before
                        // this (those acks were read before its status): the oldest buffered
                        // window is the one it refused.
                        let dropped = shared.buf.lock().unwrap_or_else(PoisonError::into_inner).pop_front();
                        if let Some(window) = dropped {
                            shared.stats.invalid.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                endpoint = %cfg.endpoint,
                                seq = seq_of(&window),
                                peers = window.peers.len(),
                                code = ?status.code(),
                                reason = status.message(),
                                "aggregator refused a window as invalid; dropped, not replayed"
                            );
                        }
                        // Not the connection's fault: reconnect without backing off further.
                        healthy = true;
                    }
                }
                tracing::warn!(endpoint = %cfg.endpoint, error = %e, attempt, "report stream down; reconnecting");
            }
        }
        if healthy {
            attempt = 0;
        }
        shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        let wait = backoff(attempt, cfg.backoff_initial, cfg.backoff_max, xorshift(&mut rng));
        attempt = attempt.saturating_add(1);
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        // Wake early only to shut down; pushes during the backoff just fill the buffer.
        loop {
            tokio::select! {
                () = &mut sleep => break,
                () = shared.notify.notified() => {
                    if shared.closed.load(Ordering::Relaxed) {
                        return;
                    }
                }
            }
        }
    }
}

/// One connection. `Ok(())` only on shutdown. Sets `healthy` once the aggregator acknowledged
/// something (so the backoff starts over).
async fn session(shared: &Shared, cfg: &ReportConfig, healthy: &mut bool) -> Result<(), SessionError> {
    let channel = cfg
        .security
        .apply(Endpoint::from_shared(cfg.endpoint.clone())?)?
        .connect_timeout(cfg.connect_timeout)
        .connect()
        .await?;
    let mut client = IngestClient::new(channel)
        .max_decoding_message_size(graywatch_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(graywatch_proto::MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel::<NodeSummary>(32);
    let mut request = tonic::Request::new(tokio_stream_shim::ReceiverStream::new(rx));
    // Read on every connection: projected tokens rotate.
    if let Some(token) = cfg.security.bearer()? {
        request.metadata_mut().insert("authorization", token);
    }
    let mut inbound = client.report(request).await?.into_inner();
    // Replay everything still buffered on a new connection.
    let mut sent_upto: Option<u64> = None;
    // The pod IPs go out again on every new stream (the aggregator may have restarted).
    let mut pods_sent: Option<u64> = None;
    // The aggregator's book pages on this stream (its first page resets them).
    let mut book_pages = crate::peers::BookPages::default();
    loop {
        let pending = shared
            .buf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .after(sent_upto);
        for mut s in pending {
            let seq = seq_of(&s);
            let pods = shared
                .pod_addresses
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .filter(|(generation, _)| pods_sent != Some(*generation))
                .cloned();
            if let Some((generation, addresses)) = pods {
                s.pod_addresses = Some(graywatch_proto::v1::PodAddresses { addresses });
                pods_sent = Some(generation);
            }
            tx.send(s).await.map_err(|_| SessionError::Closed)?;
            shared.stats.sent.fetch_add(1, Ordering::Relaxed);
            sent_upto = Some(seq);
        }
        if shared.closed.load(Ordering::Relaxed) {
            if shared.stop_notice.load(Ordering::Relaxed) {
                return say_stopping(&cfg.endpoint, shared, tx, inbound).await;
            }
            return Ok(());
        }
        tokio::select! {
            () = shared.notify.notified() => {}
            msg = inbound.message() => match msg? {
                Some(d) => match d.kind {
                    Some(directive::Kind::Ack(a)) => {
                        *healthy = true;
                        shared.stats.acked.fetch_add(1, Ordering::Relaxed);
                        shared.buf.lock().unwrap_or_else(PoisonError::into_inner).ack(a.seq);
                    }
                    Some(directive::Kind::AddressAnswers(answers)) => {
                        let mut held = shared.answers.lock().unwrap_or_else(PoisonError::into_inner);
                        if held.len() >= MAX_PENDING_ANSWERS {
                            held.pop_front();
                        }
                        held.push_back(answers);
                    }
                    Some(directive::Kind::PeerBookDelta(page)) => {
                        if let Some(book) = book_pages.apply(page) {
                            shared.peer_book.send_replace(Some(Arc::new(book)));
                        }
                    }
                    // An older aggregator sends the whole book each time.
                    Some(directive::Kind::PeerBook(book)) => {
                        book_pages = crate::peers::BookPages::default();
                        shared.peer_book.send_replace(Some(Arc::new(book)));
                    }
                    None => {}
                },
                None => return Err(SessionError::Closed),
            },
        }
    }
}

/// The end of a stream on shutdown: the stop notice (when a window was ever pushed), then the
/// request side closed, then the aggregator's answers read until it ends the stream (it has
/// taken everything before it does).
async fn say_stopping(
    endpoint: &str,
    shared: &Shared,
    tx: mpsc::Sender<NodeSummary>,
    mut inbound: tonic::Streaming<graywatch_proto::v1::Directive>,
) -> Result<(), SessionError> {
    let notice = shared
        .last_pushed
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    if let Some(notice) = notice {
        tx.send(notice).await.map_err(|_| SessionError::Closed)?;
        tracing::info!(
            endpoint,
            "stop notice sent: the aggregator holds this node's conditions for the next agent"
        );
    }
    drop(tx);
    while let Some(directive) = inbound.message().await? {
        if let Some(directive::Kind::Ack(a)) = directive.kind {
            shared.stats.acked.fetch_add(1, Ordering::Relaxed);
            shared.buf.lock().unwrap_or_else(PoisonError::into_inner).ack(a.seq);
        }
    }
    Ok(())
}

/// A minimal `Stream` over an mpsc receiver (keeps this module free of tokio-stream).
mod tokio_stream_shim {
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    pub struct ReceiverStream<T>(tokio::sync::mpsc::Receiver<T>);

    impl<T> ReceiverStream<T> {
        pub fn new(rx: tokio::sync::mpsc::Receiver<T>) -> Self {
            Self(rx)
        }
    }

    impl<T> futures::Stream for ReceiverStream<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, pin::Pin, sync::atomic::AtomicUsize};

    use futures::{Stream, StreamExt};
    use graywatch_proto::v1::{Ack, Directive, ingest_server};
    use proptest::prelude::*;

    use super::*;

    fn window(seq: u64) -> NodeSummary {
        graywatch_k8s_testkit::ReportBuilder::new("n1", seq)
            .boot_id("b")
            .window_ms(0, 1)
            .build()
    }

    #[test]
    fn buffer_drops_oldest_first_and_counts() {
        let mut b = WindowBuffer::new(3);
        let dropped: u64 = (1..=5).map(|s| b.push(window(s))).sum();
        assert_eq!(dropped, 2);
        assert_eq!(b.after(None).iter().map(seq_of).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(b.after(Some(3)).iter().map(seq_of).collect::<Vec<_>>(), vec![4, 5]);
        b.ack(4);
        assert_eq!(b.after(None).iter().map(seq_of).collect::<Vec<_>>(), vec![5]);
    }

    /// A busy node's windows are large and every replica buffers its own copy: the buffer is
    /// bounded in bytes too, the newest window always kept.
    #[test]
    fn buffer_is_bounded_in_bytes() {
        let big = |seq| {
            let mut w = window(seq);
            w.peers = vec![
                graywatch_proto::v1::PeerStats {
                    node_name: "n".repeat(1000),
                    ..Default::default()
                };
                10
            ];
            w
        };
        let size = prost::Message::encoded_len(&big(1));
        let mut b = WindowBuffer::with_byte_cap(100, 3 * size + size / 2);
        let dropped: u64 = (1..=5).map(|s| b.push(big(s))).sum();
        assert_eq!(dropped, 2);
        assert_eq!(b.after(None).iter().map(seq_of).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(b.bytes(), 3 * size);
        b.ack(4);
        assert_eq!(b.bytes(), size);
        let mut tiny = WindowBuffer::with_byte_cap(100, 10);
        tiny.push(big(1));
        assert_eq!(tiny.push(big(2)), 1);
        assert_eq!(tiny.len(), 1, "the newest window stays even when larger than the cap");
    }

    proptest! {
        #[test]
        fn backoff_is_bounded_and_jittered(attempt in 0u32..64, r in any::<u64>()) {
            let init = Duration::from_millis(100);
            let max = Duration::from_secs(10);
            let d = backoff(attempt, init, max, r);
            prop_assert!(d <= max);
            let exp = init.saturating_mul(2u32.saturating_pow(attempt.min(20))).min(max);
            prop_assert!(d >= exp / 2);
        }
    }

    /// (seq, the pod addresses the window carried).
    type SeenPods = (u64, Option<Vec<String>>);

    /// In-process aggregator stand-in: records seqs, acks them, and ends the first stream with
    /// an error after `fail_after` summaries (to force a reconnect).
    #[derive(Clone, Default)]
    struct Fake {
        seen: Arc<Mutex<Vec<u64>>>,
        fail_after: Arc<AtomicUsize>,
        /// A window seq refused as invalid every time it arrives (0 = none).
        invalid_seq: Arc<AtomicU64>,
        /// (seq, pod addresses it carried) of every window received.
        pods: Arc<Mutex<Vec<SeenPods>>>,
        /// Every message in arrival order: (seq, whether it was a stop notice).
        log: Arc<Mutex<Vec<(u64, bool)>>>,
    }

    type Out = Pin<Box<dyn Stream<Item = Result<Directive, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl ingest_server::Ingest for Fake {
        type ReportStream = Out;
        async fn report(
            &self,
            req: tonic::Request<tonic::Streaming<NodeSummary>>,
        ) -> Result<tonic::Response<Out>, tonic::Status> {
            let mut inbound = req.into_inner();
            let this = self.clone();
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(async move {
                while let Some(Ok(s)) = inbound.next().await {
                    let seq = seq_of(&s);
                    this.log
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((seq, s.stopping));
                    if s.stopping {
                        continue;
                    }
                    this.seen.lock().unwrap_or_else(PoisonError::into_inner).push(seq);
                    this.pods
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((seq, s.pod_addresses.map(|p| p.addresses)));
                    if this.invalid_seq.load(Ordering::SeqCst) == seq {
                        let _ = tx.send(Err(tonic::Status::invalid_argument("peers: too many"))).await;
                        return;
                    }
                    if this.fail_after.load(Ordering::SeqCst) == 1 {
                        this.fail_after.store(0, Ordering::SeqCst);
                        let _ = tx.send(Err(tonic::Status::unavailable("restarting"))).await;
                        return;
                    }
                    this.fail_after
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
                        .ok();
                    let _ = tx
                        .send(Ok(Directive {
                            protocol_version: 1,
                            kind: Some(directive::Kind::Ack(Ack { seq })),
                        }))
                        .await;
                }
            });
            let out = tokio_stream_shim::ReceiverStream::new(rx);
            Ok(tonic::Response::new(Box::pin(out) as Out))
        }
    }

    async fn serve(fake: Fake, listener: tokio::net::TcpListener) {
        let incoming = futures::stream::unfold(listener, |l| async move {
            let r = l.accept().await.map(|(s, _)| s);
            Some((r, l))
        });
        let _ = tonic::transport::Server::builder()
            .add_service(ingest_server::IngestServer::new(fake))
            .serve_with_incoming(incoming)
            .await;
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn cfg(addr: SocketAddr, cap: usize) -> ReportConfig {
        ReportConfig {
            endpoint: format!("http://{addr}"),
            buffer_windows: cap,
            buffer_bytes: 8 << 20,
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(2),
            security: crate::stream_security::StreamSecurity::default(),
        }
    }

    #[tokio::test]
    async fn buffers_while_down_then_replays_in_order() {
        // Reserve a port, but nobody listens yet: the agent starts before the aggregator.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = probe.local_addr().expect("addr");
        drop(probe);
        let rep = Reporter::spawn(cfg(addr, 4));
        for s in 1..=6 {
            rep.push(window(s));
        }
        assert_eq!(rep.stats().dropped.load(Ordering::Relaxed), 2, "oldest two dropped");
        until("a failed connection attempt", || {
            rep.stats().reconnects.load(Ordering::Relaxed) >= 1
        })
        .await;
        let fake = Fake::default();
        let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
        tokio::spawn(serve(fake.clone(), listener));
        let seen = fake.seen.clone();
        until("replay of 3..=6", || {
            *seen.lock().unwrap_or_else(PoisonError::into_inner) == vec![3, 4, 5, 6]
        })
        .await;
        until("acks empty the buffer", || rep.buffered() == 0).await;
        rep.shutdown().await;
    }

    #[tokio::test]
    async fn reconnects_after_stream_error_and_resends_unacked() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let fake = Fake::default();
        // Ack 2 windows, then fail the stream on the 3rd (unacked).
        fake.fail_after.store(3, Ordering::SeqCst);
        tokio::spawn(serve(fake.clone(), listener));
        let rep = Reporter::spawn(cfg(addr, 16));
        for s in 1..=3 {
            rep.push(window(s));
        }
        let seen = fake.seen.clone();
        until("3 is resent on the new stream", || {
            let v = seen.lock().unwrap_or_else(PoisonError::into_inner);
            v.iter().filter(|s| **s == 3).count() == 2
        })
        .await;
        rep.push(window(4));
        until("4 arrives", || {
            seen.lock().unwrap_or_else(PoisonError::into_inner).contains(&4)
        })
        .await;
        until("all acked", || rep.buffered() == 0).await;
        assert!(rep.stats().rejected.load(Ordering::Relaxed) >= 1);
        assert_eq!(rep.stats().dropped.load(Ordering::Relaxed), 0);
        // 1 and 2 were acknowledged before the failure and never resent.
        let v = seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
        assert_eq!(v.iter().filter(|s| **s == 1).count(), 1, "{v:?}");
        assert_eq!(v.iter().filter(|s| **s == 2).count(), 1, "{v:?}");
        rep.shutdown().await;
    }

    /// Issue 16: a window the aggregator refuses as invalid came back first on every reconnect,
    /// so nothing after it was ever accepted. Now it is dropped (counted) and the rest flows.
    #[tokio::test]
    async fn a_window_refused_as_invalid_is_dropped_not_replayed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let fake = Fake::default();
        fake.invalid_seq.store(2, Ordering::SeqCst);
        tokio::spawn(serve(fake.clone(), listener));
        let rep = Reporter::spawn(cfg(addr, 16));
        for s in 1..=4 {
            rep.push(window(s));
        }
        let seen = fake.seen.clone();
        until("3 and 4 arrive after the refused 2", || {
            let v = seen.lock().unwrap_or_else(PoisonError::into_inner);
            v.contains(&3) && v.contains(&4)
        })
        .await;
        until("all acked", || rep.buffered() == 0).await;
        rep.push(window(5));
        until("5 arrives", || {
            seen.lock().unwrap_or_else(PoisonError::into_inner).contains(&5)
        })
        .await;
        let v = seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
        assert_eq!(v.iter().filter(|s| **s == 2).count(), 1, "never replayed: {v:?}");
        assert_eq!(rep.stats().invalid.load(Ordering::Relaxed), 1);
        rep.shutdown().await;
    }

    /// A reporter streaming to a fake aggregator, window 1 acknowledged.
    async fn streaming() -> (Fake, Reporter) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let fake = Fake::default();
        tokio::spawn(serve(fake.clone(), listener));
        let rep = Reporter::spawn(cfg(addr, 16));
        rep.push(window(1));
        until("1 acked", || rep.buffered() == 0).await;
        (fake, rep)
    }

    /// An agent that stops sends what it has not sent yet, then its stop notice (the last
    /// window's seq), and returns once the aggregator has taken them.
    #[tokio::test]
    async fn shutdown_sends_the_last_windows_then_a_stop_notice() {
        let (fake, rep) = streaming().await;
        rep.push(window(2));
        rep.push(window(3));
        rep.shutdown().await;
        let log = fake.log.lock().unwrap_or_else(PoisonError::into_inner).clone();
        assert_eq!(log, vec![(1, false), (2, false), (3, false), (3, true)]);
    }

    /// A stream closed because its replica is no longer listed ends without a stop notice: the
    /// agent goes on reporting to the others.
    #[tokio::test]
    async fn close_sends_no_stop_notice() {
        let (fake, rep) = streaming().await;
        rep.close().await;
        let log = fake.log.lock().unwrap_or_else(PoisonError::into_inner).clone();
        assert_eq!(log, vec![(1, false)]);
    }

    /// The node's pod IPs ride on the first window of each stream and after a change only.
    #[tokio::test]
    async fn pod_addresses_go_on_the_first_window_of_a_stream_and_on_changes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let fake = Fake::default();
        // Ack 1 and 2, fail the stream on 3: it is resent on a new stream.
        fake.fail_after.store(3, Ordering::SeqCst);
        tokio::spawn(serve(fake.clone(), listener));
        let rep = Reporter::spawn(cfg(addr, 16));
        rep.set_pod_addresses(1, vec!["192.168.7.9".into()]);
        rep.push(window(1));
        let pods = fake.pods.clone();
        let got = |n: usize| {
            let pods = pods.clone();
            move || pods.lock().unwrap_or_else(PoisonError::into_inner).len() >= n
        };
        until("1", got(1)).await;
        rep.push(window(2));
        until("2", got(2)).await;
        rep.set_pod_addresses(2, vec!["192.168.7.9".into(), "192.168.7.10".into()]);
        rep.set_pod_addresses(1, vec!["stale".into()]);
        rep.push(window(3));
        until("3 twice (the stream failed on it)", got(4)).await;
        let v = pods.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let one = Some(vec!["192.168.7.9".to_owned()]);
        let two = Some(vec!["192.168.7.9".to_owned(), "192.168.7.10".to_owned()]);
        assert_eq!(v[0], (1, one), "first window of the stream");
        assert_eq!(v[1], (2, None), "unchanged");
        assert_eq!(v[2], (3, two.clone()), "changed (an older generation never wins)");
        assert_eq!(v[3], (3, two), "first window of the new stream");
        rep.shutdown().await;
    }
}
