//! LoRA adapters in PEFT's on-disk format.
//!
//! An adapter adds `scaling * B @ A` to the weight of each targeted projection (A `[r, in]`,
//! B `[out, r]`, scaling `alpha / r`, or `alpha / sqrt(r)` with rsLoRA). Files are PEFT's:
//! `adapter_config.json` and `adapter_model.safetensors` with keys like
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Saving what was loaded
//! gives back the same bits.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// A projection of a decoder block that can carry an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proj {
    #[serde(rename = "q_proj")]
    Q,
    #[serde(rename = "k_proj")]
    K,
    #[serde(rename = "v_proj")]
    V,
    #[serde(rename = "o_proj")]
    O,
    #[serde(rename = "gate_proj")]
    Gate,
    #[serde(rename = "up_proj")]
    Up,
    #[serde(rename = "down_proj")]
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// PEFT's module name (`q_proj`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The parent module in Hugging Face names (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            _ => "mlp",
        }
    }

    pub fn from_name(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.name() == name)
    }

    /// (out, in) of the projection's weight.
    pub fn shape(self, cfg: &ModelConfig) -> (usize, usize) {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        match self {
            Proj::Q => (cfg.num_heads * cfg.head_dim, h),
            Proj::K | Proj::V => (cfg.num_kv_heads * cfg.head_dim, h),
            Proj::O => (h, cfg.num_heads * cfg.head_dim),
            Proj::Gate | Proj::Up => (i, h),
            Proj::Down => (h, i),
        }
    }
}

/// The file names of a PEFT adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Rank, alpha and targets of an adapter (the fields of PEFT's `adapter_config.json` we use).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Proj>,
    pub use_rslora: bool,
    pub base_model: Option<String>,
}

impl LoraConfig {
    pub fn new(r: usize, alpha: f64, targets: Vec<Proj>) -> Self {
        Self {
            r,
            alpha,
            dropout: 0.0,
            targets,
            use_rslora: false,
            base_model: None,
        }
    }

    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// PEFT's adapter_config.json, as much of it as we read and write.
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfigFile {
    #[serde(default = "default_peft_type")]
    peft_type: String,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: serde_json::Value,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    task_type: Option<String>,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    init_lora_weights: serde_json::Value,
}

fn default_peft_type() -> String {
    "LORA".into()
}

/// The A and B matrices of one projection.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
}

/// A LoRA adapter for a whole model: pairs by (layer, projection).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    pub pairs: BTreeMap<(usize, Proj), LoraPair>,
}

/// PEFT key of a LoRA tensor.
pub fn peft_key(layer: usize, proj: Proj, ab: char) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.lora_{ab}.weight",
        proj.parent(),
        proj.name()
    )
}

fn parse_peft_key(key: &str) -> Option<(usize, Proj, char)> {
    let rest = key.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let mut parts = rest.split('.');
    let _parent = parts.next()?;
    let proj = Proj::from_name(parts.next()?)?;
    let ab = match parts.next()? {
        "lora_A" => 'A',
        "lora_B" => 'B',
        _ => return None,
    };
    // PEFT may save `lora_A.default.weight` in some versions.
    let last = parts.next_back()?;
    (last == "weight").then_some((layer, proj, ab))
}

