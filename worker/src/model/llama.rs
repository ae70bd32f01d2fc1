//! A Llama-family decoder (Llama 2/3, SmolLM, Qwen2 with its qkv bias) with a batched forward
//! pass over the paged KV store.
//!
//! One call runs any mix of sequences, each contributing a chunk of new tokens at its own
//! position (a whole prompt, a prefill chunk, or one decode token): their rows are stacked so
//! every projection is one GEMM for the whole batch, and only attention looks at sequences one by
//! one, through their block tables. Keys and values of the new tokens are written into the KV
//! store before attention, so a token attends to itself and everything before it.
//!
//! q/k/v are fused into one matrix and gate/up into another: two matrix products fewer per
//! layer. With [`WeightFormat::Packed`] (the worker's default for GGUF) one copy of each weight
//! is held, its stored 4/8-bit blocks (112 MB for the default model, where f32 matrices take
//! 540 MB and an f32 embedding 113 MB more): calls of few rows (decode) multiply the blocks
//! directly, calls of more rows (prefill) dequantize tiles of them into a small f32 buffer for a
//! GEMM, and the embedding's rows are dequantized on lookup (with tied embeddings, from the
//! head's own blocks). [`WeightFormat::F32`] holds f32 `[in, out]` matrices (transposed once at
//! load). The head is applied once per call to every row whose logits are wanted.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{D, DType, Device, Module, Tensor};
use tidelock_protocol::BlockId;

use crate::kv::KvShape;
use crate::kv::backend::{Attention, HostAttention, OnHost, PagedKv, PagedSeq, StepGeometry};
use crate::model::ModelError;
use crate::model::config::{LlamaConfig, rope_frequencies};
use crate::model::gguf::GgufFile;
use crate::model::hf::{self, HfFolder, LayerNames};
use crate::model::packed::PackedMatrix;

/// Which logits a chunk wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None: an intermediate prefill chunk.
    None,
    /// The last token's only: the next-token distribution.
    Last,
    /// Every token's: teacher forcing and verification.
    All,
}

/// One sequence's new tokens in [`Llama::forward_with`], whose [`Attention`] knows where its
/// KV lives.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    pub tokens: &'a [u32],
    /// Absolute position of `tokens[0]`.
    pub start: usize,
    pub logits: Logits,
}

/// One sequence's share of a forward call.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// The new tokens.
    pub tokens: &'a [u32],
    /// Absolute position of `tokens[0]` (the number of tokens already in the KV store).
    pub start: usize,
    /// Block table covering positions `0..start + tokens.len()`.
    pub table: &'a [BlockId],
    pub logits: Logits,
}

/// How matrix weights are held and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Dequantized to f32 at load, multiplied with f32 GEMMs, q/k/v and gate/up fused.
    F32,
    /// Kept as stored (e.g. Q4_1) and multiplied the way ggml does: activations quantized to the
    /// weights' dot-product type, integer dot products.
    Quantized,
    /// The stored blocks (Q4_0, Q4_1, Q8_0) only: multiplied directly for calls of up to
    /// [`PACKED_MAX_ROWS`] rows (decode: bound by reading the weights, 4.6x fewer bytes than
    /// f32), dequantized tile by tile into f32 GEMMs beyond (prefill: bound by arithmetic).
    /// Weights of other types are held in f32 only.
    Packed,
}

/// The most rows a call multiplies through the packed kernels; more go to the tiled f32 GEMM.
/// Measured with `examples/bench_decode`: see the worker README.
pub const PACKED_MAX_ROWS: usize = 16;

/// One or more projections of the same input, outputs concatenated along the last dimension.
#[derive(Debug)]
enum Proj {
    /// f32 `[in, out]`, several projections fused into one matrix.
    Dense(Tensor),
    /// Quantized `[out, in]` matrices applied one by one.
    Quantized(Vec<QMatMul>),
    /// The stored blocks, fused; shared with the embedding when the head is tied to it.
    Packed(Arc<PackedMatrix>),
}

