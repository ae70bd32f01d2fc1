//! Hugging Face model folders: `config.json` to [`LlamaConfig`], safetensors weights (one
//! `model.safetensors`, or `model.safetensors.index.json` and the shards it lists) to f32
//! tensors.
//!
//! Weights are read tensor by tensor with plain file reads at offsets taken from each file's
//! header, not memory-mapped: mapping needs `unsafe` (the file could change under the map), which
//! this crate keeps to compute kernels, and the forward pass converts every weight to f32 anyway.
//! Each file's header is parsed and checked against the file's length at open, so a truncated
//! download fails at start, naming the file.
//!
//! Invariants:
//! - Every error names the file at fault (`config.json`, a shard) or, for a tensor no file holds,
//!   the folder.
//! - Queries and keys use [`RopeStyle::Halves`]: Hugging Face's `rotate_half` layout, which the
//!   checkpoint's q/k weights are trained for (GGUF converters permute them to interleaved pairs;
//!   nothing here does).
//! - Weight names are the checkpoint's own ([`layer_names`], [`EMBED`], [`NORM`], [`LM_HEAD`]).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;
use safetensors::tensor::Metadata;
use serde::Deserialize;

use crate::model::ModelError;
use crate::model::config::{LlamaConfig, RopeStyle};
use tidelock_prompt::SamplingDefaults;

/// The model's hyper-parameters.
pub const CONFIG: &str = "config.json";
/// The tokenizer, and the chat template and special tokens (read by `tidelock_prompt`).
pub use tidelock_prompt::hf::{
    TOKENIZER_CONFIG_FILE as TOKENIZER_CONFIG, TOKENIZER_FILE as TOKENIZER,
};
/// All weights in one file.
pub const WEIGHTS: &str = "model.safetensors";
/// Which shard holds which weight, for weights split over several files.
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// Token embeddings, `[vocab, hidden]`.
pub const EMBED: &str = "model.embed_tokens.weight";
/// The final norm, `[hidden]`.
pub const NORM: &str = "model.norm.weight";
/// The output projection, `[vocab, hidden]`; absent when tied to the embeddings.
pub const LM_HEAD: &str = "lm_head.weight";

/// `config.json` `architectures` this runtime runs, with their `model_type`.
const SUPPORTED: [(&str, &str); 4] = [
    ("LlamaForCausalLM", "llama"),
    ("MistralForCausalLM", "mistral"),
    ("Qwen2ForCausalLM", "qwen2"),
    ("Qwen3ForCausalLM", "qwen3"),
];

/// A safetensors header larger than this is taken as corruption, not read.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// The checkpoint names of one decoder layer's weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerNames {
    pub q: String,
    pub k: String,
    pub v: String,
    pub o: String,
    /// Biases of q, k and v, present when `attention_bias` (Qwen2).
    pub q_bias: String,
    pub k_bias: String,
    pub v_bias: String,
    /// Per-head RMS norms of q and k, present when `qk_norm` (Qwen3).
    pub q_norm: String,
    pub k_norm: String,
    pub gate: String,
    pub up: String,
    pub down: String,
    pub input_norm: String,
    pub post_attention_norm: String,
}

/// The checkpoint names of layer `i`'s weights.
pub fn layer_names(i: usize) -> LayerNames {
    let name = |n: &str| format!("model.layers.{i}.{n}");
    LayerNames {
        q: name("self_attn.q_proj.weight"),
        k: name("self_attn.k_proj.weight"),
        v: name("self_attn.v_proj.weight"),
        o: name("self_attn.o_proj.weight"),
        q_bias: name("self_attn.q_proj.bias"),
        k_bias: name("self_attn.k_proj.bias"),
        v_bias: name("self_attn.v_proj.bias"),
        q_norm: name("self_attn.q_norm.weight"),
        k_norm: name("self_attn.k_norm.weight"),
        gate: name("mlp.gate_proj.weight"),
        up: name("mlp.up_proj.weight"),
        down: name("mlp.down_proj.weight"),
        input_norm: name("input_layernorm.weight"),
        post_attention_norm: name("post_attention_layernorm.weight"),
    }
}

