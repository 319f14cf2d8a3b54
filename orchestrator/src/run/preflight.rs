//! Checks made before a run creates or changes anything: configured ports are free, and a
//! database being resumed belongs to a run with the same model, seed and group size.

use std::path::Path;

use anyhow::bail;
use rl_core::config::Config;
use rl_store::RunSpec;

/// Fails early when a configured port is taken (before anything is created).
pub(super) fn check_ports(config: &Config) -> anyhow::Result<()> {
    let s = &config.services;
    let wanted = [
        (
            "services.rollout.port",
            s.rollout.port,
            s.rollout.local_replicas(),
        ),
        (
            "services.ref_scorer.port",
            s.ref_scorer.port,
            s.ref_scorer.local_replicas(),
        ),
    ];
    for (key, first, replicas) in wanted {
        if first == 0 {
            continue;
        }
        // Replica i listens on first + i (validated to stay below 65536).
        for port in
            (u32::from(first)..u32::from(first) + replicas).filter_map(|p| u16::try_from(p).ok())
        {
            std::net::TcpListener::bind((s.host.as_str(), port)).map_err(|e| {
                anyhow::anyhow!("`{key}`: {}:{port} is not free ({e}); choose another port or 0 for any free ones (replica i listens on port + i)", s.host)
            })?;
        }
    }
    Ok(())
}

/// What a run must keep from one start to the next; a change would mix two runs in one database.
pub(super) fn check_compatible(stored: &RunSpec, config: &Config, db: &Path) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    if stored.model != config.model.path {
        problems.push(format!(
            "model.path was {} and is now {}",
            stored.model, config.model.path
        ));
    }
    if stored.seed != config.seed {
        problems.push(format!(
            "seed was {} and is now {}",
            stored.seed, config.seed
        ));
    }
    if stored.attempts != config.attempts {
        problems.push(format!(
            "attempts (the group size) was {} and is now {}",
            stored.attempts, config.attempts
        ));
    }
    if !problems.is_empty() {
        bail!(
            "{} belongs to a run whose config differs: {}; resume with the original config (its config.yaml) or choose another output_dir",
            db.display(),
            problems.join("; ")
        );
    }
    Ok(())
}
