//! Supervision of the services (rollout servers, ref-scorers): spawn each child from the same
//! build, read the address it prints (`listening on http://ADDR`), wait for `/health`, restart it
//! when it has died or hangs, stop it with SIGTERM (then SIGKILL) at the end. Children are
//! started with `--parent-pid` (the kernel's parent-death signal), so a killed orchestrator, even
//! SIGKILLed, leaves no orphan behind; their bearer key reaches them through the environment,
//! never their command line (which `ps` shows every local user).
//!
//! A [`Service`] is one process (or someone else's endpoint) with one HTTP client (one
//! connection pool, kept alive) for its current address. A [`Pool`] is the replicas of one
//! service used as one, and [`Pool::call`] is the one place a failed request is sent again
//! (clients make one attempt each): each send goes to the least-loaded member (fewest requests
//! in flight), with a deadline derived from the request's size. A busy member (503 with
//! `Retry-After`) is waited out or passed over without counting as a failure; a member that died,
//! answered 5xx or missed the deadline is restarted when this run started it (a hung one killed
//! first), or left alone for a growing backoff when it is someone else's
//! (`services.*.endpoints`), and the request goes to another member, `max_attempts` sends at
//! most. Rollout servers serve the adapter the pool was told to serve; a member that is not
//! known to serve it (just restarted, or a swap that failed) gets it before its next request.
//! Adapters travel as bytes with the sha256 the run recorded (`PUT /v1/adapters/{name}`, the
//! name being the adapter id the server answers with), so a server on another machine needs no
//! shared file system.

mod pool;
mod service;

use std::path::PathBuf;

use rl_core::config::ApiKey;

pub use pool::Pool;
pub use service::Service;

/// How to start a child service.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Its compute threads (`RAYON_NUM_THREADS`; `None`: all cores), unless the user set
    /// `RAYON_NUM_THREADS` for the whole run.
    pub threads: Option<usize>,
    /// The variable its bearer key is given in, and the key (through the environment, which
    /// other users cannot read, not the command line, which `ps` shows).
    pub key: Option<(&'static str, ApiKey)>,
}

/// A checkpoint's adapter as a service is told to serve it: its name (`iter_N`, the adapter id
/// the server answers with), its folder here, and the sha256 of its weights the run recorded
/// (the server checks the bytes against it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    pub name: String,
    pub dir: PathBuf,
    pub sha256: String,
}
