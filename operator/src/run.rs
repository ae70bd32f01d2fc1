//! The running operator: the two controllers (Models with the StatefulSets they own, Tenants
//! with the Secrets they reference) and the HTTP endpoints (`/healthz`, `/readyz`, `/metrics`).
//! `main.rs` starts them under leader election.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::{Controller, WatchStreamExt, watcher};
use tidelock_api::{Model, Tenant, labels};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::reconcile::{self, Context, error_policy};

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs both controllers until `stop` turns true; in-flight reconciliations finish first.
pub async fn controllers(
    ctx: Arc<Context>,
    namespace: Option<String>,
    stop: watch::Receiver<bool>,
) {
    fn api<K>(ctx: &Context, namespace: Option<&str>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match namespace {
            Some(ns) => Api::namespaced(ctx.client.clone(), ns),
            None => Api::all(ctx.client.clone()),
        }
    }
    let ns = namespace.as_deref();
    let managed = watcher::Config::default().labels(&format!(
        "{}={}",
        labels::MANAGED_BY,
        labels::MANAGED_BY_VALUE
    ));
    let models = Controller::new(api::<Model>(&ctx, ns), watcher::Config::default())
        .owns(api::<StatefulSet>(&ctx, ns), managed)
        .graceful_shutdown_on(stopped(stop.clone()))
        .run(
            reconcile::model::reconcile,
            |m, e, ctx| error_policy(&*m, e, &ctx),
            ctx.clone(),
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "model controller");
            }
        });
    let tenants = Controller::new(api::<Tenant>(&ctx, ns), watcher::Config::default());
    let cache = tenants.store();
    // Secrets by their metadata only: a rotation changes the resourceVersion, which is all the
    // trigger needs; the reconciler reads the few Secrets Tenants reference. The operator never
    // holds (or receives) the contents of every Secret in the cluster.
    let secrets = watcher(
        api::<PartialObjectMeta<Secret>>(&ctx, ns),
        watcher::Config::default(),
    )
    .touched_objects();
    let tenants = tenants
        .watches_stream(secrets, move |secret| {
            reconcile::tenant::tenants_referencing(&cache, &secret)
        })
        .graceful_shutdown_on(stopped(stop))
        .run(
            reconcile::tenant::reconcile,
            |t, e, ctx| error_policy(&*t, e, &ctx),
            ctx.clone(),
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "tenant controller");
            }
        });
    tokio::join!(models, tenants);
}

/// What the HTTP endpoints report.
#[derive(Debug, Clone)]
pub struct Health {
    pub metrics: Metrics,
    /// Set once the API server and etcd were reached at startup: a standby is ready too (it is
    /// ready to take over), which keeps `kubectl rollout status` meaningful for two replicas.
    pub ready: Arc<AtomicBool>,
}

/// `/healthz`, `/readyz` and `/metrics`.
pub fn http(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(h): State<Health>| async move {
                if h.ready.load(Ordering::Acquire) {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(h): State<Health>| async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    h.metrics.render(),
                )
                    .into_response()
            }),
        )
        .with_state(health)
}

/// Serves [`http`] on `addr` until `stop` turns true.
pub async fn serve_http(
    addr: SocketAddr,
    health: Health,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    axum::serve(listener, http(health))
        .with_graceful_shutdown(stopped(stop))
        .await
}
