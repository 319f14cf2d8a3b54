//! The fused kernels of the backward against candle's composed ops.

use super::*;
use candle_core::Device;

/// The composed reference: softmax(q k^T / sqrt(hd) + mask) v with grouped heads.
fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    let rep = nh / nkv;
    let k = k.contiguous()?;
    let v = v.contiguous()?;
    let scores = (q.reshape((b, nkv, rep * t, hd))?.matmul(&k.t()?)? / (hd as f64).sqrt())?
        .reshape((b, nkv, rep, t, s))?
        .broadcast_add(mask)?;
    candle_nn::ops::softmax_last_dim(&scores)?
        .reshape((b, nkv, rep * t, s))?
        .matmul(&v)?
        .reshape((b, nh, t, hd))
}

/// A causal mask with left padding `pad[b]` over `t` queries at cache offset `s - t`.
fn causal_mask(pad: &[usize], t: usize, s: usize) -> Result<Tensor> {
    let mut m = Vec::new();
    for &p in pad {
        for i in 0..t {
            let col = s - t + i;
            for j in 0..s {
                let ok = (j >= p && j <= col) || j == col;
                m.push(if ok { 0f32 } else { f32::NEG_INFINITY });
            }
        }
    }
    Tensor::from_vec(m, (pad.len(), 1, 1, t, s), &Device::Cpu)
}

