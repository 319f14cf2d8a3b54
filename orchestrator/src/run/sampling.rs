//! Phase 1, `sampling`: the iteration's problems fanned out to the rollout servers with bounded
//! concurrency (enough to fill every server's batch), `attempts` samples each with the group's
//! seed, rewarded, each group stored in one transaction with what made it: the policy version
//! (the checkpoint's iteration, which the server confirms by echoing the adapter id it was given)
//! and the knobs and seed of each rollout. On resume only the missing groups are sampled, with
//! the knobs the iteration began with.

use ::sampling::{Knobs, SampledWith};
use futures::StreamExt;
use rl_core::rewards;
use rl_core::wire::{FinishReason, GenerateRequest, TokenizeRequest};
use rl_store::{RolloutRecord, TaskRecord};

use super::Run;

/// What an iteration's groups are sampled with: the policy version (the checkpoint's
/// iteration, `None` for the base model), the adapter id the servers were given for it, and the
/// knobs.
struct Policy {
    version: Option<u32>,
    id: Option<String>,
    knobs: Knobs,
}

impl Run {
    /// Samples the missing groups of `it` with `knobs` and the checkpoint of iteration
    /// `version` (`None`: the base model), which the servers serve already.
    pub(super) async fn sample(
        &self,
        it: u32,
        version: Option<u32>,
        knobs: Knobs,
    ) -> anyhow::Result<()> {
        let missing = self.store.missing_groups(it).await?;
        let tasks = self.store.tasks(it).await?;
        let policy = Policy {
            version,
            id: version.map(learner::checkpoint::name),
            knobs,
        };
        let concurrency = self.sampling_concurrency() * self.rollout.len();
        self.before_sampling(it).await;
        let bar = crate::report::bar(missing.len() as u64, &format!("iteration {it}: sampling"));
        let mut done = futures::stream::iter(
            missing
                .into_iter()
                .map(|g| self.sample_group(it, tasks[g as usize].clone(), &policy)),
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

    async fn sample_group(&self, it: u32, task: TaskRecord, policy: &Policy) -> anyhow::Result<()> {
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
        let req = GenerateRequest::sample(tok.tokens.clone(), c.attempts, policy.knobs, task.seed);
        let tokens =
            tok.tokens.len() as u64 + u64::from(c.attempts) * u64::from(req.max_tokens.get());
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
        // The server echoes the adapter id it was given: it must be this iteration's.
        if out.adapter != policy.id {
            anyhow::bail!(
                "iteration {it} group {}: the rollout server sampled with {} instead of {}; is another run using the same server? Give each run its own servers, then resume",
                task.group_index,
                out.adapter.as_deref().unwrap_or("the base model"),
                policy.id.as_deref().unwrap_or("the base model")
            );
        }
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
                    policy_version: policy.version,
                    adapter: policy.id.clone(),
                    sampling: Some(SampledWith {
                        knobs: policy.knobs,
                        seed: ch.seed,
                    }),
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
