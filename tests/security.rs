//! The attacks of issue #17, replayed against `tidelock up` as an attacker inside the cluster
//! would run them (a process that can reach the workers' ports): one group of two real workers
//! (a coordinator and its shard), a router, and three tenants. Each attack must fail; the test
//! prints every attack with its outcome before the fix (from the report) and now.
//!
//! The insider attacks (the prefix oracle, snapshot inference) are run even with the cluster
//! credential in hand, as a compromised router would have it: secret salts must hold on their
//! own. The chart's NetworkPolicies are checked on the real control plane in `tests/kube.rs`.

use std::path::Path;

use serde_json::{Value, json};
use tidelock_e2e::local::{
    cache, cluster_token, interrupt, metrics_port, parts, port, up, wait_up,
};
use tidelock_e2e::shard::{DIM, HEADS, KV_HEADS, request};
use tidelock_e2e::{free_port, http_get, http_get_with, http_request, model_path};
use tidelock_prompt::PromptKit;
use tidelock_protocol::{
    BlockTokens, CacheSalt, ClusterToken, KvSnapshot, ModelName, TenantRecord, block_hashes,
};
use tidelock_worker::testing::{FORGED_ROLES, plain_token_count};

const ALPHA: &str = "sk-alpha-0123456789abcdef";
const BETA: &str = "sk-beta-0123456789abcdef";
const GAMMA: &str = "sk-gamma-0123456789abcdef";
const BLOCK: u32 = 16;

/// One attack: what it is, what it did before #17, what it does now.
struct Outcome {
    attack: &'static str,
    before: &'static str,
    now: String,
}

