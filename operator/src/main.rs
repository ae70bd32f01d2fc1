//! `tidelock-operator`: reconciles `Model` and `Tenant` resources onto the cluster (DESIGN.md,
//! "Custom resources"). This file wires the library's parts: it checks the API server and etcd,
//! serves `/healthz`, `/readyz` and `/metrics`, joins the leader election, runs the controllers
//! while it leads, and shuts down gracefully on SIGTERM (in-flight reconciliations finish, the
//! Lease is released so the standby takes over at once).
//!
//! Exit status: 0 after a graceful shutdown; 1 when it cannot start or when it lost leadership
//! (client-go's behaviour: a fresh process rejoins the election, with nothing stale in memory).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tidelock_operator::config::Config;
use tidelock_operator::leader::Elector;
use tidelock_operator::metrics::Metrics;
use tidelock_operator::reconcile::Context;
use tidelock_operator::run::{Health, controllers, serve_http};
use tidelock_protocol::KeyLayout;
use tidelock_state::StateStore;
use tokio::sync::watch;

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    let log = config.log.clone();
    tidelock_service::run("tidelock-operator", None, &log, operate(config))
}

async fn operate(config: Config) -> anyhow::Result<()> {
    let timing = config.timing()?;
    let etcd_tls = config.etcd_tls()?;
    let defaults = config.defaults()?;
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        tidelock_service::shutdown_signal().await;
        tracing::info!("shutting down");
        stop_tx.send_replace(true);
    });
    let metrics = Metrics::new();
    let health = Health {
        metrics: metrics.clone(),
        ready: Arc::new(AtomicBool::new(false)),
    };
    let server = tokio::spawn(serve_http(config.listen, health.clone(), stop.clone()));

    // kube's configuration errors repeat their causes in their text: print the outermost only.
    let client = Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "no Kubernetes configuration (in-cluster service account or KUBECONFIG): {e}"
        )
    })?;
    let version = client
        .apiserver_version()
        .await
        .context("cannot reach the Kubernetes API server")?;
    tracing::info!(version = %version.git_version, "Kubernetes API server reached");
    // The routers mount the cluster credential: it must exist before any Model does.
    tidelock_operator::reconcile::cluster_token::ensure(&client, &defaults.cluster_token_secret)
        .await
        .context("the cluster credential's Secret")?;
    let store: Arc<dyn StateStore> = Arc::new(
        tidelock_state::EtcdStore::connect(
            tidelock_state::EtcdConfig::new(config.etcd_endpoints.clone()).with_tls(etcd_tls),
        )
        .await
        .with_context(|| format!("connecting to etcd at {}", config.etcd_endpoints.join(",")))?,
    );
    health.ready.store(true, Ordering::Release);

    let identity = config.identity();
    let elector = Elector::new(
        Api::<Lease>::namespaced(client.clone(), &config.lease_namespace),
        config.lease_name.clone(),
        identity.clone(),
        timing,
    );
    let (leading_tx, mut leading) = watch::channel(false);
    let election =
        tokio::spawn(elector.run(leading_tx, tidelock_operator::run::stopped(stop.clone())));
    tracing::info!(identity, lease = %config.lease_name, namespace = %config.lease_namespace, "waiting to lead");

    let lost = tokio::select! {
        became = leading.wait_for(|l| *l) => became.is_err(),
        () = tidelock_operator::run::stopped(stop.clone()) => false,
    };
    let mut lost_leadership = lost;
    if !lost && !*stop.borrow() {
        metrics.leader.set(1);
        // The controllers stop on shutdown or when leadership is lost, whichever comes first.
        let (ctl_stop_tx, ctl_stop) = watch::channel(false);
        let mut shutdown = stop.clone();
        let watcher = tokio::spawn(async move {
            let lost = tokio::select! {
                _ = leading.wait_for(|l| !*l) => true,
                _ = shutdown.wait_for(|s| *s) => false,
            };
            ctl_stop_tx.send_replace(true);
            lost && !*shutdown.borrow()
        });
        let ctx = Arc::new(Context::new(
            client.clone(),
            store,
            KeyLayout::new(config.etcd_prefix.clone()),
            defaults.clone(),
            metrics.clone(),
            Some(identity),
        ));
        tracing::info!(
            namespace = config.watch_namespace.as_deref().unwrap_or("(all)"),
            "reconciling Models and Tenants"
        );
        controllers(ctx, config.watch_namespace.clone(), ctl_stop).await;
        metrics.leader.set(0);
        lost_leadership = watcher.await.unwrap_or(false);
    }
    if lost_leadership {
        anyhow::bail!("leadership lost; exiting so that a fresh process rejoins the election");
    }
    // The election releases the Lease when `stop` fires.
    let _ = election.await;
    let _ = server.await;
    tracing::info!("stopped");
    Ok(())
}