impl Proj {
    /// Loads the named `[out, in]` matrices.
    fn load(
        file: &mut impl WeightSource,
        parts: &[(String, [usize; 2])],
        format: WeightFormat,
    ) -> Result<Self, ModelError> {
        match format {
            WeightFormat::F32 => Ok(Proj::Dense(Self::dense(file, parts)?)),
            WeightFormat::Quantized => Ok(Proj::Quantized(
                parts
                    .iter()
                    .map(|(name, shape)| {
                        QMatMul::from_qtensor(file.qtensor(name, shape)?).map_err(ModelError::from)
                    })
                    .collect::<Result<_, _>>()?,
            )),
            WeightFormat::Packed => {
                let stored = parts
                    .iter()
                    .map(|(name, shape)| file.qtensor(name, shape))
                    .collect::<Result<Vec<_>, _>>()?;
                let packed = stored
                    .iter()
                    .map(PackedMatrix::from_qtensor)
                    .collect::<candle_core::Result<Vec<_>>>()?;
                if let Some(packed) = packed
                    .into_iter()
                    .collect::<Option<Vec<_>>>()
                    .and_then(PackedMatrix::concat)
                {
                    return Ok(Proj::Packed(Arc::new(packed)));
                }
                // A part without a packed kernel (or of another kind): all parts in f32.
                let dense = parts
                    .iter()
                    .zip(&stored)
                    .map(|((name, _), q)| file.dequantize(name, q))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Proj::Dense(Tensor::cat(&dense, 0)?.t()?.contiguous()?))
            }
        }
    }

    /// The parts dequantized and fused into one f32 `[in, out]` matrix.
    fn dense(
        file: &mut impl WeightSource,
        parts: &[(String, [usize; 2])],
    ) -> Result<Tensor, ModelError> {
        let mats = parts
            .iter()
            .map(|(name, shape)| file.tensor(name, shape))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::cat(&mats, 0)?.t()?.contiguous()?)
    }

    /// `f` of `x`'s f32 values, row-major: borrowed when `x` is a contiguous host tensor (a
    /// prefill's activations are megabytes per product), else copied.
    fn with_host_rows<T>(x: &Tensor, f: impl FnOnce(&[f32]) -> T) -> candle_core::Result<T> {
        {
            let (storage, layout) = x.storage_and_layout();
            if let (candle_core::Storage::Cpu(host), Some((start, end))) =
                (&*storage, layout.contiguous_offsets())
                && let Ok(values) = host.as_slice::<f32>()
            {
                return Ok(f(&values[start..end]));
            }
        }
        Ok(f(&x.flatten_all()?.to_vec1::<f32>()?))
    }

    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            // Activations are f32; a half-precision matrix multiplies them in its own dtype.
            Proj::Dense(w) => x.to_dtype(w.dtype())?.matmul(w)?.to_dtype(DType::F32),
            Proj::Packed(packed) => {
                let rows = x.dim(0)?;
                let y = Self::with_host_rows(x, |xs| {
                    if rows > PACKED_MAX_ROWS {
                        packed.matmul_tiled(xs, rows)
                    } else {
                        packed.matmul(xs, rows)
                    }
                })?;
                Tensor::from_vec(y, (rows, packed.rows()), x.device())
            }
            Proj::Quantized(ws) => {
                let mut outs = ws
                    .iter()
                    .map(|w| w.forward(x))
                    .collect::<Result<Vec<_>, _>>()?;
                match outs.len() {
                    1 => Ok(outs.remove(0)),
                    _ => Tensor::cat(&outs, 1),
                }
            }
        }
    }
}

/// The token embedding, `[vocab, hidden]`.
#[derive(Debug)]
enum Embedding {
    /// Rows gathered with `index_select` (f32, or the placement's dtype).
    Dense(Tensor),
    /// The stored blocks, rows dequantized on lookup ([`WeightFormat::Packed`] on the host;
    /// with tied embeddings, the head's own matrix).
    Packed(Arc<PackedMatrix>),
}

impl Embedding {
    /// Reads the embedding `name`: packed if `format` is [`WeightFormat::Packed`], the placement
    /// is the host and its type has a packed kernel, else dense on the placement.
    fn load(
        source: &mut impl WeightSource,
        name: &str,
        shape: [usize; 2],
        format: WeightFormat,
        place: &Placement,
    ) -> Result<Self, ModelError> {
        if format != WeightFormat::Packed || !place.device.is_cpu() {
            return Ok(Embedding::Dense(
                place.matrix(source.tensor(name, &shape)?)?,
            ));
        }
        let stored = source.qtensor(name, &shape)?;
        Ok(match PackedMatrix::from_qtensor(&stored)? {
            Some(packed) => Embedding::Packed(Arc::new(packed)),
            None => Embedding::Dense(place.matrix(source.dequantize(name, &stored)?)?),
        })
    }

