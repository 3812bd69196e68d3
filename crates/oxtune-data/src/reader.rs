//! Dataset files in, one record at a time, each with the line it starts on.
//!
//! Three file kinds: JSON Lines (`.jsonl`, `.ndjson`: one object per line, streamed), JSON (`.json`:
//! an array of objects, read whole; a `.json` file that holds JSON Lines is read as such) and CSV
//! (`.csv`: a header row, then one row per record, streamed).
//!
//! Two levels:
//! - [`RecordReader`] yields [`RawRecord`]s: the record's text exactly as in the file (a JSON
//!   document, or the CSV cells). Commands that pass records through (scrub, dedup, split) write
//!   untouched records back byte for byte.
//! - [`RowReader`] parses each record into a JSON object ([`Row`]); CSV cells that hold a JSON
//!   array or object (a `messages` column, say) are parsed too.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// How the records of a file are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// One JSON object per line.
    Jsonl,
    /// One JSON array of objects.
    Json,
    /// A header row, then one record per row.
    Csv,
}

impl FileKind {
    /// The kind of `path`, from its extension (and, for `.json`, its first byte: `[` is an
    /// array, anything else JSON Lines).
    pub fn detect(path: &Path) -> Result<Self> {
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match extension.as_str() {
            "jsonl" | "ndjson" => Ok(Self::Jsonl),
            "csv" => Ok(Self::Csv),
            "json" => {
                let mut file = File::open(path).map_err(|e| Error::read(path, e))?;
                let mut head = [0_u8; 4096];
                let read = file.read(&mut head).map_err(|e| Error::read(path, e))?;
                let first = head[..read]
                    .iter()
                    .copied()
                    .find(|b| !b.is_ascii_whitespace() && *b != 0xEF && *b != 0xBB && *b != 0xBF);
                Ok(if first == Some(b'[') {
                    Self::Json
                } else {
                    Self::Jsonl
                })
            }
            _ => Err(Error::UnknownFileKind {
                path: path.to_path_buf(),
                extension,
            }),
        }
    }

    /// The kind an output path asks for, from its extension alone.
    pub fn for_output(path: &Path) -> Result<Self> {
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match extension.as_str() {
            "jsonl" | "ndjson" => Ok(Self::Jsonl),
            "json" => Ok(Self::Json),
            "csv" => Ok(Self::Csv),
            _ => Err(Error::UnknownFileKind {
                path: path.to_path_buf(),
                extension,
            }),
        }
    }
}

/// A record exactly as it is in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawBody {
    /// The text of one JSON document (without the line end).
    Json(String),
    /// The cells of one CSV row, in header order.
    Csv(Vec<String>),
}

/// A record and the 1-based line of the file it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub line: u64,
    pub body: RawBody,
}

/// A parsed record: always a JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub line: u64,
    pub value: Map<String, Value>,
}

/// Reads the records of one file in order; see the module docs.
pub struct RecordReader {
    path: PathBuf,
    kind: FileKind,
    total_bytes: u64,
    source: Source,
}

enum Source {
    Jsonl {
        reader: BufReader<File>,
        line: u64,
        bytes_read: u64,
        buffer: Vec<u8>,
    },
    Json(JsonArray),
    Csv {
        reader: csv::Reader<File>,
        headers: Vec<String>,
        record: csv::StringRecord,
        done: bool,
    },
}

