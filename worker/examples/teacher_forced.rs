//! Teacher-forced next-token predictions of the worker's runtime, for comparison with another
//! engine (bench/llama_cpp_agreement.py).
//!
//! Reads `{"tokens": [...]}` documents, one per line, from stdin; writes, per document, one line
//! `{"argmax": [...], "logits": [[...]]}` with the argmax after every position (and, when
//! `--logits N` is given, the first N logits of every row, to compare values).
//!
//! Usage: teacher_forced MODEL.gguf [--logits N] [--quantized]

use std::io::{BufRead, Write};
use std::path::PathBuf;

use tidelock_protocol::BlockId;
use tidelock_worker::kv::KvStore;
use tidelock_worker::model::Llama;
use tidelock_worker::model::SeqChunk;
use tidelock_worker::model::llama::{Logits, WeightFormat};

const BLOCK: usize = 64;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(
        args.next()
            .ok_or("usage: teacher_forced MODEL.gguf [--logits N]")?,
    );
    let mut keep = 0;
    let mut format = WeightFormat::F32;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--logits" => keep = args.next().ok_or("--logits N")?.parse()?,
            "--quantized" => format = WeightFormat::Quantized,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let started = std::time::Instant::now();
    let llama = Llama::from_gguf(&model, format)?;
    eprintln!("loaded {format:?} weights in {:.2?}", started.elapsed());
    let mut forward_time = std::time::Duration::ZERO;
    let mut forward_tokens = 0;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in std::io::stdin().lock().lines() {
        let doc: serde_json::Value = serde_json::from_str(&line?)?;
        let tokens: Vec<u32> = serde_json::from_value(doc["tokens"].clone())?;
        let blocks = tokens.len().div_ceil(BLOCK);
        let mut kv = KvStore::new(llama.kv_shape(BLOCK), blocks);
        let table: Vec<BlockId> = (0..blocks as u32).map(BlockId::new).collect();
        let started = std::time::Instant::now();
        let logits = llama.forward(
            &mut kv,
            &[SeqChunk {
                tokens: &tokens,
                start: 0,
                table: &table,
                logits: Logits::All,
            }],
        )?;
        forward_time += started.elapsed();
        forward_tokens += tokens.len();
        let rows = logits[0].as_ref().ok_or("no logits")?.to_vec2::<f32>()?;
        let argmax: Vec<usize> = rows
            .iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i)
            })
            .collect();
        let kept: Vec<&[f32]> = rows.iter().map(|r| &r[..keep.min(r.len())]).collect();
        writeln!(
            out,
            "{}",
            serde_json::json!({ "argmax": argmax, "logits": kept })
        )?;
    }
    eprintln!(
        "teacher-forced forward: {forward_tokens} tokens in {forward_time:.2?} ({:.0} tokens/s)",
        forward_tokens as f64 / forward_time.as_secs_f64()
    );
    Ok(())
}
