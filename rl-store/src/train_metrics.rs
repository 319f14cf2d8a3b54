//! The `train_metrics` table: what the learner reports per optimizer step.

use serde::{Deserialize, Serialize};
use sqlx::FromRow;

use crate::{as_i64, Store, StoreError};

/// What the learner reports for one optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, FromRow)]
pub struct TrainMetrics {
    #[sqlx(try_from = "i64")]
    pub step: u64,
    pub loss: f64,
    pub mean_kl: f64,
    pub clip_fraction: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub reward_mean: f64,
    pub reward_std: f64,
    pub zero_std_fraction: f64,
    pub completion_len: f64,
    pub tokens_per_s: f64,
    /// Mean and max |sampler logprob - learner logprob| over the step's tokens, at the
    /// iteration's starting adapter (before any update); `None` in rows older than the field.
    pub sampler_mismatch_mean: Option<f64>,
    pub sampler_mismatch_max: Option<f64>,
    /// The fraction of the step's tokens whose importance weight was cut to `learner.tis_cap`
    /// (`None`: truncated importance sampling off).
    pub tis_clip_fraction: Option<f64>,
}

impl Store {
    /// Records one optimizer step's metrics (idempotent per step).
    pub async fn insert_train_metrics(
        &self,
        iteration: u32,
        m: &TrainMetrics,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT OR REPLACE INTO train_metrics (run_id, iteration, step, loss, mean_kl, clip_fraction, grad_norm, lr, \
             reward_mean, reward_std, zero_std_fraction, completion_len, tokens_per_s, sampler_mismatch_mean, \
             sampler_mismatch_max, tis_clip_fraction) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .bind(as_i64(m.step))
        .bind(m.loss)
        .bind(m.mean_kl)
        .bind(m.clip_fraction)
        .bind(m.grad_norm)
        .bind(m.lr)
        .bind(m.reward_mean)
        .bind(m.reward_std)
        .bind(m.zero_std_fraction)
        .bind(m.completion_len)
        .bind(m.tokens_per_s)
        .bind(m.sampler_mismatch_mean)
        .bind(m.sampler_mismatch_max)
        .bind(m.tis_clip_fraction)
        .execute(&self.pool)
        .await
        .map_err(self.err("recording training metrics"))?;
        Ok(())
    }

    /// The training metrics of an iteration, in step order.
    pub async fn train_metrics(&self, iteration: u32) -> Result<Vec<TrainMetrics>, StoreError> {
        let rows: Vec<TrainMetrics> = sqlx::query_as(
            "SELECT step, loss, mean_kl, clip_fraction, grad_norm, lr, reward_mean, reward_std, zero_std_fraction, \
             completion_len, tokens_per_s, sampler_mismatch_mean, sampler_mismatch_max, tis_clip_fraction \
             FROM train_metrics WHERE run_id = ? AND iteration = ? ORDER BY step",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("reading training metrics"))?;
        Ok(rows)
    }
}
