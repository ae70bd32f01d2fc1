//! Test support (feature `testing`): a real etcd server on a free loopback port (plain, or TLS
//! with client authentication and certificates made by [`TestPki`]), and the conformance suite
//! that every [`StateStore`](crate::StateStore) implementation must pass.

pub mod conformance;
mod etcd_server;
mod pki;

pub use conformance::{EtcdFixture, Fixture, MemoryFixture};
pub use etcd_server::{EtcdServer, free_port};
pub use pki::TestPki;
