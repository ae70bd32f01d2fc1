//! The contracts between Tidelock's router and its workers: the block-hash chain rule that names
//! cached KV blocks, the KV events a worker streams to routers, the router<->worker wire types,
//! the OpenAI-compatible API types (`openai`; its `Usage` and `sse_data` are reached through the
//! module, beside the wire `Usage`), the JSON records kept in etcd, the etcd key layout and the
//! cluster credential of the internal APIs (`credential`). Every process hashes, parses and builds
//! keys through this crate and nowhere else. Changing anything here is a contract change: the
//! golden vectors in `hash` pin the hash rule and must be updated deliberately (with
//! `tests/golden/gen_golden.py`), never to make a test pass.

pub mod binary;
pub mod blocks;
pub mod credential;
pub mod events;
pub mod hash;
pub mod ids;
pub mod keys;
pub mod openai;
pub mod shard;
pub mod wire;

pub use credential::{ClusterToken, ClusterTokenError};
pub use events::{Continuity, KvEvent, KvEventBatch, KvSnapshot, SnapshotBlock, Tier, classify};
pub use hash::{BlockHash, BlockTokens, HashChain, HashError, block_hashes};
pub use ids::{
    BlockId, CacheSalt, Epoch, GroupId, IdError, ModelName, SessionKey, ShardIndex, TenantId,
    WorkerId,
};
pub use keys::{KeyLayout, TurnKey, escape_segment, unescape_segment};
pub use openai::{
    ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessageIn, Completion,
    CompletionChunk, CompletionRequest, ModelCard, ModelList, OpenAiError, ResponseMeta,
};
pub use wire::{
    AdoptReply, AdoptRequest, BinaryRequestError, BlocksRequest, Constraint, DRAINING, ErrorCode,
    FinishReason, GENERATE_BINARY_CONTENT_TYPE, GenerateEvent, GenerateRequest, HandoffPeer,
    HandoffPlan, LoadReport, MAX_PULL_BLOCKS, ModelClaim, PullHint, SamplingError, SamplingParams,
    SessionRecord, TenantLimits, TenantRecord, TenantRecordError, TopLogprob, Usage, WorkerInfo,
    WorkerRegistration,
};
