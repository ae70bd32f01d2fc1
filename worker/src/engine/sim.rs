//! The simulated executor: the real scheduler, block pool and events, with the model math
//! replaced by a timing model and deterministic pseudo-random tokens.
//!
//! It holds no KV tensors, only block bookkeeping, so dozens of simulated workers fit on one
//! machine for routing tests and benchmarks. The next token depends only on the last token and
//! its position, so identical prompts produce identical completions, on any worker.

use std::time::Duration;

use tidelock_protocol::BlockId;
use tidelock_protocol::blocks::{Arrangement, BlockLayout, KvDtype};

use crate::engine::executor::{Executor, Work};
use crate::engine::logits::StepLogits;
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

    /// What the model predicts for a step of `prefill_tokens` prefill tokens and
    /// `decode_sequences` decoding sequences.
    pub fn predict(&self, prefill_tokens: usize, decode_sequences: usize) -> Duration {
        self.step
            + self.per_prefill_token * prefill_tokens as u32
            + self.per_decode_sequence * decode_sequences as u32
    }

    /// Least-squares fit (of relative error) of `step + per_prefill_token * P +
    /// per_decode_sequence * D` to measured steps (the calibration of `examples/calibrate_sim`). Coefficients that come out
    /// negative (noise) are clamped to zero. `None` with fewer than three samples or when the
    /// samples do not vary both P and D.
    pub fn fit(samples: &[StepSample]) -> Option<Timing> {
        // Normal equations A^T A c = A^T t for rows (1, P, D).
        let mut ata = [[0.0f64; 3]; 3];
        let mut att = [0.0f64; 3];
        for s in samples.iter().filter(|s| s.seconds > 0.0) {
            // Each row scaled by 1/t: minimises relative error, so millisecond decode steps
            // count as much as second-long prefills.
            let w = 1.0 / s.seconds;
            let row = [
                w,
                w * s.prefill_tokens as f64,
                w * s.decode_sequences as f64,
            ];
            for i in 0..3 {
                for j in 0..3 {
                    ata[i][j] += row[i] * row[j];
                }
                att[i] += row[i];
            }
        }
        let c = solve3(ata, att)?;
        let secs = |v: f64| Duration::from_secs_f64(v.max(0.0));
        Some(Timing {
            step: secs(c[0]),
            per_prefill_token: secs(c[1]),
            per_decode_sequence: secs(c[2]),
        })
    }
}

/// One measured step of the real engine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSample {
    pub prefill_tokens: usize,
    pub decode_sequences: usize,
    pub seconds: f64,
}

