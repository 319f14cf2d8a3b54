//! Crash and kill points for the chaos tests, in builds with the `failpoints` feature only
//! (`cargo test` turns it on through the crate's dev-dependency on itself; `cargo build
//! --release` leaves it out, and then every hook here is empty and the variable is never read).
//!
//! `ORCHESTRATE_FAILPOINT=POINT:ITERATION` names one point:
//! - `sampling:N`, `scoring_ref:N`, `evaluating:N` abort the orchestrator (a real crash, no
//!   cleanup) right after the first group (or eval problem) of iteration `N` is stored, and
//!   `training:N` once iteration `N`'s learner has finished;
//! - `kill-rollout-server:N` SIGKILLs the (first) rollout server after the first group of
//!   iteration `N` is stored (with several servers, it is frozen from the start of the
//!   iteration's sampling, so that requests are in flight on it when it dies);
//! - `stop-rollout-server:N` SIGSTOPs it instead (it keeps its port and never answers);
//! - `overlap:N` aborts once iteration `N`'s learner runs and a group of iteration `N + 1` is
//!   stored (with `async.max_lag` >= 1 only: without overlap that moment never comes).
//!
//! Each run fires its kill or stop once.

#[cfg(not(feature = "failpoints"))]
use super::Run;

#[cfg(feature = "failpoints")]
mod on {
    use std::sync::atomic::{AtomicBool, Ordering};

    use rustix::process::{kill_process, Pid, Signal};

    use crate::run::Run;

    /// The environment variable naming the point.
    pub const FAILPOINT_ENV: &str = "ORCHESTRATE_FAILPOINT";

    /// Whether a kill point has fired in this run (each run fires one once).
    #[derive(Debug, Default)]
    pub struct Fired {
        killed: AtomicBool,
    }

    pub fn failpoint(point: &str, iteration: u32) -> bool {
        std::env::var(FAILPOINT_ENV).is_ok_and(|v| v == format!("{point}:{iteration}"))
    }

    pub fn crash_at(point: &str, iteration: u32) {
        if failpoint(point, iteration) {
            eprintln!("{FAILPOINT_ENV}: aborting at {point}:{iteration}");
            std::process::abort();
        }
    }

    impl Run {
        /// Sends `signal` to the first rollout server.
        async fn signal_rollout_server(&self, signal: Signal, doing: &str) {
            let Some(pid) = self.rollout.pid(0).await else {
                return;
            };
            tracing::warn!("{FAILPOINT_ENV}: {doing} the rollout server (pid {pid})");
            let sent = i32::try_from(pid)
                .ok()
                .and_then(Pid::from_raw)
                .map(|p| kill_process(p, signal));
            if let Some(Err(e)) = sent {
                tracing::warn!("{FAILPOINT_ENV}: signalling pid {pid} failed: {e}");
            }
        }

        pub(in crate::run) async fn before_sampling(&self, it: u32) {
            if self.rollout.len() > 1
                && failpoint("kill-rollout-server", it)
                && !self.fired.killed.load(Ordering::SeqCst)
            {
                // With several servers, the first is frozen now, so that it holds requests
                // when it is SIGKILLed (after another server's group is stored): they must be
                // re-sent to the others.
                self.signal_rollout_server(
                    Signal::STOP,
                    "freezing the first rollout server until a group is stored",
                )
                .await;
            }
        }

        pub(in crate::run) async fn after_group_stored(&self, it: u32) {
            crash_at("sampling", it);
            for (point, signal, doing) in [
                ("kill-rollout-server", Signal::KILL, "killing"),
                (
                    "stop-rollout-server",
                    Signal::STOP,
                    "stopping (SIGSTOP: it keeps its port and never answers)",
                ),
            ] {
                if failpoint(point, it) && !self.fired.killed.swap(true, Ordering::SeqCst) {
                    self.signal_rollout_server(signal, doing).await;
                }
            }
        }

        pub(in crate::run) async fn while_training(&self, it: u32) -> anyhow::Result<()> {
            if failpoint("overlap", it) {
                self.wait_for(|| async { Ok(!self.store.rollouts(it + 1).await?.is_empty()) })
                    .await?;
                crash_at("overlap", it);
            }
            Ok(())
        }
    }
}

#[cfg(feature = "failpoints")]
pub use on::{crash_at, Fired, FAILPOINT_ENV};

/// Without the feature: nothing.
#[cfg(not(feature = "failpoints"))]
pub fn crash_at(_point: &str, _iteration: u32) {}

#[cfg(not(feature = "failpoints"))]
impl Run {
    pub(super) async fn before_sampling(&self, _it: u32) {}

    pub(super) async fn after_group_stored(&self, _it: u32) {}

    pub(super) async fn while_training(&self, _it: u32) -> anyhow::Result<()> {
        Ok(())
    }
}
