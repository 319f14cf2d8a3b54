//! The learner: a LoRA adapter being trained (its tensors are candle `Var`s), the frozen engine
//! that differentiates through it, and AdamW. [`Learner::train_iteration`] runs the optimizer
//! steps of one iteration's rollouts; [`Learner::save`] / [`Learner::resume`] carry the whole state
//! (adapter, moments, step) across processes, so stopping between iterations changes nothing.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor, Var};
use model::{Engine, LoraAdapter, Proj, ScoreRequest};
use rl_core::config::Config;
use rl_core::stats;
use rl_core::wire::FinishReason;
use rl_store::{Store, TrainMetrics};

use crate::checkpoint::{self, TrainingState};
use crate::grpo::{self, Objective};
use crate::optim::{self, AdamW};

/// One completion to learn from.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    /// The sampler's logprobs: the behaviour policy. They weigh the loss only through
    /// truncated importance sampling (`learner.tis_cap`) and show the sampler/learner mismatch;
    /// the clipped ratio's "old" policy is the learner's own logprobs under the iteration's
    /// starting adapter (see [`Learner::train_iteration`]).
    pub sampler: Vec<f32>,
    /// The reference model's logprobs.
    pub reference: Vec<f32>,
    pub reward: f64,
    /// Cut by `max_tokens` rather than ended by a stop token.
    pub truncated: bool,
}

/// An iteration's rollouts, group by group (each group is one problem's attempts).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    pub groups: Vec<Vec<Sequence>>,
}

/// Reads an iteration's rollouts from the store; every one must have its reference logprobs,
/// and none may come from a policy more than `max_lag` versions behind (`async.max_lag`: the
/// checkpoint of iteration `iteration - 1 - max_lag` or later) or from a later one.
pub async fn load_batch(store: &Store, iteration: u32, max_lag: u32) -> anyhow::Result<Batch> {
    let rollouts = store.rollouts(iteration).await?;
    if rollouts.is_empty() {
        bail!(
            "{}: iteration {iteration} has no rollouts; sample it first",
            store.path().display()
        );
    }
    let mut batch = Batch::default();
    let mut current: Option<u32> = None;
    let oldest = i64::from(iteration) - 1 - i64::from(max_lag);
    for (g, r) in rollouts {
        // Rows written before adapters were recorded, and base-model rows, say nothing.
        if let Some(adapter) = &r.adapter {
            let version = checkpoint::iteration_of(adapter).map(i64::from);
            if !version.is_some_and(|v| v >= oldest && v < i64::from(iteration)) {
                bail!(
                    "{}: iteration {iteration} group {g} attempt {} was sampled with `{adapter}`, not one of the checkpoints of iterations {}..={} that async.max_lag = {max_lag} allows; resume with the max_lag the run was sampled with",
                    store.path().display(),
                    r.attempt,
                    oldest.max(0),
                    i64::from(iteration) - 1
                );
            }
        }
        let Some(reference) = r.ref_logprobs else {
            bail!(
                "{}: iteration {iteration} group {g} attempt {} has no reference logprobs; run the ref scoring first",
                store.path().display(),
                r.attempt
            );
        };
        if current != Some(g) {
            batch.groups.push(Vec::new());
            current = Some(g);
        }
        if let Some(group) = batch.groups.last_mut() {
            group.push(Sequence {
                prompt: r.prompt_ids,
                completion: r.completion_ids,
                sampler: r.logprobs,
                reference,
                reward: r.reward,
                truncated: r.finish_reason == FinishReason::Length,
            });
        }
    }
    Ok(batch)
}

/// The learner's state.
pub struct Learner {
    engine: Engine,
    adapter: LoraAdapter,
    vars: Vec<(String, Var)>,
    opt: AdamW,
    config: Config,
    base_model: String,
    /// The last iteration trained (or restored), if any.
    pub iteration: Option<u32>,
}

impl std::fmt::Debug for Learner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Learner(step {}, iteration {:?})",
            self.opt.step, self.iteration
        )
    }
}

