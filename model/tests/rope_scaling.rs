//! Scaled RoPE (Llama 3.x's `llama3`, and `linear`) against transformers: the tiny seeded Llama
//! with a scaled-RoPE config, scored by transformers in float64 (`fixtures/rope_scaling.json`,
//! made by `fixtures/make_rope_scaling.py`). Also: llama.cpp's per-frequency divisors (how a
//! GGUF stores Llama 3's scaling) give the same frequencies, sampling uses the scaled positions
//! too, export writes the scaling back, and unsupported kinds are refused by name. The engine runs
//! on the device `TEST_DEVICE` names (default cpu).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::*;
use model::{Engine, RopeScaling, ScoreRequest};
use serde_json::{json, Value};

fn fixture() -> Value {
    read_json(&repo_root().join("model/tests/fixtures/rope_scaling.json"))
}

/// The tiny Llama's weights beside its config.json with `key` set to `scaling`.
fn tiny_with(dir: &Path, key: &str, scaling: &Value) -> PathBuf {
    let tiny = golden_dir().join("tiny_llama");
    let mut config = read_json(&tiny.join("config.json"));
    config[key] = scaling.clone();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        tiny.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    dir.to_path_buf()
}

fn request(f: &Value, engine: &Engine) -> ScoreRequest {
    score_request(engine, ids(&f["prompt"]), ids(&f["completion"]))
}

fn max_diff(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (f64::from(*g) - w).abs())
        .fold(0.0, f64::max)
}

#[test]
fn scaled_rope_scores_like_transformers() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let plain = floats(&f["plain_completion_logprobs"]);
    // Transformers 4.x and Llama 3.2's own config.json spell it `rope_scaling`, 5.x
    // `rope_parameters`: one variant through each.
    for (name, key) in [("llama3", "rope_scaling"), ("linear", "rope_parameters")] {
        let v = &f["variants"][name];
        let mut scaling = v["rope_scaling"].clone();
        if key == "rope_parameters" {
            scaling["rope_theta"] = json!(10000.0);
        }
        let dir = tiny_with(&tmp.path().join(name), key, &scaling);
        let engine = Engine::load(&dir, &device(), DType::F32).unwrap();
        let inv = engine
            .config()
            .rope_scaling
            .inv_freq(engine.config().rope_theta, engine.config().head_dim);
        for (i, (got, want)) in inv.iter().zip(floats(&v["inv_freq"])).enumerate() {
            // transformers computes them in f32.
            assert!(
                (f64::from(*got) - want).abs() <= 1e-6 * want,
                "{name} inv_freq[{i}]: {got} vs {want}"
            );
        }
        let want = floats(&v["completion_logprobs"]);
        // The oracle is worth something only if scaling moves the numbers past the tolerance.
        let moved = want
            .iter()
            .zip(&plain)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            moved > 1e-4,
            "{name}: the fixture barely differs from plain RoPE ({moved})"
        );
        let got = engine
            .score(&[request(&f, &engine)], st(1.0))
            .unwrap()
            .remove(0);
        let err = max_diff(&got, &want);
        assert!(err <= 1e-5, "{name}: logprobs off by {err}");
    }
}

#[test]
fn sampling_uses_the_scaled_positions() {
    // Greedy decoding through the KV cache must give, token by token, the logprobs that
    // teacher-forced scoring gives the same tokens; positions go past the scaled wavelengths.
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_with(
        tmp.path(),
        "rope_scaling",
        &f["variants"]["llama3"]["rope_scaling"],
    );
    let engine = Engine::load(&dir, &device(), DType::F32).unwrap();
    let prompt = ids(&f["prompt"]);
    let g = engine
        .generate(&[gen_request(&engine, prompt.clone(), params(0.0, 100))])
        .unwrap()
        .remove(0);
    assert_eq!(g.tokens.len(), 100);
    let scored = engine
        .score(&[score_request(&engine, prompt, g.tokens.clone())], st(1.0))
        .unwrap()
        .remove(0);
    let want: Vec<f64> = g.logprobs.iter().map(|x| f64::from(*x)).collect();
    let err = max_diff(&scored, &want);
    assert!(err <= 1e-4, "decode and scoring disagree by {err}");
}

