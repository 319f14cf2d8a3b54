//! AdamW (PyTorch's `torch.optim.AdamW`: decoupled weight decay, bias-corrected moments), the
//! learning-rate schedule (linear warmup, then constant or cosine to zero) and global grad-norm
//! clipping. The state (moments and step) is plain vectors so a checkpoint holds it exactly and a
//! resumed run continues bit for bit.

use std::collections::BTreeMap;

use rl_core::config::LrSchedule;

pub const BETA1: f64 = 0.9;
pub const BETA2: f64 = 0.999;
pub const EPS: f64 = 1e-8;

/// The moments of one parameter tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// AdamW state over named parameters (PEFT key names).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AdamW {
    /// Optimizer steps taken so far.
    pub step: u64,
    pub moments: BTreeMap<String, Moments>,
}

impl AdamW {
    /// One update of `param` (in place) with gradient `grad`, at step `self.step` (call
    /// [`AdamW::begin_step`] once per optimizer step first).
    pub fn update(
        &mut self,
        name: &str,
        param: &mut [f32],
        grad: &[f32],
        lr: f64,
        weight_decay: f64,
    ) {
        let n = param.len();
        let m = self
            .moments
            .entry(name.to_string())
            .or_insert_with(|| Moments {
                m: vec![0.0; n],
                v: vec![0.0; n],
            });
        let t = self.step.max(1) as i32;
        let bc1 = 1.0 - BETA1.powi(t);
        let bc2 = 1.0 - BETA2.powi(t);
        let wd = (lr * weight_decay) as f32;
        let (b1, b2) = (BETA1 as f32, BETA2 as f32);
        // `1 - beta` rounded once from f64, as torch does: `1f32 - 0.999f32` is 0.00099998713,
        // which leaves v 1.3e-5 (relative) short of torch's (the AdamW fixture caught it).
        let (c1, c2) = ((1.0 - BETA1) as f32, (1.0 - BETA2) as f32);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        for i in 0..n {
            let g = grad[i];
            param[i] -= wd * param[i];
            m.m[i] = b1 * m.m[i] + c1 * g;
            m.v[i] = b2 * m.v[i] + c2 * g * g;
            let denom = m.v[i].sqrt() / bc2_sqrt + EPS as f32;
            param[i] -= step_size * m.m[i] / denom;
        }
    }

    /// Advances the step counter (bias corrections use the new value).
    pub fn begin_step(&mut self) {
        self.step += 1;
    }
}

/// The learning rate at optimizer step `step` (1-based) of `total`.
pub fn learning_rate(base: f64, schedule: LrSchedule, warmup: u64, step: u64, total: u64) -> f64 {
    if warmup > 0 && step <= warmup {
        return base * step as f64 / warmup as f64;
    }
    match schedule {
        LrSchedule::Constant => base,
        LrSchedule::Cosine => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let progress = ((step.saturating_sub(warmup)) as f64 / span).min(1.0);
            base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// The global L2 norm of all gradients, and the factor to scale them by so that it is at most
/// `max_norm` (1 when under it or when clipping is off).
pub fn clip_factor(grads: &[&[f32]], max_norm: Option<f64>) -> (f64, f64) {
    let sq: f64 = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| f64::from(x) * f64::from(x))
        .sum();
    let norm = sq.sqrt();
    let factor = match max_norm {
        Some(m) if norm > m => m / (norm + 1e-6),
        _ => 1.0,
    };
    (norm, factor)
}

/// One optimizer step over `vars` with the step's summed `grads`: the global norm clipped to
/// `max_grad_norm`, the learning rate of the step from the schedule (`total_steps` in the run),
/// AdamW. Returns the norm before clipping and the learning rate.
pub fn apply(
    opt: &mut AdamW,
    vars: &[(String, candle_core::Var)],
    grads: &mut [Vec<f32>],
    cfg: &rl_core::config::LearnerConfig,
    total_steps: u64,
) -> candle_core::Result<(f64, f64)> {
    let views: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
    let (grad_norm, factor) = clip_factor(&views, cfg.max_grad_norm);
    opt.begin_step();
    let lr = learning_rate(
        cfg.lr,
        cfg.schedule,
        u64::from(cfg.warmup_steps),
        opt.step,
        total_steps,
    );
    for ((name, var), grad) in vars.iter().zip(grads.iter_mut()) {
        if factor != 1.0 {
            for x in grad.iter_mut() {
                *x = (f64::from(*x) * factor) as f32;
            }
        }
        let t = var.as_tensor();
        let mut param = t.flatten_all()?.to_vec1::<f32>()?;
        opt.update(name, &mut param, grad, lr, cfg.weight_decay);
        var.set(&candle_core::Tensor::from_vec(
            param,
            t.shape(),
            t.device(),
        )?)?;
    }
    Ok((grad_norm, lr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_and_clipping() {
        assert_eq!(learning_rate(1.0, LrSchedule::Constant, 4, 2, 100), 0.5);
        assert_eq!(learning_rate(1.0, LrSchedule::Constant, 4, 50, 100), 1.0);
        assert_eq!(learning_rate(1.0, LrSchedule::Cosine, 0, 0, 100), 1.0);
        assert!((learning_rate(1.0, LrSchedule::Cosine, 0, 50, 100) - 0.5).abs() < 1e-12);
        assert!(learning_rate(1.0, LrSchedule::Cosine, 0, 100, 100).abs() < 1e-12);
        let (norm, f) = clip_factor(&[&[3.0, 0.0], &[4.0]], Some(1.0));
        assert!((norm - 5.0).abs() < 1e-12 && (f - 1.0 / (5.0 + 1e-6)).abs() < 1e-12);
        assert_eq!(clip_factor(&[&[0.3]], Some(1.0)).1, 1.0);
        assert_eq!(clip_factor(&[&[30.0]], None).1, 1.0);
    }
}
