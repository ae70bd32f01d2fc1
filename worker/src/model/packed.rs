//! Block-quantized weight matrices (GGUF Q4_0, Q4_1, Q8_0) kept at their stored size, the only
//! copy of each weight the model holds ([`crate::model::llama::WeightFormat::Packed`]), and
//! multiplied by f32 activations: a few rows (decode) by the kernels here, many rows (prefill)
//! through tiles dequantized for an f32 GEMM ([`PackedMatrix::matmul_tiled`]).
//!
//! A decode step multiplies one row per sequence by every weight, so it is bound by reading the
//! weights: 540 MB per step for the default model in f32, 117 MB here. The activations stay f32
//! (llama.cpp quantizes them to 8 bits), so the result is the f32 product with the dequantized
//! weights up to summation order, and the decode and prefill paths agree to rounding.
//!
//! Prefill is bound by arithmetic instead: [`PackedMatrix::matmul_tiled`] shares tiles of
//! [`TILE_ROWS`] weight rows out between the threads; each dequantizes its tile into a small f32
//! buffer of its own (kept in cache) and multiplies all activation rows by it with `gemm`'s f32
//! GEMM, writing that tile's output columns in place. Dequantization is bit-identical to
//! candle's and costs one pass over the stored blocks per call (0.3 ms per layer of the default
//! model); at 17-2,048 activation rows this measured as fast as one GEMM over a whole f32 matrix
//! (which the model no longer holds), or faster.
//!
//! Layout: each 32-weight block keeps its quantized bytes as stored; its scale (and Q4_1's
//! minimum) is widened once from f16 to f32 at load, in separate arrays, so the kernels read
//! scales without converting them (AVX2 without F16C has no f16 conversion).
//!
//! Kernels ([`Kernel`], chosen at run time): output rows are split across threads; within a task
//! every weight block is unpacked once to 32 f32 values (`vpmovzxbd` + `vcvtdq2ps`) and
//! multiplied into up to eight (AVX-512) or four (AVX2) activation rows, the block scale applied
//! with one FMA per row; Q4_1's minimums enter as one short dot product with the activations'
//! block sums per row. The portable fallback is plain loops that autovectorise (poorly: LLVM
//! unpacks the nibbles through the stack), for CPUs without AVX2.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

/// Weights per quantization block in every kind handled here.
const BLOCK: usize = 32;

/// Weight rows per tile of [`PackedMatrix::matmul_tiled`]: 72 KiB of f32 at 576 inputs, 192 KiB
/// at 1,536, so a tile stays in L2 (2 MiB per core on the AVX-512 Xeon, 512 KiB on the AVX2
/// EPYC) from its dequantization to `gemm`'s packing of it. Measured with `bench_packed q4_1
/// prefill` against 64, 112 and 224 rows: alike at 512-2,048 activation rows, faster at 17-64
/// (more tiles share out evenly between the threads).
const TILE_ROWS: usize = 32;

/// How a packed matrix stores its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedKind {
    /// 4-bit, `w = d * (q - 8)`.
    Q4_0,
    /// 4-bit with a minimum, `w = d * q + m`.
    Q4_1,
    /// 8-bit, `w = d * q`.
    Q8_0,
}

impl PackedKind {
    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Bytes of one stored (GGUF) block.
    fn stored_block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    /// Quantized bytes per block.
    fn quant_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 => 16,
            Self::Q8_0 => 32,
        }
    }
}

/// A `[rows, cols]` weight matrix (`rows` outputs, `cols` inputs) in a block-quantized format.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    kind: PackedKind,
    rows: usize,
    cols: usize,
    /// Per block: `d`, row-major.
    scales: Vec<f32>,
    /// Per block: Q4_1's minimum `m` (empty for the other kinds).
    mins: Vec<f32>,
    /// Per block: the stored quantized bytes, row-major.
    quants: Vec<u8>,
}

impl PackedMatrix {
    /// Repacks a quantized tensor of shape `[rows, cols]`; `None` if its type has no kernel
    /// here (the caller then keeps the dequantized weights).
    pub fn from_qtensor(q: &QTensor) -> candle_core::Result<Option<Self>> {
        let Some(kind) = PackedKind::of(q.dtype()) else {
            return Ok(None);
        };
        let &[rows, cols] = q.shape().dims() else {
            return Ok(None);
        };
        if cols % BLOCK != 0 {
            return Ok(None);
        }
        let data = q.data()?;
        let blocks = rows * cols / BLOCK;
        let stored = kind.stored_block_bytes();
        if data.len() != blocks * stored {
            candle_core::bail!(
                "{kind:?} tensor of {rows}x{cols} has {} bytes, expected {}",
                data.len(),
                blocks * stored
            );
        }
        let mut scales = Vec::with_capacity(blocks);
        let mut mins = Vec::new();
        let mut quants = Vec::with_capacity(blocks * kind.quant_bytes());
        for block in data.chunks_exact(stored) {
            let half_at = |i: usize| f16::from_le_bytes([block[i], block[i + 1]]).to_f32();
            scales.push(half_at(0));
            let quant_start = if kind == PackedKind::Q4_1 {
                mins.push(half_at(2));
                4
            } else {
                2
            };
            quants.extend_from_slice(&block[quant_start..]);
        }
        Ok(Some(Self {
            kind,
            rows,
            cols,
            scales,
            mins,
            quants,
        }))
    }

