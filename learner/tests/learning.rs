//! The learner end to end on the tiny model: `learner check` against the PyTorch/PEFT oracle, a
//! finite-difference check of the loss in f64, the direction GRPO moves, exact resume across
//! processes, and crash safety of checkpoints. On the device `TEST_DEVICE` names (default cpu).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::*;
use learner::grpo::{self, Objective};
use model::{LoraAdapter, ScoreRequest};
use rl_core::config::{Config, ImportanceLevel, LossType, ScaleRewards};

/// The learner binary, on the suite's device.
fn learner_bin(subcommand: &str) -> Command {
    let mut cmd = Command::new(learner_exe());
    cmd.arg(subcommand).args(["--device", &device_name()]);
    cmd
}

fn l2(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

#[test]
fn check_matches_the_peft_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let grads_out = dir.path().join("grads.safetensors");
    let out = learner_bin("check")
        .arg("--model")
        .arg(tiny_path())
        .arg("--adapter")
        .arg(golden().join("tiny_adapter"))
        .arg("--batch")
        .arg(golden().join("tiny_grpo_step.json"))
        .arg("--grads-out")
        .arg(&grads_out)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden().join("tiny_grpo_step.json")).unwrap(),
    )
    .unwrap();
    let (loss, want) = (
        printed["loss"].as_f64().unwrap(),
        fixture["loss"].as_f64().unwrap(),
    );
    assert!((loss - want).abs() < 1e-5, "loss {loss} vs {want}");
    let kl = printed["mean_kl"].as_f64().unwrap();
    assert!(
        (kl - fixture["mean_kl"].as_f64().unwrap()).abs() < 1e-6,
        "mean kl {kl}"
    );
    let got = candle_core::safetensors::load(&grads_out, &Device::Cpu).unwrap();
    let reference =
        candle_core::safetensors::load(golden().join("tiny_lora_grads.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(got.len(), reference.len());
    for (key, want) in &reference {
        let g = got
            .get(key)
            .unwrap_or_else(|| panic!("no gradient for {key}"));
        let rel = l2(&(g - want).unwrap()) / l2(want);
        assert!(rel < 1e-3, "{key}: relative error {rel}");
    }
}

/// Central differences of the loss against LoRA entries, in f64, with tokens on both clip
/// branches and advantages of both signs.
#[test]
fn loss_gradient_matches_finite_differences_in_f64() {
    let engine = tiny(DType::F64);
    let adapter = LoraAdapter::load(
        &golden().join("tiny_adapter"),
        engine.config(),
        engine.device(),
    )
    .unwrap();
    let (trainable, vars) = adapter.trainable(Some(DType::F64)).unwrap();
    let reqs: Vec<ScoreRequest> = [
        (PROMPTS[0], vec![30u32, 31, 32, 33]),
        (PROMPTS[0], vec![40, 41, 42]),
        (PROMPTS[1], vec![50, 51, 52, 53]),
        (PROMPTS[1], vec![60, 61]),
    ]
    .iter()
    .map(|(p, c)| score_request(&engine, p.to_vec(), c.clone()))
    .collect();
    let base = engine.train_logprobs(&reqs, &trainable, st(1.0)).unwrap();
    let current = base.logprobs.to_vec1::<f64>().unwrap();
    // Old logprobs put ratios at 1.5 (above 1 + eps_high), 0.5 (below 1 - eps_low) and 1.05
    // (inside), far from the kinks.
    let shifts = [-(1.5f64.ln()), -(0.5f64.ln()), -(1.05f64.ln())];
    let old: Vec<f64> = current
        .iter()
        .enumerate()
        .map(|(i, c)| c + shifts[i % 3])
        .collect();
    let reference: Vec<f64> = current.iter().map(|c| c - 0.1).collect();
    let rewards = [1.0, 0.0, 0.0, 1.0];
    let adv = grpo::advantages(&rewards, 2, ScaleRewards::Group);
    assert!(adv.iter().any(|a| *a > 0.0) && adv.iter().any(|a| *a < 0.0));
    let lens: Vec<usize> = reqs.iter().map(|r| r.completion().len()).collect();
    let weights = grpo::sequence_weights(&lens, &[false; 4], LossType::Grpo);
    let obj = Objective {
        beta: 0.04,
        epsilon_low: 0.2,
        epsilon_high: 0.28,
        level: ImportanceLevel::Token,
    };
    let loss_of = |with: &LoraAdapter| {
        let out = engine.train_logprobs(&reqs, with, st(1.0)).unwrap();
        let tokens = grpo::Tokens::new(&out.offsets, &old, &reference, &adv, &weights).unwrap();
        grpo::terms(&out.logprobs, &tokens, obj).unwrap()
    };
    let t = loss_of(&trainable);
    assert!(
        t.clipped > 0.0 && t.clipped < t.tokens,
        "both clip branches: {} of {} clipped",
        t.clipped,
        t.tokens
    );
    let grads = t.loss.backward().unwrap();
    let h = 1e-6;
    let mut checked = 0;
    for (name, var) in vars.iter().filter(|(n, _)| {
        n.contains("layers.0.self_attn.q_proj") || n.contains("layers.1.mlp.down_proj")
    }) {
        let analytic = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let original = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for idx in [0, original.len() / 2, original.len() - 1] {
            let eval = |delta: f64| {
                let mut p = original.clone();
                p[idx] += delta;
                var.set(&Tensor::from_vec(p, var.as_tensor().shape(), var.device()).unwrap())
                    .unwrap();
                let l = loss_of(&trainable).loss.to_scalar::<f64>().unwrap();
                var.set(
                    &Tensor::from_vec(original.clone(), var.as_tensor().shape(), var.device())
                        .unwrap(),
                )
                .unwrap();
                l
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            let a = analytic[idx];
            assert!(
                (fd - a).abs() <= 1e-6 + 1e-4 * a.abs(),
                "{name}[{idx}]: analytic {a} vs finite difference {fd}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 12);
}

fn sum_logprobs(l: &learner::Learner, seqs: &[ScoreRequest]) -> Vec<f64> {
    let out = l
        .engine()
        .train_logprobs(seqs, l.adapter(), sampling::ScoreTemperature::ONE)
        .unwrap();
    let flat = out.logprobs.to_vec1::<f32>().unwrap();
    (0..seqs.len())
        .map(|i| {
            flat[out.offsets[i]..out.offsets[i + 1]]
                .iter()
                .map(|&x| f64::from(x))
                .sum()
        })
        .collect()
}

#[tokio::test]
async fn training_raises_the_rewarded_completion_and_lowers_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let store = make_db(&dir.path().join("r.sqlite"), 1).await;
    let batch = learner::load_batch(&store, 0, 0, config_temperature())
        .await
        .unwrap();
    let config = Config::from_yaml(
        &config_yaml(20),
        "test",
        &[
            "learner.steps_per_iteration=1".into(),
            "learner.beta=0".into(),
        ],
    )
    .unwrap()
    .config;
    let mut l = learner::Learner::new(tiny(DType::F32), &config, "tiny").unwrap();
    let seqs: Vec<ScoreRequest> = batch.groups[0]
        .iter()
        .map(|s| score_request(l.engine(), s.prompt.clone(), s.completion.clone()))
        .collect();
    let before = sum_logprobs(&l, &seqs);
    for _ in 0..20 {
        let reports = l.train_iteration(0, &batch).unwrap();
        assert_eq!(reports.len(), 1);
        assert!(reports[0].loss.is_finite() && reports[0].grad_norm > 0.0);
    }
    let after = sum_logprobs(&l, &seqs);
    let rewarded = batch.groups[0]
        .iter()
        .position(|s| s.reward == 1.0)
        .unwrap();
    for i in 0..seqs.len() {
        if i == rewarded {
            assert!(
                after[i] > before[i] + 0.05,
                "rewarded completion {i}: {} -> {}",
                before[i],
                after[i]
            );
        } else {
            assert!(
                after[i] < before[i] - 0.01,
                "unrewarded completion {i}: {} -> {}",
                before[i],
                after[i]
            );
        }
    }
    assert_eq!(l.step(), 20);
}

fn train_cli(
    db: &Path,
    iteration: u32,
    adapter_in: &str,
    out: &Path,
    cfg: &Path,
    failpoint: bool,
) -> std::process::Output {
    let mut cmd = learner_bin("train");
    cmd.arg("--db")
        .arg(db)
        .args(["--iteration", &iteration.to_string(), "--model"])
        .arg(tiny_path());
    cmd.args(["--adapter-in", adapter_in, "--out"])
        .arg(out)
        .arg("--config")
        .arg(cfg);
    if failpoint {
        cmd.env(
            learner::checkpoint::FAILPOINT_ENV,
            "checkpoint-before-rename",
        );
    }
    cmd.output().unwrap()
}

fn tensors(dir: &Path) -> HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[tokio::test]
async fn resuming_between_iterations_is_bit_identical_and_crashes_leave_no_half_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rollouts.sqlite");
    let store = make_db(&db, 3).await;
    let cfg_path = dir.path().join("config.yaml");
    std::fs::write(&cfg_path, config_yaml(3)).unwrap();
    let config = Config::load(&cfg_path, &[]).unwrap().config;

    // Uninterrupted: one learner, three iterations in memory.
    let mut whole = learner::Learner::new(
        tiny(DType::F32),
        &config,
        &tiny_path().display().to_string(),
    )
    .unwrap();
    let mut steps = Vec::new();
    for it in 0..3 {
        let batch = learner::load_batch(&store, it, 0, config_temperature())
            .await
            .unwrap();
        steps.extend(whole.train_iteration(it, &batch).unwrap());
    }
    store.close().await;
    let whole_dir = dir.path().join("whole");
    whole.save(&whole_dir, 2).unwrap();

    // Stopped after every iteration: three processes, each resuming from the last checkpoint;
    // the second is killed while writing its checkpoint, then run again.
    let ck = dir.path().join("checkpoints");
    let it0 = ck.join("iter_0");
    let out = train_cli(&db, 0, "none", &it0, &cfg_path, false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let it0_before = tensors(&it0);
    let it1 = ck.join("iter_1");
    let crashed = train_cli(&db, 1, &it0.display().to_string(), &it1, &cfg_path, true);
    assert!(
        !crashed.status.success(),
        "the failpoint aborts the learner"
    );
    assert!(!it1.exists(), "no half checkpoint under the real name");
    let partial: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".iter_1.tmp-"))
        .collect();
    assert_eq!(
        partial.len(),
        1,
        "the partial checkpoint is left in a hidden temporary folder"
    );
    assert_eq!(
        tensors(&it0),
        it0_before,
        "the previous checkpoint is intact"
    );
    // A resumed run ignores and removes the partial one.
    let out = train_cli(&db, 1, &it0.display().to_string(), &it1, &cfg_path, false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read_dir(&ck).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".tmp-")));
    let it2 = ck.join("iter_2");
    let out = train_cli(&db, 2, &it1.display().to_string(), &it2, &cfg_path, false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Retraining into an existing checkpoint is refused.
    let again = train_cli(&db, 2, &it1.display().to_string(), &it2, &cfg_path, false);
    assert!(
        !again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("already exists")
    );

    assert_eq!(
        tensors(&it2),
        tensors(&whole_dir),
        "stop-and-resume equals the uninterrupted run, bit for bit"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(it2.join("training_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["global_step"], serde_json::json!(whole.step()));
    let moments_a =
        candle_core::safetensors::load(it2.join("optimizer.safetensors"), &Device::Cpu).unwrap();
    let moments_b =
        candle_core::safetensors::load(whole_dir.join("optimizer.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(moments_a.len(), moments_b.len());
    for (k, t) in &moments_a {
        assert_eq!(
            t.to_vec1::<f32>().unwrap(),
            moments_b[k].to_vec1::<f32>().unwrap(),
            "{k}"
        );
    }

    // The store has every step's metrics (as the uninterrupted run computed them) and the
    // checkpoints with their sha256.
    let store = rl_store::Store::open(&db).await.unwrap();
    let mut stored = Vec::new();
    for it in 0..3 {
        stored.extend(store.train_metrics(it).await.unwrap());
    }
    assert_eq!(stored.len(), steps.len());
    for (a, b) in stored.iter().zip(&steps) {
        assert_eq!(
            (a.step, a.loss, a.grad_norm, a.lr),
            (b.step, b.loss, b.grad_norm, b.lr)
        );
    }
    let ckpts = store.checkpoints().await.unwrap();
    assert_eq!(
        ckpts.iter().map(|c| c.iteration).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(
        ckpts[2].sha256,
        rl_core::files::sha256(&it2.join("adapter_model.safetensors")).unwrap()
    );
    // Odd iterations had a zero-variance group: it was filtered and reported.
    assert!(steps.iter().any(|m| m.zero_std_fraction == 0.5));
}

/// Truncated importance sampling in a real step: with the sampler's logprobs set to the
/// learner's own at the starting adapter minus 1 on every third token, each step reports that
/// mismatch (mean and max) and cuts exactly those tokens' weights `e^1` to `tis_cap: 2`; with
/// `tis_cap: null` nothing is cut and the gradient differs.
#[tokio::test]
async fn importance_weights_follow_the_sampler_logprobs_and_are_reported_per_step() {
    let dir = tempfile::tempdir().unwrap();
    let store = make_db(&dir.path().join("r.sqlite"), 1).await;
    let mut batch = learner::load_batch(&store, 0, 0, config_temperature())
        .await
        .unwrap();
    let overrides = |tis: &str| -> Config {
        Config::from_yaml(
            &config_yaml(1),
            "test",
            &[
                "learner.steps_per_iteration=1".into(),
                "learner.filter_zero_variance=false".into(),
                format!("learner.tis_cap={tis}"),
            ],
        )
        .unwrap()
        .config
    };
    let config = overrides("2");
    let temperature = batch.temperature;
    let fresh = |c: &Config| learner::Learner::new(tiny(DType::F32), c, "tiny").unwrap();
    let l = fresh(&config);
    let (mut shifted, mut tokens) = (0usize, 0usize);
    for group in &mut batch.groups {
        let seqs: Vec<ScoreRequest> = group
            .iter()
            .map(|s| score_request(l.engine(), s.prompt.clone(), s.completion.clone()))
            .collect();
        let out = l
            .engine()
            .train_logprobs(&seqs, l.adapter(), temperature)
            .unwrap();
        let own = out.logprobs.to_vec1::<f32>().unwrap();
        for (i, s) in group.iter_mut().enumerate() {
            s.sampler = own[out.offsets[i]..out.offsets[i + 1]]
                .iter()
                .enumerate()
                .map(|(k, &x)| if k % 3 == 0 { x - 1.0 } else { x })
                .collect();
            shifted += s.sampler.len().div_ceil(3);
            tokens += s.sampler.len();
        }
    }
    let mut with_tis = fresh(&config);
    let reports = with_tis.train_iteration(0, &batch).unwrap();
    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    let want_mean = shifted as f64 / tokens as f64;
    let mean = r.sampler_mismatch_mean.unwrap();
    assert!(
        (mean - want_mean).abs() < 1e-6,
        "mismatch mean {mean} vs {want_mean}"
    );
    let max = r.sampler_mismatch_max.unwrap();
    assert!((max - 1.0).abs() < 1e-6, "mismatch max {max}");
    let cut = r.tis_clip_fraction.unwrap();
    assert_eq!(cut, want_mean, "the shifted tokens, and only they, are cut");

    let mut without = fresh(&overrides("null"));
    let plain = without.train_iteration(0, &batch).unwrap();
    assert_eq!(plain[0].tis_clip_fraction, None);
    assert_eq!(plain[0].sampler_mismatch_mean, r.sampler_mismatch_mean);
    // At the starting adapter the ratio is 1 and a group's advantages sum to 0, so the loss
    // barely moves; the gradient does (the weighted tokens pull up to twice as hard).
    let (a, b) = (plain[0].grad_norm, r.grad_norm);
    assert!(
        (a - b).abs() > 0.01 * a,
        "the weights change the gradient: norm {a} vs {b}"
    );
}

/// No rollout more than `async.max_lag` policy versions old, or from a later policy, is ever
/// trained on: `load_batch` refuses it, naming the rollout and the fix.
#[tokio::test]
async fn rollouts_older_than_max_lag_versions_are_never_trained_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.sqlite");
    // Iterations 0 and 1 with the base model and 2 with iter_0, as `async.max_lag: 1` samples;
    // 3 with iter_3, its own checkpoint, which cannot exist before it is trained.
    let store = make_db_sampled_with(&db, 4, |it| match it {
        2 => Some(0),
        3 => Some(3),
        _ => None,
    })
    .await;
    for it in [0, 1, 2] {
        learner::load_batch(&store, it, 1, config_temperature())
            .await
            .unwrap();
    }
    let e = learner::load_batch(&store, 2, 0, config_temperature())
        .await
        .unwrap_err()
        .to_string();
    for says in [
        "iteration 2 group 0 attempt 0: it was sampled with the checkpoint of iteration 0",
        "iterations 1..=1",
        "async.max_lag = 0",
        "resume with the max_lag the run was sampled with",
    ] {
        assert!(e.contains(says), "`{says}` not in: {e}");
    }
    // Iteration 3 cannot have been sampled with its own checkpoint.
    let e = learner::load_batch(&store, 3, 1, config_temperature())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the checkpoint of iteration 3") && e.contains("iterations 1..=2"),
        "{e}"
    );
}
