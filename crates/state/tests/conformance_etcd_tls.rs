//! The conformance suite against a real etcd that serves https only and requires a client
//! certificate (`--client-cert-auth`), as the chart's bundled etcd does: every operation, watches
//! across a restart included, behaves the same over TLS.

use tidelock_state::testing::EtcdFixture;

tidelock_state::conformance_suite!(EtcdFixture::new_tls());
