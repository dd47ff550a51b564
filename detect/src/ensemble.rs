//! [`GrayDetector`]: the detector combination graywatch ships and evaluates on NAB.

use serde::{Deserialize, Serialize};

use crate::detectors::Clock;
use crate::tail::TailHistogram;
use crate::{ConfigError, Detector, DetectorOutput, check_range, sanitize, squash};

/// Time-of-day buckets of the seasonal baseline (30 min each).
const SEASON: usize = 48;
const DAY_SECS: f64 = 86_400.0;

/// Config of [`GrayDetector`]. Defaults were chosen on NAB's dev subset only (see README).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrayDetectorConfig {
    /// EWMA weight (floored at 1/n, so it starts as a cumulative mean) of the long-memory mean
    /// and variance of the value.
    pub level_alpha: f64,
    /// Use the time-of-day baseline (daily seasonality).
    pub seasonal: bool,
    /// EWMA weight (floored at 1/n) of each time-of-day bucket's mean.
    pub season_alpha: f64,
    /// Samples a bucket needs before its residuals count.
    pub season_min: u64,
    /// |z| at which the score is 0.5.
    pub z_half: f64,
    /// Scores are divided by `(1 + c)^gamma`, where c counts (with forgetting) past samples at
    /// least as extreme: a spike this series produces every day is less news than a new one.
    pub recurrence_gamma: f64,
    /// Forgetting factor (per sample) of that count.
    pub recurrence_forget: f64,
    /// Half-life, in samples, of the level of the last alarm.
    pub refractory_half_life: f64,
    /// A new alarm needs a score above the decayed alarm level plus this margin: one alarm per
    /// event, not one per sample of a ramp.
    pub refractory_margin: f64,
    /// Factor applied to scores that do not raise a new alarm.
    pub refractory_factor: f64,
    /// Samples before the detector reports.
    pub warmup: u32,
    /// Score factor for a sample inside the range seen so far (running max/min).
    pub in_range_factor: f64,
    /// Factor on the time-of-day score for a sample inside the range.
    pub in_range_season_factor: f64,
    /// Half-life, in samples, of the running max/min's distance from the mean (0 = never
    /// forget an extreme).
    pub range_half_life: f64,
}

impl Default for GrayDetectorConfig {
    fn default() -> Self {
        Self {
            level_alpha: 0.0002,
            seasonal: true,
            season_alpha: 0.05,
            season_min: 5,
            z_half: 5.0,
            recurrence_gamma: 0.1,
            recurrence_forget: 0.0005,
            refractory_half_life: 300.0,
            refractory_margin: 0.1,
            refractory_factor: 0.2,
            warmup: 50,
            in_range_factor: 0.8,
            in_range_season_factor: 0.9,
            range_half_life: 5000.0,
        }
    }
}

/// Gray-failure detector: the worst of two Gaussian z-scores — the value against its
/// long-memory mean/variance, and the value against its time-of-day baseline (residual scale
/// pooled over the day) — discounted when the value stays inside the range the series has
/// already visited and when the series has produced such extremes before, and made sparse by a
/// decaying refractory level (one alarm per event).
///
/// Memory: about 2 KiB per series, allocated once.
#[derive(Debug, Clone)]
pub struct GrayDetector {
    cfg: GrayDetectorConfig,
    level: MeanVar,
    season: Box<[MeanVar; SEASON]>,
    season_resid: MeanVar,
    history: TailHistogram,
    /// Running max of the value, decaying towards the mean.
    hi: f64,
    /// Running min of the value, decaying towards the mean.
    lo: f64,
    range_decay: f64,
    n: u64,
    alarm_level: f64,
    decay: f64,
    clock: Clock,
}

