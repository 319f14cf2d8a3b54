//! Writing a model out as a Hugging Face folder, with a LoRA adapter merged into its weights:
//! what a trained policy becomes when it leaves this project (transformers, vLLM, TGI or
//! llama.cpp's converter read the result). The base is whatever [`crate::loader`] reads (a GGUF
//! file is dequantized and its Q/K permutation undone); the folder holds `config.json`,
//! `model.safetensors` (`[out, in]` weights under Hugging Face names, tied embeddings stored
//! once), `generation_config.json`, and when the base has one, `tokenizer.json`,
//! `tokenizer_config.json` and `chat_template.jinja`.
//!
//! It never overwrites: an existing non-empty `out` is refused. Writing it whole or not at all is
//! the caller's part (`orchestrate export` writes into a temporary folder renamed into place).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::lora::{LoraAdapter, Proj};

/// What [`export_merged`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub out: PathBuf,
    /// Tensors in `model.safetensors`.
    pub tensors: usize,
    pub parameters: usize,
    /// Projections that received an adapter delta.
    pub merged: usize,
    /// Whether a tokenizer (and template) was written.
    pub tokenizer: bool,
}

/// Loads `model`, merges `adapter` (a PEFT folder) into it when given, and writes the Hugging
/// Face folder `out` with weights in `dtype` (the merge itself is done in f32).
pub fn export_merged(
    model: &Path,
    adapter: Option<&Path>,
    out: &Path,
    dtype: DType,
) -> Result<ExportReport> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::InvalidRequest(format!(
            "export dtype {dtype:?} is not supported: use f32, bf16 or f16"
        )));
    }
    refuse_existing(out)?;
    let device = Device::Cpu;
    let loaded = crate::loader::load(model, &device, DType::F32)?;
    let cfg = &loaded.config;
    if let RopeScaling::Divisors { .. } = cfg.rope_scaling {
        return Err(Error::config(
            model,
            "rope_freqs.weight",
            "this GGUF's scaled RoPE is a table of per-frequency divisors, which a Hugging Face \
             config.json cannot express: export from the model's Hugging Face folder instead",
        ));
    }
    let mut weights = loaded.weights;
    let mut merged = 0;
    if let Some(dir) = adapter {
        let lora = LoraAdapter::load(dir, cfg, &device)?;
        for layer in 0..cfg.num_layers {
            for proj in Proj::ALL {
                let Some(delta) = lora.delta(layer, proj)? else {
                    continue;
                };
                let key = format!(
                    "model.layers.{layer}.{}.{}.weight",
                    proj.parent(),
                    proj.name()
                );
                let w = weights.get(&key).ok_or_else(|| Error::ShapeMismatch {
                    path: model.to_path_buf(),
                    name: key.clone(),
                    expected: delta.dims().to_vec(),
                    found: vec![],
                })?;
                if w.dims() != delta.dims() {
                    return Err(Error::ShapeMismatch {
                        path: dir.to_path_buf(),
                        name: key,
                        expected: w.dims().to_vec(),
                        found: delta.dims().to_vec(),
                    });
                }
                let sum = (w + delta)?;
                weights.insert(key, sum);
                merged += 1;
            }
        }
    }
    if cfg.tie_word_embeddings {
        // Stored once, as Hugging Face does; `lm_head` is the embedding.
        weights.remove("lm_head.weight");
    }
    let mut parameters = 0;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in weights {
        parameters += t.elem_count();
        tensors.insert(name, t.to_dtype(dtype)?.contiguous()?);
    }

    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let tokenizer = (|| -> Result<bool> {
        let st = out.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &st)
            .map_err(|e| Error::bad_file(&st, "merged weights (write)", e))?;
        let config_json = out.join("config.json");
        let config = hf_config(cfg, dtype)
            .map_err(|e| Error::bad_file(&config_json, "config.json (write)", e))?;
        write_json(&config_json, &config)?;
        write_json(
            &out.join("generation_config.json"),
            &json!({
                "bos_token_id": cfg.bos_token_id,
                "eos_token_id": cfg.eos_token_ids,
                "pad_token_id": cfg.pad_token_id,
            }),
        )?;
        let Some(tok) = &loaded.tokenizer else {
            return Ok(false);
        };
        tok.save(&out.join("tokenizer.json"))?;
        let mut tc = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": loaded.bos_token,
            "eos_token": loaded.eos_token,
            "model_max_length": cfg.max_position_embeddings,
            "clean_up_tokenization_spaces": false,
        });
        if let Some(pad) = cfg.pad_token_id.and_then(|i| tok.id_to_token(i)) {
            tc["pad_token"] = pad.into();
        }
        if let Some(template) = &loaded.chat_template {
            tc["chat_template"] = template.clone().into();
            let path = out.join("chat_template.jinja");
            std::fs::write(&path, template).map_err(|e| Error::io(&path, e))?;
        }
        write_json(&out.join("tokenizer_config.json"), &tc)?;
        Ok(true)
    })()?;
    Ok(ExportReport {
        out: out.to_path_buf(),
        tensors: tensors.len(),
        parameters,
        merged,
        tokenizer,
    })
}

/// The `config.json` of a Llama or Qwen2 model with this shape.
fn hf_config(cfg: &ModelConfig, dtype: DType) -> serde_json::Result<Value> {
    let (model_type, arch) = match cfg.architecture {
        Architecture::Llama => ("llama", "LlamaForCausalLM"),
        Architecture::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
    };
    let eos: Value = match cfg.eos_token_ids.as_slice() {
        [one] => json!(one),
        many => json!(many),
    };
    let mut v = json!({
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": match dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        },
        "use_cache": true,
    });
    // Linear and llama3 serialize as transformers' own `rope_scaling` objects (tagged by
    // `rope_type`); a divisor table has no such form and is refused before this.
    if matches!(
        cfg.rope_scaling,
        RopeScaling::Linear { .. } | RopeScaling::Llama3 { .. }
    ) {
        v["rope_scaling"] = serde_json::to_value(&cfg.rope_scaling)?;
    }
    if cfg.architecture == Architecture::Llama {
        v["attention_bias"] = false.into();
        v["mlp_bias"] = false.into();
    }
    Ok(v)
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text =
        serde_json::to_string_pretty(v).map_err(|e| Error::bad_file(path, "JSON (write)", e))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Refuses an `out` that exists and is not an empty folder.
fn refuse_existing(out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    let empty = out.is_dir()
        && std::fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .next()
            .is_none();
    if empty {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "{} already exists and is not empty: pick a new output folder or remove it",
            out.display()
        )))
    }
}
