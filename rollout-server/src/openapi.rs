//! The OpenAPI 3.1 document served at `GET /openapi.json`: every route with its request and
//! response shapes (a test checks that the router and this list agree).

use serde_json::{json, Value};

/// `(method, path, summary)` of every route.
pub const ROUTES: &[(&str, &str, &str)] = &[
    (
        "post",
        "/v1/completions",
        "OpenAI text completion (prompt as text or token ids)",
    ),
    (
        "post",
        "/v1/chat/completions",
        "OpenAI chat completion (rendered with the model's chat template)",
    ),
    (
        "post",
        "/v1/generate",
        "Native: sample n continuations of a token-id prompt, with per-token logprobs",
    ),
    (
        "post",
        "/v1/tokenize",
        "Render chat messages (or take a prompt) and return token ids",
    ),
    ("get", "/v1/models", "The served model"),
    (
        "post",
        "/v1/adapters",
        "Load a PEFT LoRA adapter from inside the checkpoints directory",
    ),
    (
        "delete",
        "/v1/adapters",
        "Unload the adapter (serve the base model)",
    ),
    ("get", "/health", "Liveness, model and adapter"),
    ("get", "/metrics", "Prometheus metrics"),
    ("get", "/openapi.json", "This document"),
];

/// The label of a path for the request counter (unknown paths share one label).
pub fn route_label(path: &str) -> &'static str {
    ROUTES
        .iter()
        .find(|(_, p, _)| *p == path)
        .map_or("other", |(_, p, _)| p)
}

fn error_responses() -> Value {
    let e = json!({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    json!({
        "400": {"description": "Invalid JSON", "content": e["content"]},
        "401": {"description": "Missing or wrong API key", "content": e["content"]},
        "413": {"description": "Body over the limit", "content": e["content"]},
        "422": {"description": "A field is wrong; the message names it", "content": e["content"]},
        "503": {"description": "Queue full; retry after the Retry-After header", "content": e["content"]},
    })
}

fn body(schema: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn ok(schema: &str) -> Value {
    json!({"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

/// The document.
pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for (method, path, summary) in ROUTES {
        let (request, response) = match (*method, *path) {
            ("post", "/v1/completions") => (Some("CompletionRequest"), "CompletionResponse"),
            ("post", "/v1/chat/completions") => (Some("ChatRequest"), "ChatResponse"),
            ("post", "/v1/generate") => (Some("GenerateRequest"), "GenerateResponse"),
            ("post", "/v1/tokenize") => (Some("TokenizeRequest"), "TokenizeResponse"),
            ("post", "/v1/adapters") => (Some("AdapterRequest"), "AdapterResponse"),
            ("delete", "/v1/adapters") => (None, "AdapterResponse"),
            ("get", "/health") => (None, "Health"),
            _ => (None, "Any"),
        };
        let mut responses = error_responses();
        responses["200"] = ok(response);
        let mut op = json!({"summary": summary, "responses": responses});
        if let Some(r) = request {
            op["requestBody"] = body(r);
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = op;
    }
    let ids = json!({"type": "array", "items": {"type": "integer", "minimum": 0}});
    let sampling = json!({
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "default": 1.0},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1.0},
        "top_k": {"type": "integer", "minimum": 0, "default": 0},
        "n": {"type": "integer", "minimum": 1, "default": 1},
        "seed": {"type": "integer", "minimum": 0},
        "stop_token_ids": ids,
    });
    let with = |extra: Value| {
        let mut props = sampling.clone();
        if let (Some(p), Some(e)) = (props.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                p.insert(k.clone(), v.clone());
            }
        }
        props
    };
    let string_or_list = json!({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "rollout-server",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Samples completions with per-token logprobs from the current policy (base model + LoRA adapter). Errors are {\"error\": {\"message\", \"type\"}}."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {"message": {"type": "string"}, "type": {"type": "string"}}}}},
                "Any": {},
                "CompletionRequest": {"type": "object", "additionalProperties": false, "required": ["prompt"], "properties": with(json!({
                    "model": {"type": "string"},
                    "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, ids, {"type": "array", "items": ids}]},
                    "stop": string_or_list,
                    "logprobs": {"type": "integer", "minimum": 0, "maximum": 5},
                    "return_token_ids": {"type": "boolean"},
                    "echo": {"type": "boolean", "enum": [false]},
                    "stream": {"type": "boolean", "enum": [false]}
                }))},
                "ChatRequest": {"type": "object", "additionalProperties": false, "required": ["messages"], "properties": with(json!({
                    "model": {"type": "string"},
                    "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role", "content"], "properties": {"role": {"type": "string"}, "content": {"type": "string"}}}},
                    "max_completion_tokens": {"type": "integer", "minimum": 1},
                    "stop": string_or_list,
                    "logprobs": {"type": "boolean"},
                    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
                    "return_token_ids": {"type": "boolean"},
                    "stream": {"type": "boolean", "enum": [false]}
                }))},
                "GenerateRequest": {"type": "object", "additionalProperties": false, "required": ["prompt_ids", "max_tokens"], "properties": with(json!({"prompt_ids": ids}))},
                "TokenizeRequest": {"type": "object", "additionalProperties": false, "properties": {
                    "messages": {"type": "array", "items": {"type": "object", "properties": {"role": {"type": "string"}, "content": {"type": "string"}}}},
                    "prompt": {"type": "string"},
                    "add_generation_prompt": {"type": "boolean", "default": true}
                }},
                "AdapterRequest": {"type": "object", "additionalProperties": false, "required": ["path"], "properties": {"path": {"type": "string", "description": "A folder inside --checkpoints-dir (relative to it, or absolute)"}}},
                "CompletionResponse": {"type": "object", "properties": {"id": {"type": "string"}, "object": {"type": "string"}, "model": {"type": "string"}, "choices": {"type": "array"}, "usage": {"type": "object"}}},
                "ChatResponse": {"type": "object", "properties": {"id": {"type": "string"}, "object": {"type": "string"}, "model": {"type": "string"}, "choices": {"type": "array"}, "usage": {"type": "object"}, "prompt_token_ids": ids}},
                "GenerateResponse": {"type": "object", "properties": {"model": {"type": "string"}, "adapter": {"type": ["string", "null"]}, "choices": {"type": "array", "items": {"type": "object", "properties": {
                    "index": {"type": "integer"}, "token_ids": ids, "logprobs": {"type": "array", "items": {"type": "number"}},
                    "text": {"type": ["string", "null"]}, "finish_reason": {"enum": ["stop", "length"]}, "seed": {"type": "integer"}
                }}}}},
                "TokenizeResponse": {"type": "object", "properties": {"tokens": ids, "text": {"type": "string"}}},
                "AdapterResponse": {"type": "object", "properties": {"adapter": {"type": ["string", "null"]}, "swap_ms": {"type": "number"}}},
                "Health": {"type": "object", "properties": {"status": {"type": "string"}, "model": {"type": "string"}, "adapter": {"type": ["string", "null"]}}}
            }
        },
        "security": [{"bearer": []}],
        "paths": paths,
    })
}
