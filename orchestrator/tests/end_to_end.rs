//! `orchestrate` end to end through real processes and HTTP on the tiny model (with its character
//! tokenizer): a 3-iteration run; the same run crashed (abort) inside each phase and resumed,
//! ending with exactly the same rollouts, checkpoints and evals; a rollout server killed
//! mid-iteration and restarted; bad configs failing before any work.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn golden() -> PathBuf {
    std::env::var_os("GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/golden"))
}

/// The folder of the service binaries the orchestrator starts: beside `orchestrate`
/// (`cargo test --workspace` builds every binary of the workspace there), or
/// `ORCHESTRATE_BIN_DIR`. This test builds nothing: a binary that is missing, or older than a
/// source file it is built from, fails here, saying how to build it.
fn service_bins() -> PathBuf {
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

fn walk(dir: &Path) -> Vec<PathBuf> {
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
fn setup(dir: &Path, extra: &str) -> PathBuf {
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

fn orchestrate(bins: &Path, args: &[&str], failpoint: Option<&str>) -> std::process::Output {
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
struct Snapshot {
    phases: Vec<String>,
    keys: BTreeSet<(i64, i64, i64)>,
    tasks: Vec<String>,
    evals: Vec<String>,
}

/// Rows of `sql` on the database at `db` through sqlx, each row's columns joined by `|` (as the
/// `sqlite3` command line prints them). Columns are read as text.
fn query(db: &Path, sql: &'static str) -> Vec<String> {
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

fn snapshot(db: &Path) -> Snapshot {
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

#[test]
fn runs_resumes_after_crashes_in_every_phase_and_survives_a_killed_server() {
    let bins = service_bins();
    // Uninterrupted.
    let a = tempfile::tempdir().unwrap();
    let cfg = setup(a.path(), "");
    let out = orchestrate(&bins, &["run", cfg.to_str().unwrap()], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = a.path().join("run");
    for f in [
        "rollouts.sqlite",
        "config.yaml",
        "metrics.jsonl",
        "curves.png",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let png = std::fs::read(run.join("curves.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "curves.png is a drawn PNG"
    );
    if let Ok(keep) = std::env::var("KEEP_CURVES") {
        std::fs::copy(run.join("curves.png"), keep).unwrap();
    }
    for it in 0..3 {
        assert!(run
            .join(format!("checkpoints/iter_{it}/adapter_model.safetensors"))
            .exists());
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let kinds: Vec<String> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "iteration").count(), 3);
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["kind"] == "iteration" {
            // Every iteration of this config is evaluated, so all four phases are timed.
            for phase in ["sampling", "scoring_ref", "training", "evaluating"] {
                let s = v["seconds"][phase].as_f64();
                assert!(s.is_some_and(|s| s > 0.0), "{phase} time in {line}");
            }
        }
    }
    assert!(kinds.iter().any(|k| k == "step"));
    let whole = snapshot(&run.join("rollouts.sqlite"));
    assert_eq!(whole.phases, vec!["0|done", "1|done", "2|done"]);
    assert_eq!(
        whole.keys.len(),
        3 * 2 * 2,
        "3 iterations x 2 problems x 2 attempts"
    );
    assert_eq!(whole.evals, vec!["0|test|2", "1|test|2", "2|test|2"]);
    // `orchestrate eval` on the last checkpoint.
    let report = a.path().join("eval.json");
    let model = a.path().join("tiny");
    let ckpt = run.join("checkpoints/iter_2");
    let out = orchestrate(
        &bins,
        &[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            ckpt.to_str().unwrap(),
            "--limit",
            "2",
            "--output",
            report.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["n"], 2);
    assert_eq!(r["results"].as_array().map(Vec::len), Some(2));
    assert!(r["accuracy"]
        .as_f64()
        .is_some_and(|a| (0.0..=1.0).contains(&a)));
    assert!(r["adapter"].as_str().is_some_and(|a| a.ends_with("iter_2")));
    let status = orchestrate(&bins, &["status", run.to_str().unwrap()], None);
    assert!(status.status.success());
    assert!(String::from_utf8_lossy(&status.stdout).contains("latest checkpoint"));

    // `orchestrate export`: iteration 1's checkpoint merged into the base. The folder alone gives
    // the logprobs the rollout server recorded when it sampled iteration 2 with that checkpoint.
    let merged = a.path().join("merged");
    let run_s = run.to_str().unwrap();
    let out = orchestrate(
        &bins,
        &[
            "export",
            run_s,
            "--merge",
            merged.to_str().unwrap(),
            "--iteration",
            "1",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let engine =
        model::Engine::load(&merged, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let rows: Vec<serde_json::Value> = query(
        &run.join("rollouts.sqlite"),
        "SELECT json_object('prompt_ids', prompt_ids, 'completion_ids', completion_ids, \
         'logprobs', logprobs) FROM rollouts WHERE iteration = 2",
    )
    .iter()
    .map(|r| serde_json::from_str(r).unwrap())
    .collect();
    assert_eq!(rows.len(), 4);
    let field = |r: &serde_json::Value, k: &str| -> serde_json::Value {
        serde_json::from_str(r[k].as_str().unwrap()).unwrap()
    };
    let reqs: Vec<model::ScoreRequest> = rows
        .iter()
        .map(|r| model::ScoreRequest {
            prompt: serde_json::from_value(field(r, "prompt_ids")).unwrap(),
            completion: serde_json::from_value(field(r, "completion_ids")).unwrap(),
        })
        .collect();
    // The default train temperature (0.7): the sampler's logprobs are under logits / T.
    let scored = engine.score(&reqs, 0.7).unwrap();
    for (r, got) in rows.iter().zip(&scored) {
        let want: Vec<f32> = serde_json::from_value(field(r, "logprobs")).unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "merged {g} vs sampled {w}");
        }
    }
    let err = |args: &[&str]| {
        let out = orchestrate(&bins, args, None);
        assert!(!out.status.success(), "{args:?} fails");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let other = a.path().join("other");
    let other_s = other.to_str().unwrap();
    let e = err(&["export", run_s, "--merge", merged.to_str().unwrap()]);
    assert!(e.contains("already exists and is not empty"), "{e}");
    let e = err(&["export", run_s, "--merge", other_s, "--iteration", "7"]);
    assert!(
        e.contains("no checkpoint of iteration 7 (it has: 0, 1, 2)"),
        "{e}"
    );
    // A checkpoint changed after training is refused, not exported.
    let w = run.join("checkpoints/iter_0/adapter_model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    bytes.push(0);
    std::fs::write(&w, bytes).unwrap();
    let e = err(&["export", run_s, "--merge", other_s, "--iteration", "0"]);
    assert!(e.contains("does not match the sha256 recorded"), "{e}");
    assert!(!other.exists());

    // Crashed inside each phase (and a rollout server killed), resumed each time.
    let b = tempfile::tempdir().unwrap();
    let cfg = setup(b.path(), "");
    let run_b = b.path().join("run");
    for point in [
        "sampling:0",
        "scoring_ref:0",
        "training:1",
        "evaluating:1",
        "sampling:2",
    ] {
        let out = orchestrate(&bins, &["run", cfg.to_str().unwrap()], Some(point));
        assert!(
            !out.status.success(),
            "the failpoint {point} aborts the run"
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("aborting at {point}")));
        // The database is consistent after every crash.
        let check = query(&run_b.join("rollouts.sqlite"), "PRAGMA integrity_check");
        assert_eq!(check, ["ok"]);
    }
    let out = orchestrate(
        &bins,
        &["resume", run_b.to_str().unwrap()],
        Some("kill-rollout-server:2"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("killing the rollout server") && stderr.contains("restarting it"),
        "{stderr}"
    );
    let resumed = snapshot(&run_b.join("rollouts.sqlite"));
    assert_eq!(
        resumed, whole,
        "the crashed-and-resumed run has exactly the rows of the uninterrupted one"
    );
    for it in 0..3 {
        assert!(run_b
            .join(format!("checkpoints/iter_{it}/training_state.json"))
            .exists());
    }
    assert!(std::fs::read_dir(run_b.join("checkpoints"))
        .unwrap()
        .all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp-")));
}

#[test]
fn bad_configs_fail_before_any_work() {
    let bins = service_bins();
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["model.path=/nonexistent/model.gguf".into()],
            "`model.path`",
        ),
        (vec!["learner.rate=1".into()], "unknown key `rate`"),
    ];
    for (overrides, fragment) in cases {
        let mut args = vec!["run".to_string(), cfg.display().to_string()];
        args.extend(overrides);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = orchestrate(&bins, &args, None);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(fragment), "{err}");
        assert!(!dir.path().join("run").exists(), "nothing was created");
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = orchestrate(
        &bins,
        &[
            "run",
            cfg.to_str().unwrap(),
            &format!("services.rollout.port={port}"),
        ],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`services.rollout.port`") && err.contains("not free"),
        "{err}"
    );
    assert!(!dir.path().join("run").exists(), "nothing was created");
}

#[test]
fn an_unusable_device_fails_before_anything_is_created() {
    let bins = service_bins();
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orchestrate"));
    // A CPU-only build lacks the feature; a CUDA build is shown no GPU.
    cmd.args(["run", cfg.to_str().unwrap(), "model.device=cuda"])
        .env("ORCHESTRATE_BIN_DIR", &bins)
        .env("CUDA_VISIBLE_DEVICES", "");
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "cuda") {
        assert!(err.contains("no usable CUDA GPU"), "{err}");
    } else {
        assert!(
            err.contains("`model.device: cuda` needs CUDA")
                && err.contains("was built without it")
                && err.contains("--features cuda"),
            "{err}"
        );
    }
    assert!(!dir.path().join("run").exists(), "nothing was created");
    // `orchestrate eval` checks the same before it starts a server.
    let out = Command::new(env!("CARGO_BIN_EXE_orchestrate"))
        .args(["eval", "--model", "unused", "--output"])
        .arg(dir.path().join("eval.json"))
        .args(["--config", cfg.to_str().unwrap(), "model.device=cuda:0"])
        .env("ORCHESTRATE_BIN_DIR", &bins)
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`model.device: cuda:0`"), "{err}");
    assert!(!dir.path().join("eval.json").exists());
}
