//! The scheduler's own cost per engine step (issue #22, point 6): the engine with the simulated
//! executor at instant timing, so every microsecond measured is the scheduler's (admission,
//! block bookkeeping, sampling's surroundings, events), not a model's.
//!
//! Runs SEQUENCES requests of a 512-token prompt decoding TOKENS tokens each, on a pool of
//! BLOCKS 16-token blocks, ROUNDS times with new prompts (once the pool is full of cached blocks,
//! every allocation evicts the least recently used), and prints the mean wall time per step and
//! per generated token.
//!
//! Usage: bench_scheduler [BLOCKS] [SEQUENCES] [TOKENS] [ROUNDS]  (defaults 65536 32 256 1)

use std::time::Instant;

use tidelock_protocol::{BlockTokens, Epoch, GenerateEvent, ModelName};
use tidelock_worker::engine::sim::{SimExecutor, Timing};
use tidelock_worker::engine::{Engine, EngineConfig};
use tidelock_worker::kv::pool::BlockPool;
use tidelock_worker::testing::{greedy, tokens};
use tokio::sync::mpsc::unbounded_channel;

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (blocks, sequences, max_tokens, rounds) =
        (arg(1, 65_536), arg(2, 32), arg(3, 256), arg(4, 1));
    // A small vocabulary: the simulated logits and their sampling stay out of the figure.
    let vocab = 1_000;
    let cfg = EngineConfig {
        model: ModelName::new("sim").unwrap(),
        block_tokens: BlockTokens::new(16).unwrap(),
        max_step_tokens: 8192,
        max_running: sequences,
        max_waiting: sequences,
        max_context: 1 << 20,
        vocab_size: vocab,
        eos_token_ids: Vec::new(),
    };
    let pool = BlockPool::new(blocks, cfg.block_tokens, Epoch::new(1));
    let mut engine = Engine::new(cfg, pool, SimExecutor::new(vocab, Timing::INSTANT));
    let started = Instant::now();
    let (mut steps, mut finished) = (0u64, 0);
    for round in 0..rounds {
        let mut outputs = Vec::new();
        for i in 0..sequences {
            let prompt = tokens(512, (round * sequences + i) as u64)
                .into_iter()
                .map(|t| t % vocab as u32)
                .collect();
            let mut request = greedy(prompt, max_tokens as u32);
            request.sampling.ignore_eos = true;
            let (tx, rx) = unbounded_channel();
            engine.submit(request, tx);
            outputs.push(rx);
        }
        while !engine.is_idle() {
            engine.step().expect("a step");
            steps += 1;
            // What the server does after each step.
            let _ = engine.take_events();
            let _ = engine.load();
            for rx in &mut outputs {
                while let Ok(event) = rx.try_recv() {
                    match event {
                        GenerateEvent::Finished { .. } => finished += 1,
                        GenerateEvent::Error { message, .. } => panic!("{message}"),
                        _ => {}
                    }
                }
            }
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(finished, sequences * rounds, "every request ran to its end");
    let generated = (sequences * max_tokens * rounds) as f64;
    println!(
        "{blocks} blocks, {rounds} x {sequences} sequences x {max_tokens} tokens: {steps} steps, {:.1} us per step, {:.2} us per generated token",
        elapsed.as_secs_f64() * 1e6 / steps as f64,
        elapsed.as_secs_f64() * 1e6 / generated
    );
}
