//! Next-token choice: greedy, or temperature / top-k / min-p / top-p sampling from a seeded
//! generator, after the request's adjustments of the logits (presence and frequency penalties
//! on the tokens the answer has generated, logit biases).
//!
//! The same seed and the same logits always give the same token (the generator is per request and
//! advances once per sampled token). Log-probabilities are those of the model's own distribution
//! (a log-softmax of the raw logits), independent of temperature, truncation, penalties and
//! biases, as vLLM reports them by default.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidelock_protocol::{SamplingParams, TopLogprob};

use crate::engine::grammar::{self, Guide};
use crate::engine::logits::{DEVICE_TOP_K, StepLogits};
use crate::model::ModelError;

/// Picks tokens for one request.
#[derive(Debug)]
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    top_k: Option<usize>,
    min_p: f32,
    /// Penalties and biases; `None` when the request has neither (and no `min_p`): without a
    /// guide either, the row is then used as the model left it, on the device when it is there.
    adjust: Option<Adjust>,
    /// The constraint's matcher: tokens it does not allow are never drawn.
    guide: Option<Guide>,
    rng: StdRng,
}

/// What changes a row of logits before a token is chosen.
#[derive(Debug)]
struct Adjust {
    presence: f32,
    frequency: f32,
    bias: Vec<(usize, f32)>,
    /// Times each generated token has been chosen so far.
    counts: HashMap<u32, u32>,
}

impl Adjust {
    /// Whether generated tokens cost anything (only then are they counted).
    fn penalises(&self) -> bool {
        self.presence != 0.0 || self.frequency != 0.0
    }

    /// `logits` with the biases added and the penalties subtracted.
    fn apply(&self, logits: &[f32]) -> Vec<f32> {
        let mut row = logits.to_vec();
        for &(token, bias) in &self.bias {
            if let Some(l) = row.get_mut(token) {
                *l += bias;
            }
        }
        for (&token, &count) in &self.counts {
            if let Some(l) = row.get_mut(token as usize) {
                *l -= self.presence + self.frequency * count as f32;
            }
        }
        row
    }
}

/// The next token and, when asked, the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub sampled: Sampled,
    pub top: Option<Vec<TopLogprob>>,
}

/// One choice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-probability of `token` under the model's distribution.
    pub logprob: f32,
}

impl Sampler {
    /// The sampler of a request's first (or only) answer.
    pub fn new(params: &SamplingParams) -> Self {
        Self::for_choice(params, 0)
    }

