//! The attention kernels' boundary: what a forward pass hands each layer's attention, and the
//! two families of kernels behind it.
//!
//! The model ([`crate::model::Llama`]) runs its projections as candle tensors on its device and
//! calls [`Attention::layer`] once per layer with the fused `q|k|v` rows. Everything that knows
//! where the KV pages live is behind that call: rotating q and k, storing the new keys and
//! values in their blocks, and attending over each sequence's block table. Two implementations:
//!
//! - [`OnHost`]: the `cpu` backend's kernels over host pages (any [`HostAttention`]: one
//!   worker's [`KvStore`](crate::kv::KvStore) or a shard group's stores). The layer's `q|k|v`
//!   cross to host memory once (on `Device::Cpu` that is the copy the kernels always made), the
//!   output crosses back once.
//! - [`DeviceKv`](crate::kv::device::DeviceKv): pages as tensors on the model's device, written
//!   and gathered with candle ops; nothing crosses to the host.
//!
//! [`PagedKv`] is a store a forward call can run over: it checks the chunks' block tables
//! against itself and lends the [`Attention`] for the call.

use candle_core::{Device, Tensor};
use tidelock_protocol::BlockId;
use tidelock_protocol::blocks::BlockLayout;

use crate::kv::KvStore;
use crate::kv::attention::{AttnSeq, paged_attention};
use crate::kv::shard::ShardError;
use crate::model::ModelError;
use crate::model::config::RopeStyle;

/// The geometry and rotary tables of one forward call, the same for every layer.
#[derive(Debug, Clone)]
pub struct StepGeometry {
    /// Each batch row's absolute position.
    pub positions: Vec<usize>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// cos and sin of every (row, rotation pair), `[rows, head_dim / 2]` each, row-major.
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub rope_style: RopeStyle,
}

impl StepGeometry {
    pub fn rows(&self) -> usize {
        self.positions.len()
    }

    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// One forward call's attention, layer by layer.
pub trait Attention {
    /// Layer `layer`'s attention for every batch row: rotates the q and k parts of `qkv`
    /// (`[rows, (heads + 2 * kv_heads) * head_dim]`, f32, on the model's device), stores the
    /// keys and values, and returns each row's attention over its sequence's context (the new
    /// keys included), `[rows, heads * head_dim]` f32 on the model's device. Fails when a remote
    /// shard does (the error says which and why) or a tensor operation does.
    fn layer(
        &mut self,
        layer: usize,
        qkv: &Tensor,
        step: &StepGeometry,
    ) -> Result<Tensor, ModelError>;
}

/// Attention over host pages, one row's keys and values at a time: the `cpu` backend's kernels
/// ([`crate::kv::attention`]).
pub trait HostAttention {
    /// Stores the key and value (`kv_heads * head_dim` floats each) of batch row `row`, at
    /// `position` of its sequence, for `layer`.
    fn write(&mut self, layer: usize, row: usize, position: usize, k: &[f32], v: &[f32]);

    /// Attention of every batch row over its sequence's context (written keys included) in
    /// `layer`: `q` and `out` are `[rows, heads * head_dim]`. Fails only when a remote shard
    /// does (the error says which and why).
    fn attend(
        &mut self,
        layer: usize,
        heads: usize,
        scale: f32,
        q: &[f32],
        out: &mut [f32],
    ) -> Result<(), ShardError>;
}

impl<A: HostAttention + ?Sized> HostAttention for &mut A {
    fn write(&mut self, layer: usize, row: usize, position: usize, k: &[f32], v: &[f32]) {
        (**self).write(layer, row, position, k, v);
    }

