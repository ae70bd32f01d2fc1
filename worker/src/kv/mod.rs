//! The KV store: every layer's keys and values in fixed-size blocks of `block_tokens` tokens.
//!
//! Page layout, per layer: values `[block][kv_head][slot][head_dim]` and keys
//! `[block][kv_head][head_dim][slot]`, so that one head's keys (or values) of one block are
//! contiguous (`block_tokens * head_dim` floats: 16 KiB at 64 tokens and head dim 64).
//! PERF-NOTES measured this head-major layout at 70-80% of memory bandwidth for decode attention
//! against 55-65% for vLLM's `[block][slot][head][dim]`. Keys are transposed within a page so
//! that scores for a vector of slots are plain vertical FMAs (no horizontal sum per key: those
//! cost as much as the products). A sequence's blocks are listed in its
//! block table; position `p` lives in block `table[p / block_tokens]`, slot `p % block_tokens`.
//! Which blocks a sequence owns, sharing and eviction are the block pool's business; this module
//! only stores and reads.

pub mod attention;
pub mod backend;
pub mod device;
pub mod pool;
pub mod shard;
pub mod tier;

use tidelock_protocol::BlockId;
use tidelock_protocol::blocks::{Arrangement, BlockLayout, KvDtype};

use crate::model::ModelError;

// Block payloads (`tidelock_protocol::blocks`) are the store's bytes as they lie in memory,
// specified little-endian.
#[cfg(target_endian = "big")]
compile_error!("KV block payloads are copied as little-endian memory");

/// The geometry of the KV store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_tokens: usize,
}

impl KvShape {
    /// Floats of one block of one layer, keys or values.
    pub fn block_floats(&self) -> usize {
        self.kv_heads * self.block_tokens * self.head_dim
    }

    /// Bytes one block takes across all layers, keys and values.
    pub fn block_bytes(&self) -> usize {
        2 * self.layers * self.block_floats() * std::mem::size_of::<f32>()
    }

    /// How one block's payload is laid out when it leaves a store of this shape (disk tier,
    /// peer pulls).
    pub fn block_layout(&self, dtype: KvDtype, arrangement: Arrangement) -> BlockLayout {
        let n = |v: usize| u32::try_from(v).expect("KV geometry fits in u32");
        BlockLayout {
            layers: n(self.layers),
            kv_heads: n(self.kv_heads),
            head_dim: n(self.head_dim),
            block_tokens: n(self.block_tokens),
            dtype,
            arrangement,
        }
    }

    /// How many blocks fit in `bytes`.
    pub fn blocks_in(&self, bytes: u64) -> usize {
        usize::try_from(bytes / self.block_bytes() as u64).unwrap_or(usize::MAX)
    }

    /// Offset of `(block, head, slot)` inside one layer's values, or of the page of
    /// `(block, head)` in the keys with `slot` 0.
    #[inline]
    pub fn offset(&self, block: BlockId, head: usize, slot: usize) -> usize {
        ((block.get() as usize * self.kv_heads + head) * self.block_tokens + slot) * self.head_dim
    }

    /// Offset of dimension `dim` of the key at `(block, head, slot)` (keys are transposed
    /// within each page: `[head_dim][slot]`).
    #[inline]
    pub fn key_offset(&self, block: BlockId, head: usize, slot: usize, dim: usize) -> usize {
        self.offset(block, head, 0) + dim * self.block_tokens + slot
    }
}

/// Zeroed, page-aligned f32 storage in an anonymous mapping advised to use transparent huge
/// pages. Decode attention reads pages in block-table order, not memory order; with 4 KiB pages
/// the hardware prefetcher restarts every 4 KiB (four times per 16 KiB KV page), and the TLB
/// misses on every block. Where the kernel has no huge pages the advice is ignored.
#[derive(Debug)]
pub struct HugeBuf {
    map: memmap2::MmapMut,
    len: usize,
}

impl HugeBuf {
    /// `len` zeroed floats. Panics when the mapping fails (out of address space or memory),
    /// as a `Vec` allocation would abort.
    pub fn zeroed(len: usize) -> Self {
        let bytes = (len * std::mem::size_of::<f32>()).max(1);
        let map = memmap2::MmapOptions::new()
            .len(bytes)
            .map_anon()
            .unwrap_or_else(|e| panic!("cannot map {bytes} bytes for the KV store: {e}"));
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        HugeBuf { map, len }
    }

    pub fn as_slice(&self) -> &[f32] {
        bytemuck::cast_slice(&self.map[..self.len * std::mem::size_of::<f32>()])
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        bytemuck::cast_slice_mut(&mut self.map[..self.len * std::mem::size_of::<f32>()])
    }
}