    /// Stacks matrices with the same kind and input width into one whose outputs are theirs
    /// concatenated (fused q/k/v or gate/up); `None` if they differ.
    pub fn concat(parts: Vec<Self>) -> Option<Self> {
        let first = parts.first()?;
        let (kind, cols) = (first.kind, first.cols);
        if parts.iter().any(|p| p.kind != kind || p.cols != cols) {
            return None;
        }
        let mut out = Self {
            kind,
            rows: 0,
            cols,
            scales: Vec::new(),
            mins: Vec::new(),
            quants: Vec::new(),
        };
        for part in parts {
            out.rows += part.rows;
            out.scales.extend(part.scales);
            out.mins.extend(part.mins);
            out.quants.extend(part.quants);
        }
        Some(out)
    }

    pub fn kind(&self) -> PackedKind {
        self.kind
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes the kernel reads per full pass.
    pub fn bytes(&self) -> usize {
        (self.scales.len() + self.mins.len()) * 4 + self.quants.len()
    }

    /// The weights as f32, `[rows, cols]` row-major (tests and fallbacks).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        self.dequantize_rows(0, &mut out);
        out
    }

    /// Weight rows `first..first + out.len() / cols` as f32 into `out` (row-major): a tile of
    /// [`PackedMatrix::matmul_tiled`], or embedding rows looked up by token id.
    pub fn dequantize_rows(&self, first: usize, out: &mut [f32]) {
        self.dequantize_rows_with(first, out, Kernel::detect());
    }

