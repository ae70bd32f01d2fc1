//! Tidelock's cluster state: workers, session pins and tenants live here (see the etcd key layout
//! in `tidelock-protocol`).
//!
//! One trait, [`StateStore`], with two implementations that behave the same: [`MemoryStore`] for
//! the local cluster and unit tests, [`EtcdStore`] for real clusters, over TLS with a client
//! certificate where etcd asks for one ([`EtcdTls`]). The `testing` feature adds a real etcd
//! server (plain or TLS with client authentication) for tests and the conformance suite both
//! implementations pass; the `clap` feature the etcd TLS flags of the binaries.

mod error;
mod etcd;
mod memory;
mod store;
mod tls;
mod types;

#[cfg(feature = "testing")]
pub mod testing;

pub use error::StateError;
pub use etcd::{EtcdConfig, EtcdStore};
pub use memory::MemoryStore;
pub use store::{LeaseKeeper, StateStore, WatchStream};
pub use tls::{ClientIdentity, EtcdTls};
#[cfg(feature = "clap")]
pub use tls::{EtcdFlagError, EtcdTlsArgs};
pub use types::{
    CasOutcome, Expected, KeyValue, LeaseId, Listing, Revision, WatchEvent, dir_prefix,
};
