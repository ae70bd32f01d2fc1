//! Router<->worker wire types and the JSON values stored in etcd.
//!
//! Everything here is JSON, except a [`GenerateRequest`]'s binary form (its fields as JSON, its
//! ids as raw little-endian u32s), which routers send; a worker too old to know it answers 415 and
//! gets JSON instead. Unknown fields are ignored and fields with a natural default may be
//! omitted, so a router and a worker of neighbouring versions understand each other; enums that
//! may grow (`GenerateEvent`, `ErrorCode`) carry an `Unknown` variant instead of failing a whole
//! stream. What is never defaulted: anything whose default would be unsafe, such as the cache salt
//! of a request (a missing salt must not silently mean "share the cache across tenants").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hash::{BlockHash, BlockTokens};
use crate::ids::{CacheSalt, Epoch, GroupId, ModelName, SessionKey, ShardIndex, WorkerId};

/// Why sampling parameters were rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// Temperature outside `[0, 2]` (or NaN).
    #[error("temperature must be between 0 and 2, got {0}")]
    Temperature(f32),
    /// `top_p` outside `(0, 1]` (or NaN).
    #[error("top_p must be greater than 0 and at most 1, got {0}")]
    TopP(f32),
    /// `top_k` of zero; leave it unset to disable top-k.
    #[error("top_k must be at least 1 (omit it to disable top-k)")]
    TopK,
    /// `max_tokens` of zero.
    #[error("max_tokens must be at least 1")]
    MaxTokens,
    /// More than [`SamplingParams::MAX_LOGPROBS`] log-probabilities requested.
    #[error("logprobs must be at most 20, got {0}")]
    Logprobs(u32),
    /// `n` of zero or above [`SamplingParams::MAX_N`].
    #[error("n must be between 1 and 16, got {0}")]
    N(u32),
    /// A presence or frequency penalty outside `[-2, 2]` (or NaN); the field's name.
    #[error("{0} must be between -2 and 2, got {1}")]
    Penalty(&'static str, f32),
    /// A logit bias outside `[-100, 100]` (or NaN), or more than
    /// [`SamplingParams::MAX_LOGIT_BIAS`] of them.
    #[error(
        "logit_bias values must be between -100 and 100 (at most 300 tokens); token {0} has {1}"
    )]
    LogitBias(u32, f32),
    /// More than [`SamplingParams::MAX_LOGIT_BIAS`] biased tokens.
    #[error("logit_bias names {0} tokens; at most 300 are allowed")]
    LogitBiasCount(usize),
    /// `min_p` outside `[0, 1]` (or NaN).
    #[error("min_p must be between 0 and 1, got {0}")]
    MinP(f32),
}

/// How to pick each generated token. Omitted fields take OpenAI's defaults; fields at their
/// default are left out when written (a worker from before a field existed reads the rest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature in `[0, 2]`; 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass in `(0, 1]`.
    pub top_p: f32,
    /// Keep only the `k` most likely tokens; `None` disables top-k.
    pub top_k: Option<u32>,
    /// Seed for reproducible sampling; `None` for a random one.
    pub seed: Option<u64>,
    /// Most tokens to generate, at least 1.
    pub max_tokens: u32,
    /// Token ids that end generation (the stop token itself is not returned).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past the model's end-of-sequence token.
    pub ignore_eos: bool,
    /// `Some(n)`: return each token's log-probability and the `n` most likely alternatives
    /// (at most 20); `None` for none.
    pub logprobs: Option<u32>,
    /// Independent answers to generate from the one prompt, 1 to [`Self::MAX_N`]. They share
    /// the prompt's KV blocks (computed once); their events carry a `choice` index. With a
    /// seed, answer `i` samples with `seed + i`.
    #[serde(skip_serializing_if = "is_one")]
    pub n: u32,
    /// Subtracted from a token's logit once it has been generated (OpenAI's presence penalty),
    /// in `[-2, 2]`. Generated tokens only, as vLLM counts them; the prompt's do not count.
    #[serde(skip_serializing_if = "is_zero")]
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it has been generated, in `[-2, 2]`.
    #[serde(skip_serializing_if = "is_zero")]
    pub frequency_penalty: f32,
    /// Added to the named tokens' logits before sampling, each in `[-100, 100]` (-100 bans a
    /// token, 100 all but forces it). Written as an object keyed by token id, as OpenAI's.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub logit_bias: BTreeMap<u32, f32>,
    /// Drop tokens whose probability is below `min_p` times the most likely one's (after
    /// temperature), in `[0, 1]`; 0 disables it.
    #[serde(skip_serializing_if = "is_zero")]
    pub min_p: f32,
    /// What the answer must be, enforced token by token (constrained decoding); `None` for
    /// free text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub constraint: Option<Constraint>,
}

/// A shape the answer must have (OpenAI's `response_format`), enforced while sampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Constraint {
    /// Any JSON object.
    JsonObject,
    /// JSON valid against `schema` (a JSON Schema).
    JsonSchema { schema: serde_json::Value },
    /// Text of a Lark grammar in `llguidance`'s dialect (JSON Schemas embedded with `%json`).
    /// The OpenAI surface builds one for `tool_choice` `required` or a named function.
    Lark { grammar: String },
}

impl Constraint {
    /// The OpenAI request field a constraint comes from, which names it in errors.
    pub fn param(&self) -> &'static str {
        match self {
            Constraint::JsonObject | Constraint::JsonSchema { .. } => "response_format",
            Constraint::Lark { .. } => "tools",
        }
    }
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

fn is_zero(x: &f32) -> bool {
    *x == 0.0
}

fn is_zero_u32(x: &u32) -> bool {
    *x == 0
}

