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
//! - The tokenizer is byte-level BPE (256 byte tokens, a few merges, the family's special tokens,
//!   then reserved specials up to `vocab`), so it encodes any text and its vocabulary is exactly
//!   the model's.
//! - [`TinyFamily`] gives the folder a family's conventions (architecture, special tokens, a chat
//!   template written in that family's style, where the template is saved, end tokens, rope
//!   scaling), so loaders are tested on each family's layout without downloading one.

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

/// Which family's conventions a tiny model folder follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TinyFamily {
    /// SmolLM2's: Llama architecture, ChatML in `tokenizer_config.json`, `<|im_end|>` ends.
    #[default]
    SmolLm,
    /// Llama 3.x: header-id template in `chat_template.jinja` (the config has none), BOS
    /// written by the template, `<|end_of_text|>` as the config's EOS and `<|eot_id|>`,
    /// `<|eom_id|>` listed in `generation_config.json`, `llama3` rope scaling.
    Llama3,
    /// Qwen2.5: ChatML with Qwen's default system prompt, Qwen2 architecture (q/k/v biases),
    /// `<|im_end|>` and `<|endoftext|>` listed as end tokens.
    Qwen25,
    /// Qwen3: ChatML whose generation prompt can close an empty thinking block
    /// (`enable_thinking: false`), Qwen3 architecture (per-head q/k norms).
    Qwen3,
    /// Mistral: `[INST]` template with BOS and EOS written by it, `</s>` ends,
    /// `MistralForCausalLM`, rope scaling in the legacy form `{"type": "dynamic"}`.
    Mistral,
}

/// ChatML, as Qwen2 and SmolLM write it.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Llama 3.x's header-id format; with tools, Llama 3.1's JSON tool calling (the functions in a
/// system turn, calls as `{"name": ..., "parameters": ...}`, results in `ipython` turns).
const LLAMA3: &str = include_str!("tiny/llama3.jinja");

/// Qwen2.5's ChatML: a default system prompt when the conversation has none; with tools, its
/// Hermes tool calling (`<tool_call>` blocks, results as `<tool_response>` in a user turn).
const QWEN25: &str = include_str!("tiny/qwen25.jinja");

/// Qwen3's ChatML: the generation prompt closes an empty thinking block when thinking is off.
const QWEN3: &str = "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}";

/// Mistral's instruction format (user and assistant turns; no system role).
const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}";

impl FromStr for TinyFamily {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "smollm" => Ok(TinyFamily::SmolLm),
            "llama3" => Ok(TinyFamily::Llama3),
            "qwen2.5" => Ok(TinyFamily::Qwen25),
            "qwen3" => Ok(TinyFamily::Qwen3),
            "mistral" => Ok(TinyFamily::Mistral),
            other => Err(format!(
                "family `{other}`: expected smollm, llama3, qwen2.5, qwen3 or mistral"
            )),
        }
    }
}

