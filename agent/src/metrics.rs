//! Prometheus metrics (prometheus-client), served on /metrics.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::summary::{WindowSummary, Workload};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadLabels {
    pub cgroup: String,
    pub namespace: String,
    pub pod: String,
}

impl From<&Workload> for WorkloadLabels {
    fn from(w: &Workload) -> Self {
        let pod = w.pod.as_ref();
        WorkloadLabels {
            cgroup: w.cgroup_path.clone().unwrap_or_else(|| format!("id:{}", w.cgroup_id)),
            namespace: pod.and_then(|p| p.namespace.clone()).unwrap_or_default(),
            pod: pod
                .map(|p| p.name.clone().unwrap_or_else(|| p.uid.clone()))
                .unwrap_or_default(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignalLabels {
    pub signal: String,
}

type GaugeF64 = Gauge<f64, AtomicU64>;

/// Per-workload series (pods come and go) are removed after this many windows without the
/// workload (5 minutes at the default 1 s window): cardinality follows the live pods, not every
/// pod the node ever ran. A workload that comes back starts its counters again (a reset).
pub const WORKLOAD_SERIES_TTL_WINDOWS: u64 = 300;

/// Which label sets were seen in which window, to expire the ones that went away.
#[derive(Debug)]
pub struct SeriesExpiry<L> {
    state: std::sync::Mutex<(u64, std::collections::HashMap<L, u64>)>,
}

impl<L> Default for SeriesExpiry<L> {
    fn default() -> Self {
        Self {
            state: std::sync::Mutex::new((0, std::collections::HashMap::new())),
        }
    }
}

impl<L: Clone + std::hash::Hash + Eq> SeriesExpiry<L> {
    /// `labels` has a sample in the current window.
    pub fn seen(&self, labels: &L) {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let window = state.0;
        state.1.insert(labels.clone(), window);
    }

    /// Ends the current window; returns (and forgets) the label sets not seen for `ttl` windows.
    pub fn end_window(&self, ttl: u64) -> Vec<L> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.0 += 1;
        let window = state.0;
        let mut expired = Vec::new();
        state.1.retain(|labels, last| {
            let keep = window - *last < ttl;
            if !keep {
                expired.push(labels.clone());
            }
            keep
        });
        expired
    }
}

/// Every metric the agent exports.
pub struct Metrics {
    pub registry: Registry,
    rtt_p50: Family<WorkloadLabels, GaugeF64>,
    rtt_p99: Family<WorkloadLabels, GaugeF64>,
    retransmits: Family<WorkloadLabels, Counter>,
    segments_sent: Family<WorkloadLabels, Counter>,
    drops: Family<ReasonLabels, Counter>,
    lost_events: Family<KindLabels, Gauge>,
    pub signal_available: Family<SignalLabels, Gauge>,
    windows: Counter,
    pub collect_seconds: Histogram,
    pub errors: Family<KindLabels, Counter>,
    host: crate::signals::host::HostMetrics,
    local_score: Family<FamilyLabels, GaugeF64>,
    report: Family<KindLabels, Counter>,
    report_seen: std::sync::Mutex<[u64; 6]>,
    report_buffered: Gauge,
    window_peers: Family<KindLabels, Gauge>,
    window_remote_addresses: Gauge,
    workload_series: SeriesExpiry<WorkloadLabels>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    pub family: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("graywatch");
        let m = Metrics {
            rtt_p50: Family::default(),
            rtt_p99: Family::default(),
            retransmits: Family::default(),
            segments_sent: Family::default(),
            drops: Family::default(),
            lost_events: Family::default(),
            signal_available: Family::default(),
            windows: Counter::default(),
            collect_seconds: Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25]),
            errors: Family::default(),
            local_score: Family::default(),
            report: Family::default(),
            report_seen: std::sync::Mutex::new([0; 6]),
            report_buffered: Gauge::default(),
            window_peers: Family::default(),
            window_remote_addresses: Gauge::default(),
            workload_series: SeriesExpiry::default(),
            registry: Registry::default(),
            host: crate::signals::host::HostMetrics::default(),
        };
        registry.register(
            "pod_tcp_rtt_p50_seconds",
            "Median smoothed TCP RTT of the workload's flows in the last window",
            m.rtt_p50.clone(),
        );
        registry.register(
            "pod_tcp_rtt_p99_seconds",
            "99th percentile smoothed TCP RTT of the workload's flows in the last window",
            m.rtt_p99.clone(),
        );
        registry.register(
            "pod_tcp_retransmits",
            "TCP segments retransmitted by the workload",
            m.retransmits.clone(),
        );
        registry.register(
            "pod_tcp_segments_sent",
            "TCP segments sent by the workload (seen at ACK time)",
            m.segments_sent.clone(),
        );
        registry.register(
            "kernel_drops",
            "Packets dropped by the kernel, by the kernel's drop reason",
            m.drops.clone(),
        );
        registry.register(
            "ebpf_lost_events",
            "Events the kernel programs could not record (cumulative)",
            m.lost_events.clone(),
        );
        registry.register(
            "signal_available",
            "1 if the signal source is available on this host, 0 if not",
            m.signal_available.clone(),
        );
        registry.register("windows", "Window summaries produced", m.windows.clone());
        registry.register(
            "window_collect_seconds",
            "Time to read the kernel maps and build a window",
            m.collect_seconds.clone(),
        );
        registry.register("agent_errors", "Errors by kind (the log says more)", m.errors.clone());
        registry.register(
            "local_score",
            "The node's local gray-failure score per family, 0 (normal) to 1; absent while warming up",
            m.local_score.clone(),
        );
        registry.register(
            "report_windows",
            "Window summaries by fate on the aggregator stream: sent (replays included), acked, dropped (buffer full), invalid_dropped (refused by the aggregator as invalid, not replayed), plus reconnects and rejected streams",
            m.report.clone(),
        );
        registry.register(
            "report_buffered_windows",
            "Windows buffered for the aggregator (not yet acknowledged)",
            m.report_buffered.clone(),
        );
        registry.register(
            "window_peers",
            "Peers in the last window's summary by kind: node (remote addresses of one Node folded together), address (top-N others), external (everything else, at most one)",
            m.window_peers.clone(),
        );
        registry.register(
            "window_remote_addresses",
            "Distinct remote addresses in the last window, before folding into peers",
            m.window_remote_addresses.clone(),
        );
        let host = crate::signals::host::HostMetrics::register(&mut registry);
        Metrics { registry, host, ..m }
    }

