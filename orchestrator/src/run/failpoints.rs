//! Crash points for the crash-resume tests: `ORCHESTRATE_FAILPOINT=PHASE:ITERATION` aborts the
//! orchestrator (a real crash, no cleanup) at that point.

/// Environment variable naming a point where the orchestrator aborts (a real crash, for the
/// crash-resume tests): `PHASE:ITERATION`, e.g. `sampling:1` aborts right after the first group
/// of iteration 1 is stored; `kill-rollout-server:1` SIGKILLs the rollout server instead.
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
