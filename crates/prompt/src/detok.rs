//! Streaming detokenization: token ids in, stable text deltas out.
//!
//! A streamed completion must send text as tokens arrive, but one token is not one piece of text:
//! a byte-level token can hold half of a UTF-8 character, and some decoders change how earlier
//! tokens print once later ones are known (SentencePiece's leading-space rule). Decoding each token
//! alone would emit broken characters; decoding everything each step is quadratic.
//! [`IncrementalDetokenizer`] uses the method of vLLM and text-generation-inference: decode a short
//! window starting at `prefix` twice, once up to `read` (text already sent) and once up to the
//! newest token, and send only what the second adds, and only when it does not end in U+FFFD (an
//! incomplete character that a later token may complete).
//!
//! Invariants:
//! - The concatenation of every delta and [`IncrementalDetokenizer::finish`] equals
//!   `tokenizer.decode(all_ids, skip_special)` for decoders where decoding a sequence from a
//!   character boundary gives a suffix of the full decode (byte-level BPE, which is what
//!   `GgufVocab` builds). `tests/smollm.rs` checks this on random sequences of the real vocabulary.
//! - No delta ends inside a character, so no delta contains U+FFFD unless the final text does
//!   (a byte sequence that no later token completes).
//! - Memory is bounded by the window: ids before `prefix` are dropped.

use tokenizers::Tokenizer;

use crate::PromptError;

/// How many ids of earlier context [`IncrementalDetokenizer::with_context`] keeps, as vLLM does:
/// enough for any decoder's look-behind.
const CONTEXT_IDS: usize = 5;

const REPLACEMENT: char = '\u{FFFD}';

/// Turns a stream of token ids into text deltas. Pass the same tokenizer to every call.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    /// The window: ids from `prefix` on; everything earlier has been sent and forgotten.
    ids: Vec<u32>,
    /// Index in `ids` of the first id whose text has not been sent yet.
    read: usize,
    skip_special: bool,
}

impl IncrementalDetokenizer {
    /// A detokenizer with no context (the start of a completion whose prompt does not matter to
    /// the decoder, as with byte-level BPE).
    pub fn new(skip_special: bool) -> Self {
        Self {
            ids: Vec::new(),
            read: 0,
            skip_special,
        }
    }

    /// A detokenizer that continues after `context` (the prompt's last ids), so decoders that
    /// print a token differently at the start of text (SentencePiece) see what came before.
    /// The context itself is never emitted.
    pub fn with_context(skip_special: bool, context: &[u32]) -> Self {
        let tail = &context[context.len().saturating_sub(CONTEXT_IDS)..];
        Self {
            ids: tail.to_vec(),
            read: tail.len(),
            skip_special,
        }
    }

    /// Feeds one id; returns the text that is now certain (often empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, PromptError> {
        self.ids.push(id);
        let sent = self.decode(tokenizer, &self.ids[..self.read])?;
        let all = self.decode(tokenizer, &self.ids)?;
        if all.len() <= sent.len() || all.ends_with(REPLACEMENT) {
            return Ok(String::new());
        }
        let delta = suffix_after(&all, &sent);
        // What was sent is now settled context: slide the window.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        Ok(delta)
    }

    /// Feeds several ids; returns the concatenated deltas.
    pub fn push_all(
        &mut self,
        tokenizer: &Tokenizer,
        ids: impl IntoIterator<Item = u32>,
    ) -> Result<String, PromptError> {
        let mut out = String::new();
        for id in ids {
            out.push_str(&self.push(tokenizer, id)?);
        }
        Ok(out)
    }

    /// Flushes what is held back (an incomplete character at the very end comes out as U+FFFD,
    /// as in a full decode). The detokenizer is empty afterwards and can be reused.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, PromptError> {
        let sent = self.decode(tokenizer, &self.ids[..self.read])?;
        let all = self.decode(tokenizer, &self.ids)?;
        self.ids.clear();
        self.read = 0;
        if all.len() <= sent.len() {
            return Ok(String::new());
        }
        Ok(suffix_after(&all, &sent))
    }

    fn decode(&self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, PromptError> {
        if ids.is_empty() {
            return Ok(String::new());
        }
        tokenizer
            .decode(ids, self.skip_special)
            .map_err(|source| PromptError::Tokenizer {
                op: "decode",
                source,
            })
    }
}

