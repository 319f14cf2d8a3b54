//! Choosing the next token from a row of logits: temperature, top-k, top-p, a seeded RNG per
//! request. The logprob returned with a token is that of the distribution it was sampled from
//! before truncation: log-softmax(logits / temperature) (TRL's convention, which the learner
//! reproduces by dividing by the same temperature); greedy (temperature 0) reports the raw
//! log-softmax.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sampling::{Knobs, MaxTokens};

use crate::simd;

/// Sampling parameters of one request: the knobs (valid by their types) and what else a row
/// needs. A [`crate::GenerateRequest`] checks the rest against the model.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub knobs: Knobs,
    /// Generation stops after any of these ids (the id is kept in the output).
    pub stop_ids: Vec<u32>,
    /// Generation stops once the tokens end with any of these sequences (kept in the output).
    pub stop_sequences: Vec<Vec<u32>>,
    /// Also report this many most likely tokens at each step (under the same distribution as
    /// the logprobs); 0 for none.
    pub top_logprobs: usize,
    pub seed: u64,
}

impl SamplingParams {
    /// Plain sampling (temperature 1, no truncation, no stops) of up to 128 tokens.
    pub const PLAIN: Self = Self {
        knobs: Knobs::plain(MaxTokens::of(128)),
        stop_ids: vec![],
        stop_sequences: vec![],
        top_logprobs: 0,
        seed: 0,
    };

    /// `knobs` with no stops, no alternatives and seed 0.
    pub fn new(knobs: Knobs) -> Self {
        Self {
            knobs,
            ..Self::PLAIN
        }
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::PLAIN
    }
}

pub use sampling::MAX_TOP_LOGPROBS;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop id was produced.
    Stop,
    /// `max_tokens` was reached.
    Length,
}

/// The per-row sampling state.
#[derive(Debug)]
pub struct RowSampler {
    params: SamplingParams,
    rng: StdRng,
}

/// log-softmax of `x` into a new vector (f64 accumulation).
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    x.iter().map(|&v| (v as f64 - lse) as f32).collect()
}

impl RowSampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token from `logits` (one row, length vocab); returns (id, logprob).
    pub fn sample(&mut self, logits: &[f32]) -> (u32, f32) {
        let knobs = self.params.knobs;
        let t = knobs.temperature.get();
        // Temperatures this small overflow 1/T in f32: they are greedy (as vLLM treats them).
        if knobs.temperature.is_greedy() {
            let (mut best, mut best_v) = (0usize, f32::NEG_INFINITY);
            for (i, &v) in logits.iter().enumerate() {
                if v > best_v {
                    best = i;
                    best_v = v;
                }
            }
            return (best as u32, best_v - log_sum_exp(logits, 1.0));
        }
        let inv_t = (1.0 / t) as f32;
        let (top_k, top_p) = (knobs.top_k as usize, knobs.top_p.get());
        let truncate = top_k > 0 || !knobs.top_p.keeps_all();
        if !truncate {
            // One pass for the normaliser, one partial pass for the inverse-CDF draw.
            let max = simd::max(logits) * inv_t;
            let mut probs = logits.to_vec();
            let total = simd::exp_in_place(&mut probs, inv_t, max);
            let u = self.rng.random::<f64>() * total;
            let mut acc = 0.0f64;
            let mut chosen = probs.len() - 1;
            for (i, &p) in probs.iter().enumerate() {
                acc += p as f64;
                if u < acc {
                    chosen = i;
                    break;
                }
            }
            probs.clear();
            let lp = (logits[chosen] * inv_t - max) as f64 - total.ln();
            return (chosen as u32, lp as f32);
        }
        let lse = log_sum_exp(logits, inv_t);
        let lp = |i: usize| logits[i] * inv_t - lse;
        let mut order: Vec<usize> = (0..logits.len()).collect();
        let keep_k = if top_k > 0 {
            top_k.min(order.len())
        } else {
            order.len()
        };
        if keep_k < order.len() {
            order.select_nth_unstable_by(keep_k - 1, |&a, &b| {
                logits[b].total_cmp(&logits[a]).then(a.cmp(&b))
            });
            order.truncate(keep_k);
        }
        order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let mut keep = order.len();
        if !knobs.top_p.keeps_all() {
            // The nucleus is taken over the top-k survivors, renormalised (as HF and vLLM do).
            let mass: f64 = order.iter().map(|&i| (lp(i) as f64).exp()).sum();
            let mut acc = 0.0f64;
            for (n, &i) in order.iter().enumerate() {
                acc += (lp(i) as f64).exp();
                if acc >= top_p * mass {
                    keep = n + 1;
                    break;
                }
            }
        }
        let kept = &order[..keep.max(1)];
        let total: f64 = kept.iter().map(|&i| (lp(i) as f64).exp()).sum();
        let u: f64 = self.rng.random::<f64>() * total;
        let mut acc = 0.0f64;
        let mut chosen = kept[kept.len() - 1];
        for &i in kept {
            acc += (lp(i) as f64).exp();
            if u < acc {
                chosen = i;
                break;
            }
        }
        (chosen as u32, lp(chosen))
    }
}

