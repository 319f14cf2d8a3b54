//! Users' own datasets, through `orchestrate run` on the tiny model: a Parquet file (as Hugging
//! Face stores datasets, snappy-compressed) with MATH-style `\boxed{}` solutions and a JSONL file
//! of plain numeric answers, each with its own field names, train one iteration; bad files fail
//! before anything is created, naming the file, the row and the field.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

/// Writes a Parquet file of text columns.
fn write_parquet(path: &Path, columns: &[(&str, Vec<String>)]) {
    let fields: String = columns
        .iter()
        .map(|(name, _)| format!("REQUIRED BINARY {name} (UTF8); "))
        .collect();
    let schema = Arc::new(parse_message_type(&format!("message dataset {{ {fields}}}")).unwrap());
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    for (_, values) in columns {
        let mut column = group.next_column().unwrap().unwrap();
        let data: Vec<ByteArray> = values.iter().map(|v| ByteArray::from(v.as_str())).collect();
        column
            .typed::<ByteArrayType>()
            .write_batch(&data, None, None)
            .unwrap();
        column.close().unwrap();
    }
    group.close().unwrap();
    writer.close().unwrap();
}

/// Six problems `i + i`, their questions and golds.
fn problems() -> Vec<(String, i64)> {
    (0..6)
        .map(|i| (format!("What is {i} plus {i}?"), 2 * i))
        .collect()
}

/// Runs one iteration of the tiny config on `train`/`test` with `overrides`; the run folder.
fn train_one_iteration(dir: &Path, data: &Path, overrides: &[String]) -> std::path::PathBuf {
    let cfg = setup(dir, "");
    let mut args = vec![
        "run".to_string(),
        cfg.display().to_string(),
        "max_iterations=1".into(),
        format!("data.train={}", data.display()),
        format!("data.test={}", data.display()),
    ];
    args.extend(overrides.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = orchestrate(&service_bins(), &args, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("run")
}

/// The run trained its iteration on the dataset's own questions and golds.
fn assert_trained_on(run: &Path, golds: &[(String, i64)]) {
    let db = db(run);
    assert_eq!(
        query(&db, "SELECT iteration, phase FROM iterations"),
        ["0|done"]
    );
    assert_eq!(query(&db, "SELECT COUNT(*) FROM rollouts"), ["4"]);
    assert_eq!(query(&db, "SELECT COUNT(*) FROM checkpoints"), ["1"]);
    for task in query(&db, "SELECT question, gold FROM tasks") {
        let (q, gold) = task.split_once('|').unwrap();
        let want = golds.iter().find(|(wq, _)| wq == q);
        assert_eq!(
            want.map(|(_, g)| g.to_string()).as_deref(),
            Some(gold),
            "task {task} comes from the dataset with its gold"
        );
    }
}

#[test]
fn a_parquet_file_and_a_jsonl_file_with_their_own_field_names_train_one_iteration_each() {
    let golds = problems();
    // Parquet, MATH-style: `problem` / `solution` with the answer in the last \boxed{}.
    let dir = tempfile::tempdir().unwrap();
    let parquet = dir.path().join("math.parquet");
    write_parquet(
        &parquet,
        &[
            ("problem", golds.iter().map(|(q, _)| q.clone()).collect()),
            (
                "solution",
                golds
                    .iter()
                    .map(|(_, g)| format!("Adding gives \\boxed{{{g}}}."))
                    .collect(),
            ),
        ],
    );
    let run = train_one_iteration(
        dir.path(),
        &parquet,
        &[
            "data.fields.question=problem".into(),
            "data.fields.answer=solution".into(),
            "data.answer_format=boxed".into(),
        ],
    );
    assert_trained_on(&run, &golds);

    // JSONL of plain numeric answers: `q` / `a`, the answer a JSON number.
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("qa.jsonl");
    let rows: Vec<String> = golds
        .iter()
        .map(|(q, g)| serde_json::json!({"q": q, "a": g}).to_string())
        .collect();
    std::fs::write(&jsonl, rows.join("\n") + "\n").unwrap();
    let run = train_one_iteration(
        dir.path(),
        &jsonl,
        &[
            "data.fields.question=q".into(),
            "data.fields.answer=a".into(),
            "data.answer_format=number".into(),
        ],
    );
    assert_trained_on(&run, &golds);
    record(
        "TEST_COUNTS_FILE",
        "datasets: a Parquet file (boxed answers) and a JSONL file (numbers) with their own field names trained one iteration each",
    );
}

#[test]
fn bad_dataset_files_fail_before_anything_is_created_naming_the_row_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "");
    let golds = problems();
    let no_answer = dir.path().join("no_answer.parquet");
    write_parquet(
        &no_answer,
        &[("problem", golds.iter().map(|(q, _)| q.clone()).collect())],
    );
    let words = dir.path().join("words.parquet");
    write_parquet(
        &words,
        &[
            ("problem", vec!["one".into(), "two".into()]),
            ("solution", vec!["\\boxed{1}".into(), "\\boxed{two}".into()]),
        ],
    );
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let not_parquet = dir.path().join("broken.parquet");
    std::fs::write(&not_parquet, "question,answer\n").unwrap();
    let csv = dir.path().join("data.csv");
    std::fs::write(&csv, "q,a\n").unwrap();
    let fields = [
        "data.fields.question=problem".to_string(),
        "data.fields.answer=solution".into(),
        "data.answer_format=boxed".into(),
    ];
    let cases: Vec<(&Path, Vec<&str>)> = vec![
        (
            &no_answer,
            vec![
                "no_answer.parquet row 1",
                "field `solution`",
                "missing (the row has problem)",
            ],
        ),
        (
            &words,
            vec![
                "words.parquet row 2",
                "field `solution`",
                "`two` is not a number",
            ],
        ),
        (&empty, vec!["empty.jsonl", "no problems"]),
        (
            &not_parquet,
            vec!["broken.parquet", "cannot read it as Parquet"],
        ),
        (&csv, vec!["`data.train`", ".jsonl", ".parquet"]),
    ];
    for (file, says) in cases {
        let mut args = vec![
            "run".to_string(),
            cfg.display().to_string(),
            format!("data.train={}", file.display()),
        ];
        args.extend(fields.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = orchestrate(&service_bins(), &args, None);
        assert!(!out.status.success(), "{}", file.display());
        let err = String::from_utf8_lossy(&out.stderr);
        for s in says {
            assert!(err.contains(s), "`{s}` not in:\n{err}");
        }
        assert!(!dir.path().join("run").exists(), "nothing was created");
    }
}
