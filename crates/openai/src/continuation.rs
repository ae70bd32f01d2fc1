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

use tidelock_prompt::{PromptKit, RenderedChat};
use tidelock_protocol::TurnKey;

/// The digest of a prompt's text, kept from preparing the request to the end of its answer
/// (the text itself is not kept), and how its ids were made.
#[derive(Debug, Clone)]
pub struct PromptText {
    len: usize,
    hasher: blake3::Hasher,
    /// Where the text tokenized for this prompt began (after the remembered turn, or 0).
    from: usize,
    add_special: bool,
    /// Turns in the chain this prompt extends, itself included.
    turns: u32,
}

impl PartialEq for PromptText {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self.hasher.finalize() == other.hasher.finalize()
            && (self.from, self.add_special, self.turns)
                == (other.from, other.add_special, other.turns)
    }
}

impl PromptText {
    /// A prompt tokenized whole (`add_special` false), the first of its chain.
    pub fn new(text: &str) -> Self {
        Self::after(text, None, false)
    }

    /// A prompt whose ids are `previous`'s followed by the tokenization of the rest of `text`
    /// (or, without `previous`, the tokenization of all of it, with `add_special`).
    pub fn after(text: &str, previous: Option<&Continuation>, add_special: bool) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(text.as_bytes());
        let (from, turns) = previous.map_or((0, 1), |p| (p.text_len, p.turns + 1));
        PromptText {
            len: text.len(),
            hasher,
            from,
            add_special: add_special && previous.is_none(),
            turns,
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
            turns: self.turns,
            last: LastTurn {
                from: self.from,
                answer_at: self.len,
                add_special: self.add_special,
                answer_ids: answer.ids.len(),
            },
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
    /// Answered turns whose ids these are, since the text was last tokenized whole.
    turns: u32,
    last: LastTurn,
}

/// How the last turn of a [`Continuation`] was made, to share it as a [`TurnRecord`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LastTurn {
    from: usize,
    answer_at: usize,
    add_special: bool,
    /// The answer's ids: the last of the continuation's.
    answer_ids: usize,
}

impl Continuation {
    /// The ids of the remembered text.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Answered turns in its chain: its last turn is the turn log's entry `turns() - 1`.
    pub fn turns(&self) -> u32 {
        self.turns
    }

    /// What follows the remembered text in `text`, when `text` starts with it.
    pub fn rest<'t>(&self, text: &'t str) -> Option<&'t str> {
        let head = text.get(..self.text_len)?;
        (blake3::hash(head.as_bytes()) == self.digest).then(|| &text[self.text_len..])
    }

    /// Bytes of the text it remembers.
    pub fn text_len(&self) -> usize {
        self.text_len
    }

    /// Its last turn, to share with the other router replicas.
    pub fn record(&self) -> TurnRecord {
        TurnRecord {
            from: self.last.from,
            answer_at: self.last.answer_at,
            end: self.text_len,
            add_special: self.last.add_special,
            digest: *self.digest.as_bytes(),
            answer: self.ids[self.ids.len() - self.last.answer_ids..].to_vec(),
        }
    }

    /// The continuation a session's turn log stands for in `chat`: every record's text checked
    /// against `chat`'s (a record whose digest differs, or that does not start where the one
    /// before it ended, ends the chain there), the text between answers tokenized as the
    /// replicas that wrote the records tokenized it, the answers' ids as generated. `None` when
    /// not even the first record fits. The ids always decode to the text they stand for: the
    /// text by digest, each answer's ids by decoding them (a record is read from outside the
    /// process; whatever it holds, the prompt is the client's).
    pub fn rebuild(
        records: &[TurnRecord],
        chat: &RenderedChat,
        kit: &PromptKit,
    ) -> Option<Continuation> {
        let text = chat.text();
        let mut hasher = blake3::Hasher::new();
        let mut hashed = 0;
        let mut built: Option<Continuation> = None;
        for (n, record) in records.iter().enumerate() {
            let ended = built.as_ref().map_or(0, |c| c.text_len);
            if record.from != ended
                || record.answer_at < record.from
                || record.end < record.answer_at
                || !text.is_char_boundary(record.end)
                || !text.is_char_boundary(record.answer_at)
                || record.end > text.len()
                || (n > 0 && record.add_special)
            {
                break;
            }
            hasher.update(&text.as_bytes()[hashed..record.end]);
            hashed = record.end;
            if *hasher.finalize().as_bytes() != record.digest
                || kit.decode(&record.answer, false).ok().as_deref()
                    != Some(&text[record.answer_at..record.end])
            {
                break;
            }
            let Ok(prompt) = kit.encode_rendered_between(
                chat,
                record.from..record.answer_at,
                record.add_special,
                usize::MAX,
            ) else {
                break;
            };
            let mut ids = built.take().map(|c| c.ids).unwrap_or_default();
            ids.extend(prompt);
            ids.extend_from_slice(&record.answer);
            built = Some(Continuation {
                text_len: record.end,
                digest: blake3::Hash::from_bytes(record.digest),
                ids,
                turns: n as u32 + 1,
                last: LastTurn {
                    from: record.from,
                    answer_at: record.answer_at,
                    add_special: record.add_special,
                    answer_ids: record.answer.len(),
                },
            });
        }
        built
    }
}

