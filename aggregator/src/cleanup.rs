//! `graywatch-aggregator cleanup`: undo everything the aggregator wrote, for `helm uninstall`
//! (the chart's pre-delete hook) or by hand.
//!
//! 1. Fence the running aggregator: take the leader Lease for `--hold-lease-seconds`, so no
//!    replica acts while we clean up or until Helm has deleted them; when someone else held it,
//!    wait `leader.lease_duration_ms`, the bound within which a leader that lost the Lease has
//!    stopped writing (`leader.rs`).
//! 2. The chart's NodeReadinessRules named with `--node-readiness-rule` deleted (mode nrc: else
//!    the Node Readiness Controller would taint every node once our conditions are gone), and
//!    then their taints, with our taint (`policy.taint_key`), off every Node
//!    (`Actuator::set_taint` / `remove_taint`).
//! 3. NodePools restored from our snapshot ConfigMaps, then the snapshots deleted
//!    (`Actuator::change_pool` with `PoolChange::Restore`, as on recovery); a snapshot of a
//!    NodePool that no longer exists is only deleted.
//! 4. Our conditions off every Node's status: `<prefix>Healthy`, `<prefix><Family>Healthy`, and
//!    the EKS `NetworkingReady` only where our field manager owns it
//!    (`Actuator::remove_conditions`).
//!
//! With `--only taint` only step 2's taint of ours is removed (mode direct-taint → nrc: the
//! conditions stay for the Node Readiness Controller). With `--stop-deployment NAME` (the chart's
//! pre-upgrade mode-change hook) step 1 first scales that aggregator Deployment to 0 and waits
//! until its pods are gone (`stop.rs`), takes the Lease without waiting, and releases it at the
//! end instead of holding it; a failed cleanup scales the Deployment back.
//!
//! Idempotent: a second run finds nothing and changes nothing. Every removal is logged with the
//! object's name; a failed write is logged, counted, and the rest still runs.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Node, NodeCondition},
    },
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, ObjectMeta, PostParams},
};

use crate::{
    actuate::Actuator,
    cluster::{FIELD_MANAGER, list_snapshots, nodepool_resource},
    config::{CleanupArgs, FileConfig, Only},
    core::{model::Family, plan::PoolChange, step::EKS_NETWORKING_CONDITION},
};

/// The Node Readiness Controller's rules (readiness.node.x-k8s.io/v1alpha1).
#[must_use]
pub fn node_readiness_rule_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("readiness.node.x-k8s.io", "v1alpha1", "NodeReadinessRule"),
        "nodereadinessrules",
    )
}

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("listing {what}: {source}")]
    List { what: &'static str, source: kube::Error },
    #[error("leader Lease {name}: {source}")]
    Lease { name: String, source: kube::Error },
    #[error("leader Lease {0}: it kept changing under us")]
    LeaseConflict(String),
}

/// What a cleanup did.
#[derive(Debug, Default)]
pub struct Report {
    /// NodeReadinessRules deleted.
    pub rules_deleted: Vec<String>,
    /// Nodes our taint was removed from.
    pub taints_removed: Vec<String>,
    /// Node → taint keys of deleted NodeReadinessRules removed from it.
    pub rule_taints_removed: BTreeMap<String, Vec<String>>,
    /// Node → condition types removed.
    pub conditions_removed: BTreeMap<String, Vec<String>>,
    /// NodePools put back to their snapshot.
    pub pools_restored: Vec<String>,
    /// Snapshot ConfigMaps deleted.
    pub snapshots_deleted: Vec<String>,
    /// Every write or read that failed (the cleanup went on with the rest).
    pub errors: Vec<String>,
    /// `--stop-deployment`: the Deployment scaled to 0 (and back, when the cleanup failed).
    pub stopped: Option<crate::stop::Stopped>,
    /// `--stop-deployment`: the Lease was released at the end.
    pub lease_released: bool,
    /// "<from> → <to>" when the cleanup runs for a mode change.
    pub reason: Option<String>,
}

