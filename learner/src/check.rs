//! `learner check`: the loss and LoRA gradients of one batch given as JSON (the format of
//! `golden/tiny_grpo_step.json`), without updating anything, for comparison with an oracle.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Tensor};
use model::{Engine, LoraAdapter, ScoreRequest};
use rl_core::config::{ImportanceLevel, LossType, ScaleRewards};
use sampling::ScoreTemperature;
use serde::Deserialize;

use crate::grpo::{self, Objective, Tokens};

/// A batch to check (extra fields of the fixture, such as the expected results, are ignored).
#[derive(Debug, Deserialize)]
pub struct CheckBatch {
    pub prompts: Vec<Vec<u32>>,
    pub completions: Vec<Vec<u32>>,
    pub rewards: Vec<f64>,
    pub group_size: usize,
    pub old_logp: Vec<Vec<f64>>,
    pub ref_logp: Vec<Vec<f64>>,
    pub beta: f64,
    pub epsilon: f64,
    #[serde(default)]
    pub epsilon_high: Option<f64>,
    pub loss_type: LossType,
    pub scale_rewards: ScaleRewards,
    #[serde(default = "one")]
    pub temperature: ScoreTemperature,
}

fn one() -> ScoreTemperature {
    ScoreTemperature::ONE
}

/// What `check` reports.
#[derive(Debug)]
pub struct CheckResult {
    pub loss: f64,
    pub mean_kl: f64,
    /// Gradient of every LoRA tensor under its PEFT key name.
    pub grads: HashMap<String, Tensor>,
}

/// Computes the loss and gradients of `batch` for `engine` + the adapter in `adapter_dir`.
pub fn run(engine: &Engine, adapter_dir: &Path, batch: &CheckBatch) -> anyhow::Result<CheckResult> {
    let n = batch.prompts.len();
    anyhow::ensure!(
        [
            batch.completions.len(),
            batch.rewards.len(),
            batch.old_logp.len(),
            batch.ref_logp.len()
        ]
        .iter()
        .all(|&k| k == n),
        "prompts, completions, rewards, old_logp and ref_logp must have one entry per sequence"
    );
    anyhow::ensure!(
        batch.group_size > 0 && n.is_multiple_of(batch.group_size),
        "{n} sequences do not split into groups of {}",
        batch.group_size
    );
    for i in 0..n {
        anyhow::ensure!(
            batch.old_logp[i].len() == batch.completions[i].len()
                && batch.ref_logp[i].len() == batch.completions[i].len(),
            "sequence {i}: old_logp and ref_logp need one value per completion token"
        );
    }
    let adapter = LoraAdapter::load(adapter_dir, engine.config(), engine.device())
        .with_context(|| format!("loading the adapter {}", adapter_dir.display()))?;
    let (trainable, vars) = adapter.trainable(Some(DType::F32))?;
    let reqs = (0..n)
        .map(|i| {
            ScoreRequest::new(
                &format!("sequence {i}"),
                batch.prompts[i].clone(),
                batch.completions[i].clone(),
                engine.limits(),
            )
        })
        .collect::<model::Result<Vec<_>>>()?;
    let out = engine.train_logprobs(&reqs, &trainable, batch.temperature)?;
    let adv = grpo::advantages(&batch.rewards, batch.group_size, batch.scale_rewards);
    let lens: Vec<usize> = batch.completions.iter().map(Vec::len).collect();
    let weights = grpo::sequence_weights(&lens, &vec![false; n], batch.loss_type);
    let obj = Objective {
        beta: batch.beta,
        epsilon_low: batch.epsilon,
        epsilon_high: batch.epsilon_high.unwrap_or(batch.epsilon),
        level: ImportanceLevel::Token,
    };
    let old: Vec<f64> = batch.old_logp.iter().flatten().copied().collect();
    let reference: Vec<f64> = batch.ref_logp.iter().flatten().copied().collect();
    let tokens = Tokens::new(&out.offsets, &old, &reference, &adv, &weights)?;
    let t = grpo::terms(&out.logprobs, &tokens, obj)?;
    let loss = t.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let g = t.loss.backward()?;
    let mut grads = HashMap::new();
    for (name, var) in &vars {
        let grad = match g.get(var.as_tensor()) {
            Some(grad) => grad.clone(),
            None => var.as_tensor().zeros_like()?,
        };
        grads.insert(name.clone(), grad);
    }
    Ok(CheckResult {
        loss,
        mean_kl: if t.tokens > 0.0 {
            t.kl_sum / t.tokens
        } else {
            0.0
        },
        grads,
    })
}
