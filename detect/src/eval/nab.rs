//! NAB (Numenta Anomaly Benchmark) corpus loader and scorer.
//!
//! Re-implements NAB's scoring as described in the nab-dev README: probation (first
//! `min(floor(0.15 N), 750)` rows unscored), windows from `combined_windows.json`, scaled-sigmoid
//! weighting of the earliest detection in a window and of false positives after a window, one
//! threshold per detector and profile optimised over the whole corpus (ties keep the highest
//! threshold), and normalisation against the null detector and the perfect detector.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{EvalError, format_err, parse_timestamp, read_to_string};

/// Probation fraction and cap (0.15 × 5000 rows), from NAB's runner and sweeper.
const PROBATION_PERCENT: f64 = 0.15;
const PROBATION_CAP_ROWS: f64 = 750.0;
/// Threshold NAB starts the sweep at: nothing is detected.
pub const NO_DETECTION_THRESHOLD: f64 = 1.1;

/// A NAB cost matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// `standard`, `reward_low_FP_rate`, `reward_low_FN_rate`.
    pub name: String,
    /// Weight of a true positive.
    pub tp: f64,
    /// Weight of a false positive.
    pub fp: f64,
    /// Weight of a missed window.
    pub fn_: f64,
}

/// NAB's three profiles, in NAB's table order.
#[must_use]
pub fn default_profiles() -> Vec<Profile> {
    [
        ("standard", 1.0, 0.11, 1.0),
        ("reward_low_FP_rate", 1.0, 0.22, 1.0),
        ("reward_low_FN_rate", 1.0, 0.11, 2.0),
    ]
    .into_iter()
    .map(|(n, tp, fp, fn_)| Profile {
        name: n.to_owned(),
        tp,
        fp,
        fn_,
    })
    .collect()
}

/// Load `config/profiles.json` (NAB's format), ordered as NAB's tables are.
///
/// # Errors
/// Missing file, bad JSON, missing weights.
pub fn load_profiles(path: &Path) -> Result<Vec<Profile>, EvalError> {
    let text = read_to_string(path)?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| EvalError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let obj = v
        .as_object()
        .ok_or_else(|| format_err(path, "expected an object of profiles"))?;
    let mut out = Vec::new();
    for (name, p) in obj {
        let w = |k: &str| -> Result<f64, EvalError> {
            p.get("CostMatrix")
                .and_then(|c| c.get(k))
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| format_err(path, format!("profile {name}: missing CostMatrix.{k}")))
        };
        out.push(Profile {
            name: name.clone(),
            tp: w("tpWeight")?,
            fp: w("fpWeight")?,
            fn_: w("fnWeight")?,
        });
    }
    let order = |n: &str| match n {
        "standard" => 0,
        "reward_low_FP_rate" => 1,
        "reward_low_FN_rate" => 2,
        _ => 3,
    };
    out.sort_by(|a, b| order(&a.name).cmp(&order(&b.name)).then(a.name.cmp(&b.name)));
    Ok(out)
}

/// One NAB data file.
#[derive(Debug, Clone)]
pub struct NabSeries {
    /// `<category>/<file>.csv`, as in the label files.
    pub name: String,
    /// Row timestamps, µs since the epoch.
    pub timestamps: Vec<i64>,
    /// Row values.
    pub values: Vec<f64>,
}

/// A NAB corpus: the files listed in `labels/combined_windows.json` and their windows.
#[derive(Debug, Clone)]
pub struct NabCorpus {
    /// Corpus root.
    pub root: PathBuf,
    /// Files, sorted by name.
    pub series: Vec<NabSeries>,
    /// Windows per file (`[start, end]` timestamps, µs), same order as `series`.
    pub windows: Vec<Vec<(i64, i64)>>,
    /// Cost profiles from `config/profiles.json` (NAB's defaults if the file is absent).
    pub profiles: Vec<Profile>,
}

