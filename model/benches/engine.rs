//! Engine benchmark on the SmolLM2 shape, the numbers of DESIGN.md section 9 and the engine issue:
//! matmul peak, sampler tokens/s at batch 1/8/32 (150-token prompts, 128 new tokens),
//! teacher-forced logprobs for 16 x 300 tokens, a LoRA r8 forward + backward + AdamW step on
//! 16 x 300 in micro-batches, the peak RSS of each, and model FLOP utilisation against the
//! measured matmul peak. `scripts/bench` runs it beside the PyTorch reference and prints ratios.
//!
//! cargo bench -p model --bench engine -- [--model PATH] [--device cpu|cuda:N] [--dtype f32]
//!     [--repeats N] [--quick] [--only gemm,sample,score,swap,train] [--json FILE]
//! On the CPU it first runs the GEMM microbenchmark of the matmul backend in use (oneDNN, in the
//! dtype's weights; else our bf16 kernel with `--dtype bf16` on a CPU with AVX512-BF16): 2048^3
//! and SmolLM2's shapes, GFLOP/s and fraction of the `vdpbf16ps` register-only peak; the JSON
//! names the backend and oneDNN's ISA (`matmul_backend`). On a GPU
//! (`--device cuda:0`, a `--features cuda` build) every timing ends with a device synchronize, and
//! the model can be any local folder (`scripts/gpu-check run` benches random SmolLM2- and
//! Llama-3.2-1B-shaped ones made by transformers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use model::{
    Engine, GenerateRequest, LoraAdapter, LoraConfig, LoraPair, Proj, SamplingParams, ScoreRequest,
};
use rand::{Rng, SeedableRng};
use sampling::{Knobs, MaxTokens, ScoreTemperature};
use serde_json::json;

struct Args {
    model: std::path::PathBuf,
    device: Device,
    dtype: DType,
    repeats: usize,
    quick: bool,
    only: Vec<String>,
    json: Option<std::path::PathBuf>,
}

fn args() -> Args {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut a = Args {
        model: root.join("assets/SmolLM2-135M-Instruct.Q4_1.gguf"),
        device: Device::Cpu,
        dtype: DType::F32,
        repeats: 3,
        quick: false,
        only: vec![],
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--model" => a.model = it.next().expect("--model PATH").into(),
            "--dtype" => a.dtype = model::dtype(&it.next().expect("--dtype NAME")).expect("dtype"),
            "--device" => {
                let name = it.next().expect("--device NAME");
                a.device = model::device(&name).unwrap_or_else(|e| {
                    eprintln!("engine bench: --device {name}: {e}");
                    std::process::exit(2)
                })
            }
            "--repeats" => a.repeats = it.next().expect("--repeats N").parse().expect("a number"),
            "--quick" => a.quick = true,
            "--only" => {
                a.only = it
                    .next()
                    .expect("--only LIST")
                    .split(',')
                    .map(str::to_string)
                    .collect()
            }
            "--json" => a.json = Some(it.next().expect("--json FILE").into()),
            "--bench" => {}
            other => {
                eprintln!(
                    "engine bench: unknown argument {other:?}\n\
                     usage: engine [--model PATH] [--device cpu|cuda:N] [--dtype f32|bf16] \
                     [--repeats N] [--quick] \
                     [--only gemm,sample,score,swap,train] [--json FILE]"
                );
                std::process::exit(2);
            }
        }
    }
    a
}

