//! Predicted failure: will a rising series (a workload's memory working set) reach its limit
//! within a horizon, and how sure are we?
//!
//! The ETA is Holt's ([`Holt::time_to_cross`]): level and trend smoothed over irregular time
//! steps. The confidence is how steadily the series has been rising over the last
//! `fit_samples` samples: the R² of a least-squares line through them, counted only when that
//! line rises too (a Holt trend the recent samples do not bear out is no prediction). A steady
//! leak fits a line (R² near 1); noise around a level does not (R² near 0), whatever its Holt
//! trend happens to be. Pure and allocation-free per sample (the sample ring is allocated once).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::{
    ConfigError, Detector, check_range,
    detectors::{Holt, HoltConfig},
};

/// Config of [`CrossingForecast`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CrossingConfig {
    /// A crossing further away than this (seconds) is no prediction.
    pub horizon_secs: f64,
    /// Samples before any prediction (Holt's trend needs a few dozen to settle).
    pub warmup: u32,
    /// Samples the confidence (R² of a line) is computed over: the last this many.
    pub fit_samples: u32,
    /// Confidence below which nothing is predicted (noise floor; the aggregator's policy sets
    /// the confidence a condition needs).
    pub min_confidence: f64,
    /// Level smoothing of the Holt forecaster.
    pub alpha: f64,
    /// Trend smoothing of the Holt forecaster.
    pub beta: f64,
}

impl Default for CrossingConfig {
    fn default() -> Self {
        Self {
            horizon_secs: 600.0,
            warmup: 30,
            fit_samples: 30,
            min_confidence: 0.8,
            alpha: 0.3,
            beta: 0.1,
        }
    }
}

/// A predicted crossing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Crossing {
    /// Seconds from the last sample until the forecast reaches the threshold (≤ horizon).
    pub eta_secs: f64,
    /// In [0, 1]: the R² of the recent rise (see the module docs).
    pub confidence: f64,
    /// Smoothed level and trend (units, units per second) the ETA comes from.
    pub level: f64,
    pub trend_per_sec: f64,
}

/// One series' crossing forecast; see the module docs.
#[derive(Debug, Clone)]
pub struct CrossingForecast {
    cfg: CrossingConfig,
    holt: Holt,
    /// The last `fit_samples` (t, x).
    recent: VecDeque<(f64, f64)>,
    samples: u64,
}

impl CrossingForecast {
    /// Build from a validated config.
    ///
    /// # Errors
    /// A parameter out of range.
    pub fn new(cfg: CrossingConfig) -> Result<Self, ConfigError> {
        check_range("horizon_secs", cfg.horizon_secs, 1.0, 1e9, "positive seconds")?;
        check_range("fit_samples", f64::from(cfg.fit_samples), 3.0, 10_000.0, "3..=10000")?;
        check_range("min_confidence", cfg.min_confidence, 0.0, 1.0, "0..=1")?;
        let holt = Holt::new(HoltConfig {
            alpha: cfg.alpha,
            beta: cfg.beta,
            warmup: cfg.warmup,
            ..HoltConfig::default()
        })?;
        Ok(Self {
            holt,
            recent: VecDeque::with_capacity(cfg.fit_samples as usize),
            samples: 0,
            cfg,
        })
    }

    /// Feeds one sample (non-finite ones are ignored).
    pub fn update(&mut self, t_secs: f64, x: f64) {
        if !(t_secs.is_finite() && x.is_finite()) {
            return;
        }
        self.holt.update(t_secs, x);
        if self.recent.len() == self.cfg.fit_samples as usize {
            self.recent.pop_front();
        }
        self.recent.push_back((t_secs, x));
        self.samples = self.samples.saturating_add(1);
    }

    /// The crossing of `threshold` within the horizon, if the series is warm and rising steadily
    /// enough; `None` otherwise (flat, falling, noisy, too far away, already past it).
    #[must_use]
    pub fn predict(&self, threshold: f64) -> Option<Crossing> {
        if self.samples < u64::from(self.cfg.warmup) || self.recent.len() < 3 {
            return None;
        }
        let eta_secs = self.holt.time_to_cross(threshold)?;
        // Rising towards it, not already above it (a series over its limit is a failure, not a
        // forecast) and within the horizon.
        if self.holt.trend_per_sec() <= 0.0 || eta_secs <= 0.0 || eta_secs > self.cfg.horizon_secs {
            return None;
        }
        let confidence = rising_fit(&self.recent)?;
        (confidence >= self.cfg.min_confidence).then_some(Crossing {
            eta_secs,
            confidence,
            level: self.holt.level(),
            trend_per_sec: self.holt.trend_per_sec(),
        })
    }
}

