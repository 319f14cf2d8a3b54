//! The rollout store: one SQLite file per run (`rollouts.sqlite` in the run directory), through
//! sqlx, with the schema in `migrations/` applied on open. It is what makes a run resumable: the
//! orchestrator records each iteration's phase, its problems, every group of rollouts (in one
//! transaction, so a group is either complete or absent), the reference logprobs, checkpoints,
//! evaluation results and the learner's per-step metrics; after a crash it asks where to go on.
//!
//! WAL mode with `synchronous = FULL`: a committed group survives a crash of the process and of
//! the machine. Write transactions start with `BEGIN IMMEDIATE`, so concurrent writers queue on
//! the busy timeout instead of failing. On open the file is checked (`PRAGMA integrity_check`,
//! foreign keys, complete groups, ref logprobs where the phase says they exist).
//!
//! It must never hold a partial group, accept a non-finite logprob (JSON would turn it into
//! `null`), or pick one of several runs silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, SqlitePool, Transaction};

use rl_core::rewards::{AnswerStatus, RewardKind};
use rl_core::wire::FinishReason;

/// The database schema, embedded at build time.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {context}: {source}")]
    Sql {
        path: String,
        context: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("{path}: applying the migrations failed: {source}")]
    Migrate {
        path: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("{path}: the database is damaged: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

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

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Sampling => "sampling",
            Phase::ScoringRef => "scoring_ref",
            Phase::Training => "training",
            Phase::Evaluating => "evaluating",
            Phase::Done => "done",
        }
    }
}

impl FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "sampling" => Phase::Sampling,
            "scoring_ref" => Phase::ScoringRef,
            "training" => Phase::Training,
            "evaluating" => Phase::Evaluating,
            "done" => Phase::Done,
            other => return Err(format!("unknown phase `{other}`")),
        })
    }
}

/// What a run is, recorded when it is created; a resume must match it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    pub config_yaml: String,
    pub model: String,
    pub seed: u64,
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInfo {
    pub id: i64,
    pub created_at: String,
    pub spec: RunSpec,
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
}

/// An iteration's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IterationState {
    pub iteration: u32,
    pub phase: Phase,
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRecord {
    pub iteration: u32,
    pub path: String,
    pub sha256: String,
}

/// The greedy evaluation of one test problem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub problem_index: u64,
    pub text: String,
    pub answer: Option<String>,
    pub answer_status: AnswerStatus,
    pub finish_reason: FinishReason,
    pub solved: bool,
    pub formatted: bool,
    pub num_tokens: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    pub iteration: u32,
    pub split: String,
    pub n: u32,
    pub accuracy: f64,
    pub format_rate: f64,
    pub mean_tokens: f64,
}

/// What the learner reports for one optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainMetrics {
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
}

/// A handle on a run's database. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    run_id: i64,
    path: PathBuf,
}

fn as_i64(v: u64) -> i64 {
    // SQLite integers are signed 64-bit: seeds are stored bit for bit.
    v as i64
}

