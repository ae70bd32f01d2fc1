//! [`PromptKit`]: one model's tokenizer, chat template and special tokens, in one value that the
//! worker builds from its model files and serves as JSON, and the router rebuilds from that JSON.
//!
//! Tidelock's prefix cache keys KV blocks by token ids, so the router (which hashes blocks to pick
//! a worker) and the worker (which stores them) must turn a conversation into the same ids. The
//! way to guarantee that is to have exactly one definition of the tokenizer and template: the
//! worker's, shipped verbatim at `GET /v1/tokenizer` as
//! `{"tokenizer": <tokenizer.json>, "chat_template": ..., "bos_token": ..., "eos_token": ...,
//! "stop_token_ids": [...]}` ([`PromptKitJson`]).
//!
//! Invariants:
//! - `PromptKit::from_json(kit.to_json()?)` encodes, decodes and renders exactly like `kit`.
//! - `bos_token` / `eos_token`, when set, are tokens of the vocabulary; every stop id is in range.
//! - Stop ids: EOS, then each end-of-turn marker ([`END_OF_TURN_MARKERS`]) that the chat template
//!   itself writes and the vocabulary has (`<|im_end|>` for ChatML), without duplicates, in that
//!   order. A kit rebuilt from JSON keeps the served list as is: the worker is the authority.
//! - Chat prompts are encoded without adding BOS/EOS: templates write their own special tokens
//!   (as `transformers` and vLLM do).

use std::fmt;

use aho_corasick::AhoCorasick;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::PromptError;
use crate::chunked::{self, CHUNK_BYTES, Chunking};
use crate::detok::IncrementalDetokenizer;
use crate::rendered::{self, RenderedChat};
use crate::template::{ChatMessage, ChatTemplate, RenderOptions};
use crate::tools::ToolStyle;
use crate::vocab::GgufVocab;

/// Tokens that end an assistant turn in common chat formats. One becomes a stop id when the
/// model's template writes it.
pub const END_OF_TURN_MARKERS: [&str; 5] = [
    "<|im_end|>",    // ChatML (Qwen, SmolLM, Hermes)
    "<|eot_id|>",    // Llama 3
    "<|eom_id|>",    // Llama 3.1 tool calls
    "<|end|>",       // Phi-3
    "<end_of_turn>", // Gemma
];

/// A special token: its text and its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialToken {
    /// The token as it appears in text (`<|im_end|>`).
    pub text: String,
    /// Its id.
    pub id: u32,
}

/// The sampling a model is served with when a request leaves a parameter out (a request's own
/// value always wins): from the model's `generation_config.json`, the worker's flags, or what its
/// model card recommends. Empty: OpenAI's defaults (temperature 1, top_p 1, no top-k).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingDefaults {
    /// Softmax temperature in `[0, 2]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus mass in `(0, 1]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Keep the `k` most likely tokens, at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
}

/// A default sampling value out of range.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum SamplingDefaultsError {
    /// Outside `[0, 2]`.
    #[error("default temperature {0} is outside [0, 2]")]
    Temperature(f32),
    /// Outside `(0, 1]`.
    #[error("default top_p {0} is outside (0, 1]")]
    TopP(f32),
    /// Zero.
    #[error("default top_k must be at least 1")]
    TopK,
}

