//! The router's HTTP surface: the OpenAI API tenants call, and the probes.
//!
//! One request's path (DESIGN.md, "How one long session is served"): authenticate the tenant,
//! read a body no larger than its context calls for ([`body_limit`]), then on the preparation
//! pool ([`crate::cpu`]; a short request's microseconds of it on the async thread): parse,
//! check the model, render, tokenize (`tidelock-openai`, the same code the worker runs) and
//! hash the prompt's blocks under the tenant's cache salt; apply the tenant's limits, wait for
//! a slot in the bounded queue, then place it ([`crate::placement`]: the KV index, the
//! session's pin, the policy's order of the workers), proxy to the first worker that takes it,
//! pin the session where it landed, and stream the answer back. Every refusal is an OpenAI-shaped error with the right
//! status (`Retry-After` on 429 and 503).
//!
//! `app(state)` builds the routes without binding a port, so component tests drive it with
//! `oneshot`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tidelock_openai::{
    Answer, Continuation, Continuations, Endpoint, OnAnswer, Prepared, Rendered, error_response,
    parse, respond_then,
};
use tidelock_prompt::PromptKit;
use tidelock_protocol::openai::{ModelCard, ModelList, OpenAiError};
use tidelock_protocol::{GenerateEvent, GenerateRequest, HashChain, SessionKey, TenantId, TurnKey};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::cpu::{CpuLimits, CpuPool, CpuRefusal};

use crate::limits::{Admission, Limiter};
use crate::metrics::Metrics;
use crate::placement::{Ask, NoWorker, Placer};
use crate::policy::{CostModel, Policy};
use crate::proxy::{Proxy, ProxyConfig};
use crate::sessions::Pins;
use crate::tenants::{Tenant, Tenants};
use crate::turns::TurnLog;
use crate::workers::{Model, Models};

/// Knobs of the HTTP surface and placement.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub policy: Policy,
    pub cost: CostModel,
    /// Requests served at once; more wait in the queue.
    pub max_in_flight: usize,
    /// Requests waiting at most; beyond, 503.
    pub max_queue: usize,
    /// How long a request may wait in the queue before a 503.
    pub queue_timeout: Duration,
    /// Largest request body accepted, whatever the context (see [`body_limit`]).
    pub max_body_bytes: usize,
    /// The pool that parses, renders and tokenizes requests ([`crate::cpu`]).
    pub cpu: CpuLimits,
    /// To receive a request's whole body; then 408.
    pub body_timeout: Duration,
    /// Requests of one tenant open at once (from its key being checked to its answer's end,
    /// streams included); beyond, 429. Bounds what one tenant's clients hold, readers of
    /// streams that never end included.
    pub max_requests_per_tenant: usize,
    /// Token ids the turn memory holds at most ([`Continuations`]).
    pub turn_memory_tokens: usize,
    /// Shares the turn memory with the other router replicas through the store
    /// ([`crate::turns`]): on when the store is shared (etcd), pointless with the in-memory one.
    pub share_turns: bool,
    pub proxy: ProxyConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            policy: Policy::Ttft,
            cost: CostModel::default(),
            max_in_flight: 1024,
            max_queue: 4096,
            queue_timeout: Duration::from_secs(30),
            max_body_bytes: 32 << 20,
            cpu: CpuLimits::default(),
            body_timeout: Duration::from_secs(60),
            max_requests_per_tenant: 256,
            turn_memory_tokens: 16 << 20,
            share_turns: false,
            proxy: ProxyConfig::default(),
        }
    }
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct Shared {
    pub models: Arc<Models>,
    pub tenants: Arc<Tenants>,
    pub pins: Arc<Pins>,
    pub metrics: Metrics,
    pub settings: Settings,
    /// Sessions' last prompts and answers as ids.
    pub turns: Arc<Continuations>,
    /// The turn memory shared with the other replicas, when [`Settings::share_turns`].
    pub turn_log: Option<Arc<TurnLog>>,
    limiter: Limiter,
    cpu: CpuPool<TenantId>,
    open: Arc<Mutex<HashMap<TenantId, usize>>>,
    proxy: Proxy,
    placer: Placer,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
}

