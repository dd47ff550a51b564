//! Glue for the CPU and memory families: resolves the kernel programs' globals before load,
//! owns the collectors (CPU steal, node PSI, per-cgroup stats, run-queue and memory maps) and
//! builds their part of the window summary, attributed to workloads.

use std::path::PathBuf;

use aya::maps::{HashMap as BpfHashMap, RingBuf};
use graywatch_common::{CGROUP_V2, ReclaimEndFields, TaskOffsets};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::Serialize;
use tracing::warn;

use super::{
    cgroup_stats::{CgroupLayout, CgroupStatsCollector, CgroupWindow},
    cpu_contention::{self, RunqReader, RunqWindow, choose_hierarchies, parse_proc_cgroups},
    cpu_steal::{CpuStealCollector, StealWindow},
    memory_pressure::{self, MemoryPressureReader, OomKill, ReclaimWindow},
    psi::{NodePsi, NodePsiCollector, Resource},
};
use crate::{
    ebpf::{EbpfError, KernelPrograms, typed_map},
    kernel_layout::KernelLayout,
    metrics::WorkloadLabels,
    summary::Workload,
    tracefs::Tracefs,
};

/// Host paths, overridable for a DaemonSet that mounts the host's /proc and /sys elsewhere
/// (`PROCFS_ROOT`, `SYSFS_ROOT`, as node exporters do).
#[derive(Debug, Clone)]
pub struct HostPaths {
    pub procfs: PathBuf,
    pub sysfs: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            procfs: "/proc".into(),
            sysfs: "/sys".into(),
        }
    }
}

impl HostPaths {
    pub fn from_env() -> Self {
        let var =
            |name: &str, default: &str| std::env::var_os(name).map_or_else(|| PathBuf::from(default), PathBuf::from);
        Self {
            procfs: var("PROCFS_ROOT", "/proc"),
            sysfs: var("SYSFS_ROOT", "/sys"),
        }
    }

    pub fn cgroup_root(&self) -> PathBuf {
        self.sysfs.join("fs/cgroup")
    }
}

/// Values of the CPU/memory programs' globals, resolved before load.
#[derive(Debug, Clone, Copy)]
pub struct HostGlobals {
    pub task_offsets: TaskOffsets,
    pub reclaim_end: ReclaimEndFields,
    pub oom_arg_is_task: u32,
}

impl HostGlobals {
    /// Resolves the globals. `Err` (with why) means the CPU/memory programs cannot run on this
    /// kernel; the caller then loads them with defaults and does not attach them.
    pub fn resolve(layout: &KernelLayout, tracefs: &Tracefs, paths: &HostPaths) -> Result<Self, String> {
        let cgroup_layout = CgroupLayout::detect(&paths.cgroup_root());
        let proc_cgroups_path = paths.procfs.join("cgroups");
        let subsystems = match std::fs::read_to_string(&proc_cgroups_path) {
            Ok(text) => {
                parse_proc_cgroups(&text, &proc_cgroups_path.display().to_string()).map_err(|e| e.to_string())?
            }
            Err(e) => return Err(format!("reading {}: {e}", proc_cgroups_path.display())),
        };
        // GRAYWATCH_CGROUP_ATTRIBUTION=v1 keys CPU/memory by the v1 controllers' cgroups even
        // when a v2 hierarchy exists (a hybrid host whose pods live only in v1).
        let force_v1 = std::env::var("GRAYWATCH_CGROUP_ATTRIBUTION").is_ok_and(|v| v == "v1");
        let (cpu, memory) = choose_hierarchies(cgroup_layout.v2_root().is_some() && !force_v1, &subsystems);
        let task_offsets = cpu_contention::task_offsets(layout, cpu, memory).map_err(|e| e.to_string())?;
        let reclaim_end = tracefs
            .event("vmscan", "mm_vmscan_direct_reclaim_end")
            .and_then(|f| f.field("nr_reclaimed"))
            .map(|f| ReclaimEndFields {
                nr_reclaimed: f.offset,
                _pad: 0,
            })
            .map_err(|e| e.to_string())?;
        let oom_arg_is_task = tracefs
            .event("oom", "mark_victim")
            .map(|f| u32::from(memory_pressure::oom_arg_is_task(&f)))
            .map_err(|e| e.to_string())?;
        Ok(Self {
            task_offsets,
            reclaim_end,
            oom_arg_is_task,
        })
    }

    /// Placeholder values when resolution failed (the programs are then not attached).
    pub fn unresolved() -> Self {
        Self {
            task_offsets: TaskOffsets {
                cpu_hierarchy: CGROUP_V2,
                memory_hierarchy: CGROUP_V2,
                ..TaskOffsets::default()
            },
            reclaim_end: ReclaimEndFields {
                nr_reclaimed: 8,
                _pad: 0,
            },
            oom_arg_is_task: 1,
        }
    }
}

/// A raw tracepoint (`None` category) or classic tracepoint of these families.
pub struct HostProgram {
    pub program: &'static str,
    pub category: Option<&'static str>,
    pub event: &'static str,
    /// The `signal_available` label this program feeds.
    pub signal: &'static str,
}

