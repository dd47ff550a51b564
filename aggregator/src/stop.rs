//! `cleanup --stop-deployment NAME`: the fence of the chart's mode-change hook (pre-upgrade).
//!
//! A Lease alone cannot fence a `helm upgrade`: the old aggregator pods keep running until Helm
//! applies the new Deployment, and a follower takes the Lease back as soon as the cleanup lets
//! go of it. So the hook scales the aggregator Deployment to 0 and waits until no pod matching
//! its selector exists any more (a pod object disappears only once the kubelet has confirmed
//! its containers stopped): from then on no replica of the old mode can write. Helm's upgrade
//! then applies the Deployment with the chart's replica count (its three-way merge puts back
//! `spec.replicas`, which the live object no longer matches).
//!
//! On failure the cleanup scales the Deployment back to the replica count it found
//! ([`restore`]): the upgrade fails with the hook, and the old mode keeps running as before.
//!
//! RBAC (the chart's mode-change hook Role): deployments get/patch of exactly that name, pods
//! list/watch in the namespace.

use std::{collections::BTreeSet, time::Duration};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    api::{apps::v1::Deployment, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};

use crate::cluster::FIELD_MANAGER;

#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error("Deployment {name}: {source}")]
    Deployment { name: String, source: kube::Error },
    #[error("Deployment {name}: {reason}")]
    Selector { name: String, reason: String },
    #[error("pods of Deployment {name} ({selector}): {source}")]
    Pods {
        name: String,
        selector: String,
        source: kube::Error,
    },
    #[error("pods of Deployment {name} still exist after {secs} s: {left}")]
    Timeout { name: String, secs: u64, left: String },
}

/// A Deployment the cleanup scaled to 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    pub name: String,
    /// `spec.replicas` before (put back by [`restore`] when the cleanup fails).
    pub previous_replicas: i32,
    /// Pods that were still there when it was scaled down (all gone now).
    pub pods_waited_for: Vec<String>,
}

/// A label selector as the `labelSelector` query parameter. An empty selector (every pod) is
/// refused: waiting for "every pod in the namespace" is never what we mean.
pub fn selector_string(sel: &LabelSelector) -> Result<String, String> {
    let mut parts: Vec<String> = sel
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            other => return Err(format!("unknown selector operator {other:?}")),
        });
    }
    if parts.is_empty() {
        return Err("empty pod selector".into());
    }
    Ok(parts.join(","))
}

/// Scales `name` to 0 and waits (at most `timeout`, a guard against a hung rollout) until no
/// pod matches its selector. `Ok(None)` when the Deployment does not exist.
pub async fn stop_deployment(
    client: &Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<Option<Stopped>, StopError> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let dep_err = |source| StopError::Deployment {
        name: name.to_string(),
        source,
    };
    let Some(dep) = deployments.get_opt(name).await.map_err(dep_err)? else {
        tracing::info!(deployment = %name, namespace = %namespace, "deployment not found; nothing to stop");
        return Ok(None);
    };
    let spec = dep.spec.as_ref();
    let previous_replicas = spec.and_then(|s| s.replicas).unwrap_or(1);
    let selector = spec
        .ok_or_else(|| "no spec".to_string())
        .and_then(|s| selector_string(&s.selector))
        .map_err(|reason| StopError::Selector {
            name: name.to_string(),
            reason,
        })?;
    if previous_replicas != 0 {
        scale(&deployments, name, 0).await.map_err(dep_err)?;
    }
    tracing::info!(
        deployment = %name,
        previous_replicas,
        selector = %selector,
        "scaled the aggregator to 0; waiting until its pods are gone"
    );
    let pods_waited_for = match wait_pods_gone(client, namespace, name, &selector, timeout).await {
        Ok(p) => p,
        Err(e) => {
            if previous_replicas != 0 {
                match scale(&deployments, name, previous_replicas).await {
                    Ok(()) => tracing::warn!(deployment = %name, replicas = previous_replicas, "scaled back"),
                    Err(e) => tracing::error!(deployment = %name, error = %e, "could not scale back"),
                }
            }
            return Err(e);
        }
    };
    tracing::info!(deployment = %name, pods = ?pods_waited_for, "the aggregator's pods are gone");
    Ok(Some(Stopped {
        name: name.to_string(),
        previous_replicas,
        pods_waited_for,
    }))
}

