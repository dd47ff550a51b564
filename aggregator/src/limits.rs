//! Per-identity limits on the ingest stream: concurrent streams and a token-bucket rate of
//! summaries; plus a global budget of authentication attempts (each one is a TokenReview on the
//! apiserver). Pure bookkeeping over an injected clock, so the tests need no time to pass.
//!
//! The per-identity map is bounded (`max_identities`; a new identity beyond it is refused) and
//! pruned: an identity whose last stream ended is kept only until its bucket has refilled (at
//! most `summary_burst / summaries_per_second`), the grace in which a reconnect must still find
//! its spent bucket rather than a fresh one.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    #[must_use]
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: rate.max(0.0),
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes one token if available.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// Limits (config `ingest.*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitsConfig {
    pub max_streams_per_identity: usize,
    pub summaries_per_second: f64,
    pub summary_burst: u32,
    pub auth_attempts_per_second: f64,
    pub auth_attempt_burst: u32,
    /// Most identities tracked at once (open streams, or ended within their refill grace).
    pub max_identities: usize,
}

/// A refused stream or summary.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitError {
    #[error("{key}: already {open} open streams, at most {max} per identity")]
    TooManyStreams { key: String, open: usize, max: usize },
    #[error("{key}: more than {rate}/s summaries sustained (burst {burst}); slow down")]
    RateLimited { key: String, rate: f64, burst: u32 },
    #[error("too many authentication attempts ({rate}/s, burst {burst}); retry later")]
    AuthBudget { rate: f64, burst: u32 },
    #[error("{key}: already {max} identities tracked, the cap (2 × ingest.max_nodes); retry later")]
    TooManyIdentities { key: String, max: usize },
}

impl LimitError {
    /// `RESOURCE_EXHAUSTED`, with the limit named.
    #[must_use]
    pub fn status(&self) -> tonic::Status {
        tonic::Status::resource_exhausted(self.to_string())
    }

    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooManyStreams { .. } => "too_many_streams",
            Self::RateLimited { .. } => "rate_limited",
            Self::AuthBudget { .. } => "auth_rate_limited",
            Self::TooManyIdentities { .. } => "identities_full",
        }
    }
}

#[derive(Debug)]
struct Entry {
    streams: usize,
    bucket: TokenBucket,
}

#[derive(Debug)]
struct State {
    per_identity: HashMap<String, Entry>,
    auth: TokenBucket,
}

/// Shared limiter; see the module docs.
#[derive(Debug, Clone)]
pub struct Limits {
    cfg: LimitsConfig,
    state: Arc<Mutex<State>>,
}

/// One open stream of an identity; released on drop.
#[derive(Debug)]
pub struct StreamSlot {
    key: String,
    limits: Limits,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut st = self.limits.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let forget = st.per_identity.get_mut(&self.key).is_some_and(|e| {
            e.streams = e.streams.saturating_sub(1);
            // Forget idle identities whose bucket is full again (nothing to remember).
            e.streams == 0 && e.bucket.full(now)
        });
        if forget {
            st.per_identity.remove(&self.key);
        }
    }
}

