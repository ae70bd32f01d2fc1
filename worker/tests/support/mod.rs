//! Shared by the worker's integration tests: where the default model is, and prompts that look
//! like text to it (see `tidelock_worker::testing`, which the router's tests use too).

#![allow(dead_code, unused_imports)] // Each test file uses its own subset.

pub use tidelock_worker::testing::{model_path, tokens};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tidelock_worker::server::{AppState, app};
use tower::ServiceExt;

/// Sends one request through the worker's real router (`app`), without a socket; returns the
/// status and the whole body.
pub async fn send(state: &AppState, mut request: Request<Body>) -> (StatusCode, Vec<u8>) {
    // As a client's HTTP/1.1 request has one (the worker refuses requests without it).
    request
        .headers_mut()
        .entry(axum::http::header::HOST)
        .or_insert(axum::http::HeaderValue::from_static("worker"));
    let response = app(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, body.to_vec())
}

/// POSTs `body` as JSON to `uri`.
pub async fn post_json(
    state: &AppState,
    uri: &str,
    body: serde_json::Value,
) -> (StatusCode, Vec<u8>) {
    let request = Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    send(state, request).await
}
