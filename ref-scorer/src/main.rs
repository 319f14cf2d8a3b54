//! `ref-scorer`: reference-model logprobs. `ref-scorer score` scores a jsonl file offline; the
//! HTTP service arrives with its own issue.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ref-scorer",
    version,
    about = "Per-token logprobs of completions under a frozen model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score a jsonl file: each input line {"prompt_ids":[...],"completion_ids":[...]}, each output
    /// line {"logprobs":[...]} in the same order.
    Score {
        /// A .gguf file or a Hugging Face model folder (a hub id `org/name` in `hub` builds).
        #[arg(long)]
        model: String,
        /// A PEFT LoRA adapter folder to apply (default: the base model).
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// Logprobs under softmax(logits / temperature).
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
}

fn main() -> anyhow::Result<()> {
    model::alloc::tune();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Score {
            model,
            adapter,
            input,
            output,
            temperature,
            device,
            dtype,
        } => {
            let device = model::device(&device)?;
            let dtype = model::dtype(&dtype)?;
            let path = model::hub::resolve(&model)?;
            let mut engine = model::Engine::load(&path, &device, dtype)
                .with_context(|| format!("loading --model {model}"))?;
            if let Some(dir) = adapter {
                engine
                    .load_adapter(&dir)
                    .with_context(|| format!("loading --adapter {}", dir.display()))?;
            }
            let n = ref_scorer::score_file(&engine, &input, &output, temperature)?;
            tracing::info!("wrote {n} lines to {}", output.display());
            Ok(())
        }
    }
}
