//! Finding and replacing personal data in text.
//!
//! - [`detectors`]: one detector per kind (phone, landline, e-mail, ID card, bank card, IPv4,
//!   IPv6, vehicle plate, URL token, secret) plus custom patterns and word lists.
//! - [`checks`]: the checksums and date checks that keep look-alikes out.
//! - [`Scrubber::detect`] runs every enabled detector over a text and resolves overlaps (the
//!   longest match wins, then the more specific kind); look-alikes that overlap a finding are
//!   dropped.
//! - [`apply`] replaces findings by typed placeholders (`<PHONE>`) or by pseudonyms that are
//!   consistent within a run (`<PHONE_1>` for every occurrence of the same number).
//! - [`config`] reads the YAML config; [`pipeline`] scrubs whole dataset files; [`report`]
//!   counts what was found and left.

pub mod checks;
pub mod config;
pub mod detectors;
pub mod pipeline;
pub mod report;

use std::collections::HashMap;
use std::sync::Arc;

pub use config::{ReplaceMode, ScrubConfig};
pub use pipeline::{ScrubOptions, scrub_file};
pub use report::ScrubReport;

use crate::error::{Error, Result};
use detectors::Detector;

/// A kind of personal data; custom rules carry their own name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PiiKind {
    Phone,
    Landline,
    Email,
    IdCard,
    BankCard,
    Ipv4,
    Ipv6,
    Plate,
    UrlToken,
    Secret,
    Custom(Arc<str>),
}

impl PiiKind {
    pub(crate) fn custom(name: &str) -> Self {
        Self::Custom(Arc::from(name.to_ascii_uppercase()))
    }

    /// The label used in placeholders and reports (`PHONE`, `ID_CARD`, a custom rule's name).
    pub fn label(&self) -> &str {
        match self {
            Self::Phone => "PHONE",
            Self::Landline => "LANDLINE",
            Self::Email => "EMAIL",
            Self::IdCard => "ID_CARD",
            Self::BankCard => "BANK_CARD",
            Self::Ipv4 => "IPV4",
            Self::Ipv6 => "IPV6",
            Self::Plate => "PLATE",
            Self::UrlToken => "URL_TOKEN",
            Self::Secret => "SECRET",
            Self::Custom(name) => name,
        }
    }

    /// Which kind wins when two findings cover the same span (lower wins): user rules first,
    /// then the kinds whose checks are strictest.
    fn precedence(&self) -> u8 {
        match self {
            Self::Custom(_) => 0,
            Self::UrlToken => 1,
            Self::Secret => 2,
            Self::Email => 3,
            Self::IdCard => 4,
            Self::BankCard => 5,
            Self::Phone => 6,
            Self::Landline => 7,
            Self::Ipv6 => 8,
            Self::Ipv4 => 9,
            Self::Plate => 10,
        }
    }

    /// The form of a value that decides "the same value" for pseudonyms: digits only for
    /// numbers (without the +86 prefix), lower case for e-mail, upper case for ID numbers.
    fn normalize(&self, value: &str) -> String {
        match self {
            Self::Phone | Self::Landline | Self::BankCard => {
                let digits: String = value.chars().filter(char::is_ascii_digit).collect();
                let national = digits.strip_prefix("0086").or_else(|| {
                    digits
                        .strip_prefix("86")
                        .filter(|_| value.contains("86") && digits.len() > 11)
                });
                national
                    .unwrap_or(&digits)
                    .trim_start_matches('0')
                    .to_owned()
            }
            Self::Email => value.to_lowercase(),
            Self::IdCard => value.to_ascii_uppercase(),
            _ => value.to_owned(),
        }
    }
}

/// A span of personal data (byte offsets into the scanned text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub start: usize,
    pub end: usize,
    pub kind: PiiKind,
    /// What matched, e.g. "GitHub token".
    pub detail: &'static str,
}

/// A span shaped like personal data that failed its check and was left in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NearMiss {
    pub start: usize,
    pub end: usize,
    pub kind: PiiKind,
    /// Why it was left, e.g. "the Luhn check fails".
    pub reason: &'static str,
}

/// What the detectors found in one text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hits {
    pub findings: Vec<Finding>,
    pub near_misses: Vec<NearMiss>,
}

