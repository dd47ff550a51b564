//! Pressure stall information (PSI): the node's `/proc/pressure/{memory,cpu,io}` and the same
//! format in cgroup v2 `memory.pressure` / `cpu.pressure` / `io.pressure`.
//!
//! A PSI file has a `some` line and (for memory and io, and cpu since 5.13) a `full` line:
//! `some avg10=0.12 avg60=0.05 avg300=0.01 total=123456` with `total` in microseconds of stall.
//! The kernel's averages are exponentially smoothed; for a per-window figure we also report the
//! delta of `total` over the window as a percentage of wall time.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::summary::{NodePsi, Psi, PsiLine, PsiWindow, Resource};

/// A malformed PSI file. Names the file and the 1-based line so an operator can look at it.
#[derive(Debug, thiserror::Error)]
pub enum PsiError {
    #[error("{file}:{line}: {reason}")]
    Malformed { file: String, line: usize, reason: String },
    #[error("{file}: no `some` line")]
    MissingSome { file: String },
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Parses a PSI file's text. `file` only labels errors.
pub fn parse_psi(text: &str, file: &str) -> Result<Psi, PsiError> {
    let mut some = None;
    let mut full = None;
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let malformed = |reason: String| PsiError::Malformed {
            file: file.to_owned(),
            line: index + 1,
            reason,
        };
        let mut words = line.split_ascii_whitespace();
        let kind = words.next().unwrap_or_default();
        let slot = match kind {
            "some" => &mut some,
            "full" => &mut full,
            other => return Err(malformed(format!("unknown line kind {other:?}"))),
        };
        if slot.is_some() {
            return Err(malformed(format!("duplicate `{kind}` line")));
        }
        let (mut avg10, mut avg60, mut avg300, mut total) = (None, None, None, None);
        for word in words {
            let (key, value) = word
                .split_once('=')
                .ok_or_else(|| malformed(format!("expected key=value, got {word:?}")))?;
            let bad_number = |()| malformed(format!("bad number in {word:?}"));
            match key {
                "avg10" => avg10 = Some(parse_avg(value).map_err(bad_number)?),
                "avg60" => avg60 = Some(parse_avg(value).map_err(bad_number)?),
                "avg300" => avg300 = Some(parse_avg(value).map_err(bad_number)?),
                "total" => {
                    total = Some(
                        value
                            .parse::<u64>()
                            .map_err(|_| malformed(format!("bad number in {word:?}")))?,
                    );
                }
                // Newer kernels may add fields; ignoring them keeps old agents working.
                _ => {}
            }
        }
        let missing = |name: &str| malformed(format!("missing {name}"));
        *slot = Some(PsiLine {
            avg10: avg10.ok_or_else(|| missing("avg10"))?,
            avg60: avg60.ok_or_else(|| missing("avg60"))?,
            avg300: avg300.ok_or_else(|| missing("avg300"))?,
            total_us: total.ok_or_else(|| missing("total"))?,
        });
    }
    let some = some.ok_or_else(|| PsiError::MissingSome { file: file.to_owned() })?;
    Ok(Psi { some, full })
}

/// An average is a percentage in [0, 100]; anything else (NaN, inf, negative) is malformed.
fn parse_avg(value: &str) -> Result<f64, ()> {
    let v: f64 = value.parse().map_err(|_| ())?;
    if v.is_finite() && (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(())
    }
}

