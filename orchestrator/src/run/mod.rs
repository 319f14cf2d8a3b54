//! The run: from a config to trained checkpoints, iteration by iteration, always resumable from
//! the rollout database. This module opens a run (preflight checks in `preflight`, the services
//! started from typed command lines) and moves each iteration through the phases the store
//! records, one module each: `sampling`, `scoring` (`scoring_ref`), `training`,
//! `evaluating` (every `test_every_n_iterations`). Crash points for the tests are in
//! `failpoints` (feature `failpoints`, which only `cargo test` turns on).
//!
//! Two actors drive the phases, talking through the database and a change signal: the samplers'
//! side (`produce`: sampling, reference scoring, evaluation, all on the rollout servers) and the
//! learner's side (`consume`: training). Iteration `N` is sampled with the checkpoint of
//! iteration `N - 1 - async.max_lag` ([`rl_core::config::AsyncConfig::sampling_adapter`]), so
//! with `max_lag: 0` the two take turns (the synchronous loop) and with `k > 0` sampling runs up
//! to `k` iterations ahead of training. Which checkpoint samples which iteration is fixed by the
//! config, never by timing: a resumed run samples each group with the same adapter as an
//! uninterrupted one, and evaluation of checkpoint `N` runs on the samplers' side when they
//! serve `N` anyway.
//!
//! A failing child is reported with what it said; a crashed or hung server is restarted and the
//! request sent again, to another replica when there is one (the supervisor's [`Pool::call`],
//! with a deadline from the request's size). Nothing here holds state that the database does
//! not: killing the orchestrator at any point and running it again continues where it stopped.

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
use rl_core::config::{Config, Device};
use rl_core::prompts::PromptStyle;
use rl_core::tasks::{self, Problem};
use rl_store::{IdleSide, Phase, RunSpec, Store, TaskRecord};

use crate::children::{self, RolloutServer, ServiceArgs};
use crate::supervisor::{Adapter, ChildSpec, Pool, Service};

use failpoints::crash_at;
#[cfg(feature = "failpoints")]
pub use failpoints::FAILPOINT_ENV;
use preflight::{check_compatible, check_ports};

