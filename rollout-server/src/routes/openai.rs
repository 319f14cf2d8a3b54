//! OpenAI's routes, so the openai SDK, TapeAgents or curl can talk to the server:
//! `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use model::Message;
use rl_core::wire::ErrorBody;
use rl_http::server::{ApiError, ApiJson};
use sampling::{MaxTokens, MAX_COMPLETION_LOGPROBS, MAX_TOKENS_LIMIT};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{
    apply_stops, job_error, now_s, off_runtime, render, request_id, stream, AppState, Router,
    Shared,
};
use crate::batcher::Output;
use crate::openai::{
    AssistantMessage, ChatChoice, ChatLogprobs, ChatRequest, ChatResponse, CompletionChoice,
    CompletionLogprobs, CompletionRequest, CompletionResponse, Content, ModelCard, ModelList,
    Prompt, TokenLogprob, TopLogprob, Usage,
};

pub fn router() -> Router {
    OpenApiRouter::new()
        .routes(routes!(completions))
        .routes(routes!(chat))
        .routes(routes!(models))
}

/// `POST /v1/completions` (OpenAI).
#[utoipa::path(post, path = "/v1/completions", tag = "openai",
    summary = "OpenAI text completion (prompt as text or token ids)",
    request_body = CompletionRequest,
    responses((status = 200, description = "The completions (with `stream: true`, Server-Sent \
        Events of `text_completion` chunks, then `data: [DONE]`)",
        content((CompletionResponse = "application/json"), ("text/event-stream"))),
        (status = 404, description = "`model` is not the served model", body = ErrorBody)))]
pub async fn completions(
    State(state): Shared,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    if let Some(why) = req.refused() {
        return Err(ApiError::unprocessable(why));
    }
    state.check_model(req.model.as_deref())?;
    let top = req.logprobs.unwrap_or(0);
    if top > MAX_COMPLETION_LOGPROBS {
        return Err(ApiError::unprocessable(format!(
            "`logprobs` is {top}; it must be in 0..={MAX_COMPLETION_LOGPROBS}"
        )));
    }
    let stops = state.stop_strings(req.stop.clone())?;
    let max_tokens = req.max_tokens.unwrap_or(MaxTokens::of(16));
    let params = req.sampling(max_tokens, state.sampling_tail(&stops, top as usize));
    let prompt = req.prompt;
    let prompts: Vec<Vec<u32>> = off_runtime(&state, move |state| match prompt {
        Prompt::Text(t) => Ok(vec![state.encode(&t)?]),
        Prompt::Texts(ts) => ts.iter().map(|t| state.encode(t)).collect(),
        Prompt::Ids(ids) => Ok(vec![ids]),
        Prompt::IdLists(lists) => Ok(lists),
    })
    .await?;
    if prompts.is_empty() {
        return Err(ApiError::unprocessable(
            "`prompt` is an empty list; send at least one prompt",
        ));
    }
    let n = req.n.unwrap_or(1);
    let mut all_rows = Vec::new();
    for (p, prompt) in prompts.iter().enumerate() {
        let what = if prompts.len() == 1 {
            "prompt".to_string()
        } else {
            format!("prompt[{p}]")
        };
        all_rows.extend(state.rows(&what, prompt, params.clone(), n)?);
    }
    let want_ids = req.return_token_ids == Some(true);
    let want_logprobs = req.logprobs.is_some();
    let prompt_tokens: u32 = prompts.iter().map(|p| p.len() as u32).sum();
    if req.stream == Some(true) {
        let shape = stream::Shape::Completion {
            logprobs: want_logprobs,
            top: top > 0,
        };
        let options = req.stream_options.as_ref();
        return stream::sse(state, shape, prompt_tokens, stops, options, all_rows);
    }
    let out = state.batcher.generate(all_rows).await.map_err(job_error)?;
    let generations = out.generations;
    let (choices, completion_tokens) = off_runtime(&state, move |state| {
        let mut completion_tokens = 0u32;
        let choices = generations
            .into_iter()
            .enumerate()
            .map(|(i, g)| {
                let f = apply_stops(state, g, &stops);
                completion_tokens += f.tokens.len() as u32;
                let logprobs = want_logprobs.then(|| {
                    completion_logprobs(state, &f.tokens, &f.logprobs, &f.top, top > 0, &mut 0)
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
        Ok((choices, completion_tokens))
    })
    .await?;
    Ok(Json(CompletionResponse {
        id: request_id("cmpl"),
        object: "text_completion".into(),
        created: now_s(),
        model: state.model_name.clone(),
        choices,
        usage: Usage::of(prompt_tokens, completion_tokens),
    })
    .into_response())
}

/// The legacy completions logprobs of `tokens` (their logprobs, and their alternatives when
/// `want_top`), text offsets counted on from `offset` (characters).
pub(super) fn completion_logprobs(
    state: &AppState,
    tokens: &[u32],
    logprobs: &[f32],
    top: &[Vec<(u32, f32)>],
    want_top: bool,
    offset: &mut u32,
) -> CompletionLogprobs {
    let texts: Vec<String> = tokens.iter().map(|&t| state.decode(&[t], false)).collect();
    let text_offset = texts
        .iter()
        .map(|t| {
            let o = *offset;
            *offset += t.chars().count() as u32;
            o
        })
        .collect();
    let top_logprobs = want_top.then(|| {
        top.iter()
            .map(|alts| {
                alts.iter()
                    .map(|&(id, lp)| (state.decode(&[id], false), serde_json::json!(lp)))
                    .collect()
            })
            .collect()
    });
    CompletionLogprobs {
        tokens: texts,
        token_logprobs: logprobs.to_vec(),
        top_logprobs,
        text_offset,
    }
}

/// The chat logprobs of `tokens` (their logprobs, and their alternatives when asked).
pub(super) fn chat_logprobs(
    state: &AppState,
    tokens: &[u32],
    logprobs: &[f32],
    top: &[Vec<(u32, f32)>],
) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .zip(logprobs)
            .enumerate()
            .map(|(k, (&id, &lp))| {
                chat_token_logprob(state, id, lp, top.get(k).map(Vec::as_slice).unwrap_or(&[]))
            })
            .collect(),
    }
}

/// The chat logprob of one token, with its alternatives.
fn chat_token_logprob(state: &AppState, id: u32, lp: f32, alts: &[(u32, f32)]) -> TokenLogprob {
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
}

/// `POST /v1/chat/completions` (OpenAI).
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    summary = "OpenAI chat completion (rendered with the model's chat template)",
    request_body = ChatRequest,
    responses((status = 200, description = "The choices (with `stream: true`, Server-Sent Events \
        of `chat.completion.chunk` chunks, then `data: [DONE]`)",
        content((ChatResponse = "application/json"), ("text/event-stream"))),
        (status = 404, description = "`model` is not the served model", body = ErrorBody)))]
