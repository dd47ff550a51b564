//! Per-pod cgroup statistics in every layout the field has: pure cgroup v2 (EKS AL2023), pure v1
//! (older AMIs) and hybrid (v1 controllers under `<root>/<controller>`, a controller-less v2 at
//! `<root>/unified` that still carries PSI files, as on the dev/CI machine).
//!
//! Read per cgroup: `memory.pressure` / `cpu.pressure` (v2 only: PSI has no v1 interface),
//! OOM and `high` events (v2 `memory.events`, v1 `memory.oom_control`) and CFS throttling
//! (`cpu.stat`: v2 `throttled_usec`, v1 `throttled_time` in ns), and the memory working set
//! against the limit (v2 `memory.current` − `inactive_file` of `memory.stat`, limit
//! `memory.max`; v1 `memory.usage_in_bytes` − `total_inactive_file`, limit
//! `memory.limit_in_bytes`), which feeds the predicted-failure forecast. A source the layout
//! lacks is `None`; nothing is ever reported as a zero it did not read.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Serialize;

use super::psi::{PsiError, is_unavailable, parse_psi, window};
use crate::{
    cgroups::{CgroupLayout, find_pod_cgroups, parse_pod_cgroup},
    summary::{CgroupWindow, Psi},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupFileError {
    #[error("{file}:{line}: {reason}")]
    Malformed { file: String, line: usize, reason: String },
    #[error("{file}: missing key {key:?}")]
    MissingKey { file: String, key: &'static str },
    #[error(transparent)]
    Psi(#[from] PsiError),
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Parses a cgroup "flat keyed" file (`key value` per line: memory.events, cpu.stat,
/// `memory.oom_control`). Borrowed keys, in file order.
pub fn parse_flat_keyed<'a>(text: &'a str, file: &str) -> Result<Vec<(&'a str, u64)>, CgroupFileError> {
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let malformed = |reason: String| CgroupFileError::Malformed {
            file: file.to_owned(),
            line: index + 1,
            reason,
        };
        let mut words = line.split_ascii_whitespace();
        let (Some(key), Some(value), None) = (words.next(), words.next(), words.next()) else {
            return Err(malformed(format!("expected `key value`, got {line:?}")));
        };
        let value = value
            .parse::<u64>()
            .map_err(|_| malformed(format!("bad number {value:?} for {key}")))?;
        out.push((key, value));
    }
    Ok(out)
}

fn key(pairs: &[(&str, u64)], name: &str) -> Option<u64> {
    pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
}

/// OOM and limit events of one memory cgroup (cumulative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemoryEvents {
    /// Processes killed by the OOM killer in this cgroup (and, on v2, its descendants).
    pub oom_kill: u64,
    /// Times the cgroup hit its limit and the OOM killer was invoked (v2 `oom`; v1 lacks it).
    pub oom: Option<u64>,
    /// Times usage went over `memory.high` and was throttled (v2 only).
    pub high: Option<u64>,
    /// Times usage hit `memory.max` (v2 only).
    pub max: Option<u64>,
}

/// v2 `memory.events`.
pub fn parse_memory_events(text: &str, file: &str) -> Result<MemoryEvents, CgroupFileError> {
    let pairs = parse_flat_keyed(text, file)?;
    Ok(MemoryEvents {
        oom_kill: key(&pairs, "oom_kill").ok_or(CgroupFileError::MissingKey {
            file: file.to_owned(),
            key: "oom_kill",
        })?,
        oom: key(&pairs, "oom"),
        high: key(&pairs, "high"),
        max: key(&pairs, "max"),
    })
}

/// v1 `memory.oom_control` (`oom_kill` exists since 4.13).
pub fn parse_oom_control(text: &str, file: &str) -> Result<MemoryEvents, CgroupFileError> {
    let pairs = parse_flat_keyed(text, file)?;
    Ok(MemoryEvents {
        oom_kill: key(&pairs, "oom_kill").ok_or(CgroupFileError::MissingKey {
            file: file.to_owned(),
            key: "oom_kill",
        })?,
        oom: None,
        high: None,
        max: None,
    })
}

/// CFS bandwidth throttling of one cpu cgroup (cumulative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CpuThrottle {
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_us: u64,
}

/// `cpu.stat`, either version. `Ok(None)` for a v2 cgroup without the cpu controller, whose
/// cpu.stat has usage but no throttling keys (the hybrid layout's unified hierarchy).
pub fn parse_cpu_stat(text: &str, file: &str) -> Result<Option<CpuThrottle>, CgroupFileError> {
    let pairs = parse_flat_keyed(text, file)?;
    let (Some(nr_periods), Some(nr_throttled)) = (key(&pairs, "nr_periods"), key(&pairs, "nr_throttled")) else {
        return Ok(None);
    };
    let throttled_us = match (key(&pairs, "throttled_usec"), key(&pairs, "throttled_time")) {
        (Some(us), _) => us,
        (None, Some(ns)) => ns / 1_000,
        (None, None) => {
            return Err(CgroupFileError::MissingKey {
                file: file.to_owned(),
                key: "throttled_usec",
            });
        }
    };
    Ok(Some(CpuThrottle {
        nr_periods,
        nr_throttled,
        throttled_us,
    }))
}

/// A limit at or above this many bytes is no limit: v1 writes "unlimited" as
/// `PAGE_COUNTER_MAX` × page size (9223372036854771712 on x86-64), not as a word.
const NO_LIMIT_BYTES: u64 = 1 << 60;

/// A memory cgroup's working set (what kubelet's eviction and the OOM killer care about: usage
/// less the inactive page cache the kernel can drop) and its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryUsage {
    pub working_set_bytes: u64,
    /// `None` when the cgroup has no limit (`max`, or v1's huge "unlimited").
    pub limit_bytes: Option<u64>,
}

