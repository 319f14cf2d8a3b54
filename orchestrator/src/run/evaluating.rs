//! Phase 4, `evaluating` (every `test_every_n_iterations`): greedy answers to the test problems,
//! one row each (an interrupted eval resumes), then accuracy and format rate.

use futures::StreamExt;
use rl_store::EvalResult;

use super::failpoints::crash_at;
use super::Run;

impl Run {
    pub(super) async fn evaluate(&self, it: u32) -> anyhow::Result<()> {
        let done: std::collections::BTreeSet<u64> = self
            .store
            .eval_results(it, "test")
            .await?
            .into_iter()
            .map(|r| r.problem_index)
            .collect();
        let todo: Vec<usize> = (0..self.test.len())
            .filter(|i| !done.contains(&(*i as u64)))
            .collect();
        let bar = crate::report::bar(todo.len() as u64, &format!("iteration {it}: evaluating"));
        let concurrency =
            self.config.services.rollout.max_batch.max(1) as usize * self.rollout.len();
        let mut done = futures::stream::iter(todo.into_iter().map(|i| self.eval_one(i)))
            .buffer_unordered(concurrency);
        while let Some(r) = done.next().await {
            let r = r?;
            self.store.insert_eval_result(it, "test", &r).await?;
            tracing::debug!(
                "iteration {it}: evaluating: problem {} stored",
                r.problem_index
            );
            crash_at("evaluating", it);
            bar.inc(1);
        }
        bar.finish();
        self.store.finish_eval(it, "test").await?;
        Ok(())
    }

    async fn eval_one(&self, index: usize) -> anyhow::Result<EvalResult> {
        let problem = &self.test[index];
        let c = &self.config;
        let deadline = crate::eval::deadline(c, problem, c.services.rollout.max_batch);
        self.rollout
            .call("evaluating", deadline, |cl| async move {
                crate::eval::answer(&cl, c, problem, index).await
            })
            .await
    }
}