impl NabCorpus {
    /// Load `DIR/labels/combined_windows.json`, `DIR/data/...` and `DIR/config/profiles.json`.
    ///
    /// # Errors
    /// Missing or malformed files.
    pub fn load(root: &Path) -> Result<Self, EvalError> {
        let wpath = root.join("labels/combined_windows.json");
        let text = read_to_string(&wpath)?;
        let raw: BTreeMap<String, Vec<Vec<String>>> =
            serde_json::from_str(&text).map_err(|source| EvalError::Json {
                path: wpath.clone(),
                source,
            })?;
        let mut series = Vec::with_capacity(raw.len());
        let mut windows = Vec::with_capacity(raw.len());
        for (name, wins) in &raw {
            let mut ws = Vec::with_capacity(wins.len());
            for w in wins {
                let [a, b] = w.as_slice() else {
                    return Err(format_err(&wpath, format!("{name}: window is not a pair")));
                };
                let (Some(a), Some(b)) = (parse_timestamp(a), parse_timestamp(b)) else {
                    return Err(format_err(&wpath, format!("{name}: bad window timestamp")));
                };
                ws.push((a, b));
            }
            let path = root.join("data").join(name);
            let (timestamps, cols) = read_nab_csv(&path, &["value"])?;
            let values = cols.into_iter().next().unwrap_or_default();
            series.push(NabSeries {
                name: name.clone(),
                timestamps,
                values,
            });
            windows.push(ws);
        }
        let ppath = root.join("config/profiles.json");
        let profiles = if ppath.exists() {
            load_profiles(&ppath)?
        } else {
            default_profiles()
        };
        Ok(Self {
            root: root.to_path_buf(),
            series,
            windows,
            profiles,
        })
    }

    /// Total number of windows (NAB's "perfect" detector finds all of them).
    #[must_use]
    pub fn window_count(&self) -> usize {
        self.windows.iter().map(Vec::len).sum()
    }

    /// Read NAB-format result files for detector `det` from `dir/<category>/<det>_<file>.csv`
    /// (column `anomaly_score`), in corpus order.
    ///
    /// # Errors
    /// A missing file, a missing column or a row count that differs from the data file.
    pub fn load_results(&self, dir: &Path, det: &str) -> Result<Vec<Vec<f64>>, EvalError> {
        let mut out = Vec::with_capacity(self.series.len());
        for s in &self.series {
            let (cat, file) = s
                .name
                .split_once('/')
                .ok_or_else(|| format_err(dir, format!("{}: no category", s.name)))?;
            let path = dir.join(cat).join(format!("{det}_{file}"));
            let (ts, cols) = read_nab_csv(&path, &["anomaly_score"])?;
            if ts != s.timestamps {
                return Err(format_err(&path, "timestamps differ from the data file"));
            }
            out.push(cols.into_iter().next().unwrap_or_default());
        }
        Ok(out)
    }
}

/// Read a CSV with a `timestamp` column and the named numeric columns.
fn read_nab_csv(path: &Path, columns: &[&str]) -> Result<(Vec<i64>, Vec<Vec<f64>>), EvalError> {
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
    let find = |n: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(n));
    let ti = find("timestamp").ok_or_else(|| format_err(path, "no timestamp column"))?;
    let idx = columns
        .iter()
        .map(|c| find(c).ok_or_else(|| format_err(path, format!("no {c} column"))))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ts = Vec::new();
    let mut cols = vec![Vec::new(); columns.len()];
    for (line, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(csv_err)?;
        let t = rec
            .get(ti)
            .and_then(parse_timestamp)
            .ok_or_else(|| format_err(path, format!("row {}: bad timestamp", line + 2)))?;
        ts.push(t);
        for (c, &i) in cols.iter_mut().zip(&idx) {
            let v = rec
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .ok_or_else(|| format_err(path, format!("row {}: bad number", line + 2)))?;
            c.push(v);
        }
    }
    Ok((ts, cols))
}

// ---------------------------------------------------------------------------------------------
// Scoring

fn scaled_sigmoid(pos: f64) -> f64 {
    if pos > 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * pos).exp()) - 1.0
    }
}

/// One scorable row, profile-independent: the weight is `tp × unit` inside a window and
/// `fp × unit` outside.
#[derive(Debug, Clone, Copy)]
pub struct SweepRow {
    /// The detector's anomaly score.
    pub anomaly: f64,
    /// Unweighted sigmoid weight.
    pub unit: f64,
    /// Global window id when inside a window.
    pub window: Option<u32>,
    /// In the probationary period: never scored.
    pub probation: bool,
}

impl SweepRow {
    #[inline]
    fn weight(&self, p: &Profile) -> f64 {
        if self.window.is_some() {
            self.unit * p.tp
        } else {
            self.unit * p.fp
        }
    }
}

/// NAB's probationary length for a file of `n` rows.
#[must_use]
pub fn probation_rows(n: usize) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "row counts are far below 2^52")]
    let n = n as f64;
    (PROBATION_PERCENT * n).floor().min(PROBATION_CAP_ROWS)
}