fn json<T: Serialize>(v: &T) -> String {
    // Serializing plain vectors and maps of numbers/strings cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

impl Store {
    /// Creates the database for a new run. Fails if the file already holds a run.
    pub async fn create(path: &Path, spec: &RunSpec) -> Result<Store, StoreError> {
        let pool = connect(path, true).await?;
        let shown = path.display().to_string();
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|source| StoreError::Migrate {
                path: shown.clone(),
                source,
            })?;
        let existing: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM runs")
            .fetch_one(&pool)
            .await
            .map_err(|e| sql_err(path, "counting runs", e))?;
        if existing > 0 {
            pool.close().await;
            return Err(StoreError::Invalid {
                path: shown,
                message: "already holds a run; resume it, or choose another output_dir".into(),
            });
        }
        let run_id = sqlx::query(
            "INSERT INTO runs (config_yaml, model, seed, attempts) VALUES (?, ?, ?, ?)",
        )
        .bind(&spec.config_yaml)
        .bind(&spec.model)
        .bind(as_i64(spec.seed))
        .bind(i64::from(spec.attempts))
        .execute(&pool)
        .await
        .map_err(|e| sql_err(path, "recording the run", e))?
        .last_insert_rowid();
        Ok(Store {
            pool,
            run_id,
            path: path.to_path_buf(),
        })
    }

    /// Opens an existing run's database: applies pending migrations and checks its integrity.
    pub async fn open(path: &Path) -> Result<Store, StoreError> {
        let shown = path.display().to_string();
        if !path.is_file() {
            return Err(StoreError::Invalid {
                path: shown,
                message:
                    "no such database (a run's rollouts.sqlite is created by `orchestrate run`)"
                        .into(),
            });
        }
        let pool = connect(path, false).await?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|source| StoreError::Migrate {
                path: shown.clone(),
                source,
            })?;
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM runs ORDER BY id")
            .fetch_all(&pool)
            .await
            .map_err(|e| sql_err(path, "reading runs", e))?;
        let run_id = match ids.as_slice() {
            [one] => *one,
            [] => {
                return Err(StoreError::Invalid {
                    path: shown,
                    message: "holds no run (it was created but never initialised); delete it and start the run again".into(),
                })
            }
            many => {
                return Err(StoreError::Invalid {
                    path: shown,
                    message: format!("holds {} runs; this version keeps one run per database", many.len()),
                })
            }
        };
        let store = Store {
            pool,
            run_id,
            path: path.to_path_buf(),
        };
        store.integrity_check().await?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for every connection to finish and closes the file (checkpointing the WAL).
    pub async fn close(self) {
        self.pool.close().await;
    }

    fn err(&self, context: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
        let context = context.to_string();
        move |e| sql_err(&self.path, &context, e)
    }

    fn invalid(&self, message: impl Into<String>) -> StoreError {
        StoreError::Invalid {
            path: self.path.display().to_string(),
            message: message.into(),
        }
    }

    async fn write_tx(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(self.err("starting a write transaction"))
    }

    pub async fn run(&self) -> Result<RunInfo, StoreError> {
        let row = sqlx::query(
            "SELECT id, created_at, config_yaml, model, seed, attempts FROM runs WHERE id = ?",
        )
        .bind(self.run_id)
        .fetch_one(&self.pool)
        .await
        .map_err(self.err("reading the run"))?;
        Ok(RunInfo {
            id: row.get("id"),
            created_at: row.get("created_at"),
            spec: RunSpec {
                config_yaml: row.get("config_yaml"),
                model: row.get("model"),
                seed: row.get::<i64, _>("seed") as u64,
                attempts: row.get::<i64, _>("attempts") as u32,
            },
        })
    }

    /// Replaces the stored config text (after a resume with compatible overrides).
    pub async fn update_config(&self, config_yaml: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE runs SET config_yaml = ? WHERE id = ?")
            .bind(config_yaml)
            .bind(self.run_id)
            .execute(&self.pool)
            .await
            .map_err(self.err("updating the config"))?;
        Ok(())
    }

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
        let current = Phase::from_str(&current).map_err(|m| self.invalid(m))?;
        if phase < current {
            return Err(self.invalid(format!(
                "iteration {iteration} is at `{}`; it cannot go back to `{}`",
                current.as_str(),
                phase.as_str()
            )));
        }
        sqlx::query(
            "UPDATE iterations SET phase = ?, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
             WHERE run_id = ? AND iteration = ?",
        )
        .bind(phase.as_str())
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .execute(&mut *tx)
        .await
        .map_err(self.err("updating the phase"))?;
        if let Some(seconds) = seconds.filter(|_| current != Phase::Done) {
            sqlx::query(
                "INSERT INTO phase_seconds (run_id, iteration, phase, seconds) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (run_id, iteration, phase) DO UPDATE SET seconds = seconds + excluded.seconds",
            )
            .bind(self.run_id)
            .bind(i64::from(iteration))
            .bind(current.as_str())
            .bind(seconds.max(0.0))
            .execute(&mut *tx)
            .await
            .map_err(self.err("recording the phase time"))?;
        }
        tx.commit().await.map_err(self.err("committing the phase"))
    }

    /// Seconds spent in each finished phase of an iteration, by phase name.
    pub async fn phase_seconds(&self, iteration: u32) -> Result<BTreeMap<String, f64>, StoreError> {
        let rows: Vec<(String, f64)> = sqlx::query_as(
            "SELECT phase, seconds FROM phase_seconds WHERE run_id = ? AND iteration = ?",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("reading phase times"))?;
        Ok(rows.into_iter().collect())
    }

    /// Every iteration, in order.
    pub async fn iterations(&self) -> Result<Vec<IterationState>, StoreError> {
        let rows = sqlx::query(
            "SELECT iteration, phase, attempts FROM iterations WHERE run_id = ? ORDER BY iteration",
        )
        .bind(self.run_id)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("reading iterations"))?;
        rows.iter()
            .map(|r| {
                Ok(IterationState {
                    iteration: r.get::<i64, _>("iteration") as u32,
                    phase: Phase::from_str(r.get::<&str, _>("phase"))
                        .map_err(|m| self.invalid(m))?,
                    attempts: r.get::<i64, _>("attempts") as u32,
                })
            })
            .collect()
    }

    /// Where a resumed run goes on: the last iteration and its phase (`None`: nothing started).
    pub async fn resume_point(&self) -> Result<Option<IterationState>, StoreError> {
        Ok(self.iterations().await?.pop())
    }

    pub async fn tasks(&self, iteration: u32) -> Result<Vec<TaskRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT group_index, problem_index, question, gold, seed FROM tasks \
             WHERE run_id = ? AND iteration = ? ORDER BY group_index",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("reading tasks"))?;
        Ok(rows
            .iter()
            .map(|r| TaskRecord {
                group_index: r.get::<i64, _>("group_index") as u32,
                problem_index: r.get::<i64, _>("problem_index") as u64,
                question: r.get("question"),
                gold: r.get("gold"),
                seed: r.get::<i64, _>("seed") as u64,
            })
            .collect())
    }

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
             reward, reward_components, answer_status FROM rollouts \
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
            .map(|r| {
                let g = r.get::<i64, _>("group_index") as u32;
                let a = r.get::<i64, _>("attempt") as u32;
                let parse = |col: &str| -> Result<serde_json::Value, StoreError> {
                    let text: Option<String> = r.get(col);
                    serde_json::from_str(text.as_deref().unwrap_or("null")).map_err(|e| {
                        StoreError::Corrupt {
                            path: self.path.display().to_string(),
                            detail: format!(
                                "iteration {iteration} group {g} attempt {a}: column {col}: {e}"
                            ),
                        }
                    })
                };
                let record = serde_json::json!({
                    "attempt": a,
                    "prompt_ids": parse("prompt_ids")?,
                    "completion_ids": parse("completion_ids")?,
                    "logprobs": parse("logprobs")?,
                    "ref_logprobs": parse("ref_logprobs")?,
                    "finish_reason": r.get::<&str, _>("finish_reason"),
                    "text": r.get::<&str, _>("text"),
                    "reward": r.get::<f64, _>("reward"),
                    "reward_components": parse("reward_components")?,
                    "answer_status": r.get::<&str, _>("answer_status"),
                });
                let record: RolloutRecord =
                    serde_json::from_value(record).map_err(|e| StoreError::Corrupt {
                        path: self.path.display().to_string(),
                        detail: format!("iteration {iteration} group {g} attempt {a}: {e}"),
                    })?;
                Ok((g, record))
            })
            .collect()
    }

    /// Records a checkpoint written for an iteration (after it was renamed into place).
    pub async fn record_checkpoint(&self, c: &CheckpointRecord) -> Result<(), StoreError> {
        sqlx::query("INSERT OR REPLACE INTO checkpoints (run_id, iteration, path, sha256) VALUES (?, ?, ?, ?)")
            .bind(self.run_id)
            .bind(i64::from(c.iteration))
            .bind(&c.path)
            .bind(&c.sha256)
            .execute(&self.pool)
            .await
            .map_err(self.err("recording the checkpoint"))?;
        Ok(())
    }

    /// Every recorded checkpoint, in iteration order.
    pub async fn checkpoints(&self) -> Result<Vec<CheckpointRecord>, StoreError> {
        let rows: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT iteration, path, sha256 FROM checkpoints WHERE run_id = ? ORDER BY iteration",
        )
        .bind(self.run_id)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("reading checkpoints"))?;
        Ok(rows
            .into_iter()
            .map(|(i, path, sha256)| CheckpointRecord {
                iteration: i as u32,
                path,
                sha256,
            })
            .collect())
    }

    /// Records the greedy answer to one test problem (idempotent: a resumed eval may redo one).
    pub async fn insert_eval_result(
        &self,
        iteration: u32,
        split: &str,
        r: &EvalResult,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT OR REPLACE INTO eval_results (run_id, iteration, split, problem_index, text, answer, answer_status, \
             finish_reason, solved, formatted, num_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .bind(split)
        .bind(as_i64(r.problem_index))
        .bind(&r.text)
        .bind(&r.answer)
        .bind(status_str(r.answer_status))
        .bind(r.finish_reason.as_str())
        .bind(r.solved)
        .bind(r.formatted)
        .bind(i64::from(r.num_tokens))
        .execute(&self.pool)
        .await
        .map_err(self.err("recording an eval result"))?;
        Ok(())
    }

    /// The test problems already evaluated for an iteration.
    pub async fn eval_results(
        &self,
        iteration: u32,
        split: &str,
    ) -> Result<Vec<EvalResult>, StoreError> {
        let rows = sqlx::query(
            "SELECT problem_index, text, answer, answer_status, finish_reason, solved, formatted, num_tokens \
             FROM eval_results WHERE run_id = ? AND iteration = ? AND split = ? ORDER BY problem_index",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .bind(split)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("reading eval results"))?;
        rows.iter()
            .map(|r| {
                let v = serde_json::json!({
                    "problem_index": r.get::<i64, _>("problem_index"),
                    "text": r.get::<&str, _>("text"),
                    "answer": r.get::<Option<String>, _>("answer"),
                    "answer_status": r.get::<&str, _>("answer_status"),
                    "finish_reason": r.get::<&str, _>("finish_reason"),
                    "solved": r.get::<bool, _>("solved"),
                    "formatted": r.get::<bool, _>("formatted"),
                    "num_tokens": r.get::<i64, _>("num_tokens"),
                });
                serde_json::from_value(v).map_err(|e| StoreError::Corrupt {
                    path: self.path.display().to_string(),
                    detail: format!("eval result of iteration {iteration}: {e}"),
                })
            })
            .collect()
    }

    /// Summarises an evaluation from its per-problem results and records it.
    pub async fn finish_eval(
        &self,
        iteration: u32,
        split: &str,
    ) -> Result<EvalSummary, StoreError> {
        let results = self.eval_results(iteration, split).await?;
        if results.is_empty() {
            return Err(self.invalid(format!(
                "iteration {iteration}: no eval results on `{split}` to summarise"
            )));
        }
        let n = results.len() as f64;
        let summary = EvalSummary {
            iteration,
            split: split.to_string(),
            n: results.len() as u32,
            accuracy: results.iter().filter(|r| r.solved).count() as f64 / n,
            format_rate: results.iter().filter(|r| r.formatted).count() as f64 / n,
            mean_tokens: results.iter().map(|r| f64::from(r.num_tokens)).sum::<f64>() / n,
        };
        sqlx::query(
            "INSERT OR REPLACE INTO evals (run_id, iteration, split, n, accuracy, format_rate, mean_tokens) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .bind(split)
        .bind(i64::from(summary.n))
        .bind(summary.accuracy)
        .bind(summary.format_rate)
        .bind(summary.mean_tokens)
        .execute(&self.pool)
        .await
        .map_err(self.err("recording the eval"))?;
        Ok(summary)
    }

    /// Every recorded evaluation, in iteration order.
    pub async fn evals(&self) -> Result<Vec<EvalSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT iteration, split, n, accuracy, format_rate, mean_tokens FROM evals WHERE run_id = ? \
             ORDER BY iteration, split",
        )
        .bind(self.run_id)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("reading evals"))?;
        Ok(rows
            .iter()
            .map(|r| EvalSummary {
                iteration: r.get::<i64, _>("iteration") as u32,
                split: r.get("split"),
                n: r.get::<i64, _>("n") as u32,
                accuracy: r.get("accuracy"),
                format_rate: r.get("format_rate"),
                mean_tokens: r.get("mean_tokens"),
            })
            .collect())
    }

    /// Records one optimizer step's metrics (idempotent per step).
    pub async fn insert_train_metrics(
        &self,
        iteration: u32,
        m: &TrainMetrics,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT OR REPLACE INTO train_metrics (run_id, iteration, step, loss, mean_kl, clip_fraction, grad_norm, lr, \
             reward_mean, reward_std, zero_std_fraction, completion_len, tokens_per_s) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        .execute(&self.pool)
        .await
        .map_err(self.err("recording training metrics"))?;
        Ok(())
    }

    /// The training metrics of an iteration, in step order.
    pub async fn train_metrics(&self, iteration: u32) -> Result<Vec<TrainMetrics>, StoreError> {
        let rows = sqlx::query(
            "SELECT step, loss, mean_kl, clip_fraction, grad_norm, lr, reward_mean, reward_std, zero_std_fraction, \
             completion_len, tokens_per_s FROM train_metrics WHERE run_id = ? AND iteration = ? ORDER BY step",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("reading training metrics"))?;
        Ok(rows
            .iter()
            .map(|r| TrainMetrics {
                step: r.get::<i64, _>("step") as u64,
                loss: r.get("loss"),
                mean_kl: r.get("mean_kl"),
                clip_fraction: r.get("clip_fraction"),
                grad_norm: r.get("grad_norm"),
                lr: r.get("lr"),
                reward_mean: r.get("reward_mean"),
                reward_std: r.get("reward_std"),
                zero_std_fraction: r.get("zero_std_fraction"),
                completion_len: r.get("completion_len"),
                tokens_per_s: r.get("tokens_per_s"),
            })
            .collect())
    }

    /// SQLite's own check, foreign keys, and the store's invariants: every group complete, and
    /// reference logprobs present wherever the iteration's phase is past scoring.
    pub async fn integrity_check(&self) -> Result<(), StoreError> {
        let corrupt = |detail: String| StoreError::Corrupt {
            path: self.path.display().to_string(),
            detail,
        };
        let report: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_all(&self.pool)
            .await
            .map_err(self.err("PRAGMA integrity_check"))?;
        if report != ["ok"] {
            return Err(corrupt(format!(
                "PRAGMA integrity_check: {}",
                report.join("; ")
            )));
        }
        let fk = sqlx::query("PRAGMA foreign_key_check")
            .fetch_all(&self.pool)
            .await
            .map_err(self.err("PRAGMA foreign_key_check"))?;
        if !fk.is_empty() {
            let tables: Vec<String> = fk.iter().map(|r| r.get::<String, _>(0)).collect();
            return Err(corrupt(format!(
                "{} rows point at missing parents (tables: {})",
                fk.len(),
                tables.join(", ")
            )));
        }
        let partial: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT r.iteration, r.group_index, COUNT(*), i.attempts FROM rollouts r \
             JOIN iterations i ON i.run_id = r.run_id AND i.iteration = r.iteration WHERE r.run_id = ? \
             GROUP BY r.iteration, r.group_index HAVING COUNT(*) != i.attempts OR MAX(r.attempt) != i.attempts - 1",
        )
        .bind(self.run_id)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("checking groups"))?;
        if let Some((it, g, n, a)) = partial.first() {
            return Err(corrupt(format!(
                "iteration {it} group {g} has {n} rollouts, not its {a} attempts ({} partial groups)",
                partial.len()
            )));
        }
        let unscored: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT i.iteration, i.phase, COUNT(*) FROM iterations i JOIN rollouts r \
             ON r.run_id = i.run_id AND r.iteration = i.iteration WHERE i.run_id = ? \
             AND i.phase IN ('training', 'evaluating', 'done') AND r.ref_logprobs IS NULL GROUP BY i.iteration",
        )
        .bind(self.run_id)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("checking reference logprobs"))?;
        if let Some((it, phase, n)) = unscored.first() {
            return Err(corrupt(format!(
                "iteration {it} is at `{phase}` but {n} rollouts have no reference logprobs"
            )));
        }
        let unsampled: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT i.iteration, i.phase, COUNT(*) FROM iterations i JOIN tasks t \
             ON t.run_id = i.run_id AND t.iteration = i.iteration WHERE i.run_id = ? AND i.phase != 'sampling' \
             AND NOT EXISTS (SELECT 1 FROM rollouts r WHERE r.run_id = t.run_id AND r.iteration = t.iteration \
             AND r.group_index = t.group_index) GROUP BY i.iteration",
        )
        .bind(self.run_id)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("checking sampled groups"))?;
        if let Some((it, phase, n)) = unsampled.first() {
            return Err(corrupt(format!(
                "iteration {it} is at `{phase}` but {n} of its groups were never sampled"
            )));
        }
        Ok(())
    }
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
             ref_logprobs, finish_reason, text, reward, reward_components, answer_status) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(self.store.run_id)
        .bind(i64::from(self.iteration))
        .bind(i64::from(self.group_index))
        .bind(i64::from(r.attempt))
        .bind(json(&r.prompt_ids))
        .bind(json(&r.completion_ids))
        .bind(json(&r.logprobs))
        .bind(r.ref_logprobs.as_ref().map(json))
        .bind(r.finish_reason.as_str())
        .bind(&r.text)
        .bind(r.reward)
        .bind(json(&r.reward_components))
        .bind(status_str(r.answer_status))
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

fn status_str(s: AnswerStatus) -> &'static str {
    match s {
        AnswerStatus::Correct => "correct",
        AnswerStatus::Wrong => "wrong",
        AnswerStatus::Unparsable => "unparsable",
        AnswerStatus::NoAnswer => "no_answer",
    }
}

fn check_logprobs(lp: &[f32], n: usize, what: &str) -> Result<(), String> {
    if lp.len() != n {
        return Err(format!(
            "{what}: {} values for {n} completion tokens",
            lp.len()
        ));
    }
    if let Some(i) = lp.iter().position(|v| !v.is_finite()) {
        return Err(format!("{what}: value {i} is {} (not finite)", lp[i]));
    }
    Ok(())
}

fn sql_err(path: &Path, context: &str, source: sqlx::Error) -> StoreError {
    StoreError::Sql {
        path: path.display().to_string(),
        context: context.to_string(),
        source,
    }
}

async fn connect(path: &Path, create: bool) -> Result<SqlitePool, StoreError> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(create)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(60));
    SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .map_err(|e| sql_err(path, "opening the database", e))
}