/// An open run: config, database, data and services.
pub struct Run {
    pub config: Config,
    pub dir: PathBuf,
    pub store: Store,
    train: Vec<Problem>,
    test: Vec<Problem>,
    rollout: Pool,
    scorer: Pool,
    /// Bumped after every phase change and stored group, so that each side sees what the other
    /// finished.
    changes: tokio::sync::watch::Sender<u64>,
    /// Whether a kill point of the chaos tests fired.
    #[cfg(feature = "failpoints")]
    fired: failpoints::Fired,
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
            if s.ref_scorer.local_replicas() > 0 {
                local.push(bins.join("ref-scorer"));
            }
            let server = bins.join("rollout-server");
            let mut devices = Vec::new();
            for i in 0..s.rollout.local_replicas() {
                let d = rollout_device(&config, i);
                if d == config.model.device {
                    local.push(server.clone());
                } else if !devices.contains(&d) {
                    devices.push(d);
                }
            }
            local.dedup();
            let local: Vec<&Path> = local.iter().map(PathBuf::as_path).collect();
            crate::device::preflight(config.model.device, &local)?;
            for d in devices {
                crate::device::preflight(d, &[server.as_path()])?;
            }
        }
        // A bad dataset fails here, before the run directory exists.
        let train = tasks::load(&config.data.train, &config.data)?;
        let mut test = tasks::load(&config.data.test, &config.data)?;
        if let Some(limit) = config.data.test_limit {
            test.truncate(limit as usize);
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
        let s = &config.services;
        // Local rollout servers on the CPU share its cores instead of each taking all of them.
        let on_cpu = (0..s.rollout.local_replicas())
            .filter(|&i| rollout_device(&config, i).is_cpu())
            .count();
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let rollout_specs = (0..s.rollout.local_replicas())
            .map(|i| {
                let device = rollout_device(&config, i);
                RolloutServer {
                    threads: (on_cpu > 1 && device.is_cpu()).then(|| (cores / on_cpu).max(1)),
                    checkpoints_dir: Some(checkpoint::root(&dir)),
                    max_batch: Some(s.rollout.max_batch),
                    max_queue: Some(s.rollout.max_queue),
                    max_n: Some(config.attempts.max(128)),
                    ..RolloutServer::new(ServiceArgs {
                        device,
                        ..ServiceArgs::from_config(&config, replica_port(s.rollout.port, i))
                    })
                }
                .spec()
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let rollout = start_pool(
            "rollout-server",
            rollout_specs,
            &s.rollout.endpoints,
            &config,
        )
        .await?;
        let scorer_specs = (0..s.ref_scorer.local_replicas())
            .map(|i| {
                children::ref_scorer(&ServiceArgs::from_config(
                    &config,
                    replica_port(s.ref_scorer.port, i),
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let scorer =
            match start_pool("ref-scorer", scorer_specs, &s.ref_scorer.endpoints, &config).await {
                Ok(p) => p,
                Err(e) => {
                    rollout.stop().await;
                    return Err(e);
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
            changes: tokio::sync::watch::Sender::new(0),
            #[cfg(feature = "failpoints")]
            fired: Default::default(),
            _lock: lock,
        })
    }

    /// Stops the services this run started.
    pub async fn shutdown(&self) {
        self.rollout.stop().await;
        self.scorer.stop().await;
    }

    /// Runs every iteration up to `max_iterations`, from wherever the database says (after
    /// retraining any checkpoint that no longer matches its recorded sha256): the samplers'
    /// side and the learner's side at once, until both are through (or one fails).
    pub async fn run_all(&self) -> anyhow::Result<()> {
        self.repair_checkpoints().await?;
        tokio::try_join!(self.produce(), self.consume())?;
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

    /// Makes the rollout servers serve the checkpoint of `iteration` (`None`: the base model),
    /// sent as bytes with its recorded sha256.
    async fn serve(&self, iteration: Option<u32>) -> anyhow::Result<()> {
        let adapter = match iteration {
            None => None,
            Some(it) => {
                let c = self
                    .store
                    .checkpoints()
                    .await?
                    .into_iter()
                    .find(|c| c.iteration == it)
                    .with_context(|| {
                        format!("the checkpoint of iteration {it} is not recorded in the database")
                    })?;
                Some(Adapter {
                    name: checkpoint::name(it),
                    dir: self.checkpoint_dir(it),
                    sha256: c.sha256,
                })
            }
        };
        self.rollout.serve_adapter(adapter.as_ref()).await
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

    /// The samplers' side: for each iteration, once the checkpoint it is sampled with exists,
    /// the evaluations that checkpoint is due (and any earlier one left), then sampling and
    /// reference scoring; at the end, the evaluations of the last checkpoints.
    async fn produce(&self) -> anyhow::Result<()> {
        let max = self.config.max_iterations;
        let mut evaluated = 0;
        for it in 0..max {
            self.store
                .begin_iteration(it, self.config.attempts, &self.tasks_of(it))
                .await?;
            let mut phase = self.phase(it).await?;
            if phase > Phase::ScoringRef {
                continue;
            }
            let adapter = self.config.overlap.sampling_adapter(it);
            if let Some(v) = adapter {
                let t = Instant::now();
                self.wait_trained(v).await?;
                self.store
                    .add_idle_seconds(it, IdleSide::Samplers, t.elapsed().as_secs_f64())
                    .await?;
                evaluated = self.evaluate_trained(evaluated, v, false).await?;
            }
            self.serve(adapter).await?;
            if phase == Phase::Sampling {
                let knobs = self.sampling_knobs(it).await?;
                let t = Instant::now();
                self.sample(it, adapter, knobs).await?;
                self.finish_phase(it, Phase::ScoringRef, t).await?;
                phase = Phase::ScoringRef;
            }
            if phase == Phase::ScoringRef {
                let t = Instant::now();
                self.score_ref(it).await?;
                self.finish_phase(it, Phase::Training, t).await?;
            }
        }
        self.evaluate_trained(evaluated, max - 1, true).await?;
        Ok(())
    }

    /// The knobs iteration `it` samples with: the ones it began with (recorded in the database),
    /// else the config's. A resume whose `sampling.train` differs is told which applies where.
    async fn sampling_knobs(&self, it: u32) -> anyhow::Result<::sampling::Knobs> {
        let wanted = self.config.sampling.train;
        let knobs = self.store.sampling_knobs(it, wanted).await?;
        if knobs != wanted {
            tracing::warn!(
                "iteration {it} began sampling with {knobs}; it keeps them (no iteration mixes two), and sampling.train of the config ({wanted}) applies from the next iteration on"
            );
        }
        Ok(knobs)
    }

    /// Evaluates the checkpoints `from..=to` that are due (waiting for each to be trained when
    /// `wait`); returns the next one to look at.
    async fn evaluate_trained(&self, from: u32, to: u32, wait: bool) -> anyhow::Result<u32> {
        for it in from..=to {
            if wait {
                self.wait_trained(it).await?;
            }
            if self.phase(it).await? != Phase::Evaluating {
                continue;
            }
            self.serve(Some(it)).await?;
            let t = Instant::now();
            self.evaluate(it).await?;
            self.finish_phase(it, Phase::Done, t).await?;
            crate::report::iteration_done(&self.store, &self.dir, it).await?;
        }
        Ok(to + 1)
    }

    /// The learner's side: trains each iteration once its rollouts are scored.
    async fn consume(&self) -> anyhow::Result<()> {
        for it in 0..self.config.max_iterations {
            let t = Instant::now();
            self.wait_for(|| async {
                Ok(self
                    .phase_if_begun(it)
                    .await?
                    .is_some_and(|p| p >= Phase::Training))
            })
            .await?;
            let phase = self.phase(it).await?;
            if phase != Phase::Training {
                continue;
            }
            self.store
                .add_idle_seconds(it, IdleSide::Learner, t.elapsed().as_secs_f64())
                .await?;
            let t = Instant::now();
            self.train(it).await?;
            crash_at("training", it);
            let next = if self.eval_due(it) {
                Phase::Evaluating
            } else {
                Phase::Done
            };
            self.finish_phase(it, next, t).await?;
            if next == Phase::Done {
                crate::report::iteration_done(&self.store, &self.dir, it).await?;
            }
        }
        Ok(())
    }

    /// Records the end of `it`'s phase (started at `t`) and tells the other side.
    async fn finish_phase(&self, it: u32, next: Phase, t: Instant) -> anyhow::Result<()> {
        self.store
            .finish_phase(it, next, t.elapsed().as_secs_f64())
            .await?;
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Waits until iteration `it` is trained (its checkpoint recorded and its phase past
    /// training).
    async fn wait_trained(&self, it: u32) -> anyhow::Result<()> {
        self.wait_for(|| async {
            Ok(self
                .phase_if_begun(it)
                .await?
                .is_some_and(|p| p >= Phase::Evaluating))
        })
        .await
    }

    /// Waits until `ready` says so, looking again after every phase change.
    async fn wait_for<F, Fut>(&self, ready: F) -> anyhow::Result<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<bool>>,
    {
        let mut changes = self.changes.subscribe();
        loop {
            if ready().await? {
                return Ok(());
            }
            changes
                .changed()
                .await
                .context("the run's change signal closed")?;
        }
    }

    fn eval_due(&self, it: u32) -> bool {
        let n = self.config.test_every_n_iterations;
        n > 0 && ((it + 1).is_multiple_of(n) || it + 1 == self.config.max_iterations)
    }

    async fn phase(&self, it: u32) -> anyhow::Result<Phase> {
        self.phase_if_begun(it)
            .await?
            .context("the iteration vanished from the database")
    }

    /// The phase of `it`, `None` before its sampling began.
    async fn phase_if_begun(&self, it: u32) -> anyhow::Result<Option<Phase>> {
        Ok(self
            .store
            .iterations()
            .await?
            .into_iter()
            .find(|s| s.iteration == it)
            .map(|s| s.phase))
    }
}

/// The device of local rollout server `i`: `services.rollout.devices[i % len]`, else
/// `model.device`.
fn rollout_device(config: &Config, i: u32) -> Device {
    let devices = &config.services.rollout.devices;
    if devices.is_empty() {
        config.model.device
    } else {
        devices[i as usize % devices.len()]
    }
}

/// The port of replica `i` of a service whose first replica listens on `port` (0: any).
fn replica_port(port: u16, i: u32) -> u16 {
    if port == 0 {
        0
    } else {
        u16::try_from(u32::from(port) + i).unwrap_or(0)
    }
}

/// Starts the local replicas `specs` (at once) and connects to `endpoints`, as one pool; a
/// failure stops what was started.
async fn start_pool(
    name: &'static str,
    specs: Vec<ChildSpec>,
    endpoints: &[String],
    config: &Config,
) -> anyhow::Result<Pool> {
    let s = &config.services;
    let startup = Duration::from_secs(u64::from(s.startup_timeout_s));
    let n = specs.len() + endpoints.len();
    let local = specs
        .into_iter()
        .enumerate()
        .map(|(i, spec)| Service::spawn(Pool::label(name, i, n), spec, s.api_key.clone(), startup));
    let offset = n - endpoints.len();
    let remote = endpoints.iter().enumerate().map(|(i, url)| {
        Service::external(Pool::label(name, offset + i, n), url, s.api_key.clone())
    });
    let (local, remote) = tokio::join!(
        futures::future::join_all(local),
        futures::future::join_all(remote)
    );
    let mut services = Vec::new();
    let mut first_error = None;
    for r in local.into_iter().chain(remote) {
        match r {
            Ok(svc) => services.push(svc),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        for svc in &services {
            svc.stop().await;
        }
        return Err(e);
    }
    Pool::new(name, services, s.max_attempts)
}
