//! Paged attention: each query token attends over its sequence's KV blocks directly, through the
//! block table, with a single-pass (online) softmax. No gather into a contiguous copy: candle's
//! `index_select` gather measured ~3% of memory bandwidth here.
//!
//! Work is split across threads by (kv head, tile of up to 16 consecutive query rows of one
//! sequence, range of blocks): the query heads sharing a kv head are computed in one pass, a
//! tile's rows visit each page while it is in cache, and a long context with few queries (decode)
//! is split into block ranges whose partial results merge exactly through their log-sum-exp.
//! Within a task, each block contributes its scores at once: the block's maximum rescales the
//! running sum, then the block's values are accumulated. Keys are stored transposed within a page
//! (see [`crate::kv`]), so scores are vertical FMAs over vectors of slots. Invariant: a query at
//! position `p` sees exactly positions `0..=p`.

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

/// One sequence's queries against the part of its context one shard holds: the blocks of
/// logical indices `logical` (ascending; block `i` covers positions `i * block_tokens ..`),
/// stored at `table` (same length) in this shard's KV store.
#[derive(Debug, Clone)]
pub struct ShardSeq<'a> {
    /// Row range of this sequence's tokens in the batch.
    pub rows: std::ops::Range<usize>,
    /// Absolute position of the first of those tokens.
    pub start: usize,
    /// Logical indices of the blocks held here, ascending.
    pub logical: &'a [u32],
    /// Where each of them is stored.
    pub table: &'a [BlockId],
}

/// What one shard returns for each (row, query head): the attention output over the positions it
/// holds, normalised over them, and the log-sum-exp of their scores (`-inf`, with a zero output,
/// when it holds none the row may see). [`merge_shards`] combines these exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardPartial {
    /// `[rows, heads * head_dim]`.
    pub out: Vec<f32>,
    /// `[rows, heads]`.
    pub lse: Vec<f32>,
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
    let views: Vec<View<'_>> = seqs
        .iter()
        .map(|s| View {
            rows: s.rows.clone(),
            start: s.start,
            logical: None,
            table: s.table,
        })
        .collect();
    let (d, kv_heads, group) = dims(&kv, heads);
    let (partials, splits, rows) = attend(kv, &views, heads, scale, q);
    // Log-sum-exps are not needed here: one scratch row for all of them.
    let mut lse = vec![0.0f32; group];
    for (pair, out_group) in out.chunks_exact_mut(group * d).enumerate() {
        let (row, kv_head) = (pair / kv_heads, pair % kv_heads);
        let first = (kv_head * rows + row) * splits;
        merge(
            &partials[first..first + splits],
            group,
            d,
            out_group,
            &mut lse,
        );
    }
}

