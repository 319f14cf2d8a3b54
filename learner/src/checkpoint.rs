//! Checkpoints: a PEFT adapter folder (`adapter_model.safetensors`, `adapter_config.json`) plus
//! the optimizer's moments (`optimizer.safetensors`) and `training_state.json` (step, iteration).
//! Written into a hidden temporary folder beside the target, every file fsynced, then renamed into
//! place and the parent fsynced: a crash leaves either the whole checkpoint or a `.NAME.tmp-PID`
//! folder that [`clean_partials`] removes and nothing reads.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use model::LoraAdapter;
use serde::{Deserialize, Serialize};

use crate::optim::{AdamW, Moments};

pub const STATE_FILE: &str = "training_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";

/// Environment variable naming a point at which the learner aborts, to test crash safety:
/// `checkpoint-before-rename` aborts after the temporary folder is written, before the rename.
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

fn fsync(path: &Path) -> anyhow::Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("fsync {}", path.display()))
}

/// The temporary folder a checkpoint of `dir` is written in.
fn temp_dir_for(dir: &Path) -> anyhow::Result<PathBuf> {
    let name = dir
        .file_name()
        .with_context(|| format!("{} is not a folder path", dir.display()))?;
    let parent = dir.parent().unwrap_or(Path::new("."));
    Ok(parent.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Removes the partial checkpoints (`.NAME.tmp-PID`) a crash left in `parent`; returns how many.
pub fn clean_partials(parent: &Path) -> anyhow::Result<usize> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".tmp-") && entry.path().is_dir() {
            std::fs::remove_dir_all(entry.path()).with_context(|| {
                format!("removing the partial checkpoint {}", entry.path().display())
            })?;
            removed += 1;
        }
    }
    Ok(removed)
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
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = temp_dir_for(dir)?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    adapter
        .save(&tmp)
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
    std::fs::write(
        tmp.join(STATE_FILE),
        serde_json::to_string_pretty(&st)? + "\n",
    )?;
    for f in [
        "adapter_config.json",
        ADAPTER_FILE,
        OPTIMIZER_FILE,
        STATE_FILE,
    ] {
        fsync(&tmp.join(f))?;
    }
    fsync(&tmp)?;
    if std::env::var(FAILPOINT_ENV).as_deref() == Ok("checkpoint-before-rename") {
        eprintln!(
            "{FAILPOINT_ENV}: aborting before renaming {} into place",
            tmp.display()
        );
        std::process::abort();
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    fsync(parent)?;
    let weights = dir.join(ADAPTER_FILE);
    rl_core::store::sha256_file(&weights).with_context(|| format!("hashing {}", weights.display()))
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
