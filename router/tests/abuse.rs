//! Tenants who send the most expensive requests the router accepts cannot stall it (issue #18,
//! point 1): the preparation of requests (parsing, templates, tokenization, hashing) runs on a
//! bounded pool with a share per tenant, bounded by the model's context before a body is read
//! and by a memory budget before a text is tokenized. Its own binary, so that no other test
//! shares these two cores while the abusers keep them busy.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hyper::StatusCode;
use serde_json::json;
use support::cluster::{KEY_A, KEY_B, MODEL, cluster, put_tenant, tenant_record};
use tidelock_protocol::TenantLimits;
use tidelock_router::app::{BODY_BYTES_PER_TOKEN, BODY_SLACK_BYTES, Settings};
use tidelock_router::cpu::CpuLimits;

const KEY_C: &str = "sk-tenant-c-well-behaved";

/// A completion whose prompt is `bytes` of digits: one token per byte, the most expensive text
/// to tokenize (about 350 bytes of tokenizer memory a byte) and, at a million tokens, over the
/// context.
fn digits(bytes: usize) -> serde_json::Value {
    json!({"model": MODEL, "prompt": "1234567890".repeat(bytes / 10), "max_tokens": 4})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_abusive_tenants_do_not_delay_a_third_or_the_probes() {
    // The default pool: 8 threads, 2 per tenant, 4 GiB.
    let settings = Settings::default();
    let c = Arc::new(
        cluster(1, settings, |w| {
            w.max_context = 600_000;
        })
        .await,
    );
    put_tenant(&*c.store, &c.layout, "c", &tenant_record(KEY_C)).await;
    c.wait("tenant c", |s| s.tenants.snapshot().len() == 3)
        .await;

    // Tenants a and b each send six prompts of a million digit tokens (1 MB, inside the body
    // limit of 32 bytes a token of the 600,000-token context): each is tokenized up to its
    // first 600,000 tokens before it is found too long (issue #18 measured 28 s for 20 MB).
    let finished = Arc::new(AtomicUsize::new(0));
    let mut abusers = Vec::new();
    for key in [KEY_A, KEY_B] {
        for _ in 0..6 {
            let (c, finished) = (c.clone(), finished.clone());
            abusers.push(tokio::spawn(async move {
                let answer = c.post("/v1/completions", key, digits(1_000_000)).await;
                finished.fetch_add(1, Ordering::SeqCst);
                answer
            }));
        }
    }
    c.wait("both abusers' jobs running", |s| {
        let a = tidelock_protocol::TenantId::new("a").unwrap();
        let b = tidelock_protocol::TenantId::new("b").unwrap();
        s.cpu_running(&a) == 2 && s.cpu_running(&b) == 2
    })
    .await;

    // Meanwhile tenant c's ordinary requests and the probes are answered, every one of them
    // before a single abusive request is done.
    for i in 0..10 {
        let health = c.get("/healthz", None).await;
        assert_eq!(health.status, StatusCode::OK);
        let body = json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": format!("Question {i}: how are lakes made?")}],
            "max_tokens": 8,
        });
        let answer = c.post("/v1/chat/completions", KEY_C, body).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        assert_eq!(
            finished.load(Ordering::SeqCst),
            0,
            "an abusive request ended before tenant c's request {i}: c waited behind them"
        );
    }

    // The abusers get what they asked for: a 400 naming the context. Tokenizing stopped at the
    // first piece past the context, not at the end of the text.
    for abuser in abusers {
        let answer = abuser.await.unwrap();
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        let error = answer.error();
        assert_eq!(error["code"], "context_length_exceeded", "{error}");
        let message = error["message"].as_str().unwrap();
        let at_least: u64 = message
            .split("the prompt has at least ")
            .nth(1)
            .and_then(|rest| rest.trim_end_matches('.').parse().ok())
            .unwrap_or_else(|| panic!("{error}"));
        assert!((600_000..1_000_000).contains(&at_least), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_context_and_texts_over_the_memory_budget_get_413() {
    // A small budget: at most 48 MiB for one job, a text of 96 KiB to tokenize.
    let settings = Settings {
        cpu: CpuLimits {
            threads: 4,
            per_tenant: 2,
            memory_bytes: 64 << 20,
            ..CpuLimits::default()
        },
        ..Settings::default()
    };
    let c = cluster(1, settings, |w| {
        w.max_context = 100_000;
        w.blocks = 8_192;
    })
    .await;
    // Tenant c may use 1,000 tokens of context: its bodies stop at 32 bytes a token plus 64 KiB.
    let limited = tidelock_protocol::TenantRecord {
        limits: TenantLimits {
            max_context_tokens: Some(1_000),
            ..TenantLimits::default()
        },
        ..tenant_record(KEY_C)
    };
    put_tenant(&*c.store, &c.layout, "c", &limited).await;
    c.wait("tenant c", |s| s.tenants.snapshot().len() == 3)
        .await;
    let limit = 1_000 * BODY_BYTES_PER_TOKEN + BODY_SLACK_BYTES;
    let over = c
        .post("/v1/completions", KEY_C, digits(limit as usize + 10))
        .await;
    assert_eq!(over.status, StatusCode::PAYLOAD_TOO_LARGE);
    let error = over.error();
    assert_eq!(error["code"], "request_too_large");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains(&format!("({limit} bytes)")),
        "{error}"
    );
    // Tenant a has the model's whole context (3.2 MB of body), but a text of 200 KB needs
    // 100 MB of tokenizer memory by the pool's estimate, more than its 48 MiB for one job.
    let text = c.post("/v1/completions", KEY_A, digits(200_000)).await;
    assert_eq!(text.status, StatusCode::PAYLOAD_TOO_LARGE);
    let error = text.error();
    assert!(
        error["message"].as_str().unwrap().contains("text"),
        "{error}"
    );
    // A prompt under both limits goes through.
    let fine = c.post("/v1/completions", KEY_A, digits(50_000)).await;
    assert_eq!(fine.status, StatusCode::OK, "{:?}", fine.body);
    let prompt = fine.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!((50_000..=50_001).contains(&prompt), "{prompt}");
}
