//! `rl-core`: the domain types every service shares. For now the wire formats of scoring (the
//! offline jsonl of `ref-scorer score` and, later, `POST /v1/score`); the run config, GSM8K tasks
//! and rewards, the rollout store and the typed HTTP client come with their issues.
//!
//! It must never depend on the model engine (services depend on both; the arrow points one way)
//! and never silently drop or reorder a record: every malformed line is an error naming it.

pub mod wire;
