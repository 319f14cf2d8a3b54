//! What the workspace's programs (rollout-server, ref-scorer, learner, orchestrate) do the same
//! way when they start: log to stderr (`RUST_LOG`, default `info`) with the allocator tuned for
//! the engine, and load an engine from the strings of `--model`, `--adapter`, `--device` and
//! `--dtype`, an error naming the flag that failed; and die with the process that started them
//! (`--parent-pid`).

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

/// `--parent-pid PID`: how the orchestrator starts its children, so that none outlives it.
#[derive(Debug, Clone, clap::Args)]
pub struct ParentFlags {
    /// Die (SIGKILL, through the kernel's `PR_SET_PDEATHSIG`) when process PID, this process's
    /// parent, dies, also when it is SIGKILLed. Refuses to start if PID is already gone.
    #[arg(long, value_name = "PID")]
    pub parent_pid: Option<u32>,
}

impl ParentFlags {
    /// Arms the parent-death signal; an error when the parent is already gone. Call first thing in `main`, on the main thread: the kernel
    /// sends it when the parent's thread that started this process exits (the orchestrator
    /// starts children from its runtime's worker threads, which live as long as it does).
    pub fn apply(&self) -> Result<(), String> {
        let Some(parent) = self.parent_pid else {
            return Ok(());
        };
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
            .map_err(|e| format!("--parent-pid {parent}: cannot arm PR_SET_PDEATHSIG: {e}"))?;
        // The parent may have died before the signal was armed: then this process was already
        // handed to another parent, and nothing will ever send it.
        let now = rustix::process::Pid::as_raw(rustix::process::getppid());
        if i64::from(now) != i64::from(parent) {
            return Err(format!(
                "--parent-pid {parent}: that is not this process's parent (its parent is {now}: \
                 the given one is gone or never was); not starting"
            ));
        }
        Ok(())
    }
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