impl LoraAdapter {
    /// A fresh adapter as PEFT initialises one: A uniform in +-1/sqrt(in) (kaiming-uniform with
    /// a = sqrt(5)), B zero; seeded.
    pub fn init(
        config: LoraConfig,
        model: &ModelConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        for layer in 0..model.num_layers {
            for &proj in &config.targets {
                let (out, inp) = proj.shape(model);
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..config.r * inp)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let a = Tensor::from_vec(a, (config.r, inp), device)?;
                let b = Tensor::zeros((out, config.r), DType::F32, device)?;
                pairs.insert((layer, proj), LoraPair { a, b });
            }
        }
        Ok(Self { config, pairs })
    }

    /// Reads a PEFT adapter folder and checks it against the model's shapes.
    pub fn load(dir: &Path, model: &ModelConfig, device: &Device) -> Result<Self> {
        let bad = |reason: String| Error::BadAdapter {
            path: dir.to_path_buf(),
            reason,
        };
        let cfg_path = dir.join(CONFIG_FILE);
        if !cfg_path.exists() {
            return Err(Error::MissingFile {
                path: cfg_path,
                what: "adapter config",
                hint: "a PEFT adapter folder has adapter_config.json and adapter_model.safetensors",
            });
        }
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let file: PeftConfigFile = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&cfg_path, "adapter_config.json", e))?;
        if file.peft_type != "LORA" {
            return Err(bad(format!("peft_type '{}' is not LORA", file.peft_type)));
        }
        if file.use_dora {
            return Err(bad(
                "DoRA adapters (use_dora: true) are not supported".into()
            ));
        }
        if file.fan_in_fan_out {
            return Err(bad(
                "fan_in_fan_out adapters (GPT-2 Conv1D) are not supported".into(),
            ));
        }
        if !file.rank_pattern.is_empty() || !file.alpha_pattern.is_empty() {
            return Err(bad(
                "per-module rank_pattern/alpha_pattern are not supported".into(),
            ));
        }
        if file.bias.as_deref().is_some_and(|b| b != "none") {
            return Err(bad(format!(
                "bias '{}' is not supported (only 'none')",
                file.bias.unwrap_or_default()
            )));
        }
        if file.r == 0 {
            return Err(bad("r must be positive".into()));
        }
        let targets = match &file.target_modules {
            serde_json::Value::Array(list) => list
                .iter()
                .map(|v| {
                    let name = v.as_str().unwrap_or_default();
                    Proj::from_name(name).ok_or_else(|| {
                        bad(format!(
                            "target module '{name}' is not one of q,k,v,o,gate,up,down _proj"
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            other => {
                return Err(bad(format!(
                    "target_modules {other} must be a list of module names"
                )))
            }
        };
        let config = LoraConfig {
            r: file.r,
            alpha: file.lora_alpha,
            dropout: file.lora_dropout,
            targets: targets.clone(),
            use_rslora: file.use_rslora,
            base_model: file.base_model_name_or_path,
        };
        let st_path = dir.join(WEIGHTS_FILE);
        let tensors = crate::loader::read_safetensors(&st_path, device, DType::F32)?;
        let mut halves: BTreeMap<(usize, Proj), (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        // Sorted, so that the first problem reported is always the same one.
        let tensors: BTreeMap<String, Tensor> = tensors.into_iter().collect();
        for (key, t) in tensors {
            let (layer, proj, ab) = parse_peft_key(&key).ok_or_else(|| {
                bad(format!(
                    "unexpected tensor '{key}' (not a LoRA A/B weight of a decoder layer)"
                ))
            })?;
            if layer >= model.num_layers {
                return Err(bad(format!(
                    "tensor '{key}': layer {layer} but the model has {} layers",
                    model.num_layers
                )));
            }
            let (out, inp) = proj.shape(model);
            let expected = if ab == 'A' {
                vec![config.r, inp]
            } else {
                vec![out, config.r]
            };
            if t.dims() != expected.as_slice() {
                return Err(Error::ShapeMismatch {
                    path: st_path.clone(),
                    name: key,
                    expected,
                    found: t.dims().to_vec(),
                });
            }
            let slot = halves.entry((layer, proj)).or_default();
            if ab == 'A' {
                slot.0 = Some(t)
            } else {
                slot.1 = Some(t)
            }
        }
        let mut pairs = BTreeMap::new();
        for ((layer, proj), (a, b)) in halves {
            match (a, b) {
                (Some(a), Some(b)) => {
                    pairs.insert((layer, proj), LoraPair { a, b });
                }
                _ => {
                    return Err(bad(format!(
                        "layer {layer} {}: lora_A or lora_B is missing",
                        proj.name()
                    )))
                }
            }
        }
        if pairs.is_empty() {
            return Err(bad(format!("{} holds no LoRA tensors", st_path.display())));
        }
        Ok(Self { config, pairs })
    }

    /// Writes the adapter in PEFT's format into `dir` (created if needed).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (&(layer, proj), pair) in &self.pairs {
            map.insert(peft_key(layer, proj, 'A'), pair.a.clone());
            map.insert(peft_key(layer, proj, 'B'), pair.b.clone());
        }
        let st_path = dir.join(WEIGHTS_FILE);
        candle_core::safetensors::save(&map, &st_path)
            .map_err(|e| Error::bad_file(&st_path, "adapter weights (write)", e))?;
        let file = PeftConfigFile {
            peft_type: "LORA".into(),
            r: self.config.r,
            lora_alpha: self.config.alpha,
            lora_dropout: self.config.dropout,
            target_modules: serde_json::Value::Array(
                self.config
                    .targets
                    .iter()
                    .map(|p| serde_json::Value::String(p.name().into()))
                    .collect(),
            ),
            bias: Some("none".into()),
            use_rslora: self.config.use_rslora,
            use_dora: false,
            fan_in_fan_out: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            layers_to_transform: None,
            base_model_name_or_path: self.config.base_model.clone(),
            task_type: Some("CAUSAL_LM".into()),
            inference_mode: true,
            init_lora_weights: serde_json::Value::Bool(true),
        };
        let cfg_path = dir.join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(&file)
            .map_err(|e| Error::bad_file(&cfg_path, "adapter config (write)", e))?;
        std::fs::write(&cfg_path, text).map_err(|e| Error::io(&cfg_path, e))
    }

    /// `scaling * B @ A` for one projection: the weight delta `[out, in]`.
    pub fn delta(&self, layer: usize, proj: Proj) -> Result<Option<Tensor>> {
        match self.pairs.get(&(layer, proj)) {
            Some(p) => Ok(Some((p.b.matmul(&p.a)? * self.config.scaling())?)),
            None => Ok(None),
        }
    }

    /// The same adapter with every A and B made a trainable `Var` (cast to `dtype` when given),
    /// and the `Var`s under their PEFT key names (what gradients and optimizer state are keyed
    /// by). The returned adapter's tensors are the `Var`s' own, so a loss computed with it
    /// differentiates into them.
    pub fn trainable(&self, dtype: Option<DType>) -> Result<(LoraAdapter, Vec<(String, Var)>)> {
        let var = |t: &Tensor| match dtype {
            Some(d) => Var::from_tensor(&t.to_dtype(d)?),
            None => Var::from_tensor(t),
        };
        let mut vars = Vec::new();
        let mut pairs = BTreeMap::new();
        for (&(layer, proj), p) in &self.pairs {
            let (a, b) = (var(&p.a)?, var(&p.b)?);
            vars.push((peft_key(layer, proj, 'A'), a.clone()));
            vars.push((peft_key(layer, proj, 'B'), b.clone()));
            pairs.insert(
                (layer, proj),
                LoraPair {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                },
            );
        }
        let adapter = LoraAdapter {
            config: self.config.clone(),
            pairs,
        };
        Ok((adapter, vars))
    }

    /// All tensors under PEFT key names (for gradients and optimizer state files).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (&(layer, proj), pair) in &self.pairs {
            out.push((peft_key(layer, proj, 'A'), pair.a.clone()));
            out.push((peft_key(layer, proj, 'B'), pair.b.clone()));
        }
        out
    }
}