/// Attention of every query row over the blocks this shard holds (see [`ShardSeq`]), with the
/// log-sum-exp the coordinator needs to merge the shards' results exactly.
pub fn shard_attention(
    kv: LayerKv<'_>,
    seqs: &[ShardSeq<'_>],
    heads: usize,
    scale: f32,
    q: &[f32],
) -> ShardPartial {
    let views: Vec<View<'_>> = seqs
        .iter()
        .map(|s| {
            assert_eq!(
                s.logical.len(),
                s.table.len(),
                "one location per logical block"
            );
            View {
                rows: s.rows.clone(),
                start: s.start,
                logical: Some(s.logical),
                table: s.table,
            }
        })
        .collect();
    let (d, kv_heads, group) = dims(&kv, heads);
    let (partials, splits, rows) = attend(kv, &views, heads, scale, q);
    let mut result = ShardPartial {
        out: vec![0.0; rows * heads * d],
        lse: vec![f32::NEG_INFINITY; rows * heads],
    };
    for (pair, (out_group, lse_group)) in result
        .out
        .chunks_exact_mut(group * d)
        .zip(result.lse.chunks_exact_mut(group))
        .enumerate()
    {
        let (row, kv_head) = (pair / kv_heads, pair % kv_heads);
        let first = (kv_head * rows + row) * splits;
        merge(
            &partials[first..first + splits],
            group,
            d,
            out_group,
            lse_group,
        );
    }
    result
}

/// Combines the shards' results for the same query rows exactly: with `L = log(sum_s e^lse_s)`,
/// the output is `sum_s e^(lse_s - L) * out_s`. `out` is `[rows, heads * head_dim]`.
pub fn merge_shards(parts: &[ShardPartial], head_dim: usize, out: &mut [f32]) {
    debug_assert!(parts.iter().all(|p| p.out.len() == out.len()));
    out.fill(0.0);
    let mut weights = Vec::with_capacity(parts.len());
    for (h, o) in out.chunks_exact_mut(head_dim).enumerate() {
        let total = parts
            .iter()
            .map(|p| p.lse[h])
            .fold(f32::NEG_INFINITY, f32::max);
        if total == f32::NEG_INFINITY {
            continue;
        }
        weights.clear();
        weights.extend(parts.iter().map(|p| (p.lse[h] - total).exp()));
        let norm: f32 = weights.iter().sum();
        for (p, w) in parts.iter().zip(&weights) {
            if *w == 0.0 {
                continue;
            }
            let w = w / norm;
            for (x, v) in o.iter_mut().zip(&p.out[h * head_dim..(h + 1) * head_dim]) {
                *x += w * v;
            }
        }
    }
}

/// A sequence's rows against some of its blocks (all of them when `logical` is `None`).
struct View<'a> {
    rows: std::ops::Range<usize>,
    start: usize,
    logical: Option<&'a [u32]>,
    table: &'a [BlockId],
}

/// `(head_dim, kv_heads, query heads per kv head)`.
fn dims(kv: &LayerKv<'_>, heads: usize) -> (usize, usize, usize) {
    let kv_heads = kv.shape.kv_heads;
    (kv.shape.head_dim, kv_heads, heads / kv_heads)
}

