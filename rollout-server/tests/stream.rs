//! `stream: true` through a real server on 127.0.0.1, read as an SSE client reads it: the
//! streamed text, logprobs and finish reasons of every choice equal the non-streamed answer for
//! the same seed (completions and chat, with and without stop strings, with the usage chunk);
//! and a client that goes away mid-answer frees its rows (SmolLM2: the queue is empty again long
//! before the rows could have finished).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// POSTs a streamed request and returns its SSE data fields in order (the JSON chunks, and the
/// final `[DONE]` as a string).
async fn stream(url: &str, body: &Value) -> Vec<Value> {
    let r = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let text = r.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or_else(|_| Value::String(d.to_string())))
        .collect()
}

/// One choice assembled from chunks, in the non-streamed answer's shape.
#[derive(Debug, Default, PartialEq)]
struct Assembled {
    text: String,
    finish_reason: Option<String>,
    /// Completions: tokens, token_logprobs, top_logprobs, text_offset; chat: logprobs.content.
    logprobs: Vec<Vec<Value>>,
}

fn assemble(chunks: &[Value], chat: bool, n: usize) -> Vec<Assembled> {
    assert_eq!(
        chunks.last(),
        Some(&json!("[DONE]")),
        "[DONE] ends the stream"
    );
    let mut out: Vec<Assembled> = (0..n).map(|_| Assembled::default()).collect();
    let id = &chunks[0]["id"];
    for c in &chunks[..chunks.len() - 1] {
        assert_eq!(&c["id"], id, "one id for every chunk");
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        assert_eq!(c["object"], object);
        for ch in c["choices"].as_array().unwrap() {
            let a = &mut out[ch["index"].as_u64().unwrap() as usize];
            assert!(a.finish_reason.is_none(), "nothing after a choice's finish");
            let (text, lps) = if chat {
                (&ch["delta"]["content"], &ch["logprobs"]["content"])
            } else {
                (&ch["text"], &ch["logprobs"])
            };
            a.text.push_str(text.as_str().unwrap_or(""));
            if chat {
                if let Some(entries) = lps.as_array() {
                    a.logprobs.resize(1, vec![]);
                    a.logprobs[0].extend(entries.iter().cloned());
                }
            } else if lps.is_object() {
                a.logprobs.resize(4, vec![]);
                for (k, key) in ["tokens", "token_logprobs", "top_logprobs", "text_offset"]
                    .iter()
                    .enumerate()
                {
                    match lps[key].as_array() {
                        Some(v) => a.logprobs[k].extend(v.iter().cloned()),
                        // `top_logprobs: null` (not asked for): once for the choice, as the
                        // non-streamed answer has it.
                        None if a.logprobs[k].is_empty() => a.logprobs[k].push(lps[key].clone()),
                        None => assert!(lps[key].is_null()),
                    }
                }
            }
            a.finish_reason = ch["finish_reason"].as_str().map(str::to_string);
        }
    }
    out
}

/// The non-streamed answer's choices, in the same shape.
fn expected(answer: &Value, chat: bool) -> Vec<Assembled> {
    answer["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ch| {
            let logprobs = if chat {
                ch["logprobs"]["content"]
                    .as_array()
                    .map(|v| vec![v.clone()])
                    .unwrap_or_default()
            } else if ch["logprobs"].is_object() {
                ["tokens", "token_logprobs", "top_logprobs", "text_offset"]
                    .iter()
                    .map(|key| match ch["logprobs"][key].as_array() {
                        Some(v) => v.clone(),
                        None => vec![ch["logprobs"][key].clone()],
                    })
                    .collect()
            } else {
                vec![]
            };
            Assembled {
                text: if chat {
                    ch["message"]["content"].as_str().unwrap().to_string()
                } else {
                    ch["text"].as_str().unwrap().to_string()
                },
                finish_reason: Some(ch["finish_reason"].as_str().unwrap().to_string()),
                logprobs,
            }
        })
        .collect()
}