    /// [`PackedMatrix::dequantize_rows`] with a chosen kernel (tests compare them).
    pub fn dequantize_rows_with(&self, first: usize, out: &mut [f32], kernel: Kernel) {
        assert!(
            out.len().is_multiple_of(self.cols)
                && first * self.cols + out.len() <= self.rows * self.cols,
            "rows {first}.. ({} values) outside a {}x{} matrix",
            out.len(),
            self.rows,
            self.cols
        );
        let first_block = first * self.cols / BLOCK;
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512(simd) => simd.vectorize(
                #[inline(always)]
                || avx512::dequantize(simd, self, first_block, out),
            ),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(simd) => simd.vectorize(
                #[inline(always)]
                || avx2::dequantize(simd, self, first_block, out),
            ),
            Kernel::Portable(arch) => arch.dispatch(Dequantize {
                matrix: self,
                first_block,
                out,
            }),
        }
    }

    /// `x` is `[m, cols]` row-major; returns `[m, rows]`: `out[r][o] = sum_i x[r][i] * W[o][i]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(x, m, Kernel::detect())
    }

    /// `x` is `[m, cols]` row-major; returns `[m, rows]` as [`PackedMatrix::matmul`] does, for
    /// many rows (prefill, bound by arithmetic): tiles of [`TILE_ROWS`] weight rows are shared
    /// out between the threads; each thread dequantizes its tile into an f32 buffer of its own,
    /// which stays in cache, and multiplies all of `x` by it with `gemm`'s f32 GEMM (the one
    /// candle's matmul calls), writing the tile's output columns in place.
    pub fn matmul_tiled(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_tiles(x, m, TILE_ROWS, Kernel::detect())
    }

    fn matmul_tiles(&self, x: &[f32], m: usize, tile: usize, kernel: Kernel) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation shape");
        let mut out = vec![0.0f32; m * self.rows];
        if m == 0 {
            return out;
        }
        let dst = TileOutput::new(&mut out, m, self.rows);
        (0..self.rows.div_ceil(tile)).into_par_iter().for_each_init(
            || vec![0.0f32; tile.min(self.rows) * self.cols],
            |scratch, t| {
                let first = t * tile;
                let w = &mut scratch[..tile.min(self.rows - first) * self.cols];
                self.dequantize_rows_with(first, w, kernel);
                // SAFETY: every task has a tile of its own, so no two calls write the same
                // output columns.
                #[allow(unsafe_code)]
                unsafe {
                    dst.multiply(first, x, w);
                }
            },
        );
        out
    }

    /// [`PackedMatrix::matmul`] with a chosen kernel (tests compare them).
    pub fn matmul_with(&self, x: &[f32], m: usize, kernel: Kernel) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation shape");
        // Per activation row and block, the sum of its 32 values: Q4_1's minimum multiplies it.
        let sums: Vec<f32> = if self.kind == PackedKind::Q4_1 {
            x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect()
        } else {
            Vec::new()
        };
        let threads = rayon::current_num_threads().max(1);
        let per_task = self.rows.div_ceil(8 * threads).clamp(8, 256);
        // Results computed output-major (`[rows, m]`), so each task owns a contiguous slice.
        let mut out_t = vec![0.0f32; self.rows * m];
        out_t
            .par_chunks_mut(per_task * m)
            .enumerate()
            .for_each(|(task, dst)| {
                let first = task * per_task;
                let task = Task {
                    matrix: self,
                    kernel,
                    first,
                    dst,
                    x,
                    sums: &sums,
                    m,
                };
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx512(simd) => simd.vectorize(
                        #[inline(always)]
                        || task.run(),
                    ),
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2(simd) => simd.vectorize(
                        #[inline(always)]
                        || task.run(),
                    ),
                    Kernel::Portable(arch) => arch.dispatch(task),
                }
            });
        if m == 1 {
            return out_t;
        }
        let mut out = vec![0.0f32; m * self.rows];
        for (o, vals) in out_t.chunks_exact(m).enumerate() {
            for (r, v) in vals.iter().enumerate() {
                out[r * self.rows + o] = *v;
            }
        }
        out
    }

    /// One task's share of [`PackedMatrix::matmul`]: weight rows from `first`, `dst` is
    /// `[rows of the task, m]`. Inlined into the dispatcher's per-instruction-set copies.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn task(
        &self,
        kernel: Kernel,
        first: usize,
        dst: &mut [f32],
        x: &[f32],
        sums: &[f32],
        m: usize,
    ) {
        let nb = self.cols / BLOCK;
        for (i, dst_row) in dst.chunks_exact_mut(m).enumerate() {
            let o = first + i;
            let mut r = 0;
            // AVX-512 has registers for eight rows' accumulators, so one unpack serves eight.
            #[cfg(target_arch = "x86_64")]
            let group = if matches!(kernel, Kernel::Avx512(_)) {
                8
            } else {
                4
            };
            #[cfg(not(target_arch = "x86_64"))]
            let group = 4;
            while r < m {
                let take = (m - r).min(group);
                let xs = &x[r * self.cols..(r + take) * self.cols];
                let ss = if sums.is_empty() {
                    sums
                } else {
                    &sums[r * nb..(r + take) * nb]
                };
                let dst = &mut dst_row[r..r + take];
                #[cfg(target_arch = "x86_64")]
                if let Kernel::Avx512(v4) = kernel {
                    match take {
                        1 => avx512::row_dot::<1>(v4, self, o, xs, ss, dst),
                        2 => avx512::row_dot::<2>(v4, self, o, xs, ss, dst),
                        3 => avx512::row_dot::<3>(v4, self, o, xs, ss, dst),
                        4 => avx512::row_dot::<4>(v4, self, o, xs, ss, dst),
                        5 => avx512::row_dot::<5>(v4, self, o, xs, ss, dst),
                        6 => avx512::row_dot::<6>(v4, self, o, xs, ss, dst),
                        7 => avx512::row_dot::<7>(v4, self, o, xs, ss, dst),
                        _ => avx512::row_dot::<8>(v4, self, o, xs, ss, dst),
                    }
                    r += take;
                    continue;
                }
                #[cfg(target_arch = "x86_64")]
                if let Kernel::Avx2(v3) = kernel {
                    match take {
                        1 => avx2::row_dot::<1>(v3, self, o, xs, ss, dst),
                        2 => avx2::row_dot::<2>(v3, self, o, xs, ss, dst),
                        3 => avx2::row_dot::<3>(v3, self, o, xs, ss, dst),
                        _ => avx2::row_dot::<4>(v3, self, o, xs, ss, dst),
                    }
                    r += take;
                    continue;
                }
                match take {
                    1 => self.row_dot::<1, 4>(o, xs, ss, dst),
                    2 => self.row_dot::<2, 2>(o, xs, ss, dst),
                    3 => self.row_dot::<3, 1>(o, xs, ss, dst),
                    _ => self.row_dot::<4, 1>(o, xs, ss, dst),
                }
                r += take;
            }
        }
    }

    /// Unpacks block `b` (global index) into `d * q` values; returns the constant added to each
    /// (Q4_1's minimum, else 0).
    #[inline(always)]
    fn unpack(&self, b: usize, w: &mut [f32; BLOCK]) -> f32 {
        let qb = self.kind.quant_bytes();
        let q = &self.quants[b * qb..(b + 1) * qb];
        match self.kind {
            PackedKind::Q4_0 => {
                let d = self.scales[b];
                for j in 0..16 {
                    w[j] = (f32::from(q[j] & 15) - 8.0) * d;
                    w[j + 16] = (f32::from(q[j] >> 4) - 8.0) * d;
                }
                0.0
            }
            PackedKind::Q4_1 => {
                let d = self.scales[b];
                for j in 0..16 {
                    w[j] = f32::from(q[j] & 15) * d;
                    w[j + 16] = f32::from(q[j] >> 4) * d;
                }
                self.mins[b]
            }
            PackedKind::Q8_0 => {
                let d = self.scales[b];
                for j in 0..BLOCK {
                    w[j] = f32::from(q[j] as i8) * d;
                }
                0.0
            }
        }
    }

    /// Dot products of weight row `o` with `R` activation rows (`xs` is `[R, cols]`, `sums`
    /// `[R, blocks]` or empty), using `C` accumulator chains per activation row.
    #[inline(always)]
    fn row_dot<const R: usize, const C: usize>(
        &self,
        o: usize,
        xs: &[f32],
        sums: &[f32],
        dst: &mut [f32],
    ) {
        let nb = self.cols / BLOCK;
        let mut acc = [[[0.0f32; 8]; C]; R];
        let mut bias_acc = [0.0f32; R];
        let mut w = [0.0f32; BLOCK];
        for b in 0..nb {
            let bias = self.unpack(o * nb + b, &mut w);
            for r in 0..R {
                let x = &xs[r * self.cols + b * BLOCK..][..BLOCK];
                for c in 0..BLOCK / 8 {
                    let chain = &mut acc[r][c % C];
                    for l in 0..8 {
                        chain[l] += w[c * 8 + l] * x[c * 8 + l];
                    }
                }
                if !sums.is_empty() {
                    bias_acc[r] += bias * sums[r * nb + b];
                }
            }
        }
        for r in 0..R {
            let mut lanes = [0.0f32; 8];
            for chain in &acc[r] {
                for l in 0..8 {
                    lanes[l] += chain[l];
                }
            }
            dst[r] = lanes.iter().sum::<f32>() + bias_acc[r];
        }
    }
}

