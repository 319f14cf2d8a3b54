//! `golden/grpo_loss.json`: advantages, the masked per-token loss, the three reductions, mean KL
//! and clip fraction of every case, in f64 within 1e-9, on the device `TEST_DEVICE` names
//! (default cpu).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// The suite's device (`TEST_DEVICE`); one that cannot be opened fails the test.
fn device() -> Device {
    model::test_device().unwrap_or_else(|e| panic!("{e}"))
}
use learner::grpo::{self, Objective};
use rl_core::config::{ImportanceLevel, LossType, ScaleRewards};

fn golden() -> serde_json::Value {
    let dir = std::env::var_os("GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden"));
    serde_json::from_str(&std::fs::read_to_string(dir.join("grpo_loss.json")).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

const TOL: f64 = 1e-9;

/// The three reductions, by the oracles' names.
const REDUCTIONS: [(&str, LossType); 3] = [
    ("grpo", LossType::Grpo),
    ("dr_grpo", LossType::DrGrpo),
    ("dapo", LossType::Dapo),
];

/// Asserts `got` and `want` have the same length and agree within `tol` element by element.
fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() < tol, "{what} [{k}]: {a} vs {b}");
    }
}

#[test]
fn every_case_matches_the_oracle() {
    let g = golden();
    let group = g["group_size"].as_u64().unwrap() as usize;
    let rewards = floats(&g["rewards"]);
    let masks: Vec<Vec<f64>> = g["mask"].as_array().unwrap().iter().map(floats).collect();
    let lens: Vec<usize> = masks
        .iter()
        .map(|m| m.iter().filter(|x| **x > 0.0).count())
        .collect();
    // The masks are prefixes: the ragged sequences are the first `len` tokens of each row.
    for (m, &l) in masks.iter().zip(&lens) {
        assert!(m[..l].iter().all(|x| *x == 1.0) && m[l..].iter().all(|x| *x == 0.0));
    }
    let ragged = |key: &str| -> Vec<f64> {
        g[key]
            .as_array()
            .unwrap()
            .iter()
            .zip(&lens)
            .flat_map(|(row, &l)| floats(row)[..l].to_vec())
            .collect()
    };
    let (logp, old, reference) = (ragged("logp"), ragged("old_logp"), ragged("ref_logp"));
    let mut offsets = vec![0];
    for l in &lens {
        offsets.push(offsets.last().unwrap() + l);
    }
    let dev = device();
    let mut checked = 0;
    for case in g["cases"].as_array().unwrap() {
        let scale = match case["scale_rewards"].as_str().unwrap() {
            "group" => ScaleRewards::Group,
            "none" => ScaleRewards::None,
            other => panic!("scale {other}"),
        };
        let adv = grpo::advantages(&rewards, group, scale);
        for (a, b) in adv.iter().zip(floats(&case["advantages"])) {
            assert!((a - b).abs() < TOL, "advantage {a} vs {b}");
        }
        let obj = Objective {
            beta: case["beta"].as_f64().unwrap(),
            epsilon_low: case["epsilon_low"].as_f64().unwrap(),
            epsilon_high: case["epsilon_high"].as_f64().unwrap(),
            level: ImportanceLevel::Token,
        };
        for (name, lt) in REDUCTIONS {
            let weights = grpo::sequence_weights(&lens, &vec![false; lens.len()], lt);
            let lp = Tensor::new(logp.as_slice(), &dev).unwrap();
            let t = grpo::terms(
                &lp,
                &grpo::Tokens::new(&offsets, &old, &reference, &adv, &weights).unwrap(),
                obj,
            )
            .unwrap();
            let loss = t.loss.to_scalar::<f64>().unwrap();
            let want = case["loss"][name].as_f64().unwrap();
            assert!((loss - want).abs() < TOL, "{name}: {loss} vs {want}");
            let per_token = t.per_token.to_vec1::<f64>().unwrap();
            for (s, row) in case["per_token_loss"]
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
            {
                let want = floats(row);
                for k in 0..lens[s] {
                    let got = per_token[offsets[s] + k];
                    assert!(
                        (got - want[k]).abs() < TOL,
                        "per-token loss [{s}][{k}]: {got} vs {}",
                        want[k]
                    );
                }
            }
            let mean_kl = t.kl_sum / t.tokens;
            assert!(
                (mean_kl - case["mean_kl"].as_f64().unwrap()).abs() < TOL,
                "mean kl {mean_kl}"
            );
            let clip = t.clipped / t.tokens;
            // The oracle's clip fraction went through float32 (`clipped.float()`).
            assert!(
                (clip - case["clip_fraction"].as_f64().unwrap()).abs() < 1e-7,
                "clip fraction {clip}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 12);
}

#[test]
fn micro_batches_sum_to_the_whole_step() {
    // Splitting sequences between micro-batches changes nothing: weights are per step, and a
    // sequence-level ratio (GSPO) never spans two micro-batches.
    let lens = [3usize, 1, 4, 2];
    let offsets = [0usize, 3, 4, 8, 10];
    let logp: Vec<f64> = (0..10).map(|i| -0.1 * (i as f64 + 1.0)).collect();
    let old: Vec<f64> = logp.iter().map(|x| x + 0.05).collect();
    let reference: Vec<f64> = logp.iter().map(|x| x - 0.02).collect();
    let adv = [1.0, -0.5, 0.25, -1.0];
    let dev = device();
    for (lt, level) in [LossType::Grpo, LossType::DrGrpo, LossType::Dapo]
        .into_iter()
        .flat_map(|lt| {
            [
                (lt, ImportanceLevel::Token),
                (lt, ImportanceLevel::Sequence),
            ]
        })
    {
        let obj = Objective {
            beta: 0.04,
            epsilon_low: 0.2,
            epsilon_high: 0.28,
            level,
        };
        let w = grpo::sequence_weights(&lens, &[false, false, true, false], lt);
        let run = |from: usize, to: usize| {
            let (a, b) = (offsets[from], offsets[to]);
            let off: Vec<usize> = offsets[from..=to].iter().map(|o| o - a).collect();
            let t = grpo::terms(
                &Tensor::new(&logp[a..b], &dev).unwrap(),
                &grpo::Tokens::new(
                    &off,
                    &old[a..b],
                    &reference[a..b],
                    &adv[from..to],
                    &w[from..to],
                )
                .unwrap(),
                obj,
            )
            .unwrap();
            t.loss.to_scalar::<f64>().unwrap()
        };
        let whole = run(0, 4);
        let split = run(0, 1) + run(1, 3) + run(3, 4);
        assert!(
            (whole - split).abs() < 1e-15,
            "{lt:?} {level:?}: {whole} vs {split}"
        );
        assert_eq!(w[2], 0.0, "a masked sequence weighs nothing");
    }
}

/// A fixture of our own (`tests/fixtures/`, made by the script beside it) over ragged
/// sequences: the JSON, each sequence's length and the offsets of the concatenation.
struct Ragged {
    g: serde_json::Value,
    lens: Vec<usize>,
    offsets: Vec<usize>,
}

impl Ragged {
    fn load(name: &str) -> Self {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let g: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let lens: Vec<usize> = g["lens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let mut offsets = vec![0];
        for l in &lens {
            offsets.push(offsets.last().unwrap() + l);
        }
        Self { g, lens, offsets }
    }

    /// Rows of numbers, concatenated.
    fn flat(v: &serde_json::Value) -> Vec<f64> {
        v.as_array().unwrap().iter().flat_map(floats).collect()
    }
}

/// `fixtures/tis_golden.json` (made by `make_tis_golden.py` beside it, TRL's formula in PyTorch
/// f64): the truncated importance-sampling weights, how many were cut, and with them the loss and
/// its gradient for every live token, per cap and reduction, within 1e-9.
#[test]
fn truncated_importance_sampling_matches_the_oracle() {
    let Ragged { g, lens, offsets } = Ragged::load("tis_golden.json");
    let flat = |key: &str| Ragged::flat(&g[key]);
    let (logp, old, sampler, reference) = (
        flat("logp"),
        flat("old_logp"),
        flat("sampler_logp"),
        flat("ref_logp"),
    );
    let adv = floats(&g["advantages"]);
    let obj = Objective {
        beta: g["beta"].as_f64().unwrap(),
        epsilon_low: g["epsilon_low"].as_f64().unwrap(),
        epsilon_high: g["epsilon_high"].as_f64().unwrap(),
        level: ImportanceLevel::Token,
    };
    let dev = device();
    let mut checked = 0;
    for case in g["cases"].as_array().unwrap() {
        let cap = case["cap"].as_f64().unwrap();
        let (weights, cut) = grpo::tis_weights(&old, &sampler, cap);
        let want = Ragged::flat(&case["weights"]);
        assert_close(&weights, &want, 1e-12, &format!("cap {cap}: weight"));
        let cut = cut.iter().filter(|&&c| c).count();
        assert_eq!(
            cut as u64,
            case["cut"].as_u64().unwrap(),
            "cap {cap}: tokens cut"
        );
        assert!(
            cut > 0,
            "every case cuts some weights (the fixture is built so)"
        );
        for (name, lt) in REDUCTIONS {
            let w = grpo::sequence_weights(&lens, &vec![false; lens.len()], lt);
            let lp = candle_core::Var::new(logp.as_slice(), &dev).unwrap();
            let loss_with = |tis: Option<&[f64]>| {
                let tokens = grpo::Tokens::new(&offsets, &old, &reference, &adv, &w).unwrap();
                let tokens = match tis {
                    Some(weights) => tokens.with_tis(weights.to_vec()).unwrap(),
                    None => tokens,
                };
                grpo::terms(lp.as_tensor(), &tokens, obj).unwrap().loss
            };
            let t = loss_with(Some(&weights));
            let loss = t.to_scalar::<f64>().unwrap();
            let want_loss = case["loss"][name].as_f64().unwrap();
            assert!(
                (loss - want_loss).abs() < TOL,
                "cap {cap} {name}: loss {loss} vs {want_loss}"
            );
            let grads = t.backward().unwrap();
            let grad = grads.get(lp.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
            let want = Ragged::flat(&case["grad"][name]);
            assert_close(&grad, &want, TOL, &format!("cap {cap} {name}: grad"));
            // Without the weights the loss differs: the oracle really pins them.
            let plain = loss_with(None).to_scalar::<f64>().unwrap();
            assert!((plain - want_loss).abs() > 1e-6, "cap {cap} {name}");
            checked += 1;
        }
    }
    assert_eq!(checked, 9);
}

/// `fixtures/gspo_golden.json` (made by `make_gspo_golden.py` beside it, TRL's
/// `importance_sampling_level="sequence"` in PyTorch f64): with one clipped ratio per sequence,
/// the loss, its gradient for every live token, the clipped fraction and the mean KL, per pair of
/// epsilons (GSPO's 3e-4 / 4e-4 and GRPO's 0.2 / 0.28) and reduction, within 1e-9.
#[test]
fn sequence_level_ratio_matches_the_gspo_oracle() {
    let Ragged { g, lens, offsets } = Ragged::load("gspo_golden.json");
    let flat = |key: &str| Ragged::flat(&g[key]);
    let (logp, old, reference) = (flat("logp"), flat("old_logp"), flat("ref_logp"));
    let adv = floats(&g["advantages"]);
    let dev = device();
    let mut checked = 0;
    for case in g["cases"].as_array().unwrap() {
        let (lo, hi) = (
            case["epsilon_low"].as_f64().unwrap(),
            case["epsilon_high"].as_f64().unwrap(),
        );
        for (name, lt) in REDUCTIONS {
            let w = grpo::sequence_weights(&lens, &vec![false; lens.len()], lt);
            let lp = candle_core::Var::new(logp.as_slice(), &dev).unwrap();
            let terms_at = |level| {
                grpo::terms(
                    lp.as_tensor(),
                    &grpo::Tokens::new(&offsets, &old, &reference, &adv, &w).unwrap(),
                    Objective {
                        beta: g["beta"].as_f64().unwrap(),
                        epsilon_low: lo,
                        epsilon_high: hi,
                        level,
                    },
                )
                .unwrap()
            };
            let t = terms_at(ImportanceLevel::Sequence);
            let loss = t.loss.to_scalar::<f64>().unwrap();
            let want = case["loss"][name].as_f64().unwrap();
            assert!(
                (loss - want).abs() < TOL,
                "eps {lo}/{hi} {name}: loss {loss} vs {want}"
            );
            let grad = t
                .loss
                .backward()
                .unwrap()
                .get(lp.as_tensor())
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let want_grad = Ragged::flat(&case["grad"][name]);
            assert_close(
                &grad,
                &want_grad,
                TOL,
                &format!("eps {lo}/{hi} {name}: grad"),
            );
            let clip = t.clipped / t.tokens;
            let want_clip = case["clip_fraction"].as_f64().unwrap();
            assert!(
                (clip - want_clip).abs() < 1e-12,
                "clip fraction {clip} vs {want_clip}"
            );
            let kl = t.kl_sum / t.tokens;
            assert!(
                (kl - case["mean_kl"].as_f64().unwrap()).abs() < TOL,
                "mean kl {kl}"
            );
            // The token-level ratio gives another loss: the oracle pins the level.
            let token = terms_at(ImportanceLevel::Token)
                .loss
                .to_scalar::<f64>()
                .unwrap();
            assert!((token - want).abs() > 1e-6, "eps {lo}/{hi} {name}");
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
}