/// Peak resident set (VmHWM) in bytes since the last reset.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Resets VmHWM to the current RSS (Linux: `echo 5 > /proc/self/clear_refs`).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// One warm-up, then the median of `repeats` timings (seconds), each ending when `device` has
/// finished the work queued (a GPU runs asynchronously).
fn time(device: &Device, repeats: usize, mut f: impl FnMut()) -> f64 {
    let mut run = || {
        f();
        device.synchronize().expect("device synchronize");
    };
    run();
    median(
        (0..repeats.max(1))
            .map(|_| {
                let t = Instant::now();
                run();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Forward FLOPs per token at context length `ctx`: 2 x (non-embedding matmul weights + lm_head)
/// + attention (QK^T and PV: 4 x layers x heads x head_dim x ctx).
fn forward_flops_per_token(e: &Engine, ctx: f64) -> f64 {
    let c = e.config();
    let per_layer: usize = Proj::ALL
        .iter()
        .map(|p| {
            let (o, i) = p.shape(c);
            o * i
        })
        .sum();
    let weights = (per_layer * c.num_layers + c.vocab_size * c.hidden_size) as f64;
    2.0 * weights + 4.0 * (c.num_layers * c.num_heads * c.head_dim) as f64 * ctx
}

fn random_ids(rng: &mut rand::rngs::StdRng, n: usize, vocab: usize) -> Vec<u32> {
    // Skip the low ids where the special tokens are.
    (0..n)
        .map(|_| rng.random_range(100..vocab as u32))
        .collect()
}

fn main() {
    model::alloc::tune();
    let a = args();
    let device = a.device.clone();
    let want = |m: &str| a.only.is_empty() || a.only.iter().any(|o| o == m);
    let mut out = serde_json::Map::new();
    out.insert("impl".into(), json!("candle-engine"));
    out.insert(
        "dtype".into(),
        json!(format!("{:?}", a.dtype).to_lowercase()),
    );
    out.insert(
        "threads".into(),
        json!(candle_core::utils::get_num_threads()),
    );
    out.insert("device".into(), json!(format!("{:?}", device.location())));
    out.insert("model".into(), json!(a.model.display().to_string()));

    // The CPU matmul backend (oneDNN or ours) and, for it, the GEMMs of SmolLM2's shapes.
    let onednn = if device.is_cpu() && matches!(a.dtype, DType::F32 | DType::BF16) {
        model::onednn::library().expect("MATMUL_BACKEND")
    } else {
        None
    };
    let onednn_bf16 = a.dtype == DType::BF16 && model::onednn::bf16_kernel().is_some();
    let status = model::onednn::status();
    eprintln!("matmul backend: {}", status.description);
    out.insert(
        "matmul_backend".into(),
        json!({"backend": if onednn.is_some() { "onednn" } else { "native" },
               "description": status.description, "isa": status.isa,
               "bf16_kernel": model::onednn::bf16_kernel()}),
    );
    let bf16_kernel =
        onednn.is_none() && device.is_cpu() && a.dtype == DType::BF16 && model::bf16::available();
    if a.dtype == DType::BF16 {
        match model::bf16::amx_bf16_status() {
            Ok(()) if onednn_bf16 => eprintln!("AMX-BF16 present: oneDNN dispatches to it"),
            Ok(()) => {
                eprintln!("AMX-BF16 present, but our kernel has no AMX path: AVX512-BF16 runs")
            }
            Err(why) => eprintln!("no AMX: {why}"),
        }
    }
    let mut backend_peak = None;
    if (bf16_kernel || onednn.is_some()) && want("gemm") {
        let peak = if model::bf16::available() {
            model::bf16::peak_gflops(1.0)
        } else {
            f64::NAN
        };
        eprintln!("bf16 register-only peak (vdpbf16ps): {peak:.1} GFLOP/s");
        let big = if a.quick { 1024 } else { 2048 };
        let mut rows = vec![];
        // (name, m, k, n): the square reference, then SmolLM2's projections on a 16 x 300
        // scoring batch, a batch-32 decode step, and a 256-row chunk of the vocabulary head.
        let shapes: [(&str, usize, usize, usize); 9] = [
            ("square", big, big, big),
            ("q/o proj 4800x576x576", 4800, 576, 576),
            ("k/v proj 4800x576x192", 4800, 576, 192),
            ("gate/up 4800x576x1536", 4800, 576, 1536),
            ("down 4800x1536x576", 4800, 1536, 576),
            ("decode gate/up 32x576x1536", 32, 576, 1536),
            ("decode q 32x576x576", 32, 576, 576),
            ("decode gate/up 1x576x1536", 1, 576, 1536),
            ("lm_head chunk 256x576x49152", 256, 576, 49152),
        ];
        let which = if onednn.is_some() {
            "onednn"
        } else {
            "bf16 kernel"
        };
        for (name, m, k, n) in shapes {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i % 97) as f32 - 48.0) / 64.0)
                .collect();
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i % 89) as f32 - 44.0) / 64.0)
                .collect();
            let flops = 2.0 * (m * k * n) as f64;
            let reps = ((2e9 / flops) as usize).clamp(a.repeats, 200);
            let s = match onednn {
                Some(lib) => {
                    // The weight as stored, [out, in] = w^T, and x as a tensor: what the
                    // engine calls, conversions included.
                    let wt = Tensor::from_vec(w, (k, n), &device).unwrap().t().unwrap();
                    let mat =
                        model::onednn::DnnlMatrix::from_out_in(lib, &wt, onednn_bf16).unwrap();
                    let xt = Tensor::from_vec(x, (m, k), &device).unwrap();
                    time(&device, reps, || {
                        std::hint::black_box(mat.forward(&xt).unwrap());
                    })
                }
                None => {
                    let packed = model::bf16::Packed::from_k_n(&w, k, n);
                    time(&device, reps, || {
                        std::hint::black_box(packed.matmul(&x, m));
                    })
                }
            };
            let gflops = flops / s / 1e9;
            eprintln!(
                "{which} gemm {name}: {gflops:.1} GFLOP/s ({:.0}% of the vdpbf16ps peak)",
                100.0 * gflops / peak
            );
            rows.push(
                json!({"shape": name, "m": m, "k": k, "n": n, "seconds": s, "gflops": gflops,
                "fraction_of_peak": gflops / peak}),
            );
        }
        out.insert(
            "gemm".into(),
            json!({"backend": which, "dtype": format!("{:?}", a.dtype).to_lowercase(),
                   "peak_gflops": peak, "shapes": rows}),
        );
        backend_peak = Some(rows[0]["gflops"].as_f64().unwrap_or(peak));
    }

    // Matmul peak.
    let n = if a.quick { 1024 } else { 2048 };
    let x = Tensor::randn(0f32, 1.0, (n, n), &device)
        .unwrap()
        .to_dtype(a.dtype)
        .unwrap();
    let y = Tensor::randn(0f32, 1.0, (n, n), &device)
        .unwrap()
        .to_dtype(a.dtype)
        .unwrap();
    let s = time(&device, a.repeats, || {
        x.matmul(&y).unwrap();
    });
    let mut peak = 2.0 * (n as f64).powi(3) / s;
    eprintln!(
        "candle matmul {n}^3 ({:?}): {:.1} GFLOP/s",
        a.dtype,
        peak / 1e9
    );
    if let Some(g) = backend_peak {
        // The model's matmuls run on oneDNN or our bf16 kernel: MFU is against its peak.
        peak = g * 1e9;
    }
    out.insert(
        "matmul".into(),
        json!({"n": n, "seconds": s, "gflops": peak / 1e9, "candle_gflops": 2.0 * (n as f64).powi(3) / s / 1e9}),
    );
    drop((x, y));

    let t0 = Instant::now();
    let mut engine = Engine::load(&a.model, &device, a.dtype).expect("load model");
    eprintln!(
        "loaded {} in {:.1}s",
        a.model.display(),
        t0.elapsed().as_secs_f64()
    );
    let vocab = engine.config().vocab_size;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);

    if want("sample") {
        let (plen, new) = if a.quick { (32, 16) } else { (150, 128) };
        let mut rows = vec![];
        for &batch in &[1usize, 8, 32] {
            let reqs: Vec<GenerateRequest> = (0..batch)
                .map(|i| {
                    let params = SamplingParams {
                        seed: i as u64,
                        ..SamplingParams::new(Knobs::plain(MaxTokens::new(new as u32).unwrap()))
                    };
                    let prompt = random_ids(&mut rng, plen, vocab);
                    GenerateRequest::new("prompt", prompt, params, engine.limits()).unwrap()
                })
                .collect();
            reset_peak();
            let reps = if batch == 32 { 1 } else { a.repeats };
            let s = time(&device, reps, || {
                let g = engine.generate(&reqs).unwrap();
                assert!(g.iter().all(|g| g.tokens.len() == new));
            });
            let tps = (batch * new) as f64 / s;
            let flops = batch as f64
                * (plen as f64 * forward_flops_per_token(&engine, plen as f64 / 2.0)
                    + new as f64
                        * forward_flops_per_token(&engine, plen as f64 + new as f64 / 2.0));
            rows.push(json!({"batch": batch, "prompt": plen, "new": new, "seconds": s, "new_tokens_per_s": tps,
                "mfu": flops / s / peak, "peak_rss_bytes": peak_rss()}));
            eprintln!("sample batch {batch}: {tps:.1} new tok/s ({s:.2}s)");
        }
        out.insert("sample".into(), json!(rows));
    }

    let (seqs, len) = if a.quick { (4, 64) } else { (16, 300) };
    let batch: Vec<ScoreRequest> = (0..seqs)
        .map(|_| {
            let ids = random_ids(&mut rng, len, vocab);
            ScoreRequest::new(
                "sequence",
                ids[..1].to_vec(),
                ids[1..].to_vec(),
                engine.limits(),
            )
            .unwrap()
        })
        .collect();
    if want("score") {
        reset_peak();
        let s = time(&device, a.repeats, || {
            engine.score(&batch, ScoreTemperature::ONE).unwrap();
        });
        let tps = (seqs * len) as f64 / s;
        let flops = (seqs * len) as f64 * forward_flops_per_token(&engine, len as f64 / 2.0);
        out.insert(
            "score".into(),
            json!({"seqs": seqs, "len": len, "seconds": s, "tokens_per_s": tps,
            "mfu": flops / s / peak, "peak_rss_bytes": peak_rss()}),
        );
        eprintln!("score {seqs}x{len}: {tps:.1} tok/s ({s:.2}s)");
    }

    if want("swap") {
        // What `POST /v1/adapters` does in the rollout server: read a PEFT folder (r 8, every
        // projection) and set it next to the inference weights; then unload back to the base.
        let cfg = LoraConfig::new(8, 16.0, Proj::ALL.to_vec());
        let adapter = LoraAdapter::init(cfg, engine.config(), 1, &device).unwrap();
        let dir = tempfile::tempdir().unwrap();
        adapter.save(dir.path()).unwrap();
        let (mut loads, mut unloads, mut reads) = (vec![], vec![], vec![]);
        for _ in 0..a.repeats.max(1) + 1 {
            let t = Instant::now();
            let read = LoraAdapter::load(dir.path(), engine.config(), &device).unwrap();
            device.synchronize().unwrap();
            reads.push(t.elapsed().as_secs_f64());
            drop(read);
            let t = Instant::now();
            engine.load_adapter(dir.path()).unwrap();
            device.synchronize().unwrap();
            loads.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            engine.set_adapter(None).unwrap();
            device.synchronize().unwrap();
            unloads.push(t.elapsed().as_secs_f64());
        }
        // The first round warms the allocator up.
        let (load, unload) = (median(loads[1..].to_vec()), median(unloads[1..].to_vec()));
        let read = median(reads[1..].to_vec());
        out.insert(
            "swap".into(),
            json!({"r": 8, "targets": "all", "load_ms": load * 1e3, "read_ms": read * 1e3,
                   "unload_ms": unload * 1e3}),
        );
        eprintln!(
            "adapter swap (r8, all projections): load {:.1} ms (of which reading the files {:.1} ms), \
             unload {:.1} ms",
            load * 1e3,
            read * 1e3,
            unload * 1e3
        );
    }

    if want("train") {
        let micro = if a.quick { 2 } else { 4 };
        let cfg = LoraConfig::new(8, 16.0, Proj::ALL.to_vec());
        let init = LoraAdapter::init(cfg, engine.config(), 0, &device).unwrap();
        let mut vars = vec![];
        let mut pairs = std::collections::BTreeMap::new();
        for (k, p) in &init.pairs {
            let va = Var::from_tensor(&p.a.to_dtype(DType::F32).unwrap()).unwrap();
            let vb = Var::from_tensor(&p.b).unwrap();
            pairs.insert(
                *k,
                LoraPair {
                    a: va.as_tensor().clone(),
                    b: vb.as_tensor().clone(),
                },
            );
            vars.push(va);
            vars.push(vb);
        }
        let adapter = LoraAdapter {
            config: init.config.clone(),
            pairs,
        };
        let mut opt = AdamW::new(
            vars.clone(),
            ParamsAdamW {
                lr: 1e-5,
                weight_decay: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        let adv: Vec<f32> = (0..seqs)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        reset_peak();
        let s = time(&device, a.repeats, || {
            let mut total: Option<candle_core::backprop::GradStore> = None;
            for (m, chunk) in batch.chunks(seqs / micro).enumerate() {
                let out = engine
                    .train_logprobs(chunk, &adapter, ScoreTemperature::ONE)
                    .unwrap();
                let mut w = vec![];
                for (i, _) in chunk.iter().enumerate() {
                    let n = out.offsets[i + 1] - out.offsets[i];
                    w.extend(std::iter::repeat_n(
                        -adv[m * (seqs / micro) + i] / (n * seqs) as f32,
                        n,
                    ));
                }
                let w = Tensor::new(w, &device).unwrap();
                let loss = (&out.logprobs * &w).unwrap().sum_all().unwrap();
                let g = loss.backward().unwrap();
                total = Some(match total {
                    None => g,
                    Some(mut acc) => {
                        for v in &vars {
                            let add = g.get(v.as_tensor()).unwrap();
                            let sum = (acc.get(v.as_tensor()).unwrap() + add).unwrap();
                            acc.insert(v.as_tensor(), sum);
                        }
                        acc
                    }
                });
            }
            opt.step(&total.unwrap()).unwrap();
        });
        let flops = 3.0 * (seqs * len) as f64 * forward_flops_per_token(&engine, len as f64 / 2.0);
        out.insert(
            "train".into(),
            json!({"seqs": seqs, "len": len, "micro_batches": micro, "seconds": s,
            "mfu": flops / s / peak, "peak_rss_bytes": peak_rss()}),
        );
        eprintln!("LoRA step {seqs}x{len} ({micro} micro-batches): {s:.2}s");
    }
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(out)).unwrap();
    println!("{text}");
    if let Some(path) = a.json {
        std::fs::write(path, text).unwrap();
    }
}
