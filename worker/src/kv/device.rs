//! KV pages as tensors on a candle device: the `candle` backend's store and attention.
//!
//! Layout, per layer: keys and values `[block * block_tokens + slot, kv_heads * head_dim]` in
//! the store's dtype (f32, f16 or bf16): one row per token slot, a token's heads side by side,
//! so a sequence's context is one `index_select` of its slots. Position `p` of a sequence lives
//! at row `table[p / block_tokens] * block_tokens + p % block_tokens`, the same block numbering
//! as the host store's, so the block pool, prefix cache and KV events do not change.
//!
//! A forward call ([`DeviceAttention`]) works out, once for all layers, each new token's slot
//! (the rows of one `scatter_set`) and each sequence's context slots. Per layer it rotates q and
//! k with candle ops, writes the new keys and values in place, and attends in f32:
//! - sequences of one row (decode) together: their contexts gathered into one padded
//!   `[batch, context, kv_heads, head_dim]` tensor, one batched product, masked beyond each
//!   sequence's length;
//! - longer chunks (prefill) one at a time, in tiles of query rows, with a causal mask.
//!
//! Gathering copies the context once per layer: a paged-attention kernel reading the blocks in
//! place would save that copy on a GPU; the seam for one is [`Attention`].

use candle_core::{D, DType, Device, Tensor};

use tidelock_protocol::BlockId;
use tidelock_protocol::blocks::{Arrangement, BlockLayout, KvDtype};

use crate::kv::KvShape;
use crate::kv::backend::{Attention, PagedKv, PagedSeq, StepGeometry};
use crate::model::ModelError;
use crate::model::config::RopeStyle;

/// Query rows of a chunk attended in one product: bounds the scores tensor to
/// `heads * TILE * context` floats.
const QUERY_TILE: usize = 256;

/// Every layer's keys and values, for a fixed number of blocks, on a device.
#[derive(Debug)]
pub struct DeviceKv {
    shape: KvShape,
    num_blocks: usize,
    dtype: DType,
    device: Device,
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
}

impl DeviceKv {
    /// Allocates `num_blocks` zeroed blocks of `dtype` on `device`.
    pub fn new(
        shape: KvShape,
        num_blocks: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(ModelError::Input(format!(
                "a KV cache of {dtype:?}: f32, f16 or bf16"
            )));
        }
        let slots = num_blocks * shape.block_tokens;
        let width = shape.kv_heads * shape.head_dim;
        let zeros = || Tensor::zeros((slots, width), dtype, device);
        Ok(DeviceKv {
            shape,
            num_blocks,
            dtype,
            device: device.clone(),
            keys: (0..shape.layers)
                .map(|_| zeros())
                .collect::<Result<_, _>>()?,
            values: (0..shape.layers)
                .map(|_| zeros())
                .collect::<Result<_, _>>()?,
        })
    }

    /// Bytes one block takes across all layers, keys and values, in `dtype`.
    pub fn block_bytes(shape: &KvShape, dtype: DType) -> usize {
        2 * shape.layers * shape.block_floats() * dtype.size_in_bytes()
    }

    pub fn shape(&self) -> &KvShape {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The first row of `block`.
    fn block_start(&self, block: BlockId) -> Result<usize, ModelError> {
        match (block.get() as usize) < self.num_blocks {
            true => Ok(block.get() as usize * self.shape.block_tokens),
            false => Err(ModelError::Input(format!(
                "block {block} is outside the KV store of {} blocks",
                self.num_blocks
            ))),
        }
    }

    /// One layer's keys and values, `[slots, kv_heads * head_dim]`.
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.keys[layer], &self.values[layer])
    }
}

impl PagedKv for DeviceKv {
    fn block_tokens(&self) -> usize {
        self.shape.block_tokens
    }

    fn block_layout(&self) -> BlockLayout {
        let dtype = match self.dtype {
            DType::F16 => KvDtype::F16,
            DType::BF16 => KvDtype::Bf16,
            _ => KvDtype::F32,
        };
        self.shape.block_layout(dtype, Arrangement::TokenMajor)
    }

