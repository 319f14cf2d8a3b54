//! `ref-scorer`: the frozen reference model's per-token logprobs of given completions, offline
//! (`ref-scorer score`, a jsonl file in and out: the engine's public face for checking numbers)
//! and as an HTTP service ([`service`]: `POST /v1/score`, `/health`, `/metrics`,
//! `/openapi.json`).
//!
//! It must never change the model it scores with (no adapter swaps mid-file, no training), never
//! reorder or drop a sequence, and never leave a half-written output file that looks complete.

pub mod service;

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use model::{Engine, ScoreRequest};
use rl_core::wire::{read_jsonl_numbered, ScoreSequence, SequenceLogprobs};

/// Sequences scored per engine call (the engine batches them further by length).
pub const CHUNK: usize = 64;

/// Scores sequences in chunks of [`CHUNK`], in order. The offline command and `POST /v1/score`
/// both go through here, so the same input gives the same numbers either way.
pub fn score_all(
    engine: &Engine,
    seqs: &[ScoreRequest],
    temperature: f64,
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
/// same order, to `output` (written to a temporary file in the same folder, then renamed).
/// Returns the number of sequences scored.
pub fn score_file(
    engine: &Engine,
    input: &Path,
    output: &Path,
    temperature: f64,
) -> anyhow::Result<usize> {
    let lines: Vec<(usize, ScoreSequence)> = read_jsonl_numbered(input)?;
    // Every line is checked before any work, so that an error names its line.
    let seqs: Vec<ScoreRequest> = lines
        .into_iter()
        .map(|(line, s)| {
            let req = ScoreRequest {
                prompt: s.prompt_ids,
                completion: s.completion_ids,
            };
            engine
                .check_score_request(&format!("{} line {line}", input.display()), &req)
                .map(|()| req)
        })
        .collect::<Result<_, _>>()?;
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = output
        .file_name()
        .with_context(|| format!("--output {} is not a file path", output.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> anyhow::Result<()> {
        let file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        for logprobs in score_all(engine, &seqs, temperature)? {
            serde_json::to_writer(&mut w, &SequenceLogprobs { logprobs })?;
            w.write_all(b"\n")?;
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(())
    })();
    match result {
        Ok(()) => {
            std::fs::rename(&tmp, output).with_context(|| {
                format!("cannot move {} to {}", tmp.display(), output.display())
            })?;
            Ok(seqs.len())
        }
        Err(e) => {
            std::fs::remove_file(&tmp).ok();
            Err(e)
        }
    }
}
