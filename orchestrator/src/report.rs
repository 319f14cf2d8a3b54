//! What a run shows: progress bars per phase, one summary line per iteration, `metrics.jsonl`
//! (rewritten from the database after every iteration, so it never disagrees with it: one line
//! per iteration and one per learner step), and the one-screen summary of `status`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use rl_core::stats;
use rl_core::wire::FinishReason;
use rl_store::{Phase, RolloutRecord, Store};
use serde::Serialize;

/// A counting progress bar on stderr.
pub fn bar(total: u64, label: &str) -> ProgressBar {
    let b = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template("{msg:32} [{bar:30}] {pos}/{len} {elapsed}") {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_message(label.to_string());
    b
}

/// A spinner for a phase without a count (the learner).
pub fn spinner(label: &str) -> ProgressBar {
    let b = ProgressBar::new_spinner();
    b.set_message(label.to_string());
    b.enable_steady_tick(std::time::Duration::from_millis(200));
    b
}

/// The per-iteration numbers (a line of `metrics.jsonl` with `"kind": "iteration"`), from the
/// database; rates as [`rl_core::stats`] defines them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IterationSummary {
    /// Always `iteration` (tells these lines from the learner's `step` lines).
    pub kind: &'static str,
    pub iteration: u32,
    pub rollouts: usize,
    pub reward_mean: f64,
    pub format_rate: f64,
    /// Solved rollouts (right and finished), the train counterpart of `eval_accuracy`.
    pub train_accuracy: f64,
    pub completion_len: f64,
    pub zero_std_fraction: f64,
    pub optimizer_steps: usize,
    /// Of the iteration's last optimizer step.
    pub mean_kl: Option<f64>,
    pub loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub eval_format_rate: Option<f64>,
    pub eval_n: Option<u32>,
    /// Seconds per phase.
    pub seconds: BTreeMap<String, f64>,
    /// Seconds the learner (waiting for rollouts) and the samplers (waiting for a checkpoint)
    /// sat idle, by side.
    pub idle_seconds: BTreeMap<String, f64>,
}

impl IterationSummary {
    /// Reads iteration `it`'s numbers from the store.
    pub async fn read(store: &Store, it: u32) -> anyhow::Result<Self> {
        let mut groups: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
        let rollouts: Vec<RolloutRecord> = store
            .rollouts(it)
            .await?
            .into_iter()
            .map(|(g, r)| {
                groups.entry(g).or_default().push(r.reward);
                r
            })
            .collect();
        let steps = store.train_metrics(it).await?;
        let eval = store.evals().await?.into_iter().find(|e| e.iteration == it);
        Ok(Self {
            kind: "iteration",
            iteration: it,
            rollouts: rollouts.len(),
            reward_mean: stats::mean(rollouts.iter().map(|r| r.reward)),
            format_rate: stats::rate(&rollouts, |r| stats::formatted(r.answer_status)),
            train_accuracy: stats::rate(&rollouts, |r| {
                stats::solved(r.answer_status, r.finish_reason == FinishReason::Stop)
            }),
            completion_len: stats::mean(rollouts.iter().map(|r| r.completion_ids.len() as f64)),
            zero_std_fraction: stats::zero_std_fraction(groups.values().map(Vec::as_slice)),
            optimizer_steps: steps.len(),
            mean_kl: steps.last().map(|s| s.mean_kl),
            loss: steps.last().map(|s| s.loss),
            eval_accuracy: eval.as_ref().map(|e| e.accuracy),
            eval_format_rate: eval.as_ref().map(|e| e.format_rate),
            eval_n: eval.as_ref().map(|e| e.n),
            seconds: store.phase_seconds(it).await?,
            idle_seconds: store.idle_seconds(it).await?,
        })
    }
}

/// Rewrites `metrics.jsonl` and `curves.png` from the database.
pub async fn write_metrics(store: &Store, dir: &Path) -> anyhow::Result<()> {
    let mut out = String::new();
    let mut summaries = Vec::new();
    for s in store.iterations().await? {
        if s.phase != Phase::Done {
            continue;
        }
        let summary = IterationSummary::read(store, s.iteration).await?;
        let _ = writeln!(out, "{}", serde_json::to_string(&summary)?);
        summaries.push(summary);
        for m in store.train_metrics(s.iteration).await? {
            let mut v = serde_json::to_value(&m)?;
            v["kind"] = "step".into();
            v["iteration"] = s.iteration.into();
            let _ = writeln!(out, "{v}");
        }
    }
    rl_core::files::write_file(&dir.join("metrics.jsonl"), out.as_bytes())?;
    draw_curves(&summaries, dir)
}

