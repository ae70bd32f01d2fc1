//! Test support (feature `testing`): a real etcd server on a free loopback port, and the
//! conformance suite that every [`StateStore`](crate::StateStore) implementation must pass.

pub mod conformance;
mod etcd_server;

pub use conformance::{EtcdFixture, Fixture, MemoryFixture};
pub use etcd_server::{EtcdServer, free_port};
