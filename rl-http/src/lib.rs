//! `rl-http`: the HTTP kit the services (rollout-server, ref-scorer) and the orchestrator share.
//! [`server`]: the error type that maps to a status and OpenAI's error shape, the JSON extractor,
//! the key guard, fallbacks, graceful shutdown and the server runner (axum); [`client`]: the typed
//! client with its retry budget (reqwest; feature `client`, so servers do not compile it);
//! [`metrics`]: Prometheus text. The tests' machinery (fuzzer, contract and fault checks) is in
//! `test-kit`, which nothing shipped depends on.
//!
//! It holds no domain logic (that is `rl-core`'s) and must never touch the rollout store or the
//! model: the learner, which serves nothing, does not depend on it.

#[cfg(feature = "client")]
pub mod client;
pub mod metrics;
pub mod server;