/// The unnormalised partial results of every (kv head, row, split), laid out
/// `[kv head][row][split]`; returns them with the number of splits and of rows.
fn attend(
    kv: LayerKv<'_>,
    seqs: &[View<'_>],
    heads: usize,
    scale: f32,
    q: &[f32],
) -> (Vec<Partial>, usize, usize) {
    let d = kv.shape.head_dim;
    let bt = kv.shape.block_tokens;
    let kv_heads = kv.shape.kv_heads;
    let group = heads / kv_heads;
    // Map each output row to its sequence and position.
    let mut row_info = Vec::with_capacity(q.len() / (heads * d));
    for (s, seq) in seqs.iter().enumerate() {
        for (i, _) in seq.rows.clone().enumerate() {
            row_info.push((s, seq.start + i));
        }
    }
    let rows = row_info.len();
    // Tasks: (kv head, tile of consecutive rows of one sequence, split of the context). The
    // query heads sharing a kv head (grouped-query attention) are computed in one pass, so each
    // page is read once per tile, not once per query head. A tile's rows visit each page one
    // after another while it is in cache, so a prefill chunk reads its context once per tile
    // rather than once per row. When there are fewer (row, kv head) pairs than threads (decode
    // of one long sequence), each pair's context is split into ranges of blocks whose partial
    // results are merged exactly through their log-sum-exp, so every core streams its share.
    let threads = rayon::current_num_threads().max(1);
    let pairs = rows * kv_heads;
    let longest = row_info
        .iter()
        .map(|&(_, p)| (p + 1).div_ceil(bt))
        .max()
        .unwrap_or(1);
    let splits = if pairs >= 2 * threads {
        1
    } else {
        // At least four tasks per thread, and a whole number of tasks per thread so no core
        // idles at the end while another streams its last split.
        let mut splits = (4 * threads).div_ceil(pairs);
        while !(pairs * splits).is_multiple_of(threads) {
            splits += 1;
        }
        splits.min(longest).max(1)
    };
    let tile = if splits > 1 {
        1
    } else {
        (pairs / (4 * threads)).clamp(1, MAX_TILE_ROWS)
    };
    // Partials laid out [kv head][row][split]: each task owns a contiguous run of them.
    let mut specs = Vec::new();
    for kv_head in 0..kv_heads {
        for (s, seq) in seqs.iter().enumerate() {
            let mut first = seq.rows.start;
            while first < seq.rows.end {
                let last = (first + tile).min(seq.rows.end);
                for split in 0..splits {
                    specs.push((kv_head, s, first..last, split));
                }
                first = last;
            }
        }
    }
    let mut partials: Vec<Partial> = (0..pairs * splits)
        .map(|_| Partial::new(group, d))
        .collect();
    let mut owned = Vec::with_capacity(specs.len());
    let mut rest = partials.as_mut_slice();
    for (_, _, tile_rows, _) in &specs {
        let (mine, tail) = rest.split_at_mut(tile_rows.len());
        owned.push(mine);
        rest = tail;
    }
    // Compiled once per instruction set (AVX2, AVX-512...) and chosen at run time.
    let arch = pulp::Arch::new();
    specs
        .into_par_iter()
        .zip(owned)
        .for_each(|((kv_head, s, tile_rows, split), partials)| {
            let start = row_info[tile_rows.start].1;
            let seq = &seqs[s];
            let needed = (row_info[tile_rows.end - 1].1 + 1).div_ceil(bt);
            // The entries of the table this tile may see: all of them up to `needed`.
            let blocks = match seq.logical {
                None => needed,
                Some(logical) => logical.partition_point(|&l| (l as usize) < needed),
            };
            let range = split * blocks / splits..(split + 1) * blocks / splits;
            let queries: Vec<&[f32]> = tile_rows
                .clone()
                .map(|r| &q[(r * kv_heads + kv_head) * group * d..][..group * d])
                .collect();
            arch.dispatch(Attend {
                kv,
                table: seq.table,
                logical: seq.logical,
                kv_head,
                start,
                range,
                scale,
                queries: &queries,
                partials,
            });
        });
    (partials, splits, rows)
}

/// The most query rows that share a pass over the pages.
const MAX_TILE_ROWS: usize = 16;

/// The unnormalised result of attention over part of the context, per query head of a group:
/// running maximum score, sum of exponentials relative to it, and the weighted sum of values.
#[derive(Debug, Clone)]
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

impl Partial {
    fn new(group: usize, d: usize) -> Self {
        Partial {
            max: vec![f32::NEG_INFINITY; group],
            sum: vec![0.0; group],
            acc: vec![0.0; group * d],
        }
    }
}

/// Combines partial results over disjoint ranges of the context exactly, and normalises; writes
/// each query head's log-sum-exp to `lse` (`-inf`, with a zero output, when no position was seen).
fn merge(parts: &[Partial], group: usize, d: usize, out: &mut [f32], lse: &mut [f32]) {
    for g in 0..group {
        lse[g] = f32::NEG_INFINITY;
        let max = parts
            .iter()
            .map(|p| p.max[g])
            .fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        let o = &mut out[g * d..(g + 1) * d];
        o.fill(0.0);
        for p in parts {
            if p.sum[g] == 0.0 {
                continue;
            }
            let w = (p.max[g] - max).exp();
            sum += p.sum[g] * w;
            for (x, a) in o.iter_mut().zip(&p.acc[g * d..(g + 1) * d]) {
                *x += a * w;
            }
        }
        if sum == 0.0 {
            continue;
        }
        let inv = 1.0 / sum;
        for x in o.iter_mut() {
            *x *= inv;
        }
        lse[g] = max + sum.ln();
    }
}

/// One task of [`paged_attention`] as a `pulp` operation: `with_simd` is `#[inline(always)]`, so
/// the loops are compiled inside the dispatcher's per-instruction-set copies. (Passed as a
/// closure, LLVM declined to inline it there and the loops ran as baseline SSE2 code.)
struct Attend<'a> {
    kv: LayerKv<'a>,
    table: &'a [BlockId],
    /// Logical index of each table entry (`None`: entry `b` is block `b`).
    logical: Option<&'a [u32]>,
    kv_head: usize,
    /// Position of the tile's first row; row `i` is at `start + i`.
    start: usize,
    range: std::ops::Range<usize>,
    scale: f32,
    /// Per row, the `group * head_dim` queries of this kv head's query heads.
    queries: &'a [&'a [f32]],
    /// Per row (with this task's split), the running result.
    partials: &'a mut [Partial],
}

