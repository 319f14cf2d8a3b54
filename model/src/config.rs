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
    /// How RoPE's frequencies are stretched for long contexts (Llama 3.x); `None` for plain RoPE.
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// Token ids that end a generation (the tokenizer's EOS plus any listed by the config).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

/// A scaled RoPE: which of RoPE's `head_dim / 2` frequencies are slowed down, and by how much.
/// Transformers' `rope_type` names; the types it has beyond these (yarn, dynamic, longrope) are
/// refused when a model is loaded, never run as plain RoPE.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Every frequency divided by `factor` (positions interpolated).
    Linear { factor: f64 },
    /// Llama 3.1/3.2: frequencies whose wavelength exceeds the original context divided by
    /// `factor`, those shorter than `original / high_freq_factor` positions kept, and a smooth
    /// blend in between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// One divisor per frequency, as llama.cpp stores a scaled RoPE in a GGUF
    /// (`rope_freqs.weight`).
    Divisors { divisors: Vec<f32> },
}

impl RopeScaling {
    /// Reads a Hugging Face `rope_scaling` / `rope_parameters` object (`key` names it in errors).
    fn from_hf(path: &Path, key: &str, v: &Value) -> Result<Self> {
        let kind = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(Value::as_str);
        let number = |field: &str| -> Result<f64> {
            v.get(field)
                .and_then(Value::as_f64)
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| {
                    Error::config(
                        path,
                        format!("{key}.{field}"),
                        "missing or not a positive number",
                    )
                })
        };
        match kind {
            None | Some("default") => Ok(RopeScaling::None),
            Some("linear") => Ok(RopeScaling::Linear {
                factor: number("factor")?,
            }),
            Some("llama3") => {
                let (low_freq_factor, high_freq_factor) =
                    (number("low_freq_factor")?, number("high_freq_factor")?);
                if high_freq_factor <= low_freq_factor {
                    return Err(Error::config(
                        path,
                        format!("{key}.high_freq_factor"),
                        format!("{high_freq_factor} must exceed low_freq_factor {low_freq_factor}"),
                    ));
                }
                Ok(RopeScaling::Llama3 {
                    factor: number("factor")?,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: number("original_max_position_embeddings")?
                        as usize,
                })
            }
            Some(other) => Err(Error::config(
                path,
                key,
                format!(
                    "RoPE type {other:?} is not supported (plain, \"linear\" and \"llama3\" are); \
                     running it as plain RoPE would compute wrong positions"
                ),
            )),
        }
    }

    /// The frequencies `theta^(-2i/head_dim)`, `i < head_dim / 2`, after scaling, in f32 as the
    /// rotary tables use them (plain RoPE: `1 / theta^(2i/head_dim)` rounded to f32, as the engine
    /// always computed it; a scaling is applied to that in f64 and rounded once).
    pub fn inv_freq(&self, theta: f64, head_dim: usize) -> Vec<f32> {
        let plain: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64) as f32)
            .collect();
        let scaled = |scale: &dyn Fn(f64) -> f64| -> Vec<f32> {
            plain.iter().map(|f| scale(f64::from(*f)) as f32).collect()
        };
        match self {
            RopeScaling::None => plain,
            RopeScaling::Linear { factor } => scaled(&|f| f / factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let original = *original_max_position_embeddings as f64;
                // Wavelengths (in positions) beyond which a frequency is divided by `factor`,
                // and below which it is kept.
                let (long, short) = (original / low_freq_factor, original / high_freq_factor);
                scaled(&|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < short {
                        f
                    } else if wavelen > long {
                        f / factor
                    } else {
                        let smooth = (original / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
            }
            RopeScaling::Divisors { divisors } => plain
                .iter()
                .zip(divisors)
                .map(|(f, d)| (f64::from(*f) / f64::from(*d)) as f32)
                .collect(),
        }
    }
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
        // Transformers < 5 writes `rope_scaling`, 5 writes `rope_parameters` (which also holds
        // the plain case); a scaled variant in either is read, an unknown one refused.
        let mut rope_scaling = RopeScaling::None;
        for key in ["rope_scaling", "rope_parameters"] {
            if let Some(obj) = v.get(key).filter(|s| !s.is_null()) {
                let scaling = RopeScaling::from_hf(path, key, obj)?;
                if scaling != RopeScaling::None {
                    rope_scaling = scaling;
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
            rope_scaling,
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
        if let RopeScaling::Divisors { divisors: d } = &self.rope_scaling {
            if d.len() != self.head_dim / 2 || d.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
                return Err(Error::config(
                    path,
                    "rope_freqs.weight",
                    format!(
                        "needs {} positive divisors (head_dim / 2), found {} values",
                        self.head_dim / 2,
                        d.len()
                    ),
                ));
            }
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