impl GrayDetector {
    /// Build from a validated config.
    ///
    /// # Errors
    /// A parameter out of range.
    pub fn new(cfg: GrayDetectorConfig) -> Result<Self, ConfigError> {
        check_range("level_alpha", cfg.level_alpha, 1e-9, 1.0, "0 < alpha <= 1")?;
        check_range("season_alpha", cfg.season_alpha, 1e-9, 1.0, "0 < alpha <= 1")?;
        check_range("z_half", cfg.z_half, 1e-3, 1e6, "positive")?;
        check_range("recurrence_gamma", cfg.recurrence_gamma, 0.0, 10.0, "0..=10")?;
        check_range("recurrence_forget", cfg.recurrence_forget, 0.0, 0.5, "0..=0.5")?;
        check_range(
            "refractory_half_life",
            cfg.refractory_half_life,
            0.0,
            1e9,
            "non-negative samples",
        )?;
        check_range("refractory_margin", cfg.refractory_margin, 0.0, 1.0, "0..=1")?;
        check_range("refractory_factor", cfg.refractory_factor, 0.0, 1.0, "0..=1")?;
        check_range("in_range_factor", cfg.in_range_factor, 0.0, 1.0, "0..=1")?;
        check_range("in_range_season_factor", cfg.in_range_season_factor, 0.0, 1.0, "0..=1")?;
        check_range("range_half_life", cfg.range_half_life, 0.0, 1e12, "non-negative")?;
        let decay = if cfg.refractory_half_life > 0.0 {
            0.5f64.powf(1.0 / cfg.refractory_half_life)
        } else {
            0.0
        };
        Ok(Self {
            level: MeanVar::default(),
            season: Box::new([MeanVar::default(); SEASON]),
            season_resid: MeanVar::default(),
            history: TailHistogram::new(cfg.recurrence_forget),
            hi: 0.0,
            lo: 0.0,
            range_decay: if cfg.range_half_life > 0.0 {
                0.5f64.powf(1.0 / cfg.range_half_life)
            } else {
                1.0
            },
            n: 0,
            alarm_level: 0.0,
            decay,
            clock: Clock::default(),
            cfg,
        })
    }

    /// Score `x` against the baselines learnt so far without learning from it: the squashed
    /// worst of the level and time-of-day z, with none of the "seen that before" discounts or the
    /// refractory level (a caller that freezes the baseline during a fault wants "how far from
    /// normal", not "how new"). Not ready during warm-up.
    #[must_use]
    pub fn peek(&self, t_secs: f64, x: f64) -> DetectorOutput {
        let Some(x) = sanitize(x) else {
            return DetectorOutput::NONE;
        };
        if self.n < u64::from(self.cfg.warmup) {
            return DetectorOutput::NONE;
        }
        let t = self.clock.peek(t_secs);
        let mut z = self.level.z(x);
        if self.cfg.seasonal {
            let m = &self.season[Self::season_bucket(t)];
            if m.n >= self.cfg.season_min {
                let zs = self.season_resid.z(x - m.mean);
                if zs.abs() > z.abs() {
                    z = zs;
                }
            }
        }
        DetectorOutput {
            score: squash(z, self.cfg.z_half),
            z,
            ready: true,
        }
    }

    #[inline]
    fn season_bucket(t: f64) -> usize {
        #[expect(clippy::cast_precision_loss, reason = "SEASON is small")]
        let width = DAY_SECS / SEASON as f64;
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "rem_euclid is in [0, DAY_SECS)"
        )]
        let b = (t.rem_euclid(DAY_SECS) / width) as usize;
        b.min(SEASON - 1)
    }
}

