//! What the engine accepts: a prompt to continue ([`GenerateRequest`]) and a completion to score
//! ([`ScoreRequest`]), each made only by its constructor, which checks it against the model's
//! [`Limits`] (token ids inside the vocabulary, the whole sequence inside the context). The
//! knobs come already checked by their types (`sampling`). So a request is checked once, where
//! it is built (a route, the learner, a test), and the engine never checks it again: it only
//! makes sure a request was built for a model of its own limits.
//!
//! Messages name the field as the caller calls it (`what`: `prompt_ids`, `messages`,
//! `sequences[3]`), so a route can pass them on as they are.

use crate::error::{Error, Result};
use crate::sampler::SamplingParams;

/// What a request must fit: the model's vocabulary and context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Token ids are `0..vocab`.
    pub vocab: usize,
    /// Prompt plus completion tokens at most.
    pub context: usize,
}

impl Limits {
    fn check_ids(&self, what: &str, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.vocab) {
            None => Ok(()),
            Some(bad) => Err(Error::InvalidRequest(format!(
                "`{what}` has token id {bad}, outside the vocabulary (ids 0..{})",
                self.vocab
            ))),
        }
    }

    /// `Err` unless `built` are these limits: a request checked for another model.
    pub(crate) fn same(&self, built: &Limits) -> Result<()> {
        if built == self {
            return Ok(());
        }
        Err(Error::InvalidRequest(format!(
            "a request checked against a model of vocabulary {} and context {} was sent to one of {} and {}; build it with this engine's limits()",
            built.vocab, built.context, self.vocab, self.context
        )))
    }
}

/// One prompt to continue, with its sampling settings.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    prompt: Vec<u32>,
    params: SamplingParams,
    limits: Limits,
}

impl GenerateRequest {
    /// Checks `prompt` (named `what` in messages) and `params` against `limits`: a prompt of at
    /// least one token, every id inside the vocabulary (stop ids too), room in the context for
    /// `max_tokens`, no empty stop sequence, at most a vocabulary of `top_logprobs`.
    pub fn new(
        what: &str,
        prompt: Vec<u32>,
        params: SamplingParams,
        limits: Limits,
    ) -> Result<Self> {
        if prompt.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "`{what}` is empty; send at least one token"
            )));
        }
        limits.check_ids(what, &prompt)?;
        let max_tokens = usize::from(params.knobs.max_tokens);
        if prompt.len() + max_tokens > limits.context {
            let room = limits.context.saturating_sub(prompt.len());
            return Err(Error::InvalidRequest(format!(
                "the prompt has {} tokens and `max_tokens` is {max_tokens}: over the model's context of {}; \
                 send a shorter prompt or max_tokens <= {room}",
                prompt.len(),
                limits.context
            )));
        }
        limits.check_ids("stop_token_ids", &params.stop_ids)?;
        if params.stop_sequences.iter().any(Vec::is_empty) {
            return Err(Error::InvalidRequest(
                "a stop sequence is empty; remove it".into(),
            ));
        }
        if params.top_logprobs > limits.vocab {
            return Err(Error::InvalidRequest(format!(
                "`top_logprobs` is {}; the vocabulary has {} ids",
                params.top_logprobs, limits.vocab
            )));
        }
        Ok(Self {
            prompt,
            params,
            limits,
        })
    }

    /// The same request drawn with another seed (the seed has no rule to check).
    pub fn reseeded(&self, seed: u64) -> Self {
        let mut r = self.clone();
        r.params.seed = seed;
        r
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }
}

/// A (prompt, completion) pair to score under teacher forcing.
#[derive(Debug, Clone)]
pub struct ScoreRequest {
    prompt: Vec<u32>,
    completion: Vec<u32>,
    limits: Limits,
}

impl ScoreRequest {
    /// Checks a pair (named `what` in messages, a JSON path such as `sequences[3]`; empty: the
    /// fields alone) against `limits`: a prompt of at least one token (the first completion
    /// token needs a context), every id inside the vocabulary, the whole sequence inside the
    /// context. The completion may be empty.
    pub fn new(what: &str, prompt: Vec<u32>, completion: Vec<u32>, limits: Limits) -> Result<Self> {
        let field = |name: &str| match what {
            "" => name.to_string(),
            _ => format!("{what}.{name}"),
        };
        if prompt.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "`{}` is empty (the first completion token needs a context)",
                field("prompt_ids")
            )));
        }
        limits.check_ids(&field("prompt_ids"), &prompt)?;
        limits.check_ids(&field("completion_ids"), &completion)?;
        if prompt.len() + completion.len() > limits.context {
            let whole = match what {
                "" => "the sequence".to_string(),
                _ => format!("`{what}`"),
            };
            return Err(Error::InvalidRequest(format!(
                "{whole} has {} tokens, over the model's context of {}",
                prompt.len() + completion.len(),
                limits.context
            )));
        }
        Ok(Self {
            prompt,
            completion,
            limits,
        })
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    pub fn completion(&self) -> &[u32] {
        &self.completion
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }
}
