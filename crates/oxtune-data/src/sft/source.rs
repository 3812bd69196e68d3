//! Dataset sources: `path` / `path#N` specs in, [`Sample`]s (a conversation or a raw text, each
//! with the file and line it came from) out.
//!
//! - Files: `.jsonl` / `.json` / `.csv` through [`crate::reader::RowReader`]; for `pt` also `.txt`,
//!   where every non-blank line is one sample (the Hugging Face `text` loader's convention,
//!   blank lines skipped; put multi-line documents in jsonl `{"text": ...}` rows).
//! - Formats (`sft`): messages, sharegpt, alpaca (instruction / input / output, optional
//!   system and history), query-response. The first row with a recognisable format fixes the
//!   file's format; a later row in another format is an error naming both lines. `pt` reads
//!   `text` rows.
//! - A malformed row (bad JSON, unknown format, format mismatch, a validation error) fails with
//!   its file and line when `strict`; otherwise it is dropped and counted in [`SourceReport`].
//!   (A syntax error inside a `.json` array, or a CSV quoting error, ends the reading of that
//!   file: the reader cannot find the next record; it is counted as one dropped row.)
//! - `path#N` (ms-swift): N samples, a seeded random subset when N is below the row count;
//!   above it, every row `N / rows` times plus a seeded subset of `N % rows` rows.
//! - Validation split (ms-swift order): per training file, `max(floor(min(rows, N) × ratio), 1)`
//!   rows are held out first (a seeded uniform choice), then the rest is sampled to
//!   `N - held out`; so a row repeated by `#N` never lands in both sets.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oxtune_models::ChatMessage;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::format::{FORMAT_HINT, Format, Role, Severity, conversation, validate};
use crate::reader::{RowReader, json_type_name};
use crate::split::{SplitMix64, mix64};

/// Which job the data is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Conversations rendered with the chat template; loss on the assistant turns.
    #[default]
    Sft,
    /// Raw text (`text` rows or `.txt` lines); loss on every token.
    Pt,
}

/// One entry of `dataset` / `val_dataset`: a file, optionally with a sample count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSpec {
    pub path: PathBuf,
    /// `#N`: take N samples.
    pub sample: Option<usize>,
}

impl DatasetSpec {
    /// Parses `path` or `path#N`. A `#` followed by something other than a number is part of
    /// the path.
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some((path, count)) = spec.rsplit_once('#')
            && !count.is_empty()
            && count.bytes().all(|b| b.is_ascii_digit())
        {
            let sample = count.parse::<usize>().map_err(|e| Error::Invalid {
                message: format!("dataset `{spec}`: cannot read the sample count `{count}`: {e}"),
                hint: "write `path#N` with N a positive whole number".into(),
            })?;
            if sample == 0 {
                return Err(Error::Invalid {
                    message: format!("dataset `{spec}` asks for 0 samples"),
                    hint: "drop `#0` to use every row, or give a positive count".into(),
                });
            }
            return Ok(Self {
                path: PathBuf::from(path),
                sample: Some(sample),
            });
        }
        Ok(Self {
            path: PathBuf::from(spec),
            sample: None,
        })
    }
}

impl fmt::Display for DatasetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sample {
            Some(n) => write!(f, "{}#{n}", self.path.display()),
            None => write!(f, "{}", self.path.display()),
        }
    }
}

/// Where a sample came from: file and 1-based line (of the record's start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub path: Arc<Path>,
    pub line: u64,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.line)
    }
}

/// What a sample holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SampleContent {
    /// Turns in order; roles `system`, `user`, `assistant`, `tool`.
    Conversation(Vec<ChatMessage>),
    /// Raw text for `pt`.
    Text(String),
}

/// One training sample before tokenization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub origin: Origin,
    pub content: SampleContent,
}

/// How rows become samples.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    pub task: Task,
    /// Fail on the first malformed row (true) or drop and count it (false).
    pub strict: bool,
    /// The system prompt of rows without their own (ms-swift `system`): it replaces the chat
    /// template's default system prompt; a row's own system message wins.
    pub system: Option<String>,
}

/// Dropped rows of one file keep this many messages for the log.
const KEPT_MESSAGES: usize = 5;

