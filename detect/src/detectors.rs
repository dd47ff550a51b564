//! The individual streaming detectors. Each keeps O(1) state (Half-Space Trees: a table sized
//! once by its config) and never allocates in `update`.

use serde::{Deserialize, Serialize};

use crate::robust::RobustBaseline;
use crate::{ConfigError, Detector, DetectorOutput, check_range, sanitize, squash};

/// Which deviations count as anomalous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Only increases (latency, loss, pressure: "higher is worse").
    Up,
    /// Only decreases (throughput).
    Down,
    /// Both.
    #[default]
    Both,
}

impl Direction {
    /// Project a signed z onto the direction of interest (non-negative result).
    #[inline]
    #[must_use]
    pub fn project(self, z: f64) -> f64 {
        match self {
            Direction::Up => z.max(0.0),
            Direction::Down => (-z).max(0.0),
            Direction::Both => z.abs(),
        }
    }
}

/// Time as seen by a detector: never goes backwards, never NaN.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Clock {
    last: Option<f64>,
}

impl Clock {
    /// The time [`Clock::tick`] would return for `t`, without recording it.
    #[inline]
    pub(crate) fn peek(&self, t: f64) -> f64 {
        match self.last {
            Some(last) if !(t.is_finite() && t > last) => last,
            _ if t.is_finite() => t,
            _ => 0.0,
        }
    }

    /// Returns (t, dt) with dt ≥ 0; a backwards or non-finite time is treated as "no time passed".
    #[inline]
    pub(crate) fn tick(&mut self, t: f64) -> (f64, f64) {
        match self.last {
            None => {
                let t = if t.is_finite() { t } else { 0.0 };
                self.last = Some(t);
                (t, 0.0)
            }
            Some(last) => {
                if t.is_finite() && t > last {
                    self.last = Some(t);
                    (t, t - last)
                } else {
                    (last, 0.0)
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// Config of [`RobustZ`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RobustZConfig {
    /// EWMA weight of a new sample (0 < alpha ≤ 1). 0.02 ≈ a 50-sample memory.
    pub alpha: f64,
    /// Huber clip in σ: an outlier moves the baseline by at most this many σ × alpha.
    pub clip: f64,
    /// Samples before the detector reports (`ready`).
    pub warmup: u32,
    /// |z| at which the score is 0.5.
    pub z_half: f64,
    /// Scale floor relative to |baseline| (flat series).
    pub rel_floor: f64,
    /// Absolute scale floor, in the signal's unit.
    pub abs_floor: f64,
    /// Which deviations count.
    pub direction: Direction,
}

impl Default for RobustZConfig {
    fn default() -> Self {
        Self {
            alpha: 0.02,
            clip: 3.0,
            warmup: 30,
            z_half: 4.0,
            rel_floor: 1e-3,
            abs_floor: 1e-9,
            direction: Direction::Both,
        }
    }
}

impl RobustZConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check_range("alpha", self.alpha, 1e-9, 1.0, "0 < alpha <= 1")?;
        check_range("clip", self.clip, 0.1, 1e3, "0.1..1000")?;
        check_range("z_half", self.z_half, 1e-3, 1e6, "positive")?;
        check_range("rel_floor", self.rel_floor, 0.0, 1.0, "0..1")?;
        check_range("abs_floor", self.abs_floor, 0.0, f64::MAX, "non-negative")
    }
}

/// EWMA baseline with a robust (median/MAD-style) z-score: the baseline tracks the median via
/// Huber-clipped updates, the scale is a clipped mean absolute deviation rescaled to σ.
#[derive(Debug, Clone)]
pub struct RobustZ {
    cfg: RobustZConfig,
    base: RobustBaseline,
    clock: Clock,
}

impl RobustZ {
    /// Build from a validated config.
    ///
    /// # Errors
    /// A parameter out of range.
    pub fn new(cfg: RobustZConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self {
            base: RobustBaseline::new(cfg.alpha, cfg.clip, cfg.rel_floor, cfg.abs_floor),
            cfg,
            clock: Clock::default(),
        })
    }

    /// Current baseline (robust level) of the series.
    #[must_use]
    pub fn baseline(&self) -> f64 {
        self.base.level
    }

    /// Current robust σ.
    #[must_use]
    pub fn sigma(&self) -> f64 {
        self.base.sigma()
    }

    /// Score `x` against the baseline without learning from it (used to freeze the baseline
    /// while a signal is degraded, so a long fault is not absorbed as the new normal).
    #[must_use]
    pub fn peek(&self, x: f64) -> DetectorOutput {
        let Some(x) = sanitize(x) else {
            return DetectorOutput::NONE;
        };
        if self.base.n < u64::from(self.cfg.warmup) {
            return DetectorOutput::NONE;
        }
        let z = self.base.z(x);
        DetectorOutput {
            score: squash(self.cfg.direction.project(z), self.cfg.z_half),
            z,
            ready: true,
        }
    }
}

impl Detector for RobustZ {
    fn update(&mut self, t_secs: f64, x: f64) -> DetectorOutput {
        self.clock.tick(t_secs);
        let Some(x) = sanitize(x) else {
            return DetectorOutput::NONE;
        };
        let z = self.base.z(x);
        let ready = self.base.n >= u64::from(self.cfg.warmup);
        self.base.update(x);
        if !ready {
            return DetectorOutput {
                ready: false,
                ..DetectorOutput::NONE
            };
        }
        DetectorOutput {
            score: squash(self.cfg.direction.project(z), self.cfg.z_half),
            z,
            ready,
        }
    }
    fn reset(&mut self) {
        self.base.reset();
        self.clock = Clock::default();
    }
    fn name(&self) -> &'static str {
        "robust_z"
    }
}

