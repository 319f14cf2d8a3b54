//! The device check a run passes before it creates anything: a config that names `cuda` must
//! find every service it would start built with the `cuda` feature, and a GPU this process can
//! open. Without it a CPU-only build would make the run folder and its database, start the
//! services, and only then fail in the first one to load the model.
//!
//! What it must never do: change anything on disk, or start a service (it only asks each binary
//! for its `--version`, whose line says which devices the build supports, see
//! [`model::VERSION`]).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use rl_core::config::Device;

/// How to get a CUDA build, said in every refusal.
const FIX: &str = "build with the `cuda` feature (`cargo build --release --features cuda --bins \
    -p orchestrator -p rollout-server -p ref-scorer -p learner`; `scripts/train CONFIG` does it \
    when the config asks for cuda), or set model.device=cpu";

/// Checks that `device` can be used by `binaries` (the services the run would start) and by
/// this process.
pub fn preflight(device: Device, binaries: &[&Path]) -> anyhow::Result<()> {
    if device.is_cpu() {
        return Ok(());
    }
    check_binaries(device, binaries)?;
    model::device(&device.to_string())
        .map(drop)
        .with_context(|| format!("`model.device: {device}` cannot be used by orchestrate"))
}

/// Each binary's `--version` line must name CUDA among its devices.
pub fn check_binaries(device: Device, binaries: &[&Path]) -> anyhow::Result<()> {
    for bin in binaries {
        let out = Command::new(bin)
            .arg("--version")
            .output()
            .with_context(|| format!("running {} --version (is it built?)", bin.display()))?;
        let line = String::from_utf8_lossy(&out.stdout);
        let line = line.trim();
        if !out.status.success() || !model::version_supports_cuda(line) {
            bail!(
                "`model.device: {device}` needs CUDA, but {} was built without it (its \
                 --version says {line:?}); {FIX}",
                bin.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in binary that prints `line` for `--version`.
    fn fake(dir: &Path, name: &str, line: &str) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\necho '{line}'\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn a_service_built_without_cuda_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = fake(
            dir.path(),
            "rollout-server",
            "rollout-server 0.1.0 (devices: cpu, cuda)",
        );
        let bad = fake(dir.path(), "learner", "learner 0.1.0 (devices: cpu)");
        check_binaries(Device::Cuda(0), &[&good]).unwrap();
        let e = check_binaries(Device::Cuda(1), &[&good, &bad])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("learner was built without it")
                && e.contains("(devices: cpu)")
                && e.contains("--features cuda")
                && e.contains("model.device=cpu"),
            "{e}"
        );
        let e = check_binaries(Device::Cuda(0), &[&dir.path().join("missing")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing --version"), "{e}");
        // The CPU needs nothing from the binaries.
        preflight(Device::Cpu, &[&bad]).unwrap();
    }
}