/// A memory limit file (v2 `memory.max`, v1 `memory.limit_in_bytes`): `Ok(None)` for no limit.
pub fn parse_memory_limit(text: &str, file: &str) -> Result<Option<u64>, CgroupFileError> {
    let word = text.trim();
    if word == "max" {
        return Ok(None);
    }
    let bytes = word.parse::<u64>().map_err(|_| CgroupFileError::Malformed {
        file: file.to_owned(),
        line: 1,
        reason: format!("expected a byte count or `max`, got {word:?}"),
    })?;
    Ok((bytes < NO_LIMIT_BYTES).then_some(bytes))
}

/// The working set from a usage figure and `memory.stat`: usage less `inactive_key`
/// (`inactive_file` on v2, the hierarchical `total_inactive_file` on v1, as usage is).
pub fn working_set(
    usage_text: &str,
    stat_text: &str,
    inactive_key: &'static str,
    files: (&str, &str),
) -> Result<u64, CgroupFileError> {
    let word = usage_text.trim();
    let usage = word.parse::<u64>().map_err(|_| CgroupFileError::Malformed {
        file: files.0.to_owned(),
        line: 1,
        reason: format!("expected a byte count, got {word:?}"),
    })?;
    let inactive = key(&parse_flat_keyed(stat_text, files.1)?, inactive_key).ok_or(CgroupFileError::MissingKey {
        file: files.1.to_owned(),
        key: inactive_key,
    })?;
    Ok(usage.saturating_sub(inactive))
}

/// One reading of a cgroup. Every field is `None` when the layout/kernel does not offer it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CgroupStats {
    pub memory_pressure: Option<Psi>,
    pub cpu_pressure: Option<Psi>,
    pub memory_events: Option<MemoryEvents>,
    pub cpu_throttle: Option<CpuThrottle>,
    pub memory_usage: Option<MemoryUsage>,
}

/// Reads a memory usage triple (usage, stat, limit) in `dir`; `None` unless usage and stat are
/// both there (a missing limit file is no limit we know of: no figure either).
fn read_memory_usage(
    dir: &Path,
    [usage, stat, limit]: [&str; 3],
    inactive_key: &'static str,
) -> Result<Option<MemoryUsage>, CgroupFileError> {
    let label = |p: &Path| p.display().to_string();
    let (usage_path, stat_path, limit_path) = (dir.join(usage), dir.join(stat), dir.join(limit));
    let (Some(usage_text), Some(stat_text), Some(limit_text)) = (
        read_optional(&usage_path)?,
        read_optional(&stat_path)?,
        read_optional(&limit_path)?,
    ) else {
        return Ok(None);
    };
    Ok(Some(MemoryUsage {
        working_set_bytes: working_set(
            &usage_text,
            &stat_text,
            inactive_key,
            (&label(&usage_path), &label(&stat_path)),
        )?,
        limit_bytes: parse_memory_limit(&limit_text, &label(&limit_path))?,
    }))
}

