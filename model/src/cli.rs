//! What the workspace's programs (rollout-server, ref-scorer, learner, orchestrate) do the same
//! way when they start: log to stderr (`RUST_LOG`, default `info`) with the allocator tuned for
//! the engine, and load an engine from the strings of `--model`, `--adapter`, `--device` and
//! `--dtype`, an error naming the flag that failed.

use std::path::{Path, PathBuf};

use crate::{Engine, Error};

/// Tunes the allocator ([`crate::alloc::tune`]) and sends `tracing` logs to stderr.
pub fn init() {
    crate::alloc::tune();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// `--device` and `--dtype`, as every program that loads an engine takes them.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceFlags {
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The weights' dtype: `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// A flag whose value could not be used.
#[derive(Debug, thiserror::Error)]
#[error("loading --{flag} {value}")]
pub struct FlagError {
    pub flag: &'static str,
    pub value: String,
    #[source]
    pub source: Box<Error>,
}

/// The engine of `--model` (a file, a folder or, with the `hub` feature, a hub id) on
/// `--device` in `--dtype`, with `--adapter` applied when given; also the resolved model path.
pub fn load_engine(
    model: &str,
    adapter: Option<&Path>,
    flags: &DeviceFlags,
) -> Result<(Engine, PathBuf), FlagError> {
    let (device, dtype) = (flags.device.as_str(), flags.dtype.as_str());
    let flag = |flag: &'static str, value: String| {
        move |source: Error| FlagError {
            flag,
            value,
            source: Box::new(source),
        }
    };
    let device = crate::device(device).map_err(flag("device", device.to_string()))?;
    let dtype = crate::dtype(dtype).map_err(flag("dtype", dtype.to_string()))?;
    let path = crate::hub::resolve(model).map_err(flag("model", model.to_string()))?;
    let mut engine =
        Engine::load(&path, &device, dtype).map_err(flag("model", model.to_string()))?;
    if let Some(dir) = adapter {
        engine
            .load_adapter(dir)
            .map_err(flag("adapter", dir.display().to_string()))?;
    }
    Ok((engine, path))
}