impl TinyFamily {
    /// Its special tokens, in id order right after the merges.
    pub fn specials(self) -> &'static [&'static str] {
        match self {
            TinyFamily::SmolLm => &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            TinyFamily::Llama3 => &[
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eom_id|>",
                "<|eot_id|>",
            ],
            TinyFamily::Qwen25 => &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            TinyFamily::Qwen3 => &[
                "<|endoftext|>",
                "<|im_start|>",
                "<|im_end|>",
                "<think>",
                "</think>",
            ],
            TinyFamily::Mistral => &["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        }
    }

    /// `tokenizer_config.json`'s BOS and EOS.
    fn bos_eos(self) -> (&'static str, &'static str) {
        match self {
            TinyFamily::SmolLm => ("<|endoftext|>", "<|im_end|>"),
            TinyFamily::Llama3 => ("<|begin_of_text|>", "<|end_of_text|>"),
            TinyFamily::Qwen25 | TinyFamily::Qwen3 => ("<|endoftext|>", "<|im_end|>"),
            TinyFamily::Mistral => ("<s>", "</s>"),
        }
    }

    /// The chat template, and whether it is saved as `chat_template.jinja` rather than in
    /// `tokenizer_config.json`.
    fn template(self) -> (&'static str, bool) {
        match self {
            TinyFamily::SmolLm => (CHATML, false),
            TinyFamily::Llama3 => (LLAMA3, true),
            TinyFamily::Qwen25 => (QWEN25, false),
            TinyFamily::Qwen3 => (QWEN3, false),
            TinyFamily::Mistral => (MISTRAL, false),
        }
    }

    /// The end tokens `generation_config.json` lists; none: no such file.
    fn generation_eos(self) -> &'static [&'static str] {
        match self {
            TinyFamily::SmolLm | TinyFamily::Mistral => &[],
            TinyFamily::Llama3 => &["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
            TinyFamily::Qwen25 | TinyFamily::Qwen3 => &["<|im_end|>", "<|endoftext|>"],
        }
    }

    /// `architectures`, `model_type` and the family's other `config.json` entries.
    fn config_entries(self) -> serde_json::Value {
        match self {
            TinyFamily::SmolLm => serde_json::json!({
                "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            }),
            TinyFamily::Llama3 => serde_json::json!({
                "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
            }),
            TinyFamily::Qwen25 => serde_json::json!({
                "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                "use_sliding_window": false, "sliding_window": 4096,
            }),
            TinyFamily::Qwen3 => serde_json::json!({
                "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                "rope_theta": 1000000.0,
            }),
            TinyFamily::Mistral => serde_json::json!({
                "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                "sliding_window": null,
                "rope_scaling": {"type": "dynamic", "factor": 2.0},
            }),
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
    /// Whose conventions the folder follows.
    pub family: TinyFamily,
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
            family: TinyFamily::SmolLm,
        }
    }

    /// The `config.json` document.
    pub fn config_json(&self) -> serde_json::Value {
        let mut config = serde_json::json!({
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
            "bos_token_id": self.special_id(self.family.bos_eos().0),
            "eos_token_id": self.special_id(self.family.bos_eos().1),
        });
        if let (Some(config), serde_json::Value::Object(entries)) =
            (config.as_object_mut(), self.family.config_entries())
        {
            config.extend(entries);
        }
        config
    }

    /// The id of one of the family's special tokens.
    pub fn special_id(&self, token: &str) -> Option<u32> {
        let at = self.family.specials().iter().position(|s| *s == token)?;
        Some((self.vocab_base() + at) as u32)
    }

    /// The hyper-parameters, as a loader reads them from [`TinySpec::config_json`].
    pub fn config(&self) -> Result<LlamaConfig, ModelError> {
        let mut cfg: LlamaConfig =
            serde_json::from_value(self.config_json()).map_err(|e| ModelError::Config {
                field: "spec",
                problem: e.to_string(),
            })?;
        // What the loader derives from the architecture rather than reads.
        cfg.attention_bias |= self.family == TinyFamily::Qwen25;
        cfg.qk_norm = self.family == TinyFamily::Qwen3;
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

/// `<|endoftext|>`'s id in the default family.
#[cfg(test)]
const BOS_ID: u32 = 256 + MERGES.len() as u32;

/// Writes a tiny model folder: `config.json`, the weights, `tokenizer.json`,
/// `tokenizer_config.json`, and as the family has them `chat_template.jinja` and
/// `generation_config.json`. Creates `dir` if needed; overwrites those files.
pub fn write_tiny_llama(dir: &Path, spec: &TinySpec) -> Result<(), ModelError> {
    let cfg = spec.config()?;
    let specials = spec.family.specials();
    if spec.vocab < spec.vocab_base() + specials.len() {
        return Err(ModelError::Config {
            field: "vocab_size",
            problem: format!(
                "{} cannot hold 256 bytes, {} merges and {} specials",
                spec.vocab,
                MERGES.len(),
                specials.len()
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
    let (bos, eos) = spec.family.bos_eos();
    let (template, own_file) = spec.family.template();
    let mut config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_position_embeddings,
        "bos_token": bos,
        "eos_token": eos,
    });
    if own_file {
        let path = dir.join(tidelock_prompt::hf::CHAT_TEMPLATE_FILE);
        std::fs::write(&path, template).map_err(|e| write_error(&path, e))?;
    } else {
        config["chat_template"] = template.into();
    }
    write_json(&dir.join(hf::TOKENIZER_CONFIG), &config)?;
    let ends: Vec<u32> = spec
        .family
        .generation_eos()
        .iter()
        .filter_map(|token| spec.special_id(token))
        .collect();
    if ends.is_empty() {
        return Ok(());
    }
    write_json(
        &dir.join(hf::GENERATION_CONFIG),
        &serde_json::json!({
            "bos_token_id": spec.special_id(bos),
            "eos_token_id": ends,
            "do_sample": true,
            "temperature": 0.6,
            "top_p": 0.9,
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
    let own = spec.family.specials();
    let reserved =
        (spec.vocab_base() + own.len()..spec.vocab).map(|id| format!("<|reserved_{id}|>"));
    let specials = own.iter().map(|s| (*s).to_owned()).chain(reserved);
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
