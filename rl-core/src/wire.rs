//! Wire formats: what crosses a process boundary as JSON. The native HTTP routes of the services
//! (`/v1/generate`, `/v1/tokenize`, `/v1/score`, `/v1/adapters`, `/health`) and the jsonl of the
//! offline scorer. Requests refuse unknown fields, so a misspelt parameter is an error rather than
//! a silently ignored one. The knobs are `sampling`'s types, so a request that deserializes has
//! every knob in its range, and the OpenAPI documents state the same ranges; integers are read as
//! JSON Schema defines them (`7` and `7.0` alike, [`sampling::integral`]).

use std::io::BufRead;

use sampling::integral;
use sampling::schema::{Seed, TokenId};
use sampling::{Knobs, MaxTokens, ScoreTemperature, Temperature, TopP};
use serde::{Deserialize, Serialize};

/// One (prompt, completion) pair to score, as token ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScoreSequence {
    #[serde(deserialize_with = "integral::u32s")]
    #[schema(min_items = 1, value_type = Vec<TokenId>)]
    pub prompt_ids: Vec<u32>,
    #[serde(deserialize_with = "integral::u32s")]
    #[schema(value_type = Vec<TokenId>)]
    pub completion_ids: Vec<u32>,
}

/// Per-token logprobs of one completion, in the order of its tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SequenceLogprobs {
    pub logprobs: Vec<f32>,
}

fn one() -> u32 {
    1
}

fn temperature_one() -> Temperature {
    Temperature::ONE
}

fn score_temperature_one() -> ScoreTemperature {
    ScoreTemperature::ONE
}

fn top_p_all() -> TopP {
    TopP::ALL
}

fn yes() -> bool {
    true
}

/// `POST /v1/generate`: sample `n` continuations of one prompt given as token ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    #[serde(deserialize_with = "integral::u32s")]
    #[schema(min_items = 1, value_type = Vec<TokenId>)]
    pub prompt_ids: Vec<u32>,
    /// Choices to sample (at most the server's `--max-n`).
    #[serde(default = "one", deserialize_with = "integral::u32")]
    #[schema(minimum = 1, default = 1)]
    pub n: u32,
    pub max_tokens: MaxTokens,
    /// 0 is greedy.
    #[serde(default = "temperature_one")]
    #[schema(default = 1.0)]
    pub temperature: Temperature,
    #[serde(default = "top_p_all")]
    #[schema(default = 1.0)]
    pub top_p: TopP,
    /// 0: no top-k truncation.
    #[serde(default, deserialize_with = "integral::u32")]
    #[schema(default = 0, minimum = 0, maximum = 4294967295_u64)]
    pub top_k: u32,
    /// Token ids that end a completion (kept in `token_ids`); `null`: the model's end-of-sequence
    /// ids.
    #[serde(default, deserialize_with = "integral::opt_u32s")]
    #[schema(value_type = Option<Vec<TokenId>>)]
    pub stop_token_ids: Option<Vec<u32>>,
    /// Choice `i` is sampled with seed `seed + i`; `null`: a random seed (reported back).
    #[serde(default, deserialize_with = "integral::opt_u64")]
    #[schema(value_type = Option<Seed>)]
    pub seed: Option<u64>,
}

impl GenerateRequest {
    /// `n` choices of `prompt_ids` drawn with `knobs`, choice `i` with seed `seed + i`, stopped by
    /// the server's end-of-sequence ids.
    pub fn sample(prompt_ids: Vec<u32>, n: u32, knobs: Knobs, seed: u64) -> Self {
        Self {
            prompt_ids,
            n,
            max_tokens: knobs.max_tokens,
            temperature: knobs.temperature,
            top_p: knobs.top_p,
            top_k: knobs.top_k,
            stop_token_ids: None,
            seed: Some(seed),
        }
    }

    /// The request's knobs.
    pub fn knobs(&self) -> Knobs {
        Knobs {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            max_tokens: self.max_tokens,
        }
    }
}

/// One sampled continuation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GeneratedChoice {
    pub index: u32,
    pub token_ids: Vec<u32>,
    /// Logprob of each token under the distribution it was sampled from (TRL's convention:
    /// log-softmax of logits / temperature, before top-p/top-k).
    pub logprobs: Vec<f32>,
    /// The decoded text (special tokens skipped); `null` for a model without a tokenizer.
    pub text: Option<String>,
    pub finish_reason: FinishReason,
    /// The seed this choice was sampled with.
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GenerateResponse {
    pub model: String,
    /// The id of the adapter the choices were sampled with (`null`: the base model): the one its
    /// loader gave (`PUT /v1/adapters/{name}`: `name`; `POST /v1/adapters`: `id`).
    pub adapter: Option<String>,
    pub choices: Vec<GeneratedChoice>,
}

