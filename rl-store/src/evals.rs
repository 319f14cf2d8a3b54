//! The `eval_results` and `evals` tables: the greedy answer to each test problem (an interrupted
//! eval resumes from them) and each evaluation's summary.

use rl_core::rewards::AnswerStatus;
use rl_core::stats;
use rl_core::wire::FinishReason;
use serde::{Deserialize, Serialize};
use sqlx::FromRow;

use crate::{as_i64, text, Store, StoreError};

/// The greedy evaluation of one test problem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub problem_index: u64,
    pub text: String,
    pub answer: Option<String>,
    pub answer_status: AnswerStatus,
    pub finish_reason: FinishReason,
    pub solved: bool,
    pub formatted: bool,
    pub num_tokens: u32,
}

/// An evaluation's summary: problems, accuracy (solved), format rate, mean answer length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, FromRow)]
pub struct EvalSummary {
    #[sqlx(try_from = "i64")]
    pub iteration: u32,
    pub split: String,
    #[sqlx(try_from = "i64")]
    pub n: u32,
    pub accuracy: f64,
    pub format_rate: f64,
    pub mean_tokens: f64,
}

impl EvalSummary {
    /// The summary of an evaluation's per-problem results ([`rl_core::stats`]' definitions).
    pub fn of(iteration: u32, split: &str, results: &[EvalResult]) -> Self {
        Self {
            iteration,
            split: split.to_string(),
            n: results.len() as u32,
            accuracy: stats::rate(results, |r| r.solved),
            format_rate: stats::rate(results, |r| r.formatted),
            mean_tokens: stats::mean(results.iter().map(|r| f64::from(r.num_tokens))),
        }
    }
}

impl Store {
    /// Records the greedy answer to one test problem (idempotent: a resumed eval may redo one).
    pub async fn insert_eval_result(
        &self,
        iteration: u32,
        split: &str,
        r: &EvalResult,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT OR REPLACE INTO eval_results (run_id, iteration, split, problem_index, text, answer, answer_status, \
             finish_reason, solved, formatted, num_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .bind(split)
        .bind(as_i64(r.problem_index))
        .bind(&r.text)
        .bind(&r.answer)
        .bind(text(r.answer_status))
        .bind(text(r.finish_reason))
        .bind(r.solved)
        .bind(r.formatted)
        .bind(i64::from(r.num_tokens))
        .execute(&self.pool)
        .await
        .map_err(self.err("recording an eval result"))?;
        Ok(())
    }

    /// The test problems already evaluated for an iteration.
    pub async fn eval_results(
        &self,
        iteration: u32,
        split: &str,
    ) -> Result<Vec<EvalResult>, StoreError> {
        let rows: Vec<EvalRow> = sqlx::query_as(
            "SELECT problem_index, text, answer, answer_status, finish_reason, solved, formatted, num_tokens \
             FROM eval_results WHERE run_id = ? AND iteration = ? AND split = ? ORDER BY problem_index",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .bind(split)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("reading eval results"))?;
        rows.into_iter()
            .map(|r| {
                let at = format!("eval of iteration {iteration} problem {}", r.problem_index);
                Ok(EvalResult {
                    problem_index: r.problem_index as u64,
                    answer_status: self.parse(&r.answer_status, &at)?,
                    finish_reason: self.parse(&r.finish_reason, &at)?,
                    text: r.text,
                    answer: r.answer,
                    solved: r.solved,
                    formatted: r.formatted,
                    num_tokens: r.num_tokens as u32,
                })
            })
            .collect()
    }

    /// Summarises an evaluation from its per-problem results and records it.
    pub async fn finish_eval(
        &self,
        iteration: u32,
        split: &str,
    ) -> Result<EvalSummary, StoreError> {
        let results = self.eval_results(iteration, split).await?;
        if results.is_empty() {
            return Err(self.invalid(format!(
                "iteration {iteration}: no eval results on `{split}` to summarise"
            )));
        }
        let summary = EvalSummary::of(iteration, split, &results);
        sqlx::query(
            "INSERT OR REPLACE INTO evals (run_id, iteration, split, n, accuracy, format_rate, mean_tokens) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(self.run_id)
        .bind(i64::from(iteration))
        .bind(split)
        .bind(i64::from(summary.n))
        .bind(summary.accuracy)
        .bind(summary.format_rate)
        .bind(summary.mean_tokens)
        .execute(&self.pool)
        .await
        .map_err(self.err("recording the eval"))?;
        Ok(summary)
    }

    /// Every recorded evaluation, in iteration order.
    pub async fn evals(&self) -> Result<Vec<EvalSummary>, StoreError> {
        let rows: Vec<EvalSummary> = sqlx::query_as(
            "SELECT iteration, split, n, accuracy, format_rate, mean_tokens FROM evals WHERE run_id = ? \
             ORDER BY iteration, split",
        )
        .bind(self.run_id)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("reading evals"))?;
        Ok(rows)
    }
}

/// A row of `eval_results` as stored.
#[derive(FromRow)]
struct EvalRow {
    problem_index: i64,
    text: String,
    answer: Option<String>,
    answer_status: String,
    finish_reason: String,
    solved: bool,
    formatted: bool,
    num_tokens: i64,
}
