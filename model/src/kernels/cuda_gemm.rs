//! The `unsafe` code of the bf16 path on an NVIDIA GPU: `cublasGemmEx` with bf16 operands, f32
//! accumulation and an **f32 output**, the arithmetic of the CPU kernel in [`super::bf16_gemm`]
//! (bf16 products are exact in f32; sums in f32; nothing rounded on the way out). candle's own
//! bf16 matmul writes a bf16 result, which would round every projection's output once more than
//! the CPU path does and break the accuracy rule both share.
//!
//! Two products over a weight `W` `[n, k]` stored row-major as on disk (`[out, in]`), bf16:
//! - [`Product::XWt`]: `Y[m, n] = X[m, k] W^T` (the forward, `x @ W^T`);
//! - [`Product::GW`]: `Y[m, k] = G[m, n] W` (the learner's input gradient).
//!
//! cuBLAS is column-major: a row-major `[r, c]` buffer is the column-major `[c, r]` matrix, so
//! `Y = X W^T` is computed as `Y^T (n x m) = op_T(W: k x n, ld k) * X^T (k x m, ld k)`, and
//! `Y = G W` as `Y^T (k x m) = W^T (k x n, ld k) * G^T (n x m, ld n)`.
//!
//! What it must never do: run on anything but contiguous bf16 operands on one CUDA device (the
//! safe layer, [`crate::bf16`], makes them so; every size is checked here again before the call).

use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape};

/// Which product [`Bf16Gemm`] computes (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    /// `X[m, k] W^T -> [m, n]`.
    XWt,
    /// `G[m, n] W -> [m, k]`.
    GW,
}

/// The custom op: `apply_op2(activations, weight)`, both bf16 and contiguous on the GPU; the
/// result is f32. No backward (the engine's own backward calls the [`Product::GW`] op).
#[derive(Debug, Clone, Copy)]
pub struct Bf16Gemm(pub Product);

/// `(m, k, n)` of a product from the two layouts, checked.
fn sizes(p: Product, xl: &Layout, wl: &Layout) -> Result<(usize, usize, usize)> {
    let (n, k) = wl.shape().dims2()?;
    let (m, inner) = xl.shape().dims2()?;
    let want = match p {
        Product::XWt => k,
        Product::GW => n,
    };
    if inner != want {
        candle_core::bail!(
            "bf16 gemm: activations [{m}, {inner}] do not fit the weight [{n}, {k}] ({p:?})"
        );
    }
    if xl.contiguous_offsets().is_none() || wl.contiguous_offsets().is_none() {
        candle_core::bail!("bf16 gemm: operands must be contiguous");
    }
    // cuBLAS takes int sizes and leading dimensions.
    let fits = |v: usize| i32::try_from(v).is_ok();
    if !(fits(m) && fits(k) && fits(n)) {
        candle_core::bail!("bf16 gemm: [{m}, {k}] x [{n}, {k}] is too large for cuBLAS");
    }
    Ok((m, k, n))
}

