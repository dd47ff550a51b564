//! Turning detector outputs into a local score per signal and per family, with a reason.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::detectors::{Direction, RobustZ, RobustZConfig};
use crate::ensemble::{GrayDetector, GrayDetectorConfig};
use crate::filters::{Persistence, WarmUp, WarmUpConfig};
use crate::{ConfigError, Detector, Family, check_range};

/// Config of one [`SignalScorer`]: the per-signal pipeline the agent runs and `cargo xtask eval`
/// scores (`shipped`). The default is what ships.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SignalScorerConfig {
    /// The anomaly score of a sample (long-memory and time-of-day z with its "seen that before"
    /// discounts, see [`GrayDetector`]).
    pub gray: GrayDetectorConfig,
    /// Robust (median-tracking) baseline: the ratio gate, the frozen baseline and the reason.
    pub robust: RobustZConfig,
    /// Which direction is bad (latency/loss/pressure: up).
    pub direction: Direction,
    /// A sample is "elevated" when its raw score reaches this.
    pub elevated: f64,
    /// k of the k-of-n persistence rule.
    pub persist_k: u32,
    /// n of the k-of-n persistence rule (≤ 64).
    pub persist_n: u32,
    /// Scores that are not persistent are capped here, below any Suspect threshold.
    pub transient_cap: f64,
    /// Warm-up after start / pod start.
    pub warmup: WarmUpConfig,
    /// Longest time the baseline stays frozen during an anomaly before the level is accepted
    /// as the new normal, in seconds.
    pub max_freeze_secs: f64,
    /// Ratios to baseline below this are never elevated (e.g. RTT 0.1 ms → 0.15 ms is noise
    /// however small the variance was). 1.0 disables.
    pub min_ratio: f64,
    /// Deviations from the baseline smaller than this, in the signal's unit, are never elevated
    /// (a series that sits at 0 has no scale: its first 0.01 % is otherwise an enormous z). The
    /// agent sets it per family ([`Family::min_change`]); 0 disables (unitless data, NAB).
    pub min_delta: f64,
    /// Score a sample at least as high as its robust (median/MAD) z says. A few extreme
    /// samples (a node busy while the agent warmed up) inflate the long-memory variance for
    /// hours but not the median's scale: without this, a later memory thrash at that level
    /// scored 0.65–0.77, under the aggregator's 0.75. The agent sets it for the node-level
    /// families (pressure, run-queue, steal), whose `min_delta` keeps noise out; off for NAB.
    pub robust_floor: bool,
    /// Half-life, in samples, of the level a new onset must rise past (see
    /// [`SignalScorer::onset`]): the level jumps to every score and decays towards 0.
    pub onset_half_life: f64,
    /// A score is an onset when it rises this much above that decayed level.
    pub onset_margin: f64,
}

impl Default for SignalScorerConfig {
    fn default() -> Self {
        Self {
            gray: GrayDetectorConfig {
                // No refractory damping: a fault that starts soon after a spike of its size
                // must still score (one alarm per event is the aggregator's job: it acts on
                // consecutive bad windows and announces transitions only). Costs 1.4 NAB points.
                refractory_factor: 1.0,
                // Ready with the rest of the pipeline (`warmup`: 30 samples, 30 s) rather than
                // after gray's own 50: a fault that starts between the two would be learned as
                // the baseline (an agent restarted 44 s before a memory thrash never flagged it).
                warmup: 30,
                ..GrayDetectorConfig::default()
            },
            robust: RobustZConfig {
                direction: Direction::Up,
                ..RobustZConfig::default()
            },
            direction: Direction::Up,
            elevated: 0.5,
            // 1-of-5: the first elevated sample counts (NAB: 3-of-5 loses 28 points, spikes
            // never persist and every detection comes two samples late); transient blips are
            // the aggregator's to ignore (several consecutive bad windows before acting).
            persist_k: 1,
            persist_n: 5,
            transient_cap: 0.3,
            warmup: WarmUpConfig::default(),
            max_freeze_secs: 600.0,
            min_ratio: 1.5,
            min_delta: 0.0,
            robust_floor: false,
            // GrayDetector's refractory figures (chosen on NAB): at one sample a second, a
            // fault that clears and returns within ~50 s is the same event.
            onset_half_life: 300.0,
            onset_margin: 0.1,
        }
    }
}

/// Scores one series (e.g. "rtt p99 to 10.0.2.7") in `[0, 1]`: warm-up → [`GrayDetector`] score
/// on the bad side only → ratio gate against the robust baseline → k-of-n persistence, with both
/// baselines frozen while the signal is persistently anomalous (up to `max_freeze_secs`).
#[derive(Debug, Clone)]
pub struct SignalScorer {
    cfg: SignalScorerConfig,
    gray: GrayDetector,
    z: RobustZ,
    persist: Persistence,
    warm: WarmUp,
    last_t: f64,
    last_x: f64,
    last_z: f64,
    last_score: f64,
    ready: bool,
    /// Start of the current persistent anomaly (baseline frozen since then).
    anomalous_since: Option<f64>,
    /// Baseline at the moment the anomaly started, for the reason.
    frozen_baseline: f64,
    /// The highest recent score, decaying (half-life `onset_half_life` samples).
    onset_level: f64,
    onset_decay: f64,
    last_onset: f64,
}

