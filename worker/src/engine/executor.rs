//! What runs a scheduled step: the real model over one worker's KV store ([`ModelExecutor`]),
//! over a shard group's stores ([`GroupExecutor`], issue #7), or a timing model
//! ([`super::sim`]).
//!
//! The scheduler hands over one batch of chunks and gets back, for each chunk that asked for it,
//! the next-token logits ([`StepLogits`]: host rows, or a device tensor that only the sampler's
//! reductions leave). Block tables are already allocated by then.

use std::sync::Arc;

use tidelock_protocol::BlockId;
use tidelock_protocol::blocks::BlockLayout;

use candle_core::Tensor;

use crate::engine::logits::StepLogits;
use crate::kv::KvStore;
use crate::kv::backend::{OnHost, PagedKv};
use crate::kv::shard::{Coordinated, CoordinatedSeq, ShardGroup};
use crate::model::llama::{Logits, Rows};
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
    fn run(&mut self, work: &[Work<'_>]) -> Result<StepLogits, ModelError>;

    /// How its blocks leave and enter it ([`Executor::export_block`]), or `None` when they
    /// cannot (a shard group: a block lives on several workers), so nothing spills.
    fn block_layout(&self) -> Option<BlockLayout> {
        None
    }

    /// Appends one block's bytes to `out` (the spill tiers, a peer pull).
    fn export_block(&self, block: BlockId, _out: &mut Vec<u8>) -> Result<(), ModelError> {
        Err(ModelError::Input(format!(
            "block {block}: this executor cannot export blocks"
        )))
    }

    /// Overwrites one block with bytes of [`Executor::export_block`] of the same layout.
    fn import_block(&mut self, block: BlockId, _payload: &[u8]) -> Result<(), ModelError> {
        Err(ModelError::Input(format!(
            "block {block}: this executor cannot import blocks"
        )))
    }
}

/// The real model with its KV store: host pages ([`KvStore`], the `cpu` backend) or pages on
/// the model's device ([`crate::kv::device::DeviceKv`], the `candle` backend).
#[derive(Debug)]
pub struct ModelExecutor<K = KvStore> {
    pub model: Arc<Llama>,
    pub kv: K,
}

impl<K: PagedKv + Send> Executor for ModelExecutor<K> {
    fn run(&mut self, work: &[Work<'_>]) -> Result<StepLogits, ModelError> {
        let chunks: Vec<SeqChunk<'_>> = work
            .iter()
            .map(|w| SeqChunk {
                tokens: w.tokens,
                start: w.start,
                table: w.table,
                logits: w.logits(),
            })
            .collect();
        let out = self.model.forward(&mut self.kv, &chunks)?;
        match self.kv.on_device() {
            true => StepLogits::device(out),
            false => last_rows(out),
        }
    }

    fn block_layout(&self) -> Option<BlockLayout> {
        Some(self.kv.block_layout())
    }

    fn export_block(&self, block: BlockId, out: &mut Vec<u8>) -> Result<(), ModelError> {
        self.kv.export_block(block, out)
    }

    fn import_block(&mut self, block: BlockId, payload: &[u8]) -> Result<(), ModelError> {
        self.kv.import_block(block, payload)
    }
}

impl Work<'_> {
    fn logits(&self) -> Logits {
        match self.wants_logits {
            true => Logits::Last,
            false => Logits::None,
        }
    }
}

/// The logits tensors of a forward call as host rows.
fn last_rows(out: Vec<Option<Tensor>>) -> Result<StepLogits, ModelError> {
    let rows = out
        .into_iter()
        .map(|t| match t {
            Some(t) => Ok(Some(t.squeeze(0)?.to_vec1::<f32>()?)),
            None => Ok(None),
        })
        .collect::<Result<_, ModelError>>()?;
    Ok(StepLogits::host(rows))
}

/// The coordinator of a shard group: the real model, with each layer's attention spread over
/// the group's shards (its own among them, in process). The engine's block tables hold group
/// blocks; [`crate::kv::shard::placement`] says where each lives.
#[derive(Debug)]
pub struct GroupExecutor {
    pub model: Arc<Llama>,
    pub group: ShardGroup,
    pub block_tokens: usize,
}

impl Executor for GroupExecutor {
    fn run(&mut self, work: &[Work<'_>]) -> Result<StepLogits, ModelError> {
        let mut row = 0;
        let seqs: Vec<CoordinatedSeq<'_>> = work
            .iter()
            .map(|w| {
                let rows = row..row + w.tokens.len();
                row = rows.end;
                CoordinatedSeq {
                    start: w.start,
                    rows,
                    table: w.table,
                }
            })
            .collect();
        let rows: Vec<Rows<'_>> = work
            .iter()
            .map(|w| Rows {
                tokens: w.tokens,
                start: w.start,
                logits: w.logits(),
            })
            .collect();
        let shape = self.model.kv_shape(self.block_tokens);
        let mut attention = OnHost {
            inner: Coordinated::new(
                &mut self.group,
                &seqs,
                self.block_tokens,
                shape.kv_heads,
                shape.head_dim,
            ),
            device: self.model.device().clone(),
        };
        let out = self.model.forward_with(&mut attention, &rows)?;
        match self.model.device().is_cpu() {
            true => last_rows(out),
            false => StepLogits::device(out),
        }
    }
}
