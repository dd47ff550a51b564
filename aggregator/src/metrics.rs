//! Prometheus metrics (prometheus-client) and the /metrics + /healthz HTTP server.

use std::sync::{Arc, atomic::AtomicU64};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

pub struct Metrics {
    registry: Registry,
    pub summaries: Family<ResultLabel, Counter>,
    pub rejected: Family<ResultLabel, Counter>,
    /// Addresses the agents asked about, by answer (`node` or `unknown`).
    pub address_lookups: Family<ResultLabel, Counter>,
    pub steps: Counter,
    pub actions: Family<KindLabel, Counter>,
    pub action_errors: Family<KindLabel, Counter>,
    pub is_leader: Gauge,
    pub breaker_open: Gauge,
    /// 1 once the leader's fleet view is settled (every node reported after a start).
    pub fleet_view_settled: Gauge,
    pub verdicts: Gauge,
    /// Node pairs whose link alone looks degraded, from both ends (no action taken).
    pub degraded_links: Gauge,
    pub nodes: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Nodes with a report in the fleet view (reports of deleted Nodes are evicted).
    pub fleet_reports: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub leader_steps: Counter<u64, AtomicU64>,
    /// Seconds from a summary's arrival to the end of the decision step that first used it.
    pub ingest_to_decision: prometheus_client::metrics::histogram::Histogram,
    /// Wall time of a leader's decision step: cluster read, decision, and applying the plan.
    pub step_duration: prometheus_client::metrics::histogram::Histogram,
    /// Streams and summaries refused by authentication, node binding or limits (see gate.rs).
    pub denied: Family<ReasonLabel, Counter>,
    /// TokenReviews sent to the apiserver (streams with a token not in the review cache).
    pub token_reviews: Counter,
    /// Streams admitted on a cached positive review.
    pub token_review_cache_hits: Counter,
    /// Entries of each map that grows with nodes, identities or streams (see [`MapLabel`]).
    pub map_entries: Family<MapLabel, Gauge>,
    /// Times a map was at its cap and refused an entry.
    pub map_full: Family<MapLabel, Counter>,
}

