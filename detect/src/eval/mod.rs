//! Offline evaluation (feature `eval`): dataset loaders and scorers for NAB and the Microsoft
//! cloud-monitoring set. This is the only part of the crate that touches files.

pub mod cv;
pub mod datasets;
pub mod ms;
pub mod nab;

use std::path::{Path, PathBuf};

use serde::{Serialize, de::DeserializeOwned};

use crate::detectors::{CusumConfig, HalfSpaceTreesConfig, HoltConfig, PageHinkleyConfig, RobustZConfig};
use crate::{
    ConfigError, Cusum, Detector, GrayDetector, GrayDetectorConfig, HalfSpaceTrees, Holt, PageHinkley, RobustZ,
    SignalScorer, SignalScorerConfig,
};

/// Errors of the evaluation harness; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Reading a file or directory failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A CSV file is malformed.
    #[error("parsing CSV {path}: {source}")]
    Csv {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: csv::Error,
    },
    /// A JSON file is malformed.
    #[error("parsing JSON {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: serde_json::Error,
    },
    /// The content does not have the expected shape.
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Unknown detector name.
    #[error("unknown detector {0:?} (known: {known})", known = DETECTORS.join(", "))]
    UnknownDetector(String),
    /// Detector config invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

pub(crate) fn format_err(path: &Path, msg: impl Into<String>) -> EvalError {
    EvalError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

pub(crate) fn read_to_string(path: &Path) -> Result<String, EvalError> {
    std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Detectors the harness can run, by name. `shipped` is the per-signal pipeline the agent runs
/// ([`SignalScorer`] with [`SignalScorerConfig::default`], the same constructor and config the
/// agent's local scorer uses), scored by its held score (what the Node conditions follow);
/// `shipped_onset` is the same pipeline scored by its onsets ([`SignalScorer::onset`]; the agent
/// counts those whose series is still elevated a window later). They come first and are what the evaluations score by default.
pub const DETECTORS: &[&str] = &[
    "shipped",
    "shipped_onset",
    "gray",
    "robust_z",
    "cusum",
    "page_hinkley",
    "half_space_trees",
    "holt",
];

/// Build a detector with its default config.
///
/// # Errors
/// Unknown name.
pub fn make_detector(name: &str) -> Result<Box<dyn Detector + Send>, EvalError> {
    make_detector_with(name, None)
}

/// Build a detector, with fields of its default config overridden by a JSON object (tuning;
/// nested objects merge field by field, so `{"robust": {"z_half": 3}}` keeps the other fields
/// of the default `robust`).
///
/// # Errors
/// Unknown name, bad JSON, invalid config.
pub fn make_detector_with(name: &str, json: Option<&str>) -> Result<Box<dyn Detector + Send>, EvalError> {
    let over = match json {
        Some(j) => Some(
            serde_json::from_str::<serde_json::Value>(j).map_err(|source| EvalError::Json {
                path: PathBuf::from(format!("<{name} config>")),
                source,
            })?,
        ),
        None => None,
    };
    let over = over.as_ref();
    Ok(match name {
        "shipped" => Box::new(SignalScorer::new(config::<SignalScorerConfig>(name, over)?)?),
        "shipped_onset" => Box::new(Onsets(SignalScorer::new(config::<SignalScorerConfig>(name, over)?)?)),
        "gray" => Box::new(GrayDetector::new(config::<GrayDetectorConfig>(name, over)?)?),
        "robust_z" => Box::new(RobustZ::new(config::<RobustZConfig>(name, over)?)?),
        "cusum" => Box::new(Cusum::new(config::<CusumConfig>(name, over)?)?),
        "page_hinkley" => Box::new(PageHinkley::new(config::<PageHinkleyConfig>(name, over)?)?),
        "half_space_trees" => Box::new(HalfSpaceTrees::new(config::<HalfSpaceTreesConfig>(name, over)?)?),
        "holt" => Box::new(Holt::new(config::<HoltConfig>(name, over)?)?),
        other => return Err(EvalError::UnknownDetector(other.to_owned())),
    })
}

/// The shipped pipeline scored by its onsets instead of its held score.
struct Onsets(SignalScorer);

impl Detector for Onsets {
    fn update(&mut self, t_secs: f64, x: f64) -> crate::DetectorOutput {
        let held = Detector::update(&mut self.0, t_secs, x);
        crate::DetectorOutput {
            score: self.0.onset(),
            ..held
        }
    }
    fn reset(&mut self) {
        Detector::reset(&mut self.0);
    }
    fn name(&self) -> &'static str {
        "shipped_onset"
    }
}

/// The default config with `over` merged in.
fn config<C: Default + Serialize + DeserializeOwned>(
    name: &str,
    over: Option<&serde_json::Value>,
) -> Result<C, EvalError> {
    let Some(over) = over else {
        return Ok(C::default());
    };
    let json_err = |source| EvalError::Json {
        path: PathBuf::from(format!("<{name} config>")),
        source,
    };
    let mut v = serde_json::to_value(C::default()).map_err(json_err)?;
    merge(&mut v, over);
    serde_json::from_value(v).map_err(json_err)
}

/// Deep merge of JSON configs: objects field by field, anything else replaced.
pub fn merge(base: &mut serde_json::Value, over: &serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// A tuning knob: a config field (JSON path, `.`-separated) and the values tried; the first
/// value is the default.
#[derive(Debug, Clone)]
pub struct Knob {
    /// e.g. `robust.z_half`.
    pub path: &'static str,
    /// Values tried, default first.
    pub values: Vec<serde_json::Value>,
}

/// The knobs cross-validation tunes per detector (few on purpose: each one is a way to fit the
/// dev set). Empty for detectors without a grid.
#[must_use]
pub fn knobs(name: &str) -> Vec<Knob> {
    use serde_json::json;
    let k = |path, values: Vec<serde_json::Value>| Knob { path, values };
    match name {
        "shipped" => vec![
            k("persist_k", vec![json!(1), json!(2), json!(3)]),
            k("gray.z_half", vec![json!(5.0), json!(3.5), json!(7.0)]),
        ],
        "shipped_onset" => vec![
            k("gray.z_half", vec![json!(5.0), json!(3.5), json!(7.0)]),
            k("onset_half_life", vec![json!(300.0), json!(100.0), json!(900.0)]),
        ],
        "gray" => vec![
            k("z_half", vec![json!(5.0), json!(3.5), json!(7.0)]),
            k("refractory_half_life", vec![json!(300.0), json!(100.0), json!(900.0)]),
        ],
        _ => Vec::new(),
    }
}

/// Every combination of the knobs' values as a JSON override object, the all-defaults one
/// first, each with a label like `z_half=5 in_range_factor=0.8`.
#[must_use]
pub fn grid(knobs: &[Knob]) -> Vec<(String, serde_json::Value)> {
    let mut out = vec![(String::new(), serde_json::json!({}))];
    for knob in knobs {
        let mut next = Vec::with_capacity(out.len() * knob.values.len());
        for v in &knob.values {
            for (label, obj) in &out {
                let mut obj = obj.clone();
                let mut over = v.clone();
                for part in knob.path.rsplit('.') {
                    over = serde_json::json!({ part: over });
                }
                merge(&mut obj, &over);
                let label = if label.is_empty() {
                    format!("{}={v}", knob.path)
                } else {
                    format!("{label} {}={v}", knob.path)
                };
                next.push((label, obj));
            }
        }
        out = next;
    }
    out
}

/// Run a fresh detector over one series; rows where it is not ready score 0.
pub fn run_series(det: &mut dyn Detector, timestamps_us: &[i64], values: &[f64]) -> Vec<f64> {
    det.reset();
    timestamps_us
        .iter()
        .zip(values)
        .map(|(&t, &x)| {
            #[expect(clippy::cast_precision_loss, reason = "µs since 1970 fit f64 to 1 µs")]
            let t = t as f64 / 1e6;
            let o = det.update(t, x);
            if o.ready { o.score } else { 0.0 }
        })
        .collect()
}

/// Parse `YYYY-MM-DD[ T]HH:MM:SS[.ffffff][Z]` (UTC) into microseconds since the Unix epoch.
#[must_use]
#[expect(
    clippy::many_single_char_names,
    reason = "date fields y, m, d, h, s as in the civil-date formula"
)]
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s.trim().trim_matches('"');
    let s = s.strip_suffix('Z').unwrap_or(s);
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b' ' || b[10] == b'T') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse::<i64>().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut micros = 0i64;
    if b.len() > 19 {
        if b[19] != b'.' {
            return None;
        }
        let frac = s.get(20..)?;
        if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let mut digits = frac.to_owned();
        digits.truncate(6);
        while digits.len() < 6 {
            digits.push('0');
        }
        micros = digits.parse().ok()?;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + mi) * 60_000_000 + sec * 1_000_000 + micros)
}