pub async fn chat(
    State(state): Shared,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
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
                    match p.kind.as_str() {
                        "text" => text.push_str(&p.text),
                        kind => {
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
    let prompt = off_runtime(&state, move |state| {
        let text = render(state, &messages, true)?;
        state.encode(&text)
    })
    .await?;
    let want_logprobs = req.logprobs == Some(true);
    let top = req.top_logprobs.unwrap_or(0);
    if top > 0 && !want_logprobs {
        return Err(ApiError::unprocessable(
            "`top_logprobs` needs `logprobs: true`",
        ));
    }
    if top as usize > sampling::MAX_TOP_LOGPROBS {
        return Err(ApiError::unprocessable(format!(
            "`top_logprobs` is {top}; it must be in 0..={}",
            sampling::MAX_TOP_LOGPROBS
        )));
    }
    let stops = state.stop_strings(req.stop.clone())?;
    // The room left in the context (at least one token, so that a full prompt is refused by
    // the context check, naming both numbers).
    let room = state.limits.context.saturating_sub(prompt.len()).max(1);
    let room = MaxTokens::new(
        u32::try_from(room)
            .unwrap_or(u32::MAX)
            .min(MAX_TOKENS_LIMIT),
    )
    .map_err(|e| ApiError::internal(e.named("max_tokens")))?;
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).unwrap_or(room);
    let params = req.sampling(max_tokens, state.sampling_tail(&stops, top as usize));
    let rows = state.rows("messages", &prompt, params, req.n.unwrap_or(1))?;
    let prompt_tokens = prompt.len() as u32;
    if req.stream == Some(true) {
        let shape = stream::Shape::Chat {
            logprobs: want_logprobs,
        };
        let options = req.stream_options.as_ref();
        return stream::sse(state, shape, prompt_tokens, stops, options, rows);
    }
    let Output { generations, .. } = state.batcher.generate(rows).await.map_err(job_error)?;
    let want_ids = req.return_token_ids == Some(true);
    let (choices, completion_tokens) = off_runtime(&state, move |state| {
        let mut completion_tokens = 0u32;
        let choices = generations
            .into_iter()
            .enumerate()
            .map(|(i, g)| {
                let f = apply_stops(state, g, &stops);
                completion_tokens += f.tokens.len() as u32;
                let logprobs =
                    want_logprobs.then(|| chat_logprobs(state, &f.tokens, &f.logprobs, &f.top));
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
        Ok((choices, completion_tokens))
    })
    .await?;
    Ok(Json(ChatResponse {
        id: request_id("chatcmpl"),
        object: "chat.completion".into(),
        created: now_s(),
        model: state.model_name.clone(),
        choices,
        usage: Usage::of(prompt_tokens, completion_tokens),
        prompt_token_ids: want_ids.then_some(prompt),
    })
    .into_response())
}

/// `GET /v1/models`.
#[utoipa::path(get, path = "/v1/models", tag = "openai", summary = "The served model",
    responses((status = 200, description = "One model", body = ModelList)))]
pub async fn models(State(state): Shared) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: state.model_name.clone(),
            object: "model".into(),
            created: now_s(),
            owned_by: "rollout-server".into(),
            adapter: state.batcher.adapter(),
            max_model_len: state.limits.context,
        }],
    })
}