/// Label the rows of one file (NAB `calcSweepScore`). Window ids start at `*next_id` and are
/// advanced per window entered. Errors if a window's end is not a row timestamp.
///
/// # Errors
/// A window end that is not a timestamp of the file.
pub fn sweep_file(
    name: &str,
    timestamps: &[i64],
    anomaly: &[f64],
    windows: &[(i64, i64)],
    next_id: &mut u32,
    out: &mut Vec<SweepRow>,
) -> Result<(), EvalError> {
    let max_tp = scaled_sigmoid(-1.0);
    let probation = probation_rows(timestamps.len());
    let mut pending = windows.iter().peekable();
    // (id, right index, width) of the window we are in / the last one we left.
    let mut cur: Option<(u32, usize, f64, i64)> = None;
    let mut prev: Option<(usize, f64)> = None;
    for (i, (&t, &a)) in timestamps.iter().zip(anomaly).enumerate() {
        if let Some(&&(start, end)) = pending.peek()
            && t == start
        {
            pending.next();
            let right = timestamps
                .iter()
                .position(|&x| x == end)
                .ok_or_else(|| format_err(Path::new(name), format!("window end {end} µs is not a row timestamp")))?;
            let left = timestamps.iter().position(|&x| x == start).unwrap_or(i);
            #[expect(clippy::cast_precision_loss, reason = "row counts are far below 2^52")]
            let width = (right as f64) - (left as f64) + 1.0;
            cur = Some((*next_id, right, width, end));
            *next_id += 1;
        }
        #[expect(clippy::cast_precision_loss, reason = "row counts are far below 2^52")]
        let (unit, window) = if let Some((id, right, width, _)) = cur {
            let pos = -((right as f64) - (i as f64) + 1.0) / width;
            (scaled_sigmoid(pos) / max_tp, Some(id))
        } else {
            // Before any window a false positive costs the full weight.
            let unit = match prev {
                None => -1.0,
                Some((r, w)) => scaled_sigmoid(((r as f64) - (i as f64)).abs() / (w - 1.0)),
            };
            (unit, None)
        };
        #[expect(clippy::cast_precision_loss, reason = "row counts are far below 2^52")]
        let probation_row = (i as f64) < probation;
        out.push(SweepRow {
            anomaly: a,
            unit,
            window,
            probation: probation_row,
        });
        if let Some((_, _, width, end)) = cur
            && t == end
        {
            prev = Some((i, width));
            cur = None;
        }
    }
    Ok(())
}

/// The outcome of one threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThresholdScore {
    /// Detection iff `anomaly >= threshold`.
    pub threshold: f64,
    /// Raw NAB score.
    pub score: f64,
    /// Detected rows in windows.
    pub tp: u64,
    /// Undetected rows outside windows.
    pub tn: u64,
    /// Detected rows outside windows.
    pub fp: u64,
    /// Undetected rows in windows.
    pub fn_: u64,
    /// Windows with at least one detection.
    pub windows_detected: u32,
}

/// Sweep every distinct score as a threshold (NAB `calcScoreByThreshold` + `optimizeThreshold`)
/// and return the best; ties keep the highest threshold. `n_ids` bounds the window ids.
#[must_use]
pub fn optimize_threshold(rows: &[SweepRow], n_ids: u32, p: &Profile) -> ThresholdScore {
    let mut best: Option<ThresholdScore> = None;
    sweep_thresholds(rows, n_ids, p, |s| {
        if best.is_none_or(|b| s.score > b.score) {
            best = Some(s);
        }
    });
    best.unwrap_or(ThresholdScore {
        threshold: NO_DETECTION_THRESHOLD,
        score: 0.0,
        tp: 0,
        tn: 0,
        fp: 0,
        fn_: 0,
        windows_detected: 0,
    })
}

