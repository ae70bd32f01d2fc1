//! A GGUF file's tokenizer metadata as plain data, and the `tokenizers::Tokenizer` it describes.
//!
//! GGUF files (llama.cpp's format, and what the worker loads) carry no `tokenizer.json`: the
//! vocabulary, merges, token types and special ids are stored as `tokenizer.ggml.*` metadata keys.
//! [`GgufVocab`] holds exactly those keys, so it can be read from a GGUF (feature `gguf`), written
//! as JSON, or built by hand in tests; [`GgufVocab::to_tokenizer`] turns it into a byte-level BPE
//! tokenizer that cuts text the way llama.cpp does for the same file.
//!
//! Invariants:
//! - Only `tokenizer.ggml.model = "gpt2"` (byte-level BPE) is supported; anything else is a typed
//!   [`VocabError::Unsupported`], never a silently wrong tokenizer.
//! - Token id `i` of the tokenizer is `tokens[i]`, always: ids are never renumbered.
//! - Control tokens (type 3) and the unknown token (type 2) become special added tokens and
//!   user-defined tokens (type 4) plain added tokens, so `<|im_start|>` in a rendered prompt encodes
//!   as one id, as with llama.cpp's `parse_special`.
//! - No token is added around the text unless `add_bos` / `add_eos` say so.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::pretok::PreTokenizerSpec;

/// llama.cpp's token types (`llama_token_type`), as stored in `tokenizer.ggml.token_type`.
pub mod token_type {
    /// An ordinary vocabulary entry.
    pub const NORMAL: i32 = 1;
    /// The unknown token.
    pub const UNKNOWN: i32 = 2;
    /// A control token such as `<|im_start|>`: matched in text, skipped when decoding for humans.
    pub const CONTROL: i32 = 3;
    /// A user-defined token: always matched in text, decoded like ordinary text.
    pub const USER_DEFINED: i32 = 4;
    /// A reserved, unused slot.
    pub const UNUSED: i32 = 5;
    /// A raw byte token (`<0x0A>`), used by SentencePiece vocabularies.
    pub const BYTE: i32 = 6;
}

/// Metadata keys, named once so that errors quote the exact key.
pub mod keys {
    /// `tokenizer.ggml.model`
    pub const MODEL: &str = "tokenizer.ggml.model";
    /// `tokenizer.ggml.pre`
    pub const PRE: &str = "tokenizer.ggml.pre";
    /// `tokenizer.ggml.tokens`
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    /// `tokenizer.ggml.token_type`
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    /// `tokenizer.ggml.merges`
    pub const MERGES: &str = "tokenizer.ggml.merges";
    /// `tokenizer.ggml.bos_token_id`
    pub const BOS: &str = "tokenizer.ggml.bos_token_id";
    /// `tokenizer.ggml.eos_token_id`
    pub const EOS: &str = "tokenizer.ggml.eos_token_id";
    /// `tokenizer.ggml.unknown_token_id` (what llama.cpp writes)
    pub const UNK: &str = "tokenizer.ggml.unknown_token_id";
    /// `tokenizer.ggml.unk_token_id` (what some other converters write)
    pub const UNK_ALT: &str = "tokenizer.ggml.unk_token_id";
    /// `tokenizer.ggml.padding_token_id`
    pub const PAD: &str = "tokenizer.ggml.padding_token_id";
    /// `tokenizer.ggml.add_bos_token`
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    /// `tokenizer.ggml.add_eos_token`
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    /// `tokenizer.chat_template`
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

/// Why a vocabulary could not be read or turned into a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum VocabError {
    /// A key the tokenizer cannot do without is absent.
    #[error("GGUF metadata key `{key}` is missing")]
    MissingKey {
        /// The metadata key.
        key: &'static str,
    },
    /// A key holds a value of the wrong type.
    #[error("GGUF metadata key `{key}` should be {expected}, found {found}")]
    WrongType {
        /// The metadata key.
        key: &'static str,
        /// What we can read.
        expected: &'static str,
        /// What the file has.
        found: String,
    },
    /// The tokenizer model is not byte-level BPE.
    #[error(
        "tokenizer model `{model}` (`tokenizer.ggml.model`) is not supported; only `gpt2` (byte-level BPE) is"
    )]
    Unsupported {
        /// The `tokenizer.ggml.model` value.
        model: String,
    },
    /// `token_type` and `tokens` disagree in length.
    #[error(
        "`tokenizer.ggml.token_type` has {types} entries but `tokenizer.ggml.tokens` has {tokens}"
    )]
    TokenTypeCount {
        /// Number of tokens.
        tokens: usize,
        /// Number of token types.
        types: usize,
    },
    /// A special token id points outside the vocabulary.
    #[error("`{key}` = {id} is outside the vocabulary of {vocab_size} tokens")]
    IdOutOfRange {
        /// The metadata key.
        key: &'static str,
        /// The id found.
        id: u32,
        /// Number of tokens.
        vocab_size: usize,
    },
    /// The vocabulary does not fit in 32-bit token ids.
    #[error("`tokenizer.ggml.tokens` has {0} entries, more than 32-bit token ids can address")]
    TooManyTokens(usize),
    /// A merge rule is not two space-separated tokens.
    #[error("`tokenizer.ggml.merges` entry {index} (`{merge}`) is not two space-separated tokens")]
    BadMerge {
        /// Position in the merges list.
        index: usize,
        /// The entry.
        merge: String,
    },
    /// The `tokenizers` crate refused a part (for example a merge naming an unknown token).
    #[error("building the tokenizer's {part} failed: {source}")]
    Build {
        /// Which part: "BPE model", "pre-tokenizer", "added tokens", "post-processor".
        part: &'static str,
        /// The cause.
        #[source]
        source: tokenizers::Error,
    },
    /// The GGUF file could not be opened.
    #[cfg(feature = "gguf")]
    #[error("cannot open GGUF file {path}: {source}", path = path.display())]
    Open {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The GGUF file's header or metadata could not be parsed.
    #[cfg(feature = "gguf")]
    #[error("cannot read GGUF metadata from {path}: {source}", path = path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: candle_core::Error,
    },
}

