//! Loading Hugging Face folders (single and sharded safetensors, Qwen2 biases) and the error
//! message of every bad input: missing file, unsupported architecture, corrupt or truncated
//! tensor file, shape mismatch, bad adapter, bad request.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use model::{Engine, GenerateRequest, LoraAdapter, SamplingParams, ScoreRequest};

fn tiny_dir() -> std::path::PathBuf {
    golden_dir().join("tiny_llama")
}

/// A copy of tiny_llama in `dir`, with `edit` applied to its config.json.
fn copy_tiny(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        tiny_dir().join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let mut cfg = read_json(&tiny_dir().join("config.json"));
    edit(&mut cfg);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
}

fn load_err(path: &Path) -> String {
    match Engine::load(path, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Two sequences, checked against the tiny model's limits (every model loaded here has them).
fn requests() -> Vec<ScoreRequest> {
    let limits = model::Limits {
        vocab: 96,
        context: 128,
    };
    vec![
        ScoreRequest::new("a", vec![1, 10, 11, 12, 13], vec![30, 31, 32, 2], limits).unwrap(),
        ScoreRequest::new("b", vec![1, 20, 21], vec![40, 41, 42, 43, 44], limits).unwrap(),
    ]
}

fn tiny_scores() -> Vec<Vec<f32>> {
    Engine::load(&tiny_dir(), &Device::Cpu, DType::F32)
        .unwrap()
        .score(&requests(), st(1.0))
        .unwrap()
}

#[test]
fn sharded_safetensors_load_like_a_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    copy_tiny(dir, |_| {});
    let all = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let shard: HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, dir.join(file)).unwrap();
        for n in part {
            map.insert((*n).clone(), serde_json::Value::String(file.into()));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let engine = Engine::load(dir, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(engine.score(&requests(), st(1.0)).unwrap(), tiny_scores());
}

#[test]
fn qwen2_applies_qkv_biases() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    copy_tiny(dir, |c| {
        c["model_type"] = "qwen2".into();
        c["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    });
    // Without biases the Qwen2 path must say which tensor is missing.
    let e = load_err(dir);
    assert!(
        e.contains("model.layers.0.self_attn.q_proj.bias") && e.contains("missing"),
        "{e}"
    );
    // Zero biases: identical to the Llama model. Non-zero: different.
    let mut w =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    for l in 0..2 {
        for (p, n) in [("q_proj", 32), ("k_proj", 16), ("v_proj", 16)] {
            w.insert(
                format!("model.layers.{l}.self_attn.{p}.bias"),
                Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap(),
            );
        }
    }
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    let engine = Engine::load(dir, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(engine.config().architecture, model::Architecture::Qwen2);
    assert_eq!(engine.score(&requests(), st(1.0)).unwrap(), tiny_scores());
    w.insert(
        "model.layers.0.self_attn.v_proj.bias".into(),
        Tensor::ones(16, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    let engine = Engine::load(dir, &Device::Cpu, DType::F32).unwrap();
    assert_ne!(engine.score(&requests(), st(1.0)).unwrap(), tiny_scores());
}

#[test]
fn missing_files_are_named() {
    let e = load_err(Path::new("/nonexistent/model.gguf"));
    assert!(
        e.contains("/nonexistent/model.gguf")
            && e.contains("not found")
            && e.contains("fetch-assets"),
        "{e}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("config.json") && e.contains("not found"), "{e}");
    copy_tiny(tmp.path(), |_| {});
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let e = load_err(tmp.path());
    assert!(
        e.contains("model.safetensors") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn unsupported_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path(), |c| {
        c["model_type"] = "gpt_neox".into();
        c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    });
    let e = load_err(tmp.path());
    assert!(
        e.contains("unsupported architecture 'gpt_neox'") && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn truncated_and_corrupt_tensor_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path(), |_| {});
    let st = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(tmp.path());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );
    std::fs::write(&st, b"this is not a safetensors file").unwrap();
    let e = load_err(tmp.path());
    assert!(
        e.contains("model.safetensors") && e.contains("cannot read"),
        "{e}"
    );
    // A GGUF cut short.
    let gguf = tmp.path().join("cut.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00").unwrap();
    let e = load_err(&gguf);
    assert!(e.contains("cut.gguf") && e.contains("GGUF"), "{e}");
}

#[test]
fn shape_mismatch_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path(), |c| c["intermediate_size"] = 48.into());
    let e = load_err(tmp.path());
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight")
            && e.contains("[64, 32]")
            && e.contains("[48, 32]"),
        "{e}"
    );
}

#[test]
fn bad_config_values_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path(), |c| c["num_key_value_heads"] = 3.into());
    let e = load_err(tmp.path());
    assert!(
        e.contains("num_key_value_heads") && e.contains("does not divide"),
        "{e}"
    );
}

#[test]
fn adapter_for_another_base_is_refused() {
    // The tiny adapter against a model twice as wide: the first mismatching tensor is named.
    let mut cfg = Engine::load(&tiny_dir(), &Device::Cpu, DType::F32)
        .unwrap()
        .config()
        .clone();
    cfg.hidden_size = 64;
    let e = LoraAdapter::load(&golden_dir().join("tiny_adapter"), &cfg, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layers.0.mlp.down_proj.lora_B.weight") && e.contains("expected [64, 4]"),
        "{e}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let e = LoraAdapter::load(tmp.path(), &cfg, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("adapter_config.json") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn bad_requests_are_refused_with_the_field_named() {
    let engine = Engine::load(&tiny_dir(), &Device::Cpu, DType::F32).unwrap();
    let limits = engine.limits();
    assert_eq!((limits.vocab, limits.context), (96, 128));
    let gen = |prompt: Vec<u32>, params: SamplingParams| {
        GenerateRequest::new("prompt_ids", prompt, params, limits)
            .unwrap_err()
            .to_string()
    };
    let e = gen(vec![], SamplingParams::default());
    assert!(e.contains("`prompt_ids` is empty"), "{e}");
    let e = gen(vec![1, 500], SamplingParams::default());
    assert!(
        e.contains("token id 500") && e.contains("vocabulary (ids 0..96)"),
        "{e}"
    );
    let e = gen(vec![1; 100], params(1.0, 64));
    assert!(
        e.contains("over the model's context of 128") && e.contains("max_tokens <= 28"),
        "{e}"
    );
    let stops = SamplingParams {
        stop_ids: vec![96],
        ..params(1.0, 4)
    };
    let e = gen(vec![1], stops);
    assert!(e.contains("`stop_token_ids` has token id 96"), "{e}");
    // The knobs cannot even be built outside their rules.
    let e = sampling::Temperature::new(-0.5)
        .unwrap_err()
        .named("temperature");
    assert!(e.contains("`temperature` is -0.5"), "{e}");
    let e = sampling::TopP::new(1.5).unwrap_err().named("top_p");
    assert!(e.contains("`top_p` is 1.5"), "{e}");
    let e = ScoreRequest::new("sequences[0]", vec![], vec![1], limits)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`sequences[0].prompt_ids` is empty"), "{e}");
    let e = ScoreRequest::new("sequences[1]", vec![1], vec![96], limits)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sequences[1].completion_ids") && e.contains("token id 96"),
        "{e}"
    );
    let e = ScoreRequest::new("s", vec![1; 100], vec![1; 29], limits)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("129 tokens, over the model's context of 128"),
        "{e}"
    );
    // A request checked against another model's limits is refused by this engine, unscored.
    let other = model::Limits {
        vocab: 49152,
        context: 8192,
    };
    let foreign = ScoreRequest::new("s", vec![1, 40000], vec![2], other).unwrap();
    let e = engine.score(&[foreign], st(1.0)).unwrap_err().to_string();
    assert!(e.contains("vocabulary 49152 and context 8192"), "{e}");
    let foreign = GenerateRequest::new("p", vec![1], params(1.0, 4), other).unwrap();
    let e = engine.generate(&[foreign]).unwrap_err().to_string();
    assert!(e.contains("build it with this engine's limits()"), "{e}");
    let e = engine.tokenizer().unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}
