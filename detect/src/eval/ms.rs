//! Microsoft cloud-monitoring set: loader and point-label metrics.
//!
//! Labels are per point; consecutive 1s form a labelled segment (an incident). Metrics are
//! event-based, as an operator sees them:
//! * an *alarm* is the first row of a run of detections (score ≥ threshold);
//! * a segment is *detected* if any row inside it is a detection; its delay is the distance from
//!   the segment's first row to the first detection in it;
//! * precision = alarms that start inside a segment / all alarms; recall = detected segments /
//!   segments; F1 their harmonic mean.
//!
//! One threshold per detector, chosen to maximise F1 over the whole corpus (as NAB does).
//! Empty values (gaps) are kept as NaN samples, which detectors skip.

use std::path::Path;

use super::{EvalError, format_err, parse_timestamp};

/// One labelled series.
#[derive(Debug, Clone)]
pub struct MsSeries {
    /// `<domain>/<series>.csv`.
    pub name: String,
    /// µs since the epoch.
    pub timestamps: Vec<i64>,
    /// Values.
    pub values: Vec<f64>,
    /// Point labels.
    pub labels: Vec<bool>,
}

/// Load every `DIR/data/<domain>/<series>.csv`, sorted by name.
///
/// # Errors
/// Unreadable directories or malformed files.
pub fn load(root: &Path) -> Result<Vec<MsSeries>, EvalError> {
    let data = root.join("data");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EvalError::Io { path, source }
    };
    let mut files = Vec::new();
    for d in std::fs::read_dir(&data).map_err(io(&data))? {
        let d = d.map_err(io(&data))?.path();
        if !d.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&d).map_err(io(&d))? {
            let f = f.map_err(io(&d))?.path();
            if f.extension().is_some_and(|e| e == "csv") {
                files.push(f);
            }
        }
    }
    files.sort();
    files.iter().map(|f| load_file(&data, f)).collect()
}

fn load_file(data: &Path, path: &Path) -> Result<MsSeries, EvalError> {
    let csv_err = |source| EvalError::Csv {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut rdr = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(file);
    let headers = rdr.headers().map_err(csv_err)?.clone();
    let find = |n: &str| {
        headers
            .iter()
            .position(|h| h.eq_ignore_ascii_case(n))
            .ok_or_else(|| format_err(path, format!("no {n} column")))
    };
    let (ti, vi, li) = (find("TimeStamp")?, find("Value")?, find("Label")?);
    let mut s = MsSeries {
        name: path.strip_prefix(data).unwrap_or(path).to_string_lossy().into_owned(),
        timestamps: Vec::new(),
        values: Vec::new(),
        labels: Vec::new(),
    };
    for (line, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(csv_err)?;
        let row = line + 2;
        let t = rec
            .get(ti)
            .and_then(parse_timestamp)
            .ok_or_else(|| format_err(path, format!("row {row}: bad timestamp")))?;
        // An empty value is a missing sample (some series have gaps): kept as NaN, which
        // detectors skip.
        let v = match rec.get(vi) {
            Some("") => f64::NAN,
            Some(f) => f
                .parse::<f64>()
                .map_err(|_| format_err(path, format!("row {row}: bad value {f:?}")))?,
            None => return Err(format_err(path, format!("row {row}: no value"))),
        };
        let l = match rec.get(li) {
            Some("1") => true,
            Some("0") => false,
            _ => return Err(format_err(path, format!("row {row}: label is not 0/1"))),
        };
        s.timestamps.push(t);
        s.values.push(v);
        s.labels.push(l);
    }
    Ok(s)
}

/// Event-based metrics at one threshold.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PointMetrics {
    /// Detection iff score ≥ threshold.
    pub threshold: f64,
    /// Alarms starting inside a labelled segment / all alarms.
    pub precision: f64,
    /// Detected segments / segments.
    pub recall: f64,
    /// Harmonic mean.
    pub f1: f64,
    /// Labelled segments.
    pub segments: u64,
    /// Segments with a detection.
    pub detected: u64,
    /// Alarms (runs of detections).
    pub alarms: u64,
    /// Alarms that start outside every segment.
    pub false_alarms: u64,
    /// Median delay from segment start to first detection, in rows.
    pub median_delay_rows: f64,
    /// Median delay in seconds.
    pub median_delay_secs: f64,
}