fn read_optional(path: &Path) -> Result<Option<String>, CgroupFileError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if is_unavailable(&e) => Ok(None),
        Err(source) => Err(CgroupFileError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Reads the statistics of the cgroup at `rel` (same relative path in every hierarchy, as
/// kubelet and our test bench create them). Blocking.
pub fn read_cgroup_stats(layout: &CgroupLayout, rel: &str) -> Result<CgroupStats, CgroupFileError> {
    let rel = rel.trim_start_matches('/');
    let mut stats = CgroupStats::default();
    let label = |p: &Path| p.display().to_string();
    if let Some(v2) = layout.v2_root() {
        let dir = v2.join(rel);
        for (name, slot) in [
            ("memory.pressure", &mut stats.memory_pressure),
            ("cpu.pressure", &mut stats.cpu_pressure),
        ] {
            let path = dir.join(name);
            if let Some(text) = read_optional(&path)? {
                *slot = Some(parse_psi(&text, &label(&path))?);
            }
        }
        let path = dir.join("memory.events");
        if let Some(text) = read_optional(&path)? {
            stats.memory_events = Some(parse_memory_events(&text, &label(&path))?);
        }
        let path = dir.join("cpu.stat");
        if let Some(text) = read_optional(&path)? {
            stats.cpu_throttle = parse_cpu_stat(&text, &label(&path))?;
        }
        stats.memory_usage = read_memory_usage(&dir, ["memory.current", "memory.stat", "memory.max"], "inactive_file")?;
    }
    if stats.memory_usage.is_none()
        && let Some(memory) = layout.v1_root("memory")
    {
        stats.memory_usage = read_memory_usage(
            &memory.join(rel),
            ["memory.usage_in_bytes", "memory.stat", "memory.limit_in_bytes"],
            "total_inactive_file",
        )?;
    }
    if stats.memory_events.is_none()
        && let Some(memory) = layout.v1_root("memory")
    {
        let path = memory.join(rel).join("memory.oom_control");
        if let Some(text) = read_optional(&path)? {
            stats.memory_events = Some(parse_oom_control(&text, &label(&path))?);
        }
    }
    if stats.cpu_throttle.is_none()
        && let Some(cpu) = layout.v1_root("cpu")
    {
        let path = cpu.join(rel).join("cpu.stat");
        if let Some(text) = read_optional(&path)? {
            stats.cpu_throttle = parse_cpu_stat(&text, &label(&path))?;
        }
    }
    Ok(stats)
}

/// Turns two readings of one cgroup into a window.
pub fn cgroup_window(path: &str, prev: Option<&CgroupStats>, now: &CgroupStats, elapsed: Duration) -> CgroupWindow {
    let delta = |a: Option<u64>, b: Option<u64>| b?.checked_sub(a?);
    let prev_events = prev.and_then(|p| p.memory_events);
    let prev_throttle = prev.and_then(|p| p.cpu_throttle);
    let throttled_periods = delta(
        prev_throttle.map(|t| t.nr_throttled),
        now.cpu_throttle.map(|t| t.nr_throttled),
    );
    let periods = delta(
        prev_throttle.map(|t| t.nr_periods),
        now.cpu_throttle.map(|t| t.nr_periods),
    );
    CgroupWindow {
        path: path.to_owned(),
        pod_uid: parse_pod_cgroup(path).map(|p| p.uid),
        memory_pressure: now
            .memory_pressure
            .map(|psi| window(prev.and_then(|p| p.memory_pressure.as_ref()), psi, elapsed)),
        cpu_pressure: now
            .cpu_pressure
            .map(|psi| window(prev.and_then(|p| p.cpu_pressure.as_ref()), psi, elapsed)),
        oom_kills: delta(prev_events.map(|e| e.oom_kill), now.memory_events.map(|e| e.oom_kill)),
        memory_high_events: delta(prev_events.and_then(|e| e.high), now.memory_events.and_then(|e| e.high)),
        throttled_periods,
        throttled_pct: match (throttled_periods, periods) {
            (Some(t), Some(p)) if p > 0 => Some(t as f64 / p as f64 * 100.0),
            _ => None,
        },
        throttled_ms: delta(
            prev_throttle.map(|t| t.throttled_us),
            now.cpu_throttle.map(|t| t.throttled_us),
        )
        .map(|us| us as f64 / 1_000.0),
        memory_working_set_bytes: now.memory_usage.map(|m| m.working_set_bytes),
        memory_limit_bytes: now.memory_usage.and_then(|m| m.limit_bytes),
    }
}

/// Tracks a set of cgroups (pods found under kubepods, plus any explicitly watched path) and
/// yields one window per cgroup per call. Blocking: call from `spawn_blocking`.
#[derive(Debug)]
pub struct CgroupStatsCollector {
    layout: CgroupLayout,
    extra: Vec<String>,
    last: HashMap<String, (CgroupStats, Instant)>,
    logged_no_v2: bool,
}

impl CgroupStatsCollector {
    pub fn new(cgroup_root: &Path) -> Self {
        let layout = CgroupLayout::detect(cgroup_root);
        tracing::info!(layout = layout.mode.name(), root = %cgroup_root.display(), "cgroup layout");
        Self {
            layout,
            extra: Vec::new(),
            last: HashMap::new(),
            logged_no_v2: false,
        }
    }

    pub fn layout(&self) -> &CgroupLayout {
        &self.layout
    }

    /// Also watch `rel` (a cgroup outside kubepods, e.g. a bench cgroup or a system slice).
    pub fn watch(&mut self, rel: impl Into<String>) {
        self.extra.push(rel.into());
    }

    /// Whether per-cgroup PSI can exist at all (needs a v2 hierarchy).
    pub fn pressure_available(&self) -> bool {
        self.layout.v2_root().is_some()
    }

    pub fn collect(&mut self) -> Vec<CgroupWindow> {
        if !self.pressure_available() && !self.logged_no_v2 {
            self.logged_no_v2 = true;
            tracing::warn!("no cgroup v2 hierarchy: per-pod memory/cpu pressure unavailable");
        }
        let mut paths: Vec<String> = [
            self.layout.v2_root().map(Path::to_owned),
            self.layout.v1_root("memory"),
            self.layout.v1_root("cpu"),
        ]
        .into_iter()
        .flatten()
        .flat_map(|root| find_pod_cgroups(&root))
        .map(|p| p.path)
        .chain(self.extra.iter().cloned())
        .collect();
        paths.sort();
        paths.dedup();
        let mut out = Vec::with_capacity(paths.len());
        let mut seen = HashMap::with_capacity(paths.len());
        for path in paths {
            let now_t = Instant::now();
            match read_cgroup_stats(&self.layout, &path) {
                Ok(stats) => {
                    let prev = self.last.get(&path);
                    let elapsed = prev.map_or(Duration::ZERO, |(_, t)| now_t - *t);
                    out.push(cgroup_window(&path, prev.map(|(s, _)| s), &stats, elapsed));
                    seen.insert(path, (stats, now_t));
                }
                Err(error) => {
                    tracing::warn!(%error, cgroup = %path, "unreadable cgroup statistics");
                }
            }
        }
        // Pods that went away are forgotten: no stale deltas when a UID is reused.
        self.last = seen;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroups::CgroupMode;

    const MEMORY_EVENTS: &str = include_str!("../../tests/fixtures/cgroup/memory.events");
    const OOM_CONTROL: &str = include_str!("../../tests/fixtures/cgroup/memory.oom_control");
    const CPU_STAT_V1: &str = include_str!("../../tests/fixtures/cgroup/cpu.stat.v1");
    const CPU_STAT_V2: &str = include_str!("../../tests/fixtures/cgroup/cpu.stat.v2");
    const CPU_STAT_V2_NO_CONTROLLER: &str = include_str!("../../tests/fixtures/cgroup/cpu.stat.v2-nocontroller");

    #[test]
    fn parses_captured_files() {
        let e = parse_memory_events(MEMORY_EVENTS, "memory.events").expect("parses");
        assert_eq!(
            e,
            MemoryEvents {
                oom_kill: 2,
                oom: Some(3),
                high: Some(17),
                max: Some(40)
            }
        );
        let v1 = parse_oom_control(OOM_CONTROL, "memory.oom_control").expect("parses");
        assert_eq!((v1.oom_kill, v1.high), (1, None));
        let t1 = parse_cpu_stat(CPU_STAT_V1, "cpu.stat")
            .expect("parses")
            .expect("has throttling");
        assert_eq!(
            t1,
            CpuThrottle {
                nr_periods: 1200,
                nr_throttled: 950,
                throttled_us: 75_123_456
            }
        );
        let t2 = parse_cpu_stat(CPU_STAT_V2, "cpu.stat")
            .expect("parses")
            .expect("has throttling");
        assert_eq!(t2.throttled_us, 3_000_000);
        assert_eq!(
            parse_cpu_stat(CPU_STAT_V2_NO_CONTROLLER, "cpu.stat").expect("parses"),
            None
        );
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        for (text, line) in [
            ("oom 1\noom_kill x\n", 2),
            ("oom_kill\n", 1),
            ("a 1 2\n", 1),
            ("a -1\n", 1),
        ] {
            match parse_memory_events(text, "/sys/fs/cgroup/x/memory.events") {
                Err(CgroupFileError::Malformed { file, line: l, .. }) => {
                    assert_eq!(file, "/sys/fs/cgroup/x/memory.events");
                    assert_eq!(l, line, "{text:?}");
                }
                other => panic!("{text:?} gave {other:?}"),
            }
        }
        assert!(matches!(
            parse_memory_events("oom 1\n", "f"),
            Err(CgroupFileError::MissingKey { key: "oom_kill", .. })
        ));
        assert!(matches!(
            parse_cpu_stat("nr_periods 1\nnr_throttled 1\n", "f"),
            Err(CgroupFileError::MissingKey { .. })
        ));
    }

    #[test]
    fn detects_layouts_and_finds_pods_in_a_fake_tree() {
        let root = std::env::temp_dir().join(format!("gw-cgroup-{}", std::process::id()));
        let uid = "0b5c6f8e-2f4c-4a51-9d0e-5a1d2c3b4a59";
        let pod = root.join(format!("memory/kubepods/burstable/pod{uid}"));
        std::fs::create_dir_all(&pod).expect("tmp dir");
        std::fs::create_dir_all(root.join("cpu/kubepods")).expect("tmp dir");
        std::fs::write(pod.join("memory.oom_control"), OOM_CONTROL).expect("write");
        let layout = CgroupLayout::detect(&root);
        assert_eq!(layout.mode, CgroupMode::Legacy);
        let mut collector = CgroupStatsCollector::new(&root);
        assert!(!collector.pressure_available());
        let first = collector.collect();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].pod_uid.as_deref(), Some(uid));
        assert_eq!(first[0].oom_kills, None, "first window has no delta");
        assert_eq!(first[0].memory_pressure, None, "v1 has no PSI: none, not zero");
        std::fs::write(
            pod.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n",
        )
        .expect("write");
        let second = collector.collect();
        assert_eq!(second[0].oom_kills, Some(3));

        std::fs::create_dir_all(root.join("unified")).expect("tmp dir");
        std::fs::write(root.join("unified/cgroup.controllers"), "").expect("write");
        assert_eq!(CgroupLayout::detect(&root).mode, CgroupMode::Hybrid);
        std::fs::write(root.join("cgroup.controllers"), "cpu memory").expect("write");
        assert_eq!(CgroupLayout::detect(&root).mode, CgroupMode::Modern);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn reads_a_pure_v2_systemd_pod() {
        let root = std::env::temp_dir().join(format!("gw-cgroup2-{}", std::process::id()));
        let under = "0b5c6f8e_2f4c_4a51_9d0e_5a1d2c3b4a59";
        let pod = root.join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{under}.slice"
        ));
        std::fs::create_dir_all(pod.join("cri-containerd-abc.scope")).expect("tmp dir");
        std::fs::write(root.join("cgroup.controllers"), "cpu memory io").expect("write");
        let psi = |total: u64| {
            format!(
                "some avg10=1.00 avg60=0.50 avg300=0.10 total={total}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
            )
        };
        let write_all = |psi_total: u64, oom_kill: u64, throttled: u64, usec: u64| {
            std::fs::write(pod.join("memory.pressure"), psi(psi_total)).expect("write");
            std::fs::write(pod.join("cpu.pressure"), psi(psi_total / 2)).expect("write");
            std::fs::write(
                pod.join("memory.events"),
                format!("low 0\nhigh 5\nmax 9\noom 1\noom_kill {oom_kill}\n"),
            )
            .expect("write");
            std::fs::write(
                pod.join("cpu.stat"),
                format!(
                    "usage_usec 1\nnr_periods {}\nnr_throttled {throttled}\nthrottled_usec {usec}\n",
                    throttled * 2
                ),
            )
            .expect("write");
        };
        write_all(1_000, 0, 10, 1_000);
        let mut collector = CgroupStatsCollector::new(&root);
        assert_eq!(collector.layout().mode, CgroupMode::Modern);
        let first = collector.collect();
        assert_eq!(first.len(), 1, "{first:?}");
        assert_eq!(
            first[0].pod_uid.as_deref(),
            Some("0b5c6f8e-2f4c-4a51-9d0e-5a1d2c3b4a59")
        );
        assert_eq!(first[0].memory_pressure.map(|p| p.now.some.avg10), Some(1.0));
        write_all(501_000, 1, 20, 51_000);
        let second = collector.collect();
        assert_eq!(second[0].oom_kills, Some(1));
        assert_eq!(second[0].memory_high_events, Some(0));
        assert_eq!(second[0].throttled_periods, Some(10));
        assert_eq!(second[0].throttled_pct, Some(50.0));
        assert_eq!(second[0].throttled_ms, Some(50.0));
        assert!(
            second[0]
                .memory_pressure
                .and_then(|p| p.some_pct)
                .is_some_and(|p| p > 0.0)
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    /// Working set = usage − inactive file pages, in both layouts; `max` and v1's huge
    /// "unlimited" are no limit; a cgroup without the files has no figure (not a zero).
    #[test]
    fn reads_working_set_and_limit_in_both_layouts() {
        let root = std::env::temp_dir().join(format!("gw-cgroup-mem-{}", std::process::id()));
        let v2 = root.join("v2");
        let leak = v2.join("bench/leak");
        std::fs::create_dir_all(&leak).expect("tmp dir");
        std::fs::create_dir_all(v2.join("bench/none")).expect("tmp dir");
        std::fs::write(v2.join("cgroup.controllers"), "memory").expect("write");
        std::fs::write(leak.join("memory.current"), "300000000\n").expect("write");
        std::fs::write(
            leak.join("memory.stat"),
            "anon 1\ninactive_file 100000000\nactive_file 5\n",
        )
        .expect("write");
        std::fs::write(leak.join("memory.max"), "268435456\n").expect("write");
        let layout = CgroupLayout::detect(&v2);
        let stats = read_cgroup_stats(&layout, "/bench/leak").expect("reads");
        assert_eq!(
            stats.memory_usage,
            Some(MemoryUsage {
                working_set_bytes: 200_000_000,
                limit_bytes: Some(268_435_456)
            })
        );
        std::fs::write(leak.join("memory.max"), "max\n").expect("write");
        let unlimited = read_cgroup_stats(&layout, "bench/leak").expect("reads");
        assert_eq!(unlimited.memory_usage.and_then(|m| m.limit_bytes), None);
        let window = cgroup_window("bench/leak", None, &unlimited, Duration::ZERO);
        assert_eq!(window.memory_working_set_bytes, Some(200_000_000));
        assert_eq!(
            read_cgroup_stats(&layout, "bench/none").expect("reads").memory_usage,
            None,
            "no files: no figure"
        );

        let v1 = root.join("v1");
        let leak = v1.join("memory/bench/leak");
        std::fs::create_dir_all(&leak).expect("tmp dir");
        std::fs::write(leak.join("memory.usage_in_bytes"), "50000\n").expect("write");
        std::fs::write(leak.join("memory.stat"), "inactive_file 1\ntotal_inactive_file 20000\n").expect("write");
        std::fs::write(leak.join("memory.limit_in_bytes"), "9223372036854771712\n").expect("write");
        let layout = CgroupLayout::detect(&v1);
        assert_eq!(layout.mode, CgroupMode::Legacy);
        let usage = read_cgroup_stats(&layout, "bench/leak").expect("reads").memory_usage;
        assert_eq!(
            usage,
            Some(MemoryUsage {
                working_set_bytes: 30_000,
                limit_bytes: None
            })
        );
        std::fs::write(leak.join("memory.stat"), "cache 1\n").expect("write");
        assert!(matches!(
            read_cgroup_stats(&layout, "bench/leak"),
            Err(CgroupFileError::MissingKey {
                key: "total_inactive_file",
                ..
            })
        ));
        let _ = std::fs::remove_dir_all(&root);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn parsers_never_panic(text in "([a-z_]{0,12}( [0-9x-]{0,22}){0,3}\n){0,6}\\PC{0,30}") {
            let _ = parse_memory_events(&text, "fuzz");
            let _ = parse_oom_control(&text, "fuzz");
            let _ = parse_cpu_stat(&text, "fuzz");
            let _ = parse_memory_limit(&text, "fuzz");
            let _ = working_set(&text, &text, "total_inactive_file", ("fuzz", "fuzz"));
        }
    }
}
