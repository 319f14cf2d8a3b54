//! The bf16 path on the test device (`TEST_DEVICE`, default cpu): the product (our AVX512-BF16
//! kernel on the CPU, cuBLAS with an f32 output on a GPU) against exact products of the rounded
//! inputs on odd shapes, strided and batched inputs, and the backward; SmolLM2 with bf16 weights
//! against the transformers oracle (`../shared/golden/smollm2_reference.json`). On a CPU without
//! AVX512-BF16 the kernel tests say so and the engine tests check the f32 fallback of dtype
//! bf16 instead.
#![allow(clippy::unwrap_used)]

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use model::bf16::{Bf16Matrix, Packed};
use model::{Engine, ScoreRequest};

/// Whether the bf16 product runs on `dev`: always on a GPU; on the CPU when it has
/// AVX512-BF16 (said on stderr either way).
fn bf16_runs(dev: &Device) -> bool {
    if dev.is_cuda() {
        eprintln!("bf16 products on {:?}: cuBLAS, f32 output", dev.location());
        return true;
    }
    report_cpu()
}

fn report_cpu() -> bool {
    let amx = model::bf16::amx_bf16_status();
    eprintln!(
        "AMX-BF16: {}; AVX512-BF16: {}",
        amx.err()
            .unwrap_or_else(|| "present (no AMX kernel yet: the AVX512-BF16 one runs)".into()),
        model::bf16::available()
    );
    if !model::bf16::available() {
        eprintln!(
            "this CPU has no AVX512-BF16: the kernel is not tested here; the f32 fallback is"
        );
    }
    model::bf16::available()
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

/// `x @ w` in f64 over the given f32 values: `[m, k] x [k, n]`.
fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for kk in 0..k {
            let a = x[i * k + kk] as f64;
            for j in 0..n {
                out[i * n + j] += a * w[kk * n + j] as f64;
            }
        }
    }
    out
}

/// A tensor's values rounded to bf16 (kept in f32, on the CPU).
fn rounded(t: &Tensor) -> Tensor {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    Tensor::from_vec(round_bf16(&v), t.dims(), &Device::Cpu).unwrap()
}

