//! Tokenizing a long text in pieces, with the same ids as in one piece, and stopping once it is
//! longer than its caller can use.
//!
//! A Hugging Face tokenizer holds about 350 bytes per token while it encodes (measured with the
//! default model: `examples/tokenizer_memory.rs`), so a 20 MB message took 2 GB and 28 s, all of
//! it to learn that the prompt was far over the context. Here a text longer than
//! [`CHUNK_BYTES`] is encoded a piece at a time: memory is bounded by a piece, and encoding
//! stops at the first piece past the caller's limit.
//!
//! Why the ids are the same: a BPE tokenizer without a normalizer splits text into pre-tokens
//! (GPT-2 and Llama 3 style regexes, digit splits) and merges within each pre-token only, and
//! a regex split found in a piece is the one found in the whole text as long as the piece goes on
//! far enough past it (these regexes never look behind; their bounded alternatives, such as
//! `'re` or `\p{N}{1,3}`, need at most three characters and one to look at). So each piece is
//! cut at the start of its last pre-token that starts at least 16 bytes before the piece's end
//! and does not follow whitespace (a whitespace run's split depends on the character after it),
//! and the rest is encoded again with the next piece. Special
//! tokens (when the tokenizer matches them) are cut out of the text before pre-tokenization;
//! a cut never falls inside one, and pre-tokens are found from the end of the last one.
//! Tokenizers outside that family (a normalizer, Metaspace or `add_prefix_space`, WordPiece or
//! Unigram, added tokens that are not special or strip whitespace, a post-processor that appends)
//! are encoded whole, as before.

use std::ops::Range;

use aho_corasick::AhoCorasick;
use tokenizers::models::ModelWrapper;
use tokenizers::{
    OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, PreTokenizerWrapper, Tokenizer,
};

use crate::PromptError;

/// Texts up to this long are encoded in one piece; longer ones a piece of about this size at a
/// time.
pub const CHUNK_BYTES: usize = 256 << 10;

/// How far before a piece's end its cut must be (see `last_pre_token_start`).
const MARGIN_BYTES: usize = 16;

/// The largest piece: a pre-token (a run without a space, digit or punctuation break) longer
/// than this in a text over [`CHUNK_BYTES`] is refused ([`PromptError::UnbrokenText`]) rather
/// than encoded in unbounded memory. No real text has one; `"a" * 20 MB` does.
pub const MAX_PIECE_BYTES: usize = 4 * CHUNK_BYTES;

/// Whether `tokenizer` can be encoded in pieces (see the module docs), and what `add_special`
/// puts in front (`None`: it also appends, or changes ids, so texts are encoded whole when it is
/// asked for).
#[derive(Debug, Clone)]
pub(crate) struct Chunking {
    special_prefix: Option<Vec<u32>>,
}

impl Chunking {
    /// `None` when `tokenizer` is not of the family whose pieces encode like the whole.
    pub(crate) fn of(tokenizer: &Tokenizer) -> Option<Chunking> {
        if tokenizer.get_normalizer().is_some()
            || !matches!(tokenizer.get_model(), ModelWrapper::BPE(_))
            || !tokenizer
                .get_added_tokens_decoder()
                .values()
                .all(|t| t.special && !t.lstrip && !t.rstrip && !t.single_word)
            || !local_pre_tokenizer(tokenizer.get_pre_tokenizer()?)
        {
            return None;
        }
        // What `add_special` adds: only in front (then it is that prefix), or not usable.
        let probe = "Hello world";
        let with = tokenizer.encode(probe, true).ok()?;
        let without = tokenizer.encode(probe, false).ok()?;
        let (with, without) = (with.get_ids(), without.get_ids());
        let special_prefix = with
            .strip_suffix(without)
            .map(<[u32]>::to_vec)
            .filter(|p| tokenizer.encode("", true).is_ok_and(|e| e.get_ids() == p));
        Some(Chunking { special_prefix })
    }

    /// Whether texts are encoded in pieces when `add_special` is asked for (a post-processor that
    /// appends makes them whole).
    pub(crate) fn in_pieces(&self, add_special: bool) -> bool {
        !add_special || self.special_prefix.is_some()
    }

    /// Encodes `text` (with `specials` matched by `tokenizer`, or none when it encodes special
    /// texts as plain text), in pieces when it is long; stops with
    /// [`PromptError::TooManyTokens`] once more than `limit` ids are made.
    pub(crate) fn encode(
        &self,
        tokenizer: &Tokenizer,
        specials: Option<&AhoCorasick>,
        text: &str,
        (add_special, limit): (bool, usize),
        piece: usize,
    ) -> Result<Vec<u32>, PromptError> {
        let prefix = match (add_special, &self.special_prefix) {
            (false, _) => &[][..],
            (true, Some(prefix)) => prefix.as_slice(),
            (true, None) => return encode(tokenizer, text, true),
        };
        let mut ids = prefix.to_vec();
        let mut at = 0;
        while at < text.len() {
            let cut = self.cut(tokenizer, specials, text, at, piece)?;
            ids.extend(encode(tokenizer, &text[at..cut], false)?);
            if ids.len() > limit {
                return Err(PromptError::TooManyTokens {
                    at_least: ids.len(),
                    limit,
                });
            }
            at = cut;
        }
        Ok(ids)
    }

