//! The run: from a config to trained checkpoints, iteration by iteration, always resumable from
//! the rollout database. This module opens a run (preflight checks in `preflight`, the services
//! started from typed command lines) and moves each iteration through the phases the store
//! records, one module each: `sampling`, `scoring` (`scoring_ref`), `training`,
//! `evaluating` (every `test_every_n_iterations`). Crash points for the tests are in
//! `failpoints`.
//!
//! A failing child is reported with what it said; a crashed or hung server is restarted and the
//! request sent again (the supervisor's [`Service::call`], with a deadline from the request's
//! size). Nothing here holds state that the database does not: killing the orchestrator at any
//! point and running it again continues where it stopped.

mod evaluating;
mod failpoints;
mod preflight;
mod sampling;
mod scoring;
mod training;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use learner::checkpoint;
use rl_core::config::Config;
use rl_core::prompts::PromptStyle;
use rl_core::tasks::{self, Problem};
use rl_store::{Phase, RunSpec, Store, TaskRecord};

use crate::children::{self, RolloutServer, ServiceArgs};
use crate::supervisor::{Adapter, Service};

use failpoints::crash_at;
pub use failpoints::FAILPOINT_ENV;
use preflight::{check_compatible, check_ports};

/// An open run: config, database, data and services.
pub struct Run {
    pub config: Config,
    pub dir: PathBuf,
    pub store: Store,
    train: Vec<Problem>,
    test: Vec<Problem>,
    rollout: Service,
    scorer: Service,
    /// The `kill-rollout-server` / `stop-rollout-server` failpoint fired (each run fires one once).
    killed: std::sync::atomic::AtomicBool,
    /// The run directory's lock, held while this run is open.
    _lock: std::fs::File,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Run({})", self.dir.display())
    }
}

/// The name of the lock file in a run directory.
const LOCK_FILE: &str = ".orchestrate.lock";

/// Takes the run directory's lock (an exclusive `flock`, which the kernel releases when this
/// process dies however it dies), so that two orchestrators never drive one run; the lock file
/// holds the holder's pid for the error message.
fn lock_run_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::io::Write;
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| {
            anyhow::anyhow!(
                "opening the run's lock {}: {e}{}",
                path.display(),
                rl_core::files::fix_for(e.kind(), dir)
            )
        })?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        anyhow::bail!(
            "{} is in use by another orchestrate (pid {}; lock {}): wait for it to finish or stop it, then resume",
            dir.display(),
            holder.trim(),
            path.display()
        );
    }
    file.set_len(0)
        .and_then(|()| write!(file, "{}", std::process::id()))
        .map_err(|e| {
            anyhow::anyhow!(
                "writing the run's lock {}: {e}{}",
                path.display(),
                rl_core::files::fix_for(e.kind(), dir)
            )
        })?;
    Ok(file)
}

impl Run {
    /// Opens (or creates) the run directory of `config`, loads the data and starts or connects
    /// to the services.
    pub async fn open(mut config: Config) -> anyhow::Result<Run> {
        let cwd = std::env::current_dir()?;
        config.resolve_paths(&cwd);
        check_ports(&config)?;
        let bins = children::bin_dir()?;
        {
            // The services this run starts itself (the learner always) must run on its device.
            let s = &config.services;
            let mut local = vec![bins.join("learner")];
            if s.rollout.endpoints.is_empty() {
                local.push(bins.join("rollout-server"));
            }
            if s.ref_scorer.endpoint.is_none() {
                local.push(bins.join("ref-scorer"));
            }
            let local: Vec<&Path> = local.iter().map(PathBuf::as_path).collect();
            crate::device::preflight(&config.model.device, &local)?;
        }
        let dir = config.output_dir.clone();
        std::fs::create_dir_all(checkpoint::root(&dir))
            .with_context(|| format!("creating the run directory {}", dir.display()))?;
        let lock = lock_run_dir(&dir)?;
        // What a crash left half-written (a killed learner's checkpoint, a report being
        // replaced): nothing reads it, and it goes before anything else is written.
        for folder in [dir.clone(), checkpoint::root(&dir)] {
            let removed = checkpoint::clean_partials(&folder)?;
            if removed > 0 {
                tracing::warn!(
                    "removed {removed} partial file(s) left by a crash in {}",
                    folder.display()
                );
            }
        }
        let db = dir.join("rollouts.sqlite");
        let yaml = config.to_yaml().map_err(anyhow::Error::msg)?;
        let spec = RunSpec {
            config_yaml: yaml.clone(),
            model: config.model.path.clone(),
            seed: config.seed,
            attempts: config.attempts,
        };
        let (store, created) = Store::open_or_create(&db, &spec).await?;
        if !created {
            check_compatible(&store.run().await?.spec, &config, &db)?;
            store.update_config(&yaml).await?;
        }
        rl_core::files::write_file(&dir.join("config.yaml"), yaml.as_bytes())?;
        let train = tasks::load_gsm8k(&config.data.train)?;
        let mut test = tasks::load_gsm8k(&config.data.test)?;
        if let Some(limit) = config.data.test_limit {
            test.truncate(limit as usize);
        }
        let s = &config.services;
        let startup = Duration::from_secs(u64::from(s.startup_timeout_s));
        let rollout = match s.rollout.endpoints.first() {
            Some(url) => {
                Service::external("rollout-server", url, s.api_key.clone(), s.max_attempts).await?
            }
            None => {
                let spec = RolloutServer {
                    checkpoints_dir: Some(checkpoint::root(&dir)),
                    max_batch: Some(s.rollout.max_batch),
                    max_queue: Some(s.rollout.max_queue),
                    max_n: Some(config.attempts.max(128)),
                    ..RolloutServer::new(ServiceArgs::from_config(&config, s.rollout.port))
                }
                .spec()?;
                Service::spawn(spec, s.api_key.clone(), startup, s.max_attempts).await?
            }
        };
        let scorer = match &s.ref_scorer.endpoint {
            Some(url) => {
                Service::external("ref-scorer", url, s.api_key.clone(), s.max_attempts).await?
            }
            None => {
                let spec =
                    children::ref_scorer(&ServiceArgs::from_config(&config, s.ref_scorer.port))?;
                match Service::spawn(spec, s.api_key.clone(), startup, s.max_attempts).await {
                    Ok(svc) => svc,
                    Err(e) => {
                        rollout.stop().await;
                        return Err(e);
                    }
                }
            }
        };
        Ok(Run {
            config,
            dir,
            store,
            train,
            test,
            rollout,
            scorer,
            killed: Default::default(),
            _lock: lock,
        })
    }

