//! What the Model and Tenant reconcilers share: their context (API client, cluster state,
//! defaults, event recorder, metrics), their error type with a bounded reason per error, the
//! error policy (per-object exponential backoff), and status conditions that keep their
//! `lastTransitionTime` until their status really changes.

pub mod claim;
pub mod cluster_token;
pub mod diagnose;
pub mod etcd_tls;
pub mod model;
pub mod rollout;
pub mod tenant;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::{Api, Client};
use kube::{Resource, ResourceExt};
use tidelock_protocol::KeyLayout;
use tidelock_state::{StateError, StateStore};

use crate::builders::Defaults;
use crate::metrics::Metrics;

/// The finalizer both reconcilers put on their resources: cleanup of the cluster state (etcd
/// keys) happens before the resource goes.
pub const FINALIZER: &str = "tidelock.dev/cleanup";

/// Everything a reconciliation needs.
pub struct Context {
    pub client: Client,
    pub store: Arc<dyn StateStore>,
    pub layout: KeyLayout,
    pub defaults: Defaults,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub backoff: Backoff,
    /// The autoscaler's recommendations so far and its client for load reports.
    pub autoscaler: crate::autoscale::Autoscaler,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("layout", &self.layout)
            .field("defaults", &self.defaults)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(
        client: Client,
        store: Arc<dyn StateStore>,
        layout: KeyLayout,
        defaults: Defaults,
        metrics: Metrics,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: tidelock_api::FIELD_MANAGER.into(),
            instance,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            store,
            layout,
            defaults,
            metrics,
            backoff: Backoff::default(),
            autoscaler: crate::autoscale::Autoscaler::default(),
        }
    }

    /// Publishes a Kubernetes Event about `obj`. Failing to publish is logged, never fatal: an
    /// Event is a courtesy to the human reading `kubectl describe`.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        self.event_about(obj, None, warning, reason, note).await;
    }

    /// An Event about `obj` concerning `related` too (e.g. the StatefulSet of a group). Events
    /// with the same object, reason and related object are one series (counted, not repeated).
    pub async fn event_about<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        related: Option<ObjectReference>,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: related,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not publish an Event");
        }
    }
}

/// Why a reconciliation failed. Each has a bounded [`Error::reason`] (a metric label).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cluster state (etcd): {0}")]
    State(#[from] StateError),
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("the resource has no {0}")]
    Missing(&'static str),
    #[error("the API server refused {object}: {message}")]
    Rejected { object: String, message: String },
    #[error("the workers' etcd TLS files: {0}")]
    EtcdClientSecret(#[from] etcd_tls::ClientSecretError),
    #[error("the cluster credential: {0}")]
    ClusterToken(String),
}

impl Error {
    /// A bounded, CamelCase reason: the API server's status class, or a condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) => match s.code {
                404 => "NotFound",
                409 => "Conflict",
                401 | 403 => "Forbidden",
                422 => "Invalid",
                429 => "TooManyRequests",
                500..=599 => "ServerError",
                _ => "ApiError",
            },
            Error::Kube(_) => "ApiUnreachable",
            Error::State(_) => tidelock_api::reasons::STATE_STORE_UNAVAILABLE,
            Error::Finalizer(e) => match &**e {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.reason(),
                _ => "FinalizerFailed",
            },
            Error::Missing(_) => "InvalidObject",
            Error::Rejected { .. } => tidelock_api::reasons::APPLY_REJECTED,
            Error::EtcdClientSecret(_) => "EtcdClientSecretInvalid",
            Error::ClusterToken(_) => "ClusterTokenInvalid",
        }
    }
}

impl From<kube::runtime::finalizer::Error<Error>> for Error {
    fn from(e: kube::runtime::finalizer::Error<Error>) -> Self {
        Error::Finalizer(Box::new(e))
    }
}

/// Per-object exponential backoff after errors: `base`, doubled per consecutive failure, at most
/// `max`. A success resets the object's count.
#[derive(Debug)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    failures: Mutex<HashMap<String, u32>>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(5),
            max: Duration::from_secs(300),
            failures: Mutex::default(),
        }
    }
}

impl Backoff {
    /// Counts a failure of `key`; returns the delay before its next attempt.
    pub fn failed(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().expect("not poisoned");
        let n = failures.entry(key.to_owned()).or_default();
        *n = n.saturating_add(1);
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// Forgets `key`'s failures.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().expect("not poisoned").remove(key);
    }
}

