//! Leave-one-category-out (LOCO) cross-validation on a NAB corpus: for each category, the knobs
//! (a candidate config) **and** the threshold are chosen on every other category, and the left-out
//! category is scored with them; the folds' raw scores are summed and normalised once, the way
//! NAB normalises a corpus (`100 (S − S_null) / (S_perfect − S_null)`, the null detector's
//! threshold chosen on the training categories too). No number from a category is ever tuned on
//! that category.

use super::EvalError;
use super::nab::{self, NabCorpus, Profile, SweepRow};

/// One candidate configuration and its per-file anomaly scores (corpus order).
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Label (e.g. `gray z_half=5`).
    pub name: String,
    /// One score vector per corpus file.
    pub scores: Vec<Vec<f64>>,
}

/// One fold: the category scored, what the other categories chose, and how it did.
#[derive(Debug, Clone, PartialEq)]
pub struct Fold {
    /// The left-out category.
    pub category: String,
    /// The candidate chosen on the other categories (by the `standard` profile).
    pub chosen: String,
    /// The threshold chosen on the other categories (this profile).
    pub threshold: f64,
    /// Raw NAB score of the left-out category at that threshold.
    pub score: f64,
    /// The null detector's raw score there (its threshold also chosen on the others).
    pub null_score: f64,
    /// The perfect detector's raw score there.
    pub perfect_score: f64,
    /// Windows of the left-out category detected / present.
    pub windows: (u32, usize),
    /// Raw score of the left-out category with its threshold optimised on that category itself
    /// (the held-out protocol: knobs from the other categories, threshold the way NAB
    /// optimises one on the data it scores).
    pub score_own_threshold: f64,
    /// The null detector's raw score there, its threshold optimised the same way.
    pub null_score_own_threshold: f64,
}

/// LOCO result of one profile.
#[derive(Debug, Clone, PartialEq)]
pub struct CvResult {
    /// Profile name.
    pub profile: String,
    /// One fold per category.
    pub folds: Vec<Fold>,
    /// `100 (ΣS − ΣS_null) / (ΣS_perfect − ΣS_null)` over the folds.
    pub normalized: f64,
    /// The same with each left-out category's threshold optimised on itself.
    pub normalized_own_threshold: f64,
}

/// The category of a corpus file (`<category>/<file>.csv`).
#[must_use]
pub fn category(name: &str) -> &str {
    name.split_once('/').map_or(name, |(c, _)| c)
}

/// Categories of the corpus, in corpus order, without repeats.
#[must_use]
pub fn categories(corpus: &NabCorpus) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in &corpus.series {
        let c = category(&s.name);
        if !out.iter().any(|o| o == c) {
            out.push(c.to_owned());
        }
    }
    out
}

/// A candidate's swept rows, cut per file.
struct Swept {
    rows: Vec<SweepRow>,
    /// Start of each file's rows in `rows` (plus the end).
    offsets: Vec<usize>,
    n_ids: u32,
}

impl Swept {
    fn of(corpus: &NabCorpus, scores: &[Vec<f64>]) -> Result<Self, EvalError> {
        let (rows, n_ids) = nab::sweep_corpus(corpus, scores)?;
        let mut offsets = vec![0];
        for s in &corpus.series {
            offsets.push(offsets.last().copied().unwrap_or(0) + s.values.len());
        }
        Ok(Self { rows, offsets, n_ids })
    }

    /// The rows of the files `keep` selects (window ids stay global and unique).
    fn subset(&self, keep: impl Fn(usize) -> bool) -> Vec<SweepRow> {
        (0..self.offsets.len() - 1)
            .filter(|&i| keep(i))
            .flat_map(|i| self.rows[self.offsets[i]..self.offsets[i + 1]].iter().copied())
            .collect()
    }
}

fn null_of(rows: &[SweepRow]) -> Vec<SweepRow> {
    rows.iter().map(|r| SweepRow { anomaly: 0.5, ..*r }).collect()
}

