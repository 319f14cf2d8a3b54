//! Faults a run survives, tried as a user meets them, on the tiny model through real processes:
//! the orchestrator's whole process group SIGKILLed at seeded random moments in every phase (the
//! learner's step included) and resumed each time; the orchestrator alone SIGKILLed (its
//! children must die with it); a rollout server that keeps its port but never answers; a disk
//! that fills up. Each ends where the uninterrupted run does, compared field by field
//! ([`common::assert_same_outcome`]).
//!
//! The moments are found, not waited for: the orchestrator logs each commit (a group stored, a
//! learner started, an eval answer stored) and the test reads its log line by line; a seeded
//! delay after the chosen line picks the moment inside the phase. No sleep stands for "the run
//! has reached X".
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

/// The uninterrupted run every test here compares with, made once per test binary.
fn reference() -> &'static Outcome {
    static RUN: OnceLock<(tempfile::TempDir, Outcome)> = OnceLock::new();
    &RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = setup(dir.path(), "");
        let out = orchestrate(&service_bins(), &["run", cfg.to_str().unwrap()], None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let o = outcome(&dir.path().join("run/rollouts.sqlite"));
        (dir, o)
    })
    .1
}

/// A line the orchestrator logs at a commit of each phase (at `debug`).
const MARKERS: [(&str, &str); 4] = [
    ("sampling", "sampling: group"),
    ("scoring_ref", "scoring_ref: group"),
    ("training", "training: learner started"),
    ("evaluating", "evaluating: problem"),
];

/// Longest wait for the next log line of a live orchestrator: a run that says nothing for this
/// long is hung, and the test fails instead of hanging.
const SILENCE: Duration = Duration::from_secs(240);

