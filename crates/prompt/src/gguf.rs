//! Reading a [`GgufVocab`] from a GGUF file's metadata (feature `gguf`, via candle's reader).
//!
//! Only the header is parsed, never the tensors, so this is cheap even for large models.
//!
//! Invariants:
//! - A required key (`tokenizer.ggml.model`, `.tokens`, `.merges`) that is missing is
//!   [`VocabError::MissingKey`] naming it; a key of the wrong type is [`VocabError::WrongType`].
//! - Integer keys accept any GGUF integer width that fits, since converters disagree on widths.
//! - `tokenizer.ggml.unknown_token_id` (llama.cpp's spelling) wins over `unk_token_id`.
//! - An absent `add_bos_token` takes llama.cpp's default for the `pre` type (true for Llama 3).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};

use crate::pretok::PreTokenizerSpec;
use crate::vocab::{GgufVocab, VocabError, keys};

type Metadata = HashMap<String, Value>;

impl GgufVocab {
    /// Reads the tokenizer keys of an already-parsed GGUF header.
    pub fn from_gguf(content: &Content) -> Result<Self, VocabError> {
        let md = &content.metadata;
        let pre = opt_string(md, keys::PRE)?;
        let default_add_bos = PreTokenizerSpec::for_pre(pre.as_deref()).default_add_bos;
        let unk = match opt_id(md, keys::UNK)? {
            Some(id) => Some(id),
            None => opt_id(md, keys::UNK_ALT)?,
        };
        Ok(Self {
            model: string(md, keys::MODEL)?,
            pre,
            tokens: array(md, keys::TOKENS)?
                .iter()
                .map(|v| as_string(keys::TOKENS, v))
                .collect::<Result<_, _>>()?,
            token_types: match md.get(keys::TOKEN_TYPE) {
                None => Vec::new(),
                Some(_) => array(md, keys::TOKEN_TYPE)?
                    .iter()
                    .map(|v| as_i32(keys::TOKEN_TYPE, v))
                    .collect::<Result<_, _>>()?,
            },
            merges: array(md, keys::MERGES)?
                .iter()
                .map(|v| as_string(keys::MERGES, v))
                .collect::<Result<_, _>>()?,
            bos: opt_id(md, keys::BOS)?,
            eos: opt_id(md, keys::EOS)?,
            unk,
            pad: opt_id(md, keys::PAD)?,
            add_bos: opt_bool(md, keys::ADD_BOS)?.unwrap_or(default_add_bos),
            add_eos: opt_bool(md, keys::ADD_EOS)?.unwrap_or(false),
            chat_template: opt_string(md, keys::CHAT_TEMPLATE)?,
        })
    }

    /// Opens a GGUF file and reads its tokenizer keys (only the header is read, not the
    /// tensors).
    pub fn from_gguf_file(path: &Path) -> Result<Self, VocabError> {
        let mut file = std::fs::File::open(path).map_err(|source| VocabError::Open {
            path: path.to_owned(),
            source,
        })?;
        let content = Content::read(&mut file).map_err(|source| VocabError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_gguf(&content)
    }
}

fn wrong(key: &'static str, expected: &'static str, found: &Value) -> VocabError {
    VocabError::WrongType {
        key,
        expected,
        found: format!("{:?}", found.value_type()),
    }
}

fn string(md: &Metadata, key: &'static str) -> Result<String, VocabError> {
    opt_string(md, key)?.ok_or(VocabError::MissingKey { key })
}

fn opt_string(md: &Metadata, key: &'static str) -> Result<Option<String>, VocabError> {
    md.get(key).map(|v| as_string(key, v)).transpose()
}

fn as_string(key: &'static str, v: &Value) -> Result<String, VocabError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(wrong(key, "a string", other)),
    }
}

fn array<'a>(md: &'a Metadata, key: &'static str) -> Result<&'a [Value], VocabError> {
    match md.get(key) {
        None => Err(VocabError::MissingKey { key }),
        Some(Value::Array(items)) => Ok(items),
        Some(other) => Err(wrong(key, "an array", other)),
    }
}

/// Any integer type that fits, since converters disagree on the width.
fn as_i64(v: &Value) -> Option<i64> {
    Some(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => i64::try_from(x).ok()?,
        Value::I64(x) => x,
        _ => return None,
    })
}

fn as_i32(key: &'static str, v: &Value) -> Result<i32, VocabError> {
    as_i64(v)
        .and_then(|x| i32::try_from(x).ok())
        .ok_or_else(|| wrong(key, "a 32-bit integer", v))
}

fn opt_id(md: &Metadata, key: &'static str) -> Result<Option<u32>, VocabError> {
    md.get(key)
        .map(|v| {
            as_i64(v)
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| wrong(key, "a token id (non-negative integer)", v))
        })
        .transpose()
}

fn opt_bool(md: &Metadata, key: &'static str) -> Result<Option<bool>, VocabError> {
    md.get(key)
        .map(|v| match v {
            Value::Bool(b) => Ok(*b),
            other => Err(wrong(key, "a boolean", other)),
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(md: Vec<(&str, Value)>) -> Content {
        Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata: md.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    fn strings(items: &[&str]) -> Value {
        Value::Array(
            items
                .iter()
                .map(|s| Value::String((*s).to_owned()))
                .collect(),
        )
    }

    fn minimal() -> Vec<(&'static str, Value)> {
        vec![
            (keys::MODEL, Value::String("gpt2".into())),
            (keys::TOKENS, strings(&["a", "b", "ab"])),
            (keys::MERGES, strings(&["a b"])),
        ]
    }

    #[test]
    fn reads_minimal_metadata_with_defaults() {
        let vocab = GgufVocab::from_gguf(&content(minimal())).expect("vocab");
        assert_eq!(vocab.tokens, ["a", "b", "ab"]);
        assert!(vocab.token_types.is_empty() && !vocab.add_bos && vocab.pre.is_none());
    }

    #[test]
    fn accepts_both_spellings_of_the_unknown_id() {
        for key in [keys::UNK, keys::UNK_ALT] {
            let mut md = minimal();
            md.push((key, Value::I32(1)));
            let vocab = GgufVocab::from_gguf(&content(md)).expect("vocab");
            assert_eq!(vocab.unk, Some(1), "{key}");
        }
    }

    #[test]
    fn llama3_defaults_to_adding_bos() {
        let mut md = minimal();
        md.push((keys::PRE, Value::String("llama3".into())));
        assert!(GgufVocab::from_gguf(&content(md)).expect("vocab").add_bos);
    }

    #[test]
    fn missing_and_mistyped_keys_are_named() {
        let md: Vec<_> = minimal()
            .into_iter()
            .filter(|(k, _)| *k != keys::MERGES)
            .collect();
        let err = GgufVocab::from_gguf(&content(md)).expect_err("no merges");
        assert!(err.to_string().contains(keys::MERGES), "{err}");

        let mut md = minimal();
        md.push((keys::BOS, Value::String("1".into())));
        let err = GgufVocab::from_gguf(&content(md)).expect_err("bad bos");
        assert!(
            matches!(err, VocabError::WrongType { key: keys::BOS, .. }),
            "{err}"
        );
    }
}
