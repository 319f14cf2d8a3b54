//! `stream: true` on the OpenAI routes: the answer as Server-Sent Events in OpenAI's (and vLLM's)
//! chunk shapes. Each token leaves as soon as the shared batch decodes it, as one chunk with the
//! choice's text delta (and the token's logprobs when asked); then one chunk per choice with its
//! `finish_reason`, a usage chunk when `stream_options.include_usage`, and `data: [DONE]`.
//!
//! The streamed text and logprobs are the non-streamed answer's: a delta is sent only when it
//! cannot change (text that may be the start of a stop string, or half of a multi-byte
//! character, waits), a choice ends at its first stop string as [`super::apply_stops`] cuts it,
//! and the last chunk of each choice carries what the finished answer has beyond what was sent.
//! A client that goes away drops the stream, and the request's rows leave the batch at their
//! next token.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;

use super::openai::{chat_logprobs, completion_logprobs};
use super::{apply_stops, job_error, now_s, request_id, AppState};
use model::GenerateRequest;
use rl_http::server::ApiError;

use crate::batcher::{JobError, Output, Streamed};
use crate::openai::{ChatLogprobs, CompletionLogprobs, StreamOptions, Usage};

/// One SSE chunk. Typed, so that its floats are written as the non-streamed answer writes them
/// (an f32's shortest form).
#[derive(Debug, Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<Piece>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

/// One choice's part of a chunk.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Piece {
    Completion {
        index: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish_reason: Option<&'static str>,
    },
    Chat {
        index: usize,
        delta: Delta,
        logprobs: Option<ChatLogprobs>,
        finish_reason: Option<&'static str>,
    },
}

#[derive(Debug, Serialize)]
struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
}

/// Which chunks to send.
#[derive(Debug, Clone, Copy)]
pub(super) enum Shape {
    /// `text_completion` chunks; `logprobs`: the legacy logprobs block, `top`: with alternatives.
    Completion { logprobs: bool, top: bool },
    /// `chat.completion.chunk` chunks; `logprobs`: `logprobs.content`.
    Chat { logprobs: bool },
}

/// What was sent of one choice.
#[derive(Debug, Default)]
struct Choice {
    tokens: Vec<u32>,
    /// The text sent so far (always a prefix of the choice's final text).
    sent: String,
    /// Characters of the tokens' own texts so far (the completions logprobs' `text_offset`).
    offset: u32,
    /// Tokens whose logprobs were sent.
    tokens_sent: usize,
    /// A stop string was found: nothing more is sent before the last chunk.
    stopped: bool,
    /// The role chunk was sent (chat).
    opened: bool,
}