    /// The rows of `ids` (u32, `[rows]`), f32 `[rows, hidden]` on the ids' device.
    fn lookup(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Dense(table) => table.index_select(ids, 0)?.to_dtype(DType::F32),
            Embedding::Packed(table) => {
                let device = ids.device();
                let ids = ids.to_vec1::<u32>()?;
                let hidden = table.cols();
                let mut x = vec![0.0f32; ids.len() * hidden];
                for (&id, row) in ids.iter().zip(x.chunks_exact_mut(hidden)) {
                    table.dequantize_rows(id as usize, row);
                }
                Tensor::from_vec(x, (ids.len(), hidden), device)
            }
        }
    }
}

#[derive(Debug)]
struct Layer {
    attn_norm: Tensor,
    qkv: Proj,
    qkv_bias: Option<Tensor>,
    /// Per-head norm weights of q and k (Qwen3).
    qk_norm: Option<(Tensor, Tensor)>,
    out: Proj,
    ffn_norm: Tensor,
    gate_up: Proj,
    down: Proj,
}

/// The loaded model.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Embedding,
    lm_head: Proj,
    norm: Tensor,
    layers: Vec<Layer>,
    inv_freq: Vec<f32>,
    rope_scale: f32,
    /// Where every weight, activation and the logits live.
    device: Device,
}

/// Where a model's weights live and in which precision its dense matrices are held: host f32
/// for the `cpu` backend, any candle device and f32/f16/bf16 for `candle`. Norms and biases stay
/// f32; activations are f32 between the matrix products.
#[derive(Debug, Clone)]
pub struct Placement {
    pub device: Device,
    pub dtype: DType,
}

impl Placement {
    /// Host memory, f32: the `cpu` backend's.
    pub fn host() -> Self {
        Placement {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }

    /// A small f32 tensor (norm, bias) on the device.
    fn vector(&self, t: Tensor) -> Result<Tensor, ModelError> {
        Ok(t.to_device(&self.device)?)
    }

    /// A dense matrix on the device in the placement's dtype.
    fn matrix(&self, t: Tensor) -> Result<Tensor, ModelError> {
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }

    /// A projection as placed: dense matrices moved and converted; the packed and quantized
    /// forms run on the host only.
    fn proj(&self, p: Proj) -> Result<Proj, ModelError> {
        match p {
            Proj::Dense(w) => Ok(Proj::Dense(self.matrix(w)?)),
            other if self.device.is_cpu() => Ok(other),
            _ => Err(ModelError::Input(format!(
                "packed and quantized weights run on the host only, not on {:?}: load f32, f16 or bf16 weights",
                self.device
            ))),
        }
    }
}

impl Llama {
    /// Loads a GGUF model into host memory.
    pub fn from_gguf(path: &Path, format: WeightFormat) -> Result<Self, ModelError> {
        Self::from_gguf_on(path, format, &Placement::host())
    }

    /// Loads a GGUF model onto `place` (the `candle` backend: [`WeightFormat::F32`], each matrix
    /// dequantized then converted to the placement's dtype).
    pub fn from_gguf_on(
        path: &Path,
        format: WeightFormat,
        place: &Placement,
    ) -> Result<Self, ModelError> {
        let mut file = GgufFile::open(path)?;
        let cfg = file.llama_config()?;
        Self::build(&mut file, cfg, format, place)
    }

    /// Loads a Hugging Face folder (`config.json` and safetensors, see [`crate::model::hf`]) as
    /// f32 weights; quantized weights are only read from GGUF ([`WeightFormat::Packed`] holds
    /// these f32 weights only: there are no stored blocks to pack).
    pub fn from_hf(dir: &Path, format: WeightFormat) -> Result<Self, ModelError> {
        Self::from_hf_on(dir, format, &Placement::host())
    }

    /// Loads a Hugging Face folder onto `place` (see [`Self::from_hf`]).
    pub fn from_hf_on(
        dir: &Path,
        format: WeightFormat,
        place: &Placement,
    ) -> Result<Self, ModelError> {
        let format = match format {
            WeightFormat::Packed => WeightFormat::F32,
            other => other,
        };
        if format == WeightFormat::Quantized {
            return Err(ModelError::File {
                path: dir.to_owned(),
                problem: "quantized weights are only read from GGUF; load this folder as f32"
                    .into(),
            });
        }
        let mut folder = HfFolder::open(dir)?;
        let cfg = folder.config().clone();
        Self::build(&mut folder, cfg, format, place)
    }

