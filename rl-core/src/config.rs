//! The run config: one YAML file (`configs/rl_gsm8k.yaml`) plus dotted `key=value` overrides from
//! the command line, as Hydra does. Every key has a default (the CPU recipe), unknown keys are
//! errors, and every error names the key and where it was written (`file:line` or the override),
//! with what to write instead. The resolved config can be written back (`config.yaml` of a run).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::prompts::PromptStyle;
use crate::rewards::RewardKind;
use crate::yaml::{self, Document, Origin};

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
    pub device: String,
    pub dtype: Dtype,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: "assets/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            device: "cpu".into(),
            // bf16 holds the accuracy rules on the SmolLM2 oracle (README, "The engine in
            // brief") and is the fast CPU path; a CPU without a bf16 kernel runs it in f32.
            dtype: Dtype::Bf16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub train: PathBuf,
    pub test: PathBuf,
    /// Evaluate on the first N test problems (`null`: all of them).
    pub test_limit: Option<u32>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train: "assets/gsm8k/train.jsonl".into(),
            test: "assets/gsm8k/test.jsonl".into(),
            test_limit: Some(32),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptConfig {
    pub style: PromptStyle,
    /// Replaces the style's system prompt; `""` removes the system message.
    pub system: Option<String>,
}

/// The CPU default's system prompt: with TapeAgents' boxed prompt alone SmolLM2-135M almost never
/// boxes its answer; with this one about 1 sample in 13 does, enough for GRPO to learn from.
pub const BOXED_SYSTEM_PROMPT: &str = "Solve the math problem step by step. Finish with the final \
     answer as a number inside \\boxed{}, for example: The answer is \\boxed{42}.";

impl Default for PromptConfig {
    fn default() -> Self {
        Self {
            style: PromptStyle::Boxed,
            system: Some(BOXED_SYSTEM_PROMPT.to_string()),
        }
    }
}

/// Sampling parameters of one phase (training rollouts or evaluation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    pub temperature: f32,
    pub top_p: f32,
    /// 0: no top-k truncation.
    pub top_k: u32,
    pub max_tokens: u32,
}

