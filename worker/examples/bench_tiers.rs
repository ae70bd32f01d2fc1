//! What the disk tier costs per KV block of the default model's geometry (SmolLM2-135M: 30
//! layers, 3 KV heads of 64, 64-token blocks, f32: 2.9 MB a block), against the volume's own
//! sequential read speed measured in the same run with `dd`.
//!
//! Steps: copy N blocks out of a host store (`export_block`), write them through the disk tier
//! (encode, checksum, write, rename; then `flush`), drop them from the page cache (fsync +
//! `POSIX_FADV_DONTNEED`), read them all back through the tier (its I/O thread: read, checksum),
//! copy them into a store (`import_block`); then the same bytes as one file read by `dd` after
//! the same cache drop. Prints each rate and the tier's read rate over `dd`'s.
//!
//! Then a peer pull: the same blocks held in a worker's prefix cache, served by its real
//! `/v1/kv/blocks` route on a loopback port, pulled and checked as the puller does (one request,
//! a keep-alive connection), against the same number of bytes sent over a plain loopback TCP
//! connection in the same run.
//!
//! Usage: bench_tiers [BLOCKS (default 96)] [DIR (default: a temporary folder under /var/tmp)]

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tidelock_protocol::blocks::BlockLayout;
use tidelock_protocol::{
    BlockHash, BlockId, BlockTokens, Epoch, GroupId, ModelName, ShardIndex, WorkerInfo,
};
use tidelock_worker::engine::executor::{Executor, Work};
use tidelock_worker::engine::logits::StepLogits;
use tidelock_worker::engine::{Engine, EngineConfig};
use tidelock_worker::kv::pool::BlockPool;
use tidelock_worker::kv::tier::{TierConfig, Tiers};
use tidelock_worker::kv::{KvShape, KvStore};
use tidelock_worker::model::ModelError;
use tidelock_worker::server;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let blocks: usize = std::env::args().nth(1).map_or(Ok(96), |a| a.parse())?;
    let parent = std::env::args().nth(2).unwrap_or_else(|| "/var/tmp".into());
    let dir = tempfile::tempdir_in(&parent)?;
    let shape = KvShape {
        layers: 30,
        kv_heads: 3,
        head_dim: 64,
        block_tokens: 64,
    };
    let mut store = KvStore::new(shape, blocks);
    let table: Vec<BlockId> = (0..blocks as u32).map(BlockId::new).collect();
    let width = shape.kv_heads * shape.head_dim;
    for layer in 0..shape.layers {
        for p in 0..blocks * shape.block_tokens {
            let k: Vec<f32> = (0..width)
                .map(|i| ((p * 31 + i * 7 + layer) % 1009) as f32 / 97.0)
                .collect();
            store.write(layer, &table, p, &k, &k);
        }
    }
    let layout = store.block_layout();
    let payload = layout.payload_bytes() as f64;
    let total = payload * blocks as f64;
    let hash = |b: usize| {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&(b as u64 + 1).to_le_bytes());
        BlockHash::from_bytes(h)
    };
    println!(
        "{blocks} blocks of {:.2} MB ({:.0} MB) in {}",
        payload / 1e6,
        total / 1e6,
        dir.path().display()
    );

    let mut one = Vec::new();
    store.export_block(BlockId::new(0), &mut one)?;
    let started = Instant::now();
    for b in 0..blocks {
        std::hint::black_box(tidelock_protocol::blocks::checksum(&layout, &hash(b), &one));
    }
    let checksum = started.elapsed();
    let started = Instant::now();
    let mut sink = Vec::with_capacity(payload as usize);
    for b in 0..blocks {
        sink.clear();
        store.export_block(BlockId::new(b as u32), &mut sink)?;
    }
    let export = started.elapsed();

    let config = TierConfig {
        host_bytes: 0,
        disk: Some((dir.path().join("tier"), 1 << 40)),
    };
    let mut tiers = Tiers::open(&config, layout)?;
    let started = Instant::now();
    for b in 0..blocks {
        tiers.demote(hash(b), |out| {
            store.export_block(BlockId::new(b as u32), out)
        });
    }
    if !tiers.flush(Duration::from_secs(600)) {
        return Err("the writes did not finish".into());
    }
    let write = started.elapsed();
    let files = walk(&dir.path().join("tier"))?;
    for f in &files {
        drop_cached(f)?;
    }

    let hashes: Vec<BlockHash> = (0..blocks).map(hash).collect();
    let started = Instant::now();
    tiers.fetch(&hashes);
    while tiers.loading() {
        tiers.poll(Some(Duration::from_millis(50)));
    }
    let read = started.elapsed();
    if tiers.fetch(&hashes).ready != blocks {
        return Err("not every block came back".into());
    }
    let mut target = KvStore::new(shape, blocks);
    let mut import = Duration::ZERO;
    for (b, h) in hashes.iter().enumerate() {
        let (bytes, _, _) = tiers.take_staged(h).ok_or("staged")?;
        let started = Instant::now();
        target.import_block(BlockId::new(b as u32), &bytes)?;
        import += started.elapsed();
    }
    drop(tiers);

    // The same bytes as one file, read by dd after the same cache drop.
    let big = dir.path().join("sequential");
    let file_bytes = layout.body_bytes(1);
    dd(&[
        "if=/dev/zero".into(),
        format!("of={}", big.display()),
        "bs=1M".into(),
        format!("count={}", (file_bytes * blocks as u64).div_ceil(1 << 20)),
        "conv=fsync".into(),
    ])?;
    drop_cached(&big)?;
    let dd_read = dd(&[
        format!("if={}", big.display()),
        "of=/dev/null".into(),
        "bs=4M".into(),
    ])?;

    let rate = |secs: f64| total / secs / 1e9;
    let per_block = |d: Duration| d.as_secs_f64() / blocks as f64 * 1e3;
    println!("| step | GB/s | ms per block |");
    println!("|---|---|---|");
    for (step, d) in [
        ("copy out of the store (export_block)", export),
        (
            "write through the disk tier (encode, checksum, write, rename)",
            write,
        ),
        ("read back, cold (the tier's readers and checker)", read),
        ("copy into the store (import_block)", import),
        (
            "the BLAKE3 checksum alone, in memory (part of write and read)",
            checksum,
        ),
    ] {
        println!(
            "| {step} | {:.2} | {:.3} |",
            rate(d.as_secs_f64()),
            per_block(d)
        );
    }
    println!(
        "| `dd` sequential read of the same bytes as one file, cold | {:.2} | |",
        dd_read / 1e9
    );
    println!(
        "disk tier read / dd sequential read: {:.2}",
        rate(read.as_secs_f64()) * 1e9 / dd_read
    );
    println!(
        "load (read + import) per block: {:.3} ms",
        per_block(read + import)
    );
    drop(dir);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(pull(store, &hashes))
}

