//! What a step reports: its metrics row ([`report`], stored per step and printed as JSON) and
//! how far the sampler's logprobs were from the learner's at the iteration's starting adapter
//! ([`Mismatch`]).

use rl_store::TrainMetrics;

use crate::plan::{Kept, RewardStats, Share};
use crate::step::StepTotals;

/// How far the sampler's logprobs are from the learner's at the same adapter (numerics of two
/// engines' batching and kernels; off-policy lag once sampling overlaps training).
#[derive(Debug, Default)]
pub struct Mismatch {
    sum: f64,
    largest: f64,
    pub tokens: usize,
}

impl Mismatch {
    /// Adds a chunk's tokens: the sampler's logprobs against the learner's `old` (flat).
    pub fn add(&mut self, chunk: &[Kept<'_>], old: &[f64]) {
        let sampler = chunk.iter().flat_map(|k| k.seq.sampler.iter());
        for (&a, &b) in sampler.zip(old) {
            let d = (f64::from(a) - b).abs();
            self.sum += d;
            self.largest = self.largest.max(d);
            self.tokens += 1;
        }
    }

    pub fn merge(&mut self, other: &Mismatch) {
        self.sum += other.sum;
        self.largest = self.largest.max(other.largest);
        self.tokens += other.tokens;
    }

    /// The mean difference (`None`: no tokens).
    pub fn mean(&self) -> Option<f64> {
        (self.tokens > 0).then(|| self.sum / self.tokens as f64)
    }

    /// The largest difference (`None`: no tokens).
    pub fn max(&self) -> Option<f64> {
        (self.tokens > 0).then_some(self.largest)
    }
}

/// What the optimizer did in a step.
#[derive(Debug, Clone, Copy)]
pub struct Update {
    pub step: u64,
    pub grad_norm: f64,
    pub lr: f64,
}

/// The metrics row of a step over `share`, which took `seconds`.
pub fn report(
    share: &Share<'_>,
    totals: &StepTotals,
    update: Update,
    rewards: RewardStats,
    tis_cap: Option<f64>,
    seconds: f64,
) -> TrainMetrics {
    let per_token = |x: f64| {
        if totals.tokens > 0.0 {
            x / totals.tokens
        } else {
            0.0
        }
    };
    let lens = share.seqs.iter().map(|k| k.seq.completion.len());
    let step_tokens: usize = share
        .seqs
        .iter()
        .map(|k| k.seq.prompt.len() + k.seq.completion.len())
        .sum();
    TrainMetrics {
        step: update.step,
        loss: totals.loss,
        mean_kl: per_token(totals.kl),
        clip_fraction: per_token(totals.clipped),
        grad_norm: update.grad_norm,
        lr: update.lr,
        reward_mean: rewards.mean,
        reward_std: rewards.std,
        zero_std_fraction: rewards.zero_std_fraction,
        completion_len: lens.sum::<usize>() as f64 / share.seqs.len().max(1) as f64,
        tokens_per_s: step_tokens as f64 / seconds.max(1e-9),
        sampler_mismatch_mean: totals.mismatch.mean(),
        sampler_mismatch_max: totals.mismatch.max(),
        tis_clip_fraction: tis_cap.map(|_| totals.tis_cut as f64 / totals.tis_tokens.max(1) as f64),
    }
}

/// The log line of a step.
pub fn log_step(iteration: u32, update: &Update, totals: &StepTotals, tis_cap: Option<f64>) {
    let m = &totals.mismatch;
    tracing::info!(
        "iteration {iteration} step {}: sampler vs learner logprobs before the update: mean |diff| {:.2e}, max {:.2e} over {} tokens{}",
        update.step,
        m.mean().unwrap_or(0.0),
        m.max().unwrap_or(0.0),
        m.tokens,
        match tis_cap {
            Some(cap) => format!(
                "; importance weights cut to {cap}: {} of {} tokens",
                totals.tis_cut, totals.tis_tokens
            ),
            None => String::new(),
        }
    );
}