/// Every weight a checkpoint of this shape holds, with its shape (`[out, in]` for matrices), in
/// the order the forward pass uses them.
pub fn weight_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.num_kv_heads() * cfg.head_dim();
    let inter = cfg.intermediate_size;
    let mut out = vec![(EMBED.to_owned(), vec![cfg.vocab_size, h])];
    for i in 0..cfg.num_hidden_layers {
        let n = layer_names(i);
        out.push((n.input_norm, vec![h]));
        out.push((n.q, vec![q, h]));
        out.push((n.k, vec![kv, h]));
        out.push((n.v, vec![kv, h]));
        if cfg.attention_bias {
            out.push((n.q_bias, vec![q]));
            out.push((n.k_bias, vec![kv]));
            out.push((n.v_bias, vec![kv]));
        }
        if cfg.qk_norm {
            out.push((n.q_norm, vec![cfg.head_dim()]));
            out.push((n.k_norm, vec![cfg.head_dim()]));
        }
        out.push((n.o, vec![h, q]));
        out.push((n.post_attention_norm, vec![h]));
        out.push((n.gate, vec![inter, h]));
        out.push((n.up, vec![inter, h]));
        out.push((n.down, vec![h, inter]));
    }
    out.push((NORM.to_owned(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push((LM_HEAD.to_owned(), vec![cfg.vocab_size, h]));
    }
    out
}

/// The folder's `tokenizer.json` (which must exist) and `tokenizer_config.json` (when present).
pub fn tokenizer_files(dir: &Path) -> Result<(PathBuf, Option<PathBuf>), ModelError> {
    let tokenizer = dir.join(TOKENIZER);
    if !tokenizer.is_file() {
        return Err(ModelError::File {
            path: tokenizer,
            problem: "missing".into(),
        });
    }
    let config = dir.join(TOKENIZER_CONFIG);
    Ok((tokenizer, config.is_file().then_some(config)))
}

/// The folder's generation config, the model's defaults for sampling (its end tokens are read
/// by `tidelock_prompt`).
pub use tidelock_prompt::hf::GENERATION_CONFIG_FILE as GENERATION_CONFIG;

/// The sampling defaults of the folder's `generation_config.json` (`temperature`, `top_p`,
/// `top_k`; a `top_k` of 0 means none), as vLLM's `--generation-config auto` reads them; empty
/// when the file is absent. A value out of range is an error naming the file.
pub fn generation_defaults(dir: &Path) -> Result<SamplingDefaults, ModelError> {
    #[derive(Deserialize)]
    struct GenerationConfig {
        temperature: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<u32>,
    }
    let path = dir.join(GENERATION_CONFIG);
    if !path.is_file() {
        return Ok(SamplingDefaults::default());
    }
    let problem = |problem: String| ModelError::File {
        path: path.clone(),
        problem,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| problem(e.to_string()))?;
    let config: GenerationConfig =
        serde_json::from_str(&text).map_err(|e| problem(format!("not the JSON expected: {e}")))?;
    let defaults = SamplingDefaults {
        temperature: config.temperature,
        top_p: config.top_p,
        top_k: config.top_k.filter(|&k| k > 0),
    };
    defaults.validate().map_err(|e| problem(e.to_string()))?;
    Ok(defaults)
}

/// An open Hugging Face model folder: its config and the headers of its weight files.
#[derive(Debug)]
pub struct HfFolder {
    dir: PathBuf,
    cfg: LlamaConfig,
    files: Vec<WeightFile>,
    /// Tensor name to index in `files`.
    holder: HashMap<String, usize>,
}

/// One safetensors file, its header parsed.
#[derive(Debug)]
struct WeightFile {
    path: PathBuf,
    file: File,
    /// Where tensor data starts: after the 8-byte header length and the header.
    data_start: u64,
    header: Metadata,
}

/// The parts of `config.json` that say which model it is.
#[derive(Debug, Deserialize)]
struct Identity {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    /// Mistral and Qwen2 attention window, when the model uses one.
    #[serde(default)]
    sliding_window: Option<usize>,
    /// Qwen2: whether `sliding_window` applies at all (it is written but off by default).
    #[serde(default)]
    use_sliding_window: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct WeightIndex {
    weight_map: HashMap<String, String>,
}

impl HfFolder {
    /// Reads `config.json` and opens the weight files.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let cfg = read_config(&dir.join(CONFIG))?;
        let index = dir.join(WEIGHTS_INDEX);
        let paths = if index.is_file() {
            let file_error = |problem: String| ModelError::File {
                path: index.clone(),
                problem,
            };
            let text = std::fs::read_to_string(&index)
                .map_err(|e| file_error(format!("cannot read: {e}")))?;
            let parsed: WeightIndex = serde_json::from_str(&text)
                .map_err(|e| file_error(format!("not a valid weight index: {e}")))?;
            let shards: BTreeSet<String> = parsed.weight_map.into_values().collect();
            if shards.is_empty() {
                return Err(file_error("`weight_map` lists no files".into()));
            }
            shards.into_iter().map(|shard| dir.join(shard)).collect()
        } else {
            vec![dir.join(WEIGHTS)]
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut holder = HashMap::new();
        for path in paths {
            let file = WeightFile::open(path)?;
            for name in file.header.tensors().into_keys() {
                holder.insert(name, files.len());
            }
            files.push(file);
        }
        Ok(HfFolder {
            dir: dir.to_owned(),
            cfg,
            files,
            holder,
        })
    }

    /// The validated hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether some weight file holds a tensor of this name.
    pub fn has(&self, name: &str) -> bool {
        self.holder.contains_key(name)
    }

    /// Reads one tensor as f32 on the CPU (from f32, f16 or bf16), with the expected shape
    /// (`[out, in]` for matrices).
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let Some(&index) = self.holder.get(name) else {
            return Err(ModelError::Tensor {
                path: self.dir.clone(),
                name: name.to_owned(),
                problem: "missing: no weight file in the folder holds it".into(),
            });
        };
        self.files[index].tensor(name, shape)
    }
}

/// Parses `config.json`, checks the architecture, and applies what the architecture implies.
fn read_config(path: &Path) -> Result<LlamaConfig, ModelError> {
    let file_error = |problem: String| ModelError::File {
        path: path.to_owned(),
        problem,
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| file_error(format!("cannot read: {e}")))?;
    let identity: Identity = serde_json::from_str(&text)
        .map_err(|e| file_error(format!("not a valid model config: {e}")))?;
    let supported = || {
        SUPPORTED
            .iter()
            .map(|(arch, _)| *arch)
            .collect::<Vec<_>>()
            .join(", ")
    };
    // `architectures` names the class that wrote the checkpoint; older configs only have
    // `model_type`.
    let model_type = match (identity.architectures.first(), &identity.model_type) {
        (Some(arch), _) => SUPPORTED
            .iter()
            .find(|(a, _)| a == arch)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                file_error(format!(
                    "architecture `{arch}` is not supported (supported: {})",
                    supported()
                ))
            })?,
        (None, Some(model_type)) => SUPPORTED
            .iter()
            .find(|(_, t)| t == model_type)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                file_error(format!(
                    "model_type `{model_type}` is not supported (supported: {})",
                    supported()
                ))
            })?,
        (None, None) => {
            return Err(file_error(
                "names no `architectures` and no `model_type`".into(),
            ));
        }
    };
    let mut cfg: LlamaConfig = serde_json::from_str(&text)
        .map_err(|e| file_error(format!("not a valid model config: {e}")))?;
    // Hugging Face checkpoints are trained with `rotate_half`; only GGUF permutes q/k.
    cfg.rope_style = RopeStyle::Halves;
    if model_type == "qwen2" {
        // Qwen2's config has no `attention_bias`: its q/k/v projections always have one.
        cfg.attention_bias = true;
    }
    // Qwen3 normalises each head of q and k before rope (its config does not say so).
    cfg.qk_norm = model_type == "qwen3";
    // Attention here is always full. Within the window that is what a sliding-window model
    // computes too, so the context is capped at the window rather than the model refused.
    let window_applies = model_type == "mistral" || identity.use_sliding_window == Some(true);
    if let Some(window) = identity.sliding_window.filter(|_| window_applies) {
        cfg.max_position_embeddings = cfg.max_position_embeddings.min(window);
    }
    cfg.validate()?;
    Ok(cfg)
}

