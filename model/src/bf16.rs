//! bf16 weights on the CPU: frozen matrices rounded to bf16 once, packed for an AVX512-BF16
//! kernel that multiplies them with f32 activations (rounded to bf16 on the way in) and
//! accumulates in f32. Half the weight memory and, on CPUs with `vdpbf16ps`, twice the f32
//! multiply-add rate. candle's own CPU bf16 matmul widens both operands to f32 on every call,
//! which is slower than f32.
//!
//! What it is for: the frozen base weights of the `bf16` CPU dtype (the block projections; the
//! lm_head stays f32 for the logprobs' precision, see `Transformer::pack_bf16`), forward (`x @ W`) and the backward the learner needs (`g @ W^T`, packed on first
//! use from the same bf16 values). What it must never do: be used when [`available`] is false
//! (the engine keeps the f32 path then), or hold anything that trains (LoRA and optimizer state
//! stay f32). All `unsafe` is in [`crate::kernels`].
//!
//! AMX: [`amx_bf16_status`] probes the CPU and asks Linux for the tile state; no AMX kernel is
//! built yet, so CPUs with AMX also run the AVX512-BF16 kernel.

use crate::kernels::bf16_gemm as kernel;

use std::sync::OnceLock;

use candle_core::{DType, Result, Storage, Tensor};
use rayon::prelude::*;

pub use kernel::{amx_bf16 as amx_bf16_status, avx512_bf16 as available, peak_gflops, NR};

/// A matrix `B` `[k, n]` rounded to bf16 and packed in panels of [`NR`] columns for the kernel.
pub struct Packed {
    k: usize,
    n: usize,
    /// `ceil(k / 2)`: bf16 pairs per column.
    kp: usize,
    data: Vec<u32>,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packed")
            .field("k", &self.k)
            .field("n", &self.n)
            .finish()
    }
}

fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

impl Packed {
    /// Packs `B` given element-wise: `bits(kk, col)` is `B[kk][col]` as bf16 bits.
    fn from_fn(k: usize, n: usize, bits: impl Fn(usize, usize) -> u16 + Sync) -> Self {
        let kp = k.div_ceil(2);
        let mut data = vec![0u32; n.div_ceil(NR) * kp * NR];
        if kp > 0 {
            data.par_chunks_mut(kp * NR)
                .enumerate()
                .for_each(|(p, panel)| {
                    for j in 0..NR.min(n - p * NR) {
                        let col = p * NR + j;
                        for q in 0..kp {
                            let lo = u32::from(bits(2 * q, col));
                            let hi = if 2 * q + 1 < k {
                                u32::from(bits(2 * q + 1, col))
                            } else {
                                0
                            };
                            panel[q * NR + j] = lo | (hi << 16);
                        }
                    }
                });
        }
        Self { k, n, kp, data }
    }

    /// `B` from f32 values, `B[kk][col] = v[kk * n + col]` (`[k, n]` row-major).
    pub fn from_k_n(v: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(Some(v.len()), k.checked_mul(n), "Packed::from_k_n: length");
        Self::from_fn(k, n, |kk, col| bf16_bits(v[kk * n + col]))
    }

    /// `B = W^T` from `W` `[n, k]` row-major (a weight as stored, `[out, in]`).
    pub fn from_n_k(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(Some(w.len()), k.checked_mul(n), "Packed::from_n_k: length");
        Self::from_fn(k, n, |kk, col| bf16_bits(w[col * k + kk]))
    }

    /// `B[kk][col]` as bf16 bits.
    fn bits(&self, kk: usize, col: usize) -> u16 {
        let w = self.data[((col / NR) * self.kp + kk / 2) * NR + col % NR];
        if kk.is_multiple_of(2) {
            w as u16
        } else {
            (w >> 16) as u16
        }
    }

    /// `B^T` `[n, k]`, from the same bf16 values.
    pub fn transposed(&self) -> Packed {
        Packed::from_fn(self.n, self.k, |kk, col| self.bits(col, kk))
    }

