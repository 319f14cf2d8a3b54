//! The GRPO objective (TRL's GRPOTrainer, TapeAgents' rl loss; pinned by `golden/grpo_loss.json`
//! and `golden/tiny_grpo_step.json`):
//!
//! - advantage `A_i = (r_i - mean_g) / (std_g + 1e-4)`, sample std (ddof 1); `r_i - mean_g` with
//!   `scale_rewards: none`; the batch's std instead of the group's with `batch`;
//! - ratio `exp(logp - old_logp)` per token, or with `importance_sampling_level: sequence` (GSPO,
//!   pinned by `learner/tests/fixtures/gspo_golden.json`) each sequence's
//!   `exp(mean_t(logp - old_logp))` on all its tokens; surrogate
//!   `min(ratio A, clip(ratio, 1-eps_low, 1+eps_high) A)`;
//! - k3 KL to the reference `exp(ref - logp) - (ref - logp) - 1`;
//! - per-token loss `-(surrogate - beta KL)`, or `-(w surrogate - beta KL)` with truncated
//!   importance sampling (`learner.tis_cap`; TRL's `vllm_importance_sampling_correction`):
//!   `w = min(exp(old_logp - sampler_logp), cap)`, a constant per token ([`tis_weights`]);
//! - reductions: `grpo` (mean over sequences of each sequence's token mean), `dr_grpo` (sum over
//!   tokens / (sequences x longest completion)), `dapo` (sum over tokens / tokens).
//!
//! Sequences are ragged and concatenated (no padding): each sequence's tokens share one weight,
//! computed over the whole optimizer step ([`sequence_weights`]), so a step split into
//! micro-batches sums to exactly the loss of the whole step. A masked sequence (truncated, with
//! `mask_truncated`) has weight 0 and counts in no token total.

use candle_core::{DType, Result, Tensor};
use rl_core::config::{ImportanceLevel, LossType, ScaleRewards};

/// Added to the standard deviation before dividing (TRL's and TapeAgents' 1e-4).
pub const STD_EPS: f64 = 1e-4;

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Sample standard deviation (ddof 1); 0 for fewer than two values.
pub fn std(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// Advantages of consecutive groups of `group_size` rewards.
pub fn advantages(rewards: &[f64], group_size: usize, scale: ScaleRewards) -> Vec<f64> {
    let batch_std = std(rewards);
    rewards
        .chunks(group_size.max(1))
        .flat_map(|g| {
            let m = mean(g);
            let s = match scale {
                ScaleRewards::Group => Some(std(g)),
                ScaleRewards::Batch => Some(batch_std),
                ScaleRewards::None => None,
            };
            g.iter().map(move |r| match s {
                Some(s) => (r - m) / (s + STD_EPS),
                None => r - m,
            })
        })
        .collect()
}

/// The loss weight of each sequence's tokens: `lens[i]` completion tokens, `masked[i]` left out.
pub fn sequence_weights(lens: &[usize], masked: &[bool], loss_type: LossType) -> Vec<f64> {
    let n = lens.len().max(1) as f64;
    let live = |i: usize| !masked.get(i).copied().unwrap_or(false);
    let tokens: usize = (0..lens.len()).filter(|&i| live(i)).map(|i| lens[i]).sum();
    let longest = lens.iter().copied().max().unwrap_or(0).max(1) as f64;
    (0..lens.len())
        .map(|i| {
            if !live(i) {
                return 0.0;
            }
            match loss_type {
                LossType::Grpo => 1.0 / (n * lens[i].max(1) as f64),
                LossType::DrGrpo => 1.0 / (n * longest),
                LossType::Dapo => 1.0 / tokens.max(1) as f64,
            }
        })
        .collect()
}

/// The clipping and KL settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Objective {
    pub beta: f64,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub level: ImportanceLevel,
}

/// What [`terms`] needs of each token besides its differentiable logprob, over concatenated
/// sequences (`offsets` as from `Engine::train_logprobs`: sequence `i` is `offsets[i]..offsets[i+1]`).
/// Built by [`Tokens::new`], the one place (for the learner, `learner check` and the oracle
/// tests) where per-sequence values are spread over tokens and the lengths are checked.
#[derive(Debug, Clone)]
pub struct Tokens {
    offsets: Vec<usize>,
    /// The old policy's logprobs.
    old: Vec<f64>,
    /// The reference model's logprobs.
    reference: Vec<f64>,
    /// Each token's sequence's advantage.
    advantage: Vec<f64>,
    /// Each token's sequence's loss weight, 0 for masked sequences ([`sequence_weights`]).
    weight: Vec<f64>,
    /// Each token's truncated importance-sampling weight ([`tis_weights`]), when on.
    tis: Option<Vec<f64>>,
}

impl Tokens {
    /// The tokens of sequences at `offsets`: `old` and `reference` logprobs per token (flat),
    /// `advantages` and `weights` per sequence (spread over its tokens).
    pub fn new(
        offsets: &[usize],
        old: &[f64],
        reference: &[f64],
        advantages: &[f64],
        weights: &[f64],
    ) -> Result<Self> {
        let n = offsets.last().copied().unwrap_or(0);
        let seqs = offsets.len().saturating_sub(1);
        if old.len() != n || reference.len() != n {
            return Err(candle_core::Error::Msg(format!(
                "{n} tokens, but {} old and {} reference logprobs",
                old.len(),
                reference.len()
            )));
        }
        if advantages.len() != seqs || weights.len() != seqs {
            return Err(candle_core::Error::Msg(format!(
                "{seqs} sequences, but {} advantages and {} weights",
                advantages.len(),
                weights.len()
            )));
        }
        Ok(Self {
            offsets: offsets.to_vec(),
            old: old.to_vec(),
            reference: reference.to_vec(),
            advantage: per_token(advantages, offsets),
            weight: per_token(weights, offsets),
            tis: None,
        })
    }

