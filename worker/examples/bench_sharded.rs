//! Issue #7's benchmark: one session of TOKENS tokens (default 1,048,576) on the generated tiny
//! Llama of issue 7 (2 layers, 4 heads over 2 KV heads of 64), held by one worker's store, then
//! striped over SHARDS shard servers (default 4) reached through in-process links (and then over HTTP). Both run
//! here, in one process on this machine's cores, one after the other.
//!
//! The context's KV is filled, not computed: a real prefill of 1M tokens is O(n^2) attention,
//! out of reach on 2 CPU cores, so the one-worker store is written directly and the shards get
//! theirs through the shard block import path (`ShardServer::import`), with the same synthetic
//! keys and values. Then it measures:
//! - the decode step at that context (median of STEPS), one worker vs the shards, and the logits
//!   of both (they must agree: the same KV, exact merging);
//! - each shard's own compute time per step (its share of attention, measured around its RPC
//!   call): on S machines the shards run at once, so the step would take about the slowest
//!   shard's time plus the coordinator's layers (a projection, printed as such);
//! - the same decode step with the shards behind HTTP on loopback (each its own server, as
//!   `tidelock-worker --shards` serves it, all in this process and on these cores): what the
//!   transport adds;
//! - KV bytes per worker, against one worker holding the whole context;
//! - prefill tokens/s at 16,384 tokens, one worker vs the shards (a real prefill, in chunks).
//!
//! Usage: bench_sharded [TOKENS] [SHARDS] [STEPS]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidelock_protocol::BlockId;
use tidelock_protocol::shard::{AttendReply, AttendRequest};
use tidelock_worker::kv::KvStore;
use tidelock_worker::kv::shard::{
    Coordinated, CoordinatedSeq, InProcess, ShardFault, ShardGroup, ShardLink, ShardServer,
    placement,
};
use tidelock_worker::model::llama::{Logits, Rows, WeightFormat};
use tidelock_worker::model::tiny::{TinySpec, write_tiny_llama};
use tidelock_worker::model::{Llama, SeqChunk};
use tidelock_worker::shard_rpc::{HttpLink, routes};

const BLOCK: usize = 64;
/// The token every decode step feeds.
const TOKEN: [u32; 1] = [17];

/// An in-process link to a shard that times each call (the shard's compute for that layer).
/// The shard is shared so the HTTP run serves the same store.
struct Timed {
    server: Arc<Mutex<ShardServer>>,
    reply: Option<Result<AttendReply, ShardFault>>,
    spent: Arc<Mutex<Duration>>,
}

impl ShardLink for Timed {
    fn send(&mut self, request: &AttendRequest) -> Result<(), ShardFault> {
        let t = Instant::now();
        let reply = self.server.lock().unwrap().handle(request);
        *self.spent.lock().unwrap() += t.elapsed();
        self.reply = Some(reply);
        Ok(())
    }

    fn finish(&mut self) -> Result<AttendReply, ShardFault> {
        self.reply.take().unwrap_or(Err(ShardFault::NoRequest))
    }
}

