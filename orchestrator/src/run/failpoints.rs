//! Crash points for the crash-resume tests: `ORCHESTRATE_FAILPOINT=PHASE:ITERATION` aborts the
//! orchestrator (a real crash, no cleanup) at that point.

/// Environment variable naming a point where the orchestrator aborts (a real crash, for the
/// crash-resume tests): `PHASE:ITERATION`, e.g. `sampling:1` aborts right after the first group
/// of iteration 1 is stored; `kill-rollout-server:1` SIGKILLs the (first) rollout server instead
/// (with several, it is frozen from the start of the iteration's sampling, so that requests are
/// in flight on it when it dies); `stop-rollout-server:1` SIGSTOPs it (it never answers);
/// `overlap:1` aborts once iteration 1's learner runs and a group of iteration 2 is stored (with
/// `async.max_lag` >= 1 only: without overlap that moment never comes).
pub const FAILPOINT_ENV: &str = "ORCHESTRATE_FAILPOINT";

pub(super) fn failpoint(point: &str, iteration: u32) -> bool {
    std::env::var(FAILPOINT_ENV).is_ok_and(|v| v == format!("{point}:{iteration}"))
}

pub(super) fn crash_at(point: &str, iteration: u32) {
    if failpoint(point, iteration) {
        eprintln!("{FAILPOINT_ENV}: aborting at {point}:{iteration}");
        std::process::abort();
    }
}