impl Report {
    #[must_use]
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// Human-readable summary, one line per category.
    #[must_use]
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let list = |v: &[String]| if v.is_empty() { "-".to_string() } else { v.join(", ") };
        if let Some(r) = &self.reason {
            let _ = writeln!(s, "mode change: {r}");
        }
        if let Some(st) = &self.stopped {
            let _ = writeln!(
                s,
                "deployment stopped: {} ({} → 0 replicas; pods waited for: {})",
                st.name,
                st.previous_replicas,
                list(&st.pods_waited_for)
            );
        }
        if !self.rules_deleted.is_empty() {
            let _ = writeln!(
                s,
                "nodereadinessrules deleted: {} ({})",
                self.rules_deleted.len(),
                list(&self.rules_deleted)
            );
            let taints: Vec<String> = self
                .rule_taints_removed
                .iter()
                .map(|(n, ks)| format!("{n}: {}", ks.join(" ")))
                .collect();
            let _ = writeln!(
                s,
                "their taints removed: {} ({})",
                self.rule_taints_removed.values().map(Vec::len).sum::<usize>(),
                list(&taints)
            );
        }
        let _ = writeln!(
            s,
            "taints removed: {} ({})",
            self.taints_removed.len(),
            list(&self.taints_removed)
        );
        let conds: Vec<String> = self
            .conditions_removed
            .iter()
            .map(|(n, ts)| format!("{n}: {}", ts.join(" ")))
            .collect();
        let removed: usize = self.conditions_removed.values().map(Vec::len).sum();
        let _ = writeln!(s, "conditions removed: {removed} ({})", list(&conds));
        let _ = writeln!(
            s,
            "nodepools restored: {} ({})",
            self.pools_restored.len(),
            list(&self.pools_restored)
        );
        let _ = writeln!(
            s,
            "snapshots deleted: {} ({})",
            self.snapshots_deleted.len(),
            list(&self.snapshots_deleted)
        );
        let _ = write!(s, "errors: {}", self.errors.len());
        for e in &self.errors {
            let _ = write!(s, "\n  {e}");
        }
        s
    }
}

/// Whether `c` on `node` is one of our conditions.
fn is_ours(cfg: &FileConfig, node: &Node, c: &NodeCondition) -> bool {
    let p = &cfg.policy;
    if c.type_ == p.overall_condition() || Family::ALL.iter().any(|f| c.type_ == p.family_condition(*f)) {
        return true;
    }
    c.type_ == EKS_NETWORKING_CONDITION && owns_condition(node, FIELD_MANAGER, EKS_NETWORKING_CONDITION)
}

/// Whether `manager` owns the condition of type `ty` in the Node's managedFields.
fn owns_condition(node: &Node, manager: &str, ty: &str) -> bool {
    crate::cluster::condition_managers(node, ty).contains(&manager)
}

async fn list_nodes(client: &Client) -> Result<Vec<Node>, CleanupError> {
    let api: Api<Node> = Api::all(client.clone());
    let mut out = Vec::new();
    let mut lp = ListParams::default().limit(500);
    loop {
        let page = api
            .list(&lp)
            .await
            .map_err(|source| CleanupError::List { what: "Nodes", source })?;
        let next = page.metadata.continue_.clone().filter(|c| !c.is_empty());
        out.extend(page.items);
        match next {
            Some(c) => lp = lp.continue_token(&c),
            None => return Ok(out),
        }
    }
}

/// Takes the leader Lease for `hold`; returns the previous holder when there was a live one.
async fn fence(client: &Client, cfg: &FileConfig, hold: u32) -> Result<Option<String>, CleanupError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let name = &cfg.leader.lease_name;
    let err = |source| CleanupError::Lease {
        name: name.clone(),
        source,
    };
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    let now = || MicroTime(Timestamp::now());
    let hold = i32::try_from(hold).unwrap_or(i32::MAX);
    for _ in 0..5 {
        let Some(mut lease) = api.get_opt(name).await.map_err(err)? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(cfg.identity.clone()),
                    lease_duration_seconds: Some(hold),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            match api.create(&pp, &lease).await {
                Ok(_) => return Ok(None),
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(err(e)),
            }
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let previous = spec
            .holder_identity
            .clone()
            .filter(|h| !h.is_empty() && *h != cfg.identity);
        spec.holder_identity = Some(cfg.identity.clone());
        spec.lease_duration_seconds = Some(hold);
        spec.acquire_time = Some(now());
        spec.renew_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        // The resourceVersion we read: a leader renewing meanwhile makes this a 409, and we read again.
        match api.replace(name, &pp, &lease).await {
            Ok(_) => return Ok(previous),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(err(e)),
        }
    }
    Err(CleanupError::LeaseConflict(name.clone()))
}

