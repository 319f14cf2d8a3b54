//! The `rollouts` table: every sampled completion, written a whole group per transaction
//! ([`GroupWriter`]), then annotated with reference logprobs.

use std::collections::BTreeMap;

use rl_core::rewards::{AnswerStatus, RewardKind};
use rl_core::wire::FinishReason;
use sampling::{Knobs, MaxTokens, SampledWith, Temperature, TopP};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use sqlx::{FromRow, Sqlite, Transaction};

use crate::{as_i64, check_logprobs, json, sql_err, text, Store, StoreError};

/// One sampled completion with everything the learner and the metrics need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub attempt: u32,
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    /// Sampler logprobs, one per completion token.
    pub logprobs: Vec<f32>,
    /// Reference logprobs, once the group has been scored.
    pub ref_logprobs: Option<Vec<f32>>,
    pub finish_reason: FinishReason,
    pub text: String,
    pub reward: f64,
    pub reward_components: BTreeMap<RewardKind, f64>,
    pub answer_status: AnswerStatus,
    /// The policy version that sampled it: the iteration whose checkpoint the rollout server
    /// served, `None` for the base model.
    pub policy_version: Option<u32>,
    /// The adapter id the rollout server answered with (opaque: the orchestrator's name for
    /// that checkpoint), `None` for the base model.
    pub adapter: Option<String>,
    /// The knobs and seed it was drawn with; `None` only for rows written before they were
    /// recorded.
    pub sampling: Option<SampledWith>,
}

/// A group being written: one open transaction. Commit checks that every attempt is there.
pub struct GroupWriter<'a> {
    store: &'a Store,
    tx: Transaction<'static, Sqlite>,
    iteration: u32,
    group_index: u32,
    attempts: u32,
    written: u32,
}

impl std::fmt::Debug for GroupWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GroupWriter(iteration {} group {}, {}/{})",
            self.iteration, self.group_index, self.written, self.attempts
        )
    }
}

impl GroupWriter<'_> {
    /// Adds the next attempt (attempts are written in order 0, 1, ...).
    pub async fn add(&mut self, r: &RolloutRecord) -> Result<(), StoreError> {
        let where_ = format!(
            "iteration {} group {} attempt {}",
            self.iteration, self.group_index, r.attempt
        );
        if r.attempt != self.written {
            return Err(self
                .store
                .invalid(format!("{where_}: expected attempt {} next", self.written)));
        }
        if r.attempt >= self.attempts {
            return Err(self.store.invalid(format!(
                "{where_}: the group has only {} attempts",
                self.attempts
            )));
        }
        let n = r.completion_ids.len();
        check_logprobs(&r.logprobs, n, &format!("{where_} logprobs"))
            .map_err(|m| self.store.invalid(m))?;
        if let Some(lp) = &r.ref_logprobs {
            check_logprobs(lp, n, &format!("{where_} reference logprobs"))
                .map_err(|m| self.store.invalid(m))?;
        }
        if !r.reward.is_finite() || r.reward_components.values().any(|v| !v.is_finite()) {
            return Err(self
                .store
                .invalid(format!("{where_}: the reward is not finite")));
        }
        sqlx::query(
            "INSERT INTO rollouts (run_id, iteration, group_index, attempt, prompt_ids, completion_ids, logprobs, \
             ref_logprobs, finish_reason, text, reward, reward_components, answer_status, adapter, \
             policy_version, temperature, top_p, top_k, max_tokens, seed) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(self.store.run_id)
        .bind(i64::from(self.iteration))
        .bind(i64::from(self.group_index))
        .bind(i64::from(r.attempt))
        .bind(json(&r.prompt_ids))
        .bind(json(&r.completion_ids))
        .bind(json(&r.logprobs))
        .bind(r.ref_logprobs.as_ref().map(json))
        .bind(text(r.finish_reason))
        .bind(&r.text)
        .bind(r.reward)
        .bind(json(&r.reward_components))
        .bind(text(r.answer_status))
        .bind(&r.adapter)
        .bind(r.policy_version.map(i64::from))
        .bind(r.sampling.map(|s| s.knobs.temperature.get()))
        .bind(r.sampling.map(|s| s.knobs.top_p.get()))
        .bind(r.sampling.map(|s| i64::from(s.knobs.top_k)))
        .bind(r.sampling.map(|s| i64::from(s.knobs.max_tokens.get())))
        .bind(r.sampling.map(|s| as_i64(s.seed)))
        .execute(&mut *self.tx)
        .await
        .map_err(|e| sql_err(&self.store.path, &format!("inserting {where_}"), e))?;
        self.written += 1;
        Ok(())
    }

    /// Commits the group; fails (and writes nothing) unless every attempt was added.
    pub async fn commit(self) -> Result<(), StoreError> {
        if self.written != self.attempts {
            return Err(self.store.invalid(format!(
                "iteration {} group {}: {} of {} attempts written; a group is stored whole or not at all",
                self.iteration, self.group_index, self.written, self.attempts
            )));
        }
        let path = self.store.path.clone();
        self.tx
            .commit()
            .await
            .map_err(|e| sql_err(&path, "committing a group", e))
    }
}

