//! `rollout-server --model PATH [--adapter DIR] [--checkpoints-dir DIR] [--host H] [--port N]
//! [--api-key KEY] [--max-batch N] [--max-queue N]`.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "rollout-server",
    version = model::VERSION,
    about = "Serve a model (+ LoRA adapter) for sampling over HTTP"
)]
struct Args {
    /// A .gguf file or a Hugging Face model folder (a hub id `org/name` in `hub` builds).
    #[arg(long)]
    model: String,
    /// A PEFT adapter folder to serve from the start (default: the base model).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Adapters may be loaded at run time from inside this folder (POST /v1/adapters).
    #[arg(long)]
    checkpoints_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (printed on stdout as `listening on http://HOST:PORT`).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY`.
    #[arg(long, env = "ROLLOUT_SERVER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Rows (choices) decoded together at most.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Requests accepted and not yet answered at most; beyond, 503 with Retry-After.
    #[arg(long, default_value_t = 1024)]
    max_queue: usize,
    /// Most choices (`n`) per request.
    #[arg(long, default_value_t = 128)]
    max_n: u32,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 8 << 20)]
    max_body_bytes: usize,
    /// Largest adapter upload (`PUT /v1/adapters/{name}`) in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    max_adapter_bytes: usize,
    /// The name clients send as `model` (default: the model's file or folder name).
    #[arg(long)]
    served_model_name: Option<String>,
    #[command(flatten)]
    parent: model::cli::ParentFlags,
    #[command(flatten)]
    engine: model::cli::DeviceFlags,
}

fn main() -> anyhow::Result<()> {
    model::cli::init();
    let args = Args::parse();
    args.parent.apply().map_err(anyhow::Error::msg)?;
    if args.max_batch == 0 || args.max_queue == 0 || args.max_n == 0 {
        anyhow::bail!("--max-batch, --max-queue and --max-n must be at least 1");
    }
    let (engine, path) =
        model::cli::load_engine(&args.model, args.adapter.as_deref(), &args.engine)?;
    let model_name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| rl_http::server::served_model_name(&path));
    let opts = rollout_server::Options {
        model_name,
        checkpoints_dir: args.checkpoints_dir.clone(),
        api_key: args.api_key.clone(),
        max_batch: args.max_batch,
        max_queue: args.max_queue,
        max_n: args.max_n,
        max_body_bytes: args.max_body_bytes,
        max_adapter_bytes: args.max_adapter_bytes,
    };
    let (router, state) = rollout_server::app(engine, &opts)?;
    let what = format!("serving {}", opts.model_name);
    rl_http::server::run_server(&args.host, args.port, router, &what, &state.liveness)?;
    Ok(())
}
