//! The `iterations`, `phase_times` and `tasks` tables: where each iteration is, how long its
//! phases took, and the problems it samples (with their seeds).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use sampling::Knobs;

use crate::{as_i64, json, text, Store, StoreError};

/// Where an iteration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Sampling,
    ScoringRef,
    Training,
    Evaluating,
    Done,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(&text(self))
    }
}

/// One problem of an iteration: the group it heads and the seed it is sampled with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub group_index: u32,
    pub problem_index: u64,
    pub question: String,
    pub gold: String,
    pub seed: u64,
}

/// An iteration's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IterationState {
    pub iteration: u32,
    pub phase: Phase,
    pub attempts: u32,
}

impl Store {
    /// Starts an iteration (phase `sampling`) with its problems, in one transaction. Starting an
    /// iteration that exists with the same problems is a no-op (a resume); with other problems,
    /// an error.
    pub async fn begin_iteration(
        &self,
        iteration: u32,
        attempts: u32,
        tasks: &[TaskRecord],
    ) -> Result<(), StoreError> {
        if attempts == 0 || tasks.is_empty() {
            return Err(self.invalid(format!(
                "iteration {iteration}: needs tasks and attempts >= 1"
            )));
        }
        if tasks
            .iter()
            .enumerate()
            .any(|(i, t)| t.group_index as usize != i)
        {
            return Err(self.invalid(format!(
                "iteration {iteration}: group indices must be 0..{}",
                tasks.len()
            )));
        }
        let mut tx = self.write_tx().await?;
        let existing: Option<i64> = sqlx::query_scalar(
            "SELECT attempts FROM iterations WHERE run_id = ? AND iteration = ?",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .fetch_optional(&mut *tx)
        .await
        .map_err(self.err("reading the iteration"))?;
        if let Some(stored_attempts) = existing {
            drop(tx);
            let stored = self.tasks(iteration).await?;
            if stored != tasks || stored_attempts != i64::from(attempts) {
                return Err(self.invalid(format!(
                    "iteration {iteration} already exists with other problems or attempts; the run's seed or data changed"
                )));
            }
            return Ok(());
        }
        let last: Option<i64> =
            sqlx::query_scalar("SELECT MAX(iteration) FROM iterations WHERE run_id = ?")
                .bind(self.run_id)
                .fetch_one(&mut *tx)
                .await
                .map_err(self.err("reading iterations"))?;
        let expected = last.map_or(0, |l| l + 1);
        if i64::from(iteration) != expected {
            return Err(self.invalid(format!(
                "iteration {iteration} cannot start: the next one is {expected}"
            )));
        }
        sqlx::query("INSERT INTO iterations (run_id, iteration, phase, attempts) VALUES (?, ?, 'sampling', ?)")
            .bind(self.run_id)
            .bind(i64::from(iteration))
            .bind(i64::from(attempts))
            .execute(&mut *tx)
            .await
            .map_err(self.err("inserting the iteration"))?;
        for t in tasks {
            sqlx::query(
                "INSERT INTO tasks (run_id, iteration, group_index, problem_index, question, gold, seed) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(self.run_id)
            .bind(i64::from(iteration))
            .bind(i64::from(t.group_index))
            .bind(as_i64(t.problem_index))
            .bind(&t.question)
            .bind(&t.gold)
            .bind(as_i64(t.seed))
            .execute(&mut *tx)
            .await
            .map_err(self.err("inserting a task"))?;
        }
        tx.commit()
            .await
            .map_err(self.err("committing the iteration"))
    }

    /// The knobs `iteration` samples its training rollouts with: those recorded when its
    /// sampling first began, else `proposed`, recorded now. So a resume whose config changed
    /// `sampling.train` keeps each begun iteration's own knobs and applies the new ones only to
    /// iterations not begun yet; no iteration mixes two.
    pub async fn sampling_knobs(
        &self,
        iteration: u32,
        proposed: Knobs,
    ) -> Result<Knobs, StoreError> {
        let mut tx = self.write_tx().await?;
        let stored: Option<Option<String>> = sqlx::query_scalar(
            "SELECT sampling FROM iterations WHERE run_id = ? AND iteration = ?",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .fetch_optional(&mut *tx)
        .await
        .map_err(self.err("reading the iteration's sampling knobs"))?;
        match stored {
            None => Err(self.invalid(format!("iteration {iteration} does not exist"))),
            Some(Some(json)) => serde_json::from_str(&json).map_err(|e| {
                self.corrupt(format!("iteration {iteration}: sampling knobs {json}: {e}"))
            }),
            Some(None) => {
                sqlx::query(
                    "UPDATE iterations SET sampling = ? WHERE run_id = ? AND iteration = ?",
                )
                .bind(json(&proposed))
                .bind(self.run_id)
                .bind(i64::from(iteration))
                .execute(&mut *tx)
                .await
                .map_err(self.err("recording the iteration's sampling knobs"))?;
                tx.commit()
                    .await
                    .map_err(self.err("committing the sampling knobs"))?;
                Ok(proposed)
            }
        }
    }

    /// Moves an iteration to a later phase (never back).
    pub async fn set_phase(&self, iteration: u32, phase: Phase) -> Result<(), StoreError> {
        self.advance(iteration, phase, None).await
    }

    /// Moves an iteration from its current phase to `next` and records, in the same transaction,
    /// the wall-clock seconds the current phase took.
    pub async fn finish_phase(
        &self,
        iteration: u32,
        next: Phase,
        seconds: f64,
    ) -> Result<(), StoreError> {
        self.advance(iteration, next, Some(seconds)).await
    }

    async fn advance(
        &self,
        iteration: u32,
        phase: Phase,
        seconds: Option<f64>,
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let current: Option<String> =
            sqlx::query_scalar("SELECT phase FROM iterations WHERE run_id = ? AND iteration = ?")
                .bind(self.run_id)
                .bind(i64::from(iteration))
                .fetch_optional(&mut *tx)
                .await
                .map_err(self.err("reading the phase"))?;
        let Some(current) = current else {
            return Err(self.invalid(format!("iteration {iteration} does not exist")));
        };
        let current: Phase = self.parse(&current, "phase")?;
        if phase < current {
            return Err(self.invalid(format!(
                "iteration {iteration} is at `{}`; it cannot go back to `{}`",
                current, phase
            )));
        }
        sqlx::query(
            "UPDATE iterations SET phase = ?, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
             WHERE run_id = ? AND iteration = ?",
        )
        .bind(text(phase))
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .execute(&mut *tx)
        .await
        .map_err(self.err("updating the phase"))?;
        if let Some(seconds) = seconds.filter(|_| current != Phase::Done) {
            self.add_seconds(&mut tx, Seconds::Phase, iteration, text(current), seconds)
                .await?;
        }
        tx.commit().await.map_err(self.err("committing the phase"))
    }

    /// Seconds spent in each finished phase of an iteration, by phase name.
    pub async fn phase_seconds(&self, iteration: u32) -> Result<BTreeMap<String, f64>, StoreError> {
        self.seconds(Seconds::Phase, iteration).await
    }

    /// Adds `seconds` to the time `side` sat idle in `iteration`.
    pub async fn add_idle_seconds(
        &self,
        iteration: u32,
        side: IdleSide,
        seconds: f64,
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        self.add_seconds(&mut tx, Seconds::Idle, iteration, text(side), seconds)
            .await?;
        tx.commit().await.map_err(self.err("committing idle time"))
    }

    /// Seconds the learner and the samplers sat idle in an iteration, by side name.
    pub async fn idle_seconds(&self, iteration: u32) -> Result<BTreeMap<String, f64>, StoreError> {
        self.seconds(Seconds::Idle, iteration).await
    }

    /// Adds `seconds` to the row `key` of `iteration` in a table of times (added up across
    /// resumes).
    async fn add_seconds(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        table: Seconds,
        iteration: u32,
        key: String,
        seconds: f64,
    ) -> Result<(), StoreError> {
        let (sql, what) = match table {
            Seconds::Phase => (
                "INSERT INTO phase_seconds (run_id, iteration, phase, seconds) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (run_id, iteration, phase) DO UPDATE SET seconds = seconds + excluded.seconds",
                "recording the phase time",
            ),
            Seconds::Idle => (
                "INSERT INTO idle_seconds (run_id, iteration, side, seconds) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (run_id, iteration, side) DO UPDATE SET seconds = seconds + excluded.seconds",
                "recording idle time",
            ),
        };
        sqlx::query(sql)
            .bind(self.run_id)
            .bind(i64::from(iteration))
            .bind(key)
            .bind(seconds.max(0.0))
            .execute(&mut **tx)
            .await
            .map_err(self.err(what))?;
        Ok(())
    }

    /// A table of times of `iteration`, by key.
    async fn seconds(
        &self,
        table: Seconds,
        iteration: u32,
    ) -> Result<BTreeMap<String, f64>, StoreError> {
        let (sql, what) = match table {
            Seconds::Phase => (
                "SELECT phase, seconds FROM phase_seconds WHERE run_id = ? AND iteration = ?",
                "reading phase times",
            ),
            Seconds::Idle => (
                "SELECT side, seconds FROM idle_seconds WHERE run_id = ? AND iteration = ?",
                "reading idle times",
            ),
        };
        let rows: Vec<(String, f64)> = sqlx::query_as(sql)
            .bind(self.run_id)
            .bind(i64::from(iteration))
            .fetch_all(&self.pool)
            .await
            .map_err(self.err(what))?;
        Ok(rows.into_iter().collect())
    }

    /// Every iteration, in order.
    pub async fn iterations(&self) -> Result<Vec<IterationState>, StoreError> {
        let rows: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT iteration, phase, attempts FROM iterations WHERE run_id = ? ORDER BY iteration",
        )
        .bind(self.run_id)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("reading iterations"))?;
        rows.into_iter()
            .map(|(iteration, phase, attempts)| {
                Ok(IterationState {
                    iteration: iteration as u32,
                    phase: self.parse(&phase, "phase")?,
                    attempts: attempts as u32,
                })
            })
            .collect()
    }

    /// Where a resumed run goes on: the last iteration and its phase (`None`: nothing started).
    pub async fn resume_point(&self) -> Result<Option<IterationState>, StoreError> {
        Ok(self.iterations().await?.pop())
    }

    pub async fn tasks(&self, iteration: u32) -> Result<Vec<TaskRecord>, StoreError> {
        let rows: Vec<(i64, i64, String, String, i64)> = sqlx::query_as(
            "SELECT group_index, problem_index, question, gold, seed FROM tasks \
             WHERE run_id = ? AND iteration = ? ORDER BY group_index",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("reading tasks"))?;
        Ok(rows
            .into_iter()
            .map(
                |(group_index, problem_index, question, gold, seed)| TaskRecord {
                    group_index: group_index as u32,
                    problem_index: problem_index as u64,
                    question,
                    gold,
                    // Stored bit for bit (SQLite integers are signed).
                    seed: seed as u64,
                },
            )
            .collect())
    }
}

/// The two tables of times per iteration: `phase_seconds` and `idle_seconds`.
#[derive(Debug, Clone, Copy)]
enum Seconds {
    Phase,
    Idle,
}

/// Who sat idle: the learner waiting for rollouts, or the samplers waiting for a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdleSide {
    Learner,
    Samplers,
}
