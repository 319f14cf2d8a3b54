//! Wire formats: what crosses a process boundary as JSON.

use std::io::BufRead;

use serde::{Deserialize, Serialize};

/// One (prompt, completion) pair to score, as token ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreSequence {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
}

/// Per-token logprobs of one completion, in the order of its tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequenceLogprobs {
    pub logprobs: Vec<f32>,
}

/// Why a completion ended: a stop token (or stop string), or the `max_tokens` limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A jsonl file that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Line {
        path: String,
        line: usize,
        reason: String,
    },
}

/// Reads every non-blank line of a jsonl file as a `T`. A line that does not parse is an error
/// naming the file and the line (1-based); nothing is skipped.
pub fn read_jsonl<T: for<'de> Deserialize<'de>>(
    path: &std::path::Path,
) -> Result<Vec<T>, JsonlError> {
    Ok(read_jsonl_numbered(path)?
        .into_iter()
        .map(|(_, t)| t)
        .collect())
}

/// [`read_jsonl`] with the 1-based line number of each item, for messages about an item.
pub fn read_jsonl_numbered<T: for<'de> Deserialize<'de>>(
    path: &std::path::Path,
) -> Result<Vec<(usize, T)>, JsonlError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| JsonlError::Io {
        path: shown.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| JsonlError::Io {
            path: shown.clone(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let item = serde_json::from_str(&line).map_err(|e| JsonlError::Line {
            path: shown.clone(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        out.push((i + 1, item));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_line_is_named() {
        let dir = std::env::temp_dir().join(format!("rl-core-wire-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("in.jsonl");
        std::fs::write(
            &path,
            "{\"prompt_ids\":[1],\"completion_ids\":[2]}\n\n{\"prompt_ids\":[1],\"completion\":[2]}\n",
        )
        .expect("write");
        let err = read_jsonl::<ScoreSequence>(&path).expect_err("line 3 is malformed");
        let msg = err.to_string();
        assert!(
            msg.contains("in.jsonl line 3") && msg.contains("unknown field `completion`"),
            "{msg}"
        );
        std::fs::write(&path, "{\"prompt_ids\":[1],\"completion_ids\":[2]}\n").expect("write");
        let ok = read_jsonl::<ScoreSequence>(&path).expect("valid");
        assert_eq!(
            ok,
            vec![ScoreSequence {
                prompt_ids: vec![1],
                completion_ids: vec![2]
            }]
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