/// What became of one dataset spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SourceReport {
    /// The spec as given (`path` or `path#N`).
    pub spec: String,
    /// The detected format (`messages`, `alpaca`, …, `text`).
    pub format: Option<&'static str>,
    /// Records read (well formed or not).
    pub records: usize,
    /// Rows dropped as malformed (`strict: false` only).
    pub dropped_malformed: usize,
    /// Rows dropped for being in another format than the file's first row.
    pub dropped_format_mismatch: usize,
    /// Samples this spec gave to the training set (after `#N`).
    pub train: usize,
    /// Samples held out for validation (or, for a `val_dataset` spec, all of them).
    pub val: usize,
    /// The first few messages of dropped rows, `file:line: message`.
    pub dropped_examples: Vec<String>,
}

impl SourceReport {
    pub fn dropped(&self) -> usize {
        self.dropped_malformed + self.dropped_format_mismatch
    }

    fn drop_row(&mut self, error: &Error, mismatch: bool) {
        if mismatch {
            self.dropped_format_mismatch += 1;
        } else {
            self.dropped_malformed += 1;
        }
        if self.dropped_examples.len() < KEPT_MESSAGES {
            let text = error.to_string();
            self.dropped_examples
                .push(text.lines().next().unwrap_or_default().to_owned());
        }
    }
}

/// Training and validation samples of all specs, with a report per spec.
#[derive(Debug, Clone, Default)]
pub struct LoadedSamples {
    pub train: Vec<Sample>,
    pub val: Vec<Sample>,
    /// Training specs first, then validation specs.
    pub sources: Vec<SourceReport>,
}

/// Reads every spec, splits off validation rows and applies `#N` sampling.
///
/// `val_specs` empty and `split_dataset_ratio > 0`: each training file gives its share of
/// validation rows. `val_specs` given: they are the validation set and nothing is split
/// (a ratio above 0 is refused, as in the config).
pub fn load_samples(
    specs: &[DatasetSpec],
    val_specs: &[DatasetSpec],
    split_dataset_ratio: f64,
    seed: u64,
    options: &ReadOptions,
) -> Result<LoadedSamples> {
    if !(0.0..1.0).contains(&split_dataset_ratio) {
        return Err(Error::Invalid {
            message: format!("split_dataset_ratio is {split_dataset_ratio}"),
            hint: "use a share in [0, 1), e.g. 0.01 holds out 1% of the training rows".into(),
        });
    }
    if !val_specs.is_empty() && split_dataset_ratio > 0.0 {
        return Err(Error::Invalid {
            message: "both val_dataset and split_dataset_ratio are set".into(),
            hint: "give val_dataset or split_dataset_ratio, not both".into(),
        });
    }
    let mut loaded = LoadedSamples::default();
    for (index, spec) in specs.iter().enumerate() {
        let (rows, mut report) = read_source(spec, options)?;
        let stream = derive_seed(seed, &[STREAM_TRAIN, index as u64]);
        let (train, val) = split_then_sample(rows, spec.sample, split_dataset_ratio, stream);
        report.train = train.len();
        report.val = val.len();
        loaded.train.extend(train);
        loaded.val.extend(val);
        loaded.sources.push(report);
    }
    for (index, spec) in val_specs.iter().enumerate() {
        let (rows, mut report) = read_source(spec, options)?;
        let val = match spec.sample {
            Some(count) => sample_rows(
                rows,
                count,
                &mut SplitMix64::new(derive_seed(seed, &[STREAM_VAL, index as u64])),
            ),
            None => rows,
        };
        report.val = val.len();
        loaded.val.extend(val);
        loaded.sources.push(report);
    }
    Ok(loaded)
}

const STREAM_TRAIN: u64 = 1;
const STREAM_VAL: u64 = 2;

/// A seed for one purpose, from the user's seed and the purpose's path (stream, index, …).
pub fn derive_seed(seed: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(mix64(seed), |state, &part| {
        mix64(state ^ mix64(part.wrapping_add(0x6A09_E667_F3BC_C909)))
    })
}

