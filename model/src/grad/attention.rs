//! Attention for the training forward: masked softmax attention over grouped-query heads whose
//! probabilities are recomputed in the backward rather than kept ([`attention`]), its fused
//! forward on the CPU (no `[b, nh, t, s]` tensor), and the softmax backward.

use candle_core::{DType, Result, Storage, Tensor, D};

use super::{attach3, on_cpu_f32, on_cpu_f32s, rows_per_task, softmax_last_dim, when};

/// The softmax backward of attention, `(dp - sum(dp p)) p scale` per row: one pass per row
/// ([`simd::softmax_backward`]) on the CPU in f32, candle's ops elsewhere.
fn softmax_backward(dp: &Tensor, p: &Tensor, scale: f64) -> Result<Tensor> {
    let s = dp.dim(D::Minus1)?;
    if dp.dims() == p.dims() && s > 0 {
        let p = p.contiguous()?;
        let ds = on_cpu_f32s([dp, &p], |[dp, p]| {
            use rayon::prelude::*;
            let mut ds = dp.to_vec();
            ds.par_chunks_mut(s)
                .zip(p.par_chunks(s))
                .with_min_len(rows_per_task(s))
                .for_each(|(d, p)| crate::simd::softmax_backward(d, p, scale as f32));
            ds
        })?;
        if let Some(ds) = ds {
            return Tensor::from_vec(ds, dp.dims(), dp.device());
        }
    }
    let dot = (dp * p)?.sum_keepdim(D::Minus1)?;
    ((dp.broadcast_sub(&dot))? * p)? * scale
}

/// Masked softmax attention with grouped-query heads; the probabilities are recomputed in the
/// backward rather than kept. q `[b, nh, t, hd]`, k/v `[b, nkv, s, hd]`, mask additive
/// `[b, 1, 1, t, s]` -> `[b, nh, t, hd]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let probs = |q: &Tensor, k: &Tensor, mask: &Tensor| -> Result<Tensor> {
        let (b, nh, t, hd) = q.dims4()?;
        let nkv = k.dim(1)?;
        let rep = nh / nkv;
        let q2 = q.reshape((b, nkv, rep * t, hd))?;
        let scores = q2.matmul(&k.t()?)?; // [b, nkv, rep*t, s]
        masked_softmax(&scores, mask, 1.0 / (hd as f64).sqrt(), t)
    };
    let (b, nh, t, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    // A decode step (one new token per row) is a handful of tiny products per head, which the
    // composed ops pay per call; longer blocks keep them (gemm's tiles reuse the keys).
    let fused = if t == 1 {
        fused_attention(&qd, &kd, &vd, mask)?
    } else {
        None
    };
    let y = match fused {
        Some(y) => y,
        None => probs(&qd, &kd, mask)?
            .matmul(&vd)?
            .reshape((b, nh, t, hd))?,
    };
    let mask = mask.clone();
    attach3((q, k, v), y, move |q, k, v, g| {
        let scale = 1.0 / (hd as f64).sqrt();
        let rep = nh / nkv;
        let p = probs(q, k, &mask)?; // [b, nkv, rep*t, s]
        let g2 = g.reshape((b, nkv, rep * t, hd))?;
        let dv = when(v.track_op(), || p.t()?.matmul(&g2))?; // [b, nkv, s, hd]
        if !(q.track_op() || k.track_op()) {
            return Ok((None, None, dv));
        }
        let dp = g2.matmul(&v.t()?)?; // [b, nkv, rep*t, s]
        let ds = softmax_backward(&dp, &p, scale)?;
        let dq = when(q.track_op(), || ds.matmul(k)?.reshape((b, nh, t, hd)))?;
        let dk = when(k.track_op(), || {
            ds.t()?.matmul(&q.reshape((b, nkv, rep * t, hd))?)
        })?;
        Ok((dq, dk, dv))
    })
}

/// The f32 values behind a CPU tensor and the offset and strides of its layout; `None` for
/// other devices or dtypes.
fn cpu_f32(storage: &Storage) -> Option<&[f32]> {
    match storage {
        Storage::Cpu(cpu) => cpu.as_slice::<f32>().ok(),
        _ => None,
    }
}

/// Query rows of one head group per attention task.
const ATTENTION_ROWS: usize = 64;

