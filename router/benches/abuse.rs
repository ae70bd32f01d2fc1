//! What two abusive tenants add to a third tenant's requests and to `/healthz` (issue #18, point
//! 1), and the router's peak memory meanwhile.
//!
//! A whole router in-process (the component tests' cluster: one sim worker with a
//! 600,000-token context, the router's default preparation pool). First a baseline: tenant c's
//! short chat requests, one after another, and `/healthz`, on an idle router. Then the same while
//! tenants a and b keep `--abusers` requests each in flight, every one a megabyte of digits (a
//! million tokens, the costliest text to tokenize, refused as too long only once tokenized).
//! Printed: p50/p99 latency of both phases and what the abuse added, the abusive requests done,
//! and the process's peak resident memory (`VmHWM`: router, sim worker and client together).
//!
//! Run: `nice cargo bench -p tidelock-router --bench abuse` (about a minute).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use support::cluster::{Cluster, KEY_A, KEY_B, MODEL, cluster, put_tenant, tenant_record};
use tidelock_router::app::Settings;

const KEY_C: &str = "sk-tenant-c-well-behaved";
const ROUNDS: usize = 60;

fn quantile(xs: &mut [f64], q: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() - 1) as f64 * q).round() as usize]
}

/// Tenant c's chat requests and the probe, `ROUNDS` of each, in milliseconds.
async fn measure(c: &Cluster) -> (Vec<f64>, Vec<f64>) {
    let (mut chat, mut health) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        let t = Instant::now();
        let probe = c.get("/healthz", None).await;
        assert_eq!(probe.status, 200);
        health.push(t.elapsed().as_secs_f64() * 1e3);
        let body = json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": format!("Question {i}: how are lakes made?")}],
            "max_tokens": 8,
        });
        let t = Instant::now();
        let answer = c.post("/v1/chat/completions", KEY_C, body).await;
        assert_eq!(answer.status, 200);
        chat.push(t.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (chat, health)
}

fn main() {
    let abusers: usize = std::env::var("ABUSERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let runtime = support::bench_runtime();
    runtime.block_on(async move {
        let c = Arc::new(
            cluster(1, Settings::default(), |w| w.max_context = 600_000).await,
        );
        put_tenant(&*c.store, &c.layout, "c", &tenant_record(KEY_C)).await;
        c.wait("tenant c", |s| s.tenants.snapshot().len() == 3).await;
        let idle_rss = support::peak_rss_mib();
        let (mut chat0, mut health0) = measure(&c).await;

        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let prompt = "1234567890".repeat(100_000);
        let mut tasks = Vec::new();
        for key in [KEY_A, KEY_B] {
            for _ in 0..abusers {
                let (c, stop, done, prompt) = (c.clone(), stop.clone(), done.clone(), prompt.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 4});
                        let answer = c.post("/v1/completions", key, body).await;
                        assert_eq!(answer.status, 400);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let started = Instant::now();
        let (mut chat1, mut health1) = measure(&c).await;
        let abused_for = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        println!(
            "two abusive tenants, {abusers} requests each in flight (1 MB of digits: 1M tokens each); \
             {} of them answered (400) during the {:.1} s measured",
            done.load(Ordering::Relaxed),
            abused_for.as_secs_f64()
        );
        for (what, idle, abused) in [
            ("tenant c chat", &mut chat0, &mut chat1),
            ("/healthz", &mut health0, &mut health1),
        ] {
            let (p50a, p99a) = (quantile(idle, 0.5), quantile(idle, 0.99));
            let (p50b, p99b) = (quantile(abused, 0.5), quantile(abused, 0.99));
            println!(
                "{what:>14}: idle p50 {p50a:7.2} ms p99 {p99a:7.2} ms | abused p50 {p50b:7.2} ms p99 {p99b:7.2} ms | added p50 {:+7.2} ms p99 {:+7.2} ms",
                p50b - p50a,
                p99b - p99a
            );
        }
        println!(
            "peak resident memory: {idle_rss} MiB idle, {} MiB after the abuse (bound on preparation: --prepare-memory, 4096 MiB)",
            support::peak_rss_mib()
        );
    });
}
