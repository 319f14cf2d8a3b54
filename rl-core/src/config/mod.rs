//! The run config: one YAML file (`configs/rl_gsm8k.yaml`) plus dotted `key=value` overrides from
//! the command line, as Hydra does. Every key has a default (the CPU recipe), unknown keys are
//! errors, and every error names the key and where it was written (`file:line` or the override),
//! with what to write instead. The resolved config can be written back (`config.yaml` of a run).
//! Here the types and their defaults; reading and overrides in `load`, the checks in `validate`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sampling::{Knobs, MaxTokens, Temperature};
use serde::{Deserialize, Serialize};

mod device;
mod load;
mod services;
mod validate;

pub use device::Device;
pub use load::LoadedConfig;
pub use services::{
    ApiKey, AsyncConfig, RefServiceConfig, RolloutServiceConfig, ServicesConfig, API_KEY_ENV,
};

use crate::prompts::PromptStyle;
use crate::rewards::RewardKind;

/// A config that is wrong, with where and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}:{line}: YAML syntax: {message}")]
    Syntax {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{at}: `{key}`: {message}")]
    Key {
        at: String,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The key the error is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Key { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Floating-point dtype of the model weights.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr, strum::EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    /// The name the config and the command lines use (the serde name).
    pub fn name(self) -> &'static str {
        self.into()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A `.gguf` file or a Hugging Face folder (or `hf:org/name` with the `hub` feature).
    pub path: String,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: Device,
    pub dtype: Dtype,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: "assets/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            device: Device::Cpu,
            // bf16 holds the accuracy rules on the SmolLM2 oracle (README, "The engine in
            // brief") and is the fast CPU path; a CPU without a bf16 kernel runs it in f32.
            dtype: Dtype::Bf16,
        }
    }
}

/// The training and test problems: JSONL or Parquet files (by extension) of rows with a
/// question and an answer field; see [`crate::tasks::load`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub train: PathBuf,
    pub test: PathBuf,
    /// Evaluate on the first N test problems (`null`: all of them).
    pub test_limit: Option<u32>,
    /// The names of the question and answer fields (columns).
    pub fields: DataFields,
    /// Where the gold answer is in the answer field.
    pub answer_format: AnswerFormat,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train: "assets/gsm8k/train.jsonl".into(),
            test: "assets/gsm8k/test.jsonl".into(),
            test_limit: Some(32),
            fields: DataFields::default(),
            answer_format: AnswerFormat::Gsm8k,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataFields {
    pub question: String,
    pub answer: String,
}

impl Default for DataFields {
    fn default() -> Self {
        Self {
            question: "question".into(),
            answer: "answer".into(),
        }
    }
}

/// Where the gold answer is in a row's answer field; it must be a number.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr, strum::EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum AnswerFormat {
    /// After the last `####` (GSM8K's solutions).
    Gsm8k,
    /// Inside the last `\boxed{...}` (MATH-style solutions).
    Boxed,
    /// The whole field (a number, or a string holding one).
    Number,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptConfig {
    pub style: PromptStyle,
    /// Replaces the style's system prompt; `""` removes the system message.
    pub system: Option<String>,
}

/// The CPU default's system prompt: with TapeAgents' boxed prompt alone SmolLM2-135M almost never
/// boxes its answer; with one worked example about a third of its samples do, so nearly every
/// group of 8 has reward variance for GRPO to learn from.
pub const BOXED_SYSTEM_PROMPT: &str =
    "You solve math word problems briefly and end with the final \
     number inside \\boxed{}.\n\nExample:\nQuestion: Tom has 3 apples and buys 5 more. How many \
     apples does he have?\nAnswer: Tom has 3 + 5 = 8 apples. The answer is \\boxed{8}.";