impl SamplingParams {
    /// The most log-probabilities per token a request may ask for.
    pub const MAX_LOGPROBS: u32 = 20;
    /// The most answers one request may ask for.
    pub const MAX_N: u32 = 16;
    /// The most tokens one `logit_bias` may name (OpenAI's limit).
    pub const MAX_LOGIT_BIAS: usize = 300;

    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if self.top_k == Some(0) {
            return Err(SamplingError::TopK);
        }
        if self.max_tokens == 0 {
            return Err(SamplingError::MaxTokens);
        }
        if let Some(n) = self.logprobs.filter(|&n| n > Self::MAX_LOGPROBS) {
            return Err(SamplingError::Logprobs(n));
        }
        if !(1..=Self::MAX_N).contains(&self.n) {
            return Err(SamplingError::N(self.n));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(SamplingError::Penalty(name, value));
            }
        }
        if self.logit_bias.len() > Self::MAX_LOGIT_BIAS {
            return Err(SamplingError::LogitBiasCount(self.logit_bias.len()));
        }
        if let Some((&token, &bias)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(*b))
        {
            return Err(SamplingError::LogitBias(token, bias));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(SamplingError::MinP(self.min_p));
        }
        Ok(())
    }

    /// Whether the logits are changed before a token is chosen (penalties, biases, `min_p`):
    /// the whole row is then needed on the host (as it is for a `constraint`'s mask).
    pub fn adjusts_logits(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || !self.logit_bias.is_empty()
            || self.min_p > 0.0
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            seed: None,
            max_tokens: 256,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            n: 1,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: BTreeMap::new(),
            min_p: 0.0,
            constraint: None,
        }
    }
}

/// One alternative token with its log-probability (see [`GenerateEvent::Tokens`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub id: u32,
    pub logprob: f32,
}

/// `POST /v1/generate`: continue `tokens` for a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// Caller's id for tracing; echoed in logs only.
    #[serde(default)]
    pub request_id: Option<String>,
    /// The session the tokens belong to; `None` for a one-off request.
    #[serde(default)]
    pub session: Option<SessionKey>,
    /// Namespace of the blocks this request may read and write. Required: there is deliberately
    /// no default, so a forgotten salt is an error rather than a cross-tenant cache.
    pub cache_salt: CacheSalt,
    /// The whole prompt as token ids (history included; cached blocks are not recomputed).
    pub tokens: Vec<u32>,
    /// How to sample.
    #[serde(default)]
    pub sampling: SamplingParams,
    /// Where the prompt's cached prefix is, when the router placed the request on a worker that
    /// lacks it and another holds it: the worker pulls the blocks it does not hold from there
    /// before computing the rest (issue #21).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<PullHint>,
}

/// A router's hint that another worker holds a longer prefix of a request's prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullHint {
    /// The holder's base URL (its registration's address).
    pub from: String,
    /// Leading blocks of the prompt's chain the holder holds (on any tier).
    pub blocks: u32,
}

/// `POST /v1/kv/blocks`: the blocks of a chain a peer asks for, in chain order. The reply is a
/// `tidelock_protocol::blocks` body with the leading ones the worker holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlocksRequest {
    pub hashes: Vec<BlockHash>,
}

/// The most blocks one `/v1/kv/blocks` request may ask for.
pub const MAX_PULL_BLOCKS: usize = 4096;

/// The error `type` of a worker's `503` to `/v1/generate` while it drains: a router tries
/// another worker, which may pull the prompt's prefix from the draining one.
pub const DRAINING: &str = "draining";

/// `POST /v1/kv/handoff`, a router to a draining worker: which peers take which of its blocks
/// before it exits (issue #21, point 4). The worker asks each peer to adopt its list
/// ([`AdoptRequest`], at most [`MAX_PULL_BLOCKS`] blocks each); an empty `peers` says nothing
/// needs to move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffPlan {
    /// The draining worker's base URL as the router knows it (its registration's address): where
    /// the peers pull from.
    pub from: String,
    #[serde(default)]
    pub peers: Vec<HandoffPeer>,
}

/// One peer's share of a [`HandoffPlan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffPeer {
    /// The peer's base URL.
    pub to: String,
    /// Blocks to move, hottest first; each run is a chain in order.
    pub hashes: Vec<BlockHash>,
}

/// `POST /v1/kv/adopt`, a draining worker to a peer: pull these blocks from `from` (as with
/// `/v1/kv/blocks`, a chain in order, at most [`MAX_PULL_BLOCKS`]) and keep them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptRequest {
    pub from: String,
    pub hashes: Vec<BlockHash>,
}

/// The answer to an [`AdoptRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptReply {
    /// Blocks that arrived whole and checked.
    pub received: u32,
    /// Of those, blocks the peer holds now (on some tier).
    pub kept: u32,
}

/// Why generation ended.
///
/// OpenAI has no reason for a cancelled request (the client went away); an OpenAI surface maps
/// `Cancelled` to a null `finish_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or end-of-sequence was generated.
    Stop,
    /// `max_tokens` or the context limit was reached.
    Length,
    /// The request was cancelled.
    Cancelled,
}

/// Token accounting of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt, cached or not.
    pub prompt_tokens: u32,
    /// Prompt tokens served from cache rather than prefilled.
    #[serde(default)]
    pub cached_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

impl Usage {
    /// Folds one streamed event into the running count (`Finished` carries the final one).
    pub fn record(&mut self, event: &GenerateEvent) {
        match event {
            GenerateEvent::Prefilled {
                prompt_tokens,
                cached_tokens,
            } => {
                self.prompt_tokens = *prompt_tokens;
                self.cached_tokens = *cached_tokens;
            }
            GenerateEvent::Tokens { ids, .. } => self.completion_tokens += ids.len() as u32,
            GenerateEvent::Finished { usage, .. } => *self = *usage,
            _ => {}
        }
    }
}

