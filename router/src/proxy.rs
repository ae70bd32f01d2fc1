//! Sends a generate request to a worker and streams its events back, with retries.
//!
//! The workers are tried in the policy's order. A failure before the first token (no
//! connection, an HTTP error, a timeout, an `internal` error event, a stream that ends early) is
//! counted against that worker (enough in a row eject it, see [`crate::workers`]) and the next
//! worker is tried, up to [`ProxyConfig::max_attempts`]; an `overloaded` answer moves on without
//! counting as a failure. The request's own faults (`invalid_request`, `context_too_long`) are
//! answered at once, never retried. Once a token has been streamed the answer cannot restart
//! elsewhere: a later failure ends the stream with an `Error` event.
//!
//! A worker that answers that it is draining (`503`, error type [`DRAINING`]) is not counted
//! either, and when it holds more of the prompt's prefix than the next worker, the next attempts
//! carry a pull hint pointing at it (unless the router's `--pull` is `never`): it was chosen
//! for its cache before the router's last probe saw it drain, and it still lends its blocks.
//!
//! Dropping the returned stream closes the connection to the worker, which cancels the request
//! there: that is how a client that goes away stops generation.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tidelock_protocol::openai::OpenAiError;
use tidelock_protocol::{
    BlockHash, DRAINING, ErrorCode, GENERATE_BINARY_CONTENT_TYPE, GenerateEvent, GenerateRequest,
    PullHint,
};

use crate::http::NdjsonLines;
use crate::workers::WorkerState;

/// Timeouts and retries of proxied requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Connecting to a worker.
    pub connect_timeout: Duration,
    /// From sending the request to its first token (queueing and prefill included).
    pub first_token_timeout: Duration,
    /// Between two events once tokens flow.
    pub idle_timeout: Duration,
    /// Workers tried at most for one request.
    pub max_attempts: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: Duration::from_secs(2),
            first_token_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(60),
            max_attempts: 3,
        }
    }
}

/// Marks a request as in flight on a worker until dropped; its prefill as pending until the
/// first token.
#[derive(Debug)]
struct InFlight {
    worker: Arc<WorkerState>,
    prefill: u64,
    /// The prompt's blocks, promised on the worker until the first token; `None` after.
    blocks: Option<Arc<[BlockHash]>>,
}

impl InFlight {
    fn new(worker: Arc<WorkerState>, prefill: u64, blocks: &Arc<[BlockHash]>) -> Self {
        worker.in_flight.fetch_add(1, Ordering::Relaxed);
        worker.pending_prefill.fetch_add(prefill, Ordering::Relaxed);
        worker.pending_requests.fetch_add(1, Ordering::Relaxed);
        worker.promise(blocks);
        InFlight {
            worker,
            prefill,
            blocks: Some(blocks.clone()),
        }
    }

