//! Throughput of each detector on one core: `cargo bench -p graywatch-detect --bench throughput`.
//! Prints samples/s and ns/sample; no assertions (speed is measured here, never in tests).

use std::hint::black_box;
use std::time::Instant;

use graywatch_detect::detectors::{CusumConfig, HalfSpaceTreesConfig, HoltConfig, PageHinkleyConfig, RobustZConfig};
use graywatch_detect::{
    Cusum, Detector, GrayDetector, GrayDetectorConfig, HalfSpaceTrees, Holt, PageHinkley, RobustZ, SignalScorer,
    SignalScorerConfig,
};

fn series(n: usize) -> Vec<f64> {
    // Noisy daily-ish signal with occasional spikes; xorshift for noise.
    let mut s = 0x2545_f491_4f6c_dd1d_u64;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f64 / (1u64 << 53) as f64;
            let base = 10.0 + 3.0 * (i as f64 / 288.0 * std::f64::consts::TAU).sin();
            if i % 997 == 0 { base * 5.0 } else { base + u }
        })
        .collect()
}

fn bench(name: &str, mut d: Box<dyn Detector>, xs: &[f64]) {
    // Warm caches and the detector's baselines.
    for (i, &x) in xs.iter().take(10_000).enumerate() {
        d.update(i as f64, x);
    }
    let start = Instant::now();
    let mut acc = 0.0;
    for (i, &x) in xs.iter().enumerate() {
        acc += d.update(black_box(i as f64 * 10.0), black_box(x)).score;
    }
    let secs = start.elapsed().as_secs_f64();
    black_box(acc);
    let n = xs.len() as f64;
    println!("| {name:<18} | {:>14.0} | {:>8.1} |", n / secs, secs * 1e9 / n);
}

fn main() {
    let n = std::env::var("BENCH_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000usize);
    let xs = series(n);
    println!("{n} samples per detector, one thread\n");
    println!("| {:<18} | {:>14} | {:>8} |", "detector", "samples/s", "ns/sample");
    println!("|{:-<20}|{:->16}|{:->10}|", "", ":", ":");
    bench(
        "robust_z",
        Box::new(RobustZ::new(RobustZConfig::default()).expect("cfg")),
        &xs,
    );
    bench("cusum", Box::new(Cusum::new(CusumConfig::default()).expect("cfg")), &xs);
    bench(
        "page_hinkley",
        Box::new(PageHinkley::new(PageHinkleyConfig::default()).expect("cfg")),
        &xs,
    );
    bench(
        "half_space_trees",
        Box::new(HalfSpaceTrees::new(HalfSpaceTreesConfig::default()).expect("cfg")),
        &xs,
    );
    bench("holt", Box::new(Holt::new(HoltConfig::default()).expect("cfg")), &xs);
    bench(
        "gray",
        Box::new(GrayDetector::new(GrayDetectorConfig::default()).expect("cfg")),
        &xs,
    );
    bench(
        "signal_scorer",
        Box::new(SignalScorer::new(SignalScorerConfig::default()).expect("cfg")),
        &xs,
    );
}
