//! OpenAI's request and response shapes for `/v1/completions`, `/v1/chat/completions` and
//! `/v1/models`, so the openai SDK, TapeAgents or curl can talk to the server. Unknown fields are
//! refused; known OpenAI fields this server does not implement are accepted only at their
//! neutral value and otherwise refused by name. Extensions (as vLLM has them): `top_k`,
//! `stop_token_ids`, `return_token_ids`.

use model::SamplingParams;
use sampling::integral;
use sampling::schema::{Seed, TokenId};
use sampling::{Knobs, MaxTokens, Temperature, TopP};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
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

/// `prompt` of a completion: text, texts, token ids, or lists of token ids; none empty (its
/// schema says so, [`Prompt::schema`]). Ids are read as JSON Schema defines integers (`7.0` is 7).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    #[serde(deserialize_with = "integral::u32s")]
    Ids(Vec<u32>),
    #[serde(deserialize_with = "integral::u32s_lists")]
    IdLists(Vec<Vec<u32>>),
}

impl PartialSchema for Prompt {
    /// One of the four shapes, each at least one long (an empty prompt is refused).
    fn schema() -> RefOr<Schema> {
        let text = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
        };
        // The component, so that the server's vocabulary stated there holds here too.
        let id = || RefOr::Ref(utoipa::openapi::Ref::from_schema_name(TokenId::name()));
        let ids = || ArrayBuilder::new().items(id()).min_items(Some(1));
        OneOfBuilder::new()
            .item(text())
            .item(ArrayBuilder::new().items(text()).min_items(Some(1)))
            .item(ids())
            .item(ArrayBuilder::new().items(ids()).min_items(Some(1)))
            .description(Some(
                "Text, texts, token ids or lists of token ids; none empty.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for Prompt {}

/// Declares an OpenAI request with the fields both requests share: sampling (and vLLM's
/// extensions `top_k`, `stop_token_ids`, `return_token_ids`) and the OpenAI fields accepted only
/// at their neutral value. One list, so the two requests cannot drift; a macro rather than
/// `#[serde(flatten)]`, which would lose `deny_unknown_fields` and the field names in errors.
macro_rules! openai_request {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            /// The served model's name (`GET /v1/models`); any other is refused.
            #[serde(default)]
            pub model: Option<String>,
            /// 0 is greedy.
            #[serde(default)]
            #[schema(default = 1.0)]
            pub temperature: Option<Temperature>,
            #[serde(default)]
            #[schema(default = 1.0)]
            pub top_p: Option<TopP>,
            /// Extension: 0 for no top-k truncation.
            #[serde(default, deserialize_with = "integral::opt_u32")]
            #[schema(default = 0, minimum = 0, maximum = 4294967295_u64)]
            pub top_k: Option<u32>,
            /// Choices per prompt (at most the server's `--max-n`).
            #[serde(default, deserialize_with = "integral::opt_u32")]
            #[schema(minimum = 1, default = 1)]
            pub n: Option<u32>,
            /// At most 4 strings (`sampling::MAX_STOP`); the text is cut before the first.
            #[serde(default)]
            pub stop: Option<OneOrMany>,
            /// Extension: token ids that end a choice (default: the model's end ids).
            #[serde(default, deserialize_with = "integral::opt_u32s")]
            #[schema(value_type = Option<Vec<TokenId>>)]
            pub stop_token_ids: Option<Vec<u32>>,
            /// Choice `i` is sampled with seed `seed + i`.
            #[serde(default, deserialize_with = "integral::opt_u64")]
            #[schema(value_type = Option<Seed>)]
            pub seed: Option<u64>,
            /// Extension: also return the token ids.
            #[serde(default)]
            pub return_token_ids: Option<bool>,
            /// `true`: the answer streams as Server-Sent Events (`data: {chunk}` per token, then
            /// one per choice with its `finish_reason`, then `data: [DONE]`), in OpenAI's chunk
            /// shapes.
            #[serde(default)]
            pub stream: Option<bool>,
            /// With `stream`: `include_usage` adds a last chunk with no choices and the usage.
            #[serde(default)]
            pub stream_options: Option<StreamOptions>,
            /// Only 0.
            #[serde(default)]
            pub presence_penalty: Option<f64>,
            /// Only 0.
            #[serde(default)]
            pub frequency_penalty: Option<f64>,
            /// Only `{}`.
            #[serde(default)]
            #[schema(value_type = Option<Object>)]
            pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
            /// Accepted and ignored.
            #[serde(default)]
            pub user: Option<String>,
        }

        impl $name {
            /// The engine's sampling parameters of the shared fields, with `max_tokens` (each
            /// request has its own default) and what the server adds (`tail`: its stop ids,
            /// stop sequences and alternatives); a random seed when none is given.
            pub fn sampling(&self, max_tokens: MaxTokens, tail: SamplingParams) -> SamplingParams {
                let knobs = Knobs {
                    temperature: self.temperature.unwrap_or(Temperature::ONE),
                    top_p: self.top_p.unwrap_or(TopP::ALL),
                    top_k: self.top_k.unwrap_or(0),
                    max_tokens,
                };
                SamplingParams {
                    knobs,
                    stop_ids: self.stop_token_ids.clone().unwrap_or(tail.stop_ids),
                    seed: self.seed.unwrap_or_else(rand::random),
                    ..tail
                }
            }

            /// The first shared field set to a value this server cannot honour.
            fn refused_common(&self) -> Option<&'static str> {
                if self.stream_options.is_some() && self.stream != Some(true) {
                    return Some("`stream_options` is only allowed with stream: true");
                }
                if self.presence_penalty.is_some_and(|p| p != 0.0) {
                    return Some("`presence_penalty` is not supported; send 0");
                }
                if self.frequency_penalty.is_some_and(|p| p != 0.0) {
                    return Some("`frequency_penalty` is not supported; send 0");
                }
                if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
                    return Some("`logit_bias` is not supported; send {}");
                }
                None
            }
        }
    };
}