// ---------------------------------------------------------------------------------------------

/// Config of [`Cusum`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CusumConfig {
    /// EWMA weight of the (slow) baseline the CUSUM measures drift against.
    pub alpha: f64,
    /// Allowance k in σ: drifts smaller than this are ignored.
    pub k: f64,
    /// Decision interval h in σ: the score is 0.5 when the statistic reaches h.
    pub h: f64,
    /// Per-sample z is clipped to this, so one spike cannot trip the CUSUM alone.
    pub z_clip: f64,
    /// Samples before the detector reports.
    pub warmup: u32,
    /// Which drifts count.
    pub direction: Direction,
}

impl Default for CusumConfig {
    fn default() -> Self {
        Self {
            alpha: 0.005,
            k: 0.5,
            h: 8.0,
            z_clip: 4.0,
            warmup: 30,
            direction: Direction::Both,
        }
    }
}

/// Two-sided tabular CUSUM on robust z-scores.
#[derive(Debug, Clone)]
pub struct Cusum {
    cfg: CusumConfig,
    base: RobustBaseline,
    up: f64,
    down: f64,
    clock: Clock,
}

impl Cusum {
    /// Build from a validated config.
    ///
    /// # Errors
    /// A parameter out of range.
    pub fn new(cfg: CusumConfig) -> Result<Self, ConfigError> {
        check_range("alpha", cfg.alpha, 1e-9, 1.0, "0 < alpha <= 1")?;
        check_range("k", cfg.k, 0.0, 1e3, "non-negative")?;
        check_range("h", cfg.h, 1e-3, 1e6, "positive")?;
        check_range("z_clip", cfg.z_clip, 0.1, 1e6, "positive")?;
        Ok(Self {
            base: RobustBaseline::new(cfg.alpha, 3.0, 1e-3, 1e-9),
            cfg,
            up: 0.0,
            down: 0.0,
            clock: Clock::default(),
        })
    }

    /// Current (up, down) statistics in σ.
    #[must_use]
    pub fn statistics(&self) -> (f64, f64) {
        (self.up, self.down)
    }
}

