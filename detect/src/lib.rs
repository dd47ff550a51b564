//! Streaming gray-failure detectors and scoring for graywatch.
//!
//! Everything here is pure: no I/O, no clocks, no threads. Callers pass the sample time
//! (`t_secs`, any monotonic-ish origin) and the value; the library never reads the clock.
//!
//! * [`detectors`]: O(1)-memory streaming detectors behind the [`Detector`] trait — robust
//!   EWMA z-score ([`detectors::RobustZ`]), [`detectors::Cusum`], [`detectors::PageHinkley`],
//!   [`detectors::HalfSpaceTrees`], and a Holt forecaster ([`detectors::Holt`]) that can say
//!   "will cross the threshold in N s".
//! * [`forecast`]: [`forecast::CrossingForecast`], the predicted-failure forecast (Holt's ETA
//!   to a limit, with the confidence of a steady rise).
//! * [`filters`]: k-of-n persistence (ignore transient spikes) and warm-up suppression.
//! * [`loss`]: the loss figures, one window's and the sustained one over the last few
//!   windows (counted, with each window's share capped).
//! * [`ensemble`]: [`ensemble::GrayDetector`], the anomaly score inside the shipped pipeline.
//! * [`combine`]: [`combine::SignalScorer`], the per-signal pipeline the agent runs and the
//!   evaluation scores (`shipped`), and the per-family [`combine::FamilyScore`] with a
//!   human-readable reason, built only on demand. The health state machines live in the
//!   aggregator (they combine local, peer and vantage evidence).
//! * `eval` (feature `eval`): NAB and Microsoft cloud-monitoring loaders and scorers, used by
//!   `cargo xtask eval`. The agent does not enable it.
//!
//! No function allocates per sample; detectors that need tables (Half-Space Trees) allocate
//! them once at construction.

pub mod combine;
pub mod detectors;
pub mod drops;
pub mod ensemble;
pub mod filters;
pub mod forecast;
pub mod loss;
mod robust;
mod tail;

#[cfg(feature = "eval")]
pub mod eval;

pub use combine::{FamilyScore, Score, SignalScorer, SignalScorerConfig};
pub use detectors::{Cusum, HalfSpaceTrees, Holt, PageHinkley, RobustZ};
pub use drops::{DropClass, drop_class};
pub use ensemble::{GrayDetector, GrayDetectorConfig};
pub use forecast::{Crossing, CrossingConfig, CrossingForecast};
pub use loss::{LossSpan, SustainedLoss, loss_pct};

use serde::{Deserialize, Serialize};

/// The signal families: one state machine per node and family, one Node condition each. The
/// one definition agent, wire and aggregator share (graywatch-proto converts to the wire enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// CPU time the hypervisor gave to other guests.
    CpuSteal,
    /// Run-queue latency.
    CpuContention,
    /// RTT towards peers (tcp srtt histograms).
    NetworkLatency,
    /// Retransmits and kernel drops.
    PacketLoss,
    /// PSI memory, direct reclaim, OOM kills.
    MemoryPressure,
}

impl Family {
    /// All families, in a stable order.
    pub const ALL: [Family; 5] = [
        Family::CpuSteal,
        Family::CpuContention,
        Family::NetworkLatency,
        Family::PacketLoss,
        Family::MemoryPressure,
    ];

