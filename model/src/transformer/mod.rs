//! The decoder: Llama-family and Qwen2 blocks written on candle, one struct per block.
//!
//! Unlike candle-transformers' llama, every row of a batch has its own positions and a padding
//! mask, so ragged prompts batch together (left-padded: row b's real tokens start at cache column
//! `start[b]`). The KV cache is preallocated and written in place; grouped-query attention folds
//! the query heads of a KV head into the row dimension instead of copying K/V per head.
//!
//! Two modes share this code: inference (fused candle kernels, weights with any adapter merged in)
//! and training (ops with a backward, adapter applied unmerged so its tensors get gradients, and
//! frozen matmuls that only propagate the input gradient, see [`crate::grad`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

mod linear;

pub use linear::Linear;

use crate::bf16::Bf16Matrix;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::grad::{self, Frozen};
use crate::lora::{LoraAdapter, Proj};
use crate::onednn::{Dnnl, DnnlMatrix};

/// Self-attention with grouped-query heads and RoPE.
#[derive(Debug, Clone)]
pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
}

/// SwiGLU feed-forward.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// One decoder block.
#[derive(Debug, Clone)]
pub struct Block {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
}

impl Block {
    fn linear(&self, proj: Proj) -> &Linear {
        match proj {
            Proj::Q => &self.attn.q,
            Proj::K => &self.attn.k,
            Proj::V => &self.attn.v,
            Proj::O => &self.attn.o,
            Proj::Gate => &self.mlp.gate,
            Proj::Up => &self.mlp.up,
            Proj::Down => &self.mlp.down,
        }
    }
    fn linear_mut(&mut self, proj: Proj) -> &mut Linear {
        match proj {
            Proj::Q => &mut self.attn.q,
            Proj::K => &mut self.attn.k,
            Proj::V => &mut self.attn.v,
            Proj::O => &mut self.attn.o,
            Proj::Gate => &mut self.mlp.gate,
            Proj::Up => &mut self.mlp.up,
            Proj::Down => &mut self.mlp.down,
        }
    }
}

/// Preallocated key/value cache: per layer `[batch, kv_heads, capacity, head_dim]`.
#[derive(Debug)]
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    capacity: usize,
}

impl KvCache {
    pub fn new(
        cfg: &ModelConfig,
        batch: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim);
        let mut k = Vec::with_capacity(cfg.num_layers);
        let mut v = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            k.push(Tensor::zeros(shape, dtype, device)?);
            v.push(Tensor::zeros(shape, dtype, device)?);
        }
        Ok(Self { k, v, capacity })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// A left-padded batch, ready for a forward: ids, per-row RoPE tables and the additive mask.
#[derive(Debug)]
pub struct Inputs {
    /// `[b, t]` u32
    pub tokens: Tensor,
    /// `[b, t, head_dim/2]`
    cos: Tensor,
    sin: Tensor,
    /// `[b, 1, 1, t, offset + t]`: 0 where a query may attend, -inf elsewhere.
    mask: Tensor,
    /// Cache column of the first column of `tokens`.
    pub offset: usize,
}

