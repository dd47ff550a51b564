//! The `[security]` config section: agent authentication, TLS on the ingest stream and the
//! per-identity limits. Plain configuration: the ingest gate is built from it in gate.rs, the
//! gRPC server in run.rs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{auth::AuthMode, limits::LimitsConfig};

/// A `[security]` field with an invalid value (wrapped by `config::ConfigError`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("security.{field}: {problem}")]
pub struct SecurityError {
    pub field: &'static str,
    pub problem: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// `token-review` (projected ServiceAccount tokens, bound to the pod's node) or
    /// `insecure-none` (no authentication; development and demo only, logged as a warning).
    pub auth: AuthMode,
    /// Audience agent tokens must carry (the projected volume's `audience`).
    pub token_audience: String,
    /// `namespace:name` of the agent ServiceAccount(s); empty = any pod-bound token with our audience.
    pub allowed_service_accounts: Vec<String>,
    /// Concurrent streams per identity (pod; in insecure mode: per claimed node).
    pub max_streams_per_identity: usize,
    /// Sustained summaries per second per identity, and the burst (covers a reconnect replay).
    pub summaries_per_second: f64,
    pub summary_burst: u32,
    /// Stream authentications (TokenReviews) per second over all clients, and the burst.
    pub auth_attempts_per_second: f64,
    pub auth_attempt_burst: u32,
    /// PEM server certificate chain and key; both or neither (then the stream is plaintext).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA bundle: when set, agents must present a client certificate it signed (mTLS).
    pub tls_client_ca_file: Option<PathBuf>,
    /// INSECURE, development only: let an acting mode (not dry-run) run with
    /// `auth = "insecure-none"`, i.e. let anyone who reaches the gRPC port report for any node.
    /// Refused at start without it.
    pub insecure_allow_acting_without_identity: bool,
    /// INSECURE: accept agents' bearer tokens over a plaintext stream (`auth = "token-review"`
    /// without `tls_cert_file`): anyone on the path can copy a token and report as that node.
    /// Refused at start without it.
    pub insecure_allow_plaintext_tokens: bool,
    /// A positive TokenReview is reused for a reconnecting agent until its token expires, at
    /// most this long (a deleted pod's token stays admitted, for its node only, this long).
    pub review_cache_max_ms: u64,
    /// HTTP/2 PING interval on idle agent connections, and how long to wait for the answer
    /// before the connection (and its streams' slots) is dropped; TCP keepalive at the interval.
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            auth: AuthMode::default(),
            token_audience: "graywatch".into(),
            allowed_service_accounts: Vec::new(),
            max_streams_per_identity: 4,
            summaries_per_second: 20.0,
            summary_burst: 300,
            auth_attempts_per_second: 50.0,
            auth_attempt_burst: 200,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            insecure_allow_acting_without_identity: false,
            insecure_allow_plaintext_tokens: false,
            review_cache_max_ms: 300_000,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 10_000,
        }
    }
}

impl SecurityConfig {
    /// Checks that what the aggregator would do with the cluster (`acting`: any mode but
    /// dry-run) is backed by agent identity, unless the loudly named override says otherwise.
    pub fn validate_for(&self, acting: bool) -> Result<(), SecurityError> {
        if acting && self.auth == AuthMode::InsecureNone && !self.insecure_allow_acting_without_identity {
            return Err(SecurityError {
                field: "auth",
                problem: "\"insecure-none\" with an acting mode (policy.dry_run = false): anyone who reaches the \
                          gRPC port could report for any node and get it tainted. Use auth = \"token-review\", \
                          run in dry-run, or set security.insecure_allow_acting_without_identity = true to accept that"
                    .into(),
            });
        }
        if self.auth == AuthMode::TokenReview && self.tls_cert_file.is_none() && !self.insecure_allow_plaintext_tokens {
            return Err(SecurityError {
                field: "tls_cert_file",
                problem: "auth = \"token-review\" without TLS: the agents' bearer tokens would cross the network in \
                          plaintext. Set tls_cert_file and tls_key_file, or security.insecure_allow_plaintext_tokens = \
                          true to accept that"
                    .into(),
            });
        }
        if acting && self.auth == AuthMode::InsecureNone {
            tracing::warn!(
                "INSECURE: security.insecure_allow_acting_without_identity = true: acting on reports nobody authenticated"
            );
        }
        self.validate()
    }