/// Machine-readable error class of a failed generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or its parameters are out of range.
    InvalidRequest,
    /// Prompt plus `max_tokens` exceeds the context the worker can hold.
    ContextTooLong,
    /// The worker cannot take the request now; another worker may.
    Overloaded,
    /// A bug or an unexpected failure on the worker.
    Internal,
    /// A code this build does not know; treat it like `Internal`.
    #[serde(other)]
    Unknown,
}

/// One line of the newline-delimited JSON stream answering `POST /v1/generate`.
///
/// A stream is at most one `Prefilled`, then zero or more `Tokens`, then exactly one `Finished`
/// or `Error`. A request for several answers (`SamplingParams::n` > 1) interleaves their
/// `Tokens`, each naming its `choice`, and sends one `Ended` per answer as it ends; `Finished`
/// follows the last, with the usage of all of them (the prompt counted once). An object with another `type` reads as [`GenerateEvent::Unknown`]; fields a
/// variant does not know are skipped.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GenerateEvent {
    /// The prompt is in the KV cache; sent once, before the first token. It carries the prompt's
    /// accounting early, so a caller that stops reading before `Finished` (a stop string matched)
    /// still reports exact `cached_tokens`.
    Prefilled {
        /// Tokens in the prompt.
        prompt_tokens: u32,
        /// Prompt tokens served from the prefix cache.
        cached_tokens: u32,
    },
    /// Newly generated tokens.
    Tokens {
        /// The token ids, in order.
        ids: Vec<u32>,
        /// Log-probability of each id, when requested.
        #[serde(default)]
        logprobs: Option<Vec<f32>>,
        /// Per id, the most likely alternatives (most likely first) when
        /// `SamplingParams::logprobs` asked for more than zero. Absent otherwise; older readers
        /// skip it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        top_logprobs: Option<Vec<Vec<TopLogprob>>>,
        /// Which answer the tokens belong to, from 0; left out for 0.
        #[serde(default, skip_serializing_if = "is_zero_u32")]
        choice: u32,
    },
    /// One answer of several ended (sent only when `n` > 1); the others go on.
    Ended {
        /// The answer, from 0.
        choice: u32,
        /// Why it ended.
        reason: FinishReason,
        /// Tokens it generated.
        completion_tokens: u32,
    },
    /// Generation ended normally.
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Token accounting.
        usage: Usage,
    },
    /// Generation failed.
    Error {
        /// The class of failure.
        code: ErrorCode,
        /// Human-readable detail.
        #[serde(default)]
        message: String,
    },
    /// An event type this build does not know; skip it.
    Unknown,
}

/// Read by hand rather than derived: a derived internally tagged enum first buffers each object
/// into serde's generic content tree (an allocation per field) to find its tag, and this runs
/// for every line of every answer. Workers write `type` first, so its value picks the variant
/// and the variant's fields are read straight from the input; an object whose `type` comes later
/// (another writer) is buffered as JSON and read the same way.
impl<'de> Deserialize<'de> for GenerateEvent {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(event::EventVisitor)
    }
}

/// The pieces of [`GenerateEvent`]'s reader.
mod event {
    use std::fmt;

    use serde::de::{self, IgnoredAny, MapAccess, value::MapAccessDeserializer};
    use serde::{Deserialize, Deserializer};

    use super::{ErrorCode, FinishReason, GenerateEvent, TopLogprob, Usage};

    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum EventType {
        Prefilled,
        Tokens,
        Ended,
        Finished,
        Error,
        #[serde(other)]
        Unknown,
    }

    #[derive(Deserialize)]
    struct PrefilledFields {
        prompt_tokens: u32,
        cached_tokens: u32,
    }

    #[derive(Deserialize)]
    struct TokensFields {
        ids: Vec<u32>,
        #[serde(default)]
        logprobs: Option<Vec<f32>>,
        #[serde(default)]
        top_logprobs: Option<Vec<Vec<TopLogprob>>>,
        #[serde(default)]
        choice: u32,
    }

    #[derive(Deserialize)]
    struct EndedFields {
        choice: u32,
        reason: FinishReason,
        completion_tokens: u32,
    }

    #[derive(Deserialize)]
    struct FinishedFields {
        reason: FinishReason,
        usage: Usage,
    }

    #[derive(Deserialize)]
    struct ErrorFields {
        code: ErrorCode,
        #[serde(default)]
        message: String,
    }

    impl EventType {
        /// The event of this type whose other fields `fields` holds.
        fn read<'de, D: Deserializer<'de>>(self, fields: D) -> Result<GenerateEvent, D::Error> {
            Ok(match self {
                EventType::Prefilled => {
                    let f = PrefilledFields::deserialize(fields)?;
                    GenerateEvent::Prefilled {
                        prompt_tokens: f.prompt_tokens,
                        cached_tokens: f.cached_tokens,
                    }
                }
                EventType::Tokens => {
                    let f = TokensFields::deserialize(fields)?;
                    GenerateEvent::Tokens {
                        ids: f.ids,
                        logprobs: f.logprobs,
                        top_logprobs: f.top_logprobs,
                        choice: f.choice,
                    }
                }
                EventType::Ended => {
                    let f = EndedFields::deserialize(fields)?;
                    GenerateEvent::Ended {
                        choice: f.choice,
                        reason: f.reason,
                        completion_tokens: f.completion_tokens,
                    }
                }
                EventType::Finished => {
                    let f = FinishedFields::deserialize(fields)?;
                    GenerateEvent::Finished {
                        reason: f.reason,
                        usage: f.usage,
                    }
                }
                EventType::Error => {
                    let f = ErrorFields::deserialize(fields)?;
                    GenerateEvent::Error {
                        code: f.code,
                        message: f.message,
                    }
                }
                EventType::Unknown => {
                    IgnoredAny::deserialize(fields)?;
                    GenerateEvent::Unknown
                }
            })
        }
    }

    /// A key of the object: `type`, or another field's name (kept only for the buffered path).
    enum Key {
        Type,
        Other(String),
    }