    /// With truncated importance-sampling weights, one per token.
    pub fn with_tis(mut self, tis: Vec<f64>) -> Result<Self> {
        if tis.len() != self.old.len() {
            return Err(candle_core::Error::Msg(format!(
                "{} importance weights for {} tokens",
                tis.len(),
                self.old.len()
            )));
        }
        self.tis = Some(tis);
        Ok(self)
    }

    /// Each token's loss weight (0: the token counts for nothing, a masked sequence's).
    pub fn weight(&self) -> &[f64] {
        &self.weight
    }
}

/// One micro-batch's contribution: `loss` (differentiable) and, for the metrics, the weighted sums
/// of KL and of clipped tokens over its live tokens, and their count.
#[derive(Debug)]
pub struct Terms {
    pub loss: Tensor,
    /// The weighted-free per-token loss `-(surrogate - beta KL)`, detached (for inspection).
    pub per_token: Tensor,
    pub kl_sum: f64,
    pub clipped: f64,
    pub tokens: f64,
}

/// Truncated importance-sampling weights `min(exp(old - sampler), cap)` per token, and which
/// were cut to `cap`.
pub fn tis_weights(old: &[f64], sampler: &[f64], cap: f64) -> (Vec<f64>, Vec<bool>) {
    old.iter()
        .zip(sampler)
        .map(|(o, s)| {
            let w = (o - s).exp();
            if w > cap {
                (cap, true)
            } else {
                (w, false)
            }
        })
        .unzip()
}

/// The per-token objective over concatenated sequences: `logp` `[n]` is differentiable, the rest
/// is in `tokens`. Everything is computed in `logp`'s dtype.
pub fn terms(logp: &Tensor, tokens: &Tokens, obj: Objective) -> Result<Terms> {
    let dtype = logp.dtype();
    let dev = logp.device();
    let t = |v: &[f64]| Tensor::new(v, dev)?.to_dtype(dtype);
    let (old, reference, adv, w) = (
        t(&tokens.old)?,
        t(&tokens.reference)?,
        t(&tokens.advantage)?,
        t(&tokens.weight)?,
    );
    let weight = &tokens.weight;
    let advantage = &tokens.advantage;
    let log_ratio = (logp - &old)?;
    let log_ratio = match obj.level {
        ImportanceLevel::Token => log_ratio,
        ImportanceLevel::Sequence => sequence_means(&log_ratio, &tokens.offsets)?,
    };
    let ratio = log_ratio.exp()?;
    let unclipped = (&ratio * &adv)?;
    let clipped_ratio = ratio.clamp(1.0 - obj.epsilon_low, 1.0 + obj.epsilon_high)?;
    let mut surrogate = unclipped.minimum(&(&clipped_ratio * &adv)?)?;
    if let Some(tis) = &tokens.tis {
        surrogate = (surrogate * t(tis)?)?;
    }
    let d = (&reference - logp)?;
    let kl = ((d.exp()? - &d)? - 1.0)?;
    let per_token = ((&kl * obj.beta)? - &surrogate)?;
    let loss = (&per_token * &w)?.sum_all()?;
    // Metrics: token means over live tokens (weight > 0), detached.
    let r = ratio.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let k = kl.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let (mut kl_sum, mut clipped, mut live) = (0.0, 0.0, 0.0);
    for i in 0..r.len() {
        if weight[i] <= 0.0 {
            continue;
        }
        live += 1.0;
        kl_sum += k[i];
        let a = advantage[i];
        if (r[i] < 1.0 - obj.epsilon_low && a < 0.0) || (r[i] > 1.0 + obj.epsilon_high && a > 0.0) {
            clipped += 1.0;
        }
    }
    Ok(Terms {
        loss,
        per_token: per_token.detach(),
        kl_sum,
        clipped,
        tokens: live,
    })
}

/// Each sequence's mean of `x` `[n]`, on every one of its tokens (differentiable: each token
/// gets `1 / len` of its sequence's gradient).
fn sequence_means(x: &Tensor, offsets: &[usize]) -> Result<Tensor> {
    let parts = offsets
        .windows(2)
        .filter(|w| w[1] > w[0])
        .map(|w| {
            x.narrow(0, w[0], w[1] - w[0])?
                .mean_keepdim(0)?
                .broadcast_as(w[1] - w[0])
        })
        .collect::<Result<Vec<_>>>()?;
    if parts.is_empty() {
        return Ok(x.clone());
    }
    Tensor::cat(&parts, 0)
}

/// Spreads per-sequence values over their tokens (`offsets` as from `Engine::train_logprobs`).
fn per_token(values: &[f64], offsets: &[usize]) -> Vec<f64> {
    values
        .iter()
        .enumerate()
        .flat_map(|(i, &v)| std::iter::repeat_n(v, offsets[i + 1] - offsets[i]))
        .collect()
}