/// `POST /v1/tokenize`: chat messages (rendered with the model's template) or a plain prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    #[serde(default)]
    #[schema(min_items = 1)]
    pub messages: Option<Vec<crate::prompts::ChatMessage>>,
    #[serde(default)]
    pub prompt: Option<String>,
    /// With `messages`: end with the assistant's turn opening (what generation continues).
    #[serde(default = "yes")]
    #[schema(default = true)]
    pub add_generation_prompt: bool,
}

impl TokenizeRequest {
    /// `messages` rendered with the model's chat template, ending with the assistant's turn
    /// opening (what generation continues).
    pub fn chat(messages: Vec<crate::prompts::ChatMessage>) -> Self {
        Self {
            messages: Some(messages),
            prompt: None,
            add_generation_prompt: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenizeResponse {
    pub tokens: Vec<u32>,
    /// The text that was tokenized (the rendered chat for `messages`).
    pub text: String,
}

/// `POST /v1/score`: per-token logprobs of completions under teacher forcing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScoreRequest {
    #[schema(min_items = 1)]
    pub sequences: Vec<ScoreSequence>,
    /// Logits are divided by this before the log-softmax (the sampling temperature).
    #[serde(default = "score_temperature_one")]
    #[schema(default = 1.0)]
    pub temperature: ScoreTemperature,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScoreResponse {
    pub model: String,
    /// One entry per sequence, in request order.
    pub results: Vec<SequenceLogprobs>,
}

/// `POST /v1/adapters`: load a PEFT adapter folder (inside the server's checkpoints directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdapterRequest {
    /// A folder inside the server's `--checkpoints-dir` (relative to it, or absolute).
    #[schema(min_length = 1)]
    pub path: String,
    /// The name the server answers with for this adapter (in every sampling response, `/health`
    /// and `/v1/models`); `null`: `path` as sent. The server never answers with a path of its
    /// own.
    #[serde(default)]
    #[schema(min_length = 1)]
    pub id: Option<String>,
}

/// `PUT /v1/adapters/{name}`: a PEFT adapter sent as bytes, for a server that shares no file
/// system with the sender. The server checks the sha256, keeps the adapter in its checkpoints
/// folder under `name` and serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdapterUpload {
    /// `adapter_config.json`, as JSON.
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    /// `adapter_model.safetensors`, base64 (standard alphabet, padded).
    #[schema(pattern = "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")]
    pub weights_base64: String,
    /// Hex sha256 of the weights' bytes (what a run's database records for its checkpoint); the
    /// server refuses weights that hash to anything else.
    #[schema(pattern = "^[0-9a-fA-F]{64}$")]
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdapterResponse {
    /// The id of the adapter now served (`null`: the base model).
    pub adapter: Option<String>,
    /// How long the swap took inside the engine.
    pub swap_ms: f64,
}

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    pub status: String,
    pub model: String,
    pub adapter: Option<String>,
}

/// The JSON body of every error: `{"error": {"message", "type"}}` (OpenAI's shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// Why a completion ended: a stop token (or stop string), or the `max_tokens` limit.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    strum::IntoStaticStr,
    strum::EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    /// The name OpenAI's and the native shapes use (the serde name).
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// A jsonl file that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Line {
        path: String,
        line: usize,
        reason: String,
    },
}

/// Reads every non-blank line of a jsonl file as a `T`. A line that does not parse is an error
/// naming the file and the line (1-based); nothing is skipped.
pub fn read_jsonl<T: for<'de> Deserialize<'de>>(
    path: &std::path::Path,
) -> Result<Vec<T>, JsonlError> {
    Ok(read_jsonl_numbered(path)?
        .into_iter()
        .map(|(_, t)| t)
        .collect())
}

/// [`read_jsonl`] with the 1-based line number of each item, for messages about an item.
pub fn read_jsonl_numbered<T: for<'de> Deserialize<'de>>(
    path: &std::path::Path,
) -> Result<Vec<(usize, T)>, JsonlError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| JsonlError::Io {
        path: shown.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| JsonlError::Io {
            path: shown.clone(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let item = serde_json::from_str(&line).map_err(|e| JsonlError::Line {
            path: shown.clone(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        out.push((i + 1, item));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_line_is_named() {
        let dir = std::env::temp_dir().join(format!("rl-core-wire-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("in.jsonl");
        std::fs::write(
            &path,
            "{\"prompt_ids\":[1],\"completion_ids\":[2]}\n\n{\"prompt_ids\":[1],\"completion\":[2]}\n",
        )
        .expect("write");
        let err = read_jsonl::<ScoreSequence>(&path).expect_err("line 3 is malformed");
        let msg = err.to_string();
        assert!(
            msg.contains("in.jsonl line 3") && msg.contains("unknown field `completion`"),
            "{msg}"
        );
        std::fs::write(&path, "{\"prompt_ids\":[1],\"completion_ids\":[2]}\n").expect("write");
        let ok = read_jsonl::<ScoreSequence>(&path).expect("valid");
        assert_eq!(
            ok,
            vec![ScoreSequence {
                prompt_ids: vec![1],
                completion_ids: vec![2]
            }]
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
