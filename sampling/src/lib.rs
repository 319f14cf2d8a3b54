//! `sampling`: the sampling knobs as types that cannot hold a value outside their rule
//! ([`Temperature`], [`TopP`], [`MaxTokens`], [`ScoreTemperature`], gathered in [`Knobs`]), so
//! that a knob is checked once, where it enters (the run config's YAML, a request's JSON, a row
//! of the rollout database), and never again: the engine (`model`) takes these types and holds
//! no check of its own. With the `openapi` feature each type also says its rule in the services'
//! OpenAPI documents, from the same constants. [`integral`] reads JSON integers as JSON Schema
//! defines them (`3` and `3.0` alike).
//!
//! A leaf crate, so that the engine and the domain share it without depending on each other
//! (DESIGN.md: rl-core never depends on model). It must never depend on anything of this
//! workspace, and never accept a value the engine cannot honour.

pub mod integral;
mod knobs;
#[cfg(feature = "openapi")]
pub mod schema;

pub use knobs::{Knobs, MaxTokens, SampledWith, ScoreTemperature, Temperature, TopP};

/// Most alternatives per step an HTTP client may ask for (`top_logprobs`, OpenAI's limit; the
/// engine itself accepts up to the vocabulary).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Most alternatives per token in legacy completions (`logprobs`, OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: u32 = 5;

/// Most stop strings per request (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// Largest `max_tokens` accepted anywhere (a typo guard well above any model's context; a server
/// also holds it to its model's context).
pub const MAX_TOKENS_LIMIT: u32 = 131_072;

/// Temperatures below this are greedy (1/T would overflow f32; vLLM treats them so too).
pub const GREEDY_BELOW: f64 = 1e-5;

/// Largest temperature accepted, for sampling and scoring (far above any useful value; a typo
/// guard, and it keeps `logits / T` from underflowing every logit to one value).
pub const MAX_TEMPERATURE: f64 = 100.0;

/// A knob outside its rule: `is VALUE; it must be RULE`, read after the knob's name (serde and
/// the config put the field's path in front: `` `temperature` is -0.5; it must be ... ``).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("is {value}; it must be {rule}")]
pub struct OutOfRange {
    pub value: String,
    pub rule: &'static str,
}

impl OutOfRange {
    /// The message with the knob's name in front: `` `name` is VALUE; it must be RULE ``.
    pub fn named(&self, name: &str) -> String {
        format!("`{name}` {self}")
    }
}

/// A float as a message shows it: `1e300` and `5e-324` rather than hundreds of digits.
fn shown(x: f64) -> String {
    if x.is_finite() && x != 0.0 && (x.abs() >= 1e16 || x.abs() < 1e-4) {
        format!("{x:e}")
    } else {
        x.to_string()
    }
}
