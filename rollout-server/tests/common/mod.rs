//! Test support: the tiny model with its character tokenizer, and a real server on 127.0.0.1.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rollout_server::{AppState, Options};

pub fn golden() -> PathBuf {
    std::env::var_os("GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden"))
}

pub fn smollm2() -> PathBuf {
    std::env::var_os("ASSETS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets"))
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A model folder: the golden tiny Llama's weights plus the character tokenizer of
/// `tests/fixtures/tiny_tokenizer`.
pub fn tiny_model_dir(dir: &Path) -> PathBuf {
    let out = dir.join("tiny");
    std::fs::create_dir_all(&out).expect("mkdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden().join("tiny_llama").join(f), out.join(f)).expect("copy tiny_llama");
    }
    let fixtures =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny_tokenizer");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures.join(f), out.join(f)).expect("copy tokenizer");
    }
    out
}

pub fn load(path: &Path) -> model::Engine {
    model::Engine::load(path, &candle_core::Device::Cpu, candle_core::DType::F32)
        .expect("load model")
}

/// A running server; dropped, it shuts down.
pub struct Server {
    pub url: String,
    pub state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub async fn start(engine: model::Engine, opts: Options) -> Server {
    let (router, state) = rollout_server::app(engine, &opts).expect("app");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(rollout_server::serve(listener, router, async {
        let _ = rx.await;
    }));
    Server {
        url,
        state,
        stop: Some(stop),
    }
}

pub fn opts() -> Options {
    Options {
        model_name: "tiny".into(),
        ..Options::default()
    }
}

/// POSTs JSON and returns (status, body as JSON).
pub async fn post(url: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

pub async fn get_text(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.expect("send");
    (r.status().as_u16(), r.text().await.expect("body"))
}

/// The value of a Prometheus sample in a `/metrics` text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}