impl RecordReader {
    /// Opens `path`, telling its kind from the extension.
    pub fn open(path: &Path) -> Result<Self> {
        let kind = FileKind::detect(path)?;
        let file = File::open(path).map_err(|e| Error::read(path, e))?;
        let total_bytes = file.metadata().map_err(|e| Error::read(path, e))?.len();
        let source = match kind {
            FileKind::Jsonl => Source::Jsonl {
                reader: BufReader::with_capacity(1 << 20, file),
                line: 0,
                bytes_read: 0,
                buffer: Vec::new(),
            },
            FileKind::Json => Source::Json(JsonArray::open(path, file)?),
            FileKind::Csv => {
                let mut reader = csv::ReaderBuilder::new()
                    .has_headers(true)
                    .from_reader(file);
                let headers = reader
                    .headers()
                    .map_err(|e| csv_error(path, &e))?
                    .iter()
                    .map(str::to_owned)
                    .collect::<Vec<_>>();
                let headers = strip_bom_first(headers);
                Source::Csv {
                    reader,
                    headers,
                    record: csv::StringRecord::new(),
                    done: false,
                }
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            kind,
            total_bytes,
            source,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> FileKind {
        self.kind
    }

    /// The CSV header row; `None` for JSON files.
    pub fn headers(&self) -> Option<&[String]> {
        match &self.source {
            Source::Csv { headers, .. } => Some(headers),
            _ => None,
        }
    }

    /// The size of the file, for progress bars.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// How far into the file reading has got.
    pub fn bytes_read(&self) -> u64 {
        match &self.source {
            Source::Jsonl { bytes_read, .. } => *bytes_read,
            Source::Json(array) => array.pos as u64,
            Source::Csv { reader, .. } => reader.position().byte(),
        }
    }

    /// Up to `max_records` records; an empty vector at the end of the file.
    pub fn next_batch(&mut self, max_records: usize) -> Result<Vec<RawRecord>> {
        let mut batch = Vec::with_capacity(max_records.min(4096));
        while batch.len() < max_records {
            match self.next() {
                Some(record) => batch.push(record?),
                None => break,
            }
        }
        Ok(batch)
    }

    /// Parses a record of this file into a JSON object.
    pub fn parse(&self, record: &RawRecord) -> Result<Row> {
        parse_record(&self.path, self.headers().unwrap_or(&[]), record)
    }

    fn next_jsonl(&mut self) -> Option<Result<RawRecord>> {
        let Source::Jsonl {
            reader,
            line,
            bytes_read,
            buffer,
        } = &mut self.source
        else {
            return None;
        };
        loop {
            buffer.clear();
            let read = match reader.read_until(b'\n', buffer) {
                Ok(0) => return None,
                Ok(read) => read,
                Err(e) => return Some(Err(Error::read(&self.path, e))),
            };
            *line += 1;
            *bytes_read += read as u64;
            let mut bytes = buffer.as_slice();
            if *line == 1 {
                bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
            }
            while let Some((last, rest)) = bytes.split_last() {
                if *last == b'\n' || *last == b'\r' {
                    bytes = rest;
                } else {
                    break;
                }
            }
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(match std::str::from_utf8(bytes) {
                Ok(text) => Ok(RawRecord {
                    line: *line,
                    body: RawBody::Json(text.to_owned()),
                }),
                Err(e) => Err(Error::row(
                    &self.path,
                    *line,
                    format!("not valid UTF-8 (byte {} of the line)", e.valid_up_to() + 1),
                    "save the file as UTF-8",
                )),
            });
        }
    }

    fn next_csv(&mut self) -> Option<Result<RawRecord>> {
        let Source::Csv {
            reader,
            record,
            done,
            ..
        } = &mut self.source
        else {
            return None;
        };
        if *done {
            return None;
        }
        match reader.read_record(record) {
            Ok(false) => {
                *done = true;
                None
            }
            Ok(true) => {
                let line = record.position().map_or(0, csv::Position::line);
                Some(Ok(RawRecord {
                    line,
                    body: RawBody::Csv(record.iter().map(str::to_owned).collect()),
                }))
            }
            Err(e) => {
                *done = true;
                Some(Err(csv_error(&self.path, &e)))
            }
        }
    }
}

impl Iterator for RecordReader {
    type Item = Result<RawRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.source {
            Source::Jsonl { .. } => self.next_jsonl(),
            Source::Json(array) => array.next_record(&self.path),
            Source::Csv { .. } => self.next_csv(),
        }
    }
}

/// Reads the records of a file as JSON objects.
pub struct RowReader {
    records: RecordReader,
}

impl RowReader {
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            records: RecordReader::open(path)?,
        })
    }

    pub fn records(&self) -> &RecordReader {
        &self.records
    }
}

impl Iterator for RowReader {
    type Item = Result<Row>;

    fn next(&mut self) -> Option<Self::Item> {
        let record = self.records.next()?;
        Some(record.and_then(|record| self.records.parse(&record)))
    }
}

