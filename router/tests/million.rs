//! A million tokens through the public API (issue #18, point 3): the whole router in-process over
//! two simulated workers with a 1,100,000-token context (the real scheduler, block pool and KV
//! events, no model math), the default model's tokenizer. Digits are one token each with it, so
//! a prompt of N digits is N tokens, whatever the cut of its pieces.

mod support;

use serde_json::{Value, json};
use support::BLOCK;
use support::cluster::{KEY_A, MODEL, cluster};
use tidelock_router::app::Settings;

const MILLION: usize = 1 << 20;

/// `n` digits, in a pattern that differs by `seed`.
fn digits(n: usize, seed: usize) -> String {
    (0..n)
        .map(|i| char::from(b'0' + ((i * 7 + seed) % 10) as u8))
        .collect()
}

fn usage(body: &Value) -> (u64, u64) {
    let u = &body["usage"];
    let cached = u["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    (u["prompt_tokens"].as_u64().unwrap(), cached)
}

async fn big_cluster() -> support::cluster::Cluster {
    cluster(2, Settings::default(), |w| {
        w.max_context = 1_100_000;
        w.blocks = 1_100_000 / BLOCK as usize + 64;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_token_prompt_as_text_and_as_ids() {
    let c = big_cluster().await;
    // The default model adds nothing to a completion prompt: N digits are N tokens.
    let text = digits(MILLION, 3);
    let body = json!({"model": MODEL, "prompt": text, "max_tokens": 4, "prompt_cache_key": "t"});
    let answer = c.post("/v1/completions", KEY_A, body).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let (prompt, cached) = usage(&answer.json());
    assert_eq!(prompt, MILLION as u64);
    assert_eq!(cached, 0);

    // The same ids sent as ids (7 MB of JSON) find the whole prefix cached, but for the last
    // block, which a worker never caches whole before generating.
    let kit = support::cluster::kit();
    let ids = kit.encode_plain(&text, true).unwrap();
    assert_eq!(ids.len(), MILLION);
    let body = json!({"model": MODEL, "prompt": ids, "max_tokens": 4, "prompt_cache_key": "t"});
    let answer = c.post("/v1/completions", KEY_A, body).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let (prompt, cached) = usage(&answer.json());
    assert_eq!(prompt, MILLION as u64);
    let block = u64::from(BLOCK);
    assert!(
        cached >= (prompt - 1) / block * block,
        "cached {cached} of {prompt}"
    );

    // One token over the context: a 400 that names the limit, not a 500.
    let over = json!({"model": MODEL, "prompt": digits(1_100_000, 1), "max_tokens": 1});
    let answer = c.post("/v1/completions", KEY_A, over).await;
    assert_eq!(answer.status, 400);
    let error = answer.error();
    assert_eq!(error["code"], "context_length_exceeded", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("1100000 tokens"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_grows_to_a_million_tokens_from_its_cache() {
    let c = big_cluster().await;
    let block = u64::from(BLOCK);
    let mut messages: Vec<Value> = Vec::new();
    let mut previous = 0u64;
    // Eight turns of 131,072 digits each: the last prompt is over a million tokens.
    for turn in 0..8 {
        messages.push(json!({"role": "user", "content": digits(MILLION / 8, turn)}));
        let body = json!({
            "model": MODEL,
            "messages": messages,
            "max_tokens": 8,
            "prompt_cache_key": "a-long-life",
        });
        let answer = c.post("/v1/chat/completions", KEY_A, body).await;
        assert_eq!(
            answer.status,
            200,
            "turn {turn}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        let body = answer.json();
        let (prompt, cached) = usage(&body);
        assert!(
            cached >= previous / block * block,
            "turn {turn}: cached {cached} of {prompt}; the previous prompt had {previous}"
        );
        previous = prompt;
        let reply = body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();
        messages.push(json!({"role": "assistant", "content": reply}));
    }
    assert!(
        previous > MILLION as u64,
        "the last prompt had {previous} tokens"
    );
}
