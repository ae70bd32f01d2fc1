//! `tidelock-router` as a library: the router's pure core, tested without a network.
//!
//! Only the KV index exists so far (issue #4); the HTTP front end, placement policy and worker
//! event subscriptions arrive later and will build on it. The binary (`main.rs`) still says that
//! the router is not implemented.

pub mod index;

pub use index::{Applied, IndexError, KvIndex, MAX_WORKERS, Resync, TierCounts, WorkerMatch};
