//! Robust streaming location/scale: an EWMA of a Huber-clipped residual (tracks the median
//! instead of the mean: one outlier moves it by at most `clip` scales) and an EWMA of the
//! clipped absolute residual (a mean-absolute-deviation estimate of the MAD, rescaled to σ).

/// √(π/2): mean absolute deviation → σ for a Gaussian.
const MEAN_ABS_TO_SIGMA: f64 = 1.253_314_137_315_500_3;
/// Weight of the unclipped mean absolute deviation in the scale floor.
const RAW_MAD_WEIGHT: f64 = 0.25;

#[derive(Debug, Clone, Copy)]
pub(crate) struct RobustBaseline {
    alpha: f64,
    clip: f64,
    pub(crate) n: u64,
    pub(crate) level: f64,
    /// Mean absolute deviation of clipped residuals (unscaled).
    mad: f64,
    /// Mean absolute deviation without clipping: a floor for the scale when most samples are
    /// identical and only rare spikes move (the clipped MAD is then 0 and every spike would be
    /// infinitely significant).
    raw_mad: f64,
    /// Relative floor on the scale (× |level|), so a perfectly flat series does not make every
    /// tiny wiggle infinitely significant.
    rel_floor: f64,
    abs_floor: f64,
}

impl RobustBaseline {
    pub(crate) fn new(alpha: f64, clip: f64, rel_floor: f64, abs_floor: f64) -> Self {
        Self {
            alpha,
            clip,
            n: 0,
            level: 0.0,
            mad: 0.0,
            raw_mad: 0.0,
            rel_floor,
            abs_floor,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.n = 0;
        self.level = 0.0;
        self.mad = 0.0;
        self.raw_mad = 0.0;
    }

    /// Scale in σ units, floored.
    #[inline]
    pub(crate) fn sigma(&self) -> f64 {
        (self.mad * MEAN_ABS_TO_SIGMA)
            .max(RAW_MAD_WEIGHT * self.raw_mad * MEAN_ABS_TO_SIGMA)
            .max(self.rel_floor * self.level.abs())
            .max(self.abs_floor)
    }

    /// Robust z of `x` against the current baseline (before updating with it).
    #[inline]
    pub(crate) fn z(&self, x: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let z = (x - self.level) / self.sigma();
        if z.is_finite() { z.clamp(-1e6, 1e6) } else { 0.0 }
    }

    /// Fold `x` in. Early on the step is 1/n (a plain running estimate) so the baseline
    /// converges fast; after that it is `alpha`.
    #[inline]
    pub(crate) fn update(&mut self, x: f64) {
        self.n = self.n.saturating_add(1);
        if self.n == 1 {
            self.level = x;
            self.mad = 0.0;
            return;
        }
        let a = self.alpha.max(1.0 / self.n as f64);
        let r = x - self.level;
        // Clip only once a scale exists; before that every residual is taken at face value.
        let lim = self.clip * self.sigma();
        let rc = if self.n > 3 && lim > 0.0 { r.clamp(-lim, lim) } else { r };
        self.level += a * rc;
        let dev = if self.n > 3 && lim > 0.0 {
            r.abs().min(lim)
        } else {
            r.abs()
        };
        self.mad += a * (dev - self.mad);
        self.raw_mad += a * (r.abs() - self.raw_mad);
        if !self.level.is_finite() || !self.mad.is_finite() || !self.raw_mad.is_finite() {
            // Only reachable with inputs near the clamp limit; start over rather than poison.
            self.reset();
        }
    }
}
