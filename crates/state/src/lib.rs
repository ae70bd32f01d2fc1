//! Tidelock's cluster state: workers, session pins and tenants live here (see the etcd key layout
//! in `tidelock-protocol`).
//!
//! One trait, [`StateStore`], with two implementations that behave the same: [`MemoryStore`] for
//! the local cluster and unit tests, [`EtcdStore`] for real clusters. The `testing` feature adds a
//! real etcd server for tests and the conformance suite both implementations pass.

mod error;
mod etcd;
mod memory;
mod store;
mod types;

#[cfg(feature = "testing")]
pub mod testing;

pub use error::StateError;
pub use etcd::{EtcdConfig, EtcdStore};
pub use memory::MemoryStore;
pub use store::{LeaseKeeper, StateStore, WatchStream};
pub use types::{
    CasOutcome, Expected, KeyValue, LeaseId, Listing, Revision, WatchEvent, dir_prefix,
};
