//! What both HTTP services share (axum): the one error type that maps to a status and OpenAI's
//! JSON error shape, a JSON extractor whose rejections say what to fix, the bearer-key guard, the
//! 404/405 fallbacks, liveness ([`Liveness`]: an engine fault makes `/health` 503 and the process
//! exit non-zero), graceful shutdown on SIGTERM/Ctrl-C and the server runner.
//!
//! A handler must never panic on request data: everything a client sends goes through
//! [`ApiJson`] and the handler's own checks, and comes back as an [`ApiError`].

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use rl_core::wire::{ErrorBody, ErrorDetail};

/// An error answered to a client: status, OpenAI-style type, a message saying what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    /// Seconds, sent as `Retry-After` (503 only).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", m)
    }
    pub fn unauthorized(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", m)
    }
    pub fn method_not_allowed(m: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", m)
    }
    pub fn too_large(m: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", m)
    }
    pub fn unprocessable(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", m)
    }
    pub fn unavailable(m: impl Into<String>, retry_after_s: u64) -> Self {
        Self {
            retry_after: Some(retry_after_s),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded_error", m)
        }
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.message,
                kind: self.kind.to_string(),
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

/// A JSON body: invalid JSON is 400, a body over the limit 413, a wrong or unknown field 422,
/// each message naming the field (`n: invalid type: string "2", expected u32`).
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(format!(
                    "the request body is over the server's limit ({e}); send fewer or shorter items per request"
                ))
            } else {
                ApiError::bad_request(format!("cannot read the request body: {e}"))
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses a JSON body with the same errors as [`ApiJson`].
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(format!("the body is not valid JSON: {inner}"))
        } else if path == "." || path.is_empty() {
            ApiError::unprocessable(format!("{inner}"))
        } else {
            // A knob's error reads on from its name (`is 0; it must be ...`, `sampling`).
            let message = inner.to_string();
            let sep = if message.starts_with("is ") {
                " "
            } else {
                ": "
            };
            ApiError::unprocessable(format!("`{path}`{sep}{message}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    Ok(value)
}

/// The bearer key a service requires, if any.
#[derive(Debug, Clone, Default)]
pub struct ApiKey(pub Option<Arc<str>>);

/// Middleware: requests other than `/health`, `/metrics` and `/openapi.json` must carry
/// `Authorization: Bearer <key>` when the service has a key.
pub async fn require_key(State(key): State<ApiKey>, req: Request, next: Next) -> Response {
    let open = OPEN_ROUTES.contains(&req.uri().path());
    if let (Some(expected), false) = (&key.0, open) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            None => {
                return ApiError::unauthorized(
                    "missing API key: send the header `Authorization: Bearer <key>`",
                )
                .into_response()
            }
            Some(k) if k != &**expected => {
                return ApiError::unauthorized("wrong API key").into_response()
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

/// Fallback for unknown routes.
pub async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!(
        "no route `{method} {}`; the routes are listed at GET /openapi.json",
        uri.path()
    ))
}

/// Fallback for a known route called with another method.
pub async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(format!(
        "`{}` does not accept {method}; see GET /openapi.json",
        uri.path()
    ))
}

/// Resolves on Ctrl-C or SIGTERM: pass to `axum::serve(..).with_graceful_shutdown`.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// What a failed service says of itself, in `/health`'s 503 and in the 500s of
/// [`Liveness::engine_error`] (the words its clients and fault tests look for).
pub const EXITING_TO_BE_RESTARTED: &str = "this server is exiting to be restarted";

/// Whether a service can still do its work. Presence is not enough: an engine thread that
/// panicked or a model lock poisoned by a panic leaves a process that listens but can never
/// answer. [`Liveness::fail`] records the fault; from then `/health` answers 503 with it, engine
/// requests answer 500, and [`run_server`] stops the server and returns an error, so the process
/// exits non-zero and its supervisor starts a new one.
#[derive(Debug, Clone)]
pub struct Liveness(Arc<tokio::sync::watch::Sender<Option<String>>>);

impl Default for Liveness {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(None)))
    }
}

impl Liveness {
    /// Records a fault (the first one is kept).
    pub fn fail(&self, why: impl Into<String>) {
        let why = why.into();
        let first = self.0.send_if_modified(|fault| {
            if fault.is_some() {
                return false;
            }
            *fault = Some(why.clone());
            true
        });
        if first {
            tracing::error!("engine fault: {why}; the service stops and exits non-zero");
        }
    }

