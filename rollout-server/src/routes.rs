//! The HTTP handlers: thin functions over [`AppState`] that check a request, turn it into engine
//! rows, wait on the [`Batcher`] and shape the answer. Every check names the field and says what
//! to send instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use model::{ChatTemplate, GenerateRequest, Generation, Message, SamplingParams, Tokenizer};
use rl_core::wire::{
    AdapterRequest, AdapterResponse, FinishReason, GenerateResponse, GeneratedChoice, Health,
    TokenizeRequest, TokenizeResponse,
};
use rl_http::metrics::{prom, prom_matmul_backend, prom_response, rss_bytes};
use rl_http::server::{ApiError, ApiJson};

use crate::batcher::{Batcher, JobError, Output};
use crate::openai::{
    AssistantMessage, ChatChoice, ChatLogprobs, ChatRequest, CompletionChoice, CompletionLogprobs,
    CompletionRequest, CompletionResponse, Content, Prompt, TokenLogprob, TopLogprob, Usage,
};

/// Everything the handlers share.
pub struct AppState {
    pub batcher: Batcher,
    pub model_name: String,
    pub tokenizer: Option<Tokenizer>,
    pub template: Result<ChatTemplate, String>,
    pub vocab: usize,
    pub context: usize,
    pub eos_ids: Vec<u32>,
    /// Canonical path; adapters load only from inside it.
    pub checkpoints_dir: Option<PathBuf>,
    pub max_n: u32,
    pub requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub started: Instant,
    /// The engine's matmul kernels and oneDNN's ISA ([`model::Engine::matmul_backend`]).
    pub matmul: (&'static str, Option<&'static str>),
}

type Shared = State<Arc<AppState>>;

/// Most stop strings per request (OpenAI's limit).
const MAX_STOP: usize = 4;
/// Most alternatives per token in legacy completions (OpenAI's limit).
const MAX_COMPLETION_LOGPROBS: u32 = 5;

/// Sampling settings of one request, before they become engine rows.
struct Sampling {
    max_tokens: u32,
    temperature: f64,
    top_p: f64,
    top_k: u32,
    stop_ids: Vec<u32>,
    stop_sequences: Vec<Vec<u32>>,
    top_logprobs: usize,
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

    /// Checks a prompt and the sampling settings against the model and the server's limits.
    fn check(&self, what: &str, prompt: &[u32], s: &Sampling, n: u32) -> Result<(), ApiError> {
        if prompt.is_empty() {
            return Err(ApiError::unprocessable(format!(
                "`{what}` is empty; send at least one token"
            )));
        }
        if let Some(bad) = prompt.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(ApiError::unprocessable(format!(
                "`{what}` has token id {bad}, outside the vocabulary (ids 0..{})",
                self.vocab
            )));
        }
        if n == 0 || n > self.max_n {
            return Err(ApiError::unprocessable(format!(
                "`n` is {n}; it must be in 1..={} (this server's --max-n)",
                self.max_n
            )));
        }
        if !s.temperature.is_finite() || s.temperature < 0.0 {
            return Err(ApiError::unprocessable(format!(
                "`temperature` is {}; it must be >= 0 (0 is greedy)",
                s.temperature
            )));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(ApiError::unprocessable(format!(
                "`top_p` is {}; it must be in (0, 1] (1 keeps every token)",
                s.top_p
            )));
        }
        if s.max_tokens == 0 {
            return Err(ApiError::unprocessable("`max_tokens` must be at least 1"));
        }
        if prompt.len() + s.max_tokens as usize > self.context {
            let room = self.context.saturating_sub(prompt.len());
            return Err(ApiError::unprocessable(format!(
                "the prompt has {} tokens and `max_tokens` is {}: over the model's context of {}; \
                 send a shorter prompt or max_tokens <= {room}",
                prompt.len(),
                s.max_tokens,
                self.context
            )));
        }
        if let Some(bad) = s.stop_ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(ApiError::unprocessable(format!(
                "`stop_token_ids` has {bad}, outside the vocabulary (ids 0..{})",
                self.vocab
            )));
        }
        Ok(())
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

    fn stop_sequences(&self, stops: &[String]) -> Vec<Vec<u32>> {
        stops
            .iter()
            .filter_map(|s| self.tokenizer.as_ref()?.encode(s).ok())
            .filter(|ids| !ids.is_empty())
            .collect()
    }
}

