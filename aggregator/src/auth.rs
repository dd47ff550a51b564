//! Who is at the other end of an ingest stream, and which node it may speak for.
//!
//! Every agent presents its projected ServiceAccount token (a dedicated audience, bound to its
//! pod) as `authorization: Bearer <token>` on the stream. [`TokenReviewAuthenticator`] asks the
//! apiserver (`authentication.k8s.io/v1` TokenReview) whether the token is valid for our
//! audience, then resolves the node the pod runs on: from the token's node claim
//! (`authentication.kubernetes.io/node-name`, Kubernetes ≥ 1.30) or, on older clusters, from its
//! pod claims (`pod-name`, `pod-uid`) and a Pod lookup (`spec.nodeName`, uid checked). The stream
//! may then only carry summaries for that node.
//!
//! [`InsecureNoAuth`] accepts anyone for any node. It exists for development and the demo, is
//! named insecure everywhere it appears and logs a warning at start.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams};

/// The authenticated peer of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Stable key for per-identity limits (the pod uid); `None` when unauthenticated, in which
    /// case the limits are keyed by the node the stream claims.
    pub key: Option<String>,
    /// Human-readable subject for logs (`system:serviceaccount:ns:name pod=… node=…`).
    pub subject: String,
    /// The only node this stream may report for; `None` = any (insecure mode only).
    pub node: Option<String>,
}

/// Why a stream was refused at authentication.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token: send the agent's projected ServiceAccount token as `authorization: Bearer <token>`")]
    MissingToken,
    #[error("authorization metadata is not `Bearer <token>`")]
    Malformed,
    #[error("token rejected by TokenReview: {0}")]
    Rejected(String),
    #[error("token not valid for audience {0:?}")]
    WrongAudience(String),
    #[error("{0} is not an allowed agent ServiceAccount")]
    NotAllowed(String),
    #[error("token is not bound to a pod (use a projected ServiceAccount token): {0}")]
    NotBound(String),
    #[error("the token's pod {0}")]
    PodMismatch(String),
    #[error("cannot verify the token now (apiserver): {0}")]
    Unavailable(String),
}

impl AuthError {
    /// The gRPC status sent to the agent.
    #[must_use]
    pub fn status(&self) -> tonic::Status {
        let msg = self.to_string();
        match self {
            Self::MissingToken | Self::Malformed | Self::Rejected(_) | Self::WrongAudience(_) => {
                tonic::Status::unauthenticated(msg)
            }
            Self::NotAllowed(_) | Self::NotBound(_) | Self::PodMismatch(_) => tonic::Status::permission_denied(msg),
            Self::Unavailable(_) => tonic::Status::unavailable(msg),
        }
    }

    /// Metric label (`reason`).
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::Malformed => "malformed_token",
            Self::Rejected(_) => "token_rejected",
            Self::WrongAudience(_) => "wrong_audience",
            Self::NotAllowed(_) => "service_account_not_allowed",
            Self::NotBound(_) => "token_not_pod_bound",
            Self::PodMismatch(_) => "pod_mismatch",
            Self::Unavailable(_) => "auth_unavailable",
        }
    }
}

/// Authenticates the bearer token of a stream (`None` when the agent sent none).
#[tonic::async_trait]
pub trait Authenticator: Send + Sync + std::fmt::Debug {
    async fn authenticate(&self, token: Option<&str>) -> Result<Identity, AuthError>;
    /// Whether this authenticator ever calls the apiserver (then attempts are rate limited).
    fn remote(&self) -> bool {
        false
    }
}

/// Extracts the bearer token from gRPC metadata.
pub fn bearer(meta: &tonic::metadata::MetadataMap) -> Result<Option<&str>, AuthError> {
    let Some(v) = meta.get("authorization") else {
        return Ok(None);
    };
    let s = v.to_str().map_err(|_| AuthError::Malformed)?;
    let token = s
        .strip_prefix("Bearer ")
        .or_else(|| s.strip_prefix("bearer "))
        .ok_or(AuthError::Malformed)?
        .trim();
    if token.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(Some(token))
}

/// INSECURE: no authentication; any stream may report for any node. Development and demo only.
#[derive(Debug, Default, Clone, Copy)]
pub struct InsecureNoAuth;

#[tonic::async_trait]
impl Authenticator for InsecureNoAuth {
    async fn authenticate(&self, _token: Option<&str>) -> Result<Identity, AuthError> {
        Ok(Identity {
            key: None,
            subject: "insecure-unauthenticated".into(),
            node: None,
        })
    }
}

const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const SA_PREFIX: &str = "system:serviceaccount:";

/// TokenReview against the apiserver + node resolution (see the module docs).
#[derive(Clone)]
pub struct TokenReviewAuthenticator {
    pub client: Client,
    /// The dedicated audience agent tokens are requested for.
    pub audience: String,
    /// `namespace:name` of ServiceAccounts allowed to report; empty = any pod-bound token with
    /// our audience.
    pub allowed_service_accounts: Vec<String>,
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("audience", &self.audience)
            .field("allowed_service_accounts", &self.allowed_service_accounts)
            .finish_non_exhaustive()
    }
}

