//! The engine on the tiny seeded Llama of `../shared/golden/tiny_llama` against the PyTorch/PEFT
//! oracle `tiny_grpo_step.json` + `tiny_lora_grads.safetensors` (scoring, LoRA gradients against
//! PEFT and finite differences), batching invariance of scoring, adapter round trips and the
//! merged export (sampling is in `sampling.rs`). On the device `TEST_DEVICE` names (default cpu),
//! with the same tolerances everywhere.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use model::{Engine, LoraAdapter, LoraPair, ScoreRequest};

fn tiny() -> Engine {
    Engine::load(&golden_dir().join("tiny_llama"), &device(), DType::F32).unwrap()
}

fn step() -> serde_json::Value {
    read_json(&golden_dir().join("tiny_grpo_step.json"))
}

/// The fixture's sequences, checked against the tiny model's limits.
fn step_requests(g: &serde_json::Value) -> Vec<ScoreRequest> {
    let prompts = g["prompts"].as_array().unwrap();
    let comps = g["completions"].as_array().unwrap();
    let limits = tiny().limits();
    prompts
        .iter()
        .zip(comps)
        .map(|(p, c)| ScoreRequest::new("sequence", ids(p), ids(c), limits).unwrap())
        .collect()
}

/// Each sequence's logprobs against the fixture's `key` list, within `tol`.
fn assert_scores(got: &[Vec<f32>], g: &serde_json::Value, key: &str, tol: f64, what: &str) {
    assert_eq!(
        got.len(),
        g[key].as_array().map_or(0, Vec::len),
        "{what}: sequences"
    );
    for (i, lp) in got.iter().enumerate() {
        assert_close(lp, &floats(&g[key][i]), tol, &format!("{what} seq {i}"));
    }
}

#[test]
fn scoring_matches_policy_and_reference_logprobs() {
    let g = step();
    let reqs = step_requests(&g);
    let mut engine = tiny();
    let base = engine.score(&reqs, st(1.0)).unwrap();
    assert_scores(&base, &g, "ref_logp", 1e-5, "ref_logp");
    engine
        .load_adapter(&golden_dir().join("tiny_adapter"))
        .unwrap();
    let policy = engine.score(&reqs, st(1.0)).unwrap();
    assert_scores(&policy, &g, "policy_logp", 1e-5, "policy_logp");
    // Unloading the adapter returns exactly to the base model.
    engine.set_adapter(None).unwrap();
    assert_eq!(engine.score(&reqs, st(1.0)).unwrap(), base);
}

#[test]
fn scoring_in_a_batch_equals_one_by_one() {
    let g = step();
    let reqs = step_requests(&g);
    let engine = tiny();
    let together = engine.score(&reqs, st(1.0)).unwrap();
    for (i, r) in reqs.iter().enumerate() {
        let alone = engine.score(std::slice::from_ref(r), st(1.0)).unwrap();
        let want: Vec<f64> = alone[0].iter().map(|&x| x as f64).collect();
        assert_close(
            &together[i],
            &want,
            1e-5,
            &format!("seq {i} batched vs alone"),
        );
    }
}

#[test]
fn adapter_save_and_reload_is_bit_identical() {
    let engine = tiny();
    let src = golden_dir().join("tiny_adapter");
    let adapter = LoraAdapter::load(&src, engine.config(), engine.device()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path()).unwrap();
    let again = LoraAdapter::load(dir.path(), engine.config(), engine.device()).unwrap();
    assert_eq!(adapter.config, again.config);
    assert_eq!(adapter.pairs.len(), 14);
    let original =
        candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let saved =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(original.len(), saved.len());
    for (key, t) in &original {
        let s = saved
            .get(key)
            .unwrap_or_else(|| panic!("saved adapter lacks {key}"));
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        assert_eq!(bits(t), bits(s), "{key} changed in the round trip");
    }
}

/// The GRPO loss of the fixture (TRL's formula) over differentiable logprobs.
fn grpo_loss(g: &serde_json::Value, logp: &Tensor, offsets: &[usize]) -> Tensor {
    let beta = g["beta"].as_f64().unwrap();
    let eps = g["epsilon"].as_f64().unwrap();
    let adv = floats(&g["advantages"]);
    let mut per_seq = Vec::new();
    for (i, a) in adv.iter().enumerate() {
        let lp = logp
            .narrow(0, offsets[i], offsets[i + 1] - offsets[i])
            .unwrap();
        let f32s = |v: Vec<f64>| {
            Tensor::new(
                v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                logp.device(),
            )
            .unwrap()
        };
        let old = f32s(floats(&g["old_logp"][i]));
        let refp = f32s(floats(&g["ref_logp"][i]));
        let ratio = (&lp - &old).unwrap().exp().unwrap();
        let s1 = (&ratio * *a).unwrap();
        let s2 = (ratio.clamp(1.0 - eps, 1.0 + eps).unwrap() * *a).unwrap();
        let surr = s1.minimum(&s2).unwrap();
        let d = (&refp - &lp).unwrap();
        let kl = ((d.exp().unwrap() - &d).unwrap() - 1.0).unwrap();
        let per_tok = ((kl * beta).unwrap() - surr).unwrap();
        per_seq.push(per_tok.mean_all().unwrap());
    }
    Tensor::stack(&per_seq, 0).unwrap().mean_all().unwrap()
}

