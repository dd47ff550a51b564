//! Actuators: apply a plan to the cluster. They decide nothing; every write is one the core
//! planned. All writes carry the one field manager `graywatch-aggregator`; conditions, snapshots
//! and NodePool requirements use server-side apply.

use futures::{StreamExt, stream};
use k8s_openapi::{
    api::core::v1::{ConfigMap, Event, EventSource, Node, NodeCondition, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{MicroTime, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams},
};
use tokio::sync::watch;

use crate::{
    cluster::{FIELD_MANAGER, nodeclaim_resource, nodepool_resource, snapshot_configmap, snapshot_name},
    config::{EVENT_NAMESPACE, FileConfig},
    core::{
        karpenter::edit_list,
        model::{Millis, PoolEdits, PoolSnapshot},
        plan::{ConditionWrite, DesiredCondition, EventKind, EventTarget, Plan, PlannedEvent, PoolChange},
        policy::Policy,
        step::EKS_NETWORKING_CONDITION,
    },
    metrics::Metrics,
};

#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error("{what} {name}: {source}")]
    Kube {
        what: &'static str,
        name: String,
        source: kube::Error,
    },
    #[error("taint on {0}: the Node kept changing under us")]
    TaintConflict(String),
    #[error("lost leadership before {0}")]
    NotLeader(String),
    #[error("conditions on {0}: the Node kept changing under us")]
    ConditionConflict(String),
    #[error("building a patch: {0}")]
    Patch(String),
    #[error("NodePool {0}: the NodePool kept changing under us")]
    PoolConflict(String),
    #[error("NodePool {0}: read back after the patch, our change is not there")]
    PoolUnverified(String),
}

impl ActError {
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            ActError::Kube { what, .. } => what,
            ActError::TaintConflict(_) => "taint",
            ActError::NotLeader(_) => "not_leader",
            ActError::ConditionConflict(_) => "conditions",
            ActError::Patch(_) => "patch",
            ActError::PoolConflict(_) | ActError::PoolUnverified(_) => "nodepool",
        }
    }
}

/// Result of applying a plan, for feedback into the engine.
#[derive(Debug, Default)]
pub struct Applied {
    pub failed_condition_nodes: Vec<String>,
    pub errors: u32,
}

pub struct Actuator {
    pub client: Client,
    pub namespace: String,
    /// Where Events about Nodes and NodePools go (config `event_namespace`).
    pub event_namespace: String,
    pub identity: String,
    pub policy: Policy,
    /// Writes in flight at once within one phase of a plan (`max_concurrent_writes`).
    pub max_concurrent_writes: usize,
}

fn ts(ms: Millis) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn kube_err(what: &'static str, name: &str) -> impl FnOnce(kube::Error) -> ActError {
    let name = name.to_string();
    move |source| ActError::Kube { what, name, source }
}

impl Actuator {
    /// The actuator the aggregator's configuration describes.
    #[must_use]
    pub fn new(client: Client, cfg: &FileConfig) -> Self {
        Self {
            client,
            namespace: cfg.namespace.clone(),
            event_namespace: cfg.event_namespace.clone(),
            identity: cfg.identity.clone(),
            policy: cfg.policy.clone(),
            max_concurrent_writes: cfg.max_concurrent_writes,
        }
    }

