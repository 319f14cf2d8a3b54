//! Paths and the device shared by the engine's integration tests: the oracle fixtures in
//! `../shared/golden` (override with `GOLDEN_DIR`), the fetched assets (override with
//! `ASSETS_DIR`), the crate's folder (`CARGO_MANIFEST_DIR` at run time when set, as cargo and
//! `scripts/gpu-check run` set it, else where it was built) and the device the oracle suites run
//! on (`TEST_DEVICE`, default cpu).
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::Device;

pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
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

/// The device of the oracle suites (`TEST_DEVICE`; see [`model::test_device`]). Printed once per
/// test so that a log shows where each ran; a device that cannot be opened fails the test.
pub fn device() -> Device {
    let d = model::test_device().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("test device: {:?}", d.location());
    d
}

/// The largest absolute difference between two tensors of the same shape, in f64 (on any
/// device).
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    (a.to_dtype(candle_core::DType::F64).unwrap() - b.to_dtype(candle_core::DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Deterministic values in [-1, 1].
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Says that `test` checked nothing on this machine and why: `SKIPPED test: reason` on stderr,
/// and a line appended to the file named by `TEST_SKIPS_FILE` (scripts/test sets it and prints
/// how many tests skipped, and which, at the end of the run).
pub fn skipped(test: &str, reason: &str) {
    let line = format!("SKIPPED {test}: {reason}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("TEST_SKIPS_FILE") {
        use std::io::Write;
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            // One write of the whole line: concurrent tests append without interleaving.
            .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
        if let Err(e) = written {
            panic!("cannot record a skip in TEST_SKIPS_FILE {path:?}: {e}");
        }
    }
}

/// Sampling at `temperature` (0: greedy), up to `max_tokens` new tokens, no truncation, no
/// stops, seed 0.
pub fn params(temperature: f64, max_tokens: usize) -> model::SamplingParams {
    model::SamplingParams::new(sampling::Knobs {
        temperature: sampling::Temperature::new(temperature).expect("a valid temperature"),
        top_p: sampling::TopP::ALL,
        top_k: 0,
        max_tokens: sampling::MaxTokens::new(max_tokens as u32).expect("a valid max_tokens"),
    })
}

/// A generation request, checked against `engine`'s limits (a bad one panics: the tests that
/// check the refusals call `GenerateRequest::new` themselves).
pub fn gen_request(
    engine: &model::Engine,
    prompt: Vec<u32>,
    params: model::SamplingParams,
) -> model::GenerateRequest {
    model::GenerateRequest::new("prompt", prompt, params, engine.limits()).expect("a valid request")
}

/// A scoring request, checked against `engine`'s limits.
pub fn score_request(
    engine: &model::Engine,
    prompt: Vec<u32>,
    completion: Vec<u32>,
) -> model::ScoreRequest {
    model::ScoreRequest::new("sequence", prompt, completion, engine.limits())
        .expect("a valid sequence")
}

/// A scoring temperature.
pub fn st(t: f64) -> sampling::ScoreTemperature {
    sampling::ScoreTemperature::new(t).expect("a valid scoring temperature")
}

/// `got` within `tol` of `want`, element by element (and of the same length); `what` names it.
pub fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w} (tolerance {tol})"
        );
    }
}
