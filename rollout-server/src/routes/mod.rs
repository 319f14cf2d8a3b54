//! The HTTP handlers, one module per route family ([`native`], [`openai`], [`adapters`],
//! [`service`]): thin functions over [`AppState`] that check a request, turn it into engine rows,
//! wait on the [`Batcher`] and shape the answer. Every check names the field and says what to
//! send instead. Each handler carries its OpenAPI description (`#[utoipa::path]`), so the
//! document at `/openapi.json` is derived from the routes themselves.

pub mod adapters;
pub mod native;
pub mod openai;
pub mod service;
mod stream;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use model::{
    ChatTemplate, GenerateRequest, Generation, Limits, Message, SamplingParams, Tokenizer,
};
use rl_core::wire::FinishReason;
use rl_http::metrics::Metrics;
use rl_http::server::ApiError;
use sampling::MAX_STOP;

use crate::batcher::{Batcher, JobError};

/// Everything the handlers share.
pub struct AppState {
    pub batcher: Batcher,
    pub model_name: String,
    pub tokenizer: Option<Tokenizer>,
    pub template: Result<ChatTemplate, String>,
    /// What a request must fit: the model's vocabulary and context.
    pub limits: Limits,
    pub eos_ids: Vec<u32>,
    /// Canonical path; adapters load only from inside it.
    pub checkpoints_dir: Option<PathBuf>,
    pub max_n: u32,
    pub metrics: Arc<Metrics>,
    pub gauges: service::Gauges,
    /// Failed once the engine thread died: `/health` 503, the server exits.
    pub liveness: rl_http::server::Liveness,
}

type Shared = State<Arc<AppState>>;

/// A documented router over the server's state.
pub type Router = utoipa_axum::router::OpenApiRouter<Arc<AppState>>;

/// Every route of the server (`/openapi.json` is added by the HTTP kit); adapter uploads may be
/// up to `max_adapter_bytes`.
pub fn router(max_adapter_bytes: usize) -> Router {
    native::router()
        .merge(openai::router())
        .merge(adapters::router(max_adapter_bytes))
        .merge(service::router())
}

impl AppState {
    fn tokenizer(&self) -> Result<&Tokenizer, ApiError> {
        self.tokenizer.as_ref().ok_or_else(|| {
            ApiError::unprocessable(
                "this model has no tokenizer, so it takes token ids only: use POST /v1/generate with `prompt_ids`",
            )
        })
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        self.tokenizer()?
            .encode(text)
            .map_err(|e| ApiError::unprocessable(format!("cannot tokenize the prompt: {e}")))
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        self.tokenizer
            .as_ref()
            .and_then(|t| t.decode(ids, skip_special).ok())
            .unwrap_or_default()
    }

    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.model_name => Err(ApiError::not_found(format!(
                "model `{m}` is not served here; this server serves `{}` (GET /v1/models)",
                self.model_name
            ))),
            _ => Ok(()),
        }
    }

    /// The engine's rows for `n` choices of `prompt` (named `what` in messages), choice `i`
    /// drawn with seed `params.seed + i`. The one check of a sampling request: the knobs are
    /// valid by their types, the rest is checked here against the model
    /// ([`GenerateRequest::new`]) and this server's `--max-n`; the engine checks nothing again.
    fn rows(
        &self,
        what: &str,
        prompt: &[u32],
        params: SamplingParams,
        n: u32,
    ) -> Result<Vec<GenerateRequest>, ApiError> {
        if n == 0 || n > self.max_n {
            return Err(ApiError::unprocessable(format!(
                "`n` is {n}; it must be in 1..={} (this server's --max-n)",
                self.max_n
            )));
        }
        let seed = params.seed;
        let first = GenerateRequest::new(what, prompt.to_vec(), params, self.limits)
            .map_err(engine_error)?;
        Ok((0..n)
            .map(|i| first.reseeded(seed.wrapping_add(u64::from(i))))
            .collect())
    }

    /// Stop strings: at most four, none empty, each also given to the engine as token ids so
    /// that decoding stops early in the common case.
    fn stop_strings(
        &self,
        stop: Option<crate::openai::OneOrMany>,
    ) -> Result<Vec<String>, ApiError> {
        let stops = stop.map(|s| s.into_vec()).unwrap_or_default();
        if stops.len() > MAX_STOP {
            return Err(ApiError::unprocessable(format!(
                "`stop` has {} strings; send at most {MAX_STOP}",
                stops.len()
            )));
        }
        if stops.iter().any(String::is_empty) {
            return Err(ApiError::unprocessable(
                "`stop` has an empty string; remove it",
            ));
        }
        if !stops.is_empty() {
            self.tokenizer()?;
        }
        Ok(stops)
    }

    /// What the server adds to a request's knobs: its end-of-sequence ids (unless the request
    /// names its own), the stop strings as token sequences, and `top_logprobs` alternatives.
    fn sampling_tail(&self, stops: &[String], top_logprobs: usize) -> SamplingParams {
        SamplingParams {
            stop_ids: self.eos_ids.clone(),
            stop_sequences: self.stop_sequences(stops),
            top_logprobs,
            ..SamplingParams::PLAIN
        }
    }

    fn stop_sequences(&self, stops: &[String]) -> Vec<Vec<u32>> {
        stops
            .iter()
            .filter_map(|s| self.tokenizer.as_ref()?.encode(s).ok())
            .filter(|ids| !ids.is_empty())
            .collect()
    }
}

