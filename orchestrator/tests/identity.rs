//! What a run records of itself, and what it never records: each iteration keeps the sampling
//! knobs it began with across resumes whose config changed them (the new ones apply from the
//! next iteration, hotter or colder), and the services' API key reaches them through their
//! environment but never a command line (`ps`), `config.yaml`, the database or the log.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_resume_with_other_sampling_knobs_applies_them_from_the_next_iteration() {
    let bins = service_bins();
    let a = tempfile::tempdir().unwrap();
    let cfg = setup(a.path(), "");
    let run = a.path().join("run");
    let run_s = run.to_str().unwrap();
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    // Crashed after iteration 0's first group, drawn at the default 0.7.
    let out = orchestrate(&bins, &["run", cfg.to_str().unwrap()], Some("sampling:0"));
    assert!(!out.status.success());
    // Resumed hotter: iteration 0 finishes at 0.7, iteration 1 begins at 1.2 (and crashes after
    // its first group).
    let hot = "sampling.train.temperature=1.2";
    let out = orchestrate(&bins, &["resume", run_s, hot], Some("sampling:1"));
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("iteration 0 began sampling with temperature 0.7")
            && e.contains("(temperature 1.2, top_p 1, top_k 0, max_tokens 8) applies from the next iteration on"),
        "{e}"
    );
    // Resumed colder: iteration 1 keeps 1.2, iteration 2 is drawn at 0.4.
    let cold = "sampling.train.temperature=0.4";
    let out = orchestrate(&bins, &["resume", run_s, cold], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("iteration 1 began sampling with temperature 1.2"));
    let db = db(&run);
    assert_eq!(
        query(
            &db,
            "SELECT iteration, temperature, count(*) FROM rollouts GROUP BY iteration, temperature"
        ),
        ["0|0.7|4", "1|1.2|4", "2|0.4|4"],
        "no iteration mixes two temperatures"
    );
    assert_eq!(
        query(
            &db,
            "SELECT iteration, json_extract(sampling, '$.temperature') FROM iterations ORDER BY iteration"
        ),
        ["0|0.7", "1|1.2", "2|0.4"]
    );
    assert_eq!(
        query(&db, "SELECT phase FROM iterations"),
        ["done", "done", "done"]
    );
    assert_store_sound(&run, 3, 2, 2);
}

/// The command line and environment of `pid` (NUL-separated in /proc).
fn proc_text(pid: u32, what: &str) -> String {
    std::fs::read(format!("/proc/{pid}/{what}"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The children of `parent` (from /proc), with their command lines.
fn children(parent: u32) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let status = proc_text(pid, "status");
            status.lines().any(|l| {
                l.split_whitespace()
                    .eq(["PPid:".to_string(), parent.to_string()])
            })
        })
        .map(|pid| (pid, proc_text(pid, "cmdline")))
        .collect()
}

/// Every byte of every file under `dir`, as text (lossy), for a search.
fn all_files(dir: &Path) -> String {
    walk(dir)
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect()
}

#[test]
fn the_api_key_reaches_the_services_but_never_ps_a_file_or_the_log() {
    const KEY: &str = "k3y-that-must-not-leak";
    let bins = service_bins();
    let a = tempfile::tempdir().unwrap();
    let cfg = setup(a.path(), &format!("  api_key: {KEY}\n"));
    let run = a.path().join("run");
    let child = Command::new(env!("CARGO_BIN_EXE_orchestrate"))
        .args(["run", cfg.to_str().unwrap(), "max_iterations=1"])
        .env("ORCHESTRATE_BIN_DIR", &bins)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While the services run: their command lines never hold the key, their environment does.
    let started = Instant::now();
    let mut seen = Vec::new();
    while seen.len() < 2 && started.elapsed() < Duration::from_secs(60) {
        for (pid, cmdline) in children(child.id()) {
            let name = ["rollout-server", "ref-scorer"]
                .into_iter()
                .find(|n| cmdline.contains(&format!("/{n} ")));
            let Some(name) = name else { continue };
            if seen.contains(&name) || !cmdline.contains("--port") {
                continue;
            }
            assert!(!cmdline.contains(KEY), "{name}'s command line: {cmdline}");
            let var = format!("{}_API_KEY={KEY}", name.to_uppercase().replace('-', "_"));
            assert!(
                proc_text(pid, "environ").contains(&var),
                "{name} has no {var}"
            );
            seen.push(name);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    assert_eq!(seen.len(), 2, "both services were seen running: {seen:?}");
    assert!(!log.contains(KEY) && !String::from_utf8_lossy(&out.stdout).contains(KEY));
    // Nothing in the run directory (config.yaml, the database and its journal, the reports).
    let saved = std::fs::read_to_string(run.join("config.yaml")).unwrap();
    assert!(saved.contains("api_key: \"<redacted>\""), "{saved}");
    assert!(
        !all_files(&run).contains(KEY),
        "a file of the run holds the key"
    );
    // A resume needs the key again, from the environment.
    let out = orchestrate(
        &bins,
        &["resume", run.to_str().unwrap(), "max_iterations=2"],
        None,
    );
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("set ORCHESTRATE_API_KEY"),
        "{e}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_orchestrate"))
        .args(["resume", run.to_str().unwrap(), "max_iterations=2"])
        .env("ORCHESTRATE_BIN_DIR", &bins)
        .env("ORCHESTRATE_API_KEY", KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(query(&db(&run), "SELECT count(*) FROM iterations"), ["2"]);
    assert!(!all_files(&run).contains(KEY));
}
