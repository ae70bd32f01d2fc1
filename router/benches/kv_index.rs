//! What the router pays per request before it can place a 131,072-token prompt: hashing the
//! prompt's token ids into its block-hash chain, and looking that chain up in the KV index of 64
//! workers. Goal: both together under 2 ms.
//!
//! The index is realistic in size: worker `i` holds the first `i * blocks / 64` blocks of the
//! prompt (odd workers hold the last quarter of their prefix on the host tier, so the per-tier
//! accounting does work), plus 4,096 unrelated blocks each, about 265k entries in all. Measured at
//! the default block size (64 tokens, 2,048 blocks) and at 16 tokens (8,192 blocks), the worst case
//! a Model may choose that still keeps pages reasonable.
//!
//! Run: `nice cargo bench -p tidelock-router --bench kv_index -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tidelock_protocol::{
    BlockHash, BlockTokens, CacheSalt, Epoch, HashChain, KvSnapshot, ModelName, SnapshotBlock,
    Tier, WorkerId,
};
use tidelock_router::KvIndex;

const PROMPT_TOKENS: usize = 131_072;
const WORKERS: usize = 64;
const UNRELATED_PER_WORKER: usize = 4_096;

struct Setup {
    model: ModelName,
    salt: CacheSalt,
    block_tokens: BlockTokens,
    tokens: Vec<u32>,
    chain: Vec<BlockHash>,
    index: KvIndex,
}

fn setup(block_tokens: BlockTokens) -> Setup {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let model = ModelName::new("bench-model").unwrap();
    let salt = CacheSalt::new("tenant-a").unwrap();
    let tokens: Vec<u32> = (0..PROMPT_TOKENS)
        .map(|_| rng.random_range(0..150_000))
        .collect();
    let mut hashed = HashChain::new(&model, &salt, block_tokens);
    hashed.extend(&tokens);
    let chain = hashed.hashes().to_vec();

    let mut index = KvIndex::new(block_tokens);
    for i in 0..WORKERS {
        let held = i * chain.len() / WORKERS;
        let host_from = if i % 2 == 1 { held * 3 / 4 } else { held };
        let mut blocks: Vec<SnapshotBlock> = chain[..held]
            .iter()
            .enumerate()
            .map(|(n, &hash)| SnapshotBlock {
                hash,
                tier: if n < host_from {
                    Tier::Device
                } else {
                    Tier::Host
                },
            })
            .collect();
        blocks.extend((0..UNRELATED_PER_WORKER).map(|_| SnapshotBlock {
            hash: BlockHash::from_bytes(rng.random()),
            tier: Tier::Device,
        }));
        let snapshot = KvSnapshot {
            epoch: Epoch::new(1),
            sequence: 0,
            block_tokens,
            blocks,
        };
        let worker = WorkerId::new(format!("worker-{i:02}")).unwrap();
        index.load_snapshot(&worker, &snapshot).unwrap();
    }
    Setup {
        model,
        salt,
        block_tokens,
        tokens,
        chain,
        index,
    }
}

fn hash(setup: &Setup) -> HashChain {
    let mut chain = HashChain::new(&setup.model, &setup.salt, setup.block_tokens);
    chain.extend(black_box(&setup.tokens));
    chain
}

fn bench(c: &mut Criterion) {
    println!(
        "note: tokenization is not measured here (no tokenizer in this bench); \
         these numbers start from token ids"
    );
    for block_tokens in [BlockTokens::DEFAULT, BlockTokens::new(16).unwrap()] {
        let setup = setup(block_tokens);
        let found = setup.index.matches(&setup.chain);
        println!(
            "block_tokens {block_tokens}: {} blocks in the chain, {} index entries, \
             {} workers match, best holds {} blocks",
            setup.chain.len(),
            setup.index.block_count(),
            found.len(),
            found.first().map_or(0, |m| m.total_blocks),
        );
        let mut group =
            c.benchmark_group(format!("kv_index/{PROMPT_TOKENS}_tokens/bt{block_tokens}"));
        group.bench_function("hash", |b| b.iter(|| hash(&setup)));
        group.bench_function("lookup", |b| {
            b.iter(|| setup.index.matches(black_box(&setup.chain)))
        });
        group.bench_function("hash+lookup", |b| {
            b.iter(|| {
                let chain = hash(&setup);
                setup.index.matches(chain.hashes())
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
