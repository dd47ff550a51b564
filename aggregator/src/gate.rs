//! The ingest stream's gate: authentication at stream start, then for every summary the node
//! binding (a stream may only report for the node of its pod) and the per-identity limits.
//! Every refusal is a clear gRPC status, a `denied{reason}` metric and a warning log.

use std::{sync::Arc, time::Instant};

use crate::{
    auth::{Authenticator, Identity, InsecureNoAuth, bearer},
    limits::{Limits, LimitsConfig, StreamSlot},
    metrics::Metrics,
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
    /// INSECURE gate (no authentication) with the given limits; tests and development.
    #[must_use]
    pub fn insecure(limits: LimitsConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            auth: Arc::new(InsecureNoAuth),
            limits: Limits::new(limits),
            metrics,
            known_nodes: None,
        }
    }

    fn deny(&self, reason: &'static str, status: tonic::Status, peer: &str, subject: &str) -> tonic::Status {
        self.metrics.denied(reason);
        self.metrics.rejected(status.code());
        tracing::warn!(peer, subject, reason, code = ?status.code(), message = status.message(), "ingest refused");
        status
    }

    /// Authenticates a new stream and, when the identity is known, takes one of its stream slots.
    pub async fn admit<T>(&self, req: &tonic::Request<T>) -> Result<Admission, tonic::Status> {
        let peer = req.remote_addr().map_or_else(|| "?".into(), |a| a.to_string());
        let token = bearer(req.metadata()).map_err(|e| self.deny(e.reason(), e.status(), &peer, "?"))?;
        if self.auth.remote() {
            self.limits
                .auth_attempt(Instant::now())
                .map_err(|e| self.deny(e.reason(), e.status(), &peer, "?"))?;
        }
        let identity = self
            .auth
            .authenticate(token)
            .await
            .map_err(|e| self.deny(e.reason(), e.status(), &peer, "?"))?;
        let slot = match &identity.key {
            Some(key) => Some(
                self.limits
                    .open_stream(key, Instant::now())
                    .map_err(|e| self.deny(e.reason(), e.status(), &peer, &identity.subject))?,
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
                .map_err(|e| self.deny(e.reason(), e.status(), &adm.peer, &adm.identity.subject))?;
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
