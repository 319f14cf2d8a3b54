//! Problems: loading a dataset (GSM8K's jsonl files that `scripts/fetch-assets` provides, or a
//! user's JSONL or Parquet file with its own field names, see [`load`]), reading the gold answer
//! (after `####`, inside the last `\boxed{}`, or the whole field; its number read as graders do,
//! [`crate::numbers`]), and choosing which problems an iteration trains on (deterministic from
//! the run seed and the iteration, so a resumed run picks the same ones).
//!
//! A malformed row is an error naming the file, the row and the field; nothing is skipped.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{AnswerFormat, DataConfig};
use crate::numbers::{canonical_number, parse_number};
use crate::wire::{read_jsonl_numbered, JsonlError};

/// The gold answer of a problem: its canonical text (`1,000` -> `1000`, `$18.00` -> `18`) and value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gold {
    pub text: String,
    pub value: f64,
}

/// One GSM8K problem. `index` is its 0-based row in the file (what the store records); `id` is the
/// dataset's own `idx` field when present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    pub index: usize,
    pub id: Option<i64>,
    pub question: String,
    pub solution: String,
    pub gold: Gold,
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Jsonl(#[from] JsonlError),
    #[error("{path} {row}: {reason}")]
    Row {
        path: String,
        /// `line N` of a jsonl file, `row N` (from 1) of a Parquet file.
        row: String,
        reason: String,
    },
    #[error("{path}: cannot read it as Parquet ({reason})")]
    Parquet { path: String, reason: String },
    #[error("{path}: no problems in the file (expected rows with `{question}` and `{answer}`; run scripts/fetch-assets or point data.train / data.test at your dataset)")]
    Empty {
        path: String,
        question: String,
        answer: String,
    },
}

/// How a dataset file is read, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// One JSON object per line (`.jsonl`, `.json`).
    Jsonl,
    /// Apache Parquet (`.parquet`), the format Hugging Face datasets are stored in.
    Parquet,
}

impl FileKind {
    pub fn of(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "jsonl" | "json" => Some(FileKind::Jsonl),
            "parquet" => Some(FileKind::Parquet),
            _ => None,
        }
    }
}

/// One row of a dataset: where it is (`line N` / `row N`) and its fields.
struct Row {
    at: String,
    fields: serde_json::Map<String, Value>,
}

/// Loads the problems of a dataset file: each row's `data.fields.question` and
/// `data.fields.answer`, the gold answer read as `data.answer_format` says, and GSM8K's `idx`
/// when a row has one. A missing or empty field, a gold answer that is not a number or a file
/// without rows fails, naming the file, the row and the field.
pub fn load(path: &Path, data: &DataConfig) -> Result<Vec<Problem>, TaskError> {
    let shown = path.display().to_string();
    let rows = match FileKind::of(path) {
        Some(FileKind::Parquet) => parquet_rows(path)?,
        // The config refuses other extensions; jsonl is the guess for a caller that did not
        // validate.
        Some(FileKind::Jsonl) | None => {
            read_jsonl_numbered::<serde_json::Map<String, Value>>(path)?
                .into_iter()
                .map(|(line, fields)| Row {
                    at: format!("line {line}"),
                    fields,
                })
                .collect()
        }
    };
    let (q_field, a_field) = (&data.fields.question, &data.fields.answer);
    if rows.is_empty() {
        return Err(TaskError::Empty {
            path: shown,
            question: q_field.clone(),
            answer: a_field.clone(),
        });
    }
    rows.into_iter()
        .enumerate()
        .map(|(index, row)| {
            let fail = |field: &str, reason: String| TaskError::Row {
                path: shown.clone(),
                row: row.at.clone(),
                reason: format!("field `{field}`: {reason}"),
            };
            let text = |field: &str| -> Result<String, TaskError> {
                match row.fields.get(field) {
                    None | Some(Value::Null) => {
                        let mut names: Vec<&str> = row.fields.keys().map(String::as_str).collect();
                        names.sort_unstable();
                        Err(fail(
                            field,
                            format!(
                                "missing (the row has {}); set data.fields to the names your file uses",
                                names.join(", ")
                            ),
                        ))
                    }
                    Some(Value::String(s)) if s.trim().is_empty() => {
                        Err(fail(field, "is empty".into()))
                    }
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(Value::Number(n)) => Ok(n.to_string()),
                    Some(other) => Err(fail(field, format!("is {other}, not text or a number"))),
                }
            };
            let question = text(q_field)?;
            let answer = text(a_field)?;
            let gold = parse_gold_as(&answer, data.answer_format).map_err(|e| fail(a_field, e))?;
            Ok(Problem {
                index,
                id: row.fields.get("idx").and_then(Value::as_i64),
                question,
                solution: answer,
                gold,
            })
        })
        .collect()
}