    /// Reads every weight by the source's names, shapes checked against the config.
    fn build(
        source: &mut impl WeightSource,
        cfg: LlamaConfig,
        format: WeightFormat,
        place: &Placement,
    ) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        let q = cfg.num_attention_heads * cfg.head_dim();
        let kv = cfg.num_kv_heads() * cfg.head_dim();
        let inter = cfg.intermediate_size;
        let top = source.names();
        let head_name = if cfg.tie_word_embeddings {
            top.embed.clone()
        } else {
            top.head
        };
        let lm_head = place.proj(Proj::load(
            source,
            &[(head_name, [cfg.vocab_size, h])],
            format,
        )?)?;
        let embed = match &lm_head {
            // Tied: the head's blocks are the embedding's rows.
            Proj::Packed(packed) if cfg.tie_word_embeddings => Embedding::Packed(packed.clone()),
            _ => Embedding::load(source, &top.embed, [cfg.vocab_size, h], format, place)?,
        };
        let norm = place.vector(source.tensor(&top.norm, &[h])?)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let n = source.layer_names(i);
            let qkv = place.proj(Proj::load(
                source,
                &[(n.q, [q, h]), (n.k, [kv, h]), (n.v, [kv, h])],
                format,
            )?)?;
            let qkv_bias = if cfg.attention_bias {
                let bq = source.tensor(&n.q_bias, &[q])?;
                let bk = source.tensor(&n.k_bias, &[kv])?;
                let bv = source.tensor(&n.v_bias, &[kv])?;
                Some(place.vector(Tensor::cat(&[bq, bk, bv], 0)?)?)
            } else {
                None
            };
            let qk_norm = if cfg.qk_norm {
                let d = cfg.head_dim();
                Some((
                    place.vector(source.tensor(&n.q_norm, &[d])?)?,
                    place.vector(source.tensor(&n.k_norm, &[d])?)?,
                ))
            } else {
                None
            };
            let gate_up = place.proj(Proj::load(
                source,
                &[(n.gate, [inter, h]), (n.up, [inter, h])],
                format,
            )?)?;
            layers.push(Layer {
                attn_norm: place.vector(source.tensor(&n.input_norm, &[h])?)?,
                qkv,
                qkv_bias,
                qk_norm,
                out: place.proj(Proj::load(source, &[(n.o, [h, q])], format)?)?,
                ffn_norm: place.vector(source.tensor(&n.post_attention_norm, &[h])?)?,
                gate_up,
                down: place.proj(Proj::load(source, &[(n.down, [h, inter])], format)?)?,
            });
        }
        let (inv_freq, rope_scale) = rope_frequencies(&cfg);
        Ok(Llama {
            cfg,
            embed,
            lm_head,
            norm,
            layers,
            inv_freq,
            rope_scale,
            device: place.device.clone(),
        })
    }

    /// The device its weights, activations and logits are on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The KV geometry this model needs for a given block size.
    pub fn kv_shape(&self, block_tokens: usize) -> KvShape {
        KvShape {
            layers: self.cfg.num_hidden_layers,
            kv_heads: self.cfg.num_kv_heads(),
            head_dim: self.cfg.head_dim(),
            block_tokens,
        }
    }

    /// Runs the chunks on one worker's store (host pages for the `cpu` backend, device pages
    /// for `candle`); returns, per chunk, the logits it asked for (`[rows, vocab]`, f32 on the
    /// model's device).
    pub fn forward(
        &self,
        kv: &mut dyn PagedKv,
        chunks: &[SeqChunk<'_>],
    ) -> Result<Vec<Option<Tensor>>, ModelError> {
        let mut row = 0;
        let seqs: Vec<PagedSeq<'_>> = chunks
            .iter()
            .map(|chunk| {
                let rows = row..row + chunk.tokens.len();
                row = rows.end;
                PagedSeq {
                    rows,
                    start: chunk.start,
                    table: chunk.table,
                }
            })
            .collect();
        kv.check(&seqs)?;
        let rows: Vec<Rows<'_>> = chunks
            .iter()
            .map(|c| Rows {
                tokens: c.tokens,
                start: c.start,
                logits: c.logits,
            })
            .collect();
        let mut attention = kv.attention(&seqs, &self.device)?;
        self.forward_with(attention.as_mut(), &rows)
    }

    /// Runs the chunks with their KV in host pages wherever `attention` keeps them (one store, or
    /// a shard group's); returns, per chunk, the logits it asked for.
    pub fn forward_host(
        &self,
        attention: &mut dyn HostAttention,
        chunks: &[Rows<'_>],
    ) -> Result<Vec<Option<Tensor>>, ModelError> {
        let mut on_host = OnHost {
            inner: attention,
            device: self.device.clone(),
        };
        self.forward_with(&mut on_host, chunks)
    }

    /// Runs the chunks with their KV wherever `attention` keeps it (one store, or a shard
    /// group); returns, per chunk, the logits it asked for (`[rows, vocab]`).
    pub fn forward_with(
        &self,
        attention: &mut dyn Attention,
        chunks: &[Rows<'_>],
    ) -> Result<Vec<Option<Tensor>>, ModelError> {
        let cfg = &self.cfg;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            if let Some(bad) = chunk.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(ModelError::Input(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    cfg.vocab_size
                )));
            }
            spans.push(ids.len()..ids.len() + chunk.tokens.len());
            ids.extend_from_slice(chunk.tokens);
            positions.extend(chunk.start..chunk.start + chunk.tokens.len());
        }
        let rows = ids.len();
        if rows == 0 {
            return Ok(chunks.iter().map(|_| None).collect());
        }
        let device = self.device.clone();
        let (cos, sin) = self.rope_tables(&positions);
        let d = cfg.head_dim();
        let step = StepGeometry {
            positions,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_kv_heads(),
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            cos,
            sin,
            rope_style: cfg.rope_style,
        };
        let eps = cfg.rms_norm_eps;

        let ids_t = Tensor::from_vec(ids, rows, &device)?;
        let mut x = self.embed.lookup(&ids_t)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, eps)?;
            let mut qkv = layer.qkv.apply(&h)?;
            if let Some(bias) = &layer.qkv_bias {
                qkv = qkv.broadcast_add(bias)?;
            }
            if let Some((q_norm, k_norm)) = &layer.qk_norm {
                qkv = norm_heads(&qkv, (q_norm, k_norm), &step, eps)?;
            }
            let attn = attention.layer(l, &qkv, &step)?;
            x = (x + layer.out.apply(&attn)?)?;

            let h = rms_norm(&x, &layer.ffn_norm, eps)?;
            let gate_up = layer.gate_up.apply(&h)?;
            let inter = cfg.intermediate_size;
            let act = (gate_up.narrow(1, 0, inter)?.silu()? * gate_up.narrow(1, inter, inter)?)?;
            x = (x + layer.down.apply(&act)?)?;
        }

        // The rows whose logits are wanted, through the final norm and the head in one call:
        // the head is the largest matrix, read once per step rather than once per sequence.
        let mut wanted = Vec::new();
        let mut wanted_spans = Vec::with_capacity(chunks.len());
        for (chunk, span) in chunks.iter().zip(&spans) {
            let rows = match chunk.logits {
                Logits::None => span.end..span.end,
                Logits::Last => span.end - 1..span.end,
                Logits::All => span.clone(),
            };
            wanted_spans.push(
                (chunk.logits != Logits::None).then_some(wanted.len()..wanted.len() + rows.len()),
            );
            wanted.extend(rows.map(|r| r as u32));
        }
        if wanted.is_empty() {
            return Ok(wanted_spans.iter().map(|_| None).collect());
        }
        let h = if wanted.len() == rows {
            x
        } else {
            let index = Tensor::from_vec(wanted.clone(), wanted.len(), &device)?;
            x.index_select(&index, 0)?
        };
        let logits = self.lm_head.apply(&rms_norm(&h, &self.norm, eps)?)?;
        wanted_spans
            .into_iter()
            .map(|span| {
                span.map(|s| logits.narrow(0, s.start, s.len()))
                    .transpose()
                    .map_err(ModelError::from)
            })
            .collect()
    }

    /// cos and sin of every (row, rotation pair), `[rows, head_dim / 2]` each.
    fn rope_tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                // f64 keeps the angle exact at million-token positions.
                let angle = p as f64 * f64::from(f);
                cos.push(angle.cos() as f32 * self.rope_scale);
                sin.push(angle.sin() as f32 * self.rope_scale);
            }
        }
        (cos, sin)
    }
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(mean_square + eps)?.sqrt()?)?
        .broadcast_mul(weight)
}