impl Detector for GrayDetector {
    #[expect(clippy::many_single_char_names, reason = "the names of the detector's formulas")]
    fn update(&mut self, t_secs: f64, x: f64) -> DetectorOutput {
        let (t, _) = self.clock.tick(t_secs);
        let Some(x) = sanitize(x) else {
            return DetectorOutput::NONE;
        };
        self.n = self.n.saturating_add(1);
        let mut z = self.level.update(x, self.cfg.level_alpha);
        let mut zmax = z.abs();
        let mut z_season = 0.0f64;
        if self.cfg.seasonal {
            let m = &mut self.season[Self::season_bucket(t)];
            let resid = x - m.mean;
            let seasoned = m.n >= self.cfg.season_min;
            m.update(x, self.cfg.season_alpha);
            if seasoned {
                // Residual scale pooled over all buckets: one bucket alone has too few samples.
                let zs = self.season_resid.update(resid, self.cfg.level_alpha);
                if zs.abs() > zmax {
                    // The output's z is the dominant deviation, with its sign (which side).
                    z = zs;
                }
                zmax = zmax.max(zs.abs());
                z_season = zs.abs();
            }
        }
        // Beyond the range seen so far (running max/min, decaying towards the mean)? Real
        // incidents usually are; the everyday spikes of a spiky series usually are not.
        let out_of_range = self.n > 2 && (x > self.hi || x < self.lo);
        if self.n <= 1 {
            self.hi = x;
            self.lo = x;
        } else {
            let m = self.level.mean;
            self.hi = x.max(m + (self.hi - m) * self.range_decay);
            self.lo = x.min(m + (self.lo - m) * self.range_decay);
        }
        let mut s = squash(zmax, self.cfg.z_half);
        if !out_of_range {
            // In range, the time-of-day evidence (a missing peak, a flat stretch) still counts
            // almost fully: those anomalies are in range by nature.
            s = (s * self.cfg.in_range_factor).max(squash(z_season, self.cfg.z_half) * self.cfg.in_range_season_factor);
        }
        if self.cfg.recurrence_gamma > 0.0 {
            let c = self.history.exceedances(zmax);
            self.history.add(zmax);
            s *= (1.0 + c).powf(-self.cfg.recurrence_gamma);
        }
        if self.n < u64::from(self.cfg.warmup) {
            return DetectorOutput::NONE;
        }
        self.alarm_level *= self.decay;
        let out = if s > self.alarm_level + self.cfg.refractory_margin || self.alarm_level < 1e-12 {
            self.alarm_level = s;
            s
        } else {
            s * self.cfg.refractory_factor
        };
        DetectorOutput {
            score: if out.is_finite() { out.clamp(0.0, 1.0) } else { 0.0 },
            z,
            ready: true,
        }
    }
    fn reset(&mut self) {
        self.level = MeanVar::default();
        *self.season = [MeanVar::default(); SEASON];
        self.season_resid = MeanVar::default();
        self.history.reset();
        self.hi = 0.0;
        self.lo = 0.0;
        self.n = 0;
        self.alarm_level = 0.0;
        self.clock = Clock::default();
    }
    fn name(&self) -> &'static str {
        "gray"
    }
}

/// Plain (non-robust) EWMA mean and variance, weight floored at 1/n so it starts as the
/// cumulative mean. Deliberately not robust: heavy tails widen it, so a series that always
/// spikes does not look anomalous on every spike.
#[derive(Debug, Clone, Copy, Default)]
struct MeanVar {
    n: u64,
    mean: f64,
    var: f64,
}

impl MeanVar {
    /// Signed z of `x` against the current mean and variance, without folding it in (clamped
    /// to ±1e6; 0 before two samples).
    fn z(&self, x: f64) -> f64 {
        if self.n >= 2 {
            let d = x - self.mean;
            let z = d / self.var.sqrt();
            if z.is_finite() {
                z.clamp(-1e6, 1e6)
            } else if d == 0.0 {
                0.0
            } else {
                1e6f64.copysign(d)
            }
        } else {
            0.0
        }
    }

    /// Signed z of `x` before folding it in (see [`MeanVar::z`]).
    fn update(&mut self, x: f64, alpha: f64) -> f64 {
        let z = self.z(x);
        self.n = self.n.saturating_add(1);
        #[expect(clippy::cast_precision_loss, reason = "sample counts")]
        let a = alpha.max(1.0 / self.n as f64);
        let d = x - self.mean;
        self.mean += a * d;
        self.var = (1.0 - a) * (self.var + a * d * d);
        if !self.mean.is_finite() || !self.var.is_finite() {
            *self = Self::default();
        }
        z
    }
}