impl Detector for Cusum {
    fn update(&mut self, t_secs: f64, x: f64) -> DetectorOutput {
        self.clock.tick(t_secs);
        let Some(x) = sanitize(x) else {
            return DetectorOutput::NONE;
        };
        let z = self.base.z(x);
        let ready = self.base.n >= u64::from(self.cfg.warmup);
        self.base.update(x);
        if !ready {
            return DetectorOutput::NONE;
        }
        let zc = z.clamp(-self.cfg.z_clip, self.cfg.z_clip);
        // Capped so that the statistic forgets a long-gone shift within a few h/k samples.
        let cap = 4.0 * self.cfg.h;
        self.up = (self.up + zc - self.cfg.k).clamp(0.0, cap);
        self.down = (self.down - zc - self.cfg.k).clamp(0.0, cap);
        let stat = match self.cfg.direction {
            Direction::Up => self.up,
            Direction::Down => self.down,
            Direction::Both => self.up.max(self.down),
        };
        DetectorOutput {
            score: (stat / (stat + self.cfg.h)).clamp(0.0, 1.0),
            z,
            ready,
        }
    }
    fn reset(&mut self) {
        self.base.reset();
        self.up = 0.0;
        self.down = 0.0;
        self.clock = Clock::default();
    }
    fn name(&self) -> &'static str {
        "cusum"
    }
}

// ---------------------------------------------------------------------------------------------

/// Config of [`PageHinkley`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PageHinkleyConfig {
    /// Magnitude of change tolerated, in σ.
    pub delta: f64,
    /// Detection threshold λ in σ (score 0.5 at λ).
    pub lambda: f64,
    /// Fading factor of the statistic (1 = classic PH; < 1 forgets old drifts faster).
    pub fading: f64,
    /// Minimum weight of a new sample in the running mean (0 = cumulative mean forever).
    pub min_alpha: f64,
    /// Samples before the detector reports.
    pub warmup: u32,
    /// Which changes count.
    pub direction: Direction,
}

impl Default for PageHinkleyConfig {
    fn default() -> Self {
        Self {
            delta: 0.5,
            lambda: 10.0,
            fading: 1.0,
            min_alpha: 0.002,
            warmup: 30,
            direction: Direction::Both,
        }
    }
}

/// Page-Hinkley change test (two-sided, with a fading factor), on values standardised by a
/// robust scale; the reference mean is a running mean (floored weight `min_alpha`).
#[derive(Debug, Clone)]
pub struct PageHinkley {
    cfg: PageHinkleyConfig,
    scale: RobustBaseline,
    n: u64,
    mean: f64,
    /// PH statistic for increases (`m_t` − min m).
    m_up: f64,
    /// PH statistic for decreases.
    m_down: f64,
    clock: Clock,
}

impl PageHinkley {
    /// Build from a validated config.
    ///
    /// # Errors
    /// A parameter out of range.
    pub fn new(cfg: PageHinkleyConfig) -> Result<Self, ConfigError> {
        check_range("delta", cfg.delta, 0.0, 1e3, "non-negative")?;
        check_range("lambda", cfg.lambda, 1e-3, 1e6, "positive")?;
        check_range("fading", cfg.fading, 0.5, 1.0, "0.5..=1")?;
        check_range("min_alpha", cfg.min_alpha, 0.0, 1.0, "0..=1")?;
        Ok(Self {
            scale: RobustBaseline::new(0.01, 3.0, 1e-3, 1e-9),
            cfg,
            n: 0,
            mean: 0.0,
            m_up: 0.0,
            m_down: 0.0,
            clock: Clock::default(),
        })
    }
}

