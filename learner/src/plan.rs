//! The plan of an iteration's optimizer steps, before any forward: each sequence's advantage
//! within its group, which groups take part (`filter_zero_variance`), each taking sequence's
//! loss weight, and the contiguous, near-equal share of them each step trains on. Pure
//! arithmetic over the batch, so a resumed learner plans exactly what an uninterrupted one did.

use anyhow::bail;
use rl_core::config::LearnerConfig;
use rl_core::stats;

use crate::batch::{Batch, Sequence};
use crate::grpo;

/// A sequence that takes part, with its advantage.
#[derive(Debug, Clone, Copy)]
pub struct Kept<'a> {
    pub seq: &'a Sequence,
    pub advantage: f64,
}

/// One optimizer step's share: its sequences and each one's loss weight (computed over the
/// whole share, so micro-batches sum to exactly the share's loss).
#[derive(Debug, Clone)]
pub struct Share<'a> {
    pub seqs: &'a [Kept<'a>],
    pub weights: Vec<f64>,
}

/// The batch's reward statistics, the same for every step of the iteration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RewardStats {
    pub mean: f64,
    pub std: f64,
    pub zero_std_fraction: f64,
}

/// The sequences that take part, in batch order, with their advantages; and the statistics.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    pub kept: Vec<Kept<'a>>,
    pub rewards: RewardStats,
}

impl<'a> Plan<'a> {
    /// Advantages per group, and the groups that take part.
    pub fn new(batch: &'a Batch, cfg: &LearnerConfig, iteration: u32) -> anyhow::Result<Self> {
        let group_size = batch.groups.first().map_or(0, Vec::len);
        if batch.groups.iter().any(|g| g.len() != group_size) || group_size == 0 {
            bail!("iteration {iteration}: every group needs the same number of attempts");
        }
        let rewards: Vec<f64> = batch.groups.iter().flatten().map(|s| s.reward).collect();
        let advantages = grpo::advantages(&rewards, group_size, cfg.scale_rewards);
        let group_rewards: Vec<Vec<f64>> = batch
            .groups
            .iter()
            .map(|g| g.iter().map(|s| s.reward).collect())
            .collect();
        let mut kept = Vec::new();
        for (g, group) in batch.groups.iter().enumerate() {
            if cfg.filter_zero_variance && stats::zero_std(&group_rewards[g]) {
                continue;
            }
            for (k, seq) in group.iter().enumerate() {
                kept.push(Kept {
                    seq,
                    advantage: advantages[g * group_size + k],
                });
            }
        }
        let stats = RewardStats {
            mean: rewards.iter().sum::<f64>() / rewards.len() as f64,
            std: grpo::std(&rewards),
            zero_std_fraction: stats::zero_std_fraction(group_rewards.iter().map(Vec::as_slice)),
        };
        Ok(Self {
            kept,
            rewards: stats,
        })
    }

    /// The shares of `steps_per_iteration` steps (fewer when fewer sequences take part; none
    /// when none does), each with its sequences' loss weights.
    pub fn shares(&'a self, cfg: &LearnerConfig) -> Vec<Share<'a>> {
        let n = self.kept.len();
        let steps = (cfg.steps_per_iteration as usize).min(n);
        (0..steps)
            .map(|s| {
                let seqs = &self.kept[n * s / steps..n * (s + 1) / steps];
                let lens: Vec<usize> = seqs.iter().map(|k| k.seq.completion.len()).collect();
                let masked: Vec<bool> = seqs
                    .iter()
                    .map(|k| cfg.mask_truncated && k.seq.truncated)
                    .collect();
                Share {
                    seqs,
                    weights: grpo::sequence_weights(&lens, &masked, cfg.loss_type),
                }
            })
            .collect()
    }
}
