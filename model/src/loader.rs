//! Reading a model from disk: a GGUF file (dequantized, llama.cpp's Q/K permutation undone,
//! tokenizer and chat template from the metadata) or a Hugging Face folder (`config.json`, one or
//! sharded `*.safetensors`, `tokenizer.json`, chat template). Both produce the same thing: a config,
//! tensors under Hugging Face names, a tokenizer and a template. A hub download is a separate,
//! explicit step (`hub` feature of the callers); loading only ever reads local paths.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Everything read from disk, before the transformer is built.
pub struct LoadedModel {
    pub config: ModelConfig,
    /// Tensors under Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...).
    pub weights: HashMap<String, Tensor>,
    /// `None` for a folder without tokenizer.json (token-id-only use, e.g. test models).
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: Option<String>,
    pub bos_token: String,
    pub eos_token: String,
    /// The file or folder the weights came from (for error messages).
    pub source: PathBuf,
}

/// Loads `path`: a `.gguf` file or a Hugging Face model folder.
pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    if !path.exists() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            what: "model",
            hint: "pass a .gguf file or a Hugging Face folder (run scripts/fetch-assets for the default model)",
        });
    }
    if path.is_dir() {
        load_hf_folder(path, device, dtype)
    } else {
        load_gguf(path, device, dtype)
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF

fn meta<'a>(path: &Path, c: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    c.metadata
        .get(key)
        .ok_or_else(|| Error::config(path, key, "missing from GGUF metadata"))
}

fn meta_u32(path: &Path, c: &gguf_file::Content, key: &str) -> Result<u32> {
    let v = meta(path, c, key)?;
    v.to_u32()
        .or_else(|_| v.to_u64().map(|x| x as u32))
        .or_else(|_| v.to_i32().map(|x| x as u32))
        .map_err(|e| Error::config(path, key, e.to_string()))
}

fn meta_f32(path: &Path, c: &gguf_file::Content, key: &str) -> Result<f32> {
    meta(path, c, key)?
        .to_f32()
        .map_err(|e| Error::config(path, key, e.to_string()))
}

fn meta_strings(path: &Path, c: &gguf_file::Content, key: &str) -> Result<Vec<String>> {
    let arr = meta(path, c, key)?
        .to_vec()
        .map_err(|e| Error::config(path, key, e.to_string()))?;
    arr.iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| Error::config(path, key, e.to_string()))
        })
        .collect()
}