fn draw_curves(summaries: &[IterationSummary], dir: &Path) -> anyhow::Result<()> {
    use crate::curves::{Panel, Series};
    use plotters::style::{BLUE, GREEN, MAGENTA, RED};
    let series = |name: &'static str, value: fn(&IterationSummary) -> Option<f64>, color| Series {
        name,
        points: summaries
            .iter()
            .filter_map(|s| Some((f64::from(s.iteration), value(s)?)))
            .collect(),
        color,
    };
    let panel = |title, series, empty| Panel {
        title,
        series,
        empty,
    };
    let no_iteration = "no iteration has finished yet";
    let panels = vec![
        panel(
            "reward mean (train rollouts)",
            vec![series("reward", |s| Some(s.reward_mean), BLUE)],
            no_iteration,
        ),
        panel(
            "format rate",
            vec![
                series("train", |s| Some(s.format_rate), BLUE),
                series("eval", |s| s.eval_format_rate, GREEN),
            ],
            no_iteration,
        ),
        panel(
            "eval accuracy (greedy)",
            vec![series("accuracy", |s| s.eval_accuracy, RED)],
            "no evaluation has run yet",
        ),
        panel(
            "mean KL to the reference",
            vec![series("kl", |s| s.mean_kl, MAGENTA)],
            no_iteration,
        ),
    ];
    let png = crate::curves::draw(&panels).context("drawing curves.png")?;
    Ok(rl_core::files::write_file(&dir.join("curves.png"), &png)?)
}

/// The timed phases, in the order they run.
const PHASES: [&str; 4] = ["sampling", "scoring_ref", "training", "evaluating"];

/// After an iteration: its line in the log and the refreshed `metrics.jsonl`.
pub async fn iteration_done(store: &Store, dir: &Path, it: u32) -> anyhow::Result<()> {
    let s = IterationSummary::read(store, it).await?;
    let mut phases: Vec<String> = PHASES
        .iter()
        .filter_map(|k| Some(format!("{k} {:.1}s", s.seconds.get(*k)?)))
        .collect();
    phases.extend(
        s.idle_seconds
            .iter()
            .map(|(side, secs)| format!("{side} idle {secs:.1}s")),
    );
    let total: f64 = s.seconds.values().sum();
    let eval = match (s.eval_accuracy, s.eval_format_rate) {
        (Some(a), Some(f)) => format!(", eval accuracy {a:.3} format {f:.3}"),
        _ => String::new(),
    };
    eprintln!(
        "iteration {it}: reward {:.3}, format {:.3}, zero-std groups {:.2}, kl {}{eval} ({total:.1}s: {})",
        s.reward_mean,
        s.format_rate,
        s.zero_std_fraction,
        s.mean_kl.map_or("-".into(), |k| format!("{k:.4}")),
        phases.join(", ")
    );
    write_metrics(store, dir).await
}

/// The one-screen summary of a run.
pub async fn status(store: &Store, dir: &Path) -> anyhow::Result<String> {
    let run = store.run().await?;
    let mut out = String::new();
    let _ = writeln!(out, "run {} (created {})", dir.display(), run.created_at);
    let _ = writeln!(
        out,
        "model {}  seed {}  attempts {}",
        run.spec.model, run.spec.seed, run.spec.attempts
    );
    let _ = writeln!(
        out,
        "{:>4} {:<12} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "iter", "phase", "reward", "format", "0-std", "kl", "eval acc", "eval fmt"
    );
    for s in store.iterations().await? {
        let v = IterationSummary::read(store, s.iteration).await?;
        let f = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.3}"));
        let _ = writeln!(
            out,
            "{:>4} {:<12} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}",
            s.iteration,
            s.phase.to_string(),
            f(Some(v.reward_mean)),
            f(Some(v.format_rate)),
            f(Some(v.zero_std_fraction)),
            v.mean_kl.map_or("-".to_string(), |x| format!("{x:.4}")),
            f(v.eval_accuracy),
            f(v.eval_format_rate),
        );
    }
    let ckpts = store.checkpoints().await?;
    match ckpts.last() {
        Some(c) => {
            let _ = writeln!(
                out,
                "latest checkpoint: {} (iteration {}, sha256 {})",
                c.path,
                c.iteration,
                &c.sha256[..12.min(c.sha256.len())]
            );
        }
        None => {
            let _ = writeln!(out, "no checkpoint yet");
        }
    }
    Ok(out)
}
