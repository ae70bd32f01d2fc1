//! Pre-tokenizer pipelines for byte-level BPE vocabularies, chosen by llama.cpp's
//! `tokenizer.ggml.pre` name.
//!
//! A GGUF file carries the BPE vocabulary and merges but not the Hugging Face pre-tokenizer that
//! cut the text into words before BPE ran; llama.cpp instead names a pre-tokenizer type and keeps
//! one table of regexes per type (`llm_tokenizer_bpe` in `llama-vocab.cpp`). This module is our
//! copy of that table, expressed as `tokenizers` components so that the result also serialises
//! as an ordinary `tokenizer.json` (the router rebuilds it from JSON and must cut text the same
//! way).
//!
//! Invariants:
//! - llama.cpp applies its regexes one after another, each one splitting every piece left by the
//!   previous one into matches and the text between matches, all kept. That is exactly
//!   `Split(regex, Isolated)` in sequence, so each llama.cpp regex becomes one `Split`, followed by
//!   `ByteLevel` without its own regex (it then only maps bytes to the byte-level alphabet).
//! - Where Hugging Face's own `tokenizer.json` for a family is known to be equivalent, we use that
//!   shape instead (SmolLM2: `Digits(individual_digits)` + `ByteLevel(use_regex)`), so a kit built
//!   from a GGUF looks like the model's original tokenizer.
//! - The regexes are llama.cpp's "adapted" forms (`'[sS]` instead of `(?i:'s)`), because llama.cpp
//!   is the implementation our golden ids come from.
//! - An unknown name never fails: it falls back to GPT-2 and reports a warning for the caller to log.

use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{NormalizerWrapper, SplitDelimiterBehavior};

