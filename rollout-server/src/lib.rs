//! `rollout-server`: the current policy (base model + LoRA adapter) served over HTTP, so that the
//! orchestrator, a notebook with the openai SDK or TapeAgents can sample from it. OpenAI's
//! `/v1/completions` and `/v1/chat/completions`, a native `/v1/generate` on token ids (what the
//! orchestrator uses: ids and logprobs exactly as the learner needs them), `/v1/tokenize`,
//! adapter hot-swap (`POST`/`DELETE /v1/adapters`), `/health`, `/metrics`, `/openapi.json`.
//!
//! One engine actor ([`batcher`]) owns the model and batches concurrent requests together; a
//! bounded queue answers 503 with `Retry-After` when full. It must never panic on request data,
//! drop an accepted request, load an adapter from outside its checkpoints directory, or mix two
//! adapters within one response.

pub mod batcher;
pub mod openai;
pub mod openapi;
pub mod routes;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::Router;
use model::Engine;
use rl_http::server::{no_route, require_key, wrong_method, ApiKey};

pub use batcher::Batcher;
pub use routes::AppState;

/// Server settings besides the model.
#[derive(Debug, Clone)]
pub struct Options {
    /// The name clients use in `model` (default: the model file or folder name).
    pub model_name: String,
    pub checkpoints_dir: Option<PathBuf>,
    pub api_key: Option<String>,
    /// Rows (choices) decoded together at most.
    pub max_batch: usize,
    /// Requests accepted and not yet answered at most; beyond, 503.
    pub max_queue: usize,
    /// Most choices per request.
    pub max_n: u32,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            model_name: "model".into(),
            checkpoints_dir: None,
            api_key: None,
            max_batch: 32,
            max_queue: 1024,
            max_n: 128,
            max_body_bytes: 8 << 20,
        }
    }
}

/// Starts the engine actor and builds the router. The engine moves into the actor thread.
pub fn app(engine: Engine, opts: &Options) -> anyhow::Result<(Router, Arc<AppState>)> {
    let checkpoints_dir = match &opts.checkpoints_dir {
        Some(d) => Some(d.canonicalize().map_err(|e| {
            anyhow::anyhow!(
                "--checkpoints-dir {}: {e}; create the folder first",
                d.display()
            )
        })?),
        None => None,
    };
    let tokenizer = engine.tokenizer().ok().cloned();
    let template = engine.chat_template().cloned().map_err(|e| e.to_string());
    let cfg = engine.config();
    let (vocab, context) = (cfg.vocab_size, cfg.max_position_embeddings);
    let eos_ids = cfg.eos_token_ids.clone();
    let matmul = engine.matmul_backend();
    let batcher = Batcher::start(engine, opts.max_batch, opts.max_queue)?;
    let state = Arc::new(AppState {
        batcher,
        model_name: opts.model_name.clone(),
        tokenizer,
        template,
        vocab,
        context,
        eos_ids,
        checkpoints_dir,
        max_n: opts.max_n,
        requests: Mutex::new(Default::default()),
        started: Instant::now(),
        matmul,
    });
    let key = ApiKey(opts.api_key.as_deref().map(Arc::from));
    let router = Router::new()
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat))
        .route("/v1/generate", post(routes::generate))
        .route("/v1/tokenize", post(routes::tokenize))
        .route("/v1/models", get(routes::models))
        .route(
            "/v1/adapters",
            post(routes::load_adapter).delete(routes::unload_adapter),
        )
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(routes::openapi))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(opts.max_body_bytes))
        .layer(from_fn_with_state(key, require_key))
        .layer(from_fn_with_state(state.clone(), routes::count_requests))
        .with_state(state.clone());
    Ok((router, state))
}

/// Serves `router` on `listener` until `shutdown` resolves; requests in flight are finished.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
