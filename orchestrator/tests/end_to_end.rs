//! `orchestrate` end to end through real processes and HTTP on the tiny model (with its character
//! tokenizer): a 3-iteration run; the same run crashed (abort) inside each phase and resumed,
//! ending with exactly the same rollouts, checkpoints and evals; a rollout server killed
//! mid-iteration and restarted; a damaged checkpoint retrained on resume; bad configs failing
//! before any work. The harsher faults (SIGKILLs at random moments, a hung server, a full disk)
//! are in `chaos.rs`.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::process::Command;

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
    let whole_outcome = outcome(&run.join("rollouts.sqlite"));
    // Each rollout names the policy that sampled it: the base model, then the previous
    // iteration's checkpoint.
    assert_eq!(
        query(
            &run.join("rollouts.sqlite"),
            "SELECT DISTINCT iteration, ifnull(adapter, '(base)') FROM rollouts ORDER BY iteration"
        ),
        ["0|(base)", "1|iter_0", "2|iter_1"]
    );
    // And carries what made it: the policy version as an integer (the server echoed the
    // adapter id it was given, never a path), the knobs it was drawn with, and its own seed
    // (its group's task seed plus its attempt).
    assert_eq!(
        query(
            &run.join("rollouts.sqlite"),
            "SELECT DISTINCT iteration, ifnull(policy_version, '(base)'), temperature, top_p, \
             top_k, max_tokens FROM rollouts ORDER BY iteration"
        ),
        ["0|(base)|0.7|1.0|0|8", "1|0|0.7|1.0|0|8", "2|1|0.7|1.0|0|8"]
    );
    assert_eq!(
        query(
            &run.join("rollouts.sqlite"),
            "SELECT count(*) FROM rollouts r JOIN tasks t USING (run_id, iteration, group_index) \
             WHERE r.seed = t.seed + r.attempt AND ifnull(r.adapter, '') NOT LIKE '%/%'"
        ),
        ["12"]
    );
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
         'logprobs', logprobs, 'temperature', temperature) FROM rollouts WHERE iteration = 2",
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
        .map(|r| {
            let prompt = serde_json::from_value(field(r, "prompt_ids")).unwrap();
            let completion = serde_json::from_value(field(r, "completion_ids")).unwrap();
            model::ScoreRequest::new("row", prompt, completion, engine.limits()).unwrap()
        })
        .collect();
    // At the temperature each row recorded (the default train temperature, 0.7): the sampler's
    // logprobs are under logits / T.
    let t = rows[0]["temperature"].as_f64().unwrap();
    assert!(rows.iter().all(|r| r["temperature"].as_f64() == Some(t)));
    let scored = engine
        .score(&reqs, sampling::ScoreTemperature::new(t).unwrap())
        .unwrap();
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
    // A resume refuses it too: moved aside (kept), trained again, identical to the recorded one.
    let out = orchestrate(&bins, &["resume", run_s], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("does not match the sha256 recorded")
            && stderr.contains("training iteration 0 again")
            && stderr.contains("identical to the recorded one"),
        "{stderr}"
    );
    let aside: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("iter_0.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged checkpoint is kept aside");
    assert_same_outcome(&outcome(&run.join("rollouts.sqlite")), &whole_outcome);
    assert_store_sound(&run, 3, 2, 2);

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
    // And exactly their contents: ids, rewards, reference logprobs, checkpoints, evals.
    assert_same_outcome(&outcome(&run_b.join("rollouts.sqlite")), &whole_outcome);
    assert_store_sound(&run_b, 3, 2, 2);
    for it in 0..3 {
        assert!(run_b
            .join(format!("checkpoints/iter_{it}/training_state.json"))
            .exists());
    }
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
            err.contains("`model.device: cuda:0` needs CUDA")
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
