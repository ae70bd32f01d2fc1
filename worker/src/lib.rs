//! The Tidelock worker: a model on candle-core over a paged KV store.
//!
//! Module map:
//! - `model`: the Llama-family runtime (config, GGUF loading, batched forward);
//! - `kv`: the paged KV store, the paged attention kernel, and the block pool (prefix cache,
//!   LRU eviction, KV events);
//! - `engine`: continuous batching with chunked prefill and preemption, and sampling.
//!
//! The block pool (prefix cache, eviction, events), the scheduler and the HTTP server follow in
//! later increments of issue #3; the binary refuses to serve until they exist.

pub mod engine;
pub mod kv;
pub mod model;