/// R² of the least-squares line through `points` if its slope is positive; `None` for a flat,
/// falling or degenerate set.
fn rising_fit(points: &VecDeque<(f64, f64)>) -> Option<f64> {
    let n = points.len() as f64;
    let (mt, mx) = points
        .iter()
        .fold((0.0, 0.0), |(st, sx), (t, x)| (st + t / n, sx + x / n));
    let (mut stt, mut stx, mut sxx) = (0.0, 0.0, 0.0);
    for (t, x) in points {
        let (dt, dx) = (t - mt, x - mx);
        stt += dt * dt;
        stx += dt * dx;
        sxx += dx * dx;
    }
    if stt <= 0.0 || sxx <= 0.0 || stx <= 0.0 {
        return None;
    }
    let r2 = stx * stx / (stt * sxx);
    r2.is_finite().then(|| r2.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::detectors::SplitMix64;

    const MIB: f64 = 1024.0 * 1024.0;
    const LIMIT: f64 = 256.0 * MIB;

    fn forecaster() -> CrossingForecast {
        CrossingForecast::new(CrossingConfig::default()).expect("default config is valid")
    }

    /// A leak of 2 MiB/s from 20 MiB under a 256 MiB limit: predicted once warm, with an ETA
    /// within a few seconds of the true one, at high confidence; the ETA shrinks as it nears.
    #[test]
    fn a_steady_leak_is_predicted_with_a_sane_eta() {
        let mut f = forecaster();
        let mut rng = SplitMix64(7);
        let mut etas = Vec::new();
        for i in 0..100 {
            let t = f64::from(i);
            let x = 20.0 * MIB + 2.0 * MIB * t + (rng.next_f64() - 0.5) * MIB;
            f.update(t, x);
            if i < 29 {
                assert_eq!(f.predict(LIMIT), None, "warming up at sample {i}");
            }
            if i >= 40 {
                let c = f.predict(LIMIT).expect("a steady leak is predicted");
                let truth = (LIMIT - x) / (2.0 * MIB);
                assert!(
                    (c.eta_secs - truth).abs() < 10.0,
                    "eta {} vs {truth} at {i}",
                    c.eta_secs
                );
                assert!(c.confidence > 0.95, "{c:?}");
                etas.push(c.eta_secs);
            }
        }
        assert!(etas.windows(2).all(|w| w[1] < w[0]), "the ETA shrinks: {etas:?}");
    }

    /// The limit further away than the horizon: no prediction yet.
    #[test]
    fn a_crossing_beyond_the_horizon_is_not_predicted() {
        let mut f = forecaster();
        for i in 0..100 {
            f.update(f64::from(i), 20.0 * MIB + 0.1 * MIB * f64::from(i));
        }
        // (256 − 30) MiB at 0.1 MiB/s ≈ 2,260 s > 600 s.
        assert_eq!(f.predict(LIMIT), None);
        assert!(f.predict(60.0 * MIB).is_some(), "a nearer limit is within the horizon");
    }

    /// A leak that stops and is released: the prediction clears.
    #[test]
    fn a_reversal_clears_the_prediction() {
        let mut f = forecaster();
        let mut t = 0.0;
        let mut x = 20.0 * MIB;
        for _ in 0..60 {
            f.update(t, x);
            t += 1.0;
            x += 2.0 * MIB;
        }
        assert!(f.predict(LIMIT).is_some());
        for _ in 0..30 {
            f.update(t, x);
            t += 1.0;
            x -= 3.0 * MIB;
        }
        assert_eq!(f.predict(LIMIT), None);
    }

    #[test]
    fn bad_configs_are_refused() {
        for cfg in [
            CrossingConfig {
                horizon_secs: 0.0,
                ..CrossingConfig::default()
            },
            CrossingConfig {
                fit_samples: 2,
                ..CrossingConfig::default()
            },
            CrossingConfig {
                min_confidence: 1.5,
                ..CrossingConfig::default()
            },
            CrossingConfig {
                beta: 0.0,
                ..CrossingConfig::default()
            },
        ] {
            assert!(CrossingForecast::new(cfg).is_err(), "{cfg:?}");
        }
    }

    proptest! {
        /// Flat or falling series, with or without noise, never predict a crossing of a limit
        /// above them, however close the limit is.
        #[test]
        fn flat_or_falling_series_never_predict(
            level in 1.0e6f64..1.0e9,
            slope_frac in -0.01f64..=0.0,
            noise_frac in 0.0f64..0.05,
            headroom in 1.01f64..3.0,
            seed in any::<u64>(),
        ) {
            let mut f = forecaster();
            let mut rng = SplitMix64(seed);
            let limit = level * headroom + level * 0.2;
            for i in 0..200 {
                let t = f64::from(i);
                let x = level * (1.0 + slope_frac * t / 100.0) + (rng.next_f64() - 0.5) * 2.0 * noise_frac * level;
                f.update(t, x);
                // A noisy flat series leans up now and then (a Holt trend > 0), but its last
                // samples do not fit a rising line.
                let predicted = f.predict(limit);
                prop_assert!(predicted.is_none(), "predicted {predicted:?} at sample {i}");
            }
        }

        /// A steady rise towards a limit within the horizon is predicted once warm, with an ETA
        /// near the truth.
        #[test]
        fn steady_rises_are_predicted(
            start in 1.0e6f64..1.0e8,
            rate in 1.0e4f64..1.0e7,
            seconds_left in 60.0f64..500.0,
        ) {
            let mut f = forecaster();
            let n = 60;
            let last = start + rate * f64::from(n - 1);
            let limit = last + rate * seconds_left;
            for i in 0..n {
                f.update(f64::from(i), start + rate * f64::from(i));
            }
            let c = f.predict(limit);
            prop_assert!(c.is_some(), "no prediction");
            let c = c.expect("checked");
            prop_assert!((c.eta_secs - seconds_left).abs() < 0.05 * seconds_left + 2.0, "{c:?} vs {seconds_left}");
            prop_assert!(c.confidence > 0.99);
        }
    }
}
