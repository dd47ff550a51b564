//! Prometheus metrics (prometheus-client), served on /metrics.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::summary::{CpuWindow, MemoryWindow, PlaceCounts, PressureWindow, Resource, WindowSummary, Workload};

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
pub struct PlaceLabels {
    pub place: &'static str,
}

/// Sets a `{place="slot"|"hash"}` gauge family from a reader's place counts.
fn set_place_counts(family: &Family<PlaceLabels, Gauge>, places: PlaceCounts) {
    for (place, count) in [("slot", places.slot), ("hash", places.hash)] {
        family
            .get_or_create(&PlaceLabels { place })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
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
    unanswered_connects: Family<WorkloadLabels, Counter>,
    drops: Family<ReasonLabels, Counter>,
    drop_keys: Family<PlaceLabels, Gauge>,
    lost_events: Family<KindLabels, Gauge>,
    pub signal_available: Family<SignalLabels, Gauge>,
    windows: Counter,
    pub collect_seconds: Histogram,
    pub errors: Family<KindLabels, Counter>,
    host: HostMetrics,
    local_score: Family<FamilyLabels, GaugeF64>,
    anomaly_onsets: Family<FamilyLabels, Counter>,
    report: Family<KindLabels, Counter>,
    report_seen: std::sync::Mutex<[u64; 6]>,
    report_buffered: Gauge,
    window_peers: Family<KindLabels, Gauge>,
    window_remote_addresses: Gauge,
    /// Remote addresses held with the aggregator's answer (see `peers::AddressAnswers`).
    pub address_answers: Gauge,
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
            unanswered_connects: Family::default(),
            drops: Family::default(),
            drop_keys: Family::default(),
            lost_events: Family::default(),
            signal_available: Family::default(),
            windows: Counter::default(),
            collect_seconds: Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25]),
            errors: Family::default(),
            local_score: Family::default(),
            anomaly_onsets: Family::default(),
            report: Family::default(),
            report_seen: std::sync::Mutex::new([0; 6]),
            report_buffered: Gauge::default(),
            window_peers: Family::default(),
            window_remote_addresses: Gauge::default(),
            address_answers: Gauge::default(),
            workload_series: SeriesExpiry::default(),
            registry: Registry::default(),
            host: HostMetrics::default(),
        };
        m.register_network(&mut registry);
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
            "anomaly_onsets",
            "Anomalies started per family, counted once they last a second window (temporary problems: a two-window anomaly counts as much as the start of a lasting fault; the local_score gauge and the Node conditions follow what lasts)",
            m.anomaly_onsets.clone(),
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
        registry.register(
            "address_answers",
            "Remote addresses the agent's own Node watch cannot map, held with the aggregator's answer (node or unknown)",
            m.address_answers.clone(),
        );
        let host = HostMetrics::register(&mut registry);
        Metrics { registry, host, ..m }
    }

    /// The per-workload TCP figures and the kernel's drops.
    fn register_network(&self, registry: &mut Registry) {
        registry.register(
            "pod_tcp_rtt_p50_seconds",
            "Median smoothed TCP RTT of the workload's flows in the last window",
            self.rtt_p50.clone(),
        );
        registry.register(
            "pod_tcp_rtt_p99_seconds",
            "99th percentile smoothed TCP RTT of the workload's flows in the last window",
            self.rtt_p99.clone(),
        );
        registry.register(
            "pod_tcp_retransmits",
            "TCP segments retransmitted by the workload",
            self.retransmits.clone(),
        );
        registry.register(
            "pod_tcp_data_segments_sent",
            "TCP segments with payload sent by the workload, retransmissions included, pure ACKs not (seen at ACK time): the denominator of the retransmit ratio",
            self.segments_sent.clone(),
        );
        registry.register(
            "pod_tcp_unanswered_connects",
            "TCP connection attempts by the workload that nobody answered: closed from SYN_SENT with neither a SYN-ACK nor a refusal (SYN retries ran out, an ICMP error, or the client gave up after at least 200 ms)",
            self.unanswered_connects.clone(),
        );
        registry.register(
            "kernel_drops",
            "Packets dropped by the kernel, by the kernel's drop reason",
            self.drops.clone(),
        );
        registry.register(
            "drop_keys",
            "(workload, remote, protocol, reason) keys with drop counters in the kernel, by place (slot: the \
             direct-mapped array; hash: the fallback for a key whose slot another holds, a hash lookup per drop)",
            self.drop_keys.clone(),
        );
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
            self.unanswered_connects
                .get_or_create(&labels)
                .inc_by(w.unanswered_connects);
            self.workload_series.seen(&labels);
        }
        for gone in self.workload_series.end_window(WORKLOAD_SERIES_TTL_WINDOWS) {
            self.retransmits.remove(&gone);
            self.segments_sent.remove(&gone);
            self.unanswered_connects.remove(&gone);
        }
        for d in &summary.network.drops {
            self.drops
                .get_or_create(&ReasonLabels {
                    reason: d.reason.clone(),
                })
                .inc_by(d.count);
        }
        if let Some(places) = summary.network.drop_places {
            set_place_counts(&self.drop_keys, places);
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
            let labels = FamilyLabels {
                family: score.family.as_str().to_owned(),
            };
            if let Some(value) = score.score {
                self.local_score.get_or_create(&labels).set(value);
            }
            if score.onset.is_some() {
                self.anomaly_onsets.get_or_create(&labels).inc();
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CpuLabels {
    pub cpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CgroupLabels {
    pub cgroup: String,
    pub pod_uid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CgroupResourceLabels {
    pub cgroup: String,
    pub pod_uid: String,
    pub resource: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OomLabels {
    pub cgroup: String,
    pub namespace: String,
    pub pod: String,
    pub comm: String,
}

/// Prometheus metrics of the CPU/memory families.
#[derive(Debug, Default)]
pub struct HostMetrics {
    steal_ratio: GaugeF64,
    steal_ratio_per_cpu: Family<CpuLabels, GaugeF64>,
    runq_p50: Family<WorkloadLabels, GaugeF64>,
    runq_p99: Family<WorkloadLabels, GaugeF64>,
    runq_wait: Family<WorkloadLabels, Counter<f64, AtomicU64>>,
    runq_cgroups: Family<PlaceLabels, Gauge>,
    reclaim_events: Family<WorkloadLabels, Counter>,
    reclaim_stall: Family<WorkloadLabels, Counter<f64, AtomicU64>>,
    oom_kills: Family<OomLabels, Counter>,
    node_psi_avg10: Family<ResourceLabels, GaugeF64>,
    node_psi_window: Family<ResourceLabels, GaugeF64>,
    cgroup_psi_avg10: Family<CgroupResourceLabels, GaugeF64>,
    cgroup_oom_kills: Family<CgroupLabels, Counter>,
    cgroup_high_events: Family<CgroupLabels, Counter>,
    cgroup_throttled: Family<CgroupLabels, Counter<f64, AtomicU64>>,
    /// Per-workload and per-cgroup series expire when their pod is gone (see metrics.rs).
    workload_series: SeriesExpiry<WorkloadLabels>,
    oom_series: SeriesExpiry<OomLabels>,
    cgroup_series: SeriesExpiry<CgroupLabels>,
}

impl HostMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "node_cpu_steal_ratio",
            "CPU steal as a fraction of the node's CPU time in the last window",
            m.steal_ratio.clone(),
        );
        registry.register(
            "cpu_steal_ratio",
            "CPU steal as a fraction of one CPU's time in the last window",
            m.steal_ratio_per_cpu.clone(),
        );
        registry.register(
            "pod_runqueue_latency_p50_seconds",
            "Median run-queue wait of the workload's tasks in the last window",
            m.runq_p50.clone(),
        );
        registry.register(
            "pod_runqueue_latency_p99_seconds",
            "99th percentile run-queue wait in the last window",
            m.runq_p99.clone(),
        );
        registry.register(
            "pod_runqueue_wait_seconds",
            "Total time the workload's tasks waited for a CPU",
            m.runq_wait.clone(),
        );
        registry.register(
            "runqueue_cgroups",
            "Cgroups with run-queue counters in the kernel, by place (slot: the direct-mapped array; \
             hash: the fallback for a cgroup whose slot another holds, a hash lookup per context switch)",
            m.runq_cgroups.clone(),
        );
        registry.register(
            "pod_reclaim_stalls",
            "Reclaim stalls (direct or memcg) of the workload's tasks",
            m.reclaim_events.clone(),
        );
        registry.register(
            "pod_reclaim_stall_seconds",
            "Time the workload's tasks spent stalled in reclaim",
            m.reclaim_stall.clone(),
        );
        registry.register(
            "oom_kills",
            "OOM kills seen by oom:mark_victim, by victim cgroup and comm",
            m.oom_kills.clone(),
        );
        registry.register(
            "node_pressure_avg10_ratio",
            "Node PSI avg10 (fraction), by resource and some/full",
            m.node_psi_avg10.clone(),
        );
        registry.register(
            "node_pressure_window_ratio",
            "Node PSI stall time in the last window as a fraction of wall time",
            m.node_psi_window.clone(),
        );
        registry.register(
            "cgroup_pressure_avg10_ratio",
            "cgroup v2 PSI avg10 (fraction), by resource and some/full",
            m.cgroup_psi_avg10.clone(),
        );
        registry.register(
            "cgroup_oom_kills",
            "OOM kills from memory.events / memory.oom_control",
            m.cgroup_oom_kills.clone(),
        );
        registry.register(
            "cgroup_memory_high_events",
            "memory.events `high` (throttled over memory.high)",
            m.cgroup_high_events.clone(),
        );
        registry.register(
            "cgroup_cpu_throttled_seconds",
            "CFS bandwidth throttled time (cpu.stat)",
            m.cgroup_throttled.clone(),
        );
        m
    }

    #[expect(clippy::too_many_lines, reason = "one gauge update per exported series")]
    pub fn observe(&self, cpu: &CpuWindow, memory: &MemoryWindow, pressure: &PressureWindow) {
        if let Some(steal) = &cpu.steal {
            self.steal_ratio.set(steal.node_pct / 100.0);
            for (id, pct) in &steal.per_cpu_pct {
                self.steal_ratio_per_cpu
                    .get_or_create(&CpuLabels { cpu: id.to_string() })
                    .set(pct / 100.0);
            }
        }
        if let Some(places) = cpu.run_queue_places {
            set_place_counts(&self.runq_cgroups, places);
        }
        self.runq_p50.clear();
        self.runq_p99.clear();
        for r in &cpu.run_queue {
            let labels = WorkloadLabels::from(&r.workload);
            self.runq_p50.get_or_create(&labels).set(r.latency.p50_us / 1e6);
            self.runq_p99.get_or_create(&labels).set(r.latency.p99_us / 1e6);
            self.runq_wait
                .get_or_create(&labels)
                .inc_by(r.latency.total_wait_ms / 1e3);
            self.workload_series.seen(&labels);
        }
        for r in &memory.reclaim {
            let labels = WorkloadLabels::from(&r.workload);
            self.reclaim_events.get_or_create(&labels).inc_by(r.stalls.events);
            self.reclaim_stall
                .get_or_create(&labels)
                .inc_by(r.stalls.total_stall_ms / 1e3);
            self.workload_series.seen(&labels);
        }
        for k in &memory.oom_kills {
            let w = WorkloadLabels::from(&k.workload);
            let labels = OomLabels {
                cgroup: w.cgroup,
                namespace: w.namespace,
                pod: w.pod,
                comm: k.kill.comm.clone(),
            };
            self.oom_kills.get_or_create(&labels).inc();
            self.oom_series.seen(&labels);
        }
        for resource in Resource::ALL {
            let Some(window) = pressure.node.get(resource) else {
                continue;
            };
            let labels = |kind: &str| ResourceLabels {
                resource: resource.to_string(),
                kind: kind.to_owned(),
            };
            self.node_psi_avg10
                .get_or_create(&labels("some"))
                .set(window.now.some.avg10 / 100.0);
            if let Some(full) = window.now.full {
                self.node_psi_avg10
                    .get_or_create(&labels("full"))
                    .set(full.avg10 / 100.0);
            }
            if let Some(pct) = window.some_pct {
                self.node_psi_window.get_or_create(&labels("some")).set(pct / 100.0);
            }
            if let Some(pct) = window.full_pct {
                self.node_psi_window.get_or_create(&labels("full")).set(pct / 100.0);
            }
        }
        self.cgroup_psi_avg10.clear();
        for c in &pressure.cgroups {
            let cg = CgroupLabels {
                cgroup: c.path.clone(),
                pod_uid: c.pod_uid.clone().unwrap_or_default(),
            };
            for (resource, psi) in [("memory", &c.memory_pressure), ("cpu", &c.cpu_pressure)] {
                let Some(psi) = psi else { continue };
                let labels = |kind: &str| CgroupResourceLabels {
                    cgroup: cg.cgroup.clone(),
                    pod_uid: cg.pod_uid.clone(),
                    resource: resource.to_owned(),
                    kind: kind.to_owned(),
                };
                self.cgroup_psi_avg10
                    .get_or_create(&labels("some"))
                    .set(psi.now.some.avg10 / 100.0);
                if let Some(full) = psi.now.full {
                    self.cgroup_psi_avg10
                        .get_or_create(&labels("full"))
                        .set(full.avg10 / 100.0);
                }
            }
            if let Some(n) = c.oom_kills {
                self.cgroup_oom_kills.get_or_create(&cg).inc_by(n);
            }
            if let Some(n) = c.memory_high_events {
                self.cgroup_high_events.get_or_create(&cg).inc_by(n);
            }
            if let Some(ms) = c.throttled_ms {
                self.cgroup_throttled.get_or_create(&cg).inc_by(ms / 1e3);
            }
            self.cgroup_series.seen(&cg);
        }
        let ttl = WORKLOAD_SERIES_TTL_WINDOWS;
        for gone in self.workload_series.end_window(ttl) {
            self.runq_wait.remove(&gone);
            self.reclaim_events.remove(&gone);
            self.reclaim_stall.remove(&gone);
        }
        for gone in self.oom_series.end_window(ttl) {
            self.oom_kills.remove(&gone);
        }
        for gone in self.cgroup_series.end_window(ttl) {
            self.cgroup_oom_kills.remove(&gone);
            self.cgroup_high_events.remove(&gone);
            self.cgroup_throttled.remove(&gone);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::summary::{
        NetworkWindow, NodePsi, OomKill, Psi, PsiLine, PsiWindow, RunqWindow, StealWindow, WorkloadNetWindow,
        WorkloadOomKill, WorkloadRunq,
    };

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
                        unanswered_connects: 0,
                        remotes: 1,
                    })
                    .collect(),
                ..Default::default()
            },
            cpu: CpuWindow::default(),
            memory: MemoryWindow::default(),
            pressure: PressureWindow::default(),
            lost_events: BTreeMap::new(),
            unavailable: BTreeMap::new(),
            local_scores: Vec::new(),
            predictions: Vec::new(),
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
                "graywatch_pod_tcp_data_segments_sent_total{{cgroup=\"/kubepods/stays\",namespace=\"\",pod=\"\"}} {}",
                10 * (WORKLOAD_SERIES_TTL_WINDOWS + 1)
            )),
            "{text}"
        );
    }

    #[test]
    fn anomaly_onsets_are_counted_per_family_and_scores_without_a_value_are_removed() {
        use crate::{scoring::LocalFamilyScore, summary::AnomalyOnset};
        let metrics = Metrics::new();
        let window = |latency: Option<f64>, onset: bool| {
            vec![
                LocalFamilyScore {
                    family: graywatch_proto::Family::NetworkLatency,
                    score: latency,
                    reason: "rtt".into(),
                    onset: onset.then(|| AnomalyOnset {
                        score: 0.9,
                        reason: "rtt".into(),
                    }),
                },
                LocalFamilyScore {
                    family: graywatch_proto::Family::MemoryPressure,
                    score: Some(0.1),
                    reason: "psi".into(),
                    onset: None,
                },
            ]
        };
        metrics.observe_scores(&window(Some(0.9), true));
        metrics.observe_scores(&window(Some(0.9), false));
        metrics.observe_scores(&window(Some(0.2), true));
        let text = metrics.encode().expect("encode");
        assert!(
            text.contains("graywatch_anomaly_onsets_total{family=\"NetworkLatency\"} 2"),
            "{text}"
        );
        assert!(
            !text.contains("graywatch_anomaly_onsets_total{family=\"MemoryPressure\"}"),
            "{text}"
        );
        metrics.observe_scores(&window(None, false));
        let text = metrics.encode().expect("encode");
        assert!(
            !text.contains("graywatch_local_score{family=\"NetworkLatency\"}"),
            "{text}"
        );
        assert!(
            text.contains("graywatch_local_score{family=\"MemoryPressure\"} 0.1"),
            "{text}"
        );
    }

    #[test]
    fn drop_keys_are_shown_by_place_only_when_drops_are_read() {
        let metrics = Metrics::new();
        metrics.observe(&window(&["p"]));
        let text = metrics.encode().expect("encode");
        assert!(
            !text.contains("graywatch_drop_keys{"),
            "no drop reader, no series: {text}"
        );
        let mut with_drops = window(&["p"]);
        with_drops.network.drop_places = Some(PlaceCounts { slot: 3, hash: 1 });
        metrics.observe(&with_drops);
        let text = metrics.encode().expect("encode");
        assert!(text.contains("graywatch_drop_keys{place=\"slot\"} 3"), "{text}");
        assert!(text.contains("graywatch_drop_keys{place=\"hash\"} 1"), "{text}");
    }

    #[test]
    fn metrics_carry_every_family_and_skip_what_is_missing() {
        let mut registry = Registry::default();
        let metrics = HostMetrics::register(&mut registry);
        let workload = Workload {
            cgroup_id: 7,
            cgroup_path: Some("/pod".into()),
            pod: None,
        };
        let cpu = CpuWindow {
            steal: Some(StealWindow {
                node_pct: 2.0,
                node_seconds: 0.1,
                per_cpu_pct: vec![(0, 4.0)],
            }),
            run_queue: vec![WorkloadRunq {
                workload: workload.clone(),
                latency: RunqWindow {
                    cgroup_id: 7,
                    samples: 10,
                    mean_us: 50.0,
                    p50_us: 40.0,
                    p99_us: 90_000.0,
                    total_wait_ms: 0.5,
                },
            }],
            run_queue_places: Some(PlaceCounts { slot: 5, hash: 1 }),
        };
        let memory = MemoryWindow {
            reclaim: Vec::new(),
            oom_kills: vec![WorkloadOomKill {
                workload,
                kill: OomKill {
                    cgroup_id: 7,
                    cgroup_v2_id: 7,
                    pid: 1,
                    tgid: 1,
                    comm: "tail".into(),
                    timestamp_ns: 0,
                },
            }],
        };
        let psi = Psi {
            some: PsiLine {
                avg10: 12.5,
                ..PsiLine::default()
            },
            full: None,
        };
        let pressure = PressureWindow {
            node: NodePsi {
                memory: Some(PsiWindow {
                    now: psi,
                    some_pct: Some(10.0),
                    full_pct: None,
                }),
                cpu: None,
                io: None,
            },
            cgroups: Vec::new(),
        };
        metrics.observe(&cpu, &memory, &pressure);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("node_cpu_steal_ratio 0.02"), "{text}");
        assert!(text.contains("runqueue_cgroups{place=\"hash\"} 1"), "{text}");
        assert!(
            text.contains("pod_runqueue_latency_p99_seconds{cgroup=\"/pod\",namespace=\"\",pod=\"\"} 0.09"),
            "{text}"
        );
        assert!(
            text.contains("oom_kills_total{cgroup=\"/pod\",namespace=\"\",pod=\"\",comm=\"tail\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("node_pressure_avg10_ratio{resource=\"memory\",kind=\"some\"} 0.125"),
            "{text}"
        );
        // No cpu/io PSI on this "kernel" and no full line: no series rather than zeros.
        assert!(!text.contains("resource=\"cpu\""), "{text}");
        assert!(!text.contains("kind=\"full\""), "{text}");
    }
}
