//! The worker's HTTP surface (DESIGN.md, "Worker API"): `/v1/info`, `/v1/tokenizer`,
//! streaming `/v1/generate`, `/v1/kv/events`, `/v1/kv/snapshot`, `/v1/load`, `/healthz`,
//! `/readyz`, `/metrics`; and an OpenAI-compatible surface (`openai`).
//!
//! Handlers never touch the engine: they send it commands over a channel and read what its
//! thread publishes (event log, load). `app(state)` builds the router without binding a port, so
//! component tests drive it with `oneshot`.
//!
//! Streams are newline-delimited JSON (`application/x-ndjson`), one [`GenerateEvent`] or
//! [`KvEventBatch`](tidelock_protocol::KvEventBatch) per line. Closing a generate stream cancels
//! the request.

pub mod handoff;
pub mod metrics;
pub mod openai;
pub mod peers;
pub mod runner;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde::Deserialize;
use tidelock_prompt::PromptKit;
use tidelock_protocol::openai::OpenAiError;
use tidelock_protocol::{
    GENERATE_BINARY_CONTENT_TYPE, GenerateEvent, GenerateRequest, LoadReport, WorkerInfo,
};
use tokio::sync::{oneshot, watch};

use crate::engine::executor::Executor;
use crate::engine::{Engine, EngineLoad};
use metrics::Metrics;
use runner::{Command, EventLog, Gone};

/// Everything the handlers share.
#[derive(Debug)]
pub struct Shared {
    pub info: WorkerInfo,
    /// The `GET /v1/tokenizer` body, rendered once.
    pub tokenizer: String,
    pub commands: Sender<Command>,
    pub events: Arc<EventLog>,
    pub load: watch::Receiver<EngineLoad>,
    pub metrics: Arc<Metrics>,
    /// Set when shutting down: readiness fails so that no new work is routed here.
    pub draining: AtomicBool,
    /// Tokenizer and chat template for the OpenAI surface (None: only the internal API).
    pub kit: Option<Arc<PromptKit>>,
    /// Unix seconds at start, for `/v1/models`.
    pub started_at: u64,
    /// How this worker reaches its peers (pulls, handoffs).
    pub peers: peers::Peers,
    /// Where this worker's handoff to its peers is (a drain's).
    pub handoff: handoff::Handoff,
}

pub type AppState = Arc<Shared>;

/// KV event batches kept for routers that reconnect.
const EVENT_LOG_BATCHES: usize = 4096;

/// A running engine thread and the state its handlers share.
#[derive(Debug)]
pub struct Started {
    pub state: AppState,
    pub engine_thread: std::thread::JoinHandle<()>,
}

/// Starts the engine on its thread and builds the handlers' state: the composition both the
/// binary and the component tests use.
pub fn start<E: Executor + 'static>(
    engine: Engine<E>,
    info: WorkerInfo,
    tokenizer: String,
    kit: Option<Arc<PromptKit>>,
) -> Result<Started, prometheus::Error> {
    start_with_peers(engine, info, tokenizer, kit, None)
}

/// [`start`], presenting `peer_token` (the cluster credential) when it pulls KV blocks from
/// peer workers.
pub fn start_with_peers<E: Executor + 'static>(
    engine: Engine<E>,
    info: WorkerInfo,
    tokenizer: String,
    kit: Option<Arc<PromptKit>>,
    peer_token: Option<tidelock_protocol::ClusterToken>,
) -> Result<Started, prometheus::Error> {
    let events = Arc::new(EventLog::new(info.epoch, EVENT_LOG_BATCHES));
    let (load_tx, load_rx) = watch::channel(engine.load());
    let metrics = Arc::new(Metrics::new()?);
    let layout = engine.executor().block_layout();
    let (pulls, jobs) = tokio::sync::mpsc::unbounded_channel();
    let (commands, engine_thread) =
        runner::spawn(engine, events.clone(), load_tx, metrics.clone(), pulls);
    let peers = peers::Peers::new(layout, peer_token);
    peers::spawn_puller(jobs, commands.clone(), peers.clone());
    let state = Arc::new(Shared {
        info,
        tokenizer,
        commands,
        events,
        load: load_rx,
        metrics,
        draining: AtomicBool::new(false),
        kit,
        started_at: tidelock_openai::unix_now(),
        peers,
        handoff: handoff::Handoff::default(),
    });
    Ok(Started {
        state,
        engine_thread,
    })
}