/// Reads and parses a PSI file. `Ok(None)` when the kernel has no PSI there: the file is absent
/// (kernel < 4.20, no cgroup v2) or reading it fails with EOPNOTSUPP (booted with `psi=0`).
pub fn read_psi(path: &Path) -> Result<Option<Psi>, PsiError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_psi(&text, &path.display().to_string()).map(Some),
        Err(e) if is_unavailable(&e) => Ok(None),
        Err(source) => Err(PsiError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Errors that mean "this kernel does not offer the source", as opposed to a real failure.
pub(crate) fn is_unavailable(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
        || e.raw_os_error() == Some(libc::EOPNOTSUPP)
        || e.raw_os_error() == Some(libc::ENODEV)
}

/// Turns two successive readings into a window figure.
pub fn window(prev: Option<&Psi>, now: Psi, elapsed: Duration) -> PsiWindow {
    let elapsed_us = elapsed.as_secs_f64() * 1e6;
    let pct = |before: u64, after: u64| {
        // A counter going backwards (cgroup recreated under the same path) gives no figure.
        (elapsed_us > 0.0 && after >= before).then(|| ((after - before) as f64 / elapsed_us * 100.0).min(100.0))
    };
    let some_pct = prev.and_then(|p| pct(p.some.total_us, now.some.total_us));
    let full_pct = match (prev.and_then(|p| p.full), now.full) {
        (Some(before), Some(after)) => pct(before.total_us, after.total_us),
        _ => None,
    };
    PsiWindow {
        now,
        some_pct,
        full_pct,
    }
}

/// Node-level PSI from `<procfs>/pressure/*` (or, for a bench node sharing the kernel, from its
/// cgroup's `*.pressure`). Blocking: call from `spawn_blocking`.
#[derive(Debug)]
pub struct NodePsiCollector {
    /// The memory, cpu and io files, in [`Resource::ALL`] order.
    files: [PathBuf; 3],
    last: [Option<(Psi, std::time::Instant)>; 3],
    /// Which resources were missing at the last collection (exported as `signal_available`).
    missing: [bool; 3],
    /// Which absences were already logged: once, not every window.
    logged_missing: [bool; 3],
}

impl NodePsiCollector {
    pub fn new(procfs_root: impl Into<PathBuf>) -> Self {
        let dir = procfs_root.into().join("pressure");
        Self::with_files(Resource::ALL.map(|r| dir.join(r.file_name())))
    }

    /// The node's figures from cgroup v2 directory `dir` (`memory.pressure`, …): on a shared
    /// kernel a bench node is a cgroup, and its cgroup's PSI is what a node's kernel would say.
    pub fn from_cgroup(dir: &Path) -> Self {
        Self::with_files(Resource::ALL.map(|r| dir.join(format!("{}.pressure", r.file_name()))))
    }

    fn with_files(files: [PathBuf; 3]) -> Self {
        Self {
            files,
            last: [None, None, None],
            missing: [false; 3],
            logged_missing: [false; 3],
        }
    }

    /// Reads all three files. A malformed file is an error for that resource only (logged,
    /// reported as `None`), so one odd file never hides the others.
    pub fn collect(&mut self) -> NodePsi {
        let mut out = NodePsi::default();
        for (i, resource) in Resource::ALL.into_iter().enumerate() {
            let path = self.files[i].clone();
            let now_t = std::time::Instant::now();
            self.missing[i] = false;
            let reading = match read_psi(&path) {
                Ok(Some(psi)) => psi,
                Ok(None) => {
                    self.missing[i] = true;
                    self.last[i] = None;
                    if !self.logged_missing[i] {
                        self.logged_missing[i] = true;
                        tracing::warn!(path = %path.display(), %resource, "PSI not available on this kernel; signal disabled");
                    }
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, %resource, "unreadable PSI file");
                    continue;
                }
            };
            let prev = self.last[i].take();
            let w = window(
                prev.as_ref().map(|(p, _)| p),
                reading,
                prev.map_or(Duration::ZERO, |(_, t)| now_t - t),
            );
            self.last[i] = Some((reading, now_t));
            match resource {
                Resource::Memory => out.memory = Some(w),
                Resource::Cpu => out.cpu = Some(w),
                Resource::Io => out.io = Some(w),
            }
        }
        out
    }

    /// Whether a resource's PSI file was missing at the last collection.
    pub fn available(&self, resource: Resource) -> bool {
        let i = match resource {
            Resource::Memory => 0,
            Resource::Cpu => 1,
            Resource::Io => 2,
        };
        !self.missing[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMORY: &str = include_str!("../../tests/fixtures/psi/memory");
    const CPU_OLD: &str = include_str!("../../tests/fixtures/psi/cpu-5.4");

    #[test]
    fn parses_captured_memory_file() {
        let psi = parse_psi(MEMORY, "memory").expect("fixture parses");
        assert_eq!(
            psi.some,
            PsiLine {
                avg10: 7.45,
                avg60: 4.02,
                avg300: 2.93,
                total_us: 21_694_886
            }
        );
        assert_eq!(psi.full.map(|f| f.total_us), Some(4_390_135));
    }

    #[test]
    fn node_figures_from_a_cgroup_directory() {
        let dir = std::env::temp_dir().join(format!("graywatch-psi-cgroup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("memory.pressure"), MEMORY).expect("write");
        let mut collector = NodePsiCollector::from_cgroup(&dir);
        let first = collector.collect();
        // The cgroup's memory file is read; cpu and io are missing there, so unavailable.
        assert_eq!(first.memory.map(|m| m.now.some.total_us), Some(21_694_886));
        assert!(collector.available(Resource::Memory));
        assert!(first.cpu.is_none() && !collector.available(Resource::Cpu));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn cpu_without_full_line_is_fine() {
        let psi = parse_psi(CPU_OLD, "cpu").expect("fixture parses");
        assert!(psi.full.is_none());
        assert_eq!(psi.some.total_us, 1_000_000);
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let cases = [
            (
                "some avg10=0.00 avg60=0.00 avg300=0.00 total=12\nfull avg10=x avg60=0 avg300=0 total=1\n",
                2,
                "bad number",
            ),
            ("some avg10=0.00 avg60=0.00 total=12\n", 1, "missing avg300"),
            ("weird avg10=0.00\n", 1, "unknown line kind"),
            ("some avg10=0.00 avg60=0.00 avg300=0.00 total=-1\n", 1, "bad number"),
            ("some avg10=0.00 avg60 avg300=0.00 total=1\n", 1, "expected key=value"),
            ("some avg10=NaN avg60=0 avg300=0 total=1\n", 1, "bad number"),
            (
                "some avg10=0 avg60=0 avg300=0 total=1\nsome avg10=0 avg60=0 avg300=0 total=1\n",
                2,
                "duplicate",
            ),
        ];
        for (text, line, reason) in cases {
            match parse_psi(text, "/proc/pressure/memory") {
                Err(PsiError::Malformed {
                    file,
                    line: l,
                    reason: r,
                }) => {
                    assert_eq!(file, "/proc/pressure/memory");
                    assert_eq!(l, line, "{text:?}");
                    assert!(r.contains(reason), "{r} should mention {reason}");
                }
                other => panic!("{text:?} gave {other:?}"),
            }
        }
        assert!(matches!(parse_psi("", "f"), Err(PsiError::MissingSome { .. })));
    }

    #[test]
    fn window_percentages_come_from_total_deltas() {
        let at = |some, full| Psi {
            some: PsiLine {
                total_us: some,
                ..PsiLine::default()
            },
            full: Some(PsiLine {
                total_us: full,
                ..PsiLine::default()
            }),
        };
        let w = window(Some(&at(1_000, 0)), at(501_000, 100_000), Duration::from_secs(1));
        assert_eq!(w.some_pct, Some(50.0));
        assert_eq!(w.full_pct, Some(10.0));
        // First window: no invented zero.
        assert_eq!(window(None, at(5, 5), Duration::from_secs(1)).some_pct, None);
        // Counter reset: no figure rather than a bogus one.
        assert_eq!(
            window(Some(&at(10, 10)), at(5, 5), Duration::from_secs(1)).some_pct,
            None
        );
    }

    #[test]
    fn missing_file_is_none_not_error() {
        let dir = std::env::temp_dir().join(format!("gw-psi-{}", std::process::id()));
        assert!(matches!(read_psi(&dir.join("nope")), Ok(None)));
        let mut collector = NodePsiCollector::new(&dir);
        let node = collector.collect();
        assert!(node.memory.is_none() && node.cpu.is_none() && node.io.is_none());
        assert!(!collector.available(Resource::Memory));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn never_panics_on_arbitrary_text(text in "\\PC*") {
            let _ = parse_psi(&text, "fuzz");
        }

        #[test]
        fn never_panics_on_near_valid_text(
            kind in "(some|full|sone)",
            a in "[0-9.]{0,6}", b in "[0-9.x-]{0,6}", t in "[0-9-]{0,21}",
        ) {
            let text = format!("{kind} avg10={a} avg60={b} avg300=0.00 total={t}\n");
            let _ = parse_psi(&text, "fuzz");
        }

        #[test]
        fn round_trips_valid_lines(a in 0u32..10_000, total in proptest::prelude::any::<u64>()) {
            let avg = f64::from(a) / 100.0;
            let text = format!("some avg10={avg:.2} avg60=0.00 avg300=0.00 total={total}\n");
            let psi = parse_psi(&text, "fuzz").expect("valid");
            proptest::prop_assert_eq!(psi.some.total_us, total);
            proptest::prop_assert!((psi.some.avg10 - avg).abs() < 1e-9);
        }
    }
}