    /// Applies `plan` in a safe order: conditions, then taints, then NodePool changes (a
    /// snapshot before each exclusion), then NodeClaim deletions, Events last. Condition and taint
    /// writes are independent (one Node each) and run at most `max_concurrent_writes` at once,
    /// so a burst of condition writes (a new leader's first step over thousands of nodes) takes
    /// seconds instead of holding the decision loop for minutes. Leadership is checked before
    /// every write; a follower writes nothing.
    pub async fn apply(
        &self,
        plan: &Plan,
        now_ms: Millis,
        leader: &watch::Receiver<bool>,
        metrics: &Metrics,
    ) -> Applied {
        let mut out = Applied::default();
        let is_leader = || *leader.borrow();
        // Counted as each write completes (not when its phase ends), so the counter and the
        // apiserver's own count agree over any window.
        let count = |kind: &'static str, r: Result<(), ActError>| {
            match &r {
                Ok(()) => metrics.action(kind, true),
                Err(e) => metrics.action(e.metric_label(), false),
            }
            r
        };
        let tally = |kind: &'static str, r: &Result<(), ActError>, out: &mut Applied| {
            if let Err(e) = r {
                out.errors += 1;
                tracing::warn!(error = %e, kind, "action failed");
            }
        };
        let record = |kind: &'static str, r: Result<(), ActError>, out: &mut Applied| {
            tally(kind, &count(kind, r), out);
        };
        for (w, r) in self
            .each_while_leader(&plan.conditions, leader, |w| async move {
                count("conditions", self.write_conditions(w, now_ms).await)
            })
            .await
        {
            if r.is_err() {
                out.failed_condition_nodes.push(w.node.clone());
            }
            tally("conditions", &r, &mut out);
        }
        for (t, r) in self
            .each_while_leader(&plan.taints, leader, |t| async move {
                count("taint", self.set_taint(&t.node, t.add).await)
            })
            .await
        {
            tracing::info!(node = %t.node, add = t.add, ok = r.is_ok(), "taint");
            tally("taint", &r, &mut out);
        }
        // Few and ordered (snapshot, then pool): one at a time.
        for p in &plan.pools {
            if !is_leader() {
                return out;
            }
            let r = self.change_pool(p).await;
            record("nodepool", r, &mut out);
        }
        for c in &plan.claim_deletions {
            if !is_leader() {
                return out;
            }
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &nodeclaim_resource());
            let r = api
                .delete(&c.claim, &DeleteParams::default())
                .await
                .map(|_| ())
                .map_err(kube_err("NodeClaim", &c.claim));
            tracing::info!(node = %c.node, claim = %c.claim, ok = r.is_ok(), "nodeclaim deletion");
            record("nodeclaim", r, &mut out);
        }
        // In plan order, one at a time: the audit trail reads in the order things happened.
        for e in &plan.events {
            if !is_leader() {
                return out;
            }
            let r = self.event(e, now_ms).await;
            record("event", r, &mut out);
        }
        out
    }

    /// Runs `write` for every item, at most `max_concurrent_writes` at once, in the items' order
    /// of start. An item whose turn comes after leadership was lost is skipped (not a failure).
    async fn each_while_leader<'a, T, F, Fut>(
        &self,
        items: &'a [T],
        leader: &watch::Receiver<bool>,
        write: F,
    ) -> Vec<(&'a T, Result<(), ActError>)>
    where
        F: Fn(&'a T) -> Fut,
        Fut: std::future::Future<Output = Result<(), ActError>>,
    {
        let results: Vec<Option<(&T, Result<(), ActError>)>> = stream::iter(items)
            .map(|item| {
                // Checked when the write starts, not when the stream is built.
                let fut = (*leader.borrow()).then(|| write(item));
                async move {
                    match fut {
                        Some(f) => Some((item, f.await)),
                        None => None,
                    }
                }
            })
            .buffered(self.max_concurrent_writes.max(1))
            .collect()
            .await;
        results.into_iter().flatten().collect()
    }

    /// Applies the node's conditions (server-side apply: we own exactly these types). Ours by
    /// type are forced (whoever touched them, they are ours to set). The EKS `NetworkingReady`
    /// is never forced: if another manager wrote it since we read the Node, the apply conflicts
    /// and is made again without it: it is theirs.
    async fn write_conditions(&self, w: &ConditionWrite, now_ms: Millis) -> Result<(), ActError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let body = |conditions: &[&DesiredCondition]| {
            let conditions: Vec<serde_json::Value> = conditions
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "type": c.type_,
                        "status": c.status.as_str(),
                        "reason": c.reason,
                        "message": c.message,
                        "lastTransitionTime": Time(ts(c.last_transition_ms)),
                        "lastHeartbeatTime": Time(ts(now_ms)),
                    })
                })
                .collect();
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": w.node},
                "status": {"conditions": conditions},
            })
        };
        let all: Vec<&DesiredCondition> = w.conditions.iter().collect();
        let apply = |body: serde_json::Value, force: bool| {
            let api = api.clone();
            let pp = if force {
                PatchParams::apply(FIELD_MANAGER).force()
            } else {
                PatchParams::apply(FIELD_MANAGER)
            };
            async move { api.patch_status(&w.node, &pp, &Patch::Apply(&body)).await.map(|_| ()) }
        };
        if !all.iter().any(|c| c.type_ == EKS_NETWORKING_CONDITION) {
            return apply(body(&all), true).await.map_err(kube_err("Node status", &w.node));
        }
        match apply(body(&all), false).await {
            Ok(()) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let theirs = e.message.contains(&format!("type=\"{EKS_NETWORKING_CONDITION}\""));
                tracing::info!(node = %w.node, theirs, conflict = %e.message, "condition apply conflicted; applying ours by type with force");
                let ours: Vec<&DesiredCondition> = all
                    .into_iter()
                    .filter(|c| !theirs || c.type_ != EKS_NETWORKING_CONDITION)
                    .collect();
                apply(body(&ours), true).await.map_err(kube_err("Node status", &w.node))
            }
            Err(e) => Err(kube_err("Node status", &w.node)(e)),
        }
    }

    /// Adds or removes our taint with a merge patch guarded by the resourceVersion we read.
    ///
    /// Why not server-side apply here: on a 1.20 apiserver managedFields do not separate the
    /// status subresource (that came in 1.22), so our status applies (conditions) would drop our
    /// ownership of the taint and a later apply without it would leave it behind. An optimistic
    /// read-modify-write touches only our key and still records our single field manager.
    pub async fn set_taint(&self, node: &str, add: bool) -> Result<(), ActError> {
        self.set_taint_key(node, &self.policy.taint_key, add).await
    }

    /// Removes every taint with `key` from the Node (`cleanup`: ours, and those of the chart's
    /// NodeReadinessRules once the rules are gone), the same guarded way as [`Self::set_taint`].
    pub async fn remove_taint(&self, node: &str, key: &str) -> Result<(), ActError> {
        self.set_taint_key(node, key, false).await
    }

    async fn set_taint_key(&self, node: &str, key: &str, add: bool) -> Result<(), ActError> {
        let api: Api<Node> = Api::all(self.client.clone());
        for _ in 0..5 {
            let n = api.get(node).await.map_err(kube_err("Node", node))?;
            let rv = n.metadata.resource_version.clone().unwrap_or_default();
            let mut taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
            let has = taints.iter().any(|t| t.key == key);
            if has == add {
                return Ok(());
            }
            if add {
                taints.push(k8s_openapi::api::core::v1::Taint {
                    key: key.to_string(),
                    value: Some("gray-failure".into()),
                    effect: "NoSchedule".into(),
                    time_added: None,
                });
            } else {
                taints.retain(|t| t.key != key);
            }
            // resourceVersion in the patch makes the apiserver refuse it (409) if the Node changed.
            let patch = serde_json::json!({
                "metadata": {"resourceVersion": rv},
                "spec": {"taints": taints},
            });
            let pp = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            match api.patch(node, &pp, &Patch::Merge(&patch)).await {
                Ok(_) => return Ok(()),
                // Someone else changed the Node: read again.
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(kube_err("Node", node)(e)),
            }
        }
        Err(ActError::TaintConflict(node.into()))
    }

    /// Applies one NodePool change (also used by `cleanup` to restore every snapshot): reads the
    /// pool, takes out what we added before and puts in ours (edits of others stay), patches it
    /// guarded by the resourceVersion read, and reads it back to verify. An exclusion saves what
    /// it adds to the snapshot ConfigMap first, so a leader that stops halfway leaves its
    /// successor the knowledge of what is ours; a restore deletes the snapshot once verified.
    /// Whatever fails here is retried by a later step: the core compares the snapshot with the
    /// pool, not with what it planned.
    pub async fn change_pool(&self, change: &PoolChange) -> Result<(), ActError> {
        let pools: Api<DynamicObject> = Api::all_with(self.client.clone(), &nodepool_resource());
        let crate::core::plan::PoolChangeParts {
            pool,
            remove,
            add,
            excluded,
        } = change.parts();
        for _ in 0..5 {
            let obj = pools.get(pool).await.map_err(kube_err("NodePool", pool))?;
            let rv = obj.metadata.resource_version.clone().unwrap_or_default();
            let reqs = &obj.data["spec"]["template"]["spec"]["requirements"];
            let budgets = &obj.data["spec"]["disruption"]["budgets"];
            let (new_reqs, added_reqs) = edit_list(reqs, &remove.requirements, &add.requirements);
            let (new_budgets, added_budgets) = edit_list(budgets, &remove.budgets, &add.budgets);
            let added = PoolEdits {
                requirements: added_reqs,
                budgets: added_budgets,
            };
            if let Some(excluded) = excluded {
                // Until the patch is verified, both what we added before and what we add now
                // may be in the pool: the snapshot names both.
                let mut maybe_ours = added.clone();
                extend_new(&mut maybe_ours.requirements, &remove.requirements);
                extend_new(&mut maybe_ours.budgets, &remove.budgets);
                self.save_snapshot(pool, excluded, &maybe_ours).await?;
            }
            let mut spec = serde_json::Map::new();
            if reqs.as_array() != Some(&new_reqs) {
                spec.insert(
                    "template".into(),
                    serde_json::json!({"spec": {"requirements": new_reqs}}),
                );
            }
            if budgets.as_array() != Some(&new_budgets) && !(budgets.is_null() && new_budgets.is_empty()) {
                spec.insert("disruption".into(), serde_json::json!({"budgets": new_budgets}));
            }
            if !spec.is_empty() {
                // resourceVersion in the patch makes the apiserver refuse it (409) if the pool
                // changed since we read it: read again.
                let patch = serde_json::json!({"metadata": {"resourceVersion": rv}, "spec": spec});
                let pp = PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PatchParams::default()
                };
                match pools.patch(pool, &pp, &Patch::Merge(&patch)).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    Err(e) => return Err(kube_err("NodePool", pool)(e)),
                }
            }
            // Read back: the change is in the pool as stored.
            let now = pools.get(pool).await.map_err(kube_err("NodePool", pool))?;
            let reread_reqs = &now.data["spec"]["template"]["spec"]["requirements"];
            let reread_budgets = &now.data["spec"]["disruption"]["budgets"];
            let count = |list: &serde_json::Value, x: &serde_json::Value| {
                list.as_array().map_or(0, |l| l.iter().filter(|y| *y == x).count())
            };
            let new_reqs = serde_json::Value::Array(new_reqs);
            let new_budgets = serde_json::Value::Array(new_budgets);
            let verified = added.requirements.iter().all(|r| count(reread_reqs, r) > 0)
                && added.budgets.iter().all(|b| count(reread_budgets, b) > 0)
                && remove
                    .requirements
                    .iter()
                    .all(|r| count(reread_reqs, r) <= count(&new_reqs, r))
                && remove
                    .budgets
                    .iter()
                    .all(|b| count(reread_budgets, b) <= count(&new_budgets, b));
            if !verified {
                return Err(ActError::PoolUnverified(pool.to_owned()));
            }
            if let Some(excluded) = excluded {
                self.save_snapshot(pool, excluded, &added).await?;
                tracing::info!(pool = %pool, excluded = ?excluded, added = ?added, "nodepool excluded");
            } else {
                self.delete_snapshot(&snapshot_name(pool)).await?;
                tracing::info!(pool = %pool, removed = ?remove, "nodepool restored");
            }
            return Ok(());
        }
        Err(ActError::PoolConflict(pool.to_owned()))
    }

    /// Writes the snapshot ConfigMap of `pool` (ours alone, with its digest).
    async fn save_snapshot(
        &self,
        pool: &str,
        excluded: &[(String, String)],
        added: &PoolEdits,
    ) -> Result<(), ActError> {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let snapshot = PoolSnapshot {
            excluded: excluded.to_vec(),
            added: added.clone(),
        };
        let name = snapshot_name(pool);
        cms.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&snapshot_configmap(&self.namespace, pool, &snapshot)),
        )
        .await
        .map(|_| ())
        .map_err(kube_err("ConfigMap", &name))
    }

    /// Deletes the snapshot ConfigMap `name` (gone already is fine).
    pub async fn delete_snapshot(&self, name: &str) -> Result<(), ActError> {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        match cms.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(kube_err("ConfigMap", name)(e)),
        }
    }

    /// Removes the Node's status conditions that `ours` selects; returns the types removed.
    ///
    /// A JSON patch of `/status` that removes exactly those list entries, guarded twice: it sets
    /// the resourceVersion we read (the apiserver refuses it with 409 if the Node changed) and
    /// tests each entry's type before removing it. Not server-side apply: on a 1.20 apiserver an
    /// apply of an empty list only drops the entries no other manager co-owns, and the conditions
    /// are ours by type whoever last touched them.
    pub async fn remove_conditions(
        &self,
        node: &str,
        ours: impl Fn(&Node, &NodeCondition) -> bool,
    ) -> Result<Vec<String>, ActError> {
        let api: Api<Node> = Api::all(self.client.clone());
        for _ in 0..5 {
            let n = api.get(node).await.map_err(kube_err("Node", node))?;
            let rv = n.metadata.resource_version.clone().unwrap_or_default();
            let conditions = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .map_or(&[][..], Vec::as_slice);
            let doomed: Vec<(usize, String)> = conditions
                .iter()
                .enumerate()
                .filter(|(_, c)| ours(&n, c))
                .map(|(i, c)| (i, c.type_.clone()))
                .collect();
            if doomed.is_empty() {
                return Ok(Vec::new());
            }
            let mut ops = vec![serde_json::json!({"op": "replace", "path": "/metadata/resourceVersion", "value": rv})];
            // From the end, so the earlier indices stay valid.
            for (i, ty) in doomed.iter().rev() {
                ops.push(
                    serde_json::json!({"op": "test", "path": format!("/status/conditions/{i}/type"), "value": ty}),
                );
                ops.push(serde_json::json!({"op": "remove", "path": format!("/status/conditions/{i}")}));
            }
            let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
                .map_err(|e| ActError::Patch(format!("conditions of {node}: {e}")))?;
            let pp = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            match api.patch_status(node, &pp, &Patch::<()>::Json(patch)).await {
                Ok(_) => return Ok(doomed.into_iter().map(|(_, ty)| ty).collect()),
                // The Node changed since we read it (409), or an entry moved (failed test): read again.
                Err(kube::Error::Api(e)) if e.code == 409 || e.code == 422 => {}
                Err(e) => return Err(kube_err("Node status", node)(e)),
            }
        }
        Err(ActError::ConditionConflict(node.into()))
    }

    async fn event(&self, e: &PlannedEvent, now_ms: Millis) -> Result<(), ActError> {
        let (kind, api_version, name) = match &e.target {
            EventTarget::Node(n) => ("Node", "v1", n.clone()),
            EventTarget::NodePool(p) => ("NodePool", "karpenter.sh/v1", p.clone()),
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let ev = Event {
            metadata: ObjectMeta {
                name: Some(format!("{name}.{nanos:x}")),
                namespace: Some(self.event_namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                kind: Some(kind.into()),
                api_version: Some(api_version.into()),
                name: Some(name.clone()),
                ..ObjectReference::default()
            },
            reason: Some(e.reason.clone()),
            message: Some(e.note.chars().take(1024).collect()),
            action: Some(e.action.clone()),
            type_: Some(
                match e.kind {
                    EventKind::Normal => "Normal",
                    EventKind::Warning => "Warning",
                }
                .into(),
            ),
            source: Some(EventSource {
                component: Some(FIELD_MANAGER.into()),
                host: None,
            }),
            reporting_component: Some(FIELD_MANAGER.into()),
            reporting_instance: Some(self.identity.clone()),
            first_timestamp: Some(Time(ts(now_ms))),
            last_timestamp: Some(Time(ts(now_ms))),
            // The API takes Events about cluster-scoped objects in "default" without an eventTime
            // and in "kube-system" with one, nowhere else (see EVENT_NAMESPACES).
            event_time: (self.event_namespace != EVENT_NAMESPACE).then(|| MicroTime(ts(now_ms))),
            count: Some(1),
            ..Event::default()
        };
        tracing::info!(object = %name, kind, reason = %e.reason, note = %e.note, "event");
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.event_namespace);
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        api.create(&pp, &ev).await.map(|_| ()).map_err(kube_err("Event", &name))
    }
}

/// Appends the entries of `more` that `list` does not have yet.
fn extend_new(list: &mut Vec<serde_json::Value>, more: &[serde_json::Value]) {
    for m in more {
        if !list.contains(m) {
            list.push(m.clone());
        }
    }
}
