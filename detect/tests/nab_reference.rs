//! The NAB scorer reproduces NAB's own numbers on nab-dev (`reference/expected_scores.md` and
//! `expected_per_file_scores.csv`).

use std::path::PathBuf;
use std::sync::OnceLock;

use graywatch_detect::eval::datasets;
use graywatch_detect::eval::nab::{NabCorpus, score_at, score_corpus, sweep_file};

/// nab-dev: `datasets/nab-dev.tar.xz` unpacked into this test's target tmp dir on first use, or
/// `$GRAYWATCH_DATASETS/nab-dev`.
fn nab_dev() -> PathBuf {
    // cargo's run-time value first: the compiled-in one can come from another checkout sharing
    // the target dir.
    let manifest =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let workspace = manifest.parent().map_or_else(|| PathBuf::from(".."), PathBuf::from);
    datasets::locate(
        "nab-dev",
        &workspace,
        &PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("datasets"),
    )
    .unwrap_or_else(|e| panic!("nab-dev dataset (datasets/nab-dev.tar.xz, or set GRAYWATCH_DATASETS): {e}"))
}

/// The corpus and the three detectors' reference scores, loaded once for both tests (CSV
/// parsing dominates the run time in debug builds).
struct Data {
    corpus: NabCorpus,
    scores: Vec<Vec<Vec<f64>>>,
}

const DETECTORS: [&str; 3] = ["windowedGaussian", "bayesChangePt", "numenta"];

fn data() -> &'static Data {
    static DATA: OnceLock<Data> = OnceLock::new();
    DATA.get_or_init(|| {
        let root = nab_dev();
        let corpus = NabCorpus::load(&root).unwrap_or_else(|e| {
            panic!(
                "nab-dev corpus must be present at {} (set GRAYWATCH_DATASETS): {e}",
                root.display()
            )
        });
        let scores = DETECTORS
            .iter()
            .map(|det| {
                corpus
                    .load_results(&root.join("reference").join(det), det)
                    .expect("reference result files")
            })
            .collect();
        Data { corpus, scores }
    })
}

/// Full-precision expected scores from `reference/expected_scores.md`.
#[expect(
    clippy::unreadable_literal,
    reason = "copied digit for digit from NAB's reference results"
)]
const EXPECTED: &[(&str, [f64; 3])] = &[
    (
        "windowedGaussian",
        [50.871711986954935, 31.13034464638789, 59.01710860022705],
    ),
    (
        "bayesChangePt",
        [13.232017259340115, 6.53390214309826, 28.7218423519979],
    ),
    ("numenta", [72.76498504370909, 65.96528399112421, 76.86819898436327]),
];

#[test]
fn reference_scores_are_reproduced() {
    let Data { corpus, scores } = data();
    assert_eq!(corpus.series.len(), 34);
    assert_eq!(corpus.window_count(), 67);
    for ((det, expected), scores) in EXPECTED.iter().zip(scores) {
        let results = score_corpus(corpus, scores).expect("scoring");
        let names: Vec<&str> = results.iter().map(|r| r.profile.as_str()).collect();
        assert_eq!(names, ["standard", "reward_low_FP_rate", "reward_low_FN_rate"]);
        for (r, want) in results.iter().zip(expected) {
            assert!(
                (r.normalized - want).abs() < 1e-9,
                "{det} {}: got {} want {want}",
                r.profile,
                r.normalized
            );
        }
    }
}

#[test]
fn per_file_scores_match_nab_at_the_dev_thresholds() {
    let Data { corpus, scores: all } = data();
    let text = std::fs::read_to_string(nab_dev().join("reference/expected_per_file_scores.csv"))
        .expect("expected_per_file_scores.csv");
    let mut checked = 0;
    for (det, scores) in DETECTORS.iter().zip(all) {
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            if f[0] != *det {
                continue;
            }
            let profile = corpus.profiles.iter().find(|p| p.name == f[1]).expect("profile");
            let i = corpus.series.iter().position(|s| s.name == f[2]).expect("file");
            let threshold: f64 = f[3].parse().expect("threshold");
            let s = &corpus.series[i];
            let mut rows = Vec::new();
            let mut n_ids = 0;
            sweep_file(
                &s.name,
                &s.timestamps,
                &scores[i],
                &corpus.windows[i],
                &mut n_ids,
                &mut rows,
            )
            .expect("sweep");
            let got = score_at(&rows, n_ids, profile, threshold);
            let want: f64 = f[4].parse().expect("score");
            assert!((got.score - want).abs() < 1e-9, "{line}: got {}", got.score);
            let counts: Vec<u64> = f[5..9].iter().map(|c| c.parse().expect("count")).collect();
            assert_eq!(counts, [got.tp, got.tn, got.fp, got.fn_], "{line}");
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * 3 * 34);
}
