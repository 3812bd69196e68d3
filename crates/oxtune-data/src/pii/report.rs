//! What a scrub found and what it left: counts per kind and per field, masked examples with
//! their line, and the look-alikes left in place with the reason. Written as JSON (for
//! machines and CI) and as a self-contained HTML page (for people).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::{PiiKind, mask};
use crate::error::Result;
use crate::html;
use crate::writer::{write_file, write_json_pretty};

/// Examples kept per kind.
const EXAMPLES_PER_KIND: usize = 5;

/// The report of one `scrub_file` run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScrubReport {
    pub input: String,
    pub output: String,
    /// `placeholder` or `pseudonym`.
    pub replace: String,
    /// The detectors that ran.
    pub detectors: Vec<String>,
    pub records: u64,
    pub records_changed: u64,
    /// String fields (or CSV cells) looked at.
    pub fields_scanned: u64,
    pub findings: u64,
    pub look_alikes_left: u64,
    /// Distinct values that got a pseudonym (pseudonym mode only).
    pub distinct_values: u64,
    pub by_kind: BTreeMap<String, KindSummary>,
    /// Field path (`messages[].content`) → kind → count.
    pub by_field: BTreeMap<String, BTreeMap<String, u64>>,
    pub look_alikes: BTreeMap<String, LookAlikeSummary>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct KindSummary {
    pub count: u64,
    pub examples: Vec<Example>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LookAlikeSummary {
    pub count: u64,
    pub reasons: BTreeMap<String, u64>,
    pub examples: Vec<Example>,
}

/// One occurrence, with the value masked.
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    pub line: u64,
    pub field: String,
    pub masked: String,
    /// What it was replaced by (findings) or why it was left (look-alikes).
    pub note: String,
}

/// Keeps the first few examples of a kind, masked.
fn keep_example(examples: &mut Vec<Example>, line: u64, field: &str, value: &str, note: &str) {
    if examples.len() < EXAMPLES_PER_KIND {
        examples.push(Example {
            line,
            field: field.to_owned(),
            masked: mask(value),
            note: note.to_owned(),
        });
    }
}

impl ScrubReport {
    /// Counts a replaced value.
    pub fn add_finding(
        &mut self,
        line: u64,
        field: &str,
        value: &str,
        kind: &PiiKind,
        replacement: &str,
    ) {
        self.findings += 1;
        let summary = self.by_kind.entry(kind.label().to_owned()).or_default();
        summary.count += 1;
        keep_example(&mut summary.examples, line, field, value, replacement);
        *self
            .by_field
            .entry(field.to_owned())
            .or_default()
            .entry(kind.label().to_owned())
            .or_default() += 1;
    }

    /// Counts a look-alike that was left in place.
    pub fn add_look_alike(
        &mut self,
        line: u64,
        field: &str,
        value: &str,
        kind: &PiiKind,
        reason: &str,
    ) {
        self.look_alikes_left += 1;
        let summary = self.look_alikes.entry(kind.label().to_owned()).or_default();
        summary.count += 1;
        *summary.reasons.entry(reason.to_owned()).or_default() += 1;
        keep_example(&mut summary.examples, line, field, value, reason);
    }

