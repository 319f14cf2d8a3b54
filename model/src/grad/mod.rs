//! Hand-written backward passes for the training forward.
//!
//! candle's autograd keeps every intermediate tensor of a composed op alive until the backward,
//! and its matmul backward always computes the gradient of both operands, which for a frozen base
//! weight is a large matmul thrown away. So the training forward computes each block piece (a
//! LoRA projection, attention, RMSNorm, RoPE, the lm_head log-softmax) outside the graph with the
//! fast inference kernels, and attaches to the result a backward written here: gradients only
//! for what trains and for the activations in between, recomputing the large intermediates
//! (attention probabilities, vocabulary logits) instead of keeping them.
//!
//! The mechanism: a custom op whose forward hands out the precomputed value and whose backward
//! is a closure. Every formula is checked against PEFT's gradients (`tests/tiny.rs`) and finite
//! differences. The frozen weights these products use are [`Frozen`] ([`frozen`]); attention,
//! its fused CPU forward and its softmax backward are in `attention`; the scoring path without a
//! graph (what the engine scores with) is in [`logprobs`].

mod attention;
pub mod frozen;
pub mod logprobs;

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D,
};

pub use attention::attention;
#[cfg(test)]
use attention::fused_attention;
pub use frozen::Frozen;
use logprobs::{chunk_logits, logprobs_keeping};
pub use logprobs::{logprobs_detached, wide};

type Backward1 = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;
type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);
type Backward3 = Box<dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<Grads3> + Send + Sync>;

/// The precomputed output, taken (moved out) by the forward so the graph holds one copy.
struct Value(Mutex<Option<Tensor>>);

impl Value {
    fn new(t: Tensor) -> Result<Self> {
        Ok(Self(Mutex::new(Some(dense(t)?))))
    }

    fn take(&self) -> Result<Tensor> {
        let mut guard = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("attach: poisoned lock".into()))?;
        guard
            .take()
            .ok_or_else(|| candle_core::Error::Msg("attach: forward ran twice".into()))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let value = self.take()?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("attach: value is not on the CPU"),
        }
    }

    fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        let value = self.take()?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("attach: value is not on the CUDA device"),
        }
    }
}

/// The forward hands out the value's storage as is: it must be a dense buffer starting at 0.
fn dense(t: Tensor) -> Result<Tensor> {
    let ok = {
        let (storage, layout) = t.storage_and_layout();
        let len = match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => v.len(),
            Storage::Cpu(CpuStorage::F64(v)) => v.len(),
            Storage::Cpu(CpuStorage::BF16(v)) => v.len(),
            Storage::Cpu(CpuStorage::F16(v)) => v.len(),
            Storage::Cpu(_) => 0,
            _ => layout.shape().elem_count(),
        };
        layout.is_contiguous() && layout.start_offset() == 0 && len == layout.shape().elem_count()
    };
    if ok {
        Ok(t)
    } else {
        t.force_contiguous()
    }
}

struct Attach1 {
    value: Value,
    backward: Backward1,
}

impl CustomOp1 for Attach1 {
    fn name(&self) -> &'static str {
        "attach1"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.value.cpu()
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.value.cuda()
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // Detached: a gradient computed from forward tensors would otherwise keep the whole
        // forward graph alive for as long as the gradient lives (e.g. across micro-batches).
        Ok(Some((self.backward)(arg, grad)?.detach()))
    }
}

struct Attach3 {
    value: Value,
    backward: Backward3,
}

impl CustomOp3 for Attach3 {
    fn name(&self) -> &'static str {
        "attach3"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.cpu()
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.value.cuda()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<Grads3> {
        let (ga, gb, gc) = (self.backward)(a, b, c, grad)?;
        Ok((
            ga.map(|t| t.detach()),
            gb.map(|t| t.detach()),
            gc.map(|t| t.detach()),
        ))
    }
}

/// `value` (computed from `input` outside the graph) as a tensor whose gradient flows back to
/// `input` through `backward(input, grad_value)`. Returned as is when `input` is not tracked.
pub fn attach(
    input: &Tensor,
    value: Tensor,
    backward: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !input.track_op() {
        return Ok(value);
    }
    input.apply_op1(Attach1 {
        value: Value::new(value)?,
        backward: Box::new(backward),
    })
}

/// [`attach`] with three inputs; `backward(a, b, c, grad)` returns the gradient of each (None
/// where an input is not tracked).
pub fn attach3(
    (a, b, c): (&Tensor, &Tensor, &Tensor),
    value: Tensor,
    backward: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<Grads3> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !(a.track_op() || b.track_op() || c.track_op()) {
        return Ok(value);
    }
    a.apply_op3(
        b,
        c,
        Attach3 {
            value: Value::new(value)?,
            backward: Box::new(backward),
        },
    )
}