fn rows(prompt: &[u32], s: &Sampling, n: u32, seed: u64) -> Vec<GenerateRequest> {
    (0..n)
        .map(|i| GenerateRequest {
            prompt: prompt.to_vec(),
            params: SamplingParams {
                temperature: s.temperature,
                top_p: s.top_p,
                top_k: s.top_k as usize,
                max_tokens: s.max_tokens as usize,
                stop_ids: s.stop_ids.clone(),
                stop_sequences: s.stop_sequences.clone(),
                top_logprobs: s.top_logprobs,
                seed: seed.wrapping_add(u64::from(i)),
            },
        })
        .collect()
}

fn job_error(e: JobError) -> ApiError {
    match e {
        JobError::Full { retry_after_s } => ApiError::unavailable(
            format!("the server's queue is full; retry after {retry_after_s} s"),
            retry_after_s,
        ),
        JobError::Stopped => ApiError::unavailable("the server is shutting down", 1),
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

/// `POST /v1/generate`: token ids in, token ids and logprobs out.
pub async fn generate(
    State(state): Shared,
    ApiJson(req): ApiJson<rl_core::wire::GenerateRequest>,
) -> Result<Json<GenerateResponse>, ApiError> {
    let s = Sampling {
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        stop_ids: req.stop_token_ids.unwrap_or_else(|| state.eos_ids.clone()),
        stop_sequences: vec![],
        top_logprobs: 0,
    };
    state.check("prompt_ids", &req.prompt_ids, &s, req.n)?;
    let seed = req.seed.unwrap_or_else(rand::random);
    let out = state
        .batcher
        .generate(rows(&req.prompt_ids, &s, req.n, seed))
        .await
        .map_err(job_error)?;
    let choices = out
        .generations
        .into_iter()
        .enumerate()
        .map(|(i, g)| GeneratedChoice {
            index: i as u32,
            text: state
                .tokenizer
                .as_ref()
                .and_then(|t| t.decode(&g.tokens, true).ok()),
            token_ids: g.tokens,
            logprobs: g.logprobs,
            finish_reason: finish(g.finish_reason),
            seed: seed.wrapping_add(i as u64),
        })
        .collect();
    Ok(Json(GenerateResponse {
        model: state.model_name.clone(),
        adapter: out.adapter,
        choices,
    }))
}

/// `POST /v1/tokenize`: chat messages (rendered) or a prompt, to token ids.
pub async fn tokenize(
    State(state): Shared,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let text = match (req.messages, req.prompt) {
        (Some(messages), None) => {
            let messages: Vec<Message> = messages
                .into_iter()
                .map(|m| Message::new(&m.role, &m.content))
                .collect();
            render(&state, &messages, req.add_generation_prompt)?
        }
        (None, Some(prompt)) => prompt,
        _ => {
            return Err(ApiError::unprocessable(
                "send exactly one of `messages` (chat) or `prompt` (text)",
            ))
        }
    };
    let tokens = state.encode(&text)?;
    Ok(Json(TokenizeResponse { tokens, text }))
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

/// `POST /v1/completions` (OpenAI).
pub async fn completions(
    State(state): Shared,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Json<CompletionResponse>, ApiError> {
    if let Some(why) = req.refused() {
        return Err(ApiError::unprocessable(why));
    }
    state.check_model(req.model.as_deref())?;
    let prompts: Vec<Vec<u32>> = match req.prompt {
        Prompt::Text(t) => vec![state.encode(&t)?],
        Prompt::Texts(ts) => ts
            .iter()
            .map(|t| state.encode(t))
            .collect::<Result<_, _>>()?,
        Prompt::Ids(ids) => vec![ids],
        Prompt::IdLists(lists) => lists,
    };
    if prompts.is_empty() {
        return Err(ApiError::unprocessable(
            "`prompt` is an empty list; send at least one prompt",
        ));
    }
    let top = req.logprobs.unwrap_or(0);
    if top > MAX_COMPLETION_LOGPROBS {
        return Err(ApiError::unprocessable(format!(
            "`logprobs` is {top}; it must be in 0..={MAX_COMPLETION_LOGPROBS}"
        )));
    }
    let stops = state.stop_strings(req.stop)?;
    let s = Sampling {
        max_tokens: req.max_tokens.unwrap_or(16),
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        top_k: req.top_k.unwrap_or(0),
        stop_ids: req.stop_token_ids.unwrap_or_else(|| state.eos_ids.clone()),
        stop_sequences: state.stop_sequences(&stops),
        top_logprobs: top as usize,
    };
    let n = req.n.unwrap_or(1);
    let seed = req.seed.unwrap_or_else(rand::random);
    let mut all_rows = Vec::new();
    for (p, prompt) in prompts.iter().enumerate() {
        let what = if prompts.len() == 1 {
            "prompt".to_string()
        } else {
            format!("prompt[{p}]")
        };
        state.check(&what, prompt, &s, n)?;
        all_rows.extend(rows(prompt, &s, n, seed));
    }
    let out = state.batcher.generate(all_rows).await.map_err(job_error)?;
    let want_ids = req.return_token_ids == Some(true);
    let mut completion_tokens = 0u32;
    let choices = out
        .generations
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            let f = apply_stops(&state, g, &stops);
            completion_tokens += f.tokens.len() as u32;
            let logprobs = req.logprobs.map(|_| {
                let tokens: Vec<String> = f
                    .tokens
                    .iter()
                    .map(|&t| state.decode(&[t], false))
                    .collect();
                let mut offset = 0u32;
                let text_offset = tokens
                    .iter()
                    .map(|t| {
                        let o = offset;
                        offset += t.chars().count() as u32;
                        o
                    })
                    .collect();
                let top_logprobs = (top > 0).then(|| {
                    f.top
                        .iter()
                        .map(|alts| {
                            alts.iter()
                                .map(|&(id, lp)| {
                                    (state.decode(&[id], false), serde_json::json!(lp))
                                })
                                .collect()
                        })
                        .collect()
                });
                CompletionLogprobs {
                    tokens,
                    token_logprobs: f.logprobs.clone(),
                    top_logprobs,
                    text_offset,
                }
            });
            CompletionChoice {
                index: i as u32,
                text: f.text,
                logprobs,
                finish_reason: f.reason.as_str().to_string(),
                prompt_token_ids: want_ids.then(|| prompts[i / n as usize].clone()),
                token_ids: want_ids.then_some(f.tokens),
            }
        })
        .collect();
    let prompt_tokens: u32 = prompts.iter().map(|p| p.len() as u32).sum();
    Ok(Json(CompletionResponse {
        id: request_id("cmpl"),
        object: "text_completion".into(),
        created: now_s(),
        model: state.model_name.clone(),
        choices,
        usage: Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        },
    }))
}

/// `POST /v1/chat/completions` (OpenAI).
pub async fn chat(
    State(state): Shared,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Json<crate::openai::ChatResponse>, ApiError> {
    if let Some(why) = req.refused() {
        return Err(ApiError::unprocessable(why));
    }
    state.check_model(req.model.as_deref())?;
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let content = match &m.content {
            Content::Text(t) => t.clone(),
            Content::Parts(parts) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::unprocessable(format!(
                                "`messages[{i}].content` has a `{kind}` part; only text parts are supported"
                            )))
                        }
                    }
                }
                text
            }
        };
        messages.push(Message::new(&m.role, &content));
    }
    let text = render(&state, &messages, true)?;
    let prompt = state.encode(&text)?;
    let want_logprobs = req.logprobs == Some(true);
    let top = req.top_logprobs.unwrap_or(0);
    if top > 0 && !want_logprobs {
        return Err(ApiError::unprocessable(
            "`top_logprobs` needs `logprobs: true`",
        ));
    }
    if top as usize > model::sampler::MAX_TOP_LOGPROBS {
        return Err(ApiError::unprocessable(format!(
            "`top_logprobs` is {top}; it must be in 0..={}",
            model::sampler::MAX_TOP_LOGPROBS
        )));
    }
    let stops = state.stop_strings(req.stop)?;
    let room = state.context.saturating_sub(prompt.len()).max(1) as u32;
    let s = Sampling {
        max_tokens: req.max_completion_tokens.or(req.max_tokens).unwrap_or(room),
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        top_k: req.top_k.unwrap_or(0),
        stop_ids: req.stop_token_ids.unwrap_or_else(|| state.eos_ids.clone()),
        stop_sequences: state.stop_sequences(&stops),
        top_logprobs: top as usize,
    };
    let n = req.n.unwrap_or(1);
    state.check("messages", &prompt, &s, n)?;
    let seed = req.seed.unwrap_or_else(rand::random);
    let Output { generations, .. } = state
        .batcher
        .generate(rows(&prompt, &s, n, seed))
        .await
        .map_err(job_error)?;
    let want_ids = req.return_token_ids == Some(true);
    let mut completion_tokens = 0u32;
    let token_logprob = |id: u32, lp: f32, alts: &[(u32, f32)]| {
        let token = state.decode(&[id], false);
        TokenLogprob {
            bytes: token.as_bytes().to_vec(),
            token,
            logprob: lp,
            top_logprobs: alts
                .iter()
                .map(|&(a, alp)| {
                    let t = state.decode(&[a], false);
                    TopLogprob {
                        bytes: t.as_bytes().to_vec(),
                        token: t,
                        logprob: alp,
                    }
                })
                .collect(),
            token_id: id,
        }
    };
    let choices = generations
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            let f = apply_stops(&state, g, &stops);
            completion_tokens += f.tokens.len() as u32;
            let logprobs = want_logprobs.then(|| ChatLogprobs {
                content: f
                    .tokens
                    .iter()
                    .zip(&f.logprobs)
                    .enumerate()
                    .map(|(k, (&id, &lp))| {
                        token_logprob(id, lp, f.top.get(k).map(Vec::as_slice).unwrap_or(&[]))
                    })
                    .collect(),
            });
            ChatChoice {
                index: i as u32,
                message: AssistantMessage {
                    role: "assistant".into(),
                    content: f.text,
                },
                logprobs,
                finish_reason: f.reason.as_str().to_string(),
                token_ids: want_ids.then_some(f.tokens),
            }
        })
        .collect();
    let prompt_tokens = prompt.len() as u32;
    Ok(Json(crate::openai::ChatResponse {
        id: request_id("chatcmpl"),
        object: "chat.completion".into(),
        created: now_s(),
        model: state.model_name.clone(),
        choices,
        usage: Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        },
        prompt_token_ids: want_ids.then_some(prompt),
    }))
}

