//! `orchestrate`: the loop that turns a run config into trained LoRA checkpoints, after
//! TapeAgents' `rl_gsm8k`: it supervises the rollout servers and ref-scorers, local replicas or
//! remote endpoints used as pools ([`supervisor`]), samples each iteration's problems, scores them
//! against the reference, runs a learner process per iteration, sends its checkpoint to the
//! rollout servers and evaluates, sampling up to `async.max_lag` iterations ahead of training
//! ([`run`], a module per phase; the child processes' command lines are typed in [`children`]); what
//! a run shows is in [`report`]; a trained run leaves as a merged model through [`export`];
//! [`device`] refuses a device the build or the machine cannot use before anything is created.
//!
//! It must never keep state the rollout database does not have: a run killed at any point and
//! started again continues where it stopped, with no group lost or duplicated.

pub mod children;
pub mod curves;
pub mod device;
pub mod eval;
pub mod export;
pub mod report;
pub mod run;
pub mod supervisor;
