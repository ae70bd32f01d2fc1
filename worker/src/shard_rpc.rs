//! The shard attention RPC over HTTP (issue #7): the route a shard serves
//! (`POST /v1/shard/attend`, binary bodies of [`tidelock_protocol::shard`]) and the link a
//! coordinator calls it through ([`HttpLink`]).
//!
//! The link owns one I/O thread with its own single-threaded runtime and a pooled HTTP/1.1
//! client, so the connection to its shard stays open between calls (one TCP handshake per
//! shard, not per layer), and the forward pass, which is synchronous, can call it from any
//! thread. Every call has a deadline: a shard that died, hangs or answers garbage fails the
//! call with a message naming it and why, never a hang.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use tidelock_protocol::shard::{AttendReply, AttendRequest};
use tidelock_protocol::{ClusterToken, WorkerInfo};
use tidelock_service::cluster_auth::ClusterGuard;

use crate::kv::shard::{ShardFault, ShardLink, ShardServer};

/// The content type of shard RPC bodies.
pub const CONTENT_TYPE: &str = "application/vnd.tidelock.shard";
/// The route.
pub const PATH: &str = "/v1/shard/attend";
/// The largest request body a shard accepts.
pub const MAX_BODY: usize = 512 << 20;

/// What a shard other than the coordinator serves: its store on `POST /v1/shard/attend`, its
/// metrics on `/metrics` (with `guard`'s refusals), and `/healthz`, `/readyz` and `/v1/info`
/// (its group and index) for probes and tools. It runs no engine, so it has no generation
/// routes. The caller puts it behind `guard` ([`ClusterGuard::protect`]).
pub fn shard_app(
    info: WorkerInfo,
    server: Arc<Mutex<ShardServer>>,
    guard: &ClusterGuard,
) -> Router {
    let info = Arc::new(info);
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .route(
            "/v1/info",
            get(move || {
                let info = info.clone();
                async move { axum::Json((*info).clone()) }
            }),
        )
        .merge(routes(server, guard))
}

/// A shard's metrics (its own registry: a shard runs no engine).
#[derive(Debug)]
struct ShardMetrics {
    registry: Registry,
    requests: IntCounterVec,
    seconds: Histogram,
}

impl ShardMetrics {
    fn new(blocks: usize) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tidelock_shard_requests_total",
                "Shard attention requests (one per layer of a coordinator's step) by outcome.",
            ),
            &["outcome"],
        )?;
        let seconds = Histogram::with_opts(
            HistogramOpts::new(
                "tidelock_shard_request_seconds",
                "Time to append, attend and encode one request.",
            )
            .buckets(prometheus::exponential_buckets(0.0001, 2.0, 16)?),
        )?;
        let capacity = IntGauge::new(
            "tidelock_shard_kv_blocks_capacity",
            "KV blocks in this shard's store.",
        )?;
        capacity.set(blocks as i64);
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        registry.register(Box::new(capacity))?;
        Ok(ShardMetrics {
            registry,
            requests,
            seconds,
        })
    }
}

#[derive(Debug, Clone)]
struct Shared {
    server: Arc<Mutex<ShardServer>>,
    metrics: Arc<ShardMetrics>,
}

/// `POST /v1/shard/attend` over `server` (one request at a time: a shard's store has one
/// writer), and `GET /metrics` counting its requests and `guard`'s refusals.
pub fn routes(server: Arc<Mutex<ShardServer>>, guard: &ClusterGuard) -> Router {
    let blocks = server
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .num_blocks();
    let metrics = ShardMetrics::new(blocks).expect("the shard metrics register once");
    guard
        .register(&metrics.registry)
        .expect("the refusal counter registers once");
    let metrics = Arc::new(metrics);
    Router::new()
        .route(PATH, post(attend))
        .route("/metrics", get(metrics_text))
        // A prefill chunk's queries and new keys and values: tens of MiB for large models.
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Shared { server, metrics })
}