/// The part of `all` after `sent`. `sent` is normally a prefix of `all`; if a decoder rewrote it,
/// what follows its length (rounded up to a character boundary) is the best we can still send:
/// text already sent cannot be taken back, and no delta may start inside a character.
fn suffix_after(all: &str, sent: &str) -> String {
    if let Some(rest) = all.strip_prefix(sent) {
        return rest.to_owned();
    }
    let mut start = sent.len().min(all.len());
    while !all.is_char_boundary(start) {
        start += 1;
    }
    all[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::tests::tiny_vocab;

    fn byte_ids(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
        // The tiny vocab has single-byte tokens, so every UTF-8 byte is its own id.
        tokenizer
            .encode(text, false)
            .expect("encode")
            .get_ids()
            .to_vec()
    }

    #[test]
    fn holds_back_partial_characters() {
        let tokenizer = tiny_vocab().to_tokenizer().expect("tokenizer");
        let ids = byte_ids(&tokenizer, "é世🎉");
        assert_eq!(ids.len(), 2 + 3 + 4, "one id per byte");
        let mut detok = IncrementalDetokenizer::new(true);
        let deltas: Vec<String> = ids
            .iter()
            .map(|&id| detok.push(&tokenizer, id).expect("push"))
            .collect();
        let non_empty: Vec<&str> = deltas
            .iter()
            .map(String::as_str)
            .filter(|d| !d.is_empty())
            .collect();
        assert_eq!(non_empty, ["é", "世", "🎉"]);
        assert_eq!(detok.finish(&tokenizer).expect("finish"), "");
    }

    #[test]
    fn finish_flushes_an_incomplete_tail_like_a_full_decode() {
        let tokenizer = tiny_vocab().to_tokenizer().expect("tokenizer");
        let mut ids = byte_ids(&tokenizer, "hello 世");
        ids.pop(); // leave 世 incomplete
        let mut detok = IncrementalDetokenizer::new(true);
        let mut text = detok
            .push_all(&tokenizer, ids.iter().copied())
            .expect("push");
        assert!(!text.contains(REPLACEMENT), "{text:?}");
        text.push_str(&detok.finish(&tokenizer).expect("finish"));
        assert_eq!(text, tokenizer.decode(&ids, true).expect("decode"));
        assert!(text.ends_with(REPLACEMENT));
    }

    #[test]
    fn special_tokens_follow_skip_special() {
        let tokenizer = tiny_vocab().to_tokenizer().expect("tokenizer");
        let ids = byte_ids(&tokenizer, "<|im_start|>hello<|im_end|>");
        for skip in [true, false] {
            let mut detok = IncrementalDetokenizer::new(skip);
            let mut text = detok
                .push_all(&tokenizer, ids.iter().copied())
                .expect("push");
            text.push_str(&detok.finish(&tokenizer).expect("finish"));
            assert_eq!(text, tokenizer.decode(&ids, skip).expect("decode"));
        }
    }

    #[test]
    fn context_is_not_emitted_and_the_window_stays_small() {
        let tokenizer = tiny_vocab().to_tokenizer().expect("tokenizer");
        let prompt = byte_ids(&tokenizer, "the prompt ");
        let mut detok = IncrementalDetokenizer::with_context(true, &prompt);
        let out = detok
            .push_all(&tokenizer, byte_ids(&tokenizer, &"hello ".repeat(200)))
            .expect("push");
        assert_eq!(out, "hello ".repeat(200));
        assert!(detok.ids.len() <= 2, "window grew to {}", detok.ids.len());
    }

    #[test]
    fn suffix_after_handles_rewritten_prefixes() {
        assert_eq!(suffix_after("abc", "ab"), "c");
        assert_eq!(suffix_after("aXc", "ab"), "c");
        assert_eq!(suffix_after("é!", "e"), "!");
    }
}
