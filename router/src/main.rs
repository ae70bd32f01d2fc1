//! `tidelock-router`: the OpenAI-compatible endpoint tenants talk to; pins each session to the
//! workers holding its cached prefix (DESIGN.md, "Router API"). This file only wires the
//! library's parts from the configuration; see `lib.rs` for the module map.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tidelock_protocol::KeyLayout;
use tidelock_router::app::{Shared, app, metrics_app};
use tidelock_router::config::Config;
use tidelock_router::discovery::register_when_up;
use tidelock_router::http::Http;
use tidelock_router::policy::PullWhen;
use tidelock_router::sessions::Pins;
use tidelock_router::tenants::{self, Tenants};
use tidelock_router::workers::Models;
use tidelock_state::StateStore;

/// Many small, short-lived allocations per request (JSON, tokens, events): mimalloc handles
/// them at a fraction of glibc malloc's cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    let log = config.log.clone();
    tidelock_service::run("tidelock-router", None, &log, serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let (settings, probing) = config.settings()?;
    let token = config.auth.token()?;
    // Every call to a worker (info, load, tokenizer, KV events, generate) presents it.
    let http = Http::new(token.as_ref());
    let layout = KeyLayout::new(config.etcd_prefix.clone());
    let store: Arc<dyn StateStore> = match config.etcd()? {
        None => Arc::new(tidelock_state::MemoryStore::new()),
        Some(etcd) => Arc::new(
            tidelock_state::EtcdStore::connect(etcd)
                .await
                .context("connecting to etcd")?,
        ),
    };
    let mut background = Vec::new();
    // Static workers are registered as they answer: the router starts with some of them down.
    for url in &config.workers {
        background.push(tokio::spawn(register_when_up(
            store.clone(),
            layout.clone(),
            url.clone(),
            http.clone(),
        )));
    }
    if let Some(path) = &config.tenants_file {
        let n = tenants::load_file(&*store, &layout, path).await?;
        tracing::info!(path = %path.display(), tenants = n, "tenants file loaded");
        background.push(tokio::spawn(tenants::sync_file(
            store.clone(),
            layout.clone(),
            path.clone(),
        )));
    } else if config.etcd.is_empty() {
        tracing::warn!("no --tenants-file: no API key is valid, every request will get a 401");
    }
    let tenants = Arc::new(Tenants::default());
    background.push(tokio::spawn(
        tenants.clone().follow(store.clone(), layout.clone()),
    ));
    let handoff = (settings.cost.pull != PullWhen::Never).then_some(settings.cost);
    let models = Models::with_handoff(store.clone(), layout.clone(), probing, http, handoff);
    background.push(tokio::spawn(models.clone().run()));
    let pins = Arc::new(Pins::with_deadlines(
        store,
        layout,
        config.session_idle(),
        config.pin_deadlines(),
    ));
    background.push(tokio::spawn(pins.clone().follow()));
    let purge = pins.clone();
    background.push(tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            purge.purge();
        }
    }));
    let state = Shared::new(models, tenants, pins, settings)?;
    match config.metrics_listen {
        Some(addr) => {
            tidelock_service::metrics_listener::spawn(addr, metrics_app(state.clone())).await?;
        }
        None => tracing::info!("no --metrics-listen: metrics are not served"),
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tracing::info!(
        policy = settings.policy.as_str(),
        "serving the OpenAI API on http://{}/v1",
        listener.local_addr()?
    );
    // Client timeouts, the connection limit and TCP_NODELAY (small streamed writes must not
    // wait for the peer's delayed ACK).
    tidelock_service::serve::serve(
        listener,
        app(state.clone()),
        config.client_limits(),
        state.metrics.connections.clone(),
        tidelock_service::shutdown_signal(),
    )
    .await;
    tracing::info!("stopped");
    for task in background {
        task.abort();
    }
    Ok(())
}