/// `GET /v1/models`.
pub async fn models(State(state): Shared) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": now_s(),
            "owned_by": "rollout-server",
            "adapter": state.batcher.adapter(),
            "max_model_len": state.context,
        }]
    }))
}

/// `POST /v1/adapters`: load a PEFT adapter from inside the checkpoints directory.
pub async fn load_adapter(
    State(state): Shared,
    ApiJson(req): ApiJson<AdapterRequest>,
) -> Result<Json<AdapterResponse>, ApiError> {
    let Some(root) = &state.checkpoints_dir else {
        return Err(ApiError::forbidden(
            "adapter loading is off: start the server with --checkpoints-dir DIR",
        ));
    };
    let given = Path::new(&req.path);
    let candidate = if given.is_absolute() {
        given.to_path_buf()
    } else {
        root.join(given)
    };
    let canon = candidate.canonicalize().map_err(|_| {
        ApiError::not_found(format!(
            "adapter folder `{}` does not exist",
            candidate.display()
        ))
    })?;
    if !canon.starts_with(root) {
        return Err(ApiError::forbidden(format!(
            "`path` {} is outside the checkpoints directory {}; adapters load only from inside it",
            canon.display(),
            root.display()
        )));
    }
    if !canon.is_dir() {
        return Err(ApiError::unprocessable(format!(
            "`path` {} is not a folder; send a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)",
            canon.display()
        )));
    }
    let swap_ms = state
        .batcher
        .set_adapter(Some(canon.clone()))
        .await
        .map_err(job_error)?;
    Ok(Json(AdapterResponse {
        adapter: Some(canon.display().to_string()),
        swap_ms,
    }))
}

