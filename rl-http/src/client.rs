//! A typed HTTP client for the rollout server and the ref-scorer (reqwest). It waits and retries
//! when a server answers 503 (honouring `Retry-After`: busy, not broken) and, when its policy
//! says so, when the server cannot be reached (one being started), up to a budget; any other
//! error comes back with the server's own message, a request past its deadline as
//! [`ClientError::Timeout`]. Requests are idempotent (sampling is seeded), so sending one again
//! never changes a result. Failures are retried in one place only: the caller that can restart
//! the service (the orchestrator's supervisor).

use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use rl_core::wire::{
    AdapterRequest, AdapterResponse, AdapterUpload, ErrorBody, GenerateRequest, GenerateResponse,
    Health, ScoreRequest, ScoreResponse, TokenizeRequest, TokenizeResponse,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{method} {url}: HTTP {status}: {message}")]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        message: String,
    },
    #[error("{method} {url}: {message}")]
    Transport {
        method: &'static str,
        url: String,
        message: String,
    },
    #[error("{method} {url}: no answer within the deadline of {deadline_s:.1} s")]
    Timeout {
        method: &'static str,
        url: String,
        deadline_s: f64,
    },
    /// The server is busy (503) and this client's retry budget is spent; `retry_after_s`: how
    /// long the server asked to wait.
    #[error("{method} {url}: HTTP 503 (busy; retry after {retry_after_s} s): {message}")]
    Busy {
        method: &'static str,
        url: String,
        retry_after_s: u64,
        message: String,
    },
    #[error("{method} {url}: gave up after {attempts} attempts in {waited_s:.1}s; last: {last}")]
    GaveUp {
        method: &'static str,
        url: String,
        attempts: u32,
        waited_s: f64,
        last: String,
    },
}

impl ClientError {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server refused the request itself (4xx): sending it again changes nothing.
    pub fn is_refusal(&self) -> bool {
        self.status().is_some_and(|s| (400..500).contains(&s))
    }

    /// The server did not answer within the deadline (it may be hung).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout { .. })
    }

    /// How long a busy server (503) asked to wait, when that is why the request failed.
    pub fn busy_for(&self) -> Option<Duration> {
        match self {
            ClientError::Busy { retry_after_s, .. } => Some(Duration::from_secs(*retry_after_s)),
            _ => None,
        }
    }
}

/// How long to keep trying a request that meets 503s or an unreachable server.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    /// Total time spent waiting between attempts.
    pub max_wait: Duration,
    /// Longest single wait (a larger `Retry-After` is capped to this).
    pub max_delay: Duration,
    /// Also retry when the server cannot be reached (waiting for one to start); otherwise that
    /// comes back to the caller at once.
    pub retry_unreachable: bool,
}

impl RetryPolicy {
    /// One attempt, no waiting: a 503 comes back as [`ClientError::Busy`] and an unreachable
    /// server as [`ClientError::Transport`], for a caller that retries itself.
    pub const ONCE: Self = Self {
        max_attempts: 1,
        max_wait: Duration::ZERO,
        max_delay: Duration::ZERO,
        retry_unreachable: false,
    };
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 100,
            max_wait: Duration::from_secs(600),
            max_delay: Duration::from_secs(10),
            retry_unreachable: true,
        }
    }
}

/// A client for one service at `base` (e.g. `http://127.0.0.1:8000`). Clones share one
/// connection pool (keep-alive).
#[derive(Clone)]
pub struct ServiceClient {
    base: String,
    http: reqwest::Client,
    api_key: Option<String>,
    retry: RetryPolicy,
    /// The deadline of one request (each attempt).
    timeout: Duration,
}

