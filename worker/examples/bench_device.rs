//! The `candle` backend on one device (issue #20, point 5): what `bench/gpu/check.sh` measures
//! on a GPU, and what runs here on the host device to keep the program honest.
//!
//! Prints, every figure measured in this run:
//! - the device's copy bandwidth (a large device-to-device copy, bytes read plus written);
//! - decode tokens/s at each batch size (one token per sequence per step, every sequence at
//!   `--context` tokens, the greedy token reduced on the device);
//! - decode attention alone at the largest batch: KV bytes read per second, as a fraction of
//!   the copy bandwidth;
//! - prefill tokens/s of a `--prefill`-token prompt, in the engine's 512-token chunks and whole;
//! - TTFT through the engine, cold and with the prompt's prefix cached.
//!
//! With `--exact`, first the backends' agreement on this device: the `cpu` backend on the host
//! against `candle` on `--device` in f32, a 1,984-token prompt then 64 greedy steps (a 2,048-token
//! context): the same tokens, logits within 1e-3, else it exits non-zero.
//!
//! `--synthetic` stands in a model of SmolLM2-135M's shape (30 layers, 9 heads over 3 KV heads of
//! 64, vocabulary 49,152) with seeded random f16 weights, written to a temporary folder: the
//! timings depend on the shape only, and a GPU machine that cannot fetch the real model runs it.
//!
//! Usage: bench_device (--model M.gguf|DIR | --synthetic) [--device cuda:0] [--dtype f16]
//!        [--kv-dtype f16] [--context 1024] [--batches 1,32,128] [--steps 16] [--prefill 4096]
//!        [--exact]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use tidelock_protocol::{BlockId, BlockTokens, Epoch, GenerateEvent, ModelName};
use tidelock_worker::config::{DeviceSpec, Dtype};
use tidelock_worker::engine::executor::ModelExecutor;
use tidelock_worker::engine::logits::StepLogits;
use tidelock_worker::engine::{Engine, EngineConfig};
use tidelock_worker::kv::KvStore;
use tidelock_worker::kv::backend::{PagedKv, PagedSeq, StepGeometry};
use tidelock_worker::kv::device::DeviceKv;
use tidelock_worker::kv::pool::BlockPool;
use tidelock_worker::model::llama::{Logits, Placement, WeightFormat};
use tidelock_worker::model::tiny::{TinyDtype, TinyFamily, TinySpec, write_tiny_llama};
use tidelock_worker::model::{Llama, ModelError, RopeStyle, SeqChunk};
use tidelock_worker::testing::{greedy, greedy_run, max_abs_diff, tokens};
use tokio::sync::mpsc::unbounded_channel;

const BLOCK: usize = 64;

#[derive(Parser)]
struct Args {
    /// A GGUF file or a Hugging Face folder.
    #[arg(long, required_unless_present = "synthetic")]
    model: Option<std::path::PathBuf>,
    /// A seeded random model of SmolLM2-135M's shape instead of `--model`.
    #[arg(long)]
    synthetic: bool,
    /// Check the backends' agreement first (exits non-zero when they disagree).
    #[arg(long)]
    exact: bool,
    #[arg(long, default_value = "cuda:0")]
    device: DeviceSpec,
    #[arg(long, value_enum, default_value = "f16")]
    dtype: Dtype,
    #[arg(long, value_enum, default_value = "f16")]
    kv_dtype: Dtype,
    /// Tokens of context of every decoding sequence.
    #[arg(long, default_value_t = 1024)]
    context: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,32,128")]
    batches: Vec<usize>,
    /// Timed decode steps per batch size.
    #[arg(long, default_value_t = 16)]
    steps: usize,
    /// Prompt tokens of the prefill and TTFT measures.
    #[arg(long, default_value_t = 4096)]
    prefill: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let device = args.device.open()?;
    let place = Placement {
        device: device.clone(),
        dtype: args.dtype.candle(),
    };
    let synthetic = tempfile::tempdir()?;
    let path = match &args.model {
        Some(path) => path.clone(),
        None => {
            write_tiny_llama(synthetic.path(), &smollm2_shape())?;
            synthetic.path().to_owned()
        }
    };
    if args.exact {
        exact(&path, &device)?;
    }
    let t = Instant::now();
    let model = Arc::new(load(&path, WeightFormat::F32, &place)?);
    device.synchronize()?;
    println!(
        "device {} | weights {} | KV {} | load {:.2} s",
        args.device,
        args.dtype.name(),
        args.kv_dtype.name(),
        t.elapsed().as_secs_f64()
    );
    let copy = copy_bandwidth(&device)?;
    println!(
        "copy bandwidth: {:.1} GB/s (bytes read + written)",
        copy / 1e9
    );

