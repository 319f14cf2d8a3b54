//! Adapters in a running rollout server over real HTTP: hot-swap by path (answered with the id
//! the loader gave, never a path), the same numbers as an engine with the adapter loaded at
//! start, back to the base bit for bit, and an adapter sent as bytes (checked by sha256, kept
//! whole, the same bytes under one name at once all fine).

mod common;

use std::time::Duration;

use common::*;
use rl_core::wire::GenerateRequest;
use rl_http::client::ServiceClient;
use sampling::{MaxTokens, Temperature, TopP};
use serde_json::json;

/// The request the adapter tests sample with: two seeded choices of 16 tokens, no stop.
fn adapter_request() -> GenerateRequest {
    GenerateRequest {
        prompt_ids: vec![1, 60, 61, 62, 63],
        n: 2,
        max_tokens: MaxTokens::of(16),
        temperature: Temperature::ONE,
        top_p: TopP::ALL,
        top_k: 0,
        stop_token_ids: Some(vec![]),
        seed: Some(11),
    }
}

/// `got` (the server's answer to [`adapter_request`]) has exactly the token ids and logprobs of
/// an in-process engine on `model` with the adapter in `adapter` loaded at start.
fn assert_equals_in_process(
    model: &std::path::Path,
    adapter: &std::path::Path,
    got: &rl_core::wire::GenerateResponse,
) {
    let req = adapter_request();
    let mut reference = load(model);
    reference.load_adapter(adapter).expect("reference adapter");
    let rows: Vec<model::GenerateRequest> = (0..u64::from(req.n))
        .map(|i| {
            let params = model::SamplingParams {
                seed: req.seed.unwrap_or(0) + i,
                ..model::SamplingParams::new(req.knobs())
            };
            let limits = reference.limits();
            model::GenerateRequest::new("prompt", req.prompt_ids.clone(), params, limits)
                .expect("a valid row")
        })
        .collect();
    let want = reference.generate(&rows).expect("reference generate");
    assert_eq!(got.choices.len(), want.len());
    for (g, w) in got.choices.iter().zip(&want) {
        assert_eq!((&g.token_ids, &g.logprobs), (&w.tokens, &w.logprobs));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_hot_swap_follows_the_adapter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_model_dir(dir.path());
    let ckpts = dir.path().join("checkpoints");
    std::fs::create_dir_all(ckpts.join("tiny_adapter")).expect("mkdir");
    for entry in std::fs::read_dir(golden().join("tiny_adapter")).expect("adapter dir") {
        let entry = entry.expect("entry");
        std::fs::copy(
            entry.path(),
            ckpts.join("tiny_adapter").join(entry.file_name()),
        )
        .expect("copy");
    }
    let server = start(
        load(&model),
        rollout_server::Options {
            checkpoints_dir: Some(ckpts.clone()),
            ..opts()
        },
    )
    .await;
    let client = ServiceClient::new(&server.url, None, Duration::from_secs(30)).expect("client");
    let req = adapter_request();
    let base = client.generate(&req).await.expect("base");
    assert_eq!(base.adapter, None);

    // The server answers with the id the loader gave it, never with a path of its own.
    let swapped = client
        .load_adapter("tiny_adapter", Some("policy-7"))
        .await
        .expect("load adapter");
    assert_eq!(swapped.adapter.as_deref(), Some("policy-7"));
    assert!(swapped.swap_ms < 50.0, "swap took {} ms", swapped.swap_ms);
    let with = client.generate(&req).await.expect("with adapter");
    assert_eq!(with.adapter.as_deref(), Some("policy-7"));
    // The same computation in-process, with the adapter loaded at start: identical numbers.
    assert_equals_in_process(&model, &ckpts.join("tiny_adapter"), &with);
    assert_ne!(
        with.choices
            .iter()
            .map(|c| c.logprobs.clone())
            .collect::<Vec<_>>(),
        base.choices
            .iter()
            .map(|c| c.logprobs.clone())
            .collect::<Vec<_>>(),
        "the adapter changes the logprobs"
    );
    let shown = ckpts
        .canonicalize()
        .expect("canonical")
        .display()
        .to_string();
    for route in ["health", "v1/models"] {
        let (_, body) = get_text(&format!("{}/{route}", server.url)).await;
        assert!(body.contains("\"policy-7\""), "{route}: {body}");
        assert!(
            !body.contains(&shown) && !body.contains("tiny_adapter"),
            "{route}: {body}"
        );
    }
    // Without an id, the path exactly as it was sent.
    let again = client
        .load_adapter("tiny_adapter", None)
        .await
        .expect("load");
    assert_eq!(again.adapter.as_deref(), Some("tiny_adapter"));

    let unloaded = client.unload_adapter().await.expect("unload");
    assert_eq!(unloaded.adapter, None);
    assert!(
        unloaded.swap_ms < 50.0,
        "unload took {} ms",
        unloaded.swap_ms
    );
    let again = client.generate(&req).await.expect("base again");
    assert_eq!(
        again.choices, base.choices,
        "back to the base model, bit for bit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_sent_as_bytes_is_checked_kept_and_served() {
    // A server that shares no folder with the sender: its own, empty checkpoints directory.
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_model_dir(dir.path());
    let own = dir.path().join("remote-checkpoints");
    std::fs::create_dir_all(&own).expect("mkdir");
    let server = start(
        load(&model),
        rollout_server::Options {
            checkpoints_dir: Some(own.clone()),
            ..opts()
        },
    )
    .await;
    let client = ServiceClient::new(&server.url, None, Duration::from_secs(30)).expect("client");
    let source = golden().join("tiny_adapter");
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(source.join(model::lora::CONFIG_FILE)).expect("config"),
    )
    .expect("config json");
    let weights = std::fs::read(source.join(model::lora::WEIGHTS_FILE)).expect("weights");
    let put = |name: &str, body: serde_json::Value| {
        let http = reqwest::Client::new();
        let url = format!("{}/v1/adapters/{name}", server.url);
        async move {
            let r = http.put(url).json(&body).send().await.expect("put");
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.expect("json"))
        }
    };
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&weights);
    let sha = rl_core::files::sha256_bytes(&weights);

    // Refused, and nothing kept: a wrong sha256, a bad name, weights that are not base64.
    let bad_sha = json!({"config": config, "weights_base64": b64, "sha256": "00".repeat(32)});
    let (status, v) = put("iter_0", bad_sha).await;
    assert_eq!(status, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("nothing was kept"),
        "{v}"
    );
    let good = json!({"config": config, "weights_base64": b64, "sha256": sha});
    let (status, v) = put(".hidden", good.clone()).await;
    assert_eq!(status, 422, "{v}");
    let not_b64 = json!({"config": config, "weights_base64": "@@@", "sha256": sha});
    assert_eq!(put("iter_0", not_b64).await.0, 422);
    assert_eq!(
        std::fs::read_dir(&own).expect("own").count(),
        0,
        "nothing kept"
    );

    // Accepted: kept under its name in the server's own folder, and served.
    let r = client
        .upload_adapter("iter_0", config.clone(), &weights, &sha)
        .await
        .expect("upload");
    let kept = own.join("iter_0");
    // The upload's name is the id answered, not the folder it is kept in.
    assert_eq!(r.adapter.as_deref(), Some("iter_0"));
    assert_eq!(
        rl_core::files::sha256(&kept.join(model::lora::WEIGHTS_FILE)).expect("sha"),
        sha,
        "the bytes kept are the bytes sent"
    );
    // The same adapter sent four times at once under a new name: each is fine, one is kept.
    let racing: Vec<_> = (0..4)
        .map(|_| {
            let (c, cfg, w, s) = (client.clone(), config.clone(), weights.clone(), sha.clone());
            tokio::spawn(async move { c.upload_adapter("iter_1", cfg, &w, &s).await })
        })
        .collect();
    for r in racing {
        r.await
            .expect("join")
            .expect("a concurrent upload of the same bytes");
    }
    assert_eq!(
        rl_core::files::sha256(&own.join("iter_1").join(model::lora::WEIGHTS_FILE)).expect("sha"),
        sha
    );
    let left: Vec<String> = std::fs::read_dir(&own)
        .expect("own")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "no temporary left behind: {left:?}");
    // Sent again (a retry): the same adapter, fine. Other weights under the name: refused.
    assert_eq!(put("iter_0", good).await.0, 200);
    let mut other = weights.clone();
    let last = other.len() - 1;
    other[last] ^= 1;
    let other_body = json!({
        "config": config,
        "weights_base64": base64::engine::general_purpose::STANDARD.encode(&other),
        "sha256": rl_core::files::sha256_bytes(&other),
    });
    let (status, v) = put("iter_0", other_body).await;
    assert_eq!(status, 409, "{v}");

    // Its outputs equal an in-process engine that loaded the adapter from the sender's folder.
    let req = adapter_request();
    let got = client.generate(&req).await.expect("generate");
    assert_equals_in_process(&model, &source, &got);
}
