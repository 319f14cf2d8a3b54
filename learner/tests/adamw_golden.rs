//! `tests/fixtures/adamw_golden.json`, made by `make_adamw_golden.py` with PyTorch's own
//! `torch.optim.AdamW` (single-tensor, weight decay 0.1) and `torch.nn.utils.clip_grad_norm_`:
//! five steps on two f32 parameters with a warmup-then-cosine learning rate and global grad-norm
//! clipping (steps 1, 3 and 5 clipped). Checks `learner::optim` against it the way
//! `train.rs` drives it: the learning rate, the clip norm and the clipped gradients, the
//! parameters after every step, and the moments and step count after the last.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use learner::optim::{self, AdamW, BETA1, BETA2, EPS};
use rl_core::config::LrSchedule;
use serde::Deserialize;

/// Parameters, absolute. They are all under 1.23 in magnitude, where one f32 ulp is 1.19e-7.
/// Both sides run the step in f32 with the same operations in a different order and with scalars
/// rounded differently (torch: `param.mul_(1 - lr * wd)`, `exp_avg.lerp_(grad, 1 - beta1)`,
/// `param.addcdiv_(exp_avg, denom, value=-step_size)`, its scalars computed in f64 and rounded
/// once), so a faithful f32 implementation lands within about an ulp of torch: a numpy float32
/// replay of this fixture in our update's operation order, with `1 - beta` rounded from f64 as
/// torch does, is at most 1.19e-7 (1 ulp) off over the five steps. 2.5e-7 is about 2 ulps.
/// `1.0 - BETA2` taken in f32 instead (0.99998713e-3, not 1e-3) moves `v` by 1.3e-5 relative and
/// the parameters by up to 4.8e-7: this catches it.
const PARAM_TOL: f64 = 2.5e-7;

/// Moments, relative to the largest magnitude in the tensor (m about 0.07, v about 3.7e-4):
/// elements near zero carry the cancellation of `lerp` against our weighted sum, so an
/// element-wise relative bound would measure that instead. The numpy float32 replay is 1.1e-7
/// (m) and 2.1e-7 (v) off.
const MOMENT_TOL: f64 = 1e-6;

/// The grad norm: torch sums in f32 (6.6e-8 relative from our f64 sum on this fixture), and the
/// clipped gradients, whose factor torch takes in f32 (1.35e-7 relative here).
const NORM_RTOL: f64 = 1e-6;

/// The schedule: the same f64 formula, up to an ulp of `cos` or of `pi * progress`.
const LR_RTOL: f64 = 1e-12;

#[derive(Deserialize)]
struct Golden {
    torch_version: String,
    betas: [f64; 2],
    eps: f64,
    weight_decay: f64,
    schedule: Schedule,
    max_norm: f64,
    /// The parameters in the order torch's param group holds them.
    names: Vec<String>,
    initial: BTreeMap<String, Vec<f32>>,
    steps: Vec<Step>,
    final_state: BTreeMap<String, State>,
}

#[derive(Deserialize)]
struct Schedule {
    kind: String,
    base_lr: f64,
    warmup: u64,
    total: u64,
}

#[derive(Deserialize)]
struct Step {
    lr: f64,
    /// What `clip_grad_norm_` returned (f32).
    total_norm: f64,
    /// The raw gradients, before clipping.
    grads: BTreeMap<String, Vec<f32>>,
    /// The gradients after clipping, as `opt.step()` saw them.
    clipped_grads: BTreeMap<String, Vec<f32>>,
    /// The parameters after the step.
    params: BTreeMap<String, Vec<f32>>,
}

#[derive(Deserialize)]
struct State {
    step: f64,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
}

fn golden() -> Golden {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adamw_golden.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let g: Golden = serde_json::from_str(&text).unwrap();
    assert_eq!(g.betas, [BETA1, BETA2], "fixture betas");
    assert_eq!(g.eps, EPS, "fixture eps");
    assert_eq!(g.schedule.kind, "cosine");
    g
}

/// What our side computed at one step.
struct Ours {
    norm: f64,
    factor: f64,
    /// The gradients after scaling by `factor`.
    grads: BTreeMap<String, Vec<f32>>,
    /// The parameters after the update.
    params: BTreeMap<String, Vec<f32>>,
}