impl SamplingDefaults {
    /// No default set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Checks the ranges (the same a request's values must meet).
    pub fn validate(&self) -> Result<(), SamplingDefaultsError> {
        if let Some(t) = self.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
            return Err(SamplingDefaultsError::Temperature(t));
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err(SamplingDefaultsError::TopP(p));
        }
        if self.top_k == Some(0) {
            return Err(SamplingDefaultsError::TopK);
        }
        Ok(())
    }

    /// As a model card shows them (`/v1/models`); `None` when OpenAI's defaults apply.
    pub fn shown(&self) -> Option<serde_json::Value> {
        if self.is_empty() {
            return None;
        }
        // An f32 widened to f64 shows its binary error (0.2 -> 0.20000000298...): its shortest
        // decimal form, read as f64, shows what was set.
        let decimal = |x: f32| x.to_string().parse::<f64>().ok();
        let mut shown = serde_json::Map::new();
        let fields = [
            ("temperature", self.temperature.and_then(decimal)),
            ("top_p", self.top_p.and_then(decimal)),
        ];
        for (name, value) in fields {
            if let Some(number) = value.and_then(serde_json::Number::from_f64) {
                shown.insert(name.into(), number.into());
            }
        }
        if let Some(k) = self.top_k {
            shown.insert("top_k".into(), k.into());
        }
        Some(shown.into())
    }

    /// `self`, with what it leaves unset taken from `fallback`.
    pub fn or(self, fallback: SamplingDefaults) -> SamplingDefaults {
        SamplingDefaults {
            temperature: self.temperature.or(fallback.temperature),
            top_p: self.top_p.or(fallback.top_p),
            top_k: self.top_k.or(fallback.top_k),
        }
    }
}

/// The JSON a worker serves at `GET /v1/tokenizer`. Unknown fields are ignored so that a newer
/// worker can add some.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptKitJson {
    /// A complete Hugging Face `tokenizer.json` document.
    pub tokenizer: serde_json::Value,
    /// The Jinja chat template, if the model has one.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// BOS token text.
    #[serde(default)]
    pub bos_token: Option<String>,
    /// EOS token text.
    #[serde(default)]
    pub eos_token: Option<String>,
    /// Ids that end generation.
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    /// The model's default sampling (routers apply it as the worker does).
    #[serde(default, skip_serializing_if = "SamplingDefaults::is_empty")]
    pub sampling_defaults: SamplingDefaults,
}

/// What a kit is made of; [`PromptKit::new`] checks it.
#[derive(Debug, Clone)]
pub struct KitParts {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The Jinja chat template source.
    pub chat_template: Option<String>,
    /// BOS token text (must be in the vocabulary).
    pub bos_token: Option<String>,
    /// EOS token text (must be in the vocabulary).
    pub eos_token: Option<String>,
    /// `None` derives the stop ids (see the module docs); `Some` takes them as given.
    pub stop_token_ids: Option<Vec<u32>>,
}

/// A model's tokenizer, chat template and special tokens. `Send + Sync`; share it behind an `Arc`.
#[derive(Clone)]
pub struct PromptKit {
    tokenizer: Tokenizer,
    /// The same tokenizer with special-token text encoded as plain text (for text users wrote).
    plain: Tokenizer,
    /// Finds any special token's text (what user text must not turn into control ids) in one
    /// pass: contents are scanned on every chat request.
    control_texts: AhoCorasick,
    chat_template: Option<ChatTemplate>,
    /// How the template's family writes tool calls, read from it once.
    tool_style: ToolStyle,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    stop_token_ids: Vec<u32>,
    warnings: Vec<String>,
    /// How long texts are encoded in pieces (`None`: always whole; see [`crate::chunked`]).
    chunking: Option<Chunking>,
    /// Ids, added tokens included: counted once (the tokenizer counts its added tokens on
    /// every call, and a completion's prompt ids are each checked against it).
    vocab_size: usize,
    /// What a request that leaves sampling parameters out gets.
    sampling_defaults: SamplingDefaults,
}

impl fmt::Debug for PromptKit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The tokenizer's own Debug prints the whole vocabulary.
        f.debug_struct("PromptKit")
            .field("vocab_size", &self.vocab_size())
            .field("chat_template", &self.chat_template.is_some())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("stop_token_ids", &self.stop_token_ids)
            .finish_non_exhaustive()
    }
}