/// What a successful TokenReview says about the token, reduced to what we decide on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewedToken {
    pub namespace: String,
    pub service_account: String,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Checks a TokenReview answer: authenticated, our audience, a ServiceAccount (allowed, if a
/// list is given). Pure, so it is unit-tested without an apiserver.
pub fn check_review(review: &TokenReview, audience: &str, allowed: &[String]) -> Result<ReviewedToken, AuthError> {
    let status = review.status.clone().unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(AuthError::Rejected(
            status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "not authenticated".into()),
        ));
    }
    if !status.audiences.unwrap_or_default().iter().any(|a| a == audience) {
        return Err(AuthError::WrongAudience(audience.into()));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some((namespace, sa)) = username.strip_prefix(SA_PREFIX).and_then(|r| r.split_once(':')) else {
        return Err(AuthError::NotBound(format!("{username:?} is not a ServiceAccount")));
    };
    let who = format!("{namespace}:{sa}");
    if !allowed.is_empty() && !allowed.contains(&who) {
        return Err(AuthError::NotAllowed(who));
    }
    Ok(ReviewedToken {
        namespace: namespace.into(),
        service_account: sa.into(),
        extra: user.extra.unwrap_or_default(),
    })
}

fn single<'a>(extra: &'a BTreeMap<String, Vec<String>>, key: &str) -> Option<&'a str> {
    match extra.get(key).map(Vec::as_slice) {
        Some([v]) if !v.is_empty() => Some(v.as_str()),
        _ => None,
    }
}

/// Kubernetes ≥ 1.30 signs the node into pod-bound tokens: (node, pod, pod uid) straight from
/// the claims, no lookup needed. `None` on older clusters (then the pod is looked up).
#[must_use]
pub fn claimed_node(extra: &BTreeMap<String, Vec<String>>) -> Option<(String, String, String)> {
    let node = single(extra, EXTRA_NODE_NAME)?;
    let pod = single(extra, EXTRA_POD_NAME)?;
    let uid = single(extra, EXTRA_POD_UID)?;
    Some((node.into(), pod.into(), uid.into()))
}

impl TokenReviewAuthenticator {
    async fn review(&self, token: &str) -> Result<ReviewedToken, AuthError> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let req = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.into()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let out = api
            .create(&PostParams::default(), &req)
            .await
            .map_err(|e| AuthError::Unavailable(format!("TokenReview: {e}")))?;
        check_review(&out, &self.audience, &self.allowed_service_accounts)
    }

    async fn node_of(&self, t: &ReviewedToken) -> Result<(String, String, String), AuthError> {
        if let Some(claimed) = claimed_node(&t.extra) {
            return Ok(claimed);
        }
        let pod_name = single(&t.extra, EXTRA_POD_NAME);
        let pod_uid = single(&t.extra, EXTRA_POD_UID);
        let (Some(pod), Some(uid)) = (pod_name, pod_uid) else {
            return Err(AuthError::NotBound(format!(
                "{}:{} token has no pod claims",
                t.namespace, t.service_account
            )));
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &t.namespace);
        let found = pods
            .get_opt(pod)
            .await
            .map_err(|e| AuthError::Unavailable(format!("reading pod {}/{pod}: {e}", t.namespace)))?;
        let Some(found) = found else {
            return Err(AuthError::PodMismatch(format!(
                "{}/{pod} no longer exists",
                t.namespace
            )));
        };
        if found.metadata.uid.as_deref() != Some(uid) {
            return Err(AuthError::PodMismatch(format!(
                "{}/{pod} was replaced (uid differs from the token's)",
                t.namespace
            )));
        }
        let node = found
            .spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| AuthError::PodMismatch(format!("{}/{pod} is not scheduled to a node", t.namespace)))?;
        Ok((node, pod.into(), uid.into()))
    }
}

#[tonic::async_trait]
impl Authenticator for TokenReviewAuthenticator {
    async fn authenticate(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let token = token.ok_or(AuthError::MissingToken)?;
        let reviewed = self.review(token).await?;
        let (node, pod, uid) = self.node_of(&reviewed).await?;
        Ok(Identity {
            key: Some(uid),
            subject: format!(
                "{SA_PREFIX}{}:{} pod={}/{pod} node={node}",
                reviewed.namespace, reviewed.service_account, reviewed.namespace
            ),
            node: Some(node),
        })
    }

    fn remote(&self) -> bool {
        true
    }
}

/// How streams are authenticated (config `ingest.auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// INSECURE: no authentication (development, demo). Logged as a warning at start.
    #[default]
    InsecureNone,
    /// Projected ServiceAccount tokens verified with TokenReview, bound to the pod's node.
    TokenReview,
}

