//! SmolLM2-135M-Instruct (the Q4_1 GGUF fetched by `scripts/fetch-assets`) against the
//! transformers oracle `../shared/golden/smollm2_reference.json`: tokenizer ids, chat template
//! rendering, greedy ids (up to the first near-tie), teacher-forced logprobs and the first step's
//! top-5, one by one and batched. On the device `TEST_DEVICE` names (default cpu).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::OnceLock;

use candle_core::DType;
use common::*;
use model::{Engine, GenerateRequest, Message, SamplingParams, ScoreRequest};

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::load(&smollm2_gguf(), &device(), DType::F32).unwrap())
}

fn reference() -> &'static serde_json::Value {
    static REF: OnceLock<serde_json::Value> = OnceLock::new();
    REF.get_or_init(|| read_json(&golden_dir().join("smollm2_reference.json")))
}

fn cases() -> &'static Vec<serde_json::Value> {
    reference()["generation_cases"].as_array().unwrap()
}

fn tol() -> f64 {
    reference()["tolerance"]["logprob_abs"].as_f64().unwrap()
}

/// Number of leading greedy steps that must match: up to the first near-tie.
fn comparable_steps(case: &serde_json::Value) -> usize {
    let margin = reference()["tolerance"]["greedy_margin"].as_f64().unwrap();
    let margins = floats(&case["greedy_step_margins"]);
    margins
        .iter()
        .position(|&m| m < margin)
        .unwrap_or(margins.len())
}

#[test]
fn config_from_gguf_metadata() {
    let c = engine().config();
    assert_eq!(
        (
            c.num_layers,
            c.hidden_size,
            c.intermediate_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.vocab_size
        ),
        (30, 576, 1536, 9, 3, 64, 49152)
    );
    assert_eq!(c.rope_theta, 100000.0);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_ids, vec![2]);
}

#[test]
fn tokenizer_ids_are_identical() {
    let tok = engine().tokenizer().unwrap();
    let cases = reference()["tokenizer_cases"].as_array().unwrap();
    assert!(cases.len() >= 40);
    for (i, case) in cases.iter().enumerate() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            ids(&case["ids"]),
            "tokenizer case {i}: {text:?}"
        );
    }
}

#[test]
fn chat_template_renders_like_transformers() {
    for (i, case) in cases().iter().enumerate() {
        let msgs: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let text = engine().render_chat(&msgs, true).unwrap();
        assert_eq!(text, case["rendered_prompt"].as_str().unwrap(), "case {i}");
        assert_eq!(
            engine().tokenizer().unwrap().encode(&text).unwrap(),
            ids(&case["prompt_ids"]),
            "case {i} ids"
        );
    }
}

fn greedy(prompts: &[Vec<u32>], max_tokens: usize) -> Vec<model::Generation> {
    let reqs: Vec<GenerateRequest> = prompts
        .iter()
        .map(|p| {
            let params = SamplingParams {
                stop_ids: vec![2],
                ..params(0.0, max_tokens)
            };
            gen_request(engine(), p.clone(), params)
        })
        .collect();
    engine().generate(&reqs).unwrap()
}

fn check_greedy(i: usize, case: &serde_json::Value, got: &model::Generation) {
    let want = ids(&case["greedy_completion_ids"]);
    let want_lp = floats(&case["completion_logprobs"]);
    let n = comparable_steps(case);
    assert!(
        got.tokens.len() >= n.min(want.len()),
        "case {i}: stopped early: {:?}",
        got.tokens
    );
    assert_eq!(
        &got.tokens[..n],
        &want[..n],
        "case {i}: greedy ids differ before the first near-tie (step {n})"
    );
    for (t, (got_lp, want_lp)) in got.logprobs.iter().zip(&want_lp).take(n).enumerate() {
        assert!(
            (*got_lp as f64 - want_lp).abs() <= tol(),
            "case {i} step {t}: greedy logprob {got_lp} vs {want_lp}"
        );
    }
    if n == want.len() {
        assert_eq!(got.tokens, want, "case {i}: whole greedy completion");
    }
}

#[test]
fn greedy_decoding_reproduces_transformers_one_by_one() {
    for (i, case) in cases().iter().enumerate() {
        let want = ids(&case["greedy_completion_ids"]);
        let got = greedy(&[ids(&case["prompt_ids"])], want.len()).remove(0);
        check_greedy(i, case, &got);
    }
}