/// `orchestrate` in its own process group (its children join it), its stderr read line by line.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Running {
    fn start(args: &[&str], failpoint: Option<&str>) -> Running {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_orchestrate"));
        cmd.args(args)
            .env("ORCHESTRATE_BIN_DIR", service_bins())
            .env("RUST_LOG", "info,orchestrator=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(f) = failpoint {
            cmd.env("ORCHESTRATE_FAILPOINT", f);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        // The pipe closes when every process holding it is gone: the orchestrator and the
        // services, which inherit its stderr.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// The next line, `None` once the pipe is closed; panics if the run is silent too long.
    fn next(&mut self) -> Option<String> {
        match self.lines.recv_timeout(SILENCE) {
            Ok(line) => {
                self.log.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => {
                self.kill_group();
                panic!(
                    "orchestrate said nothing for {SILENCE:?}: hung. Its log:\n{}",
                    self.log.join("\n")
                );
            }
        }
    }

    fn kill_group(&self) {
        let group = format!("-{}", self.child.id());
        let status = Command::new("kill")
            .args(["-KILL", "--", &group])
            .status()
            .unwrap();
        assert!(status.success(), "kill -KILL -- {group}");
    }

    /// Reads to the end and waits; the exit status and the whole log.
    fn finish(mut self) -> (std::process::ExitStatus, String) {
        while self.next().is_some() {}
        let status = self.child.wait().unwrap();
        (status, self.log.join("\n"))
    }
}

#[test]
fn sigkills_of_the_whole_process_group_at_random_moments_lose_nothing() {
    let want = reference();
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "");
    let run = dir.path().join("run");
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2026);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // Each kill: its phase, the delay after the phase's commit line, and whether it landed
    // before the run's next line (for training: while the learner was still running).
    let mut kills: Vec<(&str, u64, bool)> = Vec::new();
    let mut starts = 0;
    loop {
        starts += 1;
        assert!(starts <= 60, "the run did not finish within 60 starts");
        let (phase, marker) = MARKERS[kills.len() % MARKERS.len()];
        let (cfg_s, run_s) = (cfg.to_str().unwrap(), run.to_str().unwrap());
        let args = if db(&run).exists() {
            ["resume", run_s]
        } else {
            ["run", cfg_s]
        };
        let mut r = Running::start(&args, None);
        let mut kill = None;
        while let Some(line) = r.next() {
            if !line.contains(marker) {
                continue;
            }
            // The moment: a seeded delay after the commit, or the run's next line if that
            // comes first (the phase moved on). On the tiny model a learner lives ~100-200 ms,
            // a request a few ms.
            let delay = if phase == "training" {
                rng.random_range(0..150)
            } else {
                rng.random_range(0..25)
            };
            let inside = match r.lines.recv_timeout(Duration::from_millis(delay)) {
                Err(RecvTimeoutError::Timeout) => true,
                Ok(next) => {
                    r.log.push(next);
                    false
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            r.kill_group();
            kill = Some((phase, delay, inside));
            break;
        }
        let (status, log) = r.finish();
        match kill {
            Some(k) if !status.success() => kills.push(k),
            // Finished before the kill landed, or never reached the phase: the run is done.
            _ => {
                assert!(status.success(), "the last start finishes the run:\n{log}");
                assert!(
                    kills.len() >= 8,
                    "the run finished after {} kills without reaching `{marker}`; its last log:\n{log}",
                    kills.len()
                );
                break;
            }
        }
        // Consistent after every kill.
        assert_eq!(query(&db(&run), "PRAGMA integrity_check"), ["ok"]);
    }
    let hit: std::collections::BTreeSet<&str> = kills.iter().map(|k| k.0).collect();
    let inside = kills.iter().filter(|k| k.2).count();
    record(
        "TEST_COUNTS_FILE",
        &format!(
            "chaos (seed {seed}): {} SIGKILLs of the process group in {starts} starts, phases hit \
             {hit:?}, {inside} before the run's next line; kills (phase, ms, inside): {kills:?}",
            kills.len()
        ),
    );
    assert!(kills.len() >= 8, "at least 8 kills: {kills:?}");
    assert_eq!(hit.len(), 4, "every phase hit: {kills:?}");
    assert!(
        kills.iter().any(|k| k.0 == "training" && k.2),
        "a kill inside the learner's step: {kills:?}"
    );
    let compared = assert_same_outcome(&outcome(&db(&run)), want);
    assert_store_sound(&run, 3, 2, 2);
    record(
        "TEST_COUNTS_FILE",
        &format!("chaos: {compared} rollouts, 3 checkpoints and 3 evals compared with the uninterrupted run: equal"),
    );
}

/// Seconds since midnight of a log line's time stamp (`...T21:42:18.443107Z`).
fn stamp(line: &str) -> Option<f64> {
    let t = line.find('T')?;
    let z = line[t..].find('Z')? + t;
    let mut hms = line[t + 1..z].split(':');
    let h: f64 = hms.next()?.parse().ok()?;
    let m: f64 = hms.next()?.parse().ok()?;
    let s: f64 = hms.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Whether `/proc/PID` is gone or a zombie (dead, not yet reaped by its new parent).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// The pid in a line like `... rollout-server started (pid 1234), ...`.
fn pid_in(line: &str) -> Option<u32> {
    let at = line.find("(pid ")? + 5;
    let end = line[at..].find(')')? + at;
    line[at..end].parse().ok()
}

#[test]
fn children_die_with_a_sigkilled_orchestrator() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "");
    let mut r = Running::start(&["run", cfg.to_str().unwrap()], None);
    let mut pids = std::collections::BTreeMap::new();
    while let Some(line) = r.next() {
        for name in [
            "rollout-server started",
            "ref-scorer started",
            "learner started",
        ] {
            if line.contains(name) {
                pids.insert(name, pid_in(&line).unwrap());
            }
        }
        if pids.len() == 3 {
            break;
        }
    }
    assert_eq!(pids.len(), 3, "all three children seen: {pids:?}");
    // The orchestrator alone, as the OOM killer or `kill -9 PID` would.
    r.child.kill().unwrap();
    r.child.wait().unwrap();
    // The services hold the test's end of the pipe: it closes only once both are gone.
    let t = Instant::now();
    while r.next().is_some() {}
    let learner = pids["learner started"];
    while !dead(learner) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for (name, pid) in &pids {
        assert!(dead(*pid), "{name} (pid {pid}) outlived the orchestrator");
    }
    record(
        "TEST_COUNTS_FILE",
        &format!(
            "orchestrator SIGKILLed alone: its 3 children {pids:?} died within {:.2} s",
            t.elapsed().as_secs_f64()
        ),
    );
    // The run resumes (no orphan holds its lock or a half-written checkpoint).
    let out = orchestrate(
        &service_bins(),
        &["resume", dir.path().join("run").to_str().unwrap()],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_outcome(&outcome(&db(&dir.path().join("run"))), reference());
}

#[test]
fn a_silent_server_is_found_by_its_deadline_killed_and_replaced() {
    let want = reference();
    let dir = tempfile::tempdir().unwrap();
    // Deadlines of several seconds: base 5 s + tokens x requests in flight / 50 tokens/s.
    let cfg = setup(dir.path(), "  deadline_base_s: 5\n  min_tokens_per_s: 50\n");
    let t = Instant::now();
    let r = Running::start(
        &["run", cfg.to_str().unwrap()],
        Some("stop-rollout-server:1"),
    );
    let (status, log) = r.finish();
    assert!(status.success(), "{log}");
    for said in [
        "stopping (SIGSTOP",
        "no answer within the deadline",
        "missed its deadline; killing it",
        "restarting it",
    ] {
        assert!(log.contains(said), "`{said}` not in:\n{log}");
    }
    // Found within the deadline it was given: from the SIGSTOP to the kill.
    let at = |said: &str| {
        let line = log.lines().find(|l| l.contains(said)).unwrap();
        stamp(line).unwrap_or_else(|| panic!("no time stamp in {line}"))
    };
    let found = at("missed its deadline") - at("stopping (SIGSTOP");
    let deadline: f64 = log
        .lines()
        .find_map(|l| {
            let rest = l.split("no answer within the deadline of ").nth(1)?;
            rest.split(' ').next()?.parse().ok()
        })
        .unwrap();
    assert!(
        found <= deadline + 2.0,
        "found after {found:.1} s; its deadline was {deadline:.1} s"
    );
    record(
        "TEST_COUNTS_FILE",
        &format!(
            "silent server: SIGSTOPped, found {found:.1} s later (deadline {deadline:.1} s), replaced; run done in {:.1} s, outcome equal",
            t.elapsed().as_secs_f64()
        ),
    );
    assert_same_outcome(&outcome(&db(&dir.path().join("run"))), want);
    assert_store_sound(&dir.path().join("run"), 3, 2, 2);
}

#[test]
fn two_orchestrators_never_drive_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "");
    let mut first = Running::start(&["run", cfg.to_str().unwrap()], None);
    while let Some(line) = first.next() {
        if line.contains("rollout-server started") {
            break;
        }
    }
    let second = orchestrate(
        &service_bins(),
        &["resume", dir.path().join("run").to_str().unwrap()],
        None,
    );
    first.kill_group();
    let _ = first.finish();
    assert!(!second.status.success());
    let e = String::from_utf8_lossy(&second.stderr);
    assert!(e.contains("is in use by another orchestrate (pid"), "{e}");
}