fn load_gguf(path: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| {
        Error::bad_file(
            path,
            "GGUF header",
            format!("{e} (truncated or not a GGUF file?)"),
        )
    })?;
    let arch_name = meta(path, &content, "general.architecture")?
        .to_string()
        .map_err(|e| Error::config(path, "general.architecture", e.to_string()))?
        .clone();
    let architecture = match arch_name.as_str() {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: other.to_string(),
            })
        }
    };
    let a = arch_name.as_str();
    let tokens = meta_strings(path, &content, "tokenizer.ggml.tokens")?;
    let hidden_size = meta_u32(path, &content, &format!("{a}.embedding_length"))? as usize;
    let num_heads = meta_u32(path, &content, &format!("{a}.attention.head_count"))? as usize;
    let num_kv_heads = meta_u32(path, &content, &format!("{a}.attention.head_count_kv"))
        .map(|x| x as usize)
        .unwrap_or(num_heads);
    let head_dim = meta_u32(path, &content, &format!("{a}.rope.dimension_count"))
        .map(|x| x as usize)
        .unwrap_or(hidden_size / num_heads.max(1));
    let token_id = |key: &str| meta_u32(path, &content, key).ok();
    let eos = token_id("tokenizer.ggml.eos_token_id");
    let has_output = content.tensor_infos.contains_key("output.weight");
    let rope_scaling = gguf_rope_scaling(path, &content, &mut reader, a)?;
    let config = ModelConfig {
        architecture,
        vocab_size: tokens.len(),
        hidden_size,
        intermediate_size: meta_u32(path, &content, &format!("{a}.feed_forward_length"))? as usize,
        num_layers: meta_u32(path, &content, &format!("{a}.block_count"))? as usize,
        num_heads,
        num_kv_heads,
        head_dim,
        rope_theta: meta_f32(path, &content, &format!("{a}.rope.freq_base")).unwrap_or(10000.0)
            as f64,
        rope_scaling,
        rms_norm_eps: meta_f32(
            path,
            &content,
            &format!("{a}.attention.layer_norm_rms_epsilon"),
        )? as f64,
        max_position_embeddings: meta_u32(path, &content, &format!("{a}.context_length"))
            .map(|x| x as usize)
            .unwrap_or(4096),
        tie_word_embeddings: !has_output,
        bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: eos.into_iter().collect(),
        pad_token_id: token_id("tokenizer.ggml.padding_token_id"),
    };
    config.validate(path)?;

    // Tokenizer.
    let tok_model = meta(path, &content, "tokenizer.ggml.model")?
        .to_string()
        .map_err(|e| Error::config(path, "tokenizer.ggml.model", e.to_string()))?
        .clone();
    if tok_model != "gpt2" {
        return Err(Error::config(
            path,
            "tokenizer.ggml.model",
            format!(
                "tokenizer model '{tok_model}' is not supported from GGUF (only byte-level BPE 'gpt2'); \
                 use the Hugging Face folder of this model, which has tokenizer.json"
            ),
        ));
    }
    let merges = meta_strings(path, &content, "tokenizer.ggml.merges")?;
    let token_types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| Error::config(path, "tokenizer.ggml.token_type", e.to_string()))?
            .iter()
            .map(|t| t.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let pre = content
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_else(|| "default".to_string());
    let tokenizer = Tokenizer::from_gguf_bpe(path, &tokens, &merges, &token_types, &pre)?;
    let chat_template = content
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok().cloned());
    let name_of = |id: Option<u32>| {
        id.and_then(|i| tokens.get(i as usize).cloned())
            .unwrap_or_default()
    };

    // Tensors, renamed to Hugging Face names.
    let mut weights = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = gguf_to_hf_name(name) else {
            tracing::debug!("skipping GGUF tensor {name}");
            continue;
        };
        let q = content.tensor(&mut reader, name, device).map_err(|e| {
            Error::bad_file(
                path,
                "tensor data",
                format!("tensor '{name}': {e} (file truncated or corrupt?)"),
            )
        })?;
        let mut t = q
            .dequantize(device)
            .map_err(|e| Error::bad_file(path, "tensor data", format!("tensor '{name}': {e}")))?;
        if architecture == Architecture::Llama {
            if hf.ends_with("q_proj.weight") {
                t = unpermute_qk(path, name, &t, config.num_heads, config.head_dim)?;
            } else if hf.ends_with("k_proj.weight") {
                t = unpermute_qk(path, name, &t, config.num_kv_heads, config.head_dim)?;
            }
        }
        weights.insert(hf, t.to_dtype(dtype)?);
    }
    Ok(LoadedModel {
        config: config.clone(),
        weights,
        tokenizer: Some(tokenizer),
        chat_template,
        bos_token: name_of(config.bos_token_id),
        eos_token: name_of(eos),
        source: path.to_path_buf(),
    })
}

/// A GGUF's scaled RoPE: llama.cpp writes Llama 3.x's as one divisor per frequency in the tensor
/// `rope_freqs.weight`, and linear scaling in the metadata. Other kinds (yarn) are refused.
fn gguf_rope_scaling(
    path: &Path,
    content: &gguf_file::Content,
    reader: &mut BufReader<File>,
    arch: &str,
) -> Result<RopeScaling> {
    const FREQS: &str = "rope_freqs.weight";
    if content.tensor_infos.contains_key(FREQS) {
        let bad = |e: candle_core::Error| {
            Error::bad_file(path, "tensor data", format!("tensor '{FREQS}': {e}"))
        };
        let divisors = content
            .tensor(reader, FREQS, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>())
            .map_err(bad)?;
        return Ok(RopeScaling::Divisors { divisors });
    }
    let key = format!("{arch}.rope.scaling.type");
    if !content.metadata.contains_key(&key) {
        return Ok(RopeScaling::None);
    }
    let kind = meta(path, content, &key)?
        .to_string()
        .map_err(|e| Error::config(path, &key, e.to_string()))?;
    match kind.as_str() {
        "none" => Ok(RopeScaling::None),
        "linear" => {
            let key = format!("{arch}.rope.scaling.factor");
            let factor = f64::from(meta_f32(path, content, &key)?);
            if !(factor.is_finite() && factor > 0.0) {
                return Err(Error::config(path, key, "must be a positive number"));
            }
            Ok(RopeScaling::Linear { factor })
        }
        other => Err(Error::config(
            path,
            key,
            format!(
                "RoPE scaling {other:?} is not supported (none, linear, and Llama 3's \
                 rope_freqs are); running it as plain RoPE would compute wrong positions"
            ),
        )),
    }
}