    /// The fault, once there is one.
    pub fn fault(&self) -> Option<String> {
        self.0.borrow().clone()
    }

    /// Resolves when a fault is recorded.
    pub async fn failed(&self) {
        let mut rx = self.0.subscribe();
        if rx.wait_for(Option::is_some).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// `Err(503)` naming the fault once there is one (what `/health` answers).
    pub fn check(&self) -> Result<(), ApiError> {
        match self.fault() {
            None => Ok(()),
            Some(why) => Err(ApiError::unavailable(
                format!("the engine failed ({why}); {EXITING_TO_BE_RESTARTED}"),
                5,
            )),
        }
    }

    /// The 500 a request gets when the engine failed under it.
    pub fn engine_error(&self) -> ApiError {
        ApiError::internal(format!(
            "the engine failed ({}); {EXITING_TO_BE_RESTARTED}: send the request again",
            self.fault().unwrap_or_else(|| "unknown fault".into())
        ))
    }
}

/// `Err(500)` when `values` (the field `what` of an answer) holds a NaN or an infinity: JSON has
/// no such numbers (serde writes `null`), and no client may ever receive or store one.
pub fn all_finite(what: &str, values: &[f32]) -> Result<(), ApiError> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(ApiError::internal(format!(
            "the engine produced {} at `{what}[{i}]`; nothing was answered",
            values[i]
        ))),
    }
}

/// How long a failed server keeps answering (500s, `/health` 503) before it stops, and how long
/// it then waits for requests in flight.
const FAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
const FAULT_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads a failpoint of the service (for the fault tests; only in builds with the `failpoints`
/// feature, which `cargo test` turns on and release builds leave out): the environment variable
/// `var` holds `point` or `point:N`; returns `Some(N)` (1 without a number) when it names `point`.
#[cfg(feature = "failpoints")]
pub fn failpoint(var: &str, point: &str) -> Option<u64> {
    let value = std::env::var(var).ok()?;
    let (name, n) = value.split_once(':').unwrap_or((value.as_str(), "1"));
    (name == point).then(|| n.parse().unwrap_or(1))
}

/// The name a service reports for a model: the folder name, or the file name without extension.
pub fn served_model_name(path: &std::path::Path) -> String {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
}

/// Runs `router` on `host:port` until SIGTERM/Ctrl-C (requests in flight are finished), on a
/// 2-thread runtime. Prints `listening on http://ADDR` on stdout (how the orchestrator learns the
/// address of `--port 0`); a port in use is an error naming it. After an engine fault
/// (`liveness`) it answers for [`FAULT_GRACE`], stops, and returns the fault as an error.
pub fn run_server(
    host: &str,
    port: u16,
    router: axum::Router,
    what: &str,
    liveness: &Liveness,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "binding {host}:{port} (is the port in use? pick another with --port): {e}"
                    ),
                )
            })?;
        let addr = listener.local_addr()?;
        println!("listening on http://{addr}");
        tracing::info!("{what} on http://{addr}");
        let fault = liveness.clone();
        let stop = async move {
            tokio::select! {
                () = shutdown_signal() => {},
                () = async { fault.failed().await; tokio::time::sleep(FAULT_GRACE).await } => {},
            }
        };
        let serve = axum::serve(listener, router).with_graceful_shutdown(stop);
        let drained = async {
            liveness.failed().await;
            tokio::time::sleep(FAULT_GRACE + FAULT_DRAIN).await;
        };
        tokio::select! {
            r = serve => r?,
            () = drained => {},
        }
        if let Some(why) = liveness.fault() {
            return Err(std::io::Error::other(format!(
                "the engine failed: {why}; exiting non-zero so that a supervisor restarts this service"
            )));
        }
        tracing::info!("stopped");
        Ok(())
    })
}

/// What frames every service's routes: its OpenAPI title and description, the bearer key, the
/// body limit.
#[derive(Debug, Clone)]
pub struct Frame {
    pub title: &'static str,
    pub description: &'static str,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
}

/// Routes that need no key (liveness, metrics, the document itself).
pub const OPEN_ROUTES: [&str; 3] = ["/health", "/metrics", "/openapi.json"];

/// The document every service's routes start from: the error body every error answer refers to.
fn base_openapi() -> utoipa::openapi::OpenApi {
    #[derive(utoipa::OpenApi)]
    #[openapi(components(schemas(rl_core::wire::ErrorBody, rl_core::wire::ErrorDetail)))]
    struct Base;
    use utoipa::OpenApi as _;
    Base::openapi()
}