/// Qwen3's per-head RMS norm of q and k: each head of the `[tokens, q | k | v]` rows is
/// normalised over its `head_dim` values and scaled by the norm's weights; v is left as it is.
fn norm_heads(
    qkv: &Tensor,
    (q_norm, k_norm): (&Tensor, &Tensor),
    step: &StepGeometry,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let (rows, _) = qkv.dims2()?;
    let d = step.head_dim;
    let (q, kv) = (step.heads * d, step.kv_heads * d);
    let norm = |start: usize, heads: usize, weight: &Tensor| {
        let x = qkv.narrow(1, start, heads * d)?.reshape((rows, heads, d))?;
        rms_norm(&x, weight, eps)?
            .to_dtype(qkv.dtype())?
            .reshape((rows, heads * d))
    };
    let q_part = norm(0, step.heads, q_norm)?;
    let k_part = norm(q, step.kv_heads, k_norm)?;
    Tensor::cat(&[q_part, k_part, qkv.narrow(1, q + kv, kv)?], 1)
}

/// Where [`Proj::load`] reads `[out, in]` matrices from: a GGUF file or a Hugging Face folder.
trait WeightSource {
    /// The tensor as f32.
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError>;
    /// The tensor as stored, for [`WeightFormat::Quantized`] and [`WeightFormat::Packed`].
    fn qtensor(&mut self, name: &str, shape: &[usize]) -> Result<QTensor, ModelError>;
    /// A tensor read by `qtensor`, as f32.
    fn dequantize(&self, name: &str, q: &QTensor) -> Result<Tensor, ModelError>;
    /// The names of the embedding, final norm and head.
    fn names(&self) -> TopNames;
    /// The names of layer `i`'s weights.
    fn layer_names(&self, i: usize) -> LayerNames;
}

