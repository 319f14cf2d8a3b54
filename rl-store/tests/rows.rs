//! Rows as they are read back: a file whose groups or rows were damaged by hand is an error
//! naming it, never a panic or a default; and each rollout and iteration keeps what made it.

mod common;

use common::*;
use rl_store::{Store, StoreError};
use sampling::{Knobs, MaxTokens, Temperature};
use sqlx::Connection;

#[tokio::test]
async fn open_refuses_a_file_with_a_partial_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rollouts.sqlite");
    // Someone deletes a row by hand: the group is no longer whole.
    edited_by_hand(
        &path,
        1,
        &["DELETE FROM rollouts WHERE group_index = 1 AND attempt = 2"],
    )
    .await;
    let e = Store::open(&path).await.expect_err("partial group");
    assert!(
        e.to_string()
            .contains("iteration 0 group 1 has 3 rollouts, not its 4 attempts"),
        "{e}"
    );
    let e = Store::open(&dir.path().join("absent.sqlite"))
        .await
        .expect_err("no file");
    assert!(e.to_string().contains("no such database"), "{e}");
}

#[tokio::test]
async fn malformed_rows_are_errors_naming_the_file_never_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rollouts.sqlite");
    // Hand edits the schema's checks let through: JSON of the wrong element type, a text where
    // an integer belongs.
    edited_by_hand(
        &path,
        0,
        &[
            "UPDATE rollouts SET logprobs = (SELECT json_group_array('x') FROM json_each(completion_ids)) \
             WHERE group_index = 0 AND attempt = 1",
            "UPDATE tasks SET seed = 'not a number' WHERE group_index = 1",
        ],
    )
    .await;
    let store = Store::open(&path).await.expect("the file itself is sound");
    let shown = path.display().to_string();
    let e = store
        .rollouts(0)
        .await
        .expect_err("a logprob that is a string");
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains(&shown), "{e}");
    let e = store
        .group(0, 0)
        .await
        .expect_err("the same row through another query");
    assert!(e.to_string().contains(&shown), "{e}");
    let e = store.tasks(0).await.expect_err("a seed that is text");
    assert!(e.to_string().contains(&shown), "{e}");
}

#[tokio::test]
async fn a_rollout_records_its_policy_version_and_sampling_parameters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rollouts.sqlite");
    edited_by_hand(&path, 1, &[]).await;
    let store = Store::open(&path).await.expect("open");
    let read = store.group(0, 1).await.expect("group 1");
    assert_eq!(
        read,
        group(1),
        "every field round-trips, the 64-bit seeds bit for bit"
    );
    assert_eq!(read[2].policy_version, Some(1));
    let s = read[2].sampling.expect("recorded");
    assert_eq!(
        (
            s.knobs.temperature.get(),
            s.knobs.top_p.get(),
            s.knobs.top_k,
            s.knobs.max_tokens.get()
        ),
        (0.5 + 1.0 / 64.0, 0.92, 3, 66)
    );
    assert_eq!(s.seed, u64::MAX - 12);
    store.close().await;

    // Readable as plain columns, and the migration's backfill of rows written before it: the
    // version from the adapter name they recorded.
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("raw");
    let row: (i64, f64, i64, i64) = sqlx::query_as(
        "SELECT policy_version, temperature, max_tokens, seed FROM rollouts WHERE attempt = 2",
    )
    .fetch_one(&mut conn)
    .await
    .expect("columns");
    assert_eq!(row, (1, 0.515625, 66, (u64::MAX - 12) as i64));
    sqlx::query("UPDATE rollouts SET policy_version = NULL")
        .execute(&mut conn)
        .await
        .expect("as before the migration");
    let migration = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../migrations/20261202000000_rollout_identity.sql"),
    )
    .expect("the migration");
    let backfill = &migration[migration.find("UPDATE rollouts").expect("its backfill")..];
    sqlx::query(sqlx::AssertSqlSafe(backfill.to_string()))
        .execute(&mut conn)
        .await
        .expect("backfill");
    let versions: Vec<Option<i64>> =
        sqlx::query_scalar("SELECT policy_version FROM rollouts ORDER BY attempt")
            .fetch_all(&mut conn)
            .await
            .expect("versions");
    assert_eq!(versions, vec![Some(1); ATTEMPTS as usize]);
    // Half a set of sampling parameters is damage, never a default.
    sqlx::query("UPDATE rollouts SET top_k = NULL WHERE attempt = 3")
        .execute(&mut conn)
        .await
        .expect("edit");
    conn.close().await.expect("close");
    let store = Store::open(&path).await.expect("open");
    let e = store.group(0, 1).await.expect_err("half a set");
    assert!(
        e.to_string()
            .contains("iteration 0 group 1 attempt 3: some sampling parameters are missing"),
        "{e}"
    );
}

/// The knobs an iteration samples with are fixed when it first asks: a later ask (a resume with
/// another config) gets the recorded ones back, a new iteration the new ones, and both are
/// readable as JSON in the row.
#[tokio::test]
async fn an_iteration_keeps_the_sampling_knobs_it_began_with() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rollouts.sqlite");
    let store = Store::create(&path, &spec()).await.expect("create");
    let knobs = |t: f64| Knobs {
        temperature: Temperature::new(t).expect("in range"),
        ..Knobs::plain(MaxTokens::of(64))
    };
    let e = store
        .sampling_knobs(0, knobs(0.7))
        .await
        .expect_err("no iteration");
    assert!(e.to_string().contains("iteration 0 does not exist"), "{e}");
    store
        .begin_iteration(0, ATTEMPTS, &tasks(2))
        .await
        .expect("0");
    assert_eq!(
        store.sampling_knobs(0, knobs(0.7)).await.expect("first"),
        knobs(0.7)
    );
    // Hotter and colder alike: the iteration keeps its own.
    for t in [1.2, 0.3] {
        assert_eq!(
            store.sampling_knobs(0, knobs(t)).await.expect("again"),
            knobs(0.7)
        );
    }
    store
        .begin_iteration(1, ATTEMPTS, &tasks(2))
        .await
        .expect("1");
    assert_eq!(
        store.sampling_knobs(1, knobs(1.2)).await.expect("new"),
        knobs(1.2)
    );
    store.close().await;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("raw");
    let t: Vec<f64> = sqlx::query_scalar(
        "SELECT json_extract(sampling, '$.temperature') FROM iterations ORDER BY iteration",
    )
    .fetch_all(&mut conn)
    .await
    .expect("json");
    assert_eq!(t, vec![0.7, 1.2]);
    // Knobs outside their rules in the file are damage, named.
    sqlx::query(
        "UPDATE iterations SET sampling = json_set(sampling, '$.top_p', 0) WHERE iteration = 1",
    )
    .execute(&mut conn)
    .await
    .expect("edit");
    conn.close().await.expect("close");
    let store = Store::open(&path).await.expect("open");
    let e = store
        .sampling_knobs(1, knobs(1.2))
        .await
        .expect_err("damaged");
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    assert!(
        e.to_string().contains("iteration 1: sampling knobs") && e.to_string().contains("is 0"),
        "{e}"
    );
}
