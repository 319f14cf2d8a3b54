//! Every line of `unsafe` in the engine, and nothing else of the workspace may have any (the
//! workspace denies `unsafe_code`; this module alone allows it). Each block carries a `SAFETY`
//! comment saying why it holds, and each kernel is tested against a plain reference.
//!
//! - [`bf16_gemm`]: the AVX512-BF16 matrix multiply (bf16 inputs, f32 accumulation), its CPU
//!   feature probes (AVX512-BF16, AMX) and the packing of its left operand. [`crate::bf16`] is
//!   the safe layer over it.
//! - [`cuda_gemm`]: the same product on an NVIDIA GPU (`cublasGemmEx`, bf16 in, f32 out), the
//!   `cuda` feature's counterpart of the CPU kernel, behind the same safe layer.
//! - [`dnnl`]: oneDNN's matmul, opened at run time (`libdnnl.so.2`) through a hand-written
//!   declaration of the few C functions used; [`crate::onednn`] is its safe layer.
//! - [`simd`]: the row kernels (exp, softmax, log-sum-exp, their backwards, decode attention),
//!   each compiled for the baseline target and for AVX-512F and picked at run time.
//! - [`alloc`]: the glibc `mallopt` settings that keep big tensor buffers in the heap.
//!
//! What it must never do: hold state, own tensors, or grow safe logic that could live outside
//! it; code lands here only when it needs `unsafe`, and stays as small as that need.
#![allow(unsafe_code)]

pub mod alloc;
pub mod bf16_gemm;
pub mod cuda_gemm;
pub mod dnnl;
pub mod simd;
