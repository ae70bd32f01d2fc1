//! Routers and workers of neighbouring versions during a rolling upgrade: a router sends
//! `/v1/generate` in the binary form, and a worker older than that form answers 415; the router
//! then sends that worker JSON, and the client never notices.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use support::cluster::{KEY_A, MODEL, cluster_at, kit};
use support::{BLOCK, serve_worker};
use tidelock_protocol::GENERATE_BINARY_CONTENT_TYPE;
use tidelock_router::app::Settings;
use tidelock_worker::testing::SimWorker;

#[derive(Clone)]
struct Old {
    worker: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Body>,
    refused: Arc<AtomicUsize>,
}

/// A worker from before the binary form: a sim worker behind a facade that answers a binary
/// `/v1/generate` with 415 (as axum's JSON extractor did) and passes everything else on.
async fn facade(State(old): State<Old>, request: Request) -> Response {
    let binary = request
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes() == GENERATE_BINARY_CONTENT_TYPE.as_bytes());
    if binary && request.uri().path() == "/v1/generate" {
        old.refused.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Expected request with `Content-Type: application/json`",
        )
            .into_response();
    }
    let (mut parts, body) = request.into_parts();
    parts.uri = format!("{}{}", old.worker, parts.uri.path_and_query().unwrap())
        .parse()
        .unwrap();
    match old
        .client
        .request(hyper::Request::from_parts(parts, body))
        .await
    {
        Ok(response) => response.map(|b| Body::new(b.map_err(axum::Error::new))),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_the_binary_form_is_sent_json() {
    let sim = serve_worker(
        "127.0.0.1:0",
        SimWorker {
            model: tidelock_protocol::ModelName::new(MODEL).unwrap(),
            kit: Some(kit()),
            ..SimWorker::new(BLOCK)
        },
    );
    let old = Old {
        worker: format!("http://{}", sim.addr),
        client: Client::builder(TokioExecutor::new()).build_http(),
        refused: Arc::default(),
    };
    let refused = old.refused.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(facade).with_state(old);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let c = cluster_at(&[url], vec![sim], Settings::default()).await;
    let body =
        json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "ignore_eos": true});
    let answer = c.post("/v1/completions", KEY_A, body).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["usage"]["completion_tokens"], 5);
    assert_eq!(
        refused.load(Ordering::SeqCst),
        1,
        "the binary form was tried first"
    );
}