/// Runs the whole cleanup; never stops at the first failure (but cleans nothing while the
/// aggregator Deployment named by `--stop-deployment` could not be stopped).
pub async fn run(client: Client, cfg: &FileConfig, args: &CleanupArgs) -> Report {
    let mut report = Report {
        reason: match (&args.from_mode, &args.to_mode) {
            (Some(f), Some(t)) => Some(format!("{f} → {t}")),
            _ => None,
        },
        ..Report::default()
    };
    tracing::info!(
        from_mode = args.from_mode.as_deref().unwrap_or("-"),
        to_mode = args.to_mode.as_deref().unwrap_or("-"),
        only = args.only.as_str(),
        stop_deployment = args.stop_deployment.as_deref().unwrap_or("-"),
        "cleanup starting"
    );
    let mut stopped_deployment = false;
    if let Some(name) = &args.stop_deployment {
        let timeout = Duration::from_secs(args.stop_timeout_seconds);
        match crate::stop::stop_deployment(&client, &cfg.namespace, name, timeout).await {
            Ok(stopped) => {
                stopped_deployment = true;
                report.stopped = stopped;
            }
            Err(e) => {
                // An old-mode replica may still write: cleaning up now would race with it.
                tracing::error!(deployment = %name, error = %e, "could not stop the aggregator; nothing cleaned");
                report.errors.push(e.to_string());
                restore_after_failure(&client, cfg, name, &mut report).await;
                return report;
            }
        }
    }
    report = clean(client.clone(), cfg, args, stopped_deployment, report).await;
    if let Some(name) = &args.stop_deployment {
        if report.ok() {
            match release(&client, cfg).await {
                Ok(released) => {
                    report.lease_released = released;
                    tracing::info!(lease = %cfg.leader.lease_name, released, "leader lease released for the upgraded aggregator");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not release the leader lease");
                    report.errors.push(e.to_string());
                }
            }
        }
        if !report.ok() {
            restore_after_failure(&client, cfg, name, &mut report).await;
        }
    }
    report
}

/// After a failed mode-change cleanup: the aggregator back at the replica count it had (the
/// upgrade fails with the hook; the old mode goes on as before).
async fn restore_after_failure(client: &Client, cfg: &FileConfig, name: &str, report: &mut Report) {
    let stopped = match &report.stopped {
        Some(s) => s.clone(),
        // Not found, or not stopped (stop.rs scales back itself when the wait fails).
        None => return,
    };
    match crate::stop::restore(client, &cfg.namespace, &stopped).await {
        Ok(()) => tracing::warn!(
            deployment = %name,
            replicas = stopped.previous_replicas,
            "cleanup failed; scaled the aggregator back (the upgrade fails with this hook)"
        ),
        Err(e) => {
            tracing::error!(deployment = %name, error = %e, "could not scale the aggregator back");
            report.errors.push(e.to_string());
        }
    }
}

async fn clean(client: Client, cfg: &FileConfig, args: &CleanupArgs, stopped: bool, mut report: Report) -> Report {
    let actuator = Actuator::new(client.clone(), cfg);

    match fence(&client, cfg, args.hold_lease_seconds).await {
        Ok(None) => {
            tracing::info!(lease = %cfg.leader.lease_name, identity = %cfg.identity, "holding the leader lease");
        }
        Ok(Some(previous)) if stopped => {
            tracing::info!(
                lease = %cfg.leader.lease_name,
                identity = %cfg.identity,
                previous = %previous,
                "took the leader lease; the previous leader's pod is gone, no wait"
            );
        }
        Ok(Some(previous)) => {
            let wait = Duration::from_millis(cfg.leader.lease_duration_ms);
            tracing::info!(
                lease = %cfg.leader.lease_name,
                identity = %cfg.identity,
                previous = %previous,
                wait_ms = cfg.leader.lease_duration_ms,
                "took the leader lease; waiting until the previous leader has stopped writing"
            );
            tokio::time::sleep(wait).await;
        }
        Err(e) => {
            // Go on: the cleanup itself is still right, a live aggregator may only redo some of it.
            tracing::warn!(error = %e, "could not take the leader lease");
            report.errors.push(e.to_string());
        }
    }
    let all = args.only == Only::All;
    let why = report.reason.clone().unwrap_or_else(|| "cleanup".into());

    let rule_taints = if all {
        delete_rules(&client, &args.node_readiness_rule, &mut report).await
    } else {
        Vec::new()
    };

    let nodes = match list_nodes(&client).await {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "cannot list Nodes");
            report.errors.push(e.to_string());
            Vec::new()
        }
    };

    for n in &nodes {
        let name = n.name_any();
        let keys: Vec<&str> = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .map(|ts| ts.iter().map(|t| t.key.as_str()).collect())
            .unwrap_or_default();
        for key in rule_taints.iter().filter(|k| keys.contains(&k.as_str())) {
            match actuator.remove_taint(&name, key).await {
                Ok(()) => {
                    tracing::info!(node = %name, taint = %key, "removed NodeReadinessRule taint");
                    report
                        .rule_taints_removed
                        .entry(name.clone())
                        .or_default()
                        .push(key.clone());
                }
                Err(e) => {
                    tracing::warn!(node = %name, taint = %key, error = %e, "could not remove the taint");
                    report.errors.push(e.to_string());
                }
            }
        }
        if !keys.contains(&cfg.policy.taint_key.as_str()) {
            continue;
        }
        match actuator.set_taint(&name, false).await {
            Ok(()) => {
                tracing::info!(node = %name, taint = %cfg.policy.taint_key, why = %why, "removed taint");
                report.taints_removed.push(name);
            }
            Err(e) => {
                tracing::warn!(node = %name, error = %e, "could not remove the taint");
                report.errors.push(e.to_string());
            }
        }
    }

    if !all {
        tracing::info!(why = %why, "only our taint: conditions and NodePools kept");
        return finished(report);
    }
    restore_pools(&client, cfg, &actuator, &mut report).await;

    for n in &nodes {
        let name = n.name_any();
        let any = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| is_ours(cfg, n, c)));
        if !any {
            continue;
        }
        match actuator.remove_conditions(&name, |node, c| is_ours(cfg, node, c)).await {
            Ok(types) if types.is_empty() => {}
            Ok(types) => {
                tracing::info!(node = %name, conditions = ?types, why = %why, "removed conditions");
                report.conditions_removed.insert(name, types);
            }
            Err(e) => {
                tracing::warn!(node = %name, error = %e, "could not remove the conditions");
                report.errors.push(e.to_string());
            }
        }
    }
    finished(report)
}

