//! A listener that serves only `/metrics` (and `/healthz`), apart from a server's main port, so
//! that a NetworkPolicy can open it to the monitoring namespace alone: the router's public port
//! then never serves tenant ids, and Prometheus needs no credential that could also call a
//! worker's internal API.

use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower::ServiceExt;

/// Binds `addr` and answers `GET /metrics` with what `app` answers to it (any other path: 404),
/// until the process shuts down; returns the bound address (port 0 picks a free one). `app` is
/// the server's own routes without the credential check: only `/metrics` ever reaches it.
pub async fn spawn(addr: SocketAddr, app: Router) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (metrics)"))?;
    let bound = listener.local_addr()?;
    let only_metrics = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move |request: Request| async move {
                match app.oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            }),
        )
        .fallback(|| async { not_found() });
    tokio::spawn(async move {
        let serve =
            axum::serve(listener, only_metrics).with_graceful_shutdown(crate::shutdown_signal());
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "the metrics listener failed");
        }
    });
    tracing::info!("metrics on http://{bound}/metrics");
    Ok(bound)
}

fn not_found() -> Response {
    (
        axum::http::StatusCode::NOT_FOUND,
        "this port serves only /metrics",
    )
        .into_response()
}
