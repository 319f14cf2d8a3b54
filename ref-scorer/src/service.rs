//! The HTTP face of the reference model: `POST /v1/score` (`{"sequences": [{"prompt_ids",
//! "completion_ids"}], "temperature"}` -> one `{"logprobs"}` per sequence, in order), `/health`,
//! `/metrics`, `/openapi.json`. The frozen model sits behind a mutex and is used from a blocking
//! task; at most `max_queue` requests wait for it, beyond that the answer is 503 with
//! `Retry-After`. A panic while scoring poisons the lock: the service is then failed
//! ([`Liveness`]: 500s, `/health` 503) and exits non-zero to be restarted. No non-finite number
//! ever leaves it (500 instead). It never loads or swaps an adapter after start.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::response::Response;
use axum::Json;
use model::{Engine, Limits, ScoreRequest as EngineScore};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rl_core::wire::{Health, ScoreRequest, ScoreResponse, SequenceLogprobs};
use rl_http::metrics::{Metrics, PhaseTimes};
use rl_http::server::{assemble, ApiError, ApiJson, Frame, Liveness};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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

/// Environment variable of the scorer's failpoint (fault tests, in builds with the `failpoints`
/// feature): `engine-panic` panics a scoring while it holds the model lock (poisoning it).
#[cfg(feature = "failpoints")]
pub const FAILPOINT_ENV: &str = "REF_SCORER_FAILPOINT";

pub struct ScorerState {
    /// Failed once the model lock is poisoned: `/health` 503, the process exits.
    pub liveness: Liveness,
    /// The `engine-panic` failpoint is set ([`FAILPOINT_ENV`], read once at start).
    #[cfg(feature = "failpoints")]
    panic_failpoint: bool,
    engine: Arc<Mutex<Engine>>,
    /// What a sequence must fit (the model's, read once: the model is frozen).
    limits: Limits,
    model_name: String,
    adapter: Option<String>,
    max_queue: usize,
    pending: AtomicUsize,
    counters: Counters,
    metrics: Arc<Metrics>,
}

type Shared = State<Arc<ScorerState>>;

/// What the scorer counts for `/metrics`.
#[derive(Debug, Clone)]
struct Counters {
    sequences: Counter,
    tokens: Counter,
    rejected: Counter,
    queue_depth: Gauge,
    queue_capacity: Gauge,
    /// Time waiting for the engine, and scoring with it.
    wait_seconds: Histogram,
    score_seconds: Histogram,
}

impl Counters {
    fn new(r: &mut Registry, phases: &PhaseTimes) -> Self {
        let c = Self {
            sequences: Counter::default(),
            tokens: Counter::default(),
            rejected: Counter::default(),
            queue_depth: Gauge::default(),
            queue_capacity: Gauge::default(),
            wait_seconds: phases.histogram("engine_wait"),
            score_seconds: phases.histogram("score"),
        };
        r.register("sequences", "Sequences scored", c.sequences.clone());
        r.register(
            "completion_tokens",
            "Completion tokens scored",
            c.tokens.clone(),
        );
        r.register(
            "rejected_full",
            "Requests answered 503 because the queue was full",
            c.rejected.clone(),
        );
        r.register(
            "queue_depth",
            "Requests waiting or being scored",
            c.queue_depth.clone(),
        );
        r.register(
            "queue_capacity",
            "Most requests admitted at once (--max-queue)",
            c.queue_capacity.clone(),
        );
        c
    }
}

/// Builds the router; the engine is frozen from here on.
pub fn app(engine: Engine, opts: &Options) -> (axum::Router, Arc<ScorerState>) {
    let adapter = engine.adapter().map(|_| "loaded at start".to_string());
    let (metrics, counters) = Metrics::new("scorer", engine.matmul_backend(), Counters::new);
    let state = Arc::new(ScorerState {
        liveness: Liveness::default(),
        #[cfg(feature = "failpoints")]
        panic_failpoint: rl_http::server::failpoint(FAILPOINT_ENV, "engine-panic").is_some(),
        limits: engine.limits(),
        engine: Arc::new(Mutex::new(engine)),
        model_name: opts.model_name.clone(),
        adapter,
        max_queue: opts.max_queue.max(1),
        pending: AtomicUsize::new(0),
        counters,
        metrics: metrics.clone(),
    });
    let routes = OpenApiRouter::new()
        .routes(routes!(score))
        .routes(routes!(health))
        .routes(routes!(metrics_text));
    let frame = Frame {
        title: "ref-scorer",
        description: "Reference-model logprobs of completions under teacher forcing. Errors are \
                      {\"error\": {\"message\", \"type\"}}.",
        api_key: opts.api_key.clone(),
        max_body_bytes: opts.max_body_bytes,
    };
    let vocab = state.limits.vocab;
    let (router, _) = assemble(routes, state.clone(), metrics, frame, |doc| {
        rl_http::server::limit_token_ids(doc, vocab)
    });
    (router, state)
}

