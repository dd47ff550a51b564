//! Filters applied on top of detector scores: k-of-n persistence and warm-up suppression.

use serde::{Deserialize, Serialize};

use crate::{ConfigError, check_range};

/// "At least `k` of the last `n` samples were elevated" (n ≤ 64, one `u64` of state), so a
/// single transient spike never raises a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Persistence {
    k: u32,
    n: u32,
    bits: u64,
}

impl Persistence {
    /// `k` of `n`, with `1 ≤ k ≤ n ≤ 64`.
    ///
    /// # Errors
    /// `k` or `n` out of range.
    pub fn new(k: u32, n: u32) -> Result<Self, ConfigError> {
        check_range("n", f64::from(n), 1.0, 64.0, "1..=64")?;
        check_range("k", f64::from(k), 1.0, f64::from(n), "1..=n")?;
        Ok(Self { k, n, bits: 0 })
    }

    /// Record whether the newest sample was elevated; true if the k-of-n rule holds now.
    pub fn push(&mut self, elevated: bool) -> bool {
        let mask = if self.n == 64 { u64::MAX } else { (1u64 << self.n) - 1 };
        self.bits = ((self.bits << 1) | u64::from(elevated)) & mask;
        self.bits.count_ones() >= self.k
    }

    /// Whether the rule holds for the samples seen so far.
    #[must_use]
    pub fn holds(&self) -> bool {
        self.bits.count_ones() >= self.k
    }

    /// Number of consecutive elevated samples ending at the newest one.
    #[must_use]
    pub fn run_length(&self) -> u32 {
        self.bits.trailing_ones().min(self.n)
    }

    /// Forget history.
    pub fn clear(&mut self) {
        self.bits = 0;
    }
}

/// Config of [`WarmUp`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WarmUpConfig {
    /// Samples that must be seen after (re)start.
    pub samples: u32,
    /// Seconds that must have passed after (re)start.
    pub seconds: f64,
}

impl Default for WarmUpConfig {
    fn default() -> Self {
        Self {
            samples: 30,
            seconds: 30.0,
        }
    }
}

/// Suppresses scores until both `samples` samples and `seconds` seconds have passed since the
/// series started (agent start, pod start, or an explicit [`WarmUp::restart`]): baselines are
/// meaningless while they converge, and pod start-up is noisy by nature.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmUp {
    cfg: WarmUpConfig,
    start: Option<f64>,
    seen: u32,
}

impl WarmUp {
    /// New, not started.
    #[must_use]
    pub fn new(cfg: WarmUpConfig) -> Self {
        Self {
            cfg,
            start: None,
            seen: 0,
        }
    }

    /// Start over at `t` (pod start, restart).
    pub fn restart(&mut self, t: f64) {
        self.start = t.is_finite().then_some(t);
        self.seen = 0;
    }

    /// Count a sample at `t`; true once warm. A time before the start does not count as time.
    pub fn observe(&mut self, t: f64) -> bool {
        if self.start.is_none() && t.is_finite() {
            self.start = Some(t);
        }
        self.seen = self.seen.saturating_add(1);
        self.is_warm(t)
    }

    /// Whether warm at `t`, without counting a sample.
    #[must_use]
    pub fn is_warm(&self, t: f64) -> bool {
        let elapsed = match self.start {
            Some(s) if t.is_finite() => t - s,
            _ => 0.0,
        };
        self.seen >= self.cfg.samples && elapsed >= self.cfg.seconds
    }
}