pub type AppState = Arc<Shared>;

impl Shared {
    pub fn new(
        models: Arc<Models>,
        tenants: Arc<Tenants>,
        pins: Arc<Pins>,
        settings: Settings,
    ) -> Result<AppState, prometheus::Error> {
        let proxy = Proxy::new(settings.proxy, models.http().authorization().cloned());
        let metrics = Metrics::new()?;
        let p = pins.metrics();
        metrics.register(p.reachable.clone())?;
        metrics.register(p.skipped.clone())?;
        metrics.register(p.failed.clone())?;
        let turn_log = (settings.share_turns && settings.turn_memory_tokens > 0)
            .then(|| Arc::new(TurnLog::new(pins.clone())));
        if let Some(log) = &turn_log {
            metrics.register(log.metrics().clone())?;
        }
        let placer = Placer::new(settings.policy, settings.cost, pins.clone());
        Ok(Arc::new(Shared {
            models,
            tenants,
            pins,
            metrics,
            turns: Arc::new(Continuations::new(settings.turn_memory_tokens)),
            turn_log,
            limiter: Limiter::default(),
            cpu: CpuPool::new(settings.cpu),
            open: Arc::default(),
            proxy,
            slots: Arc::new(Semaphore::new(settings.max_in_flight)),
            waiting: AtomicUsize::new(0),
            placer,
            settings,
        }))
    }

    /// Requests of `tenant` being prepared (parsed, rendered, tokenized) right now.
    pub fn cpu_running(&self, tenant: &TenantId) -> usize {
        self.cpu.tenant_running(tenant)
    }
}

/// The router's routes.
pub fn app(state: AppState) -> Router {
    let limit = state.settings.max_body_bytes;
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(|| async {
            error_response(&OpenAiError::not_found(
                "Unknown endpoint: this router serves /v1/chat/completions, /v1/completions and /v1/models.",
            ))
        })
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(tidelock_openai::require_host))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    let models = state.models.all();
    let ready: Vec<&str> = models
        .iter()
        .filter(|(_, m)| m.ready())
        .map(|(n, _)| n.as_str())
        .collect();
    if ready.is_empty() {
        let why = if models.is_empty() {
            "no worker has registered yet".to_owned()
        } else {
            "no model has a healthy worker and a tokenizer yet".to_owned()
        };
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    } else {
        format!("ready: {}\n", ready.join(", ")).into_response()
    }
}

/// `/metrics`, for the metrics listener (`--metrics-listen`): never on the public port, since
/// the metrics name every tenant and worker.
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&state.models),
    )
        .into_response()
}

/// The tenant a request's `Authorization: Bearer` key belongs to.
fn authenticate(state: &Shared, headers: &HeaderMap) -> Result<Arc<Tenant>, OpenAiError> {
    let missing = || {
        OpenAiError::unauthenticated(
            "You didn't provide an API key. Send it in the Authorization header: `Authorization: Bearer YOUR_KEY`.",
        )
    };
    let value = headers.get(header::AUTHORIZATION).ok_or_else(missing)?;
    let key = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(missing)?;
    state.tenants.authenticate(key).ok_or_else(|| {
        OpenAiError::unauthenticated("Incorrect API key provided.").with_code("invalid_api_key")
    })
}

fn model_not_found(name: &str) -> OpenAiError {
    OpenAiError::not_found(format!(
        "The model `{name}` does not exist or you do not have access to it."
    ))
    .with_code("model_not_found")
}

fn card(model: &Model) -> ModelCard {
    let mut card = ModelCard::new(model.name.as_str(), model.created, "tidelock");
    let context = model.max_context();
    card.max_model_len = (context > 0).then_some(context);
    card.sampling_defaults = model.kit().and_then(|kit| kit.sampling_defaults().shown());
    card
}