impl SignalScorer {
    /// Build from a validated config.
    ///
    /// # Errors
    /// A parameter out of range.
    pub fn new(cfg: SignalScorerConfig) -> Result<Self, ConfigError> {
        check_range("elevated", cfg.elevated, 0.0, 1.0, "0..=1")?;
        check_range("transient_cap", cfg.transient_cap, 0.0, 1.0, "0..=1")?;
        check_range("max_freeze_secs", cfg.max_freeze_secs, 0.0, 1e9, "non-negative")?;
        check_range("min_ratio", cfg.min_ratio, 0.0, 1e9, "non-negative")?;
        check_range("min_delta", cfg.min_delta, 0.0, f64::MAX, "non-negative")?;
        check_range("onset_half_life", cfg.onset_half_life, 1.0, 1e9, "1 or more samples")?;
        check_range("onset_margin", cfg.onset_margin, 0.0, 1.0, "0..=1")?;
        Ok(Self {
            gray: GrayDetector::new(cfg.gray)?,
            z: RobustZ::new(cfg.robust)?,
            persist: Persistence::new(cfg.persist_k, cfg.persist_n)?,
            warm: WarmUp::new(cfg.warmup),
            cfg,
            last_t: f64::NAN,
            last_x: f64::NAN,
            last_z: 0.0,
            last_score: 0.0,
            ready: false,
            anomalous_since: None,
            frozen_baseline: f64::NAN,
            onset_level: 0.0,
            onset_decay: 0.5f64.powf(1.0 / cfg.onset_half_life),
            last_onset: 0.0,
        })
    }

    /// The pod behind this series (re)started at `t`: restart the warm-up and the baselines.
    pub fn restart(&mut self, t: f64) {
        self.z.reset();
        self.gray.reset();
        self.persist.clear();
        self.warm.restart(t);
        self.anomalous_since = None;
        self.ready = false;
        self.last_score = 0.0;
        self.onset_level = 0.0;
        self.last_onset = 0.0;
    }

    /// Feed one sample; returns the score in `[0, 1]` (0 while warming up or for a NaN).
    pub fn update(&mut self, t: f64, x: f64) -> f64 {
        if x.is_nan() {
            self.last_onset = 0.0;
            return self.last_score;
        }
        let warm = self.warm.observe(t);
        let frozen = self
            .anomalous_since
            .is_some_and(|s| t.is_finite() && t - s < self.cfg.max_freeze_secs);
        let (zo, go) = if frozen {
            (self.z.peek(x), self.gray.peek(t, x))
        } else {
            (self.z.update(t, x), self.gray.update(t, x))
        };
        // Only the bad side counts (a latency drop is no gray failure).
        let mut raw = if self.cfg.direction.project(go.z) > 0.0 {
            go.score
        } else {
            0.0
        };
        if self.cfg.robust_floor && self.cfg.direction.project(zo.z) > 0.0 {
            raw = raw.max(zo.score);
        }
        let base = self.z.baseline();
        let (ratio_ok, delta) = match self.cfg.direction {
            Direction::Up => (x >= base * self.cfg.min_ratio || base <= 0.0, x - base),
            Direction::Down => (x * self.cfg.min_ratio <= base || base <= 0.0, base - x),
            Direction::Both => (true, (x - base).abs()),
        };
        if !ratio_ok || delta < self.cfg.min_delta {
            raw = raw.min(self.cfg.transient_cap);
        }
        self.ready = warm && zo.ready && go.ready;
        if !self.ready {
            raw = 0.0;
        }
        let elevated = raw >= self.cfg.elevated;
        let persistent = self.persist.push(elevated);
        let score = if persistent {
            raw
        } else {
            raw.min(self.cfg.transient_cap)
        };
        if !persistent {
            self.anomalous_since = None;
        } else if self.anomalous_since.is_none() {
            self.anomalous_since = Some(t);
            self.frozen_baseline = base;
        } else if !frozen {
            // Freeze expired: accept the current level as the new normal.
            self.anomalous_since = None;
            self.persist.clear();
        }
        self.last_t = t;
        self.last_x = x;
        self.last_z = zo.z;
        self.last_score = score.clamp(0.0, 1.0);
        self.onset_level *= self.onset_decay;
        self.last_onset = if self.ready && self.last_score > self.onset_level + self.cfg.onset_margin {
            self.last_score
        } else {
            0.0
        };
        // The level follows a held score, so a fault that lasts is one onset, not one per
        // half-life.
        self.onset_level = self.onset_level.max(self.last_score);
        self.last_score
    }