/// The `[m, ld]` row-major output of [`PackedMatrix::matmul_tiled`], written by its tasks
/// concurrently, each into the columns of its own tile.
struct TileOutput<'a> {
    ptr: *mut f32,
    m: usize,
    ld: usize,
    /// `out` stays borrowed, so no one reads it while tasks write.
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: the only access through `ptr` is `multiply`, an unsafe fn whose callers guarantee that
// concurrent calls write disjoint columns; so sharing a `TileOutput` between threads races on no
// element.
#[allow(unsafe_code)]
unsafe impl Sync for TileOutput<'_> {}

impl<'a> TileOutput<'a> {
    fn new(out: &'a mut [f32], m: usize, ld: usize) -> Self {
        assert_eq!(out.len(), m * ld, "output shape");
        TileOutput {
            ptr: out.as_mut_ptr(),
            m,
            ld,
            _out: std::marker::PhantomData,
        }
    }

    /// `out[.., first..first + n] = x * w^T`, where `x` is `[m, k]` and `w` `[n, k]`, row-major
    /// (`k` and `n` follow from the slices' lengths); single-threaded.
    ///
    /// # Safety
    /// No other call writing any of columns `first..first + n` may run at the same time.
    #[allow(unsafe_code)]
    unsafe fn multiply(&self, first: usize, x: &[f32], w: &[f32]) {
        let (m, ld) = (self.m, self.ld);
        let k = x.len() / m;
        if k == 0 || w.is_empty() {
            return;
        }
        let n = w.len() / k;
        assert!(x.len() == m * k && w.len() == n * k && first + n <= self.ld);
        // SAFETY: gemm reads and writes only through these pointers and strides. Destination
        // element (i, j), i < m, j < n, is out[first + i * ld + j], inside `out` (m * ld values)
        // because first + n <= ld; lhs (i, p), p < k, is x[i * k + p]; rhs (p, j), w^T's element,
        // is w[j * k + p]: the assert bounds every index by its slice's length. Columns
        // first..first + n are this call's alone (the caller's contract) and `out` is borrowed
        // for 'a, so nothing else reads or writes them meanwhile.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                self.ptr.add(first),
                1,
                ld as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

/// A dot product written to vectorise: eight independent lanes over fixed-size chunks (a plain
/// `sum()` of products is a serial chain of dependent adds).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a8, a_rest) = a.as_chunks::<8>();
    let (b8, b_rest) = b.as_chunks::<8>();
    for (x, y) in a8.iter().zip(b8) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut total: f32 = lanes.iter().sum();
    for (x, y) in a_rest.iter().zip(b_rest) {
        total += x * y;
    }
    total
}

/// One task of [`PackedMatrix::matmul`] as a `pulp` operation. A closure would do, but LLVM may
/// decline to inline a large closure into the dispatcher's `#[target_feature]` copies, and then
/// it runs as baseline SSE2 code (measured: 3.5x slower). `with_simd` is `#[inline(always)]`, and
/// so is everything it calls.
struct Task<'a> {
    matrix: &'a PackedMatrix,
    kernel: Kernel,
    first: usize,
    dst: &'a mut [f32],
    x: &'a [f32],
    sums: &'a [f32],
    m: usize,
}

impl pulp::WithSimd for Task<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        self.run();
    }
}

impl Task<'_> {
    #[inline(always)]
    fn run(self) {
        self.matrix
            .task(self.kernel, self.first, self.dst, self.x, self.sums, self.m);
    }
}

/// [`PackedMatrix::dequantize_rows`] as a `pulp` operation (the portable kernel).
struct Dequantize<'a> {
    matrix: &'a PackedMatrix,
    first_block: usize,
    out: &'a mut [f32],
}

