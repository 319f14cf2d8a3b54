//! `rl-core`: the domain every part shares: GSM8K tasks ([`tasks`]), prompt styles
//! ([`prompts`]), rewards ([`rewards`]), the run config ([`config`]), the wire formats
//! ([`wire`]), the run's numbers each defined once ([`stats`]), and durable files ([`files`]:
//! atomic writes, sha256).
//!
//! It must never depend on the model engine, on HTTP or on SQL (the store is `rl-store`, the HTTP
//! kit `rl-http`; the arrows point one way), and never silently drop or reorder a record: every
//! malformed line, key or row is an error naming it.

pub mod config;
pub mod files;
pub mod prompts;
pub mod rewards;
pub mod stats;
pub mod tasks;
pub mod wire;
pub mod yaml;