    /// Updates the metrics from one window.
    pub fn observe(&self, summary: &WindowSummary) {
        self.windows.inc();
        self.host.observe(&summary.cpu, &summary.memory, &summary.pressure);
        self.rtt_p50.clear();
        self.rtt_p99.clear();
        for w in &summary.network.workloads {
            let labels = WorkloadLabels::from(&w.workload);
            if let Some(rtt) = &w.rtt {
                self.rtt_p50.get_or_create(&labels).set(rtt.p50_us as f64 / 1e6);
                self.rtt_p99.get_or_create(&labels).set(rtt.p99_us as f64 / 1e6);
            }
            self.retransmits.get_or_create(&labels).inc_by(w.retransmits);
            self.segments_sent.get_or_create(&labels).inc_by(w.segments_sent);
            self.workload_series.seen(&labels);
        }
        for gone in self.workload_series.end_window(WORKLOAD_SERIES_TTL_WINDOWS) {
            self.retransmits.remove(&gone);
            self.segments_sent.remove(&gone);
        }
        for d in &summary.network.drops {
            self.drops
                .get_or_create(&ReasonLabels {
                    reason: d.reason.clone(),
                })
                .inc_by(d.count);
        }
        for (kind, total) in &summary.lost_events {
            self.lost_events
                .get_or_create(&KindLabels { kind: kind.clone() })
                .set(i64::try_from(*total).unwrap_or(i64::MAX));
        }
    }

    /// How the last window's remotes were folded into peers.
    pub fn observe_peers(&self, peers: &[crate::peers::PeerWindow]) {
        let mut counts = [0i64; 3];
        let mut addresses = 0i64;
        for p in peers {
            let kind = match (&p.node, p.external) {
                (Some(_), _) => 0,
                (None, false) => 1,
                (None, true) => 2,
            };
            counts[kind] += 1;
            addresses += i64::from(p.addresses);
        }
        for (kind, count) in ["node", "address", "external"].into_iter().zip(counts) {
            self.window_peers
                .get_or_create(&KindLabels { kind: kind.to_owned() })
                .set(count);
        }
        self.window_remote_addresses.set(addresses);
    }