/// GPT-2's word regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_GPT2`); `ByteLevel(use_regex)` has the
/// same regex built in, plus a final `\s+` that only names a gap llama.cpp keeps anyway.
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Llama 3's regex as llama.cpp adapted it (case-insensitive contractions spelled out, numbers in
/// groups of up to three).
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's regex: Llama 3's with single digits.
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_DEFAULT` regex list, used for `pre = "default"` or no `pre`.
const LLAMA_CPP_DEFAULT_REGEXES: [&str; 4] = [
    r"[\p{P}\$\+<=>\^~\|]+",
    GPT2_REGEX,
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];

/// The pre-tokenizer families we reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizerKind {
    /// GPT-2: `ByteLevel` with its built-in regex.
    Gpt2,
    /// SmolLM / StarCoder: every digit on its own, then GPT-2's regex.
    Smollm,
    /// Llama 3: one `Split` on the Llama 3 regex, then `ByteLevel` without regex.
    Llama3,
    /// Qwen 2: like Llama 3 with single digits.
    Qwen2,
    /// llama.cpp's default list of four regexes.
    LlamaCppDefault,
}

/// What `tokenizer.ggml.pre` selects: the regexes plus the flags llama.cpp ties to the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreTokenizerSpec {
    /// The regex family.
    pub kind: PreTokenizerKind,
    /// NFC-normalise before splitting (Qwen 2's `tokenizer.json` does; llama.cpp does not, so the
    /// two differ only on text that is not already NFC).
    pub nfc: bool,
    /// A word that is itself a vocabulary entry is emitted whole, without running the merges
    /// (llama.cpp's and Hugging Face's `ignore_merges`, set for Llama 3).
    pub ignore_merges: bool,
    /// llama.cpp's default for `add_bos_token` when the GGUF does not say.
    pub default_add_bos: bool,
    /// Set when the name was missing or unknown; the caller should log it.
    pub warning: Option<String>,
}

impl PreTokenizerSpec {
    /// Chooses the pipeline for a `tokenizer.ggml.pre` value, mirroring llama.cpp's name table
    /// for the families we implement.
    pub fn for_pre(pre: Option<&str>) -> Self {
        let plain = |kind| Self {
            kind,
            nfc: false,
            ignore_merges: false,
            default_add_bos: false,
            warning: None,
        };
        let Some(pre) = pre else {
            return Self {
                warning: Some(
                    "GGUF has no tokenizer.ggml.pre; using llama.cpp's default pre-tokenizer \
                     (generation quality may suffer)"
                        .to_owned(),
                ),
                ..plain(PreTokenizerKind::LlamaCppDefault)
            };
        };
        match pre {
            "default" => plain(PreTokenizerKind::LlamaCppDefault),
            "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "roberta-bpe" | "exaone4" => {
                plain(PreTokenizerKind::Gpt2)
            }
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => plain(PreTokenizerKind::Smollm),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" => Self {
                ignore_merges: true,
                default_add_bos: true,
                ..plain(PreTokenizerKind::Llama3)
            },
            "dbrx" | "smaug-bpe" => plain(PreTokenizerKind::Llama3),
            "qwen2" | "deepseek-r1-qwen" => Self {
                nfc: true,
                ..plain(PreTokenizerKind::Qwen2)
            },
            "stablelm2" | "megrez" => plain(PreTokenizerKind::Qwen2),
            other => Self {
                warning: Some(format!(
                    "tokenizer.ggml.pre `{other}` is not implemented; falling back to the GPT-2 \
                     pre-tokenizer, token ids may differ from the model's own tokenizer"
                )),
                ..plain(PreTokenizerKind::Gpt2)
            },
        }
    }

    /// The normalizer this pipeline needs, if any.
    pub fn normalizer(&self) -> Option<NormalizerWrapper> {
        self.nfc.then(|| NFC.into())
    }

    /// Builds the pre-tokenizer. Fails only if a regex does not compile, which the tests rule out.
    pub fn pre_tokenizer(&self) -> tokenizers::Result<PreTokenizerWrapper> {
        let byte_level =
            |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
        let pipeline = match self.kind {
            PreTokenizerKind::Gpt2 => return Ok(byte_level(true)),
            PreTokenizerKind::Smollm => vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(true),
            ],
            PreTokenizerKind::Llama3 => vec![split(LLAMA3_REGEX)?, byte_level(false)],
            PreTokenizerKind::Qwen2 => vec![split(QWEN2_REGEX)?, byte_level(false)],
            PreTokenizerKind::LlamaCppDefault => {
                let mut steps = LLAMA_CPP_DEFAULT_REGEXES
                    .iter()
                    .map(|re| split(re))
                    .collect::<tokenizers::Result<Vec<_>>>()?;
                steps.push(byte_level(false));
                steps
            }
        };
        Ok(PreTokenizerWrapper::Sequence(Sequence::new(pipeline)))
    }
}

fn split(regex: &str) -> tokenizers::Result<PreTokenizerWrapper> {
    Ok(PreTokenizerWrapper::Split(Split::new(
        SplitPattern::Regex(regex.to_owned()),
        SplitDelimiterBehavior::Isolated,
        false,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    fn pieces(spec: &PreTokenizerSpec, text: &str) -> Vec<String> {
        let mut s = PreTokenizedString::from(text);
        spec.pre_tokenizer()
            .expect("regexes compile")
            .pre_tokenize(&mut s)
            .expect("pre-tokenize");
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(piece, _, _)| piece.to_owned())
            .collect()
    }

    #[test]
    fn every_family_builds() {
        for pre in [
            None,
            Some("default"),
            Some("gpt2"),
            Some("smollm"),
            Some("llama3"),
        ]
        .into_iter()
        .chain([Some("qwen2"), Some("dbrx"), Some("stablelm2"), Some("nope")])
        {
            let spec = PreTokenizerSpec::for_pre(pre);
            assert!(spec.pre_tokenizer().is_ok(), "{pre:?}");
        }
    }

    #[test]
    fn unknown_or_missing_names_warn() {
        let spec = PreTokenizerSpec::for_pre(Some("brand-new"));
        assert_eq!(spec.kind, PreTokenizerKind::Gpt2);
        assert!(
            spec.warning
                .as_deref()
                .is_some_and(|w| w.contains("brand-new"))
        );
        assert!(PreTokenizerSpec::for_pre(None).warning.is_some());
        assert!(PreTokenizerSpec::for_pre(Some("smollm")).warning.is_none());
    }

    #[test]
    fn smollm_isolates_every_digit() {
        let spec = PreTokenizerSpec::for_pre(Some("smollm"));
        // Ġ is the byte-level spelling of a space.
        assert_eq!(
            pieces(&spec, "In 2024, x"),
            ["In", "Ġ", "2", "0", "2", "4", ",", "Ġx"]
        );
    }

    #[test]
    fn llama3_groups_digits_by_three_and_keeps_newlines_apart() {
        let spec = PreTokenizerSpec::for_pre(Some("llama3"));
        assert!(spec.ignore_merges && spec.default_add_bos);
        assert_eq!(
            pieces(&spec, "12345 they're\n\nok"),
            ["123", "45", "Ġthey", "'re", "ĊĊ", "ok"]
        );
    }

    #[test]
    fn qwen2_single_digits_and_nfc() {
        let spec = PreTokenizerSpec::for_pre(Some("qwen2"));
        assert!(spec.normalizer().is_some());
        assert_eq!(pieces(&spec, "ab 12"), ["ab", "Ġ", "1", "2"]);
    }

    #[test]
    fn gpt2_keeps_number_runs() {
        let spec = PreTokenizerSpec::for_pre(Some("gpt2"));
        assert_eq!(pieces(&spec, "a 123  b"), ["a", "Ġ123", "Ġ", "Ġb"]);
    }
}