async fn models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let tenant = match authenticate(&state, &headers) {
        Ok(t) => t,
        Err(e) => return error_response(&e),
    };
    let cards = state
        .models
        .all()
        .values()
        .filter(|m| tenant.record.allows_model(&m.name) && !m.workers().is_empty())
        .map(|m| card(m))
        .collect();
    axum::Json(ModelList::new(cards)).into_response()
}

async fn model(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result = authenticate(&state, &headers).and_then(|tenant| {
        state
            .models
            .get(&id)
            .filter(|m| tenant.record.allows_model(&m.name) && !m.workers().is_empty())
            .ok_or_else(|| model_not_found(&id))
    });
    match result {
        Ok(m) => axum::Json(card(&m)).into_response(),
        Err(e) => error_response(&e),
    }
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(state, Endpoint::Chat, headers, body).await
}

async fn completions(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    serve(state, Endpoint::Completion, headers, body).await
}

/// Counts one answered request when dropped (its status known by then; a streamed answer's
/// duration is recorded when its stream ends, see [`observed`]).
struct Answered {
    state: AppState,
    tenant: String,
    model: String,
    endpoint: Endpoint,
    status: u16,
    started: Instant,
}

impl Drop for Answered {
    fn drop(&mut self) {
        let status = self.status.to_string();
        let m = &self.state.metrics;
        m.requests
            .with_label_values(&[&self.tenant, &self.model, self.endpoint.as_str(), &status])
            .inc();
    }
}

/// One request, in a span (`request`: endpoint, tenant, model, status) whose children time its
/// steps at debug level: `authenticate`, `read_body`, `render`, `tokenize` (which hashes the
/// blocks too), `admit`, `queue`, `placement` (with its reason; the KV index walk inside it is
/// `index_lookup`) and `proxy` (to the first token).
async fn serve(state: AppState, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let span = tracing::info_span!(
        "request",
        endpoint = endpoint.as_str(),
        tenant = tracing::field::Empty,
        model = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    serve_in(state, endpoint, headers, body)
        .instrument(span)
        .await
}

async fn serve_in(state: AppState, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let mut answered = Answered {
        state: state.clone(),
        tenant: String::new(),
        model: String::new(),
        endpoint,
        status: 200,
        started: Instant::now(),
    };
    let response = match place(&state, endpoint, &headers, body, &mut answered).await {
        Ok(response) => {
            answered.status = response.status().as_u16();
            response
        }
        Err(refusal) => {
            answered.status = refusal.error.status;
            refusal.into_response()
        }
    };
    tracing::Span::current().record("status", answered.status);
    response
}

/// An error answer, with the time to wait before retrying when waiting helps.
struct Refusal {
    error: OpenAiError,
    retry_after: Option<Duration>,
}

impl From<OpenAiError> for Refusal {
    fn from(error: OpenAiError) -> Self {
        let retry_after = (error.status == 503).then_some(Duration::from_secs(1));
        Refusal { error, retry_after }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = error_response(&self.error);
        if let Some(wait) = self.retry_after {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

/// The session key, by the rule both the router and the worker apply
/// ([`tidelock_protocol::openai::CommonFields::session_key`]).
fn session_key(
    common: &tidelock_protocol::openai::CommonFields,
    headers: &HeaderMap,
) -> Result<Option<SessionKey>, OpenAiError> {
    common.session_key(
        headers
            .get(tidelock_protocol::openai::SESSION_HEADER)
            .map(|v| v.as_bytes()),
    )
}

/// A slot among the requests served at once, waiting in the bounded queue for it.
async fn slot(state: &Shared) -> Result<OwnedSemaphorePermit, Refusal> {
    if let Ok(permit) = state.slots.clone().try_acquire_owned() {
        return Ok(permit);
    }
    if state.waiting.fetch_add(1, Ordering::Relaxed) >= state.settings.max_queue {
        state.waiting.fetch_sub(1, Ordering::Relaxed);
        return Err(Refusal {
            error: OpenAiError::unavailable("The router's queue is full; retry shortly.")
                .with_code("queue_full"),
            retry_after: Some(Duration::from_secs(1)),
        });
    }
    // Counted out when the wait ends, or when the client leaves and the wait is dropped.
    struct Waiting<'s>(&'s Shared);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.waiting.fetch_sub(1, Ordering::Relaxed);
            self.0.metrics.queued.dec();
        }
    }
    state.metrics.queued.inc();
    let waiting = Waiting(state);
    let waited = tokio::time::timeout(
        state.settings.queue_timeout,
        state.slots.clone().acquire_owned(),
    )
    .await;
    drop(waiting);
    match waited {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(Refusal {
            error: OpenAiError::unavailable(format!(
                "The request waited {:?} in the router's queue without a slot; retry shortly.",
                state.settings.queue_timeout
            ))
            .with_code("queue_timeout"),
            retry_after: Some(Duration::from_secs(1)),
        }),
    }
}

/// One of a tenant's open requests, from its key being checked to the end of its answer.
struct Open {
    counts: Arc<Mutex<HashMap<TenantId, usize>>>,
    tenant: TenantId,
}

impl Drop for Open {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.tenant);
            }
        }
    }
}

