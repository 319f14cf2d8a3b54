//! The `runs` table: what a run is (config, model, seed, group size), recorded once; a resume
//! must match it.

use crate::{Store, StoreError};

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

impl Store {
    /// What the run is: its spec and when it was created.
    pub async fn run(&self) -> Result<RunInfo, StoreError> {
        let (id, created_at, config_yaml, model, seed, attempts): (
            i64,
            String,
            String,
            String,
            i64,
            i64,
        ) = sqlx::query_as(
            "SELECT id, created_at, config_yaml, model, seed, attempts FROM runs WHERE id = ?",
        )
        .bind(self.run_id)
        .fetch_one(&self.pool)
        .await
        .map_err(self.err("reading the run"))?;
        Ok(RunInfo {
            id,
            created_at,
            spec: RunSpec {
                config_yaml,
                model,
                // Stored bit for bit (SQLite integers are signed).
                seed: seed as u64,
                attempts: attempts as u32,
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
}