/// `DELETE /v1/adapters`: back to the base model.
pub async fn unload_adapter(State(state): Shared) -> Result<Json<AdapterResponse>, ApiError> {
    let swap_ms = state.batcher.set_adapter(None).await.map_err(job_error)?;
    Ok(Json(AdapterResponse {
        adapter: None,
        swap_ms,
    }))
}

/// `GET /health`.
pub async fn health(State(state): Shared) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        model: state.model_name.clone(),
        adapter: state.batcher.adapter(),
    })
}

/// `GET /metrics` (Prometheus text).
pub async fn metrics(State(state): Shared) -> Response {
    let st = &state.batcher.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let mut out = String::new();
    prom_matmul_backend(&mut out, "rollout", state.matmul);
    prom(
        &mut out,
        "rollout_queue_depth",
        "gauge",
        "Requests accepted and not yet answered.",
        state.batcher.pending() as f64,
    );
    prom(
        &mut out,
        "rollout_queue_capacity",
        "gauge",
        "Most requests accepted at once (--max-queue).",
        state.batcher.max_queue() as f64,
    );
    prom(
        &mut out,
        "rollout_queue_depth_max",
        "gauge",
        "Largest queue depth seen.",
        st.max_pending.load(Ordering::Relaxed) as f64,
    );
    prom(
        &mut out,
        "rollout_rejected_full_total",
        "counter",
        "Requests answered 503 because the queue was full.",
        load(&st.rejected_full),
    );
    prom(
        &mut out,
        "rollout_batches_total",
        "counter",
        "Batches decoded.",
        load(&st.batches),
    );
    prom(
        &mut out,
        "rollout_batch_rows_total",
        "counter",
        "Rows (choices) decoded, summed over batches.",
        load(&st.batch_rows),
    );
    prom(
        &mut out,
        "rollout_prompt_tokens_total",
        "counter",
        "Prompt tokens prefilled.",
        load(&st.prompt_tokens),
    );
    prom(
        &mut out,
        "rollout_generated_tokens_total",
        "counter",
        "Tokens generated.",
        load(&st.generated_tokens),
    );
    prom(
        &mut out,
        "rollout_abandoned_requests_total",
        "counter",
        "Requests dropped because their client left before they started.",
        load(&st.skipped_requests),
    );
    prom(
        &mut out,
        "rollout_adapter_swaps_total",
        "counter",
        "Adapter loads and unloads.",
        load(&st.adapter_swaps),
    );
    prom(
        &mut out,
        "rollout_adapter_last_swap_seconds",
        "gauge",
        "Duration of the last adapter swap.",
        load(&st.last_swap_us) / 1e6,
    );
    prom(
        &mut out,
        "rollout_adapter_loaded",
        "gauge",
        "1 when an adapter is merged into the weights.",
        if state.batcher.adapter().is_some() {
            1.0
        } else {
            0.0
        },
    );
    prom(
        &mut out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory of the server.",
        rss_bytes().unwrap_or(0) as f64,
    );
    prom(
        &mut out,
        "process_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
        state.started.elapsed().as_secs_f64(),
    );
    requests_metric(&mut out, "rollout_http_requests_total", &state.requests);
    prom_response(out)
}

/// Appends the per-route, per-status request counter.
pub fn requests_metric(
    out: &mut String,
    name: &str,
    requests: &Mutex<BTreeMap<(String, u16), u64>>,
) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "# HELP {name} HTTP requests by route and status.\n# TYPE {name} counter"
    );
    if let Ok(map) = requests.lock() {
        for ((route, status), n) in map.iter() {
            let _ = writeln!(out, "{name}{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
    }
}

/// Middleware: counts requests by route and status for `/metrics`.
pub async fn count_requests(State(state): Shared, req: Request, next: Next) -> Response {
    let route = crate::openapi::route_label(req.uri().path());
    let response = next.run(req).await;
    if let Ok(mut map) = state.requests.lock() {
        *map.entry((route.to_string(), response.status().as_u16()))
            .or_insert(0) += 1;
    }
    response
}

/// `GET /openapi.json`.
pub async fn openapi() -> impl IntoResponse {
    Json(crate::openapi::document())
}
