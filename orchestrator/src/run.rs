//! The run: from a config to trained checkpoints, iteration by iteration, always resumable from
//! the rollout database. Each iteration goes through the phases the store records:
//!
//! 1. `sampling`: the iteration's problems (deterministic from the seed and the iteration) are
//!    fanned out to the rollout server with bounded concurrency, `attempts` samples each with the
//!    group's seed; rewards are computed; each group is stored in one transaction. On resume only
//!    the missing groups are sampled.
//! 2. `scoring_ref`: the ref-scorer annotates every stored group without reference logprobs.
//! 3. `training`: a learner process trains on the iteration and writes `checkpoints/iter_N`; the
//!    rollout server hot-swaps it in.
//! 4. `evaluating` (every `test_every_n_iterations`): greedy answers to the test problems, one row
//!    each, then accuracy and format rate.
//!
//! A failing child is reported with what it said; a crashed server is restarted and the request
//! retried. Nothing here holds state that the database does not: killing the orchestrator at any
//! point and running it again continues where it stopped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use rl_core::config::Config;
use rl_core::prompts::PromptStyle;
use rl_core::rewards;
use rl_core::tasks::{self, Problem};
use rl_core::wire::{FinishReason, GenerateRequest, ScoreRequest, ScoreSequence, TokenizeRequest};
use rl_store::{CheckpointRecord, EvalResult, Phase, RolloutRecord, RunSpec, Store, TaskRecord};

use learner::checkpoint;

use crate::supervisor::{ChildSpec, Service};

/// Where the binaries of this build are (beside `orchestrate`), overridable for tests.
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

/// An open run: config, database, data and services.
pub struct Run {
    pub config: Config,
    pub dir: PathBuf,
    pub store: Store,
    train: Vec<Problem>,
    test: Vec<Problem>,
    rollout: Service,
    scorer: Service,
    /// The checkpoint the rollout server serves, as we last set it.
    served: tokio::sync::Mutex<Option<u32>>,
    /// The `kill-rollout-server` failpoint fired (it fires once).
    killed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Run({})", self.dir.display())
    }
}

/// Environment variable naming a point where the orchestrator aborts (a real crash, for the
/// crash-resume tests): `PHASE:ITERATION`, e.g. `sampling:1` aborts right after the first group
/// of iteration 1 is stored; `kill-rollout-server:1` SIGKILLs the rollout server instead.
pub const FAILPOINT_ENV: &str = "ORCHESTRATE_FAILPOINT";

fn failpoint(point: &str, iteration: u32) -> bool {
    std::env::var(FAILPOINT_ENV).is_ok_and(|v| v == format!("{point}:{iteration}"))
}

fn crash_at(point: &str, iteration: u32) {
    if failpoint(point, iteration) {
        eprintln!("{FAILPOINT_ENV}: aborting at {point}:{iteration}");
        std::process::abort();
    }
}

/// Fails early when a configured port is taken (before anything is created).
fn check_ports(config: &Config) -> anyhow::Result<()> {
    let s = &config.services;
    let wanted = [
        (
            "services.rollout.port",
            s.rollout.port,
            s.rollout.endpoints.is_empty(),
        ),
        (
            "services.ref_scorer.port",
            s.ref_scorer.port,
            s.ref_scorer.endpoint.is_none(),
        ),
    ];
    for (key, port, spawned) in wanted {
        if port != 0 && spawned {
            std::net::TcpListener::bind((s.host.as_str(), port)).map_err(|e| {
                anyhow::anyhow!("`{key}`: {}:{port} is not free ({e}); choose another port or 0 for any free one", s.host)
            })?;
        }
    }
    Ok(())
}

