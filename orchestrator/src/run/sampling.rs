//! Phase 1, `sampling`: the iteration's problems fanned out to the rollout servers with bounded
//! concurrency (enough to fill every server's batch), `attempts` samples each with the group's
//! seed, rewarded, each group stored in one transaction with the adapter that sampled it. On
//! resume only the missing groups are sampled.

use futures::StreamExt;
use rl_core::rewards;
use rl_core::wire::{FinishReason, TokenizeRequest};
use rl_store::{RolloutRecord, TaskRecord};

use super::Run;

impl Run {
    /// Samples the missing groups of `it` with the checkpoint of iteration `adapter` (`None`:
    /// the base model), which the servers serve already.
    pub(super) async fn sample(&self, it: u32, adapter: Option<u32>) -> anyhow::Result<()> {
        let missing = self.store.missing_groups(it).await?;
        let tasks = self.store.tasks(it).await?;
        let adapter = adapter.map(learner::checkpoint::name);
        let concurrency = self.sampling_concurrency() * self.rollout.len();
        self.before_sampling(it).await;
        let bar = crate::report::bar(missing.len() as u64, &format!("iteration {it}: sampling"));
        let mut done = futures::stream::iter(
            missing
                .into_iter()
                .map(|g| self.sample_group(it, tasks[g as usize].clone(), adapter.as_deref())),
        )
        .buffer_unordered(concurrency);
        while let Some(r) = done.next().await {
            r?;
            bar.inc(1);
        }
        bar.finish();
        Ok(())
    }

    /// Groups sent at once to one server: as many as fill its batch.
    fn sampling_concurrency(&self) -> usize {
        let c = &self.config;
        (c.services.rollout.max_batch / c.attempts).max(1) as usize
    }

    async fn sample_group(
        &self,
        it: u32,
        task: TaskRecord,
        adapter: Option<&str>,
    ) -> anyhow::Result<()> {
        let c = &self.config;
        let problem = &self.train[task.problem_index as usize];
        let messages = self
            .style()
            .messages(&problem.question, c.prompt.system.as_deref());
        let tok = self
            .rollout
            .call("tokenizing a prompt", self.deadline(0, 1), |cl| {
                let req = TokenizeRequest::chat(messages.clone());
                async move { cl.tokenize(&req).await }
            })
            .await?;
        let req = c
            .sampling
            .train
            .request(tok.tokens.clone(), c.attempts, task.seed);
        let tokens = tok.tokens.len() as u64 + u64::from(c.attempts) * u64::from(req.max_tokens);
        let out = self
            .rollout
            .call(
                "sampling a group",
                self.deadline(tokens, self.sampling_concurrency()),
                |cl| {
                    let req = req.clone();
                    async move { cl.generate(&req).await }
                },
            )
            .await?;
        // The policy version: the served adapter's name (its folder on the server), which must
        // be the one this iteration is sampled with.
        let served = out.adapter.as_deref().map(|a| {
            std::path::Path::new(a)
                .file_name()
                .map_or_else(|| a.to_string(), |n| n.to_string_lossy().into_owned())
        });
        if served.as_deref() != adapter {
            anyhow::bail!(
                "iteration {it} group {}: the rollout server sampled with {} instead of {}; is another run using the same server? Give each run its own servers, then resume",
                task.group_index,
                served.as_deref().unwrap_or("the base model"),
                adapter.unwrap_or("the base model")
            );
        }
        let adapter = served;
        let rollouts: Vec<RolloutRecord> = out
            .choices
            .into_iter()
            .map(|ch| {
                let text = ch.text.unwrap_or_default();
                let scored = rewards::score(
                    &c.rewards,
                    c.prompt.style,
                    &text,
                    ch.finish_reason == FinishReason::Stop,
                    &problem.gold,
                );
                RolloutRecord {
                    attempt: ch.index,
                    prompt_ids: tok.tokens.clone(),
                    completion_ids: ch.token_ids,
                    logprobs: ch.logprobs,
                    ref_logprobs: None,
                    finish_reason: ch.finish_reason,
                    text,
                    reward: scored.total,
                    reward_components: scored.components,
                    answer_status: scored.verdict.status,
                    adapter: adapter.clone(),
                }
            })
            .collect();
        self.store
            .insert_group(it, task.group_index, &rollouts)
            .await?;
        self.changes.send_modify(|n| *n += 1);
        tracing::debug!(
            "iteration {it}: sampling: group {} stored",
            task.group_index
        );
        self.after_group_stored(it).await;
        Ok(())
    }
}
