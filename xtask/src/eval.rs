//! `cargo xtask eval`: detector evaluation harness (NAB, Microsoft cloud-monitoring).
//!
//! Thin CLI over `graywatch_detect::eval`; all loading and scoring lives in the library.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use graywatch_detect::eval::{self, cv, ms, nab};

#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(subcommand)]
    command: EvalCommand,
}

#[derive(clap::Subcommand)]
enum EvalCommand {
    /// Score detectors on a NAB-format corpus with NAB's scorer (three profiles).
    Nab(NabArgs),
    /// Precision / recall / F1 / delay on the Microsoft cloud-monitoring set (point labels).
    Ms(MsArgs),
}

#[derive(clap::Args)]
struct NabArgs {
    /// Corpus root: data/, `labels/combined_windows.json`, config/profiles.json. Default: the
    /// repository's datasets/nab-dev.tar.xz, unpacked into the target dir (or
    /// $GRAYWATCH_DATASETS/nab-dev).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Comma-separated detectors to run (default: all).
    #[arg(long, value_delimiter = ',')]
    detectors: Vec<String>,
    /// Score NAB-format result files instead of running our detectors: DIR/<det>/<category>/
    /// <det>_<file>.csv for every detector directory in DIR, or DIR/<category>/... for one.
    /// Without DIR: the corpus's own reference/ (NAB's published outputs).
    #[arg(long)]
    #[expect(
        clippy::option_option,
        reason = "clap: absent, `--reference` alone, or `--reference DIR`"
    )]
    reference: Option<Option<PathBuf>>,
    /// Also write `{"<detector>": {"standard": x, "reward_low_FP": y, "reward_low_FN": z}}` here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// JSON overriding fields of the detectors' default configs, nested objects merged field by
    /// field (e.g. '{"direction": "both"}' for `shipped`). Applies to every detector run.
    #[arg(long)]
    config: Option<String>,
    /// Cross-validation: `loco` = leave one NAB category out (knobs and threshold tuned on the
    /// other categories, the left-out one scored, rotated), with each knob's sensitivity.
    #[arg(long, value_enum)]
    cv: Option<CvMode>,
    /// Write NAB-format per-row result files (`timestamp,value,anomaly_score,label`) of our
    /// detectors to DIR/<det>/<category>/<det>_<file>.csv.
    #[arg(long)]
    write_results: Option<PathBuf>,
}

#[derive(clap::Args)]
struct MsArgs {
    /// Dataset root (holding data/<domain>/<series>.csv). Default: the repository's
    /// datasets/ms-cloud-monitoring.tar.xz, unpacked into the target dir (or
    /// $GRAYWATCH_DATASETS/ms-cloud-monitoring).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Comma-separated detectors to run (default: all).
    #[arg(long, value_delimiter = ',')]
    detectors: Vec<String>,
    /// Also write {"<detector>": {"precision": p, ...}} here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// JSON overriding fields of the detectors' default configs (see `eval nab --config`).
    #[arg(long)]
    config: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CvMode {
    /// Leave one category out.
    Loco,
}

pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    match &args.command {
        EvalCommand::Nab(a) => run_nab(a),
        EvalCommand::Ms(a) => run_ms(a),
    }
}

/// `--data`, else the shipped dataset `name` (see `graywatch_detect::eval::datasets`).
fn dataset_dir(data: Option<&PathBuf>, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(d) = data {
        return Ok(d.clone());
    }
    let root = crate::util::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    eval::datasets::locate(name, &root, &target.join("graywatch-datasets"))
        .with_context(|| format!("dataset {name} (datasets/{name}.tar.xz, or set GRAYWATCH_DATASETS)"))
}

fn detector_list(requested: &[String]) -> Vec<String> {
    if requested.is_empty() {
        eval::DETECTORS.iter().map(|s| (*s).to_owned()).collect()
    } else {
        requested.to_vec()
    }
}