/// llama.cpp stores Q and K rows permuted for its interleaved RoPE:
/// `w.reshape(heads, 2, hd/2, in).swapaxes(1, 2)`. This undoes it so the half-split RoPE applies.
fn unpermute_qk(
    path: &Path,
    name: &str,
    w: &Tensor,
    heads: usize,
    head_dim: usize,
) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if out != heads * head_dim {
        return Err(Error::ShapeMismatch {
            path: path.to_path_buf(),
            name: name.to_string(),
            expected: vec![heads * head_dim, inp],
            found: vec![out, inp],
        });
    }
    Ok(w.reshape((heads, head_dim / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

fn gguf_to_hf_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

// ---------------------------------------------------------------------------------------------
// Hugging Face folder

fn read_text(path: &Path, what: &'static str, hint: &'static str) -> Result<String> {
    if !path.exists() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            what,
            hint,
        });
    }
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// The safetensors files of a folder: the shards named by `model.safetensors.index.json`, or
/// `model.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = read_text(&index, "weight index", "")?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&index, "safetensors index", e))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                Error::bad_file(&index, "safetensors index", "no 'weight_map' object")
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(Value::as_str)
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(Error::MissingFile {
        path: single,
        what: "model weights",
        hint: "a Hugging Face folder needs model.safetensors or model.safetensors.index.json with its shards",
    })
}

/// Reads every tensor of a safetensors file, converting to `dtype`.
pub(crate) fn read_safetensors(
    path: &Path,
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            what: "safetensors file",
            hint: "check the path (a shard listed in the index may be missing)",
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
        Error::bad_file(path, "safetensors", format!("{e} (truncated or corrupt?)"))
    })?;
    tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
        .collect()
}

fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn load_hf_folder(dir: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    let cfg_text = read_text(
        &cfg_path,
        "model config",
        "a Hugging Face folder needs config.json",
    )?;
    let mut config = ModelConfig::from_hf_json(&cfg_path, &cfg_text)?;
    let mut weights = HashMap::new();
    for file in weight_files(dir)? {
        weights.extend(read_safetensors(&file, device, dtype)?);
    }
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        Some(Tokenizer::from_file(&tok_path)?)
    } else {
        None
    };

    let tc_path = dir.join("tokenizer_config.json");
    let tc: Value = if tc_path.exists() {
        let text = read_text(&tc_path, "tokenizer config", "")?;
        serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&tc_path, "tokenizer_config.json", e))?
    } else {
        Value::Null
    };
    let jinja = dir.join("chat_template.jinja");
    let chat_template = if jinja.exists() {
        Some(read_text(&jinja, "chat template", "")?)
    } else {
        match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        }
    };
    let bos_token = token_text(tc.get("bos_token"))
        .or_else(|| {
            config
                .bos_token_id
                .and_then(|i| tokenizer.as_ref()?.id_to_token(i))
        })
        .unwrap_or_default();
    let eos_token = token_text(tc.get("eos_token"))
        .or_else(|| {
            config
                .eos_token_ids
                .first()
                .and_then(|i| tokenizer.as_ref()?.id_to_token(*i))
        })
        .unwrap_or_default();
    // EOS ids: config.json, generation_config.json, and the tokenizer's eos token.
    let gen_path = dir.join("generation_config.json");
    if gen_path.exists() {
        let text = read_text(&gen_path, "generation config", "")?;
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            match v.get("eos_token_id") {
                Some(Value::Number(n)) => config.eos_token_ids.extend(n.as_u64().map(|x| x as u32)),
                Some(Value::Array(a)) => config
                    .eos_token_ids
                    .extend(a.iter().filter_map(Value::as_u64).map(|x| x as u32)),
                _ => {}
            }
        }
    }
    if let Some(id) = tokenizer.as_ref().and_then(|t| t.token_to_id(&eos_token)) {
        config.eos_token_ids.push(id);
    }
    config.eos_token_ids.sort_unstable();
    config.eos_token_ids.dedup();
    Ok(LoadedModel {
        config,
        weights,
        tokenizer,
        chat_template,
        bos_token,
        eos_token,
        source: dir.to_path_buf(),
    })
}