impl Detector for PageHinkley {
    fn update(&mut self, t_secs: f64, x: f64) -> DetectorOutput {
        self.clock.tick(t_secs);
        let Some(x) = sanitize(x) else {
            return DetectorOutput::NONE;
        };
        let sigma = self.scale.sigma();
        self.scale.update(x);
        self.n = self.n.saturating_add(1);
        let a = (1.0 / self.n as f64).max(self.cfg.min_alpha);
        self.mean += a * (x - self.mean);
        if self.n < 2 || !self.mean.is_finite() {
            if !self.mean.is_finite() {
                self.reset();
            }
            return DetectorOutput::NONE;
        }
        let ready = self.n >= u64::from(self.cfg.warmup);
        if !ready {
            // The scale is meaningless until warm: accumulating now would poison the statistic.
            return DetectorOutput::NONE;
        }
        // Standardise so delta and lambda are in σ whatever the signal's unit; clipped so a
        // single spike cannot trip the test alone.
        let d = ((x - self.mean) / sigma).clamp(-6.0, 6.0);
        let d = if d.is_finite() { d } else { 0.0 };
        // m_t − min m_s obeys the recursion below, so no unbounded running sum is kept.
        let f = self.cfg.fading;
        self.m_up = (f * self.m_up + d - self.cfg.delta).clamp(0.0, 1e6);
        self.m_down = (f * self.m_down - d - self.cfg.delta).clamp(0.0, 1e6);
        let (up, down) = (self.m_up, self.m_down);
        let stat = match self.cfg.direction {
            Direction::Up => up,
            Direction::Down => down,
            Direction::Both => up.max(down),
        };
        DetectorOutput {
            score: (stat / (stat + self.cfg.lambda)).clamp(0.0, 1.0),
            z: d,
            ready,
        }
    }
    fn reset(&mut self) {
        self.scale.reset();
        self.n = 0;
        self.mean = 0.0;
        self.m_up = 0.0;
        self.m_down = 0.0;
        self.clock = Clock::default();
    }
    fn name(&self) -> &'static str {
        "page_hinkley"
    }
}

// ---------------------------------------------------------------------------------------------

/// Config of [`HalfSpaceTrees`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HalfSpaceTreesConfig {
    /// Number of trees.
    pub trees: u32,
    /// Depth of each tree (nodes per tree = 2^(depth+1) - 1).
    pub depth: u32,
    /// Samples per mass window (reference profile is the previous window).
    pub window: u32,
    /// A node with less reference mass than this stops the descent (HS-Trees "size limit").
    pub size_limit: u32,
    /// Seed of the deterministic split generator.
    pub seed: u64,
    /// EWMA weight of the robust normaliser that maps values into the unit workspace.
    pub norm_alpha: f64,
}

impl Default for HalfSpaceTreesConfig {
    fn default() -> Self {
        Self {
            trees: 25,
            depth: 8,
            window: 250,
            size_limit: 5,
            seed: 0x9e37_79b9_7f4a_7c15,
            norm_alpha: 0.005,
        }
    }
}

const HST_DIMS: usize = 2;

/// Streaming Half-Space Trees (Tan, Ting & Liu 2011) over two features of the series: the
/// robustly normalised value and the normalised first difference. Mass profiles are counted in
/// tumbling windows; a sample is anomalous when it falls where the previous window had little
/// mass.
#[derive(Debug, Clone)]
pub struct HalfSpaceTrees {
    cfg: HalfSpaceTreesConfig,
    nodes_per_tree: usize,
    split_dim: Vec<u8>,
    split_val: Vec<f64>,
    ref_mass: Vec<u32>,
    latest_mass: Vec<u32>,
    in_window: u32,
    have_reference: bool,
    value_norm: RobustBaseline,
    diff_norm: RobustBaseline,
    prev: Option<f64>,
    last_mass: f64,
    clock: Clock,
}

impl HalfSpaceTrees {
    /// Normalised reference mass of the last sample (about 1 in dense regions, 0 in empty
    /// ones); `NaN` before the first window completes.
    #[must_use]
    pub fn last_mass(&self) -> f64 {
        self.last_mass
    }