/// Parses one record of `path` into a JSON object. CSV cells become strings, except cells
/// holding a valid JSON array or object, which become that value.
pub fn parse_record(path: &Path, headers: &[String], record: &RawRecord) -> Result<Row> {
    let value = match &record.body {
        RawBody::Json(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => map,
            Ok(other) => {
                return Err(Error::row(
                    path,
                    record.line,
                    format!("expected a JSON object, found {}", json_type_name(&other)),
                    "each record must be an object such as {\"messages\": [...]}",
                ));
            }
            Err(e) => {
                return Err(Error::row(
                    path,
                    record.line,
                    format!("not valid JSON: {e}"),
                    "each line must hold exactly one JSON object; fix or remove this line",
                ));
            }
        },
        RawBody::Csv(cells) => headers
            .iter()
            .zip(cells)
            .map(|(name, cell)| (name.clone(), csv_cell_value(cell)))
            .collect(),
    };
    Ok(Row {
        line: record.line,
        value,
    })
}

fn csv_cell_value(cell: &str) -> Value {
    let trimmed = cell.trim_start();
    if (trimmed.starts_with('[') || trimmed.starts_with('{'))
        && let Ok(value @ (Value::Array(_) | Value::Object(_))) =
            serde_json::from_str::<Value>(cell)
    {
        return value;
    }
    Value::String(cell.to_owned())
}

/// `"an array"`, `"a string"`, … for messages.
pub fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn csv_error(path: &Path, error: &csv::Error) -> Error {
    let line = error.position().map_or(0, csv::Position::line);
    Error::row(
        path,
        line,
        format!("not valid CSV: {error}"),
        "every row needs as many cells as the header; quote cells that hold commas or line breaks",
    )
}

fn strip_bom_first(mut headers: Vec<String>) -> Vec<String> {
    if let Some(first) = headers.first_mut()
        && let Some(stripped) = first.strip_prefix('\u{feff}')
    {
        *first = stripped.to_owned();
    }
    headers
}

/// A JSON array read whole, handed out one element at a time with the line it starts on.
struct JsonArray {
    bytes: Vec<u8>,
    /// Byte offset of the next unread byte.
    pos: usize,
    /// Line of `line_pos` (1-based).
    line: u64,
    line_pos: usize,
    state: ArrayState,
}

#[derive(PartialEq, Eq)]
enum ArrayState {
    First,
    Rest,
    Done,
}