/// A store without a model: enough for the engine to hold, export and import blocks.
struct Held(KvStore);

impl Executor for Held {
    fn run(&mut self, _: &[Work<'_>]) -> Result<StepLogits, ModelError> {
        Err(ModelError::Input("no model here".into()))
    }
    fn block_layout(&self) -> Option<BlockLayout> {
        Some(self.0.block_layout())
    }
    fn export_block(&self, block: BlockId, out: &mut Vec<u8>) -> Result<(), ModelError> {
        self.0.export_block(block, out)
    }
    fn import_block(&mut self, block: BlockId, payload: &[u8]) -> Result<(), ModelError> {
        self.0.import_block(block, payload)
    }
}

/// The peer pull against plain loopback TCP.
async fn pull(store: KvStore, hashes: &[BlockHash]) -> Result<(), Box<dyn std::error::Error>> {
    let blocks = hashes.len();
    let layout = store.block_layout();
    let bt = BlockTokens::new(64)?;
    let mut pool = BlockPool::new(blocks, bt, Epoch::new(1));
    let ids = pool.allocate(blocks)?;
    pool.commit(None, &ids, hashes);
    pool.release(&ids);
    let cfg = EngineConfig {
        model: ModelName::new("bench")?,
        block_tokens: bt,
        max_step_tokens: 64,
        max_running: 1,
        max_waiting: 1,
        max_context: 1024,
        vocab_size: 1,
        eos_token_ids: Vec::new(),
    };
    let engine = Engine::new(cfg, pool, Held(store)).with_tiers(Tiers::staging(layout));
    let info = WorkerInfo {
        model: ModelName::new("bench")?,
        block_tokens: bt,
        dtype: "f32".into(),
        kv_capacity_bytes: 0,
        kv_capacity_blocks: blocks as u64,
        max_context_tokens: 1024,
        epoch: Epoch::new(1),
        group: GroupId::new("g")?,
        shard: ShardIndex::new(0),
        shard_count: 1,
    };
    let state = server::start(engine, info, "{}".into(), None)?.state;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, server::app(state)).await });
    let peers = server::peers::Peers::new(Some(layout), None);
    let mut best = f64::MAX;
    // The first pull opens the connection; the best of three after it. The puller's own code.
    for round in 0..4 {
        let started = Instant::now();
        let received = peers.fetch(&base, hashes).await?;
        if received.blocks.len() != blocks || received.problem.is_some() {
            return Err(format!("the pull fell short: {:?}", received.problem).into());
        }
        let secs = started.elapsed().as_secs_f64();
        if round > 0 {
            best = best.min(secs);
        }
    }
    let bytes = layout.body_bytes(blocks) as usize;
    let tcp = loopback_tcp(bytes).await?;
    let pull_rate = bytes as f64 / best;
    println!(
        "| peer pull of {blocks} blocks over /v1/kv/blocks (the puller's code: export, checksum, stream, check), best of 3 | {:.2} | {:.3} |",
        pull_rate / 1e9,
        best / blocks as f64 * 1e3
    );
    println!(
        "| plain loopback TCP, the same {:.0} MB, best of 3 | {:.2} | |",
        bytes as f64 / 1e6,
        tcp / 1e9
    );
    println!("peer pull / loopback TCP: {:.2}", pull_rate / tcp);
    Ok(())
}

