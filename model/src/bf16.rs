//! bf16 frozen weights: matrices rounded to bf16 once, multiplied with f32 activations (rounded
//! to bf16 on the way in) with f32 accumulation and an f32 result. Half the weight memory and,
//! on CPUs with `vdpbf16ps` or on a GPU's tensor cores, a faster multiply-add than f32.
//! candle's own CPU bf16 matmul widens both operands to f32 on every call, which is slower than
//! f32, and its CUDA bf16 matmul rounds the result to bf16.
//!
//! Two homes, one arithmetic: on the CPU the weight is packed for our AVX512-BF16 kernel; on a
//! CUDA device it stays a bf16 tensor and the products run through cuBLAS with an f32 output
//! (`kernels::cuda_gemm`). Either way bf16 products are exact in f32 and sums are f32, so the
//! accuracy rules of the bf16 dtype (see `Transformer::pack_bf16`) are the same on both.
//!
//! What it is for: the frozen base weights of the `bf16` dtype (the block projections; the
//! lm_head stays f32 for the logprobs' precision, see `Transformer::pack_bf16`), forward
//! (`x @ W`) and the backward the learner needs (`g @ W^T`, on the CPU packed on first use from
//! the same bf16 values). What it must never do: be used on a CPU where [`available`] is false
//! (the engine keeps the f32 path then), or hold anything that trains (LoRA and optimizer state
//! stay f32). All `unsafe` is in [`crate::kernels`].
//!
//! AMX: [`amx_bf16_status`] probes the CPU and asks Linux for the tile state; no AMX kernel is
//! built yet, so CPUs with AMX also run the AVX512-BF16 kernel.

use crate::kernels::bf16_gemm as kernel;
use crate::kernels::cuda_gemm::{Bf16Gemm, Product};

use std::sync::OnceLock;

use candle_core::{DType, Result, Storage, Tensor};
use rayon::prelude::*;

pub use kernel::{amx_bf16 as amx_bf16_status, avx512_bf16 as available, peak_gflops, NR};

/// Whether [`crate::Engine::load`] keeps bf16 weights for dtype bf16 on `device`: always on a
/// GPU; on the CPU when the matmul backend in use has a bf16 kernel here (oneDNN's, see
/// [`crate::onednn::bf16_kernel`], or ours with AVX512-BF16). Otherwise dtype bf16 runs in f32.
pub fn runs_on(device: &candle_core::Device) -> bool {
    if device.is_cuda() {
        return true;
    }
    match crate::onednn::library() {
        Ok(Some(_)) => crate::onednn::bf16_kernel().is_some(),
        _ => available(),
    }
}

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
        cpu_product(x, self.k, self.n, |xs, m| Ok(self.matmul(xs, m)))
    }
}

/// A CPU product of `x` `[.., k]` (any layout, any float dtype) by a frozen weight: `f` gets x
/// as `[m, k]` row-major f32 and returns `[m, n]` row-major f32; the result is `[.., n]` in
/// x's dtype. Shared by the CPU backends ([`Packed`], [`crate::onednn::DnnlMatrix`]).
pub(crate) fn cpu_product(
    x: &Tensor,
    k: usize,
    n: usize,
    f: impl FnOnce(&[f32], usize) -> Result<Vec<f32>>,
) -> Result<Tensor> {
    let dims = x.dims();
    let last = dims.last().copied().unwrap_or(0);
    if last != k {
        candle_core::bail!("matmul: input has {last} features, the weight expects {k}");
    }
    if !x.device().is_cpu() {
        candle_core::bail!("matmul: this weight lives on the CPU, the input does not");
    }
    let m: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    // Read in place (no copy) when x is already contiguous f32, the usual case.
    let xs = x.to_dtype(DType::F32)?.contiguous()?;
    let out = {
        let (storage, layout) = xs.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(cpu), Some((from, to))) => f(&cpu.as_slice::<f32>()?[from..to], m)?,
            _ => candle_core::bail!("matmul: the input is not a contiguous CPU tensor"),
        }
    };
    let mut shape = dims.to_vec();
    if let Some(l) = shape.last_mut() {
        *l = n;
    }
    Tensor::from_vec(out, shape, x.device())?.to_dtype(x.dtype())
}