    /// The last sample's score if it starts a new anomaly, else 0: the score rose past the
    /// decayed level of the series' recent scores by `onset_margin`. One onset per event (a
    /// step, a spike, a flapping fault whose gaps are short next to `onset_half_life`), and a
    /// new one when the event grows. The agent counts those whose series is still elevated a
    /// window later (temporary problems, next to the held score its conditions follow); NAB,
    /// which rewards one early alarm per anomaly, scores this output (`shipped_onset`).
    #[must_use]
    pub fn onset(&self) -> f64 {
        self.last_onset
    }

    /// Last score.
    #[must_use]
    pub fn score(&self) -> f64 {
        self.last_score
    }

    /// Whether warm-up is over and the last sample carried evidence.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Human-readable reason, e.g. `rtt p99 to 10.0.2.7 8.1 ms vs baseline 0.4 ms, z=9.3, for
    /// 6 s`. Allocates: call it on a state change or on demand, not per sample.
    #[must_use]
    pub fn reason(&self, what: &str, unit: &str) -> String {
        let mut s = String::with_capacity(96);
        let base = if self.anomalous_since.is_some() {
            self.frozen_baseline
        } else {
            self.z.baseline()
        };
        let _ = write!(
            s,
            "{what} {} {unit} vs baseline {} {unit}, z={}",
            fmt_num(self.last_x),
            fmt_num(base),
            fmt_z(self.last_z)
        );
        if let Some(since) = self.anomalous_since {
            let _ = write!(s, ", for {:.0} s", (self.last_t - since).max(0.0));
        }
        s
    }
}

/// Up to 3 significant digits above 1, two decimals below: a baseline learnt from a series at
/// 0 is a tiny positive number (7.69e-11 % of retransmits), which reads as 0.00.
fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "n/a".to_owned()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A z over a baseline with (almost) no spread is huge (clamped at 1e6): past 100 its digits
/// say nothing more.
fn fmt_z(z: f64) -> String {
    if z.abs() >= 100.0 {
        format!("{}100", if z > 0.0 { ">" } else { "<-" })
    } else {
        format!("{z:.1}")
    }
}

/// A family's local score and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// In `[0, 1]`.
    pub value: f64,
    /// Human-readable, with the numbers.
    pub reason: String,
}

/// Combines the signals of one family (e.g. RTT to every peer) into one score: the family is
/// as bad as its worst ready signal; signals still warming up are ignored, and a family with no
/// ready signal has no score (→ Unknown, never Degraded).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FamilyScore {
    /// The family.
    pub family: Family,
    /// Max over ready signals, `None` if none is ready.
    pub value: Option<f64>,
    /// Index (in the caller's order) of the signal that set the value.
    pub worst: Option<usize>,
    /// Highest onset ([`SignalScorer::onset`]) among the ready signals, 0 if none.
    pub onset: f64,
    /// Index of the signal with that onset, `None` if no signal started an anomaly.
    pub onset_signal: Option<usize>,
}

impl FamilyScore {
    /// Fold the current scores of a family's signals (no allocation).
    pub fn combine<'a>(family: Family, signals: impl IntoIterator<Item = &'a SignalScorer>) -> Self {
        let mut best: Option<(usize, f64)> = None;
        let mut onset: Option<(usize, f64)> = None;
        for (i, s) in signals.into_iter().enumerate() {
            if !s.is_ready() {
                continue;
            }
            if best.is_none_or(|(_, v)| s.score() > v) {
                best = Some((i, s.score()));
            }
            if s.onset() > onset.map_or(0.0, |(_, v)| v) {
                onset = Some((i, s.onset()));
            }
        }
        Self {
            family,
            value: best.map(|(_, v)| v),
            worst: best.map(|(i, _)| i),
            onset: onset.map_or(0.0, |(_, v)| v),
            onset_signal: onset.map(|(i, _)| i),
        }
    }

    /// Materialise the [`Score`] with the worst signal's reason (`describe(i)` returns its
    /// label and unit). Allocates; call on a state change or on demand.
    pub fn to_score<'a>(
        &self,
        signals: &[SignalScorer],
        describe: impl Fn(usize) -> (&'a str, &'a str),
    ) -> Option<Score> {
        let v = self.value?;
        let i = self.worst?;
        let s = signals.get(i)?;
        let (what, unit) = describe(i);
        Some(Score {
            value: v,
            reason: s.reason(what, unit),
        })
    }
}

impl Detector for SignalScorer {
    fn update(&mut self, t_secs: f64, x: f64) -> crate::DetectorOutput {
        let score = SignalScorer::update(self, t_secs, x);
        crate::DetectorOutput {
            score,
            z: self.last_z,
            ready: self.ready,
        }
    }
    fn reset(&mut self) {
        // Forget everything, the start time too: the next sample (of any series, at any time)
        // starts the warm-up.
        self.restart(f64::NAN);
    }
    fn name(&self) -> &'static str {
        "signal_scorer"
    }
}
