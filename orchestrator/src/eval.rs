//! Greedy evaluation: one answer per test problem through a rollout server, graded with the
//! prompt style's answer extraction. Used by the run's `evaluating` phase (results stored per
//! problem, so an interrupted eval resumes) and by `orchestrate eval` (results to a JSON file).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use rl_core::config::Config;
use rl_core::rewards;
use rl_core::rewards::AnswerStatus;
use rl_core::tasks::Problem;
use rl_core::wire::{FinishReason, GenerateRequest, TokenizeRequest};
use rl_http::client::{ClientError, ServiceClient};
use rl_store::{EvalResult, EvalSummary};
use serde::Serialize;

use crate::children::{RolloutServer, ServiceArgs};
use crate::supervisor::{Pool, Service};

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
    let tok = client.tokenize(&TokenizeRequest::chat(messages)).await?;
    let out = client
        .generate(&GenerateRequest::sample(
            tok.tokens,
            1,
            config.sampling.test,
            0,
        ))
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

/// The deadline of one answer (tokenizing and generating) while `in_flight` are asked at once;
/// the question's length in bytes bounds its prompt tokens.
pub fn deadline(config: &Config, problem: &Problem, in_flight: u32) -> Duration {
    let tokens = problem.question.len() as u64 + u64::from(config.sampling.test.max_tokens.get());
    config.services.deadline(tokens, in_flight)
}

/// What `orchestrate eval` writes: the rates ([`EvalSummary::of`]) and every answer.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub adapter: Option<String>,
    pub split: String,
    pub n: u32,
    pub accuracy: f64,
    pub format_rate: f64,
    pub mean_tokens: f64,
    pub results: Vec<EvalReportRow>,
}

/// One problem of an [`EvalReport`].
#[derive(Debug, Clone, Serialize)]
pub struct EvalReportRow {
    pub index: u64,
    pub question: String,
    pub gold: String,
    pub answer: Option<String>,
    pub status: AnswerStatus,
    pub solved: bool,
    pub finish_reason: FinishReason,
    pub text: String,
}

/// `orchestrate eval`: evaluates a model (+ adapter) on a split and writes a JSON report.
pub async fn command(
    config: &Config,
    model: &str,
    adapter: Option<&Path>,
    split: &str,
    limit: Option<usize>,
    output: &Path,
) -> anyhow::Result<EvalReport> {
    let data: PathBuf = match split {
        "test" => config.data.test.clone(),
        "train" => config.data.train.clone(),
        other => anyhow::bail!("--split {other}: use test or train"),
    };
    let spec = RolloutServer {
        adapter: adapter.map(Path::to_path_buf),
        ..RolloutServer::new(ServiceArgs {
            model: model.to_string(),
            ..ServiceArgs::from_config(config, 0)
        })
    }
    .spec()?;
    crate::device::preflight(config.model.device, &[&spec.program])?;
    let mut problems = rl_core::tasks::load(&data, &config.data)?;
    if let Some(l) = limit {
        problems.truncate(l);
    }
    let s = &config.services;
    let startup = Duration::from_secs(u64::from(s.startup_timeout_s));
    let svc = Service::spawn("rollout-server".into(), spec, s.api_key.clone(), startup).await?;
    let svc = Pool::new("rollout-server", vec![svc], s.max_attempts)?;
    let bar = crate::report::bar(problems.len() as u64, &format!("evaluating on {split}"));
    let concurrency = s.rollout.max_batch.max(1);
    let svc = &svc;
    let mut stream = futures::stream::iter(problems.iter().enumerate().map(|(i, p)| async move {
        svc.call(
            "evaluating",
            deadline(config, p, concurrency),
            |cl| async move { answer(&cl, config, p, i).await },
        )
        .await
    }))
    .buffered(concurrency as usize);
    let mut results = Vec::new();
    while let Some(r) = stream.next().await {
        match r {
            Ok(r) => results.push(r),
            Err(e) => {
                svc.stop().await;
                return Err(e);
            }
        }
        bar.inc(1);
    }
    bar.finish();
    svc.stop().await;
    let summary = EvalSummary::of(0, split, &results);
    let report = EvalReport {
        model: model.to_string(),
        adapter: adapter.map(|a| a.display().to_string()),
        split: split.to_string(),
        n: summary.n,
        accuracy: summary.accuracy,
        format_rate: summary.format_rate,
        mean_tokens: summary.mean_tokens,
        results: results
            .into_iter()
            .zip(&problems)
            .map(|(r, p)| EvalReportRow {
                index: r.problem_index,
                question: p.question.clone(),
                gold: p.gold.text.clone(),
                answer: r.answer,
                status: r.answer_status,
                solved: r.solved,
                finish_reason: r.finish_reason,
                text: r.text,
            })
            .collect(),
    };
    rl_core::files::write_file(output, serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("writing --output {}", output.display()))?;
    Ok(report)
}