#[cfg(test)]
mod tests {
    use super::{grid, knobs, make_detector_with, parse_timestamp};

    #[test]
    fn a_knob_grid_starts_at_the_defaults_and_overrides_nested_fields_only() {
        let g = grid(&knobs("shipped"));
        assert_eq!(g.len(), 9);
        assert_eq!(g[0].0, "persist_k=1 gray.z_half=5.0");
        assert_eq!(g[1].1, serde_json::json!({"persist_k": 2, "gray": {"z_half": 5.0}}));
        // A nested override keeps the shipped fields of `gray` (refractory off): the default
        // config and an all-default override score a series identically.
        let ts: Vec<i64> = (0..200).map(|i| i * 1_000_000).collect();
        // Spikes up at 100 and 110, a drop at 150.
        let xs: Vec<f64> = (0..200)
            .map(|i| {
                f64::from(i % 7)
                    + [(100, 50.0), (110, 50.0), (150, -50.0)]
                        .iter()
                        .find(|s| s.0 == i)
                        .map_or(0.0, |s| s.1)
            })
            .collect();
        let run = |json: Option<&str>| {
            let mut d = make_detector_with("shipped", json).expect("valid");
            super::run_series(d.as_mut(), &ts, &xs)
        };
        let default = run(None);
        assert_eq!(run(Some(&g[0].1.to_string())), default);
        // Refractory off: the second spike scores like the first; a drop is not bad for an
        // up-only signal.
        assert!(
            default[100] > 0.5 && default[110] > 0.5,
            "{} {}",
            default[100],
            default[110]
        );
        assert!(default[150] < 0.5, "{}", default[150]);
        assert!(make_detector_with("shipped", Some(r#"{"persist_k": 9, "persist_n": 5}"#)).is_err());
    }

    #[test]
    fn timestamps_parse_to_epoch_micros() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:00"), Some(0));
        assert_eq!(
            parse_timestamp("2014-04-10 07:15:00.000000"),
            parse_timestamp("2014-04-10 07:15:00")
        );
        assert_eq!(parse_timestamp("\"2018-06-17T00:00:00Z\""), Some(1_529_193_600_000_000));
        assert_eq!(parse_timestamp("2000-03-01 00:00:00.5"), Some(951_868_800_500_000));
        assert_eq!(parse_timestamp("2018-13-01 00:00:00"), None);
        assert_eq!(parse_timestamp("garbage"), None);
    }
}
