//! The spill tiers and peer pulls on the real default model (issue #21): a prompt whose blocks
//! were evicted to the disk tier, that a restarted worker finds on its disk, or whose prefix was
//! pulled from another worker gives the cold computation's tokens and log-probabilities, and a
//! block never serves another tenant's salt.

mod support;

use std::path::Path;
use std::sync::{Arc, OnceLock};

use support::{model_path, tokens};
use tidelock_protocol::{
    BlockTokens, CacheSalt, Epoch, GenerateEvent, GenerateRequest, KvEvent, ModelName, PullHint,
    Tier, TopLogprob, Usage,
};
use tidelock_worker::engine::executor::{Executor, ModelExecutor};
use tidelock_worker::engine::{Engine, EngineConfig, Export};
use tidelock_worker::kv::KvStore;
use tidelock_worker::kv::pool::BlockPool;
use tidelock_worker::kv::tier::{TierConfig, Tiers};
use tidelock_worker::model::Llama;
use tidelock_worker::model::llama::WeightFormat;
use tidelock_worker::testing::greedy;
use tokio::sync::mpsc::unbounded_channel;

const BLOCK: usize = 16;
/// 120-token prompts: 7 reusable blocks of 16 (the last token is always computed).
const PROMPT: usize = 120;
const REUSABLE: u32 = ((PROMPT - 1) / BLOCK * BLOCK) as u32;

fn model() -> Arc<Llama> {
    static MODEL: OnceLock<Arc<Llama>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            Arc::new(Llama::from_gguf(&model_path(), WeightFormat::Packed).expect("load the model"))
        })
        .clone()
}

/// A worker's engine with `blocks` KV blocks and a disk tier in `dir`, as `--kv-disk` makes it.
fn engine(blocks: usize, dir: &Path, epoch: u64) -> Engine<ModelExecutor> {
    with_tiers(blocks, epoch, |layout| {
        Tiers::open(
            &TierConfig {
                host_bytes: 0,
                disk: Some((dir.to_owned(), 1 << 30)),
            },
            layout,
        )
        .unwrap()
    })
}

/// An engine without lower tiers that can take blocks pulled from a peer.
fn bare(blocks: usize, epoch: u64) -> Engine<ModelExecutor> {
    with_tiers(blocks, epoch, Tiers::staging)
}

fn with_tiers(
    blocks: usize,
    epoch: u64,
    tiers: impl FnOnce(tidelock_protocol::blocks::BlockLayout) -> Tiers,
) -> Engine<ModelExecutor> {
    let model = model();
    let cfg = EngineConfig {
        model: ModelName::new("smollm2").unwrap(),
        block_tokens: BlockTokens::new(BLOCK as u32).unwrap(),
        max_step_tokens: 512,
        max_running: 8,
        max_waiting: 16,
        max_context: 8192,
        vocab_size: model.config().vocab_size,
        eos_token_ids: vec![2],
    };
    let kv = KvStore::new(model.kv_shape(BLOCK), blocks);
    let pool = BlockPool::new(blocks, cfg.block_tokens, Epoch::new(epoch));
    let exec = ModelExecutor { model, kv };
    let tiers = tiers(exec.block_layout().unwrap());
    Engine::new(cfg, pool, exec).with_tiers(tiers)
}

#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    tokens: Vec<u32>,
    top: Vec<Vec<TopLogprob>>,
    usage: Usage,
}

/// A greedy request of 8 tokens with the 20 most likely alternatives of each.
fn request(prompt: &[u32], salt: &str) -> GenerateRequest {
    let mut r = greedy(prompt.to_vec(), 8);
    r.sampling.logprobs = Some(20);
    r.cache_salt = CacheSalt::new(salt).unwrap();
    r
}

fn run(e: &mut Engine<ModelExecutor>, r: GenerateRequest) -> Outcome {
    let rx = submit(e, r);
    finish(e, rx)
}