impl Store {
    /// Starts writing a group; nothing is visible until [`GroupWriter::commit`], and dropping the
    /// writer (an aborted task, a crash) leaves no trace of it.
    pub async fn begin_group(
        &self,
        iteration: u32,
        group_index: u32,
    ) -> Result<GroupWriter<'_>, StoreError> {
        let mut tx = self.write_tx().await?;
        let attempts: Option<i64> = sqlx::query_scalar(
            "SELECT i.attempts FROM iterations i JOIN tasks t ON t.run_id = i.run_id AND t.iteration = i.iteration \
             WHERE i.run_id = ? AND i.iteration = ? AND t.group_index = ?",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .bind(i64::from(group_index))
        .fetch_optional(&mut *tx)
        .await
        .map_err(self.err("reading the group's iteration"))?;
        let Some(attempts) = attempts else {
            return Err(self.invalid(format!("iteration {iteration} has no group {group_index}")));
        };
        let present: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM rollouts WHERE run_id = ? AND iteration = ? AND group_index = ?",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .bind(i64::from(group_index))
        .fetch_one(&mut *tx)
        .await
        .map_err(self.err("counting the group's rollouts"))?;
        if present > 0 {
            return Err(self.invalid(format!(
                "iteration {iteration} group {group_index} is already stored"
            )));
        }
        Ok(GroupWriter {
            store: self,
            tx,
            iteration,
            group_index,
            attempts: attempts as u32,
            written: 0,
        })
    }

    /// Writes a whole group in one transaction.
    pub async fn insert_group(
        &self,
        iteration: u32,
        group_index: u32,
        rollouts: &[RolloutRecord],
    ) -> Result<(), StoreError> {
        let mut writer = self.begin_group(iteration, group_index).await?;
        for r in rollouts {
            writer.add(r).await?;
        }
        writer.commit().await
    }

    /// Groups of an iteration that have no rollouts yet (what sampling still has to do).
    pub async fn missing_groups(&self, iteration: u32) -> Result<Vec<u32>, StoreError> {
        self.group_indices(
            "SELECT t.group_index FROM tasks t WHERE t.run_id = ? AND t.iteration = ? AND NOT EXISTS \
             (SELECT 1 FROM rollouts r WHERE r.run_id = t.run_id AND r.iteration = t.iteration AND r.group_index = t.group_index) \
             ORDER BY t.group_index",
            iteration,
        )
        .await
    }

    /// Stored groups whose reference logprobs are missing (what ref scoring still has to do).
    pub async fn unscored_groups(&self, iteration: u32) -> Result<Vec<u32>, StoreError> {
        self.group_indices(
            "SELECT DISTINCT group_index FROM rollouts WHERE run_id = ? AND iteration = ? AND ref_logprobs IS NULL \
             ORDER BY group_index",
            iteration,
        )
        .await
    }

    async fn group_indices(
        &self,
        sql: &'static str,
        iteration: u32,
    ) -> Result<Vec<u32>, StoreError> {
        let v: Vec<i64> = sqlx::query_scalar(sql)
            .bind(self.run_id)
            .bind(i64::from(iteration))
            .fetch_all(&self.pool)
            .await
            .map_err(self.err("listing groups"))?;
        Ok(v.into_iter().map(|g| g as u32).collect())
    }

    /// Records the reference logprobs of a whole group (one per attempt, in attempt order).
    pub async fn set_ref_logprobs(
        &self,
        iteration: u32,
        group_index: u32,
        ref_logprobs: &[Vec<f32>],
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let lens: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT attempt, json_array_length(completion_ids) FROM rollouts \
             WHERE run_id = ? AND iteration = ? AND group_index = ? ORDER BY attempt",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .bind(i64::from(group_index))
        .fetch_all(&mut *tx)
        .await
        .map_err(self.err("reading the group"))?;
        if lens.len() != ref_logprobs.len() {
            return Err(self.invalid(format!(
                "iteration {iteration} group {group_index}: {} reference logprob lists for {} rollouts",
                ref_logprobs.len(),
                lens.len()
            )));
        }
        for ((attempt, len), lp) in lens.iter().zip(ref_logprobs) {
            let what = format!(
                "iteration {iteration} group {group_index} attempt {attempt} reference logprobs"
            );
            check_logprobs(lp, *len as usize, &what).map_err(|m| self.invalid(m))?;
            sqlx::query("UPDATE rollouts SET ref_logprobs = ? WHERE run_id = ? AND iteration = ? AND group_index = ? AND attempt = ?")
                .bind(json(lp))
                .bind(self.run_id)
                .bind(i64::from(iteration))
                .bind(i64::from(group_index))
                .bind(attempt)
                .execute(&mut *tx)
                .await
                .map_err(self.err("writing reference logprobs"))?;
        }
        tx.commit()
            .await
            .map_err(self.err("committing reference logprobs"))
    }