impl pulp::WithSimd for Attend<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let shape = self.kv.shape;
        let (d, bt) = (shape.head_dim, shape.block_tokens);
        let group = self.queries.first().map_or(0, |q| q.len() / d);
        // scores[g * bt + j]: query head g against slot j of the current block.
        let mut scores = vec![0.0f32; group * bt];
        for entry in self.range {
            let base = shape.offset(self.table[entry], self.kv_head, 0);
            let b = self.logical.map_or(entry, |l| l[entry] as usize);
            // Rows before `b * bt - start` end before block b.
            let first_seeing = (b * bt).saturating_sub(self.start);
            for (i, (q, partial)) in self
                .queries
                .iter()
                .zip(self.partials.iter_mut())
                .enumerate()
                .skip(first_seeing)
            {
                // Row i sees positions 0..=start + i.
                let len = self.start + i + 1;
                if len <= b * bt {
                    // Rows ascend in position: later rows of the tile may still see block b.
                    continue;
                }
                let n = (len - b * bt).min(bt);
                attend_block(
                    simd,
                    &self.kv.keys[base..base + bt * d],
                    &self.kv.values[base..base + n * d],
                    self.scale,
                    q,
                    &mut scores,
                    partial,
                );
            }
        }
    }
}

/// Attention of the query heads of one kv head (`q`, `group * head_dim`) over the first `n`
/// slots of one block (`keys`: the whole `[head_dim][block_tokens]` page; `values`: the first
/// `n` rows of `[block_tokens][head_dim]`), accumulated into `partial`. Written with `pulp`'s explicit vectors
/// (`S::f32s`: 16 lanes with AVX-512, 8 with AVX2): LLVM's autovectoriser scalarised the nested
/// loops.
#[inline(always)]
fn attend_block<S: pulp::Simd>(
    simd: S,
    keys: &[f32],
    values: &[f32],
    scale: f32,
    q: &[f32],
    scores: &mut [f32],
    partial: &mut Partial,
) {
    let group = partial.max.len();
    let d = q.len() / group.max(1);
    let n = values.len() / d.max(1);
    let bt = scores.len() / group.max(1);
    let zero = simd.splat_f32s(0.0);
    // Scores for a vector of slots at a time: keys are stored `[dim][slot]` in the page, so
    // each dimension is one broadcast query value times one vector of keys, four independent
    // accumulators (four vectors of slots) at a time, with no horizontal sums.
    let lanes = std::mem::size_of::<S::f32s>() / std::mem::size_of::<f32>();
    let vecs = n / lanes;
    for (g, qg) in q.chunks_exact(d).enumerate() {
        let row = &mut scores[g * bt..g * bt + n];
        let mut v = 0;
        while v + 4 <= vecs {
            let (mut a0, mut a1, mut a2, mut a3) = (zero, zero, zero, zero);
            for (i, &qi) in qg.iter().enumerate() {
                let k = S::as_simd_f32s(&keys[i * bt + v * lanes..][..4 * lanes]).0;
                let qi = simd.splat_f32s(qi);
                a0 = simd.mul_add_e_f32s(qi, k[0], a0);
                a1 = simd.mul_add_e_f32s(qi, k[1], a1);
                a2 = simd.mul_add_e_f32s(qi, k[2], a2);
                a3 = simd.mul_add_e_f32s(qi, k[3], a3);
            }
            let out = S::as_mut_simd_f32s(&mut row[v * lanes..(v + 4) * lanes]).0;
            let sc = simd.splat_f32s(scale);
            for (o, a) in out.iter_mut().zip([a0, a1, a2, a3]) {
                *o = simd.mul_f32s(a, sc);
            }
            v += 4;
        }
        while v < vecs {
            let mut a = zero;
            for (i, &qi) in qg.iter().enumerate() {
                let k = S::as_simd_f32s(&keys[i * bt + v * lanes..][..lanes]).0;
                a = simd.mul_add_e_f32s(simd.splat_f32s(qi), k[0], a);
            }
            S::as_mut_simd_f32s(&mut row[v * lanes..(v + 1) * lanes]).0[0] =
                simd.mul_f32s(a, simd.splat_f32s(scale));
            v += 1;
        }
        for (j, out) in row.iter_mut().enumerate().skip(vecs * lanes) {
            let dot: f32 = qg
                .iter()
                .enumerate()
                .map(|(i, &qi)| qi * keys[i * bt + j])
                .sum();
            *out = dot * scale;
        }
    }
    for g in 0..group {
        let block_scores = &mut scores[g * bt..g * bt + n];
        let block_max = block_scores
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        let new_max = partial.max[g].max(block_max);
        let correction = (partial.max[g] - new_max).exp();
        for sc in block_scores.iter_mut() {
            *sc -= new_max;
        }
        exp_in_place(block_scores);
        let block_sum: f32 = block_scores.iter().sum();
        partial.sum[g] = partial.sum[g] * correction + block_sum;
        for a in partial.acc[g * d..(g + 1) * d].iter_mut() {
            *a *= correction;
        }
        partial.max[g] = new_max;
    }
    // Values: four vectors of output dimensions at a time, held in registers over the
    // block's tokens (each pass reads its own cache lines of every token, so the page is
    // read once).
    for g in 0..group {
        let probs = &scores[g * bt..g * bt + n];
        let acc_row = &mut partial.acc[g * d..(g + 1) * d];
        let (acc_v, acc_tail) = S::as_mut_simd_f32s(acc_row);
        let (acc4, acc_rest) = acc_v.as_chunks_mut::<4>();
        for (c4, accs) in acc4.iter_mut().enumerate() {
            let [mut l0, mut l1, mut l2, mut l3] = *accs;
            for (&p, value) in probs.iter().zip(values.chunks_exact(d)) {
                let v = &S::as_simd_f32s(value).0[c4 * 4..c4 * 4 + 4];
                let p = simd.splat_f32s(p);
                l0 = simd.mul_add_e_f32s(p, v[0], l0);
                l1 = simd.mul_add_e_f32s(p, v[1], l1);
                l2 = simd.mul_add_e_f32s(p, v[2], l2);
                l3 = simd.mul_add_e_f32s(p, v[3], l3);
            }
            *accs = [l0, l1, l2, l3];
        }
        let first_rest = acc4.len() * 4;
        for (c, acc) in acc_rest.iter_mut().enumerate() {
            for (&p, value) in probs.iter().zip(values.chunks_exact(d)) {
                let v = S::as_simd_f32s(value).0[first_rest + c];
                *acc = simd.mul_add_e_f32s(simd.splat_f32s(p), v, *acc);
            }
        }
        let done = d - acc_tail.len();
        for (i, a) in acc_tail.iter_mut().enumerate() {
            for (p, value) in probs.iter().zip(values.chunks_exact(d)) {
                *a += p * value[done + i];
            }
        }
    }
}