/// The rows of a Parquet file, each column as a JSON value (strings, numbers, booleans, null;
/// other types as their text).
fn parquet_rows(path: &Path) -> Result<Vec<Row>, TaskError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let shown = path.display().to_string();
    let bad = |reason: String| TaskError::Parquet {
        path: shown.clone(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|source| JsonlError::Io {
        path: shown.clone(),
        source,
    })?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(e.to_string()))?;
    let mut rows = Vec::new();
    for (i, row) in reader
        .get_row_iter(None)
        .map_err(|e| bad(e.to_string()))?
        .enumerate()
    {
        let row = row.map_err(|e| bad(format!("row {}: {e}", i + 1)))?;
        let fields = row
            .get_column_iter()
            .map(|(name, field)| {
                let v = match field {
                    Field::Null => Value::Null,
                    Field::Bool(b) => Value::Bool(*b),
                    Field::Byte(x) => Value::from(*x),
                    Field::Short(x) => Value::from(*x),
                    Field::Int(x) => Value::from(*x),
                    Field::Long(x) => Value::from(*x),
                    Field::UByte(x) => Value::from(*x),
                    Field::UShort(x) => Value::from(*x),
                    Field::UInt(x) => Value::from(*x),
                    Field::ULong(x) => Value::from(*x),
                    Field::Float(x) => Value::from(f64::from(*x)),
                    Field::Double(x) => Value::from(*x),
                    Field::Str(s) => Value::String(s.clone()),
                    other => Value::String(other.to_string()),
                };
                (name.clone(), v)
            })
            .collect();
        rows.push(Row {
            at: format!("row {}", i + 1),
            fields,
        });
    }
    Ok(rows)
}

/// The gold answer in an answer field written as `format` says.
pub fn parse_gold_as(answer: &str, format: AnswerFormat) -> Result<Gold, String> {
    let raw = match format {
        AnswerFormat::Gsm8k => return parse_gold(answer),
        AnswerFormat::Boxed => match crate::rewards::extract_boxed(answer) {
            crate::rewards::Extracted::Found(inner) => inner,
            _ => return Err("has no `\\boxed{...}` answer (data.answer_format: boxed)".into()),
        },
        AnswerFormat::Number => answer.trim(),
    };
    let value = parse_number(raw).ok_or_else(|| {
        let name: &'static str = format.into();
        format!("the gold answer `{raw}` is not a number (data.answer_format: {name})")
    })?;
    Ok(Gold {
        text: canonical_number(value),
        value,
    })
}

/// The gold answer of a GSM8K solution: the text after the last `####`, read as a number
/// (commas, `$`, a leading `-`, decimals and a trailing `.0` are accepted).
pub fn parse_gold(answer: &str) -> Result<Gold, String> {
    let Some((_, after)) = answer.rsplit_once("####") else {
        return Err("`answer` has no `#### N` final answer".into());
    };
    let raw = after.trim();
    let value = parse_number(raw)
        .ok_or_else(|| format!("the final answer `#### {raw}` is not a number"))?;
    Ok(Gold {
        text: canonical_number(value),
        value,
    })
}

