//! The simulated executor: the real scheduler, block pool and events, with the model math
//! replaced by a timing model and deterministic pseudo-random tokens.
//!
//! It holds no KV tensors, only block bookkeeping, so dozens of simulated workers fit on one
//! machine for routing tests and benchmarks. The next token depends only on the last token and
//! its position, so identical prompts produce identical completions, on any worker.

use std::time::Duration;

use crate::engine::executor::{Executor, Work};
use crate::model::ModelError;

/// How long a simulated step takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// Fixed cost of a step.
    pub step: Duration,
    /// Added per prefill token.
    pub per_prefill_token: Duration,
    /// Added per decoding sequence.
    pub per_decode_sequence: Duration,
}

impl Timing {
    /// No waiting at all: for tests.
    pub const INSTANT: Timing = Timing {
        step: Duration::ZERO,
        per_prefill_token: Duration::ZERO,
        per_decode_sequence: Duration::ZERO,
    };
}

/// Tokens the simulator never produces below this id (special tokens live there).
const FIRST_ORDINARY_TOKEN: u64 = 32;

/// The simulated executor.
#[derive(Debug, Clone)]
pub struct SimExecutor {
    vocab_size: usize,
    timing: Timing,
}

impl SimExecutor {
    pub fn new(vocab_size: usize, timing: Timing) -> Self {
        SimExecutor { vocab_size, timing }
    }

    /// The token the simulator produces after `last` at `position`.
    pub fn next_token(&self, last: u32, position: usize) -> u32 {
        let mut x = u64::from(last) ^ ((position as u64) << 32) ^ 0x9e37_79b9_7f4a_7c15;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        let span = (self.vocab_size as u64)
            .saturating_sub(FIRST_ORDINARY_TOKEN)
            .max(1);
        (FIRST_ORDINARY_TOKEN + x % span) as u32
    }
}

impl Executor for SimExecutor {
    fn run(&mut self, work: &[Work<'_>]) -> Result<Vec<Option<Vec<f32>>>, ModelError> {
        let mut cost = self.timing.step;
        for w in work {
            if w.tokens.len() == 1 && w.wants_logits {
                cost += self.timing.per_decode_sequence;
            } else {
                cost += self.timing.per_prefill_token * w.tokens.len() as u32;
            }
        }
        if !cost.is_zero() {
            std::thread::sleep(cost);
        }
        Ok(work
            .iter()
            .map(|w| {
                w.wants_logits.then(|| {
                    let last = *w.tokens.last().unwrap_or(&0);
                    let mut row = vec![0.0f32; self.vocab_size];
                    row[self.next_token(last, w.start + w.tokens.len()) as usize] = 20.0;
                    row
                })
            })
            .collect())
    }
}