/// Synthetic keys and values of one token (`width` floats each): small, varied, deterministic.
fn kv_of(position: usize, layer: usize, width: usize, out_k: &mut Vec<f32>, out_v: &mut Vec<f32>) {
    for i in 0..width {
        let x = (position * 31 + i * 7 + layer * 13) as f32;
        out_k.push((x * 0.0137).sin() * 0.5);
        out_v.push((x * 0.0071).cos() * 0.5);
    }
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn last_logits(out: Vec<Option<candle_core::Tensor>>) -> Vec<f32> {
    out[0]
        .as_ref()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Decode steps over `group`, one per `reference` row (one worker's logits at positions
/// `tokens`, `tokens + 1`, ...); returns each step's time and the largest logit difference.
/// `each` runs after every step.
fn decode_over(
    m: &Llama,
    group: &mut ShardGroup,
    table: &[BlockId],
    tokens: usize,
    reference: &[Vec<f32>],
    mut each: impl FnMut(),
) -> Result<(Vec<Duration>, f32), Box<dyn std::error::Error>> {
    let shape = m.kv_shape(BLOCK);
    let mut times = Vec::new();
    let mut max_diff = 0.0f32;
    for (i, one) in reference.iter().enumerate() {
        let seqs = [CoordinatedSeq {
            start: tokens + i,
            rows: 0..1,
            table,
        }];
        let mut c = Coordinated::new(group, &seqs, BLOCK, shape.kv_heads, shape.head_dim);
        let t = Instant::now();
        let out = m.forward_host(
            &mut c,
            &[Rows {
                tokens: &TOKEN,
                start: tokens + i,
                logits: Logits::Last,
            }],
        )?;
        times.push(t.elapsed());
        each();
        for (a, b) in last_logits(out).iter().zip(one) {
            max_diff = max_diff.max((a - b).abs());
        }
    }
    Ok((times, max_diff))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let tokens: usize = args.next().map_or(Ok(1 << 20), |a| a.parse())?;
    let shards: usize = args.next().map_or(Ok(4), |a| a.parse())?;
    let steps: usize = args.next().map_or(Ok(5), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    write_tiny_llama(dir.path(), &TinySpec::issue7())?;
    let m = Llama::from_hf(dir.path(), WeightFormat::F32)?;
    let shape = m.kv_shape(BLOCK);
    let width = shape.kv_heads * shape.head_dim;
    let blocks = (tokens + steps).div_ceil(BLOCK);
    eprintln!(
        "bench_sharded: tiny model of #7, {tokens} tokens of context, {shards} shards, {steps} decode steps; \
         a real prefill of this context is O(n^2) attention and out of reach on 2 CPU cores, so the \
         KV is filled (one worker: written; shards: the block import path)"
    );

    // One worker holding everything; the same table names the group's blocks (block b on shard
    // b % S, as a fresh session gets them from the coordinator's pool).
    let table: Vec<BlockId> = (0..blocks as u32).map(BlockId::new).collect();
    let mut local = KvStore::new(shape, blocks);
    // The shards, each with room for its share.
    let per_shard = blocks.div_ceil(shards);
    let mut servers: Vec<ShardServer> = (0..shards)
        .map(|_| ShardServer::new(KvStore::new(shape, per_shard)))
        .collect();
    let started = Instant::now();
    let (mut k, mut v) = (Vec::new(), Vec::new());
    for b in 0..tokens.div_ceil(BLOCK) {
        let first = b * BLOCK;
        let n = BLOCK.min(tokens - first);
        for layer in 0..shape.layers {
            k.clear();
            v.clear();
            for p in first..first + n {
                kv_of(p, layer, width, &mut k, &mut v);
            }
            for (i, (kk, vv)) in k.chunks_exact(width).zip(v.chunks_exact(width)).enumerate() {
                local.write(layer, &table, first + i, kk, vv);
            }
            let (shard, place) = placement(table[b], shards);
            servers[shard].import(place, layer, 0, &k, &v)?;
        }
        if b % (blocks / 4).max(1) == 0 {
            eprintln!(
                "  filled {first} tokens ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        }
    }
    eprintln!(
        "  filled {tokens} tokens in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Decode steps: one worker, then the shards, same tokens and positions.
    let mut one_times = Vec::new();
    let mut one_logits = Vec::new();
    for i in 0..steps {
        let t = Instant::now();
        let out = m.forward(
            &mut local,
            &[SeqChunk {
                tokens: &TOKEN,
                start: tokens + i,
                table: &table,
                logits: Logits::Last,
            }],
        )?;
        one_times.push(t.elapsed());
        one_logits.push(last_logits(out));
    }
    let spent: Vec<Arc<Mutex<Duration>>> = (0..shards).map(|_| Arc::default()).collect();
    let kv_per_shard: Vec<usize> = servers.iter().map(ShardServer::kv_bytes).collect();
    let servers: Vec<Arc<Mutex<ShardServer>>> = servers
        .into_iter()
        .map(|s| Arc::new(Mutex::new(s)))
        .collect();
    let links: Vec<Box<dyn ShardLink>> = servers
        .iter()
        .zip(&spent)
        .map(|(s, spent)| {
            Box::new(Timed {
                server: s.clone(),
                reply: None,
                spent: spent.clone(),
            }) as Box<dyn ShardLink>
        })
        .collect();
    let mut group = ShardGroup::new(links);
    let mut shard_times: Vec<Vec<Duration>> = vec![Vec::new(); shards];
    let (many_times, in_process_diff) =
        decode_over(&m, &mut group, &table, tokens, &one_logits, || {
            for (times, s) in shard_times.iter_mut().zip(&spent) {
                times.push(std::mem::take(&mut *s.lock().unwrap()));
            }
        })?;
    // The same steps with every shard behind its own HTTP server on loopback (the store holds
    // the positions written above at the same places: they are rewritten with the same values).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut http_links: Vec<Box<dyn ShardLink>> = Vec::new();
    for server in &servers {
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let url = format!("http://{}", listener.local_addr()?);
        let guard = tidelock_service::cluster_auth::ClusterGuard::new(None);
        let app = routes(server.clone(), &guard);
        runtime.spawn(async move { axum::serve(listener, app).await });
        http_links.push(Box::new(HttpLink::new(
            &url,
            Duration::from_secs(30),
            None,
        )?));
    }
    let mut http_group = ShardGroup::new(http_links);
    let (http_times, http_diff) =
        decode_over(&m, &mut http_group, &table, tokens, &one_logits, || {})?;
    let max_diff = in_process_diff.max(http_diff);
    drop(http_group);
    drop(runtime);
    let http_step = median(http_times);
    let one_step = median(one_times);
    let many_step = median(many_times);
    let per_shard_step: Vec<Duration> = shard_times.into_iter().map(median).collect();
    let slowest = per_shard_step.iter().max().copied().unwrap_or_default();
    let shard_sum: Duration = per_shard_step.iter().sum();
    // What is not shard compute: the coordinator's layers, merging, encoding.
    let coordinator = many_step.saturating_sub(shard_sum);
    let projected = coordinator + slowest;
    let one_kv = local.num_blocks() * shape.block_bytes();
    let max_shard_kv = kv_per_shard.iter().copied().max().unwrap_or(0);
    drop(local);
    drop(group);

    // Prefill through the shards at 16K, against one worker.
    let prefill = 16_384.min(tokens);
    let prompt: Vec<u32> = (0..prefill).map(|i| ((i * 7919) % 500) as u32).collect();
    let pblocks = prefill.div_ceil(BLOCK);
    let ptable: Vec<BlockId> = (0..pblocks as u32).map(BlockId::new).collect();
    let mut pstore = KvStore::new(shape, pblocks);
    let t = Instant::now();
    for (c, chunk) in prompt.chunks(2048).enumerate() {
        m.forward(
            &mut pstore,
            &[SeqChunk {
                tokens: chunk,
                start: c * 2048,
                table: &ptable,
                logits: Logits::Last,
            }],
        )?;
    }
    let one_prefill = t.elapsed();
    let mut pgroup = ShardGroup::new(
        (0..shards)
            .map(|_| {
                Box::new(InProcess::new(ShardServer::new(KvStore::new(
                    shape,
                    pblocks.div_ceil(shards),
                )))) as Box<dyn ShardLink>
            })
            .collect(),
    );
    let t = Instant::now();
    for (c, chunk) in prompt.chunks(2048).enumerate() {
        let seqs = [CoordinatedSeq {
            start: c * 2048,
            rows: 0..chunk.len(),
            table: &ptable,
        }];
        let mut co = Coordinated::new(&mut pgroup, &seqs, BLOCK, shape.kv_heads, shape.head_dim);
        m.forward_host(
            &mut co,
            &[Rows {
                tokens: chunk,
                start: c * 2048,
                logits: Logits::Last,
            }],
        )?;
    }
    let many_prefill = t.elapsed();

    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    println!("| measure | one worker | {shards} shards | ratio | goal |");
    println!("|---|---|---|---|---|");
    println!(
        "| decode step at {tokens} tokens (median of {steps}) | {:.1} ms | {:.1} ms | {:.2}x | <= 1.25x |",
        ms(one_step),
        ms(many_step),
        ms(many_step) / ms(one_step)
    );
    println!(
        "| decode step, shards behind HTTP on loopback | {:.1} ms | {:.1} ms | {:.2}x | <= 1.25x |",
        ms(one_step),
        ms(http_step),
        ms(http_step) / ms(one_step)
    );
    println!(
        "| KV bytes per worker | {:.2} GiB | {:.2} GiB | {:.2}x | <= 0.3x |",
        gib(one_kv),
        gib(max_shard_kv),
        max_shard_kv as f64 / one_kv as f64
    );
    println!(
        "| per-shard compute per step | | {} ms | | |",
        per_shard_step
            .iter()
            .map(|d| format!("{:.1}", ms(*d)))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    println!(
        "| projected step on {shards} machines (coordinator {:.1} ms + slowest shard {:.1} ms) | {:.1} ms | {:.1} ms | {:.2}x | |",
        ms(coordinator),
        ms(slowest),
        ms(one_step),
        ms(projected),
        ms(projected) / ms(one_step)
    );
    println!(
        "| prefill tokens/s at {prefill} tokens | {:.0} | {:.0} | {:.2}x | |",
        prefill as f64 / one_prefill.as_secs_f64(),
        prefill as f64 / many_prefill.as_secs_f64(),
        one_prefill.as_secs_f64() / many_prefill.as_secs_f64()
    );
    println!("max |logit diff| one worker vs shards over the decode steps: {max_diff:.2e}");
    if max_diff > 1e-3 {
        return Err(format!("the shards' logits differ from one worker's by {max_diff}").into());
    }
    Ok(())
}
