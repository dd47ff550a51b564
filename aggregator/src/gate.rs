//! The ingest stream's gate: authentication at stream start, then for every summary the node
//! binding (a stream may only report for the node of its pod) and the per-identity limits.
//! Every refusal is a clear gRPC status, a `denied{reason}` metric and a warning log.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    auth::{Authenticator, Identity, InsecureNoAuth, bearer},
    limits::{LimitError, Limits, LimitsConfig, StreamSlot},
    metrics::Metrics,
    security::SecurityConfig,
};

/// Whether a name is a Node of the cluster (the aggregator's Node watch).
pub type NodeLookup = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Shared by all streams.
#[derive(Clone)]
pub struct Gate {
    pub auth: Arc<dyn Authenticator>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    /// Summaries for names that are not Node objects are refused (`None`: no check; tests).
    pub known_nodes: Option<NodeLookup>,
    /// Positive TokenReviews, reused until the token expires (bounded, see [`ReviewCache`]).
    pub reviews: ReviewCache,
}

/// Positive reviews by token, each until `min(token exp, reviewed + max_age)`: a reconnecting
/// agent costs no TokenReview. Only tokens the apiserver accepted get here, so the cache cannot
/// be filled by strangers. A token whose pod is deleted stays admitted (for its node only) until
/// its entry expires: `max_age` bounds that.
///
/// Bounded: at most `max_entries` tokens (a full cache reviews again, counted as `map_full`),
/// and [`ReviewCache::prune`] drops expired entries and those of deleted Nodes every decision
/// tick, so rotated tokens (hourly, per agent) do not pile up until the cap.
#[derive(Debug, Clone)]
pub struct ReviewCache {
    max_age: Duration,
    max_entries: usize,
    entries: Arc<Mutex<HashMap<String, (Identity, SystemTime)>>>,
}

impl ReviewCache {
    #[must_use]
    pub fn new(max_age: Duration, max_entries: usize) -> Self {
        Self {
            max_age,
            max_entries,
            entries: Arc::default(),
        }
    }

    /// Drops expired entries and those bound to nodes `keep` rejects; returns how many remain.
    pub fn prune(&self, now: SystemTime, keep: impl Fn(&str) -> bool) -> usize {
        let mut map = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, (id, until)| now < *until && id.node.as_deref().is_none_or(&keep));
        map.len()
    }

    fn get(&self, token: &str, now: SystemTime) -> Option<Identity> {
        let mut map = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(token) {
            Some((id, until)) if now < *until => Some(id.clone()),
            Some(_) => {
                map.remove(token);
                None
            }
            None => None,
        }
    }

    /// Caches a positive review; `false` when the cache is full (the token is reviewed again
    /// next time).
    fn put(&self, token: &str, id: &Identity, now: SystemTime) -> bool {
        let Some(exp) = token_expiry(token) else {
            return true;
        };
        let until = exp.min(now + self.max_age);
        if until <= now || self.max_age.is_zero() {
            return true;
        }
        let mut map = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= self.max_entries && !map.contains_key(token) {
            map.retain(|_, (_, u)| now < *u);
            if map.len() >= self.max_entries {
                return false;
            }
        }
        map.insert(token.to_owned(), (id.clone(), until));
        true
    }
}

/// The `exp` claim of a JWT, read without verification: only used for tokens the apiserver
/// has just accepted.
#[must_use]
pub fn token_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64url(payload)?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(exp))
}

