//! Throughput and cache benchmarks of the worker's engine on a GGUF model, printed as one JSON
//! object for bench/engine_vs_llama_cpp.py to put side by side with llama.cpp.
//!
//! Measures: prefill tokens/s on a 2,048-token prompt; decode tokens/s at batch 1; aggregate
//! decode tokens/s at batch 8; TTFT of a 4,096-token prompt cold and with its first 4,032 tokens
//! cached. Every figure runs through the real engine (scheduler, block pool, sampling), greedy.
//!
//! Usage: bench_engine MODEL.gguf

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidelock_protocol::{BlockTokens, Epoch, GenerateEvent, GenerateRequest, ModelName};
use tidelock_worker::engine::executor::ModelExecutor;
use tidelock_worker::engine::{Engine, EngineConfig};
use tidelock_worker::kv::KvStore;
use tidelock_worker::kv::pool::BlockPool;
use tidelock_worker::model::Llama;
use tidelock_worker::model::llama::WeightFormat;
use tidelock_worker::testing::{greedy, tokens};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

const BLOCK: usize = 64;

struct Run {
    /// Time to the first token of each request.
    ttft: Vec<Duration>,
    total: Duration,
    completion_tokens: usize,
}

fn run(engine: &mut Engine<ModelExecutor>, requests: Vec<GenerateRequest>) -> Run {
    let started = Instant::now();
    let mut rxs: Vec<UnboundedReceiver<GenerateEvent>> = Vec::new();
    for r in requests {
        let (tx, rx) = unbounded_channel();
        engine.submit(r, tx);
        rxs.push(rx);
    }
    let mut ttft = vec![None; rxs.len()];
    let mut completion_tokens = 0;
    while !engine.is_idle() {
        engine.step().expect("step");
        for (i, rx) in rxs.iter_mut().enumerate() {
            while let Ok(event) = rx.try_recv() {
                match event {
                    GenerateEvent::Tokens { ids, .. } => {
                        completion_tokens += ids.len();
                        ttft[i].get_or_insert(started.elapsed());
                    }
                    GenerateEvent::Error { message, .. } => panic!("{message}"),
                    _ => {}
                }
            }
        }
    }
    Run {
        ttft: ttft.into_iter().map(Option::unwrap_or_default).collect(),
        total: started.elapsed(),
        completion_tokens,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or("usage: bench_engine MODEL.gguf")?,
    );
    let model = Arc::new(Llama::from_gguf(&path, WeightFormat::Packed)?);
    let blocks = 160; // 10,240 tokens
    let engine = |max_step_tokens: usize| {
        let cfg = EngineConfig {
            model: ModelName::new("bench").expect("name"),
            block_tokens: BlockTokens::new(BLOCK as u32).expect("block"),
            max_step_tokens,
            max_running: 64,
            max_waiting: 64,
            max_context: 16_384,
            vocab_size: model.config().vocab_size,
            eos_token_ids: vec![],
        };
        let kv = KvStore::new(model.kv_shape(BLOCK), blocks);
        let pool = BlockPool::new(blocks, cfg.block_tokens, Epoch::new(1));
        Engine::new(
            cfg,
            pool,
            ModelExecutor {
                model: model.clone(),
                kv,
            },
        )
    };

    // Prefill: one 2,048-token prompt in one step, one token out.
    let prefill = run(&mut engine(4096), vec![greedy(tokens(2048, 1), 1)]);
    let prefill_tps = 2048.0 / prefill.ttft[0].as_secs_f64();

    // Decode at batch 1: 128 tokens after a short prompt; time after the first token.
    let one = run(&mut engine(4096), vec![greedy(tokens(32, 2), 129)]);
    let decode1 = 128.0 / (one.total - one.ttft[0]).as_secs_f64();

    // Decode at batch 8: eight sequences, 128 tokens each, after their (batched) prefill.
    let eight = run(
        &mut engine(4096),
        (0..8).map(|i| greedy(tokens(32, 10 + i), 129)).collect(),
    );
    let first = eight.ttft.iter().max().copied().unwrap_or_default();
    let decode8 = (eight.completion_tokens - 8) as f64 / (eight.total - first).as_secs_f64();

    // TTFT with a cached prefix: 4,096 tokens, the first 4,032 (63 blocks) cached by an earlier
    // request with the same beginning.
    let long = tokens(4096, 3);
    let mut e = engine(4096);
    let cold = run(&mut e, vec![greedy(long.clone(), 1)]);
    let mut other_tail = long[..4032].to_vec();
    other_tail.extend(tokens(64, 4));
    let mut e = engine(4096);
    run(&mut e, vec![greedy(other_tail, 1)]);
    let warm = run(&mut e, vec![greedy(long, 1)]);

    println!(
        "{}",
        serde_json::json!({
            "prefill_tokens_per_s": prefill_tps,
            "decode_tokens_per_s_batch1": decode1,
            "decode_tokens_per_s_batch8": decode8,
            "ttft_cold_s": cold.ttft[0].as_secs_f64(),
            "ttft_cached_s": warm.ttft[0].as_secs_f64(),
        })
    );
    Ok(())
}