impl std::fmt::Debug for ServiceClient {
    /// Without the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceClient")
            .field("base", &self.base)
            .field("keyed", &self.api_key.is_some())
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl ServiceClient {
    /// `timeout` bounds one attempt (a long generation must fit in it; see `with_timeout`).
    pub fn new(
        base: &str,
        api_key: Option<String>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ClientError::Transport {
                method: "-",
                url: base.to_string(),
                message: format!("cannot build an HTTP client: {e}"),
            })?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            http,
            api_key,
            retry: RetryPolicy::default(),
            timeout,
        })
    }

    /// The same client (same connections) with another deadline per request.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        self.call::<(), _>(reqwest::Method::GET, "/health", None)
            .await
    }

    pub async fn generate(&self, req: &GenerateRequest) -> Result<GenerateResponse, ClientError> {
        self.call(reqwest::Method::POST, "/v1/generate", Some(req))
            .await
    }

    pub async fn tokenize(&self, req: &TokenizeRequest) -> Result<TokenizeResponse, ClientError> {
        self.call(reqwest::Method::POST, "/v1/tokenize", Some(req))
            .await
    }

    pub async fn score(&self, req: &ScoreRequest) -> Result<ScoreResponse, ClientError> {
        self.call(reqwest::Method::POST, "/v1/score", Some(req))
            .await
    }

    /// Has the server load the adapter folder `path` (inside its checkpoints directory) and
    /// answer with `id` for it (`None`: `path` as sent).
    pub async fn load_adapter(
        &self,
        path: &str,
        id: Option<&str>,
    ) -> Result<AdapterResponse, ClientError> {
        let req = AdapterRequest {
            path: path.to_string(),
            id: id.map(str::to_string),
        };
        self.call(reqwest::Method::POST, "/v1/adapters", Some(&req))
            .await
    }

    /// Sends a PEFT adapter as bytes (`PUT /v1/adapters/{name}`): its `adapter_config.json` and
    /// its weights file, with the sha256 the weights must have (the one a run recorded, so that
    /// bytes damaged on disk or on the way are refused); the server keeps it under `name` and
    /// serves it. For a server on another machine.
    pub async fn upload_adapter(
        &self,
        name: &str,
        config: serde_json::Value,
        weights: &[u8],
        sha256: &str,
    ) -> Result<AdapterResponse, ClientError> {
        use base64::Engine as _;
        let req = AdapterUpload {
            config,
            sha256: sha256.to_string(),
            weights_base64: base64::engine::general_purpose::STANDARD.encode(weights),
        };
        self.call(
            reqwest::Method::PUT,
            &format!("/v1/adapters/{name}"),
            Some(&req),
        )
        .await
    }

    pub async fn unload_adapter(&self) -> Result<AdapterResponse, ClientError> {
        self.call::<(), _>(reqwest::Method::DELETE, "/v1/adapters", None)
            .await
    }

    /// Sends a request, retrying 503s and connection failures within the retry budget.
    pub async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        let url = format!("{}{path}", self.base);
        let name: &'static str = match method {
            reqwest::Method::GET => "GET",
            reqwest::Method::DELETE => "DELETE",
            reqwest::Method::PUT => "PUT",
            _ => "POST",
        };
        let started = Instant::now();
        let mut waited = Duration::ZERO;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut rb = self
                .http
                .request(method.clone(), &url)
                .timeout(self.timeout);
            if let Some(k) = &self.api_key {
                rb = rb.bearer_auth(k);
            }
            if let Some(b) = body {
                rb = rb.json(b);
            }
            let (delay, last) = match rb.send().await {
                Ok(resp) if resp.status().is_success() => {
                    let bytes = resp.bytes().await.map_err(|e| {
                        if e.is_timeout() {
                            ClientError::Timeout {
                                method: name,
                                url: url.clone(),
                                deadline_s: self.timeout.as_secs_f64(),
                            }
                        } else {
                            ClientError::Transport {
                                method: name,
                                url: url.clone(),
                                message: format!("reading the response: {e}"),
                            }
                        }
                    })?;
                    return serde_json::from_slice(&bytes).map_err(|e| ClientError::Transport {
                        method: name,
                        url: url.clone(),
                        message: format!("the response is not the expected JSON: {e}"),
                    });
                }
                Ok(resp) => {
                    let status = resp.status();
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok());
                    let text = resp.text().await.unwrap_or_default();
                    let message = serde_json::from_str::<ErrorBody>(&text)
                        .map(|b| b.error.message)
                        .unwrap_or(text);
                    if status != reqwest::StatusCode::SERVICE_UNAVAILABLE {
                        return Err(ClientError::Status {
                            method: name,
                            url,
                            status: status.as_u16(),
                            message,
                        });
                    }
                    if attempt >= self.retry.max_attempts {
                        return Err(ClientError::Busy {
                            method: name,
                            url,
                            retry_after_s: retry_after.unwrap_or(1),
                            message,
                        });
                    }
                    let delay = Duration::from_secs(retry_after.unwrap_or(1));
                    (delay, format!("HTTP 503: {message}"))
                }
                Err(e) if e.is_timeout() => {
                    return Err(ClientError::Timeout {
                        method: name,
                        url,
                        deadline_s: self.timeout.as_secs_f64(),
                    })
                }
                Err(e) if !self.retry.retry_unreachable => {
                    return Err(ClientError::Transport {
                        method: name,
                        url,
                        message: format!("connection failed: {e}"),
                    })
                }
                Err(e) => {
                    // Unreachable (not started yet, restarting) or the connection dropped.
                    let backoff = Duration::from_millis(200 * u64::from(attempt.min(10)));
                    (backoff, format!("connection failed: {e}"))
                }
            };
            let delay = delay.min(self.retry.max_delay);
            if attempt >= self.retry.max_attempts || waited + delay > self.retry.max_wait {
                return Err(ClientError::GaveUp {
                    method: name,
                    url,
                    attempts: attempt,
                    waited_s: started.elapsed().as_secs_f64(),
                    last,
                });
            }
            tokio::time::sleep(delay).await;
            waited += delay;
        }
    }
}
