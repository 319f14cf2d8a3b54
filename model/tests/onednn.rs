//! The oneDNN backend's products ([`model::onednn::DnnlMatrix`]) against exact f64 products of
//! the same values (rounded to bf16 for bf16 weights) on odd shapes, strided and batched inputs,
//! and the backward; and the backend decision itself. Runs where oneDNN opens (scripts/test
//! installs it and sets `MATMUL_BACKEND=onednn`, so a missing library fails there); with
//! `MATMUL_BACKEND=native` the product tests report themselves skipped (`common::skipped`) and
//! check that the decision says so.
#![allow(clippy::unwrap_used)]

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, values};
use model::onednn::{self, Backend, DnnlMatrix};

/// oneDNN when this process uses it; `None` (`test` reported as skipped, and checked to be what
/// the environment asked for) otherwise.
fn lib(test: &str) -> Option<&'static onednn::Dnnl> {
    let status = onednn::status();
    eprintln!("matmul backend: {}", status.description);
    match onednn::library() {
        Ok(Some(lib)) => Some(lib),
        Ok(None) => {
            assert_eq!(status.backend, Backend::Native);
            assert!(
                status.description.starts_with("native ("),
                "the fallback says why: {}",
                status.description
            );
            common::skipped(
                &format!("onednn::{test}"),
                &format!(
                    "oneDNN is not used in this process ({})",
                    status.description
                ),
            );
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn round(v: &[f32], bf16: bool) -> Vec<f32> {
    v.iter()
        .map(|&x| {
            if bf16 {
                half::bf16::from_f32(x).to_f32()
            } else {
                x
            }
        })
        .collect()
}

/// `x @ w^T` in f64: `x` `[m, k]`, `w` `[n, k]` (a weight as stored).
fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k)
                .map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64)
                .sum();
        }
    }
    out
}

#[test]
fn products_match_f64_on_odd_shapes_in_f32_and_bf16() {
    let Some(lib) = lib("products_match_f64_on_odd_shapes_in_f32_and_bf16") else {
        return;
    };
    let sizes = [1, 7, 33, 577];
    for bf16 in [false, true] {
        for &m in &sizes {
            for &k in &sizes {
                for &n in &[1, 24, 50, 577] {
                    let w = values(n * k, (k * 17 + n) as u64);
                    let x = values(m * k, (m * 31 + k) as u64);
                    let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
                    let mat = DnnlMatrix::from_out_in(lib, &wt, bf16).unwrap();
                    assert_eq!((mat.k(), mat.n(), mat.is_bf16()), (k, n, bf16));
                    let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
                    let got = mat.forward(&xt).unwrap();
                    assert_eq!(got.dims(), &[m, n]);
                    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    // Exact products of the values oneDNN multiplies (bf16-rounded for a bf16
                    // weight), summed in f64: oneDNN differs by f32 summation order only.
                    let exact = reference(&round(&x, bf16), &round(&w, bf16), m, k, n);
                    let tol = if bf16 { 1e-5 } else { 2e-6 } * (k as f64).sqrt() + 1e-6;
                    for (i, (&g, &e)) in got.iter().zip(&exact).enumerate() {
                        assert!(
                            (g as f64 - e).abs() <= tol,
                            "bf16={bf16} {m}x{k}x{n} [{i}]: oneDNN {g} vs exact {e}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn strided_batched_inputs_and_the_backward() {
    let Some(lib) = lib("strided_batched_inputs_and_the_backward") else {
        return;
    };
    let (out, inp) = (45, 33);
    for bf16 in [false, true] {
        let w = values(out * inp, 5);
        let wt = Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu).unwrap();
        let w_r = Tensor::from_vec(round(&w, bf16), (out, inp), &Device::Cpu).unwrap();
        let mat = DnnlMatrix::from_out_in(lib, &wt, bf16).unwrap();
        // x [2, 7, in], strided (built transposed).
        let xt = Tensor::from_vec(values(2 * inp * 7, 9), (2, inp, 7), &Device::Cpu).unwrap();
        let x = xt.transpose(1, 2).unwrap();
        assert!(!x.is_contiguous());
        let x_r = {
            let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            Tensor::from_vec(round(&v, bf16), (2, 7, inp), &Device::Cpu).unwrap()
        };
        let got = mat.forward(&x).unwrap();
        assert_eq!(got.dims(), &[2, 7, out]);
        let want = x_r.broadcast_matmul(&w_r.t().unwrap()).unwrap();
        let err = max_abs_diff(&got, &want);
        assert!(err < 1e-4, "bf16={bf16} forward max error {err}");
        // Backward: g [2, 7, out] @ W -> [2, 7, in], from the same (rounded) weight values.
        let gv = values(2 * 7 * out, 11);
        let g = Tensor::from_vec(gv.clone(), (2, 7, out), &Device::Cpu).unwrap();
        let g_r = Tensor::from_vec(round(&gv, bf16), (2, 7, out), &Device::Cpu).unwrap();
        let got = mat.backward(&g).unwrap();
        assert_eq!(got.dims(), &[2, 7, inp]);
        let want = g_r.broadcast_matmul(&w_r).unwrap();
        let err = max_abs_diff(&got, &want);
        assert!(err < 1e-4, "bf16={bf16} backward max error {err}");
        // The input's dtype comes back.
        let y = mat.forward(&x.to_dtype(DType::F64).unwrap()).unwrap();
        assert_eq!(y.dtype(), DType::F64);
        // A wrong feature count is an error, not a panic.
        let bad = Tensor::zeros((3, inp + 1), DType::F32, &Device::Cpu).unwrap();
        let e = mat.forward(&bad).unwrap_err();
        assert!(
            e.to_string()
                .contains("input has 34 features, the weight expects 33"),
            "{e}"
        );
    }
}

#[test]
fn the_backend_names_its_isa_and_kernels() {
    let Some(lib) = lib("the_backend_names_its_isa_and_kernels") else {
        return;
    };
    let status = onednn::status();
    assert_eq!(status.backend, Backend::OneDnn);
    assert_eq!(status.isa, Some(lib.isa()));
    assert!(
        status.description.contains(lib.isa()),
        "{}",
        status.description
    );
    let wt = Tensor::from_vec(values(64 * 32, 3), (64, 32), &Device::Cpu).unwrap();
    let f32_impl = DnnlMatrix::from_out_in(lib, &wt, false)
        .unwrap()
        .implementation(16)
        .unwrap();
    eprintln!(
        "f32 matmul: {f32_impl}; bf16 matmul: {:?}",
        onednn::bf16_kernel()
    );
    // On the x86-64 CPUs this project runs on (AVX2 at least), oneDNN has a JIT kernel for f32
    // and a run on its reference loop would be a silent slowdown.
    assert!(!f32_impl.starts_with("ref"), "{f32_impl}");
}