/// `namespace/name` of an object, the backoff's and the logs' key.
fn object_key<K: ResourceExt>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// The error policy both controllers use: log, count, and retry after the object's backoff.
pub fn error_policy<K: ResourceExt>(obj: &K, error: &Error, ctx: &Context) -> Action {
    let key = object_key(obj);
    let delay = ctx.backoff.failed(&key);
    tracing::warn!(object = %key, reason = error.reason(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// One reconciliation of `obj` under the [`FINALIZER`]: `apply` while it lives (the first pass
/// only adds the finalizer), `cleanup` once it is being deleted (the finalizer goes after it
/// succeeds); timed and counted as `controller`.
pub async fn with_finalizer<K, FA, FC>(
    controller: &str,
    obj: Arc<K>,
    ctx: &Context,
    apply: impl FnOnce(Arc<K>) -> FA,
    cleanup: impl FnOnce(Arc<K>) -> FC,
) -> Result<Action, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    FA: Future<Output = Result<Action, Error>>,
    FC: Future<Output = Result<Action, Error>>,
{
    let namespace = obj.namespace().ok_or(Error::Missing("namespace"))?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let started = Instant::now();
    let result = finalizer(&api, FINALIZER, obj.clone(), |event| async move {
        match event {
            FinalizerEvent::Apply(obj) => apply(obj).await,
            FinalizerEvent::Cleanup(obj) => cleanup(obj).await,
        }
    })
    .await
    .map_err(Error::from);
    let reason = result.as_ref().err().map(Error::reason);
    ctx.metrics
        .reconciled(controller, started.elapsed(), reason);
    if result.is_ok() {
        ctx.backoff.succeeded(&object_key(&*obj));
    }
    result
}

/// Writes `obj`'s status with server-side apply (the status subresource, our field manager).
pub async fn write_status<K>(
    ctx: &Context,
    obj: &K,
    status: &impl serde::Serialize,
) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let namespace = obj.namespace().ok_or(Error::Missing("namespace"))?;
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    Api::<K>::namespaced(ctx.client.clone(), &namespace)
        .patch_status(
            &obj.name_any(),
            &kube::api::PatchParams::apply(tidelock_api::FIELD_MANAGER).force(),
            &kube::api::Patch::Apply(&body),
        )
        .await?;
    Ok(())
}

/// Applies `secret` (a Model's copy of a Secret the operator holds: the cluster credential, the
/// etcd client certificate) with server-side apply, in its own namespace.
pub async fn apply_secret(
    ctx: &Context,
    secret: &k8s_openapi::api::core::v1::Secret,
) -> Result<(), Error> {
    let namespace = secret.namespace().ok_or(Error::Missing("namespace"))?;
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(ctx.client.clone(), &namespace)
        .patch(
            &secret.name_any(),
            &kube::api::PatchParams::apply(tidelock_api::FIELD_MANAGER).force(),
            &kube::api::Patch::Apply(secret),
        )
        .await?;
    Ok(())
}

/// A condition; `lastTransitionTime` is carried over from `previous` when the status is
/// unchanged, so it tells when the condition last changed, not when we last looked.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(
            || Time(Timestamp::now()),
            |c| c.last_transition_time.clone(),
        );
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Whether condition `type_` is `True` in `conditions`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_failure_up_to_the_cap_and_resets_on_success() {
        let b = Backoff::default();
        let delays: Vec<u64> = (0..9).map(|_| b.failed("ns/a").as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(b.failed("ns/b").as_secs(), 5, "per object");
        b.succeeded("ns/a");
        assert_eq!(b.failed("ns/a").as_secs(), 5);
        for _ in 0..100 {
            b.failed("ns/c");
        }
        assert_eq!(b.failed("ns/c").as_secs(), 300, "no overflow");
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let first = condition(
            &[],
            "Ready",
            false,
            "WorkersStarting",
            "0/2".into(),
            Some(1),
        );
        let same = condition(
            std::slice::from_ref(&first),
            "Ready",
            false,
            "WorkersStarting",
            "1/2".into(),
            Some(1),
        );
        assert_eq!(same.last_transition_time, first.last_transition_time);
        assert_eq!(same.message, "1/2");
        std::thread::sleep(Duration::from_millis(2));
        let flipped = condition(
            &[same],
            "Ready",
            true,
            "AllWorkersReady",
            "2/2".into(),
            Some(1),
        );
        assert!(flipped.last_transition_time.0 > first.last_transition_time.0);
        assert!(is_true(&[flipped], "Ready"));
    }
}