/// ms-swift's order: hold out the validation rows from the file's rows, then sample the rest.
fn split_then_sample(
    rows: Vec<Sample>,
    sample: Option<usize>,
    ratio: f64,
    seed: u64,
) -> (Vec<Sample>, Vec<Sample>) {
    let mut rng = SplitMix64::new(seed);
    let wanted = sample.unwrap_or(rows.len());
    let mut val_count = if ratio > 0.0 {
        ((rows.len().min(wanted) as f64 * ratio).floor() as usize).max(1)
    } else {
        0
    };
    // Keep at least one training row.
    val_count = val_count.min(rows.len().saturating_sub(1));
    let chosen = choose(rows.len(), val_count, &mut rng);
    let mut is_val = vec![false; rows.len()];
    for index in chosen {
        is_val[index] = true;
    }
    let (mut train, mut val) = (
        Vec::with_capacity(rows.len() - val_count),
        Vec::with_capacity(val_count),
    );
    for (row, held_out) in rows.into_iter().zip(is_val) {
        if held_out {
            val.push(row)
        } else {
            train.push(row)
        }
    }
    if let Some(count) = sample {
        train = sample_rows(train, count.saturating_sub(val_count), &mut rng);
    }
    (train, val)
}

/// `count` distinct indices below `total`, a uniform choice (partial Fisher-Yates), in the
/// order drawn.
fn choose(total: usize, count: usize, rng: &mut SplitMix64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..total).collect();
    for slot in 0..count.min(total) {
        let pick = slot + rng.below((total - slot) as u64) as usize;
        order.swap(slot, pick);
    }
    order.truncate(count.min(total));
    order
}

/// `count` samples of `rows` (ms-swift `sample_dataset`): every row `count / len` times in file
/// order, then `count % len` distinct rows chosen at random.
pub fn sample_rows<T: Clone>(rows: Vec<T>, count: usize, rng: &mut SplitMix64) -> Vec<T> {
    if rows.is_empty() || count == rows.len() {
        return rows;
    }
    let (repeats, remainder) = (count / rows.len(), count % rows.len());
    let mut out = Vec::with_capacity(count);
    for _ in 0..repeats {
        out.extend(rows.iter().cloned());
    }
    out.extend(
        choose(rows.len(), remainder, rng)
            .into_iter()
            .map(|index| rows[index].clone()),
    );
    out
}

/// Reads one file into samples (no sampling).
pub fn read_source(
    spec: &DatasetSpec,
    options: &ReadOptions,
) -> Result<(Vec<Sample>, SourceReport)> {
    let path = spec.path.as_path();
    let mut report = SourceReport {
        spec: spec.to_string(),
        ..SourceReport::default()
    };
    let is_txt = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("txt"));
    let task = options.task;
    if !path.is_file() {
        return Err(Error::Config {
            path: path.to_path_buf(),
            message: format!("no such dataset file (from `{spec}`)"),
            hint: "dataset entries are local files (jsonl, json, csv; .txt for pt), optionally with `#N`; hub dataset ids are not downloaded".into(),
        });
    }
    if is_txt {
        if task != Task::Pt {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: "a .txt file is raw text, which only `oxtune pt` trains on".into(),
                hint: "for sft, give jsonl / json / csv rows in messages, sharegpt, alpaca or query-response format".into(),
            });
        }
        return read_txt(path).map(|samples| {
            report.format = Some("text");
            report.records = samples.len();
            (samples, report)
        });
    }
    let origin_path: Arc<Path> = Arc::from(path);
    let mut file_format: Option<(Format, u64)> = None;
    let mut samples = Vec::new();
    for row in RowReader::open(path)? {
        let row = match row {
            Ok(row) => row,
            Err(error @ Error::Row { .. }) if !options.strict => {
                report.records += 1;
                report.drop_row(&error, false);
                continue;
            }
            Err(error) => return Err(error),
        };
        report.records += 1;
        let converted = match task {
            Task::Pt => text_row(path, row.line, &row.value)
                .map(|text| SampleContent::Text(text.to_owned())),
            Task::Sft => conversation_row(
                path,
                row.line,
                &row.value,
                &mut file_format,
                options.system.as_deref(),
            )
            .map(SampleContent::Conversation),
        };
        match converted {
            Ok(content) => {
                samples.push(Sample {
                    origin: Origin {
                        path: origin_path.clone(),
                        line: row.line,
                    },
                    content,
                });
            }
            Err(RowError { error, mismatch }) if !options.strict => {
                report.drop_row(&error, mismatch)
            }
            Err(RowError { error, .. }) => return Err(error),
        }
    }
    report.format = match task {
        Task::Pt => Some("text"),
        Task::Sft => file_format.map(|(format, _)| format.name()),
    };
    Ok((samples, report))
}