    fn prefill_done(&mut self) {
        self.worker
            .pending_prefill
            .fetch_sub(std::mem::take(&mut self.prefill), Ordering::Relaxed);
        if let Some(blocks) = self.blocks.take() {
            self.worker.pending_requests.fetch_sub(1, Ordering::Relaxed);
            self.worker.unpromise(&blocks);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.prefill_done();
        self.worker.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request that reached a worker: its first events, and the rest as they come.
pub struct Started {
    /// The worker answering.
    pub worker: Arc<WorkerState>,
    /// When the first token (or the end) arrived.
    pub first_token: Instant,
    /// Workers that failed before this one (their ids), for logs.
    pub failed: Vec<String>,
    pub events: BoxStream<'static, GenerateEvent>,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("worker", &self.worker.id)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// How one attempt failed.
enum AttemptError {
    /// The request's own fault: answer the client with it.
    Client(OpenAiError),
    /// The worker is busy: try another, without holding it against this one.
    Busy(String),
    /// The worker is draining: try another, which may pull the prefix from this one.
    Draining(String),
    /// The worker failed: count it, try another.
    Failed(String),
    /// The worker does not take the binary form (415: a worker older than the router, during
    /// a rolling upgrade): send it JSON.
    NoBinary,
}

/// The router's client to its workers.
#[derive(Debug, Clone)]
pub struct Proxy {
    client: Client<HttpConnector, Full<Bytes>>,
    cfg: ProxyConfig,
    /// The cluster credential's `Authorization` value, sent with every request.
    authorization: Option<hyper::header::HeaderValue>,
}

impl Proxy {
    pub fn new(cfg: ProxyConfig, authorization: Option<hyper::header::HeaderValue>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        Proxy {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(connector),
            cfg,
            authorization,
        }
    }

    /// Sends `request` to the first worker of `order` that takes it; each entry carries the
    /// prompt tokens that worker must prefill (its queue estimate while the request waits) and
    /// the leading blocks of the prompt it holds. `may_pull`: a draining worker's blocks may be
    /// pulled by the next one (module docs).
    pub async fn start(
        &self,
        order: Vec<crate::placement::Target>,
        request: &GenerateRequest,
        may_pull: bool,
        blocks: &Arc<[BlockHash]>,
    ) -> Result<Started, OpenAiError> {
        // The binary form: 4 bytes an id, nothing to parse per id on the worker.
        let mut body = Bytes::from(request.to_binary());
        let mut failed = Vec::new();
        let mut problems = Vec::new();
        // A draining worker that refused the request, and the blocks it holds.
        let mut lender: Option<(String, usize)> = None;
        let mut request = std::borrow::Cow::Borrowed(request);
        for (worker, prefill, held) in order.into_iter().take(self.cfg.max_attempts) {
            if let Some((from, blocks)) = &lender
                && *blocks > held
                && request.pull.is_none()
            {
                let mut hinted = request.clone().into_owned();
                hinted.pull = u32::try_from(*blocks).ok().map(|blocks| PullHint {
                    from: from.clone(),
                    blocks,
                });
                body = Bytes::from(hinted.to_binary());
                request = std::borrow::Cow::Owned(hinted);
            }
            let guard = InFlight::new(worker.clone(), prefill, blocks);
            let mut outcome = self.attempt(&worker, body.clone(), true, guard).await;
            if let Err(AttemptError::NoBinary) = outcome {
                tracing::debug!(worker = %worker.id, "worker takes no binary requests; sending JSON");
                let json = serde_json::to_vec(&*request).map_err(|e| {
                    OpenAiError::internal(format!("cannot encode the worker request: {e}"))
                })?;
                let guard = InFlight::new(worker.clone(), prefill, blocks);
                outcome = self.attempt(&worker, Bytes::from(json), false, guard).await;
            }
            match outcome {
                Ok((first_token, events)) => {
                    worker.record_success();
                    return Ok(Started {
                        worker,
                        first_token,
                        failed,
                        events,
                    });
                }
                Err(AttemptError::Client(e)) => return Err(e),
                Err(AttemptError::NoBinary) => {
                    problems.push(format!("{}: refuses JSON and binary bodies", worker.id));
                }
                Err(AttemptError::Busy(problem)) => {
                    tracing::debug!(worker = %worker.id, %problem, "worker busy; trying the next");
                    problems.push(format!("{}: {problem}", worker.id));
                }
                Err(AttemptError::Draining(problem)) => {
                    tracing::debug!(worker = %worker.id, "worker draining; trying the next");
                    if may_pull && lender.as_ref().is_none_or(|(_, b)| held > *b) {
                        lender = Some((worker.registration.address.clone(), held));
                    }
                    problems.push(format!("{}: {problem}", worker.id));
                }
                Err(AttemptError::Failed(problem)) => {
                    tracing::warn!(worker = %worker.id, %problem, "worker failed before the first token; trying the next");
                    if worker.record_failure() {
                        tracing::warn!(worker = %worker.id, "worker ejected after consecutive failures");
                    }
                    failed.push(worker.id.to_string());
                    problems.push(format!("{}: {problem}", worker.id));
                }
            }
        }
        Err(if problems.is_empty() {
            OpenAiError::unavailable("no healthy worker serves this model right now")
        } else {
            OpenAiError::unavailable(format!(
                "no worker could take the request ({})",
                problems.join("; ")
            ))
        })
    }

    /// One worker: send, then read up to the first token.
    async fn attempt(
        &self,
        worker: &Arc<WorkerState>,
        body: Bytes,
        binary: bool,
        mut guard: InFlight,
    ) -> Result<(Instant, BoxStream<'static, GenerateEvent>), AttemptError> {
        let uri = worker.generate_uri().cloned().ok_or_else(|| {
            AttemptError::Failed(format!(
                "bad worker address: {}",
                worker.registration.address
            ))
        })?;
        let content_type = if binary {
            GENERATE_BINARY_CONTENT_TYPE
        } else {
            "application/json"
        };
        let mut request =
            hyper::Request::post(uri).header(hyper::header::CONTENT_TYPE, content_type);
        if let Some(authorization) = &self.authorization {
            request = request.header(hyper::header::AUTHORIZATION, authorization.clone());
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| AttemptError::Failed(format!("bad worker address: {e}")))?;
        let deadline = tokio::time::Instant::now() + self.cfg.first_token_timeout;
        let response = tokio::time::timeout_at(deadline, self.client.request(request))
            .await
            .map_err(|_| AttemptError::Failed("no answer before the first-token timeout".into()))?
            .map_err(|e| AttemptError::Failed(format!("request failed: {e}")))?;
        let status = response.status();
        if binary && status == hyper::StatusCode::UNSUPPORTED_MEDIA_TYPE {
            return Err(AttemptError::NoBinary);
        }
        if !status.is_success() {
            let text = tokio::time::timeout_at(deadline, response.into_body().collect())
                .await
                .ok()
                .and_then(|b| b.ok())
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            let problem = format!("HTTP {status}: {}", text.trim());
            let draining = status.as_u16() == 503
                && serde_json::from_str::<serde_json::Value>(&text)
                    .is_ok_and(|v| v["error"]["type"] == DRAINING);
            return Err(if draining {
                AttemptError::Draining(problem)
            } else if status.as_u16() == 503 || status.as_u16() == 429 {
                AttemptError::Busy(problem)
            } else if status == hyper::StatusCode::PAYLOAD_TOO_LARGE {
                // The prompt is longer than the worker's context allows: the client's to fix.
                AttemptError::Client(
                    OpenAiError::bad_request(format!(
                        "The prompt is longer than worker {} accepts ({problem}).",
                        worker.id
                    ))
                    .with_code("context_length_exceeded"),
                )
            } else if status.is_client_error() {
                // The router built this request: a 4xx means a contract mismatch, not the
                // client's fault, but retrying elsewhere will not help either.
                AttemptError::Client(OpenAiError::internal(format!(
                    "worker {} refused the request: {problem}",
                    worker.id
                )))
            } else {
                AttemptError::Failed(problem)
            });
        }
        let mut lines = NdjsonLines::new(response.into_body());
        let mut buffered = VecDeque::new();
        loop {
            let event = match tokio::time::timeout_at(deadline, lines.next()).await {
                Err(_) => {
                    return Err(AttemptError::Failed(
                        "no first token before the timeout".into(),
                    ));
                }
                Ok(Err(problem)) => return Err(AttemptError::Failed(problem.to_string())),
                Ok(Ok(None)) => {
                    return Err(AttemptError::Failed(
                        "the stream ended before the first token".into(),
                    ));
                }
                Ok(Ok(Some(event))) => event,
            };
            match event {
                GenerateEvent::Error { code, message } => {
                    return Err(match code {
                        ErrorCode::InvalidRequest | ErrorCode::ContextTooLong => {
                            AttemptError::Client(OpenAiError::from_wire(code, message))
                        }
                        ErrorCode::Overloaded => AttemptError::Busy(message),
                        ErrorCode::Internal | ErrorCode::Unknown => AttemptError::Failed(message),
                    });
                }
                first @ (GenerateEvent::Tokens { .. } | GenerateEvent::Finished { .. }) => {
                    guard.prefill_done();
                    buffered.push_back(first);
                    let idle = self.cfg.idle_timeout;
                    let events = rest(worker.clone(), buffered, lines, guard, idle);
                    return Ok((Instant::now(), events));
                }
                other => buffered.push_back(other),
            }
        }
    }
}

/// The events after the first token: the buffered ones, then the worker's as they come; a
/// failure becomes a final `Error` event.
fn rest(
    worker: Arc<WorkerState>,
    buffered: VecDeque<GenerateEvent>,
    lines: NdjsonLines,
    guard: InFlight,
    idle: Duration,
) -> BoxStream<'static, GenerateEvent> {
    struct State {
        worker: Arc<WorkerState>,
        buffered: VecDeque<GenerateEvent>,
        lines: NdjsonLines,
        _guard: InFlight,
        done: bool,
    }
    let state = State {
        worker,
        buffered,
        lines,
        _guard: guard,
        done: false,
    };
    futures::stream::unfold(state, move |mut s| async move {
        if s.done {
            return None;
        }
        let event = match s.buffered.pop_front() {
            Some(event) => event,
            None => {
                let failed = |problem: String| {
                    s.worker.record_failure();
                    GenerateEvent::Error {
                        code: ErrorCode::Internal,
                        message: format!("worker {} failed mid-answer: {problem}", s.worker.id),
                    }
                };
                match tokio::time::timeout(idle, s.lines.next()).await {
                    Err(_) => failed(format!("no event for {idle:?}")),
                    Ok(Err(problem)) => failed(problem.to_string()),
                    Ok(Ok(None)) => failed("the stream ended without finishing".into()),
                    Ok(Ok(Some(event))) => event,
                }
            }
        };
        s.done = matches!(
            event,
            GenerateEvent::Finished { .. } | GenerateEvent::Error { .. }
        );
        Some((event, s))
    })
    .boxed()
}