/// Decrements the pending count when a request leaves, however it leaves.
struct Admitted<'a>(&'a AtomicUsize);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `POST /v1/score`.
#[utoipa::path(post, path = "/v1/score", tag = "scoring",
    summary = "Per-token logprobs of completions under the frozen model (teacher forcing)",
    request_body = ScoreRequest,
    responses((status = 200, description = "One entry per sequence, in order", body = ScoreResponse)))]
async fn score(
    State(state): Shared,
    ApiJson(req): ApiJson<ScoreRequest>,
) -> Result<Json<ScoreResponse>, ApiError> {
    if req.sequences.is_empty() {
        return Err(ApiError::unprocessable(
            "`sequences` is empty; send at least one",
        ));
    }
    state
        .liveness
        .check()
        .map_err(|_| state.liveness.engine_error())?;
    let before = state.pending.fetch_add(1, Ordering::SeqCst);
    let _admitted = Admitted(&state.pending);
    if before >= state.max_queue {
        state.counters.rejected.inc();
        let wait = 1 + before as u64 / 4;
        return Err(ApiError::unavailable(
            format!("the scorer's queue is full; retry after {wait} s"),
            wait,
        ));
    }
    // The one check of each sequence, against the model (the temperature is valid by its type).
    let seqs = req
        .sequences
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let what = format!("sequences[{i}]");
            EngineScore::new(&what, s.prompt_ids, s.completion_ids, state.limits)
                .map_err(|e| ApiError::unprocessable(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let engine = state.engine.clone();
    let temperature = req.temperature;
    let counters = state.counters.clone();
    let liveness = state.liveness.clone();
    #[cfg(feature = "failpoints")]
    let panic_failpoint = state.panic_failpoint;
    let scored = tokio::task::spawn_blocking(move || {
        let waited = Instant::now();
        let engine = engine.lock().map_err(|_| {
            liveness.fail("the model lock is poisoned: a scoring panicked while holding it");
            liveness.engine_error()
        })?;
        #[cfg(feature = "failpoints")]
        if panic_failpoint {
            panic!("{FAILPOINT_ENV}: engine-panic while holding the model lock");
        }
        counters
            .wait_seconds
            .observe(waited.elapsed().as_secs_f64());
        let _timer = PhaseTimer(Instant::now(), &counters.score_seconds);
        let tokens: usize = seqs.iter().map(|s| s.completion().len()).sum();
        crate::score_all(&engine, &seqs, temperature)
            .map(|r| (r, tokens))
            .map_err(|e| ApiError::internal(format!("scoring failed: {e}")))
    })
    .await
    .map_err(|e| {
        // A panic in the engine poisoned its lock: nothing can score any more.
        state.liveness.fail(format!("the scoring task failed: {e}"));
        state.liveness.engine_error()
    })??;
    let (results, tokens) = scored;
    for (i, r) in results.iter().enumerate() {
        rl_http::server::all_finite(&format!("results[{i}].logprobs"), r)?;
    }
    state.counters.sequences.inc_by(results.len() as u64);
    state.counters.tokens.inc_by(tokens as u64);
    Ok(Json(ScoreResponse {
        model: state.model_name.clone(),
        results: results
            .into_iter()
            .map(|logprobs| SequenceLogprobs { logprobs })
            .collect(),
    }))
}

/// Observes the time since its start into a histogram when dropped (however scoring ends).
struct PhaseTimer<'a>(Instant, &'a Histogram);

impl Drop for PhaseTimer<'_> {
    fn drop(&mut self) {
        self.1.observe(self.0.elapsed().as_secs_f64());
    }
}

/// `GET /health`: 200 while the model works; 503 once its lock is poisoned (the process exits).
#[utoipa::path(get, path = "/health", tag = "service", summary = "Liveness and model",
    responses((status = 200, description = "The scorer is up and its model works", body = Health),
        (status = 503, description = "The model failed; the scorer is exiting to be restarted", body = rl_core::wire::ErrorBody)))]
async fn health(State(state): Shared) -> Result<Json<Health>, ApiError> {
    state.liveness.check()?;
    Ok(Json(Health {
        status: "ok".into(),
        model: state.model_name.clone(),
        adapter: state.adapter.clone(),
    }))
}

/// `GET /metrics` (OpenMetrics text).
#[utoipa::path(get, path = "/metrics", tag = "service", summary = "Prometheus metrics (OpenMetrics text)",
    responses((status = 200, description = "Every metric", content_type = "application/openmetrics-text", body = String)))]
async fn metrics_text(State(state): Shared) -> Response {
    let c = &state.counters;
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    c.queue_depth
        .set(count(state.pending.load(Ordering::SeqCst)));
    c.queue_capacity.set(count(state.max_queue));
    state.metrics.respond()
}