    /// CamelCase name, as used in Node condition types and reasons.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Family::CpuSteal => "CpuSteal",
            Family::CpuContention => "CpuContention",
            Family::NetworkLatency => "NetworkLatency",
            Family::PacketLoss => "PacketLoss",
            Family::MemoryPressure => "MemoryPressure",
        }
    }

    /// The smallest change of the family's figure that matters, in its unit (µs of RTT p99 or
    /// run-queue p99, percent of retransmits, steal or memory PSI): below it a deviation is
    /// noise however steady the series was (a series at exactly 0 has no scale of its own).
    /// Steal: a shared host's routine few percent come and go (on the dev VM, one-second
    /// samples under load were ≤ 2.5 % but for rare bursts), so 5 %, half the steal forecast's
    /// 10 % threshold.
    #[must_use]
    pub fn min_change(self) -> f64 {
        match self {
            Family::CpuSteal => 5.0,
            Family::CpuContention => 50.0,
            Family::NetworkLatency => 100.0,
            Family::PacketLoss => 0.5,
            Family::MemoryPressure => 2.0,
        }
    }

    /// The smallest spread of a peer group's figures the aggregator assumes, in the family's
    /// unit: the smallest change that matters, except for steal and retransmits. Across a
    /// fleet both sit at or near 0 with no spread:
    /// - steal: a node 5 points over its peers is already a strong outlier (z 5 on a 1-point
    ///   floor), while on a node's own series 5 points is the smallest step worth calling; a
    ///   20 % steal on one node must still stand out against peers at 0;
    /// - retransmits: a node losing 2 % of its segments over peers at 0 measured 1.4–2.4 % a
    ///   window on the bench, z 3–5 on the 0.5-point floor (peer evidence 0–0.6, confidence
    ///   0.58–0.78 against the 0.75 needed, so it was caught in 1 run of 3); on a 0.25-point
    ///   floor z is 6–10. The node's own detector must still back a bad window (its step
    ///   stays 0.5 points), so one noisy window on a quiet node is not enough.
    #[must_use]
    pub fn peer_scale_floor(self) -> f64 {
        match self {
            Family::CpuSteal => 1.0,
            Family::PacketLoss => 0.25,
            other => other.min_change(),
        }
    }

    /// Whether other nodes can observe this family towards a node (vantage evidence).
    #[must_use]
    pub fn has_vantage(self) -> bool {
        matches!(self, Family::NetworkLatency | Family::PacketLoss)
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a detector says about one sample.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DetectorOutput {
    /// Anomaly score in `[0, 1]`; 0 = normal. Always finite.
    pub score: f64,
    /// Signed deviation from the detector's baseline in robust standard deviations (0 when the
    /// detector has no such notion or is not ready). Clamped to `[-1e6, 1e6]`.
    pub z: f64,
    /// False while the detector is warming up or when the sample was rejected (NaN/inf):
    /// callers should treat the score as "no evidence", not as "healthy".
    pub ready: bool,
}

impl DetectorOutput {
    /// Output for a sample that carried no evidence (rejected or warming up).
    pub const NONE: DetectorOutput = DetectorOutput {
        score: 0.0,
        z: 0.0,
        ready: false,
    };
}

/// A streaming, O(1)-memory detector over one series.
///
/// `update` must not allocate, must not panic on any `f64` (NaN, ±inf, huge values) and must
/// tolerate time going backwards (such samples are treated as arriving at the last seen time).
pub trait Detector {
    /// Feed one sample at time `t_secs` and get the score for it.
    fn update(&mut self, t_secs: f64, x: f64) -> DetectorOutput;
    /// Forget everything (e.g. after a pod restart).
    fn reset(&mut self);
    /// Short stable name, for tables and metrics labels.
    fn name(&self) -> &'static str;
}

impl<D: Detector + ?Sized> Detector for Box<D> {
    fn update(&mut self, t_secs: f64, x: f64) -> DetectorOutput {
        (**self).update(t_secs, x)
    }
    fn reset(&mut self) {
        (**self).reset();
    }
    fn name(&self) -> &'static str {
        (**self).name()
    }
}

/// Invalid configuration.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// A parameter is outside its valid range.
    #[error("invalid detector config: {field} = {value} ({why})")]
    OutOfRange {
        /// Which field.
        field: &'static str,
        /// The offending value.
        value: f64,
        /// What the valid range is.
        why: &'static str,
    },
}

pub(crate) fn check_range(
    field: &'static str,
    value: f64,
    lo: f64,
    hi: f64,
    why: &'static str,
) -> Result<(), ConfigError> {
    if value.is_finite() && value >= lo && value <= hi {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange { field, value, why })
    }
}

/// Largest magnitude a detector keeps in its state. Inputs beyond it are clamped so that
/// squares and differences stay finite.
pub(crate) const MAX_ABS: f64 = 1e100;

/// Clamp a raw sample into the range detectors can do arithmetic on; `None` for NaN.
#[inline]
pub(crate) fn sanitize(x: f64) -> Option<f64> {
    if x.is_nan() {
        None
    } else {
        Some(x.clamp(-MAX_ABS, MAX_ABS))
    }
}

/// Map a non-negative deviation (in robust sigmas) to `[0, 1)` without saturating, so that
/// thresholds can still rank large deviations: `z² / (z² + half²)`; `half` maps to 0.5.
#[inline]
#[must_use]
pub fn squash(z: f64, half: f64) -> f64 {
    let z = z.abs().min(1e6);
    let z2 = z * z;
    let s = z2 / (z2 + half * half);
    if s.is_finite() { s.clamp(0.0, 1.0) } else { 0.0 }
}