/// Call `emit` for each threshold in descending order, starting with "no detection".
#[expect(clippy::many_single_char_names, reason = "the names of NAB's scoring formula")]
pub fn sweep_thresholds(rows: &[SweepRow], n_ids: u32, p: &Profile, mut emit: impl FnMut(ThresholdScore)) {
    let mut scorable: Vec<&SweepRow> = rows.iter().filter(|r| !r.probation).collect();
    // Stable, descending; NaN scores sort last (never detected).
    scorable.sort_by(|a, b| {
        let (x, y) = (a.anomaly, b.anomaly);
        match (x.is_nan(), y.is_nan()) {
            (false, false) => y.total_cmp(&x),
            (a, b) => a.cmp(&b),
        }
    });
    let mut parts: Vec<Option<f64>> = vec![None; n_ids as usize];
    for r in &scorable {
        if let Some(id) = r.window
            && let Some(slot) = parts.get_mut(id as usize)
        {
            *slot = Some(-p.fn_);
        }
    }
    let mut detected = vec![false; n_ids as usize];
    let mut windows_detected = 0u32;
    let mut fp_sum = 0.0;
    let mut win_sum: f64 = parts.iter().flatten().sum();
    let mut dirty = false;
    let (mut tp, mut fp) = (0u64, 0u64);
    let mut tn = scorable.iter().filter(|r| r.window.is_none()).count() as u64;
    let mut fn_ = scorable.len() as u64 - tn;
    let mut cur = NO_DETECTION_THRESHOLD;
    for r in &scorable {
        if r.anomaly.is_nan() {
            break;
        }
        #[expect(
            clippy::float_cmp,
            reason = "groups rows of the identical score, as NAB's sweeper does"
        )]
        if r.anomaly != cur {
            if dirty {
                win_sum = parts.iter().flatten().sum();
                dirty = false;
            }
            emit(ThresholdScore {
                threshold: cur,
                score: fp_sum + win_sum,
                tp,
                tn,
                fp,
                fn_,
                windows_detected,
            });
            cur = r.anomaly;
        }
        if let Some(id) = r.window {
            tp += 1;
            fn_ -= 1;
            let w = r.weight(p);
            if let Some(Some(v)) = parts.get_mut(id as usize)
                && w > *v
            {
                *v = w;
                dirty = true;
            }
            if let Some(d) = detected.get_mut(id as usize)
                && !*d
            {
                *d = true;
                windows_detected += 1;
            }
        } else {
            fp += 1;
            tn -= 1;
            fp_sum += r.weight(p);
        }
    }
    if dirty {
        win_sum = parts.iter().flatten().sum();
    }
    emit(ThresholdScore {
        threshold: cur,
        score: fp_sum + win_sum,
        tp,
        tn,
        fp,
        fn_,
        windows_detected,
    });
}

/// Score rows at a fixed threshold (NAB `scoreDataSet`): detection iff `anomaly >= threshold`.
#[must_use]
pub fn score_at(rows: &[SweepRow], n_ids: u32, p: &Profile, threshold: f64) -> ThresholdScore {
    let mut parts: Vec<Option<f64>> = vec![None; n_ids as usize];
    let mut s = ThresholdScore {
        threshold,
        score: 0.0,
        tp: 0,
        tn: 0,
        fp: 0,
        fn_: 0,
        windows_detected: 0,
    };
    let mut fp_sum = 0.0;
    for r in rows.iter().filter(|r| !r.probation) {
        let det = r.anomaly >= threshold;
        match (r.window, det) {
            (Some(id), det) => {
                let slot = parts.get_mut(id as usize);
                if let Some(slot) = slot {
                    let v = slot.get_or_insert(-p.fn_);
                    if det {
                        #[expect(clippy::float_cmp, reason = "still the untouched initial value")]
                        if *v == -p.fn_ {
                            s.windows_detected += 1;
                        }
                        *v = v.max(r.weight(p));
                    }
                }
                if det {
                    s.tp += 1;
                } else {
                    s.fn_ += 1;
                }
            }
            (None, true) => {
                s.fp += 1;
                fp_sum += r.weight(p);
            }
            (None, false) => s.tn += 1,
        }
    }
    s.score = fp_sum + parts.iter().flatten().sum::<f64>();
    s
}

/// Result of one detector under one profile.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileResult {
    /// Profile name.
    pub profile: String,
    /// Best threshold and its raw score and counts.
    pub best: ThresholdScore,
    /// Raw score of the null detector (constant 0.5, optimised).
    pub null_score: f64,
    /// Raw score of the perfect detector.
    pub perfect_score: f64,
    /// `100 (S - S_null) / (S_perfect - S_null)`.
    pub normalized: f64,
}

/// Label every row of the corpus for the given per-file anomaly scores.
///
/// # Errors
/// Score vectors that do not match the files, or windows that do not match rows.
pub fn sweep_corpus(corpus: &NabCorpus, scores: &[Vec<f64>]) -> Result<(Vec<SweepRow>, u32), EvalError> {
    if scores.len() != corpus.series.len() {
        return Err(format_err(&corpus.root, "one score vector per file expected"));
    }
    let mut rows = Vec::with_capacity(corpus.series.iter().map(|s| s.values.len()).sum());
    let mut next_id = 0u32;
    for ((s, w), a) in corpus.series.iter().zip(&corpus.windows).zip(scores) {
        if a.len() != s.timestamps.len() {
            return Err(format_err(
                Path::new(&s.name),
                format!("{} scores for {} rows", a.len(), s.timestamps.len()),
            ));
        }
        sweep_file(&s.name, &s.timestamps, a, w, &mut next_id, &mut rows)?;
    }
    Ok((rows, next_id))
}