fn finished(report: Report) -> Report {
    tracing::info!(
        reason = report.reason.as_deref().unwrap_or("-"),
        rules = report.rules_deleted.len(),
        taints = report.taints_removed.len(),
        nodes_with_conditions = report.conditions_removed.len(),
        pools = report.pools_restored.len(),
        snapshots = report.snapshots_deleted.len(),
        errors = report.errors.len(),
        "cleanup finished"
    );
    report
}

/// Gives the leader Lease up (holder cleared, as `leader.rs` does on shutdown) so the upgraded
/// aggregator's first replica leads at once. `false` when someone else holds it.
async fn release(client: &Client, cfg: &FileConfig) -> Result<bool, CleanupError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let name = &cfg.leader.lease_name;
    let err = |source| CleanupError::Lease {
        name: name.clone(),
        source,
    };
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    for _ in 0..5 {
        let Some(mut lease) = api.get_opt(name).await.map_err(err)? else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        match api.replace(name, &pp, &lease).await {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(err(e)),
        }
    }
    Err(CleanupError::LeaseConflict(name.clone()))
}

/// Deletes the named NodeReadinessRules; returns the taint keys of those that existed.
async fn delete_rules(client: &Client, names: &[String], report: &mut Report) -> Vec<String> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &node_readiness_rule_resource());
    let mut keys = Vec::new();
    for name in names {
        let rule = match api.get_opt(name).await {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            // No NRC CRD: nothing to delete.
            Err(kube::Error::Api(e)) if e.code == 404 => continue,
            Err(e) => {
                tracing::warn!(rule = %name, error = %e, "cannot read the NodeReadinessRule");
                report.errors.push(format!("NodeReadinessRule {name}: {e}"));
                continue;
            }
        };
        let key = rule.data["spec"]["taint"]["key"].as_str().map(str::to_string);
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                tracing::warn!(rule = %name, error = %e, "could not delete the NodeReadinessRule");
                report.errors.push(format!("NodeReadinessRule {name}: {e}"));
                continue;
            }
        }
        tracing::info!(rule = %name, taint = ?key, "deleted NodeReadinessRule");
        report.rules_deleted.push(name.clone());
        keys.extend(key.filter(|k| !k.is_empty()));
    }
    keys.sort();
    keys.dedup();
    keys
}