/// A row-level failure; `mismatch` marks a row in another format than the file's.
struct RowError {
    error: Error,
    mismatch: bool,
}

impl From<Error> for RowError {
    fn from(error: Error) -> Self {
        Self {
            error,
            mismatch: false,
        }
    }
}

const STRICT_HINT: &str =
    "fix the row, or set `strict: false` to drop malformed rows (they are counted in the log)";

fn text_row<'a>(
    path: &Path,
    line: u64,
    row: &'a Map<String, Value>,
) -> std::result::Result<&'a str, RowError> {
    match row.get("text") {
        Some(Value::String(text)) if !text.trim().is_empty() => Ok(text),
        Some(Value::String(_)) => {
            Err(Error::row(path, line, "`text` is empty", STRICT_HINT).into())
        }
        Some(other) => Err(Error::row(
            path,
            line,
            format!("`text` must be a string, found {}", json_type_name(other)),
            STRICT_HINT,
        )
        .into()),
        None => {
            let keys = row
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            Err(Error::row(
                path,
                line,
                format!("no `text` key (the row has [{keys}])"),
                "`oxtune pt` reads rows {\"text\": \"...\"} or .txt files (one sample per line)",
            )
            .into())
        }
    }
}

/// The conversation of one `sft` row, with the file's format checked and the default system
/// prompt applied.
fn conversation_row(
    path: &Path,
    line: u64,
    row: &Map<String, Value>,
    file_format: &mut Option<(Format, u64)>,
    system: Option<&str>,
) -> std::result::Result<Vec<ChatMessage>, RowError> {
    let Some(format) = Format::detect(row) else {
        let keys = row
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        return Err(Error::UnknownFormat {
            path: path.to_path_buf(),
            line,
            keys,
            hint: FORMAT_HINT.into(),
        }
        .into());
    };
    if matches!(format, Format::Preference | Format::Kto) {
        return Err(Error::row(
            path,
            line,
            format!("a {} row (chosen/rejected or a KTO label) is preference data", format.name()),
            "preference data is for `oxtune rlhf`; for sft give messages, sharegpt, alpaca or query-response rows",
        )
        .into());
    }
    match *file_format {
        Some((first, first_line)) if first != format => {
            return Err(RowError {
                error: Error::row(
                    path,
                    line,
                    format!(
                        "this row is in {} format, but the file's first row (line {first_line}) is in {} format",
                        format.name(),
                        first.name()
                    ),
                    "a file holds one format; split it into one file per format (`oxtune data check` lists every row's format)",
                ),
                mismatch: true,
            });
        }
        Some(_) => {}
        None => *file_format = Some((format, line)),
    }
    let mut problems: Vec<String> = validate(format, row)
        .into_iter()
        .filter(|p| p.severity == Severity::Error)
        .map(|p| format!("{}: {}", p.field, p.message))
        .collect();
    // Alpaca rows are read as the query-response rows they stand for; `validate` does not
    // look at an alpaca row's `history`, so it is checked there.
    let as_query = (format == Format::Alpaca).then(|| alpaca_as_query(row));
    if let Some(as_query) = &as_query {
        problems.extend(
            validate(Format::QueryResponse, as_query)
                .into_iter()
                .filter(|p| p.severity == Severity::Error && p.field.starts_with("history"))
                .map(|p| format!("{}: {}", p.field, p.message)),
        );
    }
    if !problems.is_empty() {
        return Err(Error::row(path, line, problems.join("; "), STRICT_HINT).into());
    }
    let (format, row) = match &as_query {
        Some(as_query) => (Format::QueryResponse, as_query),
        None => (format, row),
    };
    let mut messages: Vec<ChatMessage> = conversation(format, row)
        .into_iter()
        .map(|turn| ChatMessage::new(turn.role.name(), turn.text))
        .collect();
    if let Some(system) = system
        && messages
            .first()
            .is_none_or(|m| m.role != Role::System.name())
    {
        messages.insert(0, ChatMessage::new(Role::System.name(), system));
    }
    if !messages.iter().any(|m| m.role == Role::Assistant.name()) {
        return Err(Error::row(
            path,
            line,
            "the row has no assistant turn, so there is nothing to learn",
            STRICT_HINT,
        )
        .into());
    }
    Ok(messages)
}