/// Runs a handler's CPU-bound work (tokenizing, rendering a template, decoding, scanning for
/// stop strings) on the blocking pool, so that a large prompt never stalls the async workers
/// that answer the other requests and `/health`.
async fn off_runtime<T: Send + 'static>(
    state: &Arc<AppState>,
    f: impl FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state))
        .await
        .map_err(|e| ApiError::internal(format!("a handler's task failed: {e}")))?
}

fn job_error(e: JobError) -> ApiError {
    match e {
        JobError::Full { retry_after_s } => ApiError::unavailable(
            format!("the server's queue is full; retry after {retry_after_s} s"),
            retry_after_s,
        ),
        JobError::Stopped => ApiError::unavailable("the server is shutting down", 1),
        JobError::Failed(why) => ApiError::internal(format!(
            "{why}; the request was fine: send it again (to this server once /health is ok)"
        )),
        JobError::Engine(e) => engine_error(e),
    }
}

fn engine_error(e: model::Error) -> ApiError {
    match e {
        model::Error::InvalidRequest(m) => ApiError::unprocessable(m),
        model::Error::MissingFile { .. } => ApiError::not_found(e.to_string()),
        model::Error::BadAdapter { .. }
        | model::Error::ShapeMismatch { .. }
        | model::Error::BadFile { .. }
        | model::Error::BadConfig { .. } => ApiError::unprocessable(e.to_string()),
        other => ApiError::internal(other.to_string()),
    }
}

fn finish(f: model::FinishReason) -> FinishReason {
    match f {
        model::FinishReason::Stop => FinishReason::Stop,
        model::FinishReason::Length => FinishReason::Length,
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// A generation cut at the earliest stop string: the text before it, the tokens up to the one
/// that completed it, and `stop` as the reason.
struct Finished {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    top: Vec<Vec<(u32, f32)>>,
    text: String,
    reason: FinishReason,
}

fn apply_stops(state: &AppState, g: Generation, stops: &[String]) -> Finished {
    let text = state.decode(&g.tokens, true);
    let cut = stops
        .iter()
        .filter_map(|s| text.find(s.as_str()).map(|i| (i, s.len())))
        .min();
    let Some((at, len)) = cut else {
        return Finished {
            text,
            reason: finish(g.finish_reason),
            tokens: g.tokens,
            logprobs: g.logprobs,
            top: g.top_logprobs,
        };
    };
    // The shortest token prefix whose text reaches the end of the stop string.
    let k = (1..=g.tokens.len())
        .find(|&k| state.decode(&g.tokens[..k], true).len() >= at + len)
        .unwrap_or(g.tokens.len());
    let mut top = g.top_logprobs;
    top.truncate(k);
    Finished {
        tokens: g.tokens[..k].to_vec(),
        logprobs: g.logprobs[..k].to_vec(),
        top,
        text: text[..at].to_string(),
        reason: FinishReason::Stop,
    }
}

fn render(
    state: &AppState,
    messages: &[Message],
    add_generation_prompt: bool,
) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::unprocessable(
            "`messages` is empty; send at least one message",
        ));
    }
    let template = state
        .template
        .as_ref()
        .map_err(|why| ApiError::unprocessable(why.clone()))?;
    template
        .render(messages, add_generation_prompt)
        .map_err(|e| ApiError::unprocessable(format!("cannot render the chat template: {e}")))
}