/// The largest `/v1/generate` body the worker takes: its whole context as JSON token ids (at most
/// 11 bytes each, `4294967295,`; the binary form routers send needs 4) plus room for the other
/// fields. axum's default (2 MB) would refuse a prompt of about 350,000 tokens that the worker's
/// context holds (issue #18).
pub fn generate_body_limit(info: &WorkerInfo) -> usize {
    const ID_BYTES: u64 = 11;
    const FIELDS: u64 = 64 << 10;
    usize::try_from(info.max_context_tokens.saturating_mul(ID_BYTES) + FIELDS).unwrap_or(usize::MAX)
}

/// The worker's routes.
pub fn app(state: AppState) -> Router {
    let generate_limit = generate_body_limit(&state.info);
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/v1/info", get(info))
        .route("/v1/tokenizer", get(tokenizer))
        .route("/v1/load", get(load))
        .route("/v1/kv/snapshot", get(snapshot))
        .route("/v1/kv/events", get(kv_events))
        .route(
            peers::PATH,
            post(peers::blocks).layer(axum::extract::DefaultBodyLimit::max(
                64 * tidelock_protocol::MAX_PULL_BLOCKS,
            )),
        )
        .route(
            handoff::HANDOFF_PATH,
            post(handoff::handoff).layer(axum::extract::DefaultBodyLimit::max(64 << 20)),
        )
        .route(
            handoff::ADOPT_PATH,
            post(handoff::adopt).layer(axum::extract::DefaultBodyLimit::max(
                64 * tidelock_protocol::MAX_PULL_BLOCKS,
            )),
        )
        .route(
            "/v1/generate",
            post(generate).layer(axum::extract::DefaultBodyLimit::max(generate_limit)),
        )
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/health", get(openai::health))
        .route("/model_info", get(openai::model_info))
        .route("/server_info", get(openai::server_info))
        .route("/get_load", get(openai::get_load))
        .route("/tokenize", post(openai::tokenize))
        .layer(axum::middleware::from_fn(tidelock_openai::require_host))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else {
        "ready".into_response()
    }
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    state.metrics.record_load(&state.load.borrow());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn info(State(state): State<AppState>) -> axum::Json<WorkerInfo> {
    axum::Json(state.info.clone())
}

async fn tokenizer(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.tokenizer.clone(),
    )
        .into_response()
}

async fn load(State(state): State<AppState>) -> axum::Json<LoadReport> {
    let load = *state.load.borrow();
    axum::Json(LoadReport {
        running: load.running as u32,
        waiting: load.waiting as u32,
        kv_used_blocks: load.blocks.in_use as u64,
        kv_total_blocks: load.blocks.total as u64,
        prefill_tokens_waiting: load.waiting_prefill_tokens as u64,
        prefill_tokens_per_second: state.metrics.prefill_rate.get(),
        host_block_secs: load.tiers.host_block_secs,
        disk_block_secs: load.tiers.disk_block_secs,
        peer_block_secs: load.tiers.peer_block_secs,
        draining: state.draining.load(Ordering::Relaxed),
    })
}

pub(crate) fn engine_gone() -> Response {
    tidelock_openai::error_response(&OpenAiError::unavailable("the engine has stopped"))
}

async fn snapshot(State(state): State<AppState>) -> Response {
    let (tx, rx) = oneshot::channel();
    if state.commands.send(Command::Snapshot(tx)).is_err() {
        return engine_gone();
    }
    match rx.await {
        Ok(snapshot) => axum::Json(snapshot).into_response(),
        Err(_) => engine_gone(),
    }
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    /// Stream batches after this sequence number (0: from the start of the epoch).
    #[serde(default)]
    after: u64,
    /// The epoch the caller's `after` belongs to; a different one means "resync".
    epoch: Option<u64>,
}