/// The query-response row an alpaca row stands for (ms-swift): `instruction` and `input`
/// joined by a newline are the query, `output` the response; `system` and `history` as they
/// are.
fn alpaca_as_query(row: &Map<String, Value>) -> Map<String, Value> {
    let text = |key: &str| row.get(key).and_then(Value::as_str).unwrap_or_default();
    let (instruction, input) = (text("instruction"), text("input"));
    let query = match (instruction.is_empty(), input.is_empty()) {
        (false, false) => format!("{instruction}\n{input}"),
        (true, _) => input.to_owned(),
        (false, true) => instruction.to_owned(),
    };
    let mut as_query = row.clone();
    as_query.insert("query".into(), Value::String(query));
    as_query.insert("response".into(), Value::String(text("output").to_owned()));
    as_query
}

/// A `.txt` file: one sample per non-blank line.
fn read_txt(path: &Path) -> Result<Vec<Sample>> {
    let bytes = std::fs::read(path).map_err(|e| Error::read(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|b| **b == b'\n').count() as u64 + 1;
        Error::row(path, line, "not valid UTF-8", "save the file as UTF-8")
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let origin_path: Arc<Path> = Arc::from(path);
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| Sample {
            origin: Origin {
                path: origin_path.clone(),
                line: index as u64 + 1,
            },
            content: SampleContent::Text(line.to_owned()),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write test file");
        path
    }

    fn spec(path: &Path) -> DatasetSpec {
        DatasetSpec {
            path: path.to_path_buf(),
            sample: None,
        }
    }

    fn sft(strict: bool) -> ReadOptions {
        ReadOptions {
            task: Task::Sft,
            strict,
            system: None,
        }
    }

    fn messages(sample: &Sample) -> Vec<(String, String)> {
        match &sample.content {
            SampleContent::Conversation(messages) => messages
                .iter()
                .map(|m| (m.role.clone(), m.content.clone()))
                .collect(),
            SampleContent::Text(text) => vec![("text".into(), text.clone())],
        }
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn spec_parses_path_and_count() {
        assert_eq!(
            DatasetSpec::parse("data/a.jsonl#200").expect("spec"),
            DatasetSpec {
                path: "data/a.jsonl".into(),
                sample: Some(200)
            }
        );
        assert_eq!(
            DatasetSpec::parse("data/a#b.jsonl").expect("spec"),
            DatasetSpec {
                path: "data/a#b.jsonl".into(),
                sample: None
            }
        );
        assert_eq!(
            DatasetSpec::parse("a.jsonl#200").expect("spec").to_string(),
            "a.jsonl#200"
        );
        let error = DatasetSpec::parse("a.jsonl#0").expect_err("zero samples");
        assert!(error.to_string().contains("hint:"), "{error}");
    }

    #[test]
    fn every_format_becomes_messages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cases = [
            (
                "m.jsonl",
                r#"{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}"#,
                pairs(&[("system", "S"), ("user", "Q"), ("assistant", "A")]),
            ),
            (
                "s.jsonl",
                r#"{"system": "S", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}"#,
                pairs(&[("system", "S"), ("user", "Q"), ("assistant", "A")]),
            ),
            (
                "a.jsonl",
                r#"{"instruction": "I", "input": "X", "output": "O", "system": "S", "history": [["q0", "r0"]]}"#,
                pairs(&[
                    ("system", "S"),
                    ("user", "q0"),
                    ("assistant", "r0"),
                    ("user", "I\nX"),
                    ("assistant", "O"),
                ]),
            ),
            (
                "a2.jsonl",
                r#"{"instruction": "I", "input": "", "output": "O"}"#,
                pairs(&[("user", "I"), ("assistant", "O")]),
            ),
            (
                "q.jsonl",
                r#"{"query": "Q", "response": "R", "history": [["q0", "r0"]]}"#,
                pairs(&[
                    ("user", "q0"),
                    ("assistant", "r0"),
                    ("user", "Q"),
                    ("assistant", "R"),
                ]),
            ),
        ];
        for (name, row, expected) in cases {
            let path = write(&dir, name, &format!("{row}\n"));
            let (samples, report) = read_source(&spec(&path), &sft(true)).expect("read");
            assert_eq!(messages(&samples[0]), expected, "{name}");
            assert_eq!(samples[0].origin.line, 1);
            assert_eq!(report.records, 1);
        }
    }

    #[test]
    fn csv_and_json_files_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let csv = write(
            &dir,
            "d.csv",
            "instruction,input,output\nSay hi,,hi\n\"Add, please\",1 2,3\n",
        );
        let (samples, report) = read_source(&spec(&csv), &sft(true)).expect("csv");
        assert_eq!(report.format, Some("alpaca"));
        assert_eq!(
            messages(&samples[1]),
            pairs(&[("user", "Add, please\n1 2"), ("assistant", "3")])
        );
        assert_eq!(samples[1].origin.line, 3);
        let json = write(
            &dir,
            "d.json",
            "[\n{\"query\": \"a\", \"response\": \"b\"},\n{\"query\": \"c\", \"response\": \"d\"}\n]\n",
        );
        let (samples, _) = read_source(&spec(&json), &sft(true)).expect("json");
        assert_eq!(
            samples.iter().map(|s| s.origin.line).collect::<Vec<_>>(),
            vec![2, 3]
        );
    }

    #[test]
    fn default_system_fills_rows_without_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "d.jsonl",
            "{\"query\": \"a\", \"response\": \"b\"}\n{\"query\": \"a\", \"response\": \"b\", \"system\": \"own\"}\n",
        );
        let options = ReadOptions {
            system: Some("default".into()),
            ..sft(true)
        };
        let (samples, _) = read_source(&spec(&path), &options).expect("read");
        assert_eq!(
            messages(&samples[0])[0],
            ("system".to_owned(), "default".to_owned())
        );
        assert_eq!(
            messages(&samples[1])[0],
            ("system".to_owned(), "own".to_owned())
        );
    }

    const MIXED: &str = concat!(
        "{\"query\": \"a\", \"response\": \"b\"}\n",
        "{\"query\": \"a\"\n",
        "{\"instruction\": \"i\", \"output\": \"o\"}\n",
        "{\"query\": \"\", \"response\": \"b\"}\n",
        "{\"foo\": 1}\n",
        "{\"query\": \"c\", \"response\": \"d\"}\n",
    );

    #[test]
    fn strict_fails_with_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "bad.jsonl", MIXED);
        let error = read_source(&spec(&path), &sft(true))
            .expect_err("strict")
            .to_string();
        assert!(error.contains("bad.jsonl:2: not valid JSON"), "{error}");

        let mismatch = write(
            &dir,
            "mixed.jsonl",
            &[
                MIXED.lines().next().unwrap_or_default(),
                MIXED.lines().nth(2).unwrap_or_default(),
            ]
            .join("\n"),
        );
        let error = read_source(&spec(&mismatch), &sft(true))
            .expect_err("mismatch")
            .to_string();
        assert!(error.contains("mixed.jsonl:2: this row is in alpaca format, but the file's first row (line 1) is in query-response format"), "{error}");
        assert!(error.contains("hint: a file holds one format"), "{error}");
    }

    #[test]
    fn non_strict_drops_and_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "bad.jsonl", MIXED);
        let (samples, report) = read_source(&spec(&path), &sft(false)).expect("non-strict");
        assert_eq!(
            samples.iter().map(|s| s.origin.line).collect::<Vec<_>>(),
            vec![1, 6]
        );
        assert_eq!(
            (
                report.records,
                report.dropped_malformed,
                report.dropped_format_mismatch
            ),
            (6, 3, 1)
        );
        assert_eq!(report.dropped(), 4);
        let examples = report.dropped_examples.join("\n");
        assert!(
            examples.contains("bad.jsonl:2: not valid JSON"),
            "{examples}"
        );
        assert!(
            examples.contains("bad.jsonl:3: this row is in alpaca format"),
            "{examples}"
        );
        assert!(
            examples.contains("bad.jsonl:4: query: is empty"),
            "{examples}"
        );
        assert!(
            examples.contains("bad.jsonl:5: cannot tell the dataset format from the keys [foo]"),
            "{examples}"
        );
    }

    #[test]
    fn a_missing_file_is_named_with_a_hint() {
        let error =
            read_source(&spec(Path::new("nowhere/train.jsonl")), &sft(true)).expect_err("missing");
        let error = error.to_string();
        assert!(
            error.starts_with("nowhere/train.jsonl: no such dataset file"),
            "{error}"
        );
        assert!(
            error.contains("hint: dataset entries are local files"),
            "{error}"
        );
    }

    #[test]
    fn preference_rows_are_refused_for_sft() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "p.jsonl",
            "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"}\n",
        );
        let error = read_source(&spec(&path), &sft(true))
            .expect_err("preference")
            .to_string();
        assert!(
            error.contains("p.jsonl:1:") && error.contains("oxtune rlhf"),
            "{error}"
        );
    }

    #[test]
    fn pt_reads_text_rows_and_txt_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pt = ReadOptions {
            task: Task::Pt,
            strict: true,
            system: None,
        };
        let txt = write(&dir, "c.txt", "first line\n\n  \nsecond line\n");
        let (samples, report) = read_source(&spec(&txt), &pt).expect("txt");
        assert_eq!(
            samples
                .iter()
                .map(|s| (s.origin.line, messages(s)[0].1.clone()))
                .collect::<Vec<_>>(),
            vec![(1, "first line".to_owned()), (4, "second line".to_owned())]
        );
        assert_eq!(report.format, Some("text"));
        let jsonl = write(&dir, "c.jsonl", "{\"text\": \"doc\"}\n{\"query\": \"q\"}\n");
        let error = read_source(&spec(&jsonl), &pt)
            .expect_err("no text")
            .to_string();
        assert!(
            error.contains("c.jsonl:2: no `text` key (the row has [query])"),
            "{error}"
        );
        let error = read_source(&spec(&txt), &sft(true))
            .expect_err("txt for sft")
            .to_string();
        assert!(error.contains("only `oxtune pt`"), "{error}");
    }

    #[test]
    fn sampling_is_seeded_and_repeats_whole_copies() {
        let rows: Vec<u32> = (0..10).collect();
        let take = |count, seed| sample_rows(rows.clone(), count, &mut SplitMix64::new(seed));
        assert_eq!(take(4, 7), take(4, 7));
        assert_ne!(take(4, 7), take(4, 8));
        let subset = take(4, 7);
        assert_eq!(subset.len(), 4);
        assert!(
            subset
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == 4
        );
        let over = take(23, 7);
        assert_eq!(over.len(), 23);
        assert_eq!(over[..20], [rows.clone(), rows.clone()].concat()[..]);
        assert_eq!(
            over[20..]
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            3
        );
    }

    #[test]
    fn split_is_seeded_and_disjoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rows: String = (0..50)
            .map(|i| format!("{{\"query\": \"q{i}\", \"response\": \"r{i}\"}}\n"))
            .collect();
        let path = write(&dir, "d.jsonl", &rows);
        let specs = [DatasetSpec {
            path: path.clone(),
            sample: Some(120),
        }];
        let load = |seed| load_samples(&specs, &[], 0.1, seed, &sft(true)).expect("load");
        let (first, again, other) = (load(3), load(3), load(4));
        assert_eq!(first.train, again.train);
        assert_eq!(first.val, again.val);
        assert_ne!(first.val, other.val);
        // 10% of min(50, 120) held out first, the rest sampled up to 120 - 5.
        assert_eq!((first.val.len(), first.train.len()), (5, 115));
        assert_eq!((first.sources[0].train, first.sources[0].val), (115, 5));
        let val_lines: std::collections::BTreeSet<u64> =
            first.val.iter().map(|s| s.origin.line).collect();
        assert!(
            first
                .train
                .iter()
                .all(|s| !val_lines.contains(&s.origin.line))
        );

        let error = load_samples(&specs, &specs, 0.1, 3, &sft(true))
            .expect_err("both")
            .to_string();
        assert!(error.contains("not both"), "{error}");
        let given = load_samples(&specs[..0], &[spec(&path)], 0.0, 3, &sft(true));
        assert_eq!(given.expect("val only").val.len(), 50);
    }
}