    impl<'de> Deserialize<'de> for Key {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct KeyVisitor;
            impl de::Visitor<'_> for KeyVisitor {
                type Value = Key;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a field name")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                    Ok(match v {
                        "type" => Key::Type,
                        other => Key::Other(other.to_owned()),
                    })
                }
            }
            deserializer.deserialize_identifier(KeyVisitor)
        }
    }

    pub(super) struct EventVisitor;

    impl<'de> de::Visitor<'de> for EventVisitor {
        type Value = GenerateEvent;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a generate event object with a `type`")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<GenerateEvent, A::Error> {
            let mut key = map.next_key::<Key>()?;
            if let Some(Key::Type) = key {
                let kind: EventType = map.next_value()?;
                return kind.read(MapAccessDeserializer::new(map));
            }
            let mut object = serde_json::Map::new();
            while let Some(k) = key {
                let name = match k {
                    Key::Type => "type".to_owned(),
                    Key::Other(name) => name,
                };
                object.insert(name, map.next_value::<serde_json::Value>()?);
                key = map.next_key()?;
            }
            let kind = object
                .get("type")
                .ok_or_else(|| de::Error::missing_field("type"))?;
            let kind = EventType::deserialize(kind).map_err(de::Error::custom)?;
            kind.read(serde_json::Value::Object(object))
                .map_err(de::Error::custom)
        }
    }
}

/// `GET /v1/info`: what a worker serves and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// The model served.
    pub model: ModelName,
    /// Tokens per block; routers must hash prompts with the same value.
    pub block_tokens: BlockTokens,
    /// Weight and KV dtype, e.g. `bf16`.
    pub dtype: String,
    /// Bytes of KV memory on this worker.
    pub kv_capacity_bytes: u64,
    /// Blocks that fit in that memory.
    pub kv_capacity_blocks: u64,
    /// Longest context one request may reach on this worker's shard group.
    pub max_context_tokens: u64,
    /// The current run of the worker; matches its KV events.
    pub epoch: Epoch,
    /// The shard group the worker belongs to.
    pub group: GroupId,
    /// The worker's position in its group.
    pub shard: ShardIndex,
    /// Workers in the group.
    pub shard_count: u32,
}

/// `GET /v1/load`: a worker's current load, for cost-based routing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadReport {
    /// Requests being decoded or prefilled.
    pub running: u32,
    /// Requests queued.
    pub waiting: u32,
    /// KV blocks in use on the device tier.
    pub kv_used_blocks: u64,
    /// KV blocks on the device tier.
    pub kv_total_blocks: u64,
    /// Prompt tokens still to prefill across queued and running requests.
    pub prefill_tokens_waiting: u64,
    /// Measured prefill speed in tokens per second (a moving average); 0 until the worker has
    /// prefilled something. The router's TTFT prediction divides uncached tokens by it.
    pub prefill_tokens_per_second: f64,
    /// Measured seconds to bring one block back from the host tier into the KV cache (a moving
    /// average); 0 until measured or without a host tier.
    pub host_block_secs: f64,
    /// The same from the disk tier (read, checksum, copy); 0 until measured or without one.
    pub disk_block_secs: f64,
    /// The same pulled from a peer worker (transfer, checksum, copy); 0 until measured.
    pub peer_block_secs: f64,
    /// Shutting down: it takes no new requests, but its blocks can still be pulled.
    pub draining: bool,
}

/// etcd value of `workers/<model>/<worker>`, bound to the worker's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRegistration {
    /// HTTP base URL of the worker, e.g. `http://10.0.0.7:8000`.
    pub address: String,
    /// The shard group the worker belongs to.
    pub group: GroupId,
    /// The worker's position in its group.
    pub shard: ShardIndex,
    /// Workers in the group.
    pub shard_count: u32,
    /// Tokens per block.
    pub block_tokens: BlockTokens,
    /// Bytes of KV memory on this worker.
    pub kv_capacity_bytes: u64,
}

/// etcd value of `models/<model>`, written by the operator: which `Model` resource serves the
/// name. The first Model to claim a served name holds it until it is deleted; another Model
/// asking for the same name (in any namespace) is refused, so two Models never share
/// registrations, pins or turn logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelClaim {
    pub namespace: String,
    pub name: String,
    /// The resource's `metadata.uid`: a Model deleted and created again under the same name
    /// is another claimant.
    pub uid: String,
}

/// etcd value of `sessions/<model>/<tenant>/<session>`: where the session's KV cache lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The shard group holding the session's blocks.
    pub group: GroupId,
    /// The worker of that group that coordinates the session.
    pub coordinator: WorkerId,
}

/// Per-tenant limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TenantLimits {
    /// Requests per minute.
    pub requests_per_minute: Option<u32>,
    /// Prompt plus completion tokens per minute.
    pub tokens_per_minute: Option<u64>,
    /// Requests in flight at once.
    pub max_concurrent: Option<u32>,
    /// Longest context (prompt plus completion) of one request.
    pub max_context_tokens: Option<u64>,
}

/// etcd value of `tenants/<tenant>`, written by the operator from the Tenant resource.
///
/// Only hashes of API keys are stored, never the keys: see [`TenantRecord::hash_api_key`].
/// The cache salt is a secret and has no default: a record without one (written before salts
/// were secret) does not parse, so its tenant is refused until the operator rewrites it, rather
/// than served under a guessable salt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    /// [`TenantRecord::hash_api_key`] of each accepted key.
    #[serde(default)]
    pub key_hashes: Vec<String>,
    /// Models the tenant may use; empty means all.
    #[serde(default)]
    pub allowed_models: Vec<ModelName>,
    /// The tenant's limits.
    #[serde(default)]
    pub limits: TenantLimits,
    /// Opt into the cache shared by every tenant that opts in (they share one salt).
    #[serde(default)]
    pub share_cache: bool,
    /// The salt of every block-hash chain of this tenant's prompts: its own random secret, or
    /// the one secret of the tenants that share their cache. Must be [`CacheSalt::is_secret`].
    pub cache_salt: CacheSalt,
}

