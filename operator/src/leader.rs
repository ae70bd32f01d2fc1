//! Leader election on a `coordination.k8s.io/v1` Lease, so that of N operator replicas exactly
//! one reconciles and another takes over when it stops renewing.
//!
//! The algorithm is client-go's: read the Lease; take it when it is free or its holder has not
//! renewed it for a whole lease duration, as *observed on our own clock* (we time how long the
//! record has stayed unchanged, so clock skew between nodes does not matter); write with the
//! read's `resourceVersion`, so of two candidates racing for an expired lease the API server lets
//! exactly one win (the other gets 409 Conflict and stays a candidate). The holder renews every
//! `retry` and gives up leadership when it could not renew for `renew_deadline`, which is shorter
//! than the lease duration, so it stops reconciling before anyone else may start.
//!
//! Why not a crate: kube-lease-manager decides ownership through server-side-apply field
//! conflicts, which only a real API server implements; this protocol needs only GET, POST and
//! PUT with `resourceVersion`, so the same tests run against the mocked API server and a cluster.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// Timing of the election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a lease is valid after its last renewal: a stopped leader is replaced after this.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long stops leading (less than `lease_duration`).
    pub renew_deadline: Duration,
    /// Between two attempts to acquire or renew.
    pub retry: Duration,
}

impl Default for Timing {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    fn default() -> Self {
        Timing {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// One candidate for the Lease `name`.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    /// The holder record last read and when it was first seen (our clock).
    observed: Option<(Option<String>, Option<MicroTime>, Instant)>,
}

impl Elector {
    pub fn new(
        api: Api<Lease>,
        name: impl Into<String>,
        identity: impl Into<String>,
        timing: Timing,
    ) -> Self {
        Elector {
            api,
            name: name.into(),
            identity: identity.into(),
            timing,
            observed: None,
        }
    }

    /// One attempt: takes or renews the lease; returns whether we hold it now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let seconds =
            i32::try_from(self.timing.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record = (holder.clone(), spec.renew_time.clone());
        let seen_at = match &self.observed {
            Some((h, r, at)) if (h, r) == (&record.0, &record.1) => *at,
            _ => Instant::now(),
        };
        self.observed = Some((record.0, record.1, seen_at));
        let ours = holder.as_deref() == Some(self.identity.as_str());
        // The holder's own duration decides when its lease ends (it may differ from ours).
        let duration = spec
            .lease_duration_seconds
            .map_or(self.timing.lease_duration, |s| {
                Duration::from_secs(s.max(0) as u64)
            });
        if !ours && holder.is_some() && seen_at.elapsed() < duration {
            return Ok(false);
        }
        if !ours {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(now);
        // `replace` sends the resourceVersion we read: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                let spec = written.spec.unwrap_or_default();
                self.observed = Some((spec.holder_identity, spec.renew_time, Instant::now()));
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (when we hold it), so a standby takes over at its next attempt instead
    /// of waiting for the lease to expire. Called on graceful shutdown.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }

    /// Runs the election until `stop` resolves: publishes `true` while we lead. Once leadership is
    /// lost (no renewal for `renew_deadline`) it publishes `false` and returns, as client-go does:
    /// the caller stops reconciling and exits, and a fresh process becomes a candidate again.
    /// On `stop`, a held lease is released.
    pub async fn run(mut self, leading: watch::Sender<bool>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut last_renewed: Option<Instant> = None;
        loop {
            let held = match self.try_acquire_or_renew().await {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "leader election: cannot reach the Lease");
                    false
                }
            };
            if held {
                if last_renewed.is_none() {
                    tracing::info!(lease = %self.name, identity = %self.identity, "leader election: now leading");
                    leading.send_replace(true);
                }
                last_renewed = Some(Instant::now());
            } else if let Some(at) = last_renewed
                && at.elapsed() >= self.timing.renew_deadline
            {
                tracing::error!(lease = %self.name, "leader election: leadership lost (could not renew)");
                leading.send_replace(false);
                return;
            }
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(self.timing.retry) => {}
            }
        }
        if last_renewed.is_some() {
            leading.send_replace(false);
            if let Err(e) = self.release().await {
                tracing::warn!(lease = %self.name, error = %e, "leader election: could not release the Lease");
            } else {
                tracing::info!(lease = %self.name, "leader election: lease released");
            }
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}