/// Counts a request of `tenant` open, or refuses it (429) when the tenant has
/// `--max-requests-per-tenant` open already.
fn open(state: &Shared, tenant: &TenantId) -> Result<Open, Refusal> {
    let limit = state.settings.max_requests_per_tenant;
    let mut counts = state.open.lock().unwrap_or_else(|e| e.into_inner());
    let n = counts.entry(tenant.clone()).or_insert(0);
    if *n >= limit {
        state
            .metrics
            .limited
            .with_label_values(&[tenant.as_str(), "max_requests_per_tenant"])
            .inc();
        return Err(Refusal {
            error: OpenAiError::rate_limited(format!(
                "Your requests open at this router have reached its limit ({limit}); retry when one ends."
            ))
            .with_code("too_many_requests"),
            retry_after: Some(Duration::from_secs(1)),
        });
    }
    *n += 1;
    Ok(Open {
        counts: state.open.clone(),
        tenant: tenant.clone(),
    })
}

/// Bytes of request body allowed per token of context. A prompt near the context's end as text
/// takes 4 to 6 bytes a token in English, up to about 12 as JSON-escaped CJK or emoji; as ids in
/// JSON, up to 8 (`123456, `). 32 leaves room for any real prompt while bounding what an abusive
/// one makes the router parse.
pub const BODY_BYTES_PER_TOKEN: u64 = 32;

/// Bytes of body allowed beyond the context's share: the request's other fields.
pub const BODY_SLACK_BYTES: u64 = 64 << 10;

/// Memory reserved in the [`CpuPool`] per byte of body while it is parsed and its template
/// rendered (serde's values, the guarded rendering's two renderings).
pub const PARSE_RESERVE_PER_BYTE: u64 = 16;

/// Memory reserved per byte of text a tokenizer holds at once. Measured with the default model's
/// tokenizer (`crates/prompt/examples/tokenizer_memory.rs`): 106 bytes per byte of English, 202
/// for `"a a a ..."`, 344 for digits (one token each); a token is at least one byte, and costs
/// about 350 bytes while the tokenizer runs.
pub const TOKENIZE_RESERVE_PER_BYTE: u64 = 512;

/// What tokenizing `text` bytes may allocate: the tokenizer's working memory (for the whole text,
/// or for one piece when the kit encodes long texts in pieces: `tidelock_prompt::chunked`) and
/// the ids made (at most one per byte and no more than the context, 4 bytes each, doubled for a
/// growing vector).
pub fn tokenize_reserve(text: usize, in_pieces: bool, context: u64) -> u64 {
    let held = if in_pieces {
        text.min(tidelock_prompt::MAX_PIECE_BYTES)
    } else {
        text
    } as u64;
    let ids = (text as u64).min(context);
    held.saturating_mul(TOKENIZE_RESERVE_PER_BYTE)
        .saturating_add(ids.saturating_mul(8))
        .saturating_add(BODY_SLACK_BYTES)
}