    /// One block's rows of every layer's keys then values, in the store's dtype: the one place
    /// a block's bytes cross to the host (the spill tiers, a peer pull).
    fn export_block(&self, block: BlockId, out: &mut Vec<u8>) -> Result<(), ModelError> {
        let start = self.block_start(block)?;
        let bt = self.shape.block_tokens;
        for layer in 0..self.shape.layers {
            for t in [&self.keys[layer], &self.values[layer]] {
                let rows = t.narrow(0, start, bt)?.flatten_all()?;
                match self.dtype {
                    DType::F16 => out.extend(
                        rows.to_vec1::<half::f16>()?
                            .iter()
                            .flat_map(|x| x.to_bits().to_le_bytes()),
                    ),
                    DType::BF16 => out.extend(
                        rows.to_vec1::<half::bf16>()?
                            .iter()
                            .flat_map(|x| x.to_bits().to_le_bytes()),
                    ),
                    _ => out.extend_from_slice(bytemuck::cast_slice(&rows.to_vec1::<f32>()?)),
                }
            }
        }
        Ok(())
    }

    fn import_block(&mut self, block: BlockId, payload: &[u8]) -> Result<(), ModelError> {
        let start = self.block_start(block)?;
        let bt = self.shape.block_tokens;
        let width = self.shape.kv_heads * self.shape.head_dim;
        let page = bt * width * self.dtype.size_in_bytes();
        if payload.len() != 2 * self.shape.layers * page {
            return Err(ModelError::Input(format!(
                "a block payload of {} bytes; this store's blocks take {}",
                payload.len(),
                2 * self.shape.layers * page
            )));
        }
        for (i, bytes) in payload.chunks_exact(page).enumerate() {
            let rows = Tensor::from_raw_buffer(bytes, self.dtype, &[bt, width], &self.device)?;
            let t = match i % 2 {
                0 => &self.keys[i / 2],
                _ => &self.values[i / 2],
            };
            t.slice_set(&rows, 0, start)?;
        }
        Ok(())
    }

    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn on_device(&self) -> bool {
        true
    }

    fn attention<'a>(
        &'a mut self,
        seqs: &[PagedSeq<'a>],
        device: &Device,
    ) -> Result<Box<dyn Attention + 'a>, ModelError> {
        if !device.same_device(&self.device) {
            return Err(ModelError::Input(format!(
                "the model is on {device:?} but its KV cache on {:?}",
                self.device
            )));
        }
        Ok(Box::new(DeviceAttention::new(self, seqs)?))
    }
}

/// The slot of position `p` of a sequence with block table `table`.
fn slot(table: &[tidelock_protocol::BlockId], block_tokens: usize, p: usize) -> u32 {
    let block = table[p / block_tokens].get() as usize;
    u32::try_from(block * block_tokens + p % block_tokens).expect("fewer than 2^32 KV slots")
}

/// One forward call's attention over a [`DeviceKv`].
#[derive(Debug)]
pub struct DeviceAttention<'a> {
    kv: &'a mut DeviceKv,
    /// Per new row, its slot repeated over the row's width: the indexes of `scatter_set`.
    write_index: Tensor,
    /// The sequences of one row, attended together.
    decode: Option<DecodeBatch>,
    /// The longer chunks, one by one.
    chunks: Vec<Chunk>,
    /// The batch row each row of the concatenated outputs (decode rows, then each chunk's)
    /// belongs to, where that is not the identity.
    order: Option<Tensor>,
    /// `[rows, 1, head_dim / 2]` cos and sin, made at the first layer.
    rope: Option<(Tensor, Tensor)>,
}

#[derive(Debug)]
struct DecodeBatch {
    /// The batch rows, in order.
    rows: Vec<usize>,
    /// The same rows as an index, to pick their queries.
    index: Tensor,
    /// `[batch * context]` slots, padded with each sequence's last slot.
    gather: Tensor,
    /// `[batch, 1, 1, context]`: 0 where a key is in the sequence, -inf beyond.
    mask: Tensor,
    context: usize,
}

