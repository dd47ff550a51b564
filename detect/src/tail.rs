//! Streaming exceedance counts: "how often has this series been at least this surprising?",
//! from a fixed log-spaced histogram with exponential forgetting. O(1) memory, no allocation.

/// Bins over `u = ln(1 + surprise)`; surprise is a non-negative z-like magnitude.
const BINS: usize = 96;
/// Upper edge of the last bin in `u` (surprise ≈ e^12 ≈ 160k; larger values share the top bin).
const U_MAX: f64 = 12.0;

#[derive(Debug, Clone)]
pub(crate) struct TailHistogram {
    counts: [f64; BINS],
    total: f64,
    /// Weight of the next sample; grows by 1/(1-forget) per sample (lazy exponential decay).
    w: f64,
    growth: f64,
}

impl TailHistogram {
    pub(crate) fn new(forget: f64) -> Self {
        Self {
            counts: [0.0; BINS],
            total: 0.0,
            w: 1.0,
            growth: 1.0 / (1.0 - forget.clamp(0.0, 0.5)),
        }
    }

    pub(crate) fn reset(&mut self) {
        self.counts = [0.0; BINS];
        self.total = 0.0;
        self.w = 1.0;
    }

    #[inline]
    fn position(surprise: f64) -> f64 {
        let u = surprise.max(0.0).ln_1p();
        #[expect(clippy::cast_precision_loss, reason = "BINS is small")]
        let pos = u / U_MAX * BINS as f64;
        if pos.is_finite() {
            pos.min(BINS as f64 - 1e-9)
        } else {
            0.0
        }
    }

    /// Decayed number of past samples at least as surprising (in units of the newest weight).
    pub(crate) fn exceedances(&self, surprise: f64) -> f64 {
        let pos = Self::position(surprise);
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "0 <= pos < BINS")]
        let b = pos as usize;
        let frac = pos - pos.floor();
        let above: f64 = self.counts[b + 1..].iter().sum::<f64>() + self.counts[b] * (1.0 - frac);
        above / self.w
    }

    pub(crate) fn add(&mut self, surprise: f64) {
        let pos = Self::position(surprise);
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "0 <= pos < BINS")]
        let b = pos as usize;
        self.counts[b] += self.w;
        self.total += self.w;
        self.w *= self.growth;
        if self.w > 1e200 {
            // Rescale everything; keeps the lazy decay exact and finite.
            let k = 1.0 / self.w;
            for c in &mut self.counts {
                *c *= k;
            }
            self.total *= k;
            self.w = 1.0;
        }
    }
}