    fn attend(
        &mut self,
        layer: usize,
        heads: usize,
        scale: f32,
        q: &[f32],
        out: &mut [f32],
    ) -> Result<(), ShardError> {
        (**self).attend(layer, heads, scale, q, out)
    }
}

/// A [`HostAttention`] as an [`Attention`]: each layer's `q|k|v` to host memory, rotated and
/// stored there, the attention output back on `device`.
#[derive(Debug)]
pub struct OnHost<A> {
    pub inner: A,
    pub device: Device,
}

impl<A: HostAttention> Attention for OnHost<A> {
    fn layer(
        &mut self,
        layer: usize,
        qkv: &Tensor,
        step: &StepGeometry,
    ) -> Result<Tensor, ModelError> {
        let d = step.head_dim;
        let (q_width, kv_width) = (step.q_width(), step.kv_width());
        let rows = step.rows();
        let mut qkv = qkv.flatten_all()?.to_vec1::<f32>()?;
        let mut q = Vec::with_capacity(rows * q_width);
        for (r, row) in qkv.chunks_exact_mut(q_width + 2 * kv_width).enumerate() {
            let (qs, rest) = row.split_at_mut(q_width);
            let (ks, vs) = rest.split_at_mut(kv_width);
            let (c, s) = (
                &step.cos[r * d / 2..][..d / 2],
                &step.sin[r * d / 2..][..d / 2],
            );
            for head in qs.chunks_exact_mut(d).chain(ks.chunks_exact_mut(d)) {
                rotate(head, c, s, step.rope_style);
            }
            q.extend_from_slice(qs);
            self.inner.write(layer, r, step.positions[r], ks, vs);
        }
        let mut out = vec![0.0f32; rows * q_width];
        self.inner
            .attend(layer, step.heads, step.scale, &q, &mut out)?;
        Ok(Tensor::from_vec(out, (rows, q_width), &self.device)?)
    }
}

/// Rotates one head's vector by its position's angles.
pub fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = head.len() / 2;
    match style {
        RopeStyle::Interleaved => {
            for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0 * cos[i] - x1 * sin[i];
                pair[1] = x0 * sin[i] + x1 * cos[i];
            }
        }
        RopeStyle::Halves => {
            for i in 0..half {
                let (x0, x1) = (head[i], head[i + half]);
                head[i] = x0 * cos[i] - x1 * sin[i];
                head[i + half] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

/// One worker's host store: the sequences' block tables index it directly.
#[derive(Debug)]
pub struct Local<'a> {
    pub kv: &'a mut KvStore,
    pub seqs: Vec<AttnSeq<'a>>,
    /// Each batch row's block table.
    pub row_tables: Vec<&'a [BlockId]>,
}

impl HostAttention for Local<'_> {
    fn write(&mut self, layer: usize, row: usize, position: usize, k: &[f32], v: &[f32]) {
        self.kv.write(layer, self.row_tables[row], position, k, v);
    }

    fn attend(
        &mut self,
        layer: usize,
        heads: usize,
        scale: f32,
        q: &[f32],
        out: &mut [f32],
    ) -> Result<(), ShardError> {
        paged_attention(self.kv.layer(layer), &self.seqs, heads, scale, q, out);
        Ok(())
    }
}

/// One sequence's rows in a forward call over a [`PagedKv`].
#[derive(Debug, Clone)]
pub struct PagedSeq<'a> {
    /// Its rows in the batch.
    pub rows: std::ops::Range<usize>,
    /// Absolute position of its first row.
    pub start: usize,
    /// Block table covering positions `0..start + rows.len()`.
    pub table: &'a [BlockId],
}

/// A store a forward call can run over: one worker's host pages ([`KvStore`]) or pages on a
/// device ([`crate::kv::device::DeviceKv`]).
pub trait PagedKv {
    fn block_tokens(&self) -> usize;

    fn num_blocks(&self) -> usize;

    /// Whether its pages, and so the logits of a forward call over it, are on a device (only
    /// the sampler's reductions cross to the host), rather than host rows.
    fn on_device(&self) -> bool;

    /// The attention of one forward call over `seqs`, whose block tables are checked already,
    /// for a model on `device`.
    fn attention<'a>(
        &'a mut self,
        seqs: &[PagedSeq<'a>],
        device: &Device,
    ) -> Result<Box<dyn Attention + 'a>, ModelError>;

    /// How [`PagedKv::export_block`] lays a block out (the disk tier and peers check it).
    fn block_layout(&self) -> BlockLayout;

    /// Appends one block's keys and values, every layer, to `out`, bit-exact.
    fn export_block(&self, block: BlockId, out: &mut Vec<u8>) -> Result<(), ModelError>;

    /// Overwrites one block with a payload of [`PagedKv::export_block`] of the same layout.
    fn import_block(&mut self, block: BlockId, payload: &[u8]) -> Result<(), ModelError>;

    /// Checks that every table covers its sequence and lies inside this store.
    fn check(&self, seqs: &[PagedSeq<'_>]) -> Result<(), ModelError> {
        let bt = self.block_tokens();
        for seq in seqs {
            let end = seq.start + seq.rows.len();
            if seq.table.len() * bt < end {
                return Err(ModelError::Input(format!(
                    "block table of {} blocks cannot hold {end} tokens",
                    seq.table.len()
                )));
            }
            if let Some(bad) = seq
                .table
                .iter()
                .find(|b| b.get() as usize >= self.num_blocks())
            {
                return Err(ModelError::Input(format!(
                    "block {bad} is outside the KV store"
                )));
            }
        }
        Ok(())
    }
}

impl PagedKv for KvStore {
    fn block_tokens(&self) -> usize {
        self.shape().block_tokens
    }

    fn block_layout(&self) -> BlockLayout {
        KvStore::block_layout(self)
    }

    fn export_block(&self, block: BlockId, out: &mut Vec<u8>) -> Result<(), ModelError> {
        KvStore::export_block(self, block, out)
    }

    fn import_block(&mut self, block: BlockId, payload: &[u8]) -> Result<(), ModelError> {
        KvStore::import_block(self, block, payload)
    }

    fn num_blocks(&self) -> usize {
        KvStore::num_blocks(self)
    }

    fn on_device(&self) -> bool {
        false
    }

    fn attention<'a>(
        &'a mut self,
        seqs: &[PagedSeq<'a>],
        device: &Device,
    ) -> Result<Box<dyn Attention + 'a>, ModelError> {
        let row_tables = seqs
            .iter()
            .flat_map(|s| std::iter::repeat_n(s.table, s.rows.len()))
            .collect();
        let seqs = seqs
            .iter()
            .map(|s| AttnSeq {
                rows: s.rows.clone(),
                start: s.start,
                table: s.table,
            })
            .collect();
        Ok(Box::new(OnHost {
            inner: Local {
                kv: self,
                seqs,
                row_tables,
            },
            device: device.clone(),
        }))
    }
}
