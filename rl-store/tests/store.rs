//! The rollout store on a real SQLite file: concurrent group writers, a writer dropped in the
//! middle of its transaction, reopen, integrity, resume queries, and the `sqlite3` command line.

use std::path::Path;
use std::time::Duration;

use rl_core::rewards::AnswerStatus;
use rl_core::wire::FinishReason;
use rl_store::{CheckpointRecord, EvalResult, IdleSide, Phase, Store, StoreError, TrainMetrics};
use sqlx::Connection;

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_and_an_aborted_one_leave_only_whole_groups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rollouts.sqlite");
    let store = Store::create(&path, &spec()).await.expect("create");
    store
        .begin_iteration(0, ATTEMPTS, &tasks(16))
        .await
        .expect("iteration 0");

    // Groups 0..10 from ten concurrent tasks.
    let mut writers = Vec::new();
    for g in 0..10 {
        let s = store.clone();
        writers.push(tokio::spawn(async move {
            s.insert_group(0, g, &group(g)).await
        }));
    }
    // Group 10: a writer that stops half way, holding its transaction, and is aborted.
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let s = store.clone();
    let stuck = tokio::spawn(async move {
        let mut w = s.begin_group(0, 10).await.expect("begin group 10");
        for r in &group(10)[..2] {
            w.add(r).await.expect("add");
        }
        started_tx.send(()).ok();
        std::future::pending::<()>().await;
        w.commit().await
    });
    started_rx.await.expect("the stuck writer started");
    stuck.abort();
    assert!(stuck.await.expect_err("aborted").is_cancelled());
    // Groups 11..14: writers aborted at arbitrary points; each group is whole or absent.
    let mut racing = Vec::new();
    for g in 11..14 {
        let s = store.clone();
        racing.push(tokio::spawn(async move {
            s.insert_group(0, g, &group(g)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(2)).await;
    for h in &racing {
        h.abort();
    }
    for w in writers {
        w.await.expect("join").expect("group written");
    }
    for h in racing {
        let _ = h.await; // finished or cancelled, both fine
    }
    // A writer that commits without all its attempts writes nothing.
    let mut partial = store.begin_group(0, 14).await.expect("begin 14");
    partial.add(&rollout(14, 0)).await.expect("add");
    let e = partial.commit().await.expect_err("incomplete group");
    assert!(e.to_string().contains("1 of 4 attempts written"), "{e}");
    store.close().await;

    // Reopen: integrity checks pass, committed groups are whole and exact, the rest are missing.
    let store = Store::open(&path).await.expect("reopen");
    let missing = store.missing_groups(0).await.expect("missing");
    let present: Vec<u32> = (0..16).filter(|g| !missing.contains(g)).collect();
    assert!((0..10).all(|g| present.contains(&g)), "missing {missing:?}");
    assert!(
        missing.contains(&10) && missing.contains(&14) && missing.contains(&15),
        "{missing:?}"
    );
    for g in &present {
        assert_eq!(
            store.group(0, *g).await.expect("group"),
            group(*g),
            "group {g}"
        );
    }
    let all = store.rollouts(0).await.expect("rollouts");
    assert_eq!(all.len(), present.len() * ATTEMPTS as usize);
    assert_eq!(store.unscored_groups(0).await.expect("unscored"), present);
    assert_eq!(store.run().await.expect("run").spec, spec());
    assert_eq!(
        store
            .resume_point()
            .await
            .expect("resume")
            .map(|s| (s.iteration, s.phase)),
        Some((0, Phase::Sampling))
    );

    // The missing groups are exactly what a resume samples; after that the phase can advance.
    for g in &missing {
        store
            .insert_group(0, *g, &group(*g))
            .await
            .expect("resume group");
    }
    assert!(store
        .missing_groups(0)
        .await
        .expect("none missing")
        .is_empty());
    store.close().await;

    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("raw connection");
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await
        .expect("pragma");
    assert_eq!(check, "ok");
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .expect("pragma");
    assert_eq!(journal, "wal");
    conn.close().await.expect("close");
}

#[tokio::test]
async fn phases_ref_scoring_checkpoints_evals_and_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rollouts.sqlite");
    let store = Store::create(&path, &spec()).await.expect("create");
    assert!(store.resume_point().await.expect("empty").is_none());
    let e = store
        .begin_iteration(1, ATTEMPTS, &tasks(2))
        .await
        .expect_err("iteration 1 before 0");
    assert!(e.to_string().contains("the next one is 0"), "{e}");
    store
        .begin_iteration(0, ATTEMPTS, &tasks(2))
        .await
        .expect("iteration 0");
    // Beginning it again with the same problems is a resume; with others, an error.
    store
        .begin_iteration(0, ATTEMPTS, &tasks(2))
        .await
        .expect("idempotent");
    let e = store
        .begin_iteration(0, ATTEMPTS, &tasks(3))
        .await
        .expect_err("other tasks");
    assert!(
        e.to_string().contains("already exists with other problems"),
        "{e}"
    );

    store.insert_group(0, 0, &group(0)).await.expect("group 0");
    let mut bad = group(1);
    bad[2].logprobs[0] = f32::NAN;
    let e = store.insert_group(0, 1, &bad).await.expect_err("NaN");
    assert!(
        e.to_string().contains("attempt 2 logprobs: value 0 is NaN"),
        "{e}"
    );
    let mut bad = group(1);
    bad[1].logprobs.pop();
    let e = store
        .insert_group(0, 1, &bad)
        .await
        .expect_err("short logprobs");
    assert!(e.to_string().contains("values for"), "{e}");
    assert_eq!(store.missing_groups(0).await.expect("missing"), vec![1]);
    store.insert_group(0, 1, &group(1)).await.expect("group 1");
    let e = store
        .insert_group(0, 1, &group(1))
        .await
        .expect_err("duplicate group");
    assert!(e.to_string().contains("already stored"), "{e}");

    store.set_phase(0, Phase::ScoringRef).await.expect("phase");
    // Reference logprobs: lengths are checked, then the group is annotated in one transaction.
    let lens: Vec<usize> = group(0).iter().map(|r| r.completion_ids.len()).collect();
    let mut refs: Vec<Vec<f32>> = lens.iter().map(|&n| vec![-0.25; n]).collect();
    refs[3].pop();
    let e = store
        .set_ref_logprobs(0, 0, &refs)
        .await
        .expect_err("short list");
    assert!(
        e.to_string().contains("attempt 3 reference logprobs"),
        "{e}"
    );
    refs[3].push(-0.25);
    store
        .set_ref_logprobs(0, 0, &refs)
        .await
        .expect("ref logprobs");
    assert_eq!(store.unscored_groups(0).await.expect("unscored"), vec![1]);
    assert_eq!(
        store.group(0, 0).await.expect("g0")[3]
            .ref_logprobs
            .as_deref(),
        Some(&refs[3][..])
    );

    // Training cannot be recorded while a group lacks reference logprobs: reopen would refuse.
    store.set_phase(0, Phase::Training).await.expect("phase");
    store.close().await;
    let e = Store::open(&path)
        .await
        .expect_err("unscored group at training");
    assert!(
        matches!(e, StoreError::Corrupt { .. }) && e.to_string().contains("no reference logprobs"),
        "{e}"
    );
    // The store offers no repair of an inconsistent file; the rest uses a fresh one.
    let path = dir.path().join("second.sqlite");
    let store = Store::create(&path, &spec()).await.expect("create");
    let e = Store::create(&path, &spec())
        .await
        .expect_err("second run in one file");
    assert!(e.to_string().contains("already holds a run"), "{e}");
    store
        .begin_iteration(0, ATTEMPTS, &tasks(1))
        .await
        .expect("iteration");
    store.insert_group(0, 0, &group(0)).await.expect("group");
    store
        .finish_phase(0, Phase::ScoringRef, 12.5)
        .await
        .expect("phase");
    store.set_ref_logprobs(0, 0, &refs).await.expect("refs");
    store
        .finish_phase(0, Phase::Training, 3.25)
        .await
        .expect("phase");
    // Each finished phase's time is recorded under the phase it ends.
    let times = store.phase_seconds(0).await.expect("times");
    assert_eq!(
        times.into_iter().collect::<Vec<_>>(),
        vec![
            ("sampling".to_string(), 12.5),
            ("scoring_ref".to_string(), 3.25)
        ]
    );
    let e = store
        .set_phase(0, Phase::Sampling)
        .await
        .expect_err("backwards");
    assert!(e.to_string().contains("cannot go back"), "{e}");

    let metrics = TrainMetrics {
        step: 1,
        loss: 0.5,
        mean_kl: 0.01,
        clip_fraction: 0.0,
        grad_norm: 1.5,
        lr: 1e-4,
        reward_mean: -0.5,
        reward_std: 0.8,
        zero_std_fraction: 0.25,
        completion_len: 120.0,
        tokens_per_s: 300.0,
        sampler_mismatch_mean: Some(2e-6),
        sampler_mismatch_max: Some(3e-5),
        tis_clip_fraction: None,
    };
    store
        .insert_train_metrics(0, &metrics)
        .await
        .expect("metrics");
    assert_eq!(store.train_metrics(0).await.expect("read"), vec![metrics]);
    // Idle times add up across resumes, per side.
    for (side, s) in [
        (IdleSide::Learner, 1.5),
        (IdleSide::Samplers, 0.25),
        (IdleSide::Learner, 2.0),
    ] {
        store.add_idle_seconds(0, side, s).await.expect("idle");
    }
    let idle = store.idle_seconds(0).await.expect("read idle");
    assert_eq!(
        idle.into_iter().collect::<Vec<_>>(),
        vec![("learner".to_string(), 3.5), ("samplers".to_string(), 0.25)]
    );
    let ckpt = CheckpointRecord {
        iteration: 0,
        path: "checkpoints/iter_0".into(),
        sha256: "ab".repeat(32),
    };
    store.record_checkpoint(&ckpt).await.expect("checkpoint");
    assert_eq!(store.checkpoints().await.expect("read"), vec![ckpt]);

    store.set_phase(0, Phase::Evaluating).await.expect("phase");
    for (i, solved) in [true, false, false, true].into_iter().enumerate() {
        let r = EvalResult {
            problem_index: i as u64,
            text: "\\boxed{1}".into(),
            answer: Some("1".into()),
            answer_status: if solved {
                AnswerStatus::Correct
            } else {
                AnswerStatus::Wrong
            },
            finish_reason: FinishReason::Stop,
            solved,
            formatted: i != 2,
            num_tokens: 10 * (i as u32 + 1),
        };
        store
            .insert_eval_result(0, "test", &r)
            .await
            .expect("eval result");
        // Redoing a problem after a crash replaces it instead of counting it twice.
        store
            .insert_eval_result(0, "test", &r)
            .await
            .expect("eval result again");
    }
    assert_eq!(
        store.eval_results(0, "test").await.expect("results").len(),
        4
    );
    let summary = store.finish_eval(0, "test").await.expect("summary");
    assert_eq!(
        (
            summary.n,
            summary.accuracy,
            summary.format_rate,
            summary.mean_tokens
        ),
        (4, 0.5, 0.75, 25.0)
    );
    assert_eq!(store.evals().await.expect("evals"), vec![summary]);
    store.set_phase(0, Phase::Done).await.expect("done");
    store.close().await;
    let store = Store::open(&path).await.expect("reopen");
    assert_eq!(
        store.resume_point().await.expect("resume").map(|s| s.phase),
        Some(Phase::Done)
    );
    store.close().await;
    assert_readable_with_sqlite3(&path).await;
}

/// The README's query, through a plain sqlx connection (no `Store`), and by the real `sqlite3`
/// command line too when it is installed.
async fn assert_readable_with_sqlite3(path: &Path) {
    const QUERY: &str = "SELECT iteration, group_index, COUNT(*), ROUND(AVG(reward), 3), \
         SUM(json_array_length(completion_ids)) FROM rollouts GROUP BY iteration, group_index;";
    let expected_tokens: usize = group(0).iter().map(|r| r.completion_ids.len()).sum();
    let expected = format!("0|0|4|-0.5|{expected_tokens}");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("raw");
    let (it, g, n, avg, tokens): (i64, i64, i64, f64, i64) = sqlx::query_as(QUERY)
        .fetch_one(&mut conn)
        .await
        .expect("query");
    conn.close().await.expect("close");
    assert_eq!(format!("{it}|{g}|{n}|{avg}|{tokens}"), expected);
    match std::process::Command::new("sqlite3")
        .arg(path)
        .arg(QUERY)
        .output()
    {
        Ok(out) => {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
        }
        Err(e) => {
            eprintln!("the sqlite3 command line is not here ({e}): checked through sqlx only")
        }
    }
}