impl Default for PromptConfig {
    fn default() -> Self {
        Self {
            style: PromptStyle::Boxed,
            system: Some(BOXED_SYSTEM_PROMPT.to_string()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingPhases {
    /// The training rollouts' knobs (`sampling::Knobs`: each valid by its type).
    pub train: Knobs,
    /// Evaluation's (greedy by default).
    pub test: Knobs,
}

impl Default for SamplingPhases {
    fn default() -> Self {
        let plain = Knobs::plain(MaxTokens::of(256));
        Self {
            train: Knobs {
                temperature: Temperature::of(0.7),
                ..plain
            },
            test: Knobs {
                temperature: Temperature::GREEDY,
                ..plain
            },
        }
    }
}

/// The module names LoRA can target (PEFT's names).
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    pub r: u32,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: LORA_TARGETS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean over sequences of each sequence's masked token mean (DeepSeekMath / TRL `grpo`).
    Grpo,
    /// Sum over tokens / (sequences x max completion length) (Dr. GRPO).
    DrGrpo,
    /// Sum over tokens / number of tokens (DAPO).
    Dapo,
}

/// Where the clipped importance ratio is taken.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr, strum::EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ImportanceLevel {
    /// Per token, `exp(logp - old)` (GRPO, PPO).
    Token,
    /// Per sequence, the geometric mean of its token ratios `exp(mean(logp - old))`, clipped
    /// per sequence (GSPO; TRL's `importance_sampling_level="sequence"`).
    Sequence,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Divide by the group's standard deviation.
    Group,
    /// Divide by the batch's standard deviation.
    Batch,
    /// Only subtract the group mean.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearnerConfig {
    pub lr: f64,
    pub schedule: LrSchedule,
    pub warmup_steps: u32,
    pub weight_decay: f64,
    /// Clip the gradient norm to this (`null`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Completions per forward/backward pass.
    pub micro_batch: u32,
    /// Micro-batches per optimizer step (`null`: all of a step's share of the iteration).
    pub grad_accumulation: Option<u32>,
    /// Optimizer steps per iteration; the iteration's completions are split evenly between them.
    pub steps_per_iteration: u32,
    pub loss_type: LossType,
    /// KL coefficient (k3 estimator against the reference model).
    pub beta: f64,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// The clipped ratio per token (GRPO) or per sequence (GSPO).
    pub importance_sampling_level: ImportanceLevel,
    pub scale_rewards: ScaleRewards,
    /// Drop groups whose rewards are all equal (their advantages are zero).
    pub filter_zero_variance: bool,
    /// Exclude completions cut by `max_tokens` from the loss.
    pub mask_truncated: bool,
    /// Truncated importance sampling (TRL's `vllm_importance_sampling_cap`, verl's TIS): each
    /// token's policy loss is weighted by `min(exp(old - sampler), tis_cap)`, correcting for the
    /// sampler's policy differing from the learner's (kernels, batching, `async.max_lag`).
    /// `null`: off.
    pub tis_cap: Option<f64>,
}

impl Default for LearnerConfig {
    fn default() -> Self {
        Self {
            lr: 5e-4,
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            micro_batch: 4,
            grad_accumulation: None,
            steps_per_iteration: 2,
            loss_type: LossType::Grpo,
            beta: 0.01,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            importance_sampling_level: ImportanceLevel::Token,
            scale_rewards: ScaleRewards::Group,
            filter_zero_variance: true,
            mask_truncated: false,
            tis_cap: None,
        }
    }
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The run directory: `rollouts.sqlite`, `checkpoints/`, `metrics.jsonl`, `config.yaml`.
    pub output_dir: PathBuf,
    pub seed: u64,
    pub max_iterations: u32,
    /// Greedy evaluation every N iterations (0: never).
    pub test_every_n_iterations: u32,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub prompt: PromptConfig,
    /// Reward kinds and their weights; the reward is the weighted sum.
    pub rewards: BTreeMap<RewardKind, f64>,
    /// Completions sampled per problem (the GRPO group size).
    pub attempts: u32,
    pub problems_per_iteration: u32,
    pub sampling: SamplingPhases,
    pub lora: LoraConfig,
    pub learner: LearnerConfig,
    pub services: ServicesConfig,
    #[serde(rename = "async")]
    pub overlap: AsyncConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            output_dir: "runs/rl_gsm8k".into(),
            seed: 42,
            max_iterations: 5,
            test_every_n_iterations: 2,
            model: ModelConfig::default(),
            data: DataConfig::default(),
            prompt: PromptConfig::default(),
            rewards: BTreeMap::from([(RewardKind::Tapeagents, 1.0)]),
            attempts: 8,
            problems_per_iteration: 4,
            sampling: SamplingPhases::default(),
            lora: LoraConfig::default(),
            learner: LearnerConfig::default(),
            services: ServicesConfig::default(),
            overlap: AsyncConfig::default(),
        }
    }
}

impl Config {
    /// Completions per iteration.
    pub fn completions_per_iteration(&self) -> u32 {
        self.problems_per_iteration * self.attempts
    }

    /// Makes relative paths absolute against `base` (what a run records, so that `resume` works
    /// from any directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &Path| {
            if p.is_relative() {
                base.join(p)
            } else {
                p.to_path_buf()
            }
        };
        self.output_dir = abs(&self.output_dir);
        self.data.train = abs(&self.data.train);
        self.data.test = abs(&self.data.test);
        let model = Path::new(&self.model.path);
        if model.is_relative() && !self.model.path.starts_with("hf:") {
            self.model.path = abs(model).display().to_string();
        }
    }
}