    pub fn validate(&self) -> Result<(), SecurityError> {
        let bad = |field: &'static str, problem: &str| {
            Err(SecurityError {
                field,
                problem: problem.into(),
            })
        };
        if self.auth == AuthMode::TokenReview && self.token_audience.trim().is_empty() {
            return bad("token_audience", "must not be empty with auth = \"token-review\"");
        }
        if let Some(sa) = self
            .allowed_service_accounts
            .iter()
            .find(|s| s.split_once(':').is_none_or(|(ns, n)| ns.is_empty() || n.is_empty()))
        {
            return bad("allowed_service_accounts", &format!("{sa:?} is not `namespace:name`"));
        }
        if self.keepalive_interval_ms == 0 || self.keepalive_timeout_ms == 0 {
            return bad(
                "keepalive_interval_ms",
                "keepalive interval and timeout must be positive",
            );
        }
        if self.max_streams_per_identity == 0 {
            return bad("max_streams_per_identity", "must be positive");
        }
        if !(self.summaries_per_second.is_finite() && self.summaries_per_second > 0.0) {
            return bad("summaries_per_second", "must be a positive number");
        }
        if !(self.auth_attempts_per_second.is_finite() && self.auth_attempts_per_second > 0.0) {
            return bad("auth_attempts_per_second", "must be a positive number");
        }
        if self.summary_burst == 0 || self.auth_attempt_burst == 0 {
            return bad("summary_burst", "bursts must be positive");
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return bad("tls_cert_file", "tls_cert_file and tls_key_file go together");
        }
        if self.tls_client_ca_file.is_some() && self.tls_cert_file.is_none() {
            return bad("tls_client_ca_file", "needs tls_cert_file and tls_key_file");
        }
        Ok(())
    }

    /// The limits of these settings, tracking at most `max_identities` identities.
    #[must_use]
    pub fn limits(&self, max_identities: usize) -> LimitsConfig {
        LimitsConfig {
            max_identities,
            max_streams_per_identity: self.max_streams_per_identity,
            summaries_per_second: self.summaries_per_second,
            summary_burst: self.summary_burst,
            auth_attempts_per_second: self.auth_attempts_per_second,
            auth_attempt_burst: self.auth_attempt_burst,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_mistakes_name_the_field() {
        assert!(SecurityConfig::default().validate().is_ok());
        let c = SecurityConfig {
            tls_cert_file: Some("/x".into()),
            ..SecurityConfig::default()
        };
        assert!(
            c.validate()
                .expect_err("key missing")
                .to_string()
                .starts_with("security.tls_cert_file")
        );
        let c = SecurityConfig {
            allowed_service_accounts: vec!["graywatch".into()],
            ..SecurityConfig::default()
        };
        assert!(
            c.validate()
                .expect_err("no colon")
                .to_string()
                .starts_with("security.allowed_service_accounts")
        );
        let c = SecurityConfig {
            summaries_per_second: f64::NAN,
            ..SecurityConfig::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn acting_without_identity_needs_the_loud_override() {
        let c = SecurityConfig::default();
        assert!(c.validate_for(false).is_ok(), "dry-run may run unauthenticated");
        let err = c.validate_for(true).expect_err("acting + insecure-none");
        assert!(err.to_string().starts_with("security.auth"), "{err}");
        assert!(
            err.to_string().contains("insecure_allow_acting_without_identity"),
            "{err}"
        );
        let c = SecurityConfig {
            insecure_allow_acting_without_identity: true,
            ..SecurityConfig::default()
        };
        assert!(c.validate_for(true).is_ok());
        let c = SecurityConfig {
            auth: AuthMode::TokenReview,
            tls_cert_file: Some("/tls.crt".into()),
            tls_key_file: Some("/tls.key".into()),
            ..SecurityConfig::default()
        };
        assert!(c.validate_for(true).is_ok());
    }

    #[test]
    fn bearer_tokens_over_plaintext_need_the_loud_override() {
        let c = SecurityConfig {
            auth: AuthMode::TokenReview,
            ..SecurityConfig::default()
        };
        let err = c.validate_for(false).expect_err("token-review without TLS");
        assert!(err.to_string().starts_with("security.tls_cert_file"), "{err}");
        assert!(err.to_string().contains("insecure_allow_plaintext_tokens"), "{err}");
        let c = SecurityConfig {
            insecure_allow_plaintext_tokens: true,
            ..c
        };
        assert!(c.validate_for(true).is_ok());
    }

    #[test]
    fn parses_from_toml() {
        let c: SecurityConfig = toml::from_str(
            "auth = \"token-review\"\ntoken_audience = \"gw\"\nallowed_service_accounts = [\"graywatch:agent\"]\n",
        )
        .expect("parses");
        assert_eq!(c.auth, AuthMode::TokenReview);
        assert_eq!(c.token_audience, "gw");
        assert!(c.validate().is_ok());
        assert!(c.validate_for(false).is_err(), "token-review without TLS");
        assert!(toml::from_str::<SecurityConfig>("auth = \"none\"\n").is_err());
    }
}