/// A frozen weight `W` used as `x @ W` (`W` `[k, n]`) with the backward `g @ W^T`, in bf16.
#[derive(Debug)]
pub struct Bf16Matrix {
    home: Home,
}

#[derive(Debug)]
enum Home {
    /// Packed for the CPU kernel; the backward's transposed packing is built on first use.
    Cpu { fwd: Packed, bwd: OnceLock<Packed> },
    /// On a CUDA device: the weight as stored, `[n, k]` (`[out, in]`), bf16, contiguous.
    Cuda { w: Tensor },
}

impl Bf16Matrix {
    /// From a weight as stored, `[out, in]`: multiplies as `x @ weight^T` (`k = in`, `n = out`).
    /// The weight's device decides where the products run.
    pub fn from_out_in(weight: &Tensor) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        if weight.device().is_cuda() {
            // A fresh bf16 copy (never a view of the caller's tensor).
            let w = weight.to_dtype(DType::BF16)?.contiguous()?.copy()?;
            return Ok(Self {
                home: Home::Cuda { w },
            });
        }
        if !weight.device().is_cpu() {
            candle_core::bail!(
                "bf16 weights: {:?} is not supported (cpu or cuda)",
                weight.device().location()
            );
        }
        let v = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self {
            home: Home::Cpu {
                fwd: Packed::from_n_k(&v, n, k),
                bwd: OnceLock::new(),
            },
        })
    }

    /// Input features `k`.
    pub fn k(&self) -> usize {
        match &self.home {
            Home::Cpu { fwd, .. } => fwd.k(),
            Home::Cuda { w } => w.dims().get(1).copied().unwrap_or(0),
        }
    }

    /// Output features `n`.
    pub fn n(&self) -> usize {
        match &self.home {
            Home::Cpu { fwd, .. } => fwd.n(),
            Home::Cuda { w } => w.dims().first().copied().unwrap_or(0),
        }
    }

    /// `x @ W`: `[.., k]` -> `[.., n]`, in x's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.home {
            Home::Cpu { fwd, .. } => fwd.matmul_tensor(x),
            Home::Cuda { w } => cuda_product(x, w, Product::XWt, self.k(), self.n()),
        }
    }

    /// `g @ W^T`: `[.., n]` -> `[.., k]`, in g's dtype.
    pub fn backward(&self, g: &Tensor) -> Result<Tensor> {
        match &self.home {
            Home::Cpu { fwd, bwd } => bwd.get_or_init(|| fwd.transposed()).matmul_tensor(g),
            Home::Cuda { w } => cuda_product(g, w, Product::GW, self.n(), self.k()),
        }
    }

    /// Bytes held (on the CPU, both packings when the backward one exists).
    pub fn bytes(&self) -> usize {
        match &self.home {
            Home::Cpu { fwd, bwd } => fwd.bytes() + bwd.get().map_or(0, Packed::bytes),
            Home::Cuda { w } => w.elem_count() * 2,
        }
    }
}

/// `x` `[.., inner]` times the bf16 weight `w` `[n, k]` on its CUDA device by cuBLAS
/// ([`Product::XWt`]: inner = k, out = n; [`Product::GW`]: inner = n, out = k), in x's dtype.
fn cuda_product(x: &Tensor, w: &Tensor, p: Product, inner: usize, out: usize) -> Result<Tensor> {
    let dims = x.dims();
    let last = dims.last().copied().unwrap_or(0);
    if last != inner {
        candle_core::bail!("bf16 matmul: input has {last} features, the weight expects {inner}");
    }
    if !x.device().same_device(w.device()) {
        candle_core::bail!(
            "bf16 matmul: the input is on {:?}, the weight on {:?}",
            x.device().location(),
            w.device().location()
        );
    }
    let m: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    let xb = x.reshape((m, inner))?.to_dtype(DType::BF16)?.contiguous()?;
    let y = xb.apply_op2_no_bwd(w, &Bf16Gemm(p))?;
    let mut shape = dims.to_vec();
    if let Some(l) = shape.last_mut() {
        *l = out;
    }
    y.reshape(shape)?.to_dtype(x.dtype())
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