fn base64url(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: u64) -> String {
        // {"alg":"none"} . {"exp":<exp>} . (no signature)
        let enc = |s: &str| {
            const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let b = s.as_bytes();
            let mut out = String::new();
            for chunk in b.chunks(3) {
                let n = chunk.iter().fold(0u32, |a, c| (a << 8) | u32::from(*c)) << (8 * (3 - chunk.len()));
                for i in 0..=chunk.len() {
                    out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
                }
            }
            out
        };
        format!("{}.{}.", enc("{\"alg\":\"none\"}"), enc(&format!("{{\"exp\":{exp}}}")))
    }

    #[test]
    fn token_expiry_reads_the_exp_claim() {
        assert_eq!(
            token_expiry(&jwt(1_900_000_000)),
            UNIX_EPOCH.checked_add(Duration::from_secs(1_900_000_000))
        );
        assert_eq!(token_expiry("not-a-token"), None);
        assert_eq!(token_expiry("a.%%%.b"), None);
    }

    #[test]
    fn cache_keeps_a_review_until_the_token_or_the_max_age_expires() {
        let id = Identity {
            key: Some("uid".into()),
            subject: "s".into(),
            node: Some("node-0".into()),
        };
        #[expect(
            clippy::duration_suboptimal_units,
            reason = "seconds, like the token expiry it is compared with"
        )]
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let cache = ReviewCache::new(Duration::from_mins(5), 8);
        let soon = jwt(1_800_000_060);
        cache.put(&soon, &id, now);
        assert_eq!(cache.get(&soon, now + Duration::from_secs(59)), Some(id.clone()));
        assert_eq!(cache.get(&soon, now + Duration::from_mins(1)), None, "token expired");
        let late = jwt(1_800_003_600);
        cache.put(&late, &id, now);
        assert!(cache.get(&late, now + Duration::from_secs(299)).is_some());
        assert_eq!(cache.get(&late, now + Duration::from_mins(5)), None, "max age");
        assert_eq!(cache.get("unknown", now), None);
    }

    #[test]
    fn cache_is_capped_and_pruned_of_expired_tokens_and_deleted_nodes() {
        let on = |node: &str| Identity {
            key: Some(format!("uid-{node}")),
            subject: "s".into(),
            node: Some(node.into()),
        };
        #[expect(
            clippy::duration_suboptimal_units,
            reason = "seconds, like the token expiry it is compared with"
        )]
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let cache = ReviewCache::new(Duration::from_mins(5), 3);
        assert!(cache.put(&jwt(1_800_000_060), &on("node-0"), now));
        assert!(cache.put(&jwt(1_800_000_600), &on("node-1"), now));
        assert!(cache.put(&jwt(1_800_000_601), &on("node-2"), now));
        assert!(!cache.put(&jwt(1_800_000_602), &on("node-3"), now), "full");
        // A rotated token expired; node-2 was deleted: both go, only node-1's stays.
        assert_eq!(cache.prune(now + Duration::from_mins(1), |n| n != "node-2"), 1);
        assert!(cache.put(&jwt(1_800_000_602), &on("node-3"), now + Duration::from_mins(1)));
        // Everything expires at the max age.
        assert_eq!(cache.prune(now + Duration::from_mins(6), |_| true), 0);
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("auth", &self.auth)
            .field("limits", &self.limits)
            .field("known_nodes", &self.known_nodes.is_some())
            .finish_non_exhaustive()
    }
}

/// One admitted stream.
#[derive(Debug)]
pub struct Admission {
    pub identity: Identity,
    peer: String,
    slot: Option<StreamSlot>,
}

impl Gate {
    /// The gate for the ingest service as configured (logs a loud warning in insecure mode).
    /// Its maps hold at most `2 × max_nodes` identities and tokens: one per agent pod, old and
    /// new ones overlapping while agents are replaced or rotate their tokens.
    #[must_use]
    pub fn new(cfg: &SecurityConfig, max_nodes: usize, client: &kube::Client, metrics: Arc<Metrics>) -> Self {
        let max_entries = max_nodes.saturating_mul(2);
        Self {
            auth: crate::auth::build(cfg.auth, client, &cfg.token_audience, &cfg.allowed_service_accounts),
            limits: Limits::new(cfg.limits(max_entries)),
            metrics,
            known_nodes: None,
            reviews: ReviewCache::new(Duration::from_millis(cfg.review_cache_max_ms), max_entries),
        }
    }

    /// Prunes the limiter and the review cache (see their docs) and publishes their sizes;
    /// run every decision tick.
    pub fn prune(&self, is_node: impl Fn(&str) -> bool) {
        let identities = self.limits.prune(Instant::now());
        let reviews = self.reviews.prune(SystemTime::now(), is_node);
        self.metrics.map_entries("limiter_identities", identities);
        self.metrics.map_entries("review_cache", reviews);
    }

