//! `oxtune data check`: every problem of a dataset, each with its line.
//!
//! The format is given or detected from the first readable row; every later row must be in the
//! same format. Rows that are not valid JSON (or CSV) are problems too, and checking goes on
//! past them where the file kind allows (JSON Lines and CSV; a broken JSON array ends there).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::{FORMAT_HINT, Format, Severity, validate};
use crate::reader::RecordReader;

/// How to check.
#[derive(Debug, Clone, Copy)]
pub struct CheckOptions {
    /// The format every row must be in; `None` detects it from the first row.
    pub format: Option<Format>,
    /// Problems kept for the report (all are counted).
    pub max_problems: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            format: None,
            max_problems: 1000,
        }
    }
}

/// One problem, located.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocatedProblem {
    pub line: u64,
    pub severity: &'static str,
    /// The field path, empty for problems of the whole row.
    pub field: String,
    pub message: String,
}

/// The result of checking one file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub path: String,
    pub format: Option<&'static str>,
    pub records: u64,
    pub errors: u64,
    pub warnings: u64,
    /// Rows per detected format (more than one key means a mixed file).
    pub formats: BTreeMap<&'static str, u64>,
    /// The first `max_problems` problems, in file order.
    pub problems: Vec<LocatedProblem>,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.errors == 0
    }

    fn push(
        &mut self,
        line: u64,
        severity: Severity,
        field: &str,
        message: String,
        max_problems: usize,
    ) {
        match severity {
            Severity::Error => self.errors += 1,
            Severity::Warning => self.warnings += 1,
        }
        if self.problems.len() < max_problems {
            let severity = if severity == Severity::Error {
                "error"
            } else {
                "warning"
            };
            self.problems.push(LocatedProblem {
                line,
                severity,
                field: field.to_owned(),
                message,
            });
        }
    }

    /// One line per problem, `FILE:LINE: error: FIELD: MESSAGE`, as compilers print them.
    pub fn problem_lines(&self) -> Vec<String> {
        self.problems
            .iter()
            .map(|p| {
                let field = if p.field.is_empty() {
                    String::new()
                } else {
                    format!("{}: ", p.field)
                };
                format!(
                    "{}:{}: {}: {field}{}",
                    self.path, p.line, p.severity, p.message
                )
            })
            .collect()
    }
}

/// Checks every record of `path`.
pub fn check_file(path: &Path, options: &CheckOptions) -> Result<CheckReport> {
    let mut reader = RecordReader::open(path)?;
    let mut report = CheckReport {
        path: path.display().to_string(),
        format: options.format.map(Format::name),
        ..CheckReport::default()
    };
    let mut format = options.format;
    while let Some(record) = reader.next() {
        let record = match record {
            Ok(record) => record,
            Err(Error::Row { line, message, .. }) => {
                report.records += 1;
                report.push(line, Severity::Error, "", message, options.max_problems);
                continue;
            }
            Err(other) => return Err(other),
        };
        report.records += 1;
        let row = match reader.parse(&record) {
            Ok(row) => row,
            Err(Error::Row { line, message, .. }) => {
                report.push(line, Severity::Error, "", message, options.max_problems);
                continue;
            }
            Err(other) => return Err(other),
        };
        let detected = Format::detect(&row.value);
        if let Some(detected) = detected {
            *report.formats.entry(detected.name()).or_default() += 1;
        }
        let expected = match (format, detected) {
            (Some(expected), _) => expected,
            (None, Some(detected)) => {
                format = Some(detected);
                report.format = Some(detected.name());
                detected
            }
            (None, None) => {
                let keys = row.value.keys().cloned().collect::<Vec<_>>().join(", ");
                report.push(
                    row.line,
                    Severity::Error,
                    "",
                    format!("cannot tell the dataset format from the keys [{keys}]; {FORMAT_HINT}"),
                    options.max_problems,
                );
                continue;
            }
        };
        if detected.is_some_and(|detected| detected != expected) && options.format.is_none() {
            let detected = detected.map_or("unknown", Format::name);
            report.push(row.line, Severity::Error, "", format!("this row is in {detected} format, but the file is in {} format (from its first row)", expected.name()), options.max_problems);
            continue;
        }
        for problem in validate(expected, &row.value) {
            report.push(
                row.line,
                problem.severity,
                &problem.field,
                problem.message,
                options.max_problems,
            );
        }
    }
    if report.records == 0 {
        report.push(
            0,
            Severity::Error,
            "",
            "the file holds no records".to_owned(),
            options.max_problems,
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.jsonl");
        let text = concat!(
            "{\"instruction\": \"写PRD\", \"input\": \"\", \"output\": \"1. 概述\"}\n",
            "{\"instruction\": \"\", \"output\": \"x\"}\n",
            "{\"instruction\": \"a\", \"output\": 5}\n",
            "not json\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n",
        );
        std::fs::write(&path, text).expect("write");
        let report = check_file(&path, &CheckOptions::default()).expect("check");
        assert_eq!(report.format, Some("alpaca"));
        assert_eq!(report.records, 5);
        let lines = report.problem_lines();
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(
            lines[0].ends_with("d.jsonl:2: error: instruction: is empty"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].ends_with("d.jsonl:3: error: output: expected a string, found a number"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains("d.jsonl:4: error: not valid JSON"),
            "{}",
            lines[2]
        );
        assert!(
            lines[3].contains(
                "d.jsonl:5: error: this row is in messages format, but the file is in alpaca format"
            ),
            "{}",
            lines[3]
        );
        assert!(!report.is_ok());
    }

    #[test]
    fn a_clean_file_passes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "{\"query\": \"q\", \"response\": \"r\"}\n").expect("write");
        let report = check_file(&path, &CheckOptions::default()).expect("check");
        assert!(report.is_ok(), "{:?}", report.problems);
        assert_eq!(report.formats["query-response"], 1);
    }
}