/// Whether this machine can mount a small tmpfs in a private mount namespace (`unshare -rm`:
/// root, or unprivileged user namespaces).
fn can_mount_tmpfs() -> bool {
    Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn a_full_disk_or_a_read_only_one_fails_clearly_and_the_run_resumes_once_fixed() {
    if !can_mount_tmpfs() {
        skipped(
            "a_full_disk_or_a_read_only_one_fails_clearly_and_the_run_resumes_once_fixed",
            "`unshare -rm` cannot mount a tmpfs here (needs root or unprivileged user namespaces)",
        );
        return;
    }
    let want = reference();
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "");
    let run = dir.path().join("run");
    let saved = dir.path().join("saved");
    let out = dir.path().join("out");
    for d in [&run, &saved, &out] {
        std::fs::create_dir_all(d).unwrap();
    }
    // The run directory is a tmpfs of 64 KiB (the database cannot even be created), then 320 KiB
    // (the first iteration fits, its report does not), then read-only, then large enough; the
    // user's fix each time is the same command again. What the directory held after the second
    // failure is copied out, and so is the finished run.
    let script = r#"
        set -u
        step() { "$ORCH" run "$CFG" > "$OUT/$1.log" 2>&1; echo $? > "$OUT/$1.rc"; }
        mount -t tmpfs -o size=64k tmpfs "$RUN" || exit 90
        step tiny
        mount -o remount,size=320k "$RUN" || exit 91
        step small
        mkdir -p "$SAVED/small" && cp -a "$RUN/." "$SAVED/small/"
        mount -o remount,ro "$RUN" || exit 92
        step readonly
        mount -o remount,rw,size=64m "$RUN" || exit 93
        step room
        mkdir -p "$SAVED/room" && cp -a "$RUN/." "$SAVED/room/"
    "#;
    let status = Command::new("unshare")
        .args(["-rm", "sh", "-c", script])
        .env("ORCH", env!("CARGO_BIN_EXE_orchestrate"))
        .env("ORCHESTRATE_BIN_DIR", service_bins())
        .env("CFG", &cfg)
        .env("RUN", &run)
        .env("OUT", &out)
        .env("SAVED", &saved)
        .status()
        .unwrap();
    assert!(status.success(), "the mount script failed: {status}");
    let step = |name: &str| {
        let rc = std::fs::read_to_string(out.join(format!("{name}.rc"))).unwrap();
        let log = std::fs::read_to_string(out.join(format!("{name}.log"))).unwrap();
        (rc.trim().to_string(), log)
    };
    let run_s = run.display().to_string();
    for (name, says) in [
        ("tiny", "is full: free space there"),
        ("small", "is full: free space there"),
        ("readonly", "read-only file system: make it writable"),
    ] {
        let (rc, log) = step(name);
        assert_ne!(rc, "0", "{name}: the run fails");
        assert!(log.contains(says), "{name}: `{says}` not in:\n{log}");
        assert!(
            log.contains(&run_s),
            "{name}: the message names the run's files:\n{log}"
        );
    }
    // Nothing half-written under a final name after the disk filled mid-run.
    let small = saved.join("small");
    assert_eq!(query(&db(&small), "PRAGMA integrity_check"), ["ok"]);
    for e in std::fs::read_dir(small.join("checkpoints")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            assert!(p.join("training_state.json").exists(), "{name} is complete");
        }
    }
    if let Ok(png) = std::fs::read(small.join("curves.png")) {
        assert!(
            png.starts_with(b"\x89PNG") && png.ends_with(b"IEND\xaeB`\x82"),
            "a whole PNG or none"
        );
    }
    let (rc, log) = step("room");
    assert_eq!(rc, "0", "{log}");
    let room = saved.join("room");
    assert_same_outcome(&outcome(&db(&room)), want);
    assert_store_sound(&room, 3, 2, 2);
}