/// The largest body `tenant` may send: [`BODY_BYTES_PER_TOKEN`] per token of the longest context
/// it may use (its models', capped by its own limit) plus [`BODY_SLACK_BYTES`], and never more
/// than `--max-body`. Checked before the body is read, let alone parsed.
pub fn body_limit(state: &Shared, tenant: &Tenant) -> usize {
    let models = state.models.all();
    let longest = models
        .values()
        .filter(|m| tenant.record.allows_model(&m.name))
        .map(|m| m.max_context())
        .max()
        .unwrap_or(0);
    let context = tenant
        .record
        .limits
        .max_context_tokens
        .map_or(longest, |t| t.min(longest));
    let max = state.settings.max_body_bytes;
    if context == 0 {
        // No worker has said its context yet: the request fails later with a 503 that says so.
        return max;
    }
    let derived = context
        .saturating_mul(BODY_BYTES_PER_TOKEN)
        .saturating_add(BODY_SLACK_BYTES);
    usize::try_from(derived).unwrap_or(usize::MAX).min(max)
}

/// Reads a request body of at most `limit` bytes within `timeout`: a 413 naming the limit when
/// it is larger, a 408 when it is too slow.
async fn read_body(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, OpenAiError> {
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| {
            OpenAiError {
                status: 408,
                ..OpenAiError::bad_request(format!(
                    "The request body did not arrive within {} s.",
                    timeout.as_secs_f64()
                ))
            }
            .with_code("request_timeout")
        })?;
    read.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            OpenAiError {
                status: 413,
                ..OpenAiError::bad_request(format!(
                    "The request body is larger than this router accepts for your models' context ({limit} bytes)."
                ))
            }
            .with_code("request_too_large")
        } else {
            OpenAiError::bad_request(format!("The request body could not be read: {e}"))
        }
    })
}

fn too_large_to_prepare(refusal: CpuRefusal, what: &str, per_byte: u64) -> OpenAiError {
    let CpuRefusal::TooLarge { limit, .. } = refusal else {
        return OpenAiError::unavailable(format!("{refusal}; retry on another replica."));
    };
    OpenAiError {
        status: 413,
        ..OpenAiError::bad_request(format!(
            "The request's {what} is larger than this router prepares at once ({} bytes; its \
             --prepare-memory allows {limit} bytes at {per_byte} bytes of memory a byte).",
            limit / per_byte
        ))
    }
    .with_code("request_too_large")
}

/// What the first preparation job finds: the request rendered for its model.
struct ForModel {
    rendered: Rendered,
    model: Arc<Model>,
    kit: Arc<PromptKit>,
}

/// Parses `body` and renders its prompt with its model's template (on the pool).
fn render(
    state: &Shared,
    tenant: &Tenant,
    endpoint: Endpoint,
    body: &[u8],
) -> Result<ForModel, OpenAiError> {
    let parsed = parse(endpoint, body)?;
    let model = state
        .models
        .get(parsed.model())
        .filter(|m| tenant.record.allows_model(&m.name))
        .ok_or_else(|| model_not_found(parsed.model()))?;
    let kit = model.kit().ok_or_else(|| {
        OpenAiError::unavailable(format!(
            "The model `{}` is starting: no worker has served its tokenizer yet.",
            model.name
        ))
    })?;
    let rendered = parsed.render(&kit)?;
    Ok(ForModel {
        rendered,
        model,
        kit,
    })
}