/// convert_hf_to_gguf.py stores Llama 3's scaling as `rope_freqs.weight`: per frequency, 1
/// (short wavelengths), `factor` (long ones), or 1 / ((1 - s) / factor + s) in between.
fn llama_cpp_divisors(scaling: &Value, theta: f64, head_dim: usize) -> Vec<f32> {
    let num = |k: &str| scaling[k].as_f64().unwrap();
    let (factor, low, high, original) = (
        num("factor"),
        num("low_freq_factor"),
        num("high_freq_factor"),
        num("original_max_position_embeddings"),
    );
    RopeScaling::None
        .inv_freq(theta, head_dim)
        .iter()
        .map(|freq| {
            let wavelen = 2.0 * std::f64::consts::PI / f64::from(*freq);
            if wavelen < original / high {
                1.0
            } else if wavelen > original / low {
                factor as f32
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

#[test]
fn llama_cpp_divisors_give_the_llama3_frequencies() {
    let f = fixture();
    let v = &f["variants"]["llama3"];
    let divisors = llama_cpp_divisors(&v["rope_scaling"], 10000.0, 8);
    let from_gguf = RopeScaling::Divisors { divisors }.inv_freq(10000.0, 8);
    for (i, (got, want)) in from_gguf.iter().zip(floats(&v["inv_freq"])).enumerate() {
        assert!(
            (f64::from(*got) - want).abs() <= 1e-6 * want,
            "inv_freq[{i}]: {got} vs {want}"
        );
    }
}

/// The tiny Llama written as a GGUF the way llama.cpp writes one (Q/K rows permuted for its
/// interleaved RoPE, GGUF tensor names, a byte-level BPE vocabulary of 96 tokens), with
/// `rope_freqs.weight` when `divisors` is given.
fn tiny_gguf(path: &Path, divisors: Option<Vec<f32>>) {
    use candle_core::quantized::gguf_file::{self, Value as G};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Tensor;
    let tiny = golden_dir().join("tiny_llama");
    let weights =
        candle_core::safetensors::load(tiny.join("model.safetensors"), &Device::Cpu).unwrap();
    let (heads, kv_heads, head_dim) = (4, 2, 8);
    // llama.cpp's permutation: w.reshape(heads, 2, hd / 2, in).swapaxes(1, 2).
    let permute = |w: &Tensor, heads: usize| {
        let (out, inp) = w.dims2().unwrap();
        w.reshape((heads, 2, head_dim / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((out, inp))
            .unwrap()
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, w) in &weights {
        let gguf_name = match name.as_str() {
            "model.embed_tokens.weight" => "token_embd.weight".to_string(),
            "model.norm.weight" => "output_norm.weight".to_string(),
            _ => {
                let rest = name.strip_prefix("model.layers.").unwrap();
                let (layer, rest) = rest.split_once('.').unwrap();
                let module = match rest.trim_end_matches(".weight") {
                    "input_layernorm" => "attn_norm",
                    "post_attention_layernorm" => "ffn_norm",
                    "self_attn.q_proj" => "attn_q",
                    "self_attn.k_proj" => "attn_k",
                    "self_attn.v_proj" => "attn_v",
                    "self_attn.o_proj" => "attn_output",
                    "mlp.gate_proj" => "ffn_gate",
                    "mlp.up_proj" => "ffn_up",
                    "mlp.down_proj" => "ffn_down",
                    other => panic!("unexpected tensor {other}"),
                };
                format!("blk.{layer}.{module}.weight")
            }
        };
        let w = if name.ends_with("q_proj.weight") {
            permute(w, heads)
        } else if name.ends_with("k_proj.weight") {
            permute(w, kv_heads)
        } else {
            w.clone()
        };
        tensors.push((gguf_name, QTensor::quantize(&w, GgmlDType::F32).unwrap()));
    }
    if let Some(d) = divisors {
        let t = Tensor::new(d, &Device::Cpu).unwrap();
        tensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }
    let tokens: Vec<G> = (0..96u8)
        .map(|i| {
            G::String(match i {
                94 => "Ā".to_string(),
                95 => "!!".to_string(),
                _ => char::from(33 + i).to_string(),
            })
        })
        .collect();
    let metadata: Vec<(&str, G)> = vec![
        ("general.architecture", G::String("llama".into())),
        ("llama.embedding_length", G::U32(32)),
        ("llama.feed_forward_length", G::U32(64)),
        ("llama.block_count", G::U32(2)),
        ("llama.attention.head_count", G::U32(heads as u32)),
        ("llama.attention.head_count_kv", G::U32(kv_heads as u32)),
        ("llama.rope.dimension_count", G::U32(head_dim as u32)),
        ("llama.rope.freq_base", G::F32(10000.0)),
        ("llama.context_length", G::U32(128)),
        ("llama.attention.layer_norm_rms_epsilon", G::F32(1e-5)),
        ("tokenizer.ggml.model", G::String("gpt2".into())),
        ("tokenizer.ggml.tokens", G::Array(tokens)),
        (
            "tokenizer.ggml.merges",
            G::Array(vec![G::String("! !".into())]),
        ),
        ("tokenizer.ggml.bos_token_id", G::U32(1)),
        ("tokenizer.ggml.eos_token_id", G::U32(2)),
    ];
    let metadata: Vec<(&str, &G)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}

#[test]
fn a_gguf_with_rope_freqs_scores_like_transformers() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let v = &f["variants"]["llama3"];
    // Without rope_freqs the GGUF is the plain tiny Llama; with them, Llama 3's scaling.
    let plain = tmp.path().join("plain.gguf");
    tiny_gguf(&plain, None);
    let engine = Engine::load(&plain, &device(), DType::F32).unwrap();
    let r = [request(&f, &engine)];
    assert_eq!(engine.config().rope_scaling, RopeScaling::None);
    let err = max_diff(
        &engine.score(&r, st(1.0)).unwrap()[0],
        &floats(&f["plain_completion_logprobs"]),
    );
    assert!(err <= 1e-5, "plain GGUF: logprobs off by {err}");

    let scaled = tmp.path().join("llama3.gguf");
    tiny_gguf(
        &scaled,
        Some(llama_cpp_divisors(&v["rope_scaling"], 10000.0, 8)),
    );
    let engine = Engine::load(&scaled, &device(), DType::F32).unwrap();
    let r = [request(&f, &engine)];
    assert!(matches!(
        engine.config().rope_scaling,
        RopeScaling::Divisors { .. }
    ));
    let err = max_diff(
        &engine.score(&r, st(1.0)).unwrap()[0],
        &floats(&v["completion_logprobs"]),
    );
    assert!(err <= 1e-5, "GGUF with rope_freqs: logprobs off by {err}");

    // A Hugging Face config.json has no field for a divisor table: export says so.
    let e = model::export_merged(&scaled, None, &tmp.path().join("out"), DType::F32)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("rope_freqs.weight") && e.contains("Hugging Face folder"),
        "{e:?}"
    );
}

#[test]
fn export_writes_the_scaling_back() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let scaling = &f["variants"]["llama3"]["rope_scaling"];
    let dir = tiny_with(&tmp.path().join("in"), "rope_scaling", scaling);
    let out = tmp.path().join("out");
    model::export_merged(&dir, None, &out, DType::F32).unwrap();
    let written = read_json(&out.join("config.json"));
    assert_eq!(&written["rope_scaling"], scaling);
    let a = Engine::load(&dir, &device(), DType::F32).unwrap();
    let b = Engine::load(&out, &device(), DType::F32).unwrap();
    assert_eq!(a.config().rope_scaling, b.config().rope_scaling);
    let r = [request(&f, &a)];
    assert_eq!(a.score(&r, st(1.0)).unwrap(), b.score(&r, st(1.0)).unwrap());
}

#[test]
fn unsupported_or_incomplete_scaling_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "rope_scaling",
            json!({"rope_type": "yarn", "factor": 4.0}),
            &["rope_scaling", "\"yarn\" is not supported"][..],
        ),
        (
            "rope_parameters",
            json!({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
            &["rope_parameters", "\"dynamic\" is not supported"][..],
        ),
        (
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0}),
            &["rope_scaling.original_max_position_embeddings", "missing"][..],
        ),
        (
            "rope_scaling",
            json!({"type": "linear", "factor": -2.0}),
            &["rope_scaling.factor", "positive"][..],
        ),
        (
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                   "high_freq_factor": 1.0, "original_max_position_embeddings": 64}),
            &[
                "rope_scaling.high_freq_factor",
                "must exceed low_freq_factor",
            ][..],
        ),
    ];
    for (i, (key, scaling, want)) in cases.iter().enumerate() {
        let dir = tiny_with(&tmp.path().join(i.to_string()), key, scaling);
        let e = match Engine::load(&dir, &device(), DType::F32) {
            Ok(_) => panic!("case {i} ({scaling}) loaded but should not"),
            Err(e) => e.to_string(),
        };
        for w in *want {
            assert!(e.contains(w), "case {i}: {e:?} lacks {w:?}");
        }
        assert!(e.contains("config.json"), "case {i}: {e:?} names no file");
    }
}
