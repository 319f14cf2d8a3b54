//! The ref-scorer service as a real process on 127.0.0.1 with the tiny model: `POST /v1/score`
//! equals the offline `score` command on the same input (and the oracle), the typed client works,
//! and bad inputs get their status and message.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use rl_core::wire::{ScoreRequest, ScoreSequence};
use rl_http::client::ServiceClient;
use sampling::ScoreTemperature;
use serde_json::json;
use test_kit::restart::{check_engine_fault, Fault};

fn golden() -> PathBuf {
    match std::env::var_os("GOLDEN_DIR") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden"),
    }
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(extra: &[&str]) -> (Child, String) {
    serve_env(extra, &[])
}

fn serve_env(extra: &[&str], env: &[(&str, &str)]) -> (Child, String) {
    let model = golden().join("tiny_llama").display().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ref-scorer"))
        .args(["--model", &model, "--port", "0"])
        .args(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    (Child(child), url)
}

fn sequences() -> Vec<ScoreSequence> {
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden().join("tiny_grpo_step.json")).unwrap(),
    )
    .unwrap();
    g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(g["completions"].as_array().unwrap())
        .map(|(p, c)| ScoreSequence {
            prompt_ids: serde_json::from_value(p.clone()).unwrap(),
            completion_ids: serde_json::from_value(c.clone()).unwrap(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_scores_equal_the_offline_command() {
    let dir = tempfile::tempdir().unwrap();
    let seqs = sequences();
    let input = dir.path().join("in.jsonl");
    let lines: Vec<String> = seqs
        .iter()
        .map(|s| serde_json::to_string(s).unwrap())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let output = dir.path().join("out.jsonl");
    let model = golden().join("tiny_llama").display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_ref-scorer"))
        .args(["score", "--model", &model, "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let offline: Vec<Vec<f32>> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<rl_core::wire::SequenceLogprobs>(l)
                .unwrap()
                .logprobs
        })
        .collect();

    let (_child, url) = serve(&[]);
    let client = ServiceClient::new(&url, None, Duration::from_secs(60)).unwrap();
    let health = client.health().await.unwrap();
    assert_eq!(
        (health.status.as_str(), health.model.as_str()),
        ("ok", "tiny_llama")
    );
    let response = client
        .score(&ScoreRequest {
            sequences: seqs.clone(),
            temperature: ScoreTemperature::ONE,
        })
        .await
        .unwrap();
    let online: Vec<Vec<f32>> = response.results.into_iter().map(|r| r.logprobs).collect();
    assert_eq!(
        online, offline,
        "the service and the offline command give the same numbers"
    );
    // And both are the oracle's reference logprobs.
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden().join("tiny_grpo_step.json")).unwrap(),
    )
    .unwrap();
    for (got, want) in online.iter().zip(g["ref_logp"].as_array().unwrap()) {
        for (a, b) in got.iter().zip(want.as_array().unwrap()) {
            assert!((f64::from(*a) - b.as_f64().unwrap()).abs() < 1e-5);
        }
    }
    // Temperature divides the logits: a different answer, same shape.
    let hot = client
        .score(&ScoreRequest {
            sequences: seqs.clone(),
            temperature: ScoreTemperature::new(2.0).unwrap(),
        })
        .await
        .unwrap();
    assert_eq!(hot.results.len(), seqs.len());
    assert_ne!(hot.results[0].logprobs, online[0]);

    let http = reqwest::Client::new();
    let (_, metrics) = (
        0,
        http.get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert!(metrics.contains("scorer_sequences_total"), "{metrics}");
    // The document is derived from the router: every documented operation answers, no other
    // method does.
    let (doc, problems) = test_kit::contract::check_contract(&url, None)
        .await
        .unwrap();
    assert!(problems.is_empty(), "{problems:#?}");
    for (method, path) in [
        ("post", "/v1/score"),
        ("get", "/health"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
    }
    let request = &doc["components"]["schemas"]["ScoreRequest"];
    assert_eq!(request["additionalProperties"], false, "{request}");
    assert_eq!(
        request["properties"]["sequences"]["minItems"], 1,
        "{request}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_their_status_and_message() {
    let (_child, url) = serve(&["--api-key", "k", "--max-body-bytes", "2048"]);
    let http = reqwest::Client::new();
    let ok = json!({"sequences": [{"prompt_ids": [1, 5], "completion_ids": [6, 7]}]});
    let cases: Vec<(&str, String, Option<&str>, u16, &str)> = vec![
        ("missing key", ok.to_string(), None, 401, "missing API key"),
        ("wrong key", ok.to_string(), Some("x"), 401, "wrong API key"),
        ("invalid JSON", "{\"sequences\": [".into(), Some("k"), 400, "not valid JSON"),
        ("unknown field", json!({"sequences": [], "temp": 1}).to_string(), Some("k"), 422, "unknown field `temp`"),
        ("empty sequences", json!({"sequences": []}).to_string(), Some("k"), 422, "`sequences` is empty"),
        ("zero temperature", json!({"sequences": ok["sequences"], "temperature": 0}).to_string(), Some("k"), 422, "`temperature` is 0"),
        // What a schema-driven fuzzer found: 1/T overflowed and every logprob was NaN (`null`).
        ("denormal temperature", json!({"sequences": ok["sequences"], "temperature": 5e-324}).to_string(), Some("k"), 422, "it must be in [1e-5, 100]"),
        ("huge temperature", json!({"sequences": ok["sequences"], "temperature": 1e300}).to_string(), Some("k"), 422, "`temperature` is 1e300"),
        ("id out of vocabulary", json!({"sequences": [ok["sequences"][0], {"prompt_ids": [1], "completion_ids": [500]}]}).to_string(), Some("k"), 422, "sequences[1]"),
        ("empty prompt", json!({"sequences": [{"prompt_ids": [], "completion_ids": [3]}]}).to_string(), Some("k"), 422, "sequences[0]"),
        ("body over the limit", json!({"sequences": [{"prompt_ids": vec![1; 2000], "completion_ids": [2]}]}).to_string(), Some("k"), 413, "over the server's limit"),
    ];
    let mut failures = Vec::new();
    for (what, body, key, status, fragment) in &cases {
        let mut rb = http
            .post(format!("{url}/v1/score"))
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(k) = key {
            rb = rb.bearer_auth(k);
        }
        let r = rb.send().await.unwrap();
        let got = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap_or(serde_json::Value::Null);
        let msg = v["error"]["message"].as_str().unwrap_or("");
        if got != *status || !msg.contains(fragment) {
            failures.push(format!(
                "{what}: got {got} {v}, expected {status} with `{fragment}`"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let r = http
        .post(format!("{url}/v1/score"))
        .bearer_auth("k")
        .json(&ok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = http
        .get(format!("{url}/v1/nothing"))
        .bearer_auth("k")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(
        http.get(format!("{url}/health"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_scoring_fails_health_and_ends_the_process_non_zero() {
    let (mut child, url) = serve_env(&[], &[("REF_SCORER_FAILPOINT", "engine-panic")]);
    let fault = Fault {
        path: "/v1/score",
        body: json!({"sequences": [{"prompt_ids": [1, 5], "completion_ids": [6, 7]}]}),
        message_has: &["the engine failed", "send the request again"],
    };
    let code = check_engine_fault(&url, &mut child.0, fault).await;
    assert!(code.is_ok(), "{code:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_bodies_never_break_the_scorer() {
    let (_child, url) = serve(&["--api-key", "k"]);
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    // The scorer has one body route: it gets five times the cases.
    let (cases, seed) = (5 * env("FUZZ_CASES", 400) as usize, env("FUZZ_SEED", 17));
    let report = test_kit::fuzz::fuzz(&url, Some("k"), cases, seed, Duration::from_secs(120))
        .await
        .unwrap();
    test_kit::record("TEST_COUNTS_FILE", &report.summary("ref-scorer", seed));
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
    assert!(report.sent >= 2000, "thousands of requests");
    let ok = report.statuses.get(&200).copied().unwrap_or(0);
    assert!(ok > report.sent / 20, "enough bodies reach the model: {ok}");
}