/// `GET /openapi.json`: this service's OpenAPI 3.1 document, derived from its routes and types.
#[utoipa::path(get, path = "/openapi.json", tag = "service", responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub async fn openapi_json(
    axum::Extension(doc): axum::Extension<Arc<serde_json::Value>>,
) -> axum::Json<serde_json::Value> {
    axum::Json((*doc).clone())
}

/// The router of a service: its documented `routes` (with `/openapi.json` added), the 404/405
/// fallbacks, the body limit, the key guard and request metrics around them; and the document,
/// with the error responses every operation can give, the bearer scheme when a key is set, and
/// `patch` applied to its JSON (runtime limits such as `--max-n` and the model's vocabulary, and
/// the rules between fields that the types cannot derive, see [`schema_of`]).
pub fn assemble<S: Clone + Send + Sync + 'static>(
    routes: utoipa_axum::router::OpenApiRouter<S>,
    state: S,
    metrics: Arc<crate::metrics::Metrics>,
    frame: Frame,
    patch: impl FnOnce(&mut serde_json::Value),
) -> (axum::Router, Arc<serde_json::Value>) {
    use utoipa::openapi::security::{
        HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    let (router, mut doc) = utoipa_axum::router::OpenApiRouter::with_openapi(base_openapi())
        .merge(routes)
        .routes(utoipa_axum::routes!(openapi_json))
        .split_for_parts();
    doc.info.title = frame.title.to_string();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.info.description = Some(frame.description.to_string());
    // The bearer scheme only when a key is set: a document must not ask for a key the server
    // does not check.
    let keyed = frame.api_key.is_some();
    if keyed {
        if let Some(c) = doc.components.as_mut() {
            c.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
        doc.security = Some(vec![SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
    for (path, item) in doc.paths.paths.iter_mut() {
        let open = OPEN_ROUTES.contains(&path.as_str());
        for op in [
            &mut item.get,
            &mut item.post,
            &mut item.delete,
            &mut item.put,
        ]
        .into_iter()
        .flatten()
        {
            add_error_responses(op, open, keyed);
        }
    }
    let mut doc = serde_json::to_value(&doc).unwrap_or_default();
    patch(&mut doc);
    let doc = Arc::new(doc);
    let key = ApiKey(frame.api_key.as_deref().map(Arc::from));
    let router = router
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::extract::DefaultBodyLimit::max(frame.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(key, require_key))
        .layer(axum::middleware::from_fn(crate::metrics::track))
        .layer(axum::Extension(metrics))
        .layer(axum::Extension(doc.clone()))
        .with_state(state);
    (router, doc)
}

/// The component schema `name` of a document (to patch), if it has one.
pub fn schema_of<'a>(
    doc: &'a mut serde_json::Value,
    name: &str,
) -> Option<&'a mut serde_json::Value> {
    doc.pointer_mut(&format!("/components/schemas/{name}"))
}

/// States a model's vocabulary in a document: every token id (`sampling::schema::TokenId`) is
/// below `vocab`, as the services' one check of a request (`model::Limits`) holds them.
pub fn limit_token_ids(doc: &mut serde_json::Value, vocab: usize) {
    if let Some(id) = schema_of(doc, "TokenId") {
        id["maximum"] = serde_json::json!(vocab.saturating_sub(1));
    }
}

/// The error answers an operation can give, each with the error body (401 only where a key is
/// checked: `keyed` and not an open route).
fn add_error_responses(op: &mut utoipa::openapi::path::Operation, open: bool, keyed: bool) {
    use utoipa::openapi::{Ref, ResponseBuilder};
    let mut add = |status: &str, why: &str| {
        let r = ResponseBuilder::new()
            .description(why)
            .content(
                "application/json",
                utoipa::openapi::ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build();
        op.responses
            .responses
            .entry(status.to_string())
            .or_insert(r.into());
    };
    if open {
        // No key needed, no body: only a failure of the server itself.
        if keyed {
            op.security = Some(vec![]);
        }
        add("500", "The server failed; the message says how");
        return;
    }
    if keyed {
        add("401", "Missing or wrong API key");
    }
    if op.request_body.is_some() {
        add("400", "The body is not valid JSON");
        add("413", "The body is over the server's limit");
        add(
            "422",
            "A field is wrong; the message names it and says what to send",
        );
    }
    add("500", "The server failed; the message says how");
    add(
        "503",
        "Busy (queue full) or shutting down; retry after the Retry-After header",
    );
}