/// Puts `spec.replicas` back (after a failed cleanup).
pub async fn restore(client: &Client, namespace: &str, stopped: &Stopped) -> Result<(), StopError> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    scale(&deployments, &stopped.name, stopped.previous_replicas)
        .await
        .map_err(|source| StopError::Deployment {
            name: stopped.name.clone(),
            source,
        })
}

async fn scale(api: &Api<Deployment>, name: &str, replicas: i32) -> Result<(), kube::Error> {
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    api.patch(
        name,
        &pp,
        &Patch::Merge(serde_json::json!({"spec": {"replicas": replicas}})),
    )
    .await
    .map(drop)
}

/// Waits until no pod matches `selector`; returns the pods that existed at the start.
async fn wait_pods_gone(
    client: &Client,
    namespace: &str,
    name: &str,
    selector: &str,
    timeout: Duration,
) -> Result<Vec<String>, StopError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pods_err = |source| StopError::Pods {
        name: name.to_string(),
        selector: selector.to_string(),
        source,
    };
    // A plain list first: a refusal (RBAC) fails here at once instead of being retried.
    let initial: Vec<String> = pods
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(pods_err)?
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    if initial.is_empty() {
        return Ok(initial);
    }
    let mut left: BTreeSet<String> = initial.iter().cloned().collect();
    let mut buffered: BTreeSet<String> = BTreeSet::new();
    let mut stream = watcher(pods, watcher::Config::default().labels(selector))
        .default_backoff()
        .boxed();
    let wait = async {
        loop {
            match stream.try_next().await {
                Ok(Some(watcher::Event::Init)) => buffered.clear(),
                Ok(Some(watcher::Event::InitApply(p))) => {
                    buffered.insert(p.name_any());
                }
                Ok(Some(watcher::Event::InitDone)) => left = std::mem::take(&mut buffered),
                Ok(Some(watcher::Event::Apply(p))) => {
                    left.insert(p.name_any());
                }
                Ok(Some(watcher::Event::Delete(p))) => {
                    let pod = p.name_any();
                    tracing::info!(deployment = %name, pod = %pod, "aggregator pod gone");
                    left.remove(&pod);
                }
                Ok(None) => return false,
                Err(e) => {
                    // The backoff retries (a watch may expire); the timeout bounds it.
                    tracing::warn!(deployment = %name, error = %e, "watching the aggregator's pods");
                }
            }
            if left.is_empty() {
                return true;
            }
        }
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(true) => Ok(initial),
        Ok(false) | Err(_) => Err(StopError::Timeout {
            name: name.to_string(),
            secs: timeout.as_secs(),
            left: left.into_iter().collect::<Vec<_>>().join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn selectors_become_query_strings_and_empty_ones_are_refused() {
        let sel = LabelSelector {
            match_labels: Some(
                [
                    ("app.kubernetes.io/component".to_string(), "aggregator".to_string()),
                    ("app.kubernetes.io/instance".to_string(), "gw".to_string()),
                ]
                .into(),
            ),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["a".into(), "b".into()]),
                },
                LabelSelectorRequirement {
                    key: "canary".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
            ]),
        };
        assert_eq!(
            selector_string(&sel).as_deref(),
            Ok("app.kubernetes.io/component=aggregator,app.kubernetes.io/instance=gw,tier in (a,b),!canary")
        );
        assert!(selector_string(&LabelSelector::default()).is_err());
        let bad = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "x".into(),
                operator: "Like".into(),
                values: None,
            }]),
            ..LabelSelector::default()
        };
        assert!(selector_string(&bad).is_err());
    }
}
