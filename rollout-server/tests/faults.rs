//! The rollout server's faults as a process: a panic in the engine thread answers 500, turns
//! `/health` to 503 and ends the process non-zero (so its supervisor starts a new one); with
//! `--parent-pid` it dies with its parent, also a SIGKILLed one, and refuses to start for a
//! parent that is already gone.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use test_kit::restart::{check_engine_fault, Fault};

/// Reads `listening on URL` (and, from a shell, `child PID`) from a server's stdout.
fn read_start(out: impl std::io::Read) -> (String, Option<u32>) {
    let mut pid = None;
    for line in BufReader::new(out).lines() {
        let line = line.unwrap();
        if let Some(p) = line.strip_prefix("child ") {
            pid = p.trim().parse().ok();
        }
        if let Some(url) = line.trim().strip_prefix("listening on ") {
            return (url.to_string(), pid);
        }
    }
    panic!("the server exited before listening");
}

fn server(model: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rollout-server"));
    cmd.args(["--model", model.to_str().unwrap(), "--port", "0"]);
    cmd
}

/// Waits (bounded) for `pid` to be gone or a zombie.
fn wait_dead(pid: u32, within: Duration) -> bool {
    let t = Instant::now();
    loop {
        let dead = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        };
        if dead || t.elapsed() > within {
            return dead;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_panic_fails_health_and_ends_the_process_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path());
    let mut child = server(&model)
        .env("ROLLOUT_SERVER_FAILPOINT", "engine-panic")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (url, _) = read_start(child.stdout.take().unwrap());
    let fault = Fault {
        path: "/v1/generate",
        body: json!({"prompt_ids": [1, 5, 6], "n": 2, "max_tokens": 4, "seed": 1}),
        message_has: &["engine thread panicked", "send it again"],
    };
    let status = check_engine_fault(&url, &mut child, fault).await;
    assert!(status.is_ok(), "{status:?}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("exiting non-zero"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_dies_with_its_sigkilled_parent() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path());
    // A shell starts the server as its child, tied to itself, and waits.
    let script = format!(
        "'{}' --model '{}' --port 0 --parent-pid $$ & echo child $!; wait",
        env!("CARGO_BIN_EXE_rollout-server"),
        model.display()
    );
    let mut shell = Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (url, pid) = read_start(shell.stdout.take().unwrap());
    let pid = pid.unwrap();
    let http = reqwest::Client::new();
    let r = http.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    shell.kill().unwrap();
    shell.wait().unwrap();
    assert!(
        wait_dead(pid, Duration::from_secs(10)),
        "the server (pid {pid}) outlived its SIGKILLed parent"
    );
}

#[test]
fn a_server_refuses_a_parent_that_is_not_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path());
    // pid 1 is not this server's parent (the test is).
    let out = server(&model).args(["--parent-pid", "1"]).output().unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("--parent-pid 1") && e.contains("not starting"),
        "{e}"
    );
}
