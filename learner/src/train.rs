//! The learner: a LoRA adapter being trained (its tensors are candle `Var`s), the frozen engine
//! that differentiates through it, and AdamW. [`Learner::train_iteration`] runs the optimizer
//! steps of one iteration's rollouts, in four parts: the plan (advantages, filtering, shares:
//! [`crate::plan`]), the old policy's logprobs, then per step its micro-steps (forward, loss,
//! backward: [`crate::step`]), the optimizer ([`crate::optim::apply`]) and the report
//! ([`crate::report`]). [`Learner::save`] / [`Learner::resume`] carry the whole state (adapter,
//! moments, step) across processes, so stopping between iterations changes nothing.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Var};
use model::{Engine, LoraAdapter, Proj};
use rl_core::config::Config;
use rl_store::TrainMetrics;

use crate::batch::Batch;
use crate::checkpoint::{self, TrainingState};
use crate::grpo::Objective;
use crate::optim::{self, AdamW};
use crate::plan::{Plan, Share};
use crate::report::{self, Mismatch, Update};
use crate::step::{Gradients, MicroStep, StepTotals};

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
        let plan = Plan::new(batch, &cfg, iteration)?;
        let shares = plan.shares(&cfg);
        let total_steps =
            u64::from(self.config.max_iterations) * u64::from(cfg.steps_per_iteration);
        let micro = cfg.micro_batch.max(1) as usize;
        let mut old_of = self.old_logprobs(&shares, batch, micro)?;
        let mut reports = Vec::new();
        let mut mismatch = Mismatch::default();
        for (s, share) in shares.iter().enumerate() {
            let t0 = Instant::now();
            let mut grads = Gradients::zeros(&self.vars);
            let mut totals = StepTotals::default();
            let step = self.micro_step(batch);
            for (m, chunk) in share.seqs.chunks(micro).enumerate() {
                let weights = &share.weights[m * micro..m * micro + chunk.len()];
                let old = old_of[s].get_mut(m).map(std::mem::take);
                step.run(chunk, weights, old, &mut grads, &mut totals)
                    .with_context(|| format!("iteration {iteration} step {}", s + 1))?;
            }
            let (grad_norm, lr) =
                optim::apply(&mut self.opt, &self.vars, &mut grads.0, &cfg, total_steps)?;
            let update = Update {
                step: self.opt.step,
                grad_norm,
                lr,
            };
            let seconds = t0.elapsed().as_secs_f64();
            reports.push(report::report(
                share,
                &totals,
                update,
                plan.rewards,
                cfg.tis_cap,
                seconds,
            ));
            report::log_step(iteration, &update, &totals, cfg.tis_cap);
            mismatch.merge(&totals.mismatch);
        }
        if let (Some(mean), Some(max)) = (mismatch.mean(), mismatch.max()) {
            tracing::info!(
                "iteration {iteration}: sampler vs learner logprobs at the starting adapter: mean |diff| {mean:.2e}, max {max:.2e} over {} tokens",
                mismatch.tokens
            );
        }
        self.iteration = Some(iteration);
        Ok(reports)
    }

    /// The micro-step over the adapter as it is now, for `batch`'s rollouts.
    fn micro_step<'a>(&'a self, batch: &Batch) -> MicroStep<'a> {
        let cfg = &self.config.learner;
        MicroStep {
            engine: &self.engine,
            adapter: &self.adapter,
            vars: &self.vars,
            objective: Objective {
                beta: cfg.beta,
                epsilon_low: cfg.epsilon_low,
                epsilon_high: cfg.epsilon_high,
                level: cfg.importance_sampling_level,
            },
            temperature: batch.temperature,
            tis_cap: cfg.tis_cap,
        }
    }

    /// The "old" policy of the clipped ratio, per share and micro-batch: the adapter this
    /// iteration starts from, as the learner computes it (verl's recomputed old logprobs), not
    /// the sampler's numbers, which depend on what the sampler batched together and would make
    /// a resumed run's checkpoint differ from an uninterrupted one's. The first share is still
    /// at the starting adapter when it is trained, so its forward gives its own (left empty
    /// here); the later shares are scored now, before any update, in the micro-batches their
    /// steps will use.
    fn old_logprobs(
        &self,
        shares: &[Share<'_>],
        batch: &Batch,
        micro: usize,
    ) -> anyhow::Result<Vec<Vec<Vec<f64>>>> {
        let step = self.micro_step(batch);
        let mut old_of = vec![Vec::new(); shares.len()];
        for (s, share) in shares.iter().enumerate().skip(1) {
            for chunk in share.seqs.chunks(micro) {
                old_of[s].push(step.old_logprobs(chunk)?);
            }
        }
        Ok(old_of)
    }
}