/// The largest difference between two runs' top log-probabilities, which must name the same
/// tokens in the same order.
fn logprob_diff(a: &Outcome, b: &Outcome) -> f32 {
    assert_eq!(a.top.len(), b.top.len());
    a.top
        .iter()
        .zip(&b.top)
        .flat_map(|(x, y)| {
            let ids = |v: &[TopLogprob]| v.iter().map(|t| t.id).collect::<Vec<_>>();
            assert_eq!(ids(x), ids(y), "the same alternatives");
            x.iter().zip(y).map(|(p, q)| (p.logprob - q.logprob).abs())
        })
        .fold(0.0, f32::max)
}

#[test]
fn a_prompt_served_from_the_disk_tier_gives_the_cold_results() {
    let dir = tempfile::tempdir().unwrap();
    // 12 blocks: one 128-token sequence (8 blocks) at a time, so each prompt evicts the last.
    let mut e = engine(12, dir.path(), 1);
    let a = tokens(PROMPT, 1);
    let cold = run(&mut e, request(&a, "tenant-a"));
    assert_eq!(cold.usage.cached_tokens, 0);
    for seed in [2, 3] {
        run(&mut e, request(&tokens(PROMPT, seed), "tenant-a"));
    }
    let stored = e.tiers().stats().stored_disk;
    // B and C evicted every block of A (and some of B's) to the disk.
    assert!(stored >= 7, "{stored} blocks spilled");

    let from_disk = run(&mut e, request(&a, "tenant-a"));
    let loaded = e.tiers().stats().loaded_disk;
    assert_eq!(
        from_disk.usage.cached_tokens, REUSABLE,
        "served from the disk tier"
    );
    assert_eq!(loaded, 7);
    assert_eq!(from_disk.tokens, cold.tokens);
    let diff = logprob_diff(&from_disk, &cold);
    println!("disk tier: {loaded} blocks loaded, max |logprob diff| vs cold {diff:.2e}");
    assert!(diff <= 1e-4, "{diff}");
    // Now on the device again: bit-exact with what came from the disk.
    let device = run(&mut e, request(&a, "tenant-a"));
    assert_eq!(device.usage.cached_tokens, REUSABLE);
    assert_eq!(
        device.top, from_disk.top,
        "the disk round trip is bit-exact"
    );
    assert_eq!(e.tiers().stats().damaged, 0);

    // Another tenant's salt names other blocks: nothing is served from the first tenant's.
    let other = run(&mut e, request(&a, "tenant-b"));
    assert_eq!(other.usage.cached_tokens, 0);
    assert_eq!(e.tiers().stats().loaded_disk, loaded);
}