/// SplitMix64: a tiny, portable mixer for deriving seeds (the same on every platform and version).
pub fn mix_seed(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed a group is sampled with: derived from the run seed, the iteration and the problem, so
/// a resumed run samples a missing group exactly as the uninterrupted run would have.
pub fn group_seed(run_seed: u64, iteration: u32, problem_index: usize) -> u64 {
    mix_seed(mix_seed(mix_seed(run_seed) ^ u64::from(iteration)) ^ problem_index as u64)
}

/// The problems (row indices) of an iteration: the dataset is shuffled once per epoch with a seed
/// derived from the run seed, and iterations take consecutive slices, so no problem repeats
/// within an epoch and the choice never depends on what happened before a crash.
pub fn problems_for_iteration(
    run_seed: u64,
    iteration: u32,
    per_iteration: usize,
    dataset_len: usize,
) -> Vec<usize> {
    if dataset_len == 0 || per_iteration == 0 {
        return Vec::new();
    }
    let start = iteration as usize * per_iteration;
    (start..start + per_iteration)
        .map(|k| {
            let epoch = k / dataset_len;
            let perm = epoch_permutation(run_seed, epoch as u64, dataset_len);
            perm[k % dataset_len]
        })
        .collect()
}

fn epoch_permutation(run_seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mix_seed(run_seed ^ mix_seed(epoch)));
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut rng);
    perm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gold_answers() {
        for (answer, text, value) in [
            ("so 48+24=72\n#### 72", "72", 72.0),
            ("#### 1,000", "1000", 1000.0),
            ("#### $18.00", "18", 18.0),
            ("#### -5", "-5", -5.0),
            ("#### 3.5", "3.5", 3.5),
            ("#### 12.0", "12", 12.0),
            ("#### 1,575,000", "1575000", 1_575_000.0),
            ("a #### 1 then #### 7", "7", 7.0),
        ] {
            let gold = parse_gold(answer).expect(answer);
            assert_eq!((gold.text.as_str(), gold.value), (text, value), "{answer}");
        }
        assert!(parse_gold("no final answer")
            .unwrap_err()
            .contains("no `#### N`"));
        assert!(parse_gold("#### seven")
            .unwrap_err()
            .contains("`#### seven` is not a number"));
    }

    #[test]
    fn iteration_problems_are_deterministic_and_cover_an_epoch() {
        let a = problems_for_iteration(7, 3, 8, 50);
        assert_eq!(a, problems_for_iteration(7, 3, 8, 50));
        assert_ne!(a, problems_for_iteration(8, 3, 8, 50));
        // 50 problems, 10 per iteration: iterations 0..5 are one epoch, each problem once.
        let mut epoch: Vec<usize> = (0..5)
            .flat_map(|i| problems_for_iteration(1, i, 10, 50))
            .collect();
        epoch.sort_unstable();
        assert_eq!(epoch, (0..50).collect::<Vec<_>>());
        // Across the epoch boundary (45..55) the slice is still full and in range.
        let cross = problems_for_iteration(1, 9, 5, 50);
        assert_eq!(cross.len(), 5);
        assert!(cross.iter().all(|&p| p < 50));
        assert_ne!(group_seed(1, 0, 5), group_seed(1, 1, 5));
        assert_ne!(group_seed(1, 0, 5), group_seed(1, 0, 6));
    }

    fn data(answer_format: AnswerFormat, question: &str, answer: &str) -> DataConfig {
        DataConfig {
            answer_format,
            fields: crate::config::DataFields {
                question: question.into(),
                answer: answer.into(),
            },
            ..DataConfig::default()
        }
    }

    #[test]
    fn loading_names_the_file_the_row_and_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("train.jsonl");
        let gsm8k = DataConfig::default();
        // (rows, the config, what the error says)
        let cases: Vec<(&str, DataConfig, Vec<&str>)> = vec![
            (
                "{\"question\":\"q1\",\"answer\":\"#### 1,000\",\"idx\":0}\n{\"question\":\"q2\",\"answer\":\"no answer\"}\n",
                gsm8k.clone(),
                vec!["train.jsonl line 2", "field `answer`", "no `#### N`"],
            ),
            (
                "{\"question\":\"q1\",\"answer\":\"#### 1\"}\n{\"question\": 3}\n",
                gsm8k.clone(),
                vec!["train.jsonl line 2", "field `answer`", "missing (the row has question)", "data.fields"],
            ),
            (
                "{\"question\":\"q1\",\"answer\":\"#### 1\"}\n[1, 2]\n",
                gsm8k.clone(),
                vec!["train.jsonl line 2"],
            ),
            (
                "{\"problem\":\"  \",\"solution\":\"5\"}\n",
                data(AnswerFormat::Number, "problem", "solution"),
                vec!["line 1", "field `problem`", "is empty"],
            ),
            (
                "{\"problem\":\"p\",\"solution\":\"five\"}\n",
                data(AnswerFormat::Number, "problem", "solution"),
                vec!["line 1", "field `solution`", "`five` is not a number", "answer_format: number"],
            ),
            (
                "{\"problem\":\"p\",\"solution\":\"so 5\"}\n",
                data(AnswerFormat::Boxed, "problem", "solution"),
                vec!["line 1", "field `solution`", "no `\\boxed{...}`"],
            ),
            (
                "{\"problem\":\"p\",\"solution\":[5]}\n",
                data(AnswerFormat::Number, "problem", "solution"),
                vec!["line 1", "field `solution`", "is [5], not text or a number"],
            ),
            ("\n", gsm8k.clone(), vec!["no problems", "`question` and `answer`"]),
        ];
        for (rows, config, says) in cases {
            std::fs::write(&path, rows).expect("write");
            let err = load(&path, &config).expect_err(rows).to_string();
            for s in says {
                assert!(err.contains(s), "`{s}` not in: {err}");
            }
        }
        std::fs::write(
            &path,
            "{\"question\":\"q1\",\"answer\":\"#### 1,000\",\"idx\":4}\n",
        )
        .expect("write");
        let p = load(&path, &gsm8k).expect("valid");
        assert_eq!((p[0].index, p[0].id, p[0].gold.value), (0, Some(4), 1000.0));
    }

    #[test]
    fn each_answer_format_reads_its_gold() {
        // (format, answer field, gold text)
        let cases = [
            (AnswerFormat::Gsm8k, "She has 3 + 4 = 7.\n#### 7", "7"),
            (AnswerFormat::Gsm8k, "#### $1,250.00", "1250"),
            (AnswerFormat::Gsm8k, "#### -3", "-3"),
            (AnswerFormat::Boxed, "So the total is $\\boxed{42}$.", "42"),
            (
                AnswerFormat::Boxed,
                "\\boxed{1} then \\boxed{\\frac{3}{4}}",
                "0.75",
            ),
            (AnswerFormat::Boxed, "\\boxed{ 1,000 }", "1000"),
            (AnswerFormat::Number, "18", "18"),
            (AnswerFormat::Number, " 2.50 ", "2.5"),
            (AnswerFormat::Number, "-7", "-7"),
        ];
        for (format, answer, want) in cases {
            let gold = parse_gold_as(answer, format).unwrap_or_else(|e| panic!("{answer}: {e}"));
            assert_eq!(gold.text, want, "{format:?} {answer:?}");
        }
        for (format, answer) in [
            (AnswerFormat::Gsm8k, "no marker 5"),
            (AnswerFormat::Boxed, "\\boxed{x + 1}"),
            (AnswerFormat::Boxed, "\\boxed{5"),
            (AnswerFormat::Number, "about 5"),
        ] {
            assert!(
                parse_gold_as(answer, format).is_err(),
                "{format:?} {answer:?}"
            );
        }
    }

    #[test]
    fn numbers_in_a_jsonl_number_field_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qa.json");
        std::fs::write(
            &path,
            "{\"q\":\"1+1?\",\"a\":2}\n{\"q\":\"half?\",\"a\":0.5}\n",
        )
        .expect("write");
        let p = load(&path, &data(AnswerFormat::Number, "q", "a")).expect("valid");
        let golds: Vec<&str> = p.iter().map(|x| x.gold.text.as_str()).collect();
        assert_eq!(golds, ["2", "0.5"]);
        assert_eq!(p[1].question, "half?");
    }
}