/// Replays the fixture's steps through `learner::optim` as `train.rs` does: norm and factor over
/// all raw gradients, `begin_step`, then each parameter's gradients scaled (when clipped) and
/// updated at torch's learning rate.
fn replay(g: &Golden) -> (AdamW, Vec<Ours>) {
    let mut opt = AdamW::default();
    let mut params = g.initial.clone();
    let mut out = Vec::new();
    for step in &g.steps {
        let views: Vec<&[f32]> = g.names.iter().map(|n| step.grads[n].as_slice()).collect();
        let (norm, factor) = optim::clip_factor(&views, Some(g.max_norm));
        opt.begin_step();
        let mut grads = BTreeMap::new();
        for name in &g.names {
            let mut grad = step.grads[name].clone();
            if factor != 1.0 {
                for x in grad.iter_mut() {
                    *x = (f64::from(*x) * factor) as f32;
                }
            }
            let param = params.get_mut(name).unwrap();
            assert_eq!(param.len(), grad.len(), "{name}");
            opt.update(name, param, &grad, step.lr, g.weight_decay);
            grads.insert(name.clone(), grad);
        }
        out.push(Ours {
            norm,
            factor,
            grads,
            params: params.clone(),
        });
    }
    (opt, out)
}

#[test]
fn schedule_norm_and_clipping_match_torch() {
    let g = golden();
    let (_, ours) = replay(&g);
    let clipped: Vec<bool> = ours.iter().map(|o| o.factor != 1.0).collect();
    assert!(
        clipped.contains(&true) && clipped.contains(&false),
        "the fixture should clip some steps and not others: {clipped:?}"
    );
    for (i, (step, o)) in g.steps.iter().zip(&ours).enumerate() {
        let t = i as u64 + 1;
        let lr = optim::learning_rate(
            g.schedule.base_lr,
            LrSchedule::Cosine,
            g.schedule.warmup,
            t,
            g.schedule.total,
        );
        assert!(
            (lr - step.lr).abs() <= LR_RTOL * step.lr,
            "step {t}: lr {lr} vs torch's {}",
            step.lr
        );
        assert!(
            (o.norm - step.total_norm).abs() <= NORM_RTOL * step.total_norm,
            "step {t}: grad norm {} vs torch's {}",
            o.norm,
            step.total_norm
        );
        assert_eq!(
            o.factor != 1.0,
            step.total_norm > g.max_norm,
            "step {t}: clipped or not"
        );
        for name in &g.names {
            for (j, (a, b)) in o.grads[name]
                .iter()
                .zip(&step.clipped_grads[name])
                .enumerate()
            {
                let (a, b) = (f64::from(*a), f64::from(*b));
                assert!(
                    (a - b).abs() <= NORM_RTOL * b.abs(),
                    "step {t}: clipped grad {name}[{j}] {a} vs torch's {b}"
                );
            }
        }
    }
}

#[test]
fn parameters_match_torch_after_every_step() {
    let g = golden();
    let (_, ours) = replay(&g);
    for (i, (step, o)) in g.steps.iter().zip(&ours).enumerate() {
        for name in &g.names {
            let (have, want) = (&o.params[name], &step.params[name]);
            assert_eq!(have.len(), want.len(), "{name}");
            for (j, (a, b)) in have.iter().zip(want).enumerate() {
                let d = (f64::from(*a) - f64::from(*b)).abs();
                assert!(
                    d <= PARAM_TOL,
                    "step {}: {name}[{j}] = {a} vs torch {} {b} (|diff| {d:e})",
                    i + 1,
                    g.torch_version
                );
            }
        }
    }
}

#[test]
fn final_moments_match_torch() {
    let g = golden();
    let (opt, _) = replay(&g);
    assert_eq!(opt.step, g.steps.len() as u64);
    assert_eq!(opt.step, 5);
    for name in &g.names {
        let state = &g.final_state[name];
        assert_eq!(state.step, 5.0, "{name}: torch's step");
        let m = &opt.moments[name];
        for (what, have, want) in [("m", &m.m, &state.exp_avg), ("v", &m.v, &state.exp_avg_sq)] {
            assert_eq!(have.len(), want.len(), "{name}.{what}");
            let scale = want.iter().fold(0f64, |s, x| s.max(f64::from(x.abs())));
            for (j, (a, b)) in have.iter().zip(want).enumerate() {
                let d = (f64::from(*a) - f64::from(*b)).abs();
                assert!(
                    d <= MOMENT_TOL * scale,
                    "{name}.{what}[{j}] = {a} vs torch {} {b} (|diff| {:e} of the largest)",
                    g.torch_version,
                    d / scale
                );
            }
        }
    }
}
