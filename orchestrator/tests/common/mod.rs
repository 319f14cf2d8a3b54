//! What the end-to-end, chaos and fault tests of `orchestrate` share: the service binaries, a
//! tiny run (the golden tiny Llama with the character tokenizer, GSM8K-shaped data), running
//! `orchestrate`, reading the run's database, and the exact comparison of two runs' outcomes.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn golden() -> PathBuf {
    std::env::var_os("GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/golden"))
}

/// The folder of the service binaries the orchestrator starts: beside `orchestrate`
/// (`cargo test --workspace` builds every binary of the workspace there), or
/// `ORCHESTRATE_BIN_DIR`. This test builds nothing: a binary that is missing, or older than a
/// source file it is built from, fails here, saying how to build it.
pub fn service_bins() -> PathBuf {
    let dir = std::env::var_os("ORCHESTRATE_BIN_DIR").map_or_else(
        || {
            PathBuf::from(env!("CARGO_BIN_EXE_orchestrate"))
                .parent()
                .unwrap()
                .to_path_buf()
        },
        PathBuf::from,
    );
    let fix = "build them first: `cargo test --workspace` (or `cargo build --workspace --bins`)";
    let newest = |crates: &[&str]| {
        crates
            .iter()
            .flat_map(|c| walk(&repo().join(c).join("src")))
            .filter_map(|p| p.metadata().and_then(|m| m.modified()).ok())
            .max()
    };
    // Each binary with the workspace crates it is built from (its Cargo.toml's path
    // dependencies, and theirs).
    let engine = ["model", "sampling", "rl-core"];
    for (bin, crates) in [
        ("rollout-server", ["rollout-server", "rl-http"]),
        ("ref-scorer", ["ref-scorer", "rl-http"]),
        ("learner", ["learner", "rl-store"]),
    ] {
        let path = dir.join(bin);
        let built = path
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or_else(|_| panic!("{} is not built; {fix}", path.display()));
        let sources: Vec<&str> = crates.iter().chain(&engine).copied().collect();
        if std::env::var_os("ORCHESTRATE_BIN_DIR").is_none() {
            if let Some(src) = newest(&sources) {
                assert!(
                    built >= src,
                    "{} is older than its sources; {fix}",
                    path.display()
                );
            }
        }
    }
    dir
}

pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    entries
        .flatten()
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() {
                walk(&p)
            } else {
                vec![p]
            }
        })
        .collect()
}

/// A model folder (tiny Llama + character tokenizer), GSM8K-shaped data and a config.
pub fn setup(dir: &Path, extra: &str) -> PathBuf {
    let model = dir.join("tiny");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden().join("tiny_llama").join(f), model.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(
            repo().join("tests/fixtures/tiny_tokenizer").join(f),
            model.join(f),
        )
        .unwrap();
    }
    let rows: Vec<String> = (0..6)
        .map(|i| serde_json::json!({"question": format!("{i} + {i}?"), "answer": format!("#### {}", 2 * i), "idx": i}).to_string())
        .collect();
    std::fs::write(dir.join("train.jsonl"), rows.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("test.jsonl"), rows[..3].join("\n") + "\n").unwrap();
    // dtype f32, not the default bf16: the export check compares the sampler's logprobs with
    // an f32 merged model within 1e-4 (bf16 is held to its bounds by the engine's oracle suites).
    let config = format!(
        "output_dir: {run}\nseed: 3\nmax_iterations: 3\ntest_every_n_iterations: 1\n\
         model:\n  path: {model}\n  dtype: f32\ndata:\n  train: {train}\n  test: {test}\n  test_limit: 2\n\
         prompt:\n  style: boxed\n  system: \"\"\nattempts: 2\nproblems_per_iteration: 2\n\
         sampling:\n  train:\n    max_tokens: 8\n  test:\n    max_tokens: 8\n\
         lora:\n  r: 2\n  alpha: 4\n  targets: [q_proj, v_proj]\n\
         learner:\n  lr: 0.01\n  micro_batch: 2\n  filter_zero_variance: false\n\
         services:\n  rollout:\n    max_batch: 4\n  startup_timeout_s: 60\n{extra}",
        run = dir.join("run").display(),
        model = model.display(),
        train = dir.join("train.jsonl").display(),
        test = dir.join("test.jsonl").display(),
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    path
}

