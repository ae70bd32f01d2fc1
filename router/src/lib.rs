//! `tidelock-router` as a library, so that component tests build the whole router without a
//! network (`app::app(state)` driven with `oneshot`) and the binary (`main.rs`) only parses its
//! configuration and wires the parts:
//!
//! - `app`: the OpenAI API and probes; one request's path from key to streamed answer;
//! - `tenants`, `limits`: who is calling and what they may do;
//! - `workers`: the models served and their workers' live state (load, health, ejection);
//!   `discovery` and `follow` keep each model's worker set and KV `index` current;
//! - `placement`: where a request goes, from its block chain to the pin written where it
//!   landed; `policy`: the decision itself (pure); `handoff`: where a draining worker's sessions go;
//!   `sessions`: session pins in the StateStore;
//!   `turns`: the sessions' answered turns shared by the replicas through the StateStore;
//! - `proxy`: the request to a worker, retried before its first token, streamed after;
//! - `prompt`: the tokenizer and chat template fetched from a worker; `metrics`.

pub mod app;
pub mod config;
pub mod cpu;
pub mod discovery;
pub mod follow;
pub mod handoff;
pub mod http;
pub mod index;
pub mod limits;
pub mod metrics;
pub mod placement;
pub mod policy;
pub mod prompt;
pub mod proxy;
pub mod sessions;
pub mod tenants;
pub mod turns;
pub mod workers;

pub use index::{Applied, IndexError, KvIndex, MAX_WORKERS, Resync, TierCounts, WorkerMatch};
