//! A step's next-token logits, where the backend computed them, and the reductions sampling
//! needs: this is where data crosses from the device to the host.
//!
//! The `cpu` backend (and the simulator) hand over host rows. The `candle` backend leaves the
//! `[rows, vocab]` logits on its device, and only what sampling asks for crosses:
//! - greedy rows: every row's arg-max and log-sum-exp, reduced on the device in one pass for the
//!   whole step (two numbers a row);
//! - requested top log-probabilities, and the candidates of a draw: the k best of one row
//!   (up to [`DEVICE_TOP_K`]), picked on the device, with the row's tempered mass (one number);
//! - the row itself only where a draw falls beyond those candidates, or top-k keeps more.

use std::borrow::Cow;
use std::cell::OnceCell;

use candle_core::{D, IndexOp, Tensor};
use tidelock_protocol::TopLogprob;

use crate::engine::sampling::{self, Sampled};
use crate::model::ModelError;

/// The most candidates of a draw picked on the device before the row is copied.
pub const DEVICE_TOP_K: usize = 64;

/// The logits of one step, per work item.
#[derive(Debug)]
pub struct StepLogits {
    /// Per work item, its row (`None`: it wanted no logits).
    index: Vec<Option<usize>>,
    rows: Rows,
}

#[derive(Debug)]
enum Rows {
    Host(Vec<Vec<f32>>),
    Device {
        /// `[rows, vocab]`, f32.
        logits: Tensor,
        /// Per row: the arg-max, its logit, and the log-sum-exp; reduced once, on first use.
        reduced: OnceCell<Vec<(u32, f32, f32)>>,
    },
}

impl StepLogits {
    /// Host rows, per work item.
    pub fn host(rows: Vec<Option<Vec<f32>>>) -> Self {
        let (index, kept) = indexed(rows);
        StepLogits {
            index,
            rows: Rows::Host(kept),
        }
    }

    /// Device tensors (`[1, vocab]` each), per work item.
    pub fn device(rows: Vec<Option<Tensor>>) -> Result<Self, ModelError> {
        let (index, mut kept) = indexed(rows);
        let logits = match kept.len() {
            0 => return Ok(Self::host(index.iter().map(|_| None).collect())),
            1 => kept.remove(0),
            _ => Tensor::cat(&kept, 0)?,
        };
        Ok(StepLogits {
            index,
            rows: Rows::Device {
                logits,
                reduced: OnceCell::new(),
            },
        })
    }

    /// Work items in the step.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Whether work item `item` has logits.
    pub fn has(&self, item: usize) -> bool {
        self.index[item].is_some()
    }

    /// Whether the rows are on a device (only reductions cross to the host).
    pub fn on_device(&self) -> bool {
        matches!(self.rows, Rows::Device { .. })
    }

    fn row_of(&self, item: usize) -> usize {
        self.index[item].expect("a work item that wanted logits")
    }

    /// Row `row`'s arg-max, its logit and its log-sum-exp: every row's reduced at once on first
    /// use (device rows only).
    fn reduced(&self, row: usize) -> Result<(u32, f32, f32), ModelError> {
        let Rows::Device { logits, reduced } = &self.rows else {
            unreachable!("only device rows are reduced on the device");
        };
        if let Some(all) = reduced.get() {
            return Ok(all[row]);
        }
        let best = logits.argmax_keepdim(D::Minus1)?;
        let max = logits
            .gather(&best, D::Minus1)?
            .squeeze(1)?
            .to_vec1::<f32>()?;
        let lse = logits.log_sum_exp(D::Minus1)?.to_vec1::<f32>()?;
        let best = best.squeeze(1)?.to_vec1::<u32>()?;
        let all: Vec<_> = best
            .into_iter()
            .zip(max)
            .zip(lse)
            .map(|((b, m), l)| (b, m, l))
            .collect();
        let one = all[row];
        let _ = reduced.set(all);
        Ok(one)
    }

    /// The most likely token of work item `item` and its log-probability.
    pub fn greedy(&self, item: usize) -> Result<Sampled, ModelError> {
        let row = self.row_of(item);
        match &self.rows {
            Rows::Host(rows) => {
                let token = sampling::argmax(&rows[row]);
                Ok(Sampled {
                    token: token as u32,
                    logprob: sampling::log_softmax_at(&rows[row], token),
                })
            }
            Rows::Device { .. } => {
                let (token, max, lse) = self.reduced(row)?;
                Ok(Sampled {
                    token,
                    logprob: max - lse,
                })
            }
        }
    }

