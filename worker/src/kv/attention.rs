//! Paged attention: each query token attends over its sequence's KV blocks directly, through the
//! block table, with a single-pass (online) softmax. No gather into a contiguous copy: candle's
//! `index_select` gather measured ~3% of memory bandwidth here.
//!
//! Work is split across threads by (token, head) pairs. Within a pair, each block contributes its
//! scores at once: the block's maximum rescales the running sum, then the block's values are
//! accumulated. Invariant: a query at position `p` sees exactly positions `0..=p`.

use rayon::prelude::*;
use tidelock_protocol::BlockId;

use crate::kv::LayerKv;

/// One sequence's queries in a batched attention call.
#[derive(Debug, Clone)]
pub struct AttnSeq<'a> {
    /// Row range of this sequence's tokens in the batch.
    pub rows: std::ops::Range<usize>,
    /// Absolute position of the first of those tokens.
    pub start: usize,
    /// The sequence's block table; covers every position up to the last token.
    pub table: &'a [BlockId],
}

/// Computes attention for every query row.
///
/// `q` is `[rows, heads * head_dim]`; `out` has the same shape. `scale` multiplies the scores
/// (usually `1/sqrt(head_dim)`).
pub fn paged_attention(
    kv: LayerKv<'_>,
    seqs: &[AttnSeq<'_>],
    heads: usize,
    scale: f32,
    q: &[f32],
    out: &mut [f32],
) {
    let d = kv.shape.head_dim;
    let kv_heads = kv.shape.kv_heads;
    let group = heads / kv_heads;
    // Map each output row to its sequence and position.
    let mut row_info = Vec::with_capacity(q.len() / (heads * d));
    for (s, seq) in seqs.iter().enumerate() {
        for (i, _) in seq.rows.clone().enumerate() {
            row_info.push((s, seq.start + i));
        }
    }
    // One task per (row, kv head): the query heads sharing a kv head (grouped-query attention)
    // are computed in one pass, so each page of keys and values is read once, not `group` times.
    // Compiled once per instruction set (AVX2, AVX-512...) and chosen at run time: the inner
    // loops are written to autovectorise.
    let arch = pulp::Arch::new();
    out.par_chunks_mut(group * d)
        .enumerate()
        .for_each(|(task, out_group)| {
            let row = task / kv_heads;
            let kv_head = task % kv_heads;
            let (s, position) = row_info[row];
            let q_group = &q[task * group * d..(task + 1) * group * d];
            arch.dispatch(|| {
                attend_group(
                    kv,
                    seqs[s].table,
                    kv_head,
                    position,
                    scale,
                    q_group,
                    out_group,
                )
            });
        });
}

/// Attention of the query heads of one kv head over positions `0..=position`.
#[inline(always)]
fn attend_group(
    kv: LayerKv<'_>,
    table: &[BlockId],
    kv_head: usize,
    position: usize,
    scale: f32,
    q: &[f32],
    out: &mut [f32],
) {
    let s = kv.shape;
    let d = s.head_dim;
    let bt = s.block_tokens;
    let group = q.len() / d;
    let mut max = vec![f32::NEG_INFINITY; group];
    let mut sum = vec![0.0f32; group];
    let mut acc = vec![0.0f32; group * d];
    // scores[g * bt + j]: query head g against slot j of the current block.
    let mut scores = vec![0.0f32; group * bt];
    let len = position + 1;
    for (b, &block) in table.iter().enumerate().take(len.div_ceil(bt)) {
        let n = (len - b * bt).min(bt);
        let base = s.offset(block, kv_head, 0);
        let keys = &kv.keys[base..base + n * d];
        let values = &kv.values[base..base + n * d];
        for (j, key) in keys.chunks_exact(d).enumerate() {
            for (g, qg) in q.chunks_exact(d).enumerate() {
                scores[g * bt + j] = dot(qg, key) * scale;
            }
        }
        for g in 0..group {
            let block_scores = &mut scores[g * bt..g * bt + n];
            let block_max = block_scores
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            let new_max = max[g].max(block_max);
            let correction = (max[g] - new_max).exp();
            let mut block_sum = 0.0;
            for sc in block_scores.iter_mut() {
                *sc = (*sc - new_max).exp();
                block_sum += *sc;
            }
            sum[g] = sum[g] * correction + block_sum;
            let acc_g = &mut acc[g * d..(g + 1) * d];
            for a in acc_g.iter_mut() {
                *a *= correction;
            }
            max[g] = new_max;
        }
        for (j, value) in values.chunks_exact(d).enumerate() {
            for g in 0..group {
                let p = scores[g * bt + j];
                for (a, v) in acc[g * d..(g + 1) * d].iter_mut().zip(value) {
                    *a += p * v;
                }
            }
        }
    }
    for g in 0..group {
        let inv = 1.0 / sum[g];
        for (o, a) in out[g * d..(g + 1) * d]
            .iter_mut()
            .zip(&acc[g * d..(g + 1) * d])
        {
            *o = a * inv;
        }
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorise without reassociating.
    let mut lanes = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            lanes[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut total: f32 = lanes.iter().sum();
    for i in chunks * 8..a.len() {
        total += a[i] * b[i];
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvShape, KvStore};

    /// Plain softmax attention over contiguous rows, the reference.
    fn reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let scores: Vec<f32> = keys.iter().map(|k| dot(q, k) * scale).collect();
        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f32 = weights.iter().sum();
        let mut out = vec![0.0; q.len()];
        for (w, v) in weights.iter().zip(values) {
            for (o, x) in out.iter_mut().zip(v) {
                *o += w / total * x;
            }
        }
        out
    }

    fn pseudo(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn paged_matches_contiguous_reference_with_scattered_blocks_and_gqa() {
        let shape = KvShape {
            layers: 1,
            kv_heads: 2,
            head_dim: 16,
            block_tokens: 4,
        };
        let heads = 4;
        let mut store = KvStore::new(shape, 8);
        // Out-of-order physical blocks: the table, not the storage order, defines positions.
        let table: Vec<BlockId> = [5u32, 0, 7, 2].into_iter().map(BlockId::new).collect();
        let len = 14;
        let mut seed = 7;
        let mut keys = vec![vec![]; 2];
        let mut values = vec![vec![]; 2];
        for p in 0..len {
            let k: Vec<f32> = (0..32).map(|_| pseudo(&mut seed)).collect();
            let v: Vec<f32> = (0..32).map(|_| pseudo(&mut seed)).collect();
            store.write(0, &table, p, &k, &v);
            for h in 0..2 {
                keys[h].push(k[h * 16..(h + 1) * 16].to_vec());
                values[h].push(v[h * 16..(h + 1) * 16].to_vec());
            }
        }
        // Queries for the last 3 positions (a prefill chunk), all heads.
        let rows = 3;
        let q: Vec<f32> = (0..rows * heads * 16).map(|_| pseudo(&mut seed)).collect();
        let mut out = vec![0.0; q.len()];
        let seq = AttnSeq {
            rows: 0..rows,
            start: len - rows,
            table: &table,
        };
        paged_attention(store.layer(0), &[seq], heads, 0.25, &q, &mut out);
        for r in 0..rows {
            let position = len - rows + r;
            for h in 0..heads {
                let kvh = h / 2;
                let qh = &q[(r * heads + h) * 16..][..16];
                let want = reference(qh, &keys[kvh][..=position], &values[kvh][..=position], 0.25);
                let got = &out[(r * heads + h) * 16..][..16];
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-5, "row {r} head {h}: {g} vs {w}");
                }
            }
        }
    }
}
