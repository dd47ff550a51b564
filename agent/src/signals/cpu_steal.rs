//! CPU steal: time the hypervisor ran something else while this guest's vCPU wanted to run,
//! from the `cpu`/`cpuN` lines of `/proc/stat`, as a percentage of wall time per window, for the
//! node and for each CPU.
//!
//! Wall time of a CPU over a window is the sum of all its state columns (guest time is already
//! inside `user`/`nice`, so `guest`/`guest_nice` are not added again). Using that sum rather than
//! the clock keeps the figure exact even when a collection runs late.

use std::{
    io,
    path::{Path, PathBuf},
};

use crate::summary::StealWindow;

#[derive(Debug, thiserror::Error)]
pub enum StatError {
    #[error("{file}:{line}: {reason}")]
    Malformed { file: String, line: usize, reason: String },
    #[error("{file}: no aggregate `cpu` line")]
    NoCpuLine { file: String },
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Cumulative time of one CPU (or the node) in clock ticks (`USER_HZ`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Sum of user, nice, system, idle, iowait, irq, softirq, steal: the CPU's wall time.
    pub total: u64,
    /// `None` on kernels whose /proc/stat has no steal column (< 2.6.11).
    pub steal: Option<u64>,
}

/// The CPU lines of one `/proc/stat` reading.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatSnapshot {
    pub node: CpuTimes,
    /// (cpu index, times), in file order. Offline CPUs are absent from the file.
    pub cpus: Vec<(u32, CpuTimes)>,
}

/// Parses `/proc/stat` text; only `cpu` lines are looked at. `file` labels errors.
pub fn parse_proc_stat(text: &str, file: &str) -> Result<StatSnapshot, StatError> {
    let mut node = None;
    let mut cpus = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        let malformed = |reason: String| StatError::Malformed {
            file: file.to_owned(),
            line: index + 1,
            reason,
        };
        let mut words = rest.split_ascii_whitespace();
        // `cpu  1 2 ...` (aggregate) has whitespace right after the prefix; `cpu3 ...` a number.
        let cpu = if rest.starts_with(|c: char| c.is_ascii_whitespace()) {
            None
        } else {
            let id = words.next().unwrap_or_default();
            Some(id.parse::<u32>().map_err(|_| malformed(format!("bad cpu id {id:?}")))?)
        };
        let mut values = [0u64; 8];
        let mut count = 0;
        for word in words {
            let value = word
                .parse::<u64>()
                .map_err(|_| malformed(format!("bad counter {word:?}")))?;
            if count < values.len() {
                values[count] = value;
            }
            count += 1;
        }
        if count < 4 {
            return Err(malformed(format!("expected at least 4 counters, got {count}")));
        }
        let used = count.min(8);
        let total = values[..used]
            .iter()
            .try_fold(0u64, |acc, v| acc.checked_add(*v))
            .ok_or_else(|| malformed("counter sum overflows".to_owned()))?;
        let times = CpuTimes {
            total,
            steal: (count >= 8).then_some(values[7]),
        };
        match cpu {
            None if node.is_some() => {
                return Err(malformed("duplicate aggregate cpu line".to_owned()));
            }
            None => node = Some(times),
            Some(id) => cpus.push((id, times)),
        }
    }
    let node = node.ok_or_else(|| StatError::NoCpuLine { file: file.to_owned() })?;
    Ok(StatSnapshot { node, cpus })
}

/// Steal % between two readings; `None` when the kernel has no steal column or no time passed.
pub fn steal_window(prev: &StatSnapshot, now: &StatSnapshot, ticks_per_second: u64) -> Option<StealWindow> {
    let pct = |a: &CpuTimes, b: &CpuTimes| -> Option<f64> {
        let steal = b.steal?.checked_sub(a.steal?)?;
        let total = b.total.checked_sub(a.total)?;
        (total > 0).then(|| (steal as f64 / total as f64 * 100.0).min(100.0))
    };
    let node_pct = pct(&prev.node, &now.node)?;
    let steal_ticks = now.node.steal?.saturating_sub(prev.node.steal?);
    let per_cpu_pct = now
        .cpus
        .iter()
        .filter_map(|(id, b)| {
            let (_, a) = prev.cpus.iter().find(|(pid, _)| pid == id)?;
            Some((*id, pct(a, b)?))
        })
        .collect();
    Some(StealWindow {
        node_pct,
        node_seconds: steal_ticks as f64 / ticks_per_second.max(1) as f64,
        per_cpu_pct,
    })
}

/// Reads `<procfs>/stat` once per window. Blocking: call from `spawn_blocking`.
#[derive(Debug)]
pub struct CpuStealCollector {
    path: PathBuf,
    ticks_per_second: u64,
    last: Option<StatSnapshot>,
    logged_missing: bool,
}

impl CpuStealCollector {
    pub fn new(procfs_root: &Path) -> Self {
        Self {
            path: procfs_root.join("stat"),
            // USER_HZ; the procfs crate asks sysconf(_SC_CLK_TCK).
            ticks_per_second: procfs::ticks_per_second(),
            last: None,
            logged_missing: false,
        }
    }