fn l2(t: &Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt()
}

#[test]
fn lora_gradients_match_peft() {
    check_lora_gradients(&tiny(), 1e-5, 1e-3);
}

/// The same step with the frozen weights in bf16 (cuBLAS on a GPU, the CPU kernel, or the f32
/// path on a CPU without AVX512-BF16): logprobs and loss within 5e-2, gradients within 2e-2
/// relative.
#[test]
fn lora_gradients_match_peft_in_bf16() {
    let engine = Engine::load(&golden_dir().join("tiny_llama"), &device(), DType::BF16).unwrap();
    if model::bf16::runs_on(engine.device()) {
        assert!(engine.transformer().is_bf16_packed());
    } else {
        eprintln!("no bf16 kernel on this CPU: the f32 fallback of dtype bf16 is what was tested");
    }
    check_lora_gradients(&engine, 5e-2, 2e-2);
}

fn check_lora_gradients(engine: &Engine, logp_tol: f64, grad_tol: f32) {
    let g = step();
    let reqs = step_requests(&g);
    let adapter = LoraAdapter::load(
        &golden_dir().join("tiny_adapter"),
        engine.config(),
        engine.device(),
    )
    .unwrap();
    let (vars, named) = trainable_of(&adapter);
    let out = engine.train_logprobs(&reqs, &vars, st(1.0)).unwrap();
    // The differentiable forward gives the policy logprobs too.
    let flat = out.logprobs.to_vec1::<f32>().unwrap();
    for i in 0..reqs.len() {
        assert_close(
            &flat[out.offsets[i]..out.offsets[i + 1]],
            &floats(&g["policy_logp"][i]),
            logp_tol,
            "train logp",
        );
    }
    let loss = grpo_loss(&g, &out.logprobs, &out.offsets);
    let want_loss = g["loss"].as_f64().unwrap();
    let got_loss = loss.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (got_loss - want_loss).abs() < logp_tol,
        "loss {got_loss} vs {want_loss}"
    );
    let grads = loss.backward().unwrap();
    let reference: HashMap<String, Tensor> = candle_core::safetensors::load(
        golden_dir().join("tiny_lora_grads.safetensors"),
        engine.device(),
    )
    .unwrap();
    assert_eq!(reference.len(), named.len());
    for (key, var) in &named {
        let want = reference
            .get(key)
            .unwrap_or_else(|| panic!("reference lacks {key}"));
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {key}"));
        let diff = l2(&(got - want).unwrap());
        let norm = l2(want);
        assert!(norm > 0.0, "{key}: zero reference gradient");
        assert!(
            diff / norm < grad_tol,
            "{key}: relative gradient error {}",
            diff / norm
        );
    }
}