fn when<T>(cond: bool, f: impl FnOnce() -> Result<T>) -> Result<Option<T>> {
    if cond {
        f().map(Some)
    } else {
        Ok(None)
    }
}

/// `x @ wt` for a frozen weight given transposed, `wt` `[in, out]`: the gradient goes to `x`
/// only. x: `[n, in]` -> `[n, out]`.
pub fn frozen_linear(x: &Tensor, wt: &Frozen) -> Result<Tensor> {
    let y = wt.matmul(&x.detach())?;
    let wt = wt.clone();
    attach(x, y, move |_x, g| wt.matmul_t(g))
}

/// A LoRA projection `x @ wt + scaling * (x @ a^T) @ b^T` with a frozen `wt` `[in, out]`,
/// a `[r, in]`, b `[out, r]`; x `[n, in]` -> `[n, out]`. Gradients for x, a and b.
/// The adapter may be kept in another dtype than the model (f32 LoRA on a bf16 base): it is
/// cast for the matmuls and its gradients are returned in its own dtype.
pub fn lora_linear(
    x: &Tensor,
    wt: &Frozen,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
) -> Result<Tensor> {
    let dt = x.dtype();
    let xd = x.detach();
    let xa = (xd.matmul(&a.detach().to_dtype(dt)?.t()?)? * scaling)?; // [n, r]
    let y = wt
        .matmul(&xd)?
        .add(&xa.matmul(&b.detach().to_dtype(dt)?.t()?)?)?;
    let wt = wt.clone();
    attach3((x, a, b), y, move |x, a, b, g| {
        let (a_dt, b_dt) = (a.dtype(), b.dtype());
        let (a, b) = (a.to_dtype(dt)?, b.to_dtype(dt)?);
        let gb = (g.matmul(&b)? * scaling)?; // [n, r]
        let dx = when(x.track_op(), || wt.matmul_t(g)?.add(&gb.matmul(&a)?))?;
        let da = when(a.track_op(), || gb.t()?.matmul(x)?.to_dtype(a_dt))?; // [r, in]
        let db = when(b.track_op(), || {
            let xa = (x.matmul(&a.t()?)? * scaling)?;
            g.t()?.matmul(&xa)?.to_dtype(b_dt) // [out, r]
        })?;
        Ok((dx, da, db))
    })
}

/// RMSNorm `x / sqrt(mean(x^2) + eps) * w` over the last dim, frozen `w`; gradient for x.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    // The fused kernel has no f64 variant; f64 (used to check gradients) takes the composed path.
    let y = if x.dtype() == DType::F64 {
        candle_nn::ops::rms_norm_slow(&x.detach(), w, eps as f32)?
    } else {
        candle_nn::ops::rms_norm(&x.detach(), w, eps as f32)?
    };
    let w = w.clone();
    attach(x, y, move |x, g| {
        if let Some(dx) = rms_norm_backward(x, &w, g, eps)? {
            return Ok(dx);
        }
        // r = 1/sqrt(mean(x^2)+eps); dx = r * (g w) - x r^3 mean(g w x)
        let n = x.dim(D::Minus1)? as f64;
        let r = ((x.sqr()?.sum_keepdim(D::Minus1)? / n)? + eps)?
            .sqrt()?
            .recip()?;
        let gw = g.broadcast_mul(&w)?;
        let dot = ((&gw * x)?.sum_keepdim(D::Minus1)? / n)?;
        let r3 = r.powf(3.0)?;
        gw.broadcast_mul(&r)?.sub(&x.broadcast_mul(&r3.mul(&dot)?)?)
    })
}

/// [`rms_norm`]'s backward by [`simd::rms_norm_backward`], one row at a time, on the CPU in f32
/// (x, w and g contiguous); `None` elsewhere.
fn rms_norm_backward(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let n = x.dim(D::Minus1)?;
    if g.dims() != x.dims() || w.dims() != [n] || n == 0 {
        return Ok(None);
    }
    let g = g.contiguous()?;
    let dx = on_cpu_f32s([x, w, &g], |[x, w, g]| {
        use rayon::prelude::*;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(n)
            .zip(x.par_chunks(n).zip(g.par_chunks(n)))
            .with_min_len(rows_per_task(n))
            .for_each(|(dx, (x, g))| crate::simd::rms_norm_backward(g, x, w, eps as f32, dx));
        dx
    })?;
    dx.map(|dx| Tensor::from_vec(dx, x.dims(), x.device()))
        .transpose()
}

