//! The engine: a loaded model with its tokenizer and chat template, and the operations the
//! services need: batched sampling of ragged prompts, teacher-forced scoring, adapter swaps, and
//! the differentiable logprobs the learner trains through.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use sampling::ScoreTemperature;

use crate::chat::{ChatTemplate, Message};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::grad;
use crate::lora::LoraAdapter;
use crate::request::{GenerateRequest, Limits, ScoreRequest};
use crate::sampler::{FinishReason, RowSampler};
use crate::tokenizer::Tokenizer;
use crate::transformer::{KvCache, Mode, Transformer};

/// One decoded token of a request (`request`: its index in the batch given to
/// [`Engine::generate_with`]), as soon as it is sampled.
#[derive(Debug, Clone, Copy)]
pub struct TokenEvent<'a> {
    pub request: usize,
    pub token: u32,
    pub logprob: f32,
    /// The most likely alternatives (empty unless the request asked for `top_logprobs`).
    pub top: &'a [(u32, f32)],
}

/// A sampled continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// Logprob of each token under the distribution it was sampled from.
    pub logprobs: Vec<f32>,
    /// At each step, the `top_logprobs` most likely tokens (empty when not asked for).
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub finish_reason: FinishReason,
}

/// Differentiable logprobs of a batch of completions.
#[derive(Debug)]
pub struct TrainLogprobs {
    /// `[n]` f32: the completion tokens of every sequence, concatenated in input order.
    pub logprobs: Tensor,
    /// Where each sequence starts in `logprobs` (length = sequences + 1).
    pub offsets: Vec<usize>,
}

/// A loaded model ready to sample, score and train.
pub struct Engine {
    model: Transformer,
    tokenizer: Option<Tokenizer>,
    /// The compiled chat template, or why there is none.
    template: std::result::Result<ChatTemplate, String>,
    adapter: Option<LoraAdapter>,
    source: PathBuf,
    pad_id: u32,
    /// Rows of logits materialised at once when scoring (default: about 24 MB of logits).
    pub logits_chunk: usize,
    /// Tokens (rows x padded length) per scoring forward.
    pub score_tokens: usize,
    /// Bytes of attention scores (rows x heads x length^2) per scoring forward.
    pub score_attention_bytes: usize,
}

