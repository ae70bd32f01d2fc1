//! Shared by the worker's integration tests: where the default model is, and prompts that look
//! like text to it (see `tidelock_worker::testing`, which the router's tests use too).

#![allow(unused_imports)] // Each test file uses its own subset.

pub use tidelock_worker::testing::{model_path, tokens};
