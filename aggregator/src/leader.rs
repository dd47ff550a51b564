//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Hand-written rather than a library: kube-runtime 5 ships no leader election, and the loop is
//! small enough to own and test against the real apiserver. It follows client-go's rules:
//! * acquire/renew/take over with an update carrying the resourceVersion we read, so two
//!   candidates can never both win (the loser gets 409 Conflict);
//! * expiry is judged on OUR clock from when we last saw the Lease record change, never by
//!   comparing the holder's renewTime with our clock (no clock-skew assumptions);
//! * a leader that has not renewed within `renew_deadline` (shorter than the lease duration;
//!   client-go's RenewDeadline) steps down (stops writing) the moment the deadline passes, even
//!   while a renew call is still hanging (it is abandoned), so it has stopped before its lease
//!   can have expired for the others; every call has that deadline too;
//! * the Lease is released on graceful shutdown so a successor starts at once.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::FIELD_MANAGER;

pub struct LeaderElector {
    pub api: Api<Lease>,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_interval: Duration,
    /// A leader that has not renewed for this long stops acting (below `lease_duration`).
    pub renew_deadline: Duration,
}

/// What we last saw of someone else's Lease, and when (our clock).
struct Observed {
    record: (Option<String>, Option<MicroTime>),
    at: Instant,
}

fn pp() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    }
}

impl LeaderElector {
    /// Runs until `shutdown`; publishes leadership on `tx`.
    pub async fn run(self, tx: watch::Sender<bool>, shutdown: CancellationToken) {
        let mut observed: Option<Observed> = None;
        let mut last_renew: Option<Instant> = None;
        loop {
            // While leading, the attempt may last until the renew deadline and no longer: a renew
            // hung on its connection must not keep us acting (others take over once the lease
            // expires, and writes on other connections may still succeed meanwhile).
            let deadline = match (last_renew, *tx.borrow()) {
                (Some(t), true) => t + self.renew_deadline,
                _ => Instant::now() + self.renew_deadline,
            };
            let attempt = tokio::time::timeout_at(deadline.into(), self.try_acquire_or_renew(&mut observed));
            match attempt.await {
                Ok(Ok(true)) => {
                    last_renew = Some(Instant::now());
                    if !*tx.borrow() {
                        tracing::info!(identity = %self.identity, lease = %self.lease_name, "became leader");
                    }
                    tx.send_replace(true);
                }
                Ok(Ok(false)) => {
                    if *tx.borrow() {
                        tracing::warn!(identity = %self.identity, "lost the lease to another replica");
                    }
                    last_renew = None;
                    tx.send_replace(false);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "lease update failed");
                    if last_renew.is_none_or(|t| t.elapsed() >= self.renew_deadline) && *tx.borrow() {
                        tracing::warn!(identity = %self.identity, renew_deadline_ms = self.renew_deadline.as_millis(), "could not renew the lease in time; stepping down");
                        last_renew = None;
                        tx.send_replace(false);
                    }
                }
                Err(_) => {
                    if *tx.borrow() {
                        tracing::warn!(identity = %self.identity, renew_deadline_ms = self.renew_deadline.as_millis(), "lease renew still pending at the renew deadline; stepping down");
                    } else {
                        tracing::warn!(identity = %self.identity, "lease call timed out");
                    }
                    last_renew = None;
                    tx.send_replace(false);
                }
            }
            let wait = if *tx.borrow() {
                self.renew_interval
            } else {
                self.renew_interval.min(self.lease_duration / 4)
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        if *tx.borrow() {
            tx.send_replace(false);
            if let Err(e) = self.release().await {
                tracing::warn!(error = %e, "could not release the lease");
            } else {
                tracing::info!(identity = %self.identity, "released the lease");
            }
        }
    }

    fn now() -> MicroTime {
        MicroTime(Timestamp::now())
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    async fn try_acquire_or_renew(&self, observed: &mut Option<Observed>) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.lease_name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.lease_name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.duration_secs()),
                    acquire_time: Some(Self::now()),
                    renew_time: Some(Self::now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&pp(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        if !mine && holder.is_some() {
            let record = (holder.clone(), spec.renew_time.clone());
            let changed = observed.as_ref().is_none_or(|o| o.record != record);
            if changed {
                *observed = Some(Observed {
                    record,
                    at: Instant::now(),
                });
                return Ok(false);
            }
            let held_for = Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0));
            let expired = observed
                .as_ref()
                .is_some_and(|o| o.at.elapsed() >= held_for.max(self.lease_duration));
            if !expired {
                return Ok(false);
            }
            tracing::info!(previous = ?holder, identity = %self.identity, "lease expired; taking over");
        }
        if !mine {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(Self::now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(Self::now());
        spec.lease_duration_seconds = Some(self.duration_secs());
        // replace() sends our resourceVersion: a concurrent writer makes this fail with 409.
        match self.api.replace(&self.lease_name, &pp(), &lease).await {
            Ok(_) => {
                *observed = None;
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn release(&self) -> Result<(), kube::Error> {
        let mut lease = self.api.get(&self.lease_name).await?;
        let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(Self::now());
        self.api.replace(&self.lease_name, &pp(), &lease).await.map(|_| ())
    }
}
