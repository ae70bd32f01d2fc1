//! What the router adds to one turn of a long conversation (issue #18, point 3), at 128K, 512K
//! and 1M tokens of history: wall time per turn, process CPU time per turn, and peak memory.
//!
//! A whole router in-process over one simulated worker with zero step cost (the router's
//! component tests' cluster), so a turn's wall time is the router's work plus the worker's block
//! bookkeeping and HTTP, an upper bound on what the router adds. The conversation is grown to
//! each size with 64K-token messages (not measured), then five turns each add a new user message
//! of `NEW` tokens under the session's key and are measured: the client resends the whole
//! history as text, as OpenAI clients do, and the router tokenizes only the new message (its turn
//! memory), hashes the whole prompt, looks it up and sends it to the worker in binary form.
//! CPU time is the whole process's (router, sim worker and client together; /proc/self/stat).
//!
//! Run: `nice cargo bench -p tidelock-router --bench million` (about a minute).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use serde_json::{Value, json};
use support::cluster::{KEY_A, MODEL, cluster};
use tidelock_router::app::Settings;

/// Tokens of each measured turn's new message.
const NEW: usize = 1_024;
const TURNS: usize = 5;

/// `n` digits (one token each with the default model's tokenizer).
fn digits(n: usize, seed: usize) -> String {
    (0..n)
        .map(|i| char::from(b'0' + ((i * 7 + seed) % 10) as u8))
        .collect()
}

/// Process CPU time (user + system), in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of stat (utime, stime), counted after the command's closing parenthesis.
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let runtime = support::bench_runtime();
    runtime.block_on(async {
        let c = cluster(1, Settings::default(), |w| {
            w.max_context = 1_100_000;
            w.blocks = 1_100_000 / support::BLOCK as usize + 64;
        })
        .await;
        let mut messages: Vec<Value> = Vec::new();
        let mut history = 0usize;
        let mut seed = 0;
        println!(
            "{:>9} | {:>12} | {:>14} | {:>11} | {:>14}",
            "history", "turn p50 ms", "turn max ms", "CPU ms/turn", "peak RSS MiB"
        );
        for target in [128usize << 10, 512 << 10, 1 << 20] {
            // Grow to the size, unmeasured.
            loop {
                let grow = (64 << 10).min(target.saturating_sub(history + TURNS * NEW + 64));
                if grow < NEW {
                    break;
                }
                seed += 1;
                messages.push(json!({"role": "user", "content": digits(grow, seed)}));
                let body = json!({"model": MODEL, "messages": messages, "max_tokens": 4, "prompt_cache_key": "bench"});
                let answer = c.post("/v1/chat/completions", KEY_A, body).await.json();
                history = answer["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
                let reply = answer["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
                messages.push(json!({"role": "assistant", "content": reply}));
            }
            let mut walls = Vec::new();
            let cpu = cpu_seconds();
            for _ in 0..TURNS {
                seed += 1;
                messages.push(json!({"role": "user", "content": digits(NEW, seed)}));
                let body = json!({"model": MODEL, "messages": messages, "max_tokens": 4, "prompt_cache_key": "bench"});
                let started = Instant::now();
                let answer = c.post("/v1/chat/completions", KEY_A, body).await;
                walls.push(started.elapsed().as_secs_f64() * 1e3);
                assert_eq!(answer.status, 200);
                let answer = answer.json();
                let usage = &answer["usage"];
                history = usage["prompt_tokens"].as_u64().unwrap() as usize;
                let cached = usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0) as usize;
                assert!(history - cached < NEW + 64, "a measured turn was not served from cache");
                let reply = answer["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
                messages.push(json!({"role": "assistant", "content": reply}));
            }
            let cpu_per_turn = (cpu_seconds() - cpu) * 1e3 / TURNS as f64;
            walls.sort_by(f64::total_cmp);
            println!(
                "{:>9} | {:>12.1} | {:>14.1} | {:>11.1} | {:>14}",
                history,
                walls[TURNS / 2],
                walls[TURNS - 1],
                cpu_per_turn,
                support::peak_rss_mib()
            );
        }
        println!("(each measured turn adds {NEW} new tokens; the body resends the whole history as text)");
    });
}