/// The database of the run in `run`.
pub fn db(run: &Path) -> PathBuf {
    run.join("rollouts.sqlite")
}

pub fn orchestrate(bins: &Path, args: &[&str], failpoint: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orchestrate"));
    cmd.args(args).env("ORCHESTRATE_BIN_DIR", bins);
    if let Some(f) = failpoint {
        cmd.env("ORCHESTRATE_FAILPOINT", f);
    }
    cmd.output().unwrap()
}

/// Everything a run leaves in its database, as comparable values: phases, rollout keys, tasks
/// with their seeds, evals.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    pub phases: Vec<String>,
    pub keys: BTreeSet<(i64, i64, i64)>,
    pub tasks: Vec<String>,
    pub evals: Vec<String>,
}

/// Rows of `sql` on the database at `db` through sqlx, each row's columns joined by `|` (as the
/// `sqlite3` command line prints them). Columns are read as text (reals as Rust shows them:
/// `0.7`, `1.0`).
pub fn query(db: &Path, sql: &'static str) -> Vec<String> {
    use sqlx::{Connection, Row};
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let rows = sqlx::query(sql).fetch_all(&mut conn).await.unwrap();
        let out = rows
            .iter()
            .map(|r| {
                (0..r.columns().len())
                    .map(|i| {
                        r.try_get::<String, _>(i)
                            .or_else(|_| r.try_get::<i64, _>(i).map(|v| v.to_string()))
                            .or_else(|_| r.try_get::<f64, _>(i).map(|v| format!("{v:?}")))
                            .unwrap()
                    })
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect();
        conn.close().await.unwrap();
        out
    })
}

pub fn snapshot(db: &Path) -> Snapshot {
    let q = |sql: &'static str| query(db, sql);
    let keys = q("SELECT iteration, group_index, attempt FROM rollouts")
        .iter()
        .map(|l| {
            let v: Vec<i64> = l.split('|').map(|x| x.parse().unwrap()).collect();
            (v[0], v[1], v[2])
        })
        .collect();
    Snapshot {
        phases: q("SELECT iteration, phase FROM iterations ORDER BY iteration"),
        keys,
        tasks: q("SELECT iteration, group_index, problem_index, seed FROM tasks ORDER BY iteration, group_index"),
        evals: q("SELECT iteration, split, n FROM evals ORDER BY iteration"),
    }
}

/// Sampler logprobs of the same rollout in two runs differ by at most this. The sampler batches
/// whatever requests are in flight together, and rows of different batches (a resumed group is
/// sampled with fewer neighbours, and even two uninterrupted runs batch by timing) sum in another
/// order: the engine's batching oracle (`model/tests/tiny.rs`, ragged batches against one by
/// one) holds it to 1e-5. Nothing downstream reads them for training (the learner recomputes
/// the old policy's logprobs itself), so every other field is compared exactly.
pub const SAMPLER_LOGPROB_TOLERANCE: f32 = 1e-5;

/// Everything a run produced, field by field.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    pub phases: Vec<String>,
    pub tasks: Vec<String>,
    /// Per rollout (iteration, group, attempt): prompt and completion ids, reward and its
    /// components, reference logprobs, finish reason, verdict, the adapter that sampled it and
    /// the text, exactly.
    pub rollouts: BTreeMap<(i64, i64, i64), String>,
    /// Per rollout, the sampler's logprobs (compared within [`SAMPLER_LOGPROB_TOLERANCE`]).
    pub sampler: BTreeMap<(i64, i64, i64), Vec<f32>>,
    /// `iteration|sha256` of each recorded checkpoint.
    pub checkpoints: Vec<String>,
    /// `iteration|split|n|accuracy|format_rate` of each eval.
    pub evals: Vec<String>,
    /// Each greedy eval answer.
    pub eval_answers: Vec<String>,
}