    /// INSECURE gate (no authentication) with the given limits; tests and development.
    #[must_use]
    pub fn insecure(limits: LimitsConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            auth: Arc::new(InsecureNoAuth),
            limits: Limits::new(limits),
            metrics,
            known_nodes: None,
            reviews: ReviewCache::new(Duration::ZERO, 0),
        }
    }

    fn deny(&self, reason: &'static str, status: tonic::Status, peer: &str, subject: &str) -> tonic::Status {
        self.metrics.denied(reason);
        self.metrics.rejected(status.code());
        tracing::warn!(peer, subject, reason, code = ?status.code(), message = status.message(), "ingest refused");
        status
    }

    fn refuse_slot(&self, e: &LimitError, peer: &str, subject: &str) -> tonic::Status {
        if let LimitError::TooManyIdentities { max, .. } = e {
            self.metrics.map_full("limiter_identities", *max);
        }
        self.deny(e.reason(), e.status(), peer, subject)
    }

    /// Authenticates a new stream and, when the identity is known, takes one of its stream slots.
    pub async fn admit<T>(&self, req: &tonic::Request<T>) -> Result<Admission, tonic::Status> {
        let peer = req.remote_addr().map_or_else(|| "?".into(), |a| a.to_string());
        let token = bearer(req.metadata()).map_err(|e| self.deny(e.reason(), e.status(), &peer, "?"))?;
        let cached = token
            .filter(|_| self.auth.remote())
            .and_then(|t| self.reviews.get(t, SystemTime::now()));
        let identity = if let Some(id) = cached {
            self.metrics.token_review_cache_hits.inc();
            id
        } else {
            // Only a real review is charged to the global budget: a stream without a token
            // is refused locally and must not use up the agents' reconnects.
            let review = self.auth.remote() && token.is_some();
            if review {
                self.limits
                    .auth_attempt(Instant::now())
                    .map_err(|e| self.deny(e.reason(), e.status(), &peer, "?"))?;
                self.metrics.token_reviews.inc();
            }
            let id = self
                .auth
                .authenticate(token)
                .await
                .map_err(|e| self.deny(e.reason(), e.status(), &peer, "?"))?;
            if let (true, Some(t)) = (review, token)
                && !self.reviews.put(t, &id, SystemTime::now())
            {
                self.metrics.map_full("review_cache", self.reviews.max_entries);
            }
            id
        };
        let slot = match &identity.key {
            Some(key) => Some(
                self.limits
                    .open_stream(key, Instant::now())
                    .map_err(|e| self.refuse_slot(&e, &peer, &identity.subject))?,
            ),
            None => None,
        };
        tracing::debug!(%peer, subject = %identity.subject, "ingest stream admitted");
        Ok(Admission { identity, peer, slot })
    }

    /// Checks one valid summary claiming `node`: node binding, then rate.
    pub fn check(&self, adm: &mut Admission, node: &str) -> Result<(), tonic::Status> {
        if let Some(bound) = &adm.identity.node
            && bound != node
        {
            let status = tonic::Status::permission_denied(format!(
                "node.node_name {node:?} is not this agent's node: its token is bound to a pod on {bound:?}"
            ));
            return Err(self.deny("node_mismatch", status, &adm.peer, &adm.identity.subject));
        }
        if let Some(known) = &self.known_nodes
            && !known(node)
        {
            let status = tonic::Status::not_found(format!(
                "node.node_name {node:?} is not a Node of this cluster; reports are accepted for existing Nodes only"
            ));
            return Err(self.deny("unknown_node", status, &adm.peer, &adm.identity.subject));
        }
        if adm.slot.is_none() {
            // Unauthenticated (insecure) streams are limited per claimed node.
            let slot = self
                .limits
                .open_stream(&format!("node:{node}"), Instant::now())
                .map_err(|e| self.refuse_slot(&e, &adm.peer, &adm.identity.subject))?;
            // One stream claims one node: later summaries must claim the same one.
            adm.identity.node = Some(node.into());
            adm.slot = Some(slot);
        }
        if let Some(slot) = &adm.slot {
            self.limits
                .summary(slot, Instant::now())
                .map_err(|e| self.deny(e.reason(), e.status(), &adm.peer, &adm.identity.subject))?;
        }
        Ok(())
    }
}
