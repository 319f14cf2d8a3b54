//! Greedy evaluation: one answer per test problem through a rollout server, graded with the
//! prompt style's answer extraction. Used by the run's `evaluating` phase (results stored per
//! problem, so an interrupted eval resumes) and by `orchestrate eval` (results to a JSON file).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use rl_core::config::Config;
use rl_core::rewards;
use rl_core::tasks::Problem;
use rl_core::wire::{FinishReason, GenerateRequest, TokenizeRequest};
use rl_http::client::{ClientError, ServiceClient};
use rl_store::EvalResult;

use crate::supervisor::{ChildSpec, Service};

/// The greedy (per `sampling.test`) answer to `problem`, graded.
pub async fn answer(
    client: &ServiceClient,
    config: &Config,
    problem: &Problem,
    index: usize,
) -> Result<EvalResult, ClientError> {
    let messages = config
        .prompt
        .style
        .messages(&problem.question, config.prompt.system.as_deref());
    let tok = client
        .tokenize(&TokenizeRequest {
            messages: Some(messages),
            prompt: None,
            add_generation_prompt: true,
        })
        .await?;
    let s = &config.sampling.test;
    let out = client
        .generate(&GenerateRequest {
            prompt_ids: tok.tokens,
            n: 1,
            max_tokens: s.max_tokens,
            temperature: f64::from(s.temperature),
            top_p: f64::from(s.top_p),
            top_k: s.top_k,
            stop_token_ids: None,
            seed: Some(0),
        })
        .await?;
    let Some(ch) = out.choices.into_iter().next() else {
        return Err(ClientError::Transport {
            method: "POST",
            url: format!("{}/v1/generate", client.base()),
            message: "the server returned no choice".into(),
        });
    };
    let text = ch.text.unwrap_or_default();
    let v = rewards::verdict(
        config.prompt.style,
        &text,
        ch.finish_reason == FinishReason::Stop,
        &problem.gold,
    );
    Ok(EvalResult {
        problem_index: index as u64,
        num_tokens: ch.token_ids.len() as u32,
        answer: v.answer.clone(),
        answer_status: v.status,
        finish_reason: ch.finish_reason,
        solved: v.solved(),
        formatted: v.formatted(),
        text,
    })
}

/// `orchestrate eval`: evaluates a model (+ adapter) on a split and writes a JSON report.
pub async fn command(
    config: &Config,
    model: &str,
    adapter: Option<&Path>,
    split: &str,
    limit: Option<usize>,
    output: &Path,
) -> anyhow::Result<serde_json::Value> {
    let data: PathBuf = match split {
        "test" => config.data.test.clone(),
        "train" => config.data.train.clone(),
        other => anyhow::bail!("--split {other}: use test or train"),
    };
    let server = crate::run::bin_dir()?.join("rollout-server");
    crate::device::preflight(&config.model.device, &[&server])?;
    let mut problems = rl_core::tasks::load_gsm8k(&data)?;
    if let Some(l) = limit {
        problems.truncate(l);
    }
    let mut args = vec![
        "--model".to_string(),
        model.to_string(),
        "--port".into(),
        "0".into(),
        "--device".into(),
        config.model.device.clone(),
        "--dtype".into(),
        config.model.dtype.name().into(),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter".to_string(), a.display().to_string()]);
    }
    let spec = ChildSpec {
        name: "rollout-server",
        program: server,
        args,
    };
    let timeout = Duration::from_secs(u64::from(config.services.request_timeout_s));
    let startup = Duration::from_secs(u64::from(config.services.startup_timeout_s));
    let svc = Service::spawn(spec, None, timeout, startup).await?;
    let client = svc.client().await?;
    let bar = crate::report::bar(problems.len() as u64, &format!("evaluating on {split}"));
    let concurrency = config.services.rollout.max_batch.max(1) as usize;
    let mut stream = futures::stream::iter(
        problems
            .iter()
            .enumerate()
            .map(|(i, p)| answer(&client, config, p, i)),
    )
    .buffered(concurrency);
    let mut results = Vec::new();
    while let Some(r) = stream.next().await {
        match r {
            Ok(r) => results.push(r),
            Err(e) => {
                svc.stop().await;
                return Err(e.into());
            }
        }
        bar.inc(1);
    }
    bar.finish();
    svc.stop().await;
    let n = results.len().max(1) as f64;
    let report = serde_json::json!({
        "model": model,
        "adapter": adapter.map(|a| a.display().to_string()),
        "split": split,
        "n": results.len(),
        "accuracy": results.iter().filter(|r| r.solved).count() as f64 / n,
        "format_rate": results.iter().filter(|r| r.formatted).count() as f64 / n,
        "mean_tokens": results.iter().map(|r| f64::from(r.num_tokens)).sum::<f64>() / n,
        "results": results.iter().zip(&problems).map(|(r, p)| serde_json::json!({
            "index": r.problem_index, "question": p.question, "gold": p.gold.text,
            "answer": r.answer, "status": r.answer_status, "solved": r.solved,
            "finish_reason": r.finish_reason, "text": r.text,
        })).collect::<Vec<_>>(),
    });
    rl_core::files::write_file(output, serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("writing --output {}", output.display()))?;
    Ok(report)
}
