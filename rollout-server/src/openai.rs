//! OpenAI's request and response shapes for `/v1/completions`, `/v1/chat/completions` and
//! `/v1/models`, so the openai SDK, TapeAgents or curl can talk to the server. Unknown fields are
//! refused; known OpenAI fields this server does not implement are accepted only at their
//! neutral value and otherwise refused by name. Extensions (as vLLM has them): `top_k`,
//! `stop_token_ids`, `return_token_ids`.

use serde::{Deserialize, Serialize};

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `prompt` of a completion: text, texts, token ids, or lists of token ids.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// OpenAI fields this server does not implement, shared by both requests: each must be absent or
/// neutral; the first that is not is named in the error.
fn refused(
    stream: Option<bool>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Option<&'static str> {
    if stream == Some(true) {
        return Some("`stream` is not supported; send stream: false");
    }
    if presence_penalty.is_some_and(|p| p != 0.0) {
        return Some("`presence_penalty` is not supported; send 0");
    }
    if frequency_penalty.is_some_and(|p| p != 0.0) {
        return Some("`frequency_penalty` is not supported; send 0");
    }
    if logit_bias.is_some_and(|b| !b.is_empty()) {
        return Some("`logit_bias` is not supported; send {}");
    }
    None
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: Prompt,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stop_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// Number of most likely alternatives per token (0..=5); `null`: no logprobs.
    #[serde(default)]
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub best_of: Option<u32>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub return_token_ids: Option<bool>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub user: Option<String>,
}

/// A chat message's content: a string or OpenAI's list of text parts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Content,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatMessageIn>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stop_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub return_token_ids: Option<bool>,
    #[serde(default)]
    pub tools: Option<serde_json::Value>,
    #[serde(default)]
    pub response_format: Option<serde_json::Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub user: Option<String>,
}

impl CompletionRequest {
    /// The first unsupported field set to a value this server cannot honour.
    pub fn refused(&self) -> Option<&'static str> {
        if self.echo == Some(true) {
            return Some("`echo` is not supported; send echo: false");
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Some("`suffix` is not supported");
        }
        if self.best_of.is_some_and(|b| b > self.n.unwrap_or(1)) {
            return Some("`best_of` is not supported; send best_of equal to n or leave it out");
        }
        refused(
            self.stream,
            self.presence_penalty,
            self.frequency_penalty,
            self.logit_bias.as_ref(),
        )
    }
}

impl ChatRequest {
    /// The first unsupported field set to a value this server cannot honour.
    pub fn refused(&self) -> Option<&'static str> {
        if self.tools.as_ref().is_some_and(|t| !t.is_null()) {
            return Some("`tools` is not supported");
        }
        if self
            .response_format
            .as_ref()
            .is_some_and(|f| !f.is_null() && f.get("type").and_then(|t| t.as_str()) != Some("text"))
        {
            return Some("`response_format` other than text is not supported");
        }
        refused(
            self.stream,
            self.presence_penalty,
            self.frequency_penalty,
            self.logit_bias.as_ref(),
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

/// Legacy completions logprobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Option<Vec<serde_json::Map<String, serde_json::Value>>>,
    pub text_offset: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub prompt_token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
    /// Extension: the token's id.
    pub token_id: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub prompt_token_ids: Option<Vec<u32>>,
}
