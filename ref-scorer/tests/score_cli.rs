//! The offline `ref-scorer score` command run as a real process on the tiny model: its output
//! equals the engine's scores and the oracle's reference/policy logprobs; bad input lines and
//! paths fail with messages naming them and leave no output file.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

fn golden() -> PathBuf {
    match std::env::var_os("GOLDEN_DIR") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden"),
    }
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ref-scorer"))
        .args(args)
        .output()
        .unwrap()
}

fn fixture() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden().join("tiny_grpo_step.json")).unwrap())
        .unwrap()
}

fn write_input(dir: &std::path::Path) -> PathBuf {
    let g = fixture();
    let mut text = String::new();
    for (p, c) in g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(g["completions"].as_array().unwrap())
    {
        text.push_str(&serde_json::json!({"prompt_ids": p, "completion_ids": c}).to_string());
        text.push('\n');
    }
    let input = dir.join("in.jsonl");
    std::fs::write(&input, text).unwrap();
    input
}

fn read_output(path: &std::path::Path) -> Vec<Vec<f64>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

fn assert_matches(got: &[Vec<f64>], want: &serde_json::Value) {
    let want = want.as_array().unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        let w = w.as_array().unwrap();
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            assert!((a - b.as_f64().unwrap()).abs() < 1e-5, "{a} vs {b}");
        }
    }
}

#[test]
fn scores_reference_and_adapter_like_the_oracle() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_input(tmp.path());
    let model = golden().join("tiny_llama");
    let adapter = golden().join("tiny_adapter");
    for (name, extra, want) in [
        ("ref.jsonl", vec![], "ref_logp"),
        (
            "policy.jsonl",
            vec!["--adapter", adapter.to_str().unwrap()],
            "policy_logp",
        ),
    ] {
        let out = tmp.path().join(name);
        let mut args = vec!["score", "--model", model.to_str().unwrap()];
        args.extend(extra);
        args.extend([
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        let o = run(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_matches(&read_output(&out), &fixture()[want]);
    }
}

#[test]
fn bad_inputs_are_named_and_leave_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let model = golden().join("tiny_llama");
    let input = tmp.path().join("bad.jsonl");
    std::fs::write(&input, "{\"prompt_ids\":[1,2],\"completion_ids\":[3]}\n{\"prompt_ids\":[1,2],\"completion_ids\":[300]}\n").unwrap();
    let out = tmp.path().join("out.jsonl");
    let score = |model: &str| {
        run(&[
            "score",
            "--model",
            model,
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
    };
    let o = score(model.to_str().unwrap());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("bad.jsonl line 2: invalid request: `completion_ids` has token id 300"),
        "{err}"
    );
    assert!(!out.exists(), "a failed run must not leave an output file");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "no temporary file left behind"
    );

    std::fs::write(
        &input,
        "{\"prompt_ids\":[1,2],\"completion_ids\":[3]}\nnot json\n",
    )
    .unwrap();
    let o = score(model.to_str().unwrap());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("bad.jsonl line 2"),
        "{err}"
    );

    let o = score("/no/such/model");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("/no/such/model") && err.contains("not found"),
        "{err}"
    );
}