async fn restore_pools(client: &Client, cfg: &FileConfig, actuator: &Actuator, report: &mut Report) {
    let snapshots = match list_snapshots(client, &cfg.namespace).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list NodePool snapshots");
            report.errors.push(e.to_string());
            return;
        }
    };
    if snapshots.is_empty() {
        return;
    }
    let pools: Api<DynamicObject> = Api::all_with(client.clone(), &nodepool_resource());
    for s in snapshots {
        let snapshot = match s.snapshot {
            Ok(snap) => snap,
            Err(e) => {
                // Not ours to guess: the NodePool stays as it is, and so does the snapshot.
                tracing::warn!(snapshot = %s.name, pool = %s.pool, error = %e, "unreadable snapshot kept");
                report.errors.push(e.to_string());
                continue;
            }
        };
        let exists = match pools.get_opt(&s.pool).await {
            Ok(p) => p.is_some(),
            // No NodePool CRD (Karpenter uninstalled): no pool to restore.
            Err(kube::Error::Api(e)) if e.code == 404 => false,
            Err(e) => {
                tracing::warn!(pool = %s.pool, error = %e, "cannot read the NodePool");
                report.errors.push(format!("NodePool {}: {e}", s.pool));
                continue;
            }
        };
        let result = if exists {
            actuator
                .change_pool(&PoolChange::Restore {
                    pool: s.pool.clone(),
                    remove: snapshot.added.clone(),
                })
                .await
        } else {
            tracing::info!(pool = %s.pool, snapshot = %s.name, "NodePool gone; deleting its snapshot only");
            actuator.delete_snapshot(&s.name).await
        };
        match result {
            Ok(()) => {
                if exists {
                    tracing::info!(pool = %s.pool, excluded = ?snapshot.excluded, "restored nodepool");
                    report.pools_restored.push(s.pool.clone());
                }
                tracing::info!(snapshot = %s.name, "deleted snapshot");
                report.snapshots_deleted.push(s.name);
            }
            Err(e) => {
                tracing::warn!(pool = %s.pool, error = %e, "could not restore the nodepool");
                report.errors.push(e.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

    fn node_with_manager(manager: &str, fields: serde_json::Value) -> Node {
        Node {
            metadata: ObjectMeta {
                managed_fields: Some(vec![ManagedFieldsEntry {
                    manager: Some(manager.into()),
                    operation: Some("Apply".into()),
                    fields_v1: Some(FieldsV1(fields)),
                    ..ManagedFieldsEntry::default()
                }]),
                ..ObjectMeta::default()
            },
            ..Node::default()
        }
    }

    fn cond(ty: &str) -> NodeCondition {
        NodeCondition {
            type_: ty.into(),
            status: "True".into(),
            ..NodeCondition::default()
        }
    }

    #[test]
    fn ours_by_type_and_networking_ready_by_owner() {
        let cfg = FileConfig::default();
        let fields = serde_json::json!({"f:status": {"f:conditions": {
            "k:{\"type\":\"NetworkingReady\"}": {".": {}, "f:status": {}}}}});
        let mine = node_with_manager(FIELD_MANAGER, fields.clone());
        let theirs = node_with_manager("eks-node-monitoring-agent", fields);
        for ty in [
            "graywatch.io/Healthy",
            "graywatch.io/NetworkLatencyHealthy",
            "graywatch.io/MemoryPressureHealthy",
        ] {
            assert!(is_ours(&cfg, &theirs, &cond(ty)), "{ty}");
        }
        assert!(is_ours(&cfg, &mine, &cond("NetworkingReady")));
        assert!(!is_ours(&cfg, &theirs, &cond("NetworkingReady")));
        for ty in ["Ready", "graywatch.io/Other", "example.com/Healthy", "MemoryPressure"] {
            assert!(!is_ours(&cfg, &mine, &cond(ty)), "{ty}");
        }
    }

    #[test]
    fn summary_names_every_removal_and_error() {
        let mut r = Report {
            taints_removed: vec!["node-1".into()],
            pools_restored: vec!["default".into()],
            snapshots_deleted: vec!["graywatch-nodepool-default".into()],
            ..Report::default()
        };
        r.conditions_removed
            .insert("node-1".into(), vec!["graywatch.io/Healthy".into()]);
        assert!(r.ok());
        let s = r.summary();
        assert!(s.contains("taints removed: 1 (node-1)"), "{s}");
        assert!(
            s.contains("conditions removed: 1 (node-1: graywatch.io/Healthy)"),
            "{s}"
        );
        assert!(s.contains("nodepools restored: 1 (default)"), "{s}");
        assert!(s.ends_with("errors: 0"), "{s}");
        r.errors.push("Node node-2: forbidden".into());
        assert!(!r.ok());
        assert!(r.summary().contains("errors: 1\n  Node node-2: forbidden"));
    }
}