/// The tokenizer half of a GGUF file's metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` is byte-level BPE, the only model supported.
    pub model: String,
    /// `tokenizer.ggml.pre`: llama.cpp's pre-tokenizer name (`smollm`, `llama3`, `qwen2`, ...).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: token `i` has id `i`, in byte-level spelling (`Ġ` for a space).
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`, see [`token_type`]; empty means all normal.
    #[serde(default)]
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.merges`: `"a b"` merges `a` and `b`, highest priority first.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`
    pub eos: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id` (or `unk_token_id`)
    pub unk: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`
    pub pad: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`: prepend BOS when encoding with special tokens.
    #[serde(default)]
    pub add_bos: bool,
    /// `tokenizer.ggml.add_eos_token`: append EOS when encoding with special tokens.
    #[serde(default)]
    pub add_eos: bool,
    /// `tokenizer.chat_template`: the Hugging Face Jinja chat template.
    pub chat_template: Option<String>,
}

impl GgufVocab {
    /// The pre-tokenizer this vocabulary's `pre` selects.
    pub fn pre_tokenizer_spec(&self) -> PreTokenizerSpec {
        PreTokenizerSpec::for_pre(self.pre.as_deref())
    }

    /// Things the caller should log: currently only a missing or unknown `pre`.
    pub fn warnings(&self) -> Vec<String> {
        self.pre_tokenizer_spec().warning.into_iter().collect()
    }

