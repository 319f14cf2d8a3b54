//! `rl-store`, the rollout store: one SQLite file per run (`rollouts.sqlite` in the run directory), through
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
//! One module per table family ([`runs`], [`iterations`], [`rollouts`], [`checkpoints`],
//! [`evals`], [`train_metrics`]); rows map through sqlx `FromRow` (JSON columns as `Json<T>`),
//! enums are stored by their serde names.
//!
//! It must never hold a partial group, accept a non-finite logprob (JSON would turn it into
//! `null`), or pick one of several runs silently; and it knows nothing of HTTP or the model.

pub mod checkpoints;
pub mod evals;
pub mod iterations;
pub mod rollouts;
pub mod runs;
pub mod train_metrics;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, SqlitePool, Transaction};

pub use checkpoints::CheckpointRecord;
pub use evals::{EvalResult, EvalSummary};
pub use iterations::{IdleSide, IterationState, Phase, TaskRecord};
pub use rollouts::{GroupWriter, RolloutRecord};
pub use runs::{RunInfo, RunSpec};
pub use train_metrics::TrainMetrics;

/// The database schema, embedded at build time.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {context}: {source}{}", sqlite_fix(source, path))]
    Sql {
        path: String,
        context: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "{path}: applying the migrations failed: {source}{}",
        migrate_fix(source, path)
    )]
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

/// A handle on a run's database. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) pool: SqlitePool,
    pub(crate) run_id: i64,
    pub(crate) path: PathBuf,
}

pub(crate) fn as_i64(v: u64) -> i64 {
    // SQLite integers are signed 64-bit: seeds are stored bit for bit.
    v as i64
}

/// The text a unit enum is stored as: its serde name, so the enum's own renames are the one
/// mapping (`Phase::ScoringRef` is `scoring_ref` in the file as in JSON).
pub(crate) fn text<T: Serialize>(v: T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

pub(crate) fn json<T: Serialize>(v: &T) -> String {
    // Serializing plain vectors and maps of numbers/strings cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

impl Store {
    /// Creates the database for a new run. Fails if the file already holds a run.
    pub async fn create(path: &Path, spec: &RunSpec) -> Result<Store, StoreError> {
        let pool = connect(path, true).await?;
        let shown = path.display().to_string();
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

    /// Opens the run's database at `path`, or creates it for `spec` when there is none yet or
    /// the file holds no run (its creation was cut short: a crash, a full disk). Returns the
    /// store and whether it was created.
    pub async fn open_or_create(path: &Path, spec: &RunSpec) -> Result<(Store, bool), StoreError> {
        if path.is_file() {
            let pool = connect(path, false).await?;
            let runs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM runs")
                .fetch_one(&pool)
                .await
                .map_err(|e| sql_err(path, "counting runs", e))?;
            pool.close().await;
            if runs > 0 {
                return Ok((Store::open(path).await?, false));
            }
        }
        Ok((Store::create(path, spec).await?, true))
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

    pub(crate) fn err(&self, context: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
        let context = context.to_string();
        move |e| sql_err(&self.path, &context, e)
    }

    /// The enum a stored text names (by its serde name); a damaged-file error otherwise.
    pub(crate) fn parse<T: serde::de::DeserializeOwned>(
        &self,
        value: &str,
        what: &str,
    ) -> Result<T, StoreError> {
        serde_json::from_value(serde_json::Value::String(value.to_string())).map_err(|e| {
            StoreError::Corrupt {
                path: self.path.display().to_string(),
                detail: format!("{what}: `{value}`: {e}"),
            }
        })
    }

    /// A damaged-file error saying what is wrong.
    pub(crate) fn corrupt(&self, detail: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.display().to_string(),
            detail,
        }
    }

    /// A row that sqlx could not map (a column of the wrong type or unreadable JSON).
    pub(crate) fn corrupt_row(&self, what: &str, e: sqlx::Error) -> StoreError {
        StoreError::Corrupt {
            path: self.path.display().to_string(),
            detail: format!("{what}: {e}"),
        }
    }

    pub(crate) fn invalid(&self, message: impl Into<String>) -> StoreError {
        StoreError::Invalid {
            path: self.path.display().to_string(),
            message: message.into(),
        }
    }

    pub(crate) async fn write_tx(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(self.err("starting a write transaction"))
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
            let tables: Vec<String> = fk
                .iter()
                .map(|r| {
                    r.try_get::<String, _>(0)
                        .unwrap_or_else(|e| format!("({e})"))
                })
                .collect();
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

pub(crate) fn check_logprobs(lp: &[f32], n: usize, what: &str) -> Result<(), String> {
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

/// How to fix the SQLite failures a user can fix (full disk, read-only file, another process
/// holding the database), from SQLite's primary result code; empty for the others.
fn sqlite_fix(e: &sqlx::Error, path: &str) -> String {
    let code = e
        .as_database_error()
        .and_then(|d| d.code())
        .and_then(|c| c.parse::<i64>().ok());
    let folder = Path::new(path).parent().unwrap_or(Path::new("."));
    use std::io::ErrorKind as K;
    // The primary code is the low byte of an extended one (SQLITE_READONLY_DBMOVED is 1032).
    match code.map(|c| c & 0xff) {
        Some(13) => rl_core::files::fix_for(K::StorageFull, folder),
        Some(8) => rl_core::files::fix_for(K::ReadOnlyFilesystem, folder),
        Some(14) => rl_core::files::fix_for(K::PermissionDenied, folder),
        Some(5 | 6) => "; another process holds the database (another orchestrate on this run?): \
                        stop it, then resume"
            .into(),
        _ => String::new(),
    }
}

/// [`sqlite_fix`] of the SQLite error under a failed migration.
fn migrate_fix(e: &sqlx::migrate::MigrateError, path: &str) -> String {
    use sqlx::migrate::MigrateError as M;
    match e {
        M::Execute(e) | M::ExecuteMigration(e, _) => sqlite_fix(e, path),
        _ => String::new(),
    }
}

pub(crate) fn sql_err(path: &Path, context: &str, source: sqlx::Error) -> StoreError {
    StoreError::Sql {
        path: path.display().to_string(),
        context: context.to_string(),
        source,
    }
}

/// A pool on the database at `path` (created when `create`), with the migrations applied.
async fn connect(path: &Path, create: bool) -> Result<SqlitePool, StoreError> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(create)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(60));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .map_err(|e| sql_err(path, "opening the database", e))?;
    MIGRATOR
        .run(&pool)
        .await
        .map_err(|source| StoreError::Migrate {
            path: path.display().to_string(),
            source,
        })?;
    Ok(pool)
}
