//! `rl-http`: the HTTP kit the services (rollout-server, ref-scorer) and the orchestrator share.
//! [`server`]: the error type that maps to a status and OpenAI's error shape, the JSON extractor,
//! the key guard, fallbacks, graceful shutdown and the server runner (axum); [`client`]: the typed
//! client with its retry budget (reqwest; feature `client`, so servers do not compile it);
//! [`fuzz`]: bodies generated from a service's own OpenAPI document, sent to every operation
//! (feature `client`, for the tests); [`restart`]: what an engine fault must look like from
//! outside, checked the same way for both services (feature `client`, for the tests);
//! [`metrics`]: Prometheus text.
//!
//! It holds no domain logic (that is `rl-core`'s) and must never touch the rollout store or the
//! model: the learner, which serves nothing, does not depend on it.

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "client")]
pub mod fuzz;
pub mod metrics;
#[cfg(feature = "client")]
pub mod restart;
pub mod server;
