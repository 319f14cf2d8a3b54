//! Test support: a run's spec, tasks and rollouts whose every field needs its full width, and
//! a database edited by hand.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use rl_core::rewards::{AnswerStatus, RewardKind};
use rl_core::wire::FinishReason;
use rl_store::{RolloutRecord, RunSpec, Store, TaskRecord};
use sampling::{Knobs, MaxTokens, SampledWith, Temperature, TopP};
use sqlx::Connection;

pub const ATTEMPTS: u32 = 4;

pub fn spec() -> RunSpec {
    RunSpec {
        config_yaml: "seed: 7\n".into(),
        model: "assets/model.gguf".into(),
        seed: u64::MAX - 3, // above i64::MAX: stored bit for bit
        attempts: ATTEMPTS,
    }
}

pub fn tasks(n: u32) -> Vec<TaskRecord> {
    (0..n)
        .map(|g| TaskRecord {
            group_index: g,
            problem_index: u64::from(g) * 13,
            question: format!("question {g}: what is {g} + 1?"),
            gold: (g + 1).to_string(),
            seed: rl_core::tasks::group_seed(7, 0, g as usize),
        })
        .collect()
}

/// A rollout whose content depends on (group, attempt), with logprobs that need every f32 bit.
pub fn rollout(group: u32, attempt: u32) -> RolloutRecord {
    let len = 3 + (group + attempt) as usize % 5;
    let completion_ids: Vec<u32> = (0..len as u32)
        .map(|i| 100 + group * 10 + attempt + i)
        .collect();
    let logprobs: Vec<f32> = (0..len)
        .map(|i| -(1.0 + i as f32) / (3.0 + group as f32 + attempt as f32 * 0.1).sqrt())
        .collect();
    RolloutRecord {
        attempt,
        prompt_ids: vec![1, 2, 3, group],
        completion_ids,
        logprobs,
        ref_logprobs: None,
        finish_reason: if attempt.is_multiple_of(2) {
            FinishReason::Stop
        } else {
            FinishReason::Length
        },
        text: format!(
            "g{group} a{attempt}: \\boxed{{{}}} \"quoted\" ünïcode",
            group + 1
        ),
        reward: if attempt == 0 { 1.0 } else { -1.0 },
        reward_components: BTreeMap::from([(
            RewardKind::Tapeagents,
            if attempt == 0 { 1.0 } else { -1.0 },
        )]),
        answer_status: if attempt == 0 {
            AnswerStatus::Correct
        } else {
            AnswerStatus::NoAnswer
        },
        // Odd groups sampled by an adapter, even ones by the base model: both round-trip.
        policy_version: (group % 2 == 1).then_some(group),
        adapter: (group % 2 == 1).then(|| format!("iter_{group}")),
        // Every third group as a row written before sampling parameters were recorded; the
        // others with knobs of their own and a seed that needs all 64 bits.
        sampling: (group % 3 != 2).then(|| SampledWith {
            knobs: Knobs {
                temperature: Temperature::new(0.5 + f64::from(group) / 64.0).expect("in range"),
                top_p: TopP::new(0.9 + f64::from(attempt) / 100.0).expect("in range"),
                top_k: group * 3,
                max_tokens: MaxTokens::new(64 + attempt).expect("in range"),
            },
            seed: u64::MAX - u64::from(group * 10 + attempt),
        }),
    }
}

pub fn group(g: u32) -> Vec<RolloutRecord> {
    (0..ATTEMPTS).map(|a| rollout(g, a)).collect()
}

/// A run's database at `path` with iteration 0 (two tasks) and its group `g`, then `edits`
/// applied by hand through a plain connection.
pub async fn edited_by_hand(path: &Path, g: u32, edits: &[&'static str]) {
    let store = Store::create(path, &spec()).await.expect("create");
    store
        .begin_iteration(0, ATTEMPTS, &tasks(2))
        .await
        .expect("iteration");
    store.insert_group(0, g, &group(g)).await.expect("group");
    store.close().await;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("raw");
    for sql in edits {
        sqlx::query(*sql).execute(&mut conn).await.expect(sql);
    }
    conn.close().await.expect("close");
}
