//! Phase 2, `scoring_ref`: the ref-scorers annotate every stored group that has no reference
//! logprobs yet, one group per request, one request per ref-scorer at a time.

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
        let temperature = f64::from(self.config.sampling.train.temperature);
        let rollouts = self.store.group(it, g).await?;
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
