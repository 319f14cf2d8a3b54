//! `rl-core`: the domain every service shares: GSM8K tasks ([`tasks`]), prompt styles
//! ([`prompts`]), rewards ([`rewards`]), the run config ([`config`]), the rollout store on SQLite
//! ([`store`]), the wire formats ([`wire`]), the typed HTTP client ([`client`]) and what both
//! HTTP services share ([`service`]).
//!
//! It must never depend on the model engine (services depend on both; the arrow points one way)
//! and never silently drop or reorder a record: every malformed line, key or row is an error
//! naming it.

pub mod client;
pub mod config;
pub mod prompts;
pub mod rewards;
pub mod service;
pub mod store;
pub mod tasks;
pub mod wire;
pub mod yaml;