/// The bounded maps of the aggregator (`map` label): `fleet_reports` and `pod_addresses`
/// (ingest.rs), `seen_windows` (run.rs), `limiter_identities` (limits.rs), `review_cache`
/// (gate.rs).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Buckets of the decision-latency histograms: milliseconds for a healthy step, up to a minute
/// for one stalled on apiserver writes.
const LATENCY_BUCKETS_SECONDS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Default for Metrics {
    #[expect(clippy::too_many_lines, reason = "one registration per metric, nothing else")]
    fn default() -> Self {
        let mut registry = Registry::with_prefix("graywatch_aggregator");
        let m = Self {
            registry: Registry::default(),
            summaries: Family::default(),
            rejected: Family::default(),
            address_lookups: Family::default(),
            steps: Counter::default(),
            actions: Family::default(),
            action_errors: Family::default(),
            is_leader: Gauge::default(),
            breaker_open: Gauge::default(),
            fleet_view_settled: Gauge::default(),
            verdicts: Gauge::default(),
            degraded_links: Gauge::default(),
            nodes: Gauge::default(),
            fleet_reports: Gauge::default(),
            token_reviews: Counter::default(),
            token_review_cache_hits: Counter::default(),
            leader_steps: Counter::default(),
            ingest_to_decision: prometheus_client::metrics::histogram::Histogram::new(LATENCY_BUCKETS_SECONDS),
            step_duration: prometheus_client::metrics::histogram::Histogram::new(LATENCY_BUCKETS_SECONDS),
            denied: Family::default(),
            map_entries: Family::default(),
            map_full: Family::default(),
        };
        registry.register(
            "summaries",
            "Node summaries ingested (result=new|replay; stop notices of agents stopping on purpose: result=stopping, or stopping_ignored when of an older incarnation)",
            m.summaries.clone(),
        );
        registry.register("rejected", "Messages rejected, by gRPC status code", m.rejected.clone());
        registry.register(
            "address_lookups",
            "Remote addresses the agents asked about, by answer (result=node|unknown)",
            m.address_lookups.clone(),
        );
        registry.register("decision_steps", "Decision steps run", m.steps.clone());
        registry.register("leader_steps", "Decision steps run as leader", m.leader_steps.clone());
        registry.register(
            "ingest_to_decision_seconds",
            "Time from a summary's arrival to the end of the decision step that first used it, its plan applied (leader)",
            m.ingest_to_decision.clone(),
        );
        registry.register(
            "decision_step_seconds",
            "Wall time of a leader's decision step: reading the cluster, deciding, applying the plan",
            m.step_duration.clone(),
        );
        registry.register("actions", "Cluster writes applied, by kind", m.actions.clone());
        registry.register(
            "action_errors",
            "Cluster writes that failed, by kind",
            m.action_errors.clone(),
        );
        registry.register("is_leader", "1 while this replica holds the Lease", m.is_leader.clone());
        registry.register(
            "breaker_open",
            "1 while the circuit breaker blocks actions",
            m.breaker_open.clone(),
        );
        registry.register(
            "fleet_view_settled",
            "1 once every node has reported to this leader; until then it takes no new action",
            m.fleet_view_settled.clone(),
        );
        registry.register(
            "verdicts",
            "Group (zone / instance type) verdicts in force",
            m.verdicts.clone(),
        );
        registry.register(
            "degraded_links",
            "Node pairs whose link alone looks degraded, seen from both ends: neither end is acted on",
            m.degraded_links.clone(),
        );
        registry.register("nodes", "Nodes in the fleet view", m.nodes.clone());
        registry.register(
            "token_reviews",
            "TokenReviews sent (streams with a token not in the review cache)",
            m.token_reviews.clone(),
        );
        registry.register(
            "token_review_cache_hits",
            "Streams admitted on a cached positive TokenReview",
            m.token_review_cache_hits.clone(),
        );
        registry.register(
            "fleet_reports",
            "Nodes with a stored report (reports of deleted Nodes are evicted)",
            m.fleet_reports.clone(),
        );
        registry.register(
            "denied",
            "Ingest streams or summaries refused by authentication, node binding or limits, by reason",
            m.denied.clone(),
        );
        registry.register(
            "map_entries",
            "Entries of the maps that grow with nodes, identities or streams, by map",
            m.map_entries.clone(),
        );
        registry.register(
            "map_full",
            "Entries refused because their map was at its cap, by map",
            m.map_full.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    pub fn ingested(&self, replay: bool) {
        let result = if replay { "replay" } else { "new" };
        self.summaries
            .get_or_create(&ResultLabel { result: result.into() })
            .inc();
    }

    /// A stop notice (`NodeSummary.stopping`): `held` when it applied to the node's latest agent
    /// incarnation (`result=stopping`), else `result=stopping_ignored`.
    pub fn stop_notice(&self, held: bool) {
        let result = if held { "stopping" } else { "stopping_ignored" };
        self.summaries
            .get_or_create(&ResultLabel { result: result.into() })
            .inc();
    }

    pub fn address_lookups(&self, owners: usize, unknown: usize) {
        for (result, n) in [("node", owners), ("unknown", unknown)] {
            self.address_lookups
                .get_or_create(&ResultLabel { result: result.into() })
                .inc_by(n as u64);
        }
    }

    pub fn rejected(&self, code: tonic::Code) {
        self.rejected
            .get_or_create(&ResultLabel {
                result: format!("{code:?}"),
            })
            .inc();
    }

    pub fn denied(&self, reason: &str) {
        self.denied.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
    }

    pub fn map_entries(&self, map: &'static str, entries: usize) {
        self.map_entries
            .get_or_create(&MapLabel { map })
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    /// Counts and logs a map at its cap refusing an entry.
    pub fn map_full(&self, map: &'static str, cap: usize) {
        self.map_full.get_or_create(&MapLabel { map }).inc();
        tracing::warn!(map, cap, "map at its cap: entry refused (see ingest.max_nodes)");
    }

    pub fn action(&self, kind: &str, ok: bool) {
        let l = KindLabel { kind: kind.into() };
        if ok {
            self.actions.get_or_create(&l).inc();
        } else {
            self.action_errors.get_or_create(&l).inc();
        }
    }

    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves /metrics and /healthz until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    async fn render(State(m): State<Arc<Metrics>>) -> (StatusCode, [(&'static str, &'static str); 1], String) {
        (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            m.render(),
        )
    }
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_sizes_are_rendered_by_map() {
        let m = Metrics::default();
        m.map_entries("fleet_reports", 3);
        m.map_full("review_cache", 10);
        let text = m.render();
        assert!(
            text.contains("graywatch_aggregator_map_entries{map=\"fleet_reports\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("graywatch_aggregator_map_full_total{map=\"review_cache\"} 1\n"),
            "{text}"
        );
    }
}