    /// Stops the services this run started.
    pub async fn shutdown(&self) {
        self.rollout.stop().await;
        self.scorer.stop().await;
    }

    /// Runs every iteration up to `max_iterations`, from wherever the database says (after
    /// retraining any checkpoint that no longer matches its recorded sha256).
    pub async fn run_all(&self) -> anyhow::Result<()> {
        self.repair_checkpoints().await?;
        for it in 0..self.config.max_iterations {
            self.iteration(it).await?;
        }
        Ok(())
    }

    fn checkpoint_dir(&self, iteration: u32) -> PathBuf {
        checkpoint::dir(&self.dir, iteration)
    }

    /// The deadline of a request for `tokens` tokens while `in_flight` like it are sent at once.
    fn deadline(&self, tokens: u64, in_flight: usize) -> Duration {
        let in_flight = u32::try_from(in_flight).unwrap_or(u32::MAX);
        self.config.services.deadline(tokens, in_flight)
    }

    /// Makes the rollout server serve the latest recorded checkpoint (if any), sent as bytes
    /// with its recorded sha256.
    async fn serve_latest_checkpoint(&self) -> anyhow::Result<()> {
        let latest = self
            .store
            .checkpoints()
            .await?
            .into_iter()
            .max_by_key(|c| c.iteration)
            .map(|c| Adapter {
                name: checkpoint::name(c.iteration),
                dir: self.checkpoint_dir(c.iteration),
                sha256: c.sha256,
            });
        self.rollout.serve_adapter(latest.as_ref()).await
    }

    fn tasks_of(&self, iteration: u32) -> Vec<TaskRecord> {
        let c = &self.config;
        tasks::problems_for_iteration(
            c.seed,
            iteration,
            c.problems_per_iteration as usize,
            self.train.len(),
        )
        .into_iter()
        .enumerate()
        .map(|(g, p)| TaskRecord {
            group_index: g as u32,
            problem_index: p as u64,
            question: self.train[p].question.clone(),
            gold: self.train[p].gold.text.clone(),
            seed: tasks::group_seed(c.seed, iteration, p),
        })
        .collect()
    }

    fn style(&self) -> PromptStyle {
        self.config.prompt.style
    }

    /// One iteration, from its recorded phase to `done`.
    pub async fn iteration(&self, it: u32) -> anyhow::Result<()> {
        let existing = self
            .store
            .iterations()
            .await?
            .into_iter()
            .find(|s| s.iteration == it);
        if existing.is_some_and(|s| s.phase == Phase::Done) {
            return Ok(());
        }
        let t0 = Instant::now();
        self.store
            .begin_iteration(it, self.config.attempts, &self.tasks_of(it))
            .await?;
        self.serve_latest_checkpoint().await?;
        let mut phase = self.phase(it).await?;
        if phase == Phase::Sampling {
            let t = Instant::now();
            self.sample(it).await?;
            self.store
                .finish_phase(it, Phase::ScoringRef, t.elapsed().as_secs_f64())
                .await?;
            phase = Phase::ScoringRef;
        }
        if phase == Phase::ScoringRef {
            let t = Instant::now();
            self.score_ref(it).await?;
            self.store
                .finish_phase(it, Phase::Training, t.elapsed().as_secs_f64())
                .await?;
            phase = Phase::Training;
        }
        if phase == Phase::Training {
            let t = Instant::now();
            self.train(it).await?;
            crash_at("training", it);
            self.serve_latest_checkpoint().await?;
            let next = if self.eval_due(it) {
                Phase::Evaluating
            } else {
                Phase::Done
            };
            self.store
                .finish_phase(it, next, t.elapsed().as_secs_f64())
                .await?;
            phase = next;
        }
        if phase == Phase::Evaluating {
            let t = Instant::now();
            self.evaluate(it).await?;
            self.store
                .finish_phase(it, Phase::Done, t.elapsed().as_secs_f64())
                .await?;
        }
        crate::report::iteration_done(&self.store, &self.dir, it, t0.elapsed().as_secs_f64())
            .await?;
        Ok(())
    }

    fn eval_due(&self, it: u32) -> bool {
        let n = self.config.test_every_n_iterations;
        n > 0 && ((it + 1).is_multiple_of(n) || it + 1 == self.config.max_iterations)
    }

    async fn phase(&self, it: u32) -> anyhow::Result<Phase> {
        self.store
            .iterations()
            .await?
            .into_iter()
            .find(|s| s.iteration == it)
            .map(|s| s.phase)
            .context("the iteration vanished from the database")
    }
}