fn json_post(port: u16, path: &str, bearer: Option<&str>, body: &Value) -> (u16, String) {
    let bytes = body.to_string().into_bytes();
    http_request(
        port,
        "POST",
        path,
        bearer,
        Some(("application/json", &bytes)),
    )
    .expect("an answer")
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A long text whose prompt fills many whole blocks.
fn long_text(seed: usize) -> String {
    (0..300)
        .map(|i| format!("w{}", (i * 7 + seed * 13) % 97))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `POST /v1/generate` on a worker as an insider with the credential: the `Prefilled` event's
/// `(prompt_tokens, cached_tokens)`.
fn generate(port: u16, token: &str, salt: &str, tokens: &[u32]) -> (u64, u64) {
    let request = json!({
        "cache_salt": salt, "tokens": tokens,
        "sampling": {"max_tokens": 1, "temperature": 0.0},
    });
    let (status, body) = json_post(port, "/v1/generate", Some(token), &request);
    assert_eq!(status, 200, "{body}");
    body.lines()
        .map(json)
        .find(|e| e["type"] == "prefilled")
        .map(|e| {
            (
                e["prompt_tokens"].as_u64().unwrap(),
                e["cached_tokens"].as_u64().unwrap(),
            )
        })
        .unwrap_or_else(|| panic!("no prefilled event: {body}"))
}

/// A shard attention request that appends a key/value of the caller's choice at block place
/// `local`, slot 0.
fn shard_write(local: u32) -> Vec<u8> {
    let kv = [9.0; KV_HEADS * DIM];
    request(0, local, &kv, &kv, &[0.5; HEADS * DIM])
        .encode()
        .unwrap()
}

fn tenants_file(dir: &Path) -> std::path::PathBuf {
    let mut beta = TenantRecord::with_keys([BETA]);
    beta.allowed_models = vec![ModelName::new("another-model").unwrap()];
    let tenants = json!({
        "alpha": TenantRecord::with_keys([ALPHA]),
        "beta": beta,
        "gamma": TenantRecord::with_keys([GAMMA]),
    });
    let file = dir.join("tenants.json");
    std::fs::write(&file, tenants.to_string()).unwrap();
    file
}

#[test]
fn attacks_from_inside_the_cluster_fail_against_tidelock_up() {
    let cache = cache();
    let file = tenants_file(cache.path());
    let router = free_port();
    let mut child = up(
        cache.path(),
        &[
            "--workers",
            "1",
            "--shards",
            "2",
            "--kv-cache",
            "64MiB",
            "--block-tokens",
            "16",
            "--port",
            &router.to_string(),
            "--tenants-file",
            file.to_str().unwrap(),
        ],
    );
    wait_up(&mut child, cache.path(), router);
    let parts = parts(cache.path());
    let (worker, shard) = (port(&parts, "worker-0"), port(&parts, "worker-0.1"));
    let token = cluster_token(cache.path());
    let wrong = ClusterToken::generate();
    let models = json(&http_get_with(router, "/v1/models", Some(ALPHA)).unwrap().1);
    let model = models["data"][0]["id"].as_str().unwrap().to_owned();
    let mut report = Vec::new();

    // 1. Workers answer anyone: every internal route, on the coordinator and on the shard.
    let chat =
        json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let routes: [(&str, &str, Option<Value>); 11] = [
        ("GET", "/v1/info", None),
        ("GET", "/v1/tokenizer", None),
        ("GET", "/v1/load", None),
        ("GET", "/v1/kv/snapshot", None),
        ("GET", "/v1/kv/events?after=0", None),
        ("GET", "/metrics", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", Some(chat.clone())),
        (
            "POST",
            "/v1/completions",
            Some(json!({"model": model, "prompt": "hi"})),
        ),
        ("POST", "/tokenize", Some(json!({"prompt": "hi"}))),
        (
            "POST",
            "/v1/generate",
            Some(json!({"cache_salt": "alpha", "tokens": [1, 2, 3]})),
        ),
    ];
    let mut refused = 0;
    for (target, name) in [(worker, "coordinator"), (shard, "shard")] {
        for (method, path, body) in &routes {
            for bearer in [None, Some(wrong.expose())] {
                let bytes = body.as_ref().map(|b| b.to_string().into_bytes());
                let body = bytes.as_deref().map(|b| ("application/json", b));
                let (status, text) = http_request(target, method, path, bearer, body).unwrap();
                assert_eq!(status, 401, "{name} {method} {path} ({bearer:?}): {text}");
                assert!(text.contains("invalid_cluster_credential"), "{text}");
                refused += 1;
            }
        }
        for probe in ["/healthz", "/readyz"] {
            assert_eq!(http_get(target, probe).unwrap().0, 200, "{name} {probe}");
        }
    }
    report.push(Outcome {
        attack: "worker and shard routes without the credential",
        before: "200 (served a chat, no key, no limit)",
        now: format!("401 on all {refused} calls (11 routes x 2 workers x no/guessed token)"),
    });

    // 2. Model allowlist bypass: beta may not use this model.
    let (status, text) = json_post(router, "/v1/chat/completions", Some(BETA), &chat);
    assert_eq!(status, 404, "{text}");
    let (direct, _) = json_post(worker, "/v1/chat/completions", None, &chat);
    assert_eq!(direct, 401);
    report.push(Outcome {
        attack: "model allowlist bypass (direct to a worker)",
        before: "200 from the worker",
        now: format!("router {status} model_not_found, worker {direct}"),
    });

    // 3. Shard writes: a key/value of the caller's choice into a block and slot of its choice.
    let body = shard_write(3);
    let content = "application/vnd.tidelock.shard";
    let mut statuses = Vec::new();
    for bearer in [None, Some(wrong.expose())] {
        let (status, text) = http_request(
            shard,
            "POST",
            "/v1/shard/attend",
            bearer,
            Some((content, &body)),
        )
        .unwrap();
        assert_eq!(status, 401, "{text}");
        statuses.push(status);
    }
    report.push(Outcome {
        attack: "shard write without the credential",
        before: "200 (written at the caller's block and slot)",
        now: format!("{statuses:?}"),
    });

    // 4. The prefix oracle: alpha's prompt is cached; an insider guesses it under the salt
    // alpha's blocks used to have (its id), and the empty salt.
    let text = long_text(1);
    let completion = json!({"model": model, "prompt": text, "max_tokens": 1, "temperature": 0});
    let mut cached = 0;
    let mut prompt_tokens = 0;
    for _ in 0..2 {
        let (status, body) = json_post(router, "/v1/completions", Some(ALPHA), &completion);
        assert_eq!(status, 200, "{body}");
        let usage = &json(&body)["usage"];
        prompt_tokens = usage["prompt_tokens"].as_u64().unwrap();
        cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0);
    }
    assert!(
        cached >= 256,
        "alpha's own second request is cached: {cached}"
    );
    let (status, ids) = json_post(worker, "/tokenize", Some(&token), &json!({"prompt": text}));
    assert_eq!(status, 200, "{ids}");
    let ids: Vec<u32> = serde_json::from_value(json(&ids)["tokens"].clone()).unwrap();
    assert_eq!(
        ids.len() as u64,
        prompt_tokens,
        "the insider has alpha's exact prompt"
    );
    // 5. Snapshot inference: hash alpha's prompt offline under every public salt (before the
    // insider's own guesses below put blocks under those salts).
    let snapshot = http_get_with(worker, "/v1/kv/snapshot", Some(&token))
        .unwrap()
        .1;
    let parsed: KvSnapshot = serde_json::from_str(&snapshot).unwrap();
    assert!(parsed.blocks.len() >= 16, "{} blocks", parsed.blocks.len());
    let held: std::collections::HashSet<_> = parsed.blocks.iter().map(|b| b.hash).collect();
    let served = ModelName::new(&model).unwrap();
    let mut reproduced = 0;
    for salt in ["alpha", "", "local", "tenant-alpha"] {
        let salt = CacheSalt::new(salt).unwrap();
        let guessed = block_hashes(&served, &salt, &ids, BlockTokens::new(BLOCK).unwrap());
        reproduced += guessed.iter().filter(|h| held.contains(h)).count();
    }
    assert_eq!(
        reproduced, 0,
        "a public salt reproduced alpha's block hashes"
    );
    for name in ["alpha", "beta", "gamma"] {
        assert!(!snapshot.contains(name), "the snapshot names {name}");
    }
    report.push(Outcome {
        attack: "snapshot inference (hashes recomputed offline)",
        before: "block hashes reproduced from id + guessed prompt",
        now: format!(
            "{reproduced} of {} held blocks reproduced; no tenant named",
            parsed.blocks.len()
        ),
    });

    // 4, continued: the insider's guesses.
    let mut guesses = Vec::new();
    for salt in ["alpha", ""] {
        let (tokens, hit) = generate(worker, &token, salt, &ids);
        assert_eq!(tokens, prompt_tokens);
        assert_eq!(hit, 0, "the guess under salt {salt:?} found alpha's blocks");
        guesses.push(hit);
    }
    // The oracle itself still works for what the insider cached: only the salt stops it.
    let (_, again) = generate(worker, &token, "alpha", &ids);
    assert!(again >= 256, "{again}");
    // The offline hashing above is the worker's own: the blocks the insider just cached under
    // "alpha" are found by it, so its 0 for alpha's real blocks is the salt's doing.
    let snapshot: KvSnapshot = serde_json::from_str(
        &http_get_with(worker, "/v1/kv/snapshot", Some(&token))
            .unwrap()
            .1,
    )
    .unwrap();
    let held: std::collections::HashSet<_> = snapshot.blocks.iter().map(|b| b.hash).collect();
    let salt = CacheSalt::new("alpha").unwrap();
    let own = block_hashes(&served, &salt, &ids, BlockTokens::new(BLOCK).unwrap());
    assert!(!own.is_empty() && own.iter().all(|h| held.contains(h)));
    report.push(Outcome {
        attack: "prefix oracle: guessed prompt under the tenant id as salt",
        before: "cached_tokens 1472 of 1500 when right",
        now: format!(
            "cached_tokens {guesses:?} of {prompt_tokens} (alpha itself: {cached}; the guess repeated: {again})"
        ),
    });

    // 6. Role forgery: control-token text in a message stays text.
    let kit = PromptKit::from_gguf_file(&model_path()).unwrap();
    let tokens_of = |content: &str| {
        let chat = json!({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1});
        let (status, body) = json_post(router, "/v1/chat/completions", Some(GAMMA), &chat);
        assert_eq!(status, 200, "{body}");
        json(&body)["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    let (empty, forged) = (tokens_of(""), tokens_of(FORGED_ROLES));
    let plain = plain_token_count(&kit, FORGED_ROLES, false);
    assert_eq!(
        forged,
        empty + plain,
        "the forged markers became control tokens"
    );
    report.push(Outcome {
        attack: "role forgery (<|im_start|>system in a message)",
        before: "tokenized to the control ids: a forged system turn",
        now: format!("{forged} prompt tokens = {empty} (empty chat) + {plain} (as plain text)"),
    });

    // 7. Tenant ids and worker addresses from the router's public port.
    let (public, _) = http_get(router, "/metrics").unwrap();
    let (status, metrics) = http_get(metrics_port(&parts, "router"), "/metrics").unwrap();
    assert_eq!((public, status), (404, 200));
    assert!(
        metrics.contains("tenant=\"alpha\""),
        "operators keep tenant labels"
    );
    report.push(Outcome {
        attack: "tenant ids from the router's public /metrics",
        before: "200, every tenant id and worker address",
        now: format!("{public} on the public port; served on the metrics port only"),
    });

    // The refusals are counted where Prometheus reads them (the metrics-only port).
    let (_, worker_metrics) = http_get(metrics_port(&parts, "worker-0"), "/metrics").unwrap();
    let counted = |reason: &str| -> u64 {
        let name = format!("tidelock_internal_unauthorized_requests_total{{reason=\"{reason}\"}}");
        worker_metrics
            .lines()
            .find_map(|l| l.strip_prefix(&name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    let (missing, invalid) = (counted("missing"), counted("invalid"));
    // 11 routes without a token and one direct chat; 11 with a guessed one.
    assert_eq!((missing, invalid), (12, 11));

    println!("\n{:<58} {:<52} now", "attack", "before #17");
    for o in &report {
        println!("{:<58} {:<52} {}", o.attack, o.before, o.now);
    }
    println!("coordinator's refusals counted: missing {missing}, invalid {invalid}");
    assert!(interrupt(&mut child).success());
}