#[derive(Debug)]
struct Chunk {
    rows: std::ops::Range<usize>,
    start: usize,
    /// `[start + rows]` slots of its context.
    gather: Tensor,
    /// Per tile of [`QUERY_TILE`] query rows, `[1, 1, tile, context]`: 0 where a key is at or
    /// before the row's position, -inf after.
    masks: Vec<Tensor>,
}

impl<'a> DeviceAttention<'a> {
    fn new(kv: &'a mut DeviceKv, seqs: &[PagedSeq<'a>]) -> Result<Self, ModelError> {
        let device = kv.device.clone();
        let bt = kv.shape.block_tokens;
        let width = kv.shape.kv_heads * kv.shape.head_dim;
        let rows: usize = seqs.iter().map(|s| s.rows.len()).sum();
        let mut write = Vec::with_capacity(rows * width);
        let mut row_slots = vec![0u32; rows];
        for seq in seqs {
            for (i, r) in seq.rows.clone().enumerate() {
                row_slots[r] = slot(seq.table, bt, seq.start + i);
            }
        }
        for &s in &row_slots {
            write.extend(std::iter::repeat_n(s, width));
        }
        let write_index = Tensor::from_vec(write, (rows, width), &device)?;

        let singles: Vec<&PagedSeq<'_>> = seqs.iter().filter(|s| s.rows.len() == 1).collect();
        let decode = match singles.is_empty() {
            true => None,
            false => {
                let context = singles.iter().map(|s| s.start + 1).max().unwrap_or(1);
                let mut gather = Vec::with_capacity(singles.len() * context);
                let mut mask = Vec::with_capacity(singles.len() * context);
                for s in &singles {
                    let len = s.start + 1;
                    for p in 0..context {
                        gather.push(slot(s.table, bt, p.min(len - 1)));
                        mask.push(if p < len { 0.0f32 } else { f32::NEG_INFINITY });
                    }
                }
                let b = singles.len();
                let rows: Vec<usize> = singles.iter().map(|s| s.rows.start).collect();
                let index = rows.iter().map(|&r| r as u32).collect();
                Some(DecodeBatch {
                    index: Tensor::from_vec(index, b, &device)?,
                    rows,
                    gather: Tensor::from_vec(gather, b * context, &device)?,
                    mask: Tensor::from_vec(mask, (b, 1, 1, context), &device)?,
                    context,
                })
            }
        };
        let chunks = seqs
            .iter()
            .filter(|s| s.rows.len() > 1)
            .map(|s| {
                let end = s.start + s.rows.len();
                let slots: Vec<u32> = (0..end).map(|p| slot(s.table, bt, p)).collect();
                Ok(Chunk {
                    rows: s.rows.clone(),
                    start: s.start,
                    gather: Tensor::from_vec(slots, end, &device)?,
                    masks: causal_masks(s.start, s.rows.len(), &device)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;

        let concatenated: Vec<u32> = decode
            .iter()
            .flat_map(|d| d.rows.iter().map(|&r| r as u32))
            .chain(chunks.iter().flat_map(|c| c.rows.clone().map(|r| r as u32)))
            .collect();
        // Output row r is row `position[r]` of the concatenation.
        let mut position = vec![0u32; rows];
        for (i, &r) in concatenated.iter().enumerate() {
            position[r as usize] = i as u32;
        }
        let identity = position.iter().enumerate().all(|(i, &p)| p as usize == i);
        let order = match identity {
            true => None,
            false => Some(Tensor::from_vec(position, rows, &device)?),
        };
        Ok(DeviceAttention {
            kv,
            write_index,
            decode,
            chunks,
            order,
            rope: None,
        })
    }

    /// Rotates `x` (`[rows, heads, head_dim]`) by each row's angles.
    fn rotate(&self, x: &Tensor, style: RopeStyle) -> candle_core::Result<Tensor> {
        let (cos, sin) = self.rope.as_ref().expect("made at the first layer");
        let (rows, heads, d) = x.dims3()?;
        let half = d / 2;
        match style {
            RopeStyle::Halves => {
                let x1 = x.narrow(2, 0, half)?;
                let x2 = x.narrow(2, half, half)?;
                let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
                let b = (x1.broadcast_mul(sin)? + x2.broadcast_mul(cos)?)?;
                Tensor::cat(&[a, b], 2)
            }
            RopeStyle::Interleaved => {
                let pairs = x.reshape((rows, heads, half, 2))?;
                let x0 = pairs.narrow(3, 0, 1)?;
                let x1 = pairs.narrow(3, 1, 1)?;
                let (cos, sin) = (cos.unsqueeze(3)?, sin.unsqueeze(3)?);
                let a = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
                let b = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
                Tensor::cat(&[a, b], 3)?.reshape((rows, heads, d))
            }
        }
    }
}

impl Attention for DeviceAttention<'_> {
    fn layer(
        &mut self,
        layer: usize,
        qkv: &Tensor,
        step: &StepGeometry,
    ) -> Result<Tensor, ModelError> {
        let rows = step.rows();
        let (heads, kv_heads, d) = (step.heads, step.kv_heads, step.head_dim);
        let (q_width, kv_width) = (step.q_width(), step.kv_width());
        let device = self.kv.device.clone();
        if self.rope.is_none() {
            let half = d / 2;
            let cos = Tensor::from_slice(&step.cos, (rows, 1, half), &device)?;
            let sin = Tensor::from_slice(&step.sin, (rows, 1, half), &device)?;
            self.rope = Some((cos, sin));
        }
        let q = self.rotate(
            &qkv.narrow(1, 0, q_width)?.reshape((rows, heads, d))?,
            step.rope_style,
        )?;
        let k = self
            .rotate(
                &qkv.narrow(1, q_width, kv_width)?
                    .reshape((rows, kv_heads, d))?,
                step.rope_style,
            )?
            .reshape((rows, kv_width))?;
        let v = qkv.narrow(1, q_width + kv_width, kv_width)?;
        let dtype = self.kv.dtype;
        let (keys, values) = (&self.kv.keys[layer], &self.kv.values[layer]);
        keys.scatter_set(&self.write_index, &k.to_dtype(dtype)?.contiguous()?, 0)?;
        values.scatter_set(&self.write_index, &v.to_dtype(dtype)?.contiguous()?, 0)?;

        let group = heads / kv_heads;
        let mut outs = Vec::with_capacity(1 + self.chunks.len());
        if let Some(batch) = &self.decode {
            let b = batch.rows.len();
            let c = batch.context;
            let pick = |t: &Tensor| -> candle_core::Result<Tensor> {
                t.index_select(&batch.gather, 0)?
                    .to_dtype(DType::F32)?
                    .reshape((b, c, kv_heads, d))?
                    .transpose(1, 2)
            };
            // [b, kv_heads, d, c] and [b, kv_heads, c, d].
            let kt = pick(keys)?.transpose(2, 3)?.contiguous()?;
            let vs = pick(values)?.contiguous()?;
            let qb = q
                .index_select(&batch.index, 0)?
                .reshape((b, kv_heads, group, d))?
                .contiguous()?;
            let scores = (qb.matmul(&kt)? * f64::from(step.scale))?.broadcast_add(&batch.mask)?;
            let out = softmax(&scores)?.matmul(&vs)?;
            outs.push(out.reshape((b, q_width))?);
        }
        for chunk in &self.chunks {
            let n = chunk.rows.len();
            let context = chunk.start + n;
            let kt = keys
                .index_select(&chunk.gather, 0)?
                .to_dtype(DType::F32)?
                .reshape((context, kv_heads, d))?
                .permute((1, 2, 0))?
                .contiguous()?;
            let vs = values
                .index_select(&chunk.gather, 0)?
                .to_dtype(DType::F32)?
                .reshape((context, kv_heads, d))?
                .transpose(0, 1)?
                .contiguous()?;
            let qc = q.narrow(0, chunk.rows.start, n)?;
            let mut tiles = Vec::with_capacity(chunk.masks.len());
            for (t0, mask) in (0..n).step_by(QUERY_TILE).zip(&chunk.masks) {
                let m = QUERY_TILE.min(n - t0);
                // [kv_heads, group * m, d]: query heads grouped under their kv head.
                let qt = qc
                    .narrow(0, t0, m)?
                    .transpose(0, 1)?
                    .reshape((kv_heads, group * m, d))?
                    .contiguous()?;
                let scores = (qt.matmul(&kt)? * f64::from(step.scale))?
                    .reshape((kv_heads, group, m, context))?
                    .broadcast_add(mask)?;
                let out = softmax(&scores)?
                    .reshape((kv_heads, group * m, context))?
                    .matmul(&vs)?
                    // [heads, m, d] -> [m, heads * d]
                    .reshape((heads, m, d))?
                    .transpose(0, 1)?
                    .reshape((m, q_width))?;
                tiles.push(out);
            }
            outs.push(Tensor::cat(&tiles, 0)?);
        }
        let out = match outs.len() {
            1 => outs.remove(0),
            _ => Tensor::cat(&outs, 0)?,
        };
        Ok(match &self.order {
            Some(order) => out.index_select(order, 0)?,
            None => out,
        })
    }
}

/// The causal masks of a chunk of `n` rows from position `start`, one per tile of
/// [`QUERY_TILE`] rows: made once per forward call, used by every layer.
fn causal_masks(start: usize, n: usize, device: &Device) -> candle_core::Result<Vec<Tensor>> {
    let context = start + n;
    let key_positions = Tensor::arange(0u32, context as u32, device)?.reshape((1, context))?;
    (0..n)
        .step_by(QUERY_TILE)
        .map(|t0| {
            let m = QUERY_TILE.min(n - t0);
            let first = (start + t0) as u32;
            let query_positions =
                Tensor::arange(first, first + m as u32, device)?.reshape((m, 1))?;
            let visible = key_positions.broadcast_le(&query_positions)?;
            let zeros = Tensor::zeros((m, context), DType::F32, device)?;
            let hidden = Tensor::full(f32::NEG_INFINITY, (m, context), device)?;
            visible
                .where_cond(&zeros, &hidden)?
                .reshape((1, 1, m, context))
        })
        .collect()
}

/// Softmax over the last dimension, in f32.
fn softmax(scores: &Tensor) -> candle_core::Result<Tensor> {
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvStore;
    use candle_core::IndexOp;
    use tidelock_protocol::BlockId;

    fn shape() -> KvShape {
        KvShape {
            layers: 1,
            kv_heads: 2,
            head_dim: 8,
            block_tokens: 4,
        }
    }

    /// Export, import elsewhere, export again: the same bytes, for every dtype (the spill tiers'
    /// and peer pulls' round trip).
    #[test]
    fn blocks_export_and_import_bit_exact() {
        let s = KvShape {
            layers: 2,
            ..shape()
        };
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut kv = DeviceKv::new(s, 4, dtype, &Device::Cpu).unwrap();
            for layer in 0..s.layers {
                let rows = 4 * s.block_tokens;
                let width = s.kv_heads * s.head_dim;
                let data: Vec<f32> = (0..rows * width)
                    .map(|i| ((i * 37 + layer * 11) % 101) as f32 / 7.0 - 3.0)
                    .collect();
                let t = Tensor::from_vec(data, (rows, width), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                kv.keys[layer] = t.clone();
                kv.values[layer] = (t * 2.0).unwrap();
            }
            let mut a = Vec::new();
            kv.export_block(BlockId::new(1), &mut a).unwrap();
            assert_eq!(a.len() as u64, kv.block_layout().payload_bytes());
            let mut other = DeviceKv::new(s, 4, dtype, &Device::Cpu).unwrap();
            other.import_block(BlockId::new(3), &a).unwrap();
            let mut b = Vec::new();
            other.export_block(BlockId::new(3), &mut b).unwrap();
            assert_eq!(a, b, "{dtype:?}");
            let mut untouched = Vec::new();
            other.export_block(BlockId::new(1), &mut untouched).unwrap();
            assert!(
                untouched.iter().all(|&x| x == 0),
                "{dtype:?}: only block 3 written"
            );
            assert!(other.import_block(BlockId::new(4), &a).is_err());
            assert!(other.import_block(BlockId::new(0), &a[1..]).is_err());
        }
    }

    fn geometry(positions: Vec<usize>, style: RopeStyle) -> StepGeometry {
        let rows = positions.len();
        let half = 4;
        let cos = (0..rows * half).map(|i| (i as f32 * 0.1).cos()).collect();
        let sin = (0..rows * half).map(|i| (i as f32 * 0.1).sin()).collect();
        StepGeometry {
            positions,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            scale: 0.35,
            cos,
            sin,
            rope_style: style,
        }
    }

    fn qkv(rows: usize, seed: u32) -> Tensor {
        let width = (4 + 2 * 2) * 8;
        let data: Vec<f32> = (0..rows * width)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(data, (rows, width), &Device::Cpu).unwrap()
    }

    /// A mixed batch (a prefill chunk, a decode row, another chunk over shared blocks) gives the
    /// host kernels' result, in every KV dtype within its precision, and the keys land in the
    /// slots the host store uses.
    #[test]
    fn device_pages_match_host_pages() {
        for style in [RopeStyle::Halves, RopeStyle::Interleaved] {
            for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::F16, 5e-3), (DType::BF16, 3e-2)]
            {
                let tables: [Vec<BlockId>; 3] = [
                    vec![BlockId::new(3), BlockId::new(0), BlockId::new(5)],
                    vec![BlockId::new(1), BlockId::new(4)],
                    vec![BlockId::new(2)],
                ];
                let mut host = KvStore::new(shape(), 6);
                let mut device = DeviceKv::new(shape(), 6, dtype, &Device::Cpu).unwrap();
                // Step 1: prefill 9 tokens of sequence 0 and 5 of sequence 1.
                // Step 2: one decode row of sequence 0, 2 more rows of sequence 1, 3 of 2.
                let steps: [Vec<(usize, usize, usize)>; 2] = [
                    vec![(0, 0, 9), (1, 0, 5)],
                    vec![(0, 9, 1), (1, 5, 2), (2, 0, 3)],
                ];
                for (s, step) in steps.iter().enumerate() {
                    let mut row = 0;
                    let seqs: Vec<PagedSeq<'_>> = step
                        .iter()
                        .map(|&(seq, start, n)| {
                            let rows = row..row + n;
                            row += n;
                            PagedSeq {
                                rows,
                                start,
                                table: &tables[seq],
                            }
                        })
                        .collect();
                    let positions = step
                        .iter()
                        .flat_map(|&(_, start, n)| start..start + n)
                        .collect();
                    let g = geometry(positions, style);
                    let x = qkv(row, s as u32 + 7);
                    let want = host
                        .attention(&seqs, &Device::Cpu)
                        .unwrap()
                        .layer(0, &x, &g)
                        .unwrap();
                    let got = device
                        .attention(&seqs, &Device::Cpu)
                        .unwrap()
                        .layer(0, &x, &g)
                        .unwrap();
                    let diff = (want - got)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .max(0)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(
                        diff <= tolerance,
                        "{style:?} {dtype:?} step {s}: {diff} > {tolerance}"
                    );
                }
                // Position 6 of sequence 0 (block 0, slot 2), head 1, dim 3, both layouts.
                let s = shape();
                let host_key = host.layer(0).keys[s.key_offset(BlockId::new(0), 1, 2, 3)];
                let device_key = device.layer(0).0.i((2, 8 + 3)).unwrap();
                let device_key = device_key
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    (host_key - device_key).abs() <= tolerance,
                    "{host_key} vs {device_key}"
                );
            }
        }
    }

    #[test]
    fn other_dtypes_are_refused() {
        let err = DeviceKv::new(shape(), 2, DType::U32, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("f32, f16 or bf16"), "{err}");
    }
}