/// Score a detector over the corpus under every profile: threshold optimised per profile,
/// normalised against the null detector (constant 0.5, optimised the same way).
///
/// # Errors
/// See [`sweep_corpus`].
pub fn score_corpus(corpus: &NabCorpus, scores: &[Vec<f64>]) -> Result<Vec<ProfileResult>, EvalError> {
    let (rows, n_ids) = sweep_corpus(corpus, scores)?;
    let null_rows: Vec<SweepRow> = rows.iter().map(|r| SweepRow { anomaly: 0.5, ..*r }).collect();
    #[expect(clippy::cast_precision_loss, reason = "window counts are small")]
    let n_windows = corpus.window_count() as f64;
    Ok(corpus
        .profiles
        .iter()
        .map(|p| {
            let best = optimize_threshold(&rows, n_ids, p);
            let null_score = optimize_threshold(&null_rows, n_ids, p).score;
            let perfect_score = n_windows * p.tp;
            let normalized = 100.0 * (best.score - null_score) / (perfect_score - null_score);
            ProfileResult {
                profile: p.name.clone(),
                best,
                null_score,
                perfect_score,
                normalized,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        default_profiles().remove(0)
    }

    /// 100 rows (probation 15), one window over rows 40..=49.
    fn rows(scores: &[(usize, f64)]) -> (Vec<SweepRow>, u32) {
        let ts: Vec<i64> = (0..100).collect();
        let mut a = vec![0.0; 100];
        for &(i, s) in scores {
            a[i] = s;
        }
        let mut out = Vec::new();
        let mut n = 0;
        sweep_file("f", &ts, &a, &[(40, 49)], &mut n, &mut out).expect("sweep");
        (out, n)
    }

    #[test]
    fn earliest_detection_in_a_window_earns_the_full_weight() {
        let (r, n) = rows(&[(40, 0.9), (45, 0.9)]);
        let s = score_at(&r, n, &profile(), 0.5);
        assert!((s.score - 1.0).abs() < 1e-12, "{}", s.score);
        assert_eq!((s.tp, s.fp, s.windows_detected), (2, 0, 1));
    }

    #[test]
    fn late_detection_earns_less_and_a_miss_costs_fn_weight() {
        let (r, n) = rows(&[(49, 0.9)]);
        let late = score_at(&r, n, &profile(), 0.5).score;
        // Last row of a 10-row window: scaledSigmoid(-0.1) / scaledSigmoid(-1) ≈ 0.248.
        assert!((late - 0.248_241_549_775).abs() < 1e-9, "{late}");
        let (r, n) = rows(&[]);
        assert!((score_at(&r, n, &profile(), 0.5).score + 1.0).abs() < 1e-12);
    }

    #[test]
    fn false_positives_cost_fp_weight_and_probation_is_ignored() {
        // Row 5 is in probation (ignored), row 20 is an FP before any window.
        let (r, n) = rows(&[(5, 0.9), (20, 0.9), (40, 0.9)]);
        let s = score_at(&r, n, &profile(), 0.5);
        assert!((s.score - (1.0 - 0.11)).abs() < 1e-12, "{}", s.score);
        // Just after the window the penalty is small; 3 widths later it is the full weight.
        let (r, n) = rows(&[(40, 0.9), (50, 0.9)]);
        let near = score_at(&r, n, &profile(), 0.5).score - 1.0;
        let (r, n) = rows(&[(40, 0.9), (90, 0.9)]);
        let far = score_at(&r, n, &profile(), 0.5).score - 1.0;
        assert!(near < 0.0 && near > -0.05, "{near}");
        assert!((far + 0.11).abs() < 1e-12, "{far}");
    }

    #[test]
    fn optimiser_prefers_the_highest_of_tied_thresholds() {
        // Scores 0.9 (window start) and 0.8 (outside, costs): best is 0.9, ties impossible; a
        // third row at 0.85 inside the window adds nothing, so 0.9 and 0.85 tie → keep 0.9.
        let (r, n) = rows(&[(40, 0.9), (45, 0.85), (80, 0.8)]);
        let best = optimize_threshold(&r, n, &profile());
        assert!((best.threshold - 0.9).abs() < 1e-12, "{}", best.threshold);
        assert!((best.score - 1.0).abs() < 1e-12);
    }

    #[test]
    fn probation_is_fifteen_percent_capped_at_750_rows() {
        assert!((probation_rows(100) - 15.0).abs() < 1e-12);
        assert!((probation_rows(4032) - 604.0).abs() < 1e-12);
        assert!((probation_rows(15_902) - 750.0).abs() < 1e-12);
    }
}