impl Learner {
    /// A fresh adapter as PEFT initialises one (A random, B zero), seeded by the run seed.
    pub fn new(engine: Engine, config: &Config, base_model: &str) -> anyhow::Result<Self> {
        let l = &config.lora;
        if l.dropout != 0.0 {
            bail!("lora.dropout is {}: the learner does not implement LoRA dropout yet; set lora.dropout=0", l.dropout);
        }
        let targets = l
            .targets
            .iter()
            .map(|t| {
                Proj::from_name(t).with_context(|| format!("lora.targets: unknown module `{t}`"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let lora = model::LoraConfig::new(l.r as usize, l.alpha, targets);
        let init = LoraAdapter::init(lora, engine.config(), config.seed, engine.device())?;
        let (adapter, vars) = init.trainable(Some(DType::F32))?;
        Ok(Self {
            engine,
            adapter,
            vars,
            opt: AdamW::default(),
            config: config.clone(),
            base_model: base_model.to_string(),
            iteration: None,
        })
    }

    /// Continues from a checkpoint written by [`Learner::save`].
    pub fn resume(
        engine: Engine,
        dir: &Path,
        config: &Config,
        base_model: &str,
    ) -> anyhow::Result<Self> {
        let (adapter, opt, state) = checkpoint::load(dir, engine.config(), engine.device())?;
        let (adapter, vars) = adapter.trainable(Some(DType::F32))?;
        if state.global_step != opt.step {
            bail!(
                "{}: training state says step {} but the optimizer {}",
                dir.display(),
                state.global_step,
                opt.step
            );
        }
        Ok(Self {
            engine,
            adapter,
            vars,
            opt,
            config: config.clone(),
            base_model: base_model.to_string(),
            iteration: Some(state.iteration),
        })
    }

    /// The adapter being trained.
    pub fn adapter(&self) -> &LoraAdapter {
        &self.adapter
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn step(&self) -> u64 {
        self.opt.step
    }

    /// Writes the checkpoint of `iteration` to `dir` atomically; returns its adapter's sha256.
    pub fn save(&self, dir: &Path, iteration: u32) -> anyhow::Result<String> {
        let state = TrainingState {
            iteration,
            global_step: self.opt.step,
            base_model: self.base_model.clone(),
        };
        checkpoint::save(dir, &self.adapter, &self.opt, &state)
    }

    /// Runs the optimizer steps of one iteration; returns one report per step.
    pub fn train_iteration(
        &mut self,
        iteration: u32,
        batch: &Batch,
    ) -> anyhow::Result<Vec<TrainMetrics>> {
        let cfg = self.config.learner.clone();
        let group_size = batch.groups.first().map_or(0, Vec::len);
        if batch.groups.iter().any(|g| g.len() != group_size) || group_size == 0 {
            bail!("iteration {iteration}: every group needs the same number of attempts");
        }
        let rewards: Vec<f64> = batch.groups.iter().flatten().map(|s| s.reward).collect();
        let advantages = grpo::advantages(&rewards, group_size, cfg.scale_rewards);
        let group_rewards: Vec<Vec<f64>> = batch
            .groups
            .iter()
            .map(|g| g.iter().map(|s| s.reward).collect())
            .collect();
        let zero_std: Vec<bool> = group_rewards.iter().map(|g| stats::zero_std(g)).collect();
        let zero_std_fraction = stats::zero_std_fraction(group_rewards.iter().map(Vec::as_slice));
        let reward_mean = rewards.iter().sum::<f64>() / rewards.len() as f64;
        let reward_std = grpo::std(&rewards);
        // The sequences that take part, with their advantages.
        let mut kept: Vec<(&Sequence, f64)> = Vec::new();
        for (g, group) in batch.groups.iter().enumerate() {
            if cfg.filter_zero_variance && zero_std[g] {
                continue;
            }
            for (k, s) in group.iter().enumerate() {
                kept.push((s, advantages[g * group_size + k]));
            }
        }
        let steps = (cfg.steps_per_iteration as usize).min(kept.len());
        let total_steps =
            u64::from(self.config.max_iterations) * u64::from(cfg.steps_per_iteration);
        let obj = Objective {
            beta: cfg.beta,
            epsilon_low: cfg.epsilon_low,
            epsilon_high: cfg.epsilon_high,
            level: cfg.importance_sampling_level,
        };
        let temperature = f64::from(self.config.sampling.train.temperature);
        let micro = cfg.micro_batch.max(1) as usize;
        // Contiguous, near-equal shares of the kept sequences, one per step.
        let shares: Vec<&[(&Sequence, f64)]> = (0..steps)
            .map(|s| &kept[kept.len() * s / steps..kept.len() * (s + 1) / steps])
            .collect();
        // The "old" policy of the clipped ratio is the adapter this iteration starts from, as
        // the learner computes it (verl's recomputed old logprobs), not the sampler's numbers:
        // those depend on what the sampler batched together, and would make a resumed run's
        // checkpoint differ from an uninterrupted one's. The first step's share is still at the
        // starting adapter, so its forward gives its old logprobs; the later shares are scored
        // now, before any update, in the micro-batches their steps will use.
        let mut old_of: Vec<Vec<Vec<f64>>> = vec![Vec::new(); steps];
        for (s, share) in shares.iter().enumerate().skip(1) {
            for chunk in share.chunks(micro) {
                let out = self.engine.train_logprobs(
                    &score_requests(chunk),
                    &self.adapter,
                    temperature,
                )?;
                old_of[s].push(
                    out.logprobs
                        .detach()
                        .to_dtype(DType::F64)?
                        .to_vec1::<f64>()?,
                );
            }
        }
        let mut reports = Vec::new();
        let mut total = Mismatch::default();
        for (s, share) in shares.iter().enumerate() {
            let mut mismatch = Mismatch::default();
            let (mut tis_cut, mut tis_tokens) = (0usize, 0usize);
            let t0 = Instant::now();
            let lens: Vec<usize> = share.iter().map(|(q, _)| q.completion.len()).collect();
            let masked: Vec<bool> = share
                .iter()
                .map(|(q, _)| cfg.mask_truncated && q.truncated)
                .collect();
            let weights = grpo::sequence_weights(&lens, &masked, cfg.loss_type);
            let mut grads: Vec<Vec<f32>> = self
                .vars
                .iter()
                .map(|(_, v)| vec![0f32; v.as_tensor().elem_count()])
                .collect();
            let (mut loss, mut kl, mut clipped, mut tokens) = (0.0, 0.0, 0.0, 0.0);
            for (m, chunk) in share.chunks(micro).enumerate() {
                let out = self.engine.train_logprobs(
                    &score_requests(chunk),
                    &self.adapter,
                    temperature,
                )?;
                let w: Vec<f64> = weights[m * micro..m * micro + chunk.len()].to_vec();
                let adv: Vec<f64> = chunk.iter().map(|(_, a)| *a).collect();
                let old: Vec<f64> = match old_of[s].get_mut(m) {
                    Some(old) => std::mem::take(old),
                    None => out
                        .logprobs
                        .detach()
                        .to_dtype(DType::F64)?
                        .to_vec1::<f64>()?,
                };
                mismatch.add(chunk, &old);
                let token_weights = grpo::per_token(&w, &out.offsets);
                // Truncated importance sampling: the sampler's policy (behaviour) against the
                // learner's at the starting adapter.
                let tis = match cfg.tis_cap {
                    Some(cap) => {
                        let sampler: Vec<f64> = chunk
                            .iter()
                            .flat_map(|(q, _)| q.sampler.iter().map(|&x| f64::from(x)))
                            .collect();
                        if sampler.len() != old.len() {
                            bail!(
                                "iteration {iteration}: {} sampler logprobs for {} completion tokens",
                                sampler.len(),
                                old.len()
                            );
                        }
                        let (weights, cut) = grpo::tis_weights(&old, &sampler, cap);
                        // Over the tokens that count (a masked sequence weighs nothing).
                        for (c, tw) in cut.iter().zip(&token_weights) {
                            if *tw > 0.0 {
                                tis_tokens += 1;
                                tis_cut += usize::from(*c);
                            }
                        }
                        Some(weights)
                    }
                    None => None,
                };
                let reference: Vec<f64> = chunk
                    .iter()
                    .flat_map(|(q, _)| q.reference.iter().map(|&x| f64::from(x)))
                    .collect();
                let t = grpo::terms(
                    &out.logprobs,
                    &grpo::Tokens {
                        offsets: &out.offsets,
                        old: &old,
                        reference: &reference,
                        advantage: &grpo::per_token(&adv, &out.offsets),
                        weight: &token_weights,
                        tis: tis.as_deref(),
                    },
                    obj,
                )?;
                loss += t.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                kl += t.kl_sum;
                clipped += t.clipped;
                tokens += t.tokens;
                let g = t.loss.backward()?;
                for ((name, var), acc) in self.vars.iter().zip(grads.iter_mut()) {
                    // A tensor outside the graph (e.g. a projection no token reached) has no
                    // gradient: it contributes zero.
                    if let Some(grad) = g.get(var.as_tensor()) {
                        let grad = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        if grad.len() != acc.len() {
                            bail!(
                                "gradient of {name} has {} values for {}",
                                grad.len(),
                                acc.len()
                            );
                        }
                        for (a, x) in acc.iter_mut().zip(grad) {
                            *a += x;
                        }
                    }
                }
            }
            let views: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
            let (grad_norm, factor) = optim::clip_factor(&views, cfg.max_grad_norm);
            self.opt.begin_step();
            let lr = optim::learning_rate(
                cfg.lr,
                cfg.schedule,
                u64::from(cfg.warmup_steps),
                self.opt.step,
                total_steps,
            );
            for ((name, var), grad) in self.vars.iter().zip(grads.iter_mut()) {
                if factor != 1.0 {
                    for x in grad.iter_mut() {
                        *x = (f64::from(*x) * factor) as f32;
                    }
                }
                let mut param = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                self.opt
                    .update(name, &mut param, grad, lr, cfg.weight_decay);
                var.set(&Tensor::from_vec(
                    param,
                    var.as_tensor().shape(),
                    var.as_tensor().device(),
                )?)?;
            }
            let seconds = t0.elapsed().as_secs_f64();
            let step_tokens: usize = share
                .iter()
                .map(|(q, _)| q.prompt.len() + q.completion.len())
                .sum();
            reports.push(TrainMetrics {
                step: self.opt.step,
                loss,
                mean_kl: if tokens > 0.0 { kl / tokens } else { 0.0 },
                clip_fraction: if tokens > 0.0 { clipped / tokens } else { 0.0 },
                grad_norm,
                lr,
                reward_mean,
                reward_std,
                zero_std_fraction,
                completion_len: lens.iter().sum::<usize>() as f64 / lens.len().max(1) as f64,
                tokens_per_s: step_tokens as f64 / seconds.max(1e-9),
                sampler_mismatch_mean: mismatch.mean(),
                sampler_mismatch_max: mismatch.max(),
                tis_clip_fraction: cfg
                    .tis_cap
                    .map(|_| tis_cut as f64 / tis_tokens.max(1) as f64),
            });
            tracing::info!(
                "iteration {iteration} step {}: sampler vs learner logprobs before the update: mean |diff| {:.2e}, max {:.2e} over {} tokens{}",
                self.opt.step,
                mismatch.mean().unwrap_or(0.0),
                mismatch.max().unwrap_or(0.0),
                mismatch.tokens,
                match cfg.tis_cap {
                    Some(cap) => format!("; importance weights cut to {cap}: {tis_cut} of {tis_tokens} tokens"),
                    None => String::new(),
                }
            );
            total.merge(&mismatch);
        }
        if let (Some(mean), Some(max)) = (total.mean(), total.max()) {
            tracing::info!(
                "iteration {iteration}: sampler vs learner logprobs at the starting adapter: mean |diff| {mean:.2e}, max {max:.2e} over {} tokens",
                total.tokens
            );
        }
        self.iteration = Some(iteration);
        Ok(reports)
    }
}

/// The engine's requests for a chunk of sequences.
fn score_requests(chunk: &[(&Sequence, f64)]) -> Vec<ScoreRequest> {
    chunk
        .iter()
        .map(|(q, _)| ScoreRequest {
            prompt: q.prompt.clone(),
            completion: q.completion.clone(),
        })
        .collect()
}

/// How far the sampler's logprobs are from the learner's at the same adapter (numerics of two
/// engines' batching and kernels; off-policy lag once sampling overlaps training).
#[derive(Debug, Default)]
struct Mismatch {
    sum: f64,
    largest: f64,
    tokens: usize,
}

impl Mismatch {
    /// Adds a chunk's tokens: the sampler's logprobs against the learner's `old` (flat).
    fn add(&mut self, chunk: &[(&Sequence, f64)], old: &[f64]) {
        let sampler = chunk.iter().flat_map(|(q, _)| q.sampler.iter());
        for (&a, &b) in sampler.zip(old) {
            let d = (f64::from(a) - b).abs();
            self.sum += d;
            self.largest = self.largest.max(d);
            self.tokens += 1;
        }
    }

    fn merge(&mut self, other: &Mismatch) {
        self.sum += other.sum;
        self.largest = self.largest.max(other.largest);
        self.tokens += other.tokens;
    }

    /// The mean difference (`None`: no tokens).
    fn mean(&self) -> Option<f64> {
        (self.tokens > 0).then(|| self.sum / self.tokens as f64)
    }

    /// The largest difference (`None`: no tokens).
    fn max(&self) -> Option<f64> {
        (self.tokens > 0).then_some(self.largest)
    }
}
