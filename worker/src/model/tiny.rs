//! Tiny Llama models written as Hugging Face folders, from a seed: tests and demos get a real
//! checkpoint (config, safetensors, tokenizer, chat template) without a download.
//!
//! The weights mean nothing; what matters is that they are fixed. Invariants:
//! - The same [`TinySpec`] writes the same bytes, on any machine: values come from ChaCha8 (an
//!   algorithm, not "whatever `StdRng` is this release"), drawn in [`weight_shapes`] order, so the
//!   f32, f16 and bf16 folders of one seed hold the same numbers rounded, and sharding only moves
//!   them between files.
//! - Norm weights are near 1, not exactly 1, so a loader that ignored or swapped them would give
//!   different logits.
//! - The tokenizer is byte-level BPE (256 byte tokens, a few merges, `<|endoftext|>`,
//!   `<|im_start|>`, `<|im_end|>`, then reserved specials up to `vocab`), so it encodes any text
//!   and its vocabulary is exactly the model's.

use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tidelock_prompt::tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tidelock_prompt::tokenizers::models::bpe::{BPE, Vocab};
use tidelock_prompt::tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tidelock_prompt::tokenizers::{AddedToken, Tokenizer};

use crate::model::ModelError;
use crate::model::config::LlamaConfig;
use crate::model::hf::{self, weight_shapes};

/// How the weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyDtype {
    F32,
    F16,
    Bf16,
}

impl TinyDtype {
    fn dtype(self) -> DType {
        match self {
            TinyDtype::F32 => DType::F32,
            TinyDtype::F16 => DType::F16,
            TinyDtype::Bf16 => DType::BF16,
        }
    }

    /// `torch_dtype` in `config.json`.
    fn torch_name(self) -> &'static str {
        match self {
            TinyDtype::F32 => "float32",
            TinyDtype::F16 => "float16",
            TinyDtype::Bf16 => "bfloat16",
        }
    }
}

impl FromStr for TinyDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(TinyDtype::F32),
            "f16" => Ok(TinyDtype::F16),
            "bf16" => Ok(TinyDtype::Bf16),
            other => Err(format!("dtype `{other}`: expected f32, f16 or bf16")),
        }
    }
}

/// The shape of a tiny model, its seed, and how its weights are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinySpec {
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Usually `heads * head_dim`.
    pub hidden: usize,
    pub intermediate: usize,
    /// At least 256 bytes + the merges + 3 specials.
    pub vocab: usize,
    pub seed: u64,
    /// 1: one `model.safetensors`; more: that many shards and `model.safetensors.index.json`.
    pub shards: usize,
    pub dtype: TinyDtype,
}

impl TinySpec {
    /// The model of issue 7: 2 layers, 4 heads over 2 KV heads of 64, hidden 256, MLP 512,
    /// vocabulary 512, seed 7, one f32 file.
    pub fn issue7() -> Self {
        TinySpec {
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            hidden: 256,
            intermediate: 512,
            vocab: 512,
            seed: 7,
            shards: 1,
            dtype: TinyDtype::F32,
        }
    }