    /// Build the trees (the only allocation: `trees × 2^(depth+1)` nodes).
    ///
    /// # Errors
    /// A parameter out of range.
    pub fn new(cfg: HalfSpaceTreesConfig) -> Result<Self, ConfigError> {
        check_range("trees", f64::from(cfg.trees), 1.0, 1000.0, "1..=1000")?;
        check_range("depth", f64::from(cfg.depth), 1.0, 16.0, "1..=16")?;
        check_range("window", f64::from(cfg.window), 2.0, 1e7, ">= 2")?;
        check_range("norm_alpha", cfg.norm_alpha, 1e-9, 1.0, "0 < a <= 1")?;
        let nodes_per_tree = (1usize << (cfg.depth + 1)) - 1;
        let total = nodes_per_tree * cfg.trees as usize;
        let mut split_dim = vec![0u8; total];
        let mut split_val = vec![0.0f64; total];
        let mut rng = SplitMix64(cfg.seed);
        for t in 0..cfg.trees as usize {
            // Random workspace per tree: a box around a random point, twice as wide as needed,
            // so splits are not all aligned across trees.
            let mut lo = [0.0f64; HST_DIMS];
            let mut hi = [0.0f64; HST_DIMS];
            for d in 0..HST_DIMS {
                let s = rng.next_f64();
                let w = 2.0 * s.max(1.0 - s);
                lo[d] = s - w;
                hi[d] = s + w;
            }
            build_tree(
                &mut split_dim[t * nodes_per_tree..(t + 1) * nodes_per_tree],
                &mut split_val[t * nodes_per_tree..(t + 1) * nodes_per_tree],
                0,
                lo,
                hi,
                cfg.depth,
                &mut rng,
            );
        }
        Ok(Self {
            nodes_per_tree,
            split_dim,
            split_val,
            ref_mass: vec![0; total],
            latest_mass: vec![0; total],
            in_window: 0,
            have_reference: false,
            value_norm: RobustBaseline::new(cfg.norm_alpha, 3.0, 1e-3, 1e-9),
            diff_norm: RobustBaseline::new(cfg.norm_alpha, 3.0, 1e-3, 1e-9),
            prev: None,
            last_mass: f64::NAN,
            clock: Clock::default(),
            cfg,
        })
    }

    /// Map a z into (0, 1) smoothly; keeps order for any magnitude.
    #[inline]
    fn unit(z: f64) -> f64 {
        0.5 + z.atan() / std::f64::consts::PI * 0.98
    }

    fn point(&self, x: f64) -> [f64; HST_DIMS] {
        let zv = self.value_norm.z(x) / 3.0;
        let dz = match self.prev {
            Some(p) => self.diff_norm.z(x - p) / 3.0,
            None => 0.0,
        };
        [Self::unit(zv), Self::unit(dz)]
    }

    /// HS-Trees mass score of `p` against the reference profile, normalised so that a point
    /// in a region holding the whole window scores about 1 per tree.
    fn mass(&self, p: &[f64; HST_DIMS]) -> f64 {
        let mut total = 0.0;
        for t in 0..self.cfg.trees as usize {
            let base = t * self.nodes_per_tree;
            let mut node = 0usize;
            let mut depth = 0u32;
            loop {
                let m = self.ref_mass[base + node];
                let leaf = depth == self.cfg.depth;
                if leaf || m < self.cfg.size_limit {
                    total += f64::from(m) * f64::from(1u32 << depth);
                    break;
                }
                let d = usize::from(self.split_dim[base + node]);
                node = if p[d] < self.split_val[base + node] {
                    2 * node + 1
                } else {
                    2 * node + 2
                };
                depth += 1;
            }
        }
        total / (f64::from(self.cfg.trees) * f64::from(self.cfg.window))
    }