/// Queues `rows` for streaming and answers with their SSE stream (or why they were refused).
pub(super) fn sse(
    state: Arc<AppState>,
    shape: Shape,
    prompt_tokens: u32,
    stops: Vec<String>,
    options: Option<&StreamOptions>,
    rows: Vec<GenerateRequest>,
) -> Result<Response, ApiError> {
    let (events, done) = state.batcher.generate_streaming(rows).map_err(job_error)?;
    let usage = options.and_then(|o| o.include_usage) == Some(true);
    let (tx, rx) = mpsc::unbounded_channel::<Event>();
    let chunks = Chunks {
        id: request_id(match shape {
            Shape::Completion { .. } => "cmpl",
            Shape::Chat { .. } => "chatcmpl",
        }),
        created: now_s(),
        model: state.model_name.clone(),
        shape,
    };
    tokio::spawn(async move {
        // Ends early (dropping `events`, which stops the rows) once the client is gone.
        let _ = chunks
            .send_all(&state, prompt_tokens, &stops, usage, events, done, &tx)
            .await;
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Ok(Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The client went away.
struct Gone;

/// The fields every chunk of one answer shares.
struct Chunks {
    id: String,
    created: u64,
    model: String,
    shape: Shape,
}

impl Chunks {
    fn chunk(&self, choices: Vec<Piece>, usage: Option<Usage>) -> Chunk<'_> {
        Chunk {
            id: &self.id,
            object: match self.shape {
                Shape::Completion { .. } => "text_completion",
                Shape::Chat { .. } => "chat.completion.chunk",
            },
            created: self.created,
            model: &self.model,
            choices,
            usage,
        }
    }

    /// One choice's piece: `text` (may be empty), the logprobs of `tokens` (with their
    /// alternatives), and the finish reason of the last piece.
    #[allow(clippy::too_many_arguments)]
    fn piece(
        &self,
        state: &AppState,
        index: usize,
        choice: &mut Choice,
        text: &str,
        tokens: &[u32],
        logprobs: &[f32],
        top: &[Vec<(u32, f32)>],
        finish_reason: Option<&'static str>,
    ) -> Piece {
        match self.shape {
            Shape::Completion {
                logprobs: want,
                top: want_top,
            } => Piece::Completion {
                index,
                text: text.to_string(),
                logprobs: (want && !tokens.is_empty()).then(|| {
                    completion_logprobs(state, tokens, logprobs, top, want_top, &mut choice.offset)
                }),
                finish_reason,
            },
            Shape::Chat { logprobs: want } => {
                let role = (!choice.opened).then_some("assistant");
                choice.opened = true;
                let content =
                    (!text.is_empty() || finish_reason.is_none()).then(|| text.to_string());
                let logprobs = (want && !tokens.is_empty())
                    .then(|| chat_logprobs(state, tokens, logprobs, top));
                Piece::Chat {
                    index,
                    delta: Delta { role, content },
                    logprobs,
                    finish_reason,
                }
            }
        }
    }

    fn send(tx: &mpsc::UnboundedSender<Event>, chunk: &impl Serialize) -> Result<(), Gone> {
        let data = serde_json::to_string(chunk).unwrap_or_else(|e| {
            json!({"error": {"message": format!("cannot write a chunk: {e}"), "type": "internal_error"}})
                .to_string()
        });
        tx.send(Event::default().data(data)).map_err(|_| Gone)
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_all(
        &self,
        state: &AppState,
        prompt_tokens: u32,
        stops: &[String],
        usage: bool,
        mut events: mpsc::UnboundedReceiver<Streamed>,
        done: impl std::future::Future<Output = Result<Output, JobError>>,
        tx: &mpsc::UnboundedSender<Event>,
    ) -> Result<(), Gone> {
        let mut choices: Vec<Choice> = Vec::new();
        // Every token arrives before the answer (the actor sends them first).
        while let Some(ev) = events.recv().await {
            if !(ev.logprob.is_finite() && ev.top.iter().all(|(_, lp)| lp.is_finite())) {
                // The answer below reports it (JSON has no NaN).
                continue;
            }
            if choices.len() <= ev.choice {
                choices.resize_with(ev.choice + 1, Choice::default);
            }
            let c = &mut choices[ev.choice];
            if c.stopped {
                continue;
            }
            c.tokens.push(ev.token);
            let text = state.decode(&c.tokens, true);
            let (safe, stopped) = settled(&text, stops);
            c.stopped = stopped;
            let delta = safe
                .strip_prefix(c.sent.as_str())
                .unwrap_or_default()
                .to_string();
            c.sent.push_str(&delta);
            c.tokens_sent += 1;
            let piece = self.piece(
                state,
                ev.choice,
                c,
                &delta,
                &[ev.token],
                &[ev.logprob],
                &[ev.top],
                None,
            );
            Self::send(tx, &self.chunk(vec![piece], None))?;
        }
        let out = match done.await {
            Ok(out) => out,
            Err(e) => {
                let err = job_error(e);
                let body = json!({"error": {
                    "message": err.message,
                    "type": err.kind,
                    "code": err.status.as_u16(),
                }});
                Self::send(tx, &body)?;
                return tx.send(Event::default().data("[DONE]")).map_err(|_| Gone);
            }
        };
        let mut completion_tokens = 0u32;
        if choices.len() < out.generations.len() {
            choices.resize_with(out.generations.len(), Choice::default);
        }
        for (i, g) in out.generations.into_iter().enumerate() {
            let f = apply_stops(state, g, stops);
            completion_tokens += f.tokens.len() as u32;
            let c = &mut choices[i];
            let rest = match f.text.strip_prefix(c.sent.as_str()) {
                Some(rest) => rest.to_string(),
                None => {
                    tracing::warn!(
                        "stream {} choice {i}: the text sent is not a prefix of the answer's; the rest is left out",
                        self.id
                    );
                    String::new()
                }
            };
            let from = c.tokens_sent.min(f.tokens.len());
            let piece = self.piece(
                state,
                i,
                c,
                &rest,
                &f.tokens[from..],
                &f.logprobs[from..],
                f.top.get(from..).unwrap_or(&[]),
                Some(f.reason.as_str()),
            );
            Self::send(tx, &self.chunk(vec![piece], None))?;
        }
        if usage {
            let usage = Usage::of(prompt_tokens, completion_tokens);
            Self::send(tx, &self.chunk(vec![], Some(usage)))?;
        }
        tx.send(Event::default().data("[DONE]")).map_err(|_| Gone)
    }
}

/// The part of a choice's text so far that can be sent: cut before the first stop string (then
/// `true`: the choice is over), else without a trailing half character (U+FFFD) or a tail that
/// may be the start of a stop string.
fn settled<'a>(text: &'a str, stops: &[String]) -> (&'a str, bool) {
    if let Some(at) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
        return (&text[..at], true);
    }
    let whole = text.trim_end_matches('\u{FFFD}').len();
    let mut end = whole;
    for s in stops {
        // The longest proper prefix of `s` that ends the text.
        let prefixes: Vec<usize> = s.char_indices().skip(1).map(|(k, _)| k).collect();
        if let Some(k) = prefixes
            .into_iter()
            .rev()
            .find(|&k| text[..whole].ends_with(&s[..k]))
        {
            end = end.min(whole - k);
        }
    }
    (&text[..end], false)
}

#[cfg(test)]
mod tests {
    use super::settled;

    #[test]
    fn text_waits_while_it_may_start_a_stop_string() {
        let stops = vec!["\n\nQ:".to_string(), "END".to_string()];
        assert_eq!(
            settled("The answer is 4", &stops),
            ("The answer is 4", false)
        );
        assert_eq!(
            settled("The answer is 4\n", &stops),
            ("The answer is 4", false)
        );
        assert_eq!(
            settled("The answer is 4\n\nQ", &stops),
            ("The answer is 4", false)
        );
        assert_eq!(settled("4\n\nQ: next", &stops), ("4", true));
        assert_eq!(settled("4 EN", &stops), ("4 ", false));
        assert_eq!(settled("4 ENDx", &stops), ("4 ", true));
        assert_eq!(settled("caf\u{FFFD}", &[]), ("caf", false));
    }
}