    let kv_dtype = args.kv_dtype.candle();
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let per_seq = (args.context + args.steps + 1).div_ceil(BLOCK);
    let shape = model.kv_shape(BLOCK);
    let mut kv = DeviceKv::new(shape, per_seq * max_batch, kv_dtype, &device)?;
    let tables: Vec<Vec<BlockId>> = (0..max_batch)
        .map(|s| {
            (0..per_seq)
                .map(|b| BlockId::new((s * per_seq + b) as u32))
                .collect()
        })
        .collect();
    // Every sequence's context, prefilled in chunks of 4,096 rows over the sequences.
    let t = Instant::now();
    let prompts: Vec<Vec<u32>> = (0..max_batch)
        .map(|s| tokens(args.context, s as u64))
        .collect();
    let per_call = (4096 / args.context).max(1);
    for first in (0..max_batch).step_by(per_call) {
        let chunks: Vec<SeqChunk<'_>> = (first..(first + per_call).min(max_batch))
            .map(|s| SeqChunk {
                tokens: &prompts[s],
                start: 0,
                table: &tables[s],
                logits: Logits::None,
            })
            .collect();
        model.forward(&mut kv, &chunks)?;
    }
    device.synchronize()?;
    println!(
        "filled {max_batch} contexts of {} tokens in {:.2} s",
        args.context,
        t.elapsed().as_secs_f64()
    );

    println!("| decode batch | step ms | tokens/s |");
    println!("|---|---|---|");
    for &batch in &args.batches {
        let mut next = vec![17u32; batch];
        let mut timed = Duration::ZERO;
        for step in 0..args.steps + 1 {
            let t = Instant::now();
            let chunks: Vec<SeqChunk<'_>> = (0..batch)
                .map(|s| SeqChunk {
                    tokens: &next[s..=s],
                    start: args.context + step,
                    table: &tables[s],
                    logits: Logits::Last,
                })
                .collect();
            let logits = StepLogits::device(model.forward(&mut kv, &chunks)?)?;
            let chosen = (0..batch)
                .map(|s| logits.greedy(s).map(|c| c.token))
                .collect::<Result<Vec<_>, _>>()?;
            next = chosen;
            // The first step warms up (kernel loads, allocations).
            if step > 0 {
                timed += t.elapsed();
            }
        }
        let step = timed.as_secs_f64() / args.steps as f64;
        println!(
            "| {batch} | {:.2} | {:.0} |",
            step * 1e3,
            batch as f64 / step
        );
    }

    // Decode attention alone, every layer, at the largest batch.
    let cfg = model.config();
    let (heads, kv_heads, d) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    let seqs: Vec<PagedSeq<'_>> = (0..max_batch)
        .map(|s| PagedSeq {
            rows: s..s + 1,
            start: args.context,
            table: &tables[s],
        })
        .collect();
    let step = StepGeometry {
        positions: vec![args.context; max_batch],
        heads,
        kv_heads,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
        cos: vec![1.0; max_batch * d / 2],
        sin: vec![0.0; max_batch * d / 2],
        rope_style: RopeStyle::Halves,
    };
    let qkv = Tensor::randn(0f32, 1.0, (max_batch, (heads + 2 * kv_heads) * d), &device)?;
    let layers = cfg.num_hidden_layers;
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        let mut attention = kv.attention(&seqs, &device)?;
        device.synchronize()?;
        let t = Instant::now();
        for l in 0..layers {
            attention.layer(l, &qkv, &step)?;
        }
        device.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let kv_bytes =
        max_batch * (args.context + 1) * layers * 2 * kv_heads * d * kv_dtype.size_in_bytes();
    let read = kv_bytes as f64 / best;
    println!(
        "decode attention, batch {max_batch} x {} tokens, {layers} layers: {:.2} ms, KV read {:.1} GB/s = {:.3} of the copy bandwidth",
        args.context + 1,
        best * 1e3,
        read / 1e9,
        read / copy
    );

    // Prefill of one prompt: in the engine's chunks, and whole.
    let prompt = tokens(args.prefill, 99);
    let blocks = args.prefill.div_ceil(BLOCK) + 2;
    for chunk in [512, args.prefill] {
        let mut kv = DeviceKv::new(shape, blocks, kv_dtype, &device)?;
        let table: Vec<BlockId> = (0..blocks as u32).map(BlockId::new).collect();
        let mut best = f64::INFINITY;
        for _ in 0..2 {
            device.synchronize()?;
            let t = Instant::now();
            for (i, part) in prompt.chunks(chunk).enumerate() {
                model.forward(
                    &mut kv,
                    &[SeqChunk {
                        tokens: part,
                        start: i * chunk,
                        table: &table,
                        logits: Logits::None,
                    }],
                )?;
            }
            device.synchronize()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "prefill {} tokens in chunks of {chunk}: {:.0} tokens/s",
            args.prefill,
            args.prefill as f64 / best
        );
    }