/// Tokenizes the rendered prompt after the session's remembered turn and hashes its blocks
/// under the tenant's salt (on the pool).
fn tokenize(
    rendered: Rendered,
    kit: &PromptKit,
    context: u64,
    previous: Option<&Continuation>,
    model: &Model,
    tenant: &Tenant,
) -> Result<(Prepared, HashChain), OpenAiError> {
    let tenant_context = tenant.record.limits.max_context_tokens;
    let prepared = rendered.tokenize(kit, context, previous).map_err(|e| {
        if tenant_context.is_some_and(|t| t < model.max_context())
            && e.code.as_deref() == Some("context_length_exceeded")
        {
            OpenAiError::invalid(
                e.param.clone().unwrap_or_default(),
                format!("{} (your tenant's limit is {context} tokens)", e.message),
            )
            .with_code("context_length_exceeded")
        } else {
            e
        }
    })?;
    let mut chain = HashChain::new(&model.name, &tenant.record.cache_salt, model.block_tokens);
    chain.extend(&prepared.tokens);
    Ok((prepared, chain))
}

async fn place(
    state: &AppState,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
    answered: &mut Answered,
) -> Result<Response, Refusal> {
    let tenant = tracing::debug_span!("authenticate").in_scope(|| authenticate(state, headers))?;
    answered.tenant = tenant.id.to_string();
    tracing::Span::current().record("tenant", tenant.id.as_str());
    let open = open(state, &tenant.id)?;
    // Only an authenticated tenant's body is read, and only as much of it as its context needs.
    let body = read_body(
        body,
        body_limit(state, &tenant),
        state.settings.body_timeout,
    )
    .instrument(tracing::debug_span!("read_body"))
    .await?;
    let reserve = (body.len() as u64).saturating_mul(PARSE_RESERVE_PER_BYTE);
    let (for_model, _) = {
        let (job_state, job_tenant) = (state.clone(), tenant.clone());
        state
            .cpu
            .run(&tenant.id, reserve, move || {
                render(&job_state, &job_tenant, endpoint, &body)
            })
            .instrument(tracing::debug_span!("render"))
            .await
            .map_err(|r| too_large_to_prepare(r, "body", PARSE_RESERVE_PER_BYTE))?
    };
    let ForModel {
        rendered,
        model,
        kit,
    } = for_model?;
    answered.model = model.name.to_string();
    tracing::Span::current().record("model", model.name.as_str());
    let model_context = model.max_context();
    if model_context == 0 {
        return Err(OpenAiError::unavailable(format!(
            "The model `{}` has no worker ready.",
            model.name
        ))
        .into());
    }
    let tenant_context = tenant.record.limits.max_context_tokens;
    let context = tenant_context.map_or(model_context, |t| t.min(model_context));
    let session = session_key(rendered.parsed().common(), headers)?;
    // The turn memory's key, the session's turn log: the ids are the model's, never cross
    // tenants, and a chat's are not a completion's (a text completion's tokenization may add
    // BOS; a chat's never does).
    let turn_key = session.as_ref().map(|s| TurnKey {
        model: model.name.clone(),
        tenant: tenant.id.clone(),
        endpoint: endpoint.as_str(),
        session: s.clone(),
    });
    let previous = turn_key
        .as_ref()
        .and_then(|k| state.turns.get(k))
        .filter(|p| rendered.continues(p));
    // Unless nobody answered the session since this replica's memory (or it has none), the log
    // the replicas share continues the prompt further (this replica's memory serves when
    // nothing in the log fits).
    let mut shared = Vec::new();
    if let (Some(log), Some(key)) = (&state.turn_log, &turn_key)
        && rendered.is_text()
    {
        shared = log.newer(key, previous.as_ref().map(|p| p.turns())).await;
    }
    // What is left to tokenize (no second digest of the text: `continues` checked it); a
    // rebuild from the log tokenizes the text between the answers, about all of it.
    let text = rendered.bytes_to_tokenize(None)
        - previous
            .as_ref()
            .filter(|_| shared.is_empty())
            .map_or(0, |p| p.text_len());
    let in_pieces = kit.encodes_in_pieces(rendered.adds_special());
    let reserve = tokenize_reserve(text, in_pieces, context);
    let (tokenized, _) = {
        let (kit, model, job_tenant) = (kit.clone(), model.clone(), tenant.clone());
        state
            .cpu
            .run(&tenant.id, reserve, move || {
                let rebuilt = rendered.rebuild(&shared, &kit).map(Arc::new);
                let previous = rebuilt.clone().or(previous);
                let tokenized = tokenize(
                    rendered,
                    &kit,
                    context,
                    previous.as_deref(),
                    &model,
                    &job_tenant,
                );
                (tokenized, (!shared.is_empty()).then_some(rebuilt.is_some()))
            })
            .instrument(tracing::debug_span!("tokenize"))
            .await
            .map_err(|r| too_large_to_prepare(r, "text", TOKENIZE_RESERVE_PER_BYTE))?
    };
    let (tokenized, rebuilt) = tokenized;
    if let (Some(log), Some(rebuilt)) = (&state.turn_log, rebuilt) {
        log.count(if rebuilt { "rebuilt" } else { "missed" });
    }
    let (mut prepared, chain) = tokenized?;
    let cost = prepared.tokens.len() as u64
        + u64::from(prepared.sampling.max_tokens) * u64::from(prepared.sampling.n.max(1));
    let admission = tracing::debug_span!("admit").in_scope(|| admit(state, &tenant, cost))?;
    if prepared.continued > 0 {
        state
            .metrics
            .continued_tokens
            .with_label_values(&[model.name.as_str()])
            .inc_by(prepared.continued as u64);
    }
    let permit = slot(state)
        .instrument(tracing::debug_span!("queue"))
        .await?;
    // The answer needs only the prompt's length (already in the cost), not its tokens: move
    // them into the worker request rather than copying a possibly million-token prompt. After
    // placement they move on to the turn memory's callback (when the session has one), which
    // keeps them until the answer ends.
    let mut request = GenerateRequest {
        request_id: Some(prepared.meta.id.clone()),
        session: session.clone(),
        // The tenant's secret (shared only with the tenants that opt into sharing).
        cache_salt: tenant.record.cache_salt.clone(),
        tokens: std::mem::take(&mut prepared.tokens),
        sampling: prepared.sampling.clone(),
        pull: None,
    };
    let ask = Ask {
        model: &model,
        tenant: &tenant.id,
        session: session.as_ref(),
        chain: &chain,
        prompt_tokens: request.tokens.len(),
    };
    let started = route(state, &ask, &mut request).await?;
    // Remember this prompt and its answer for the session's next turn.
    let on_answer = match (turn_key, prepared.text.take()) {
        (Some(key), Some(text)) if state.settings.turn_memory_tokens > 0 => {
            let (state, kit, ids) = (state.clone(), kit.clone(), request.tokens);
            Some(Box::new(move |answer: Answer| {
                let Some(next) = text.then(ids, &answer, &kit) else {
                    return Box::pin(async {}) as BoxFuture<'static, ()>;
                };
                let written = match &state.turn_log {
                    Some(log) => log.write(&key, &next),
                    None => Box::pin(async {}),
                };
                state.turns.put(key, next);
                written
            }) as OnAnswer)
        }
        _ => None,
    };
    let ttft = started.first_token.duration_since(answered.started);
    state
        .metrics
        .ttft
        .with_label_values(&[model.name.as_str()])
        .observe(ttft.as_secs_f64());
    let events = observed(
        state.clone(),
        &model,
        &tenant.id,
        started.events,
        (answered.started, started.first_token),
        (admission, permit, open),
    );
    Ok(respond_then(prepared, kit, events, on_answer).await)
}