    /// The text of token `id`, if it exists.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Builds the byte-level BPE tokenizer this vocabulary describes (see the module docs for
    /// what is guaranteed). Warnings about the pre-tokenizer are in [`GgufVocab::warnings`].
    pub fn to_tokenizer(&self) -> Result<Tokenizer, VocabError> {
        if self.model != "gpt2" {
            return Err(VocabError::Unsupported {
                model: self.model.clone(),
            });
        }
        self.validate()?;
        let spec = self.pre_tokenizer_spec();

        let vocab: Vocab = self
            .tokens
            .iter()
            .enumerate()
            .map(|(id, token)| (token.clone(), id as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, self.parsed_merges()?)
            .ignore_merges(spec.ignore_merges)
            .build()
            .map_err(|source| VocabError::Build {
                part: "BPE model",
                source,
            })?;

        let mut tokenizer = Tokenizer::new(bpe);
        if let Some(normalizer) = spec.normalizer() {
            tokenizer
                .with_normalizer(Some(normalizer))
                .map_err(|source| VocabError::Build {
                    part: "normalizer",
                    source,
                })?;
        }
        let pre_tokenizer = spec.pre_tokenizer().map_err(|source| VocabError::Build {
            part: "pre-tokenizer",
            source,
        })?;
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        if let Some(post) = self.post_processor()? {
            tokenizer.with_post_processor(Some(post));
        }

        let (special, plain) = self.added_tokens();
        let added = |result: tokenizers::Result<usize>| {
            result.map_err(|source| VocabError::Build {
                part: "added tokens",
                source,
            })
        };
        added(tokenizer.add_special_tokens(special))?;
        added(tokenizer.add_tokens(plain))?;
        Ok(tokenizer)
    }

    fn validate(&self) -> Result<(), VocabError> {
        let n = self.tokens.len();
        if u32::try_from(n).is_err() {
            return Err(VocabError::TooManyTokens(n));
        }
        if !self.token_types.is_empty() && self.token_types.len() != n {
            return Err(VocabError::TokenTypeCount {
                tokens: n,
                types: self.token_types.len(),
            });
        }
        let ids = [
            (keys::BOS, self.bos),
            (keys::EOS, self.eos),
            (keys::UNK, self.unk),
            (keys::PAD, self.pad),
        ];
        for (key, id) in ids {
            if let Some(id) = id.filter(|&id| id as usize >= n) {
                return Err(VocabError::IdOutOfRange {
                    key,
                    id,
                    vocab_size: n,
                });
            }
        }
        Ok(())
    }

    /// Splits each merge at its first space after the first character, as llama.cpp does (so a
    /// merge whose left side is itself a space still parses).
    fn parsed_merges(&self) -> Result<Merges, VocabError> {
        self.merges
            .iter()
            .enumerate()
            .map(|(index, merge)| {
                let bad = || VocabError::BadMerge {
                    index,
                    merge: merge.clone(),
                };
                let first_len = merge.chars().next().ok_or_else(bad)?.len_utf8();
                let space = merge[first_len..].find(' ').ok_or_else(bad)? + first_len;
                let (left, right) = (&merge[..space], &merge[space + 1..]);
                if right.is_empty() {
                    return Err(bad());
                }
                Ok((left.to_owned(), right.to_owned()))
            })
            .collect()
    }

    /// Control and unknown tokens (special), user-defined tokens (plain), in id order, each once.
    fn added_tokens(&self) -> (Vec<AddedToken>, Vec<AddedToken>) {
        let mut seen = HashSet::new();
        let (mut special, mut plain) = (Vec::new(), Vec::new());
        for (token, &kind) in self.tokens.iter().zip(&self.token_types) {
            if token.is_empty() || !seen.insert(token.as_str()) {
                continue;
            }
            match kind {
                token_type::CONTROL | token_type::UNKNOWN => {
                    special.push(AddedToken::from(token.clone(), true));
                }
                token_type::USER_DEFINED => plain.push(AddedToken::from(token.clone(), false)),
                _ => {}
            }
        }
        (special, plain)
    }

    /// A `TemplateProcessing` adding BOS and/or EOS, or `None` when neither is wanted.
    fn post_processor(&self) -> Result<Option<TemplateProcessing>, VocabError> {
        let bos = self.bos.filter(|_| self.add_bos);
        let eos = self.eos.filter(|_| self.add_eos);
        if bos.is_none() && eos.is_none() {
            return Ok(None);
        }
        let build_error = |message: String| VocabError::Build {
            part: "post-processor",
            source: message.into(),
        };
        let mut special_tokens = Vec::new();
        let mut piece = |id: u32| -> Result<String, VocabError> {
            // `validate` has checked the id; a miss here would be a bug, reported, not a panic.
            let text = self
                .token(id)
                .ok_or_else(|| {
                    build_error(format!("special token id {id} is not in the vocabulary"))
                })?
                .to_owned();
            // `TemplateProcessing` parses pieces from strings: `$...` names a sequence and `:`
            // separates a type id, so such tokens cannot be expressed.
            if text.starts_with('$') || text.contains(':') {
                return Err(build_error(format!(
                    "special token `{text}` cannot appear in a TemplateProcessing template"
                )));
            }
            special_tokens.push((text.clone(), id));
            Ok(text)
        };
        let mut single = Vec::new();
        let mut pair = Vec::new();
        if let Some(id) = bos {
            let text = piece(id)?;
            single.push(text.clone());
            pair.push(text);
        }
        single.push("$A".to_owned());
        pair.push("$A".to_owned());
        pair.push("$B:1".to_owned());
        if let Some(id) = eos {
            let text = piece(id)?;
            single.push(text.clone());
            pair.push(format!("{text}:1"));
        }
        TemplateProcessing::builder()
            .try_single(single)
            .and_then(|b| b.try_pair(pair))
            .map_err(build_error)?
            .special_tokens(special_tokens)
            .build()
            .map(Some)
            .map_err(|e| build_error(e.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny byte-level vocabulary: the 256 byte symbols, a few merges, two control tokens.
    pub(crate) fn tiny_vocab() -> GgufVocab {
        let byte_chars = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet();
        let mut bytes: Vec<String> = byte_chars.into_iter().map(String::from).collect();
        bytes.sort();
        let mut tokens = vec!["<|im_start|>".to_owned(), "<|im_end|>".to_owned()];
        tokens.extend(bytes);
        let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"];
        for merge in merges {
            tokens.push(merge.replace(' ', ""));
        }
        let mut token_types = vec![token_type::NORMAL; tokens.len()];
        token_types[0] = token_type::CONTROL;
        token_types[1] = token_type::CONTROL;
        GgufVocab {
            model: "gpt2".into(),
            pre: Some("gpt2".into()),
            tokens,
            token_types,
            merges: merges.iter().map(|m| (*m).to_owned()).collect(),
            bos: Some(0),
            eos: Some(1),
            unk: None,
            pad: None,
            add_bos: false,
            add_eos: false,
            chat_template: None,
        }
    }

    fn encode(tokenizer: &Tokenizer, text: &str, add_special: bool) -> Vec<String> {
        let enc = tokenizer.encode(text, add_special).expect("encode");
        enc.get_tokens().to_vec()
    }

    #[test]
    fn merges_and_control_tokens() {
        let tokenizer = tiny_vocab().to_tokenizer().expect("tokenizer");
        assert_eq!(
            encode(&tokenizer, "<|im_start|>hello wo<|im_end|>", false),
            ["<|im_start|>", "hello", "Ġwo", "<|im_end|>"]
        );
        let ids = tokenizer.encode("hello", true).expect("encode");
        assert_eq!(ids.get_ids().len(), 1, "no BOS unless add_bos");
    }

    #[test]
    fn add_bos_and_eos_wrap_the_text() {
        let mut vocab = tiny_vocab();
        vocab.add_bos = true;
        vocab.add_eos = true;
        let tokenizer = vocab.to_tokenizer().expect("tokenizer");
        assert_eq!(
            encode(&tokenizer, "hello", true),
            ["<|im_start|>", "hello", "<|im_end|>"]
        );
        assert_eq!(encode(&tokenizer, "hello", false), ["hello"]);
    }

    #[test]
    fn decodes_bytes_and_skips_control_tokens() {
        let tokenizer = tiny_vocab().to_tokenizer().expect("tokenizer");
        let ids = tokenizer
            .encode("<|im_start|>hello wo é", false)
            .expect("encode")
            .get_ids()
            .to_vec();
        assert_eq!(tokenizer.decode(&ids, true).expect("decode"), "hello wo é");
        assert_eq!(
            tokenizer.decode(&ids, false).expect("decode"),
            "<|im_start|>hello wo é"
        );
    }

    #[test]
    fn token_ids_are_positions() {
        let vocab = tiny_vocab();
        let tokenizer = vocab.to_tokenizer().expect("tokenizer");
        for (id, token) in vocab.tokens.iter().enumerate() {
            assert_eq!(tokenizer.token_to_id(token), Some(id as u32), "{token}");
        }
    }

    #[test]
    fn rejects_what_it_cannot_build() {
        let mut vocab = tiny_vocab();
        vocab.model = "llama".into();
        assert!(matches!(
            vocab.to_tokenizer(),
            Err(VocabError::Unsupported { model }) if model == "llama"
        ));

        let mut vocab = tiny_vocab();
        vocab.token_types.pop();
        assert!(matches!(
            vocab.to_tokenizer(),
            Err(VocabError::TokenTypeCount { .. })
        ));

        let mut vocab = tiny_vocab();
        vocab.eos = Some(100_000);
        let err = vocab.to_tokenizer().expect_err("eos out of range");
        assert!(err.to_string().contains(keys::EOS), "{err}");

        let mut vocab = tiny_vocab();
        vocab.merges.push("nospace".into());
        assert!(matches!(
            vocab.to_tokenizer(),
            Err(VocabError::BadMerge { merge, .. }) if merge == "nospace"
        ));
    }

    #[test]
    fn unknown_pre_falls_back_with_a_warning() {
        let mut vocab = tiny_vocab();
        vocab.pre = Some("mystery".into());
        assert!(vocab.to_tokenizer().is_ok());
        assert_eq!(vocab.warnings().len(), 1);
        assert!(tiny_vocab().warnings().is_empty());
    }
}