/// What a run must keep from one start to the next; a change would mix two runs in one database.
fn check_compatible(stored: &RunSpec, config: &Config, db: &Path) -> anyhow::Result<()> {
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

impl Run {
    /// Opens (or creates) the run directory of `config`, loads the data and starts or connects
    /// to the services.
    pub async fn open(mut config: Config) -> anyhow::Result<Run> {
        let cwd = std::env::current_dir()?;
        config.resolve_paths(&cwd);
        check_ports(&config)?;
        let bins = bin_dir()?;
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
        let db = dir.join("rollouts.sqlite");
        let yaml = config.to_yaml().map_err(anyhow::Error::msg)?;
        let store = if db.exists() {
            let store = Store::open(&db).await?;
            check_compatible(&store.run().await?.spec, &config, &db)?;
            store.update_config(&yaml).await?;
            store
        } else {
            Store::create(
                &db,
                &RunSpec {
                    config_yaml: yaml.clone(),
                    model: config.model.path.clone(),
                    seed: config.seed,
                    attempts: config.attempts,
                },
            )
            .await?
        };
        rl_core::files::write_file(&dir.join("config.yaml"), yaml.as_bytes())?;
        let train = tasks::load_gsm8k(&config.data.train)?;
        let mut test = tasks::load_gsm8k(&config.data.test)?;
        if let Some(limit) = config.data.test_limit {
            test.truncate(limit as usize);
        }
        let s = &config.services;
        let timeout = Duration::from_secs(u64::from(s.request_timeout_s));
        let startup = Duration::from_secs(u64::from(s.startup_timeout_s));
        let common = |port: u16| {
            let mut a = vec![
                "--model".to_string(),
                config.model.path.clone(),
                "--host".into(),
                s.host.clone(),
                "--port".into(),
                port.to_string(),
                "--device".into(),
                config.model.device.clone(),
                "--dtype".into(),
                config.model.dtype.name().into(),
            ];
            if let Some(k) = &s.api_key {
                a.extend(["--api-key".to_string(), k.clone()]);
            }
            a
        };
        let rollout = match s.rollout.endpoints.first() {
            Some(url) => {
                Service::external("rollout-server", url, s.api_key.clone(), timeout).await?
            }
            None => {
                let mut args = common(s.rollout.port);
                args.extend([
                    "--checkpoints-dir".to_string(),
                    checkpoint::root(&dir).display().to_string(),
                    "--max-batch".into(),
                    s.rollout.max_batch.to_string(),
                    "--max-queue".into(),
                    s.rollout.max_queue.to_string(),
                    "--max-n".into(),
                    config.attempts.max(128).to_string(),
                ]);
                let spec = ChildSpec {
                    name: "rollout-server",
                    program: bins.join("rollout-server"),
                    args,
                };
                Service::spawn(spec, s.api_key.clone(), timeout, startup).await?
            }
        };
        let scorer = match &s.ref_scorer.endpoint {
            Some(url) => Service::external("ref-scorer", url, s.api_key.clone(), timeout).await?,
            None => {
                let spec = ChildSpec {
                    name: "ref-scorer",
                    program: bins.join("ref-scorer"),
                    args: common(s.ref_scorer.port),
                };
                match Service::spawn(spec, s.api_key.clone(), timeout, startup).await {
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
            served: tokio::sync::Mutex::new(None),
            killed: Default::default(),
        })
    }

    /// Stops the services this run started.
    pub async fn shutdown(&self) {
        self.rollout.stop().await;
        self.scorer.stop().await;
    }

    /// Runs every iteration up to `max_iterations`, from wherever the database says.
    pub async fn run_all(&self) -> anyhow::Result<()> {
        for it in 0..self.config.max_iterations {
            self.iteration(it).await?;
        }
        Ok(())
    }

    fn checkpoint_dir(&self, iteration: u32) -> PathBuf {
        checkpoint::dir(&self.dir, iteration)
    }

    /// Calls `f` with a client of `svc`; if the service went away, restarts it and tries again.
    async fn with_service<T, F, Fut>(&self, svc: &Service, what: &str, f: F) -> anyhow::Result<T>
    where
        F: Fn(rl_http::client::ServiceClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, rl_http::client::ClientError>>,
    {
        let mut last = None;
        for _ in 0..5 {
            // A dead child is noticed here, before its requests time out.
            if svc.ensure_running().await? && svc.name() == "rollout-server" {
                // A restarted server serves the base model: put the adapter back.
                *self.served.lock().await = None;
                self.serve_checkpoint_locked().await?;
            }
            match f(svc.client().await?).await {
                Ok(v) => return Ok(v),
                Err(e) if e.status().is_some() => {
                    return Err(anyhow::Error::new(e).context(what.to_string()))
                }
                Err(e) => last = Some(e),
            }
        }
        Err(anyhow::anyhow!(
            "{what}: {} kept failing: {}",
            svc.name(),
            last.map_or(String::new(), |e| e.to_string())
        ))
    }

    /// Makes the rollout server serve the latest recorded checkpoint (if any).
    async fn serve_checkpoint_locked(&self) -> anyhow::Result<()> {
        if self.rollout.ensure_running().await? {
            *self.served.lock().await = None;
        }
        let latest = self
            .store
            .checkpoints()
            .await?
            .into_iter()
            .map(|c| c.iteration)
            .max();
        let mut served = self.served.lock().await;
        if *served == latest {
            return Ok(());
        }
        let client = self.rollout.client().await?;
        match latest {
            Some(it) => {
                let r = client
                    .load_adapter(&format!("iter_{it}"))
                    .await
                    .context("hot-swapping the adapter")?;
                tracing::info!(
                    "rollout server now serves checkpoint iter_{it} (swap {:.1} ms)",
                    r.swap_ms
                );
            }
            None => {
                client.unload_adapter().await?;
            }
        }
        *served = latest;
        Ok(())
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
        self.serve_checkpoint_locked().await?;
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
            self.serve_checkpoint_locked().await?;
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

    async fn sample(&self, it: u32) -> anyhow::Result<()> {
        let missing = self.store.missing_groups(it).await?;
        let tasks = self.store.tasks(it).await?;
        let c = &self.config;
        let concurrency = (c.services.rollout.max_batch / c.attempts).max(1) as usize;
        let bar = crate::report::bar(missing.len() as u64, &format!("iteration {it}: sampling"));
        let mut done = futures::stream::iter(
            missing
                .into_iter()
                .map(|g| self.sample_group(it, tasks[g as usize].clone())),
        )
        .buffer_unordered(concurrency);
        while let Some(r) = done.next().await {
            r?;
            bar.inc(1);
        }
        bar.finish();
        Ok(())
    }

    async fn sample_group(&self, it: u32, task: TaskRecord) -> anyhow::Result<()> {
        let c = &self.config;
        let problem = &self.train[task.problem_index as usize];
        let messages = self
            .style()
            .messages(&problem.question, c.prompt.system.as_deref());
        let tok = self
            .with_service(&self.rollout, "tokenizing a prompt", |cl| {
                let req = TokenizeRequest {
                    messages: Some(messages.clone()),
                    prompt: None,
                    add_generation_prompt: true,
                };
                async move { cl.tokenize(&req).await }
            })
            .await?;
        let s = &c.sampling.train;
        let req = GenerateRequest {
            prompt_ids: tok.tokens.clone(),
            n: c.attempts,
            max_tokens: s.max_tokens,
            temperature: f64::from(s.temperature),
            top_p: f64::from(s.top_p),
            top_k: s.top_k,
            stop_token_ids: None,
            seed: Some(task.seed),
        };
        let out = self
            .with_service(&self.rollout, "sampling a group", |cl| {
                let req = req.clone();
                async move { cl.generate(&req).await }
            })
            .await?;
        let rollouts: Vec<RolloutRecord> = out
            .choices
            .into_iter()
            .map(|ch| {
                let text = ch.text.unwrap_or_default();
                let scored = rewards::score(
                    &c.rewards,
                    c.prompt.style,
                    &text,
                    ch.finish_reason == FinishReason::Stop,
                    &problem.gold,
                );
                RolloutRecord {
                    attempt: ch.index,
                    prompt_ids: tok.tokens.clone(),
                    completion_ids: ch.token_ids,
                    logprobs: ch.logprobs,
                    ref_logprobs: None,
                    finish_reason: ch.finish_reason,
                    text,
                    reward: scored.total,
                    reward_components: scored.components,
                    answer_status: scored.verdict.status,
                }
            })
            .collect();
        self.store
            .insert_group(it, task.group_index, &rollouts)
            .await?;
        crash_at("sampling", it);
        if failpoint("kill-rollout-server", it)
            && !self.killed.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            if let Some(pid) = self.rollout.pid().await {
                eprintln!("{FAILPOINT_ENV}: killing the rollout server (pid {pid})");
                let _ = tokio::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status()
                    .await;
            }
        }
        Ok(())
    }

    async fn score_ref(&self, it: u32) -> anyhow::Result<()> {
        let groups = self.store.unscored_groups(it).await?;
        let bar = crate::report::bar(
            groups.len() as u64,
            &format!("iteration {it}: reference scoring"),
        );
        let temperature = f64::from(self.config.sampling.train.temperature);
        for g in groups {
            let rollouts = self.store.group(it, g).await?;
            let req = ScoreRequest {
                sequences: rollouts
                    .iter()
                    .map(|r| ScoreSequence {
                        prompt_ids: r.prompt_ids.clone(),
                        completion_ids: r.completion_ids.clone(),
                    })
                    .collect(),
                temperature,
            };
            let out = self
                .with_service(&self.scorer, "reference scoring", |cl| {
                    let req = req.clone();
                    async move { cl.score(&req).await }
                })
                .await?;
            let lps: Vec<Vec<f32>> = out.results.into_iter().map(|r| r.logprobs).collect();
            self.store.set_ref_logprobs(it, g, &lps).await?;
            crash_at("scoring_ref", it);
            bar.inc(1);
        }
        bar.finish();
        Ok(())
    }

    async fn train(&self, it: u32) -> anyhow::Result<()> {
        let out = self.checkpoint_dir(it);
        let recorded = self
            .store
            .checkpoints()
            .await?
            .into_iter()
            .any(|c| c.iteration == it);
        if recorded && checkpoint::is_complete(&out) {
            return Ok(());
        }
        if checkpoint::is_complete(&out) {
            // The learner finished but the run stopped before recording it: record, don't redo.
            let sha256 = checkpoint::weights_sha256(&out)?;
            self.store
                .record_checkpoint(&CheckpointRecord {
                    iteration: it,
                    path: out.display().to_string(),
                    sha256,
                })
                .await?;
            return Ok(());
        }
        let adapter_in = if it == 0 {
            "none".to_string()
        } else {
            let prev = self.checkpoint_dir(it - 1);
            if !checkpoint::is_complete(&prev) {
                bail!(
                    "iteration {it} needs the checkpoint of iteration {} at {}, which is missing",
                    it - 1,
                    prev.display()
                );
            }
            prev.display().to_string()
        };
        let bar = crate::report::spinner(&format!("iteration {it}: training"));
        let c = &self.config;
        let mut cmd = tokio::process::Command::new(bin_dir()?.join("learner"));
        cmd.args(["train", "--db"])
            .arg(self.store.path())
            .args([
                "--iteration",
                &it.to_string(),
                "--model",
                &c.model.path,
                "--adapter-in",
                &adapter_in,
                "--out",
            ])
            .arg(&out)
            .arg("--config")
            .arg(self.dir.join("config.yaml"))
            .args(["--device", &c.model.device, "--dtype", c.model.dtype.name()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let output = cmd.output().await.context("starting the learner")?;
        bar.finish_and_clear();
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
            bail!(
                "the learner failed on iteration {it} ({}); the run can be resumed once this is fixed. Its last output:\n{}",
                output.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    async fn evaluate(&self, it: u32) -> anyhow::Result<()> {
        let done: std::collections::BTreeSet<u64> = self
            .store
            .eval_results(it, "test")
            .await?
            .into_iter()
            .map(|r| r.problem_index)
            .collect();
        let todo: Vec<usize> = (0..self.test.len())
            .filter(|i| !done.contains(&(*i as u64)))
            .collect();
        let bar = crate::report::bar(todo.len() as u64, &format!("iteration {it}: evaluating"));
        let concurrency = self.config.services.rollout.max_batch.max(1) as usize;
        let mut done = futures::stream::iter(todo.into_iter().map(|i| self.eval_one(i)))
            .buffer_unordered(concurrency);
        while let Some(r) = done.next().await {
            self.store.insert_eval_result(it, "test", &r?).await?;
            crash_at("evaluating", it);
            bar.inc(1);
        }
        bar.finish();
        self.store.finish_eval(it, "test").await?;
        Ok(())
    }

    async fn eval_one(&self, index: usize) -> anyhow::Result<EvalResult> {
        let problem = &self.test[index];
        self.with_service(&self.rollout, "evaluating", |cl| async move {
            crate::eval::answer(&cl, &self.config, problem, index).await
        })
        .await
    }
}