    fn record(&mut self, p: &[f64; HST_DIMS]) {
        for t in 0..self.cfg.trees as usize {
            let base = t * self.nodes_per_tree;
            let mut node = 0usize;
            for _ in 0..=self.cfg.depth {
                self.latest_mass[base + node] = self.latest_mass[base + node].saturating_add(1);
                if 2 * node + 2 >= self.nodes_per_tree {
                    break;
                }
                let d = usize::from(self.split_dim[base + node]);
                node = if p[d] < self.split_val[base + node] {
                    2 * node + 1
                } else {
                    2 * node + 2
                };
            }
        }
    }
}

fn build_tree(
    dims: &mut [u8],
    vals: &mut [f64],
    node: usize,
    lo: [f64; HST_DIMS],
    hi: [f64; HST_DIMS],
    depth_left: u32,
    rng: &mut SplitMix64,
) {
    if node >= dims.len() {
        return;
    }
    #[expect(clippy::cast_possible_truncation, reason = "below HST_DIMS")]
    let d = (rng.next_u64() % HST_DIMS as u64) as usize;
    let mid = 0.5 * (lo[d] + hi[d]);
    #[expect(clippy::cast_possible_truncation, reason = "HST_DIMS is 2")]
    {
        dims[node] = d as u8;
    }
    vals[node] = mid;
    if depth_left == 0 {
        return;
    }
    let mut left_hi = hi;
    left_hi[d] = mid;
    let mut right_lo = lo;
    right_lo[d] = mid;
    build_tree(dims, vals, 2 * node + 1, lo, left_hi, depth_left - 1, rng);
    build_tree(dims, vals, 2 * node + 2, right_lo, hi, depth_left - 1, rng);
}

impl Detector for HalfSpaceTrees {
    fn update(&mut self, t_secs: f64, x: f64) -> DetectorOutput {
        self.clock.tick(t_secs);
        let Some(x) = sanitize(x) else {
            return DetectorOutput::NONE;
        };
        let p = self.point(x);
        let z = self.value_norm.z(x);
        let out = if self.have_reference {
            let m = self.mass(&p);
            self.last_mass = m;
            DetectorOutput {
                score: (1.0 / (1.0 + 20.0 * m)).clamp(0.0, 1.0),
                z,
                ready: true,
            }
        } else {
            DetectorOutput::NONE
        };
        self.record(&p);
        self.value_norm.update(x);
        if let Some(prev) = self.prev {
            self.diff_norm.update(x - prev);
        }
        self.prev = Some(x);
        self.in_window += 1;
        if self.in_window >= self.cfg.window {
            // Tumble: the latest window becomes the reference (no allocation: swap + clear).
            std::mem::swap(&mut self.ref_mass, &mut self.latest_mass);
            self.latest_mass.fill(0);
            self.in_window = 0;
            self.have_reference = true;
        }
        out
    }
    fn reset(&mut self) {
        self.ref_mass.fill(0);
        self.latest_mass.fill(0);
        self.in_window = 0;
        self.have_reference = false;
        self.value_norm.reset();
        self.diff_norm.reset();
        self.prev = None;
        self.last_mass = f64::NAN;
        self.clock = Clock::default();
    }
    fn name(&self) -> &'static str {
        "half_space_trees"
    }
}

/// Small deterministic generator for tree construction (no `rand` dependency in the agent).
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

// ---------------------------------------------------------------------------------------------

/// Config of [`Holt`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HoltConfig {
    /// Level smoothing (0 < alpha ≤ 1).
    pub alpha: f64,
    /// Trend smoothing (0 < beta ≤ 1).
    pub beta: f64,
    /// EWMA weight of the forecast-error scale.
    pub err_alpha: f64,
    /// |forecast error| in σ at which the score is 0.5.
    pub z_half: f64,
    /// Samples before the detector reports.
    pub warmup: u32,
    /// Which surprises count.
    pub direction: Direction,
}

impl Default for HoltConfig {
    fn default() -> Self {
        Self {
            alpha: 0.3,
            beta: 0.1,
            err_alpha: 0.02,
            z_half: 4.0,
            warmup: 20,
            direction: Direction::Both,
        }
    }
}

