//! Offline evaluation (feature `eval`): dataset loaders and scorers for NAB and the Microsoft
//! cloud-monitoring set. This is the only part of the crate that touches files.

pub mod datasets;
pub mod ms;
pub mod nab;

use std::path::{Path, PathBuf};

use crate::detectors::{CusumConfig, HalfSpaceTreesConfig, HoltConfig, PageHinkleyConfig, RobustZConfig};
use crate::{
    ConfigError, Cusum, Detector, GrayDetector, GrayDetectorConfig, HalfSpaceTrees, Holt, PageHinkley, RobustZ,
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

/// Detectors the harness can run, by name.
pub const DETECTORS: &[&str] = &["gray", "robust_z", "cusum", "page_hinkley", "half_space_trees", "holt"];

/// Build a detector with its default config.
///
/// # Errors
/// Unknown name.
pub fn make_detector(name: &str) -> Result<Box<dyn Detector + Send>, EvalError> {
    make_detector_with(name, None)
}

/// Build a detector, with config fields for `gray` overridden by a JSON object (tuning).
///
/// # Errors
/// Unknown name, bad JSON, invalid config.
pub fn make_detector_with(name: &str, gray_json: Option<&str>) -> Result<Box<dyn Detector + Send>, EvalError> {
    Ok(match name {
        "gray" => {
            let cfg = match gray_json {
                Some(j) => serde_json::from_str::<GrayDetectorConfig>(j).map_err(|source| EvalError::Json {
                    path: PathBuf::from("<gray config>"),
                    source,
                })?,
                None => GrayDetectorConfig::default(),
            };
            Box::new(GrayDetector::new(cfg)?)
        }
        "robust_z" => Box::new(RobustZ::new(RobustZConfig::default())?),
        "cusum" => Box::new(Cusum::new(CusumConfig::default())?),
        "page_hinkley" => Box::new(PageHinkley::new(PageHinkleyConfig::default())?),
        "half_space_trees" => Box::new(HalfSpaceTrees::new(HalfSpaceTreesConfig::default())?),
        "holt" => Box::new(Holt::new(HoltConfig::default())?),
        other => return Err(EvalError::UnknownDetector(other.to_owned())),
    })
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
    use super::parse_timestamp;

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