/// What a forward pass does besides computing hidden states.
pub enum Mode<'a> {
    /// Inference without a cache (teacher-forced scoring).
    Plain,
    /// Inference writing K/V into `cache` at columns `offset..offset+t`.
    Cached(&'a mut KvCache),
    /// Training: the adapter's tensors (usually `Var`s) are applied unmerged.
    Train(&'a LoraAdapter),
}

/// The whole decoder.
#[derive(Debug, Clone)]
pub struct Transformer {
    pub cfg: ModelConfig,
    /// `[vocab, hidden]`
    embed: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    /// The output projection, used as `h @ lm_head` (`[hidden, vocab]`). Dense, it is the
    /// transposed view of the `[vocab, hidden]` matrix as stored (`embed` when tied): unlike the
    /// block weights it is kept in that layout, in which gemm runs `h @ W^T` and the decode-time
    /// `W @ h^T` fastest.
    lm_head: Frozen,
    /// `[max_positions, head_dim/2]`
    cos: Tensor,
    sin: Tensor,
    device: Device,
    dtype: DType,
}

impl Transformer {
    /// Builds the decoder from tensors under Hugging Face names, checking every shape.
    pub fn from_weights(
        cfg: &ModelConfig,
        mut w: HashMap<String, Tensor>,
        source: &Path,
        device: &Device,
    ) -> Result<Self> {
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = w.remove(name).ok_or_else(|| Error::MissingTensor {
                path: source.to_path_buf(),
                name: name.to_string(),
            })?;
            if t.dims() != shape {
                return Err(Error::ShapeMismatch {
                    path: source.to_path_buf(),
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            Ok(t)
        };
        let h = cfg.hidden_size;
        let embed = take("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let dtype = embed.dtype();
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |proj: Proj, bias: bool| -> Result<Linear> {
                let (out, inp) = proj.shape(cfg);
                let name = format!("{p}.{}.{}", proj.parent(), proj.name());
                let weight = take(&format!("{name}.weight"), &[out, inp])?;
                let bias = if bias {
                    Some(take(&format!("{name}.bias"), &[out])?)
                } else {
                    None
                };
                Linear::new(&weight, bias)
            };
            let qkv_bias = cfg.qkv_bias();
            let attn = Attention {
                q: lin(Proj::Q, qkv_bias)?,
                k: lin(Proj::K, qkv_bias)?,
                v: lin(Proj::V, qkv_bias)?,
                o: lin(Proj::O, false)?,
            };
            let mlp = Mlp {
                gate: lin(Proj::Gate, false)?,
                up: lin(Proj::Up, false)?,
                down: lin(Proj::Down, false)?,
            };
            layers.push(Block {
                input_norm: take(&format!("{p}.input_layernorm.weight"), &[h])?,
                attn,
                post_norm: take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp,
            });
        }
        let norm = take("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            take("lm_head.weight", &[cfg.vocab_size, h])?
        };
        let lm_head = Frozen::Dense(lm_head.t()?);
        let (cos, sin) = rope_tables(cfg, device)?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
            device: device.clone(),
            dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The output projection, `h @ lm_head` -> logits.
    pub fn lm_head(&self) -> &Frozen {
        &self.lm_head
    }

    /// Whether the block projections are bf16 (packed for the CPU kernel or oneDNN, or bf16
    /// tensors for cuBLAS on a GPU).
    pub fn is_bf16_packed(&self) -> bool {
        self.layers.first().is_some_and(|b| match &b.attn.q.base {
            Frozen::Bf16(_) => true,
            Frozen::Dnnl(m) => m.is_bf16(),
            _ => false,
        })
    }

    /// Which kernels run the block projections: `onednn`, `bf16-kernel` (ours or cuBLAS), or
    /// `candle`.
    pub fn matmul_backend(&self) -> &'static str {
        match self.layers.first().map(|b| &b.attn.q.base) {
            Some(Frozen::Dnnl(_)) => "onednn",
            Some(Frozen::Bf16(_)) => "bf16-kernel",
            _ => "candle",
        }
    }

    /// Packs the projections of every block in bf16 for [`crate::bf16`] (our CPU kernel, or
    /// cuBLAS with an f32 output on a CUDA device), dropping their dense copies; activations,
    /// norms, the embedding and the lm_head stay in the model's dtype. The lm_head stays because
    /// logprobs need its precision: on the SmolLM2 oracle a bf16 lm_head takes the worst
    /// teacher-forced logprob error from 4.5e-2 to 5.6e-2 (PyTorch's bf16 model: 1.3e-1), over
    /// the 5e-2 the engine promises. Only its backward
    /// (the learner's `dlogits @ W^T`, where bf16 rounding is gradient noise) gets a bf16
    /// packing. Any adapter must be set again after.
    pub fn pack_bf16(&mut self) -> Result<()> {
        for block in &mut self.layers {
            for proj in Proj::ALL {
                block.linear_mut(proj).pack_bf16()?;
            }
        }
        if let Frozen::Dense(w_t) = &self.lm_head {
            // `w_t` is `[hidden, vocab]`; as an `[out, in]` weight it multiplies `g @ w_t^T`.
            let backward = Arc::new(Bf16Matrix::from_out_in(w_t)?);
            self.lm_head = Frozen::Split {
                forward: w_t.clone(),
                backward,
            };
        }
        Ok(())
    }

    /// Reorders every frozen matrix for oneDNN ([`crate::onednn`]), dropping the dense copies of
    /// the block projections: all in f32, or all in bf16, the lm_head included (forward and
    /// the learner's `dlogits @ E`). Unlike [`Transformer::pack_bf16`], the lm_head may be bf16
    /// here, because the oracle says so: on the SmolLM2 oracle, oneDNN's bf16 lm_head gives a
    /// worst teacher-forced logprob error of 4.3e-2 (its f32 lm_head: 3.5e-2; the bound: 5e-2;
    /// our own kernel with a bf16 lm_head: 5.6e-2), greedy ids equal to the first near-tie,
    /// and the tiny model's gradients within their bf16 bound, for scoring 12% faster. Any
    /// adapter must be set again after.
    pub fn pack_onednn(&mut self, lib: &'static Dnnl, bf16: bool) -> Result<()> {
        for block in &mut self.layers {
            for proj in Proj::ALL {
                block.linear_mut(proj).pack_onednn(lib, bf16)?;
            }
        }
        if let Frozen::Dense(w_t) = &self.lm_head {
            // `w_t` is `[hidden, vocab]`, the transposed view of `E` `[vocab, hidden]`, which
            // packs as an `[out, in]` weight (its backward layout is made on first use).
            let m = DnnlMatrix::from_out_in(lib, &w_t.t()?, bf16)?;
            self.lm_head = Frozen::Dnnl(Arc::new(m));
        }
        Ok(())
    }

    /// Logits of a few rows (decoding): `h` `[n, hidden]` -> `[n, vocab]` f32. Dense, computed
    /// as `(W @ h^T)^T` with `W` `[vocab, hidden]`, the fast orientation for small `n`.
    pub fn decode_logits(&self, h: &Tensor) -> Result<Tensor> {
        let logits = match &self.lm_head {
            Frozen::Dense(w_t) | Frozen::Split { forward: w_t, .. } => {
                w_t.t()?.matmul(&h.t()?)?.t()?
            }
            other => other.matmul(h)?,
        };
        Ok(logits.to_dtype(DType::F32)?.contiguous()?)
    }

    /// Sets `adapter` for inference (replacing any set before), applied unmerged next to the
    /// frozen weights. `None` returns to the base weights, which are never modified.
    pub fn set_adapter(&mut self, adapter: Option<&LoraAdapter>) -> Result<()> {
        for (l, block) in self.layers.iter_mut().enumerate() {
            for proj in Proj::ALL {
                block.linear_mut(proj).set_adapter(adapter, l, proj)?;
            }
        }
        Ok(())
    }

    /// Builds the inputs of a left-padded batch. `rows[b]` are the row's new tokens (all rows the
    /// same length `t`); `start[b]` is the cache column of the row's first real token; `offset` the
    /// cache column of the first new token.
    pub fn inputs(
        &self,
        tokens: Vec<u32>,
        b: usize,
        t: usize,
        start: &[usize],
        offset: usize,
    ) -> Result<Inputs> {
        let total = offset + t;
        let mut positions = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t * total);
        for &s in start.iter().take(b) {
            for i in 0..t {
                let col = offset + i;
                positions.push(col.saturating_sub(s) as u32);
                for j in 0..total {
                    let ok = (j >= s && j <= col) || j == col;
                    mask.push(if ok { 0f32 } else { f32::NEG_INFINITY });
                }
            }
        }
        if let Some(&max) = positions.iter().max() {
            if max as usize >= self.cfg.max_position_embeddings {
                return Err(Error::InvalidRequest(format!(
                    "sequence of {} tokens is longer than the model's context ({} positions)",
                    max + 1,
                    self.cfg.max_position_embeddings
                )));
            }
        }
        let dev = &self.device;
        let pos = Tensor::from_vec(positions, b * t, dev)?;
        let half = self.cfg.head_dim / 2;
        Ok(Inputs {
            tokens: Tensor::from_vec(tokens, (b, t), dev)?,
            cos: self.cos.index_select(&pos, 0)?.reshape((b, t, half))?,
            sin: self.sin.index_select(&pos, 0)?.reshape((b, t, half))?,
            mask: Tensor::from_vec(mask, (b, 1, 1, t, total), dev)?.to_dtype(self.dtype)?,
            offset,
        })
    }

    /// Hidden states after the final norm: `[b, t, hidden]`.
    pub fn hidden(&self, inp: &Inputs, mut mode: Mode<'_>) -> Result<Tensor> {
        let (b, t) = inp.tokens.dims2()?;
        let h = self.cfg.hidden_size;
        let ids = inp.tokens.flatten_all()?;
        let mut x = self.embed.index_select(&ids, 0)?.reshape((b, t, h))?;
        for (l, block) in self.layers.iter().enumerate() {
            x = self.block(l, block, &x, inp, &mut mode)?;
        }
        self.rms_norm(&x, &self.norm)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(grad::rms_norm(x, w, self.cfg.rms_norm_eps)?)
    }

    fn proj(
        &self,
        l: usize,
        block: &Block,
        proj: Proj,
        x: &Tensor,
        mode: &Mode<'_>,
    ) -> Result<Tensor> {
        let lin = block.linear(proj);
        match mode {
            Mode::Train(adapter) => match adapter.pairs.get(&(l, proj)) {
                Some(pair) => lin.forward(x, Some((pair, adapter.config.scaling()))),
                None => lin.forward_frozen(x),
            },
            _ => lin.forward(x, None),
        }
    }

    fn block(
        &self,
        l: usize,
        block: &Block,
        x: &Tensor,
        inp: &Inputs,
        mode: &mut Mode<'_>,
    ) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);

        // Attention.
        let xn = self.rms_norm(x, &block.input_norm)?.reshape((b * t, h))?;
        let q = self.proj(l, block, Proj::Q, &xn, mode)?;
        let k = self.proj(l, block, Proj::K, &xn, mode)?;
        let v = self.proj(l, block, Proj::V, &xn, mode)?;
        // [b, heads, t, hd]
        let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = grad::rope(&q, &inp.cos, &inp.sin)?;
        let k = grad::rope(&k, &inp.cos, &inp.sin)?;
        // Keys and values seen by the queries: [b, nkv, total, hd].
        let (k, v) = match mode {
            Mode::Cached(cache) => {
                let total = inp.offset + t;
                if total > cache.capacity {
                    return Err(Error::InvalidRequest(format!(
                        "KV cache of {} columns cannot hold {total}",
                        cache.capacity
                    )));
                }
                cache.k[l].slice_set(&k, 2, inp.offset)?;
                cache.v[l].slice_set(&v, 2, inp.offset)?;
                (
                    cache.k[l].narrow(2, 0, total)?,
                    cache.v[l].narrow(2, 0, total)?,
                )
            }
            _ => (k, v),
        };
        let attn = grad::attention(&q, &k, &v, &inp.mask)? // [b, nh, t, hd]
            .transpose(1, 2)?
            .reshape((b * t, nh * hd))?;
        let o = self
            .proj(l, block, Proj::O, &attn, mode)?
            .reshape((b, t, h))?;
        let x = (x + o)?;

        // Feed-forward.
        let xn = self.rms_norm(&x, &block.post_norm)?.reshape((b * t, h))?;
        let gate = self.proj(l, block, Proj::Gate, &xn, mode)?;
        let up = self.proj(l, block, Proj::Up, &xn, mode)?;
        let ff = self.proj(l, block, Proj::Down, &grad::silu_mul(&gate, &up)?, mode)?;
        Ok((x + ff.reshape((b, t, h))?)?)
    }
}

/// cos/sin of `position * theta^(-2i/hd)` (after the config's RoPE scaling) for every position
/// up to the context length.
fn rope_tables(cfg: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let n = cfg.max_position_embeddings;
    let inv = cfg.rope_scaling.inv_freq(cfg.rope_theta, cfg.head_dim);
    let inv = Tensor::from_vec(inv, (1, half), device)?;
    let pos = Tensor::arange(0u32, n as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((n, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

impl KvCache {
    /// Keeps only the batch rows in `idx` (a `[k]` u32 tensor), in that order.
    pub fn select_rows(&self, idx: &Tensor) -> Result<KvCache> {
        let pick = |ts: &[Tensor]| -> Result<Vec<Tensor>> {
            ts.iter().map(|t| Ok(t.index_select(idx, 0)?)).collect()
        };
        Ok(KvCache {
            k: pick(&self.k)?,
            v: pick(&self.v)?,
            capacity: self.capacity,
        })
    }
}
