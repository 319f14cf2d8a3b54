//! An iteration's rollouts as the learner takes them ([`Batch`]), read from the store by
//! [`load_batch`] with what made them: the policy version that sampled them and the temperature
//! they were drawn at, both read from the rows, never from the run config. An iteration whose
//! rows disagree on either (or on any sampling parameter) is refused, naming two rows that
//! differ: the learner never trains rollouts drawn one way as if drawn another.

use anyhow::bail;
use rl_core::wire::FinishReason;
use rl_store::{RolloutRecord, Store};
use sampling::{ScoreTemperature, Temperature};

/// One completion to learn from.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    /// The sampler's logprobs: the behaviour policy. They weigh the loss only through
    /// truncated importance sampling (`learner.tis_cap`) and show the sampler/learner mismatch;
    /// the clipped ratio's "old" policy is the learner's own logprobs under the iteration's
    /// starting adapter (see [`crate::Learner::train_iteration`]).
    pub sampler: Vec<f32>,
    /// The reference model's logprobs.
    pub reference: Vec<f32>,
    pub reward: f64,
    /// Cut by `max_tokens` rather than ended by a stop token.
    pub truncated: bool,
}

/// An iteration's rollouts, group by group (each group is one problem's attempts), and what
/// they were sampled with.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub groups: Vec<Vec<Sequence>>,
    /// The temperature the rollouts were drawn at: the learner's logprobs are taken under
    /// `softmax(logits / temperature)`, as the sampler's were.
    pub temperature: ScoreTemperature,
    /// The checkpoint iteration that sampled them (`None`: the base model).
    pub policy_version: Option<u32>,
}

/// Reads an iteration's rollouts from the store. Every one must have its reference logprobs,
/// all must come from one policy version no more than `max_lag` versions behind
/// (`async.max_lag`: the checkpoint of iteration `iteration - 1 - max_lag` or later, never a
/// later one), and all must be drawn with the same sampling parameters. Rows written before
/// those were recorded count as drawn at `unrecorded` (the run config's temperature).
pub async fn load_batch(
    store: &Store,
    iteration: u32,
    max_lag: u32,
    unrecorded: Temperature,
) -> anyhow::Result<Batch> {
    let at = |g: u32, r: &RolloutRecord| {
        format!(
            "{}: iteration {iteration} group {g} attempt {}",
            store.path().display(),
            r.attempt
        )
    };
    let rollouts = store.rollouts(iteration).await?;
    let Some((g0, first)) = rollouts.first() else {
        bail!(
            "{}: iteration {iteration} has no rollouts; sample it first",
            store.path().display()
        );
    };
    let knobs_of = |r: &RolloutRecord| r.sampling.map(|s| s.knobs);
    let (version, knobs) = (first.policy_version, knobs_of(first));
    let mut groups: Vec<Vec<Sequence>> = Vec::new();
    let mut current = None;
    for (g, r) in &rollouts {
        if r.policy_version != version {
            bail!(
                "{} was sampled with {} but {} with {}: an iteration is trained on one policy's rollouts only",
                at(*g0, first),
                shown_version(version),
                at(*g, r),
                shown_version(r.policy_version)
            );
        }
        if let (Some(a), Some(b)) = (knobs, knobs_of(r)) {
            if a != b {
                bail!(
                    "{} was drawn with {} but {} with {}: an iteration is trained on rollouts of one set of sampling parameters only",
                    at(*g0, first),
                    a,
                    at(*g, r),
                    b
                );
            }
        }
        let Some(reference) = &r.ref_logprobs else {
            bail!(
                "{} has no reference logprobs; run the ref scoring first",
                at(*g, r)
            );
        };
        if current != Some(*g) {
            groups.push(Vec::new());
            current = Some(*g);
        }
        if let Some(group) = groups.last_mut() {
            group.push(Sequence {
                prompt: r.prompt_ids.clone(),
                completion: r.completion_ids.clone(),
                sampler: r.logprobs.clone(),
                reference: reference.clone(),
                reward: r.reward,
                truncated: r.finish_reason == FinishReason::Length,
            });
        }
    }
    check_lag(version, iteration, max_lag)
        .map_err(|why| anyhow::anyhow!("{}: {why}", at(*g0, first)))?;
    let recorded = rollouts.iter().find_map(|(_, r)| knobs_of(r));
    let temperature = match recorded {
        Some(k) if rollouts.iter().all(|(_, r)| r.sampling.is_some()) => k.temperature,
        Some(k) if k.temperature != unrecorded => bail!(
            "{}: some rollouts of iteration {iteration} recorded temperature {} and others, written before it was recorded, are taken at the config's {unrecorded}; set sampling.train.temperature={} to train them",
            store.path().display(),
            k.temperature,
            k.temperature
        ),
        _ => unrecorded,
    };
    let temperature = ScoreTemperature::try_from(temperature).map_err(|e| {
        anyhow::anyhow!(
            "iteration {iteration}'s rollouts were drawn at temperature {temperature}, which cannot be trained at: it {e}"
        )
    })?;
    Ok(Batch {
        groups,
        temperature,
        policy_version: version,
    })
}

/// `Err` unless `version` (`None`: the base model) may train `iteration` under `max_lag`.
fn check_lag(version: Option<u32>, iteration: u32, max_lag: u32) -> Result<(), String> {
    // The base model samples every iteration before the first checkpoint exists.
    let Some(v) = version else {
        return Ok(());
    };
    let oldest = i64::from(iteration) - 1 - i64::from(max_lag);
    if i64::from(v) >= oldest && v < iteration {
        return Ok(());
    }
    Err(format!(
        "it was sampled with the checkpoint of iteration {v}, not one of the checkpoints of iterations {}..={} that async.max_lag = {max_lag} allows; resume with the max_lag the run was sampled with",
        oldest.max(0),
        i64::from(iteration) - 1
    ))
}

fn shown_version(v: Option<u32>) -> String {
    v.map_or_else(
        || "the base model".into(),
        |v| format!("the checkpoint of iteration {v}"),
    )
}