/// Detector directories under a reference dir: the dir itself if it holds categories.
fn reference_detectors(dir: &Path, corpus: &nab::NabCorpus) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let first_cat = corpus
        .series
        .first()
        .and_then(|s| s.name.split_once('/'))
        .map(|(c, _)| c.to_owned())
        .context("empty corpus")?;
    if dir.join(&first_cat).is_dir() {
        let name = dir
            .file_name()
            .context("reference dir has no name")?
            .to_string_lossy()
            .into_owned();
        return Ok(vec![(name, dir.to_path_buf())]);
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.join(&first_cat).is_dir()
            && let Some(n) = p.file_name()
        {
            out.push((n.to_string_lossy().into_owned(), p.clone()));
        }
    }
    out.sort();
    anyhow::ensure!(!out.is_empty(), "no detector result directories in {}", dir.display());
    Ok(out)
}

fn run_nab(a: &NabArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let data = dataset_dir(a.data.as_ref(), "nab-dev")?;
    let corpus = nab::NabCorpus::load(&data).with_context(|| format!("loading NAB corpus {}", data.display()))?;
    let rows: usize = corpus.series.iter().map(|s| s.values.len()).sum();
    println!(
        "NAB corpus {}: {} files, {} rows, {} windows (loaded in {:.2} s)",
        data.display(),
        corpus.series.len(),
        rows,
        corpus.window_count(),
        t0.elapsed().as_secs_f64()
    );
    if a.cv.is_some() {
        return run_loco(a, &corpus);
    }
    let mut jobs: Vec<(String, Vec<Vec<f64>>, f64)> = Vec::new();
    if let Some(dir) = &a.reference {
        let dir = dir.clone().unwrap_or_else(|| data.join("reference"));
        for (det, path) in reference_detectors(&dir, &corpus)? {
            let t = Instant::now();
            let scores = corpus.load_results(&path, &det)?;
            let secs = t.elapsed().as_secs_f64();
            if let Some(out) = &a.write_results {
                write_results(out, &det, &corpus, &scores)?;
            }
            jobs.push((det, scores, secs));
        }
    } else {
        for det in detector_list(&a.detectors) {
            let t = Instant::now();
            let scores = run_corpus(&corpus, &det, a.config.as_deref())?;
            let secs = t.elapsed().as_secs_f64();
            if let Some(out) = &a.write_results {
                write_results(out, &det, &corpus, &scores)?;
            }
            jobs.push((det, scores, secs));
        }
    }
    let profiles: Vec<String> = corpus.profiles.iter().map(|p| p.name.clone()).collect();
    println!();
    print!("| {:<18} |", "detector");
    for p in &profiles {
        print!(" {p:>18} |");
    }
    println!(" {:>10} | {:>12} |", "run (s)", "samples/s");
    print!("|{:-<20}|", "");
    for _ in &profiles {
        print!("{:->20}|", ":");
    }
    println!("{:->12}|{:->14}|", ":", ":");
    let mut json = serde_json::Map::new();
    let mut details = Vec::new();
    for (det, scores, secs) in &jobs {
        let results = nab::score_corpus(&corpus, scores)?;
        print!("| {det:<18} |");
        let mut obj = serde_json::Map::new();
        for r in &results {
            print!(" {:>18.2} |", r.normalized);
            // Scripts read the short profile names ("reward_low_FP", not NAB's "..._rate").
            let key = r.profile.strip_suffix("_rate").unwrap_or(&r.profile);
            obj.insert(key.to_owned(), serde_json::json!(r.normalized));
            details.push(format!(
                "{det:<18} {:<20} threshold {:<14.12} raw {:>10.4} TP {:>5} FP {:>6} windows {}/{}",
                r.profile,
                r.best.threshold,
                r.best.score,
                r.best.tp,
                r.best.fp,
                r.best.windows_detected,
                corpus.window_count()
            ));
        }
        #[expect(clippy::cast_precision_loss, reason = "row counts")]
        let rate = rows as f64 / secs.max(1e-9);
        if a.reference.is_some() {
            println!(" {secs:>10.3} | {:>12} |", "-");
        } else {
            println!(" {secs:>10.3} | {rate:>12.0} |");
        }
        json.insert(det.clone(), serde_json::Value::Object(obj));
    }
    println!();
    for d in &details {
        println!("{d}");
    }
    println!("\ntotal {:.2} s", t0.elapsed().as_secs_f64());
    if let Some(path) = &a.json {
        write_json(path, &serde_json::Value::Object(json))?;
    }
    Ok(())
}

