//! What runs a scheduled step: the real model over the KV store, or (later) a timing model.
//!
//! The scheduler hands over one batch of chunks and gets back, for each chunk that asked for it,
//! the next-token logits. Block tables are already allocated by then.

use std::sync::Arc;

use tidelock_protocol::BlockId;

use crate::kv::KvStore;
use crate::model::llama::Logits;
use crate::model::{Llama, ModelError, SeqChunk};

/// One sequence's work in a step.
#[derive(Debug, Clone, Copy)]
pub struct Work<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub table: &'a [BlockId],
    /// Whether the chunk ends at the sequence's last token, so its logits are needed.
    pub wants_logits: bool,
}

/// Runs steps.
pub trait Executor: Send {
    /// Computes the chunks; returns the last-token logits of each chunk that wants them.
    fn run(&mut self, work: &[Work<'_>]) -> Result<Vec<Option<Vec<f32>>>, ModelError>;
}

/// The real model with its KV store.
#[derive(Debug)]
pub struct ModelExecutor {
    pub model: Arc<Llama>,
    pub kv: KvStore,
}

impl Executor for ModelExecutor {
    fn run(&mut self, work: &[Work<'_>]) -> Result<Vec<Option<Vec<f32>>>, ModelError> {
        let chunks: Vec<SeqChunk<'_>> = work
            .iter()
            .map(|w| SeqChunk {
                tokens: w.tokens,
                start: w.start,
                table: w.table,
                logits: if w.wants_logits {
                    Logits::Last
                } else {
                    Logits::None
                },
            })
            .collect();
        self.model
            .forward(&mut self.kv, &chunks)?
            .into_iter()
            .map(|t| match t {
                Some(t) => Ok(Some(t.squeeze(0)?.to_vec1::<f32>()?)),
                None => Ok(None),
            })
            .collect()
    }
}
