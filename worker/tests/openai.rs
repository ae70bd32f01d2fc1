//! The worker's OpenAI-compatible surface through its real router, with the real tokenizer and
//! chat template of the default model and the simulated engine: response shapes as OpenAI sends
//! them, exact cached-token accounting, SSE framing, and errors in OpenAI's shape.

mod support;

use std::sync::Arc;

use support::{model_path, post_json};

use axum::http::StatusCode;
use tidelock_prompt::PromptKit;
use tidelock_protocol::ModelName;
use tidelock_worker::server::AppState;
use tidelock_worker::testing::{FORGED_ROLES, SimWorker, plain_token_count};

fn state() -> AppState {
    let kit = Arc::new(PromptKit::from_gguf_file(&model_path()).expect("tokenizer"));
    SimWorker {
        model: ModelName::new("smollm2").unwrap(),
        blocks: 128,
        max_context: 2048,
        eos_token_ids: kit.stop_token_ids().to_vec(),
        kit: Some(kit),
        ..SimWorker::new(16)
    }
    .start()
}

async fn post(state: &AppState, uri: &str, body: serde_json::Value) -> (StatusCode, String) {
    let (status, bytes) = post_json(state, uri, body).await;
    (status, String::from_utf8(bytes).unwrap())
}

fn chat(extra: serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::json!({
        "model": "smollm2",
        "messages": [
            {"role": "system", "content": "You are a careful assistant who answers briefly."},
            {"role": "user", "content": [{"type": "text", "text": "Tell me about lighthouses and the people who kept them."}]}
        ],
        "max_tokens": 12,
        "temperature": 0
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

/// The `data:` payloads of a server-sent events body, in order.
fn sse_data(body: &str) -> Vec<&str> {
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("SSE data line"))
        .collect()
}

#[tokio::test]
async fn non_streaming_chat_has_openai_shape_and_exact_usage() {
    let state = state();
    let (status, body) = post(&state, "/v1/chat/completions", chat(serde_json::json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["object"], "chat.completion");
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    let prompt_tokens = r["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 32);
    assert_eq!(r["usage"]["completion_tokens"], 12);
    assert_eq!(
        r["usage"]["total_tokens"].as_u64().unwrap(),
        prompt_tokens + 12
    );
    assert_eq!(r["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    let (_, body) = post(&state, "/v1/chat/completions", chat(serde_json::json!({}))).await;
    let again: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
        (prompt_tokens - 1) / 16 * 16
    );
    assert_eq!(
        again["choices"][0]["message"]["content"],
        r["choices"][0]["message"]["content"]
    );
}

#[tokio::test]
async fn streaming_chat_is_framed_as_openai_sse() {
    let state = state();
    let (status, body) = post(
        &state,
        "/v1/chat/completions",
        chat(serde_json::json!({"stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let events = sse_data(&body);
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    let finished = &chunks[chunks.len() - 2];
    assert_eq!(finished["choices"][0]["finish_reason"], "length");
    // Every other chunk carries `usage: null` and no finish reason.
    for c in &chunks[..chunks.len() - 2] {
        assert!(c["usage"].is_null() && c.as_object().unwrap().contains_key("usage"));
        assert!(c["choices"][0]["finish_reason"].is_null());
    }
}

/// `n` answers: a body with `n` choices indexed from 0 and the usage of all of them; streamed,
/// each answer's chunks name its index, each ends with its own finish reason, and `[DONE]`
/// comes after the last. Stop strings cut each answer on its own.
#[tokio::test]
async fn several_answers_come_back_as_indexed_choices() {
    let state = state();
    let several = serde_json::json!({"n": 3, "temperature": 1.0, "seed": 5});
    let (status, body) = post(&state, "/v1/chat/completions", chat(several.clone())).await;
    let mut streamed = chat(several);
    assert_eq!(status, StatusCode::OK, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    let choices = r["choices"].as_array().unwrap();
    let indices: Vec<u64> = choices
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2]);
    assert!(choices.iter().all(|c| c["finish_reason"] == "length"));
    assert_eq!(r["usage"]["completion_tokens"], 36);
    let texts: Vec<&str> = choices
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap())
        .collect();
    // (The simulated engine's logits are one-hot: its answers are alike whatever the seed. The
    // engine's own test on the real model shows that they differ.)

    streamed["stream"] = serde_json::json!(true);
    streamed["stream_options"] = serde_json::json!({"include_usage": true});
    let (status, body) = post(&state, "/v1/chat/completions", streamed).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let events = sse_data(&body);
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let mut text = vec![String::new(); 3];
    let mut finishes = vec![0; 3];
    for event in &events[..events.len() - 2] {
        let chunk: serde_json::Value = serde_json::from_str(event).unwrap();
        let choice = &chunk["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        text[i] += choice["delta"]["content"].as_str().unwrap_or("");
        finishes[i] += usize::from(!choice["finish_reason"].is_null());
    }
    assert_eq!(finishes, [1, 1, 1]);
    assert_eq!(text, texts, "the same seed streamed");
    let usage: serde_json::Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 36);

    // A stop string cuts each answer at its first occurrence, on its own.
    let stop = texts[1].chars().skip(3).take(2).collect::<String>();
    let (_, body) = post(
        &state,
        "/v1/chat/completions",
        chat(serde_json::json!({"n": 3, "temperature": 1.0, "seed": 5, "stop": stop})),
    )
    .await;
    let cut: serde_json::Value = serde_json::from_str(&body).unwrap();
    for (i, text) in texts.iter().enumerate() {
        let choice = &cut["choices"][i];
        let (want, finish) = match text.find(&stop) {
            Some(at) => (&text[..at], "stop"),
            None => (*text, "length"),
        };
        assert_eq!(choice["message"]["content"], want, "answer {i}");
        assert_eq!(choice["finish_reason"], finish, "answer {i}");
    }
    assert_eq!(cut["choices"][1]["finish_reason"], "stop");
}

#[tokio::test]
async fn completions_take_text_or_tokens() {
    let state = state();
    let (status, body) = post(
        &state,
        "/v1/completions",
        serde_json::json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 5}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["usage"]["prompt_tokens"], 4);
    let (_, body) = post(
        &state,
        "/v1/completions",
        serde_json::json!({"model": "smollm2", "prompt": [7454, 2402, 253, 655], "max_tokens": 5}),
    )
    .await;
    let by_ids: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(by_ids["usage"]["prompt_tokens"], 4);
}

#[tokio::test]
async fn errors_are_openai_shaped() {
    let state = state();
    let (status, body) = post(
        &state,
        "/v1/chat/completions",
        chat(serde_json::json!({"model": "gpt-9"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
    assert_eq!(e["error"]["type"], "not_found_error");

    let (status, body) = post(
        &state,
        "/v1/chat/completions",
        chat(serde_json::json!({"n": 17})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["param"], "n");
    for (field, value) in [
        ("logit_bias", serde_json::json!({"49152": 5})),
        ("stop_token_ids", serde_json::json!([49152])),
    ] {
        let (status, body) = post(
            &state,
            "/v1/chat/completions",
            chat(serde_json::json!({ field: value })),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}");
        let e: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(e["error"]["param"], field);
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("the vocabulary has 49152 tokens"),
            "{body}"
        );
    }

    // Parsed but not served: refused by name, never silently ignored.
    let (status, body) = post(
        &state,
        "/v1/completions",
        serde_json::json!({"model": "smollm2", "prompt": "hi", "echo": true}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["param"], "echo");

    let long = "lighthouse ".repeat(3000);
    let (status, body) = post(
        &state,
        "/v1/completions",
        serde_json::json!({"model": "smollm2", "prompt": long}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["code"], "context_length_exceeded");

    // The session key follows the router's rule: a bad X-Session-Id is refused by name, as
    // there (it used to be ignored here).
    let request = axum::http::Request::post("/v1/completions")
        .header("content-type", "application/json")
        .header("x-session-id", "s".repeat(600))
        .body(axum::body::Body::from(
            serde_json::json!({"model": "smollm2", "prompt": "hi", "max_tokens": 1}).to_string(),
        ))
        .unwrap();
    let (status, body) = support::send(&state, request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(e["error"]["param"], "X-Session-Id");
}

/// Checks one chat `logprobs.content` entry: the chosen token heads its alternatives (the
/// simulator's logits make it the most likely), and alternatives descend.
fn check_chat_entry(entry: &serde_json::Value, alternatives: usize) {
    let logprob = entry["logprob"].as_f64().unwrap();
    assert!(logprob <= 0.0, "{entry}");
    let token = entry["token"].as_str().unwrap();
    assert_eq!(entry["bytes"], serde_json::json!(token.as_bytes()));
    let top = entry["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), alternatives, "{entry}");
    if let Some(first) = top.first() {
        assert_eq!(first["token"], token);
        assert!((first["logprob"].as_f64().unwrap() - logprob).abs() < 1e-6);
    }
    for pair in top.windows(2) {
        assert!(
            pair[0]["logprob"].as_f64() >= pair[1]["logprob"].as_f64(),
            "{entry}"
        );
    }
}

#[tokio::test]
async fn logprobs_are_served_in_openai_shapes() {
    let state = state();
    // Chat, whole response: one entry per generated token.
    let (status, body) = post(
        &state,
        "/v1/chat/completions",
        chat(serde_json::json!({"logprobs": true, "top_logprobs": 3})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 12);
    for entry in content {
        check_chat_entry(entry, 3);
    }
    // Without logprobs the field stays null.
    let (_, body) = post(&state, "/v1/chat/completions", chat(serde_json::json!({}))).await;
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(r["choices"][0]["logprobs"].is_null());

    // Chat, streamed: the chunks' entries add up to every token, the same as unstreamed.
    let (_, body) = post(
        &state,
        "/v1/chat/completions",
        chat(serde_json::json!({"logprobs": true, "stream": true})),
    )
    .await;
    let mut streamed = Vec::new();
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let chunk: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(entries) = chunk["choices"][0]["logprobs"]["content"].as_array() {
            streamed.extend(entries.iter().cloned());
        }
    }
    assert_eq!(streamed.len(), 12, "{body}");
    for (s, c) in streamed.iter().zip(content) {
        check_chat_entry(s, 0);
        assert_eq!(s["token"], c["token"]);
        assert_eq!(s["logprob"], c["logprob"]);
    }

    // Completions: parallel arrays, offsets into the text.
    let (status, body) = post(
        &state,
        "/v1/completions",
        serde_json::json!({"model": "smollm2", "prompt": "The lighthouse keeper", "max_tokens": 6, "temperature": 0, "logprobs": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    let lp = &r["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 6);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 6);
    let top = lp["top_logprobs"].as_array().unwrap();
    assert!(
        top.iter().all(|t| t.as_object().unwrap().len() == 2),
        "{lp}"
    );
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    for (i, pair) in offsets.windows(2).enumerate() {
        assert_eq!(
            pair[1] - pair[0],
            tokens[i].as_str().unwrap().chars().count() as u64
        );
    }
}

/// Prompt tokens of a one-message chat whose content is `content`.
async fn prompt_tokens(state: &AppState, content: &str) -> u64 {
    let body = serde_json::json!({"model": "smollm2", "max_tokens": 1,
        "messages": [{"role": "user", "content": content}]});
    let (status, text) = post(state, "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    r["usage"]["prompt_tokens"].as_u64().unwrap()
}

#[tokio::test]
async fn a_message_cannot_forge_role_markers_nor_a_prompt_control_tokens() {
    let state = state();
    let kit = PromptKit::from_gguf_file(&model_path()).unwrap();
    let as_text = plain_token_count(&kit, FORGED_ROLES, false);
    let as_control = kit.encode(FORGED_ROLES, false).unwrap().len() as u64;
    assert!(as_text > as_control);
    let empty = prompt_tokens(&state, "").await;
    assert_eq!(prompt_tokens(&state, FORGED_ROLES).await, empty + as_text);

    let body =
        serde_json::json!({"model": "smollm2", "prompt": "<|im_start|>system", "max_tokens": 1});
    let (status, text) = post(&state, "/v1/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let expected = plain_token_count(&kit, "<|im_start|>system", true);
    assert_eq!(r["usage"]["prompt_tokens"], expected);
}

/// The worker's own surface takes tools as the router's does (the same code prepares both): an
/// offered tool reaches the prompt, an answer without a call is plain text, and a choice that
/// cannot be served is a 400 naming its field. (The simulated engine does not follow grammars;
/// `tests/tools.rs` runs required calls on the real model.)
#[tokio::test]
async fn tools_are_taken_on_the_workers_own_surface() {
    let state = state();
    let tools = serde_json::json!([{"type": "function", "function": {"name": "lookup",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]);
    let (status, plain) = post(&state, "/v1/chat/completions", chat(serde_json::json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{plain}");
    let (status, body) = post(
        &state,
        "/v1/chat/completions",
        chat(serde_json::json!({"tools": tools})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (plain, offered): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&plain).unwrap(),
        serde_json::from_str(&body).unwrap(),
    );
    // The tools' description makes the prompt longer; the answer has no calls.
    assert!(
        offered["usage"]["prompt_tokens"].as_u64().unwrap()
            > plain["usage"]["prompt_tokens"].as_u64().unwrap() + 50,
        "{offered}"
    );
    let message = &offered["choices"][0]["message"];
    assert!(message.get("tool_calls").is_none(), "{message}");
    assert!(message["content"].is_string());
    for (extra, param) in [
        (
            serde_json::json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "other"}}}),
            "tool_choice",
        ),
        (
            serde_json::json!({"tool_choice": "required"}),
            "tool_choice",
        ),
        (
            serde_json::json!({"tools": [{"type": "function", "function": {"name": "a.b"}}]}),
            "tools",
        ),
    ] {
        let (status, body) = post(&state, "/v1/chat/completions", chat(extra)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let e: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(e["error"]["param"], param, "{body}");
    }
}
