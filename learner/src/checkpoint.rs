//! The checkpoint layout, in one place for the learner that writes checkpoints and the
//! orchestrator and export that find, record and verify them: `RUN/checkpoints/iter_N/` holds a
//! PEFT adapter folder (`adapter_model.safetensors`, `adapter_config.json`) plus the optimizer's
//! moments (`optimizer.safetensors`) and `training_state.json` (step, iteration), written last.
//! A folder is written whole through [`rl_core::files::write_dir`] (hidden temporary,
//! fsynced, renamed): a crash leaves either the whole checkpoint or a temporary that
//! [`clean_partials`] removes and nothing reads. Its identity is the sha256 of the adapter
//! weights, recorded in the run's database and checked by [`verify`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use model::LoraAdapter;
use serde::{Deserialize, Serialize};

use crate::optim::{AdamW, Moments};

pub const STATE_FILE: &str = "training_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub use model::lora::{CONFIG_FILE as ADAPTER_CONFIG_FILE, WEIGHTS_FILE as ADAPTER_FILE};

/// Environment variable naming a point at which the learner aborts, to test crash safety (in
/// builds with the `failpoints` feature): `checkpoint-before-rename` aborts after the temporary
/// folder is written, before the rename.
#[cfg(feature = "failpoints")]
pub const FAILPOINT_ENV: &str = "LEARNER_FAILPOINT";

/// What a resumed run needs besides the tensors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingState {
    /// The iteration this checkpoint finished.
    pub iteration: u32,
    /// Optimizer steps taken since the run started.
    pub global_step: u64,
    /// The base model the adapter was trained on (as given on the command line).
    pub base_model: String,
}

/// The folder of all checkpoints of the run in `run_dir`.
pub fn root(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// The name of `iteration`'s checkpoint folder inside [`root`] (also the adapter id a rollout
/// server is given for it and answers with; the policy version itself is stored as the integer,
/// never parsed back from a name).
pub fn name(iteration: u32) -> String {
    format!("iter_{iteration}")
}

/// The checkpoint folder of `iteration` of the run in `run_dir`.
pub fn dir(run_dir: &Path, iteration: u32) -> PathBuf {
    root(run_dir).join(name(iteration))
}

/// Whether `dir` holds a finished checkpoint (its state file is written last).
pub fn is_complete(dir: &Path) -> bool {
    dir.join(STATE_FILE).exists()
}

/// The sha256 of the checkpoint's adapter weights (what the run's database records).
pub fn weights_sha256(dir: &Path) -> anyhow::Result<String> {
    let weights = dir.join(ADAPTER_FILE);
    Ok(rl_core::files::sha256(&weights)?)
}

/// Checks that the adapter weights in `dir` are the ones recorded (`sha256`).
pub fn verify(dir: &Path, iteration: u32, sha256: &str) -> anyhow::Result<()> {
    let on_disk = weights_sha256(dir)?;
    if on_disk != sha256 {
        bail!(
            "{} does not match the sha256 recorded for iteration {iteration} ({} on disk, {} recorded): \
             the checkpoint was changed or damaged after training",
            dir.join(ADAPTER_FILE).display(),
            &on_disk[..12],
            &sha256[..12.min(sha256.len())]
        );
    }
    Ok(())
}

/// Removes the partial checkpoints a crash left in `parent`; returns how many.
pub fn clean_partials(parent: &Path) -> anyhow::Result<usize> {
    Ok(rl_core::files::remove_partials(parent)?)
}

/// Writes a checkpoint to `dir` atomically; returns the sha256 of its adapter weights.
pub fn save(
    dir: &Path,
    adapter: &LoraAdapter,
    opt: &AdamW,
    state: &TrainingState,
) -> anyhow::Result<String> {
    if dir.exists() {
        bail!(
            "{} already exists; a checkpoint is never overwritten (remove it to train this iteration again)",
            dir.display()
        );
    }
    let fill = |tmp: &Path| -> anyhow::Result<()> {
        adapter
            .save(tmp)
            .with_context(|| format!("writing the adapter into {}", tmp.display()))?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (name, m) in &opt.moments {
            let n = m.m.len();
            tensors.insert(
                format!("{name}.exp_avg"),
                Tensor::from_vec(m.m.clone(), n, &Device::Cpu)?,
            );
            tensors.insert(
                format!("{name}.exp_avg_sq"),
                Tensor::from_vec(m.v.clone(), n, &Device::Cpu)?,
            );
        }
        candle_core::safetensors::save(&tensors, tmp.join(OPTIMIZER_FILE))?;
        let mut st = serde_json::to_value(state)?;
        st["optimizer_step"] = serde_json::json!(opt.step);
        let path = tmp.join(STATE_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&st)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        #[cfg(feature = "failpoints")]
        if std::env::var(FAILPOINT_ENV).as_deref() == Ok("checkpoint-before-rename") {
            eprintln!(
                "{FAILPOINT_ENV}: aborting before renaming {} into place",
                tmp.display()
            );
            std::process::abort();
        }
        Ok(())
    };
    rl_core::files::write_dir(dir, fill)?;
    weights_sha256(dir)
}

/// Reads a checkpoint written by [`save`]: the adapter (checked against `model`), the optimizer
/// and the training state.
pub fn load(
    dir: &Path,
    model: &model::ModelConfig,
    device: &Device,
) -> anyhow::Result<(LoraAdapter, AdamW, TrainingState)> {
    let adapter = LoraAdapter::load(dir, model, device)
        .with_context(|| format!("reading the adapter of {}", dir.display()))?;
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).with_context(|| {
        format!(
            "{} is missing: {} is not a learner checkpoint",
            state_path.display(),
            dir.display()
        )
    })?;
    let mut value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", state_path.display()))?;
    let step = value
        .as_object_mut()
        .and_then(|o| o.remove("optimizer_step"))
        .and_then(|v| v.as_u64())
        .with_context(|| format!("{} has no `optimizer_step`", state_path.display()))?;
    let state: TrainingState = serde_json::from_value(value)
        .with_context(|| format!("{} is not a training state", state_path.display()))?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let tensors = candle_core::safetensors::load(&opt_path, &Device::Cpu)
        .with_context(|| format!("reading {}", opt_path.display()))?;
    let mut opt = AdamW {
        step,
        ..AdamW::default()
    };
    for (key, t) in &tensors {
        let Some(name) = key.strip_suffix(".exp_avg") else {
            continue;
        };
        let v = tensors
            .get(&format!("{name}.exp_avg_sq"))
            .with_context(|| format!("{}: `{name}.exp_avg_sq` is missing", opt_path.display()))?;
        opt.moments.insert(
            name.to_string(),
            Moments {
                m: t.flatten_all()?.to_vec1::<f32>()?,
                v: v.flatten_all()?.to_vec1::<f32>()?,
            },
        );
    }
    if opt.moments.len() * 2 != tensors.len() {
        bail!(
            "{}: every `.exp_avg` needs its `.exp_avg_sq`",
            opt_path.display()
        );
    }
    Ok((adapter, opt, state))
}
