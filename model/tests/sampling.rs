//! Sampling on the tiny seeded Llama: the same seed gives the same tokens, each sampled token's
//! logprob is its teacher-forced logprob, a ragged batch equals its rows one by one, finish
//! reasons, top logprobs and stop sequences. On the device `TEST_DEVICE` names (default cpu).
#![allow(clippy::unwrap_used)]

mod common;

use candle_core::DType;
use common::*;
use model::{Engine, GenerateRequest, SamplingParams, ScoreRequest};

fn tiny() -> Engine {
    Engine::load(&golden_dir().join("tiny_llama"), &device(), DType::F32).unwrap()
}

fn sample(
    engine: &Engine,
    prompts: &[Vec<u32>],
    temperature: f64,
    seed: u64,
    max_tokens: usize,
) -> Vec<model::Generation> {
    let reqs: Vec<GenerateRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let params = SamplingParams {
                seed: seed + i as u64,
                stop_ids: vec![2],
                ..params(temperature, max_tokens)
            };
            gen_request(engine, p.clone(), params)
        })
        .collect();
    engine.generate(&reqs).unwrap()
}

#[test]
fn same_seed_same_tokens_different_seed_differs() {
    let engine = tiny();
    let prompts = vec![vec![1, 10, 11, 12, 13], vec![1, 20, 21]];
    let a = sample(&engine, &prompts, 1.0, 42, 24);
    let b = sample(&engine, &prompts, 1.0, 42, 24);
    assert_eq!(a, b);
    let c = sample(&engine, &prompts, 1.0, 4242, 24);
    assert_ne!(
        a.iter().map(|g| &g.tokens).collect::<Vec<_>>(),
        c.iter().map(|g| &g.tokens).collect::<Vec<_>>()
    );
}

#[test]
fn sampled_logprobs_are_teacher_forced_logprobs() {
    // The logprob reported with each sampled token equals the scorer's for the same tokens.
    let engine = tiny();
    let prompts = vec![vec![1, 10, 11, 12, 13], vec![1, 20, 21], vec![1, 5]];
    for temperature in [1.0, 0.7] {
        let gens = sample(&engine, &prompts, temperature, 9, 20);
        let reqs: Vec<ScoreRequest> = prompts
            .iter()
            .zip(&gens)
            .map(|(p, g)| score_request(&engine, p.clone(), g.tokens.clone()))
            .collect();
        let scored = engine.score(&reqs, st(temperature)).unwrap();
        for (g, s) in gens.iter().zip(&scored) {
            let want: Vec<f64> = s.iter().map(|&x| x as f64).collect();
            assert_close(&g.logprobs, &want, 1e-4, "sampled vs scored");
        }
    }
}

#[test]
fn ragged_batch_equals_one_by_one() {
    let engine = tiny();
    let prompts = vec![
        vec![1, 10, 11, 12, 13, 14, 15],
        vec![1, 20],
        vec![1, 30, 31, 32],
    ];
    for temperature in [0.0, 1.0] {
        let together = sample(&engine, &prompts, temperature, 5, 30);
        for (i, p) in prompts.iter().enumerate() {
            let params = SamplingParams {
                seed: 5 + i as u64,
                stop_ids: vec![2],
                ..params(temperature, 30)
            };
            let reqs = [gen_request(&engine, p.clone(), params)];
            let alone = engine.generate(&reqs).unwrap().remove(0);
            assert_eq!(alone.tokens, together[i].tokens, "row {i} t={temperature}");
            let want: Vec<f64> = alone.logprobs.iter().map(|&x| x as f64).collect();
            assert_close(&together[i].logprobs, &want, 1e-5, "batched logprobs");
        }
    }
}

#[test]
fn finish_reasons() {
    let engine = tiny();
    let gens = sample(&engine, &[vec![1, 10, 11]], 0.0, 0, 3);
    assert_eq!(gens[0].finish_reason, model::FinishReason::Length);
    assert_eq!(gens[0].tokens.len(), 3);
    // Stopping on the first greedy token.
    let first = gens[0].tokens[0];
    let params = SamplingParams {
        stop_ids: vec![first],
        ..params(0.0, 5)
    };
    let reqs = [gen_request(&engine, vec![1, 10, 11], params)];
    let g = engine.generate(&reqs).unwrap().remove(0);
    assert_eq!(g.tokens, vec![first]);
    assert_eq!(g.finish_reason, model::FinishReason::Stop);
}

/// Central finite differences in f64 of `sum_t w_t * logp_t` against the hand-written backward,
/// for entries of A and B in every kind of projection and both layers.
#[test]
fn top_logprobs_and_stop_sequences() {
    let engine = tiny();
    let prompt = vec![1, 10, 11, 12, 13];
    let run = |params: SamplingParams| {
        engine
            .generate(&[gen_request(&engine, prompt.clone(), params)])
            .unwrap()
            .remove(0)
    };
    // Greedy with alternatives: the chosen token heads the list with its own logprob, the list is
    // sorted, and the alternatives are the raw distribution's logprobs (they sum to <= 1).
    let g = run(SamplingParams {
        top_logprobs: 5,
        ..params(0.0, 12)
    });
    assert_eq!(g.top_logprobs.len(), g.tokens.len());
    for (k, top) in g.top_logprobs.iter().enumerate() {
        assert_eq!(top.len(), 5);
        assert_eq!(top[0], (g.tokens[k], g.logprobs[k]));
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        let mass: f32 = top.iter().map(|(_, lp)| lp.exp()).sum();
        assert!(mass <= 1.0 + 1e-5, "{mass}");
    }
    // Sampled at temperature 0.7: the sampled token's logprob is among the alternatives' scale
    // (same distribution), and no alternatives are returned unless asked.
    let s = run(SamplingParams {
        top_logprobs: 96,
        seed: 3,
        ..params(0.7, 12)
    });
    for (k, top) in s.top_logprobs.iter().enumerate() {
        let own = top.iter().find(|(id, _)| *id == s.tokens[k]).unwrap();
        assert_eq!(own.1, s.logprobs[k]);
        let mass: f64 = top.iter().map(|(_, lp)| f64::from(*lp).exp()).sum();
        assert!(
            (mass - 1.0).abs() < 1e-4,
            "the full list is the whole distribution: {mass}"
        );
    }
    assert!(run(params(1.0, 4)).top_logprobs.is_empty());
    // A stop sequence taken from a greedy run ends the next greedy run right after it.
    let stop = g.tokens[3..5].to_vec();
    let cut = run(SamplingParams {
        stop_sequences: vec![stop.clone()],
        ..params(0.0, 12)
    });
    let first = (2..=g.tokens.len())
        .find(|&k| g.tokens[..k].ends_with(&stop))
        .unwrap();
    assert_eq!(cut.tokens, g.tokens[..first]);
    assert_eq!(cut.finish_reason, model::FinishReason::Stop);
    let bad = SamplingParams {
        stop_sequences: vec![vec![]],
        ..params(1.0, 4)
    };
    assert!(
        GenerateRequest::new("prompt", prompt.clone(), bad, engine.limits())
            .unwrap_err()
            .to_string()
            .contains("stop sequence is empty")
    );
}
