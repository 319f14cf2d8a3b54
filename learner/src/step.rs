//! One micro-step of an optimizer step: the forward of a micro-batch through the adapter
//! being trained, its GRPO loss (with truncated importance sampling when on), the backward, and
//! the LoRA gradients added into the step's sums; and the old policy's logprobs of a
//! micro-batch, scored before any update.

use anyhow::{bail, Context};
use candle_core::{DType, Var};
use model::{Engine, LoraAdapter, ScoreRequest};
use sampling::ScoreTemperature;

use crate::grpo::{self, Objective, Tokens};
use crate::plan::Kept;
use crate::report::Mismatch;

/// The LoRA gradients of a step, summed over its micro-batches, one vector per tensor.
#[derive(Debug)]
pub struct Gradients(pub Vec<Vec<f32>>);

impl Gradients {
    /// Zeros shaped like `vars`.
    pub fn zeros(vars: &[(String, Var)]) -> Self {
        Self(
            vars.iter()
                .map(|(_, v)| vec![0f32; v.as_tensor().elem_count()])
                .collect(),
        )
    }
}

/// What a step adds up over its micro-batches (for its report).
#[derive(Debug, Default)]
pub struct StepTotals {
    pub loss: f64,
    /// Sums over the live tokens (those of weight > 0) and their count.
    pub kl: f64,
    pub clipped: f64,
    pub tokens: f64,
    /// Live tokens whose importance weight was cut to the cap, of those weighted.
    pub tis_cut: usize,
    pub tis_tokens: usize,
    pub mismatch: Mismatch,
}

/// Everything a micro-step reads: the frozen engine, the adapter being trained (its tensors
/// are `vars`), the objective and the temperature the rollouts were drawn at.
pub struct MicroStep<'a> {
    pub engine: &'a Engine,
    pub adapter: &'a LoraAdapter,
    pub vars: &'a [(String, Var)],
    pub objective: Objective,
    pub temperature: ScoreTemperature,
    pub tis_cap: Option<f64>,
}

impl MicroStep<'_> {
    /// The logprobs of `chunk`'s completion tokens at the current adapter, detached (flat).
    pub fn old_logprobs(&self, chunk: &[Kept<'_>]) -> anyhow::Result<Vec<f64>> {
        let out =
            self.engine
                .train_logprobs(&self.requests(chunk)?, self.adapter, self.temperature)?;
        Ok(out
            .logprobs
            .detach()
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?)
    }

    /// Forward, loss and backward of `chunk` (each sequence weighing `weights`), its
    /// gradients added into `grads` and its numbers into `totals`. `old`: the chunk's old
    /// logprobs if scored already, else this forward's own (the step's first share is still at
    /// the starting adapter).
    pub fn run(
        &self,
        chunk: &[Kept<'_>],
        weights: &[f64],
        old: Option<Vec<f64>>,
        grads: &mut Gradients,
        totals: &mut StepTotals,
    ) -> anyhow::Result<()> {
        let out =
            self.engine
                .train_logprobs(&self.requests(chunk)?, self.adapter, self.temperature)?;
        let old = match old {
            Some(old) => old,
            None => out
                .logprobs
                .detach()
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?,
        };
        totals.mismatch.add(chunk, &old);
        let reference: Vec<f64> = chunk
            .iter()
            .flat_map(|k| k.seq.reference.iter().map(|&x| f64::from(x)))
            .collect();
        let advantages: Vec<f64> = chunk.iter().map(|k| k.advantage).collect();
        let mut tokens = Tokens::new(&out.offsets, &old, &reference, &advantages, weights)?;
        if let Some(cap) = self.tis_cap {
            tokens = self.importance_weighted(tokens, chunk, &old, cap, totals)?;
        }
        let t = grpo::terms(&out.logprobs, &tokens, self.objective)?;
        totals.loss += t.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        totals.kl += t.kl_sum;
        totals.clipped += t.clipped;
        totals.tokens += t.tokens;
        let g = t.loss.backward()?;
        for ((name, var), acc) in self.vars.iter().zip(grads.0.iter_mut()) {
            // A tensor outside the graph (e.g. a projection no token reached) has no
            // gradient: it contributes zero.
            let Some(grad) = g.get(var.as_tensor()) else {
                continue;
            };
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
        Ok(())
    }

    /// Truncated importance sampling: the sampler's policy (behaviour) against the learner's
    /// at the starting adapter (`old`), counting the live tokens cut to `cap`.
    fn importance_weighted(
        &self,
        tokens: Tokens,
        chunk: &[Kept<'_>],
        old: &[f64],
        cap: f64,
        totals: &mut StepTotals,
    ) -> anyhow::Result<Tokens> {
        let sampler: Vec<f64> = chunk
            .iter()
            .flat_map(|k| k.seq.sampler.iter().map(|&x| f64::from(x)))
            .collect();
        if sampler.len() != old.len() {
            bail!(
                "{} sampler logprobs for {} completion tokens",
                sampler.len(),
                old.len()
            );
        }
        let (weights, cut) = grpo::tis_weights(old, &sampler, cap);
        // Over the tokens that count (a masked sequence weighs nothing).
        for (c, w) in cut.iter().zip(tokens.weight()) {
            if *w > 0.0 {
                totals.tis_tokens += 1;
                totals.tis_cut += usize::from(*c);
            }
        }
        Ok(tokens.with_tis(weights)?)
    }

    /// The engine's requests for a chunk, checked against its limits.
    fn requests(&self, chunk: &[Kept<'_>]) -> anyhow::Result<Vec<ScoreRequest>> {
        let limits = self.engine.limits();
        chunk
            .iter()
            .enumerate()
            .map(|(i, k)| {
                ScoreRequest::new(
                    &format!("sequence {i}"),
                    k.seq.prompt.clone(),
                    k.seq.completion.clone(),
                    limits,
                )
                .context("a rollout does not fit the model being trained")
            })
            .collect()
    }
}