/// Per-file scores of detector `det` (config overridden by `config`) over the corpus.
fn run_corpus(corpus: &nab::NabCorpus, det: &str, config: Option<&str>) -> anyhow::Result<Vec<Vec<f64>>> {
    let mut d = eval::make_detector_with(det, config)?;
    Ok(corpus
        .series
        .iter()
        .map(|s| eval::run_series(d.as_mut(), &s.timestamps, &s.values))
        .collect())
}

/// `--cv loco`: per detector, every combination of its knobs (`eval::knobs`) on top of
/// `--config`; in-sample figures of the defaults, each knob's sensitivity (in-sample standard,
/// the other knobs at their defaults), and leave-one-category-out with the knobs tuned and with
/// the defaults fixed (threshold tuned only).
fn run_loco(a: &NabArgs, corpus: &nab::NabCorpus) -> anyhow::Result<()> {
    let mut json = serde_json::Map::new();
    for det in detector_list(&a.detectors) {
        let knobs = eval::knobs(&det);
        let base: serde_json::Value = match &a.config {
            Some(c) => serde_json::from_str(c).context("--config")?,
            None => serde_json::json!({}),
        };
        let mut candidates = Vec::new();
        let mut in_sample = Vec::new();
        for (label, over) in eval::grid(&knobs) {
            let mut merged = base.clone();
            eval::merge(&mut merged, &over);
            let scores = run_corpus(corpus, &det, Some(&merged.to_string()))?;
            in_sample.push(nab::score_corpus(corpus, &scores)?);
            candidates.push(cv::Candidate {
                name: if label.is_empty() { "defaults".into() } else { label },
                scores,
            });
        }
        let tuned = cv::loco(corpus, &candidates)?;
        let fixed = cv::loco(corpus, &candidates[..1])?;
        println!(
            "\n## {det}: {} knob combination(s), {} folds\n",
            candidates.len(),
            tuned[0].folds.len()
        );
        println!(
            "| {:<34} | {:>10} | {:>13} | {:>13} |",
            "", "standard", "reward_low_FP", "reward_low_FN"
        );
        println!("|{:-<36}|{:->12}|{:->15}|{:->15}|", "", ":", ":", ":");
        let row = |name: &str, v: &[f64]| {
            println!("| {name:<34} | {:>10.2} | {:>13.2} | {:>13.2} |", v[0], v[1], v[2]);
        };
        let defaults: Vec<f64> = in_sample[0].iter().map(|r| r.normalized).collect();
        let loco_fixed: Vec<f64> = fixed.iter().map(|r| r.normalized).collect();
        let loco_tuned: Vec<f64> = tuned.iter().map(|r| r.normalized).collect();
        row("in-sample, defaults", &defaults);
        row("LOCO, defaults (threshold tuned)", &loco_fixed);
        row("LOCO, knobs and threshold tuned", &loco_tuned);
        let own: Vec<f64> = tuned.iter().map(|r| r.normalized_own_threshold).collect();
        row("LOCO knobs, threshold on left-out", &own);
        println!();
        for f in &tuned[0].folds {
            println!(
                "  left out {:<22} chose {:<40} threshold {:.4}  windows {}/{}",
                f.category, f.chosen, f.threshold, f.windows.0, f.windows.1
            );
        }
        // Sensitivity: one knob moved at a time (grid order: the first knob varies fastest).
        let mut stride = 1;
        for k in &knobs {
            let figures: Vec<String> = (0..k.values.len())
                .map(|i| format!("{}: {:.2}", k.values[i], in_sample[i * stride][0].normalized))
                .collect();
            println!("  sensitivity {:<24} {}", k.path, figures.join(", "));
            stride *= k.values.len();
        }
        let profile_map = |v: &[f64]| {
            let mut m = serde_json::Map::new();
            for (r, x) in tuned.iter().zip(v) {
                let key = r.profile.strip_suffix("_rate").unwrap_or(&r.profile);
                m.insert(key.to_owned(), serde_json::json!(x));
            }
            serde_json::Value::Object(m)
        };
        json.insert(
            det.clone(),
            serde_json::json!({
                "in_sample": profile_map(&defaults),
                "loco_defaults": profile_map(&loco_fixed),
                "loco_tuned": profile_map(&loco_tuned),
            }),
        );
    }
    if let Some(path) = &a.json {
        write_json(path, &serde_json::Value::Object(json))?;
    }
    Ok(())
}

