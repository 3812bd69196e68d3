//! Dataset files out, written atomically.
//!
//! Everything goes to a temporary file beside the destination (`NAME.tmp-PID`), which is
//! flushed, fsynced and renamed over the destination only by `commit`/`finish`. A failure or
//! an early return leaves the destination as it was and removes the temporary file.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::reader::{FileKind, RawBody};

/// A file that appears at its path only once complete.
pub struct AtomicFile {
    path: PathBuf,
    temporary: PathBuf,
    file: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Starts writing `path` (creating its parent directories).
    pub fn create(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::write(parent, e))?;
        }
        let mut name = path
            .file_name()
            .map(std::ffi::OsStr::to_os_string)
            .unwrap_or_default();
        name.push(format!(".tmp-{}", std::process::id()));
        let temporary = path.with_file_name(name);
        let file = File::create(&temporary).map_err(|e| Error::write(&temporary, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            temporary,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes, fsyncs and renames the file into place.
    pub fn commit(mut self) -> Result<()> {
        let Some(writer) = self.file.take() else {
            return Ok(());
        };
        let file = writer
            .into_inner()
            .map_err(|e| Error::write(&self.path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::write(&self.path, e))?;
        drop(file);
        std::fs::rename(&self.temporary, &self.path).map_err(|e| Error::write(&self.path, e))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.file {
            Some(file) => file.write(buf),
            None => Err(std::io::Error::other("file already committed")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.file {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes).map_err(|e| Error::write(path, e))?;
    file.commit()
}

/// Writes `value` as pretty-printed JSON to `path` atomically.
pub fn write_json_pretty<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let json = serde_json::to_string_pretty(value).map_err(|e| Error::Invalid {
        message: format!("cannot serialize {}: {e}", path.display()),
        hint: "report this as a bug".to_owned(),
    })?;
    write_file(path, json.as_bytes())
}

/// `dir/name.ext` → `dir/name{suffix}`: where reports and outputs go by default.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!("{stem}{suffix}"))
}

/// Refuses an output path that is the input file (the input is never modified).
pub fn ensure_distinct(input: &Path, output: &Path) -> Result<()> {
    let input = std::fs::canonicalize(input).map_err(|e| Error::read(input, e))?;
    let resolved = match (
        output.parent().filter(|p| !p.as_os_str().is_empty()),
        output.file_name(),
    ) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or_else(|_| output.to_path_buf()),
        (None, Some(name)) => std::env::current_dir()
            .map(|d| d.join(name))
            .unwrap_or_else(|_| output.to_path_buf()),
        _ => output.to_path_buf(),
    };
    let resolved = std::fs::canonicalize(&resolved).unwrap_or(resolved);
    if resolved == input {
        return Err(Error::OutputIsInput {
            path: output.to_path_buf(),
        });
    }
    Ok(())
}

/// Writes records in the layout of the output's extension.
pub struct RecordWriter {
    path: PathBuf,
    kind: FileKind,
    sink: Sink,
    records: u64,
}

enum Sink {
    Text(AtomicFile),
    Csv(Box<csv::Writer<AtomicFile>>),
}

impl RecordWriter {
    /// Starts writing `path`. Records read from a file of `input_kind` must fit: CSV goes to
    /// CSV (with `headers`), JSON and JSON Lines go to either of the two.
    pub fn create(path: &Path, input_kind: FileKind, headers: Option<&[String]>) -> Result<Self> {
        let kind = FileKind::for_output(path)?;
        if (kind == FileKind::Csv) != (input_kind == FileKind::Csv) {
            return Err(Error::Invalid {
                message: format!("{}: cannot write {:?} records as {:?}", path.display(), input_kind, kind),
                hint: "give the output the input's extension (.csv for .csv; .jsonl or .json for JSON)".to_owned(),
            });
        }
        let mut file = AtomicFile::create(path)?;
        let sink = if kind == FileKind::Csv {
            let mut writer = csv::WriterBuilder::new().from_writer(file);
            if let Some(headers) = headers {
                writer
                    .write_record(headers)
                    .map_err(|e| Error::write(path, e.into()))?;
            }
            Sink::Csv(Box::new(writer))
        } else {
            if kind == FileKind::Json {
                file.write_all(b"[").map_err(|e| Error::write(path, e))?;
            }
            Sink::Text(file)
        };
        Ok(Self {
            path: path.to_path_buf(),
            kind,
            sink,
            records: 0,
        })
    }

    /// Writes a record as it was read (JSON Lines get a compact copy when the record spans lines).
    pub fn write_raw(&mut self, body: &RawBody) -> Result<()> {
        match (body, &mut self.sink) {
            (RawBody::Csv(cells), Sink::Csv(writer)) => {
                writer
                    .write_record(cells)
                    .map_err(|e| Error::write(&self.path, e.into()))?;
                self.records += 1;
                Ok(())
            }
            (RawBody::Json(text), Sink::Text(_))
                if self.kind == FileKind::Jsonl && text.contains('\n') =>
            {
                let value: Value = serde_json::from_str(text).map_err(|e| Error::Invalid {
                    message: format!("record no longer parses: {e}"),
                    hint: "report this as a bug".to_owned(),
                })?;
                let compact = serde_json::to_string(&value).map_err(|e| Error::Invalid {
                    message: e.to_string(),
                    hint: "report this as a bug".to_owned(),
                })?;
                self.write_json_text(&compact)
            }
            (RawBody::Json(text), Sink::Text(_)) => self.write_json_text(text),
            _ => Err(Error::Invalid {
                message: "a CSV record cannot go to a JSON file or the other way round".to_owned(),
                hint: "give the output the input's extension".to_owned(),
            }),
        }
    }

    /// Writes a JSON record.
    pub fn write_object(&mut self, object: &Map<String, Value>) -> Result<()> {
        let text = serde_json::to_string(object).map_err(|e| Error::Invalid {
            message: e.to_string(),
            hint: "report this as a bug".to_owned(),
        })?;
        self.write_json_text(&text)
    }

    fn write_json_text(&mut self, text: &str) -> Result<()> {
        let Sink::Text(file) = &mut self.sink else {
            return Err(Error::Invalid {
                message: "a JSON record cannot go to a CSV file".to_owned(),
                hint: "give the output a .jsonl or .json extension".to_owned(),
            });
        };
        let path = file.path().to_path_buf();
        let result = match self.kind {
            FileKind::Json => {
                let separator: &[u8] = if self.records == 0 { b"\n" } else { b",\n" };
                file.write_all(separator)
                    .and_then(|()| file.write_all(text.as_bytes()))
            }
            _ => file
                .write_all(text.as_bytes())
                .and_then(|()| file.write_all(b"\n")),
        };
        result.map_err(|e| Error::write(&path, e))?;
        self.records += 1;
        Ok(())
    }

    /// Closes the layout and moves the file into place; returns the number of records.
    pub fn finish(self) -> Result<u64> {
        match self.sink {
            Sink::Text(mut file) => {
                if self.kind == FileKind::Json {
                    let path = file.path().to_path_buf();
                    file.write_all(b"\n]\n")
                        .map_err(|e| Error::write(&path, e))?;
                }
                file.commit()?;
            }
            Sink::Csv(writer) => {
                let file = writer.into_inner().map_err(|e| Error::Invalid {
                    message: format!("cannot flush the CSV output: {}", e.error()),
                    hint: "check free disk space".to_owned(),
                })?;
                file.commit()?;
            }
        }
        Ok(self.records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_appears_until_commit_and_an_abandoned_file_leaves_no_trace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        {
            let mut file = AtomicFile::create(&path).expect("create");
            file.write_all(b"partial").expect("write");
        }
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);
        let mut file = AtomicFile::create(&path).expect("create");
        file.write_all(b"done\n").expect("write");
        file.commit().expect("commit");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "done\n");
    }

    #[test]
    fn json_array_output_is_a_valid_array() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.json");
        let mut writer = RecordWriter::create(&path, FileKind::Jsonl, None).expect("create");
        writer
            .write_raw(&RawBody::Json("{\"a\":1}".to_owned()))
            .expect("write");
        writer
            .write_raw(&RawBody::Json("{\"a\":2}".to_owned()))
            .expect("write");
        assert_eq!(writer.finish().expect("finish"), 2);
        let value: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        assert_eq!(value, serde_json::json!([{"a": 1}, {"a": 2}]));
    }

    #[test]
    fn output_equal_to_input_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("in.jsonl");
        std::fs::write(&path, "{}\n").expect("write");
        let error =
            ensure_distinct(&path, &dir.path().join(".").join("in.jsonl")).expect_err("same file");
        assert!(error.to_string().contains("is the input file"));
    }
}
