//! Shared by the worker's integration tests: where the default model is, and prompts that look
//! like text to it.

#![allow(dead_code)] // Each test file uses its own subset.

use std::path::PathBuf;

/// The default model: `$TIDELOCK_MODEL`, else the cache `./scripts/test` fills. Panics with
/// instructions when it is missing, never skips.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("TIDELOCK_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/tidelock/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.is_file(),
        "the default model is not at {} (run ./scripts/test, which fetches it, or set TIDELOCK_MODEL)",
        path.display()
    );
    path
}

/// `n` token ids from the vocabulary's word range, a fixed walk per `seed`.
pub fn tokens(n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            17 + ((s >> 33) % 20_000) as u32
        })
        .collect()
}
