//! What the learner trains an iteration on: the rollouts as their rows say they were made (the
//! temperature and the policy version read from the database, never the run config), and never
//! an iteration whose rows disagree on either.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

/// The temperature the rows recorded wins over the config's; a mixed iteration (two
/// temperatures, or two policies) is refused, naming a row of each.
#[tokio::test]
async fn an_iteration_is_trained_as_its_rows_were_drawn_and_never_mixed() {
    let dir = tempfile::tempdir().unwrap();
    let store = make_db_drawn(&dir.path().join("r.sqlite"), 3, |it, g| match (it, g) {
        // Iteration 0: every group at 0.5, by the base model.
        (0, _) => (None, 0.5),
        // Iteration 1: group 1 drawn hotter than group 0.
        (1, 0) => (Some(0), 0.5),
        (1, _) => (Some(0), 1.3),
        // Iteration 2: group 1 by another policy.
        (2, 0) => (Some(1), 0.5),
        _ => (Some(0), 0.5),
    })
    .await;
    // The config says 1.0; the rows say 0.5.
    let batch = learner::load_batch(&store, 0, 0, config_temperature())
        .await
        .unwrap();
    assert_eq!(batch.temperature, st(0.5));
    assert_eq!(batch.policy_version, None);
    let e = learner::load_batch(&store, 1, 0, config_temperature())
        .await
        .unwrap_err()
        .to_string();
    for says in [
        "iteration 1 group 0 attempt 0 was drawn with temperature 0.5, top_p 1, top_k 0, max_tokens 6",
        "iteration 1 group 1 attempt 0 with temperature 1.3",
        "one set of sampling parameters only",
    ] {
        assert!(e.contains(says), "`{says}` not in: {e}");
    }
    let e = learner::load_batch(&store, 2, 1, config_temperature())
        .await
        .unwrap_err()
        .to_string();
    for says in [
        "iteration 2 group 0 attempt 0 was sampled with the checkpoint of iteration 1",
        "group 1 attempt 0 with the checkpoint of iteration 0",
        "one policy's rollouts only",
    ] {
        assert!(e.contains(says), "`{says}` not in: {e}");
    }
}
