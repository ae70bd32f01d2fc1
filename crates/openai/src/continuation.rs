//! Turn memory: a session's last prompt and answer as the token ids the worker cached, so that
//! the next turn, which resends them as text, starts from those very ids.
//!
//! Why: a chat client sends the whole history again each turn, as text. Tokenizing that text
//! again gives the ids the worker computed for the earlier *prompts* (tokenization is
//! deterministic), but not always those it *generated*: a model may produce a tokenization of
//! its answer that is not the one the tokenizer would choose for the same text (byte-level BPE
//! has many), and the simulator's random ids almost never round-trip. Every such answer breaks
//! the cached prefix at its first differing token, and the rest of the history is recomputed.
//!
//! How: when an answer ends normally, the router remembers, per session, the digest and length
//! of `prompt text + answer text` and the ids `prompt ids + answer ids` ([`Continuation`]). When
//! the session's next prompt text starts with that text (same length prefix, same BLAKE3
//! digest), its ids are the remembered ones followed by the tokenization of the rest alone.
//! That is still a tokenization of exactly the prompt's text, the one the model itself wrote.
//! Nothing is remembered when the answer was cut by a stop string, or when its ids do not decode
//! to exactly the text the client was sent (special tokens inside it): the text is then
//! tokenized whole, as before. [`Continuations`] bounds the memory by tokens held, least
//! recently used first out.

use std::sync::{Arc, Mutex};

use tidelock_prompt::PromptKit;

/// The digest of a prompt's text, kept from preparing the request to the end of its answer
/// (the text itself is not kept).
#[derive(Debug, Clone)]
pub struct PromptText {
    len: usize,
    hasher: blake3::Hasher,
}

impl PartialEq for PromptText {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.hasher.finalize() == other.hasher.finalize()
    }
}

impl PromptText {
    pub fn new(text: &str) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(text.as_bytes());
        PromptText {
            len: text.len(),
            hasher,
        }
    }

    /// What the session remembers after this prompt, given as `prompt_ids`, was answered with
    /// `answer`. `None` when the answer's ids do not decode to exactly its text.
    pub fn then(
        mut self,
        prompt_ids: Vec<u32>,
        answer: &Answer,
        kit: &PromptKit,
    ) -> Option<Continuation> {
        if kit.decode(&answer.ids, false).ok()? != answer.text {
            return None;
        }
        self.hasher.update(answer.text.as_bytes());
        let mut ids = prompt_ids;
        ids.extend_from_slice(&answer.ids);
        Some(Continuation {
            text_len: self.len + answer.text.len(),
            digest: self.hasher.finalize(),
            ids,
        })
    }
}

/// A whole answer, as generated and as sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    /// The generated ids (a stop token is not among them: the worker does not send it).
    pub ids: Vec<u32>,
    /// The text the client was sent.
    pub text: String,
}

/// A session's text so far (its last prompt and answer) and the ids that stand for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuation {
    text_len: usize,
    digest: blake3::Hash,
    ids: Vec<u32>,
}

impl Continuation {
    /// The ids of the remembered text.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// What follows the remembered text in `text`, when `text` starts with it.
    pub fn rest<'t>(&self, text: &'t str) -> Option<&'t str> {
        let head = text.get(..self.text_len)?;
        (blake3::hash(head.as_bytes()) == self.digest).then(|| &text[self.text_len..])
    }
}

/// Bytes a remembered session costs beyond its ids and key (digest, lengths, the map's and the
/// list's entries), rounded up.
const ENTRY_OVERHEAD_BYTES: usize = 128;

/// Every session's [`Continuation`], bounded by what they hold in all, counted in ids (4 bytes):
/// each session's ids, plus its key and [`ENTRY_OVERHEAD_BYTES`] in id-sized units, so that many
/// short sessions cannot outgrow the budget. Least recently used out.
#[derive(Debug)]
pub struct Continuations {
    max_tokens: usize,
    inner: Mutex<Held>,
}

#[derive(Debug)]
struct Held {
    lru: lru::LruCache<String, Arc<Continuation>>,
    /// Ids held plus each entry's key and overhead, in ids.
    tokens: usize,
}

/// What one remembered session counts against the budget, in ids.
fn charge(key: &str, continuation: &Continuation) -> usize {
    continuation.ids.len() + (key.len() + ENTRY_OVERHEAD_BYTES).div_ceil(4)
}

impl Continuations {
    /// Memory for at most `max_tokens` ids (0 turns it off).
    pub fn new(max_tokens: usize) -> Self {
        Continuations {
            max_tokens,
            inner: Mutex::new(Held {
                lru: lru::LruCache::unbounded(),
                tokens: 0,
            }),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session's continuation, if remembered (and marks it recently used).
    pub fn get(&self, key: &str) -> Option<Arc<Continuation>> {
        self.held().lru.get(key).cloned()
    }

    /// Remembers `continuation` for the session, replacing what it had; evicts the least
    /// recently used sessions beyond the budget. One longer than the whole budget is not kept.
    pub fn put(&self, key: String, continuation: Continuation) {
        let mut held = self.held();
        if let Some(old) = held.lru.pop(&key) {
            held.tokens -= charge(&key, &old);
        }
        let size = charge(&key, &continuation);
        if size > self.max_tokens {
            return;
        }
        while held.tokens + size > self.max_tokens {
            let Some((old_key, old)) = held.lru.pop_lru() else {
                break;
            };
            held.tokens -= charge(&old_key, &old);
        }
        held.tokens += size;
        held.lru.put(key, Arc::new(continuation));
    }

    /// Sessions held, and what they count against the budget (ids plus overheads, in ids).
    pub fn usage(&self) -> (usize, usize) {
        let held = self.held();
        (held.lru.len(), held.tokens)
    }
}