/// `e^x` for `x <= 0`, elementwise, written to vectorise: `x = n ln2 + r` with `|r| <= ln2/2`,
/// a degree-6 polynomial for `e^r` (relative error below 2e-7), and `2^n` built in the exponent
/// bits. Inputs below -87 give 0 (they are that small anyway).
#[inline(always)]
fn exp_in_place(xs: &mut [f32]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    for x in xs.iter_mut() {
        let v = x.max(-87.0);
        let n = (v * LOG2E).round();
        let r = (v - n * LN2_HI) - n * LN2_LO;
        let p = 1.0
            + r * (1.0
                + r * (0.5
                    + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
        let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
        *x = if *x < -87.0 { 0.0 } else { p * scale };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvShape, KvStore};

    /// Plain softmax attention over contiguous rows, the reference.
    fn reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let scores: Vec<f32> = keys
            .iter()
            .map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
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
    fn fast_exp_is_accurate() {
        let mut xs: Vec<f32> = (0..2000).map(|i| -(i as f32) * 0.05).collect();
        xs.push(-1e-7);
        xs.push(-90.0);
        let want: Vec<f32> = xs.iter().map(|x| x.exp()).collect();
        exp_in_place(&mut xs);
        for (got, want) in xs.iter().zip(&want) {
            assert!((got - want).abs() <= want * 3e-7 + 1e-37, "{got} vs {want}");
        }
    }

    #[test]
    fn paged_matches_contiguous_reference_with_scattered_blocks_and_gqa() {
        // Head sizes that exercise every vector path (whole groups of four vectors, single
        // vectors, scalar tails) and blocks whose token count is not a multiple of four.
        for (head_dim, block_tokens) in [(16, 4), (64, 16), (72, 6), (128, 64), (8, 5)] {
            check_against_reference(head_dim, block_tokens);
        }
    }

    fn check_against_reference(d: usize, bt: usize) {
        let shape = KvShape {
            layers: 1,
            kv_heads: 2,
            head_dim: d,
            block_tokens: bt,
        };
        let heads = 4;
        let len = 3 * bt + bt / 2 + 1;
        let blocks = len.div_ceil(bt);
        let mut store = KvStore::new(shape, 2 * blocks);
        // Out-of-order physical blocks: the table, not the storage order, defines positions.
        let table: Vec<BlockId> = (0..blocks as u32)
            .map(|b| BlockId::new((b * 5 + 3) % (2 * blocks as u32)))
            .collect();
        let mut seed = 7;
        let mut keys = vec![vec![]; 2];
        let mut values = vec![vec![]; 2];
        for p in 0..len {
            let k: Vec<f32> = (0..2 * d).map(|_| pseudo(&mut seed)).collect();
            let v: Vec<f32> = (0..2 * d).map(|_| pseudo(&mut seed)).collect();
            store.write(0, &table, p, &k, &v);
            for h in 0..2 {
                keys[h].push(k[h * d..(h + 1) * d].to_vec());
                values[h].push(v[h * d..(h + 1) * d].to_vec());
            }
        }
        let scale = 1.0 / (d as f32).sqrt();
        // Queries for the last 3 positions (a prefill chunk), for the last one alone (a
        // decode, where the context is split across threads and merged), and for every
        // position (a whole prefill: rows share passes over the pages in tiles).
        for rows in [3, 1, len] {
            let q: Vec<f32> = (0..rows * heads * d).map(|_| pseudo(&mut seed)).collect();
            let mut out = vec![0.0; q.len()];
            let seq = AttnSeq {
                rows: 0..rows,
                start: len - rows,
                table: &table,
            };
            paged_attention(store.layer(0), &[seq], heads, scale, &q, &mut out);
            for r in 0..rows {
                let position = len - rows + r;
                for h in 0..heads {
                    let kvh = h / 2;
                    let qh = &q[(r * heads + h) * d..][..d];
                    let want = reference(
                        qh,
                        &keys[kvh][..=position],
                        &values[kvh][..=position],
                        scale,
                    );
                    let got = &out[(r * heads + h) * d..][..d];
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() < 1e-5,
                            "d={d} bt={bt} row {r} head {h}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// Striping a sequence's blocks over S shards (block `i` on shard `i % S`, each shard with
    /// its own store and physical ids), computing each shard's partial and merging them gives
    /// the single-store result: for a decode row, a prefill chunk, a whole prefill (whose first
    /// rows see nothing on most shards), S = 1..=4, and head sizes of every vector path.
    #[test]
    fn shard_partials_merge_to_the_single_store_result() {
        for (d, bt) in [(64, 16), (16, 4), (72, 6)] {
            let shape = KvShape {
                layers: 1,
                kv_heads: 2,
                head_dim: d,
                block_tokens: bt,
            };
            let heads = 4;
            let len = 9 * bt + bt / 3 + 1;
            let blocks = len.div_ceil(bt);
            let mut seed = 11;
            let mut whole = KvStore::new(shape, blocks);
            let table: Vec<BlockId> = (0..blocks as u32).map(BlockId::new).collect();
            let mut kvs = Vec::new();
            for p in 0..len {
                let k: Vec<f32> = (0..2 * d).map(|_| pseudo(&mut seed)).collect();
                let v: Vec<f32> = (0..2 * d).map(|_| pseudo(&mut seed)).collect();
                whole.write(0, &table, p, &k, &v);
                kvs.push((k, v));
            }
            let scale = 1.0 / (d as f32).sqrt();
            for shards in 1..=4usize {
                // Shard s: its logical blocks, stored densely (and in reverse) in its own store.
                let mut stores = Vec::new();
                for s in 0..shards {
                    let logical: Vec<u32> = (0..blocks as u32)
                        .filter(|b| *b as usize % shards == s)
                        .collect();
                    let n = logical.len();
                    let local: Vec<BlockId> = (0..n as u32).rev().map(BlockId::new).collect();
                    let mut store = KvStore::new(shape, n.max(1));
                    // A sparse table for writing: logical block b at its local id.
                    let mut sparse = vec![BlockId::new(0); blocks];
                    for (l, id) in logical.iter().zip(&local) {
                        sparse[*l as usize] = *id;
                    }
                    for (p, (k, v)) in kvs.iter().enumerate() {
                        if (p / bt) % shards == s {
                            store.write(0, &sparse, p, k, v);
                        }
                    }
                    stores.push((store, logical, local));
                }
                for rows in [1, 5, len] {
                    let q: Vec<f32> = (0..rows * heads * d).map(|_| pseudo(&mut seed)).collect();
                    let start = len - rows;
                    let mut want = vec![0.0; q.len()];
                    let seq = AttnSeq {
                        rows: 0..rows,
                        start,
                        table: &table,
                    };
                    paged_attention(whole.layer(0), &[seq], heads, scale, &q, &mut want);
                    let parts: Vec<ShardPartial> = stores
                        .iter()
                        .map(|(store, logical, local)| {
                            let seq = ShardSeq {
                                rows: 0..rows,
                                start,
                                logical,
                                table: local,
                            };
                            shard_attention(store.layer(0), &[seq], heads, scale, &q)
                        })
                        .collect();
                    if rows == len && shards > 1 {
                        // Row 0 sees block 0 only: every other shard has nothing for it.
                        assert!(
                            parts[1].lse[..heads]
                                .iter()
                                .all(|l| *l == f32::NEG_INFINITY)
                        );
                        assert!(parts[1].out[..heads * d].iter().all(|x| *x == 0.0));
                    }
                    let mut got = vec![0.0; q.len()];
                    merge_shards(&parts, d, &mut got);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() < 1e-5,
                            "d={d} bt={bt} S={shards} rows={rows} at {i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
