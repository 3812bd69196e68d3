//! Scrubbing a whole dataset file.
//!
//! Records stream through in batches: a batch is read, detection runs on all cores (rayon),
//! then replacements, the report and the output are done in record order on one thread, so
//! pseudonym numbering and the output are the same on every run. Memory is one batch (plus
//! one map entry per distinct value in pseudonym mode). Every string of every record is
//! scanned, whatever the format; records with nothing to replace are copied byte for byte, the
//! others are re-serialized. The output is written atomically and never over the input.

use std::path::Path;

use rayon::prelude::*;
use serde_json::{Map, Value};

use super::report::ScrubReport;
use super::{Hits, Pseudonyms, ReplaceMode, Scrubber, replacement};
use crate::error::{Error, Result};
use crate::reader::{RawBody, RawRecord, RecordReader, parse_record};
use crate::writer::{RecordWriter, ensure_distinct};

/// How to scrub.
#[derive(Debug, Clone, Copy)]
pub struct ScrubOptions {
    pub replace: ReplaceMode,
    /// Records per batch (the unit of parallel work and of memory).
    pub batch_records: usize,
}

impl Default for ScrubOptions {
    fn default() -> Self {
        Self {
            replace: ReplaceMode::Placeholder,
            batch_records: 4096,
        }
    }
}

/// Where a string sits in its record.
enum Location {
    /// A JSON pointer (`/messages/0/content`).
    Pointer(String),
    /// A CSV cell index.
    Cell(usize),
}

/// One string with something in it.
struct FieldHits {
    location: Location,
    /// The field path for the report (`messages[].content`).
    label: String,
    text: String,
    hits: Hits,
}

/// A record after detection.
struct Scanned {
    record: RawRecord,
    object: Option<Map<String, Value>>,
    fields_scanned: u64,
    fields: Vec<FieldHits>,
}