/// The outcome of the run whose database is `db`.
pub fn outcome(db: &Path) -> Outcome {
    let q = |sql: &'static str| query(db, sql);
    let key = |l: &str| -> ((i64, i64, i64), String) {
        let mut parts = l.splitn(4, '|');
        let mut n = || parts.next().unwrap().parse::<i64>().unwrap();
        let k = (n(), n(), n());
        (k, parts.next().unwrap().to_string())
    };
    let rollouts = q("SELECT iteration, group_index, attempt, prompt_ids || '|' || completion_ids || '|' || \
         printf('%.17g', reward) || '|' || reward_components || '|' || ref_logprobs || '|' || finish_reason \
         || '|' || answer_status || '|' || ifnull(adapter, '(base)') || '|' || text FROM rollouts")
    .iter()
    .map(|l| key(l))
    .collect();
    let sampler = q("SELECT iteration, group_index, attempt, logprobs FROM rollouts")
        .iter()
        .map(|l| {
            let (k, v) = key(l);
            (k, serde_json::from_str(&v).unwrap())
        })
        .collect();
    Outcome {
        phases: q("SELECT iteration, phase FROM iterations ORDER BY iteration"),
        tasks: q("SELECT iteration, group_index, problem_index, seed FROM tasks ORDER BY iteration, group_index"),
        rollouts,
        sampler,
        checkpoints: q("SELECT iteration, sha256 FROM checkpoints ORDER BY iteration"),
        evals: q("SELECT iteration, split, n, printf('%.17g', accuracy), printf('%.17g', format_rate) \
             FROM evals ORDER BY iteration, split"),
        eval_answers: q("SELECT iteration, split, problem_index, answer_status, solved, num_tokens, text \
             FROM eval_results ORDER BY iteration, split, problem_index"),
    }
}

/// Asserts that `got` (an interrupted run) ended where `want` (an uninterrupted one) did: every
/// field equal, the sampler's logprobs within [`SAMPLER_LOGPROB_TOLERANCE`]. Returns how many
/// rollouts were compared.
pub fn assert_same_outcome(got: &Outcome, want: &Outcome) -> usize {
    assert_eq!(got.phases, want.phases, "phases");
    assert_eq!(got.tasks, want.tasks, "tasks and their seeds");
    assert_eq!(
        got.rollouts.keys().collect::<Vec<_>>(),
        want.rollouts.keys().collect::<Vec<_>>(),
        "the same rollouts, none missing, none extra"
    );
    for (k, w) in &want.rollouts {
        assert_eq!(&got.rollouts[k], w, "rollout {k:?}");
    }
    for (k, w) in &want.sampler {
        let g = &got.sampler[k];
        assert_eq!(g.len(), w.len(), "rollout {k:?}: sampler logprobs");
        for (a, b) in g.iter().zip(w) {
            assert!(
                (a - b).abs() <= SAMPLER_LOGPROB_TOLERANCE,
                "rollout {k:?}: sampler logprob {a} vs {b}"
            );
        }
    }
    assert_eq!(
        got.checkpoints, want.checkpoints,
        "each checkpoint's sha256"
    );
    assert_eq!(
        got.evals, want.evals,
        "eval accuracy and format rate per iteration"
    );
    assert_eq!(
        got.eval_answers, want.eval_answers,
        "each greedy eval answer"
    );
    want.rollouts.len()
}

/// The run's store invariants: SQLite's integrity check, every group complete (`attempts` rows),
/// no rollout twice, exactly one checkpoint folder per recorded iteration and nothing partial.
pub fn assert_store_sound(run: &Path, iterations: usize, groups: usize, attempts: usize) {
    let db = run.join("rollouts.sqlite");
    assert_eq!(query(&db, "PRAGMA integrity_check"), ["ok"]);
    let per_group = query(
        &db,
        "SELECT COUNT(*), COUNT(DISTINCT attempt) FROM rollouts GROUP BY iteration, group_index",
    );
    assert_eq!(
        per_group.len(),
        iterations * groups,
        "every group sampled once"
    );
    for g in per_group {
        assert_eq!(
            g,
            format!("{attempts}|{attempts}"),
            "a complete group, no duplicate"
        );
    }
    let recorded = query(&db, "SELECT iteration FROM checkpoints ORDER BY iteration");
    assert_eq!(recorded.len(), iterations, "one checkpoint per iteration");
    let mut folders: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.contains(".damaged-"))
        .collect();
    folders.sort();
    let mut want: Vec<String> = (0..iterations).map(|i| format!("iter_{i}")).collect();
    want.sort();
    assert_eq!(
        folders, want,
        "one finished checkpoint folder per iteration, no partial one"
    );
}

pub use test_kit::record;

/// Says that `test` checked nothing on this machine and why (`TEST_SKIPS_FILE`).
pub fn skipped(test: &str, reason: &str) {
    record("TEST_SKIPS_FILE", &format!("SKIPPED {test}: {reason}"));
}
