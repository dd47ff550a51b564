//! Glue for the CPU and memory families: resolves the kernel programs' globals before load,
//! owns the collectors (CPU steal, node PSI, per-cgroup stats, run-queue and memory maps) and
//! builds their part of the window summary, attributed to workloads.

use aya::{
    EbpfLoader,
    maps::{HashMap as BpfHashMap, RingBuf},
};
use graywatch_common::{CGROUP_V2, ReclaimEndFields, TaskOffsets};
use tracing::warn;

use super::{
    cgroup_stats::CgroupStatsCollector,
    cpu_contention::{self, RunqReader, RunqSlots, choose_hierarchies, parse_proc_cgroups},
    cpu_steal::CpuStealCollector,
    memory_pressure::{self, MemoryPressureReader},
    psi::NodePsiCollector,
};
use crate::{
    cgroups::CgroupLayout,
    config::{CgroupAttribution, HostPaths},
    ebpf::{Attach, EbpfError, KernelPrograms, ProgramGlobals, ProgramGroup, ProgramSpec, typed_map},
    kernel_layout::KernelLayout,
    summary::{
        CpuWindow, MemoryWindow, PressureWindow, Resource, Workload, WorkloadOomKill, WorkloadReclaim, WorkloadRunq,
    },
    tracefs::Tracefs,
};

/// Values of the CPU/memory programs' globals, resolved before load.
#[derive(Debug, Clone)]
pub struct HostGlobals {
    pub task_offsets: TaskOffsets,
    pub reclaim_end: ReclaimEndFields,
    pub oom_arg_is_task: u32,
    /// Why the run-queue program cannot run on this kernel, if it cannot.
    pub run_queue_unavailable: Option<String>,
}

impl HostGlobals {
    /// Resolves the globals. `Err` (with why) means the CPU/memory programs cannot run on this
    /// kernel; the caller then loads them with defaults and does not attach them.
    pub fn resolve(
        layout: &KernelLayout,
        tracefs: &Tracefs,
        paths: &HostPaths,
        attribution: CgroupAttribution,
    ) -> Result<Self, String> {
        let cgroup_layout = CgroupLayout::detect(&paths.cgroup_root());
        let proc_cgroups_path = paths.procfs.join("cgroups");
        let subsystems = match std::fs::read_to_string(&proc_cgroups_path) {
            Ok(text) => {
                parse_proc_cgroups(&text, &proc_cgroups_path.display().to_string()).map_err(|e| e.to_string())?
            }
            Err(e) => return Err(format!("reading {}: {e}", proc_cgroups_path.display())),
        };
        let force_v1 = attribution == CgroupAttribution::V1;
        let (cpu, memory) = choose_hierarchies(cgroup_layout.v2_root().is_some() && !force_v1, &subsystems);
        let mut task_offsets = cpu_contention::task_offsets(layout, cpu, memory).map_err(|e| e.to_string())?;
        let run_queue_unavailable = match cpu_contention::run_queue_offsets(layout) {
            Ok([last_queued, cfs_rq, rq, clock]) => {
                task_offsets.task_last_queued = last_queued;
                task_offsets.task_cfs_rq = cfs_rq;
                task_offsets.cfs_rq_rq = rq;
                task_offsets.rq_clock = clock;
                None
            }
            Err(why) => Some(why),
        };
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
            run_queue_unavailable,
        })
    }

    /// The CPU/memory programs for [`KernelPrograms::load`], their globals resolved for `paths`.
    pub fn program_group(paths: &HostPaths, attribution: CgroupAttribution) -> ProgramGroup<'_, Self> {
        ProgramGroup {
            programs: HOST_PROGRAMS,
            resolve: Box::new(move |layout, tracefs| Self::resolve(layout, tracefs, paths, attribution)),
        }
    }
}