/// Scrubs `input` into `output`; `progress(bytes_done, bytes_total)` is called after each
/// batch.
pub fn scrub_file(
    input: &Path,
    output: &Path,
    scrubber: &Scrubber,
    options: &ScrubOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<ScrubReport> {
    ensure_distinct(input, output)?;
    let mut reader = RecordReader::open(input)?;
    let headers: Vec<String> = reader.headers().map(<[String]>::to_vec).unwrap_or_default();
    let mut writer = RecordWriter::create(output, reader.kind(), reader.headers())?;
    let mut report = ScrubReport {
        input: input.display().to_string(),
        output: output.display().to_string(),
        replace: options.replace.name().to_owned(),
        detectors: scrubber
            .detector_names()
            .into_iter()
            .map(str::to_owned)
            .collect(),
        ..ScrubReport::default()
    };
    let mut pseudonyms = Pseudonyms::default();
    loop {
        let batch = reader.next_batch(options.batch_records.max(1))?;
        if batch.is_empty() {
            break;
        }
        let scanned: Vec<Result<Scanned>> = batch
            .into_par_iter()
            .map(|record| scan_record(input, &headers, record, scrubber))
            .collect();
        for scanned in scanned {
            write_scrubbed(
                scanned?,
                &mut writer,
                &mut report,
                &mut pseudonyms,
                options.replace,
            )?;
        }
        progress(reader.bytes_read(), reader.total_bytes());
    }
    writer.finish()?;
    report.distinct_values = pseudonyms.len() as u64;
    Ok(report)
}

fn scan_record(
    path: &Path,
    headers: &[String],
    record: RawRecord,
    scrubber: &Scrubber,
) -> Result<Scanned> {
    let mut fields = Vec::new();
    let mut fields_scanned = 0;
    let object = match &record.body {
        RawBody::Json(_) => {
            let row = parse_record(path, headers, &record)?;
            let value = Value::Object(row.value);
            let mut pointer = String::new();
            let mut label = String::new();
            walk(
                &value,
                &mut pointer,
                &mut label,
                scrubber,
                &mut fields,
                &mut fields_scanned,
            );
            match value {
                Value::Object(map) => Some(map),
                _ => None,
            }
        }
        RawBody::Csv(cells) => {
            for (index, cell) in cells.iter().enumerate() {
                fields_scanned += 1;
                let hits = scrubber.detect(cell);
                if !hits.is_empty() {
                    let label = headers
                        .get(index)
                        .cloned()
                        .unwrap_or_else(|| format!("column {}", index + 1));
                    fields.push(FieldHits {
                        location: Location::Cell(index),
                        label,
                        text: cell.clone(),
                        hits,
                    });
                }
            }
            None
        }
    };
    Ok(Scanned {
        record,
        object,
        fields_scanned,
        fields,
    })
}

/// Visits every string under `value`, building its JSON pointer and report label.
fn walk(
    value: &Value,
    pointer: &mut String,
    label: &mut String,
    scrubber: &Scrubber,
    fields: &mut Vec<FieldHits>,
    fields_scanned: &mut u64,
) {
    match value {
        Value::String(text) => {
            *fields_scanned += 1;
            let hits = scrubber.detect(text);
            if !hits.is_empty() {
                fields.push(FieldHits {
                    location: Location::Pointer(pointer.clone()),
                    label: label.clone(),
                    text: text.clone(),
                    hits,
                });
            }
        }
        Value::Array(items) => {
            let (pointer_len, label_len) = (pointer.len(), label.len());
            label.push_str("[]");
            for (index, item) in items.iter().enumerate() {
                pointer.push('/');
                pointer.push_str(&index.to_string());
                walk(item, pointer, label, scrubber, fields, fields_scanned);
                pointer.truncate(pointer_len);
            }
            label.truncate(label_len);
        }
        Value::Object(map) => {
            let (pointer_len, label_len) = (pointer.len(), label.len());
            for (key, item) in map {
                pointer.push('/');
                pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
                if !label.is_empty() {
                    label.push('.');
                }
                label.push_str(key);
                walk(item, pointer, label, scrubber, fields, fields_scanned);
                pointer.truncate(pointer_len);
                label.truncate(label_len);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

fn write_scrubbed(
    scanned: Scanned,
    writer: &mut RecordWriter,
    report: &mut ScrubReport,
    pseudonyms: &mut Pseudonyms,
    mode: ReplaceMode,
) -> Result<()> {
    let Scanned {
        record,
        object,
        fields_scanned,
        fields,
    } = scanned;
    report.records += 1;
    report.fields_scanned += fields_scanned;
    let line = record.line;
    let mut changed: Vec<(Location, String)> = Vec::new();
    for field in fields {
        for miss in &field.hits.near_misses {
            report.add_look_alike(
                line,
                &field.label,
                &field.text[miss.start..miss.end],
                &miss.kind,
                miss.reason,
            );
        }
        if field.hits.findings.is_empty() {
            continue;
        }
        let mut text = String::with_capacity(field.text.len());
        let mut copied = 0;
        for finding in &field.hits.findings {
            let value = &field.text[finding.start..finding.end];
            let replaced = replacement(value, &finding.kind, mode, pseudonyms);
            report.add_finding(line, &field.label, value, &finding.kind, &replaced);
            text.push_str(&field.text[copied..finding.start]);
            text.push_str(&replaced);
            copied = finding.end;
        }
        text.push_str(&field.text[copied..]);
        changed.push((field.location, text));
    }
    if changed.is_empty() {
        return writer.write_raw(&record.body);
    }
    report.records_changed += 1;
    match (record.body, object) {
        (RawBody::Csv(mut cells), _) => {
            for (location, text) in changed {
                if let Location::Cell(index) = location
                    && let Some(cell) = cells.get_mut(index)
                {
                    *cell = text;
                }
            }
            writer.write_raw(&RawBody::Csv(cells))
        }
        (RawBody::Json(_), Some(object)) => {
            let mut value = Value::Object(object);
            for (location, text) in changed {
                if let Location::Pointer(pointer) = location
                    && let Some(slot) = value.pointer_mut(&pointer)
                {
                    *slot = Value::String(text);
                }
            }
            match value {
                Value::Object(object) => writer.write_object(&object),
                _ => Err(Error::Invalid {
                    message: "a scrubbed record is no longer an object".to_owned(),
                    hint: "report this as a bug".to_owned(),
                }),
            }
        }
        (RawBody::Json(_), None) => Err(Error::Invalid {
            message: "a JSON record was not parsed".to_owned(),
            hint: "report this as a bug".to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, text: &str, mode: ReplaceMode) -> (String, ScrubReport) {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join(name);
        std::fs::write(&input, text).expect("write");
        let output = dir.path().join(format!("out-{name}"));
        let options = ScrubOptions {
            replace: mode,
            batch_records: 2,
        };
        let report =
            scrub_file(&input, &output, &Scrubber::builtin(), &options, &|_, _| {}).expect("scrub");
        assert_eq!(
            std::fs::read_to_string(&input).expect("input"),
            text,
            "the input is never modified"
        );
        (std::fs::read_to_string(&output).expect("output"), report)
    }

    #[test]
    fn scrubs_every_string_and_copies_clean_records_verbatim() {
        let input = concat!(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"我的手机13812345678\"}, {\"role\": \"assistant\", \"content\": \"好的\"}]}\n",
            "{\"instruction\":  \"无敏感信息\", \"output\": \"ok\"}\n",
            "{\"query\": \"邮箱 a.b@example.com\", \"response\": \"再发到a.b@example.com\", \"history\": [[\"卡号6222021234567890128\", \"收到\"]]}\n",
        );
        let (output, report) = run("a.jsonl", input, ReplaceMode::Pseudonym);
        let lines: Vec<&str> = output.lines().collect();
        assert!(lines[0].contains("我的手机<PHONE_1>"), "{}", lines[0]);
        assert_eq!(
            lines[1],
            "{\"instruction\":  \"无敏感信息\", \"output\": \"ok\"}"
        );
        assert!(
            lines[2].contains("邮箱 <EMAIL_1>")
                && lines[2].contains("再发到<EMAIL_1>")
                && lines[2].contains("卡号<BANK_CARD_1>"),
            "{}",
            lines[2]
        );
        assert_eq!(report.records, 3);
        assert_eq!(report.records_changed, 2);
        assert_eq!(report.findings, 4);
        assert_eq!(report.by_field["history[][]"]["BANK_CARD"], 1);
        assert_eq!(report.by_field["messages[].content"]["PHONE"], 1);
    }

    #[test]
    fn csv_cells_are_scrubbed_in_place() {
        let (output, report) = run(
            "a.csv",
            "query,response\n\"电话 010-62345678, 请回电\",好的\n",
            ReplaceMode::Placeholder,
        );
        assert_eq!(output, "query,response\n\"电话 <LANDLINE>, 请回电\",好的\n");
        assert_eq!(report.by_field["query"]["LANDLINE"], 1);
    }

    #[test]
    fn a_broken_row_stops_the_run_naming_file_and_line_and_leaves_no_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("bad.jsonl");
        std::fs::write(&input, "{\"query\": \"a\", \"response\": \"b\"}\n{oops\n").expect("write");
        let output = dir.path().join("out.jsonl");
        let error = scrub_file(
            &input,
            &output,
            &Scrubber::builtin(),
            &ScrubOptions::default(),
            &|_, _| {},
        )
        .expect_err("broken row");
        assert!(
            error.to_string().contains("bad.jsonl:2: not valid JSON"),
            "{error}"
        );
        assert!(!output.exists());
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1);
    }
}