/// Solves a 3x3 linear system by Gaussian elimination with partial pivoting.
fn solve3(mut a: [[f64; 3]; 3], mut b: [f64; 3]) -> Option<[f64; 3]> {
    for col in 0..3 {
        let pivot = (col..3).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..3 {
            let f = a[row][col] / a[col][col];
            let pivot_row = a[col];
            for (x, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0.0f64; 3];
    for row in (0..3).rev() {
        let tail: f64 = (row + 1..3).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - tail) / a[row][row];
    }
    Some(x)
}

/// Tokens the simulator never produces below this id (special tokens live there).
const FIRST_ORDINARY_TOKEN: u64 = 32;

/// The simulated executor.
#[derive(Debug, Clone)]
pub struct SimExecutor {
    vocab_size: usize,
    timing: Timing,
    /// Simulated time to copy one block from a lower tier into the store.
    block_load: Duration,
}

/// The simulator's blocks as the tiers see them: 8 bytes each (its block id), so a simulated
/// cluster spills and loads for real without holding KV bytes.
const SIM_LAYOUT: BlockLayout = BlockLayout {
    layers: 1,
    kv_heads: 1,
    head_dim: 1,
    block_tokens: 1,
    dtype: KvDtype::F32,
    arrangement: Arrangement::HeadMajor,
};

impl SimExecutor {
    pub fn new(vocab_size: usize, timing: Timing) -> Self {
        SimExecutor {
            vocab_size,
            timing,
            block_load: Duration::ZERO,
        }
    }

    /// Takes `per_block` on the engine thread for each block loaded from a lower tier, as the
    /// copy into a real store does (and is measured, and reported to routers, the same way).
    pub fn with_block_load(mut self, per_block: Duration) -> Self {
        self.block_load = per_block;
        self
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
    fn run(&mut self, work: &[Work<'_>]) -> Result<StepLogits, ModelError> {
        let decoding = work
            .iter()
            .filter(|w| w.tokens.len() == 1 && w.wants_logits)
            .count();
        let prefill: usize = work
            .iter()
            .filter(|w| !(w.tokens.len() == 1 && w.wants_logits))
            .map(|w| w.tokens.len())
            .sum();
        let cost = self.timing.predict(prefill, decoding);
        if !cost.is_zero() {
            std::thread::sleep(cost);
        }
        Ok(StepLogits::host(
            work.iter()
                .map(|w| {
                    w.wants_logits.then(|| {
                        let last = *w.tokens.last().unwrap_or(&0);
                        let mut row = vec![0.0f32; self.vocab_size];
                        row[self.next_token(last, w.start + w.tokens.len()) as usize] = 20.0;
                        row
                    })
                })
                .collect(),
        ))
    }

    fn block_layout(&self) -> Option<BlockLayout> {
        Some(SIM_LAYOUT)
    }

    fn export_block(&self, block: BlockId, out: &mut Vec<u8>) -> Result<(), ModelError> {
        out.extend_from_slice(&u64::from(block.get()).to_le_bytes());
        Ok(())
    }

    fn import_block(&mut self, block: BlockId, payload: &[u8]) -> Result<(), ModelError> {
        if payload.len() as u64 != SIM_LAYOUT.payload_bytes() {
            return Err(ModelError::Input(format!(
                "block {block}: a payload of {} bytes for the simulator's 8",
                payload.len()
            )));
        }
        if !self.block_load.is_zero() {
            std::thread::sleep(self.block_load);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_recovers_a_known_timing_from_noisy_steps() {
        let truth = Timing {
            step: Duration::from_micros(3_000),
            per_prefill_token: Duration::from_micros(400),
            per_decode_sequence: Duration::from_micros(1_500),
        };
        let mut samples = Vec::new();
        for (i, (p, d)) in [
            (0, 1),
            (0, 2),
            (0, 4),
            (0, 8),
            (64, 0),
            (256, 0),
            (512, 0),
            (128, 4),
        ]
        .into_iter()
        .enumerate()
        {
            // +-1% deterministic noise.
            let noise = 1.0 + if i % 2 == 0 { 0.01 } else { -0.01 };
            samples.push(StepSample {
                prefill_tokens: p,
                decode_sequences: d,
                seconds: truth.predict(p, d).as_secs_f64() * noise,
            });
        }
        let fit = Timing::fit(&samples).expect("fit");
        let close = |a: Duration, b: Duration| {
            (a.as_secs_f64() - b.as_secs_f64()).abs() <= 0.05 * b.as_secs_f64()
        };
        assert!(
            close(fit.per_prefill_token, truth.per_prefill_token),
            "{fit:?}"
        );
        assert!(
            close(fit.per_decode_sequence, truth.per_decode_sequence),
            "{fit:?}"
        );
        assert!(
            (fit.step.as_secs_f64() - truth.step.as_secs_f64()).abs() < 0.001,
            "{fit:?}"
        );
    }

    #[test]
    fn fit_refuses_samples_that_do_not_vary() {
        let same = StepSample {
            prefill_tokens: 0,
            decode_sequences: 4,
            seconds: 0.01,
        };
        assert_eq!(Timing::fit(&[same; 5]), None);
        assert_eq!(Timing::fit(&[]), None);
    }
}
