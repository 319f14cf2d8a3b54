//! `ref-scorer`: the frozen reference model's per-token logprobs of given completions, offline
//! (`ref-scorer score`, a jsonl file in and out: the engine's public face for checking numbers)
//! and as an HTTP service ([`service`]: `POST /v1/score`, `/health`, `/metrics`,
//! `/openapi.json`).
//!
//! It must never change the model it scores with (no adapter swaps mid-file, no training), never
//! reorder or drop a sequence, and never leave a half-written output file that looks complete.

pub mod service;

use std::path::Path;

use anyhow::Context;
use model::{Engine, ScoreRequest};
use rl_core::wire::{read_jsonl_numbered, ScoreSequence, SequenceLogprobs};
use sampling::ScoreTemperature;

/// Sequences scored per engine call (the engine batches them further by length).
pub const CHUNK: usize = 64;

/// Scores sequences in chunks of [`CHUNK`], in order. The offline command and `POST /v1/score`
/// both go through here, so the same input gives the same numbers either way.
pub fn score_all(
    engine: &Engine,
    seqs: &[ScoreRequest],
    temperature: ScoreTemperature,
) -> model::Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(seqs.len());
    for (c, chunk) in seqs.chunks(CHUNK).enumerate() {
        out.extend(engine.score(chunk, temperature)?);
        tracing::debug!(
            "scored {} / {}",
            (c * CHUNK + chunk.len()).min(seqs.len()),
            seqs.len()
        );
    }
    Ok(out)
}

/// Scores every line of `input` and writes one `{"logprobs":[...]}` line per input line, in the
/// same order, to `output` (written whole or not at all: [`rl_core::files`]).
/// Returns the number of sequences scored.
pub fn score_file(
    engine: &Engine,
    input: &Path,
    output: &Path,
    temperature: ScoreTemperature,
) -> anyhow::Result<usize> {
    let lines: Vec<(usize, ScoreSequence)> = read_jsonl_numbered(input)?;
    // Every line is checked before any work, so that an error names its line.
    let seqs: Vec<ScoreRequest> = lines
        .into_iter()
        .map(|(line, s)| {
            ScoreRequest::new("", s.prompt_ids, s.completion_ids, engine.limits())
                .map_err(|e| anyhow::anyhow!("{} line {line}: {e}", input.display()))
        })
        .collect::<Result<_, _>>()?;
    rl_core::files::write_stream(output, |w| -> anyhow::Result<()> {
        for logprobs in score_all(engine, &seqs, temperature)? {
            serde_json::to_writer(&mut *w, &SequenceLogprobs { logprobs })?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
    .with_context(|| format!("writing --output {}", output.display()))?;
    Ok(seqs.len())
}