/// One answered turn of a session, as router replicas share it through the state store (the
/// turn log, `turns/<model>/<tenant>/<endpoint>/<session>/<n>`), so that a session's next turn
/// keeps its cached ids on whichever replica it lands ([`Continuation::rebuild`]). Only the
/// answer's ids are kept: the prompts' are tokenized again from the text, as they were made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnRecord {
    /// Where the text tokenized for this turn's prompt began: the end of the turn before it,
    /// or 0 for the first turn of a chain.
    pub from: usize,
    /// Where the prompt's text ended and the answer's began.
    pub answer_at: usize,
    /// Where the answer's text ended.
    pub end: usize,
    /// Whether the prompt was tokenized with the tokenizer's special tokens added (the first
    /// turn of a completion's chain).
    pub add_special: bool,
    /// BLAKE3 of the conversation's text up to `end`.
    pub digest: [u8; 32],
    /// The answer's ids, as generated.
    pub answer: Vec<u32>,
}

/// Why stored bytes are not a [`TurnRecord`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a turn record: {0}")]
pub struct TurnRecordError(&'static str);

impl TurnRecord {
    /// The format's version, its first byte.
    const VERSION: u8 = 1;
    /// Version, three offsets, the flag, the digest and the id count.
    const HEADER: usize = 1 + 3 * 8 + 1 + 32 + 4;

    /// The stored form: the version byte, `from`, `answer_at`, `end` (u64 LE), `add_special`
    /// (one byte), the digest, the answer's length (u32 LE) and its ids (u32 LE each).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::HEADER + 4 * self.answer.len());
        out.push(Self::VERSION);
        for offset in [self.from, self.answer_at, self.end] {
            out.extend_from_slice(&(offset as u64).to_le_bytes());
        }
        out.push(u8::from(self.add_special));
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&(self.answer.len() as u32).to_le_bytes());
        for id in &self.answer {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    /// Reads [`TurnRecord::to_bytes`]'s form, refusing anything else.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TurnRecordError> {
        let header = bytes
            .get(..Self::HEADER)
            .ok_or(TurnRecordError("too short"))?;
        if header[0] != Self::VERSION {
            return Err(TurnRecordError("unknown version"));
        }
        let u64_at = |at: usize| {
            let value = u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
            usize::try_from(value).map_err(|_| TurnRecordError("offset out of range"))
        };
        let (from, answer_at, end) = (u64_at(1)?, u64_at(9)?, u64_at(17)?);
        let add_special = match header[25] {
            0 => false,
            1 => true,
            _ => return Err(TurnRecordError("bad flag")),
        };
        let digest: [u8; 32] = header[26..58].try_into().expect("32 bytes");
        let count = u32::from_le_bytes(header[58..62].try_into().expect("4 bytes")) as usize;
        let ids = &bytes[Self::HEADER..];
        if ids.len() != count.saturating_mul(4) {
            return Err(TurnRecordError("its length does not match its id count"));
        }
        Ok(TurnRecord {
            from,
            answer_at,
            end,
            add_special,
            digest,
            answer: ids
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        })
    }
}

/// Bytes a remembered session costs beyond its ids and key (digest, lengths, the map's and the
/// list's entries), rounded up.
const ENTRY_OVERHEAD_BYTES: usize = 128;

/// Every session's [`Continuation`], bounded by what they hold in all, counted in ids (4 bytes):
/// each session's ids, plus its key and [`ENTRY_OVERHEAD_BYTES`] in id-sized units, so that many
/// short sessions cannot outgrow the budget. Least recently used out.
///
/// Keyed by [`TurnKey`] in the router; any key that says its size ([`MemoryKey`]) will do.
#[derive(Debug)]
pub struct Continuations<K: MemoryKey = TurnKey> {
    max_tokens: usize,
    inner: Mutex<Held<K>>,
}

/// A key of [`Continuations`]: hashable, and charged by its size in bytes.
pub trait MemoryKey: std::hash::Hash + Eq + Clone {
    /// Bytes the key holds.
    fn bytes(&self) -> usize;
}

impl MemoryKey for TurnKey {
    fn bytes(&self) -> usize {
        self.model.as_str().len()
            + self.tenant.as_str().len()
            + self.endpoint.len()
            + self.session.as_str().len()
    }
}

impl MemoryKey for String {
    fn bytes(&self) -> usize {
        self.len()
    }
}

#[derive(Debug)]
struct Held<K: MemoryKey> {
    lru: lru::LruCache<K, Arc<Continuation>>,
    /// Ids held plus each entry's key and overhead, in ids.
    tokens: usize,
}

/// What one remembered session counts against the budget, in ids.
fn charge(key: &impl MemoryKey, continuation: &Continuation) -> usize {
    continuation.ids.len() + (key.bytes() + ENTRY_OVERHEAD_BYTES).div_ceil(4)
}

impl<K: MemoryKey> Continuations<K> {
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

    fn held(&self) -> std::sync::MutexGuard<'_, Held<K>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session's continuation, if remembered (and marks it recently used).
    pub fn get<Q>(&self, key: &Q) -> Option<Arc<Continuation>>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.held().lru.get(key).cloned()
    }

    /// Remembers `continuation` for the session, replacing what it had; evicts the least
    /// recently used sessions beyond the budget. One longer than the whole budget is not kept.
    pub fn put(&self, key: K, continuation: Continuation) {
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
