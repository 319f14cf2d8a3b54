//! A projection of a block: the frozen base weight (dense, or packed for the bf16 kernel or
//! oneDNN), the adapter applied unmerged for inference, and an optional bias; with the training
//! forward through [`crate::grad`] (LoRA gradients only).

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::bf16::Bf16Matrix;
use crate::error::{Error, Result};
use crate::grad::{self, Frozen};
use crate::lora::{LoraAdapter, Proj};
use crate::onednn::{Dnnl, DnnlMatrix};

/// A projection: frozen base weight, the adapter for inference (kept apart from the base, in
/// f32), optional bias.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Used as `x @ base`, `[in, out]`: the frozen weight transposed (dense), bf16 packed, or
    /// reordered for oneDNN.
    pub(super) base: Frozen,
    /// The adapter unmerged, in f32: `scaling * A^T` `[in, r]` and `B^T` `[r, out]`. Never
    /// merged into the base: a swap then costs copies of the small factors, not a pass over
    /// every weight (and merged into bf16 weights, its small delta would be mostly rounded
    /// away); the training forward applies it the same way.
    unmerged: Option<(Tensor, Tensor)>,
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight` is `[out, in]` as stored on disk; it is kept transposed (`[in, out]`, contiguous) so
    /// that the matmul reads it in the order gemm's kernels consume without repacking it on every
    /// call (what makes small-batch decoding fast).
    pub(super) fn new(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            base: Frozen::Dense(weight.t()?.contiguous()?),
            unmerged: None,
            bias,
        })
    }

    /// Replaces a dense base by its bf16 packing (any adapter must be set again after).
    pub(super) fn pack_bf16(&mut self) -> Result<()> {
        if let Frozen::Dense(base_t) = &self.base {
            let m = Bf16Matrix::from_out_in(&base_t.t()?)?;
            self.base = Frozen::Bf16(Arc::new(m));
        }
        self.unmerged = None;
        Ok(())
    }

    /// Replaces a dense base by its oneDNN layout, f32 or bf16 (any adapter must be set again).
    pub(super) fn pack_onednn(&mut self, lib: &'static Dnnl, bf16: bool) -> Result<()> {
        if let Frozen::Dense(base_t) = &self.base {
            let m = DnnlMatrix::from_out_in(lib, &base_t.t()?, bf16)?;
            self.base = Frozen::Dnnl(Arc::new(m));
        }
        self.unmerged = None;
        Ok(())
    }

    /// `(k, n)` of the base: `x` `[.., k]` -> `[.., n]`.
    pub(super) fn dims(&self) -> Result<(usize, usize)> {
        Ok(match &self.base {
            Frozen::Dense(w) | Frozen::Split { forward: w, .. } => w.dims2()?,
            Frozen::Bf16(m) => (m.k(), m.n()),
            Frozen::Dnnl(m) => (m.k(), m.n()),
        })
    }

    /// Sets the inference adapter of this projection (layer `l`): `None`, or an adapter without
    /// a pair here, leaves the base alone.
    pub(super) fn set_adapter(
        &mut self,
        adapter: Option<&LoraAdapter>,
        l: usize,
        proj: Proj,
    ) -> Result<()> {
        self.unmerged = None;
        let Some(adapter) = adapter else {
            return Ok(());
        };
        let Some(pair) = adapter.pairs.get(&(l, proj)) else {
            return Ok(());
        };
        let scaling = adapter.config.scaling();
        let a_t = (pair.a.t()?.to_dtype(DType::F32)? * scaling)?.contiguous()?;
        // A copy: the adapter's tensors may be trained in place later.
        let b_t = pair.b.t()?.to_dtype(DType::F32)?.contiguous()?.copy()?;
        let (k, n) = self.dims()?;
        if a_t.dim(0)? != k || b_t.dim(1)? != n {
            return Err(Error::InvalidRequest(format!(
                "adapter for layer {l} {}: [{}, {}] x [{}, {}] does not fit a [{k}, {n}] weight",
                proj.name(),
                a_t.dim(0)?,
                a_t.dim(1)?,
                b_t.dim(0)?,
                b_t.dim(1)?
            )));
        }
        self.unmerged = Some((a_t, b_t));
        Ok(())
    }

    /// x: `[n, in]` -> `[n, out]`. `train`: the adapter pair applied unmerged, with its scaling.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        train: Option<(&crate::lora::LoraPair, f64)>,
    ) -> Result<Tensor> {
        let y = match (train, &self.unmerged) {
            (Some((pair, scaling)), _) => {
                grad::lora_linear(x, &self.base, &pair.a, &pair.b, scaling)?
            }
            (None, Some((a_t, b_t))) => {
                let delta = x.to_dtype(DType::F32)?.matmul(a_t)?.matmul(b_t)?;
                (self.base.matmul(x)? + delta.to_dtype(x.dtype())?)?
            }
            (None, None) => self.base.matmul(x)?,
        };
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// The frozen base weight only, with a backward for `x` alone.
    pub(super) fn forward_frozen(&self, x: &Tensor) -> Result<Tensor> {
        let y = grad::frozen_linear(x, &self.base)?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }
}
