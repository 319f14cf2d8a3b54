//! The service routes: `GET /health` and `GET /metrics` (`/openapi.json` is the HTTP kit's).

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::response::Response;
use axum::Json;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rl_core::wire::Health;
use rl_http::server::ApiError;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{Router, Shared};

pub fn router() -> Router {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(metrics))
}

/// The gauges read from the server's state when `/metrics` is scraped.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    queue_depth: Gauge,
    queue_capacity: Gauge,
    queue_depth_max: Gauge,
    adapter_loaded: Gauge,
}

impl Gauges {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "queue_depth",
            "Requests accepted and not yet answered",
            self.queue_depth.clone(),
        );
        r.register(
            "queue_capacity",
            "Most requests accepted at once (--max-queue)",
            self.queue_capacity.clone(),
        );
        r.register(
            "queue_depth_max",
            "Largest queue depth seen",
            self.queue_depth_max.clone(),
        );
        r.register(
            "adapter_loaded",
            "1 when an adapter is applied",
            self.adapter_loaded.clone(),
        );
    }
}

/// `GET /health`: 200 while the engine works; 503 once it failed (the server then exits).
#[utoipa::path(get, path = "/health", tag = "service", summary = "Liveness, model and adapter",
    responses((status = 200, description = "The server is up and its engine works", body = Health),
        (status = 503, description = "The engine failed; the server is exiting to be restarted", body = rl_core::wire::ErrorBody)))]
pub async fn health(State(state): Shared) -> Result<Json<Health>, ApiError> {
    state.liveness.check()?;
    Ok(Json(Health {
        status: "ok".into(),
        model: state.model_name.clone(),
        adapter: state.batcher.adapter(),
    }))
}

/// `GET /metrics` (OpenMetrics text).
#[utoipa::path(get, path = "/metrics", tag = "service", summary = "Prometheus metrics (OpenMetrics text)",
    responses((status = 200, description = "Every metric", content_type = "application/openmetrics-text", body = String)))]
pub async fn metrics(State(state): Shared) -> Response {
    let g = &state.gauges;
    let b = &state.batcher;
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    g.queue_depth.set(count(b.pending()));
    g.queue_capacity.set(count(b.max_queue()));
    g.queue_depth_max
        .set(count(b.stats.max_pending.load(Ordering::Relaxed)));
    g.adapter_loaded.set(i64::from(b.adapter().is_some()));
    state.metrics.respond()
}