/// Holt's linear trend (double exponential smoothing) with irregular time steps. As a detector
/// it scores one-step forecast errors; [`Holt::time_to_cross`] answers "will this signal cross
/// the threshold within N seconds" for predicted failures (memory, PSI, disk).
#[derive(Debug, Clone)]
pub struct Holt {
    cfg: HoltConfig,
    n: u64,
    level: f64,
    /// Per second.
    trend: f64,
    err: RobustBaseline,
    clock: Clock,
}

impl Holt {
    /// Build from a validated config.
    ///
    /// # Errors
    /// A parameter out of range.
    pub fn new(cfg: HoltConfig) -> Result<Self, ConfigError> {
        check_range("alpha", cfg.alpha, 1e-9, 1.0, "0 < alpha <= 1")?;
        check_range("beta", cfg.beta, 1e-9, 1.0, "0 < beta <= 1")?;
        check_range("err_alpha", cfg.err_alpha, 1e-9, 1.0, "0 < a <= 1")?;
        check_range("z_half", cfg.z_half, 1e-3, 1e6, "positive")?;
        Ok(Self {
            err: RobustBaseline::new(cfg.err_alpha, 3.0, 0.0, 1e-12),
            cfg,
            n: 0,
            level: 0.0,
            trend: 0.0,
            clock: Clock::default(),
        })
    }

    /// Smoothed level now.
    #[must_use]
    pub fn level(&self) -> f64 {
        self.level
    }

    /// Trend in units per second.
    #[must_use]
    pub fn trend_per_sec(&self) -> f64 {
        self.trend
    }

    /// Forecast `h` seconds after the last sample.
    #[must_use]
    pub fn forecast(&self, h: f64) -> f64 {
        self.level + self.trend * h.max(0.0)
    }

    /// Seconds until the forecast reaches `threshold` (from below if the trend is up, from
    /// above if it is down): `Some(0.0)` if already there, `None` if the trend leads away or
    /// there is not enough data yet.
    #[must_use]
    pub fn time_to_cross(&self, threshold: f64) -> Option<f64> {
        if self.n < u64::from(self.cfg.warmup.max(2)) || !threshold.is_finite() {
            return None;
        }
        let gap = threshold - self.level;
        if gap == 0.0 {
            return Some(0.0);
        }
        if self.trend == 0.0 || gap.signum() != self.trend.signum() {
            return None;
        }
        let s = gap / self.trend;
        (s.is_finite() && s >= 0.0).then_some(s)
    }
}

impl Detector for Holt {
    fn update(&mut self, t_secs: f64, x: f64) -> DetectorOutput {
        let (_, dt) = self.clock.tick(t_secs);
        let Some(x) = sanitize(x) else {
            return DetectorOutput::NONE;
        };
        self.n = self.n.saturating_add(1);
        if self.n == 1 {
            self.level = x;
            self.trend = 0.0;
            return DetectorOutput::NONE;
        }
        let forecast = self.level + self.trend * dt;
        let e = x - forecast;
        let z = self.err.z(e);
        self.err.update(e);
        let prev_level = self.level;
        self.level = forecast + self.cfg.alpha * e;
        if dt > 0.0 {
            let slope = (self.level - prev_level) / dt;
            self.trend += self.cfg.beta * (slope - self.trend);
        }
        if !self.level.is_finite() || !self.trend.is_finite() {
            self.reset();
            return DetectorOutput::NONE;
        }
        if self.n < u64::from(self.cfg.warmup) {
            return DetectorOutput::NONE;
        }
        DetectorOutput {
            score: squash(self.cfg.direction.project(z), self.cfg.z_half),
            z,
            ready: true,
        }
    }
    fn reset(&mut self) {
        self.n = 0;
        self.level = 0.0;
        self.trend = 0.0;
        self.err.reset();
        self.clock = Clock::default();
    }
    fn name(&self) -> &'static str {
        "holt"
    }
}
