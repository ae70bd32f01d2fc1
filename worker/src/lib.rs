//! The Tidelock worker: a model on candle-core over a paged KV store.
//!
//! Module map:
//! - `model`: the Llama-family runtime (config, GGUF and Hugging Face loading, tiny seeded test
//!   models, batched forward);
//! - `kv`: the paged KV stores (host pages for the `cpu` backend, device tensors for `candle`),
//!   the attention boundary the model calls per layer (`kv::backend`), the paged attention
//!   kernels, and the block pool (prefix cache, LRU eviction, KV events);
//! - `engine`: continuous batching with chunked prefill and preemption, the step's logits where
//!   the backend left them (`engine::logits`), and sampling.
//!
//! - `config`: command line and environment;
//! - `server`: the HTTP surface, the engine's thread, metrics;
//! - `registration`: the worker's record in the cluster state, kept alive by a lease.

pub mod config;
pub mod engine;
pub mod kv;
pub mod model;
pub mod registration;
pub mod server;
pub mod shard_rpc;
pub mod testing;
