//! Per-family health state machine: Unknown / Healthy → Suspect → Degraded → Recovering, with
//! hysteresis (separate enter/exit thresholds) and minimum dwell times.
//!
//! Invariants (property-tested):
//! * Degraded is entered only from Suspect (after `suspect_dwell_secs` of elevated scores) or
//!   from Recovering (relapse). Never from Healthy or Unknown directly.
//! * Missing or stale data leads to Unknown, never to Degraded.

use serde::{Deserialize, Serialize};

use crate::{ConfigError, check_range};

/// Health of one family on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum HealthState {
    /// No (fresh) data.
    #[default]
    Unknown,
    /// Scores low.
    Healthy,
    /// Score elevated, not for long enough yet.
    Suspect,
    /// Score high for at least the Suspect dwell.
    Degraded,
    /// Was Degraded, scores low again, not for long enough yet.
    Recovering,
}

impl HealthState {
    /// CamelCase name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Unknown => "Unknown",
            HealthState::Healthy => "Healthy",
            HealthState::Suspect => "Suspect",
            HealthState::Degraded => "Degraded",
            HealthState::Recovering => "Recovering",
        }
    }
}

/// Thresholds and dwell times.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// Score at or above which Healthy becomes Suspect.
    pub suspect_enter: f64,
    /// Score at or above which Suspect (after its dwell) becomes Degraded.
    pub degraded_enter: f64,
    /// Score below which a state counts as clear (hysteresis: below `suspect_enter`).
    pub clear_below: f64,
    /// Seconds in Suspect, with the score at or above `degraded_enter` at the end, before
    /// Degraded.
    pub suspect_dwell_secs: f64,
    /// Seconds of clear scores before Suspect falls back to Healthy.
    pub suspect_clear_secs: f64,
    /// Minimum seconds in Degraded before Recovering.
    pub degraded_min_secs: f64,
    /// Seconds of clear scores in Recovering before Healthy.
    pub recover_secs: f64,
    /// Data older than this makes the state Unknown.
    pub stale_secs: f64,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            suspect_enter: 0.5,
            degraded_enter: 0.7,
            clear_below: 0.3,
            suspect_dwell_secs: 5.0,
            suspect_clear_secs: 5.0,
            degraded_min_secs: 30.0,
            recover_secs: 60.0,
            stale_secs: 30.0,
        }
    }
}

impl StateConfig {
    /// Check ordering of thresholds and non-negative times.
    ///
    /// # Errors
    /// Thresholds out of `[0, 1]` or out of order, negative times.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_range("clear_below", self.clear_below, 0.0, 1.0, "0..=1")?;
        check_range(
            "suspect_enter",
            self.suspect_enter,
            self.clear_below,
            1.0,
            "clear_below..=1",
        )?;
        check_range(
            "degraded_enter",
            self.degraded_enter,
            self.suspect_enter,
            1.0,
            "suspect_enter..=1",
        )?;
        for (f, v) in [
            ("suspect_dwell_secs", self.suspect_dwell_secs),
            ("suspect_clear_secs", self.suspect_clear_secs),
            ("degraded_min_secs", self.degraded_min_secs),
            ("recover_secs", self.recover_secs),
            ("stale_secs", self.stale_secs),
        ] {
            check_range(f, v, 0.0, 1e9, "non-negative seconds")?;
        }
        Ok(())
    }
}

/// Result of one [`HealthMachine::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// State before the step.
    pub from: HealthState,
    /// State after the step.
    pub to: HealthState,
}

impl Transition {
    /// Whether the state changed (the moment to build a reason and write a condition).
    #[must_use]
    pub fn changed(&self) -> bool {
        self.from != self.to
    }
}

/// The state machine of one family on one node.
#[derive(Debug, Clone)]
pub struct HealthMachine {
    cfg: StateConfig,
    state: HealthState,
    /// When the current state was entered.
    since: f64,
    /// Last time a score was seen.
    last_data: Option<f64>,
    /// Last `now` seen (time never goes backwards inside the machine).
    now: f64,
    /// Start of the current run of clear scores.
    clear_since: Option<f64>,
}

impl HealthMachine {
    /// Start in Unknown.
    ///
    /// # Errors
    /// Invalid config.
    pub fn new(cfg: StateConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            state: HealthState::Unknown,
            since: f64::NEG_INFINITY,
            last_data: None,
            now: f64::NEG_INFINITY,
            clear_since: None,
        })
    }

    /// Current state.
    #[must_use]
    pub fn state(&self) -> HealthState {
        self.state
    }

    /// Seconds in the current state at the last step.
    #[must_use]
    pub fn dwell(&self) -> f64 {
        (self.now - self.since).max(0.0)
    }

    /// Advance to `now` with the family's score, or `None` when there is no score this tick
    /// (missing data). NaN scores count as missing; scores are clamped to `[0, 1]`.
    pub fn step(&mut self, now: f64, score: Option<f64>) -> Transition {
        let from = self.state;
        if now.is_finite() && now > self.now {
            self.now = now;
        }
        let now = self.now;
        let score = score.filter(|s| !s.is_nan()).map(|s| s.clamp(0.0, 1.0));
        let Some(s) = score else {
            let stale = self.last_data.is_none_or(|t| now - t >= self.cfg.stale_secs);
            if stale {
                self.enter(HealthState::Unknown, now);
            }
            return Transition { from, to: self.state };
        };
        self.last_data = Some(now);
        let clear = s < self.cfg.clear_below;
        if clear {
            self.clear_since.get_or_insert(now);
        } else {
            self.clear_since = None;
        }
        let clear_for = self.clear_since.map_or(0.0, |c| now - c);
        let dwell = now - self.since;
        let c = self.cfg;
        let next = match self.state {
            HealthState::Unknown | HealthState::Healthy => {
                if s >= c.suspect_enter {
                    HealthState::Suspect
                } else {
                    HealthState::Healthy
                }
            }
            HealthState::Suspect => {
                if s >= c.degraded_enter && dwell >= c.suspect_dwell_secs {
                    HealthState::Degraded
                } else if clear && clear_for >= c.suspect_clear_secs {
                    HealthState::Healthy
                } else {
                    HealthState::Suspect
                }
            }
            HealthState::Degraded => {
                if clear && dwell >= c.degraded_min_secs {
                    HealthState::Recovering
                } else {
                    HealthState::Degraded
                }
            }
            HealthState::Recovering => {
                if s >= c.degraded_enter {
                    HealthState::Degraded
                } else if clear && clear_for >= c.recover_secs {
                    HealthState::Healthy
                } else {
                    HealthState::Recovering
                }
            }
        };
        self.enter(next, now);
        Transition { from, to: self.state }
    }

    fn enter(&mut self, next: HealthState, now: f64) {
        if next != self.state {
            self.state = next;
            self.since = now;
            if next == HealthState::Unknown {
                self.clear_since = None;
            }
        }
    }
}