/// Leave-one-category-out over `candidates` (at least one). The candidate of a fold is the one
/// with the best `standard` score on the training categories (first wins ties, so list the
/// default first); thresholds are optimised per profile on the training categories.
///
/// # Errors
/// No candidate, or score vectors that do not match the corpus.
pub fn loco(corpus: &NabCorpus, candidates: &[Candidate]) -> Result<Vec<CvResult>, EvalError> {
    if candidates.is_empty() {
        return Err(super::format_err(&corpus.root, "cross-validation needs a candidate"));
    }
    let swept = candidates
        .iter()
        .map(|c| Swept::of(corpus, &c.scores))
        .collect::<Result<Vec<_>, _>>()?;
    let n_ids = swept[0].n_ids;
    let cats = categories(corpus);
    let standard = corpus
        .profiles
        .iter()
        .find(|p| p.name == "standard")
        .or_else(|| corpus.profiles.first())
        .cloned();
    let mut folds_by_profile: Vec<Vec<Fold>> = vec![Vec::new(); corpus.profiles.len()];
    for cat in &cats {
        let in_fold = |i: usize| category(&corpus.series[i].name) == cat;
        // Knobs: the best candidate on the training categories.
        let chosen = match &standard {
            Some(p) => best_on(&swept, |i| !in_fold(i), n_ids, p),
            None => 0,
        };
        let train = swept[chosen].subset(|i| !in_fold(i));
        let test = swept[chosen].subset(in_fold);
        let (null_train, null_test) = (null_of(&train), null_of(&test));
        let windows: usize = (0..corpus.series.len())
            .filter(|&i| in_fold(i))
            .map(|i| corpus.windows[i].len())
            .sum();
        for (p, folds) in corpus.profiles.iter().zip(&mut folds_by_profile) {
            let threshold = nab::optimize_threshold(&train, n_ids, p).threshold;
            let null_threshold = nab::optimize_threshold(&null_train, n_ids, p).threshold;
            let held = nab::score_at(&test, n_ids, p, threshold);
            #[expect(clippy::cast_precision_loss, reason = "window counts are small")]
            let perfect_score = windows as f64 * p.tp;
            folds.push(Fold {
                category: cat.clone(),
                chosen: candidates[chosen].name.clone(),
                threshold,
                score: held.score,
                null_score: nab::score_at(&null_test, n_ids, p, null_threshold).score,
                perfect_score,
                windows: (held.windows_detected, windows),
                score_own_threshold: nab::optimize_threshold(&test, n_ids, p).score,
                null_score_own_threshold: nab::optimize_threshold(&null_test, n_ids, p).score,
            });
        }
    }
    Ok(corpus
        .profiles
        .iter()
        .zip(folds_by_profile)
        .map(|(p, folds)| {
            let sum = |f: fn(&Fold) -> f64| folds.iter().map(f).sum::<f64>();
            let (s, n, perfect) = (sum(|f| f.score), sum(|f| f.null_score), sum(|f| f.perfect_score));
            let (so, no) = (sum(|f| f.score_own_threshold), sum(|f| f.null_score_own_threshold));
            CvResult {
                profile: p.name.clone(),
                normalized_own_threshold: 100.0 * (so - no) / (perfect - no),
                normalized: 100.0 * (s - n) / (perfect - n),
                folds,
            }
        })
        .collect())
}

/// Index of the candidate with the best raw score (threshold optimised) on the files `keep`
/// selects; the first of equals.
fn best_on(swept: &[Swept], keep: impl Fn(usize) -> bool + Copy, n_ids: u32, p: &Profile) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, s) in swept.iter().enumerate() {
        let score = nab::optimize_threshold(&s.subset(keep), n_ids, p).score;
        if score > best.1 {
            best = (i, score);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::eval::nab::{NabSeries, default_profiles};

    /// Two categories of one 100-row file each, one window per file at rows 40..=49.
    fn corpus() -> NabCorpus {
        let series = ["a/1.csv", "b/1.csv"]
            .into_iter()
            .map(|name| NabSeries {
                name: name.into(),
                timestamps: (0..100).collect(),
                values: vec![0.0; 100],
            })
            .collect();
        NabCorpus {
            root: PathBuf::from("mem"),
            series,
            windows: vec![vec![(40, 49)], vec![(40, 49)]],
            profiles: default_profiles(),
        }
    }

    fn spike(at: usize, height: f64) -> Vec<f64> {
        let mut v = vec![0.0; 100];
        v[at] = height;
        v
    }

    #[test]
    fn a_threshold_tuned_on_the_other_category_is_what_scores_the_left_out_one() {
        let c = corpus();
        // File a detects its window at 0.9; file b's detection is only 0.6. Tuned on a, the
        // threshold (0.9) misses b's window; tuned on b (0.6) it catches a's.
        let cand = Candidate {
            name: "x".into(),
            scores: vec![spike(40, 0.9), spike(40, 0.6)],
        };
        let r = loco(&c, &[cand]).expect("cv");
        let std = &r[0];
        assert_eq!(std.folds.len(), 2);
        assert_eq!((std.folds[0].category.as_str(), std.folds[0].windows), ("a", (1, 1)));
        assert_eq!((std.folds[1].category.as_str(), std.folds[1].windows), ("b", (0, 1)));
        // One window found of two, the null detector finds both with every row an alarm.
        assert!(std.normalized < 100.0 && std.normalized > 0.0, "{}", std.normalized);
        // In-sample the same scores find both windows: cross-validation is stricter.
        let in_sample = nab::score_corpus(&c, &[spike(40, 0.9), spike(40, 0.6)]).expect("score");
        assert!(in_sample[0].normalized > std.normalized + 1.0);
    }

    #[test]
    fn each_fold_picks_the_candidate_best_on_the_other_categories() {
        let c = corpus();
        // "early" is best on both files, "fp" raises a false alarm on a and misses nothing.
        let early = Candidate {
            name: "early".into(),
            scores: vec![spike(40, 0.9), spike(40, 0.9)],
        };
        let mut fp = spike(40, 0.9);
        fp[80] = 0.95;
        let noisy = Candidate {
            name: "noisy".into(),
            scores: vec![fp, spike(48, 0.9)],
        };
        let r = loco(&c, &[noisy, early]).expect("cv");
        assert!(r[0].folds.iter().all(|f| f.chosen == "early"), "{:?}", r[0].folds);
        assert!((r[0].normalized - 100.0).abs() < 1e-9, "{}", r[0].normalized);
        assert!(loco(&c, &[]).is_err());
    }
}