/// Why a [`TenantRecord`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantRecordError {
    #[error("key hash `{0}` is not 64 hex digits (a BLAKE3 hash)")]
    BadKeyHash(String),
    #[error(
        "its cache salt is not a secret (at least {} characters of a random value are needed; \
         generate one with `head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'`)",
        CacheSalt::SECRET_CHARS
    )]
    WeakSalt,
}

impl TenantRecord {
    /// A record accepting `keys` (hashed here), with no limits, every model allowed and a fresh
    /// secret salt.
    pub fn with_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        TenantRecord {
            key_hashes: keys.into_iter().map(Self::hash_api_key).collect(),
            allowed_models: Vec::new(),
            limits: TenantLimits::default(),
            share_cache: false,
            cache_salt: CacheSalt::generate(),
        }
    }

    /// Checks what a router needs before using the record: well-formed key hashes and a secret
    /// salt.
    pub fn check(&self) -> Result<(), TenantRecordError> {
        if let Some(bad) = self
            .key_hashes
            .iter()
            .find(|h| h.len() != 64 || !h.bytes().all(|c| c.is_ascii_hexdigit()))
        {
            return Err(TenantRecordError::BadKeyHash(bad.clone()));
        }
        if !self.cache_salt.is_secret() {
            return Err(TenantRecordError::WeakSalt);
        }
        Ok(())
    }

    /// The stored form of an API key: 64 lowercase hex characters of the (unkeyed) BLAKE3 hash of
    /// its UTF-8 bytes. API keys are long random strings, so an unsalted fast hash suffices; what
    /// matters is that etcd and its backups never hold a usable key.
    pub fn hash_api_key(key: &str) -> String {
        blake3::hash(key.as_bytes()).to_hex().to_string()
    }

    /// Whether `key` is one of this tenant's keys.
    pub fn accepts_key(&self, key: &str) -> bool {
        let hashed = Self::hash_api_key(key);
        self.key_hashes.contains(&hashed)
    }

    /// Whether the tenant may use `model`.
    pub fn allows_model(&self, model: &ModelName) -> bool {
        self.allowed_models.is_empty() || self.allowed_models.contains(model)
    }
}

/// The `Content-Type` of a [`GenerateRequest`] in its binary form ([`GenerateRequest::to_binary`]):
/// what routers send, since a million-token prompt is 4 MB of ids this way and about 7 MB as JSON
/// numbers that must each be parsed. `POST /v1/generate` takes both.
pub const GENERATE_BINARY_CONTENT_TYPE: &str = "application/x-tidelock-generate";

/// The first bytes of a binary [`GenerateRequest`] (format version 1).
const GENERATE_BINARY_MAGIC: &[u8; 4] = b"TLG1";

/// Why a binary [`GenerateRequest`] could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BinaryRequestError {
    #[error("not a binary generate request (it must start with `TLG1`)")]
    Magic,
    #[error("the body ends inside its header ({0} bytes)")]
    Truncated(usize),
    #[error("the header is not a generate request: {0}")]
    Header(#[source] serde_json::Error),
    #[error("the header carries tokens; they go after it, as 4-byte little-endian ids")]
    TokensInHeader,
    #[error("{0} bytes of token ids is not a whole number of 4-byte ids")]
    Ragged(usize),
}