    /// The rollouts of one group, in attempt order.
    pub async fn group(
        &self,
        iteration: u32,
        group_index: u32,
    ) -> Result<Vec<RolloutRecord>, StoreError> {
        Ok(self
            .read_rollouts(iteration, Some(group_index))
            .await?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    /// Every rollout of an iteration as `(group_index, rollout)`, in group then attempt order.
    pub async fn rollouts(&self, iteration: u32) -> Result<Vec<(u32, RolloutRecord)>, StoreError> {
        self.read_rollouts(iteration, None).await
    }

    async fn read_rollouts(
        &self,
        iteration: u32,
        group: Option<u32>,
    ) -> Result<Vec<(u32, RolloutRecord)>, StoreError> {
        let rows = sqlx::query(
            "SELECT group_index, attempt, prompt_ids, completion_ids, logprobs, ref_logprobs, finish_reason, text, \
             reward, reward_components, answer_status, adapter, policy_version, temperature, top_p, \
             top_k, max_tokens, seed FROM rollouts \
             WHERE run_id = ? AND iteration = ? AND (? IS NULL OR group_index = ?) ORDER BY group_index, attempt",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .bind(group.map(i64::from))
        .bind(group.map(i64::from))
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("reading rollouts"))?;
        rows.iter()
            .map(|row| {
                let r = RolloutRow::from_row(row).map_err(|e| {
                    self.corrupt_row(&format!("a rollout of iteration {iteration}"), e)
                })?;
                let at = format!(
                    "iteration {iteration} group {} attempt {}",
                    r.group_index, r.attempt
                );
                let sampling = self.sampled_with(&r, &at)?;
                Ok((
                    r.group_index as u32,
                    RolloutRecord {
                        attempt: r.attempt as u32,
                        prompt_ids: r.prompt_ids.0,
                        completion_ids: r.completion_ids.0,
                        logprobs: r.logprobs.0,
                        ref_logprobs: r.ref_logprobs.map(|j| j.0),
                        finish_reason: self.parse(&r.finish_reason, &at)?,
                        text: r.text,
                        reward: r.reward,
                        reward_components: r.reward_components.0,
                        answer_status: self.parse(&r.answer_status, &at)?,
                        policy_version: r
                            .policy_version
                            .map(|v| self.count(v, &format!("{at} policy_version")))
                            .transpose()?,
                        sampling,
                        adapter: r.adapter,
                    },
                ))
            })
            .collect()
    }
}

/// A row of `rollouts` as stored (JSON columns decoded by sqlx).
#[derive(FromRow)]
struct RolloutRow {
    group_index: i64,
    attempt: i64,
    prompt_ids: Json<Vec<u32>>,
    completion_ids: Json<Vec<u32>>,
    logprobs: Json<Vec<f32>>,
    ref_logprobs: Option<Json<Vec<f32>>>,
    finish_reason: String,
    text: String,
    reward: f64,
    reward_components: Json<BTreeMap<RewardKind, f64>>,
    answer_status: String,
    adapter: Option<String>,
    policy_version: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    max_tokens: Option<i64>,
    seed: Option<i64>,
}

impl Store {
    /// A stored non-negative integer as a `u32`; a damaged-file error otherwise.
    fn count(&self, v: i64, what: &str) -> Result<u32, StoreError> {
        u32::try_from(v).map_err(|_| self.corrupt(format!("{what} is {v}")))
    }

    /// A row's sampling parameters, each through its knob's own rule: all of them, or none (a
    /// row written before they were recorded).
    fn sampled_with(&self, r: &RolloutRow, at: &str) -> Result<Option<SampledWith>, StoreError> {
        let (Some(t), Some(p), Some(k), Some(m), Some(seed)) =
            (r.temperature, r.top_p, r.top_k, r.max_tokens, r.seed)
        else {
            if [r.temperature, r.top_p].iter().any(Option::is_some)
                || [r.top_k, r.max_tokens, r.seed].iter().any(Option::is_some)
            {
                return Err(self.corrupt(format!("{at}: some sampling parameters are missing")));
            }
            return Ok(None);
        };
        let bad =
            |key: &str, e: sampling::OutOfRange| self.corrupt(e.named(&format!("{at} {key}")));
        let knobs = Knobs {
            temperature: Temperature::new(t).map_err(|e| bad("temperature", e))?,
            top_p: TopP::new(p).map_err(|e| bad("top_p", e))?,
            top_k: self.count(k, &format!("{at} top_k"))?,
            max_tokens: MaxTokens::new(self.count(m, &format!("{at} max_tokens"))?)
                .map_err(|e| bad("max_tokens", e))?,
        };
        Ok(Some(SampledWith {
            knobs,
            seed: seed as u64,
        }))
    }
}