impl Hits {
    pub fn is_empty(&self) -> bool {
        self.findings.is_empty() && self.near_misses.is_empty()
    }
}

/// The enabled detectors.
pub struct Scrubber {
    detectors: Vec<Box<dyn Detector>>,
}

impl Scrubber {
    /// Every built-in detector, no custom rules.
    pub fn builtin() -> Self {
        Self {
            detectors: detectors::builtin_detectors(),
        }
    }

    /// The detectors a config asks for.
    pub fn from_config(config: &ScrubConfig) -> Result<Self> {
        let mut detectors: Vec<Box<dyn Detector>> = detectors::builtin_detectors()
            .into_iter()
            .filter(|d| !config.disable.iter().any(|name| name == d.name()))
            .collect();
        for rule in &config.custom {
            let custom = match (&rule.pattern, rule.words.is_empty()) {
                (Some(pattern), _) => {
                    detectors::Custom::pattern(&rule.name, pattern, rule.case_insensitive)
                }
                (None, false) => {
                    detectors::Custom::words(&rule.name, &rule.words, rule.case_insensitive)
                }
                (None, true) => continue,
            };
            let custom = custom.map_err(|e| Error::Config {
                path: config.path.clone(),
                message: format!("custom rule `{}`: {e}", rule.name),
                hint: "patterns use Rust regex syntax (no look-around or back-references)"
                    .to_owned(),
            })?;
            detectors.push(Box::new(custom));
        }
        Ok(Self { detectors })
    }

    /// The names of the enabled detectors.
    pub fn detector_names(&self) -> Vec<&str> {
        self.detectors.iter().map(|d| d.name()).collect()
    }

    /// Every finding in `text` (sorted, not overlapping) and the look-alikes left.
    pub fn detect(&self, text: &str) -> Hits {
        let mut hits = Hits::default();
        for detector in &self.detectors {
            detector.scan(text, &mut hits);
        }
        resolve(hits)
    }
}

/// Keeps the longest finding where findings overlap (ties: the kind that takes precedence,
/// then the earlier one), and only the look-alikes that no finding covers.
fn resolve(mut hits: Hits) -> Hits {
    hits.findings.sort_by(|a, b| {
        (b.end - b.start)
            .cmp(&(a.end - a.start))
            .then(a.kind.precedence().cmp(&b.kind.precedence()))
            .then(a.start.cmp(&b.start))
    });
    let mut kept: Vec<Finding> = Vec::with_capacity(hits.findings.len());
    for finding in hits.findings {
        if !kept
            .iter()
            .any(|k| finding.start < k.end && k.start < finding.end)
        {
            kept.push(finding);
        }
    }
    kept.sort_by_key(|f| f.start);
    let mut near_misses: Vec<NearMiss> = hits
        .near_misses
        .into_iter()
        .filter(|miss| {
            !kept
                .iter()
                .any(|f| f.start < miss.end && miss.start < f.end)
        })
        .collect();
    near_misses.sort_by_key(|miss| (miss.start, std::cmp::Reverse(miss.end)));
    near_misses.dedup_by(|later, earlier| later.start < earlier.end);
    Hits {
        findings: kept,
        near_misses,
    }
}

/// Consistent pseudonyms within one run: the n-th distinct value of a kind becomes
/// `<KIND_n>`, numbered in the order values are first met.
#[derive(Debug, Default)]
pub struct Pseudonyms {
    assigned: HashMap<(PiiKind, String), u64>,
    next: HashMap<PiiKind, u64>,
}

impl Pseudonyms {
    /// The pseudonym of `value`, assigning the next number if it is new.
    pub fn get(&mut self, kind: &PiiKind, value: &str) -> String {
        let key = (kind.clone(), kind.normalize(value));
        let number = match self.assigned.get(&key) {
            Some(number) => *number,
            None => {
                let next = self.next.entry(kind.clone()).or_insert(0);
                *next += 1;
                self.assigned.insert(key, *next);
                *next
            }
        };
        format!("<{}_{number}>", kind.label())
    }

    /// How many distinct values have a pseudonym.
    pub fn len(&self) -> usize {
        self.assigned.len()
    }