/// Builds the configured authenticator; warns loudly for the insecure mode.
#[must_use]
pub fn build(
    mode: AuthMode,
    client: &Client,
    audience: &str,
    allowed_service_accounts: &[String],
) -> Arc<dyn Authenticator> {
    match mode {
        AuthMode::InsecureNone => {
            tracing::warn!(
                "INSECURE: ingest.auth = \"insecure-none\": agents are NOT authenticated and any client can report \
                 for any node. Use ingest.auth = \"token-review\" outside development."
            );
            Arc::new(InsecureNoAuth)
        }
        AuthMode::TokenReview => {
            tracing::info!(
                audience,
                ?allowed_service_accounts,
                "agents authenticate with TokenReview"
            );
            Arc::new(TokenReviewAuthenticator {
                client: client.clone(),
                audience: audience.into(),
                allowed_service_accounts: allowed_service_accounts.to_vec(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    use super::*;

    fn review(authenticated: bool, audiences: &[&str], username: &str) -> TokenReview {
        TokenReview {
            status: Some(TokenReviewStatus {
                authenticated: Some(authenticated),
                audiences: Some(audiences.iter().map(|s| (*s).to_string()).collect()),
                user: Some(UserInfo {
                    username: Some(username.into()),
                    extra: Some(BTreeMap::from([(
                        EXTRA_POD_NAME.to_string(),
                        vec!["agent-x".to_string()],
                    )])),
                    ..Default::default()
                }),
                error: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn review_checks_authentication_audience_and_account() {
        let sa = "system:serviceaccount:graywatch:agent";
        let ok = check_review(&review(true, &["graywatch"], sa), "graywatch", &[]).expect("ok");
        assert_eq!(
            (ok.namespace.as_str(), ok.service_account.as_str()),
            ("graywatch", "agent")
        );
        assert_eq!(single(&ok.extra, EXTRA_POD_NAME), Some("agent-x"));
        assert_eq!(
            check_review(&review(false, &["graywatch"], sa), "graywatch", &[]),
            Err(AuthError::Rejected("not authenticated".into()))
        );
        assert_eq!(
            check_review(&review(true, &["other"], sa), "graywatch", &[]),
            Err(AuthError::WrongAudience("graywatch".into()))
        );
        assert!(matches!(
            check_review(&review(true, &["graywatch"], "alice"), "graywatch", &[]),
            Err(AuthError::NotBound(_))
        ));
        assert_eq!(
            check_review(
                &review(true, &["graywatch"], sa),
                "graywatch",
                &["graywatch:other".into()]
            ),
            Err(AuthError::NotAllowed("graywatch:agent".into()))
        );
        assert!(
            check_review(
                &review(true, &["graywatch"], sa),
                "graywatch",
                &["graywatch:agent".into()]
            )
            .is_ok()
        );
    }

    #[test]
    fn node_claim_is_used_when_present() {
        let claims = |pairs: &[(&str, &[&str])]| -> BTreeMap<String, Vec<String>> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.iter().map(|s| (*s).to_string()).collect()))
                .collect()
        };
        let full = claims(&[
            (EXTRA_NODE_NAME, &["node-a"]),
            (EXTRA_POD_NAME, &["agent-1"]),
            (EXTRA_POD_UID, &["uid-1"]),
        ]);
        assert_eq!(
            claimed_node(&full),
            Some(("node-a".into(), "agent-1".into(), "uid-1".into()))
        );
        // 1.20: pod claims only → lookup path.
        let pod_only = claims(&[(EXTRA_POD_NAME, &["agent-1"]), (EXTRA_POD_UID, &["uid-1"])]);
        assert_eq!(claimed_node(&pod_only), None);
        // Ambiguous or empty claims are never trusted.
        let two = claims(&[
            (EXTRA_NODE_NAME, &["node-a", "node-b"]),
            (EXTRA_POD_NAME, &["agent-1"]),
            (EXTRA_POD_UID, &["uid-1"]),
        ]);
        assert_eq!(claimed_node(&two), None);
        let empty = claims(&[
            (EXTRA_NODE_NAME, &[""]),
            (EXTRA_POD_NAME, &["agent-1"]),
            (EXTRA_POD_UID, &["uid-1"]),
        ]);
        assert_eq!(claimed_node(&empty), None);
    }

    #[test]
    fn bearer_parsing_and_status_codes() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(bearer(&m), Ok(None));
        m.insert("authorization", "Bearer abc".parse().expect("ascii"));
        assert_eq!(bearer(&m), Ok(Some("abc")));
        m.insert("authorization", "Basic abc".parse().expect("ascii"));
        assert_eq!(bearer(&m), Err(AuthError::Malformed));
        m.insert("authorization", "Bearer ".parse().expect("ascii"));
        assert_eq!(bearer(&m), Err(AuthError::Malformed));
        assert_eq!(AuthError::MissingToken.status().code(), tonic::Code::Unauthenticated);
        assert_eq!(
            AuthError::NotBound(String::new()).status().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            AuthError::Unavailable(String::new()).status().code(),
            tonic::Code::Unavailable
        );
    }
}
