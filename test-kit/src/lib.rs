//! `test-kit`: the machinery the tests of the services and of the orchestrator share, kept out
//! of everything a release build ships (it is only ever a dev-dependency; `scripts/test` checks
//! that no product crate depends on it normally). [`fuzz`]: request bodies generated from a
//! service's own OpenAPI document, sent to every operation; [`contract`]: the document's routes
//! and methods against what the server answers; [`restart`]: what an engine fault must look
//! like from outside a service; [`record`]: the counts and skips a test run reports.
//!
//! It must never be needed to build or run the product, and holds no logic of the product: a
//! check here compares a running service with what it promises.

pub mod contract;
pub mod fuzz;
pub mod restart;

/// Appends `line` to the file named by the environment variable `var`, if set, and prints it
/// on stderr: how the tests report their counts (`TEST_COUNTS_FILE`) and skips
/// (`TEST_SKIPS_FILE`), which scripts/test prints at the end of a run.
pub fn record(var: &str, line: &str) {
    eprintln!("{line}");
    if let Some(path) = std::env::var_os(var) {
        use std::io::Write;
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            // One write of the whole line: concurrent tests append without interleaving.
            .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
        if let Err(e) = written {
            panic!("cannot append to {var} {path:?}: {e}");
        }
    }
}
