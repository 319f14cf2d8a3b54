//! Gradients where candle's autograd would waste work or memory.
//!
//! candle's matmul backward always computes the gradient of both operands; for a frozen base
//! weight that is a large matmul thrown away. And a log-softmax over the vocabulary kept in the
//! graph costs batch x length x vocab floats several times over. [`attach`] computes a value
//! outside the graph and attaches to it a hand-written backward: only the input gradient, computed
//! from tensors that the closure captures (a frozen weight) or recomputes (logits, chunk by chunk).

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

type Backward = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

struct Attach {
    /// The precomputed output; taken (moved out) by the forward so the graph holds one copy.
    value: Mutex<Option<Tensor>>,
    /// `backward(input, grad_output) -> grad_input`.
    backward: Backward,
}

impl Attach {
    fn take(&self) -> Result<Tensor> {
        let mut guard = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg("attach: poisoned lock".into()))?;
        guard
            .take()
            .ok_or_else(|| candle_core::Error::Msg("attach: forward ran twice".into()))
    }
}

impl CustomOp1 for Attach {
    fn name(&self) -> &'static str {
        "attach-grad"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        let value = self.take()?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("attach: value is not on the CPU"),
        }
    }

    fn cuda_fwd(&self, _s: &CudaStorage, _l: &Layout) -> Result<(CudaStorage, Shape)> {
        let value = self.take()?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("attach: value is not on the CUDA device"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.backward)(arg, grad_res)?))
    }
}

/// Returns `value` (computed from `input` outside the graph) as a tensor whose gradient flows back
/// to `input` through `backward(input, grad_value)`. When `input` is not tracked, `value` is
/// returned as is.
pub fn attach(
    input: &Tensor,
    value: Tensor,
    backward: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !input.track_op() {
        return Ok(value);
    }
    // The forward hands out the value's storage as is: make sure it is a dense buffer from 0.
    let value = fresh(value)?;
    input.apply_op1(Attach {
        value: Mutex::new(Some(value)),
        backward: Box::new(backward),
    })
}

fn fresh(t: Tensor) -> Result<Tensor> {
    let dense = {
        let (storage, layout) = t.storage_and_layout();
        let len = match &*storage {
            Storage::Cpu(s) => match s {
                CpuStorage::F32(v) => v.len(),
                CpuStorage::F64(v) => v.len(),
                CpuStorage::BF16(v) => v.len(),
                CpuStorage::F16(v) => v.len(),
                _ => 0,
            },
            _ => layout.shape().elem_count(),
        };
        layout.is_contiguous() && layout.start_offset() == 0 && len == layout.shape().elem_count()
    };
    if dense {
        Ok(t)
    } else {
        t.copy()
    }
}

/// `x @ w^T` for a frozen weight `w` `[out, in]`: the gradient goes to `x` only.
/// x: `[n, in]` -> `[n, out]`.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let y = x.detach().matmul(&w.t()?)?;
    let w = w.clone();
    attach(x, y, move |_x, g| g.matmul(&w))
}

/// Log-probability of `targets` under `softmax(h @ w^T / temperature)`, chunked over rows so
/// that at most `chunk x vocab` logits exist at once, in the forward and in the backward.
/// h: `[n, d]`, w: `[vocab, d]`, targets: `n` ids -> `[n]`.
pub fn target_logprobs(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    temperature: f64,
    chunk: usize,
) -> Result<Tensor> {
    let lp = logprobs_detached(&h.detach(), w, targets, temperature, chunk)?;
    let w = w.clone();
    let targets = targets.to_vec();
    attach(h, lp, move |h, g| {
        // d lp_i / d logits_i = onehot(target_i) - softmax_i, scaled by 1/temperature.
        let (n, _) = h.dims2()?;
        let g = g.to_dtype(candle_core::DType::F32)?;
        let mut parts = Vec::new();
        for start in (0..n).step_by(chunk) {
            let len = chunk.min(n - start);
            let logits = (h.narrow(0, start, len)?.matmul(&w.t()?)? / temperature)?
                .to_dtype(candle_core::DType::F32)?;
            let p = candle_nn::ops::softmax_last_dim(&logits)?;
            let ids = Tensor::new(&targets[start..start + len], h.device())?;
            let onehot = ids
                .unsqueeze(1)?
                .broadcast_as(p.shape())?
                .eq(&Tensor::arange(0u32, p.dim(1)? as u32, h.device())?.broadcast_as(p.shape())?)?
                .to_dtype(candle_core::DType::F32)?;
            let gl = ((onehot - p)?.broadcast_mul(&g.narrow(0, start, len)?.unsqueeze(1)?)?
                / temperature)?;
            parts.push(gl.to_dtype(h.dtype())?.matmul(&w)?);
        }
        Tensor::cat(&parts, 0)
    })
}

/// The forward of [`target_logprobs`] without a graph. Returns f32 `[n]`.
pub fn logprobs_detached(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    temperature: f64,
    chunk: usize,
) -> Result<Tensor> {
    let (n, _) = h.dims2()?;
    let mut parts = Vec::new();
    for start in (0..n).step_by(chunk.max(1)) {
        let len = chunk.min(n - start);
        let logits = h.narrow(0, start, len)?.matmul(&w.t()?)?;
        let logits = if temperature == 1.0 {
            logits
        } else {
            (logits / temperature)?
        };
        let logits = logits.to_dtype(candle_core::DType::F32)?;
        let lse = logits.log_sum_exp(1)?;
        let ids = Tensor::new(&targets[start..start + len], h.device())?;
        let picked = logits.gather(&ids.unsqueeze(1)?, 1)?.squeeze(1)?;
        parts.push((picked - lse)?);
    }
    if parts.is_empty() {
        return Tensor::zeros(0, candle_core::DType::F32, h.device());
    }
    Tensor::cat(&parts, 0)
}
