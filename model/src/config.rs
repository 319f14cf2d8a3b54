//! The shape of a transformer: what the engine needs to know to build and run one, read from a
//! Hugging Face `config.json` or from GGUF metadata.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// Which family of decoder the weights belong to. Both share one code path; they differ in
/// whether q/k/v projections carry a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3.x, SmolLM2, TinyLlama, Mistral-style (no biases).
    Llama,
    /// Qwen2 / Qwen2.5 (bias on q, k, v).
    Qwen2,
}

/// Hyper-parameters of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// Token ids that end a generation (the tokenizer's EOS plus any listed by the config).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl ModelConfig {
    /// Whether q/k/v carry a bias.
    pub fn qkv_bias(&self) -> bool {
        self.architecture == Architecture::Qwen2
    }

    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path, text: &str) -> Result<Self> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| Error::bad_file(path, "config.json", e))?;
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let archs: Vec<&str> = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let architecture = match (model_type, archs.first().copied()) {
            ("llama" | "mistral", _) | (_, Some("LlamaForCausalLM" | "MistralForCausalLM")) => {
                Architecture::Llama
            }
            ("qwen2", _) | (_, Some("Qwen2ForCausalLM")) => Architecture::Qwen2,
            _ => {
                let arch = if model_type.is_empty() {
                    archs.first().copied().unwrap_or("<none>").to_string()
                } else {
                    model_type.to_string()
                };
                return Err(Error::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    arch,
                });
            }
        };
        let usize_key = |key: &str| -> Result<usize> {
            v.get(key)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| Error::config(path, key, "missing or not a non-negative integer"))
        };
        let hidden_size = usize_key("hidden_size")?;
        let num_heads = usize_key("num_attention_heads")?;
        let num_kv_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(num_heads);
        let head_dim = match v.get("head_dim").and_then(Value::as_u64) {
            Some(h) => h as usize,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        // Only plain RoPE is implemented: refuse scaled variants (llama3, yarn, linear, ...)
        // whichever key carries them, instead of computing wrong positions.
        for key in ["rope_scaling", "rope_parameters"] {
            if let Some(kind) = v.get(key).filter(|s| !s.is_null()) {
                let t = kind
                    .get("rope_type")
                    .or_else(|| kind.get("type"))
                    .and_then(Value::as_str);
                if !matches!(t, None | Some("default")) {
                    return Err(Error::config(
                        path,
                        key,
                        format!("RoPE type {t:?} is not supported yet (only plain RoPE)"),
                    ));
                }
            }
        }
        let rope_theta = v
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                v.get("rope_parameters")
                    .and_then(|r| r.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10000.0);
        let ids = |key: &str| -> Vec<u32> {
            match v.get(key) {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|x| x as u32)
                    .collect(),
                _ => vec![],
            }
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size: usize_key("vocab_size")?,
            hidden_size,
            intermediate_size: usize_key("intermediate_size")?,
            num_layers: usize_key("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(4096) as usize,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: ids("bos_token_id").first().copied(),
            eos_token_ids: ids("eos_token_id"),
            pad_token_id: ids("pad_token_id").first().copied(),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks the numbers are consistent, naming the offending key.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(Error::config(path, key, "must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::config(
                path,
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_kv_heads, self.num_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::config(path, "head_dim", "must be even for RoPE"));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(self.rms_norm_eps) || !positive(self.rope_theta) {
            return Err(Error::config(
                path,
                "rms_norm_eps/rope_theta",
                "must be positive",
            ));
        }
        Ok(())
    }
}
