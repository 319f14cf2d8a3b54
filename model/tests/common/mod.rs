//! Paths shared by the engine's integration tests: the oracle fixtures in `../shared/golden`
//! (override with `GOLDEN_DIR`) and the fetched assets (override with `ASSETS_DIR`).
#![allow(dead_code)]

use std::path::PathBuf;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("model crate sits in the workspace")
        .to_path_buf()
}

pub fn golden_dir() -> PathBuf {
    match std::env::var_os("GOLDEN_DIR") {
        Some(p) => PathBuf::from(p),
        None => repo_root().join("../shared/golden"),
    }
}

pub fn smollm2_gguf() -> PathBuf {
    let dir = match std::env::var_os("ASSETS_DIR") {
        Some(p) => PathBuf::from(p),
        None => repo_root().join("assets"),
    };
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-assets first",
        path.display()
    );
    path
}

pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}