    /// Writes the report as pretty JSON.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        write_json_pretty(path, self)
    }

    /// Writes the report as a self-contained HTML page.
    pub fn write_html(&self, path: &Path) -> Result<()> {
        write_file(path, self.to_html().as_bytes())
    }

    /// A few lines for the terminal.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} records, {} changed; {} findings replaced ({}), {} look-alikes left",
            self.records, self.records_changed, self.findings, self.replace, self.look_alikes_left
        );
        for (kind, summary) in &self.by_kind {
            out.push_str(&format!("\n  {kind:<12} {:>8}", summary.count));
        }
        if !self.look_alikes.is_empty() {
            out.push_str("\n  left alone:");
            for (kind, summary) in &self.look_alikes {
                out.push_str(&format!("\n  {kind:<12} {:>8}", summary.count));
            }
        }
        out
    }

    /// The HTML page.
    pub fn to_html(&self) -> String {
        let mut body = String::new();
        body.push_str(&format!(
            "<p class=\"muted\">{} → {} · replacement: {} · detectors: {}</p>",
            html::escape(&self.input),
            html::escape(&self.output),
            html::escape(&self.replace),
            html::escape(&self.detectors.join(", "))
        ));
        body.push_str("<div class=\"cards\">");
        body.push_str(&html::card(&self.records.to_string(), "records"));
        body.push_str(&html::card(
            &self.records_changed.to_string(),
            "records changed",
        ));
        body.push_str(&html::card(
            &self.fields_scanned.to_string(),
            "fields scanned",
        ));
        body.push_str(&html::card(&self.findings.to_string(), "findings replaced"));
        body.push_str(&html::card(
            &self.look_alikes_left.to_string(),
            "look-alikes left",
        ));
        body.push_str("</div>");

        body.push_str("<h2>Findings by kind</h2>");
        if self.by_kind.is_empty() {
            body.push_str("<p class=\"good\">No personal data found.</p>");
        } else {
            let rows: Vec<Vec<String>> = self
                .by_kind
                .iter()
                .map(|(kind, summary)| {
                    vec![
                        format!("<code>{}</code>", html::escape(kind)),
                        summary.count.to_string(),
                        examples_html(&summary.examples),
                    ]
                })
                .collect();
            body.push_str(&html::table(
                &[
                    "kind",
                    "count",
                    "examples (masked): line · field → replacement",
                ],
                &rows,
            ));
        }

        body.push_str("<h2>Findings by field</h2>");
        let kinds: Vec<&String> = self.by_kind.keys().collect();
        if !kinds.is_empty() {
            let mut headers = vec!["field"];
            headers.extend(kinds.iter().map(|k| k.as_str()));
            let rows: Vec<Vec<String>> = self
                .by_field
                .iter()
                .map(|(field, counts)| {
                    let mut row = vec![format!("<code>{}</code>", html::escape(field))];
                    row.extend(
                        kinds
                            .iter()
                            .map(|k| counts.get(*k).map_or(String::new(), u64::to_string)),
                    );
                    row
                })
                .collect();
            body.push_str(&html::table(&headers, &rows));
        }

        body.push_str("<h2>Look-alikes left in place</h2><p class=\"muted\">Shaped like personal data but failing a check (checksum, Luhn, ranges). Review a few to confirm.</p>");
        if self.look_alikes.is_empty() {
            body.push_str("<p>None.</p>");
        } else {
            let rows: Vec<Vec<String>> = self
                .look_alikes
                .iter()
                .map(|(kind, summary)| {
                    let reasons = summary
                        .reasons
                        .iter()
                        .map(|(reason, count)| format!("{} ({count})", html::escape(reason)))
                        .collect::<Vec<_>>()
                        .join("<br>");
                    vec![
                        format!("<code>{}</code>", html::escape(kind)),
                        summary.count.to_string(),
                        reasons,
                        examples_html(&summary.examples),
                    ]
                })
                .collect();
            body.push_str(&html::table(
                &["kind", "count", "why left", "examples (masked)"],
                &rows,
            ));
        }
        html::page("oxtune data scrub report", &body)
    }
}

fn examples_html(examples: &[Example]) -> String {
    examples
        .iter()
        .map(|e| {
            format!(
                "line {} · <code>{}</code>: {} → {}",
                e.line,
                html::escape(&e.field),
                html::escape(&e.masked),
                html::escape(&e.note)
            )
        })
        .collect::<Vec<_>>()
        .join("<br>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_kind_and_field_with_masked_examples() {
        let mut report = ScrubReport::default();
        report.add_finding(
            3,
            "messages[].content",
            "13812345678",
            &PiiKind::Phone,
            "<PHONE>",
        );
        report.add_finding(4, "output", "13912345678", &PiiKind::Phone, "<PHONE>");
        report.add_look_alike(
            5,
            "output",
            "6222021234567890127",
            &PiiKind::BankCard,
            "Luhn",
        );
        assert_eq!(report.by_kind["PHONE"].count, 2);
        assert_eq!(report.by_field["output"]["PHONE"], 1);
        assert_eq!(report.by_kind["PHONE"].examples[0].masked, "138****5678");
        let page = report.to_html();
        assert!(page.contains("138****5678") && !page.contains("13812345678"));
        assert!(page.contains("&lt;PHONE&gt;"));
    }
}
