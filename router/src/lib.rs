//! `tidelock-router` as a library: the router's pure core, tested without a network.
//!
//! So far (issue #4): the KV index (`index`), the task that keeps it current with each worker's
//! event stream (`follow`), the worker set of a model from the StateStore (`discovery`), and the
//! tokenizer and chat template fetched from a worker (`prompt`). The HTTP front end and the placement policy arrive later and
//! build on them. The binary (`main.rs`) still says that the router is not implemented.

pub mod discovery;
pub mod follow;
mod http;
pub mod index;
pub mod policy;
pub mod prompt;

pub use index::{Applied, IndexError, KvIndex, MAX_WORKERS, Resync, TierCounts, WorkerMatch};