    pub fn is_empty(&self) -> bool {
        self.assigned.is_empty()
    }
}

/// The text with every finding replaced. `findings` must be sorted and not overlap, as
/// [`Scrubber::detect`] returns them.
pub fn apply(
    text: &str,
    findings: &[Finding],
    mode: ReplaceMode,
    pseudonyms: &mut Pseudonyms,
) -> String {
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for finding in findings {
        if finding.start < copied || finding.end > text.len() {
            continue;
        }
        out.push_str(&text[copied..finding.start]);
        out.push_str(&replacement(
            &text[finding.start..finding.end],
            &finding.kind,
            mode,
            pseudonyms,
        ));
        copied = finding.end;
    }
    out.push_str(&text[copied..]);
    out
}

/// What one finding is replaced by.
pub fn replacement(
    value: &str,
    kind: &PiiKind,
    mode: ReplaceMode,
    pseudonyms: &mut Pseudonyms,
) -> String {
    match mode {
        ReplaceMode::Placeholder => format!("<{}>", kind.label()),
        ReplaceMode::Pseudonym => pseudonyms.get(kind, value),
    }
}

/// A value with its middle hidden, for reports: `138****5678`, `zh****@example.com`.
pub fn mask(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    if let Some(at) = value.find('@') {
        let local = &value[..at];
        let visible: String = local.chars().take(2).collect();
        return format!("{visible}****{}", &value[at..]);
    }
    let (head, tail) = match chars.len() {
        0..=4 => (1, 0),
        5..=10 => (2, 2),
        _ => (3, 4),
    };
    let head: String = chars.iter().take(head).collect();
    let tail: String = chars[chars.len() - tail..].iter().collect();
    format!("{head}****{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrub(text: &str, mode: ReplaceMode, pseudonyms: &mut Pseudonyms) -> String {
        let hits = Scrubber::builtin().detect(text);
        apply(text, &hits.findings, mode, pseudonyms)
    }

    #[test]
    fn placeholders_replace_every_kind() {
        let text = "张经理手机13812345678，邮箱zhang@example.com，身份证11010519491231002X，卡号6222021234567890128，服务器10.20.30.40，车牌京A12345。";
        let out = scrub(text, ReplaceMode::Placeholder, &mut Pseudonyms::default());
        assert_eq!(
            out,
            "张经理手机<PHONE>，邮箱<EMAIL>，身份证<ID_CARD>，卡号<BANK_CARD>，服务器<IPV4>，车牌<PLATE>。"
        );
    }

    #[test]
    fn pseudonyms_are_consistent_within_a_run() {
        let mut pseudonyms = Pseudonyms::default();
        let first = scrub(
            "找13812345678或13912345678",
            ReplaceMode::Pseudonym,
            &mut pseudonyms,
        );
        let second = scrub(
            "再打+86 138 1234 5678",
            ReplaceMode::Pseudonym,
            &mut pseudonyms,
        );
        assert_eq!(first, "找<PHONE_1>或<PHONE_2>");
        assert_eq!(second, "再打<PHONE_1>");
        assert_eq!(pseudonyms.len(), 2);
    }

    #[test]
    fn the_longest_overlapping_finding_wins() {
        let text = "邮箱13812345678@163.com";
        let hits = Scrubber::builtin().detect(text);
        assert_eq!(hits.findings.len(), 1);
        assert_eq!(hits.findings[0].kind, PiiKind::Email);
    }

    #[test]
    fn a_valid_id_number_is_an_id_even_when_luhn_also_passes() {
        let hits = Scrubber::builtin().detect("11010519491231002X");
        assert_eq!(hits.findings[0].kind, PiiKind::IdCard);
    }

    #[test]
    fn look_alikes_are_reported_not_replaced() {
        let text = "订单6222021234567890127，见2.1.3.4节";
        let hits = Scrubber::builtin().detect(text);
        assert!(hits.findings.is_empty(), "{:?}", hits.findings);
        assert_eq!(hits.near_misses.len(), 2);
    }

    #[test]
    fn masks_keep_only_the_ends() {
        assert_eq!(mask("13812345678"), "138****5678");
        assert_eq!(mask("zhang@example.com"), "zh****@example.com");
        assert_eq!(mask("abc"), "a****");
    }
}
