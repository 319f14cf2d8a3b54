//! Test support: the tiny model (on the device `TEST_DEVICE` names, default cpu), the learner
//! binary, and a rollout database of real samples from the model.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use model::{Engine, GenerateRequest, SamplingParams, ScoreRequest};
use rl_core::rewards::{AnswerStatus, RewardKind};
use rl_core::wire::FinishReason;
use rl_store::{Phase, RolloutRecord, RunSpec, Store, TaskRecord};
use sampling::{Knobs, MaxTokens, SampledWith, ScoreTemperature, Temperature};

pub fn golden() -> PathBuf {
    std::env::var_os("GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden"))
}

/// The device name of the suite (`TEST_DEVICE`, default cpu), for the learner's `--device`.
pub fn device_name() -> String {
    std::env::var("TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

/// The device of the suite; one that cannot be opened fails the test.
pub fn device() -> Device {
    let d = model::test_device().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("test device: {:?}", d.location());
    d
}

/// The learner binary: the one cargo built beside this test, or `CARGO_BIN_EXE_learner` from
/// the environment (`scripts/gpu-check run`, where the build folder is elsewhere).
pub fn learner_exe() -> PathBuf {
    std::env::var_os("CARGO_BIN_EXE_learner")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_learner")))
}

pub fn tiny_path() -> PathBuf {
    golden().join("tiny_llama")
}

pub fn tiny(dtype: DType) -> Engine {
    Engine::load(&tiny_path(), &device(), dtype).unwrap()
}

pub const PROMPTS: [&[u32]; 2] = [&[1, 10, 11, 12, 13], &[1, 20, 21, 22]];
pub const ATTEMPTS: u32 = 4;

/// The run config of the tests (small steps, two optimizer steps per iteration).
pub fn config_yaml(max_iterations: u32) -> String {
    format!(
        "seed: 5\nmax_iterations: {max_iterations}\nattempts: {ATTEMPTS}\nproblems_per_iteration: 2\n\
         lora:\n  r: 4\n  alpha: 8\n  targets: [q_proj, v_proj, down_proj]\n\
         learner:\n  lr: 0.01\n  micro_batch: 3\n  steps_per_iteration: 2\n  beta: 0.04\n  weight_decay: 0.01\n  \
         schedule: cosine\n  warmup_steps: 1\n  filter_zero_variance: true\n"
    )
}

/// Writes iterations `0..n` of sampled rollouts (rewards: attempt `i % 4` of each group gets 1,
/// one group per iteration has equal rewards) with reference logprobs, into a new database.
pub async fn make_db(path: &Path, iterations: u32) -> Store {
    make_db_sampled_with(path, iterations, |_| None).await
}

/// [`make_db`], each iteration's rollouts recording `version(iteration)` as the policy that
/// sampled them.
pub async fn make_db_sampled_with(
    path: &Path,
    iterations: u32,
    version: impl Fn(u32) -> Option<u32>,
) -> Store {
    make_db_drawn(path, iterations, |it, _| (version(it), 1.0)).await
}

/// [`make_db`], group `g` of iteration `it` drawn at the temperature and recording the policy
/// version `drawn(it, g)` gives.
pub async fn make_db_drawn(
    path: &Path,
    iterations: u32,
    drawn: impl Fn(u32, u32) -> (Option<u32>, f64),
) -> Store {
    let engine = tiny(DType::F32);
    let store = Store::create(
        path,
        &RunSpec {
            config_yaml: config_yaml(iterations),
            model: "tiny".into(),
            seed: 5,
            attempts: ATTEMPTS,
        },
    )
    .await
    .unwrap();
    for it in 0..iterations {
        let tasks: Vec<TaskRecord> = PROMPTS
            .iter()
            .enumerate()
            .map(|(g, _)| TaskRecord {
                group_index: g as u32,
                problem_index: g as u64,
                question: format!("q{g}"),
                gold: "1".into(),
                seed: u64::from(it) * 100 + g as u64,
            })
            .collect();
        store.begin_iteration(it, ATTEMPTS, &tasks).await.unwrap();
        for (g, prompt) in PROMPTS.iter().enumerate() {
            let (version, temperature) = drawn(it, g as u32);
            let knobs = Knobs {
                temperature: Temperature::new(temperature).unwrap(),
                ..Knobs::plain(MaxTokens::new(6).unwrap())
            };
            let seed = |a: u32| u64::from(it) * 100 + g as u64 * 10 + u64::from(a);
            let reqs: Vec<GenerateRequest> = (0..ATTEMPTS)
                .map(|a| {
                    let params = SamplingParams {
                        stop_ids: vec![2],
                        seed: seed(a),
                        ..SamplingParams::new(knobs)
                    };
                    GenerateRequest::new("prompt", prompt.to_vec(), params, engine.limits())
                        .unwrap()
                })
                .collect();
            let gens = engine.generate(&reqs).unwrap();
            let seqs: Vec<ScoreRequest> = gens
                .iter()
                .map(|x| score_request(&engine, prompt.to_vec(), x.tokens.clone()))
                .collect();
            let scores = engine
                .score(&seqs, ScoreTemperature::new(temperature).unwrap())
                .unwrap();
            let rollouts: Vec<RolloutRecord> = gens
                .into_iter()
                .enumerate()
                .map(|(a, x)| {
                    // Group 1 of odd iterations: all equal (zero variance, filtered out).
                    let reward = if g == 1 && it % 2 == 1 {
                        0.0
                    } else if a as u32 == it % ATTEMPTS {
                        1.0
                    } else {
                        0.0
                    };
                    RolloutRecord {
                        attempt: a as u32,
                        prompt_ids: prompt.to_vec(),
                        completion_ids: x.tokens,
                        logprobs: x.logprobs,
                        ref_logprobs: None,
                        finish_reason: match x.finish_reason {
                            model::FinishReason::Stop => FinishReason::Stop,
                            model::FinishReason::Length => FinishReason::Length,
                        },
                        text: String::new(),
                        reward,
                        reward_components: BTreeMap::from([(RewardKind::Tapeagents, reward)]),
                        answer_status: AnswerStatus::Wrong,
                        policy_version: version,
                        adapter: version.map(|v| format!("iter_{v}")),
                        sampling: Some(SampledWith {
                            knobs,
                            seed: seed(a as u32),
                        }),
                    }
                })
                .collect();
            store.insert_group(it, g as u32, &rollouts).await.unwrap();
            store.set_ref_logprobs(it, g as u32, &scores).await.unwrap();
        }
        store.set_phase(it, Phase::ScoringRef).await.unwrap();
        store.set_phase(it, Phase::Training).await.unwrap();
    }
    store
}

/// A scoring request, checked against `engine`'s limits.
pub fn score_request(engine: &Engine, prompt: Vec<u32>, completion: Vec<u32>) -> ScoreRequest {
    ScoreRequest::new("sequence", prompt, completion, engine.limits()).unwrap()
}

/// A scoring temperature.
pub fn st(t: f64) -> ScoreTemperature {
    ScoreTemperature::new(t).unwrap()
}

/// The temperature the test config draws at, for rows that did not record one.
pub fn config_temperature() -> Temperature {
    Temperature::new(1.0).unwrap()
}