async fn metrics_text(State(shared): State<Shared>) -> String {
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&shared.metrics.registry.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

async fn attend(State(shared): State<Shared>, body: Bytes) -> Response {
    let Shared { server, metrics } = shared;
    let result = tokio::task::spawn_blocking(move || {
        let _timer = metrics.seconds.start_timer();
        // A panic while serving (a bug: bad requests are errors) must not take the store out of
        // service: its contents are plain numbers, valid whatever was interrupted.
        let result = server
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .serve(&body);
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics.requests.with_label_values(&[outcome]).inc();
        result
    })
    .await;
    match result {
        Ok(Ok(bytes)) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], bytes).into_response(),
        Ok(Err(fault)) => (StatusCode::BAD_REQUEST, fault.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

type Job = (Vec<u8>, mpsc::Sender<Result<Vec<u8>, ShardFault>>);

/// A coordinator's link to one shard over HTTP.
#[derive(Debug)]
pub struct HttpLink {
    url: String,
    timeout: Duration,
    jobs: mpsc::Sender<Job>,
    reply: Option<mpsc::Receiver<Result<Vec<u8>, ShardFault>>>,
}

impl HttpLink {
    /// A link to the shard at `base` (e.g. `http://10.0.0.7:8000`), presenting `token` (the
    /// cluster credential, when the group has one); each call fails after `timeout`.
    pub fn new(
        base: &str,
        timeout: Duration,
        token: Option<ClusterToken>,
    ) -> std::io::Result<HttpLink> {
        let authorization = token.map(|t| t.authorization());
        let url = format!("{}{PATH}", base.trim_end_matches('/'));
        let (jobs, rx) = mpsc::channel::<Job>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let target = url.clone();
        std::thread::Builder::new()
            .name("shard-link".into())
            .spawn(move || {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                connector.set_connect_timeout(Some(timeout));
                let client: Client<_, Full<Bytes>> =
                    Client::builder(TokioExecutor::new()).build(connector);
                while let Ok((body, reply)) = rx.recv() {
                    let result = runtime.block_on(async {
                        let mut request = hyper::Request::post(&target)
                            .header(header::CONTENT_TYPE, CONTENT_TYPE);
                        if let Some(authorization) = &authorization {
                            request = request.header(header::AUTHORIZATION, authorization);
                        }
                        let link = |e: String| ShardFault::Link(format!("{target}: {e}"));
                        let request = request
                            .body(Full::new(Bytes::from(body)))
                            .map_err(|e| link(e.to_string()))?;
                        let call = async {
                            let response =
                                client.request(request).await.map_err(|e| link(chain(&e)))?;
                            let status = response.status();
                            let bytes = response
                                .into_body()
                                .collect()
                                .await
                                .map_err(|e| link(e.to_string()))?
                                .to_bytes();
                            if status.is_success() {
                                Ok(bytes.to_vec())
                            } else {
                                Err(ShardFault::Status {
                                    status: status.as_u16(),
                                    message: String::from_utf8_lossy(&bytes).into_owned(),
                                })
                            }
                        };
                        tokio::time::timeout(timeout, call)
                            .await
                            .unwrap_or_else(|_| Err(link(format!("no answer within {timeout:?}"))))
                    });
                    let _ = reply.send(result);
                }
            })?;
        Ok(HttpLink {
            url,
            timeout,
            jobs,
            reply: None,
        })
    }
}

/// An error and its causes, `a: b: c` (hyper's own text is only the outermost).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl ShardLink for HttpLink {
    fn send(&mut self, request: &AttendRequest) -> Result<(), ShardFault> {
        let body = request
            .encode()
            .map_err(|e| ShardFault::Wire(format!("{}: {e}", self.url)))?;
        let (tx, rx) = mpsc::channel();
        self.jobs.send((body, tx)).map_err(|_| {
            ShardFault::Link(format!("{}: the link's I/O thread is gone", self.url))
        })?;
        self.reply = Some(rx);
        Ok(())
    }

    fn finish(&mut self) -> Result<AttendReply, ShardFault> {
        let rx = self.reply.take().ok_or(ShardFault::NoRequest)?;
        // The I/O thread enforces the deadline; this one only guards against it being stuck.
        let body = rx
            .recv_timeout(self.timeout + Duration::from_secs(1))
            .map_err(|_| {
                ShardFault::Link(format!("{}: no answer within {:?}", self.url, self.timeout))
            })??;
        AttendReply::decode(&body).map_err(|e| ShardFault::Wire(format!("{}: {e}", self.url)))
    }
}
