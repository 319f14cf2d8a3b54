//! The HTTP face of the reference model: `POST /v1/score` (`{"sequences": [{"prompt_ids",
//! "completion_ids"}], "temperature"}` -> one `{"logprobs"}` per sequence, in order), `/health`,
//! `/metrics`, `/openapi.json`. The frozen model sits behind a mutex and is used from a blocking
//! task; at most `max_queue` requests wait for it, beyond that the answer is 503 with
//! `Retry-After`. It never loads or swaps an adapter after start.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use model::{Engine, ScoreRequest as EngineScore};
use rl_core::wire::{Health, ScoreRequest, ScoreResponse, SequenceLogprobs};
use rl_http::metrics::{prom, prom_matmul_backend, prom_response, rss_bytes};
use rl_http::server::{no_route, require_key, wrong_method, ApiError, ApiJson, ApiKey};
use serde_json::json;

/// Service settings besides the model.
#[derive(Debug, Clone)]
pub struct Options {
    pub model_name: String,
    pub api_key: Option<String>,
    pub max_queue: usize,
    pub max_body_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            model_name: "model".into(),
            api_key: None,
            max_queue: 256,
            max_body_bytes: 64 << 20,
        }
    }
}

pub struct ScorerState {
    engine: Arc<Mutex<Engine>>,
    model_name: String,
    adapter: Option<String>,
    max_queue: usize,
    pending: AtomicUsize,
    sequences: AtomicU64,
    tokens: AtomicU64,
    rejected: AtomicU64,
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    started: Instant,
    /// The engine's matmul kernels and oneDNN's ISA ([`model::Engine::matmul_backend`]).
    matmul: (&'static str, Option<&'static str>),
}

type Shared = State<Arc<ScorerState>>;

const ROUTES: &[(&str, &str, &str)] = &[
    (
        "post",
        "/v1/score",
        "Per-token logprobs of completions under the frozen model (teacher forcing)",
    ),
    ("get", "/health", "Liveness and model"),
    ("get", "/metrics", "Prometheus metrics"),
    ("get", "/openapi.json", "This document"),
];

/// Builds the router; the engine is frozen from here on.
pub fn app(engine: Engine, opts: &Options) -> (Router, Arc<ScorerState>) {
    let adapter = engine.adapter().map(|_| "loaded at start".to_string());
    let matmul = engine.matmul_backend();
    let state = Arc::new(ScorerState {
        engine: Arc::new(Mutex::new(engine)),
        model_name: opts.model_name.clone(),
        adapter,
        max_queue: opts.max_queue.max(1),
        pending: AtomicUsize::new(0),
        sequences: AtomicU64::new(0),
        tokens: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        requests: Mutex::new(BTreeMap::new()),
        started: Instant::now(),
        matmul,
    });
    let key = ApiKey(opts.api_key.as_deref().map(Arc::from));
    let router = Router::new()
        .route("/v1/score", post(score))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(opts.max_body_bytes))
        .layer(from_fn_with_state(key, require_key))
        .layer(from_fn_with_state(state.clone(), count_requests))
        .with_state(state.clone());
    (router, state)
}

/// Decrements the pending count when a request leaves, however it leaves.
struct Admitted<'a>(&'a AtomicUsize);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn score(
    State(state): Shared,
    ApiJson(req): ApiJson<ScoreRequest>,
) -> Result<Json<ScoreResponse>, ApiError> {
    if req.sequences.is_empty() {
        return Err(ApiError::unprocessable(
            "`sequences` is empty; send at least one",
        ));
    }
    if !req.temperature.is_finite() || req.temperature <= 0.0 {
        return Err(ApiError::unprocessable(format!(
            "`temperature` is {}; it must be > 0 (the sampling temperature, 1 for raw logprobs)",
            req.temperature
        )));
    }
    let before = state.pending.fetch_add(1, Ordering::SeqCst);
    let _admitted = Admitted(&state.pending);
    if before >= state.max_queue {
        state.rejected.fetch_add(1, Ordering::Relaxed);
        let wait = 1 + before as u64 / 4;
        return Err(ApiError::unavailable(
            format!("the scorer's queue is full; retry after {wait} s"),
            wait,
        ));
    }
    let seqs: Vec<EngineScore> = req
        .sequences
        .into_iter()
        .map(|s| EngineScore {
            prompt: s.prompt_ids,
            completion: s.completion_ids,
        })
        .collect();
    let engine = state.engine.clone();
    let temperature = req.temperature;
    let scored = tokio::task::spawn_blocking(move || {
        let engine = engine
            .lock()
            .map_err(|_| ApiError::internal("the engine is unusable after an earlier failure"))?;
        for (i, s) in seqs.iter().enumerate() {
            engine
                .check_score_request(&format!("sequences[{i}]"), s)
                .map_err(|e| ApiError::unprocessable(e.to_string()))?;
        }
        let tokens: usize = seqs.iter().map(|s| s.completion.len()).sum();
        crate::score_all(&engine, &seqs, temperature)
            .map(|r| (r, tokens))
            .map_err(|e| ApiError::internal(format!("scoring failed: {e}")))
    })
    .await
    .map_err(|e| ApiError::internal(format!("the scoring task failed: {e}")))??;
    let (results, tokens) = scored;
    state
        .sequences
        .fetch_add(results.len() as u64, Ordering::Relaxed);
    state.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
    Ok(Json(ScoreResponse {
        model: state.model_name.clone(),
        results: results
            .into_iter()
            .map(|logprobs| SequenceLogprobs { logprobs })
            .collect(),
    }))
}

