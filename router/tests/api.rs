//! The router's OpenAI API end to end in-process: `app(state).oneshot()` against simulated
//! workers on loopback (real HTTP between router and workers, the default model's tokenizer and
//! chat template fetched from them). Covers the answers' shapes (JSON and SSE), session caching
//! and pins, tenant isolation and limits, every class of bad input, retries, ejection, the queue
//! and cancellation.

mod support;

use std::time::Duration;

use axum::body::Body;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use support::cluster::{KEY_A, KEY_B, MODEL, cluster, put_tenant, tenant_record};
use tidelock_protocol::{
    CacheSalt, ModelName, SessionKey, SessionRecord, TenantId, TenantLimits, TenantRecord,
};
use tidelock_router::app::Settings;
use tidelock_router::policy::Policy;
use tidelock_state::StateStore;
use tidelock_worker::testing::{FORGED_ROLES, plain_token_count};

fn chat(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4})
}

/// A user message of about `words` tokens.
fn long_text(words: usize, seed: usize) -> String {
    (0..words)
        .map(|i| format!("w{}", (i * 7 + seed) % 997))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The second turn of session `key`: `first`, the answer `a` gave, and a question.
fn second_turn(first: &str, a: &Value, key: &str) -> Value {
    json!({
        "model": MODEL,
        "prompt_cache_key": key,
        "max_tokens": 4,
        "messages": [
            {"role": "user", "content": first},
            {"role": "assistant", "content": a["choices"][0]["message"]["content"]},
            {"role": "user", "content": "And then?"},
        ],
    })
}

fn usage(body: &Value) -> (u64, u64, u64) {
    let u = &body["usage"];
    (
        u["prompt_tokens"].as_u64().unwrap(),
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    )
}

/// A sim worker slow enough (5 ms a step) that an endless answer is still streaming while a test
/// acts on it.
fn slow(w: &mut tidelock_worker::testing::SimWorker) {
    w.timing.step = Duration::from_millis(5);
    w.max_context = 1 << 20;
}

/// Starts an endless streamed completion and reads its first chunk; returns the open body.
async fn open_endless_stream(c: &support::cluster::Cluster) -> Body {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let req = json!({"model": MODEL, "prompt": [17, 18], "max_tokens": 100_000, "ignore_eos": true, "stream": true});
    let request = hyper::Request::post("/v1/completions")
        .header("host", "router")
        .header("authorization", format!("Bearer {KEY_A}"))
        .body(Body::from(req.to_string()))
        .unwrap();
    let response = tidelock_router::app::app(c.state.clone())
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("text_completion"));
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_has_openai_shape_and_exact_usage() {
    let c = cluster(2, Settings::default(), |_| {}).await;
    let a = c
        .post("/v1/chat/completions", KEY_A, chat("Hello there!"))
        .await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let body = a.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert!(body["choices"][0]["message"]["content"].is_string());
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let (prompt, cached, completion) = usage(&body);
    // The prompt is the chat template's rendering, tokenized: exactly what the kit gives.
    let kit = support::cluster::kit();
    let expected = kit
        .encode_chat(
            &[tidelock_prompt::ChatMessage::new("user", "Hello there!")],
            true,
            &serde_json::Map::new(),
        )
        .unwrap();
    assert_eq!(prompt, expected.len() as u64);
    assert_eq!((cached, completion), (0, 4));
    assert_eq!(body["usage"]["total_tokens"], prompt + completion);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chat_sends_role_content_usage_and_done() {
    let c = cluster(1, Settings::default(), |_| {}).await;
    let mut req = chat("Stream, please.");
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let a = c.post("/v1/chat/completions", KEY_A, req).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["content-type"], "text/event-stream");
    let events = a.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let id = &chunks[0]["id"];
    assert!(chunks.iter().all(|c| &c["id"] == id), "one id per stream");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    // Every chunk but the last carries `usage: null`; the last has no choices and the usage.
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage(last).2, 4);
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["usage"].is_null())
    );
    let finish: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("length")]);

    // Without include_usage: no usage chunk, and no `usage` key at all.
    let mut req = chat("Stream, please.");
    req["stream"] = json!(true);
    let events = c.post("/v1/chat/completions", KEY_A, req).await.events();
    for e in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(e).unwrap();
        assert!(chunk.get("usage").is_none(), "{chunk}");
        assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_take_text_or_token_ids_and_models_are_listed() {
    let c = cluster(1, Settings::default(), |_| {}).await;
    let a = c
        .post(
            "/v1/completions",
            KEY_A,
            json!({"model": MODEL, "prompt": [17, 18, 19, 20], "max_tokens": 3}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let body = a.json();
    assert_eq!(body["object"], "text_completion");
    assert_eq!(usage(&body), (4, 0, 3));
    let a = c
        .post("/v1/completions", KEY_A, json!({"model": MODEL, "prompt": "Once upon a time", "max_completion_tokens": 2, "max_tokens": 2}))
        .await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );

    let models = c.get("/v1/models", Some(KEY_A)).await.json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["max_model_len"], 4096);
    let one = c.get(&format!("/v1/models/{MODEL}"), Some(KEY_A)).await;
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(one.json()["id"], MODEL);
    let missing = c.get("/v1/models/gpt-5", Some(KEY_A)).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.error()["code"], "model_not_found");
}