/// Metrics of `scores` (one vector per series) at `threshold`.
#[must_use]
pub fn metrics_at(series: &[MsSeries], scores: &[Vec<f64>], threshold: f64) -> PointMetrics {
    let mut m = PointMetrics {
        threshold,
        ..PointMetrics::default()
    };
    let mut delays_rows = Vec::new();
    let mut delays_secs = Vec::new();
    for (s, sc) in series.iter().zip(scores) {
        let n = s.labels.len().min(sc.len());
        let mut prev_det = false;
        let mut seg_start: Option<usize> = None;
        let mut seg_hit = false;
        for (i, (&score, &lab)) in sc.iter().zip(&s.labels).take(n).enumerate() {
            let det = score >= threshold;
            if lab && seg_start.is_none() {
                seg_start = Some(i);
                seg_hit = false;
                m.segments += 1;
            }
            if let Some(st) = seg_start
                && det
                && !seg_hit
            {
                seg_hit = true;
                m.detected += 1;
                #[expect(clippy::cast_precision_loss, reason = "small row counts")]
                delays_rows.push((i - st) as f64);
                #[expect(clippy::cast_precision_loss, reason = "µs differences fit f64")]
                delays_secs.push((s.timestamps[i] - s.timestamps[st]) as f64 / 1e6);
            }
            if det && !prev_det {
                m.alarms += 1;
                if !lab {
                    m.false_alarms += 1;
                }
            }
            prev_det = det;
            if !lab {
                seg_start = None;
            }
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    {
        m.precision = if m.alarms == 0 {
            0.0
        } else {
            (m.alarms - m.false_alarms) as f64 / m.alarms as f64
        };
        m.recall = if m.segments == 0 {
            0.0
        } else {
            m.detected as f64 / m.segments as f64
        };
    }
    m.f1 = if m.precision + m.recall > 0.0 {
        2.0 * m.precision * m.recall / (m.precision + m.recall)
    } else {
        0.0
    };
    m.median_delay_rows = median(&mut delays_rows);
    m.median_delay_secs = median(&mut delays_secs);
    m
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Pick the threshold with the best F1 among `candidates` quantiles of the positive scores.
#[must_use]
pub fn best_f1(series: &[MsSeries], scores: &[Vec<f64>], candidates: usize) -> PointMetrics {
    let mut all: Vec<f64> = scores
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    all.sort_by(f64::total_cmp);
    all.dedup();
    let mut best = metrics_at(series, scores, f64::INFINITY);
    if all.is_empty() {
        return best;
    }
    let k = candidates.max(1);
    let mut last = f64::NAN;
    for j in 0..k {
        // Denser near the top, where useful thresholds live.
        #[expect(clippy::cast_precision_loss, reason = "small counts")]
        let q = 1.0 - (1.0 - j as f64 / k as f64).powi(3);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "index into a vector"
        )]
        let idx = ((q * (all.len() - 1) as f64).round() as usize).min(all.len() - 1);
        let th = all[idx];
        #[expect(
            clippy::float_cmp,
            reason = "skips a threshold equal to the previous one, as the reference does"
        )]
        if th == last {
            continue;
        }
        last = th;
        let m = metrics_at(series, scores, th);
        if m.f1 > best.f1 {
            best = m;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_metrics_count_segments_alarms_and_delay() {
        let labels = [0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0].map(|l| l == 1).to_vec();
        let s = MsSeries {
            name: "x".into(),
            timestamps: (0..12).map(|i| i * 60_000_000).collect(),
            values: vec![0.0; 12],
            labels,
        };
        // Detections: row 3 (segment 1, delay 1 row), rows 6-7 (false alarm); segment 2 missed.
        let mut sc = vec![0.0; 12];
        sc[3] = 0.9;
        sc[6] = 0.9;
        sc[7] = 0.9;
        let m = metrics_at(std::slice::from_ref(&s), &[sc.clone()], 0.5);
        assert_eq!((m.segments, m.detected, m.alarms, m.false_alarms), (2, 1, 2, 1));
        assert!((m.precision - 0.5).abs() < 1e-12 && (m.recall - 0.5).abs() < 1e-12);
        assert!((m.median_delay_rows - 1.0).abs() < 1e-12);
        assert!((m.median_delay_secs - 60.0).abs() < 1e-12);
        let best = best_f1(std::slice::from_ref(&s), &[sc], 10);
        assert!(best.f1 >= m.f1);
    }
}
