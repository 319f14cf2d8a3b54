//! Chat completions on SmolLM2 through the real server binary: greedy decoding reproduces the
//! transformers reference token for token (up to the first near-tie, as the golden file's rule
//! says) and the returned logprobs match within 2e-3. Also: the binary prints its address for
//! `--port 0` and stops cleanly on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `rollout-server` and reads `listening on http://ADDR` from its stdout.
fn spawn(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rollout-server"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn rollout-server");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read address");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (Child(child), url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_chat_matches_transformers() {
    let model = smollm2();
    assert!(
        model.exists(),
        "{} is missing: run scripts/fetch-assets",
        model.display()
    );
    let model = model.display().to_string();
    let (mut child, url) = spawn(&[
        "--model",
        &model,
        "--port",
        "0",
        "--served-model-name",
        "smollm2",
    ]);
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden().join("smollm2_reference.json")).expect("golden"),
    )
    .expect("golden json");
    let tol = golden["tolerance"]["logprob_abs"]
        .as_f64()
        .expect("tolerance");
    let margin = golden["tolerance"]["greedy_margin"]
        .as_f64()
        .expect("margin");
    let cases = golden["generation_cases"].as_array().expect("cases");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .expect("client");
    for (c, case) in cases.iter().enumerate() {
        let want: Vec<u64> =
            serde_json::from_value(case["greedy_completion_ids"].clone()).expect("ids");
        let want_lp: Vec<f64> =
            serde_json::from_value(case["completion_logprobs"].clone()).expect("lps");
        let margins: Vec<f64> =
            serde_json::from_value(case["greedy_step_margins"].clone()).expect("margins");
        let body = json!({"model": "smollm2", "messages": case["messages"], "temperature": 0,
                          "max_tokens": want.len(), "logprobs": true, "return_token_ids": true});
        let r = http
            .post(format!("{url}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), 200);
        let v: serde_json::Value = r.json().await.expect("json");
        let prompt_ids: Vec<u64> =
            serde_json::from_value(v["prompt_token_ids"].clone()).expect("prompt ids");
        let want_prompt: Vec<u64> =
            serde_json::from_value(case["prompt_ids"].clone()).expect("golden prompt ids");
        assert_eq!(prompt_ids, want_prompt, "case {c}: prompt ids");
        let got: Vec<u64> =
            serde_json::from_value(v["choices"][0]["token_ids"].clone()).expect("ids");
        // Compare up to the first near-tie (after it, either choice is correct).
        let upto = margins
            .iter()
            .position(|&m| m < margin)
            .unwrap_or(want.len())
            .min(want.len());
        assert_eq!(
            &got[..upto.min(got.len())],
            &want[..upto.min(got.len())],
            "case {c}: greedy ids"
        );
        assert!(
            got.len() >= upto,
            "case {c}: stopped after {} tokens, reference agrees for {upto}",
            got.len()
        );
        let content = v["choices"][0]["logprobs"]["content"]
            .as_array()
            .expect("content");
        for k in 0..upto {
            let lp = content[k]["logprob"].as_f64().expect("logprob");
            assert!(
                (lp - want_lp[k]).abs() <= tol,
                "case {c} token {k}: {lp} vs {}",
                want_lp[k]
            );
        }
        if upto == want.len() {
            assert_eq!(
                v["choices"][0]["message"]["content"], case["greedy_completion_text"],
                "case {c}: text"
            );
        }
    }
    // SIGTERM: the server finishes and exits 0.
    let pid = child.0.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = child.0.wait().expect("wait");
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_model_dir(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_rollout-server"))
        .args(["--model", &model.display().to_string(), "--port", &port])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("binding 127.0.0.1:{port}")) && err.contains("in use"),
        "{err}"
    );
}