    /// The `n` most likely tokens of work item `item` with their log-probabilities, most likely
    /// first (the lower id first among equals).
    pub fn top(&self, item: usize, n: usize) -> Result<Vec<TopLogprob>, ModelError> {
        let row = self.row_of(item);
        match &self.rows {
            Rows::Host(rows) => Ok(sampling::top_logprobs(&rows[row], n)),
            Rows::Device { logits, .. } => {
                let (_, _, lse) = self.reduced(row)?;
                let values = logits.i(row)?;
                let vocab = values.dim(0)?;
                let n = n.min(vocab);
                if n == 0 {
                    return Ok(Vec::new());
                }
                // n passes of arg-max, each hiding the last winner: n numbers cross, not the row.
                let ids = Tensor::arange(0u32, vocab as u32, values.device())?;
                let hidden = Tensor::full(f32::NEG_INFINITY, vocab, values.device())?;
                let mut rest = values.clone();
                let mut picked = Vec::with_capacity(n);
                for _ in 0..n {
                    let best = rest.argmax_keepdim(0)?;
                    rest = ids.broadcast_eq(&best)?.where_cond(&hidden, &rest)?;
                    picked.push(best);
                }
                let picked = Tensor::cat(&picked, 0)?;
                let chosen = values.gather(&picked, 0)?.to_vec1::<f32>()?;
                let picked = picked.to_vec1::<u32>()?;
                let mut top: Vec<TopLogprob> = picked
                    .into_iter()
                    .zip(chosen)
                    .map(|(id, logit)| TopLogprob {
                        id,
                        logprob: logit - lse,
                    })
                    .collect();
                top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob).then(a.id.cmp(&b.id)));
                Ok(top)
            }
        }
    }

    /// `sum exp((logit - max) / temperature)` over the row of work item `item`: the tempered
    /// mass a draw divides, reduced where the row is.
    pub fn tempered_mass(&self, item: usize, temperature: f32) -> Result<f32, ModelError> {
        let row = self.row_of(item);
        match &self.rows {
            Rows::Host(rows) => {
                let max = rows[row].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                Ok(rows[row]
                    .iter()
                    .map(|l| ((l - max) / temperature).exp())
                    .sum())
            }
            Rows::Device { logits, .. } => {
                let (_, max, _) = self.reduced(row)?;
                let shifted = (logits.i(row)? - f64::from(max))?;
                Ok((shifted / f64::from(temperature))?
                    .exp()?
                    .sum_all()?
                    .to_scalar::<f32>()?)
            }
        }
    }

    /// The whole row of work item `item` (from a device: copied to the host).
    pub fn row(&self, item: usize) -> Result<Cow<'_, [f32]>, ModelError> {
        let row = self.row_of(item);
        match &self.rows {
            Rows::Host(rows) => Ok(Cow::Borrowed(&rows[row])),
            Rows::Device { logits, .. } => Ok(Cow::Owned(logits.i(row)?.to_vec1::<f32>()?)),
        }
    }

    /// Each work item's row, on the host (tests and tools that compare logits).
    pub fn to_rows(&self) -> Result<Vec<Option<Vec<f32>>>, ModelError> {
        (0..self.len())
            .map(|i| match self.has(i) {
                true => Ok(Some(self.row(i)?.into_owned())),
                false => Ok(None),
            })
            .collect()
    }
}

/// The rows present, in order, and each work item's place among them.
fn indexed<T>(rows: Vec<Option<T>>) -> (Vec<Option<usize>>, Vec<T>) {
    let mut kept = Vec::new();
    let index = rows
        .into_iter()
        .map(|row| {
            row.map(|r| {
                kept.push(r);
                kept.len() - 1
            })
        })
        .collect();
    (index, kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const ROWS: [[f32; 6]; 2] = [
        [1.0, 3.0, 2.5, -1.0, 3.0, 0.0],
        [0.5, -2.0, 4.0, 1.0, 1.5, 2.0],
    ];

    fn both() -> (StepLogits, StepLogits) {
        let host = StepLogits::host(vec![Some(ROWS[0].to_vec()), None, Some(ROWS[1].to_vec())]);
        let t = |r: &[f32; 6]| Tensor::from_slice(r, (1, 6), &Device::Cpu).unwrap();
        let device = StepLogits::device(vec![Some(t(&ROWS[0])), None, Some(t(&ROWS[1]))]).unwrap();
        (host, device)
    }

    /// What the device reduces is what the host computes from the whole row.
    #[test]
    fn device_reductions_match_the_host_rows() {
        let (host, device) = both();
        assert!(device.on_device() && !host.on_device());
        assert!(!device.has(1) && device.has(2));
        for item in [0, 2] {
            let (h, d) = (host.greedy(item).unwrap(), device.greedy(item).unwrap());
            assert_eq!(h.token, d.token);
            assert!((h.logprob - d.logprob).abs() < 1e-6, "{h:?} {d:?}");
            for n in [0, 1, 3, 6, 9] {
                let (h, d) = (host.top(item, n).unwrap(), device.top(item, n).unwrap());
                assert_eq!(
                    h.iter().map(|t| t.id).collect::<Vec<_>>(),
                    d.iter().map(|t| t.id).collect::<Vec<_>>(),
                    "item {item}, n {n}"
                );
                for (a, b) in h.iter().zip(&d) {
                    assert!((a.logprob - b.logprob).abs() < 1e-6);
                }
            }
            assert_eq!(host.row(item).unwrap(), device.row(item).unwrap());
        }
        // Ties (tokens 1 and 4 of row 0): the lower id first.
        let top = device.top(0, 2).unwrap();
        assert_eq!((top[0].id, top[1].id), (1, 4));
    }
}