    /// The sampler of answer `choice` of a request for several: with a seed, answer `i` draws
    /// from `seed + i`, so the answers differ and each is reproducible.
    pub fn for_choice(params: &SamplingParams, choice: u32) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed.wrapping_add(u64::from(choice))),
            None => StdRng::from_os_rng(),
        };
        let adjust = params.adjusts_logits().then(|| Adjust {
            presence: params.presence_penalty,
            frequency: params.frequency_penalty,
            bias: params
                .logit_bias
                .iter()
                .map(|(&t, &b)| (t as usize, b))
                .collect(),
            counts: HashMap::new(),
        });
        Sampler {
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k.map(|k| k as usize),
            min_p: params.min_p,
            adjust,
            guide: None,
            rng,
        }
    }

    /// The sampler drawing only what `guide` allows (constrained decoding).
    pub fn with_guide(mut self, guide: Guide) -> Self {
        self.guide = Some(guide);
        self
    }

    /// Chooses the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let mut adjusted = self.adjust.as_ref().map(|a| a.apply(logits));
        if let Some(guide) = &mut self.guide {
            let row = adjusted.get_or_insert_with(|| logits.to_vec());
            grammar::apply_mask(row, &guide.mask());
        }
        let row = adjusted.as_deref().unwrap_or(logits);
        let token = if self.temperature <= 0.0 {
            argmax(row)
        } else {
            self.draw(row)
        };
        if let Some(adjust) = self.adjust.as_mut().filter(|a| a.penalises()) {
            *adjust.counts.entry(token as u32).or_default() += 1;
        }
        if let Some(guide) = &mut self.guide {
            guide.advance(token as u32);
        }
        Sampled {
            token: token as u32,
            logprob: log_softmax_at(logits, token),
        }
    }

    /// Chooses the next token of work item `item` of a step, and the `top_n` most likely tokens
    /// when asked. From a device only what this needs crosses (see [`StepLogits`]): a greedy
    /// row's token; for a draw, the [`DEVICE_TOP_K`] most likely tokens and the tempered mass of
    /// the whole row, the row itself only when the draw falls beyond those candidates (or top-k
    /// keeps more of them). The same seed gives the tokens [`Self::sample`] gives on the row (up
    /// to the rounding of the mass, summed in another order on the device).
    pub fn choose(
        &mut self,
        logits: &StepLogits,
        item: usize,
        top_n: Option<usize>,
    ) -> Result<Choice, ModelError> {
        let sampled = if self.adjust.is_some() || self.guide.is_some() {
            self.sample(&logits.row(item)?)
        } else if self.temperature <= 0.0 {
            logits.greedy(item)?
        } else if logits.on_device() {
            self.draw_on_device(logits, item)?
        } else {
            self.sample(&logits.row(item)?)
        };
        let top = match top_n {
            Some(n) if n > 0 => Some(logits.top(item, n)?),
            _ => None,
        };
        Ok(Choice { sampled, top })
    }

    fn draw_on_device(&mut self, logits: &StepLogits, item: usize) -> Result<Sampled, ModelError> {
        let u = self.rng.random::<f32>();
        let (k, whole) = match self.top_k {
            // Top-k first: its candidates are the whole distribution drawn from.
            Some(k) if k <= DEVICE_TOP_K => (k, None),
            Some(_) => (0, None),
            None => (
                DEVICE_TOP_K,
                Some(logits.tempered_mass(item, self.temperature)?),
            ),
        };
        if k > 0 {
            let candidates = logits.top(item, k)?;
            let sorted: Vec<(usize, f32)> = candidates
                .iter()
                .map(|t| (t.id as usize, t.logprob))
                .collect();
            if let Some(i) = self.pick(&sorted, whole, u) {
                return Ok(Sampled {
                    token: candidates[i].id,
                    logprob: candidates[i].logprob,
                });
            }
        }
        let row = logits.row(item)?;
        let token = self.draw_with(&row, u);
        Ok(Sampled {
            token: token as u32,
            logprob: log_softmax_at(&row, token),
        })
    }

    fn draw(&mut self, logits: &[f32]) -> usize {
        let u = self.rng.random::<f32>();
        self.draw_with(logits, u)
    }

    /// The draw of uniform `u` from one row: candidates sorted by logit, truncated by top-k,
    /// then by min-p and top-p on the tempered distribution.
    fn draw_with(&self, logits: &[f32], u: f32) -> usize {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        let k = self.top_k.unwrap_or(logits.len()).clamp(1, logits.len());
        if k < order.len() {
            order.select_nth_unstable_by(k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
            order.truncate(k);
        }
        order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let sorted: Vec<(usize, f32)> = order.into_iter().map(|i| (i, logits[i])).collect();
        let i = self
            .pick(&sorted, None, u)
            .expect("a whole distribution always draws");
        sorted[i].0
    }

    /// Which of `sorted` (`(token, logit)`, most likely first; logits shifted by a constant,
    /// such as log-probabilities, pick the same) uniform `u` draws, after min-p (only with the
    /// whole distribution: a sampler with `min_p` always has its row on the host) and top-p on
    /// the tempered distribution. `whole`: `None` when `sorted` is the whole distribution drawn from; else the
    /// tempered mass of the whole row (`sum exp((l - max) / T)`), of which `sorted` holds the
    /// most likely part, and `None` comes back when the draw or the top-p cut falls beyond it.
    fn pick(&self, sorted: &[(usize, f32)], whole: Option<f32>, u: f32) -> Option<usize> {
        let max = sorted[0].1;
        let mut probs: Vec<f32> = sorted
            .iter()
            .map(|&(_, l)| ((l - max) / self.temperature).exp())
            .collect();
        if self.min_p > 0.0 && whole.is_none() {
            // Relative to the most likely token, whose term is 1.
            let kept = probs.iter().take_while(|&&p| p >= self.min_p).count();
            probs.truncate(kept.max(1));
        }
        let total = whole.unwrap_or_else(|| probs.iter().sum());
        let mut kept = None;
        if self.top_p < 1.0 {
            let mut cumulative = 0.0;
            for (i, p) in probs.iter().enumerate() {
                cumulative += p / total;
                if cumulative >= self.top_p {
                    kept = Some(i + 1);
                    break;
                }
            }
        }
        let (probs, total) = match (kept, whole) {
            (Some(kept), _) => (&probs[..kept], probs[..kept].iter().sum()),
            (None, None) => (&probs[..], total),
            // The top-p cut lies beyond the candidates.
            (None, Some(_)) if self.top_p < 1.0 => return None,
            (None, Some(whole)) => (&probs[..], whole),
        };
        let mut target = u * total;
        for (i, p) in probs.iter().enumerate() {
            target -= p;
            if target <= 0.0 {
                return Some(i);
            }
        }
        // Rounding left a sliver: the last kept candidate, unless the rest of the row was meant.
        match (kept, whole) {
            (None, Some(_)) => None,
            _ => Some(probs.len() - 1),
        }
    }
}