    /// The steal of the window since the previous call; `Ok(None)` on the first call and on
    /// kernels without a steal column (logged once).
    pub fn collect(&mut self) -> Result<Option<StealWindow>, StatError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| StatError::Io {
            path: self.path.clone(),
            source,
        })?;
        let now = parse_proc_stat(&text, &self.path.display().to_string())?;
        if now.node.steal.is_none() && !self.logged_missing {
            self.logged_missing = true;
            tracing::warn!(path = %self.path.display(), "no steal column in /proc/stat; CPU steal disabled");
        }
        let window = self
            .last
            .as_ref()
            .and_then(|prev| steal_window(prev, &now, self.ticks_per_second));
        self.last = Some(now);
        Ok(window)
    }

    /// Whether this kernel reports steal at all (unknown before the first collection).
    pub fn available(&self) -> Option<bool> {
        self.last.as_ref().map(|s| s.node.steal.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = include_str!("../../tests/fixtures/proc/stat");
    const STAT_OLD: &str = include_str!("../../tests/fixtures/proc/stat-2.6.9");

    #[test]
    fn parses_captured_stat() {
        let s = parse_proc_stat(STAT, "/proc/stat").expect("fixture parses");
        assert_eq!(s.node.steal, Some(14));
        assert_eq!(s.node.total, 31_516 + 2389 + 5874 + 158_728 + 571 + 73 + 14);
        assert_eq!(s.cpus.len(), 2);
        assert_eq!(
            s.cpus[1],
            (
                1,
                CpuTimes {
                    total: 16168 + 1353 + 3202 + 78291 + 501 + 61 + 8,
                    steal: Some(8)
                }
            )
        );
    }

    #[test]
    fn old_kernel_without_steal_gives_no_figure() {
        let s = parse_proc_stat(STAT_OLD, "stat").expect("fixture parses");
        assert_eq!(s.node.steal, None);
        assert!(steal_window(&s, &s, 100).is_none());
    }

    #[test]
    fn steal_percentage_per_window() {
        let snap = |total, steal| StatSnapshot {
            node: CpuTimes {
                total,
                steal: Some(steal),
            },
            cpus: vec![(
                0,
                CpuTimes {
                    total,
                    steal: Some(steal),
                },
            )],
        };
        let w = steal_window(&snap(1000, 10), &snap(1200, 60), 100).expect("window");
        assert!((w.node_pct - 25.0).abs() < 1e-9);
        assert!((w.node_seconds - 0.5).abs() < 1e-9);
        assert_eq!(w.per_cpu_pct, vec![(0, 25.0)]);
        assert!(
            steal_window(&snap(1000, 10), &snap(1000, 10), 100).is_none(),
            "no time passed: no figure"
        );
    }

    #[test]
    fn malformed_lines_are_errors_with_line_numbers() {
        let cases = [
            ("cpu  1 2 3 4 5 6 7 8\ncpux 1 2 3 4\n", 2, "bad cpu id"),
            ("cpu  1 2 3 4 5 6 7 8\ncpu0 1 2 x 4\n", 2, "bad counter"),
            ("cpu  1 2\n", 1, "at least 4"),
            ("cpu  1 2 3 4\ncpu  1 2 3 4\n", 2, "duplicate"),
            ("cpu  18446744073709551615 1 1 1\n", 1, "overflows"),
        ];
        for (text, line, reason) in cases {
            match parse_proc_stat(text, "/proc/stat") {
                Err(StatError::Malformed { line: l, reason: r, .. }) => {
                    assert_eq!(l, line, "{text:?}");
                    assert!(r.contains(reason), "{r}");
                }
                other => panic!("{text:?} gave {other:?}"),
            }
        }
        assert!(matches!(
            parse_proc_stat("intr 1 2\n", "f"),
            Err(StatError::NoCpuLine { .. })
        ));
    }

    #[test]
    fn collects_from_real_proc() {
        let mut c = CpuStealCollector::new(Path::new("/proc"));
        assert!(c.collect().expect("first read").is_none(), "first window has no figure");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let w = c.collect().expect("second read");
        if let Some(w) = w {
            assert!((0.0..=100.0).contains(&w.node_pct));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn never_panics_on_arbitrary_text(text in "(cpu[0-9a-z ]{0,4}[0-9 \\-x]{0,60}\n){0,4}\\PC{0,40}") {
            let _ = parse_proc_stat(&text, "fuzz");
        }

        #[test]
        fn steal_never_exceeds_bounds(a in proptest::collection::vec(0u64..1u64 << 40, 8), b in proptest::collection::vec(0u64..1u64 << 40, 8)) {
            let line = |v: &[u64]| format!("cpu  {}\ncpu0 {}\n", v.iter().map(u64::to_string).collect::<Vec<_>>().join(" "), v.iter().map(u64::to_string).collect::<Vec<_>>().join(" "));
            let p = parse_proc_stat(&line(&a), "a").expect("valid");
            let n = parse_proc_stat(&line(&b), "b").expect("valid");
            if let Some(w) = steal_window(&p, &n, 100) {
                proptest::prop_assert!((0.0..=100.0).contains(&w.node_pct));
            }
        }
    }
}
