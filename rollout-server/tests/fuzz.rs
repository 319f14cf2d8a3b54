//! Thousands of generated bodies against every operation of the rollout server's own OpenAPI
//! document (`rl_http::fuzz`): no 5xx, no hang, no non-finite number answered, healthy after.
//! `FUZZ_CASES` (bodies per operation, default 400) and `FUZZ_SEED` (default 17) replay a run.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_bodies_never_break_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path());
    let checkpoints = dir.path().join("checkpoints");
    std::fs::create_dir_all(&checkpoints).unwrap();
    let server = start(
        load(&model),
        rollout_server::Options {
            checkpoints_dir: Some(checkpoints),
            api_key: Some("k".into()),
            max_n: 8,
            ..opts()
        },
    )
    .await;
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (cases, seed) = (env("FUZZ_CASES", 400) as usize, env("FUZZ_SEED", 17));
    let report = test_kit::fuzz::fuzz(
        &server.url,
        Some("k"),
        cases,
        seed,
        Duration::from_secs(120),
    )
    .await
    .unwrap();
    test_kit::record("TEST_COUNTS_FILE", &report.summary("rollout-server", seed));
    assert!(
        report.problems.is_empty(),
        "{} problems, first ones:\n{}",
        report.problems.len(),
        report
            .problems
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        report.per_operation.len() >= 9,
        "every operation: {:?}",
        report.per_operation
    );
    assert!(report.sent >= 2000, "thousands of requests");
    let ok = report.statuses.get(&200).copied().unwrap_or(0);
    assert!(
        ok > report.sent / 10,
        "enough bodies pass the checks to reach the engine: {ok}"
    );
}