impl RowSampler {
    /// The `n` most likely tokens of `logits` with their logprobs under the distribution
    /// [`RowSampler::sample`] draws from (logits / temperature; raw logits when greedy), most
    /// likely first, ties by id.
    pub fn top(&self, logits: &[f32], n: usize) -> Vec<(u32, f32)> {
        let n = n.min(logits.len());
        if n == 0 {
            return vec![];
        }
        // The same arithmetic as `sample`'s branch for these parameters, so that the sampled
        // token's entry carries exactly the logprob reported with it.
        let knobs = self.params.knobs;
        let t = knobs.temperature.get();
        let truncate = knobs.top_k > 0 || !knobs.top_p.keeps_all();
        let lp: Box<dyn Fn(usize) -> f32> = if knobs.temperature.is_greedy() {
            let lse = log_sum_exp(logits, 1.0);
            Box::new(move |i| logits[i] - lse)
        } else if truncate {
            let inv_t = (1.0 / t) as f32;
            let lse = log_sum_exp(logits, inv_t);
            Box::new(move |i| logits[i] * inv_t - lse)
        } else {
            let inv_t = (1.0 / t) as f32;
            let max = simd::max(logits) * inv_t;
            let total = simd::sum_exp(logits, inv_t, max);
            let ln_total = total.ln();
            Box::new(move |i| ((logits[i] * inv_t - max) as f64 - ln_total) as f32)
        };
        let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        let mut order: Vec<usize> = (0..logits.len()).collect();
        if n < order.len() {
            order.select_nth_unstable_by(n - 1, by_logit);
            order.truncate(n);
        }
        order.sort_unstable_by(by_logit);
        order.into_iter().map(|i| (i as u32, lp(i))).collect()
    }
}

/// `log(sum(exp(x * scale)))`, stable.
fn log_sum_exp(x: &[f32], scale: f32) -> f32 {
    simd::log_sum_exp(x, scale) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_k: u32, top_p: f64, seed: u64) -> SamplingParams {
        let knobs = Knobs {
            temperature: sampling::Temperature::new(temperature).unwrap(),
            top_p: sampling::TopP::new(top_p).unwrap(),
            top_k,
            max_tokens: MaxTokens::of(128),
        };
        SamplingParams {
            seed,
            ..SamplingParams::new(knobs)
        }
    }

    #[test]
    fn greedy_takes_argmax_with_raw_logprob() {
        let mut s = RowSampler::new(params(0.0, 0, 1.0, 1));
        let (id, lp) = s.sample(&[0.0, 2.0, 1.0]);
        assert_eq!(id, 1);
        let expected = 2.0 - (1f64 + 2f64.exp() + 1f64.exp()).ln();
        assert!((lp as f64 - expected).abs() < 1e-6);
    }

    #[test]
    fn logprob_is_under_tempered_distribution_before_truncation() {
        let logits = [1.0f32, 0.5, -1.0, 0.0];
        let mut s = RowSampler::new(params(0.7, 1, 1.0, 3));
        let (id, lp) = s.sample(&logits);
        assert_eq!(id, 0, "top_k 1 must pick the argmax");
        let scaled: Vec<f32> = logits.iter().map(|v| v / 0.7).collect();
        assert!(
            (lp - log_softmax(&scaled)[0]).abs() < 1e-6,
            "logprob must not be renormalised by top-k"
        );
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // p = softmax: token 0 has ~0.84; with top_p 0.5 only it survives.
        let logits = [3.0f32, 1.0, 0.5, 0.0];
        for seed in 0..50 {
            let mut s = RowSampler::new(params(1.0, 0, 0.5, seed));
            assert_eq!(s.sample(&logits).0, 0);
        }
    }

    #[test]
    fn frequencies_follow_the_distribution() {
        let logits = [0.0f32, (2f32).ln()]; // p = 1/3, 2/3
        let mut s = RowSampler::new(params(1.0, 0, 1.0, 7));
        let n = 20000;
        let ones = (0..n).filter(|_| s.sample(&logits).0 == 1).count();
        let f = ones as f64 / n as f64;
        assert!((f - 2.0 / 3.0).abs() < 0.02, "frequency {f}");
    }
}
