//! A Llama-family decoder (Llama 2/3, SmolLM, Qwen2 with its qkv bias) with a batched forward
//! pass over the paged KV store.
//!
//! One call runs any mix of sequences, each contributing a chunk of new tokens at its own
//! position (a whole prompt, a prefill chunk, or one decode token): their rows are stacked so
//! every projection is one GEMM for the whole batch, and only attention looks at sequences one by
//! one, through their block tables. Keys and values of the new tokens are written into the KV
//! store before attention, so a token attends to itself and everything before it.
//!
//! Weights are f32 `[in, out]` (transposed once at load), with q/k/v fused into one matrix and
//! gate/up into another: two GEMMs fewer per layer. With [`WeightFormat::Packed`] (the worker's
//! default) each matrix is also kept in its stored 4/8-bit blocks, and calls of few rows (decode)
//! multiply those instead: a decode step reads 117 MB of weights rather than 540 MB. The head is
//! applied once per call to every row whose logits are wanted.

use std::path::Path;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{D, DType, Device, Module, Tensor};
use tidelock_protocol::BlockId;

use crate::kv::attention::AttnSeq;
use crate::kv::shard::{Attention, Local};
use crate::kv::{KvShape, KvStore};
use crate::model::ModelError;
use crate::model::config::{LlamaConfig, RopeStyle, rope_frequencies};
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
    /// Both: the stored blocks (Q4_0, Q4_1, Q8_0) for calls of up to [`PACKED_MAX_ROWS`] rows
    /// (decode: bound by reading the weights, 4.6x fewer bytes than f32), f32 GEMMs beyond
    /// (prefill: bound by arithmetic). Weights of other types are held in f32 only.
    Packed,
}

/// The most rows a call multiplies through the packed weights; more go to the f32 GEMM.
/// Measured with `examples/bench_decode`: see the worker README.
pub const PACKED_MAX_ROWS: usize = 16;

/// One or more projections of the same input, outputs concatenated along the last dimension.
#[derive(Debug)]
enum Proj {
    /// f32 `[in, out]`, several projections fused into one matrix.
    Dense(Tensor),
    /// Quantized `[out, in]` matrices applied one by one.
    Quantized(Vec<QMatMul>),
    /// The stored blocks (fused) for few rows, f32 `[in, out]` for many.
    Packed { packed: PackedMatrix, dense: Tensor },
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
                let mut packed = Vec::with_capacity(parts.len());
                let mut dense = Vec::with_capacity(parts.len());
                for (name, shape) in parts {
                    let q = file.qtensor(name, shape)?;
                    dense.push(file.dequantize(name, &q)?);
                    if let Some(p) = PackedMatrix::from_qtensor(&q)? {
                        packed.push(p);
                    }
                }
                let dense = Tensor::cat(&dense, 0)?.t()?.contiguous()?;
                Ok(match PackedMatrix::concat(packed) {
                    Some(packed) if packed.rows() == dense.dim(1)? => {
                        Proj::Packed { packed, dense }
                    }
                    _ => Proj::Dense(dense),
                })
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

    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Proj::Dense(w) => x.matmul(w),
            Proj::Packed { packed, dense } => {
                let rows = x.dim(0)?;
                if rows > PACKED_MAX_ROWS {
                    return x.matmul(dense);
                }
                let y = packed.matmul(&x.flatten_all()?.to_vec1::<f32>()?, rows);
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

#[derive(Debug)]
struct Layer {
    attn_norm: Tensor,
    qkv: Proj,
    qkv_bias: Option<Tensor>,
    out: Proj,
    ffn_norm: Tensor,
    gate_up: Proj,
    down: Proj,
}

/// The loaded model.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    lm_head: Proj,
    norm: Tensor,
    layers: Vec<Layer>,
    inv_freq: Vec<f32>,
    rope_scale: f32,
}

impl Llama {
    /// Loads a GGUF model.
    pub fn from_gguf(path: &Path, format: WeightFormat) -> Result<Self, ModelError> {
        let mut file = GgufFile::open(path)?;
        let cfg = file.llama_config()?;
        Self::build(&mut file, cfg, format)
    }

    /// Loads a Hugging Face folder (`config.json` and safetensors, see [`crate::model::hf`]) as
    /// f32 weights; quantized weights are only read from GGUF ([`WeightFormat::Packed`] holds
    /// these f32 weights only: there are no stored blocks to pack).
    pub fn from_hf(dir: &Path, format: WeightFormat) -> Result<Self, ModelError> {
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
        Self::build(&mut folder, cfg, format)
    }