/// `silu(gate) * up` (SwiGLU's product), with gradients for both. On the CPU in f32 the forward
/// is one pass with the very arithmetic of candle's `silu` then `*` (the same values, bit for
/// bit), and the backward one pass ([`simd::silu_mul_backward`]) instead of a dozen tensors.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (gd, ud) = (gate.detach(), up.detach());
    let fused = if gate.dims() == up.dims() {
        on_cpu_f32s([&gd.contiguous()?, &ud.contiguous()?], |[g, u]| {
            use rayon::prelude::*;
            let mut y = vec![0f32; g.len()];
            y.par_chunks_mut(ROW_TASK)
                .zip(g.par_chunks(ROW_TASK).zip(u.par_chunks(ROW_TASK)))
                .for_each(|(y, (g, u))| {
                    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                        *y = g / (1.0 + (-g).exp()) * u;
                    }
                });
            y
        })?
    } else {
        None
    };
    let y = match fused {
        Some(y) => Tensor::from_vec(y, gate.dims(), gate.device())?,
        None => (gd.silu()? * &ud)?,
    };
    // Two inputs through the three-input attach: the third (gate again) gets no gradient.
    attach3((gate, up, gate), y, move |gate, up, _, dy| {
        let (dg, du) = silu_mul_backward(gate, up, dy)?;
        Ok((
            when(gate.track_op(), || Ok(dg.clone()))?,
            when(up.track_op(), || Ok(du.clone()))?,
            None,
        ))
    })
}

/// The gradients of [`silu_mul`] wrt gate and up.
fn silu_mul_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let dy = dy.contiguous()?;
    if dy.dims() == gate.dims() && gate.dims() == up.dims() {
        let (gc, uc) = (gate.contiguous()?, up.contiguous()?);
        let fused = on_cpu_f32s([&gc, &uc, &dy], |[g, u, d]| {
            use rayon::prelude::*;
            let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
            dg.par_chunks_mut(ROW_TASK)
                .zip(du.par_chunks_mut(ROW_TASK))
                .zip(d.par_chunks(ROW_TASK))
                .zip(g.par_chunks(ROW_TASK).zip(u.par_chunks(ROW_TASK)))
                .for_each(|(((dg, du), d), (g, u))| {
                    crate::simd::silu_mul_backward(d, g, u, dg, du)
                });
            (dg, du)
        })?;
        if let Some((dg, du)) = fused {
            let dev = gate.device();
            return Ok((
                Tensor::from_vec(dg, gate.dims(), dev)?,
                Tensor::from_vec(du, gate.dims(), dev)?,
            ));
        }
    }
    // s = sigmoid(gate); d silu / d gate = s (1 + gate (1 - s)).
    let s = (gate.neg()?.exp()? + 1.0)?.recip()?;
    let silu = (gate * &s)?;
    let dsilu = (&s * ((gate * (1.0 - &s)?)? + 1.0)?)?;
    Ok(((&dy * up)?.mul(&dsilu)?, (&dy * silu)?))
}

/// Half-split RoPE (`x` `[b, h, t, hd]` contiguous, cos/sin `[b, t, hd/2]`); the backward is the
/// inverse rotation (sin negated).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let y = candle_nn::rotary_emb::rope(&x.detach(), cos, sin)?;
    if !x.track_op() {
        return Ok(y);
    }
    let (cos, neg_sin) = (cos.clone(), sin.neg()?);
    attach(x, y, move |_x, g| {
        candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &neg_sin)
    })
}

/// Logits up to this size are kept from the forward of [`target_logprobs`] for its backward
/// (a micro-batch of SmolLM2: 1200 tokens x 49152 x 4 bytes = 236 MB); larger ones are
/// recomputed chunk by chunk.
const KEEP_LOGITS: usize = 512 << 20;