fn run_ms(a: &MsArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let data = dataset_dir(a.data.as_ref(), "ms-cloud-monitoring")?;
    let series = ms::load(&data).with_context(|| format!("loading MS dataset {}", data.display()))?;
    let rows: usize = series.iter().map(|s| s.values.len()).sum();
    println!(
        "MS cloud-monitoring {}: {} series, {} rows",
        data.display(),
        series.len(),
        rows
    );
    println!();
    println!(
        "| {:<18} | {:>9} | {:>9} | {:>6} | {:>6} | {:>8} | {:>7} | {:>11} | {:>11} | {:>9} |",
        "detector",
        "threshold",
        "precision",
        "recall",
        "F1",
        "segments",
        "alarms",
        "delay (row)",
        "delay (min)",
        "run (s)"
    );
    println!(
        "|{:-<20}|{:->11}|{:->11}|{:->8}|{:->8}|{:->10}|{:->9}|{:->13}|{:->13}|{:->11}|",
        "", ":", ":", ":", ":", ":", ":", ":", ":", ":"
    );
    let mut json = serde_json::Map::new();
    for det in detector_list(&a.detectors) {
        let mut d = eval::make_detector_with(&det, a.config.as_deref())?;
        let t = Instant::now();
        let scores: Vec<Vec<f64>> = series
            .iter()
            .map(|s| eval::run_series(d.as_mut(), &s.timestamps, &s.values))
            .collect();
        let secs = t.elapsed().as_secs_f64();
        let m = ms::best_f1(&series, &scores, 300);
        println!(
            "| {det:<18} | {:>9.4} | {:>9.3} | {:>6.3} | {:>6.3} | {:>3}/{:<4} | {:>7} | {:>11.1} | {:>11.1} | {secs:>9.3} |",
            m.threshold,
            m.precision,
            m.recall,
            m.f1,
            m.detected,
            m.segments,
            m.alarms,
            m.median_delay_rows,
            m.median_delay_secs / 60.0,
        );
        json.insert(
            det.clone(),
            serde_json::json!({
                "threshold": m.threshold,
                "precision": m.precision,
                "recall": m.recall,
                "f1": m.f1,
                "median_delay_rows": m.median_delay_rows,
                "median_delay_secs": m.median_delay_secs,
            }),
        );
    }
    println!("\ntotal {:.2} s", t0.elapsed().as_secs_f64());
    if let Some(path) = &a.json {
        write_json(path, &serde_json::Value::Object(json))?;
    }
    Ok(())
}

fn write_results(dir: &Path, det: &str, corpus: &nab::NabCorpus, scores: &[Vec<f64>]) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    for (i, s) in corpus.series.iter().enumerate() {
        let (cat, file) = s.name.split_once('/').context("file name without category")?;
        let d = dir.join(det).join(cat);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        let mut text = String::from("timestamp,value,anomaly_score,label\n");
        for (j, (&t, &v)) in s.timestamps.iter().zip(&s.values).enumerate() {
            let label = corpus.windows[i].iter().any(|&(a, b)| a <= t && t <= b);
            let _ = writeln!(text, "{},{v},{},{}", format_ts(t), scores[i][j], u8::from(label));
        }
        let path = d.join(format!("{det}_{file}"));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// µs since the epoch → `YYYY-MM-DD HH:MM:SS` (NAB's format).
fn format_ts(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

fn write_json(path: &Path, v: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}
