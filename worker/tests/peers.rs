//! KV blocks between workers over HTTP (issue #21, point 3), on simulated workers: a worker
//! handed a pull hint fetches the prefix from the holder's `/v1/kv/blocks` and serves it as
//! cached; the route refuses what it should.

mod support;

use support::post_json;
use tidelock_protocol::{
    BlockTokens, CacheSalt, Epoch, GenerateEvent, HashChain, LoadReport, ModelName,
};
use tidelock_worker::server::{AppState, app};
use tidelock_worker::testing::SimWorker;

const BLOCK: u32 = 16;

fn worker(epoch: u64) -> AppState {
    SimWorker {
        blocks: 64,
        epoch: Epoch::new(epoch),
        ..SimWorker::new(BLOCK)
    }
    .start()
}

/// Serves `state` on a loopback port; its base URL.
async fn listen(state: AppState) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app(state)).await });
    format!("http://{addr}")
}

async fn generate(state: &AppState, body: serde_json::Value) -> tidelock_protocol::Usage {
    let (status, body) = post_json(state, "/v1/generate", body).await;
    assert!(
        status.is_success(),
        "{status}: {}",
        String::from_utf8_lossy(&body)
    );
    for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice(line).unwrap() {
            GenerateEvent::Finished { usage, .. } => return usage,
            GenerateEvent::Error { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    panic!("no finished event");
}

/// `prompt`'s block hashes under tenant salt `salt`, as the workers name them.
fn chain_of(prompt: &[u32], salt: &str) -> HashChain {
    let mut chain = HashChain::new(
        &ModelName::new("sim").unwrap(),
        &CacheSalt::new(salt).unwrap(),
        BlockTokens::new(BLOCK).unwrap(),
    );
    chain.extend(prompt);
    chain
}

fn request(tokens: &[u32], salt: &str, pull: Option<(&str, u32)>) -> serde_json::Value {
    let mut r = serde_json::json!({
        "cache_salt": salt,
        "tokens": tokens,
        "sampling": {"temperature": 0, "max_tokens": 4, "ignore_eos": true},
    });
    if let Some((from, blocks)) = pull {
        r["pull"] = serde_json::json!({"from": from, "blocks": blocks});
    }
    r
}

#[tokio::test]
async fn a_hinted_worker_pulls_the_prefix_from_its_holder() {
    let holder = worker(1);
    let url = listen(holder.clone()).await;
    let prompt: Vec<u32> = (0..100).map(|i| 40 + i % 300).collect();
    let reusable = (100 - 1) / BLOCK * BLOCK;
    assert_eq!(
        generate(&holder, request(&prompt, "a", None))
            .await
            .cached_tokens,
        0
    );

    let target = worker(2);
    let usage = generate(
        &target,
        request(&prompt, "a", Some((&url, reusable / BLOCK))),
    )
    .await;
    assert_eq!(
        usage.cached_tokens, reusable,
        "the prefix crossed from the holder"
    );
    let (_, load) = post_or_get(&target, "/v1/load").await;
    let load: LoadReport = serde_json::from_slice(&load).unwrap();
    assert!(
        load.peer_block_secs > 0.0,
        "the transfer is measured: {load:?}"
    );

    // Another tenant's prompt names other blocks: nothing to pull, all computed.
    let usage = generate(
        &target,
        request(&prompt, "b", Some((&url, reusable / BLOCK))),
    )
    .await;
    assert_eq!(usage.cached_tokens, 0);
    // A holder that is gone: the request is computed, not failed.
    let other: Vec<u32> = (0..100).map(|i| 50 + i % 200).collect();
    let usage = generate(
        &target,
        request(&other, "a", Some(("http://127.0.0.1:9", 6))),
    )
    .await;
    assert_eq!(usage.cached_tokens, 0);
}

async fn post_or_get(state: &AppState, uri: &str) -> (axum::http::StatusCode, Vec<u8>) {
    support::send(
        state,
        axum::http::Request::get(uri)
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn the_blocks_route_sends_the_leading_blocks_it_holds_and_refuses_floods() {
    let holder = worker(3);
    let prompt: Vec<u32> = (0..70).map(|i| 40 + i).collect();
    generate(&holder, request(&prompt, "a", None)).await;
    let chain = chain_of(&prompt, "a");
    // The first four blocks are held; a made-up fifth is not, nor anything after it.
    let mut asked: Vec<String> = chain.hashes()[..4].iter().map(|h| h.to_string()).collect();
    asked.push("00".repeat(16));
    asked.push(chain.hashes()[0].to_string());
    let (status, body) = post_json(
        &holder,
        "/v1/kv/blocks",
        serde_json::json!({"hashes": asked}),
    )
    .await;
    assert!(status.is_success());
    let decoded = tidelock_protocol::blocks::decode(&body).unwrap();
    let got: Vec<_> = decoded.blocks.iter().map(|(h, _)| *h).collect();
    assert_eq!(got, chain.hashes()[..4]);

    let flood: Vec<String> = (0..5000).map(|_| "00".repeat(16)).collect();
    let (status, body) = post_json(
        &holder,
        "/v1/kv/blocks",
        serde_json::json!({"hashes": flood}),
    )
    .await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let (status, _) = post_json(&holder, "/v1/kv/blocks", serde_json::json!({"nope": 1})).await;
    assert_eq!(status, 400);
}

/// Point 4: a draining engine hands back what waits (`overloaded`: a router tries another
/// worker before any token), refuses what comes, and finishes what runs.
#[test]
fn draining_hands_back_what_waits_and_finishes_what_runs() {
    use tidelock_protocol::{ErrorCode, FinishReason};
    use tidelock_worker::engine::sim::{SimExecutor, Timing};
    use tidelock_worker::engine::{Engine, EngineConfig};
    use tidelock_worker::kv::pool::BlockPool;
    let bt = BlockTokens::new(BLOCK).unwrap();
    let cfg = EngineConfig {
        model: ModelName::new("sim").unwrap(),
        block_tokens: bt,
        max_step_tokens: 64,
        max_running: 1,
        max_waiting: 8,
        max_context: 4096,
        vocab_size: 1000,
        eos_token_ids: Vec::new(),
    };
    let mut e = Engine::new(
        cfg,
        BlockPool::new(64, bt, Epoch::new(1)),
        SimExecutor::new(1000, Timing::INSTANT),
    );
    let mut receivers = Vec::new();
    for i in 0..3 {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        e.submit(
            tidelock_worker::testing::greedy((0..20).map(|t| 40 + t + i).collect(), 5),
            tx,
        );
        receivers.push(rx);
    }
    e.step().unwrap();
    assert_eq!(e.drain(), 2, "two were waiting");
    let (tx, mut late) = tokio::sync::mpsc::unbounded_channel();
    e.submit(tidelock_worker::testing::greedy(vec![50; 20], 5), tx);
    while !e.is_idle() {
        e.step().unwrap();
    }
    let mut outcomes = Vec::new();
    for rx in receivers.iter_mut().chain([&mut late]) {
        let mut outcome = None;
        while let Ok(event) = rx.try_recv() {
            match event {
                GenerateEvent::Finished { reason, usage } => {
                    outcome = Some(Ok((reason, usage.completion_tokens)))
                }
                GenerateEvent::Error { code, .. } => outcome = Some(Err(code)),
                _ => {}
            }
        }
        outcomes.push(outcome.expect("an answer"));
    }
    assert_eq!(
        outcomes,
        [
            Ok((FinishReason::Length, 5)),
            Err(ErrorCode::Overloaded),
            Err(ErrorCode::Overloaded),
            Err(ErrorCode::Overloaded),
        ]
    );
    assert_eq!(e.pool().stats().in_use, 0);
}

/// While draining, `/v1/generate` answers 503 before the engine (a router tries another worker),
/// `/readyz` fails and `/v1/load` says so; the blocks route still answers, so the worker's
/// sessions can be pulled by the workers that take them.
#[tokio::test]
async fn a_draining_worker_refuses_work_but_lends_its_blocks() {
    let state = worker(4);
    let prompt: Vec<u32> = (0..40).map(|i| 40 + i).collect();
    generate(&state, request(&prompt, "a", None)).await;
    state
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (status, _) = post_json(&state, "/v1/generate", request(&prompt, "a", None)).await;
    assert_eq!(status, 503);
    let (status, _) = post_or_get(&state, "/readyz").await;
    assert_eq!(status, 503);
    let (_, load) = post_or_get(&state, "/v1/load").await;
    let load: LoadReport = serde_json::from_slice(&load).unwrap();
    assert!(load.draining);
    let chain = chain_of(&prompt, "a");
    let asked: Vec<String> = chain.hashes().iter().map(|h| h.to_string()).collect();
    let (status, body) = post_json(
        &state,
        "/v1/kv/blocks",
        serde_json::json!({"hashes": asked}),
    )
    .await;
    assert!(status.is_success());
    assert_eq!(
        tidelock_protocol::blocks::decode(&body)
            .unwrap()
            .blocks
            .len(),
        2
    );
}

#[tokio::test]
async fn a_draining_worker_hands_its_blocks_to_the_peers_in_the_plan() {
    let holder = worker(5);
    let holder_url = listen(holder.clone()).await;
    let peer = worker(6);
    let peer_url = listen(peer.clone()).await;
    let prompt: Vec<u32> = (0..100).map(|i| 40 + i % 300).collect();
    generate(&holder, request(&prompt, "a", None)).await;
    let chain = chain_of(&prompt, "a");
    let held = &chain.hashes()[..6];
    let plan = serde_json::json!({
        "from": holder_url,
        "peers": [{"to": peer_url, "hashes": held}],
    });

    // Only a draining worker hands over, and only once.
    let (status, _) = post_json(&holder, "/v1/kv/handoff", plan.clone()).await;
    assert_eq!(status, 409);
    holder
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (status, body) = post_json(&holder, "/v1/kv/handoff", plan.clone()).await;
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    let (status, _) = post_json(&holder, "/v1/kv/handoff", plan).await;
    assert_eq!(status, 409);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    assert_eq!(
        holder.handoff.wait(deadline).await,
        tidelock_worker::server::handoff::Phase::Done { kept: 6 }
    );

    // The peer holds the blocks, byte for byte, and serves them as cached to their tenant only.
    let asked = serde_json::json!({"hashes": held});
    let (_, from_holder) = post_json(&holder, "/v1/kv/blocks", asked.clone()).await;
    let (_, from_peer) = post_json(&peer, "/v1/kv/blocks", asked).await;
    let (from_holder, from_peer) = (
        tidelock_protocol::blocks::decode(&from_holder).unwrap(),
        tidelock_protocol::blocks::decode(&from_peer).unwrap(),
    );
    assert_eq!(from_peer.blocks.len(), 6);
    assert_eq!(from_peer.blocks, from_holder.blocks);
    assert_eq!(
        generate(&peer, request(&prompt, "a", None))
            .await
            .cached_tokens,
        96
    );
    assert_eq!(
        generate(&peer, request(&prompt, "b", None))
            .await
            .cached_tokens,
        0
    );

    // A draining peer takes nothing.
    peer.draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (status, _) = post_json(
        &peer,
        "/v1/kv/adopt",
        serde_json::json!({"from": holder_url, "hashes": held}),
    )
    .await;
    assert_eq!(status, 503);
}