/// The names of the weights outside the layers.
struct TopNames {
    embed: String,
    norm: String,
    head: String,
}

impl WeightSource for GgufFile {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        GgufFile::tensor(self, name, shape)
    }

    fn qtensor(&mut self, name: &str, shape: &[usize]) -> Result<QTensor, ModelError> {
        GgufFile::qtensor(self, name, shape)
    }

    fn dequantize(&self, name: &str, q: &QTensor) -> Result<Tensor, ModelError> {
        GgufFile::dequantize(self, name, q)
    }

    fn names(&self) -> TopNames {
        TopNames {
            embed: "token_embd.weight".into(),
            norm: "output_norm.weight".into(),
            head: "output.weight".into(),
        }
    }

    fn layer_names(&self, i: usize) -> LayerNames {
        let name = |n: &str| format!("blk.{i}.{n}");
        LayerNames {
            q: name("attn_q.weight"),
            k: name("attn_k.weight"),
            v: name("attn_v.weight"),
            o: name("attn_output.weight"),
            q_bias: name("attn_q.bias"),
            k_bias: name("attn_k.bias"),
            v_bias: name("attn_v.bias"),
            q_norm: name("attn_q_norm.weight"),
            k_norm: name("attn_k_norm.weight"),
            gate: name("ffn_gate.weight"),
            up: name("ffn_up.weight"),
            down: name("ffn_down.weight"),
            input_norm: name("attn_norm.weight"),
            post_attention_norm: name("ffn_norm.weight"),
        }
    }
}

impl WeightSource for HfFolder {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        HfFolder::tensor(self, name, shape)
    }

    fn qtensor(&mut self, name: &str, _shape: &[usize]) -> Result<QTensor, ModelError> {
        Err(ModelError::Tensor {
            path: self.dir().to_owned(),
            name: name.to_owned(),
            problem: "quantized weights are only read from GGUF".into(),
        })
    }

    fn dequantize(&self, _name: &str, q: &QTensor) -> Result<Tensor, ModelError> {
        Ok(q.dequantize(&Device::Cpu)?)
    }

    fn names(&self) -> TopNames {
        TopNames {
            embed: hf::EMBED.into(),
            norm: hf::NORM.into(),
            head: hf::LM_HEAD.into(),
        }
    }

    fn layer_names(&self, i: usize) -> LayerNames {
        hf::layer_names(i)
    }
}