    /// The local scores of one window; families without a score are removed (not zeroed).
    pub fn observe_scores(&self, scores: &[crate::scoring::LocalFamilyScore]) {
        self.local_score.clear();
        for score in scores {
            if let Some(value) = score.score {
                self.local_score
                    .get_or_create(&FamilyLabels {
                        family: score.family.as_str().to_owned(),
                    })
                    .set(value);
            }
        }
    }

    /// Mirrors the reporter's cumulative counters (as deltas, so they stay Prometheus counters).
    pub fn observe_report(&self, stats: &crate::report::ReportStats, buffered: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = [
            stats.sent.load(Relaxed),
            stats.acked.load(Relaxed),
            stats.dropped.load(Relaxed),
            stats.reconnects.load(Relaxed),
            stats.rejected.load(Relaxed),
            stats.invalid.load(Relaxed),
        ];
        let mut seen = self
            .report_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (i, kind) in ["sent", "acked", "dropped", "reconnects", "rejected", "invalid_dropped"]
            .into_iter()
            .enumerate()
        {
            self.report
                .get_or_create(&KindLabels { kind: kind.to_owned() })
                .inc_by(now[i].saturating_sub(seen[i]));
        }
        *seen = now;
        self.report_buffered.set(i64::try_from(buffered).unwrap_or(i64::MAX));
    }

    pub fn set_available(&self, signal: &str, available: bool) {
        self.signal_available
            .get_or_create(&SignalLabels {
                signal: signal.to_owned(),
            })
            .set(i64::from(available));
    }

    pub fn count_error(&self, kind: &str) {
        self.errors.get_or_create(&KindLabels { kind: kind.to_owned() }).inc();
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::summary::{NetworkWindow, WorkloadNetWindow};

    fn window(pods: &[&str]) -> WindowSummary {
        WindowSummary {
            node: "n".into(),
            window_start_unix_ms: 0,
            window_seconds: 1.0,
            network: NetworkWindow {
                workloads: pods
                    .iter()
                    .enumerate()
                    .map(|(i, pod)| WorkloadNetWindow {
                        workload: Workload {
                            cgroup_id: i as u64,
                            cgroup_path: Some(format!("/kubepods/{pod}")),
                            pod: None,
                        },
                        rtt: None,
                        segments_sent: 10,
                        retransmits: 1,
                        retransmit_ratio: Some(0.1),
                        remotes: 1,
                    })
                    .collect(),
                ..Default::default()
            },
            cpu: Default::default(),
            memory: Default::default(),
            pressure: Default::default(),
            lost_events: BTreeMap::new(),
            unavailable: BTreeMap::new(),
            local_scores: Vec::new(),
        }
    }

    /// Issue 16.6: every pod the node ever ran kept its series for good; with pod churn the
    /// agent's /metrics grew without bound.
    #[test]
    fn series_of_workloads_that_went_away_are_removed() {
        let metrics = Metrics::new();
        metrics.observe(&window(&["gone", "stays"]));
        let text = metrics.encode().expect("encode");
        assert!(text.contains("/kubepods/gone"), "{text}");
        for _ in 0..WORKLOAD_SERIES_TTL_WINDOWS {
            metrics.observe(&window(&["stays"]));
        }
        let text = metrics.encode().expect("encode");
        assert!(!text.contains("/kubepods/gone"), "the gone pod's series are removed");
        assert!(text.contains("/kubepods/stays"));
        // 1 + TTL windows of 10 segments each: a live workload's counter is never reset.
        assert!(
            text.contains(&format!(
                "graywatch_pod_tcp_segments_sent_total{{cgroup=\"/kubepods/stays\",namespace=\"\",pod=\"\"}} {}",
                10 * (WORKLOAD_SERIES_TTL_WINDOWS + 1)
            )),
            "{text}"
        );
    }
}