/// `stream_options` of a streamed request.
#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// A last chunk with the usage (and empty `choices`).
    #[serde(default)]
    pub include_usage: Option<bool>,
}

openai_request! {
    /// `POST /v1/completions`.
    pub struct CompletionRequest {
        pub prompt: Prompt,
        /// Default 16.
        #[serde(default)]
        pub max_tokens: Option<MaxTokens>,
        /// Number of most likely alternatives per token (at most 5,
        /// `sampling::MAX_COMPLETION_LOGPROBS`); `null`: no logprobs.
        #[serde(default, deserialize_with = "integral::opt_u32")]
        #[schema(minimum = 0, maximum = 5)]
        pub logprobs: Option<u32>,
        /// Only `false`.
        #[serde(default)]
        pub echo: Option<bool>,
        /// Only 1 (no best-of-n selection).
        #[serde(default, deserialize_with = "integral::opt_u32")]
        #[schema(minimum = 1, maximum = 1)]
        pub best_of: Option<u32>,
        /// Only empty.
        #[serde(default)]
        pub suffix: Option<String>,
    }
}

/// A chat message's content: a string or OpenAI's list of text parts.
#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// A part of a message's content: only `{"type": "text", "text": ...}` is supported (any other
/// `type` is refused by the handler, naming it).
#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    #[serde(rename = "type")]
    #[schema(pattern = "^text$")]
    pub kind: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Content,
    #[serde(default)]
    pub name: Option<String>,
}

openai_request! {
    /// `POST /v1/chat/completions`.
    pub struct ChatRequest {
        #[schema(min_items = 1)]
        pub messages: Vec<ChatMessageIn>,
        /// Default: the room left in the context.
        #[serde(default)]
        pub max_tokens: Option<MaxTokens>,
        /// Preferred over `max_tokens` when both are given.
        #[serde(default)]
        pub max_completion_tokens: Option<MaxTokens>,
        #[serde(default)]
        pub logprobs: Option<bool>,
        /// With `logprobs: true`; at most 20 (`sampling::MAX_TOP_LOGPROBS`).
        #[serde(default, deserialize_with = "integral::opt_u32")]
        #[schema(minimum = 0, maximum = 20)]
        pub top_logprobs: Option<u32>,
        /// Only `null`.
        #[serde(default)]
        #[schema(value_type = Option<Object>)]
        pub tools: Option<serde_json::Value>,
        /// Only `{"type": "text"}`.
        #[serde(default)]
        #[schema(value_type = Option<Object>)]
        pub response_format: Option<serde_json::Value>,
    }
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
        if self.best_of.is_some_and(|b| b != 1) {
            return Some("`best_of` is not supported; leave it out (or send 1)");
        }
        self.refused_common()
    }
}

impl ChatRequest {
    /// The first unsupported field set to a value this server cannot honour.
    pub fn refused(&self) -> Option<&'static str> {
        if self.tools.as_ref().is_some_and(|t| !t.is_null()) {
            return Some("`tools` is not supported");
        }
        let text_only = |f: &serde_json::Value| {
            f.is_null()
                || f.as_object()
                    .is_some_and(|o| o.len() == 1 && o.get("type") == Some(&"text".into()))
        };
        if self.response_format.as_ref().is_some_and(|f| !text_only(f)) {
            return Some("`response_format` other than {\"type\": \"text\"} is not supported");
        }
        self.refused_common()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub fn of(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// Legacy completions logprobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Option<Vec<serde_json::Map<String, serde_json::Value>>>,
    pub text_offset: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
    /// Extension: the token's id.
    pub token_id: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AssistantMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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

/// `GET /v1/models`: the one served model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    /// Extension: the adapter served (`null`: the base model).
    pub adapter: Option<String>,
    /// Extension (as vLLM): the model's context length.
    pub max_model_len: usize,
}