impl SamplingConfig {
    /// The native sampling request of `n` choices of `prompt_ids` with these settings (the
    /// server's end-of-sequence ids stop them); choice `i` is sampled with seed `seed + i`.
    pub fn request(&self, prompt_ids: Vec<u32>, n: u32, seed: u64) -> crate::wire::GenerateRequest {
        crate::wire::GenerateRequest {
            prompt_ids,
            n,
            max_tokens: self.max_tokens,
            temperature: f64::from(self.temperature),
            top_p: f64::from(self.top_p),
            top_k: self.top_k,
            stop_token_ids: None,
            seed: Some(seed),
        }
    }
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_tokens: 256,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingPhases {
    pub train: SamplingConfig,
    pub test: SamplingConfig,
}

impl Default for SamplingPhases {
    fn default() -> Self {
        Self {
            train: SamplingConfig {
                temperature: 0.7,
                ..SamplingConfig::default()
            },
            test: SamplingConfig {
                temperature: 0.0,
                ..SamplingConfig::default()
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
    pub scale_rewards: ScaleRewards,
    /// Drop groups whose rewards are all equal (their advantages are zero).
    pub filter_zero_variance: bool,
    /// Exclude completions cut by `max_tokens` from the loss.
    pub mask_truncated: bool,
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
            scale_rewards: ScaleRewards::Group,
            filter_zero_variance: true,
            mask_truncated: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutServiceConfig {
    /// Port of the rollout server the orchestrator starts (0: any free port).
    pub port: u16,
    /// Already running rollout servers to use instead of starting one (`http://host:port`).
    pub endpoints: Vec<String>,
    pub max_batch: u32,
    pub max_queue: u32,
}

impl Default for RolloutServiceConfig {
    fn default() -> Self {
        Self {
            port: 0,
            endpoints: Vec::new(),
            max_batch: 32,
            max_queue: 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefServiceConfig {
    /// Port of the ref-scorer the orchestrator starts (0: any free port).
    pub port: u16,
    /// An already running ref-scorer to use instead of starting one.
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServicesConfig {
    pub host: String,
    /// Bearer key the services require (`null`: none).
    pub api_key: Option<String>,
    pub rollout: RolloutServiceConfig,
    pub ref_scorer: RefServiceConfig,
    /// Seconds to wait for a started service's `/health`.
    pub startup_timeout_s: u32,
    /// Seconds before an HTTP request to a service is abandoned and retried.
    pub request_timeout_s: u32,
}

impl Default for ServicesConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            api_key: None,
            rollout: RolloutServiceConfig::default(),
            ref_scorer: RefServiceConfig::default(),
            startup_timeout_s: 120,
            request_timeout_s: 1800,
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
        }
    }
}

/// Lays `user` over `base`: mappings merge key by key (recursively), anything else replaces.
/// `rewards` is a value (kind -> weight), not a section: the user's list replaces the default one.
fn merge_onto(base: &mut serde_json::Value, user: &serde_json::Value) {
    match (base, user) {
        (serde_json::Value::Object(b), serde_json::Value::Object(u)) => {
            for (k, v) in u {
                match b.get_mut(k) {
                    Some(slot) if k != "rewards" => merge_onto(slot, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, u) => *b = u.clone(),
    }
}

/// A config with the origin of each of its keys, for messages about values found wrong later
/// (a missing model file, a port in use).
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: Config,
    source: String,
    doc: Document,
}

impl Config {
    /// Reads a config file and applies `key=value` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<LoadedConfig, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: shown.clone(),
            message: format!("cannot read the config file ({e})"),
        })?;
        Self::from_yaml(&text, &shown, overrides)
    }

    /// Parses config text (`source` names it in messages) and applies `key=value` overrides.
    pub fn from_yaml(
        text: &str,
        source: &str,
        overrides: &[String],
    ) -> Result<LoadedConfig, ConfigError> {
        let mut doc = Document::parse(text).map_err(|e| ConfigError::Syntax {
            path: source.to_string(),
            line: e.line,
            message: e.message,
        })?;
        if !doc.value.is_object() {
            return Err(ConfigError::Key {
                at: format!("{source}:1"),
                key: "(top level)".into(),
                message: "a config is a mapping of keys (like `seed: 42`)".into(),
            });
        }
        for text in overrides {
            apply_override(&mut doc, text)?;
        }
        let loaded = LoadedConfig {
            config: Config::default(),
            source: source.to_string(),
            doc,
        };
        // Keys left out take the defaults of the whole config, not of their section's type: a
        // file that sets only `sampling.test.max_tokens` keeps the test phase greedy.
        let mut merged = serde_json::to_value(Config::default()).map_err(|e| ConfigError::Key {
            at: source.to_string(),
            key: "(defaults)".into(),
            message: e.to_string(),
        })?;
        merge_onto(&mut merged, &loaded.doc.value);
        let config: Config = serde_path_to_error::deserialize(&merged).map_err(|e| {
            let message = explain_serde(e.inner().to_string());
            let mut key = e.path().to_string();
            // An unknown map key (a reward kind) shows as `rewards.?`: name it.
            if let Some(parent) = key.strip_suffix(".?") {
                if let Some(name) = message.split('`').nth(1) {
                    key = format!("{parent}.{name}");
                }
            }
            loaded.error(&key, message)
        })?;
        let loaded = LoadedConfig { config, ..loaded };
        if let Err((key, message)) = loaded.config.validate() {
            return Err(loaded.error(&key, message));
        }
        Ok(loaded)
    }

    /// The config as YAML (what `config.yaml` of a run holds).
    pub fn to_yaml(&self) -> Result<String, String> {
        let value = serde_json::to_value(self).map_err(|e| e.to_string())?;
        yaml::to_yaml_string(&value)
    }

    /// Completions per iteration.
    pub fn completions_per_iteration(&self) -> u32 {
        self.problems_per_iteration * self.attempts
    }

    /// Checks ranges and the relations between keys: `Err((key, message))`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        fn err<T>(key: &str, message: impl Into<String>) -> Result<T, (String, String)> {
            Err((key.to_string(), message.into()))
        }
        if self.output_dir.as_os_str().is_empty() {
            return err(
                "output_dir",
                "must name the run directory (e.g. runs/rl_gsm8k)",
            );
        }
        if self.max_iterations == 0 {
            return err("max_iterations", "must be at least 1");
        }
        if self.attempts < 2 {
            return err(
                "attempts",
                format!(
                    "must be at least 2 (got {}): GRPO compares the attempts of a group",
                    self.attempts
                ),
            );
        }
        if self.problems_per_iteration == 0 {
            return err("problems_per_iteration", "must be at least 1");
        }
        if self.model.path.trim().is_empty() {
            return err(
                "model.path",
                "must name a .gguf file or a Hugging Face folder",
            );
        }
        let d = self.model.device.as_str();
        let cuda_ok = d == "cuda"
            || d.strip_prefix("cuda:")
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if d != "cpu" && !cuda_ok {
            return err(
                "model.device",
                format!("`{d}` is not a device; use cpu, cuda or cuda:N"),
            );
        }
        if self.data.test_limit == Some(0) {
            return err(
                "data.test_limit",
                "must be at least 1, or null for the whole test split",
            );
        }
        self.validate_rewards()?;
        for (name, s) in [
            ("train", &self.sampling.train),
            ("test", &self.sampling.test),
        ] {
            let knobs = sampling::Knobs {
                temperature: f64::from(s.temperature),
                top_p: f64::from(s.top_p),
                top_k: u64::from(s.top_k),
                max_tokens: u64::from(s.max_tokens),
            };
            if let Err(e) = knobs.check() {
                return err(
                    &format!("sampling.{name}.{}", e.field),
                    format!("must be {} (got {})", e.rule, e.value),
                );
            }
        }
        if self.sampling.train.temperature == 0.0 {
            return err(
                "sampling.train.temperature",
                "must be > 0: greedy training rollouts make every group identical (no GRPO signal)",
            );
        }
        self.validate_lora()?;
        self.validate_learner()?;
        self.validate_services()
    }

    fn validate_rewards(&self) -> Result<(), (String, String)> {
        if self.rewards.is_empty() {
            return Err((
                "rewards".into(),
                "needs at least one reward kind with a weight (e.g. `tapeagents: 1.0`)".into(),
            ));
        }
        for (kind, w) in &self.rewards {
            let key = format!("rewards.{}", kind.name());
            if !w.is_finite() {
                return Err((key, format!("weight must be a finite number (got {w})")));
            }
            if kind.needs_tags() && self.prompt.style.tags().is_none() {
                return Err((
                    key,
                    format!(
                        "rewards tags, but prompt.style is `{}`; use a tag style (reasoning_answer, thinking_answer, working_out) or remove it",
                        self.prompt.style.name()
                    ),
                ));
            }
        }
        if self.rewards.values().all(|w| *w == 0.0) {
            return Err((
                "rewards".into(),
                "every weight is 0: the reward would be constant".into(),
            ));
        }
        Ok(())
    }

    fn validate_lora(&self) -> Result<(), (String, String)> {
        let l = &self.lora;
        let key = |k: &str| format!("lora.{k}");
        if l.r == 0 {
            return Err((key("r"), "must be at least 1".into()));
        }
        if !(l.alpha.is_finite() && l.alpha > 0.0) {
            return Err((key("alpha"), format!("must be > 0 (got {})", l.alpha)));
        }
        if !(0.0..1.0).contains(&l.dropout) {
            return Err((
                key("dropout"),
                format!("must be in [0, 1) (got {})", l.dropout),
            ));
        }
        if l.targets.is_empty() {
            return Err((
                key("targets"),
                format!("needs at least one of {}", LORA_TARGETS.join(", ")),
            ));
        }
        for (i, t) in l.targets.iter().enumerate() {
            if !LORA_TARGETS.contains(&t.as_str()) {
                return Err((
                    format!("lora.targets[{i}]"),
                    format!(
                        "`{t}` is not a module LoRA can target; use {}",
                        LORA_TARGETS.join(", ")
                    ),
                ));
            }
            if l.targets[..i].contains(t) {
                return Err((
                    format!("lora.targets[{i}]"),
                    format!("`{t}` is listed twice"),
                ));
            }
        }
        Ok(())
    }

    fn validate_learner(&self) -> Result<(), (String, String)> {
        let l = &self.learner;
        let key = |k: &str| format!("learner.{k}");
        let positive = |k: &str, v: f64| -> Result<(), (String, String)> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err((key(k), format!("must be > 0 (got {v})")))
            }
        };
        positive("lr", l.lr)?;
        if !(l.weight_decay.is_finite() && l.weight_decay >= 0.0) {
            return Err((
                key("weight_decay"),
                format!("must be >= 0 (got {})", l.weight_decay),
            ));
        }
        if let Some(g) = l.max_grad_norm {
            positive("max_grad_norm", g)?;
        }
        if !(l.beta.is_finite() && l.beta >= 0.0) {
            return Err((
                key("beta"),
                format!("must be >= 0 (got {}); 0 disables the KL term", l.beta),
            ));
        }
        if !(l.epsilon_low > 0.0 && l.epsilon_low < 1.0) {
            return Err((
                key("epsilon_low"),
                format!("must be in (0, 1) (got {})", l.epsilon_low),
            ));
        }
        positive("epsilon_high", l.epsilon_high)?;
        if l.micro_batch == 0 {
            return Err((key("micro_batch"), "must be at least 1".into()));
        }
        if l.steps_per_iteration == 0 {
            return Err((key("steps_per_iteration"), "must be at least 1".into()));
        }
        let per_iter = self.completions_per_iteration();
        if l.steps_per_iteration > per_iter {
            return Err((
                key("steps_per_iteration"),
                format!(
                    "{} steps but an iteration has only {per_iter} completions (problems_per_iteration x attempts)",
                    l.steps_per_iteration
                ),
            ));
        }
        if let Some(acc) = l.grad_accumulation {
            if acc == 0 {
                return Err((
                    key("grad_accumulation"),
                    "must be at least 1, or null to derive it".into(),
                ));
            }
            let used = l.steps_per_iteration * acc * l.micro_batch;
            if used != per_iter {
                return Err((
                    key("grad_accumulation"),
                    format!(
                        "steps_per_iteration ({}) x grad_accumulation ({acc}) x micro_batch ({}) = {used} completions, \
                         but an iteration has problems_per_iteration ({}) x attempts ({}) = {per_iter}; \
                         set grad_accumulation to null to derive it",
                        l.steps_per_iteration, l.micro_batch, self.problems_per_iteration, self.attempts
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_services(&self) -> Result<(), (String, String)> {
        let s = &self.services;
        if s.host.trim().is_empty() {
            return Err((
                "services.host".into(),
                "must be an address like 127.0.0.1".into(),
            ));
        }
        if s.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            return Err((
                "services.api_key".into(),
                "is empty; use null for no key".into(),
            ));
        }
        let url_ok = |u: &str| {
            u.strip_prefix("http://")
                .is_some_and(|rest| !rest.is_empty())
        };
        for (i, e) in s.rollout.endpoints.iter().enumerate() {
            if !url_ok(e) {
                return Err((
                    format!("services.rollout.endpoints[{i}]"),
                    format!("`{e}` is not a URL like http://127.0.0.1:8000 (plain HTTP: the services are meant for a trusted network)"),
                ));
            }
        }
        if let Some(e) = &s.ref_scorer.endpoint {
            if !url_ok(e) {
                return Err((
                    "services.ref_scorer.endpoint".into(),
                    format!("`{e}` is not a URL like http://127.0.0.1:8001 (plain HTTP: the services are meant for a trusted network)"),
                ));
            }
        }
        if s.rollout.max_batch == 0 {
            return Err((
                "services.rollout.max_batch".into(),
                "must be at least 1".into(),
            ));
        }
        if s.rollout.max_queue == 0 {
            return Err((
                "services.rollout.max_queue".into(),
                "must be at least 1".into(),
            ));
        }
        if s.rollout.port != 0 && s.rollout.port == s.ref_scorer.port {
            return Err((
                "services.ref_scorer.port".into(),
                format!("{} is also services.rollout.port; give each service its own port (or 0 for any free one)", s.rollout.port),
            ));
        }
        if s.startup_timeout_s == 0 || s.request_timeout_s == 0 {
            let k = if s.startup_timeout_s == 0 {
                "startup_timeout_s"
            } else {
                "request_timeout_s"
            };
            return Err((format!("services.{k}"), "must be at least 1 second".into()));
        }
        Ok(())
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

impl LoadedConfig {
    /// An error about `key`, placed at the line (or override) that set it.
    pub fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let at = match self.doc.origin_of(key) {
            Some(Origin::Line(l)) => format!("{}:{l}", self.source),
            Some(Origin::Override(o)) => format!("override `{o}`"),
            None => format!("{} (default value)", self.source),
        };
        ConfigError::Key {
            at,
            key: if key.is_empty() {
                "(top level)".into()
            } else {
                key.to_string()
            },
            message: message.into(),
        }
    }

    /// Checks that the files the run reads exist (model, train and test data), before any work.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        if !c.model.path.starts_with("hf:") && !Path::new(&c.model.path).exists() {
            return Err(self.error(
                "model.path",
                format!("`{}` does not exist; run scripts/fetch-assets or point model.path at a .gguf file or model folder", c.model.path),
            ));
        }
        for (key, path) in [("data.train", &c.data.train), ("data.test", &c.data.test)] {
            if !path.is_file() {
                return Err(self.error(
                    key,
                    format!("`{}` does not exist; run scripts/fetch-assets or point {key} at a GSM8K jsonl file", path.display()),
                ));
            }
        }
        Ok(())
    }
}

fn apply_override(doc: &mut Document, text: &str) -> Result<(), ConfigError> {
    let bad = |message: String| ConfigError::Key {
        at: format!("override `{text}`"),
        key: text
            .split_once('=')
            .map_or(text, |(k, _)| k)
            .trim()
            .to_string(),
        message,
    };
    let Some((key, value)) = text.split_once('=') else {
        return Err(bad(
            "an override is `key=value`, e.g. `learner.lr=1e-5`".into()
        ));
    };
    let key = key.trim();
    let valid_key = !key.is_empty()
        && key
            .split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    if !valid_key {
        return Err(bad("the key must be dotted words, e.g. `learner.lr`".into()));
    }
    if value.trim().is_empty() {
        return Err(bad("has no value; write `key=null` to unset a value".into()));
    }
    let value =
        yaml::parse_value(value).map_err(|m| bad(format!("the value is not valid YAML: {m}")))?;
    doc.set(key, value, Origin::Override(text.to_string()))
        .map_err(bad)
}

/// Rewrites serde's messages into the config's words.
fn explain_serde(message: String) -> String {
    if let Some(rest) = message.strip_prefix("unknown field ") {
        return format!("unknown key {rest}");
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        return format!("unknown value {rest}");
    }
    message
}