    /// The `config.json` document.
    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": false,
            "attention_bias": false,
            "hidden_act": "silu",
            "torch_dtype": self.dtype.torch_name(),
            "bos_token_id": BOS_ID,
            "eos_token_id": self.vocab_base() as u32 + 2,
        })
    }

    /// The hyper-parameters, as a loader reads them from [`TinySpec::config_json`].
    pub fn config(&self) -> Result<LlamaConfig, ModelError> {
        let cfg: LlamaConfig =
            serde_json::from_value(self.config_json()).map_err(|e| ModelError::Config {
                field: "spec",
                problem: e.to_string(),
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Ids below this are bytes and merges; the specials follow.
    fn vocab_base(&self) -> usize {
        256 + MERGES.len()
    }
}

/// Byte-level BPE merges, in rank order (`Ġ` is a space).
const MERGES: [(&str, &str); 16] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("i", "n"),
    ("e", "r"),
    ("a", "n"),
    ("o", "n"),
    ("Ġt", "he"),
    ("r", "e"),
    ("Ġ", "a"),
    ("e", "n"),
    ("Ġ", "s"),
    ("o", "r"),
    ("Ġ", "w"),
    ("i", "s"),
    ("l", "l"),
    ("Ġ", "c"),
];

/// Special tokens right after the merges, in id order.
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// `<|endoftext|>`'s id.
const BOS_ID: u32 = 256 + MERGES.len() as u32;

/// ChatML, as Qwen2 and SmolLM write it.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Writes a tiny model folder: `config.json`, the weights, `tokenizer.json` and
/// `tokenizer_config.json`. Creates `dir` if needed; overwrites those files.
pub fn write_tiny_llama(dir: &Path, spec: &TinySpec) -> Result<(), ModelError> {
    let cfg = spec.config()?;
    if spec.vocab < spec.vocab_base() + SPECIALS.len() {
        return Err(ModelError::Config {
            field: "vocab_size",
            problem: format!(
                "{} cannot hold 256 bytes, {} merges and {} specials",
                spec.vocab,
                MERGES.len(),
                SPECIALS.len()
            ),
        });
    }
    let weights = weight_shapes(&cfg);
    if spec.shards == 0 || spec.shards > weights.len() {
        return Err(ModelError::Config {
            field: "shards",
            problem: format!("{} shards for {} tensors", spec.shards, weights.len()),
        });
    }
    std::fs::create_dir_all(dir).map_err(|e| write_error(dir, e))?;
    write_json(&dir.join(hf::CONFIG), &spec.config_json())?;
    write_weights(dir, spec, &weights)?;
    write_tokenizer(dir, spec)?;
    write_json(
        &dir.join(hf::TOKENIZER_CONFIG),
        &serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.max_position_embeddings,
            "bos_token": SPECIALS[0],
            "eos_token": SPECIALS[2],
            "chat_template": CHATML,
        }),
    )
}

fn write_error(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::File {
        path: path.to_owned(),
        problem: format!("cannot write: {e}"),
    }
}

fn write_json(path: &Path, doc: &serde_json::Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(doc).map_err(|e| write_error(path, e))?;
    std::fs::write(path, text + "\n").map_err(|e| write_error(path, e))
}

/// Uniform in `[-scale, scale)`, from 24 random bits (exact in f32).
fn uniform(rng: &mut ChaCha8Rng, scale: f32) -> f32 {
    let unit = (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
    (unit * 2.0 - 1.0) * scale
}

fn write_weights(
    dir: &Path,
    spec: &TinySpec,
    weights: &[(String, Vec<usize>)],
) -> Result<(), ModelError> {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut tensors = Vec::with_capacity(weights.len());
    for (name, shape) in weights {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if shape.len() == 1 {
            (0..n).map(|_| 1.0 + uniform(&mut rng, 0.1)).collect()
        } else {
            (0..n).map(|_| uniform(&mut rng, 0.05)).collect()
        };
        let t = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?
            .to_dtype(spec.dtype.dtype())?;
        tensors.push((name.clone(), t));
    }
    if spec.shards == 1 {
        return save(&dir.join(hf::WEIGHTS), tensors);
    }
    let file_name = |i: usize| format!("model-{:05}-of-{:05}.safetensors", i + 1, spec.shards);
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0;
    let count = tensors.len();
    let mut tensors = tensors.into_iter();
    for shard in 0..spec.shards {
        let take = (shard + 1) * count / spec.shards - shard * count / spec.shards;
        let part: Vec<(String, Tensor)> = tensors.by_ref().take(take).collect();
        for (name, t) in &part {
            weight_map.insert(name.clone(), file_name(shard).into());
            total_size += t.elem_count() * t.dtype().size_in_bytes();
        }
        save(&dir.join(file_name(shard)), part)?;
    }
    write_json(
        &dir.join(hf::WEIGHTS_INDEX),
        &serde_json::json!({
            "metadata": {"total_size": total_size},
            "weight_map": weight_map,
        }),
    )
}

/// Serialised in memory and written with `fs::write`: `safetensors::serialize_to_file` goes
/// through a private temporary file and would leave the weights readable by their owner only.
fn save(path: &Path, tensors: Vec<(String, Tensor)>) -> Result<(), ModelError> {
    let bytes = safetensors::serialize(tensors, None).map_err(|e| write_error(path, e))?;
    std::fs::write(path, bytes).map_err(|e| write_error(path, e))
}

/// GPT-2's byte-to-character map: printable bytes stand for themselves, the rest are moved to
/// U+0100 and up, in byte order.
fn byte_chars() -> Vec<char> {
    let mut moved = 0;
    (0..=255u8)
        .map(|b| {
            if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
                char::from(b)
            } else {
                moved += 1;
                char::from_u32(255 + moved).unwrap_or('?')
            }
        })
        .collect()
}