impl JsonArray {
    fn open(path: &Path, mut file: File) -> Result<Self> {
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| Error::read(path, e))?;
        let pos = if bytes.starts_with(b"\xEF\xBB\xBF") {
            3
        } else {
            0
        };
        let mut array = Self {
            bytes,
            pos,
            line: 1,
            line_pos: 0,
            state: ArrayState::First,
        };
        array.skip_whitespace();
        if array.bytes.get(array.pos) != Some(&b'[') {
            let line = array.line_at(array.pos);
            return Err(Error::row(
                path,
                line,
                "expected a JSON array of records",
                "a .json dataset is `[{...}, {...}]`; use .jsonl for one object per line",
            ));
        }
        array.pos += 1;
        Ok(array)
    }

    fn skip_whitespace(&mut self) {
        while self
            .bytes
            .get(self.pos)
            .is_some_and(u8::is_ascii_whitespace)
        {
            self.pos += 1;
        }
    }

    fn line_at(&mut self, pos: usize) -> u64 {
        let pos = pos.min(self.bytes.len());
        if pos >= self.line_pos {
            self.line += self.bytes[self.line_pos..pos]
                .iter()
                .filter(|b| **b == b'\n')
                .count() as u64;
            self.line_pos = pos;
        }
        self.line
    }

    fn next_record(&mut self, path: &Path) -> Option<Result<RawRecord>> {
        if self.state == ArrayState::Done {
            return None;
        }
        self.skip_whitespace();
        if self.state == ArrayState::Rest {
            match self.bytes.get(self.pos) {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_whitespace();
                }
                Some(b']') => {
                    self.state = ArrayState::Done;
                    return None;
                }
                _ => {
                    self.state = ArrayState::Done;
                    let line = self.line_at(self.pos);
                    return Some(Err(Error::row(
                        path,
                        line,
                        "expected `,` or `]` after a record",
                        "records in a JSON array are separated by commas",
                    )));
                }
            }
        } else if self.bytes.get(self.pos) == Some(&b']') {
            self.state = ArrayState::Done;
            return None;
        }
        let start = self.pos;
        let line = self.line_at(start);
        let mut stream = serde_json::Deserializer::from_slice(&self.bytes[start..])
            .into_iter::<serde::de::IgnoredAny>();
        match stream.next() {
            Some(Ok(_)) => {
                let end = start + stream.byte_offset();
                self.pos = end;
                self.state = ArrayState::Rest;
                Some(match std::str::from_utf8(&self.bytes[start..end]) {
                    Ok(text) => Ok(RawRecord {
                        line,
                        body: RawBody::Json(text.to_owned()),
                    }),
                    Err(_) => Err(Error::row(
                        path,
                        line,
                        "not valid UTF-8",
                        "save the file as UTF-8",
                    )),
                })
            }
            Some(Err(e)) => {
                self.state = ArrayState::Done;
                let error_line = line + e.line().saturating_sub(1) as u64;
                Some(Err(Error::row(
                    path,
                    error_line,
                    format!("not valid JSON: {e}"),
                    "fix the record; `python -m json.tool FILE` shows the same position",
                )))
            }
            None => {
                self.state = ArrayState::Done;
                Some(Err(Error::row(
                    path,
                    line,
                    "the array is not closed",
                    "the file may be truncated; it must end with `]`",
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write test file");
        path
    }

    #[test]
    fn jsonl_records_carry_their_line_and_skip_blank_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "a.jsonl", "\u{feff}{\"a\": 1}\n\n{\"a\": 2}\r\n");
        let rows: Vec<Row> = RowReader::open(&path)
            .expect("open")
            .collect::<Result<_>>()
            .expect("rows");
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(rows[1].value["a"], 2);
    }

    #[test]
    fn broken_jsonl_row_names_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "bad.jsonl", "{\"a\": 1}\n{\"a\": \n[1]\n");
        let errors: Vec<String> = RowReader::open(&path)
            .expect("open")
            .filter_map(|r| r.err())
            .map(|e| e.to_string())
            .collect();
        assert_eq!(errors.len(), 2);
        assert!(
            errors[0].contains("bad.jsonl:2: not valid JSON"),
            "{}",
            errors[0]
        );
        assert!(
            errors[1].contains("bad.jsonl:3: expected a JSON object, found an array"),
            "{}",
            errors[1]
        );
    }

    #[test]
    fn json_array_elements_carry_their_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "a.json",
            "[\n  {\"a\": 1},\n  {\n    \"a\": 2\n  }\n]\n",
        );
        let mut reader = RecordReader::open(&path).expect("open");
        assert_eq!(reader.kind(), FileKind::Json);
        let records = reader.next_batch(10).expect("records");
        assert_eq!(
            records.iter().map(|r| r.line).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(
            records[1].body,
            RawBody::Json("{\n    \"a\": 2\n  }".to_owned())
        );
    }

    #[test]
    fn broken_json_array_names_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "a.json", "[\n  {\"a\": 1},\n  {\"a\": }\n]\n");
        let errors: Vec<String> = RowReader::open(&path)
            .expect("open")
            .filter_map(|r| r.err())
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors[0].contains("a.json:3: not valid JSON"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn json_extension_holding_json_lines_is_read_as_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "a.json", "{\"a\": 1}\n{\"a\": 2}\n");
        assert_eq!(FileKind::detect(&path).expect("kind"), FileKind::Jsonl);
    }

    #[test]
    fn csv_rows_become_objects_and_json_cells_are_parsed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "a.csv",
            "query,response,history\n你好,\"hi, there\",\"[[\"\"a\"\",\"\"b\"\"]]\"\n",
        );
        let rows: Vec<Row> = RowReader::open(&path)
            .expect("open")
            .collect::<Result<_>>()
            .expect("rows");
        assert_eq!(rows[0].line, 2);
        assert_eq!(rows[0].value["response"], "hi, there");
        assert_eq!(rows[0].value["history"], serde_json::json!([["a", "b"]]));
    }

    #[test]
    fn csv_row_with_wrong_cell_count_names_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "a.csv", "query,response\na,b\nc\n");
        let errors: Vec<String> = RowReader::open(&path)
            .expect("open")
            .filter_map(|r| r.err())
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors[0].contains("a.csv:3: not valid CSV"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn unknown_extension_is_refused_with_a_hint() {
        let error = FileKind::detect(Path::new("data.txt")).expect_err("txt is not a dataset");
        assert!(
            error
                .to_string()
                .contains("hint: name the file .jsonl, .json or .csv")
        );
    }
}
