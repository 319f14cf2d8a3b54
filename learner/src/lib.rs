//! `learner`: the GRPO update on a LoRA adapter (DESIGN.md section 6). A process per iteration:
//! it reads the iteration's rollouts (with sampler and reference logprobs) from the store, runs
//! the configured optimizer steps ([`train`]: the plan, the micro-steps, the optimizer and the
//! report, a module each; the rollouts and what made them in [`batch`]), writes the next checkpoint atomically
//! ([`checkpoint`]: adapter + optimizer moments + step; also the one home of the checkpoint
//! layout, which the orchestrator and export read), records its per-step metrics, and exits.
//! The loss ([`grpo`]) and the optimizer ([`optim`]) are small and pinned by oracles.
//!
//! It must never write a checkpoint that looks whole but is not, never overwrite one, never train
//! on a rollout without reference logprobs, and never change the base model's weights.

pub mod batch;
pub mod check;
pub mod checkpoint;
pub mod grpo;
pub mod optim;
pub mod plan;
pub mod report;
pub mod step;
pub mod train;

pub use batch::{load_batch, Batch, Sequence};
pub use train::Learner;
