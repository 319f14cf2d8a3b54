//! The rollout server over real HTTP on 127.0.0.1, with the tiny model: every route, batching of
//! concurrent clients, the bounded queue, and every bad input with its status and message (the
//! adapter routes are in `adapters.rs`).

mod common;

use std::time::Duration;

use common::*;
use rl_core::wire::{FinishReason, GenerateRequest};
use rl_http::client::{RetryPolicy, ServiceClient};
use serde_json::json;

fn gen_body(prompt: &[u32], n: u32, seed: u64) -> serde_json::Value {
    json!({"prompt_ids": prompt, "n": n, "max_tokens": 12, "temperature": 1.0, "seed": seed})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_answer_in_their_shapes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(load(&tiny_model_dir(dir.path())), opts()).await;
    let url = &server.url;

    // Native generate: seeded, n choices with seeds seed..seed+n, ids in the vocabulary.
    let prompt = [1u32, 40, 41, 42, 43];
    let (status, a) = post(&format!("{url}/v1/generate"), &gen_body(&prompt, 3, 7)).await;
    assert_eq!(status, 200, "{a}");
    let (_, b) = post(&format!("{url}/v1/generate"), &gen_body(&prompt, 3, 7)).await;
    assert_eq!(a["choices"], b["choices"], "same seed, same choices");
    let (_, c) = post(&format!("{url}/v1/generate"), &gen_body(&prompt, 3, 8)).await;
    assert_ne!(a["choices"], c["choices"], "another seed, other choices");
    let choices = a["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3);
    for (i, ch) in choices.iter().enumerate() {
        assert_eq!(ch["seed"], json!(7 + i as u64));
        let ids = ch["token_ids"].as_array().expect("ids");
        assert_eq!(ids.len(), ch["logprobs"].as_array().expect("lps").len());
        assert!(ids.iter().all(|t| t.as_u64().is_some_and(|t| t < 96)));
        assert!(ch["logprobs"]
            .as_array()
            .expect("lps")
            .iter()
            .all(|l| l.as_f64().is_some_and(|l| l <= 0.0)));
        let reason = ch["finish_reason"].as_str().expect("reason");
        assert!(
            reason == "length" && ids.len() == 12
                || reason == "stop" && ids.last() == Some(&json!(2))
        );
    }
    // Choice 1 of seed 7 is choice 0 of seed 8: each choice has its own seed.
    assert_eq!(a["choices"][1]["token_ids"], c["choices"][0]["token_ids"]);

    // Tokenize a chat and complete it greedily through three routes: the same tokens.
    let messages = json!([{"role": "user", "content": "Add 2 and 3."}]);
    let (status, tok) = post(
        &format!("{url}/v1/tokenize"),
        &json!({"messages": messages}),
    )
    .await;
    assert_eq!(status, 200, "{tok}");
    assert_eq!(
        tok["text"],
        json!("<s>user\nAdd 2 and 3.</s>\n<s>assistant\n")
    );
    let ids: Vec<u32> = serde_json::from_value(tok["tokens"].clone()).expect("ids");
    assert_eq!(ids[0], 1, "<s> is one special token");
    let greedy = json!({"prompt_ids": ids, "max_tokens": 10, "temperature": 0.0});
    let (_, native) = post(&format!("{url}/v1/generate"), &greedy).await;
    let chat_body = json!({"model": "tiny", "messages": messages, "max_tokens": 10, "temperature": 0,
                           "logprobs": true, "top_logprobs": 3, "return_token_ids": true});
    let (status, chat) = post(&format!("{url}/v1/chat/completions"), &chat_body).await;
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["prompt_token_ids"], tok["tokens"]);
    let chat_ids = &chat["choices"][0]["token_ids"];
    assert_eq!(chat_ids, &native["choices"][0]["token_ids"]);
    let content = chat["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content");
    for (k, entry) in content.iter().enumerate() {
        assert_eq!(entry["token_id"], chat_ids[k]);
        assert_eq!(entry["logprob"], native["choices"][0]["logprobs"][k]);
        let top = entry["top_logprobs"].as_array().expect("top");
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["logprob"], entry["logprob"]);
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
    }
    assert_eq!(chat["usage"]["completion_tokens"], json!(content.len()));
    let text = chat["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    assert_eq!(Some(text), native["choices"][0]["text"].as_str());

    let completion = json!({"prompt": tok["text"], "max_tokens": 10, "temperature": 0, "logprobs": 2,
                            "return_token_ids": true, "n": 2});
    let (status, comp) = post(&format!("{url}/v1/completions"), &completion).await;
    assert_eq!(status, 200, "{comp}");
    assert_eq!(comp["choices"].as_array().map(Vec::len), Some(2));
    assert_eq!(comp["choices"][0]["token_ids"], *chat_ids);
    assert_eq!(
        comp["choices"][0]["logprobs"]["top_logprobs"][0]
            .as_object()
            .map(|m| m.len() <= 2),
        Some(true)
    );
    assert_eq!(comp["choices"][0]["text"].as_str(), Some(text));

    // A stop string cuts the text before it and ends the choice with `stop`.
    let sampled = json!({"prompt": "<s>user\nHi</s>\n<s>assistant\n", "max_tokens": 24, "temperature": 1.0,
                         "seed": 5, "stop_token_ids": []});
    let (_, free) = post(&format!("{url}/v1/completions"), &sampled).await;
    let free_text = free["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_string();
    let cut = free_text.chars().nth(8).expect("a long enough sample");
    let expected = &free_text[..free_text.find(cut).expect("in text")];
    let mut with_stop = sampled.clone();
    with_stop["stop"] = json!([cut.to_string()]);
    let (status, stopped) = post(&format!("{url}/v1/completions"), &with_stop).await;
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(
        stopped["choices"][0]["text"].as_str(),
        Some(expected),
        "sample {free_text:?}, stop {cut:?}"
    );
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    assert_eq!(free["choices"][0]["finish_reason"], "length");

    let (status, models) = get_text(&format!("{url}/v1/models")).await;
    assert_eq!(status, 200);
    assert!(models.contains("\"id\":\"tiny\""), "{models}");
    let (status, health) = get_text(&format!("{url}/health")).await;
    assert_eq!((status, health.contains("\"status\":\"ok\"")), (200, true));
    // The document is derived from the router: every documented operation answers, no other
    // method does, and the request types are documented as they are parsed.
    let (doc, problems) = test_kit::contract::check_contract(url, None)
        .await
        .expect("contract");
    assert!(problems.is_empty(), "{problems:#?}");
    let documented: Vec<String> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(p, item)| {
            item.as_object()
                .into_iter()
                .flat_map(|o| o.keys())
                .map(move |m| format!("{m} {p}"))
        })
        .collect();
    for route in [
        "post /v1/completions",
        "post /v1/chat/completions",
        "post /v1/generate",
        "post /v1/tokenize",
        "get /v1/models",
        "post /v1/adapters",
        "delete /v1/adapters",
        "get /health",
        "get /metrics",
        "get /openapi.json",
    ] {
        assert!(
            documented.contains(&route.to_string()),
            "{route} not in {documented:?}"
        );
    }
    let schemas = &doc["components"]["schemas"];
    let completion = &schemas["CompletionRequest"];
    assert_eq!(completion["additionalProperties"], false, "{completion}");
    for field in [
        "prompt",
        "best_of",
        "suffix",
        "user",
        "stream",
        "stream_options",
        "logit_bias",
        "stop_token_ids",
    ] {
        assert!(
            completion["properties"][field].is_object(),
            "CompletionRequest.{field}"
        );
    }
    // Limits come from the code that enforces them: --max-n of this server, the OpenAI caps.
    assert_eq!(
        completion["properties"]["n"]["maximum"], 128,
        "{completion}"
    );
    assert_eq!(
        completion["properties"]["logprobs"]["maximum"],
        sampling::MAX_COMPLETION_LOGPROBS
    );
    assert_eq!(
        schemas["ChatRequest"]["properties"]["top_logprobs"]["maximum"],
        sampling::MAX_TOP_LOGPROBS
    );
    assert_eq!(
        schemas["GenerateRequest"]["properties"]["n"]["maximum"],
        128
    );
    // The model's limits and the rules between fields, as the one check holds them.
    assert_eq!(schemas["TokenId"]["maximum"], 95, "the tiny vocabulary");
    assert_eq!(
        schemas["MaxTokens"]["maximum"], 127,
        "room for a one-token prompt"
    );
    let chat = schemas["ChatRequest"]["allOf"].to_string();
    assert!(
        chat.contains("top_logprobs") && chat.contains("stream_options"),
        "{chat}"
    );
    assert_eq!(
        schemas["TokenizeRequest"]["allOf"][0]["oneOf"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    // Chat content is a string or a list of text parts.
    let content = schemas["ChatMessageIn"]["properties"]["content"].to_string();
    assert!(content.contains("Content"), "{content}");
    assert!(
        schemas["Content"].to_string().contains("ContentPart"),
        "{}",
        schemas["Content"]
    );
    // Every error answer has the error body; without a key, none is asked for.
    let generate = &doc["paths"]["/v1/generate"]["post"]["responses"];
    assert!(
        generate["401"].is_null() && doc["security"].is_null(),
        "{doc}"
    );
    for status in ["400", "413", "422", "503"] {
        assert!(
            generate[status]["content"]["application/json"]["schema"]["$ref"]
                .as_str()
                .is_some_and(|r| r.ends_with("/ErrorBody")),
            "{status}: {generate}"
        );
    }
    let (_, metrics) = get_text(&format!("{url}/metrics")).await;
    assert!(metric(&metrics, "rollout_generated_tokens_total") > 0.0);
    assert!(
        metrics.contains("rollout_http_requests_total{route=\"/v1/generate\",status=\"200\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_are_batched_and_the_queue_is_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_model_dir(dir.path());
    let server = start(load(&model), opts()).await;
    let http = reqwest::Client::new();
    let body = json!({"prompt_ids": [1, 50, 51, 52], "max_tokens": 24, "temperature": 0.0, "stop_token_ids": []});
    let mut handles = Vec::new();
    for _ in 0..32 {
        let (http, url, body) = (
            http.clone(),
            format!("{}/v1/generate", server.url),
            body.clone(),
        );
        handles.push(tokio::spawn(async move {
            let r = http.post(url).json(&body).send().await.expect("send");
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.expect("json"),
            )
        }));
    }
    let mut answers = Vec::new();
    for h in handles {
        let (status, v) = h.await.expect("join");
        assert_eq!(status, 200, "{v}");
        answers.push(v["choices"][0]["token_ids"].clone());
    }
    assert_eq!(answers.len(), 32);
    assert!(answers
        .iter()
        .all(|a| a == &answers[0] && a.as_array().map(Vec::len) == Some(24)));
    let (_, metrics) = get_text(&format!("{}/metrics", server.url)).await;
    let batches = metric(&metrics, "rollout_batches_total");
    assert!(
        batches < 32.0,
        "32 concurrent requests were decoded in {batches} batches: no batching"
    );
    drop(server);

    // A queue of 4: a burst of 64 gets 503s with Retry-After; every accepted request completes.
    let server = start(
        load(&model),
        rollout_server::Options {
            max_queue: 4,
            ..opts()
        },
    )
    .await;
    let body = json!({"prompt_ids": [1, 50, 51, 52], "max_tokens": 64, "temperature": 1.0, "seed": 3, "stop_token_ids": []});
    let mut handles = Vec::new();
    for _ in 0..64 {
        let (http, url, body) = (
            http.clone(),
            format!("{}/v1/generate", server.url),
            body.clone(),
        );
        handles.push(tokio::spawn(async move {
            let r = http.post(url).json(&body).send().await.expect("send");
            let retry_after = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            (
                r.status().as_u16(),
                retry_after,
                r.json::<serde_json::Value>().await.expect("json"),
            )
        }));
    }
    let (mut ok, mut full) = (0, 0);
    for h in handles {
        let (status, retry_after, v) = h.await.expect("join");
        match status {
            200 => {
                ok += 1;
                assert_eq!(
                    v["choices"][0]["token_ids"].as_array().map(Vec::len),
                    Some(64),
                    "{v}"
                );
            }
            503 => {
                full += 1;
                assert!(retry_after
                    .as_deref()
                    .and_then(|s| s.parse::<u64>().ok())
                    .is_some_and(|s| s >= 1));
                assert!(
                    v["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("queue is full")),
                    "{v}"
                );
                assert_eq!(v["error"]["type"], "overloaded_error");
            }
            other => panic!("status {other}: {v}"),
        }
    }
    assert_eq!(ok + full, 64);
    assert!(full > 0 && ok >= 4, "{ok} accepted, {full} refused");
    let (_, metrics) = get_text(&format!("{}/metrics", server.url)).await;
    assert!(
        metric(&metrics, "rollout_queue_depth_max") <= 4.0,
        "the queue outgrew its bound"
    );
    assert_eq!(metric(&metrics, "rollout_queue_depth"), 0.0);
    assert_eq!(
        metric(&metrics, "rollout_rejected_full_total"),
        f64::from(full)
    );
    let rss = metric(&metrics, "process_resident_memory_bytes");
    assert!(rss > 0.0 && rss < 4e9, "rss {rss}");
    // The matmul backend of this process (the server runs in it): oneDNN with its ISA, or
    // candle's f32 gemm when MATMUL_BACKEND=native.
    let want = match model::onednn::library().expect("MATMUL_BACKEND") {
        Some(lib) => format!(
            "rollout_matmul_backend_info{{kernels=\"onednn\",isa=\"{}\"}} 1",
            lib.isa()
        ),
        None => "rollout_matmul_backend_info{kernels=\"candle\",isa=\"none\"} 1".to_string(),
    };
    assert!(
        metrics.lines().any(|l| l == want),
        "{want} not in\n{metrics}"
    );

    // The typed client waits out the 503s (Retry-After) and gets every answer.
    let client = ServiceClient::new(&server.url, None, Duration::from_secs(60))
        .expect("client")
        .with_retry(RetryPolicy {
            max_attempts: 200,
            max_wait: Duration::from_secs(120),
            max_delay: Duration::from_secs(1),
            retry_unreachable: false,
        });
    let req: GenerateRequest = serde_json::from_value(body).expect("request");
    let mut handles = Vec::new();
    for _ in 0..16 {
        let (c, r) = (client.clone(), req.clone());
        handles.push(tokio::spawn(async move { c.generate(&r).await }));
    }
    for h in handles {
        let r = h
            .await
            .expect("join")
            .expect("the client retried until accepted");
        assert_eq!(r.choices[0].token_ids.len(), 64);
        assert_eq!(r.choices[0].finish_reason, FinishReason::Length);
    }
}

/// Every bad input: (what, method, path, body, expected status, fragment of the message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_their_status_and_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_model_dir(dir.path());
    let ckpts = dir.path().join("checkpoints");
    std::fs::create_dir_all(ckpts.join("empty")).expect("mkdir");
    // An adapter made for another base model (hidden size 64 instead of 32).
    let mut other = load(&model).config().clone();
    other.hidden_size = 64;
    let foreign = model::LoraAdapter::init(
        model::LoraConfig::new(4, 8.0, vec![model::Proj::Q, model::Proj::V]),
        &other,
        1,
        &candle_core::Device::Cpu,
    )
    .expect("foreign adapter");
    foreign.save(&ckpts.join("foreign")).expect("save foreign");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");

    let opts = rollout_server::Options {
        checkpoints_dir: Some(ckpts.clone()),
        max_body_bytes: 4096,
        max_n: 8,
        ..opts()
    };
    let server = start(load(&model), opts).await;
    let http = reqwest::Client::new();
    let g = "/v1/generate";
    let long_prompt: Vec<u32> = vec![5; 120];
    let huge: Vec<u32> = vec![5; 3000];
    let cases: Vec<(&str, &str, &str, String, u16, &str)> = vec![
        ("invalid JSON", "POST", g, "{\"prompt_ids\": [1,".into(), 400, "not valid JSON"),
        ("unknown field", "POST", g, json!({"prompt_ids": [1], "max_tokens": 4, "temprature": 1}).to_string(), 422, "unknown field `temprature`"),
        ("wrong type", "POST", g, json!({"prompt_ids": "hello", "max_tokens": 4}).to_string(), 422, "`prompt_ids`"),
        ("n over the limit", "POST", g, json!({"prompt_ids": [1], "max_tokens": 4, "n": 9}).to_string(), 422, "`n` is 9; it must be in 1..=8"),
        ("n zero", "POST", g, json!({"prompt_ids": [1], "max_tokens": 4, "n": 0}).to_string(), 422, "`n` is 0"),
        ("max_tokens over the context", "POST", g, json!({"prompt_ids": [1, 2], "max_tokens": 500}).to_string(), 422, "over the model's context of 128"),
        ("max_tokens zero", "POST", g, json!({"prompt_ids": [1], "max_tokens": 0}).to_string(), 422, "`max_tokens` is 0; it must be in 1..="),
        ("negative temperature", "POST", g, json!({"prompt_ids": [1], "max_tokens": 4, "temperature": -0.5}).to_string(), 422, "`temperature` is -0.5"),
        ("top_p zero", "POST", g, json!({"prompt_ids": [1], "max_tokens": 4, "top_p": 0.0}).to_string(), 422, "`top_p` is 0"),
        ("top_p above one", "POST", g, json!({"prompt_ids": [1], "max_tokens": 4, "top_p": 1.5}).to_string(), 422, "(0, 1]"),
        ("prompt longer than the context", "POST", g, json!({"prompt_ids": long_prompt, "max_tokens": 16}).to_string(), 422, "send a shorter prompt or max_tokens <= 8"),
        ("empty prompt", "POST", g, json!({"prompt_ids": [], "max_tokens": 4}).to_string(), 422, "`prompt_ids` is empty"),
        ("token id out of vocabulary", "POST", g, json!({"prompt_ids": [1, 96], "max_tokens": 4}).to_string(), 422, "token id 96, outside the vocabulary"),
        ("stop id out of vocabulary", "POST", g, json!({"prompt_ids": [1], "max_tokens": 4, "stop_token_ids": [500]}).to_string(), 422, "`stop_token_ids` has token id 500"),
        ("body over the limit", "POST", g, json!({"prompt_ids": huge, "max_tokens": 4}).to_string(), 413, "over the server's limit"),
        ("empty completion prompt", "POST", "/v1/completions", json!({"prompt": ""}).to_string(), 422, "`prompt` is empty"),
        ("stream options without streaming", "POST", "/v1/completions", json!({"prompt": "hi", "stream_options": {"include_usage": true}}).to_string(), 422, "`stream_options` is only allowed with stream: true"),
        ("unknown stream option", "POST", "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"continuous": true}}).to_string(), 422, "continuous"),
        ("too many logprobs", "POST", "/v1/completions", json!({"prompt": "hi", "logprobs": 9}).to_string(), 422, "`logprobs` is 9"),
        ("unknown model", "POST", "/v1/completions", json!({"prompt": "hi", "model": "gpt-4"}).to_string(), 404, "model `gpt-4` is not served"),
        ("empty messages", "POST", "/v1/chat/completions", json!({"messages": []}).to_string(), 422, "`messages` is empty"),
        ("top_logprobs without logprobs", "POST", "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}).to_string(), 422, "needs `logprobs: true`"),
        ("chat n over the limit", "POST", "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "n": 100, "max_tokens": 2}).to_string(), 422, "`n` is 100"),
        ("chat negative temperature", "POST", "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "temperature": -1, "max_tokens": 2}).to_string(), 422, "`temperature` is -1"),
        ("a fractional token id", "POST", g, json!({"prompt_ids": [1, 2.5], "max_tokens": 4}).to_string(), 422, "an integer in 0..=4294967295"),
        ("a non-text content part", "POST", "/v1/chat/completions", json!({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}], "max_tokens": 2}).to_string(), 422, "has a `image_url` part; only text parts"),
        ("an empty adapter path", "POST", "/v1/adapters", json!({"path": ""}).to_string(), 422, "`path` is empty"),
        ("adapter outside the checkpoints dir", "POST", "/v1/adapters", json!({"path": outside.display().to_string()}).to_string(), 403, "outside the checkpoints directory"),
        ("adapter path escaping with ..", "POST", "/v1/adapters", json!({"path": "../outside"}).to_string(), 403, "outside the checkpoints directory"),
        ("adapter that does not exist", "POST", "/v1/adapters", json!({"path": "nope"}).to_string(), 404, "does not exist"),
        ("adapter folder without files", "POST", "/v1/adapters", json!({"path": "empty"}).to_string(), 404, "adapter_config.json"),
        ("adapter for another base", "POST", "/v1/adapters", json!({"path": "foreign"}).to_string(), 422, "shape"),
        ("unknown route", "GET", "/v1/nothing", String::new(), 404, "no route `GET /v1/nothing`"),
        ("wrong method", "GET", g, String::new(), 405, "does not accept GET"),
    ];
    let mut failures = Vec::new();
    for (what, method, path, body, status, fragment) in &cases {
        let url = format!("{}{path}", server.url);
        let rb = if *method == "GET" {
            http.get(&url)
        } else {
            http.post(&url)
                .header("content-type", "application/json")
                .body(body.clone())
        };
        let r = rb.send().await.expect("send");
        let got = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap_or(serde_json::Value::Null);
        let message = v["error"]["message"].as_str().unwrap_or("");
        if got != *status || !message.contains(fragment) || v["error"]["type"].as_str().is_none() {
            failures.push(format!(
                "{what}: got {got} {v}, expected {status} with `{fragment}`"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Integers as JSON Schema has them: `50.0` is 50, everywhere an integer is read.
    let ask = |body: serde_json::Value| {
        let (http, url) = (http.clone(), format!("{}{g}", server.url));
        async move {
            let r = http.post(url).json(&body).send().await.expect("send");
            assert_eq!(r.status().as_u16(), 200);
            r.json::<serde_json::Value>().await.expect("json")["choices"].clone()
        }
    };
    let floats = ask(json!({"prompt_ids": [1.0, 50.0], "max_tokens": 4.0, "n": 2.0, "seed": 3.0, "top_k": 5.0, "stop_token_ids": [2.0]})).await;
    let ints = ask(json!({"prompt_ids": [1, 50], "max_tokens": 4, "n": 2, "seed": 3, "top_k": 5, "stop_token_ids": [2]})).await;
    assert_eq!(floats, ints);
    // The refused adapter left the base model in place.
    let (_, health) = get_text(&format!("{}/health", server.url)).await;
    assert!(health.contains("\"adapter\":null"), "{health}");
    drop(server);

    // Keys: missing and wrong are 401; /health stays open.
    let server = start(
        load(&model),
        rollout_server::Options {
            api_key: Some("s3cret".into()),
            ..common::opts()
        },
    )
    .await;
    let body = json!({"prompt_ids": [1], "max_tokens": 2});
    let r = http
        .post(format!("{}{g}", server.url))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.text().await.expect("body").contains("missing API key"));
    let r = http
        .post(format!("{}{g}", server.url))
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.text().await.expect("body").contains("wrong API key"));
    let r = http
        .post(format!("{}{g}", server.url))
        .bearer_auth("s3cret")
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        reqwest::get(format!("{}/health", server.url))
            .await
            .expect("health")
            .status()
            .as_u16(),
        200
    );
    // With a key, the document asks for it where the server checks it (and only there).
    let (_, doc) = get_text(&format!("{}/openapi.json", server.url)).await;
    let doc: serde_json::Value = serde_json::from_str(&doc).expect("document");
    assert_eq!(doc["security"], json!([{"bearer": []}]), "{doc}");
    let paths = &doc["paths"];
    assert!(paths["/v1/generate"]["post"]["responses"]["401"].is_object());
    assert_eq!(paths["/health"]["get"]["security"], json!([]));
    // Adapter loading without a checkpoints directory is off.
    let r = http
        .post(format!("{}/v1/adapters", server.url))
        .bearer_auth("s3cret")
        .json(&json!({"path": "x"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.text().await.expect("body").contains("--checkpoints-dir"));
}