/// Bytes per second of one loopback TCP connection carrying `bytes` (best of three).
async fn loopback_tcp(bytes: usize) -> Result<f64, Box<dyn std::error::Error>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let payload = vec![7u8; bytes];
    let sender = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        for _ in 0..3 {
            socket.write_all(&payload).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    let mut buf = vec![0u8; 1 << 20];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        let mut got = 0;
        while got < bytes {
            let n = socket.read(&mut buf[..(bytes - got).min(1 << 20)]).await?;
            if n == 0 {
                return Err("the connection closed".into());
            }
            got += n;
        }
        best = best.min(started.elapsed().as_secs_f64());
    }
    sender.await??;
    Ok(bytes as f64 / best)
}

/// Drops a file's pages from the page cache (written back first), so the next read goes to the
/// device.
fn drop_cached(path: &Path) -> std::io::Result<()> {
    let file = File::open(path)?;
    file.sync_all()?;
    nix::fcntl::posix_fadvise(
        file.as_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .map_err(std::io::Error::from)
}

fn walk(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for fan in std::fs::read_dir(dir)? {
        let fan = fan?.path();
        if fan.is_dir() {
            for f in std::fs::read_dir(fan)? {
                out.push(f?.path());
            }
        }
    }
    Ok(out)
}

/// Runs dd; returns the bytes per second it reports.
fn dd(args: &[String]) -> Result<f64, Box<dyn std::error::Error>> {
    let out = Command::new("dd").args(args).output()?;
    if !out.status.success() {
        return Err(format!("dd {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    // "N bytes (...) copied, S s, R GB/s"
    let text = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().last().unwrap_or_default();
    let bytes: f64 = line.split_whitespace().next().unwrap_or("0").parse()?;
    let secs: f64 = line
        .split(", ")
        .find_map(|s| s.strip_suffix(" s")?.parse().ok())
        .ok_or_else(|| format!("cannot read dd's output: {line}"))?;
    Ok(bytes / secs)
}
