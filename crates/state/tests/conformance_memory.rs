//! The conformance suite against the in-memory store.

use tidelock_state::testing::MemoryFixture;

tidelock_state::conformance_suite!(MemoryFixture::new());
