//! The worker API through its real router (`app(state)`), with the simulated engine: generation
//! streams with exact usage, the KV event stream and snapshot mirror the prefix cache, and bad
//! requests get OpenAI-shaped errors.

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::StreamExt;
use support::{post_json, send};
use tidelock_protocol::{
    Epoch, GenerateEvent, KvEvent, KvEventBatch, KvSnapshot, LoadReport, WorkerInfo,
};
use tidelock_worker::server::{AppState, app};
use tidelock_worker::testing::SimWorker;
use tower::ServiceExt;

const BLOCK: u32 = 16;
const VOCAB: usize = 1000;

fn started() -> AppState {
    SimWorker {
        blocks: 64,
        epoch: Epoch::new(42),
        max_step_tokens: 256,
        vocab_size: VOCAB,
        eos_token_ids: vec![2],
        ..SimWorker::new(BLOCK)
    }
    .start()
}

async fn get(state: &AppState, uri: &str) -> (StatusCode, Vec<u8>) {
    send(state, Request::get(uri).body(Body::empty()).unwrap()).await
}

async fn generate(state: &AppState, body: serde_json::Value) -> (StatusCode, Vec<GenerateEvent>) {
    let (status, body) = post_json(state, "/v1/generate", body).await;
    let events = body
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_slice(l)
                .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(l)))
        })
        .collect();
    (status, events)
}