impl GenerateRequest {
    /// The binary form: `TLG1`, the header's length (u32, little-endian), the header (this
    /// request as JSON with `tokens` empty), then every token id as a little-endian u32.
    pub fn to_binary(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Header<'a> {
            request_id: &'a Option<String>,
            session: &'a Option<SessionKey>,
            cache_salt: &'a CacheSalt,
            tokens: [u32; 0],
            sampling: &'a SamplingParams,
            #[serde(skip_serializing_if = "Option::is_none")]
            pull: &'a Option<PullHint>,
        }
        let header = serde_json::to_vec(&Header {
            request_id: &self.request_id,
            session: &self.session,
            cache_salt: &self.cache_salt,
            tokens: [],
            sampling: &self.sampling,
            pull: &self.pull,
        })
        .expect("a generate request always serializes");
        let mut out = Vec::with_capacity(8 + header.len() + 4 * self.tokens.len());
        out.extend_from_slice(GENERATE_BINARY_MAGIC);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        for id in &self.tokens {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    /// Reads [`GenerateRequest::to_binary`]'s form.
    pub fn from_binary(body: &[u8]) -> Result<Self, BinaryRequestError> {
        let rest = body
            .strip_prefix(GENERATE_BINARY_MAGIC)
            .ok_or(BinaryRequestError::Magic)?;
        let (len, rest) = rest
            .split_first_chunk::<4>()
            .ok_or(BinaryRequestError::Truncated(body.len()))?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(BinaryRequestError::Truncated(body.len()));
        }
        let (header, ids) = rest.split_at(len);
        let mut request: GenerateRequest =
            serde_json::from_slice(header).map_err(BinaryRequestError::Header)?;
        if !request.tokens.is_empty() {
            return Err(BinaryRequestError::TokensInHeader);
        }
        if ids.len() % 4 != 0 {
            return Err(BinaryRequestError::Ragged(ids.len()));
        }
        request.tokens = ids
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use serde::de::DeserializeOwned;
    use serde_json::{Value, json};

    use super::*;

    /// Serialises `value`, parses it back, then parses it again with an extra unknown field.
    fn round_trip<T>(value: &T)
    where
        T: Serialize + DeserializeOwned + PartialEq + Debug,
    {
        let json = serde_json::to_value(value).unwrap();
        let back: T = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(&back, value, "round trip of {json}");

        let Value::Object(mut object) = json else {
            panic!("{} is not a JSON object", std::any::type_name::<T>());
        };
        object.insert("field_from_the_future".into(), json!({"nested": [1, 2]}));
        let extended = Value::Object(object);
        let back: T = serde_json::from_value(extended.clone()).unwrap();
        assert_eq!(&back, value, "unknown field in {extended}");
    }

    fn model(name: &str) -> ModelName {
        ModelName::new(name).unwrap()
    }

    fn group() -> GroupId {
        GroupId::new("smol-0").unwrap()
    }

    #[test]
    fn every_type_round_trips_and_ignores_unknown_fields() {
        let sampling = SamplingParams {
            temperature: 0.5,
            top_p: 0.9,
            top_k: Some(40),
            seed: Some(7),
            max_tokens: 16,
            stop_token_ids: vec![2],
            ignore_eos: true,
            logprobs: Some(5),
            n: 3,
            presence_penalty: 0.5,
            frequency_penalty: -1.0,
            logit_bias: [(7, -100.0), (42, 2.5)].into(),
            min_p: 0.05,
            constraint: Some(Constraint::JsonSchema {
                schema: serde_json::json!({"type": "object", "required": ["a"]}),
            }),
        };
        round_trip(&sampling);
        // Fields at their default are left out, so a worker from before them reads the rest.
        let plain = serde_json::to_value(SamplingParams::default()).unwrap();
        for field in [
            "n",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "min_p",
            "constraint",
        ] {
            assert!(plain.get(field).is_none(), "{field} in {plain}");
        }
        let biased = serde_json::to_value(&sampling).unwrap();
        assert_eq!(
            biased["logit_bias"],
            serde_json::json!({"7": -100.0, "42": 2.5})
        );
        round_trip(&SamplingParams::default());
        round_trip(&GenerateRequest {
            request_id: Some("r-1".into()),
            session: Some(SessionKey::new("chat-42").unwrap()),
            cache_salt: CacheSalt::new("tenant-a").unwrap(),
            tokens: vec![1, 2, 3],
            sampling,
            pull: None,
        });
        round_trip(&GenerateEvent::Tokens {
            ids: vec![5, 6],
            logprobs: Some(vec![-0.5, -1.25]),
            top_logprobs: Some(vec![
                vec![TopLogprob {
                    id: 5,
                    logprob: -0.5,
                }],
                vec![
                    TopLogprob {
                        id: 9,
                        logprob: -0.75,
                    },
                    TopLogprob {
                        id: 6,
                        logprob: -1.25,
                    },
                ],
            ]),
            choice: 0,
        });
        round_trip(&GenerateEvent::Tokens {
            ids: vec![5],
            logprobs: None,
            top_logprobs: None,
            choice: 0,
        });
        // A reader from before `top_logprobs` existed still reads the event.
        let old: GenerateEvent =
            serde_json::from_str(r#"{"type":"tokens","ids":[5],"logprobs":[-0.5]}"#).unwrap();
        assert_eq!(
            old,
            GenerateEvent::Tokens {
                ids: vec![5],
                logprobs: Some(vec![-0.5]),
                top_logprobs: None,
                choice: 0,
            }
        );
        round_trip(&GenerateEvent::Prefilled {
            prompt_tokens: 130,
            cached_tokens: 128,
        });
        // An answer other than the first names itself; the first leaves `choice` out.
        round_trip(&GenerateEvent::Tokens {
            ids: vec![5],
            logprobs: None,
            top_logprobs: None,
            choice: 2,
        });
        let line = serde_json::to_string(&GenerateEvent::Tokens {
            ids: vec![5],
            logprobs: None,
            top_logprobs: None,
            choice: 0,
        })
        .unwrap();
        assert!(!line.contains("choice"), "{line}");
        round_trip(&GenerateEvent::Ended {
            choice: 1,
            reason: FinishReason::Stop,
            completion_tokens: 12,
        });
        round_trip(&GenerateEvent::Finished {
            reason: FinishReason::Length,
            usage: Usage {
                prompt_tokens: 100,
                cached_tokens: 64,
                completion_tokens: 16,
            },
        });
        round_trip(&GenerateEvent::Error {
            code: ErrorCode::ContextTooLong,
            message: "too long".into(),
        });
        round_trip(&Usage::default());
        round_trip(&WorkerInfo {
            model: model("SmolLM2-135M-Instruct"),
            block_tokens: BlockTokens::DEFAULT,
            dtype: "bf16".into(),
            kv_capacity_bytes: 1 << 30,
            kv_capacity_blocks: 4096,
            max_context_tokens: 1 << 20,
            epoch: Epoch::new(u64::MAX),
            group: group(),
            shard: ShardIndex::new(1),
            shard_count: 2,
        });
        round_trip(&LoadReport {
            running: 3,
            waiting: 1,
            kv_used_blocks: 10,
            kv_total_blocks: 100,
            prefill_tokens_waiting: 512,
            prefill_tokens_per_second: 2500.5,
            host_block_secs: 0.000_25,
            disk_block_secs: 0.002,
            peer_block_secs: 0.003,
            draining: true,
        });
        round_trip(&WorkerRegistration {
            address: "http://127.0.0.1:8000".into(),
            group: group(),
            shard: ShardIndex::new(0),
            shard_count: 1,
            block_tokens: BlockTokens::DEFAULT,
            kv_capacity_bytes: 1 << 30,
        });
        round_trip(&SessionRecord {
            group: group(),
            coordinator: WorkerId::new("smol-0-0").unwrap(),
        });
        round_trip(&TenantLimits {
            requests_per_minute: Some(60),
            tokens_per_minute: Some(100_000),
            max_concurrent: None,
            max_context_tokens: Some(1 << 20),
        });
        round_trip(&TenantRecord {
            key_hashes: vec![TenantRecord::hash_api_key("sk-test")],
            allowed_models: vec![model("m")],
            limits: TenantLimits::default(),
            share_cache: true,
            cache_salt: CacheSalt::generate(),
        });
    }

    #[test]
    fn omitted_fields_take_defaults() {
        let request: GenerateRequest =
            serde_json::from_str(r#"{"cache_salt":"","tokens":[1]}"#).unwrap();
        assert_eq!(request.sampling, SamplingParams::default());
        assert_eq!(request.session, None);
        assert!(request.cache_salt.is_shared());
        assert!(
            serde_json::from_str::<GenerateRequest>(r#"{"tokens":[1]}"#).is_err(),
            "a missing cache salt must not default to the shared cache"
        );

        let sampling: SamplingParams = serde_json::from_str(r#"{"temperature":0}"#).unwrap();
        assert_eq!(sampling.temperature, 0.0);
        assert_eq!(sampling.max_tokens, 256);
        assert_eq!(sampling.top_p, 1.0);

        assert_eq!(
            serde_json::from_str::<LoadReport>("{}").unwrap(),
            LoadReport::default()
        );
        let usage: Usage =
            serde_json::from_str(r#"{"prompt_tokens":3,"completion_tokens":1}"#).unwrap();
        assert_eq!(usage.cached_tokens, 0);
    }

    #[test]
    fn stream_events_are_tagged_and_tolerant() {
        let line = serde_json::to_string(&GenerateEvent::Finished {
            reason: FinishReason::Cancelled,
            usage: Usage::default(),
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"type":"finished","reason":"cancelled","usage":{"prompt_tokens":0,"cached_tokens":0,"completion_tokens":0}}"#
        );
        assert_eq!(
            serde_json::from_str::<GenerateEvent>(r#"{"type":"heartbeat","at":1}"#).unwrap(),
            GenerateEvent::Unknown
        );
        assert_eq!(
            serde_json::from_str::<GenerateEvent>(
                r#"{"type":"error","code":"shard_lost","message":"m"}"#
            )
            .unwrap(),
            GenerateEvent::Error {
                code: ErrorCode::Unknown,
                message: "m".into()
            }
        );
        assert_eq!(
            serde_json::to_value(ErrorCode::InvalidRequest).unwrap(),
            "invalid_request"
        );
    }

    /// Every event reads back as written, with `type` first (as workers write it) or anywhere
    /// else; unknown fields are skipped, a missing `type` or field is an error.
    #[test]
    fn stream_events_read_back_wherever_the_tag_is() {
        let events = [
            GenerateEvent::Prefilled {
                prompt_tokens: 9,
                cached_tokens: 4,
            },
            GenerateEvent::Tokens {
                ids: vec![1, 2, 3],
                logprobs: Some(vec![-0.5, -1.0, -2.0]),
                top_logprobs: Some(vec![vec![TopLogprob {
                    id: 7,
                    logprob: -0.25,
                }]]),
                choice: 0,
            },
            GenerateEvent::Tokens {
                ids: vec![4],
                logprobs: None,
                top_logprobs: None,
                choice: 0,
            },
            GenerateEvent::Finished {
                reason: FinishReason::Length,
                usage: Usage {
                    prompt_tokens: 9,
                    cached_tokens: 4,
                    completion_tokens: 2,
                },
            },
            GenerateEvent::Error {
                code: ErrorCode::Overloaded,
                message: "busy".into(),
            },
        ];
        for event in events {
            let written = serde_json::to_value(&event).unwrap();
            let line = serde_json::to_string(&event).unwrap();
            assert!(line.starts_with(r#"{"type":"#), "{line}");
            assert_eq!(serde_json::from_str::<GenerateEvent>(&line).unwrap(), event);
            // The tag after the other fields (a JSON map sorts its keys: `later` comes first),
            // and a field this build does not know.
            let mut fields = written.as_object().unwrap().clone();
            let tag = fields.remove("type").unwrap();
            let mut reordered = serde_json::Map::new();
            reordered.insert("later".into(), serde_json::json!({"x": [1]}));
            reordered.extend(fields);
            reordered.insert("type".into(), tag);
            let line = serde_json::to_string(&reordered).unwrap();
            assert!(line.ends_with(r#"}"#) && !line.starts_with(r#"{"type""#));
            assert_eq!(serde_json::from_str::<GenerateEvent>(&line).unwrap(), event);
        }
        // Extra fields in the fast path too, and an unknown type whose fields clash with ours.
        assert_eq!(
            serde_json::from_str::<GenerateEvent>(
                r#"{"type":"prefilled","prompt_tokens":2,"new_field":[1,{}],"cached_tokens":1}"#
            )
            .unwrap(),
            GenerateEvent::Prefilled {
                prompt_tokens: 2,
                cached_tokens: 1
            }
        );
        assert_eq!(
            serde_json::from_str::<GenerateEvent>(r#"{"type":"later_kind","ids":"not ids"}"#)
                .unwrap(),
            GenerateEvent::Unknown
        );
        for bad in [
            r#"{"ids":[1]}"#,
            r#"{}"#,
            r#"{"type":"tokens"}"#,
            r#"{"type":"prefilled","prompt_tokens":"two","cached_tokens":1}"#,
            r#"{"prompt_tokens":2,"type":"prefilled"}"#,
            r#"["tokens"]"#,
        ] {
            assert!(
                serde_json::from_str::<GenerateEvent>(bad).is_err(),
                "{bad} should not parse"
            );
        }
    }

    #[test]
    fn sampling_validation_table() {
        let base = SamplingParams::default();
        let cases: Vec<(SamplingParams, Result<(), SamplingError>)> = vec![
            (base.clone(), Ok(())),
            (
                SamplingParams {
                    temperature: 0.0,
                    top_p: 1e-6,
                    top_k: Some(1),
                    logprobs: Some(20),
                    max_tokens: 1,
                    ..base.clone()
                },
                Ok(()),
            ),
            (
                SamplingParams {
                    temperature: 2.0,
                    ..base.clone()
                },
                Ok(()),
            ),
            (
                SamplingParams {
                    temperature: -0.1,
                    ..base.clone()
                },
                Err(SamplingError::Temperature(-0.1)),
            ),
            (
                SamplingParams {
                    temperature: 2.5,
                    ..base.clone()
                },
                Err(SamplingError::Temperature(2.5)),
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..base.clone()
                },
                Err(SamplingError::TopP(0.0)),
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..base.clone()
                },
                Err(SamplingError::TopP(1.5)),
            ),
            (
                SamplingParams {
                    top_k: Some(0),
                    ..base.clone()
                },
                Err(SamplingError::TopK),
            ),
            (
                SamplingParams {
                    max_tokens: 0,
                    ..base.clone()
                },
                Err(SamplingError::MaxTokens),
            ),
            (
                SamplingParams {
                    logprobs: Some(21),
                    ..base.clone()
                },
                Err(SamplingError::Logprobs(21)),
            ),
        ];
        for (params, expected) in cases {
            assert_eq!(params.validate(), expected, "{params:?}");
        }
        let nan = SamplingParams {
            temperature: f32::NAN,
            ..base.clone()
        };
        assert!(matches!(nan.validate(), Err(SamplingError::Temperature(_))));
        let nan = SamplingParams {
            top_p: f32::NAN,
            ..base
        };
        assert!(matches!(nan.validate(), Err(SamplingError::TopP(_))));
    }

    #[test]
    fn tenant_keys_are_stored_hashed() {
        let hashed = TenantRecord::hash_api_key("sk-test");
        assert_eq!(hashed.len(), 64);
        assert!(!hashed.contains("sk-test"));
        // Produced by tests/golden/gen_golden.py: stored hashes must not change either.
        assert_eq!(
            hashed,
            "bec91e294ce18c501ea770e9c1f9ce380ed8d87fabcfb4aa7295a5f7ab9a9938"
        );
        let record = TenantRecord {
            key_hashes: vec![hashed],
            ..TenantRecord::with_keys([])
        };
        assert!(record.accepts_key("sk-test"));
        assert!(!record.accepts_key("sk-other"));
        assert!(record.allows_model(&model("anything")));
        let limited = TenantRecord {
            allowed_models: vec![model("a")],
            ..record
        };
        assert!(limited.allows_model(&model("a")));
        assert!(!limited.allows_model(&model("b")));
    }

    #[test]
    fn a_tenant_record_needs_a_secret_salt() {
        let record = TenantRecord::with_keys(["sk-test-0123456789"]);
        assert_eq!(record.check(), Ok(()));
        assert!(record.accepts_key("sk-test-0123456789"));
        assert_ne!(
            record.cache_salt,
            TenantRecord::with_keys(["sk-test-0123456789"]).cache_salt,
            "every record gets its own salt"
        );
        // A record written before salts were secret has none: it does not parse at all.
        let old =
            json!({"key_hashes": [TenantRecord::hash_api_key("sk-test")], "share_cache": false});
        assert!(serde_json::from_value::<TenantRecord>(old.clone()).is_err());
        // Every other field has its default.
        let mut minimal = json!({"cache_salt": record.cache_salt});
        let parsed: TenantRecord = serde_json::from_value(minimal.take()).unwrap();
        assert!(parsed.key_hashes.is_empty() && !parsed.share_cache);
        for weak in ["", "tenant-a", "team-a/key-0123456789abcdefghi"] {
            let weak = TenantRecord {
                cache_salt: CacheSalt::new(weak).unwrap(),
                ..record.clone()
            };
            assert_eq!(weak.check(), Err(TenantRecordError::WeakSalt));
        }
        let bad = TenantRecord {
            key_hashes: vec!["not-hex".into()],
            ..record
        };
        assert_eq!(
            bad.check(),
            Err(TenantRecordError::BadKeyHash("not-hex".into()))
        );
    }

    #[test]
    fn generate_requests_round_trip_in_binary_and_bad_bodies_are_named() {
        let request = GenerateRequest {
            request_id: Some("r-1".into()),
            session: Some(SessionKey::new("s").unwrap()),
            cache_salt: CacheSalt::new("0123456789abcdef0123456789abcdef").unwrap(),
            tokens: vec![0, 1, 49_151, u32::MAX, 7],
            sampling: SamplingParams {
                max_tokens: 9,
                ..SamplingParams::default()
            },
            pull: Some(PullHint {
                from: "http://10.0.0.7:8000".into(),
                blocks: 12,
            }),
        };
        let binary = request.to_binary();
        // 4 bytes an id after the header, instead of JSON numbers.
        assert!(binary.ends_with(&7u32.to_le_bytes()));
        assert_eq!(GenerateRequest::from_binary(&binary).unwrap(), request);
        let empty = GenerateRequest {
            tokens: vec![],
            ..request.clone()
        };
        assert_eq!(
            GenerateRequest::from_binary(&empty.to_binary()).unwrap(),
            empty
        );
        let named = |body: &[u8]| GenerateRequest::from_binary(body).unwrap_err().to_string();
        assert!(named(b"{\"tokens\": []}").contains("TLG1"));
        assert!(named(&binary[..6]).contains("ends inside its header"));
        assert!(named(&binary[..binary.len() - 1]).contains("whole number"));
        let mut header_tokens = b"TLG1".to_vec();
        let header = serde_json::to_vec(&request).unwrap();
        header_tokens.extend_from_slice(&(header.len() as u32).to_le_bytes());
        header_tokens.extend_from_slice(&header);
        assert!(named(&header_tokens).contains("carries tokens"));
        let mut bad = b"TLG1".to_vec();
        bad.extend_from_slice(&2u32.to_le_bytes());
        bad.extend_from_slice(b"{}");
        assert!(named(&bad).contains("not a generate request"));
    }
}
