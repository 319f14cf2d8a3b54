//! `rollout-server`: the current policy (base model + LoRA adapter) served over HTTP, so that the
//! orchestrator, a notebook with the openai SDK or TapeAgents can sample from it. OpenAI's
//! `/v1/completions` and `/v1/chat/completions`, a native `/v1/generate` on token ids (what the
//! orchestrator uses: ids and logprobs exactly as the learner needs them), `/v1/tokenize`,
//! adapter hot-swap (`POST`/`DELETE /v1/adapters`, and `PUT /v1/adapters/{name}` with the
//! adapter's bytes for a server on another machine), `/health`, `/metrics`, `/openapi.json`.
//!
//! One engine actor ([`batcher`]) owns the model and batches concurrent requests together; a
//! bounded queue answers 503 with `Retry-After` when full; an engine fault answers 500, makes
//! `/health` 503 and ends the process non-zero (to be restarted). It must never panic on request data,
//! drop an accepted request, load an adapter from outside its checkpoints directory, or mix two
//! adapters within one response.

pub mod batcher;
pub mod document;
pub mod openai;
pub mod routes;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use model::Engine;
use rl_http::metrics::Metrics;
use rl_http::server::{assemble, Frame};

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
    /// Largest adapter upload (`PUT /v1/adapters/{name}`) in bytes.
    pub max_adapter_bytes: usize,
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
            max_adapter_bytes: 1 << 30,
        }
    }
}

/// Starts the engine actor and builds the router. The engine moves into the actor thread.
pub fn app(engine: Engine, opts: &Options) -> anyhow::Result<(axum::Router, Arc<AppState>)> {
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
    let limits = engine.limits();
    let eos_ids = engine.config().eos_token_ids.clone();
    let gauges = routes::service::Gauges::default();
    let (metrics, stats) = Metrics::new("rollout", engine.matmul_backend(), |r, phases| {
        gauges.register(r);
        let stats = batcher::Stats::new(phases);
        stats.register(r);
        stats
    });
    let liveness = rl_http::server::Liveness::default();
    let batcher = Batcher::start(
        engine,
        opts.max_batch,
        opts.max_queue,
        stats,
        liveness.clone(),
    )?;
    let state = Arc::new(AppState {
        batcher,
        model_name: opts.model_name.clone(),
        tokenizer,
        template,
        limits,
        eos_ids,
        checkpoints_dir,
        max_n: opts.max_n,
        metrics: metrics.clone(),
        gauges,
        liveness,
    });
    let frame = Frame {
        title: "rollout-server",
        description: "Samples completions with per-token logprobs from the current policy (base \
                      model + LoRA adapter). Errors are {\"error\": {\"message\", \"type\"}}.",
        api_key: opts.api_key.clone(),
        max_body_bytes: opts.max_body_bytes,
    };
    let max_n = opts.max_n;
    let routes = routes::router(opts.max_adapter_bytes);
    let (router, _) = assemble(routes, state.clone(), metrics, frame, |doc| {
        document::state_rules(doc, limits, max_n)
    });
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