    // TTFT through the engine: cold, then the same prompt and 64 more tokens.
    let blocks = 2 * (args.prefill + 64).div_ceil(BLOCK) + 4;
    let kv = DeviceKv::new(shape, blocks, kv_dtype, &device)?;
    let cfg = EngineConfig {
        model: ModelName::new("bench")?,
        block_tokens: BlockTokens::new(BLOCK as u32)?,
        max_step_tokens: 512,
        max_running: 8,
        max_waiting: 8,
        max_context: args.prefill + 256,
        vocab_size: model.config().vocab_size,
        eos_token_ids: vec![],
    };
    let pool = BlockPool::new(blocks, cfg.block_tokens, Epoch::new(1));
    let mut engine = Engine::new(
        cfg,
        pool,
        ModelExecutor {
            model: model.clone(),
            kv,
        },
    );
    let mut ttft = |prompt: Vec<u32>| -> Result<(f64, u32), Box<dyn std::error::Error>> {
        let (tx, mut rx) = unbounded_channel();
        let t = Instant::now();
        engine.submit(greedy(prompt, 1), tx);
        while !engine.is_idle() {
            engine.step()?;
        }
        let elapsed = t.elapsed().as_secs_f64();
        let mut cached = 0;
        while let Ok(event) = rx.try_recv() {
            if let GenerateEvent::Finished { usage, .. } = event {
                cached = usage.cached_tokens;
            }
        }
        Ok((elapsed, cached))
    };
    let (cold, _) = ttft(prompt.clone())?;
    let mut longer = prompt.clone();
    longer.extend(tokens(64, 100));
    let (warm, cached) = ttft(longer)?;
    println!(
        "TTFT of {} + 64 tokens: cold {:.1} ms, warm {:.1} ms ({cached} cached): {:.1}x",
        args.prefill,
        cold * 1e3,
        warm * 1e3,
        cold / warm
    );
    Ok(())
}

/// SmolLM2-135M's shape, seeded random f16 weights.
fn smollm2_shape() -> TinySpec {
    TinySpec {
        layers: 30,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        hidden: 576,
        intermediate: 1536,
        vocab: 49152,
        seed: 20,
        shards: 1,
        dtype: TinyDtype::F16,
        family: TinyFamily::SmolLm,
    }
}

fn load(path: &Path, format: WeightFormat, place: &Placement) -> Result<Llama, ModelError> {
    match path.is_dir() {
        true => Llama::from_hf_on(path, format, place),
        false => Llama::from_gguf_on(path, format, place),
    }
}

/// The `cpu` backend on the host against `candle` on `device`, f32, at a 2,048-token context.
fn exact(path: &Path, device: &Device) -> Result<(), Box<dyn std::error::Error>> {
    let t = Instant::now();
    let cpu = load(path, WeightFormat::Packed, &Placement::host())?;
    let place = Placement {
        device: device.clone(),
        dtype: DType::F32,
    };
    let candle = load(path, WeightFormat::F32, &place)?;
    let prompt = tokens(2048 - 64, 20);
    let blocks = 2048 / BLOCK;
    let mut host = KvStore::new(cpu.kv_shape(BLOCK), blocks);
    let mut pages = DeviceKv::new(candle.kv_shape(BLOCK), blocks, DType::F32, device)?;
    let (want, want_tokens) = greedy_run(&cpu, &mut host, &prompt, 64, BLOCK)?;
    let (got, got_tokens) = greedy_run(&candle, &mut pages, &prompt, 64, BLOCK)?;
    let diff = max_abs_diff(&want, &got);
    let same = (0..64)
        .take_while(|&i| want_tokens[i] == got_tokens[i])
        .count();
    println!(
        "exact: cpu (host) vs candle ({device:?}), 2,048-token context, 64 greedy steps: {same}/64 tokens identical, max |logit diff| {diff:.2e} ({:.1} s)",
        t.elapsed().as_secs_f64()
    );
    if same < 64 || diff > 1e-3 {
        return Err(
            format!("the backends disagree: {same}/64 tokens, logits by {diff:.2e}").into(),
        );
    }
    Ok(())
}

/// Bytes read plus written per second by a device-to-device copy of 1 GiB (64 MiB on the host).
fn copy_bandwidth(device: &Device) -> candle_core::Result<f64> {
    let floats = match device.is_cpu() {
        true => 16 << 20,
        false => 256 << 20,
    };
    let src = Tensor::zeros(floats, DType::F32, device)?;
    let _ = src.copy()?;
    device.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let copy = src.copy()?;
        device.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
        drop(copy);
    }
    Ok(2.0 * (floats * 4) as f64 / best)
}