fn admit(state: &Shared, tenant: &Tenant, cost: u64) -> Result<Admission, Refusal> {
    state
        .limiter
        .admit(&tenant.id, &tenant.record.limits, cost, Instant::now())
        .map_err(|exceeded| {
            state
                .metrics
                .limited
                .with_label_values(&[tenant.id.as_str(), exceeded.as_str()])
                .inc();
            let error = match exceeded.retry_after() {
                Some(_) => {
                    OpenAiError::rate_limited(exceeded.to_string()).with_code("rate_limit_exceeded")
                }
                None => OpenAiError::invalid("max_tokens", exceeded.to_string())
                    .with_code("rate_limit_exceeded"),
            };
            Refusal {
                error,
                retry_after: exceeded.retry_after(),
            }
        })
}

/// Places the request and starts it on a worker; pins the session where it landed.
async fn route(
    state: &AppState,
    ask: &Ask<'_>,
    request: &mut GenerateRequest,
) -> Result<crate::proxy::Started, Refusal> {
    let mut placement = state
        .placer
        .place(ask, &state.metrics)
        .await
        .map_err(|NoWorker| {
            OpenAiError::unavailable(format!(
                "No healthy worker serves `{}` right now.",
                ask.model.name
            ))
        })?;
    request.pull = placement.pull.clone();
    let order = std::mem::take(&mut placement.order);
    let started = state
        .proxy
        .start(order, &*request, placement.may_pull, &placement.blocks)
        .instrument(tracing::debug_span!("proxy"))
        .await?;
    // Counted from zero once a model is served (a series that only appears with the first
    // retry leaves dashboards and alerts blind until then).
    state
        .metrics
        .retries
        .with_label_values(&[ask.model.name.as_str()])
        .inc_by(started.failed.len() as u64);
    placement.landed(&started.worker);
    Ok(started)
}

