//! The cost of constrained decoding (structured outputs) per token, against a decode step of the
//! same engine on the same model, measured in one run (issue #23, point 2: the goal is a mask
//! under 10% of a decode step).
//!
//! 1. Baseline: the engine's decode steps of an unconstrained request (batch 1), per step.
//! 2. Constrained: the same prompt under each schema of a small corpus, per decode step.
//! 3. The mask alone: each constrained answer's tokens replayed through a fresh matcher, timing
//!    the mask and its application to a row of logits per token (what the sampler adds).
//!
//! Usage: bench_mask [MODEL.gguf] (default: the default model)

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidelock_prompt::{ChatMessage, PromptKit};
use tidelock_protocol::{
    BlockTokens, Constraint, Epoch, GenerateEvent, GenerateRequest, ModelName,
};
use tidelock_worker::engine::executor::ModelExecutor;
use tidelock_worker::engine::grammar::{self, Grammars};
use tidelock_worker::engine::{Engine, EngineConfig};
use tidelock_worker::kv::KvStore;
use tidelock_worker::kv::pool::BlockPool;
use tidelock_worker::model::Llama;
use tidelock_worker::model::llama::WeightFormat;
use tidelock_worker::testing::{greedy, model_path};
use tokio::sync::mpsc::unbounded_channel;

const BLOCK: usize = 16;

/// Runs `request` alone; returns its generated ids and the mean time of its decode steps.
fn decode(e: &mut Engine<ModelExecutor>, request: GenerateRequest) -> (Vec<u32>, Duration) {
    let (tx, mut rx) = unbounded_channel();
    e.submit(request, tx);
    let (mut steps, mut spent) = (0u32, Duration::ZERO);
    while !e.is_idle() {
        let t = Instant::now();
        let stats = e.step().expect("step");
        if stats.prefill_tokens == 0 && stats.decode_tokens > 0 {
            spent += t.elapsed();
            steps += 1;
        }
    }
    let mut ids = Vec::new();
    while let Ok(event) = rx.try_recv() {
        if let GenerateEvent::Tokens { ids: more, .. } = event {
            ids.extend(more);
        }
    }
    (ids, spent / steps.max(1))
}

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .map_or_else(model_path, PathBuf::from);
    let kit = Arc::new(PromptKit::from_gguf_file(&path)?);
    let model = Arc::new(Llama::from_gguf(&path, WeightFormat::Packed)?);
    let vocab = model.config().vocab_size;
    let started = Instant::now();
    let grammars = Grammars::new(kit.clone(), vocab)?;
    eprintln!("token trie and parser factory: {:?}", started.elapsed());
    let cfg = EngineConfig {
        model: ModelName::new("bench").expect("a valid name"),
        block_tokens: BlockTokens::new(BLOCK as u32).expect("a valid block size"),
        max_step_tokens: 512,
        max_running: 8,
        max_waiting: 8,
        max_context: 4096,
        vocab_size: vocab,
        eos_token_ids: kit.stop_token_ids().to_vec(),
    };
    let kv = KvStore::new(model.kv_shape(BLOCK), 256);
    let pool = BlockPool::new(256, cfg.block_tokens, Epoch::new(1));
    let mut e =
        Engine::new(cfg, pool, ModelExecutor { model, kv }).with_grammars(Some(grammars.clone()));

    let messages = [ChatMessage::new("user", "Describe a person as JSON.")];
    let prompt = kit.encode_chat(&messages, true, &Default::default())?;
    let request = |constraint: Option<Constraint>| {
        let mut r = greedy(prompt.clone(), 96);
        r.sampling.temperature = 0.7;
        r.sampling.seed = Some(1);
        r.sampling.ignore_eos = constraint.is_none();
        r.sampling.constraint = constraint;
        r
    };
    // Warm up, then the baseline.
    decode(&mut e, request(None));
    let (_, baseline) = decode(&mut e, request(None));
    println!(
        "decode step, unconstrained (batch 1): {:.0} us",
        micros(baseline)
    );
    println!(
        "| schema | tokens | decode step | vs unconstrained | mask per token (mean / p99) | mask / step |"
    );
    println!("|---|---|---|---|---|---|");
    let corpus = [
        ("any object", Constraint::JsonObject),
        (
            "person (nested, enum, bounds)",
            Constraint::JsonSchema {
                schema: serde_json::json!({
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 30},
                        "age": {"type": "integer", "minimum": 0, "maximum": 120},
                        "address": {"type": "object", "properties": {
                            "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}
                        }, "required": ["city"]},
                        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}
                    },
                    "required": ["name", "age", "address"],
                    "additionalProperties": false
                }),
            },
        ),
        (
            "array of numbers",
            Constraint::JsonSchema {
                schema: serde_json::json!({"type": "array", "items": {"type": "number", "minimum": -1, "maximum": 1}, "minItems": 3}),
            },
        ),
    ];
    for (what, constraint) in corpus {
        let (ids, step) = decode(&mut e, request(Some(constraint.clone())));
        // The mask alone, replaying the answer.
        let mut guide = grammars.guide(&constraint)?;
        let mut row = vec![0.0f32; vocab];
        let mut times: Vec<Duration> = Vec::with_capacity(ids.len());
        for &id in &ids {
            let t = Instant::now();
            let mask = guide.mask();
            grammar::apply_mask(&mut row, &mask);
            times.push(t.elapsed());
            guide.advance(id);
        }
        times.sort_unstable();
        let mean = times.iter().sum::<Duration>() / times.len().max(1) as u32;
        let p99 = times
            .get(times.len().saturating_sub(1) * 99 / 100)
            .copied()
            .unwrap_or_default();
        println!(
            "| {what} | {} | {:.0} us | {:.3}x | {:.0} / {:.0} us | {:.1}% |",
            ids.len(),
            micros(step),
            step.as_secs_f64() / baseline.as_secs_f64(),
            micros(mean),
            micros(p99),
            100.0 * mean.as_secs_f64() / baseline.as_secs_f64(),
        );
    }
    Ok(())
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