#[test]
fn lora_gradients_match_finite_differences_in_f64() {
    let g = step();
    let reqs = step_requests(&g);
    let engine = Engine::load(&golden_dir().join("tiny_llama"), &device(), DType::F64).unwrap();
    let adapter = LoraAdapter::load(
        &golden_dir().join("tiny_adapter"),
        engine.config(),
        engine.device(),
    )
    .unwrap();
    let to64 = |a: &LoraAdapter| LoraAdapter {
        config: a.config.clone(),
        pairs: a
            .pairs
            .iter()
            .map(|(k, p)| {
                (
                    *k,
                    LoraPair {
                        a: p.a.to_dtype(DType::F64).unwrap(),
                        b: p.b.to_dtype(DType::F64).unwrap(),
                    },
                )
            })
            .collect(),
    };
    let base = to64(&adapter);
    let n: usize = reqs.iter().map(|r| r.completion().len()).sum();
    // Weights of both signs, like advantages.
    let w: Vec<f64> = (0..n)
        .map(|i| ((i * 7 % 5) as f64 - 2.0) * 0.3 + 0.1)
        .collect();
    let w = Tensor::new(w, engine.device()).unwrap();
    let objective = |a: &LoraAdapter| -> f64 {
        let out = engine.train_logprobs(&reqs, a, st(1.0)).unwrap();
        (&out.logprobs * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let (vars, named) = trainable_of(&base);
    let out = engine.train_logprobs(&reqs, &vars, st(1.0)).unwrap();
    let grads = (&out.logprobs * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    for (key, var) in &named {
        let analytic = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let shape = var.as_tensor().dims().to_vec();
        for &idx in &[0usize, analytic.len() / 2, analytic.len() - 1] {
            let perturbed = |delta: f64| {
                let mut a = base.clone();
                let (layer, proj, ab) = a
                    .pairs
                    .keys()
                    .map(|&(l, p)| (l, p))
                    .flat_map(|(l, p)| ['A', 'B'].map(move |ab| (l, p, ab)))
                    .find(|&(l, p, ab)| model::lora::peft_key(l, p, ab) == *key)
                    .unwrap();
                let pair = a.pairs.get_mut(&(layer, proj)).unwrap();
                let t = if ab == 'A' { &mut pair.a } else { &mut pair.b };
                let mut v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                v[idx] += delta;
                *t = Tensor::from_vec(v, shape.clone(), engine.device()).unwrap();
                objective(&a)
            };
            let numeric = (perturbed(eps) - perturbed(-eps)) / (2.0 * eps);
            let err = (numeric - analytic[idx]).abs();
            assert!(
                err <= 1e-6 + 1e-5 * numeric.abs(),
                "{key}[{idx}]: finite difference {numeric:e} vs backward {:e}",
                analytic[idx]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 28 * 3);
}

#[test]
fn exported_merged_folder_scores_like_base_plus_adapter() {
    let g = step();
    let reqs = step_requests(&g);
    let dir = tempfile::tempdir().unwrap();
    let tiny_dir = golden_dir().join("tiny_llama");
    let adapter = golden_dir().join("tiny_adapter");
    // Merged: the folder alone reproduces PEFT's policy logprobs.
    let merged = dir.path().join("merged");
    let report = model::export_merged(&tiny_dir, Some(&adapter), &merged, DType::F32).unwrap();
    assert!(report.merged > 0, "the adapter's projections were merged");
    assert!(!report.tokenizer, "tiny_llama has no tokenizer to copy");
    let engine = Engine::load(&merged, &device(), DType::F32).unwrap();
    assert!(engine.adapter().is_none());
    assert_scores(
        &engine.score(&reqs, st(1.0)).unwrap(),
        &g,
        "policy_logp",
        1e-5,
        "merged policy_logp",
    );
    let config = read_json(&merged.join("config.json"));
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["tie_word_embeddings"], true);
    // Without an adapter: the reference model, and the same config as the source.
    let base = dir.path().join("base");
    let report = model::export_merged(&tiny_dir, None, &base, DType::F32).unwrap();
    assert_eq!(report.merged, 0);
    let engine = Engine::load(&base, &device(), DType::F32).unwrap();
    assert_eq!(engine.config(), tiny().config());
    assert_scores(
        &engine.score(&reqs, st(1.0)).unwrap(),
        &g,
        "ref_logp",
        1e-5,
        "exported ref_logp",
    );
    // bf16 weights: declared in config.json, loadable, close to f32.
    let half = dir.path().join("bf16");
    model::export_merged(&tiny_dir, Some(&adapter), &half, DType::BF16).unwrap();
    assert_eq!(
        read_json(&half.join("config.json"))["torch_dtype"],
        "bfloat16"
    );
    let engine = Engine::load(&half, &device(), DType::F32).unwrap();
    assert_scores(
        &engine.score(&reqs, st(1.0)).unwrap(),
        &g,
        "policy_logp",
        5e-2,
        "bf16 policy_logp",
    );
    // Never overwrites, and a failed export leaves nothing behind.
    let e = model::export_merged(&tiny_dir, None, &merged, DType::F32).unwrap_err();
    assert!(
        e.to_string().contains("already exists and is not empty"),
        "{e}"
    );
    let e = model::export_merged(
        &tiny_dir,
        Some(&tiny_dir),
        &dir.path().join("x"),
        DType::F32,
    )
    .unwrap_err();
    assert!(e.to_string().contains("adapter_config.json"), "{e}");
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !left.iter().any(|n| n.contains("tmp") || n == "x"),
        "{left:?}"
    );
}

/// With bf16 weights the adapter is applied unmerged in f32 for inference: scoring follows
/// PEFT's policy logprobs (within the bf16 bound), not the base's, and unloading returns to the
/// base.
#[test]
fn bf16_engine_applies_the_adapter_unmerged() {
    let g = step();
    let reqs = step_requests(&g);
    let mut engine =
        Engine::load(&golden_dir().join("tiny_llama"), &device(), DType::BF16).unwrap();
    let base = engine.score(&reqs, st(1.0)).unwrap();
    engine
        .load_adapter(&golden_dir().join("tiny_adapter"))
        .unwrap();
    let policy = engine.score(&reqs, st(1.0)).unwrap();
    let (mut to_policy, mut effect) = (0f64, 0f64);
    for (i, lp) in policy.iter().enumerate() {
        let want = floats(&g["policy_logp"][i]);
        let refp = floats(&g["ref_logp"][i]);
        assert_close(lp, &want, 5e-2, &format!("bf16 policy_logp seq {i}"));
        for t in 0..want.len() {
            to_policy = to_policy.max((lp[t] as f64 - want[t]).abs());
            effect = effect.max((want[t] - refp[t]).abs());
        }
    }
    assert!(
        to_policy < effect / 2.0,
        "the adapter's effect ({effect}) is visible beyond the bf16 error ({to_policy})"
    );
    engine.set_adapter(None).unwrap();
    assert_eq!(engine.score(&reqs, st(1.0)).unwrap(), base);
}

fn trainable_of(adapter: &LoraAdapter) -> (LoraAdapter, Vec<(String, candle_core::Var)>) {
    adapter.trainable(None).unwrap()
}
