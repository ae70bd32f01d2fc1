//! Decode steps straight through `Llama::forward` (no scheduler), for profiling: prints the
//! time per step at a given batch size and the share of each part.
//!
//! Usage: bench_decode MODEL.gguf [BATCH] [STEPS] [f32|quantized|packed]

use std::path::PathBuf;
use std::time::Instant;

use tidelock_protocol::BlockId;
use tidelock_worker::kv::KvStore;
use tidelock_worker::model::llama::{Logits, WeightFormat};
use tidelock_worker::model::{Llama, SeqChunk};

const BLOCK: usize = 64;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(
        args.next()
            .ok_or("usage: bench_decode MODEL.gguf [BATCH] [STEPS] [FORMAT]")?,
    );
    let batch: usize = args.next().map_or(Ok(1), |a| a.parse())?;
    let steps: usize = args.next().map_or(Ok(64), |a| a.parse())?;
    let format = match args.next().as_deref() {
        None | Some("packed") => WeightFormat::Packed,
        Some("f32") => WeightFormat::F32,
        Some("quantized") => WeightFormat::Quantized,
        Some(other) => return Err(format!("unknown format {other}").into()),
    };
    let llama = Llama::from_gguf(&path, format)?;
    let prompt = 64;
    let per_seq = (prompt + steps).div_ceil(BLOCK);
    let mut kv = KvStore::new(llama.kv_shape(BLOCK), per_seq * batch);
    let tables: Vec<Vec<BlockId>> = (0..batch)
        .map(|s| {
            (0..per_seq)
                .map(|b| BlockId::new((s * per_seq + b) as u32))
                .collect()
        })
        .collect();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|s| {
            (0..prompt)
                .map(|i| 100 + ((i * 31 + s * 7) % 5000) as u32)
                .collect()
        })
        .collect();
    let chunks: Vec<SeqChunk<'_>> = (0..batch)
        .map(|s| SeqChunk {
            tokens: &prompts[s],
            start: 0,
            table: &tables[s],
            logits: Logits::Last,
        })
        .collect();
    llama.forward(&mut kv, &chunks)?;
    let mut next: Vec<[u32; 1]> = (0..batch).map(|s| [200 + s as u32]).collect();
    let started = Instant::now();
    for step in 0..steps {
        let chunks: Vec<SeqChunk<'_>> = (0..batch)
            .map(|s| SeqChunk {
                tokens: &next[s],
                start: prompt + step,
                table: &tables[s],
                logits: Logits::Last,
            })
            .collect();
        let out = llama.forward(&mut kv, &chunks)?;
        for (s, logits) in out.into_iter().enumerate() {
            let logits = logits
                .ok_or("no logits")?
                .squeeze(0)?
                .argmax(0)?
                .to_scalar::<u32>()?;
            next[s] = [logits];
        }
    }
    let elapsed = started.elapsed();
    println!(
        "batch {batch}: {steps} steps in {elapsed:.2?}: {:.2} ms/step, {:.1} tokens/s",
        elapsed.as_secs_f64() * 1e3 / steps as f64,
        (steps * batch) as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