impl PromptKit {
    /// Checks and assembles the parts.
    pub fn new(parts: KitParts) -> Result<Self, PromptError> {
        let KitParts {
            tokenizer,
            chat_template,
            bos_token,
            eos_token,
            stop_token_ids,
        } = parts;
        let special = |field: &'static str, text: Option<String>| {
            text.map(|text| match tokenizer.token_to_id(&text) {
                Some(id) => Ok(SpecialToken { text, id }),
                None => Err(PromptError::UnknownToken { field, token: text }),
            })
            .transpose()
        };
        let bos = special("bos_token", bos_token)?;
        let eos = special("eos_token", eos_token)?;
        let chat_template = chat_template.map(ChatTemplate::new).transpose()?;
        let stop_token_ids = match stop_token_ids {
            Some(ids) => ids,
            None => derive_stop_ids(&tokenizer, eos.as_ref(), chat_template.as_ref()),
        };
        let vocab_size = tokenizer.get_vocab_size(true);
        if let Some(&id) = stop_token_ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(PromptError::StopIdOutOfRange { id, vocab_size });
        }
        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);
        let chunking = Chunking::of(&tokenizer);
        let control_texts = AhoCorasick::new(
            tokenizer
                .get_added_tokens_decoder()
                .into_values()
                .filter(|t| t.special && !t.content.is_empty())
                .map(|t| t.content),
        )
        .map_err(|e| PromptError::ControlTexts(e.to_string()))?;
        Ok(Self {
            tokenizer,
            plain,
            control_texts,
            tool_style: ToolStyle::of(chat_template.as_ref()),
            chat_template,
            bos,
            eos,
            stop_token_ids,
            warnings: Vec::new(),
            chunking,
            vocab_size,
            sampling_defaults: SamplingDefaults::default(),
        })
    }

    /// Builds a kit from a GGUF vocabulary; its warnings are kept in [`PromptKit::warnings`].
    pub fn from_vocab(vocab: &GgufVocab) -> Result<Self, PromptError> {
        let text = |id: Option<u32>| id.and_then(|id| vocab.token(id)).map(str::to_owned);
        let mut kit = Self::new(KitParts {
            tokenizer: vocab.to_tokenizer()?,
            chat_template: vocab.chat_template.clone(),
            bos_token: text(vocab.bos),
            eos_token: text(vocab.eos),
            stop_token_ids: None,
        })?;
        kit.warnings = vocab.warnings();
        Ok(kit)
    }

    /// Reads a GGUF file's tokenizer metadata and builds a kit from it.
    #[cfg(feature = "gguf")]
    pub fn from_gguf_file(path: &std::path::Path) -> Result<Self, PromptError> {
        Self::from_vocab(&GgufVocab::from_gguf_file(path)?)
    }

    /// The serialisable form (what `GET /v1/tokenizer` serves).
    pub fn to_json_value(&self) -> Result<PromptKitJson, PromptError> {
        Ok(PromptKitJson {
            tokenizer: serde_json::to_value(&self.tokenizer).map_err(|source| {
                PromptError::Json {
                    field: "tokenizer",
                    source,
                }
            })?,
            chat_template: self.chat_template.as_ref().map(|t| t.source().to_owned()),
            bos_token: self.bos.as_ref().map(|t| t.text.clone()),
            eos_token: self.eos.as_ref().map(|t| t.text.clone()),
            stop_token_ids: self.stop_token_ids.clone(),
            sampling_defaults: self.sampling_defaults,
        })
    }

    /// The serialisable form as a JSON document.
    pub fn to_json(&self) -> Result<String, PromptError> {
        serde_json::to_string(&self.to_json_value()?).map_err(|source| PromptError::Json {
            field: "(document)",
            source,
        })
    }

    /// Rebuilds a kit from its serialisable form.
    pub fn from_json_value(json: PromptKitJson) -> Result<Self, PromptError> {
        let tokenizer: Tokenizer =
            serde_json::from_value(json.tokenizer).map_err(|source| PromptError::Json {
                field: "tokenizer",
                source,
            })?;
        json.sampling_defaults.validate()?;
        Ok(Self::new(KitParts {
            tokenizer,
            chat_template: json.chat_template,
            bos_token: json.bos_token,
            eos_token: json.eos_token,
            stop_token_ids: Some(json.stop_token_ids),
        })?
        .with_sampling_defaults(json.sampling_defaults))
    }

    /// The kit with `ids` ending generation too (after its own stop ids, without duplicates),
    /// such as a `generation_config.json`'s end tokens. An id outside the vocabulary is an
    /// error.
    pub fn with_stop_ids(mut self, ids: &[u32]) -> Result<Self, PromptError> {
        for &id in ids {
            if id as usize >= self.vocab_size {
                return Err(PromptError::StopIdOutOfRange {
                    id,
                    vocab_size: self.vocab_size,
                });
            }
            if !self.stop_token_ids.contains(&id) {
                self.stop_token_ids.push(id);
            }
        }
        Ok(self)
    }

    /// The kit with `defaults` as its model's default sampling (checked by the caller:
    /// [`SamplingDefaults::validate`]).
    pub fn with_sampling_defaults(mut self, defaults: SamplingDefaults) -> Self {
        self.sampling_defaults = defaults;
        self
    }

    /// The model's default sampling, for parameters a request leaves out.
    pub fn sampling_defaults(&self) -> SamplingDefaults {
        self.sampling_defaults
    }

    /// Rebuilds a kit from a JSON document made by [`PromptKit::to_json`].
    pub fn from_json(json: &str) -> Result<Self, PromptError> {
        let doc: PromptKitJson =
            serde_json::from_str(json).map_err(|source| PromptError::Json {
                field: "(document)",
                source,
            })?;
        Self::from_json_value(doc)
    }

    /// Text to ids. `add_special` adds what the tokenizer's post-processor adds (BOS when the
    /// model asks for it); special-token text such as `<|im_start|>` is always one id.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, PromptError> {
        self.encode_within(false, text, add_special, usize::MAX)
    }

    /// Text a user wrote to ids: special-token text such as `<|im_start|>` stays text (several
    /// ordinary ids), so it can never become a control token. `add_special` as in
    /// [`PromptKit::encode`].
    pub fn encode_plain(&self, text: &str, add_special: bool) -> Result<Vec<u32>, PromptError> {
        self.encode_within(true, text, add_special, usize::MAX)
    }

    /// [`PromptKit::encode`] (`plain` false) or [`PromptKit::encode_plain`], in pieces when the
    /// text is long ([`crate::chunked`]: the same ids, a piece's memory), stopping with
    /// [`PromptError::TooManyTokens`] once more than `limit` ids are made. A text encoded whole
    /// is returned whole, however many ids it has.
    fn encode_within(
        &self,
        plain: bool,
        text: &str,
        add_special: bool,
        limit: usize,
    ) -> Result<Vec<u32>, PromptError> {
        let (tokenizer, specials) = if plain {
            (&self.plain, None)
        } else {
            (&self.tokenizer, Some(&self.control_texts))
        };
        match &self.chunking {
            Some(chunking) if text.len() > CHUNK_BYTES => {
                chunking.encode(tokenizer, specials, text, (add_special, limit), CHUNK_BYTES)
            }
            // Encoded whole: the caller counts the ids.
            _ => chunked::encode(tokenizer, text, add_special),
        }
    }

    /// [`PromptKit::encode`] (`plain` false) or [`PromptKit::encode_plain`] in pieces of about
    /// `piece_bytes` whatever the text's length, or `None` when this tokenizer is always encoded
    /// whole: for tests that the pieces give the ids of the whole, at any cut.
    pub fn encode_in_pieces(
        &self,
        plain: bool,
        text: &str,
        add_special: bool,
        piece_bytes: usize,
    ) -> Option<Result<Vec<u32>, PromptError>> {
        let (tokenizer, specials) = if plain {
            (&self.plain, None)
        } else {
            (&self.tokenizer, Some(&self.control_texts))
        };
        let chunking = self.chunking.as_ref()?;
        Some(chunking.encode(
            tokenizer,
            specials,
            text,
            (add_special, usize::MAX),
            piece_bytes,
        ))
    }

    /// Whether long texts are encoded in pieces (see [`crate::chunked`]), with BOS and the like
    /// added (`add_special`, a completion prompt) or not (a chat's rendering).
    pub fn encodes_in_pieces(&self, add_special: bool) -> bool {
        self.chunking
            .as_ref()
            .is_some_and(|c| c.in_pieces(add_special))
    }

    /// The first special token's text that `text` contains.
    pub fn control_text_in<'t>(&self, text: &'t str) -> Option<&'t str> {
        self.control_texts
            .find(text)
            .map(|m| &text[m.start()..m.end()])
    }

    /// `chat.text()[from..]` to ids: the template's text with its control tokens, the users'
    /// text with special-token text as plain text (`crate::rendered`). No BOS/EOS is added
    /// beyond the template's, except with `add_special` (a completion prompt).
    pub fn encode_rendered(
        &self,
        chat: &RenderedChat,
        from: usize,
        add_special: bool,
    ) -> Result<Vec<u32>, PromptError> {
        self.encode_rendered_within(chat, from, add_special, usize::MAX)
    }

    /// [`PromptKit::encode_rendered`], giving up with [`PromptError::TooManyTokens`] as soon
    /// as more than `limit` ids are made when the text is encoded in pieces (before the rest of
    /// it is read); a text encoded whole comes back whole, for the caller to count.
    pub fn encode_rendered_within(
        &self,
        chat: &RenderedChat,
        from: usize,
        add_special: bool,
        limit: usize,
    ) -> Result<Vec<u32>, PromptError> {
        self.encode_rendered_between(chat, from..chat.text().len(), add_special, limit)
    }

    /// [`PromptKit::encode_rendered_within`] of `chat.text()[range]`: the ids that encoding the
    /// chat cut at `range.end` would give from `range.start` (a session's earlier prompt,
    /// within the conversation that grew from it). Panics if the range is not within the text
    /// on character boundaries.
    pub fn encode_rendered_between(
        &self,
        chat: &RenderedChat,
        range: std::ops::Range<usize>,
        add_special: bool,
        limit: usize,
    ) -> Result<Vec<u32>, PromptError> {
        let text = &chat.text()[range.clone()];
        let pieces = chat.pieces_between(range.start, range.end);
        if !pieces
            .iter()
            .any(|(piece, user)| *user && self.control_text_in(piece).is_some())
        {
            // Nothing a user wrote looks like a control token: one text, as always.
            return self.encode_within(false, text, add_special, limit);
        }
        let mut ids = Vec::new();
        for (i, (piece, user)) in pieces.into_iter().enumerate() {
            let special = add_special && i == 0;
            let left = limit.saturating_sub(ids.len());
            ids.extend(
                self.encode_within(user, piece, special, left)
                    .map_err(|e| e.after(ids.len(), limit))?,
            );
        }
        Ok(ids)
    }

    /// Ids to text; `skip_special` drops control tokens such as `<|im_end|>`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, PromptError> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|source| PromptError::Tokenizer {
                op: "decode",
                source,
            })
    }

    /// Renders a conversation with the model's template and special tokens.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, PromptError> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or(PromptError::NoChatTemplate)?;
        let opts = RenderOptions {
            add_generation_prompt,
            bos_token: self
                .bos
                .as_ref()
                .map(|t| t.text.clone())
                .unwrap_or_default(),
            eos_token: self
                .eos
                .as_ref()
                .map(|t| t.text.clone())
                .unwrap_or_default(),
            extra: extra.clone(),
        };
        Ok(template.render(messages, &opts)?)
    }

    /// Renders a conversation, knowing which ranges of the text users wrote (`crate::rendered`):
    /// its messages' contents, and every string of their names, tool calls and tool call ids and
    /// of `extra` (the request's tools) that holds control-token text. A rendering with no
    /// control-token text in any of them needs no ranges: it is the plain
    /// [`PromptKit::render_chat`].
    pub fn render_chat_guarded(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<RenderedChat, PromptError> {
        fn fields<'m>(kit: &PromptKit, m: &'m ChatMessage) -> Option<&'m str> {
            m.name
                .as_deref()
                .and_then(|n| kit.control_text_in(n))
                .or_else(|| {
                    m.tool_call_id
                        .as_deref()
                        .and_then(|i| kit.control_text_in(i))
                })
                .or_else(|| {
                    m.tool_calls
                        .as_ref()
                        .and_then(|c| kit.control_text_in_json(c))
                })
        }
        let in_messages = messages
            .iter()
            .find_map(|m| self.control_text_in(&m.content).or_else(|| fields(self, m)));
        let Some(token) =
            in_messages.or_else(|| extra.values().find_map(|v| self.control_text_in_json(v)))
        else {
            return Ok(RenderedChat::template_only(self.render_chat(
                messages,
                add_generation_prompt,
                extra,
            )?));
        };
        let guard = |mark: bool| -> (Vec<ChatMessage>, serde_json::Map<String, serde_json::Value>) {
            let field = |s: &str| self.guard_string(s, mark);
            let messages = messages
                .iter()
                .map(|m| ChatMessage {
                    role: m.role.clone(),
                    content: match mark {
                        true => rendered::marked(&rendered::unmarked(&m.content)),
                        false => rendered::unmarked(&m.content),
                    },
                    name: m.name.as_deref().map(field),
                    tool_calls: m.tool_calls.as_ref().map(|c| self.guard_json(c, mark)),
                    tool_call_id: m.tool_call_id.as_deref().map(field),
                })
                .collect();
            let extra = extra
                .iter()
                .map(|(k, v)| (k.clone(), self.guard_json(v, mark)))
                .collect();
            (messages, extra)
        };
        let (plain_messages, plain_extra) = guard(false);
        let plain = self.render_chat(&plain_messages, add_generation_prompt, &plain_extra)?;
        let (marked_messages, marked_extra) = guard(true);
        let marked = self.render_chat(&marked_messages, add_generation_prompt, &marked_extra)?;
        match rendered::strip(&marked) {
            Some((text, ranges)) if text == plain => Ok(RenderedChat::with_ranges(text, ranges)),
            _ => Err(PromptError::ControlTextInContent {
                token: token.to_owned(),
                in_extra: in_messages.is_none(),
            }),
        }
    }

    /// The first special token's text in any string (or key) of `value`.
    fn control_text_in_json<'v>(&self, value: &'v serde_json::Value) -> Option<&'v str> {
        use serde_json::Value;
        match value {
            Value::String(s) => self.control_text_in(s),
            Value::Array(items) => items.iter().find_map(|v| self.control_text_in_json(v)),
            Value::Object(map) => map.iter().find_map(|(k, v)| {
                self.control_text_in(k)
                    .or_else(|| self.control_text_in_json(v))
            }),
            _ => None,
        }
    }

    /// A string field users wrote, with the markers removed; with `mark`, wrapped in them when
    /// it holds control-token text. (Strings without such text are left whole, so a template
    /// that compares them, `tool.type == "function"`, still sees what was sent.)
    fn guard_string(&self, s: &str, mark: bool) -> String {
        let s = rendered::unmarked(s);
        match mark && self.control_text_in(&s).is_some() {
            true => rendered::marked(&s),
            false => s,
        }
    }

    /// [`PromptKit::guard_string`] for every string and key of `value`.
    fn guard_json(&self, value: &serde_json::Value, mark: bool) -> serde_json::Value {
        use serde_json::Value;
        match value {
            Value::String(s) => Value::String(self.guard_string(s, mark)),
            Value::Array(items) => {
                Value::Array(items.iter().map(|v| self.guard_json(v, mark)).collect())
            }
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (self.guard_string(k, mark), self.guard_json(v, mark)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// Renders a conversation and encodes it, without adding special tokens beyond the
    /// template's; control-token text in contents stays text.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Vec<u32>, PromptError> {
        let chat = self.render_chat_guarded(messages, add_generation_prompt, extra)?;
        self.encode_rendered(&chat, 0, false)
    }

    /// A streaming detokenizer for this kit's tokenizer (pass [`PromptKit::tokenizer`] to it).
    pub fn detokenizer(&self, skip_special: bool) -> IncrementalDetokenizer {
        IncrementalDetokenizer::new(skip_special)
    }

    /// The underlying tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The compiled chat template, if any.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// How the chat template's family writes tool calls ([`ToolStyle::of`]).
    pub fn tool_style(&self) -> ToolStyle {
        self.tool_style
    }

    /// The BOS token.
    pub fn bos(&self) -> Option<&SpecialToken> {
        self.bos.as_ref()
    }

    /// The EOS token.
    pub fn eos(&self) -> Option<&SpecialToken> {
        self.eos.as_ref()
    }

    /// Ids that end generation.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_token_ids
    }

    /// Messages to log from building the kit (for example an unknown pre-tokenizer).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of a token's text.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The text of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }
}

