//! `orchestrate export RUN_DIR --merge OUT_DIR`: a run's trained policy as a standalone Hugging
//! Face folder (base model with the checkpoint's LoRA merged in), for transformers, vLLM or any
//! other stack. It reads the run's database to pick the checkpoint (the latest, or a given
//! iteration) and checks the adapter file against the sha256 recorded when it was made, so a
//! checkpoint changed or damaged on disk is never exported silently.

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::DType;
use learner::checkpoint;
use rl_core::config::Config;
use rl_store::Store;

/// Exports the checkpoint of `iteration` (default: the latest) of the run in `run_dir`, merged
/// into its base model (or `model`, when the base has moved), to `out`.
pub async fn command(
    run_dir: &Path,
    out: &Path,
    iteration: Option<u32>,
    model: Option<&str>,
    dtype: DType,
) -> anyhow::Result<model::ExportReport> {
    let config_path = run_dir.join("config.yaml");
    let config = Config::load(&config_path, &[])
        .with_context(|| {
            format!(
                "{} is not a run directory (no readable config.yaml)",
                run_dir.display()
            )
        })?
        .config;
    let db = run_dir.join("rollouts.sqlite");
    if !db.exists() {
        bail!(
            "{} has no rollouts.sqlite: nothing was trained there yet",
            run_dir.display()
        );
    }
    let store = Store::open(&db).await?;
    let checkpoints = store.checkpoints().await;
    store.close().await;
    let checkpoints = checkpoints?;
    let Some(last) = checkpoints.last() else {
        bail!(
            "the run in {} has no checkpoint yet: train at least one iteration first",
            run_dir.display()
        );
    };
    let chosen = match iteration {
        None => last,
        Some(it) => checkpoints.iter().find(|c| c.iteration == it).with_context(|| {
            let have: Vec<String> = checkpoints.iter().map(|c| c.iteration.to_string()).collect();
            format!(
                "the run has no checkpoint of iteration {it} (it has: {}); pick one of those with --iteration",
                have.join(", ")
            )
        })?,
    };
    // The run dir may have moved since the record was written: look under this run dir.
    let adapter = checkpoint::dir(run_dir, chosen.iteration);
    checkpoint::verify(&adapter, chosen.iteration, &chosen.sha256)
        .map_err(|e| anyhow::anyhow!("{e}; export another --iteration"))?;
    let base = model.unwrap_or(&config.model.path);
    let base_path = model::hub::resolve(base)
        .with_context(|| format!("the base model {base} (pass --model if it has moved)"))?;
    let out = out.to_path_buf();
    // Written whole or not at all: a hidden temporary folder renamed into place.
    let report = tokio::task::spawn_blocking(move || {
        rl_core::files::write_dir(&out, |tmp| -> anyhow::Result<model::ExportReport> {
            let mut report = model::export_merged(&base_path, Some(&adapter), tmp, dtype)?;
            report.out.clone_from(&out);
            Ok(report)
        })
    })
    .await??;
    Ok(report)
}