pub const HOST_PROGRAMS: &[HostProgram] = &[
    HostProgram {
        program: "sched_wakeup",
        category: None,
        event: "sched_wakeup",
        signal: "run_queue",
    },
    HostProgram {
        program: "sched_wakeup_new",
        category: None,
        event: "sched_wakeup_new",
        signal: "run_queue",
    },
    HostProgram {
        program: "sched_switch",
        category: None,
        event: "sched_switch",
        signal: "run_queue",
    },
    HostProgram {
        program: "direct_reclaim_begin",
        category: Some("vmscan"),
        event: "mm_vmscan_direct_reclaim_begin",
        signal: "reclaim",
    },
    HostProgram {
        program: "direct_reclaim_end",
        category: Some("vmscan"),
        event: "mm_vmscan_direct_reclaim_end",
        signal: "reclaim",
    },
    HostProgram {
        program: "memcg_reclaim_begin",
        category: Some("vmscan"),
        event: "mm_vmscan_memcg_reclaim_begin",
        signal: "reclaim",
    },
    HostProgram {
        program: "memcg_reclaim_end",
        category: Some("vmscan"),
        event: "mm_vmscan_memcg_reclaim_end",
        signal: "reclaim",
    },
    HostProgram {
        program: "mark_victim",
        category: None,
        event: "mark_victim",
        signal: "oom_kill",
    },
];

/// CPU figures of one window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuWindow {
    /// `None` on the first window or when the kernel has no steal column.
    pub steal: Option<StealWindow>,
    pub run_queue: Vec<WorkloadRunq>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadRunq {
    pub workload: Workload,
    #[serde(flatten)]
    pub latency: RunqWindow,
}

/// Memory figures of one window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryWindow {
    pub reclaim: Vec<WorkloadReclaim>,
    pub oom_kills: Vec<WorkloadOomKill>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadReclaim {
    pub workload: Workload,
    #[serde(flatten)]
    pub stalls: ReclaimWindow,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadOomKill {
    pub workload: Workload,
    #[serde(flatten)]
    pub kill: OomKill,
}

/// Pressure stall information: the node's and each watched/pod cgroup's (with its OOM/high
/// events and CPU throttling).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PressureWindow {
    pub node: NodePsi,
    pub cgroups: Vec<CgroupWindow>,
}

/// Owns the CPU/memory collectors. Blocking: call from `spawn_blocking`/`block_in_place`.
pub struct HostSignals {
    steal: CpuStealCollector,
    node_psi: NodePsiCollector,
    cgroups: CgroupStatsCollector,
    runq: Option<RunqReader>,
    memory: Option<MemoryPressureReader>,
    steal_error_logged: bool,
}

impl std::fmt::Debug for HostSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSignals").finish_non_exhaustive()
    }
}

impl HostSignals {
    /// Takes the maps of whichever CPU/memory programs are attached and takes the baseline.
    pub fn new(paths: &HostPaths, programs: &mut KernelPrograms) -> Result<Self, EbpfError> {
        let runq = if programs.is_attached("sched_switch") {
            Some(RunqReader::new(typed_map::<BpfHashMap<_, _, _>>(
                programs.take_map(cpu_contention::RUNQ_MAP)?,
                cpu_contention::RUNQ_MAP,
            )?))
        } else {
            None
        };
        let memory = if programs.is_attached("memcg_reclaim_end") && programs.is_attached("mark_victim") {
            Some(MemoryPressureReader::new(
                typed_map::<BpfHashMap<_, _, _>>(
                    programs.take_map(memory_pressure::RECLAIM_MAP)?,
                    memory_pressure::RECLAIM_MAP,
                )?,
                typed_map::<BpfHashMap<_, _, _>>(
                    programs.take_map(memory_pressure::OOM_KILLS_MAP)?,
                    memory_pressure::OOM_KILLS_MAP,
                )?,
                typed_map::<RingBuf<_>>(
                    programs.take_map(memory_pressure::OOM_EVENTS_MAP)?,
                    memory_pressure::OOM_EVENTS_MAP,
                )?,
            ))
        } else {
            None
        };
        let mut signals = Self {
            steal: CpuStealCollector::new(&paths.procfs),
            node_psi: NodePsiCollector::new(&paths.procfs),
            cgroups: CgroupStatsCollector::new(&paths.cgroup_root()),
            runq,
            memory,
            steal_error_logged: false,
        };
        if let Ok(extra) = std::env::var("GRAYWATCH_WATCH_CGROUPS") {
            for rel in extra.split(',').filter(|s| !s.is_empty()) {
                signals.cgroups.watch(rel.trim());
            }
        }
        // Cumulative counters: the first reading is window one's baseline.
        signals.collect(|cgroup_id| Workload {
            cgroup_id,
            cgroup_path: None,
            pod: None,
        });
        Ok(signals)
    }

    /// Also report the cgroup at `rel` (relative to each hierarchy root) in `pressure.cgroups`.
    /// The kernel memory maps' reader, when those programs are loaded (tests, diagnostics).
    pub fn memory_reader_mut(&mut self) -> Option<&mut MemoryPressureReader> {
        self.memory.as_mut()
    }