    /// `B` back in f32, `[k, n]` row-major (for tests and checks).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.k * self.n);
        for kk in 0..self.k {
            for col in 0..self.n {
                out.push(half::bf16::from_bits(self.bits(kk, col)).to_f32());
            }
        }
        out
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// `x @ B` for `x` `[m, k]` row-major f32: `[m, n]` row-major f32. Needs [`available`].
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(
            Some(x.len()),
            m.checked_mul(self.k),
            "Packed::matmul: x is not [m, k]"
        );
        let a = kernel::pack_a(x, m, self.k);
        kernel::gemm(&a, m, self.kp, &self.data, self.n)
    }

    /// [`Packed::matmul`] on a tensor `[.., k]` (any layout, any float dtype) -> `[.., n]` in
    /// x's dtype.
    pub fn matmul_tensor(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let k = dims.last().copied().unwrap_or(0);
        if k != self.k {
            candle_core::bail!(
                "bf16 matmul: input has {k} features, the weight expects {}",
                self.k
            );
        }
        if !x.device().is_cpu() {
            candle_core::bail!("bf16 matmul: packed weights live on the CPU");
        }
        let m: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        // Read in place (no copy) when x is already contiguous f32, the usual case.
        let xs = x.to_dtype(DType::F32)?.contiguous()?;
        let out = {
            let (storage, layout) = xs.storage_and_layout();
            match (&*storage, layout.contiguous_offsets()) {
                (Storage::Cpu(cpu), Some((from, to))) => {
                    self.matmul(&cpu.as_slice::<f32>()?[from..to], m)
                }
                _ => candle_core::bail!("bf16 matmul: the input is not a contiguous CPU tensor"),
            }
        };
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = self.n;
        }
        Tensor::from_vec(out, shape, x.device())?.to_dtype(x.dtype())
    }
}

/// A frozen weight `W` used as `x @ W` (`W` `[k, n]`) with the backward `g @ W^T`, in bf16.
#[derive(Debug)]
pub struct Bf16Matrix {
    fwd: Packed,
    bwd: OnceLock<Packed>,
}

impl Bf16Matrix {
    /// From a weight as stored, `[out, in]`: multiplies as `x @ weight^T` (`k = in`, `n = out`).
    pub fn from_out_in(weight: &Tensor) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let v = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self {
            fwd: Packed::from_n_k(&v, n, k),
            bwd: OnceLock::new(),
        })
    }

    /// `x @ W`: `[.., k]` -> `[.., n]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fwd.matmul_tensor(x)
    }

    /// `g @ W^T`: `[.., n]` -> `[.., k]`. The transposed packing is built on first use.
    pub fn backward(&self, g: &Tensor) -> Result<Tensor> {
        self.bwd
            .get_or_init(|| self.fwd.transposed())
            .matmul_tensor(g)
    }

    pub fn packed(&self) -> &Packed {
        &self.fwd
    }

    /// Bytes held (both packings when the backward one exists).
    pub fn bytes(&self) -> usize {
        self.fwd.bytes() + self.bwd.get().map_or(0, Packed::bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_keeps_every_value_and_transposes() {
        let (k, n) = (7, 37);
        let v: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = Packed::from_k_n(&v, k, n);
        let want: Vec<f32> = v
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        assert_eq!(p.to_f32(), want);
        let t = p.transposed();
        assert_eq!((t.k(), t.n()), (n, k));
        let back = t.transposed().to_f32();
        assert_eq!(back, want);
        // from_n_k of the transpose is the same matrix.
        let mut vt = vec![0f32; k * n];
        for kk in 0..k {
            for col in 0..n {
                vt[col * k + kk] = v[kk * n + col];
            }
        }
        assert_eq!(Packed::from_n_k(&vt, n, k).to_f32(), want);
    }
}
