//! Phase 3, `training`: a learner process trains on the iteration and writes
//! `checkpoints/iter_N` (then the rollout server hot-swaps it in). A checkpoint the learner
//! finished but the run did not record is recorded, not trained again.

use anyhow::{bail, Context};
use learner::checkpoint;
use rl_store::CheckpointRecord;

use super::Run;
use crate::children::LearnerStep;

impl Run {
    /// Checks every recorded checkpoint against the sha256 the database holds. One that no
    /// longer matches (changed or damaged on disk) is moved aside (`iter_N.damaged-SECONDS`,
    /// never deleted) and trained again from the same rollouts and the previous checkpoint:
    /// training is deterministic, so the new one has the recorded bytes again.
    pub(super) async fn repair_checkpoints(&self) -> anyhow::Result<()> {
        for c in self.store.checkpoints().await? {
            let it = c.iteration;
            let dir = self.checkpoint_dir(it);
            let Err(e) = checkpoint::verify(&dir, it, &c.sha256) else {
                continue;
            };
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let aside = dir.with_file_name(format!("{}.damaged-{stamp}", checkpoint::name(it)));
            tracing::warn!(
                "{e:#}; moving it to {} and training iteration {it} again",
                aside.display()
            );
            if dir.exists() {
                std::fs::rename(&dir, &aside).with_context(|| {
                    format!("moving the damaged checkpoint {} aside", dir.display())
                })?;
            }
            self.train(it).await?;
            let now = checkpoint::weights_sha256(&dir)?;
            if now == c.sha256 {
                tracing::info!(
                    "iteration {it}: checkpoint trained again, identical to the recorded one"
                );
            } else {
                tracing::warn!(
                    "iteration {it}: the checkpoint trained again differs from the recorded one \
                     (the later checkpoints were trained from the original)"
                );
            }
        }
        Ok(())
    }

    pub(super) async fn train(&self, it: u32) -> anyhow::Result<()> {
        let out = self.checkpoint_dir(it);
        let recorded = self
            .store
            .checkpoints()
            .await?
            .into_iter()
            .any(|c| c.iteration == it);
        if recorded && checkpoint::is_complete(&out) {
            return Ok(());
        }
        if checkpoint::is_complete(&out) {
            // The learner finished but the run stopped before recording it: record, don't redo.
            let sha256 = checkpoint::weights_sha256(&out)?;
            self.store
                .record_checkpoint(&CheckpointRecord {
                    iteration: it,
                    path: out.display().to_string(),
                    sha256,
                })
                .await?;
            return Ok(());
        }
        let prev = it.checked_sub(1).map(|p| (p, self.checkpoint_dir(p)));
        if let Some((p, dir)) = &prev {
            if !checkpoint::is_complete(dir) {
                bail!(
                    "iteration {it} needs the checkpoint of iteration {p} at {}, which is missing",
                    dir.display()
                );
            }
        }
        let bar = crate::report::spinner(&format!("iteration {it}: training"));
        let c = &self.config;
        let config = self.dir.join("config.yaml");
        let mut cmd = LearnerStep {
            db: self.store.path(),
            iteration: it,
            model: &c.model.path,
            adapter_in: prev.as_ref().map(|(_, d)| d.as_path()),
            out: &out,
            config: &config,
            device: c.model.device,
            dtype: c.model.dtype.name(),
        }
        .command()?;
        let child = cmd.spawn().context("starting the learner")?;
        tracing::debug!(
            "iteration {it}: training: learner started (pid {})",
            child.id().map_or_else(|| "?".into(), |p| p.to_string())
        );
        self.while_training(it).await?;
        let output = child
            .wait_with_output()
            .await
            .context("waiting for the learner")?;
        bar.finish_and_clear();
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
            bail!(
                "the learner failed on iteration {it} ({}); the run can be resumed once this is fixed. Its last output:\n{}",
                output.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }
}