    /// Reads every weight by the source's names, shapes checked against the config.
    fn build(
        source: &mut impl WeightSource,
        cfg: LlamaConfig,
        format: WeightFormat,
    ) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        let q = cfg.num_attention_heads * cfg.head_dim();
        let kv = cfg.num_kv_heads() * cfg.head_dim();
        let inter = cfg.intermediate_size;
        let top = source.names();
        let embed = source.tensor(&top.embed, &[cfg.vocab_size, h])?;
        let head_name = if cfg.tie_word_embeddings {
            top.embed
        } else {
            top.head
        };
        let lm_head = Proj::load(source, &[(head_name, [cfg.vocab_size, h])], format)?;
        let norm = source.tensor(&top.norm, &[h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let n = source.layer_names(i);
            let qkv = Proj::load(
                source,
                &[(n.q, [q, h]), (n.k, [kv, h]), (n.v, [kv, h])],
                format,
            )?;
            let qkv_bias = if cfg.attention_bias {
                let bq = source.tensor(&n.q_bias, &[q])?;
                let bk = source.tensor(&n.k_bias, &[kv])?;
                let bv = source.tensor(&n.v_bias, &[kv])?;
                Some(Tensor::cat(&[bq, bk, bv], 0)?)
            } else {
                None
            };
            let gate_up = Proj::load(source, &[(n.gate, [inter, h]), (n.up, [inter, h])], format)?;
            layers.push(Layer {
                attn_norm: source.tensor(&n.input_norm, &[h])?,
                qkv,
                qkv_bias,
                out: Proj::load(source, &[(n.o, [h, q])], format)?,
                ffn_norm: source.tensor(&n.post_attention_norm, &[h])?,
                gate_up,
                down: Proj::load(source, &[(n.down, [h, inter])], format)?,
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
        })
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

    /// Runs the chunks on one worker's store; returns, per chunk, the logits it asked for
    /// (`[rows, vocab]`).
    pub fn forward(
        &self,
        kv: &mut KvStore,
        chunks: &[SeqChunk<'_>],
    ) -> Result<Vec<Option<Tensor>>, ModelError> {
        let bt = kv.shape().block_tokens;
        let mut seqs = Vec::with_capacity(chunks.len());
        let mut row_tables = Vec::new();
        let mut row = 0;
        for chunk in chunks {
            let end = chunk.start + chunk.tokens.len();
            if chunk.table.len() * bt < end {
                return Err(ModelError::Input(format!(
                    "block table of {} blocks cannot hold {end} tokens",
                    chunk.table.len()
                )));
            }
            if let Some(bad) = chunk
                .table
                .iter()
                .find(|b| b.get() as usize >= kv.num_blocks())
            {
                return Err(ModelError::Input(format!(
                    "block {bad} is outside the KV store"
                )));
            }
            seqs.push(AttnSeq {
                rows: row..row + chunk.tokens.len(),
                start: chunk.start,
                table: chunk.table,
            });
            // Each row's block table, found once rather than per row and layer.
            row_tables.extend(std::iter::repeat_n(chunk.table, chunk.tokens.len()));
            row += chunk.tokens.len();
        }
        let rows: Vec<Rows<'_>> = chunks
            .iter()
            .map(|c| Rows {
                tokens: c.tokens,
                start: c.start,
                logits: c.logits,
            })
            .collect();
        let mut local = Local {
            kv,
            seqs,
            row_tables,
        };
        self.forward_with(&mut local, &rows)
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
        let device = Device::Cpu;
        let (cos, sin) = self.rope_tables(&positions);
        let heads = cfg.num_attention_heads;
        let kv_heads = cfg.num_kv_heads();
        let d = cfg.head_dim();
        let q_width = heads * d;
        let kv_width = kv_heads * d;
        let qkv_width = q_width + 2 * kv_width;
        let scale = 1.0 / (d as f32).sqrt();
        let eps = cfg.rms_norm_eps;

        let ids_t = Tensor::from_vec(ids, rows, &device)?;
        let mut x = self.embed.index_select(&ids_t, 0)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, eps)?;
            let mut qkv = layer.qkv.apply(&h)?;
            if let Some(bias) = &layer.qkv_bias {
                qkv = qkv.broadcast_add(bias)?;
            }
            let mut qkv = qkv.flatten_all()?.to_vec1::<f32>()?;
            let mut q = Vec::with_capacity(rows * q_width);
            for (r, row) in qkv.chunks_exact_mut(qkv_width).enumerate() {
                let (qs, rest) = row.split_at_mut(q_width);
                let (ks, vs) = rest.split_at_mut(kv_width);
                let (c, s) = (&cos[r * d / 2..][..d / 2], &sin[r * d / 2..][..d / 2]);
                for head in qs.chunks_exact_mut(d).chain(ks.chunks_exact_mut(d)) {
                    rotate(head, c, s, cfg.rope_style);
                }
                q.extend_from_slice(qs);
                attention.write(l, r, positions[r], ks, vs);
            }
            let mut attn = vec![0.0f32; rows * q_width];
            attention.attend(l, heads, scale, &q, &mut attn)?;
            let attn = Tensor::from_vec(attn, (rows, q_width), &device)?;
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

fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
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

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(mean_square + eps)?.sqrt()?)?
        .broadcast_mul(weight)
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