    /// Where the piece from `at` ends: the text's end, or a point the whole text's encoding also
    /// splits at, after `at`.
    fn cut(
        &self,
        tokenizer: &Tokenizer,
        specials: Option<&AhoCorasick>,
        text: &str,
        at: usize,
        piece: usize,
    ) -> Result<usize, PromptError> {
        let mut size = piece.max(1);
        loop {
            let end = floor_boundary(text, at + size);
            if end >= text.len() {
                return Ok(text.len());
            }
            // Special tokens in the piece: the pre-tokens start after the last one, and one
            // that runs past the piece's end is cut before.
            let mut segment = at;
            let mut crossing = None;
            if let Some(specials) = specials {
                let reach = floor_boundary(text, end + 256);
                for m in specials.find_iter(&text[at..reach]) {
                    let Range { start, end: stop } = m.range();
                    let (start, stop) = (at + start, at + stop);
                    if start >= end {
                        break;
                    }
                    if stop > end {
                        crossing = Some(start);
                        break;
                    }
                    segment = stop;
                }
            }
            match crossing {
                Some(start) if start > at => return Ok(start),
                // A special token from `at` past the piece: a larger piece.
                Some(_) => {
                    size = size.saturating_mul(2);
                    continue;
                }
                None => {}
            }
            if let Some(last) = last_pre_token_start(tokenizer, &text[segment..end])?
                && segment + last > at
            {
                return Ok(segment + last);
            }
            if segment > at {
                return Ok(segment);
            }
            // One pre-token fills the piece: take a larger one, up to a limit.
            if size >= MAX_PIECE_BYTES {
                return Err(PromptError::UnbrokenText {
                    bytes: MAX_PIECE_BYTES,
                });
            }
            size *= 2;
        }
    }
}

/// The byte offset of the last pre-token of `piece` that starts at least [`MARGIN_BYTES`] before
/// its end and follows a character other than whitespace: encoding the piece up to there gives
/// the whole text's ids. (Before a whitespace
/// run's end, a regex's `\s+(?!\S)` looks at the next character, which a piece cut there does
/// not have: `" \n\n|"` splits as `" \n"`, `"\n"`, `"|"`, but `" \n\n"` alone is one
/// pre-token.)
fn last_pre_token_start(tokenizer: &Tokenizer, piece: &str) -> Result<Option<usize>, PromptError> {
    let Some(pre) = tokenizer.get_pre_tokenizer() else {
        return Ok(None);
    };
    // Pre-tokens that start too near the piece's end may have been cut short by it: a regex's
    // fixed alternatives (`'re`, `\p{N}{1,3}`) need up to three characters and one more to look
    // at, all inside the piece for a pre-token starting MARGIN_BYTES before its end.
    let Some(usable) = piece.len().checked_sub(MARGIN_BYTES) else {
        return Ok(None);
    };
    let mut split = PreTokenizedString::from(piece);
    pre.pre_tokenize(&mut split)
        .map_err(|source| PromptError::Tokenizer {
            op: "pre-tokenize",
            source,
        })?;
    Ok(split
        .get_splits(OffsetReferential::Original, OffsetType::Byte)
        .iter()
        .rev()
        .map(|(_, (start, _), _)| *start)
        .find(|&start| {
            start > 0
                && start <= usable
                && piece[..start]
                    .chars()
                    .next_back()
                    .is_some_and(|c| !c.is_whitespace())
        }))
}

/// Pre-tokenizers made of regex splits that look behind nothing, digit splits and a byte-level
/// mapping that adds no prefix space (checked through their serialized form, the one stable
/// view of a `Sequence`'s members).
fn local_pre_tokenizer(pre: &PreTokenizerWrapper) -> bool {
    fn local(v: &serde_json::Value) -> bool {
        match v["type"].as_str() {
            Some("ByteLevel") => v["add_prefix_space"] == false,
            Some("Digits") => true,
            Some("Split") => !v["pattern"].to_string().contains("(?<"),
            Some("Sequence") => v["pretokenizers"]
                .as_array()
                .is_some_and(|all| all.iter().all(local)),
            _ => false,
        }
    }
    serde_json::to_value(pre).is_ok_and(|v| local(&v))
}

fn floor_boundary(text: &str, at: usize) -> usize {
    if at >= text.len() {
        return text.len();
    }
    (0..=at)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
}

/// The ids of `text`. Only ids are kept, so the encoding skips offsets (`encode_fast`): the
/// same ids without mapping every token back to its bytes.
pub(crate) fn encode(
    tokenizer: &Tokenizer,
    text: &str,
    add_special: bool,
) -> Result<Vec<u32>, PromptError> {
    tokenizer
        .encode_fast(text, add_special)
        .map(|enc| enc.get_ids().to_vec())
        .map_err(|source| PromptError::Tokenizer {
            op: "encode",
            source,
        })
}
