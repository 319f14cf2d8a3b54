//! `ref-scorer --model PATH [--host H] [--port N] [--api-key KEY]`: the reference model's logprobs
//! over HTTP (`POST /v1/score`). `ref-scorer score --model PATH --input IN.jsonl --output OUT.jsonl`:
//! the same numbers offline.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sampling::ScoreTemperature;

#[derive(Parser)]
#[command(
    name = "ref-scorer",
    version = model::VERSION,
    about = "Per-token logprobs of completions under a frozen model"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

/// Serve `POST /v1/score` (when no subcommand is given).
#[derive(clap::Args)]
struct ServeArgs {
    /// A .gguf file or a Hugging Face model folder (a hub id `org/name` in `hub` builds).
    #[arg(long)]
    model: Option<String>,
    /// A PEFT adapter folder to score with (default: the base model, the usual reference).
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (printed on stdout as `listening on http://HOST:PORT`).
    #[arg(long, default_value_t = 8001)]
    port: u16,
    /// Require `Authorization: Bearer KEY`.
    #[arg(long, env = "REF_SCORER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Requests admitted at once at most; beyond, 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    max_body_bytes: usize,
    #[command(flatten)]
    parent: model::cli::ParentFlags,
    #[command(flatten)]
    engine: model::cli::DeviceFlags,
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
        /// Logprobs under softmax(logits / temperature), in [1e-5, 100].
        #[arg(long, default_value = "1", value_parser = score_temperature)]
        temperature: ScoreTemperature,
        #[command(flatten)]
        engine: model::cli::DeviceFlags,
    },
}

/// `--temperature`, through the knob's own rule.
fn score_temperature(s: &str) -> Result<ScoreTemperature, String> {
    let t: f64 = s
        .parse()
        .map_err(|e| format!("`{s}` is not a number: {e}"))?;
    ScoreTemperature::new(t).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    model::cli::init();
    let cli = Cli::parse();
    let Some(command) = cli.command else {
        return serve(cli.serve);
    };
    match command {
        Command::Score {
            model,
            adapter,
            input,
            output,
            temperature,
            engine,
        } => {
            let (engine, _) = model::cli::load_engine(&model, adapter.as_deref(), &engine)?;
            let n = ref_scorer::score_file(&engine, &input, &output, temperature)?;
            tracing::info!("wrote {n} lines to {}", output.display());
            Ok(())
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    args.parent.apply().map_err(anyhow::Error::msg)?;
    let Some(model) = &args.model else {
        anyhow::bail!("--model is required: `ref-scorer --model PATH` serves POST /v1/score; `ref-scorer score --help` scores a file offline");
    };
    let (engine, path) = model::cli::load_engine(model, args.adapter.as_deref(), &args.engine)?;
    let opts = ref_scorer::service::Options {
        model_name: rl_http::server::served_model_name(&path),
        api_key: args.api_key.clone(),
        max_queue: args.max_queue,
        max_body_bytes: args.max_body_bytes,
    };
    let (router, state) = ref_scorer::service::app(engine, &opts);
    let what = format!("scoring with {}", opts.model_name);
    rl_http::server::run_server(&args.host, args.port, router, &what, &state.liveness)?;
    Ok(())
}