#[test]
fn a_restarted_worker_finds_its_cache_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let a = tokens(PROMPT, 11);
    let cold = {
        let mut e = engine(64, dir.path(), 1);
        let cold = run(&mut e, request(&a, "tenant-a"));
        // Nothing was evicted; shutting down writes the cache through.
        assert_eq!(e.tiers().stats().stored_disk, 0);
        // 127 tokens computed (the last answer token never is): 7 full blocks.
        assert_eq!(e.persist(), 7);
        assert!(e.tiers().flush(std::time::Duration::from_secs(30)));
        cold
    };
    let mut e = engine(64, dir.path(), 2);
    // The new epoch's stream opens with what the disk holds, as its snapshot does.
    let batch = e.take_events().expect("events");
    let stored: usize = batch
        .events
        .iter()
        .map(|ev| match ev {
            KvEvent::Stored {
                blocks,
                tier: Tier::Disk,
                ..
            } => blocks.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(stored, 7);
    let snapshot = e.snapshot();
    assert_eq!(snapshot.epoch, Epoch::new(2));
    assert_eq!(
        snapshot
            .blocks
            .iter()
            .filter(|b| b.tier == Tier::Disk)
            .count(),
        7
    );
    let again = run(&mut e, request(&a, "tenant-a"));
    assert_eq!(again.usage.cached_tokens, REUSABLE);
    assert_eq!(again.tokens, cold.tokens);
    let diff = logprob_diff(&again, &cold);
    println!("after a restart: max |logprob diff| vs cold {diff:.2e}");
    assert!(diff <= 1e-4, "{diff}");
}

/// The leading blocks of `hashes` the holder holds, as a peer receives them: exported, in the
/// block format, decoded and checked.
fn cross(
    holder: &mut Engine<ModelExecutor>,
    hashes: &[tidelock_protocol::BlockHash],
) -> Vec<(tidelock_protocol::BlockHash, bytes::Bytes)> {
    let layout = holder.executor().block_layout().unwrap();
    let held: Vec<(tidelock_protocol::BlockHash, bytes::Bytes)> = holder
        .export(hashes)
        .into_iter()
        .map(|e| match e {
            Export::Bytes(h, b) => (h, b),
            Export::OnDisk(_) => panic!("the holder has no disk tier"),
        })
        .collect();
    let refs: Vec<_> = held.iter().map(|(h, b)| (*h, &b[..])).collect();
    let body = tidelock_protocol::blocks::encode(&layout, &refs).unwrap();
    tidelock_protocol::blocks::decode(&body)
        .unwrap()
        .blocks
        .iter()
        .map(|(h, p)| (*h, bytes::Bytes::copy_from_slice(p)))
        .collect()
}

/// Carries out the target's pulls against the holder as the server's puller does: the holder
/// exports, the body crosses in the block format, the target checks and takes what arrived.
fn carry_pulls(holder: &mut Engine<ModelExecutor>, target: &mut Engine<ModelExecutor>) -> usize {
    let mut moved = 0;
    for job in target.take_pulls() {
        let arrived = cross(holder, &job.hashes);
        let missed: Vec<_> = job
            .hashes
            .iter()
            .filter(|h| !arrived.iter().any(|(a, _)| a == *h))
            .copied()
            .collect();
        moved += arrived.len();
        target.pulled(arrived, &missed, 0.001);
    }
    moved
}

fn submit(
    e: &mut Engine<ModelExecutor>,
    r: GenerateRequest,
) -> tokio::sync::mpsc::UnboundedReceiver<GenerateEvent> {
    let (tx, rx) = unbounded_channel();
    e.submit(r, tx);
    rx
}

fn finish(
    e: &mut Engine<ModelExecutor>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<GenerateEvent>,
) -> Outcome {
    let mut steps = 0;
    while !e.is_idle() {
        e.step().expect("step");
        steps += 1;
        assert!(steps < 10_000, "the engine does not finish");
    }
    let mut out = Outcome {
        tokens: Vec::new(),
        top: Vec::new(),
        usage: Usage::default(),
    };
    while let Ok(event) = rx.try_recv() {
        match event {
            GenerateEvent::Tokens {
                ids, top_logprobs, ..
            } => {
                out.tokens.extend(ids);
                out.top.extend(top_logprobs.unwrap_or_default());
            }
            GenerateEvent::Finished { usage, .. } => out.usage = usage,
            GenerateEvent::Error { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    out
}

/// Point 3: a worker placed where the prefix is not pulls it from the worker that holds it,
/// and computes the cold run's answer from it; another tenant's hint pulls nothing.
#[test]
fn a_prefix_pulled_from_a_peer_gives_the_cold_results() {
    let a = tokens(PROMPT, 21);
    let mut holder = bare(64, 1);
    let cold = run(&mut holder, request(&a, "tenant-a"));
    assert_eq!(cold.usage.cached_tokens, 0);
    let device = run(&mut holder, request(&a, "tenant-a"));

    let mut target = bare(64, 2);
    let hint = |mut r: GenerateRequest| {
        r.pull = Some(PullHint {
            from: "http://holder".into(),
            blocks: 7,
        });
        r
    };
    let rx = submit(&mut target, hint(request(&a, "tenant-a")));
    // Waiting for the blocks: nothing runs until they come.
    target.step().unwrap();
    assert_eq!(target.pool().stats().in_use, 0);
    assert_eq!(carry_pulls(&mut holder, &mut target), 7);
    let pulled = finish(&mut target, rx);
    assert_eq!(
        pulled.usage.cached_tokens, REUSABLE,
        "the prefix came from the peer"
    );
    assert_eq!(target.tiers().stats().loaded_peer, 7);
    assert_eq!(pulled.tokens, cold.tokens);
    let diff = logprob_diff(&pulled, &cold);
    println!("pulled from a peer: 7 blocks, max |logprob diff| vs cold {diff:.2e}");
    assert!(diff <= 1e-4, "{diff}");
    assert_eq!(
        pulled.top, device.top,
        "bit-exact with the holder's cached run"
    );

    // Tenant b's hint names tenant b's blocks: the holder has none, nothing crosses.
    let rx = submit(&mut target, hint(request(&a, "tenant-b")));
    assert_eq!(carry_pulls(&mut holder, &mut target), 0);
    let other = finish(&mut target, rx);
    assert_eq!(other.usage.cached_tokens, 0);
    assert_eq!(target.tiers().stats().pull_missed, 7);
}

/// Point 4: blocks a draining peer hands over (as `/v1/kv/adopt` takes them: exported, in the
/// block format, checked) land in a free store block or, with the store full, on the disk
/// tier, and serve the cold run's answer; another tenant's salt finds none of them.
#[test]
fn blocks_handed_over_by_a_draining_peer_give_the_cold_results() {
    let a = tokens(PROMPT, 31);
    let mut holder = bare(64, 1);
    let cold = run(&mut holder, request(&a, "tenant-a"));
    let mut chain = tidelock_protocol::HashChain::new(
        &ModelName::new("smollm2").unwrap(),
        &CacheSalt::new("tenant-a").unwrap(),
        BlockTokens::new(BLOCK as u32).unwrap(),
    );
    chain.extend(&a);
    let handed = cross(&mut holder, &chain.hashes()[..7]);
    assert_eq!(handed.len(), 7);

    // A peer whose store is full of its own session: the blocks go to its disk tier.
    let dir = tempfile::tempdir().unwrap();
    let mut full = engine(8, dir.path(), 2);
    run(&mut full, request(&tokens(PROMPT, 32), "tenant-a"));
    let free = full.pool().stats().free;
    assert_eq!(full.adopt(handed.clone()), 7);
    assert!(
        full.tiers().stats().stored_disk >= 7 - free as u64,
        "{free} free blocks; {:?}",
        full.tiers().stats()
    );
    let served = run(&mut full, request(&a, "tenant-a"));
    assert_eq!(served.usage.cached_tokens, REUSABLE);
    assert_eq!(served.tokens, cold.tokens);
    let diff = logprob_diff(&served, &cold);
    println!("handed over onto a full peer's disk: max |logprob diff| vs cold {diff:.2e}");
    assert!(diff <= 1e-4, "{diff}");

    // A peer with room: straight into its store; taking them twice keeps one copy.
    let mut roomy = bare(64, 3);
    assert_eq!(roomy.adopt(handed.clone()), 7);
    assert_eq!(roomy.adopt(handed), 7);
    assert_eq!(roomy.pool().stats().cached, 7);
    let served = run(&mut roomy, request(&a, "tenant-a"));
    assert_eq!(served.usage.cached_tokens, REUSABLE);
    assert_eq!(served.tokens, cold.tokens);
    assert!(logprob_diff(&served, &cold) <= 1e-4);
    let other = run(&mut roomy, request(&a, "tenant-b"));
    assert_eq!(other.usage.cached_tokens, 0);
}