/// `x @ w` (`[m, k] x [k, n]`, row-major f32) by the bf16 product on `dev`: the packed kernel
/// itself on the CPU, [`Bf16Matrix`] (cuBLAS) elsewhere.
fn product(dev: &Device, x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    if dev.is_cpu() {
        return Packed::from_k_n(w, k, n).matmul(x, m);
    }
    // The weight as stored is [out, in] = w^T.
    let wt = Tensor::from_vec(w.to_vec(), (k, n), dev)
        .unwrap()
        .t()
        .unwrap()
        .contiguous()
        .unwrap();
    let xt = Tensor::from_vec(x.to_vec(), (m, k), dev).unwrap();
    let y = Bf16Matrix::from_out_in(&wt).unwrap().forward(&xt).unwrap();
    assert_eq!(y.dims(), &[m, n]);
    y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn kernel_matches_f32_on_odd_shapes() {
    let dev = device();
    if !bf16_runs(&dev) {
        return skipped(
            "bf16::kernel_matches_f32_on_odd_shapes",
            "this CPU has no AVX512-BF16 (the f32 fallback is tested)",
        );
    }
    let sizes = [1, 7, 33, 577];
    // Last panels 1, 7, 24, 1, 18 and 1 columns wide: both halves of the column mask.
    let widths = [1, 7, 24, 33, 50, 577];
    for &m in &sizes {
        for &k in &sizes {
            for &n in &widths {
                let x = values(m * k, (m * 31 + k) as u64);
                let w = values(k * n, (k * 17 + n) as u64);
                let got = product(&dev, &x, &w, m, k, n);
                // Exact products of the bf16-rounded inputs, summed in f64: the kernel differs
                // only by f32 summation order.
                let exact = reference(&round_bf16(&x), &round_bf16(&w), m, k, n);
                // The true f32 product: bf16 rounding of both inputs (2^-9 relative each).
                let full = reference(&x, &w, m, k, n);
                for i in 0..m * n {
                    let (g, e, f) = (got[i] as f64, exact[i], full[i]);
                    assert!(
                        (g - e).abs() <= 1e-5 * (k as f64).sqrt() + 1e-6,
                        "{m}x{k}x{n} [{i}]: kernel {g} vs exact bf16 product {e}"
                    );
                    // Sum of k products of values in [-1, 1], each off by <= 2 * 2^-9.
                    assert!(
                        (g - f).abs() <= 4.0 * 2f64.powi(-9) * (k as f64).sqrt() + 1e-6,
                        "{m}x{k}x{n} [{i}]: kernel {g} vs f32 {f}"
                    );
                }
            }
        }
    }
}

#[test]
fn empty_shapes() {
    let dev = device();
    if !bf16_runs(&dev) {
        return skipped(
            "bf16::empty_shapes",
            "this CPU has no AVX512-BF16 (the f32 fallback is tested)",
        );
    }
    // k = 0: a sum of nothing.
    assert_eq!(product(&dev, &[], &[], 3, 0, 5), vec![0.0; 15]);
    // n = 0 and m = 0: nothing to write.
    assert!(product(&dev, &[1.0; 12], &[], 3, 4, 0).is_empty());
    assert!(product(&dev, &[], &[0.5; 20], 0, 4, 5).is_empty());
}

#[test]
fn strided_batched_inputs_and_the_backward() {
    let dev = device();
    if !bf16_runs(&dev) {
        return skipped(
            "bf16::strided_batched_inputs_and_the_backward",
            "this CPU has no AVX512-BF16 (the f32 fallback is tested)",
        );
    }
    let (out, inp) = (45, 33);
    // A weight as stored, [out, in].
    let w = Tensor::from_vec(values(out * inp, 5), (out, inp), &dev).unwrap();
    let w_r = rounded(&w);
    let m = Bf16Matrix::from_out_in(&w).unwrap();
    // Batched x [2, 7, in], built transposed so that it is strided.
    let xt = Tensor::from_vec(values(2 * inp * 7, 9), (2, inp, 7), &dev).unwrap();
    let x = xt.transpose(1, 2).unwrap();
    assert!(!x.is_contiguous());
    let got = m.forward(&x).unwrap();
    assert_eq!(got.dims(), &[2, 7, out]);
    assert!(
        got.device().same_device(&dev),
        "the product stays on its device"
    );
    let want = rounded(&x).broadcast_matmul(&w_r.t().unwrap()).unwrap();
    let err = max_abs_diff(&got.to_device(&Device::Cpu).unwrap(), &want);
    assert!(err < 1e-4, "forward max error {err}");
    // Backward: g [2, 7, out] @ W -> [2, 7, in].
    let g = Tensor::from_vec(values(2 * 7 * out, 11), (2, 7, out), &dev).unwrap();
    let got = m.backward(&g).unwrap();
    assert_eq!(got.dims(), &[2, 7, inp]);
    let want = rounded(&g).broadcast_matmul(&w_r).unwrap();
    let err = max_abs_diff(&got.to_device(&Device::Cpu).unwrap(), &want);
    assert!(err < 1e-4, "backward max error {err}");
    // A wrong feature count is an error, not a panic.
    let bad = Tensor::zeros((3, inp + 1), DType::F32, &dev).unwrap();
    let e = m.forward(&bad).unwrap_err();
    assert!(
        e.to_string()
            .contains("input has 34 features, the weight expects 33"),
        "{e}"
    );
}

/// SmolLM2 with bf16 weights: teacher-forced logprobs within 5e-2 of the f32 oracle, greedy ids
/// equal up to the first step whose top-2 margin (in the oracle) is below 0.1.
#[test]
fn smollm2_bf16_matches_the_oracle() {
    let dev = device();
    bf16_runs(&dev);
    let packed = model::bf16::runs_on(&dev);
    let engine = Engine::load(&smollm2_gguf(), &dev, DType::BF16).unwrap();
    assert_eq!(engine.transformer().is_bf16_packed(), packed);
    let reference = read_json(&golden_dir().join("smollm2_reference.json"));
    let cases = reference["generation_cases"].as_array().unwrap();
    let reqs: Vec<ScoreRequest> = cases
        .iter()
        .map(|c| {
            score_request(
                &engine,
                ids(&c["prompt_ids"]),
                ids(&c["greedy_completion_ids"]),
            )
        })
        .collect();
    let scored = engine.score(&reqs, st(1.0)).unwrap();
    let mut worst = 0f64;
    for (i, case) in cases.iter().enumerate() {
        for (t, w) in floats(&case["completion_logprobs"]).iter().enumerate() {
            let d = (scored[i][t] as f64 - w).abs();
            worst = worst.max(d);
            assert!(d <= 5e-2, "case {i} token {t}: {} vs {w}", scored[i][t]);
        }
    }
    eprintln!("bf16 teacher-forced logprobs: max |error| {worst:.2e} (bound 5e-2)");
    let prompts: Vec<Vec<u32>> = reqs.iter().map(|r| r.prompt().to_vec()).collect();
    let reqs: Vec<model::GenerateRequest> = prompts
        .iter()
        .map(|p| gen_request(&engine, p.clone(), params(0.0, 64)))
        .collect();
    let gens = engine.generate(&reqs).unwrap();
    for (i, (case, gen)) in cases.iter().zip(&gens).enumerate() {
        let want = ids(&case["greedy_completion_ids"]);
        let margins = floats(&case["greedy_step_margins"]);
        let steps = margins
            .iter()
            .position(|&m| m < 0.1)
            .unwrap_or(margins.len())
            .min(want.len())
            .min(64);
        assert_eq!(
            gen.tokens[..steps.min(gen.tokens.len())],
            want[..steps.min(gen.tokens.len())],
            "case {i}: greedy ids before the first near-tie (step {steps})"
        );
        assert!(gen.tokens.len() >= steps, "case {i}: stopped early");
    }
}
