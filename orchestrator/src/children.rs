//! The command lines of the child processes, typed, in one place for the run and for
//! `orchestrate eval`: a rollout server, a ref-scorer, a learner step. Each builder names the
//! binary beside `orchestrate` ([`bin_dir`]) and turns its fields into the flags the child's
//! `clap` parser reads.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rl_core::config::{ApiKey, Config, Device};

use crate::supervisor::ChildSpec;

/// Where the binaries of this build are (beside `orchestrate`), overridable for tests
/// (`ORCHESTRATE_BIN_DIR`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("ORCHESTRATE_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().context("locating orchestrate")?;
    Ok(exe
        .parent()
        .context("orchestrate has no folder")?
        .to_path_buf())
}

/// What both services take: the model, where to listen, the device and dtype, the key.
#[derive(Debug, Clone)]
pub struct ServiceArgs {
    pub model: String,
    pub host: String,
    pub port: u16,
    pub device: Device,
    pub dtype: &'static str,
    /// Given in the environment variable the service reads it from, never on its command line.
    pub api_key: Option<ApiKey>,
}

impl ServiceArgs {
    /// The run config's model, device, dtype, host and key, on `port` (0: any free one).
    pub fn from_config(config: &Config, port: u16) -> Self {
        Self {
            model: config.model.path.clone(),
            host: config.services.host.clone(),
            port,
            device: config.model.device,
            dtype: config.model.dtype.name(),
            api_key: config.services.api_key.clone(),
        }
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--model".to_string(),
            self.model.clone(),
            "--host".into(),
            self.host.clone(),
            "--port".into(),
            self.port.to_string(),
            "--device".into(),
            self.device.to_string(),
            "--dtype".into(),
            self.dtype.into(),
        ]
    }

    /// The key in `var` (the service's `--api-key` environment variable), when there is one.
    fn key(&self, var: &'static str) -> Option<(&'static str, ApiKey)> {
        self.api_key.clone().map(|k| (var, k))
    }
}

/// A rollout server.
#[derive(Debug, Clone)]
pub struct RolloutServer {
    pub service: ServiceArgs,
    /// Adapters load only from inside it (`POST /v1/adapters`).
    pub checkpoints_dir: Option<PathBuf>,
    /// An adapter served from the start.
    pub adapter: Option<PathBuf>,
    pub max_batch: Option<u32>,
    pub max_queue: Option<u32>,
    pub max_n: Option<u32>,
    /// Its compute threads (`None`: all cores).
    pub threads: Option<usize>,
}

impl RolloutServer {
    pub fn new(service: ServiceArgs) -> Self {
        Self {
            service,
            checkpoints_dir: None,
            adapter: None,
            max_batch: None,
            max_queue: None,
            max_n: None,
            threads: None,
        }
    }

    pub fn spec(&self) -> anyhow::Result<ChildSpec> {
        let mut args = self.service.args();
        let paths = [
            ("--checkpoints-dir", &self.checkpoints_dir),
            ("--adapter", &self.adapter),
        ];
        for (flag, value) in paths {
            if let Some(v) = value {
                args.extend([flag.to_string(), v.display().to_string()]);
            }
        }
        let numbers = [
            ("--max-batch", self.max_batch),
            ("--max-queue", self.max_queue),
            ("--max-n", self.max_n),
        ];
        for (flag, value) in numbers {
            if let Some(v) = value {
                args.extend([flag.to_string(), v.to_string()]);
            }
        }
        Ok(ChildSpec {
            program: bin_dir()?.join("rollout-server"),
            args,
            threads: self.threads,
            key: self.service.key("ROLLOUT_SERVER_API_KEY"),
        })
    }
}

/// A ref-scorer (the base model, no adapter).
pub fn ref_scorer(service: &ServiceArgs) -> anyhow::Result<ChildSpec> {
    Ok(ChildSpec {
        program: bin_dir()?.join("ref-scorer"),
        args: service.args(),
        threads: None,
        key: service.key("REF_SCORER_API_KEY"),
    })
}

/// One learner step: train `iteration` from the store at `db`, starting from `adapter_in` (none
/// for the first), and write the checkpoint `out`.
#[derive(Debug, Clone)]
pub struct LearnerStep<'a> {
    pub db: &'a Path,
    pub iteration: u32,
    pub model: &'a str,
    pub adapter_in: Option<&'a Path>,
    pub out: &'a Path,
    pub config: &'a Path,
    pub device: Device,
    pub dtype: &'static str,
}

impl LearnerStep<'_> {
    /// The command, its output piped (the orchestrator shows its tail when it fails), killed
    /// if the orchestrator drops it.
    pub fn command(&self) -> anyhow::Result<tokio::process::Command> {
        let mut cmd = tokio::process::Command::new(bin_dir()?.join("learner"));
        let adapter_in = self
            .adapter_in
            .map_or_else(|| "none".to_string(), |p| p.display().to_string());
        cmd.args(["train", "--db"])
            .arg(self.db)
            .args(["--iteration", &self.iteration.to_string()])
            .args(["--model", self.model])
            .args(["--adapter-in", &adapter_in])
            .arg("--out")
            .arg(self.out)
            .arg("--config")
            .arg(self.config)
            .args(["--device", &self.device.to_string(), "--dtype", self.dtype])
            .args(["--parent-pid", &std::process::id().to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        Ok(cmd)
    }
}