/// The worker's events on their way to the client: counted into metrics (the request's whole
/// duration included, streamed or not); the tenant's token charge settled and the queue slot
/// released when the answer ends (or the client leaves), and the tenant's open request with it.
fn observed(
    state: AppState,
    model: &Model,
    tenant: &tidelock_protocol::TenantId,
    events: BoxStream<'static, GenerateEvent>,
    (arrived, first_token): (Instant, Instant),
    (admission, permit, open): (Admission, OwnedSemaphorePermit, Open),
) -> BoxStream<'static, GenerateEvent> {
    struct Tally {
        state: AppState,
        labels: [String; 2],
        arrived: Instant,
        first_token: Instant,
        usage: tidelock_protocol::Usage,
        admission: Admission,
        _held: (OwnedSemaphorePermit, Open),
    }
    impl Drop for Tally {
        fn drop(&mut self) {
            let m = &self.state.metrics;
            let labels = [self.labels[0].as_str(), self.labels[1].as_str()];
            let u = self.usage;
            m.prompt_tokens
                .with_label_values(&labels)
                .inc_by(u64::from(u.prompt_tokens));
            m.cached_tokens
                .with_label_values(&labels)
                .inc_by(u64::from(u.cached_tokens));
            m.completion_tokens
                .with_label_values(&labels)
                .inc_by(u64::from(u.completion_tokens));
            if u.completion_tokens > 1 {
                let per =
                    self.first_token.elapsed().as_secs_f64() / f64::from(u.completion_tokens - 1);
                m.time_per_output_token
                    .with_label_values(&[labels[1]])
                    .observe(per);
            }
            self.admission
                .settle(u64::from(u.prompt_tokens) + u64::from(u.completion_tokens));
            m.duration
                .with_label_values(&[labels[1]])
                .observe(self.arrived.elapsed().as_secs_f64());
            m.in_flight.dec();
        }
    }
    state.metrics.in_flight.inc();
    let tally = Tally {
        labels: [tenant.to_string(), model.name.to_string()],
        state,
        arrived,
        first_token,
        usage: tidelock_protocol::Usage::default(),
        admission,
        _held: (permit, open),
    };
    events
        .scan(tally, |tally, event| {
            tally.usage.record(&event);
            futures::future::ready(Some(event))
        })
        .boxed()
}
