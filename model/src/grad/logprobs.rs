//! The scoring path without a graph: log-probabilities of target tokens under
//! `softmax(h @ W / T)`, chunked over rows so that at most `chunk x vocab` logits exist at once.
//! What the engine scores with (reference and policy logprobs), and what the training forward
//! ([`super::target_logprobs`]) computes before attaching its backward.

use candle_core::{DType, Result, Tensor};

use super::{on_cpu_f32, rows_per_task, Frozen};

/// The forward of [`target_logprobs`] without a graph. Returns `[n]` in [`wide`] of h's dtype.
pub fn logprobs_detached(
    h: &Tensor,
    w: &Frozen,
    targets: &[u32],
    temperature: f64,
    chunk: usize,
) -> Result<Tensor> {
    Ok(logprobs_keeping(h, w, targets, temperature, chunk, 0)?.0)
}

/// The logprobs of [`logprobs_detached`] and, when all of the logits take at most `keep_bytes`,
/// the logits of each chunk (for a backward that would otherwise recompute them).
pub(super) fn logprobs_keeping(
    h: &Tensor,
    w: &Frozen,
    targets: &[u32],
    temperature: f64,
    chunk: usize,
    keep_bytes: usize,
) -> Result<(Tensor, Vec<Tensor>)> {
    let (n, _) = h.dims2()?;
    let chunk = chunk.max(1);
    let (mut parts, mut kept) = (Vec::new(), Vec::new());
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let logits = chunk_logits(h, w, start, len)?;
        parts.push(chunk_logprobs(
            &logits,
            &targets[start..start + len],
            temperature,
        )?);
        if n * logits.dim(1)? * logits.dtype().size_in_bytes() <= keep_bytes {
            kept.push(logits);
        }
    }
    if parts.is_empty() {
        return Ok((Tensor::zeros(0, wide(h.dtype()), h.device())?, kept));
    }
    Ok((Tensor::cat(&parts, 0)?, kept))
}

/// `log softmax(logits / temperature)` at `ids`, one per row: `[len, vocab]` -> `[len]`.
fn chunk_logprobs(logits: &Tensor, ids: &[u32], temperature: f64) -> Result<Tensor> {
    if let Some(lp) = vocab_logprobs(logits, ids, temperature)? {
        return Ok(lp);
    }
    let logits = (logits / temperature)?;
    let lse = logits.log_sum_exp(1)?;
    let ids = Tensor::new(ids, logits.device())?;
    let picked = logits.gather(&ids.unsqueeze(1)?, 1)?.squeeze(1)?;
    picked - lse
}

/// `h[start..start+len] @ w` in [`wide`] of h's dtype: `[len, vocab]`.
pub(super) fn chunk_logits(h: &Tensor, w: &Frozen, start: usize, len: usize) -> Result<Tensor> {
    w.matmul(&h.narrow(0, start, len)?)?
        .to_dtype(wide(h.dtype()))
}

/// `log softmax(logits / temperature)` at `targets`, one per row: `[n, vocab]` -> `[n]` f32, on
/// the CPU in f32 ([`simd::log_sum_exp`] per row); `None` elsewhere.
fn vocab_logprobs(logits: &Tensor, targets: &[u32], temperature: f64) -> Result<Option<Tensor>> {
    let (n, v) = logits.dims2()?;
    let inv_t = (1.0 / temperature) as f32;
    let lp = on_cpu_f32(logits, |x| {
        use rayon::prelude::*;
        x.par_chunks(v.max(1))
            .with_min_len(rows_per_task(v))
            .zip(targets)
            .map(|(row, &id)| match row.get(id as usize) {
                Some(&x) => Ok((x * inv_t) as f64 - crate::simd::log_sum_exp(row, inv_t)),
                None => Err(candle_core::Error::Msg(format!(
                    "target id {id} is outside the vocabulary of {v}"
                ))),
            })
            .map(|r| r.map(|lp| lp as f32))
            .collect::<Result<Vec<f32>>>()
    })?;
    lp.map(|lp| Tensor::from_vec(lp?, n, logits.device()))
        .transpose()
}

/// The dtype log-softmax runs in: f64 stays f64, everything else is computed in f32.
pub fn wide(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