/// Buffers are kept under glibc's largest mmap threshold (32 MB, see [`crate::alloc`]) so that
/// they are reused from the heap rather than mapped and zeroed afresh.
const BUFFER_BYTES: usize = 24 << 20;

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("source", &self.source)
            .field("config", &self.model.cfg)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Loads a `.gguf` file or a Hugging Face folder. `bf16` means frozen block weights in bf16
    /// with f32 activations, norms, lm_head and adapters (see [`crate::bf16`]). On a CUDA device
    /// the products run through cuBLAS; on the CPU through oneDNN when this process uses it
    /// ([`crate::onednn`], f32 and bf16 alike), else through our bf16 kernel, or the f32 path
    /// when this CPU has no bf16 dot-product instructions (with a warning). Other dtypes load
    /// the weights as they are.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let bf16 = dtype == DType::BF16;
        let load_dtype = if bf16 { DType::F32 } else { dtype };
        let onednn = if device.is_cpu() && (bf16 || dtype == DType::F32) {
            crate::onednn::library().map_err(Error::Device)?
        } else {
            None
        };
        let loaded = crate::loader::load(path, device, load_dtype)?;
        let mut model =
            Transformer::from_weights(&loaded.config, loaded.weights, &loaded.source, device)?;
        let bf16_runs = bf16 && crate::bf16::runs_on(device);
        if let Some(lib) = onednn {
            if bf16 && !bf16_runs {
                tracing::warn!(
                    "oneDNN has no bf16 matmul kernel for this CPU ({}): dtype bf16 runs in f32",
                    crate::onednn::status().description
                );
            }
            model.pack_onednn(lib, bf16_runs)?;
        } else if bf16 {
            if bf16_runs {
                model.pack_bf16()?;
            } else {
                tracing::warn!(
                    "this CPU has no AVX512-BF16: dtype bf16 runs the f32 path ({})",
                    crate::bf16::amx_bf16_status()
                        .err()
                        .unwrap_or_else(|| "AMX-BF16 present but no AMX kernel yet".into())
                );
            }
        }
        if device.is_cpu() {
            tracing::info!(
                "matmul backend: {} (block projections: {})",
                crate::onednn::status().description,
                model.matmul_backend()
            );
        }
        if let Some(tok) = &loaded.tokenizer {
            if tok.vocab_size() > loaded.config.vocab_size {
                tracing::warn!(
                    "tokenizer has {} ids but the model only {}; ids beyond are refused",
                    tok.vocab_size(),
                    loaded.config.vocab_size
                );
            }
        }
        // A template that does not compile only matters to chat requests: token-id users
        // (scorer, learner) still load the model, and chat requests get the error.
        let template = match &loaded.chat_template {
            Some(src) => {
                ChatTemplate::new(src, &loaded.bos_token, &loaded.eos_token).map_err(|e| {
                    tracing::warn!("{}: {e}", loaded.source.display());
                    e.to_string()
                })
            }
            None => Err(format!(
                "{} has no chat template; send a plain completion prompt instead",
                loaded.source.display()
            )),
        };
        let vocab = loaded.config.vocab_size as u32;
        let pad_id = [
            loaded.config.pad_token_id,
            loaded.config.eos_token_ids.first().copied(),
        ]
        .into_iter()
        .flatten()
        .find(|&id| id < vocab)
        .unwrap_or(0);
        Ok(Self {
            model,
            tokenizer: loaded.tokenizer,
            template,
            adapter: None,
            source: loaded.source,
            pad_id,
            logits_chunk: (BUFFER_BYTES / (4 * vocab as usize)).clamp(16, 256),
            score_tokens: 4096,
            score_attention_bytes: BUFFER_BYTES,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    /// What a request to this engine must fit (its constructor checks it).
    pub fn limits(&self) -> Limits {
        Limits {
            vocab: self.model.cfg.vocab_size,
            context: self.model.cfg.max_position_embeddings,
        }
    }

    /// The tokenizer; an error for a model folder that has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| Error::MissingFile {
            path: self.source.join("tokenizer.json"),
            what: "tokenizer",
            hint: "this model can only be used with token ids; add tokenizer.json to use text",
        })
    }

    pub fn device(&self) -> &Device {
        self.model.device()
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn transformer(&self) -> &Transformer {
        &self.model
    }

    /// Who runs this model's block projections (`onednn`, `bf16-kernel`: ours or cuBLAS,
    /// `candle`) and, for oneDNN, the instruction set it dispatches to: what the services'
    /// `/metrics` and logs say.
    pub fn matmul_backend(&self) -> (&'static str, Option<&'static str>) {
        let kernels = self.model.matmul_backend();
        let isa = (kernels == "onednn")
            .then(|| crate::onednn::status().isa)
            .flatten();
        (kernels, isa)
    }

    /// The inference adapter, if any.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.adapter.as_ref()
    }

    /// The model's chat template, or why there is none.
    pub fn chat_template(&self) -> Result<&ChatTemplate> {
        self.template
            .as_ref()
            .map_err(|why| Error::Template(why.clone()))
    }

    /// Renders messages with the model's chat template.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        match &self.template {
            Ok(t) => t.render(messages, add_generation_prompt),
            Err(why) => Err(Error::Template(why.clone())),
        }
    }

    /// Replaces the adapter (kept apart from the frozen weights, in f32); `None` returns to the
    /// base. The base weights stay loaded: a swap copies the adapter's small factors.
    pub fn set_adapter(&mut self, adapter: Option<LoraAdapter>) -> Result<()> {
        self.model.set_adapter(adapter.as_ref())?;
        self.adapter = adapter;
        Ok(())
    }

    /// Loads a PEFT adapter folder and swaps it in.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let adapter = LoraAdapter::load(dir, &self.model.cfg, self.device())?;
        self.set_adapter(Some(adapter))
    }

    /// Samples a continuation of every request, all rows in one batch.
    pub fn generate(&self, requests: &[GenerateRequest]) -> Result<Vec<Generation>> {
        self.generate_with(requests, &mut |_: &TokenEvent<'_>| true)
    }

    /// [`Engine::generate`], telling `on_token` each token as it is decoded; a row whose
    /// `on_token` answers `false` (its reader went away) stops there and leaves the batch.
    pub fn generate_with(
        &self,
        requests: &[GenerateRequest],
        on_token: &mut dyn FnMut(&TokenEvent<'_>) -> bool,
    ) -> Result<Vec<Generation>> {
        if requests.is_empty() {
            return Ok(vec![]);
        }
        // Checked when they were built; only for this model's limits.
        let limits = self.limits();
        for r in requests {
            limits.same(r.limits())?;
        }
        let n = requests.len();
        let plen = requests.iter().map(|r| r.prompt().len()).max().unwrap_or(0);
        let max_new = requests
            .iter()
            .map(|r| usize::from(r.params().knobs.max_tokens))
            .max()
            .unwrap_or(0);
        // Prefill, left-padded.
        let mut start: Vec<usize> = requests.iter().map(|r| plen - r.prompt().len()).collect();
        let mut tokens = Vec::with_capacity(n * plen);
        for r in requests {
            tokens.extend(std::iter::repeat_n(self.pad_id, plen - r.prompt().len()));
            tokens.extend_from_slice(r.prompt());
        }
        let mut cache = KvCache::new(
            &self.model.cfg,
            n,
            plen + max_new,
            self.model.dtype(),
            self.device(),
        )?;
        let inputs = self.model.inputs(tokens, n, plen, &start, 0)?;
        let hidden = self.model.hidden(&inputs, Mode::Cached(&mut cache))?;
        let mut last = hidden.narrow(1, plen - 1, 1)?.squeeze(1)?; // [n, hidden]

        let mut samplers: Vec<RowSampler> = requests
            .iter()
            .map(|r| RowSampler::new(r.params().clone()))
            .collect();
        let mut out: Vec<Generation> = (0..n)
            .map(|_| Generation {
                tokens: vec![],
                logprobs: vec![],
                top_logprobs: vec![],
                finish_reason: FinishReason::Length,
            })
            .collect();
        // rows[i]: the request decoded in batch row i, None once it finished.
        let mut rows: Vec<Option<usize>> = (0..n).map(Some).collect();
        let mut offset = plen;
        loop {
            let live: Vec<usize> = (0..rows.len()).filter(|&r| rows[r].is_some()).collect();
            if live.len() < rows.len() {
                last = last.index_select(&self.row_index(&live)?, 0)?;
            }
            let logits = self.model.decode_logits(&last)?.to_vec2::<f32>()?;
            // Sample the live rows in parallel (each row has its own RNG, so the order is free).
            let mut logits_of_req: Vec<Option<&[f32]>> = vec![None; n];
            for (k, &row) in live.iter().enumerate() {
                if let Some(req) = rows[row] {
                    logits_of_req[req] = Some(&logits[k]);
                }
            }
            type Pick = (u32, f32, Vec<(u32, f32)>);
            let mut picks: Vec<Option<Pick>> = samplers
                .par_iter_mut()
                .zip(logits_of_req.par_iter())
                .map(|(s, lg)| {
                    lg.map(|lg| {
                        let (id, lp) = s.sample(lg);
                        (id, lp, s.top(lg, s.params().top_logprobs))
                    })
                })
                .collect();
            let mut next = vec![self.pad_id; rows.len()];
            for &row in &live {
                let Some(req) = rows[row] else { continue };
                let Some((id, lp, top)) = picks[req].take() else {
                    continue;
                };
                let g = &mut out[req];
                g.tokens.push(id);
                g.logprobs.push(lp);
                let params = samplers[req].params();
                let wanted = on_token(&TokenEvent {
                    request: req,
                    token: id,
                    logprob: lp,
                    top: &top,
                });
                if params.top_logprobs > 0 {
                    g.top_logprobs.push(top);
                }
                if !wanted {
                    rows[row] = None;
                } else if params.stop_ids.contains(&id)
                    || params.stop_sequences.iter().any(|s| g.tokens.ends_with(s))
                {
                    g.finish_reason = FinishReason::Stop;
                    rows[row] = None;
                } else if g.tokens.len() >= usize::from(params.knobs.max_tokens) {
                    rows[row] = None;
                } else {
                    next[row] = id;
                }
                if rows[row].is_none() {
                    // Until compaction drops it, the finished row is fed padding at position 0
                    // that attends only to itself (its positions must not outgrow the context).
                    start[row] = offset;
                }
            }
            let live: Vec<usize> = (0..rows.len()).filter(|&r| rows[r].is_some()).collect();
            if live.is_empty() {
                break;
            }
            // Drop finished rows from the batch once enough finished to pay for copying the cache;
            // until then they are fed padding and their output is ignored.
            if live.len() * 4 <= rows.len() * 3 {
                cache = cache.select_rows(&self.row_index(&live)?)?;
                start = live.iter().map(|&r| start[r]).collect();
                next = live.iter().map(|&r| next[r]).collect();
                rows = live.iter().map(|&r| rows[r]).collect();
            }
            let inputs = self.model.inputs(next, rows.len(), 1, &start, offset)?;
            let hidden = self.model.hidden(&inputs, Mode::Cached(&mut cache))?;
            last = hidden.squeeze(1)?;
            offset += 1;
        }
        Ok(out)
    }

    fn row_index(&self, rows: &[usize]) -> Result<Tensor> {
        let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        Ok(Tensor::from_vec(ids, rows.len(), self.device())?)
    }

    /// `Err` unless every sequence was built for this model's limits.
    fn check_built(&self, seqs: &[ScoreRequest]) -> Result<()> {
        let limits = self.limits();
        seqs.iter().try_for_each(|s| limits.same(s.limits()))
    }

    /// Groups sequences (by length, to limit padding) into forwards of at most `score_tokens`
    /// padded tokens. Returns batches of input indices.
    fn score_batches(&self, seqs: &[ScoreRequest]) -> Vec<Vec<usize>> {
        let len = |i: usize| seqs[i].prompt().len() + seqs[i].completion().len();
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(len(i)));
        let mut batches: Vec<Vec<usize>> = vec![];
        let mut current: Vec<usize> = vec![];
        let mut width = 0;
        for i in order {
            let w = width.max(len(i));
            let rows = current.len() + 1;
            let attention = rows * self.model.cfg.num_heads * w * w * 4;
            if !current.is_empty()
                && (w * rows > self.score_tokens || attention > self.score_attention_bytes)
            {
                batches.push(std::mem::take(&mut current));
                width = 0;
            }
            width = width.max(len(i));
            current.push(i);
        }
        if !current.is_empty() {
            batches.push(current);
        }
        batches
    }

    /// Runs one left-padded forward over `seqs[idx]` and returns the final hidden state of every
    /// position that predicts a completion token `[n, hidden]`, with those tokens.
    fn completion_hidden(
        &self,
        seqs: &[ScoreRequest],
        idx: &[usize],
        mode: Mode<'_>,
    ) -> Result<(Tensor, Vec<u32>)> {
        let width = idx
            .iter()
            .map(|&i| seqs[i].prompt().len() + seqs[i].completion().len())
            .max()
            .unwrap_or(0);
        let b = idx.len();
        let mut tokens = Vec::with_capacity(b * width);
        let mut start = Vec::with_capacity(b);
        let mut picks = Vec::new();
        let mut targets = Vec::new();
        for (row, &i) in idx.iter().enumerate() {
            let s = &seqs[i];
            let (prompt, completion) = (s.prompt(), s.completion());
            let pad = width - prompt.len() - completion.len();
            start.push(pad);
            tokens.extend(std::iter::repeat_n(self.pad_id, pad));
            tokens.extend_from_slice(prompt);
            tokens.extend_from_slice(completion);
            for (k, &tok) in completion.iter().enumerate() {
                picks.push((row * width + pad + prompt.len() - 1 + k) as u32);
                targets.push(tok);
            }
        }
        let inputs = self.model.inputs(tokens, b, width, &start, 0)?;
        let hidden = self.model.hidden(&inputs, mode)?;
        let h = hidden.reshape((b * width, self.model.cfg.hidden_size))?;
        let n = picks.len();
        let picks = Tensor::from_vec(picks, n, self.device())?;
        Ok((h.index_select(&picks, 0)?, targets))
    }

    /// Per-token logprobs of each completion given its prompt (teacher forcing), under
    /// `softmax(logits / temperature)`, with the current adapter. Results are in input order.
    pub fn score(
        &self,
        seqs: &[ScoreRequest],
        temperature: ScoreTemperature,
    ) -> Result<Vec<Vec<f32>>> {
        self.check_built(seqs)?;
        let temperature = temperature.get();
        let mut out: Vec<Vec<f32>> = vec![vec![]; seqs.len()];
        for batch in self.score_batches(seqs) {
            let (h, targets) = self.completion_hidden(seqs, &batch, Mode::Plain)?;
            let lp = grad::logprobs_detached(
                &h,
                self.model.lm_head(),
                &targets,
                temperature,
                self.logits_chunk,
            )?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
            let mut at = 0;
            for &i in &batch {
                let len = seqs[i].completion().len();
                out[i] = lp[at..at + len].to_vec();
                at += len;
            }
        }
        Ok(out)
    }

    /// Logprobs of every vocabulary id as the next token after `prompt`.
    pub fn next_token_logprobs(&self, prompt: &[u32]) -> Result<Vec<f32>> {
        ScoreRequest::new("prompt", prompt.to_vec(), vec![], self.limits())?;
        let t = prompt.len();
        let inputs = self.model.inputs(prompt.to_vec(), 1, t, &[0], 0)?;
        let hidden = self.model.hidden(&inputs, Mode::Plain)?;
        let last = hidden
            .narrow(1, t - 1, 1)?
            .reshape((1, self.model.cfg.hidden_size))?;
        let logits = self
            .model
            .decode_logits(&last)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        Ok(crate::sampler::log_softmax(&logits))
    }

    /// Differentiable logprobs of the completions of `seqs` (one forward, no length batching:
    /// the caller sizes micro-batches), with `adapter` applied unmerged so that gradients reach
    /// its tensors (make them `Var`s). Frozen weights receive no gradient.
    pub fn train_logprobs(
        &self,
        seqs: &[ScoreRequest],
        adapter: &LoraAdapter,
        temperature: ScoreTemperature,
    ) -> Result<TrainLogprobs> {
        self.check_built(seqs)?;
        let temperature = temperature.get();
        let idx: Vec<usize> = (0..seqs.len()).collect();
        let (h, targets) = self.completion_hidden(seqs, &idx, Mode::Train(adapter))?;
        let logprobs = grad::target_logprobs(
            &h,
            self.model.lm_head(),
            &targets,
            temperature,
            self.logits_chunk,
        )?;
        let mut offsets = vec![0];
        for s in seqs {
            offsets.push(offsets[offsets.len() - 1] + s.completion().len());
        }
        Ok(TrainLogprobs { logprobs, offsets })
    }
}
