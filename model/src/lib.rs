//! `model`: the transformer engine every service of the project stands on, written on candle.
//!
//! It loads a GGUF file or a Hugging Face folder (Llama family, Qwen2), tokenizes and renders chat
//! templates, samples ragged batches with per-token logprobs, scores completions under teacher
//! forcing without materialising batch x length x vocab logits, reads and writes PEFT LoRA
//! adapters (applied unmerged, swapped without reloading the base), and gives the learner a
//! differentiable forward whose gradients reach the LoRA tensors only; it writes a model with its
//! adapter merged back out as a Hugging Face folder.
//!
//! It must never download anything (loading reads local paths only), never panic on a user's
//! file or request (every bad input is an [`Error`] naming it), and never know about GRPO, HTTP
//! or the rollout database: those live in the crates above it.
//!
//! All of the workspace's `unsafe` code is in one private module, `kernels` (the bf16 GEMM, the
//! oneDNN bindings, the vectorized row kernels, the allocator settings); [`bf16`], [`onednn`],
//! [`simd`] and [`alloc`] are its public faces.

pub mod bf16;
pub mod chat;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod export;
pub mod grad;
pub mod hub;
mod kernels;
pub mod loader;
pub mod lora;
pub mod onednn;
pub mod request;
pub mod sampler;
pub mod tokenizer;
pub mod transformer;

pub use chat::{ChatTemplate, Message};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use engine::{Engine, Generation, TokenEvent, TrainLogprobs};
pub use error::{Error, Result};
pub use export::{export_merged, ExportReport};
pub use kernels::{alloc, simd};
pub use lora::{LoraAdapter, LoraConfig, LoraPair, Proj};
pub use request::{GenerateRequest, Limits, ScoreRequest};
pub use sampler::{FinishReason, SamplingParams};
pub use tokenizer::Tokenizer;

/// The `--version` line of every binary of the workspace: the version and the devices the build
/// supports, e.g. `0.1.0 (devices: cpu, cuda)`. The orchestrator reads it from the services it
/// would start, so a run on `cuda` is refused before anything is created when one of them was
/// built without the feature.
#[cfg(feature = "cuda")]
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (devices: cpu, cuda)");
#[cfg(not(feature = "cuda"))]
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (devices: cpu)");

/// Whether a [`VERSION`] line (another binary's `--version` output) names CUDA support.
pub fn version_supports_cuda(version_line: &str) -> bool {
    version_line
        .split_once("(devices:")
        .is_some_and(|(_, devices)| devices.split([',', ')', ' ']).any(|d| d == "cuda"))
}

/// The device named on a command line: `cpu`, `cuda` or `cuda:N` (CUDA needs the `cuda` feature
/// and a GPU the driver can open; each error names the fix).
pub fn device(name: &str) -> Result<candle_core::Device> {
    let cuda = |ordinal: usize| {
        if !candle_core::utils::cuda_is_available() {
            return Err(Error::Device(format!(
                "device '{name}' needs a build with the `cuda` feature (`cargo build --release \
                 --features cuda`; scripts/train does it when the config asks for cuda) and a GPU; \
                 or use 'cpu'"
            )));
        }
        candle_core::Device::new_cuda(ordinal).map_err(|e| {
            // The driver's answer without the backtrace candle may have attached to it.
            let e = match e {
                candle_core::Error::WithBacktrace { inner, .. } => *inner,
                e => e,
            };
            Error::Device(format!(
                "device '{name}': no usable CUDA GPU ({e}); check `nvidia-smi` and \
                 CUDA_VISIBLE_DEVICES, or use 'cpu'"
            ))
        })
    };
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => cuda(n),
            None => Err(Error::Device(format!(
                "unknown device '{other}': use cpu, cuda or cuda:N"
            ))),
        },
    }
}

/// The device the oracle test suites and benches run on: the `TEST_DEVICE` environment
/// variable (`cpu`, `cuda`, `cuda:N`; `cpu` when unset). A device this build or machine cannot
/// open is an error, never a quiet fallback to the CPU.
pub fn test_device() -> Result<candle_core::Device> {
    let name = std::env::var("TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    device(&name).map_err(|e| Error::Device(format!("TEST_DEVICE={name}: {e}")))
}

/// The dtype named on a command line: `f32`, `bf16` or `f16`.
pub fn dtype(name: &str) -> Result<candle_core::DType> {
    match name {
        "f32" => Ok(candle_core::DType::F32),
        "bf16" => Ok(candle_core::DType::BF16),
        "f16" => Ok(candle_core::DType::F16),
        other => Err(Error::InvalidRequest(format!(
            "unknown dtype '{other}': use f32, bf16 or f16"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn device_and_dtype_names() {
        assert!(matches!(super::device("cpu"), Ok(candle_core::Device::Cpu)));
        let e = super::device("tpu").unwrap_err().to_string();
        assert!(
            e.contains("unknown device 'tpu'") && e.contains("cpu, cuda or cuda:N"),
            "{e}"
        );
        if !candle_core::utils::cuda_is_available() {
            let e = super::device("cuda:0").unwrap_err().to_string();
            assert!(e.contains("`cuda` feature"), "{e}");
        }
        assert_eq!(super::dtype("bf16").unwrap(), candle_core::DType::BF16);
        assert_eq!(
            super::version_supports_cuda(super::VERSION),
            cfg!(feature = "cuda")
        );
        assert!(super::version_supports_cuda(
            "learner 0.1.0 (devices: cpu, cuda)"
        ));
        assert!(!super::version_supports_cuda(
            "learner 0.1.0 (devices: cpu)"
        ));
        assert!(!super::version_supports_cuda("learner 0.1.0"));
        let e = super::dtype("f8").unwrap_err().to_string();
        assert!(e.contains("unknown dtype 'f8'"), "{e}");
    }
}