#[test]
fn a_rollout_server_on_another_machine_gets_each_adapter_over_http() {
    let want = reference();
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "");
    // Started by someone else, with its own checkpoints folder: nothing shared with the run.
    let own = tempfile::tempdir().unwrap();
    let mut server = Command::new(service_bins().join("rollout-server"))
        .args(["--model", dir.path().join("tiny").to_str().unwrap()])
        .args(["--dtype", "f32", "--port", "0", "--max-batch", "4"])
        .arg("--checkpoints-dir")
        .arg(own.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let url = first
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let out = orchestrate(
        &service_bins(),
        &[
            "run",
            cfg.to_str().unwrap(),
            &format!("services.rollout.endpoints=[\"{url}\"]"),
        ],
        None,
    );
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = dir.path().join("run");
    // Every checkpoint arrived as bytes: the server keeps each under its name, byte for byte.
    for c in query(&db(&run), "SELECT iteration, sha256 FROM checkpoints") {
        let (it, sha) = c.split_once('|').unwrap();
        let kept = own
            .path()
            .join(format!("iter_{it}/adapter_model.safetensors"));
        assert_eq!(
            rl_core::files::sha256(&kept).unwrap(),
            sha,
            "iteration {it}'s adapter on the remote server"
        );
    }
    assert_same_outcome(&outcome(&db(&run)), want);
    record(
        "TEST_COUNTS_FILE",
        "remote rollout server: 3 adapters arrived over HTTP (sha256 equal), run equal to the local one",
    );
}
