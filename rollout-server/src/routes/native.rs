//! The native routes, what the orchestrator uses: `POST /v1/generate` (token ids in, token ids
//! and logprobs out, exactly as the learner needs them) and `POST /v1/tokenize`.

use axum::extract::State;
use axum::Json;
use model::{Message, SamplingParams};
use rl_core::wire::{
    GenerateRequest, GenerateResponse, GeneratedChoice, TokenizeRequest, TokenizeResponse,
};
use rl_http::server::{ApiError, ApiJson};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{finish, job_error, off_runtime, render, Router, Shared};

pub fn router() -> Router {
    OpenApiRouter::new()
        .routes(routes!(generate))
        .routes(routes!(tokenize))
}

/// `POST /v1/generate`: token ids in, token ids and logprobs out.
#[utoipa::path(post, path = "/v1/generate", tag = "native",
    summary = "Sample n continuations of a token-id prompt, with per-token logprobs",
    request_body = GenerateRequest,
    responses((status = 200, description = "The choices", body = GenerateResponse)))]
pub async fn generate(
    State(state): Shared,
    ApiJson(req): ApiJson<GenerateRequest>,
) -> Result<Json<GenerateResponse>, ApiError> {
    let seed = req.seed.unwrap_or_else(rand::random);
    let knobs = req.knobs();
    let params = SamplingParams {
        stop_ids: req.stop_token_ids.unwrap_or_else(|| state.eos_ids.clone()),
        seed,
        ..SamplingParams::new(knobs)
    };
    let rows = state.rows("prompt_ids", &req.prompt_ids, params, req.n)?;
    let out = state.batcher.generate(rows).await.map_err(job_error)?;
    let generations = out.generations;
    let choices = off_runtime(&state, move |state| {
        Ok(generations
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
            .collect())
    })
    .await?;
    Ok(Json(GenerateResponse {
        model: state.model_name.clone(),
        adapter: out.adapter,
        choices,
    }))
}

/// `POST /v1/tokenize`: chat messages (rendered) or a prompt, to token ids.
#[utoipa::path(post, path = "/v1/tokenize", tag = "native",
    summary = "Render chat messages (or take a prompt) and return its token ids",
    request_body = TokenizeRequest,
    responses((status = 200, description = "The token ids and the text they encode", body = TokenizeResponse)))]
pub async fn tokenize(
    State(state): Shared,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let add_generation_prompt = req.add_generation_prompt;
    let input = match (req.messages, req.prompt) {
        (Some(messages), None) => Ok(messages),
        (None, Some(prompt)) => Err(prompt),
        _ => {
            return Err(ApiError::unprocessable(
                "send exactly one of `messages` (chat) or `prompt` (text)",
            ))
        }
    };
    off_runtime(&state, move |state| {
        let text = match input {
            Ok(messages) => {
                let messages: Vec<Message> = messages
                    .into_iter()
                    .map(|m| Message::new(&m.role, &m.content))
                    .collect();
                render(state, &messages, add_generation_prompt)?
            }
            Err(prompt) => prompt,
        };
        let tokens = state.encode(&text)?;
        Ok(Json(TokenizeResponse { tokens, text }))
    })
    .await
}
