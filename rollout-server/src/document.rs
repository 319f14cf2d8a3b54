//! What the OpenAPI document says beyond what the types derive: this server's own limits (its
//! `--max-n`, the model's vocabulary and context) and the rules between fields that the handlers
//! check (`stream_options` only when streaming, `top_logprobs` only with `logprobs`, one of
//! `messages` or `prompt`, the OpenAI fields accepted only at their neutral value). Each rule
//! here names the handler check it states, so that a client that follows the document is never
//! refused by a rule it could not read. One rule cannot be stated in JSON Schema and is only in
//! the descriptions: the prompt and `max_tokens` together fit the context.

use model::Limits;
use rl_http::server::{limit_token_ids, schema_of};
use serde_json::{json, Value};

/// Applies every rule to `doc` (the service's document as JSON): the model's `limits` and this
/// server's `--max-n`.
pub fn state_rules(doc: &mut Value, limits: Limits, max_n: u32) {
    limit_token_ids(doc, limits.vocab);
    // A completion leaves room for at least one prompt token (`GenerateRequest::new`).
    if let Some(m) = schema_of(doc, "MaxTokens") {
        m["maximum"] = json!(limits.context.saturating_sub(1).max(1));
    }
    for schema in ["GenerateRequest", "CompletionRequest", "ChatRequest"] {
        if let Some(s) = schema_of(doc, schema) {
            // `AppState::rows`: n in 1..=--max-n.
            s["properties"]["n"]["maximum"] = json!(max_n);
        }
    }
    if let Some(ids) = schema_of(doc, "GenerateRequest").map(|s| &mut s["properties"]["prompt_ids"])
    {
        ids["maxItems"] = json!(limits.context.saturating_sub(1).max(1));
    }
    for schema in ["CompletionRequest", "ChatRequest"] {
        if let Some(s) = schema_of(doc, schema) {
            openai_rules(s);
        }
    }
    if let Some(s) = schema_of(doc, "ChatRequest") {
        // `chat`: `top_logprobs` above 0 needs `logprobs: true`; only text `response_format`;
        // no `tools`.
        add_rule(
            s,
            json!({"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
                   "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": true}}}}),
        );
        s["properties"]["tools"] =
            json!({"type": "null", "description": "Only null: tools are not supported."});
        s["properties"]["response_format"] = json!({"oneOf": [{"type": "null"}, {
            "type": "object", "required": ["type"], "properties": {"type": {"const": "text"}},
            "additionalProperties": false}], "description": "Only {\"type\": \"text\"}."});
    }
    if let Some(s) = schema_of(doc, "CompletionRequest") {
        // `CompletionRequest::refused`: no echo, no suffix (best_of: its type says only 1).
        s["properties"]["echo"] =
            json!({"oneOf": [{"const": false}, {"type": "null"}], "description": "Only false."});
        s["properties"]["suffix"] =
            json!({"type": ["string", "null"], "maxLength": 0, "description": "Only empty."});
    }
    if let Some(s) = schema_of(doc, "TokenizeRequest") {
        // `tokenize`: exactly one of `messages` or `prompt`.
        add_rule(
            s,
            json!({"oneOf": [
                {"required": ["messages"], "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}}},
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}}}]}),
        );
    }
    if let Some(one_or_many) = schema_of(doc, "OneOrMany") {
        // `stop_strings`: at most 4, none empty.
        *one_or_many = json!({"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": sampling::MAX_STOP}],
            "description": "A string or a list of at most 4; none empty."});
    }
}

/// The rules both OpenAI requests share (`refused_common`): `stream_options` only with
/// `stream: true`; penalties only 0; `logit_bias` only empty.
fn openai_rules(s: &mut Value) {
    add_rule(
        s,
        json!({"if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
               "then": {"required": ["stream"], "properties": {"stream": {"const": true}}}}),
    );
    for penalty in ["presence_penalty", "frequency_penalty"] {
        s["properties"][penalty] =
            json!({"oneOf": [{"const": 0}, {"type": "null"}], "description": "Only 0."});
    }
    s["properties"]["logit_bias"] =
        json!({"type": ["object", "null"], "maxProperties": 0, "description": "Only {}."});
}

/// Adds `rule` to an object schema's constraints (all of them hold).
fn add_rule(schema: &mut Value, rule: Value) {
    match schema.get_mut("allOf").and_then(Value::as_array_mut) {
        Some(all) => all.push(rule),
        None => schema["allOf"] = json!([rule]),
    }
}
