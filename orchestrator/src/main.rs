//! `orchestrate run CONFIG [key=value ...]`, `orchestrate resume RUN_DIR`, `orchestrate status
//! RUN_DIR`, `orchestrate eval --model PATH [--adapter DIR] [--split test] [--limit N] --output
//! FILE.json`, `orchestrate export RUN_DIR --merge OUT_DIR [--iteration N] [--dtype f32]`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use orchestrator::run::Run;
use rl_core::config::{Config, API_KEY_ENV};

#[derive(Parser)]
#[command(
    name = "orchestrate",
    version = model::VERSION,
    about = "GRPO on GSM8K: sample, score, train, evaluate; resumable"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start (or continue) the run a config describes.
    Run {
        config: PathBuf,
        /// Dotted overrides, e.g. learner.lr=2e-5 attempts=8.
        overrides: Vec<String>,
    },
    /// Continue a run from its directory (its config.yaml and rollouts.sqlite).
    Resume {
        run_dir: PathBuf,
        overrides: Vec<String>,
    },
    /// Print a run's progress.
    Status { run_dir: PathBuf },
    /// Write a run's checkpoint merged into its base model as a Hugging Face folder.
    Export {
        run_dir: PathBuf,
        /// The folder to create (must not exist, or be empty).
        #[arg(long, value_name = "OUT_DIR")]
        merge: PathBuf,
        /// The checkpoint's iteration (default: the latest).
        #[arg(long)]
        iteration: Option<u32>,
        /// The base model, when it is no longer where the run's config.yaml says.
        #[arg(long)]
        model: Option<String>,
        /// Weight dtype of the folder.
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
        dtype: String,
    },
    /// Greedy evaluation of a model (+ adapter) on GSM8K; writes a JSON report.
    Eval {
        #[arg(long)]
        model: String,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long, default_value = "test")]
        split: String,
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        output: PathBuf,
        /// A run config for the prompt style, data paths and test sampling (default: the
        /// built-in CPU recipe).
        #[arg(long)]
        config: Option<PathBuf>,
        overrides: Vec<String>,
    },
}

async fn execute(config: Config) -> anyhow::Result<()> {
    let run = Run::open(config).await?;
    let dir = run.dir.clone();
    let outcome = tokio::select! {
        r = run.run_all() => r,
        () = rl_http::server::shutdown_signal() => Err(anyhow::anyhow!(
            "stopped by a signal; continue with `orchestrate resume {}`", dir.display()
        )),
    };
    run.shutdown().await;
    outcome?;
    // Also for a run that was already complete: its report is drawn by this build.
    orchestrator::report::write_metrics(&run.store, &dir).await?;
    eprintln!("{}", orchestrator::report::status(&run.store, &dir).await?);
    run.store.close().await;
    Ok(())
}

/// The config with its services' key settled: the config's own, else `ORCHESTRATE_API_KEY`'s
/// (how a resumed run, whose saved config never holds the key, gets it back).
fn with_key(mut config: Config) -> anyhow::Result<Config> {
    let from_env = std::env::var(API_KEY_ENV).ok();
    config
        .services
        .settle_key(from_env)
        .map_err(anyhow::Error::msg)?;
    Ok(config)
}

fn main() -> anyhow::Result<()> {
    model::cli::init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run { config, overrides } => {
                let loaded = Config::load(&config, &overrides)?;
                loaded.check_files()?;
                execute(with_key(loaded.config)?).await
            }
            Command::Resume { run_dir, overrides } => {
                let path = run_dir.join("config.yaml");
                let loaded = Config::load(&path, &overrides).with_context(|| {
                    format!(
                        "{} is not a run directory (no readable config.yaml)",
                        run_dir.display()
                    )
                })?;
                loaded.check_files()?;
                execute(with_key(loaded.config)?).await
            }
            Command::Eval {
                model,
                adapter,
                split,
                limit,
                output,
                config,
                overrides,
            } => {
                let mut config = match &config {
                    Some(p) => Config::load(p, &overrides)?.config,
                    None => Config::from_yaml("{}", "(defaults)", &overrides)?.config,
                };
                config.resolve_paths(&std::env::current_dir()?);
                let config = with_key(config)?;
                let r = orchestrator::eval::command(
                    &config,
                    &model,
                    adapter.as_deref(),
                    &split,
                    limit,
                    &output,
                )
                .await?;
                eprintln!(
                    "{} problems: accuracy {:.3}, format rate {:.3} -> {}",
                    r.n,
                    r.accuracy,
                    r.format_rate,
                    output.display()
                );
                Ok(())
            }
            Command::Export {
                run_dir,
                merge,
                iteration,
                model,
                dtype,
            } => {
                let dtype = model::dtype(&dtype)?;
                let r = orchestrator::export::command(
                    &run_dir,
                    &merge,
                    iteration,
                    model.as_deref(),
                    dtype,
                )
                .await?;
                eprintln!(
                    "wrote {} ({} tensors, {:.1}M parameters, LoRA merged into {} projections{})",
                    r.out.display(),
                    r.tensors,
                    r.parameters as f64 / 1e6,
                    r.merged,
                    if r.tokenizer {
                        ", tokenizer and chat template"
                    } else {
                        ", no tokenizer in the base"
                    }
                );
                Ok(())
            }
            Command::Status { run_dir } => {
                let db = run_dir.join("rollouts.sqlite");
                let store = rl_store::Store::open(&db).await?;
                print!("{}", orchestrator::report::status(&store, &run_dir).await?);
                store.close().await;
                Ok(())
            }
        }
    })
}
