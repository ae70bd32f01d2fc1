//! The model runtime: a Llama-family decoder on candle-core, loaded from GGUF (the default) or a
//! Hugging Face folder, running over the paged KV store of [`crate::kv`].
//!
//! Module map:
//! - `config`: hyper-parameters (Hugging Face `config.json` names), validation, rope scaling;
//! - `gguf`: reads a GGUF file's metadata and tensors, naming the file in every error;
//! - `hf`: reads a Hugging Face folder's `config.json` and safetensors weights (one file or
//!   shards), naming the file in every error;
//! - `tiny`: writes tiny seeded Llama models as Hugging Face folders, for tests and demos;
//! - `llama`: the weights and the batched forward pass over many sequences at once;
//! - `packed`: block-quantized weights at their stored size and the few-row matmul over them
//!   (the decode path).

pub mod config;
pub mod gguf;
pub mod hf;
pub mod llama;
pub mod packed;
pub mod tiny;

use std::path::PathBuf;

pub use config::{LlamaConfig, RopeScaling, RopeStyle};
pub use llama::{Llama, SeqChunk};

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model file is missing, unreadable or malformed.
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: String },
    /// A hyper-parameter is missing or inconsistent.
    #[error("model config field `{field}`: {problem}")]
    Config {
        field: &'static str,
        problem: String,
    },
    /// A weight is missing or has the wrong shape.
    #[error("{path}: tensor `{name}`: {problem}")]
    Tensor {
        path: PathBuf,
        name: String,
        problem: String,
    },
    /// The request does not fit the model (token id out of range, position beyond the KV
    /// blocks given...).
    #[error("invalid input: {0}")]
    Input(String),
    /// A shard of the group could not compute its part of attention (issue #7).
    #[error("shard attention: {0}")]
    Shard(#[from] crate::kv::shard::ShardError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    /// Whether KV blocks held before this call are gone (a shard of the group restarted): the
    /// prefix cache must forget them.
    pub fn loses_kv(&self) -> bool {
        matches!(self, ModelError::Shard(e) if e.is_lost())
    }
}