impl WeightFile {
    /// Opens the file and reads its header, checking that the file holds all the data the header
    /// describes.
    fn open(path: PathBuf) -> Result<Self, ModelError> {
        let file_error = |problem: String| ModelError::File {
            path: path.clone(),
            problem,
        };
        let mut file = File::open(&path).map_err(|e| file_error(format!("cannot open: {e}")))?;
        let len = file
            .metadata()
            .map_err(|e| file_error(format!("cannot stat: {e}")))?
            .len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|e| file_error(format!("too short for a safetensors header: {e}")))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER_BYTES || n > len - 8 {
            return Err(file_error(format!(
                "not a safetensors file: header length {n} in a file of {len} bytes"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| file_error(format!("unreadable header: {e}")))?;
        let header: Metadata = serde_json::from_slice(&header)
            .map_err(|e| file_error(format!("invalid safetensors header: {e}")))?;
        let data_start = 8 + n;
        let data_len = header
            .tensors()
            .values()
            .map(|info| info.data_offsets.1 as u64)
            .max()
            .unwrap_or(0);
        if data_start + data_len != len {
            return Err(file_error(format!(
                "{} tensor data: the header describes {data_len} bytes, the file holds {}",
                if data_start + data_len > len {
                    "truncated"
                } else {
                    "inconsistent"
                },
                len - data_start
            )));
        }
        Ok(WeightFile {
            path,
            file,
            data_start,
            header,
        })
    }

    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let tensor_error = |problem: String| ModelError::Tensor {
            path: self.path.clone(),
            name: name.to_owned(),
            problem,
        };
        let Some(info) = self.header.info(name) else {
            return Err(tensor_error("missing".into()));
        };
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(tensor_error(format!(
                    "dtype {other:?} is not supported (F32, F16 and BF16 are)"
                )));
            }
        };
        if info.shape != shape {
            return Err(tensor_error(format!(
                "shape {:?}, expected {shape:?}",
                info.shape
            )));
        }
        let (begin, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - begin];
        self.file
            .seek(SeekFrom::Start(self.data_start + begin as u64))
            .and_then(|_| self.file.read_exact(&mut bytes))
            .map_err(|e| tensor_error(format!("unreadable: {e}")))?;
        Tensor::from_raw_buffer(&bytes, dtype, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| tensor_error(format!("cannot convert {dtype:?} to f32: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `generation_config.json`'s sampling values become the model's defaults; none without
    /// the file; out of range is an error naming it.
    #[test]
    fn generation_config_gives_the_sampling_defaults() {
        let dir = tempfile::tempdir().unwrap();
        assert!(generation_defaults(dir.path()).unwrap().is_empty());
        let file = dir.path().join(GENERATION_CONFIG);
        std::fs::write(
            &file,
            r#"{"bos_token_id": 1, "eos_token_id": [2, 3], "do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": 0}"#,
        )
        .unwrap();
        assert_eq!(
            generation_defaults(dir.path()).unwrap(),
            SamplingDefaults {
                temperature: Some(0.6),
                top_p: Some(0.9),
                top_k: None,
            }
        );
        std::fs::write(&file, r#"{"temperature": 3.0}"#).unwrap();
        let err = generation_defaults(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(GENERATION_CONFIG) && err.contains("temperature"),
            "{err}"
        );
    }

    fn config_error(json: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG);
        std::fs::write(&path, json).unwrap();
        read_config(&path).unwrap_err().to_string()
    }

    const SHAPE: &str = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1"#;

    fn config(json: &str) -> LlamaConfig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG);
        std::fs::write(&path, json).unwrap();
        read_config(&path).unwrap()
    }

    #[test]
    fn architectures_and_what_they_imply() {
        let llama = config(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {SHAPE}}}"#
        ));
        assert_eq!(llama.rope_style, RopeStyle::Halves);
        assert!(!llama.attention_bias);
        let qwen = config(&format!(
            r#"{{"architectures": ["Qwen2ForCausalLM"], "sliding_window": 4, "use_sliding_window": false, {SHAPE}}}"#
        ));
        assert!(qwen.attention_bias);
        assert_eq!(qwen.max_position_embeddings, 4096, "window off");
        let mistral = config(&format!(
            r#"{{"model_type": "mistral", "sliding_window": 1024, {SHAPE}}}"#
        ));
        assert_eq!(mistral.max_position_embeddings, 1024);
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let err = config_error(&format!(
            r#"{{"architectures": ["GPT2LMHeadModel"], {SHAPE}}}"#
        ));
        assert!(err.contains("config.json"), "{err}");
        assert!(err.contains("`GPT2LMHeadModel` is not supported"), "{err}");
        let err = config_error(&format!(r#"{{"model_type": "gemma", {SHAPE}}}"#));
        assert!(err.contains("model_type `gemma`"), "{err}");
        let err = config_error(&format!("{{{SHAPE}}}"));
        assert!(err.contains("no `architectures`"), "{err}");
    }

    #[test]
    fn invalid_config_names_the_field() {
        let err = config_error(r#"{"model_type": "llama", "vocab_size": 10}"#);
        assert!(
            err.contains("config.json: not a valid model config"),
            "{err}"
        );
        assert!(err.contains("hidden_size"), "{err}");
        let err = config_error(
            r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2}"#,
        );
        assert!(err.contains("num_key_value_heads"), "{err}");
    }

    #[test]
    fn weight_list_follows_the_config() {
        let mut cfg = config(&format!(r#"{{"model_type": "llama", {SHAPE}}}"#));
        let names: Vec<String> = weight_shapes(&cfg).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 1 + 9 + 2);
        assert!(names.contains(&LM_HEAD.to_owned()));
        cfg.tie_word_embeddings = true;
        cfg.attention_bias = true;
        let shapes = weight_shapes(&cfg);
        assert_eq!(shapes.len(), 1 + 12 + 1);
        assert!(shapes.contains(&("model.layers.0.self_attn.k_proj.bias".into(), vec![4])));
    }
}
