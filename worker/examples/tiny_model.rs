//! Writes a tiny seeded Llama model as a Hugging Face folder (config, safetensors, tokenizer, chat
//! template) that the worker serves with `--model DIR`. The shape is `TinySpec::issue7()`.
//!
//! Usage: cargo run -p tidelock-worker --example tiny_model -- --out DIR [--shards N]
//! [--dtype f32|f16|bf16] [--seed S]

use std::path::PathBuf;

use clap::Parser;
use tidelock_worker::model::tiny::{TinyDtype, TinyFamily, TinySpec, write_tiny_llama};

/// Writes a tiny seeded Llama model folder.
#[derive(Debug, Parser)]
struct Args {
    /// Folder to write (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Weight files: 1 writes model.safetensors; more write shards and an index.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// How weights are stored: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: TinyDtype,
    /// Seed of the weights.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Whose conventions the folder follows: smollm, llama3, qwen2.5, qwen3 or mistral.
    #[arg(long, default_value = "smollm")]
    family: TinyFamily,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let spec = TinySpec {
        shards: args.shards,
        dtype: args.dtype,
        seed: args.seed,
        family: args.family,
        ..TinySpec::issue7()
    };
    write_tiny_llama(&args.out, &spec)?;
    println!("wrote {spec:?} to {}", args.out.display());
    Ok(())
}