fn write_tokenizer(dir: &Path, spec: &TinySpec) -> Result<(), ModelError> {
    let path = dir.join(hf::TOKENIZER);
    let build_error = |e: Box<dyn std::error::Error + Send + Sync>| ModelError::File {
        path: path.clone(),
        problem: format!("cannot build the tokenizer: {e}"),
    };
    let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    let vocab: Vocab = tokens
        .into_iter()
        .enumerate()
        .map(|(id, token)| (token, id as u32))
        .collect();
    let merges = MERGES
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(build_error)?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let reserved =
        (spec.vocab_base() + SPECIALS.len()..spec.vocab).map(|id| format!("<|reserved_{id}|>"));
    let specials = SPECIALS.iter().map(|s| (*s).to_owned()).chain(reserved);
    tokenizer
        .add_special_tokens(specials.map(|s| AddedToken::from(s, true)))
        .map_err(build_error)?;
    tokenizer
        .save(&path, true)
        .map_err(|e| write_error(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn same_spec_same_bytes() {
        let spec = TinySpec {
            shards: 2,
            ..TinySpec::issue7()
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_tiny_llama(a.path(), &spec).unwrap();
        write_tiny_llama(b.path(), &spec).unwrap();
        let (a, b) = (files(a.path()), files(b.path()));
        let names: Vec<&str> = a.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "config.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
                "tokenizer.json",
                "tokenizer_config.json"
            ]
        );
        assert!(a == b, "two writes of one spec differ");
    }

    #[test]
    fn tokenizer_covers_the_vocabulary() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_llama(dir.path(), &TinySpec::issue7()).unwrap();
        let tokenizer = Tokenizer::from_file(dir.path().join(hf::TOKENIZER)).unwrap();
        assert_eq!(tokenizer.get_vocab_size(true), 512);
        assert_eq!(tokenizer.token_to_id("<|endoftext|>"), Some(BOS_ID));
        assert_eq!(tokenizer.token_to_id("<|im_end|>"), Some(BOS_ID + 2));
        assert_eq!(tokenizer.token_to_id("<|reserved_511|>"), Some(511));
        let ids = tokenizer.encode("in the cat", false).unwrap();
        assert_eq!(
            ids.get_tokens(),
            ["in", "Ġthe", "Ġc", "a", "t"],
            "merges apply in rank order"
        );
        assert_eq!(
            tokenizer.decode(ids.get_ids(), false).unwrap(),
            "in the cat"
        );
    }

    #[test]
    fn bad_specs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let small = TinySpec {
            vocab: 100,
            ..TinySpec::issue7()
        };
        let err = write_tiny_llama(dir.path(), &small).unwrap_err();
        assert!(err.to_string().contains("vocab_size"), "{err}");
        let none = TinySpec {
            shards: 0,
            ..TinySpec::issue7()
        };
        assert!(write_tiny_llama(dir.path(), &none).is_err());
        assert!("f8".parse::<TinyDtype>().is_err());
    }
}