impl Limits {
    #[must_use]
    pub fn new(cfg: LimitsConfig) -> Self {
        Self {
            cfg,
            state: Arc::new(Mutex::new(State {
                per_identity: HashMap::new(),
                auth: TokenBucket::new(cfg.auth_attempts_per_second, cfg.auth_attempt_burst, Instant::now()),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One authentication attempt against the global budget.
    pub fn auth_attempt(&self, now: Instant) -> Result<(), LimitError> {
        if self.lock().auth.take(now) {
            Ok(())
        } else {
            Err(LimitError::AuthBudget {
                rate: self.cfg.auth_attempts_per_second,
                burst: self.cfg.auth_attempt_burst,
            })
        }
    }

    /// Forgets the identities without an open stream whose bucket has refilled (nothing left
    /// to remember); returns how many remain.
    pub fn prune(&self, now: Instant) -> usize {
        let mut st = self.lock();
        st.per_identity.retain(|_, e| e.streams > 0 || !e.bucket.full(now));
        st.per_identity.len()
    }

    /// Opens a stream for `key` if it has fewer than the maximum open (and, for a new identity,
    /// if fewer than `max_identities` are tracked).
    pub fn open_stream(&self, key: &str, now: Instant) -> Result<StreamSlot, LimitError> {
        let mut st = self.lock();
        let cfg = self.cfg;
        if !st.per_identity.contains_key(key) && st.per_identity.len() >= cfg.max_identities {
            st.per_identity.retain(|_, e| e.streams > 0 || !e.bucket.full(now));
            if st.per_identity.len() >= cfg.max_identities {
                return Err(LimitError::TooManyIdentities {
                    key: key.into(),
                    max: cfg.max_identities,
                });
            }
        }
        let e = st.per_identity.entry(key.to_string()).or_insert_with(|| Entry {
            streams: 0,
            bucket: TokenBucket::new(cfg.summaries_per_second, cfg.summary_burst, now),
        });
        if e.streams >= cfg.max_streams_per_identity {
            return Err(LimitError::TooManyStreams {
                key: key.into(),
                open: e.streams,
                max: cfg.max_streams_per_identity,
            });
        }
        e.streams += 1;
        drop(st);
        Ok(StreamSlot {
            key: key.into(),
            limits: self.clone(),
        })
    }

    /// One summary on `slot`'s identity.
    pub fn summary(&self, slot: &StreamSlot, now: Instant) -> Result<(), LimitError> {
        let mut st = self.lock();
        let ok = st.per_identity.get_mut(&slot.key).is_some_and(|e| e.bucket.take(now));
        if ok {
            Ok(())
        } else {
            Err(LimitError::RateLimited {
                key: slot.key.clone(),
                rate: self.cfg.summaries_per_second,
                burst: self.cfg.summary_burst,
            })
        }
    }

    /// Identities currently tracked (for tests and debugging).
    #[must_use]
    pub fn tracked(&self) -> usize {
        self.lock().per_identity.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn cfg() -> LimitsConfig {
        LimitsConfig {
            max_streams_per_identity: 2,
            summaries_per_second: 2.0,
            summary_burst: 3,
            auth_attempts_per_second: 1.0,
            auth_attempt_burst: 2,
            max_identities: 3,
        }
    }

    #[test]
    fn streams_per_identity_are_capped_and_released() {
        let l = Limits::new(cfg());
        let t = Instant::now();
        let a = l.open_stream("pod-a", t).expect("1st");
        let _b = l.open_stream("pod-a", t).expect("2nd");
        let e = l.open_stream("pod-a", t).expect_err("3rd");
        assert_eq!(e.reason(), "too_many_streams");
        assert_eq!(e.status().code(), tonic::Code::ResourceExhausted);
        // Another identity is unaffected.
        let _c = l.open_stream("pod-b", t).expect("other identity");
        drop(a);
        let _d = l.open_stream("pod-a", t).expect("slot released");
    }

    #[test]
    fn summaries_are_rate_limited_with_burst_and_refill() {
        let l = Limits::new(cfg());
        let t = Instant::now();
        let s = l.open_stream("pod-a", t).expect("open");
        for _ in 0..3 {
            l.summary(&s, t).expect("burst");
        }
        assert_eq!(l.summary(&s, t).expect_err("over").reason(), "rate_limited");
        // Half a second at 2/s refills one token.
        l.summary(&s, t + Duration::from_millis(500)).expect("refilled");
        assert!(l.summary(&s, t + Duration::from_millis(500)).is_err());
        // A second stream of the same identity shares the bucket (no bypass by reconnecting).
        let s2 = l.open_stream("pod-a", t).expect("open 2");
        assert!(l.summary(&s2, t + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn auth_budget_is_global() {
        let l = Limits::new(cfg());
        let t = Instant::now() + Duration::from_secs(5);
        l.auth_attempt(t).expect("1");
        l.auth_attempt(t).expect("2");
        assert_eq!(l.auth_attempt(t).expect_err("3").reason(), "auth_rate_limited");
        l.auth_attempt(t + Duration::from_secs(1)).expect("refilled");
    }

    #[test]
    fn idle_identities_are_forgotten() {
        let l = Limits::new(cfg());
        let s = l.open_stream("pod-a", Instant::now()).expect("open");
        assert_eq!(l.tracked(), 1);
        drop(s);
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn ended_streams_are_forgotten_once_their_bucket_refilled() {
        let l = Limits::new(cfg());
        let t = Instant::now();
        let slots: Vec<_> = (0..3)
            .map(|i| {
                let s = l.open_stream(&format!("pod-{i}"), t).expect("open");
                l.summary(&s, t).expect("burst");
                s
            })
            .collect();
        drop(slots);
        // Within the refill grace a reconnect finds its spent bucket...
        assert_eq!(l.prune(t), 3);
        // ...after it (one token at 2/s) nothing is left to remember.
        assert_eq!(l.prune(t + Duration::from_millis(500)), 0);
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn identities_are_capped_and_idle_ones_make_room() {
        let l = Limits::new(cfg());
        let t = Instant::now();
        let held: Vec<_> = (0..3)
            .map(|i| {
                let s = l.open_stream(&format!("pod-{i}"), t).expect("open");
                l.summary(&s, t).expect("burst");
                s
            })
            .collect();
        let e = l.open_stream("pod-3", t).expect_err("4th identity");
        assert_eq!(e.reason(), "identities_full");
        assert_eq!(e.status().code(), tonic::Code::ResourceExhausted);
        // A known identity still gets its streams.
        drop(l.open_stream("pod-0", t).expect("known identity"));
        drop(held);
        // Ended, but within their refill grace: still no room.
        assert_eq!(
            l.open_stream("pod-3", t).expect_err("grace").reason(),
            "identities_full"
        );
        // Refilled: a new identity makes room by forgetting them.
        let _s = l
            .open_stream("pod-3", t + Duration::from_millis(500))
            .expect("room again");
        assert_eq!(l.tracked(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Never more than burst + rate × elapsed summaries are admitted, whatever the timing.
        #[test]
        fn bucket_never_admits_more_than_burst_plus_rate(
            rate in 0.0f64..50.0, burst in 1u32..50, steps in proptest::collection::vec(0u64..2000, 1..200),
        ) {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(rate, burst, t0);
            let mut now = t0;
            let mut admitted = 0u64;
            for ms in steps {
                now += Duration::from_millis(ms);
                if b.take(now) { admitted += 1; }
            }
            let bound = f64::from(burst) + rate * now.duration_since(t0).as_secs_f64();
            prop_assert!(admitted as f64 <= bound + 1e-9, "{admitted} > {bound}");
        }
    }
}
