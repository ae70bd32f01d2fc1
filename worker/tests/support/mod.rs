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

/// An engine on `model` that can constrain its output (structured outputs, required tool
/// calls): the token trie of `kit`'s vocabulary, the model's stop ids as its end tokens, 16-token
/// blocks, `blocks` of them.
pub fn constrained_engine(
    model: std::sync::Arc<tidelock_worker::model::Llama>,
    kit: &std::sync::Arc<tidelock_prompt::PromptKit>,
    blocks: usize,
) -> tidelock_worker::engine::Engine<tidelock_worker::engine::executor::ModelExecutor> {
    use tidelock_protocol::{BlockTokens, Epoch, ModelName};
    use tidelock_worker::engine::{Engine, EngineConfig, executor::ModelExecutor, grammar};
    use tidelock_worker::kv::{KvStore, pool::BlockPool};
    let vocab = model.config().vocab_size;
    let grammars = grammar::Grammars::new(kit.clone(), vocab).expect("grammars");
    let cfg = EngineConfig {
        model: ModelName::new("smollm2").unwrap(),
        block_tokens: BlockTokens::new(16).unwrap(),
        max_step_tokens: 512,
        max_running: 16,
        max_waiting: 64,
        max_context: 4096,
        vocab_size: vocab,
        eos_token_ids: kit.stop_token_ids().to_vec(),
    };
    let kv = KvStore::new(model.kv_shape(16), blocks);
    let pool = BlockPool::new(blocks, cfg.block_tokens, Epoch::new(1));
    Engine::new(cfg, pool, ModelExecutor { model, kv }).with_grammars(Some(grammars))
}

/// One answer's ids and why it ended.
pub type AnswerIds = (Vec<u32>, tidelock_protocol::FinishReason);

/// Runs `request` on `engine` to the end: each answer's ids and finish reason (by `choice`), or
/// the error the engine answered.
pub fn run_answers(
    engine: &mut tidelock_worker::engine::Engine<tidelock_worker::engine::executor::ModelExecutor>,
    request: tidelock_protocol::GenerateRequest,
) -> Result<Vec<AnswerIds>, (tidelock_protocol::ErrorCode, String)> {
    use tidelock_protocol::{FinishReason, GenerateEvent};
    let n = request.sampling.n.max(1) as usize;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    engine.submit(request, tx);
    while !engine.is_idle() {
        engine.step().expect("step");
    }
    let mut out = vec![(Vec::new(), FinishReason::Cancelled); n];
    while let Ok(event) = rx.try_recv() {
        match event {
            GenerateEvent::Tokens { ids, choice, .. } => out[choice as usize].0.extend(ids),
            GenerateEvent::Ended { choice, reason, .. } => out[choice as usize].1 = reason,
            GenerateEvent::Finished { reason, .. } if n == 1 => out[0].1 = reason,
            GenerateEvent::Error { code, message } => return Err((code, message)),
            _ => {}
        }
    }
    Ok(out)
}
