//! `/metrics` through `prometheus-client`: what every service reports the same way (requests and
//! their latency per route and status, time per phase, resident memory, uptime, who runs the
//! model's matrix products) and a registry each service adds its own counters and gauges to, under
//! its prefix (`rollout_`, `scorer_`). Text in the OpenMetrics format, which Prometheus scrapes.
//!
//! Handlers never format metric text by hand: they update typed metrics; [`Metrics::respond`]
//! encodes them.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// An f64 gauge (seconds, ratios).
pub type GaugeF64 = Gauge<f64, AtomicU64>;

/// Labels of the request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    /// The route's path template (`/v1/generate`), `other` for no route.
    pub route: String,
    pub status: u16,
}

/// Labels of the request latency histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: String,
}

/// Labels of the phase histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Phase {
    pub phase: &'static str,
}

fn seconds_histogram() -> Histogram {
    // 1 ms to about 9 minutes.
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// The time-per-phase histograms of a service (`{prefix}_phase_duration_seconds{phase=...}`).
#[derive(Debug, Clone)]
pub struct PhaseTimes(Family<Phase, Histogram, fn() -> Histogram>);

impl PhaseTimes {
    /// The histogram of `phase` (a handle: observe into it from anywhere).
    pub fn histogram(&self, phase: &'static str) -> Histogram {
        self.0.get_or_create(&Phase { phase }).clone()
    }
}

/// The metrics of one service.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    latency: Family<Route, Histogram, fn() -> Histogram>,
    rss: Gauge,
    uptime: GaugeF64,
    started: Instant,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// The common metrics of a service whose own ones are named `{prefix}_*`; `matmul` is who
    /// runs the model's matrix products and oneDNN's ISA (`model::Engine::matmul_backend`);
    /// `register` adds the service's own metrics (under the prefix) and may take histograms of
    /// its phases; what it returns comes back beside the metrics.
    pub fn new<T>(
        prefix: &str,
        matmul: (&str, Option<&str>),
        register: impl FnOnce(&mut Registry, &PhaseTimes) -> T,
    ) -> (Arc<Self>, T) {
        let mut registry = Registry::default();
        let rss = Gauge::default();
        let uptime = GaugeF64::default();
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the process",
            rss.clone(),
        );
        registry.register(
            "process_uptime_seconds",
            "Seconds since the process started",
            uptime.clone(),
        );
        let requests = Family::<RouteStatus, Counter>::default();
        let latency: Family<Route, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(seconds_histogram);
        let phases: Family<Phase, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(seconds_histogram);
        let own = registry.sub_registry_with_prefix(prefix);
        own.register(
            "matmul_backend",
            "Who runs the model's matrix products (onednn, bf16-kernel, candle) and oneDNN's ISA",
            Info::new(vec![
                ("kernels".to_string(), matmul.0.to_string()),
                ("isa".to_string(), matmul.1.unwrap_or("none").to_string()),
            ]),
        );
        own.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        own.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            latency.clone(),
        );
        own.register(
            "phase_duration_seconds",
            "Time spent per phase of the work (queue wait, batch, swap, scoring)",
            phases.clone(),
        );
        let phase_times = PhaseTimes(phases.clone());
        let own_metrics = register(own, &phase_times);
        let metrics = Arc::new(Self {
            registry,
            requests,
            latency,
            rss,
            uptime,
            started: Instant::now(),
        });
        (metrics, own_metrics)
    }

    /// The `/metrics` response: every metric in the OpenMetrics text format.
    pub fn respond(&self) -> Response {
        self.rss
            .set(rss_bytes().and_then(|b| i64::try_from(b).ok()).unwrap_or(0));
        self.uptime.set(self.started.elapsed().as_secs_f64());
        let mut body = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &self.registry) {
            return crate::server::ApiError::internal(format!("encoding the metrics: {e}"))
                .into_response();
        }
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response()
    }
}

/// Middleware: counts each request by route template and status, and times it. Needs the
/// service's [`Metrics`] as an `Extension`.
pub async fn track(
    Extension(metrics): Extension<Arc<Metrics>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let t = Instant::now();
    let response = next.run(req).await;
    metrics
        .latency
        .get_or_create(&Route {
            route: route.clone(),
        })
        .observe(t.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RouteStatus {
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// Resident memory of this process in bytes (Linux).
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