fn derive_stop_ids(
    tokenizer: &Tokenizer,
    eos: Option<&SpecialToken>,
    template: Option<&ChatTemplate>,
) -> Vec<u32> {
    let mut ids: Vec<u32> = eos.map(|t| t.id).into_iter().collect();
    let source = template.map_or("", ChatTemplate::source);
    let markers = END_OF_TURN_MARKERS
        .iter()
        .filter(|marker| source.contains(*marker))
        .filter_map(|marker| tokenizer.token_to_id(marker));
    for id in markers {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::tests::tiny_vocab;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    fn kit() -> PromptKit {
        let mut vocab = tiny_vocab();
        vocab.chat_template = Some(CHATML.into());
        vocab.eos = None;
        PromptKit::from_vocab(&vocab).expect("kit")
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<PromptKit>();
    }

    #[test]
    fn chatml_template_adds_im_end_as_a_stop() {
        let kit = kit();
        assert_eq!(kit.stop_token_ids(), [1]);
        assert_eq!(kit.bos().map(|t| t.text.as_str()), Some("<|im_start|>"));
        let mut vocab = tiny_vocab();
        vocab.eos = Some(1);
        vocab.chat_template = Some(CHATML.into());
        let with_eos = PromptKit::from_vocab(&vocab).expect("kit");
        assert_eq!(with_eos.stop_token_ids(), [1], "no duplicates");
    }

    #[test]
    fn encode_chat_uses_one_id_per_control_token() {
        let kit = kit();
        let ids = kit
            .encode_chat(
                &[ChatMessage::new("user", "hello")],
                true,
                &Default::default(),
            )
            .expect("encode");
        let tokens: Vec<String> = ids.iter().filter_map(|&id| kit.id_to_token(id)).collect();
        assert_eq!(tokens.first().map(String::as_str), Some("<|im_start|>"));
        assert_eq!(tokens.iter().filter(|t| *t == "<|im_end|>").count(), 1);
        assert_eq!(
            kit.decode(&ids, true).expect("decode"),
            "user\nhello\nassistant\n"
        );
    }

    #[test]
    fn json_round_trip() {
        let kit = kit();
        let back = PromptKit::from_json(&kit.to_json().expect("to_json")).expect("from_json");
        assert_eq!(back.stop_token_ids(), kit.stop_token_ids());
        assert_eq!(back.bos(), kit.bos());
        for text in ["hello wo", "<|im_start|>x<|im_end|>", "é 世"] {
            assert_eq!(
                back.encode(text, true).ok(),
                kit.encode(text, true).ok(),
                "{text}"
            );
        }
    }

    #[test]
    fn from_json_names_what_is_wrong() {
        let mut doc = kit().to_json_value().expect("json");
        doc.stop_token_ids = vec![9_999_999];
        let err = PromptKit::from_json_value(doc.clone()).expect_err("stop id");
        assert!(matches!(
            err,
            PromptError::StopIdOutOfRange { id: 9_999_999, .. }
        ));

        doc.stop_token_ids = vec![];
        doc.eos_token = Some("<|nope|>".into());
        let err = PromptKit::from_json_value(doc.clone()).expect_err("eos");
        assert!(err.to_string().contains("eos_token"), "{err}");

        doc.tokenizer = serde_json::json!({"model": 3});
        let err = PromptKit::from_json_value(doc).expect_err("tokenizer");
        assert!(err.to_string().contains("`tokenizer`"), "{err}");

        assert!(matches!(
            PromptKit::from_json("not json"),
            Err(PromptError::Json { .. })
        ));
    }

    #[test]
    fn no_template_is_a_typed_error() {
        let kit = PromptKit::from_vocab(&tiny_vocab()).expect("kit");
        assert!(matches!(
            kit.render_chat(&[], true, &Default::default()),
            Err(PromptError::NoChatTemplate)
        ));
    }
}