impl CustomOp2 for Bf16Gemm {
    fn name(&self) -> &'static str {
        "bf16-gemm-f32-out"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        xl: &Layout,
        _: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        sizes(self.0, xl, wl)?;
        candle_core::bail!(
            "bf16 gemm: the cuBLAS op runs on CUDA tensors only (the CPU has its own kernel)"
        )
    }

    #[cfg(not(feature = "cuda"))]
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        xl: &Layout,
        _: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        sizes(self.0, xl, wl)?;
        candle_core::bail!("bf16 gemm: this build has no `cuda` feature")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
        use candle_core::cuda_backend::WrapErr;
        use half::bf16;

        let (m, k, n) = sizes(self.0, xl, wl)?;
        let (out_rows, out_cols) = match self.0 {
            Product::XWt => (m, n),
            Product::GW => (m, k),
        };
        let dev = x.device().clone();
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("bf16 gemm: operands must be contiguous");
        };
        let xs = x.as_cuda_slice::<bf16>()?.slice(x0..x1);
        let ws = w.as_cuda_slice::<bf16>()?.slice(w0..w1);
        if m == 0 || k == 0 || n == 0 {
            // A sum of nothing (k or n = 0 on the inner side) is 0; cuBLAS would refuse the
            // zero leading dimensions.
            let out = dev.alloc_zeros::<f32>(out_rows * out_cols)?;
            let shape = Shape::from((out_rows, out_cols));
            return Ok((CudaStorage::wrap_cuda_slice(out, dev), shape));
        }
        // SAFETY: every element is written by the product below (beta = 0, so cuBLAS reads
        // nothing of it first; m, k and n are all positive here).
        let mut out = unsafe { dev.alloc::<f32>(out_rows * out_cols)? };
        {
            let stream = dev.cuda_stream();
            let blas = dev.cublas_handle();
            let (alpha, beta) = (1f32, 0f32);
            // Sizes were checked to fit an i32 by `sizes`.
            let i = |v: usize| v as i32;
            // (transa, transb, m', n', k', lda, ldb, ldc) of the column-major call.
            let (ta, tb, mm, nn, kk, lda, ldb, ldc) = match self.0 {
                Product::XWt => (
                    sys::cublasOperation_t::CUBLAS_OP_T,
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    n,
                    m,
                    k,
                    k,
                    k,
                    n,
                ),
                Product::GW => (
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    k,
                    m,
                    n,
                    k,
                    n,
                    k,
                ),
            };
            let (wp, _gw) = ws.device_ptr(&stream);
            let (xp, _gx) = xs.device_ptr(&stream);
            let (op, _go) = out.device_ptr_mut(&stream);
            // SAFETY: the pointers come from live allocations of this device, guarded until the
            // call has been queued on their stream (the guards drop after it); the sizes and
            // leading dimensions were checked against both layouts by `sizes`, so cuBLAS reads
            // `W` (n*k values), the activations (m*k or m*n) and writes `out` (its length)
            // within bounds; alpha and beta are f32 as CUBLAS_COMPUTE_32F requires, and live
            // across the call (cuBLAS reads host scalars before returning).
            unsafe {
                gemm_ex(
                    *blas.handle(),
                    ta,
                    tb,
                    i(mm),
                    i(nn),
                    i(kk),
                    (&alpha) as *const f32 as *const _,
                    wp as *const _,
                    sys::cudaDataType_t::CUDA_R_16BF,
                    i(lda),
                    xp as *const _,
                    sys::cudaDataType_t::CUDA_R_16BF,
                    i(ldb),
                    (&beta) as *const f32 as *const _,
                    op as *mut _,
                    sys::cudaDataType_t::CUDA_R_32F,
                    i(ldc),
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
                .w()?;
            }
        }
        let shape = Shape::from((out_rows, out_cols));
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// The shape rules hold on every build: the op checks them before anything else, and on
    /// the CPU it then refuses (the CPU has its own kernel).
    #[test]
    fn sizes_are_checked_for_both_products() -> Result<()> {
        let w = Tensor::zeros((5, 3), DType::BF16, &Device::Cpu)?; // [n, k]
        let x = Tensor::zeros((2, 3), DType::BF16, &Device::Cpu)?; // [m, k]
        let g = Tensor::zeros((2, 5), DType::BF16, &Device::Cpu)?; // [m, n]
        assert_eq!(sizes(Product::XWt, x.layout(), w.layout())?, (2, 3, 5));
        assert_eq!(sizes(Product::GW, g.layout(), w.layout())?, (2, 3, 5));
        let e = sizes(Product::GW, x.layout(), w.layout()).unwrap_err();
        assert!(
            e.to_string()
                .contains("activations [2, 3] do not fit the weight [5, 3] (GW)"),
            "{e}"
        );
        let e = sizes(Product::XWt, x.layout(), w.t()?.layout()).unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
        let e = sizes(Product::XWt, x.layout(), w.t()?.t()?.layout());
        assert!(e.is_ok(), "a transposed-back view is contiguous again");
        let strided = Tensor::zeros((3, 2), DType::BF16, &Device::Cpu)?.t()?; // [2, 3] view
        let e = sizes(Product::XWt, strided.layout(), w.layout()).unwrap_err();
        assert!(e.to_string().contains("contiguous"), "{e}");
        let e = x.apply_op2_no_bwd(&w, &Bf16Gemm(Product::XWt)).unwrap_err();
        assert!(e.to_string().contains("CUDA tensors only"), "{e}");
        Ok(())
    }
}