/// The forward of [`attention`] by [`simd::attention`] on the CPU in f32 (head size 64 or 128),
/// one task per head group and batch row: no `[b, nh, t, s]` tensor, no per-head matmul calls,
/// no copy of the cache. `None` where it does not apply.
pub(super) fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
) -> Result<Option<Tensor>> {
    let (b, nh, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    let (mb, m1, m2, mt, ms) = mask.dims5()?;
    let applies = q.device().is_cpu()
        && [q, k, v, mask].iter().all(|x| x.dtype() == DType::F32)
        && (hd == 64 || hd == 128)
        && nkv > 0
        && nh % nkv == 0
        && (mb == 1 || mb == b)
        && (m1, m2, mt, ms) == (1, 1, t, s)
        && v.dims4()? == (b, nkv, s, hd);
    if !applies {
        return Ok(None);
    }
    let (q, mask) = (q.contiguous()?, mask.contiguous()?);
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (ms_, ml) = mask.storage_and_layout();
    let (Some(qx), Some(kx), Some(vx), Some(mx)) =
        (cpu_f32(&qs), cpu_f32(&ks), cpu_f32(&vs), cpu_f32(&ms_))
    else {
        return Ok(None);
    };
    // k and v: rows of hd contiguous values, any batch and head strides (a view of the cache).
    let (kst, vst) = (kl.stride(), vl.stride());
    if kst[3] != 1 || kst[2] != hd || vst[3] != 1 || vst[2] != hd {
        return Ok(None);
    }
    let qx = &qx[ql.start_offset()..];
    let mx = &mx[ml.start_offset()..];
    let rep = nh / nkv;
    let group_rows = rep * t;
    let mut out = vec![0f32; b * nh * t * hd];
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    let ok = {
        use rayon::prelude::*;
        out.par_chunks_mut(group_rows * hd)
            .enumerate()
            .flat_map(|(bg, group)| {
                group
                    .par_chunks_mut(ATTENTION_ROWS * hd)
                    .enumerate()
                    .map(move |(c, o)| (bg, c, o))
            })
            .all(|(bg, c, o)| {
                let (bi, g) = (bg / nkv, bg % nkv);
                let row0 = c * ATTENTION_ROWS;
                let q0 = (bg * group_rows + row0) * hd;
                let k0 = kl.start_offset() + bi * kst[0] + g * kst[1];
                let v0 = vl.start_offset() + bi * vst[0] + g * vst[1];
                let m0 = if mb == 1 { 0 } else { bi * t * s };
                let parts = (
                    qx.get(q0..q0 + o.len()),
                    kx.get(k0..k0 + s * hd),
                    vx.get(v0..v0 + s * hd),
                    mx.get(m0..m0 + t * s),
                );
                let (Some(qr), Some(kr), Some(vr), Some(mr)) = parts else {
                    return false;
                };
                crate::simd::attention(qr, kr, vr, mr, (t, hd, row0), scale, o)
            })
    };
    if !ok {
        return Ok(None);
    }
    Tensor::from_vec(out, (b, nh, t, hd), q.device()).map(Some)
}

/// `softmax(scores * scale + mask)` over the last dim. scores `[b, nkv, rep*t, s]`, mask additive
/// `[b or 1, 1, 1, t, s]`: query row `r` of a head uses mask row `r % t` -> scores' shape. On the
/// CPU in f32, one pass per row ([`simd::softmax`]); otherwise candle's ops.
fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64, t: usize) -> Result<Tensor> {
    let (b, nkv, rows, s) = scores.dims4()?;
    let (mb, m1, m2, mt, ms) = mask.dims5()?;
    let mask_fits = (mb == 1 || mb == b) && (m1, m2, mt, ms) == (1, 1, t, s) && rows % t == 0;
    if mask_fits && scores.device().is_cpu() && scores.dtype() == DType::F32 {
        let mask = mask.contiguous()?;
        let mut out = scores.flatten_all()?.to_vec1::<f32>()?;
        let per_batch = nkv * rows; // query rows of one batch row, all heads
        let done = on_cpu_f32(&mask, |m| {
            use rayon::prelude::*;
            out.par_chunks_mut(s.max(1))
                .with_min_len(rows_per_task(s))
                .enumerate()
                .for_each(|(r, row)| {
                    let bi = if mb == 1 { 0 } else { r / per_batch };
                    let mrow = (bi * t + r % t) * s;
                    crate::simd::softmax(row, scale as f32, &m[mrow..mrow + s]);
                })
        })?;
        if done.is_some() {
            return Tensor::from_vec(out, (b, nkv, rows, s), scores.device());
        }
    }
    let scores = (scores * scale)?
        .reshape((b, nkv, rows / t, t, s))?
        .broadcast_add(mask)?;
    softmax_last_dim(&scores)?.reshape((b, nkv, rows, s))
}