/// Index of the largest logit (the lowest index among equals).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best
}

/// Log-probability of `index` under the softmax of `logits`.
pub fn log_softmax_at(logits: &[f32], index: usize) -> f32 {
    logits[index] - log_sum_exp(logits)
}

/// `ln(sum(exp(logits)))`, the softmax's normaliser. The terms are summed in f64: an f32 sum
/// over a vocabulary of tens of thousands of terms, in one sequential pass, comes out biased by
/// about 1e-4 nats (each addition rounds against an ever larger total); in f64 the error is far
/// below the f32 result's own resolution. Each term's `exp` stays in f32 (its rounding is
/// unbiased).
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|x| f64::from((x - max).exp())).sum();
    (f64::from(max) + sum.ln()) as f32
}

/// The `n` most likely tokens with their log-probabilities under the model's distribution, most
/// likely first (the lower id first among equals). One partial selection over the vocabulary.
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<TopLogprob> {
    let n = n.min(logits.len());
    if n == 0 {
        return Vec::new();
    }
    let norm = log_sum_exp(logits);
    let better = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if n < order.len() {
        order.select_nth_unstable_by(n - 1, better);
        order.truncate(n);
    }
    order.sort_unstable_by(better);
    order
        .into_iter()
        .map(|i| TopLogprob {
            id: i as u32,
            logprob: logits[i] - norm,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: Option<u32>, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    const LOGITS: [f32; 5] = [1.0, 3.0, 2.5, -1.0, 0.0];

    /// Over a vocabulary of 49,152 (the default model's) with a realistic spread, the
    /// normaliser is within 1e-6 nats of an f64 reference (a plain f32 sum was 1e-4 off).
    #[test]
    fn the_normaliser_is_unbiased_over_a_large_vocabulary() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for spread in [2.0f64, 6.0, 12.0] {
            // Most logits low, a few high, as a language model's are.
            let logits: Vec<f32> = (0..49_152)
                .map(|_| (spread * (next() * 2.0 - 1.0) - 4.0 * next().powi(8)) as f32)
                .collect();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let reference = max
                + logits
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            let got = f64::from(log_sum_exp(&logits));
            assert!(
                (got - reference).abs() < 1e-6,
                "spread {spread}: {got} vs {reference} ({:e})",
                got - reference
            );
            // And the probabilities it gives sum to one.
            let total: f64 = logits.iter().map(|&x| (f64::from(x) - got).exp()).sum();
            assert!((total - 1.0).abs() < 1e-5, "spread {spread}: {total}");
        }
    }

    #[test]
    fn top_logprobs_are_the_most_likely_in_order_and_normalised() {
        let top = top_logprobs(&LOGITS, 3);
        let ids: Vec<u32> = top.iter().map(|t| t.id).collect();
        assert_eq!(ids, [1, 2, 0]);
        for t in &top {
            let want = log_softmax_at(&LOGITS, t.id as usize);
            assert!((t.logprob - want).abs() < 1e-6, "{t:?} vs {want}");
        }
        // All of them: probabilities sum to one.
        let all: f32 = top_logprobs(&LOGITS, 99)
            .iter()
            .map(|t| t.logprob.exp())
            .sum();
        assert!((all - 1.0).abs() < 1e-5, "{all}");
        assert!(top_logprobs(&LOGITS, 0).is_empty());
        // Ties: the lower id first.
        let tied = top_logprobs(&[0.5, 2.0, 2.0, 1.0], 2);
        assert_eq!((tied[0].id, tied[1].id), (1, 2));
    }

    #[test]
    fn greedy_picks_the_largest_with_its_logprob() {
        let mut s = Sampler::new(&params(0.0, 1.0, None, 1));
        let out = s.sample(&LOGITS);
        assert_eq!(out.token, 1);
        let expected = 3.0 - LOGITS.iter().map(|x| x.exp()).sum::<f32>().ln();
        assert!((out.logprob - expected).abs() < 1e-6);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let draw = |seed| {
            let mut s = Sampler::new(&params(1.0, 1.0, None, seed));
            (0..64).map(|_| s.sample(&LOGITS).token).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn top_k_and_top_p_truncate() {
        let mut s = Sampler::new(&params(1.0, 1.0, Some(2), 5));
        for _ in 0..200 {
            assert!(matches!(s.sample(&LOGITS).token, 1 | 2));
        }
        // p(1) = 0.52 under softmax of LOGITS: top_p 0.5 keeps only token 1.
        let mut s = Sampler::new(&params(1.0, 0.5, None, 5));
        for _ in 0..200 {
            assert_eq!(s.sample(&LOGITS).token, 1);
        }
    }

    /// Draws from a device's logits (candidates and the tempered mass crossing, the row only
    /// when a draw falls beyond them) give the tokens and log-probabilities the row gives.
    #[test]
    fn draws_from_device_logits_are_the_row_draws() {
        use candle_core::{Device, Tensor};
        // A peaked row (draws land among the top candidates) and a flat one (they do not).
        let peaked: Vec<f32> = (0..1000).map(|i| 12.0 - (i as f32).sqrt()).collect();
        let flat: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0)
            .collect();
        for (what, row) in [("peaked", peaked), ("flat", flat)] {
            let device = StepLogits::device(vec![Some(
                Tensor::from_slice(&row, (1, row.len()), &Device::Cpu).unwrap(),
            )])
            .unwrap();
            for (t, p, k) in [
                (0.8, 1.0, None),
                (1.5, 0.9, None),
                (1.0, 1.0, Some(40)),
                (1.0, 0.95, Some(200)),
            ] {
                let (mut on_host, mut on_device) = (
                    Sampler::new(&params(t, p, k, 11)),
                    Sampler::new(&params(t, p, k, 11)),
                );
                for i in 0..300 {
                    let want = on_host.sample(&row);
                    let got = on_device.choose(&device, 0, None).unwrap().sampled;
                    assert_eq!(
                        want.token, got.token,
                        "{what} T={t} p={p} k={k:?}, draw {i}"
                    );
                    assert!(
                        (want.logprob - got.logprob).abs() < 1e-4,
                        "{want:?} {got:?}"
                    );
                }
            }
        }
    }

    /// Biases move the choice and leave the reported log-probability the model's; presence and
    /// frequency penalties act on what the sampler itself generated.
    #[test]
    fn biases_and_penalties_change_the_choice_not_the_logprob() {
        let greedy = |change: &dyn Fn(&mut SamplingParams)| {
            let mut p = params(0.0, 1.0, None, 1);
            change(&mut p);
            let mut s = Sampler::new(&p);
            (0..6).map(|_| s.sample(&LOGITS)).collect::<Vec<_>>()
        };
        let tokens = |out: &[Sampled]| out.iter().map(|s| s.token).collect::<Vec<_>>();
        assert_eq!(tokens(&greedy(&|_| {})), [1; 6]);
        let forced = greedy(&|p| {
            p.logit_bias.insert(4, 100.0);
        });
        assert_eq!(tokens(&forced), [4; 6]);
        assert!((forced[0].logprob - log_softmax_at(&LOGITS, 4)).abs() < 1e-6);
        let banned = greedy(&|p| {
            p.logit_bias.insert(1, -100.0);
        });
        assert_eq!(tokens(&banned), [2; 6]);
        // Presence: once both 1 (3.0) and 2 (2.5) have come, each is 1 lower, and 1 leads again.
        assert_eq!(
            tokens(&greedy(&|p| p.presence_penalty = 1.0)),
            [1, 2, 1, 1, 1, 1]
        );
        // Frequency: every repetition costs 1 more, so they alternate until 0 (1.0) ties with 1
        // (3.0 - 2) and wins the tie by its lower id.
        assert_eq!(
            tokens(&greedy(&|p| p.frequency_penalty = 1.0)),
            [1, 2, 1, 2, 0, 1]
        );
    }

    /// min-p keeps the tokens at least `min_p` times as likely as the best (after temperature).
    #[test]
    fn min_p_keeps_the_tokens_near_the_best() {
        // Relative to token 1: token 2 is exp(-0.5) = 0.61, token 0 exp(-2) = 0.14.
        for (min_p, allowed) in [(0.7, &[1][..]), (0.5, &[1, 2]), (0.1, &[0, 1, 2])] {
            let mut p = params(1.0, 1.0, None, 5);
            p.min_p = min_p;
            let mut s = Sampler::new(&p);
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..400 {
                seen.insert(s.sample(&LOGITS).token);
            }
            assert_eq!(
                seen.into_iter().collect::<Vec<_>>(),
                allowed,
                "min_p {min_p}"
            );
        }
    }

    /// Answer `i` of several draws as a request of one with `seed + i` does.
    #[test]
    fn each_answer_follows_its_own_seed() {
        let draw = |p: &SamplingParams, choice| {
            let mut s = Sampler::for_choice(p, choice);
            (0..32).map(|_| s.sample(&LOGITS).token).collect::<Vec<_>>()
        };
        let p = params(1.0, 1.0, None, 42);
        assert_eq!(draw(&p, 2), draw(&params(1.0, 1.0, None, 44), 0));
        assert_ne!(draw(&p, 0), draw(&p, 1));
    }

    /// With adjustments the device's row is read whole and the same rules apply.
    #[test]
    fn adjusted_draws_from_device_logits_are_the_row_draws() {
        use candle_core::{Device, Tensor};
        let row: Vec<f32> = (0..500).map(|i| 8.0 - (i as f32).sqrt()).collect();
        let device = StepLogits::device(vec![Some(
            Tensor::from_slice(&row, (1, row.len()), &Device::Cpu).unwrap(),
        )])
        .unwrap();
        let mut p = params(0.9, 0.95, None, 8);
        p.logit_bias.insert(0, -100.0);
        p.frequency_penalty = 0.7;
        p.min_p = 0.02;
        let (mut on_host, mut on_device) = (Sampler::new(&p), Sampler::new(&p));
        for _ in 0..100 {
            let want = on_host.sample(&row);
            assert_ne!(want.token, 0);
            assert_eq!(on_device.choose(&device, 0, None).unwrap().sampled, want);
        }
    }

    #[test]
    fn frequencies_follow_the_tempered_distribution() {
        let mut s = Sampler::new(&params(2.0, 1.0, None, 9));
        let n = 20_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            counts[s.sample(&LOGITS).token as usize] += 1;
        }
        let weights: Vec<f32> = LOGITS.iter().map(|x| (x / 2.0).exp()).collect();
        let total: f32 = weights.iter().sum();
        for (i, w) in weights.iter().enumerate() {
            let expected = w / total;
            let seen = counts[i] as f32 / n as f32;
            assert!(
                (seen - expected).abs() < 0.02,
                "token {i}: {seen} vs {expected}"
            );
        }
    }
}
