//! A short sampling demo on the default model: the first GSM8K test questions, rendered with the
//! model's chat template and TapeAgents' boxed-answer prompt, sampled `attempts` times each at
//! temperature 1 (plus one greedy answer), with per-token logprobs summed per completion.
//! A quick look at what the model answers before any training (the main job is `scripts/train`).
//!
//! cargo run --release -p model --example demo -- [--model PATH] [--data test.jsonl] [--questions N]
//!     [--attempts N] [--max-tokens N]

use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};
use model::{Engine, GenerateRequest, Message, SamplingParams};
use sampling::{Knobs, MaxTokens, Temperature};

fn main() -> anyhow::Result<()> {
    model::alloc::tune();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut model_path = root.join("assets/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut data = root.join("assets/gsm8k/test.jsonl");
    let (mut questions, mut attempts, mut max_tokens) = (2usize, 4usize, 160usize);
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--model" => model_path = value("--model")?.into(),
            "--data" => data = value("--data")?.into(),
            "--questions" => questions = value("--questions")?.parse().context("--questions N")?,
            "--attempts" => attempts = value("--attempts")?.parse().context("--attempts N")?,
            "--max-tokens" => {
                max_tokens = value("--max-tokens")?.parse().context("--max-tokens N")?
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let t = Instant::now();
    let engine = Engine::load(&model_path, &Device::Cpu, DType::F32).with_context(|| {
        format!(
            "loading {} (run scripts/fetch-assets)",
            model_path.display()
        )
    })?;
    println!(
        "loaded {} in {:.1}s",
        model_path.display(),
        t.elapsed().as_secs_f64()
    );
    let text =
        std::fs::read_to_string(&data).with_context(|| format!("reading {}", data.display()))?;
    let tok = engine.tokenizer()?;
    let eos = engine.config().eos_token_ids.clone();
    let mut reqs = Vec::new();
    let mut golds = Vec::new();
    for (i, line) in text.lines().take(questions).enumerate() {
        let row: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}", data.display(), i + 1))?;
        let q = row["question"]
            .as_str()
            .with_context(|| format!("{} line {}: no question", data.display(), i + 1))?;
        golds.push(
            row["answer"]
                .as_str()
                .unwrap_or("")
                .rsplit("####")
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
        );
        let content = format!(
            "{q}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
        );
        let prompt = tok.encode(&engine.render_chat(&[Message::new("user", &content)], true)?)?;
        for a in 0..=attempts {
            let temperature = if a == attempts { 0.0 } else { 1.0 };
            let knobs = Knobs {
                temperature: Temperature::new(temperature)?,
                max_tokens: MaxTokens::new(max_tokens as u32)?,
                ..Knobs::plain(MaxTokens::of(1))
            };
            let params = SamplingParams {
                stop_ids: eos.clone(),
                seed: (i * 1000 + a) as u64,
                ..SamplingParams::new(knobs)
            };
            reqs.push(GenerateRequest::new(
                "prompt",
                prompt.clone(),
                params,
                engine.limits(),
            )?);
        }
    }
    let t = Instant::now();
    let gens = engine.generate(&reqs)?;
    let secs = t.elapsed().as_secs_f64();
    let new: usize = gens.iter().map(|g| g.tokens.len()).sum();
    for (k, (g, r)) in gens.iter().zip(&reqs).enumerate() {
        let q = k / (attempts + 1);
        let kind = if r.params().knobs.temperature.is_greedy() {
            "greedy".to_string()
        } else {
            format!("sample {}", k % (attempts + 1))
        };
        let lp: f32 = g.logprobs.iter().sum();
        let answer = tok.decode(&g.tokens, true)?;
        println!(
            "\n--- question {} ({kind}; gold {}; {} tokens, {:?}, sum logprob {lp:.2})",
            q + 1,
            golds[q],
            g.tokens.len(),
            g.finish_reason
        );
        println!("{}", answer.trim());
    }
    println!(
        "\n{} completions, {new} new tokens in {secs:.1}s: {:.1} tokens/s (batch {})",
        gens.len(),
        new as f64 / secs,
        reqs.len()
    );
    Ok(())
}
