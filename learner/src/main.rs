//! `learner train --db PATH --iteration N --model PATH --adapter-in DIR|none --out DIR
//! [--config FILE] [key=value ...]` and `learner check --model DIR --adapter DIR --batch FILE.json
//! --grads-out FILE.safetensors`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rl_core::config::Config;
use rl_store::{CheckpointRecord, Store};

#[derive(Parser)]
#[command(
    name = "learner",
    version = model::VERSION,
    about = "GRPO on LoRA adapters, one iteration per run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train on one iteration's rollouts and write the next checkpoint.
    Train {
        /// The run's rollout database.
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        iteration: u32,
        /// A .gguf file or a Hugging Face model folder (a hub id `org/name` in `hub` builds).
        #[arg(long)]
        model: String,
        /// The previous iteration's checkpoint, or `none` for a fresh adapter.
        #[arg(long)]
        adapter_in: String,
        /// Where to write this iteration's checkpoint (must not exist yet).
        #[arg(long)]
        out: PathBuf,
        /// The run config (its `learner`, `lora`, `seed` and `max_iterations`; the temperature
        /// comes from the rollouts, the config's only for rows that did not record one).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        engine: model::cli::DeviceFlags,
        #[command(flatten)]
        parent: model::cli::ParentFlags,
        /// Dotted overrides of the config, e.g. learner.lr=1e-5.
        overrides: Vec<String>,
    },
    /// Loss and LoRA gradients of a batch (the format of golden/tiny_grpo_step.json), no update.
    Check {
        #[arg(long)]
        model: String,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        batch: PathBuf,
        #[arg(long)]
        grads_out: PathBuf,
        #[command(flatten)]
        engine: model::cli::DeviceFlags,
    },
}

fn load_engine(model: &str, flags: &model::cli::DeviceFlags) -> anyhow::Result<model::Engine> {
    Ok(model::cli::load_engine(model, None, flags)?.0)
}

fn main() -> anyhow::Result<()> {
    model::cli::init();
    match Cli::parse().command {
        Command::Train {
            db,
            iteration,
            model,
            adapter_in,
            out,
            config,
            engine: flags,
            parent,
            overrides,
        } => {
            parent.apply().map_err(anyhow::Error::msg)?;
            let config = match &config {
                Some(path) => Config::load(path, &overrides)?.config,
                None => Config::from_yaml("{}", "(defaults)", &overrides)?.config,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let store = runtime.block_on(Store::open(&db))?;
            let batch = runtime.block_on(learner::load_batch(
                &store,
                iteration,
                config.overlap.max_lag,
                config.sampling.train.temperature,
            ))?;
            let engine = load_engine(&model, &flags)?;
            let mut learner = if adapter_in == "none" {
                learner::Learner::new(engine, &config, &model)?
            } else {
                let dir = PathBuf::from(&adapter_in);
                let l = learner::Learner::resume(engine, &dir, &config, &model)?;
                if let Some(prev) = l.iteration {
                    anyhow::ensure!(
                        prev < iteration,
                        "--adapter-in {} is the checkpoint of iteration {prev}; it cannot train iteration {iteration}",
                        dir.display()
                    );
                }
                l
            };
            if let Some(parent) = out.parent() {
                let removed = learner::checkpoint::clean_partials(parent)?;
                if removed > 0 {
                    tracing::warn!(
                        "removed {removed} partial checkpoint(s) left by a crash in {}",
                        parent.display()
                    );
                }
            }
            let reports = learner.train_iteration(iteration, &batch)?;
            if reports.is_empty() {
                tracing::warn!("iteration {iteration}: every group has zero reward variance; no optimizer step (the checkpoint repeats the adapter)");
            }
            for m in &reports {
                runtime.block_on(store.insert_train_metrics(iteration, m))?;
                println!("{}", serde_json::to_string(m)?);
            }
            let sha256 = learner.save(&out, iteration)?;
            runtime.block_on(store.record_checkpoint(&CheckpointRecord {
                iteration,
                path: out.display().to_string(),
                sha256,
            }))?;
            runtime.block_on(store.close());
            tracing::info!(
                "iteration {iteration}: {} step(s), checkpoint {}",
                reports.len(),
                out.display()
            );
            Ok(())
        }
        Command::Check {
            model,
            adapter,
            batch,
            grads_out,
            engine: flags,
        } => {
            let engine = load_engine(&model, &flags)?;
            let text = std::fs::read_to_string(&batch)
                .with_context(|| format!("reading --batch {}", batch.display()))?;
            let b: learner::check::CheckBatch = serde_json::from_str(&text)
                .with_context(|| format!("--batch {} is not a check batch", batch.display()))?;
            let r = learner::check::run(&engine, &adapter, &b)?;
            candle_core::safetensors::save(&r.grads, &grads_out)
                .with_context(|| format!("writing --grads-out {}", grads_out.display()))?;
            println!(
                "{}",
                serde_json::json!({"loss": r.loss, "mean_kl": r.mean_kl})
            );
            Ok(())
        }
    }
}