impl ProgramGlobals for HostGlobals {
    /// Placeholder values when resolution failed (the programs are then not attached).
    fn unresolved() -> Self {
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
            run_queue_unavailable: None,
        }
    }

    fn write<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        loader
            .override_global("TASK_OFFSETS", &self.task_offsets, true)
            .override_global("RECLAIM_END_FIELDS", &self.reclaim_end, true)
            .override_global("OOM_ARG_IS_TASK", &self.oom_arg_is_task, true);
    }

    fn skipped(&self) -> Vec<(&'static str, String)> {
        self.run_queue_unavailable
            .iter()
            .map(|why| ("sched_switch", why.clone()))
            .collect()
    }
}

/// The CPU/memory programs: what they attach to and the `signal_available` label each feeds.
pub const HOST_PROGRAMS: &[ProgramSpec] = &[
    ProgramSpec {
        program: "sched_switch",
        attach: Attach::Btf,
        event: "sched_switch",
        signal: "run_queue",
    },
    ProgramSpec {
        program: "direct_reclaim_begin",
        attach: Attach::Tracepoint("vmscan"),
        event: "mm_vmscan_direct_reclaim_begin",
        signal: "reclaim",
    },
    ProgramSpec {
        program: "direct_reclaim_end",
        attach: Attach::Tracepoint("vmscan"),
        event: "mm_vmscan_direct_reclaim_end",
        signal: "reclaim",
    },
    ProgramSpec {
        program: "memcg_reclaim_begin",
        attach: Attach::Tracepoint("vmscan"),
        event: "mm_vmscan_memcg_reclaim_begin",
        signal: "reclaim",
    },
    ProgramSpec {
        program: "memcg_reclaim_end",
        attach: Attach::Tracepoint("vmscan"),
        event: "mm_vmscan_memcg_reclaim_end",
        signal: "reclaim",
    },
    ProgramSpec {
        program: "mark_victim",
        attach: Attach::Raw,
        event: "mark_victim",
        signal: "oom_kill",
    },
];

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
    /// `watch`: cgroups reported besides the pods (relative to each hierarchy root).
    pub fn new(paths: &HostPaths, watch: &[String], programs: &mut KernelPrograms) -> Result<Self, EbpfError> {
        let runq = if programs.is_attached("sched_switch") {
            match RunqSlots::new(programs.take_map(cpu_contention::RUNQ_SLOTS_MAP)?) {
                Ok(slots) => Some(RunqReader::new(
                    slots,
                    typed_map::<BpfHashMap<_, _, _>>(
                        programs.take_map(cpu_contention::RUNQ_MAP)?,
                        cpu_contention::RUNQ_MAP,
                    )?,
                )),
                // The program runs but its figures cannot be read: say so, measure the rest.
                Err(error) => {
                    programs.mark_unavailable("run_queue", error.to_string());
                    None
                }
            }
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
        for rel in watch {
            signals.cgroups.watch(rel.as_str());
        }
        // Cumulative counters: the first reading is window one's baseline.
        signals.collect(|cgroup_id| Workload {
            cgroup_id,
            cgroup_path: None,
            pod: None,
        });
        Ok(signals)
    }

    /// The run-queue maps' reader, when that program is loaded (tests, diagnostics).
    pub fn runq_reader_mut(&mut self) -> Option<&mut RunqReader> {
        self.runq.as_mut()
    }

    /// The kernel memory maps' reader, when those programs are loaded (tests, diagnostics).
    pub fn memory_reader_mut(&mut self) -> Option<&mut MemoryPressureReader> {
        self.memory.as_mut()
    }

    /// Also report the cgroup at `rel` (relative to each hierarchy root) in `pressure.cgroups`.
    pub fn watch_cgroup(&mut self, rel: &str) {
        self.cgroups.watch(rel);
    }

    /// Node-level PSI from cgroup v2 directory `dir` from now on (a bench node sharing the
    /// kernel). Steal stays the kernel's: a hypervisor steals from the whole kernel, so bench
    /// nodes share it. Takes the new source's baseline reading.
    pub fn node_pressure_from_cgroup(&mut self, dir: &std::path::Path) {
        self.node_psi = NodePsiCollector::from_cgroup(dir);
        self.node_psi.collect();
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
            cpu.run_queue_places = Some(runq.place_counts());
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
