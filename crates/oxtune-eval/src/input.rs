//! Predictions and references from files, matched row by row.
//!
//! Files are JSON Lines / JSON / CSV (read by `oxtune-data`, so errors name file and line) or
//! plain text (`.txt`: one sample per line, as sacrebleu reads them). In a row the text is the
//! first field present of:
//! - predictions: `prediction`, `response`, `predict`, `output`, `text`, `content`;
//! - references: `references` (a list: several references), `reference`, `labels`, `label`,
//!   `target`, `answer`, `output`, `response`, `text`;
//!
//! or the field named with `--prediction-field` / `--reference-field`. A row in a dataset
//! format (messages, alpaca, …) without such a field gives its last assistant turn. Without a
//! references file, references come from the predictions file's rows (as `oxtune infer` writes
//! `response` next to `labels`). When both files carry an `id`, the ids must agree row by row.

use std::path::Path;

use oxtune_data::format::{Format, Role, conversation};
use oxtune_data::{Row, RowReader};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

const PREDICTION_FIELDS: [&str; 6] = [
    "prediction",
    "response",
    "predict",
    "output",
    "text",
    "content",
];
const REFERENCE_FIELDS: [&str; 9] = [
    "references",
    "reference",
    "labels",
    "label",
    "target",
    "answer",
    "output",
    "response",
    "text",
];

/// One prediction with its references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The row's `id`, if any.
    pub id: Option<String>,
    /// Line of the prediction in its file.
    pub line: u64,
    pub prediction: String,
    pub references: Vec<String>,
}

/// Which fields to read; `None` picks from the lists above.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    pub prediction: Option<String>,
    pub reference: Option<String>,
}

struct Record {
    line: u64,
    row: Map<String, Value>,
}

fn read_records(path: &Path) -> Result<Vec<Record>> {
    let is_text = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("txt"));
    if is_text {
        let text = std::fs::read_to_string(path).map_err(|source| oxtune_data::Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        return Ok(text
            .lines()
            .enumerate()
            .map(|(index, line)| {
                let mut row = Map::new();
                row.insert("text".to_owned(), Value::String(line.to_owned()));
                Record {
                    line: index as u64 + 1,
                    row,
                }
            })
            .collect());
    }
    RowReader::open(path)?
        .map(|row| {
            row.map(|Row { line, value }| Record { line, row: value })
                .map_err(Error::from)
        })
        .collect()
}

fn id_of(row: &Map<String, Value>) -> Option<String> {
    match row.get("id")? {
        Value::String(id) => Some(id.clone()),
        Value::Number(id) => Some(id.to_string()),
        _ => None,
    }
}

fn last_assistant_turn(row: &Map<String, Value>) -> Option<String> {
    let format = Format::detect(row)?;
    conversation(format, row)
        .iter()
        .rev()
        .find(|turn| turn.role == Role::Assistant)
        .map(|turn| turn.text.to_string())
}

/// The texts of `field` in a row (a list gives several).
fn texts(value: &Value) -> Option<Vec<String>> {
    match value {
        Value::String(text) => Some(vec![text.clone()]),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_string) => Some(
            items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect(),
        ),
        Value::Null => Some(vec![String::new()]),
        _ => None,
    }
}

fn pick(
    path: &Path,
    record: &Record,
    named: Option<&str>,
    candidates: &[&str],
    what: &str,
    skip: Option<&str>,
) -> Result<(String, Vec<String>)> {
    let fields: Vec<&str> = match named {
        Some(name) => vec![name],
        None => candidates
            .iter()
            .copied()
            .filter(|c| Some(*c) != skip)
            .collect(),
    };
    for field in &fields {
        if let Some(value) = record.row.get(*field) {
            return match texts(value) {
                Some(texts) => Ok(((*field).to_owned(), texts)),
                None => Err(Error::Row {
                    path: path.to_path_buf(),
                    line: record.line,
                    message: format!("`{field}` is not text"),
                    hint: format!(
                        "the {what} must be a string (references may be a list of strings)"
                    ),
                }),
            };
        }
    }
    if named.is_none()
        && let Some(turn) = last_assistant_turn(&record.row)
    {
        return Ok(("last assistant turn".to_owned(), vec![turn]));
    }
    let keys = record.row.keys().cloned().collect::<Vec<_>>().join(", ");
    Err(Error::Row {
        path: path.to_path_buf(),
        line: record.line,
        message: format!("no {what} field among [{keys}]"),
        hint: match named {
            Some(name) => format!("this row has no `{name}`; check --{what}-field"),
            None => format!(
                "name the field with --{what}-field, or use one of: {}",
                candidates.join(", ")
            ),
        },
    })
}