#[test]
fn fused_attention_matches_the_composed_ops() -> Result<()> {
    let dev = Device::Cpu;
    // (batch, heads, kv heads, queries, keys, head size, left padding per row)
    type Case = (usize, usize, usize, usize, usize, usize, &'static [usize]);
    let cases: &[Case] = &[
        (1, 9, 3, 1, 1, 64, &[0]),
        (2, 9, 3, 7, 7, 64, &[0, 3]),
        (3, 4, 2, 33, 33, 128, &[0, 5, 32]),
        (2, 9, 3, 1, 300, 64, &[0, 17]), // a decode step
        (1, 6, 2, 150, 577, 64, &[2]),   // a chunk after a prefix
    ];
    for &(b, nh, nkv, t, s, hd, pad) in cases {
        let q = Tensor::randn(0f32, 1.0, (b, nh, t, hd), &dev)?;
        // k and v as views of a larger cache (strided over batch and heads).
        let cache = Tensor::randn(0f32, 1.0, (2, b, nkv, s + 5, hd), &dev)?;
        let k = cache.get(0)?.narrow(2, 0, s)?;
        let v = cache.get(1)?.narrow(2, 2, s)?;
        let mask = causal_mask(pad, t, s)?;
        let want = composed(&q, &k, &v, &mask)?;
        let got = fused_attention(&q, &k, &v, &mask)?.expect("the fused path applies");
        let err = (got - &want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(
            err < 1e-5,
            "case b{b} nh{nh} t{t} s{s} hd{hd}: max error {err}"
        );
        // One mask for the whole batch (broadcast).
        let mask1 = causal_mask(&[0], t, s)?;
        let want = composed(&q, &k, &v, &mask1)?;
        let got = fused_attention(&q, &k, &v, &mask1)?.expect("the fused path applies");
        let err = (got - &want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(err < 1e-5, "broadcast mask b{b} t{t} s{s}: max error {err}");
    }
    Ok(())
}

#[test]
fn fused_attention_declines_what_it_does_not_cover() -> Result<()> {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (1, 2, 3, 32), &dev)?; // head size 32
    let k = Tensor::randn(0f32, 1.0, (1, 1, 3, 32), &dev)?;
    let mask = causal_mask(&[0], 3, 3)?;
    assert!(fused_attention(&q, &k, &k, &mask)?.is_none());
    let q64 = Tensor::randn(0f64, 1.0, (1, 2, 3, 64), &dev)?; // f64
    let k64 = Tensor::randn(0f64, 1.0, (1, 1, 3, 64), &dev)?;
    assert!(fused_attention(&q64, &k64, &k64, &mask.to_dtype(DType::F64)?)?.is_none());
    Ok(())
}

/// Runs `f` on `inputs` as f32 variables (the fused CPU kernels) and as f64 ones (candle's
/// composed ops, which the f64 finite-difference tests check), backpropagates
/// `sum(f(..) * r)` for a fixed `r` (`sin(0.37 i)`), and returns the largest difference of the
/// outputs and of each input's gradient, relative to that gradient's largest entry.
fn fused_vs_composed<const N: usize>(
    inputs: [&Tensor; N],
    f: impl Fn([&Tensor; N]) -> Result<Tensor>,
) -> Result<(f64, [f64; N])> {
    let run = |dt: DType| -> Result<(Tensor, Vec<Tensor>)> {
        let vars = inputs
            .iter()
            .map(|t| candle_core::Var::from_tensor(&t.to_dtype(dt)?))
            .collect::<Result<Vec<_>>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let Ok(arr) = <[&Tensor; N]>::try_from(ts.iter().collect::<Vec<_>>()) else {
            candle_core::bail!("arity")
        };
        let y = f(arr)?;
        let n = y.elem_count() as u32;
        let r = (Tensor::arange(0u32, n, y.device())?.to_dtype(DType::F64)? * 0.37)?
            .sin()?
            .reshape(y.dims())?
            .to_dtype(dt)?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let g = ts
            .iter()
            .map(|t| {
                grads
                    .get(t)
                    .cloned()
                    .ok_or(candle_core::Error::Msg("no grad".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((y.to_dtype(DType::F64)?, g))
    };
    let (y32, g32) = run(DType::F32)?;
    let (y64, g64) = run(DType::F64)?;
    let max = |t: &Tensor| -> Result<f64> { t.abs()?.max_all()?.to_scalar::<f64>() };
    let dy = max(&(y32 - &y64)?)? / max(&y64)?.max(1e-30);
    let mut dg = [0f64; N];
    for (i, (a, b)) in g32.iter().zip(&g64).enumerate() {
        dg[i] = max(&(a.to_dtype(DType::F64)? - b)?)? / max(b)?.max(1e-30);
    }
    Ok((dy, dg))
}

#[test]
fn fused_backwards_match_the_composed_ops() -> Result<()> {
    let dev = Device::Cpu;
    // RMSNorm over rows of 576 (lane remainder 0) and 37 (remainder 5).
    for n in [576, 37] {
        let x = (Tensor::randn(0f32, 1.0, (3, 5, n), &dev)? * 3.0)?;
        let w = Tensor::randn(1f32, 0.2, n, &dev)?;
        let (dy, [dx]) = fused_vs_composed([&x], |[x]| rms_norm(x, &w.to_dtype(x.dtype())?, 1e-5))?;
        assert!(
            dy < 1e-5 && dx < 1e-5,
            "rms_norm n={n}: output {dy:e}, dx {dx:e}"
        );
    }
    // SwiGLU's product, including large |gate| where the sigmoid saturates.
    let gate = (Tensor::randn(0f32, 1.0, (4, 1000), &dev)? * 6.0)?;
    let up = Tensor::randn(0f32, 1.0, (4, 1000), &dev)?;
    let (dy, [dg, du]) = fused_vs_composed([&gate, &up], |[g, u]| silu_mul(g, u))?;
    assert!(
        dy < 1e-6 && dg < 1e-5 && du < 1e-5,
        "silu_mul: {dy:e} {dg:e} {du:e}"
    );
    // Attention (the softmax backward), grouped heads, left padding.
    let (b, nh, nkv, t, hd) = (2, 6, 2, 19, 64);
    let q = Tensor::randn(0f32, 1.0, (b, nh, t, hd), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (b, nkv, t, hd), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (b, nkv, t, hd), &dev)?;
    let mask = causal_mask(&[0, 4], t, t)?;
    let (dy, [dq, dk, dv]) = fused_vs_composed([&q, &k, &v], |[q, k, v]| {
        attention(q, k, v, &mask.to_dtype(q.dtype())?)
    })?;
    assert!(
        dy < 1e-5 && dq < 1e-5 && dk < 1e-5 && dv < 1e-5,
        "attention: {dy:e} {dq:e} {dk:e} {dv:e}"
    );
    Ok(())
}

#[test]
fn silu_mul_forward_is_candles_to_the_bit() -> Result<()> {
    let dev = Device::Cpu;
    let gate = (Tensor::randn(0f32, 1.0, (3, 4097), &dev)? * 8.0)?;
    let up = Tensor::randn(0f32, 1.0, (3, 4097), &dev)?;
    let want = (gate.silu()? * &up)?.flatten_all()?.to_vec1::<f32>()?;
    let got = silu_mul(&gate, &up)?.flatten_all()?.to_vec1::<f32>()?;
    assert!(want
        .iter()
        .zip(&got)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    Ok(())
}
