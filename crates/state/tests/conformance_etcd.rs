//! The conformance suite against a real etcd server, started per test on a free loopback port.

use tidelock_state::testing::EtcdFixture;

tidelock_state::conformance_suite!(EtcdFixture::new());
