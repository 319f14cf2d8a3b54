//! The frozen base weights as the training forward and backward use them: `x @ W` and
//! `g @ W^T`, whichever kernel holds the weight (dense candle tensor, our bf16 packing, oneDNN's
//! reordered layout, or dense forward with a bf16 backward).

use std::sync::Arc;

use candle_core::{Result, Tensor};

/// A frozen weight `W` `[k, n]`, used as `x @ W`, with the backward `g @ W^T`: a dense tensor
/// (any layout, e.g. a transposed view), bf16 packed for the kernel of [`crate::bf16`], or
/// reordered for oneDNN ([`crate::onednn`]).
#[derive(Debug, Clone)]
pub enum Frozen {
    Dense(Tensor),
    Bf16(Arc<crate::bf16::Bf16Matrix>),
    Dnnl(Arc<crate::onednn::DnnlMatrix>),
    /// Dense forward, bf16 backward: `forward` is `W` as in `Dense`, `backward` holds `W^T`
    /// packed so that its forward is `g @ W^T`. For the lm_head of a bf16 model on our kernel:
    /// the logprobs keep f32's precision while the learner's input gradient, where bf16
    /// rounding is noise, runs on the bf16 kernel.
    Split {
        forward: Tensor,
        backward: Arc<crate::bf16::Bf16Matrix>,
    },
}

impl Frozen {
    /// `x @ W`: `[n, k]` -> `[n, n_out]`.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Frozen::Dense(w) | Frozen::Split { forward: w, .. } => x.matmul(w),
            Frozen::Bf16(m) => m.forward(x),
            Frozen::Dnnl(m) => m.forward(x),
        }
    }

    /// `g @ W^T`: `[n, n_out]` -> `[n, k]`.
    pub fn matmul_t(&self, g: &Tensor) -> Result<Tensor> {
        match self {
            Frozen::Dense(w) => g.matmul(&w.t()?),
            Frozen::Bf16(m) => m.backward(g),
            Frozen::Dnnl(m) => m.backward(g),
            Frozen::Split { backward, .. } => backward.forward(g),
        }
    }
}