/// Log-probability of `targets` under `softmax(h @ w / temperature)`, chunked over rows so
/// that at most `chunk x vocab` logits exist at once, in the forward and in the backward, unless
/// all of them fit in [`KEEP_LOGITS`] (then the backward reuses the forward's).
/// h: `[n, d]`, w: the output projection `[d, vocab]`, targets: `n` ids -> `[n]` in [`wide`]
/// of h's dtype.
pub fn target_logprobs(
    h: &Tensor,
    w: &Frozen,
    targets: &[u32],
    temperature: f64,
    chunk: usize,
) -> Result<Tensor> {
    let chunk = chunk.max(1);
    let (lp, kept) = logprobs_keeping(&h.detach(), w, targets, temperature, chunk, KEEP_LOGITS)?;
    // Taken by the backward (which runs once); recomputed there when not kept.
    let kept = Mutex::new(kept.into_iter().map(Some).collect::<Vec<_>>());
    let w = w.clone();
    let targets = targets.to_vec();
    attach(h, lp, move |h, g| {
        // d lp_i / d logits_i = onehot(target_i) - softmax_i, scaled by 1/temperature.
        let (n, _) = h.dims2()?;
        let g = g.to_dtype(wide(h.dtype()))?;
        let mut parts = Vec::new();
        let g_host: Vec<f32> = on_cpu_f32(&g, |g| g.to_vec())?.unwrap_or_default();
        for (i, start) in (0..n).step_by(chunk).enumerate() {
            let len = chunk.min(n - start);
            let logits = match kept.lock().ok().and_then(|mut k| k.get_mut(i)?.take()) {
                Some(logits) => logits,
                None => chunk_logits(h, &w, start, len)?,
            };
            if !g_host.is_empty() {
                let (ids, gs) = (&targets[start..start + len], &g_host[start..start + len]);
                if let Some(dlogits) = vocab_dlogits(&logits, ids, gs, temperature)? {
                    parts.push(w.matmul_t(&dlogits.to_dtype(h.dtype())?)?);
                    continue;
                }
            }
            let p = softmax_last_dim(&(logits / temperature)?)?;
            let ids = Tensor::new(&targets[start..start + len], h.device())?.unsqueeze(1)?;
            // -(g_i / T) * p, plus g_i / T at the target column.
            let gi = g.narrow(0, start, len)?.unsqueeze(1)?; // [len, 1]
            let dlogits = (p.broadcast_mul(&gi)? * (-1.0 / temperature))?;
            let dlogits = dlogits.scatter_add(&ids, &(gi / temperature)?, 1)?;
            parts.push(w.matmul_t(&dlogits.to_dtype(h.dtype())?)?);
        }
        Tensor::cat(&parts, 0)
    })
}

/// Runs `f` on the values of an f32 tensor held contiguously on the CPU, without copying them;
/// `None` for other devices, dtypes or layouts (the caller takes candle's composed path).
fn on_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
    if t.dtype() != DType::F32 {
        return Ok(None);
    }
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(cpu), Some((from, to))) = (&*storage, layout.contiguous_offsets()) else {
        return Ok(None);
    };
    Ok(Some(f(&cpu.as_slice::<f32>()?[from..to])))
}

/// [`on_cpu_f32`] for several tensors at once (each read in place; pass distinct tensors).
fn on_cpu_f32s<R, const N: usize>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> Result<Option<R>> {
    if ts.iter().any(|t| t.dtype() != DType::F32) {
        return Ok(None);
    }
    let held: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(N);
    for (storage, layout) in &held {
        let (Storage::Cpu(cpu), Some((from, to))) = (&**storage, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        slices.push(&cpu.as_slice::<f32>()?[from..to]);
    }
    match <[&[f32]; N]>::try_from(slices) {
        Ok(slices) => Ok(Some(f(slices))),
        Err(_) => Ok(None),
    }
}

/// Rows of at least this many elements are one rayon task each; shorter rows are grouped.
const ROW_TASK: usize = 8192;

fn rows_per_task(row: usize) -> usize {
    ROW_TASK.div_ceil(row.max(1))
}

/// Softmax over the last dim: candle's fused op, or for f64 the same steps composed (max, exp
/// of the difference, sum, divide: what candle's CPU kernel does), because candle's CUDA softmax
/// has no f64 kernel and the f64 gradient checks run on every test device.
fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F64 {
        return candle_nn::ops::softmax_last_dim(x);
    }
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// The gradient of [`vocab_logprobs`] wrt the logits for upstream gradients `g` (one per row):
/// `(g_i / T) (onehot(target_i) - softmax(logits_i / T))`, `[n, vocab]` f32; `None` off the CPU.
fn vocab_dlogits(
    logits: &Tensor,
    targets: &[u32],
    g: &[f32],
    temperature: f64,
) -> Result<Option<Tensor>> {
    let (n, v) = logits.dims2()?;
    if logits.dtype() != DType::F32 || !logits.device().is_cpu() {
        return Ok(None);
    }
    let mut d = logits.flatten_all()?.to_vec1::<f32>()?;
    let inv_t = (1.0 / temperature) as f32;
    {
        use rayon::prelude::*;
        d.par_chunks_mut(v.max(1))
            .with_min_len(rows_per_task(v))
            .zip(targets.par_iter().zip(g))
            .try_for_each(|(row, (&id, &gi))| {
                crate::simd::softmax(row, inv_t, &[]);
                let gt = gi * inv_t;
                crate::simd::mul(row, -gt);
                match row.get_mut(id as usize) {
                    Some(x) => {
                        *x += gt;
                        Ok(())
                    }
                    None => Err(candle_core::Error::Msg(format!(
                        "target id {id} is outside the vocabulary of {v}"
                    ))),
                }
            })?;
    }
    Tensor::from_vec(d, (n, v), logits.device()).map(Some)
}

#[cfg(test)]
mod tests;