#[tokio::test]
async fn streamed_answers_equal_the_non_streamed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(load(&tiny_model_dir(dir.path())), opts()).await;
    let cases = [
        (
            "/v1/completions",
            json!({"prompt": "Add 2 and 3.", "max_tokens": 40, "n": 3, "seed": 11,
                   "temperature": 1.0, "logprobs": 2}),
        ),
        (
            "/v1/completions",
            // Stop strings the tiny model's text meets: the choices end at them.
            json!({"prompt": "Count: a b c", "max_tokens": 60, "n": 4, "seed": 5,
                   "temperature": 1.0, "logprobs": 0, "stop": ["e", "a", "o", "xy"], "stop_token_ids": []}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Add 2 and 3."}], "max_tokens": 30,
                   "n": 2, "seed": 3, "temperature": 0.8, "logprobs": true, "top_logprobs": 2}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50,
                   "seed": 9, "stop": ["b"], "stream_options": {"include_usage": true}}),
        ),
    ];
    let mut stopped = 0;
    for (route, body) in cases {
        let chat = route.contains("chat");
        let n = body["n"].as_u64().unwrap_or(1) as usize;
        let url = format!("{}{route}", server.url);
        let mut plain = body.clone();
        if let Some(o) = plain.as_object_mut() {
            o.remove("stream_options");
        }
        let (status, whole) = post(&url, &plain).await;
        assert_eq!(status, 200, "{whole}");
        let mut streamed_body = body.clone();
        streamed_body["stream"] = json!(true);
        let chunks = stream(&url, &streamed_body).await;
        let got = assemble(&chunks, chat, n);
        let want = expected(&whole, chat);
        assert_eq!(got, want, "{route} {body}");
        stopped += want
            .iter()
            .filter(|c| c.finish_reason.as_deref() == Some("stop"))
            .count();
        if chat {
            assert_eq!(
                chunks[0]["choices"][0]["delta"]["role"], "assistant",
                "the first chat chunk names the role"
            );
        }
        let usage = chunks
            .iter()
            .find(|c| c.get("usage").is_some_and(|u| !u.is_null()));
        if body.get("stream_options").is_some() {
            let usage = usage.expect("a usage chunk");
            assert_eq!(usage["choices"], json!([]));
            assert_eq!(usage["usage"], whole["usage"]);
        } else {
            assert!(usage.is_none(), "no usage chunk unless asked");
        }
    }
    assert!(stopped > 0, "some choices ended at a stop string");
    // Streaming needs `stream: true` for its options.
    let (status, body) = post(
        &format!("{}/v1/completions", server.url),
        &json!({"prompt": "a", "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("stream_options"), "{body}");
}

#[tokio::test]
async fn a_client_that_goes_away_frees_its_rows() {
    let model = smollm2();
    let server = start(
        load(&model),
        rollout_server::Options {
            model_name: "smollm2".into(),
            ..rollout_server::Options::default()
        },
    )
    .await;
    let (n, max_tokens) = (4u64, 400u64);
    let body = json!({"prompt": "Write a long story about a cat.", "max_tokens": max_tokens,
                      "n": n, "seed": 1, "stream": true, "stop_token_ids": []});
    let mut r = reqwest::Client::new()
        .post(format!("{}/v1/completions", server.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    let first = r.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    drop(r);
    // The queue empties once the rows have left the batch; all of them decoding to the end
    // would take the 1600 tokens below.
    let t = Instant::now();
    let metrics = loop {
        let (_, m) = get_text(&format!("{}/metrics", server.url)).await;
        if metric(&m, "rollout_queue_depth") == 0.0 {
            break m;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the request still holds the queue:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let generated = metric(&metrics, "rollout_generated_tokens_total");
    assert!(
        generated < (n * max_tokens) as f64 / 2.0,
        "{generated} tokens were decoded for a client that left after the first"
    );
}

/// What the openai SDK does with our answers: the same request streamed (`stream=True`, chunks
/// read by the SDK's own SSE parser) and whole, for completions and chat; the text and the
/// logprobs must agree. Runs when a Python with `openai` is at hand (`OPENAI_PYTHON`, else the
/// bench venv of `scripts/setup-bench-python`); otherwise it says it skipped.
const SDK_SCRIPT: &str = r#"
import sys
from openai import OpenAI
c = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
args = dict(model="tiny", prompt="Add 2 and 3.", max_tokens=30, n=2, seed=4, temperature=1.0, logprobs=1)
whole = c.completions.create(**args)
parts = {}
for chunk in c.completions.create(stream=True, **args):
    for ch in chunk.choices:
        p = parts.setdefault(ch.index, {"text": "", "lps": [], "finish": None})
        p["text"] += ch.text
        if ch.logprobs:
            p["lps"] += ch.logprobs.token_logprobs
        p["finish"] = ch.finish_reason or p["finish"]
for ch in whole.choices:
    p = parts[ch.index]
    assert p["text"] == ch.text, (p["text"], ch.text)
    assert p["lps"] == ch.logprobs.token_logprobs, (p["lps"], ch.logprobs.token_logprobs)
    assert p["finish"] == ch.finish_reason
chat = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=20, seed=2, logprobs=True)
whole = c.chat.completions.create(**chat)
text, lps, usage = "", [], None
for chunk in c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **chat):
    for ch in chunk.choices:
        text += ch.delta.content or ""
        if ch.logprobs and ch.logprobs.content:
            lps += [t.logprob for t in ch.logprobs.content]
    usage = chunk.usage or usage
assert text == whole.choices[0].message.content, (text, whole.choices[0].message.content)
assert lps == [t.logprob for t in whole.choices[0].logprobs.content]
assert usage.completion_tokens == whole.usage.completion_tokens
print("openai", __import__("openai").__version__, "streamed = whole")
"#;

#[tokio::test]
async fn the_openai_sdk_streams_what_it_gets_whole() {
    let python = std::env::var_os("OPENAI_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv-bench/bin/python")
        });
    let has_sdk = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_sdk {
        test_kit::record(
            "TEST_SKIPS_FILE",
            &format!(
                "SKIPPED the_openai_sdk_streams_what_it_gets_whole: no Python with `openai` at {} (scripts/setup-bench-python, or set OPENAI_PYTHON)",
                python.display()
            ),
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = start(load(&tiny_model_dir(dir.path())), opts()).await;
    let out = tokio::process::Command::new(&python)
        .args(["-c", SDK_SCRIPT, &server.url])
        .output()
        .await
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(said.contains("streamed = whole"), "{said}");
}