async fn health(State(state): Shared) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        model: state.model_name.clone(),
        adapter: state.adapter.clone(),
    })
}

async fn metrics(State(state): Shared) -> Response {
    use std::fmt::Write;
    let mut out = String::new();
    prom_matmul_backend(&mut out, "scorer", state.matmul);
    prom(
        &mut out,
        "scorer_queue_depth",
        "gauge",
        "Requests waiting or being scored.",
        state.pending.load(Ordering::SeqCst) as f64,
    );
    prom(
        &mut out,
        "scorer_queue_capacity",
        "gauge",
        "Most requests admitted at once (--max-queue).",
        state.max_queue as f64,
    );
    prom(
        &mut out,
        "scorer_rejected_full_total",
        "counter",
        "Requests answered 503 because the queue was full.",
        state.rejected.load(Ordering::Relaxed) as f64,
    );
    prom(
        &mut out,
        "scorer_sequences_total",
        "counter",
        "Sequences scored.",
        state.sequences.load(Ordering::Relaxed) as f64,
    );
    prom(
        &mut out,
        "scorer_completion_tokens_total",
        "counter",
        "Completion tokens scored.",
        state.tokens.load(Ordering::Relaxed) as f64,
    );
    prom(
        &mut out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory of the scorer.",
        rss_bytes().unwrap_or(0) as f64,
    );
    prom(
        &mut out,
        "process_uptime_seconds",
        "gauge",
        "Seconds since the scorer started.",
        state.started.elapsed().as_secs_f64(),
    );
    let _ = writeln!(out, "# HELP scorer_http_requests_total HTTP requests by route and status.\n# TYPE scorer_http_requests_total counter");
    if let Ok(map) = state.requests.lock() {
        for ((route, status), n) in map.iter() {
            let _ = writeln!(
                out,
                "scorer_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
    }
    prom_response(out)
}

async fn count_requests(State(state): Shared, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let route = ROUTES
        .iter()
        .find(|(_, p, _)| *p == path)
        .map_or("other", |(_, p, _)| p);
    let response = next.run(req).await;
    if let Ok(mut map) = state.requests.lock() {
        *map.entry((route.to_string(), response.status().as_u16()))
            .or_insert(0) += 1;
    }
    response
}

/// The OpenAPI 3.1 document.
pub fn document() -> serde_json::Value {
    let ids = json!({"type": "array", "items": {"type": "integer", "minimum": 0}});
    let err = json!({"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}});
    let mut paths = serde_json::Map::new();
    for (method, path, summary) in ROUTES {
        let mut op = json!({"summary": summary, "responses": {
            "200": {"description": "OK"},
            "400": {"description": "Invalid JSON", "content": err},
            "401": {"description": "Missing or wrong API key", "content": err},
            "413": {"description": "Body over the limit", "content": err},
            "422": {"description": "A field is wrong; the message names it", "content": err},
            "503": {"description": "Queue full; retry after the Retry-After header", "content": err}
        }});
        if *path == "/v1/score" {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}}}});
            op["responses"]["200"]["content"] = json!({"application/json": {"schema": {"$ref": "#/components/schemas/ScoreResponse"}}});
        }
        paths.entry(path.to_string()).or_insert_with(|| json!({}))[*method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "ref-scorer", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Reference-model logprobs of completions under teacher forcing. Errors are {\"error\": {\"message\", \"type\"}}."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {"message": {"type": "string"}, "type": {"type": "string"}}}}},
                "ScoreRequest": {"type": "object", "additionalProperties": false, "required": ["sequences"], "properties": {
                    "sequences": {"type": "array", "minItems": 1, "items": {"type": "object", "additionalProperties": false,
                        "required": ["prompt_ids", "completion_ids"], "properties": {"prompt_ids": ids, "completion_ids": ids}}},
                    "temperature": {"type": "number", "exclusiveMinimum": 0, "default": 1.0}
                }},
                "ScoreResponse": {"type": "object", "properties": {"model": {"type": "string"}, "results": {"type": "array", "items": {
                    "type": "object", "properties": {"logprobs": {"type": "array", "items": {"type": "number"}}}}}}}
            }
        },
        "security": [{"bearer": []}],
        "paths": paths,
    })
}

async fn openapi() -> Json<serde_json::Value> {
    Json(document())
}
