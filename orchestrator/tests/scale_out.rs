//! Scaling out, through real processes on the tiny model: several rollout servers and
//! ref-scorers used as one (one server SIGKILLed while it holds requests), and sampling that
//! overlaps training (`async.max_lag: 1`), crashed in the overlap and resumed. Each run is
//! compared field by field ([`common::assert_same_outcome`]) with an uninterrupted one.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::OnceLock;

use common::*;

/// An uninterrupted run of the tiny config with `overrides`, made once per test binary and key.
fn uninterrupted(overrides: &'static [&'static str]) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "");
    let mut args = vec!["run", cfg.to_str().unwrap()];
    args.extend(overrides);
    let out = orchestrate(&service_bins(), &args, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    outcome(&dir.path().join("run/rollouts.sqlite"))
}

/// The synchronous run on one rollout server and one ref-scorer.
fn synchronous() -> &'static Outcome {
    static RUN: OnceLock<Outcome> = OnceLock::new();
    RUN.get_or_init(|| uninterrupted(&[]))
}

#[test]
fn three_rollout_servers_one_sigkilled_while_it_holds_requests_sample_every_group_once() {
    let want = synchronous();
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "");
    // The first server is frozen when iteration 1's sampling begins (it takes the first
    // requests: the least loaded, lowest numbered), and SIGKILLed once another server's group is
    // stored, with its requests still in flight.
    let out = orchestrate(
        &service_bins(),
        &[
            "run",
            cfg.to_str().unwrap(),
            "services.rollout.replicas=3",
            "services.ref_scorer.replicas=2",
        ],
        Some("kill-rollout-server:1"),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    for says in [
        "rollout-server 3/3 started",
        "ref-scorer 2/2 started",
        "freezing the first rollout server",
        // Its requests were re-sent to the others...
        "rollout-server 1/3 failed (send 1 of 4)",
        // ...and it was started again.
        "rollout-server 1/3 exited (signal: 9",
    ] {
        assert!(log.contains(says), "`{says}` not in:\n{log}");
    }
    let resent = log
        .lines()
        .filter(|l| l.contains("rollout-server 1/3 failed (send 1 of 4)"))
        .count();
    let run = dir.path().join("run");
    let compared = assert_same_outcome(&outcome(&db(&run)), want);
    assert_store_sound(&run, 3, 2, 2);
    record(
        "TEST_COUNTS_FILE",
        &format!(
            "3 rollout servers + 2 ref-scorers, one server SIGKILLed holding {resent} request(s): \
             re-sent, restarted, {compared} rollouts equal to the one-server run"
        ),
    );
}

#[test]
fn overlapped_sampling_lags_one_version_and_resumes_exactly_after_a_kill_in_the_overlap() {
    static LAGGED: OnceLock<Outcome> = OnceLock::new();
    let want = LAGGED.get_or_init(|| uninterrupted(&["async.max_lag=1"]));
    // Iteration N is sampled with the checkpoint of N - 2: the base model for 0 and 1, iter_0
    // for 2 (the synchronous run samples 1 with iter_0 and 2 with iter_1).
    let adapters = |o: &Outcome| -> Vec<(i64, String)> {
        let mut v: Vec<(i64, String)> = o
            .rollouts
            .iter()
            .map(|(k, row)| (k.0, row.split('|').nth(7).unwrap().to_string()))
            .collect();
        v.dedup();
        v
    };
    assert_eq!(
        adapters(want),
        [(0, "(base)"), (1, "(base)"), (2, "iter_0")].map(|(i, a)| (i, a.to_string())),
        "the adapter of each iteration's rollouts with max_lag 1"
    );
    assert_eq!(
        adapters(synchronous()),
        [(0, "(base)"), (1, "iter_0"), (2, "iter_1")].map(|(i, a)| (i, a.to_string())),
        "and without overlap"
    );

    // Crashed (abort, children killed with it) while the learner trains iteration 1, once a group
    // of iteration 2 is stored (sampling 2 needs only iter_0).
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "");
    let cfg_s = cfg.to_str().unwrap();
    let bins = service_bins();
    let out = orchestrate(&bins, &["run", cfg_s, "async.max_lag=1"], Some("overlap:1"));
    assert!(!out.status.success(), "the failpoint aborts the run");
    let run = dir.path().join("run");
    let at_kill = query(
        &db(&run),
        "SELECT iteration, phase FROM iterations ORDER BY iteration",
    );
    assert_eq!(
        at_kill,
        ["0|done", "1|training", "2|sampling"],
        "killed in the overlap: iteration 1 training while 2 is sampled"
    );
    let out = orchestrate(&bins, &["resume", run.to_str().unwrap()], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let compared = assert_same_outcome(&outcome(&db(&run)), want);
    assert_store_sound(&run, 3, 2, 2);
    // Both sides' idle time is recorded per iteration.
    let idle = query(
        &db(&run),
        "SELECT DISTINCT side FROM idle_seconds ORDER BY side",
    );
    assert_eq!(idle, ["learner", "samplers"]);
    record(
        "TEST_COUNTS_FILE",
        &format!(
            "max_lag 1: adapters lag one version; killed while iteration 1 trained and 2 sampled, \
             resumed: {compared} rollouts equal to the uninterrupted overlapped run"
        ),
    );
}
