//! Where a forward pass keeps its new keys and values and computes attention: one worker's
//! store ([`Local`]), or a session's blocks striped over the S workers of a shard group
//! ([`Striped`], issue #7). The model is written against [`Attention`] only, so both run the
//! same layers.
//!
//! Layout: **striped by block**. Logical block `b` of a sequence (positions `b * block_tokens ..`)
//! lives on shard `b % S`, at index `b / S` of that shard's table for the sequence. Why striping
//! rather than contiguous ranges: every shard holds `ceil(n / S)` or `floor(n / S)` of a
//! session's `n` blocks at every length, so each shard reads the same share of the context per
//! decode step (the step time is the slowest shard's), and new blocks rotate over the shards
//! rather than all landing on the last one as the session grows, so no shard fills first.
//! Contiguous ranges would need rebalancing as a session grows, and at any length short of full
//! the last range is the short one. A block is the unit either way, so prefix caching and block
//! events work per shard unchanged.
//!
//! Each shard computes attention over the blocks it holds ([`shard_attention`]): an output
//! normalised over those positions and its log-sum-exp, which the coordinator merges exactly
//! ([`merge_shards`]).

use tidelock_protocol::BlockId;

use crate::kv::KvStore;
use crate::kv::attention::{
    AttnSeq, ShardPartial, ShardSeq, merge_shards, paged_attention, shard_attention,
};

/// A forward pass's KV: writes the new tokens' keys and values, then attends.
pub trait Attention {
    /// Stores the key and value (`kv_heads * head_dim` floats each) of batch row `row`, at
    /// `position` of its sequence, for `layer`.
    fn write(&mut self, layer: usize, row: usize, position: usize, k: &[f32], v: &[f32]);

    /// Attention of every batch row over its sequence's context (written keys included) in
    /// `layer`: `q` and `out` are `[rows, heads * head_dim]`.
    fn attend(&mut self, layer: usize, heads: usize, scale: f32, q: &[f32], out: &mut [f32]);
}

/// One worker's store: the sequences' block tables index it directly.
#[derive(Debug)]
pub struct Local<'a> {
    pub kv: &'a mut KvStore,
    pub seqs: Vec<AttnSeq<'a>>,
    /// Each batch row's block table.
    pub row_tables: Vec<&'a [BlockId]>,
}

impl Attention for Local<'_> {
    fn write(&mut self, layer: usize, row: usize, position: usize, k: &[f32], v: &[f32]) {
        self.kv.write(layer, self.row_tables[row], position, k, v);
    }

    fn attend(&mut self, layer: usize, heads: usize, scale: f32, q: &[f32], out: &mut [f32]) {
        paged_attention(self.kv.layer(layer), &self.seqs, heads, scale, q, out);
    }
}

/// Shard and index within that shard's table of logical block `block`, with `shards` shards.
pub fn placement(block: usize, shards: usize) -> (usize, usize) {
    (block % shards, block / shards)
}

/// The logical blocks shard `shard` holds of a sequence of `blocks` blocks: `shard`,
/// `shard + S`, ...
pub fn logical_blocks(shard: usize, shards: usize, blocks: usize) -> Vec<u32> {
    (shard..blocks)
        .step_by(shards)
        .map(|b| u32::try_from(b).expect("block index fits u32"))
        .collect()
}

/// A sequence striped over the shards: per shard, the local ids of the blocks it holds, in
/// logical order (shard `s`'s `j`-th block is logical block `s + j * S`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StripedTables {
    pub shards: Vec<Vec<BlockId>>,
}

impl StripedTables {
    /// Blocks of the sequence, over every shard.
    pub fn blocks(&self) -> usize {
        self.shards.iter().map(Vec::len).sum()
    }
}

/// One sequence's rows in a striped forward call.
#[derive(Debug, Clone)]
pub struct StripedSeq<'a> {
    pub rows: std::ops::Range<usize>,
    pub start: usize,
    pub tables: &'a StripedTables,
}

/// The S shards of a group in one process: each shard is its own store (its own memory and block
/// ids), and attention runs per shard and merges, exactly as across workers. The coordinator's
/// logic without the network: the exactness tests compare it with [`Local`], and the RPC
/// transport replaces the direct calls.
#[derive(Debug)]
pub struct Striped<'a> {
    pub stores: &'a mut [KvStore],
    pub seqs: Vec<StripedSeq<'a>>,
    /// Each batch row's sequence.
    pub row_seq: Vec<usize>,
}

impl Striped<'_> {
    fn shards(&self) -> usize {
        self.stores.len()
    }
}

impl Attention for Striped<'_> {
    fn write(&mut self, layer: usize, row: usize, position: usize, k: &[f32], v: &[f32]) {
        let bt = self.stores[0].shape().block_tokens;
        let (shard, index) = placement(position / bt, self.shards());
        let tables = self.seqs[self.row_seq[row]].tables;
        let block = tables.shards[shard][index];
        // The store's write takes a table indexed by position / block_tokens: a one-entry
        // table and the position within the block.
        self.stores[shard].write(layer, &[block], position % bt, k, v);
    }

    fn attend(&mut self, layer: usize, heads: usize, scale: f32, q: &[f32], out: &mut [f32]) {
        let d = self.stores[0].shape().head_dim;
        let shards = self.shards();
        let parts: Vec<ShardPartial> = self
            .stores
            .iter()
            .enumerate()
            .map(|(s, store)| {
                let logical: Vec<Vec<u32>> = self
                    .seqs
                    .iter()
                    .map(|seq| logical_blocks(s, shards, seq.tables.blocks()))
                    .collect();
                let seqs: Vec<ShardSeq<'_>> = self
                    .seqs
                    .iter()
                    .zip(&logical)
                    .map(|(seq, logical)| ShardSeq {
                        rows: seq.rows.clone(),
                        start: seq.start,
                        logical,
                        table: &seq.tables.shards[s],
                    })
                    .collect();
                shard_attention(store.layer(layer), &seqs, heads, scale, q)
            })
            .collect();
        merge_shards(&parts, d, out);
    }
}