    pub fn watch_cgroup(&mut self, rel: &str) {
        self.cgroups.watch(rel);
    }

    /// (signal, available) for `signal_available`.
    pub fn availability(&self) -> Vec<(&'static str, bool)> {
        vec![
            ("cpu_steal", self.steal.available().unwrap_or(true)),
            ("run_queue", self.runq.is_some()),
            ("reclaim", self.memory.is_some()),
            ("oom_kill", self.memory.is_some()),
            ("psi_memory", self.node_psi.available(Resource::Memory)),
            ("psi_cpu", self.node_psi.available(Resource::Cpu)),
            ("psi_io", self.node_psi.available(Resource::Io)),
            ("cgroup_pressure", self.cgroups.pressure_available()),
        ]
    }

    /// Why `signal` (a label of [`HostSignals::availability`]) is missing, for the summary.
    pub fn why_unavailable(signal: &str) -> &'static str {
        match signal {
            "cpu_steal" => "no steal column in /proc/stat",
            "psi_memory" | "psi_cpu" | "psi_io" => {
                "no /proc/pressure file (kernel < 4.20, CONFIG_PSI off, or booted with psi=0)"
            }
            "cgroup_pressure" => "no cgroup v2 hierarchy (PSI has no cgroup v1 interface)",
            _ => "kernel programs for this signal are not attached",
        }
    }

    /// The CPU, memory and pressure parts of a window; `workload` attributes cgroup ids.
    pub fn collect(&mut self, mut workload: impl FnMut(u64) -> Workload) -> (CpuWindow, MemoryWindow, PressureWindow) {
        let mut cpu = CpuWindow::default();
        match self.steal.collect() {
            Ok(steal) => cpu.steal = steal,
            Err(error) if !self.steal_error_logged => {
                self.steal_error_logged = true;
                warn!(%error, "CPU steal unavailable");
            }
            Err(_) => {}
        }
        if let Some(runq) = &mut self.runq {
            match runq.collect() {
                Ok(windows) => {
                    cpu.run_queue = windows
                        .into_iter()
                        .map(|latency| WorkloadRunq {
                            workload: workload(latency.cgroup_id),
                            latency,
                        })
                        .collect();
                }
                Err(error) => warn!(%error, "reading the run-queue map failed"),
            }
        }
        let mut memory = MemoryWindow::default();
        if let Some(reader) = &mut self.memory {
            match reader.collect() {
                Ok(window) => {
                    memory.reclaim = window
                        .reclaim
                        .into_iter()
                        .map(|stalls| WorkloadReclaim {
                            workload: workload(stalls.cgroup_id),
                            stalls,
                        })
                        .collect();
                    memory.oom_kills = window
                        .oom_kills
                        .into_iter()
                        .map(|kill| WorkloadOomKill {
                            workload: workload(kill.cgroup_id),
                            kill,
                        })
                        .collect();
                }
                Err(error) => warn!(%error, "reading the memory maps failed"),
            }
        }
        let pressure = PressureWindow {
            node: self.node_psi.collect(),
            cgroups: self.cgroups.collect(),
        };
        (cpu, memory, pressure)
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

type GaugeF64 = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Prometheus metrics of the CPU/memory families.
#[derive(Debug, Default)]
pub struct HostMetrics {
    steal_ratio: GaugeF64,
    steal_ratio_per_cpu: Family<CpuLabels, GaugeF64>,
    runq_p50: Family<WorkloadLabels, GaugeF64>,
    runq_p99: Family<WorkloadLabels, GaugeF64>,
    runq_wait: Family<WorkloadLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    reclaim_events: Family<WorkloadLabels, Counter>,
    reclaim_stall: Family<WorkloadLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    oom_kills: Family<OomLabels, Counter>,
    node_psi_avg10: Family<ResourceLabels, GaugeF64>,
    node_psi_window: Family<ResourceLabels, GaugeF64>,
    cgroup_psi_avg10: Family<CgroupResourceLabels, GaugeF64>,
    cgroup_oom_kills: Family<CgroupLabels, Counter>,
    cgroup_high_events: Family<CgroupLabels, Counter>,
    cgroup_throttled: Family<CgroupLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Per-workload and per-cgroup series expire when their pod is gone (see metrics.rs).
    workload_series: crate::metrics::SeriesExpiry<WorkloadLabels>,
    oom_series: crate::metrics::SeriesExpiry<OomLabels>,
    cgroup_series: crate::metrics::SeriesExpiry<CgroupLabels>,
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

    pub fn observe(&self, cpu: &CpuWindow, memory: &MemoryWindow, pressure: &PressureWindow) {
        if let Some(steal) = &cpu.steal {
            self.steal_ratio.set(steal.node_pct / 100.0);
            for (id, pct) in &steal.per_cpu_pct {
                self.steal_ratio_per_cpu
                    .get_or_create(&CpuLabels { cpu: id.to_string() })
                    .set(pct / 100.0);
            }
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
        let ttl = crate::metrics::WORKLOAD_SERIES_TTL_WINDOWS;
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
    use super::*;
    use crate::signals::psi::{Psi, PsiLine, PsiWindow};

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