#[test]
fn greedy_decoding_batched_ragged_equals_one_by_one() {
    let prompts: Vec<Vec<u32>> = cases().iter().map(|c| ids(&c["prompt_ids"])).collect();
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    assert!(
        lens.iter().min() != lens.iter().max(),
        "prompts must be ragged: {lens:?}"
    );
    let batched = greedy(&prompts, 48);
    for (i, case) in cases().iter().enumerate() {
        check_greedy(i, case, &batched[i]);
    }
}

#[test]
fn teacher_forced_logprobs_match_one_by_one_and_batched() {
    let reqs: Vec<ScoreRequest> = cases()
        .iter()
        .map(|c| {
            score_request(
                engine(),
                ids(&c["prompt_ids"]),
                ids(&c["greedy_completion_ids"]),
            )
        })
        .collect();
    let batched = engine().score(&reqs, st(1.0)).unwrap();
    for (i, case) in cases().iter().enumerate() {
        let want = floats(&case["completion_logprobs"]);
        let alone = engine()
            .score(std::slice::from_ref(&reqs[i]), st(1.0))
            .unwrap()
            .remove(0);
        for (t, w) in want.iter().enumerate() {
            assert!(
                (alone[t] as f64 - w).abs() <= tol(),
                "case {i} token {t}: {} vs {w}",
                alone[t]
            );
            assert!(
                (batched[i][t] as f64 - w).abs() <= tol(),
                "case {i} token {t} batched: {} vs {w}",
                batched[i][t]
            );
        }
    }
}

#[test]
fn first_step_top5() {
    for (i, case) in cases().iter().enumerate() {
        let lp = engine()
            .next_token_logprobs(&ids(&case["prompt_ids"]))
            .unwrap();
        let want_ids = ids(&case["first_step_top5"]["ids"]);
        let want_lp = floats(&case["first_step_top5"]["logprobs"]);
        for (id, w) in want_ids.iter().zip(&want_lp) {
            assert!(
                (lp[*id as usize] as f64 - w).abs() <= tol(),
                "case {i} id {id}: {} vs {w}",
                lp[*id as usize]
            );
        }
        let mut order: Vec<usize> = (0..lp.len()).collect();
        order.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]));
        // The top-5 set is the same (order may swap only where the oracle's values tie within tolerance).
        let got: std::collections::BTreeSet<u32> = order[..5].iter().map(|&x| x as u32).collect();
        let want: std::collections::BTreeSet<u32> = want_ids.iter().copied().collect();
        assert_eq!(got, want, "case {i} top-5");
    }
}

#[test]
fn exported_hf_folder_keeps_tokenizer_template_and_logprobs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2");
    let report = model::export_merged(&smollm2_gguf(), None, &out, DType::F32).unwrap();
    assert!(report.tokenizer);
    // 134.5M parameters with the embedding stored once (tied).
    assert!(
        (134_000_000..135_000_000).contains(&report.parameters),
        "{}",
        report.parameters
    );
    let exported = Engine::load(&out, &device(), DType::F32).unwrap();
    assert_eq!(exported.config(), engine().config());
    let tok = exported.tokenizer().unwrap();
    for (i, case) in reference()["tokenizer_cases"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        assert_eq!(
            tok.encode(case["text"].as_str().unwrap()).unwrap(),
            ids(&case["ids"]),
            "tokenizer case {i}"
        );
    }
    for (i, case) in cases().iter().enumerate() {
        let msgs: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        assert_eq!(
            exported.render_chat(&msgs, true).unwrap(),
            case["rendered_prompt"].as_str().unwrap(),
            "case {i}"
        );
    }
    let case = &cases()[0];
    let got = exported
        .score(
            &[score_request(
                &exported,
                ids(&case["prompt_ids"]),
                ids(&case["greedy_completion_ids"]),
            )],
            st(1.0),
        )
        .unwrap()
        .remove(0);
    for (t, w) in floats(&case["completion_logprobs"]).iter().enumerate() {
        assert!(
            (got[t] as f64 - w).abs() <= tol(),
            "token {t}: {} vs {w}",
            got[t]
        );
    }
}