fn ndjson(stream: impl futures::Stream<Item = String> + Send + 'static) -> Response {
    let body = Body::from_stream(stream.map(|mut line| {
        line.push('\n');
        Ok::<_, Infallible>(Bytes::from(line))
    }));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

async fn kv_events(State(state): State<AppState>, Query(q): Query<EventsQuery>) -> Response {
    let gone = || {
        tidelock_openai::error_response(&OpenAiError::resync_required(
            "those KV events are no longer available: load /v1/kv/snapshot and follow from its sequence",
        ))
    };
    if q.epoch.is_some_and(|e| e != state.events.epoch().get()) {
        return gone();
    }
    if state.events.since(q.after) == Err(Gone) {
        return gone();
    }
    let events = state.events.clone();
    let stream = futures::stream::unfold((events, q.after), |(events, mut after)| async move {
        let batches = loop {
            let notified = events.subscribe();
            match events.since(after) {
                // The follower fell too far behind: end the stream; reconnecting gives 410.
                Err(Gone) => return None,
                Ok(batches) if !batches.is_empty() => break batches,
                Ok(_) => notified.await,
            }
        };
        after = batches.last().map_or(after, |b| b.sequence);
        let lines: Vec<String> = batches
            .iter()
            .filter_map(|b| serde_json::to_string(b).ok())
            .collect();
        Some((futures::stream::iter(lines), (events, after)))
    })
    .flatten();
    ndjson(stream)
}

async fn generate(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        // 413 for a body over the limit, 400 for any other unreadable body.
        Err(rejection) => {
            let status = match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            return tidelock_openai::error_response(&OpenAiError {
                status: status.as_u16(),
                ..OpenAiError::bad_request(rejection.body_text())
            });
        }
    };
    // The binary form (what routers send) or JSON.
    let binary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(GENERATE_BINARY_CONTENT_TYPE));
    let parsed = if binary {
        GenerateRequest::from_binary(&body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice::<GenerateRequest>(&body)
            .map_err(|e| format!("Failed to deserialize the JSON body into the target type: {e}"))
    };
    let request = match parsed {
        Ok(request) => request,
        Err(problem) => {
            return tidelock_openai::error_response(&OpenAiError::bad_request(problem));
        }
    };
    if state.draining.load(Ordering::Relaxed) {
        // Before the engine: a router takes a 503 as "try another worker".
        return tidelock_openai::error_response(&OpenAiError::draining(
            "the worker is draining (shutting down); another worker takes it",
        ));
    }
    let started = Instant::now();
    let prompt_tokens = request.tokens.len() as u64;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    if state
        .commands
        .send(Command::Generate {
            request: Box::new(request),
            out: tx,
        })
        .is_err()
    {
        return engine_gone();
    }
    let metrics = state.metrics.clone();
    metrics.prompt_tokens.inc_by(prompt_tokens);
    // Counts one event into the metrics; true when it ends the stream.
    let observe = move |event: &GenerateEvent, last: &mut Option<Instant>| match event {
        GenerateEvent::Tokens { .. } => {
            let now = Instant::now();
            match *last {
                None => metrics.ttft.observe((now - started).as_secs_f64()),
                Some(prev) => metrics.inter_token.observe((now - prev).as_secs_f64()),
            }
            *last = Some(now);
            false
        }
        GenerateEvent::Finished { usage, .. } => {
            metrics
                .cached_prompt_tokens
                .inc_by(u64::from(usage.cached_tokens));
            metrics.requests.with_label_values(&["finished"]).inc();
            true
        }
        GenerateEvent::Error { .. } => {
            metrics.requests.with_label_values(&["error"]).inc();
            true
        }
        GenerateEvent::Prefilled { .. } | GenerateEvent::Ended { .. } | GenerateEvent::Unknown => {
            false
        }
    };
    // Events already waiting are written together (one write, one wake-up for the reader);
    // nothing waits for more.
    let stream = futures::stream::unfold(
        (rx, None::<Instant>, false),
        move |(mut rx, mut last, done)| {
            let observe = observe.clone();
            async move {
                if done {
                    return None;
                }
                let mut event = rx.recv().await?;
                let mut lines = String::new();
                loop {
                    let done = observe(&event, &mut last);
                    if !lines.is_empty() {
                        lines.push('\n');
                    }
                    lines.push_str(&serde_json::to_string(&event).unwrap_or_default());
                    if done {
                        return Some((lines, (rx, last, true)));
                    }
                    match rx.try_recv() {
                        Ok(next) => event = next,
                        Err(_) => return Some((lines, (rx, last, false))),
                    }
                }
            }
        },
    );
    ndjson(stream)
}
