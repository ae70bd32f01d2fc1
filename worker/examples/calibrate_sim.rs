//! Calibrates the simulated engine (`--engine sim`) from the real one: runs real steps of
//! prefill chunks and decode batches on a GGUF model, fits the simulator's timing model
//! (`step + per_prefill_token * P + per_decode_sequence * D`) by least squares, prints each
//! measured step next to what the fitted model predicts, and the worker flags to use.
//!
//! Usage: calibrate_sim MODEL.gguf [--json]
//!
//! The model has no term for context length: attention is a small part of a step at the
//! contexts measured here (128 to 1,024 tokens); the table shows the residuals.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tidelock_protocol::BlockId;
use tidelock_worker::engine::executor::{Executor, ModelExecutor, Work};
use tidelock_worker::engine::sim::{StepSample, Timing};
use tidelock_worker::kv::KvStore;
use tidelock_worker::model::Llama;
use tidelock_worker::model::llama::WeightFormat;

const BLOCK: usize = 64;
const REPEATS: usize = 3;

fn tokens(n: usize, seed: usize) -> Vec<u32> {
    (0..n)
        .map(|i| 100 + ((i * 31 + seed * 7919) % 20_000) as u32)
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(
        args.next()
            .ok_or("usage: calibrate_sim MODEL.gguf [--json]")?,
    );
    let json = args.next().as_deref() == Some("--json");
    eprintln!("loading {}", path.display());
    let model = Arc::new(Llama::from_gguf(&path, WeightFormat::Packed)?);
    let max_batch = 16;
    let context: usize = 1024 + 64;
    let per_seq = context.div_ceil(BLOCK);
    let mut exec = ModelExecutor {
        kv: KvStore::new(model.kv_shape(BLOCK), per_seq * max_batch),
        model,
    };
    let tables: Vec<Vec<BlockId>> = (0..max_batch)
        .map(|s| {
            (0..per_seq)
                .map(|b| BlockId::new((s * per_seq + b) as u32))
                .collect()
        })
        .collect();

    let mut samples = Vec::new();
    // Prefill chunks of one sequence.
    for p in [32, 128, 256, 512, 1024] {
        let prompt = tokens(p, p);
        for _ in 0..REPEATS {
            let work = [Work {
                tokens: &prompt,
                start: 0,
                table: &tables[0],
                wants_logits: true,
            }];
            let started = Instant::now();
            exec.run(&work)?;
            samples.push(StepSample {
                prefill_tokens: p,
                decode_sequences: 0,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        eprintln!("prefill {p} tokens: measured");
    }
    // Decode batches at a 128-token context (prefilled first, not timed).
    let prompt = tokens(128, 1);
    for table in &tables {
        exec.run(&[Work {
            tokens: &prompt,
            start: 0,
            table,
            wants_logits: false,
        }])?;
    }
    let next: Vec<[u32; 1]> = (0..max_batch).map(|s| [300 + s as u32]).collect();
    for d in [1, 2, 4, 8, 16] {
        for rep in 0..REPEATS {
            let work: Vec<Work<'_>> = (0..d)
                .map(|s| Work {
                    tokens: &next[s],
                    start: 128 + rep,
                    table: &tables[s],
                    wants_logits: true,
                })
                .collect();
            let started = Instant::now();
            exec.run(&work)?;
            samples.push(StepSample {
                prefill_tokens: 0,
                decode_sequences: d,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        eprintln!("decode batch {d}: measured");
    }
    // A mixed step: a prefill chunk riding along with decodes.
    let chunk = tokens(256, 9);
    for rep in 0..REPEATS {
        let mut work: Vec<Work<'_>> = (0..4)
            .map(|s| Work {
                tokens: &next[s],
                start: 128 + REPEATS + rep,
                table: &tables[s],
                wants_logits: true,
            })
            .collect();
        work.push(Work {
            tokens: &chunk,
            start: 0,
            table: &tables[8],
            wants_logits: true,
        });
        let started = Instant::now();
        exec.run(&work)?;
        samples.push(StepSample {
            prefill_tokens: 256,
            decode_sequences: 4,
            seconds: started.elapsed().as_secs_f64(),
        });
    }

    let fit = Timing::fit(&samples).ok_or("the measurements do not determine a fit")?;
    let flags = format!(
        "--engine sim --sim-step-ms {:.3} --sim-prefill-tokens-per-s {:.0} --sim-decode-ms-per-sequence {:.3}",
        fit.step.as_secs_f64() * 1e3,
        1.0 / fit.per_prefill_token.as_secs_f64().max(1e-12),
        fit.per_decode_sequence.as_secs_f64() * 1e3,
    );
    if json {
        let rows: Vec<serde_json::Value> = samples
            .iter()
            .map(|s| serde_json::json!({
                "prefill_tokens": s.prefill_tokens,
                "decode_sequences": s.decode_sequences,
                "measured_ms": s.seconds * 1e3,
                "predicted_ms": fit.predict(s.prefill_tokens, s.decode_sequences).as_secs_f64() * 1e3,
            }))
            .collect();
        println!("{}", serde_json::json!({ "flags": flags, "samples": rows }));
        return Ok(());
    }
    println!(
        "{:>8} {:>8} {:>12} {:>12} {:>7}",
        "prefill", "decode", "measured ms", "fitted ms", "ratio"
    );
    for s in &samples {
        let predicted = fit
            .predict(s.prefill_tokens, s.decode_sequences)
            .as_secs_f64();
        println!(
            "{:>8} {:>8} {:>12.2} {:>12.2} {:>7.2}",
            s.prefill_tokens,
            s.decode_sequences,
            s.seconds * 1e3,
            predicted * 1e3,
            predicted / s.seconds
        );
    }
    println!("worker flags: {flags}");
    Ok(())
}
