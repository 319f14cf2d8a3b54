//! What a run shows: progress bars per phase, one summary line per iteration, `metrics.jsonl`
//! (rewritten from the database after every iteration, so it never disagrees with it: one line
//! per iteration and one per learner step), and the one-screen summary of `status`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use rl_core::rewards::AnswerStatus;
use rl_store::{Phase, Store};

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

/// The per-iteration numbers, from the database.
pub async fn iteration_summary(store: &Store, it: u32) -> anyhow::Result<serde_json::Value> {
    let rollouts = store.rollouts(it).await?;
    let n = rollouts.len().max(1) as f64;
    let reward_mean = rollouts.iter().map(|(_, r)| r.reward).sum::<f64>() / n;
    let formatted = rollouts
        .iter()
        .filter(|(_, r)| matches!(r.answer_status, AnswerStatus::Correct | AnswerStatus::Wrong))
        .count() as f64
        / n;
    let correct = rollouts
        .iter()
        .filter(|(_, r)| r.answer_status == AnswerStatus::Correct)
        .count() as f64
        / n;
    let tokens = rollouts
        .iter()
        .map(|(_, r)| r.completion_ids.len())
        .sum::<usize>() as f64
        / n;
    let mut groups: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    for (g, r) in &rollouts {
        groups.entry(*g).or_default().push(r.reward);
    }
    let zero_std = groups
        .values()
        .filter(|v| v.iter().all(|x| *x == v[0]))
        .count() as f64
        / groups.len().max(1) as f64;
    let steps = store.train_metrics(it).await?;
    let eval = store.evals().await?.into_iter().find(|e| e.iteration == it);
    let seconds = store.phase_seconds(it).await?;
    Ok(serde_json::json!({
        "kind": "iteration",
        "iteration": it,
        "rollouts": rollouts.len(),
        "reward_mean": reward_mean,
        "format_rate": formatted,
        "train_accuracy": correct,
        "completion_len": tokens,
        "zero_std_fraction": zero_std,
        "optimizer_steps": steps.len(),
        "mean_kl": steps.last().map(|s| s.mean_kl),
        "loss": steps.last().map(|s| s.loss),
        "eval_accuracy": eval.as_ref().map(|e| e.accuracy),
        "eval_format_rate": eval.as_ref().map(|e| e.format_rate),
        "eval_n": eval.as_ref().map(|e| e.n),
        "seconds": seconds,
    }))
}

/// Rewrites `metrics.jsonl` and `curves.png` from the database.
pub async fn write_metrics(store: &Store, dir: &Path) -> anyhow::Result<()> {
    let mut out = String::new();
    let mut summaries = Vec::new();
    for s in store.iterations().await? {
        if s.phase != Phase::Done {
            continue;
        }
        let summary = iteration_summary(store, s.iteration).await?;
        let _ = writeln!(out, "{summary}");
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

fn draw_curves(summaries: &[serde_json::Value], dir: &Path) -> anyhow::Result<()> {
    use crate::curves::Series;
    use plotters::style::{BLUE, GREEN, MAGENTA, RED};
    let series = |name: &'static str, key: &str, color| Series {
        name,
        points: summaries
            .iter()
            .filter_map(|s| Some((s["iteration"].as_f64()?, s[key].as_f64()?)))
            .collect(),
        color,
    };
    let panels = vec![
        (
            "reward mean (train rollouts)",
            vec![series("reward", "reward_mean", BLUE)],
        ),
        (
            "format rate",
            vec![
                series("train", "format_rate", BLUE),
                series("eval", "eval_format_rate", GREEN),
            ],
        ),
        (
            "eval accuracy (greedy)",
            vec![series("accuracy", "eval_accuracy", RED)],
        ),
        (
            "mean KL to the reference",
            vec![series("kl", "mean_kl", MAGENTA)],
        ),
    ];
    rl_core::files::write_file_with(&dir.join("curves.png"), |tmp| {
        crate::curves::draw(&panels, tmp)
    })
}

/// The timed phases, in the order they run.
const PHASES: [&str; 4] = ["sampling", "scoring_ref", "training", "evaluating"];

/// After an iteration: its line in the log and the refreshed `metrics.jsonl`.
pub async fn iteration_done(store: &Store, dir: &Path, it: u32, total: f64) -> anyhow::Result<()> {
    let s = iteration_summary(store, it).await?;
    let phases: Vec<String> = PHASES
        .iter()
        .filter_map(|k| Some(format!("{k} {:.1}s", s["seconds"][k].as_f64()?)))
        .collect();
    let eval = match (s["eval_accuracy"].as_f64(), s["eval_format_rate"].as_f64()) {
        (Some(a), Some(f)) => format!(", eval accuracy {a:.3} format {f:.3}"),
        _ => String::new(),
    };
    eprintln!(
        "iteration {it}: reward {:.3}, format {:.3}, zero-std groups {:.2}, kl {}{eval} ({total:.1}s: {})",
        s["reward_mean"].as_f64().unwrap_or(0.0),
        s["format_rate"].as_f64().unwrap_or(0.0),
        s["zero_std_fraction"].as_f64().unwrap_or(0.0),
        s["mean_kl"].as_f64().map_or("-".into(), |k| format!("{k:.4}")),
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
        let v = iteration_summary(store, s.iteration).await?;
        let f = |k: &str| v[k].as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
        let _ = writeln!(
            out,
            "{:>4} {:<12} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}",
            s.iteration,
            s.phase.as_str(),
            f("reward_mean"),
            f("format_rate"),
            f("zero_std_fraction"),
            v["mean_kl"]
                .as_f64()
                .map_or("-".to_string(), |x| format!("{x:.4}")),
            f("eval_accuracy"),
            f("eval_format_rate"),
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