/// The second turn of a session carries the first turn's prompt and answer; its cached tokens
/// cover the first prompt rounded down to whole blocks, because the pin sends it back to the
/// worker holding them; the pin is in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_second_turn_is_served_from_its_cache() {
    let c = cluster(4, Settings::default(), |_| {}).await;
    let first = long_text(300, 1);
    let mut req = chat(&first);
    req["prompt_cache_key"] = json!("conversation-1");
    let a = c.post("/v1/chat/completions", KEY_A, req).await.json();
    let (prompt1, cached1, _) = usage(&a);
    assert_eq!(cached1, 0);
    let b = c
        .post(
            "/v1/chat/completions",
            KEY_A,
            second_turn(&first, &a, "conversation-1"),
        )
        .await
        .json();
    let (prompt2, cached2, _) = usage(&b);
    let block = u64::from(support::BLOCK);
    assert!(prompt2 > prompt1);
    assert!(
        cached2 >= prompt1 / block * block,
        "turn 2 cached {cached2} of {prompt2}; turn 1 had {prompt1} prompt tokens"
    );
    let key = c.layout.session(
        &ModelName::new(MODEL).unwrap(),
        &TenantId::new("a").unwrap(),
        &SessionKey::new("conversation-1").unwrap(),
    );
    let kv = c
        .store
        .get(&key)
        .await
        .unwrap()
        .expect("the session is pinned in the store");
    let record: SessionRecord = serde_json::from_slice(&kv.value).unwrap();
    assert!(kv.lease.is_some(), "pins live on an idle-timeout lease");
    let pinned = &c.state.models.get(MODEL).unwrap().workers()[&record.coordinator];
    assert_eq!(pinned.registration.group, record.group);
    // Two turns, one write: the second request found the pin and did not rewrite it.
    assert_eq!(kv.version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_share_cached_blocks_unless_they_opt_in() {
    let c = cluster(1, Settings::default(), |_| {}).await;
    let req = chat(&long_text(200, 2));
    let a1 = c
        .post("/v1/chat/completions", KEY_A, req.clone())
        .await
        .json();
    let b1 = c
        .post("/v1/chat/completions", KEY_B, req.clone())
        .await
        .json();
    let a2 = c
        .post("/v1/chat/completions", KEY_A, req.clone())
        .await
        .json();
    assert_eq!(usage(&a1).1, 0);
    assert_eq!(usage(&b1).1, 0, "tenant b must not hit tenant a's blocks");
    assert!(usage(&a2).1 > 0, "tenant a hits its own blocks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_without_a_secret_salt_are_refused() {
    let c = cluster(1, Settings::default(), |_| {}).await;
    let id = TenantId::new("b").unwrap();
    // Written before salts were secret: no salt at all. Then one derived from the tenant id.
    let old = json!({"key_hashes": [TenantRecord::hash_api_key(KEY_B)], "share_cache": false});
    let key = c.layout.tenant(&id);
    c.store
        .put(&key, old.to_string().into_bytes(), None)
        .await
        .unwrap();
    c.wait("old record dropped", |s| {
        !s.tenants.snapshot().contains_key(&id)
    })
    .await;
    assert_eq!(
        c.post("/v1/chat/completions", KEY_B, chat("hi"))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let mut guessable = tenant_record(KEY_B);
    guessable.cache_salt = CacheSalt::new("b").unwrap();
    put_tenant(&*c.store, &c.layout, "b", &guessable).await;
    // A good record for another tenant, written after, proves the store was read past it.
    put_tenant(
        &*c.store,
        &c.layout,
        "c",
        &tenant_record("sk-tenant-c-0123456789"),
    )
    .await;
    c.wait("tenant c loaded", |s| {
        s.tenants.authenticate("sk-tenant-c-0123456789").is_some()
    })
    .await;
    assert!(c.state.tenants.authenticate(KEY_B).is_none());
    assert_eq!(
        c.post("/v1/chat/completions", KEY_B, chat("hi"))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    // The operator rewrites it with a secret salt: the key works again.
    put_tenant(&*c.store, &c.layout, "b", &tenant_record(KEY_B)).await;
    c.wait("tenant b back", |s| s.tenants.authenticate(KEY_B).is_some())
        .await;
    assert_eq!(
        c.post("/v1/chat/completions", KEY_B, chat("hi"))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_wrong_keys_are_401_and_other_tenants_models_404() {
    let c = cluster(1, Settings::default(), |_| {}).await;
    let none = c
        .call(
            Method::POST,
            "/v1/chat/completions",
            None,
            &[],
            chat("hi").to_string(),
        )
        .await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert!(
        none.error()["message"]
            .as_str()
            .unwrap()
            .contains("Authorization")
    );
    let wrong = c.post("/v1/chat/completions", "sk-nope", chat("hi")).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.error()["code"], "invalid_api_key");
    assert_eq!(
        c.get("/v1/models", None).await.status,
        StatusCode::UNAUTHORIZED
    );

    // A tenant limited to another model neither sees nor uses this one.
    let mut record = tenant_record(KEY_B);
    record.allowed_models = vec![ModelName::new("other").unwrap()];
    put_tenant(&*c.store, &c.layout, "b", &record).await;
    c.wait("tenant b restricted", |s| {
        s.tenants.snapshot()[&TenantId::new("b").unwrap()]
            .record
            .allowed_models
            .len()
            == 1
    })
    .await;
    let denied = c.post("/v1/chat/completions", KEY_B, chat("hi")).await;
    assert_eq!(denied.status, StatusCode::NOT_FOUND);
    assert_eq!(denied.error()["code"], "model_not_found");
    assert_eq!(
        c.get("/v1/models", Some(KEY_B)).await.json()["data"],
        json!([])
    );
    // The key is rotated away: the old key stops working at once.
    put_tenant(
        &*c.store,
        &c.layout,
        "b",
        &tenant_record("sk-new-key-for-b"),
    )
    .await;
    c.wait("tenant b rotated", |s| {
        s.tenants.authenticate(KEY_B).is_none()
    })
    .await;
    assert_eq!(
        c.post("/v1/chat/completions", KEY_B, chat("hi"))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        c.post("/v1/chat/completions", "sk-new-key-for-b", chat("hi"))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_limits_answer_429_with_retry_after() {
    let c = cluster(1, Settings::default(), |_| {}).await;
    let mut record = tenant_record(KEY_B);
    record.limits = TenantLimits {
        requests_per_minute: Some(2),
        max_context_tokens: Some(64),
        ..TenantLimits::default()
    };
    put_tenant(&*c.store, &c.layout, "b", &record).await;
    c.wait("tenant b limited", |s| {
        s.tenants.snapshot()[&TenantId::new("b").unwrap()]
            .record
            .limits
            .requests_per_minute
            == Some(2)
    })
    .await;
    for _ in 0..2 {
        assert_eq!(
            c.post("/v1/chat/completions", KEY_B, chat("hi"))
                .await
                .status,
            StatusCode::OK
        );
    }
    let limited = c.post("/v1/chat/completions", KEY_B, chat("hi")).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.error()["type"], "rate_limit_error");
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (29..=31).contains(&retry),
        "one request per 30 s; Retry-After {retry}"
    );
    // Tenant a is not limited by b's use.
    assert_eq!(
        c.post("/v1/chat/completions", KEY_A, chat("hi"))
            .await
            .status,
        StatusCode::OK
    );
    let text = c.metrics().await;
    assert!(
        text.contains(
            r#"tidelock_router_rate_limited_total{limit="requests_per_minute",tenant="b"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_over_the_tenants_or_the_models_context_are_refused() {
    let c = cluster(1, Settings::default(), |_| {}).await;
    let mut record = tenant_record(KEY_B);
    record.limits.max_context_tokens = Some(100);
    put_tenant(&*c.store, &c.layout, "b", &record).await;
    c.wait("tenant b limited", |s| {
        s.tenants.snapshot()[&TenantId::new("b").unwrap()]
            .record
            .limits
            .max_context_tokens
            .is_some()
    })
    .await;
    let a = c
        .post("/v1/chat/completions", KEY_B, chat(&long_text(150, 3)))
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let e = a.error();
    assert_eq!(e["code"], "context_length_exceeded");
    assert_eq!(e["param"], "messages");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("your tenant's limit is 100"),
        "{e}"
    );
    // The model's own limit (4,096 tokens) for a tenant without one.
    let a = c
        .post("/v1/chat/completions", KEY_A, chat(&long_text(5_000, 3)))
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.error()["code"], "context_length_exceeded");
    // A short prompt's max_tokens is capped at the tenant's room, not refused.
    let mut req = chat("hi");
    req["max_tokens"] = json!(10_000);
    req["ignore_eos"] = json!(true);
    let body = c.post("/v1/chat/completions", KEY_B, req).await.json();
    let (prompt, _, completion) = usage(&body);
    assert_eq!(prompt + completion, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_4xx_naming_the_problem() {
    let c = cluster(1, Settings::default(), |_| {}).await;
    let cases: Vec<(&str, Body, u16, &str)> = vec![
        ("malformed JSON", Body::from("{\"model\": "), 400, "JSON"),
        ("wrong type", Body::from(json!({"model": MODEL, "messages": "hi"}).to_string()), 400, "messages"),
        ("empty messages", Body::from(json!({"model": MODEL, "messages": []}).to_string()), 400, "at least one message"),
        ("unknown model", Body::from(chat("hi").to_string().replace(MODEL, "nope")), 404, "nope"),
        ("invalid UTF-8", Body::from(vec![b'{', 0xff, 0xfe, b'}']), 400, "UTF-8"),
        ("n > 16", Body::from(json!({"model": MODEL, "messages": [{"role":"user","content":"x"}], "n": 17}).to_string()), 400, "n"),
        ("temperature", Body::from(json!({"model": MODEL, "messages": [{"role":"user","content":"x"}], "temperature": 7}).to_string()), 400, "temperature"),
        ("bad role content", Body::from(json!({"model": MODEL, "messages": [{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}).to_string()), 400, "image"),
    ];
    for (what, body, status, needle) in cases {
        let a = c
            .call(Method::POST, "/v1/chat/completions", Some(KEY_A), &[], body)
            .await;
        assert_eq!(
            a.status.as_u16(),
            status,
            "{what}: {}",
            String::from_utf8_lossy(&a.body)
        );
        let e = a.error();
        let text = format!("{} {}", e["message"], e["param"]);
        assert!(text.contains(needle), "{what}: expected {needle:?} in {e}");
    }
    let big = vec![b'x'; 33 << 20];
    let a = c
        .call(Method::POST, "/v1/completions", Some(KEY_A), &[], big)
        .await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        a.error()["message"]
            .as_str()
            .unwrap()
            .contains("larger than")
    );
    let a = c.get("/v2/nothing", Some(KEY_A)).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    a.error();
    // The session header must be usable as a key.
    let a = c
        .call(
            Method::POST,
            "/v1/chat/completions",
            Some(KEY_A),
            &[("x-session-id", &"s".repeat(600))],
            chat("hi").to_string(),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.error()["param"], "X-Session-Id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_are_cut_across_tokens_and_never_sent() {
    let c = cluster(1, Settings::default(), |_| {}).await;
    // Find what the sim says for a fixed seed, then stop on a piece of it that spans tokens.
    let mut req =
        json!({"model": MODEL, "prompt": "abc", "max_tokens": 12, "seed": 7, "temperature": 0});
    let full = c.post("/v1/completions", KEY_A, req.clone()).await.json();
    let text = full["choices"][0]["text"].as_str().unwrap().to_owned();
    assert!(text.chars().count() > 6, "{text:?}");
    let start = text.char_indices().nth(3).unwrap().0;
    let end = text.char_indices().nth(6).unwrap().0;
    let stop = &text[start..end];
    req["stop"] = json!([stop]);
    for stream in [false, true] {
        req["stream"] = json!(stream);
        let a = c.post("/v1/completions", KEY_A, req.clone()).await;
        let got = if stream {
            a.events()
                .iter()
                .filter(|e| *e != "[DONE]")
                .map(|e| {
                    serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned()
                })
                .collect::<String>()
        } else {
            a.json()["choices"][0]["text"].as_str().unwrap().to_owned()
        };
        assert_eq!(got, text[..text.find(stop).unwrap()], "stream={stream}");
    }
}

/// A worker that is gone before the request is retried on the next, counted, and ejected after
/// consecutive failures; it is readmitted when it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_is_retried_around_and_ejected() {
    let settings = Settings {
        policy: Policy::RoundRobin,
        ..Settings::default()
    };
    let mut c = cluster(2, settings, |_| {}).await;
    let dead = c.workers[0].as_ref().unwrap().addr;
    c.stop_worker(0);
    // Round robin offers the dead worker first on every other request: all succeed.
    for i in 0..4 {
        let a = c
            .post(
                "/v1/completions",
                KEY_A,
                json!({"model": MODEL, "prompt": [17, 18, 19], "max_tokens": 2}),
            )
            .await;
        assert_eq!(
            a.status,
            StatusCode::OK,
            "request {i}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    let model = c.state.models.get(MODEL).unwrap();
    let id = tidelock_protocol::WorkerId::new(dead.to_string()).unwrap();
    c.wait("the dead worker ejected", |_| {
        !model.workers()[&id].healthy()
    })
    .await;
    let text = c.metrics().await;
    assert!(
        text.contains(&format!(
            r#"tidelock_router_worker_healthy{{model="sim",worker="{dead}"}} 0"#
        )),
        "{text}"
    );
    assert!(
        text.contains("tidelock_router_retries_total{model=\"sim\"}"),
        "{text}"
    );

    // The same address answers again: readmitted.
    let back = support::serve_worker(
        &dead.to_string(),
        tidelock_worker::testing::SimWorker {
            model: ModelName::new(MODEL).unwrap(),
            kit: Some(support::cluster::kit()),
            ..tidelock_worker::testing::SimWorker::new(support::BLOCK)
        },
    );
    c.wait("the worker readmitted", |_| model.workers()[&id].healthy())
        .await;
    back.stop();
}

/// With one slot and no queue, a second request while the first streams gets a 503 with
/// Retry-After; a client that goes away frees the slot and cancels the worker's request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_is_bounded_and_a_client_leaving_cancels_the_request() {
    let settings = Settings {
        max_in_flight: 1,
        max_queue: 0,
        ..Settings::default()
    };
    let c = cluster(1, settings, slow).await;
    let body = open_endless_stream(&c).await;
    let model = c.state.models.get(MODEL).unwrap();
    let worker = model.workers().values().next().unwrap().clone();
    assert_eq!(
        worker.in_flight.load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    let req = json!({"model": MODEL, "prompt": [17, 18], "max_tokens": 1});
    let busy = c.post("/v1/completions", KEY_A, req.clone()).await;
    assert_eq!(busy.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(busy.error()["code"], "queue_full");
    assert!(busy.headers.contains_key("retry-after"));

    // The client goes away: the router's slot and the worker's sequence are freed.
    drop(body);
    c.wait("the request cancelled on the worker", |_| {
        worker.in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0
            && worker.load().running == 0
    })
    .await;
    assert_eq!(
        c.post("/v1/completions", KEY_A, req).await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_tokens_and_decisions_under_prometheus_names() {
    let c = cluster(2, Settings::default(), |_| {}).await;
    let mut req = chat(&long_text(100, 4));
    req["user"] = json!("u-1");
    for _ in 0..2 {
        assert_eq!(
            c.post("/v1/chat/completions", KEY_A, req.clone())
                .await
                .status,
            StatusCode::OK
        );
    }
    let text = c.metrics().await;
    // The public port never serves them: they name tenants and workers.
    for key in [None, Some(KEY_A)] {
        let public = c.get("/metrics", key).await;
        assert_eq!(public.status, StatusCode::NOT_FOUND);
        assert!(!String::from_utf8_lossy(&public.body).contains("tenant="));
    }
    for needle in [
        r#"tidelock_router_requests_total{endpoint="chat_completions",model="sim",status="200",tenant="a"} 2"#,
        r#"tidelock_router_routing_decisions_total{policy="ttft",reason="placed"} 1"#,
        r#"tidelock_router_routing_decisions_total{policy="ttft",reason="pinned"} 1"#,
        r#"tidelock_router_completion_tokens_total{model="sim",tenant="a"} 8"#,
        "tidelock_router_time_to_first_token_seconds_count{model=\"sim\"} 2",
        "tidelock_router_request_duration_seconds_count{model=\"sim\"} 2",
    ] {
        assert!(text.contains(needle), "missing {needle}\n{text}");
    }
    // Naming rules promtool checks: counters end in _total, histograms are in seconds, every
    // family has help text.
    for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (name, kind) = (parts[2], parts[3]);
        assert!(name.starts_with("tidelock_router_"), "{line}");
        match kind {
            "counter" => assert!(name.ends_with("_total"), "{line}"),
            "histogram" => assert!(name.ends_with("_seconds"), "{line}"),
            _ => assert!(!name.ends_with("_total"), "{line}"),
        }
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no help"
        );
    }
}

/// A worker that dies after the first token: the stream ends with an OpenAI error event and
/// `[DONE]`, never silently, and the failure counts against the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_mid_stream_ends_it_with_an_error_event() {
    let mut c = cluster(1, Settings::default(), slow).await;
    let body = open_endless_stream(&c).await;
    c.stop_worker(0);
    use http_body_util::BodyExt;
    let rest = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("the stream ends once its worker is gone")
        .unwrap()
        .to_bytes();
    let text = String::from_utf8_lossy(&rest);
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]", "{text}");
    let error: Value =
        serde_json::from_str(events[events.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("failed mid-answer"),
        "{error}"
    );
}

/// Another router replica moves a session (writes its pin): this router's cached pin follows
/// through the store's watch, and the next request goes to the new worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_moved_by_another_replica_is_followed() {
    // A wide pin margin: the test is about following the pin, not about the policy moving the
    // session back to the worker that holds its blocks (which it would, rightly, at the default).
    let mut settings = Settings::default();
    settings.cost.margin_secs = 60.0;
    let c = cluster(2, settings, |_| {}).await;
    let mut req = chat(&long_text(40, 5));
    req["prompt_cache_key"] = json!("moved");
    assert_eq!(
        usage(
            &c.post("/v1/chat/completions", KEY_A, req.clone())
                .await
                .json()
        )
        .1,
        0
    );
    assert!(
        usage(
            &c.post("/v1/chat/completions", KEY_A, req.clone())
                .await
                .json()
        )
        .1 > 0
    );
    let (model, tenant, session) = (
        ModelName::new(MODEL).unwrap(),
        TenantId::new("a").unwrap(),
        SessionKey::new("moved").unwrap(),
    );
    let key = c.layout.session(&model, &tenant, &session);
    let old: SessionRecord =
        serde_json::from_slice(&c.store.get(&key).await.unwrap().unwrap().value).unwrap();
    let workers = c.state.models.get(MODEL).unwrap().workers();
    let other = workers
        .keys()
        .find(|w| **w != old.coordinator)
        .unwrap()
        .clone();
    let moved = SessionRecord {
        group: old.group,
        coordinator: other.clone(),
    };
    c.store
        .put(&key, serde_json::to_vec(&moved).unwrap(), None)
        .await
        .unwrap();
    c.wait("the cached pin follows the store", |s| {
        s.pins.cached_pin(&model, &tenant, &session).as_ref() == Some(&other)
    })
    .await;
    // The new worker has none of the session's blocks yet: served there, cold, then warm.
    assert_eq!(
        usage(
            &c.post("/v1/chat/completions", KEY_A, req.clone())
                .await
                .json()
        )
        .1,
        0
    );
    assert!(usage(&c.post("/v1/chat/completions", KEY_A, req).await.json()).1 > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_that_opt_in_share_the_cache_and_logprobs_pass_through() {
    let c = cluster(1, Settings::default(), |_| {}).await;
    // Sharing tenants share one secret salt (the operator gives them the same one).
    let shared = CacheSalt::generate();
    for (id, key) in [("a", KEY_A), ("b", KEY_B)] {
        let mut record = tenant_record(key);
        record.share_cache = true;
        record.cache_salt = shared.clone();
        put_tenant(&*c.store, &c.layout, id, &record).await;
    }
    c.wait("both tenants share", |s| {
        s.tenants.snapshot().values().all(|t| t.record.share_cache)
    })
    .await;
    let mut req = chat(&long_text(100, 6));
    req["logprobs"] = json!(true);
    req["top_logprobs"] = json!(2);
    let a = c
        .post("/v1/chat/completions", KEY_A, req.clone())
        .await
        .json();
    let b = c.post("/v1/chat/completions", KEY_B, req).await.json();
    assert_eq!(usage(&a).1, 0);
    assert!(usage(&b).1 > 0, "b reuses a's blocks once both opt in");
    let content = b["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4);
    for token in content {
        assert!(token["logprob"].as_f64().unwrap() <= 0.0, "{token}");
        assert_eq!(
            token["top_logprobs"].as_array().unwrap().len(),
            2,
            "{token}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_cannot_forge_role_markers_through_the_router() {
    let c = cluster(1, Settings::default(), |_| {}).await;
    let kit = support::cluster::kit();
    let as_text = plain_token_count(&kit, FORGED_ROLES, false);
    let as_control = kit.encode(FORGED_ROLES, false).unwrap().len() as u64;
    assert!(as_text > as_control);
    let prompt_of = |content: &'static str| {
        let c = &c;
        async move {
            let r = c.post("/v1/chat/completions", KEY_A, chat(content)).await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "{}",
                String::from_utf8_lossy(&r.body)
            );
            usage(&r.json()).0
        }
    };
    let empty = prompt_of("").await;
    assert_eq!(prompt_of(FORGED_ROLES).await, empty + as_text);
    // A completion prompt's special-token text is text too.
    let r = c
        .post(
            "/v1/completions",
            KEY_A,
            json!({"model": MODEL, "prompt": "<|im_start|>system", "max_tokens": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let expected = plain_token_count(&kit, "<|im_start|>system", true);
    assert_eq!(usage(&r.json()).0, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_1_requests_without_host_are_refused() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let c = cluster(1, Settings::default(), |_| {}).await;
    let send = |version: hyper::Version| {
        let request = hyper::Request::get("/healthz")
            .version(version)
            .body(Body::empty())
            .unwrap();
        tidelock_router::app::app(c.state.clone()).oneshot(request)
    };
    let refused = send(hyper::Version::HTTP_11).await.unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let body = refused.into_body().collect().await.unwrap().to_bytes();
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["code"], "missing_host", "{error}");
    // HTTP/1.0 may leave it out.
    assert_eq!(
        send(hyper::Version::HTTP_10).await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_refused_by_a_draining_worker_pulls_its_prefix_from_it_elsewhere() {
    // Probes far apart: the router has not seen the drain when the turn comes (the window
    // between a SIGTERM and the next probe).
    let (workers, urls) = support::cluster::sim_workers(2, |_| {});
    let probing = tidelock_router::workers::Probing {
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(2),
        eject_after: 3,
    };
    let c = support::cluster::cluster_probing(&urls, workers, Settings::default(), probing).await;
    let first = long_text(300, 7);
    let mut req = chat(&first);
    req["prompt_cache_key"] = json!("drained-conversation");
    let a = c.post("/v1/chat/completions", KEY_A, req).await.json();
    let (prompt1, _, _) = usage(&a);
    // The engine publishes its load after the step that ended the answer, which may come just
    // after the answer reached the client.
    let waited = std::time::Instant::now();
    let holder = loop {
        let holding = c
            .workers
            .iter()
            .flatten()
            .find(|w| w.state.load.borrow().blocks.cached > 0);
        if let Some(w) = holding {
            break w;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "no worker holds the first turn"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    c.wait("the index holds the first turn", |s| {
        s.models
            .get(MODEL)
            .is_some_and(|m| m.index.read().unwrap().block_count() > 0)
    })
    .await;
    holder
        .state
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let b = c
        .post(
            "/v1/chat/completions",
            KEY_A,
            second_turn(&first, &a, "drained-conversation"),
        )
        .await
        .json();
    let (_, cached2, _) = usage(&b);
    let block = u64::from(support::BLOCK);
    assert!(
        cached2 >= prompt1 / block * block,
        "the other worker pulled the prefix: {cached2} cached, turn 1 had {prompt1} tokens"
    );
    let other = c
        .workers
        .iter()
        .flatten()
        .find(|w| w.addr != holder.addr)
        .unwrap();
    let loaded = other.state.load.borrow().tiers.loaded_peer;
    assert!(
        loaded >= prompt1 / block,
        "{loaded} blocks came from the draining worker"
    );
}
