//! The `checkpoints` table: the checkpoint each iteration produced and the sha256 of its
//! adapter weights.

use sqlx::FromRow;

use crate::{Store, StoreError};

/// A checkpoint an iteration produced: its folder and the sha256 of its adapter weights.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct CheckpointRecord {
    #[sqlx(try_from = "i64")]
    pub iteration: u32,
    pub path: String,
    pub sha256: String,
}

impl Store {
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
        sqlx::query_as(
            "SELECT iteration, path, sha256 FROM checkpoints WHERE run_id = ? ORDER BY iteration",
        )
        .bind(self.run_id)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("reading checkpoints"))
    }
}