/// Reads the samples: predictions from `predictions`, references from `references` (or from
/// the predictions' rows when `None`).
pub fn read_samples(
    predictions: &Path,
    references: Option<&Path>,
    fields: &Fields,
) -> Result<Vec<Sample>> {
    let prediction_records = read_records(predictions)?;
    let reference_records = match references {
        Some(path) => Some(read_records(path)?),
        None => None,
    };
    if let (Some(path), Some(records)) = (references, &reference_records)
        && records.len() != prediction_records.len()
    {
        return Err(Error::CountMismatch {
            predictions: predictions.to_path_buf(),
            prediction_count: prediction_records.len(),
            references: path.to_path_buf(),
            reference_count: records.len(),
        });
    }
    let mut samples = Vec::with_capacity(prediction_records.len());
    for (index, record) in prediction_records.iter().enumerate() {
        let (prediction_field, mut prediction) = pick(
            predictions,
            record,
            fields.prediction.as_deref(),
            &PREDICTION_FIELDS,
            "prediction",
            None,
        )?;
        let prediction = prediction.swap_remove(0);
        let references = match (&reference_records, references) {
            (Some(records), Some(path)) => {
                let reference = &records[index];
                if let (Some(a), Some(b)) = (id_of(&record.row), id_of(&reference.row))
                    && a != b
                {
                    return Err(Error::Row {
                        path: path.to_path_buf(),
                        line: reference.line,
                        message: format!(
                            "id `{b}` does not match id `{a}` at {}:{}",
                            predictions.display(),
                            record.line
                        ),
                        hint: "sort both files the same way; samples are matched row by row"
                            .to_owned(),
                    });
                }
                pick(
                    path,
                    reference,
                    fields.reference.as_deref(),
                    &REFERENCE_FIELDS,
                    "reference",
                    None,
                )?
                .1
            }
            _ => {
                pick(
                    predictions,
                    record,
                    fields.reference.as_deref(),
                    &REFERENCE_FIELDS,
                    "reference",
                    Some(&prediction_field),
                )?
                .1
            }
        };
        samples.push(Sample {
            id: id_of(&record.row),
            line: record.line,
            prediction,
            references,
        });
    }
    if samples.is_empty() {
        return Err(Error::Invalid {
            message: format!("{} holds no predictions", predictions.display()),
            hint: "run inference first, or check the path".to_owned(),
        });
    }
    Ok(samples)
}

/// The paths, for reports.
pub fn describe(predictions: &Path, references: Option<&Path>) -> (String, String) {
    (
        predictions.display().to_string(),
        references.map_or_else(
            || predictions.display().to_string(),
            |p| p.display().to_string(),
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn reads_two_files_and_several_references() {
        let dir = tempfile::tempdir().expect("tempdir");
        let predictions = write(
            &dir,
            "p.jsonl",
            "{\"id\": 1, \"prediction\": \"a b\"}\n{\"id\": 2, \"prediction\": \"c\"}\n",
        );
        let references = write(
            &dir,
            "r.jsonl",
            "{\"id\": 1, \"references\": [\"a b\", \"a c\"]}\n{\"id\": 2, \"reference\": \"c\"}\n",
        );
        let samples =
            read_samples(&predictions, Some(&references), &Fields::default()).expect("samples");
        assert_eq!(samples[0].references, vec!["a b", "a c"]);
        assert_eq!(samples[1].id.as_deref(), Some("2"));
    }

    #[test]
    fn one_file_with_response_and_labels() {
        let dir = tempfile::tempdir().expect("tempdir");
        let predictions = write(
            &dir,
            "p.jsonl",
            "{\"response\": \"x\", \"labels\": \"y\"}\n",
        );
        let samples = read_samples(&predictions, None, &Fields::default()).expect("samples");
        assert_eq!(
            (
                samples[0].prediction.as_str(),
                samples[0].references[0].as_str()
            ),
            ("x", "y")
        );
    }

    #[test]
    fn references_from_a_dataset_use_the_last_assistant_turn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let predictions = write(&dir, "p.txt", "hello\n");
        let references = write(
            &dir,
            "r.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"hi\"}]}\n",
        );
        let samples =
            read_samples(&predictions, Some(&references), &Fields::default()).expect("samples");
        assert_eq!(samples[0].references, vec!["hi"]);
    }

    #[test]
    fn mismatched_counts_and_ids_are_errors_naming_the_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let predictions = write(
            &dir,
            "p.jsonl",
            "{\"id\": 1, \"prediction\": \"a\"}\n{\"id\": 2, \"prediction\": \"b\"}\n",
        );
        let short = write(&dir, "short.jsonl", "{\"reference\": \"a\"}\n");
        let error = read_samples(&predictions, Some(&short), &Fields::default())
            .expect_err("counts")
            .to_string();
        assert!(
            error.contains("has 2 rows but") && error.contains("short.jsonl has 1"),
            "{error}"
        );
        let swapped = write(
            &dir,
            "swapped.jsonl",
            "{\"id\": 2, \"reference\": \"b\"}\n{\"id\": 1, \"reference\": \"a\"}\n",
        );
        let error = read_samples(&predictions, Some(&swapped), &Fields::default())
            .expect_err("ids")
            .to_string();
        assert!(
            error.contains("swapped.jsonl:1: id `2` does not match id `1` at"),
            "{error}"
        );
    }

    #[test]
    fn a_row_without_the_field_names_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let predictions = write(
            &dir,
            "p.jsonl",
            "{\"prediction\": \"a\"}\n{\"answer_text\": \"b\"}\n",
        );
        let references = write(
            &dir,
            "r.jsonl",
            "{\"reference\": \"a\"}\n{\"reference\": \"b\"}\n",
        );
        let error = read_samples(&predictions, Some(&references), &Fields::default())
            .expect_err("missing")
            .to_string();
        assert!(
            error.contains("p.jsonl:2: no prediction field among [answer_text]"),
            "{error}"
        );
    }
}