/// Keys and values of every layer, for a fixed number of blocks.
#[derive(Debug)]
pub struct KvStore {
    shape: KvShape,
    num_blocks: usize,
    keys: Vec<HugeBuf>,
    values: Vec<HugeBuf>,
}

impl KvStore {
    /// Allocates `num_blocks` zeroed blocks.
    pub fn new(shape: KvShape, num_blocks: usize) -> Self {
        let floats = num_blocks * shape.block_floats();
        KvStore {
            shape,
            num_blocks,
            keys: (0..shape.layers).map(|_| HugeBuf::zeroed(floats)).collect(),
            values: (0..shape.layers).map(|_| HugeBuf::zeroed(floats)).collect(),
        }
    }

    pub fn shape(&self) -> &KvShape {
        &self.shape
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// One layer's keys and values.
    pub fn layer(&self, layer: usize) -> LayerKv<'_> {
        LayerKv {
            shape: &self.shape,
            keys: self.keys[layer].as_slice(),
            values: self.values[layer].as_slice(),
        }
    }

    /// Writes the keys and values (`kv_heads * head_dim` floats each) of the token at `position`.
    pub fn write(
        &mut self,
        layer: usize,
        table: &[BlockId],
        position: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let s = self.shape;
        let block = table[position / s.block_tokens];
        let slot = position % s.block_tokens;
        for head in 0..s.kv_heads {
            let dst = s.offset(block, head, slot);
            let src = head * s.head_dim;
            self.values[layer].as_mut_slice()[dst..dst + s.head_dim]
                .copy_from_slice(&v[src..src + s.head_dim]);
            let page = s.key_offset(block, head, slot, 0);
            let keys = &mut self.keys[layer].as_mut_slice()[page..];
            for (i, &x) in k[src..src + s.head_dim].iter().enumerate() {
                keys[i * s.block_tokens] = x;
            }
        }
    }
}

impl KvStore {
    /// The layout of [`KvStore::export_block`]'s payloads: f32, head-major pages as stored.
    pub fn block_layout(&self) -> BlockLayout {
        self.shape
            .block_layout(KvDtype::F32, Arrangement::HeadMajor)
    }

    /// Appends one block's keys and values, layer after layer, to `out` (the block's pages as
    /// they lie in memory, so a round trip is bit-exact).
    pub fn export_block(&self, block: BlockId, out: &mut Vec<u8>) -> Result<(), ModelError> {
        let range = self.block_range(block)?;
        out.reserve(2 * self.shape.layers * range.len() * 4);
        for layer in 0..self.shape.layers {
            out.extend_from_slice(bytemuck::cast_slice(
                &self.keys[layer].as_slice()[range.clone()],
            ));
            out.extend_from_slice(bytemuck::cast_slice(
                &self.values[layer].as_slice()[range.clone()],
            ));
        }
        Ok(())
    }

    /// Overwrites one block with a payload of [`KvStore::export_block`].
    pub fn import_block(&mut self, block: BlockId, payload: &[u8]) -> Result<(), ModelError> {
        let range = self.block_range(block)?;
        let page = range.len() * 4;
        if payload.len() != 2 * self.shape.layers * page {
            return Err(ModelError::Input(format!(
                "a block payload of {} bytes; this store's blocks take {}",
                payload.len(),
                2 * self.shape.layers * page
            )));
        }
        for (layer, pages) in payload.chunks_exact(2 * page).enumerate() {
            let (keys, values) = pages.split_at(page);
            bytemuck::cast_slice_mut::<f32, u8>(
                &mut self.keys[layer].as_mut_slice()[range.clone()],
            )
            .copy_from_slice(keys);
            bytemuck::cast_slice_mut::<f32, u8>(
                &mut self.values[layer].as_mut_slice()[range.clone()],
            )
            .copy_from_slice(values);
        }
        Ok(())
    }

    /// The floats of `block` within one layer's keys (or values).
    fn block_range(&self, block: BlockId) -> Result<std::ops::Range<usize>, ModelError> {
        if block.get() as usize >= self.num_blocks {
            return Err(ModelError::Input(format!(
                "block {block} is outside the KV store of {} blocks",
                self.num_blocks
            )));
        }
        let start = self.shape.offset(block, 0, 0);
        Ok(start..start + self.shape.block_floats())
    }
}

/// A read view of one layer.
#[derive(Debug, Clone, Copy)]
pub struct LayerKv<'a> {
    pub shape: &'a KvShape,
    pub keys: &'a [f32],
    pub values: &'a [f32],
}
