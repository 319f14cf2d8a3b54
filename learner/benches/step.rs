//! The learner's own GRPO step on SmolLM2: 16 completions of 300 tokens (4 groups of 4), in
//! micro-batches of 4, through `Learner::train_iteration` (forward, backward, accumulation,
//! clipping, AdamW). Prints seconds per step and the process's peak RSS (the 9 GB budget of the
//! learner issue).
//!
//!     cargo bench -p learner --bench step -- [--model PATH] [--repeats N] [--micro-batch N]
//!         [--steps N]
//!
//! `--steps 2` splits the iteration into two optimizer steps (the default config's
//! `steps_per_iteration`): the second step's share is first scored at the starting adapter (its
//! old logprobs), so the difference to `--steps 1` is that forward's cost.

use std::time::Instant;

use candle_core::{DType, Device};
use rand::{Rng, SeedableRng};

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    model::alloc::tune();
    let mut model_path = "assets/SmolLM2-135M-Instruct.Q4_1.gguf".to_string();
    let (mut repeats, mut micro, mut steps) = (2usize, 4u32, 1u32);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--model" => model_path = it.next().expect("--model PATH"),
            "--repeats" => repeats = it.next().and_then(|v| v.parse().ok()).expect("--repeats N"),
            "--micro-batch" => {
                micro = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--micro-batch N")
            }
            "--steps" => steps = it.next().and_then(|v| v.parse().ok()).expect("--steps N"),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let engine = model::Engine::load(std::path::Path::new(&model_path), &Device::Cpu, DType::F32)
        .expect("load model");
    let vocab = engine.config().vocab_size as u32;
    let overrides = vec![
        format!("learner.micro_batch={micro}"),
        format!("learner.steps_per_iteration={steps}"),
        "attempts=4".to_string(),
        "problems_per_iteration=4".to_string(),
    ];
    let config = rl_core::config::Config::from_yaml("{}", "(bench)", &overrides)
        .expect("config")
        .config;
    let mut learner = learner::Learner::new(engine, &config, &model_path).expect("learner");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let (prompt_len, completion_len) = (50, 250);
    let batch = learner::Batch {
        groups: (0..4)
            .map(|_| {
                (0..4)
                    .map(|a| learner::Sequence {
                        prompt: (0..prompt_len)
                            .map(|_| rng.random_range(100..vocab))
                            .collect(),
                        completion: (0..completion_len)
                            .map(|_| rng.random_range(100..vocab))
                            .collect(),
                        sampler: vec![-10.0; completion_len],
                        reference: vec![-10.0; completion_len],
                        reward: if a == 0 { 1.0 } else { 0.0 },
                        truncated: false,
                    })
                    .collect()
            })
            .collect(),
        // As drawn by the default config (temperature 0.7), by the base model.
        temperature: sampling::ScoreTemperature::try_from(config.sampling.train.temperature)
            .expect("a trainable temperature"),
        policy_version: None,
    };
    let mut times = Vec::new();
    for i in 0..repeats.max(1) + 1 {
        let t = Instant::now();
        let reports = learner.train_iteration(i as u32, &batch).expect("step");
        let s = t.elapsed().as_secs_f64();
        if i > 0 {
            times.push(s);
        }
        eprintln!(
            "step {i}: {s:.2}s loss {:.4} grad norm {:.3}",
            reports[0].loss, reports[0].grad_norm
        );
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let out = serde_json::json!({
        "impl": "learner", "seqs": 16, "len": prompt_len + completion_len, "micro_batch": micro, "steps": steps,
        "seconds_per_iteration": median, "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{out}");
}