fn request(tokens: &[u32], max_tokens: u32) -> serde_json::Value {
    serde_json::json!({
        "cache_salt": "tenant-a",
        "tokens": tokens,
        "sampling": {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": true},
        "some_future_field": true
    })
}

fn finished(events: &[GenerateEvent]) -> (Vec<u32>, tidelock_protocol::Usage) {
    let mut ids = Vec::new();
    for e in events {
        match e {
            GenerateEvent::Tokens { ids: t, .. } => ids.extend(t),
            GenerateEvent::Finished { usage, .. } => return (ids, *usage),
            GenerateEvent::Prefilled { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("no finished event in {events:?}");
}

/// The internal API takes the complete sampling fields: stop token ids end an answer without
/// returning the id, several answers come back under their `choice` with one `Ended` each, and
/// token ids outside the vocabulary are refused by name.
#[tokio::test]
async fn the_internal_api_takes_stop_ids_and_several_answers() {
    let state = started();
    let prompt: Vec<u32> = (300..340).collect();
    let (_, events) = generate(&state, request(&prompt, 12)).await;
    let (plain, _) = finished(&events);
    let k = (1..plain.len())
        .find(|&k| !plain[..k].contains(&plain[k]))
        .expect("a new token");
    let mut body = request(&prompt, 12);
    body["sampling"]["stop_token_ids"] = serde_json::json!([plain[k]]);
    let (status, events) = generate(&state, body).await;
    assert_eq!(status, StatusCode::OK);
    let (cut, usage) = finished(&events);
    assert_eq!(cut, plain[..k]);
    assert!(matches!(
        events.last(),
        Some(GenerateEvent::Finished {
            reason: tidelock_protocol::FinishReason::Stop,
            ..
        })
    ));
    assert_eq!(
        usage.completion_tokens as usize,
        k + 1,
        "the stop id counts as generated"
    );

    let mut body = request(&prompt, 5);
    body["sampling"]["n"] = serde_json::json!(3);
    body["sampling"]["temperature"] = serde_json::json!(1.0);
    body["sampling"]["seed"] = serde_json::json!(9);
    let (status, events) = generate(&state, body).await;
    assert_eq!(status, StatusCode::OK);
    let mut per_choice = [0usize; 3];
    let mut ended = Vec::new();
    for e in &events {
        match e {
            GenerateEvent::Tokens { ids, choice, .. } => per_choice[*choice as usize] += ids.len(),
            GenerateEvent::Ended { choice, .. } => ended.push(*choice),
            _ => {}
        }
    }
    ended.sort_unstable();
    assert_eq!((per_choice, ended), ([5, 5, 5], vec![0, 1, 2]));
    match events.last() {
        Some(GenerateEvent::Finished { usage, .. }) => assert_eq!(usage.completion_tokens, 15),
        other => panic!("{other:?}"),
    }

    for (field, value) in [
        ("stop_token_ids", serde_json::json!([VOCAB])),
        ("logit_bias", serde_json::json!({ VOCAB.to_string(): 1 })),
    ] {
        let mut body = request(&prompt, 5);
        body["sampling"][field] = value;
        let (_, events) = generate(&state, body).await;
        match &events[..] {
            [GenerateEvent::Error { message, .. }] => {
                assert!(
                    message.contains(&format!("{VOCAB} is outside")),
                    "{message}"
                )
            }
            other => panic!("{field}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn probes_info_and_tokenizer() {
    let state = started();
    assert_eq!(get(&state, "/healthz").await.0, StatusCode::OK);
    assert_eq!(get(&state, "/readyz").await.0, StatusCode::OK);
    let (status, body) = get(&state, "/v1/info").await;
    assert_eq!(status, StatusCode::OK);
    let info: WorkerInfo = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (info.model.as_str(), info.epoch, info.kv_capacity_blocks),
        ("sim", Epoch::new(42), 64)
    );
    let (_, body) = get(&state, "/v1/tokenizer").await;
    assert_eq!(body, b"{\"tokenizer\": {}}");
    let (_, body) = get(&state, "/v1/load").await;
    let load: LoadReport = serde_json::from_slice(&body).unwrap();
    assert_eq!(load.kv_total_blocks, 64);
}

#[tokio::test]
async fn generation_streams_and_reports_cached_tokens() {
    let state = started();
    let prompt: Vec<u32> = (100..150).collect();
    let (status, events) = generate(&state, request(&prompt, 10)).await;
    assert_eq!(status, StatusCode::OK);
    let (first, usage) = finished(&events);
    assert_eq!(first.len(), 10);
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.completion_tokens
        ),
        (50, 0, 10)
    );
    let (_, events) = generate(&state, request(&prompt, 10)).await;
    let (again, usage) = finished(&events);
    assert_eq!(again, first);
    assert_eq!(
        usage.cached_tokens, 48,
        "three full blocks of the 50-token prompt"
    );

    let (_, body) = get(&state, "/metrics").await;
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains("tidelock_worker_requests_total{outcome=\"finished\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("tidelock_worker_prefix_hit_tokens_total 48"),
        "{text}"
    );
}

#[tokio::test]
async fn kv_events_and_snapshot_mirror_the_cache() {
    let state = started();
    let prompt: Vec<u32> = (200..240).collect();
    generate(&state, request(&prompt, 4)).await;
    let (status, body) = get(&state, "/v1/kv/snapshot").await;
    assert_eq!(status, StatusCode::OK);
    let snapshot: KvSnapshot = serde_json::from_slice(&body).unwrap();
    assert_eq!(snapshot.epoch, Epoch::new(42));
    // 40 prompt + 4 generated tokens, 43 computed: two full blocks.
    assert_eq!(snapshot.blocks.len(), 2);
    assert!(snapshot.sequence >= 1);

    // The stream from the start replays the same blocks, then stays open for more.
    let response = app(state.clone())
        .oneshot(
            Request::get("/v1/kv/events?after=0")
                .header("host", "worker")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body().into_data_stream();
    let chunk = tokio::time::timeout(std::time::Duration::from_secs(5), body.next())
        .await
        .expect("a batch")
        .expect("stream open")
        .unwrap();
    let batch: KvEventBatch =
        serde_json::from_slice(chunk.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert_eq!((batch.epoch, batch.sequence), (Epoch::new(42), 1));
    let stored: Vec<_> = batch
        .events
        .iter()
        .flat_map(|e| match e {
            KvEvent::Stored { blocks, .. } => blocks.clone(),
            _ => vec![],
        })
        .collect();
    let snapshot_hashes: Vec<_> = snapshot.blocks.iter().map(|b| b.hash).collect();
    assert!(stored.iter().all(|h| snapshot_hashes.contains(h)));

    // Another epoch's position is meaningless here: resync.
    let (status, body) = get(&state, "/v1/kv/events?after=3&epoch=7").await;
    assert_eq!(status, StatusCode::GONE);
    assert!(String::from_utf8_lossy(&body).contains("snapshot"));
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let state = started();
    let response = app(state.clone())
        .oneshot(
            Request::post("/v1/generate")
                .header("host", "worker")
                .header("content-type", "application/json")
                .body(Body::from("{\"tokens\": [1, 2]}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cache_salt"),
        "{error}"
    );

    let (status, events) = generate(&state, request(&[5000], 4)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        matches!(&events[..], [GenerateEvent::Error { message, .. }] if message.contains("vocabulary")),
        "{events:?}"
    );
}

#[tokio::test]
async fn http_1_1_requests_without_host_are_refused() {
    let state = started();
    let send = |version: axum::http::Version| {
        let request = Request::get("/v1/info")
            .version(version)
            .body(Body::empty())
            .unwrap();
        app(state.clone()).oneshot(request)
    };
    let refused = send(axum::http::Version::HTTP_11).await.unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let body = axum::body::to_bytes(refused.into_body(), usize::MAX)
        .await
        .unwrap();
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["code"], "missing_host", "{error}");
    assert_eq!(
        send(axum::http::Version::HTTP_10).await.unwrap().status(),
        StatusCode::OK
    );
}

/// A prompt as long as the worker's context fits its `/v1/generate` body (axum's 2 MB default
/// refused about 350,000 tokens); a body beyond even that is a 413, not a hang or a 500.
#[tokio::test]
async fn generate_takes_a_body_as_long_as_the_context() {
    let state = SimWorker {
        max_context: 700_000,
        vocab_size: VOCAB,
        ..SimWorker::new(BLOCK)
    }
    .start();
    let limit = tidelock_worker::server::generate_body_limit(&state.info);
    assert!(limit >= 700_000 * 11, "{limit}");
    // 600,000 ids of 3 digits: 2.4 MB of JSON, over the old limit.
    let tokens: Vec<u32> = (0..600_000).map(|i| 100 + (i % 800)).collect();
    let body = request(&tokens, 1);
    assert!(body.to_string().len() > 2 << 20);
    let (status, events) = generate(&state, body).await;
    assert_eq!(status, StatusCode::OK);
    let last = events.last().expect("an answer from the engine");
    assert!(
        matches!(
            last,
            GenerateEvent::Finished { .. } | GenerateEvent::Error { .. }
        ),
        "{last:?}"
    );
    let huge = format!(
        r#"{{"cache_salt":"","tokens":[{}1]}}"#,
        "1,".repeat(limit / 2 + 1)
    );
    let (status, _) = send(
        &state,
        Request::post("/v1/generate")
            .header("content-type", "application/json")
            .body(Body::from(huge))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

/// The binary form routers send (`GENERATE_BINARY_CONTENT_TYPE`: 4 bytes an id) gives the same
/// answer as JSON; a damaged one is a 400 that says what is wrong.
#[tokio::test]
async fn generate_takes_the_binary_form_like_json() {
    let state = started();
    let tokens: Vec<u32> = (0..100).map(|i| 100 + i).collect();
    let (status, events) = generate(&state, request(&tokens, 6)).await;
    assert_eq!(status, StatusCode::OK);
    let (json_ids, json_usage) = finished(&events);
    let binary = tidelock_protocol::GenerateRequest {
        request_id: None,
        session: None,
        cache_salt: tidelock_protocol::CacheSalt::new("tenant-b").unwrap(),
        tokens: tokens.clone(),
        sampling: serde_json::from_value(
            serde_json::json!({"temperature": 0, "max_tokens": 6, "ignore_eos": true}),
        )
        .unwrap(),
        pull: None,
    }
    .to_binary();
    let post = |body: Vec<u8>| {
        Request::post("/v1/generate")
            .header(
                "content-type",
                tidelock_protocol::GENERATE_BINARY_CONTENT_TYPE,
            )
            .body(Body::from(body))
            .unwrap()
    };
    let (status, body) = send(&state, post(binary.clone())).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let events: Vec<GenerateEvent> = body
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let (ids, usage) = finished(&events);
    assert_eq!(ids, json_ids);
    assert_eq!(usage.prompt_tokens, json_usage.prompt_tokens);
    let (status, body) = send(&state, post(binary[..binary.len() - 2].to_vec())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        String::from_utf8_lossy(&body).contains("whole number of 4-byte ids"),
        "{}",
        String::from_utf8_lossy(&body)
    );
}