impl pulp::WithSimd for Dequantize<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let mut w = [0.0f32; BLOCK];
        for (i, dst) in self.out.chunks_exact_mut(BLOCK).enumerate() {
            let bias = self.matrix.unpack(self.first_block + i, &mut w);
            for (d, v) in dst.iter_mut().zip(&w) {
                *d = v + bias;
            }
        }
    }
}

/// Which kernel runs a packed matmul.
#[derive(Debug, Clone, Copy)]
pub enum Kernel {
    /// Hand-written AVX-512 (x86-64 v4): half the instructions of AVX2 per block.
    #[cfg(target_arch = "x86_64")]
    Avx512(pulp::x86::V4),
    /// Hand-written AVX2/FMA (x86-64 v3), the fast path on x86 without AVX-512.
    #[cfg(target_arch = "x86_64")]
    Avx2(pulp::x86::V3),
    /// Plain loops, autovectorised for whatever the CPU has (slower: LLVM unpacks the 4-bit
    /// weights through the stack).
    Portable(pulp::Arch),
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V4::try_new() {
            return Kernel::Avx512(simd);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V3::try_new() {
            return Kernel::Avx2(simd);
        }
        Self::portable()
    }

    pub fn portable() -> Self {
        Kernel::Portable(pulp::Arch::new())
    }

    /// Every kernel this CPU can run, fastest first (tests compare them).
    pub fn available() -> Vec<Self> {
        let mut kernels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            kernels.extend(pulp::x86::V4::try_new().map(Kernel::Avx512));
            kernels.extend(pulp::x86::V3::try_new().map(Kernel::Avx2));
        }
        kernels.push(Self::portable());
        kernels
    }
}

/// The AVX-512 kernel: as the AVX2 one with sixteen lanes, so a 32-weight block is two vectors.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::{__m128i, __m512};

    use pulp::bytemuck::cast;
    use pulp::x86::V4;

    use super::{BLOCK, PackedKind, PackedMatrix};

    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q8_0: u8 = 2;

    /// A block's integers as f32: `q` (Q4_1, Q8_0) or `q - 8` (Q4_0).
    #[inline(always)]
    fn unpack<const KIND: u8>(simd: V4, q: &[[u8; 16]]) -> [__m512; 2] {
        let widen_u8 = |v: __m128i| {
            simd.avx512f
                ._mm512_cvtepi32_ps(simd.avx512f._mm512_cvtepu8_epi32(v))
        };
        let widen_i8 = |v: __m128i| {
            simd.avx512f
                ._mm512_cvtepi32_ps(simd.avx512f._mm512_cvtepi8_epi32(v))
        };
        let bytes: __m128i = cast(q[0]);
        if KIND == Q8_0 {
            return [widen_i8(bytes), widen_i8(cast(q[1]))];
        }
        let mask = simd.sse2._mm_set1_epi8(0x0f);
        let lo = simd.sse2._mm_and_si128(bytes, mask);
        let hi = simd
            .sse2
            ._mm_and_si128(simd.sse2._mm_srli_epi16::<4>(bytes), mask);
        if KIND == Q4_0 {
            let eight = simd.sse2._mm_set1_epi8(8);
            return [
                widen_i8(simd.sse2._mm_sub_epi8(lo, eight)),
                widen_i8(simd.sse2._mm_sub_epi8(hi, eight)),
            ];
        }
        [widen_u8(lo), widen_u8(hi)]
    }

    /// Blocks from `first_block` on as f32 into `out`, 32 values per block.
    #[inline(always)]
    pub(super) fn dequantize(simd: V4, m: &PackedMatrix, first_block: usize, out: &mut [f32]) {
        match m.kind {
            PackedKind::Q4_0 => dequantize_kind::<Q4_0>(simd, m, first_block, out),
            PackedKind::Q4_1 => dequantize_kind::<Q4_1>(simd, m, first_block, out),
            PackedKind::Q8_0 => dequantize_kind::<Q8_0>(simd, m, first_block, out),
        }
    }

    #[inline(always)]
    fn dequantize_kind<const KIND: u8>(
        simd: V4,
        m: &PackedMatrix,
        first_block: usize,
        out: &mut [f32],
    ) {
        let pieces = if KIND == Q8_0 { 2 } else { 1 };
        let blocks = out.len() / BLOCK;
        let range = first_block..first_block + blocks;
        let quants = m.quants[range.start * pieces * 16..range.end * pieces * 16]
            .as_chunks::<16>()
            .0;
        let scales = &m.scales[range.clone()];
        let mins = if KIND == Q4_1 { &m.mins[range] } else { scales };
        let dst = out.as_chunks_mut::<16>().0.chunks_exact_mut(2);
        for (((q, &d), &min), dst) in quants.chunks_exact(pieces).zip(scales).zip(mins).zip(dst) {
            let w = unpack::<KIND>(simd, q);
            let d = simd.avx512f._mm512_set1_ps(d);
            for (half, v) in dst.iter_mut().zip(w) {
                // Multiply, then add (no FMA): the values candle's dequantization gives.
                let w = simd.avx512f._mm512_mul_ps(v, d);
                *half = cast(if KIND == Q4_1 {
                    simd.avx512f
                        ._mm512_add_ps(w, simd.avx512f._mm512_set1_ps(min))
                } else {
                    w
                });
            }
        }
    }

    #[inline(always)]
    pub(super) fn row_dot<const R: usize>(
        simd: V4,
        m: &PackedMatrix,
        o: usize,
        xs: &[f32],
        sums: &[f32],
        dst: &mut [f32],
    ) {
        match m.kind {
            PackedKind::Q4_0 => row_dot_kind::<R, Q4_0>(simd, m, o, xs, sums, dst),
            PackedKind::Q4_1 => row_dot_kind::<R, Q4_1>(simd, m, o, xs, sums, dst),
            PackedKind::Q8_0 => row_dot_kind::<R, Q8_0>(simd, m, o, xs, sums, dst),
        }
    }

    #[inline(always)]
    fn row_dot_kind<const R: usize, const KIND: u8>(
        simd: V4,
        m: &PackedMatrix,
        o: usize,
        xs: &[f32],
        sums: &[f32],
        dst: &mut [f32],
    ) {
        let nb = m.cols / BLOCK;
        let pieces = if KIND == Q8_0 { 2 } else { 1 };
        let quants = m.quants[o * nb * pieces * 16..(o + 1) * nb * pieces * 16]
            .as_chunks::<16>()
            .0;
        let scales = &m.scales[o * nb..(o + 1) * nb];
        let rows: [&[[f32; 16]]; R] =
            std::array::from_fn(|r| xs[r * m.cols..(r + 1) * m.cols].as_chunks::<16>().0);
        let zero = simd.avx512f._mm512_setzero_ps();
        let mut acc = [zero; R];
        for (b, (q, &d)) in quants.chunks_exact(pieces).zip(scales).enumerate() {
            let w = unpack::<KIND>(simd, q);
            let d = simd.avx512f._mm512_set1_ps(d);
            for r in 0..R {
                let x: &[[f32; 16]; 2] = rows[r][b * 2..b * 2 + 2]
                    .try_into()
                    .unwrap_or(&[[0.0; 16]; 2]);
                let t = simd.avx512f._mm512_mul_ps(w[0], cast(x[0]));
                let t = simd.avx512f._mm512_fmadd_ps(w[1], cast(x[1]), t);
                acc[r] = simd.avx512f._mm512_fmadd_ps(t, d, acc[r]);
            }
        }
        for r in 0..R {
            let mut total = simd.avx512f._mm512_reduce_add_ps(acc[r]);
            if KIND == Q4_1 {
                let mins = &m.mins[o * nb..(o + 1) * nb];
                total += super::dot(mins, &sums[r * nb..(r + 1) * nb]);
            }
            dst[r] = total;
        }
    }
}

