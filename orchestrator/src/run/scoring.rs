//! Phase 2, `scoring_ref`: the ref-scorers annotate every stored group that has no reference
//! logprobs yet, one group per request, one request per ref-scorer at a time.

use ::sampling::ScoreTemperature;
use futures::StreamExt;
use rl_core::wire::{ScoreRequest, ScoreSequence};

use super::failpoints::crash_at;
use super::Run;

impl Run {
    pub(super) async fn score_ref(&self, it: u32) -> anyhow::Result<()> {
        let groups = self.store.unscored_groups(it).await?;
        let bar = crate::report::bar(
            groups.len() as u64,
            &format!("iteration {it}: reference scoring"),
        );
        let mut done = futures::stream::iter(groups.into_iter().map(|g| self.score_group(it, g)))
            .buffer_unordered(self.scorer.len());
        while let Some(r) = done.next().await {
            r?;
            bar.inc(1);
        }
        bar.finish();
        Ok(())
    }

    async fn score_group(&self, it: u32, g: u32) -> anyhow::Result<()> {
        let rollouts = self.store.group(it, g).await?;
        // At the temperature the group was drawn at (the config's only for rows written before
        // it was recorded): the reference is compared with the policy under the same one.
        let drawn = rollouts
            .iter()
            .find_map(|r| r.sampling)
            .map_or(self.config.sampling.train.temperature, |s| {
                s.knobs.temperature
            });
        let temperature = ScoreTemperature::try_from(drawn).map_err(|e| {
            anyhow::anyhow!("iteration {it} group {g} was drawn at temperature {drawn}, which cannot be scored at: it {e}")
        })?;
        let req = ScoreRequest {
            sequences: rollouts
                .iter()
                .map(|r| ScoreSequence {
                    prompt_ids: r.prompt_ids.clone(),
                    completion_ids: r.completion_ids.clone(),
                })
                .collect(),
            temperature,
        };
        let tokens: usize = rollouts
            .iter()
            .map(|r| r.prompt_ids.len() + r.completion_ids.len())
            .sum();
        let out = self
            .scorer
            .call("reference scoring", self.deadline(tokens as u64, 1), |cl| {
                let req = req.clone();
                async move { cl.score(&req).await }
            })
            .await?;
        let lps: Vec<Vec<f32>> = out.results.into_iter().map(|r| r.logprobs).collect();
        self.store.set_ref_logprobs(it, g, &lps).await?;
        tracing::debug!("iteration {it}: scoring_ref: group {g} stored");
        crash_at("scoring_ref", it);
        Ok(())
    }
}