/// The AVX2/FMA kernel: each block's quantized integers are widened to four vectors of eight
/// f32 (`vpmovzxbd`/`vpmovsxbd` + `vcvtdq2ps`), multiplied into each activation row, and the
/// block's scale applied once per row with one FMA. The loop is specialised per kind (no branch
/// inside it), and Q4_1's minimums are applied after it as one short dot product per row.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{__m128i, __m256};

    use pulp::bytemuck::cast;
    use pulp::x86::V3;

    use super::{BLOCK, PackedKind, PackedMatrix};

    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q8_0: u8 = 2;

    #[inline(always)]
    fn widen_u8(simd: V3, v: __m128i) -> __m256 {
        simd.avx
            ._mm256_cvtepi32_ps(simd.avx2._mm256_cvtepu8_epi32(v))
    }

    #[inline(always)]
    fn widen_i8(simd: V3, v: __m128i) -> __m256 {
        simd.avx
            ._mm256_cvtepi32_ps(simd.avx2._mm256_cvtepi8_epi32(v))
    }

    /// A block's integers as f32: `q` (Q4_1, Q8_0) or `q - 8` (Q4_0). `q` holds the block's
    /// 16 (4-bit kinds) or 32 (Q8_0) bytes.
    #[inline(always)]
    fn unpack<const KIND: u8>(simd: V3, q: &[[u8; 16]]) -> [__m256; 4] {
        let high = |v: __m128i| simd.sse2._mm_srli_si128::<8>(v);
        let bytes: __m128i = cast(q[0]);
        if KIND == Q8_0 {
            let rest: __m128i = cast(q[1]);
            return [
                widen_i8(simd, bytes),
                widen_i8(simd, high(bytes)),
                widen_i8(simd, rest),
                widen_i8(simd, high(rest)),
            ];
        }
        let mask = simd.sse2._mm_set1_epi8(0x0f);
        let mut lo = simd.sse2._mm_and_si128(bytes, mask);
        let mut hi = simd
            .sse2
            ._mm_and_si128(simd.sse2._mm_srli_epi16::<4>(bytes), mask);
        if KIND == Q4_0 {
            let eight = simd.sse2._mm_set1_epi8(8);
            lo = simd.sse2._mm_sub_epi8(lo, eight);
            hi = simd.sse2._mm_sub_epi8(hi, eight);
            return [
                widen_i8(simd, lo),
                widen_i8(simd, high(lo)),
                widen_i8(simd, hi),
                widen_i8(simd, high(hi)),
            ];
        }
        [
            widen_u8(simd, lo),
            widen_u8(simd, high(lo)),
            widen_u8(simd, hi),
            widen_u8(simd, high(hi)),
        ]
    }

    /// Blocks from `first_block` on as f32 into `out`, 32 values per block.
    #[inline(always)]
    pub(super) fn dequantize(simd: V3, m: &PackedMatrix, first_block: usize, out: &mut [f32]) {
        match m.kind {
            PackedKind::Q4_0 => dequantize_kind::<Q4_0>(simd, m, first_block, out),
            PackedKind::Q4_1 => dequantize_kind::<Q4_1>(simd, m, first_block, out),
            PackedKind::Q8_0 => dequantize_kind::<Q8_0>(simd, m, first_block, out),
        }
    }

    #[inline(always)]
    fn dequantize_kind<const KIND: u8>(
        simd: V3,
        m: &PackedMatrix,
        first_block: usize,
        out: &mut [f32],
    ) {
        let pieces = if KIND == Q8_0 { 2 } else { 1 };
        let blocks = out.len() / BLOCK;
        let range = first_block..first_block + blocks;
        let quants = m.quants[range.start * pieces * 16..range.end * pieces * 16]
            .as_chunks::<16>()
            .0;
        let scales = &m.scales[range.clone()];
        let mins = if KIND == Q4_1 { &m.mins[range] } else { scales };
        let dst = out.as_chunks_mut::<8>().0.chunks_exact_mut(4);
        for (((q, &d), &min), dst) in quants.chunks_exact(pieces).zip(scales).zip(mins).zip(dst) {
            let w = unpack::<KIND>(simd, q);
            let d = simd.avx._mm256_set1_ps(d);
            for (quarter, v) in dst.iter_mut().zip(w) {
                let w = simd.avx._mm256_mul_ps(v, d);
                *quarter = cast(if KIND == Q4_1 {
                    simd.avx._mm256_add_ps(w, simd.avx._mm256_set1_ps(min))
                } else {
                    w
                });
            }
        }
    }

    /// Dot products of weight row `o` with `R` activation rows (`xs` is `[R, cols]`, `sums`
    /// `[R, blocks]` for Q4_1, else empty).
    #[inline(always)]
    pub(super) fn row_dot<const R: usize>(
        simd: V3,
        m: &PackedMatrix,
        o: usize,
        xs: &[f32],
        sums: &[f32],
        dst: &mut [f32],
    ) {
        match m.kind {
            PackedKind::Q4_0 => row_dot_kind::<R, Q4_0>(simd, m, o, xs, sums, dst),
            PackedKind::Q4_1 => row_dot_kind::<R, Q4_1>(simd, m, o, xs, sums, dst),
            PackedKind::Q8_0 => row_dot_kind::<R, Q8_0>(simd, m, o, xs, sums, dst),
        }
    }

    #[inline(always)]
    fn row_dot_kind<const R: usize, const KIND: u8>(
        simd: V3,
        m: &PackedMatrix,
        o: usize,
        xs: &[f32],
        sums: &[f32],
        dst: &mut [f32],
    ) {
        let nb = m.cols / BLOCK;
        // 16-byte pieces per block.
        let pieces = if KIND == Q8_0 { 2 } else { 1 };
        let quants = m.quants[o * nb * pieces * 16..(o + 1) * nb * pieces * 16]
            .as_chunks::<16>()
            .0;
        let scales = &m.scales[o * nb..(o + 1) * nb];
        let rows: [&[[f32; 8]]; R] =
            std::array::from_fn(|r| xs[r * m.cols..(r + 1) * m.cols].as_chunks::<8>().0);
        let zero = simd.avx._mm256_setzero_ps();
        let mut acc = [zero; R];
        for (b, (q, &d)) in quants.chunks_exact(pieces).zip(scales).enumerate() {
            let w = unpack::<KIND>(simd, q);
            let d = simd.avx._mm256_set1_ps(d);
            for r in 0..R {
                let x: &[[f32; 8]; 4] = rows[r][b * 4..b * 4 + 4]
                    .try_into()
                    .unwrap_or(&[[0.0; 8]; 4]);
                let mut t = simd.avx._mm256_mul_ps(w[0], cast(x[0]));
                t = simd.fma._mm256_fmadd_ps(w[1], cast(x[1]), t);
                t = simd.fma._mm256_fmadd_ps(w[2], cast(x[2]), t);
                t = simd.fma._mm256_fmadd_ps(w[3], cast(x[3]), t);
                acc[r] = simd.fma._mm256_fmadd_ps(t, d, acc[r]);
            }
        }
        for r in 0..R {
            let lanes: [f32; 8] = cast(acc[r]);
            let mut total = lanes.iter().sum::<f32>();
            if KIND == Q4_1 {
                let mins = &m.mins[o * nb..(o + 1) * nb];
                let row_sums = &sums[r * nb..(r + 1) * nb];
                total += super::dot(mins, row_sums);
            }
            dst[r] = total;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn quantized(dtype: GgmlDType, rows: usize, cols: usize) -> QTensor {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32 / 10.0))
            .collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    }

    fn activations(m: usize, cols: usize) -> Vec<f32> {
        (0..m * cols)
            .map(|i| ((i * 104_729 % 997) as f32 / 498.5 - 1.0) * 0.7)
            .collect()
    }

    /// The packed product equals the f32 product with candle's own dequantization of the same
    /// tensor, for every kind and for 1..=9 activation rows (every remainder of the 4-row groups).
    #[test]
    fn matmul_matches_dequantized_f32_product() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (rows, cols) = (70, 96);
            let q = quantized(dtype, rows, cols);
            let packed = PackedMatrix::from_qtensor(&q).unwrap().unwrap();
            let dense = q.dequantize(&Device::Cpu).unwrap();
            let dense_vec: Vec<f32> = dense.flatten_all().unwrap().to_vec1().unwrap();
            let unpacked = packed.dequantize();
            let worst = dense_vec
                .iter()
                .zip(&unpacked)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-6, "{dtype:?}: dequantize differs by {worst}");
            for m in 1..=9 {
                let x = activations(m, cols);
                let results: Vec<Vec<f32>> = Kernel::available()
                    .into_iter()
                    .map(|k| packed.matmul_with(&x, m, k))
                    .collect();
                let xt = Tensor::from_vec(x, (m, cols), &Device::Cpu).unwrap();
                let want: Vec<f32> = xt
                    .matmul(&dense.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert!(results.iter().all(|r| r.len() == want.len()));
                for (i, (g, w)) in results.concat().iter().zip(want.iter().cycle()).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{dtype:?} m={m} {:?} [{}, {}]: {g} vs {w}",
                        Kernel::available()[i / want.len()],
                        i % want.len() / rows,
                        i % rows
                    );
                }
            }
        }
    }

    /// Every kernel dequantizes any run of rows to candle's values for the same tensor, bit for
    /// bit (scale times integer, then Q4_1's minimum added: no fused multiply-add).
    #[test]
    fn dequantized_rows_equal_candles_dequantization() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (rows, cols) = (12, 96);
            let q = quantized(dtype, rows, cols);
            let packed = PackedMatrix::from_qtensor(&q).unwrap().unwrap();
            let want: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for kernel in Kernel::available() {
                for (first, count) in [(0, rows), (3, 5), (11, 1)] {
                    let mut got = vec![f32::NAN; count * cols];
                    packed.dequantize_rows_with(first, &mut got, kernel);
                    assert_eq!(
                        got,
                        want[first * cols..(first + count) * cols],
                        "{dtype:?} {kernel:?} rows {first}..{}",
                        first + count
                    );
                }
            }
        }
    }

    /// The tiled (prefill) product equals the f32 product with the dequantized weights, with a
    /// last tile shorter than the others and with the tile size the model uses.
    #[test]
    fn tiled_matmul_matches_dequantized_f32_product() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (rows, cols) = (70, 96);
            let q = quantized(dtype, rows, cols);
            let packed = PackedMatrix::from_qtensor(&q).unwrap().unwrap();
            let dense = q.dequantize(&Device::Cpu).unwrap();
            for m in [1, 17, 40] {
                let x = activations(m, cols);
                let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
                let want: Vec<f32> = xt
                    .matmul(&dense.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let mut results = vec![packed.matmul_tiled(&x, m)];
                for kernel in Kernel::available() {
                    results.push(packed.matmul_tiles(&x, m, 16, kernel));
                }
                for got in &results {
                    assert_eq!(got.len(), want.len());
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{dtype:?} m={m} [{}, {}]: {g} vs {w}",
                            i / rows,
                            i % rows
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn concat_stacks_outputs_and_refuses_mixed_kinds() {
        let a = PackedMatrix::from_qtensor(&quantized(GgmlDType::Q4_1, 8, 64))
            .unwrap()
            .unwrap();
        let b = PackedMatrix::from_qtensor(&quantized(GgmlDType::Q4_1, 16, 64))
            .unwrap()
            .unwrap();
        let c = PackedMatrix::from_qtensor(&quantized(GgmlDType::Q8_0, 8, 64))
            .unwrap()
            .unwrap();
        let x = activations(2, 64);
        let (ya, yb) = (a.matmul(&x, 2), b.matmul(&x, 2));
        let ab = PackedMatrix::concat(vec![a.clone(), b]).unwrap();
        assert_eq!(ab.rows(), 24);
        let y = ab.matmul(&x, 2);
        for r in 0..2 {
            assert_eq!(&y[r * 24..r * 24 + 8], &ya[r * 8..r * 8 + 8]);
            assert_eq!(&y[r * 24 + 8..r * 24 + 24], &yb[r * 16..r * 16 + 16]);
        }
        assert!(PackedMatrix::concat(vec![a, c]).is_none());
    }

    #[test]
    fn unsupported_kinds_are_left_to_the_caller() {
        let q = quantized(GgmlDType::Q6K, 4, 256);
        assert!(PackedMatrix::from_qtensor(&q).unwrap().is_none());
    }
}
