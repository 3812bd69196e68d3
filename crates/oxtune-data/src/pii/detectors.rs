//! The built-in detectors, one per kind of personal data, plus custom patterns and word lists.
//!
//! Each detector finds candidates with a regular expression, then checks what a regular
//! expression cannot: that the candidate is not part of a longer number or word (a digit or
//! ASCII letter right before or after rejects it), and the kind's own rules (checksums, dates,
//! octet ranges). A candidate shaped right that fails its check is a *look-alike*: it is left
//! in the text and reported as such.

use std::net::Ipv6Addr;

use regex::{Captures, Regex, RegexBuilder};

use super::checks::{self, IdCheck};
use super::{Finding, Hits, NearMiss, PiiKind};

/// A detector of one kind of personal data.
pub trait Detector: Send + Sync {
    /// The built-in name (`phone`, `email`, …) or the custom rule's name.
    fn name(&self) -> &str;
    /// Adds every finding and look-alike of `text` to `hits`.
    fn scan(&self, text: &str, hits: &mut Hits);
}

/// Builds a regex from a pattern known at compile time.
fn builtin(pattern: &str) -> Regex {
    Regex::new(pattern).expect("built-in patterns are tested to compile")
}

/// Runs `re` over `text`, letting `visit` accept or reject each match. After a rejection the
/// search resumes one character later, so a rejected long candidate cannot hide a good one.
fn scan_matches(re: &Regex, text: &str, mut visit: impl FnMut(&Captures<'_>) -> bool) {
    let mut at = 0;
    while at <= text.len() {
        let Some(captures) = re.captures_at(text, at) else {
            break;
        };
        let Some(whole) = captures.get(0) else { break };
        if visit(&captures) && whole.end() > whole.start() {
            at = whole.end();
        } else {
            at = whole.start()
                + text[whole.start()..]
                    .chars()
                    .next()
                    .map_or(1, char::len_utf8);
        }
    }
}

fn char_before(text: &str, index: usize) -> Option<char> {
    text[..index].chars().next_back()
}

fn char_after(text: &str, index: usize) -> Option<char> {
    text[index..].chars().next()
}

fn is_ascii_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Whether `text[start..end]` stands alone as a number: no ASCII letter, digit or `_` touches
/// it, and it is not the fraction or integer part of a decimal (`3.14…`).
fn stands_alone(text: &str, start: usize, end: usize) -> bool {
    let before = char_before(text, start);
    let after = char_after(text, end);
    if before.is_some_and(is_ascii_word) || after.is_some_and(is_ascii_word) {
        return false;
    }
    let digit_before_dot =
        before == Some('.') && char_before(text, start - 1).is_some_and(|c| c.is_ascii_digit());
    let digit_after_dot =
        after == Some('.') && char_after(text, end + 1).is_some_and(|c| c.is_ascii_digit());
    !(digit_before_dot || digit_after_dot)
}

fn digits_of(text: &str) -> Vec<u8> {
    text.bytes().filter(u8::is_ascii_digit).collect()
}

fn finding(start: usize, end: usize, kind: PiiKind, detail: &'static str) -> Finding {
    Finding {
        start,
        end,
        kind,
        detail,
    }
}

fn near_miss(start: usize, end: usize, kind: PiiKind, reason: &'static str) -> NearMiss {
    NearMiss {
        start,
        end,
        kind,
        reason,
    }
}

/// Chinese mobile numbers: `1[3-9]` plus 9 digits, optionally `+86`/`0086`/`(+86)` first and
/// spaces or dashes in the 3-4-4 places. Eleven-digit numbers starting `10`-`12` are
/// look-alikes (no mobile network uses them).
pub struct MobilePhone {
    re: Regex,
}

impl Default for MobilePhone {
    fn default() -> Self {
        Self::new()
    }
}

impl MobilePhone {
    pub fn new() -> Self {
        Self {
            re: builtin(r"(?:(?:\+|00)86[ -]?|\(\+?86\) ?)?1\d{2}(?:[ -]?\d{4}){2}"),
        }
    }
}

impl Detector for MobilePhone {
    fn name(&self) -> &str {
        "phone"
    }

    fn scan(&self, text: &str, hits: &mut Hits) {
        scan_matches(&self.re, text, |captures| {
            let Some(m) = captures.get(0) else {
                return false;
            };
            if !stands_alone(text, m.start(), m.end()) || char_before(text, m.start()) == Some('+')
            {
                return false;
            }
            let digits = digits_of(m.as_str());
            let number = &digits[digits.len() - 11..];
            if (b'3'..=b'9').contains(&number[1]) {
                hits.findings
                    .push(finding(m.start(), m.end(), PiiKind::Phone, "mobile number"));
                true
            } else {
                if !m.as_str().starts_with(['+', '(']) && !m.as_str().starts_with("00") {
                    hits.near_misses.push(near_miss(
                        m.start(),
                        m.end(),
                        PiiKind::Phone,
                        "11 digits, but no mobile network starts 10-12",
                    ));
                }
                false
            }
        });
    }
}

/// Chinese landline numbers: an area code (`010`, `02x`, `0xxx`) in parentheses or followed by
/// a space or dash (or `+86` before it), a 7-8 digit local number starting 2-9, and an
/// optional extension. Without a separator an area code and number are indistinguishable from
/// any other 10-12 digit number, so those are not taken.
pub struct Landline {
    re: Regex,
}

impl Default for Landline {
    fn default() -> Self {
        Self::new()
    }
}

impl Landline {
    pub fn new() -> Self {
        Self {
            re: builtin(concat!(
                r"(?:(?:\+|00)86[ -]?\(?0?(?:10|2\d|[3-9]\d{2})\)?[ -]?",
                r"|\(0(?:10|2\d|[3-9]\d{2})\)[ -]?",
                r"|0(?:10|2\d|[3-9]\d{2})[ -])",
                r"[2-9]\d{6,7}(?:(?:-|转|ext\.? ?)\d{1,5})?",
            )),
        }
    }
}

impl Detector for Landline {
    fn name(&self) -> &str {
        "landline"
    }

    fn scan(&self, text: &str, hits: &mut Hits) {
        scan_matches(&self.re, text, |captures| {
            let Some(m) = captures.get(0) else {
                return false;
            };
            if !stands_alone(text, m.start(), m.end()) {
                return false;
            }
            hits.findings.push(finding(
                m.start(),
                m.end(),
                PiiKind::Landline,
                "landline number",
            ));
            true
        });
    }
}

/// E-mail addresses with a dotted domain and an alphabetic top-level domain
/// (`user@localhost` and `@mentions` are left alone).
pub struct Email {
    re: Regex,
}

impl Default for Email {
    fn default() -> Self {
        Self::new()
    }
}

impl Email {
    pub fn new() -> Self {
        Self {
            re: builtin(
                r"[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,62}[A-Za-z0-9_%+-])?@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}",
            ),
        }
    }
}

impl Detector for Email {
    fn name(&self) -> &str {
        "email"
    }

    fn scan(&self, text: &str, hits: &mut Hits) {
        scan_matches(&self.re, text, |captures| {
            let Some(m) = captures.get(0) else {
                return false;
            };
            if char_after(text, m.end()).is_some_and(is_ascii_word) {
                return false;
            }
            // Only whole local parts (a rejected match must not come back as its own suffix).
            if char_before(text, m.start())
                .is_some_and(|c| c.is_ascii_alphanumeric() || "._%+-".contains(c))
            {
                return false;
            }
            // `scheme://user:password@host` is a URL credential (see UrlToken), not an address.
            if char_before(text, m.start()) == Some(':')
                && !text[..m.start()].to_ascii_lowercase().ends_with("mailto:")
            {
                return false;
            }
            hits.findings.push(finding(
                m.start(),
                m.end(),
                PiiKind::Email,
                "e-mail address",
            ));
            true
        });
    }
}

/// Chinese resident ID numbers: 18 characters with province code, birth date and the
/// MOD 11-2 check character, or the legacy 15 digits with province code and birth date.
pub struct IdCard {
    re: Regex,
}

impl Default for IdCard {
    fn default() -> Self {
        Self::new()
    }
}

impl IdCard {
    pub fn new() -> Self {
        Self {
            re: builtin(r"\d{17}[\dXx]|\d{15}"),
        }
    }
}

impl Detector for IdCard {
    fn name(&self) -> &str {
        "id_card"
    }

    fn scan(&self, text: &str, hits: &mut Hits) {
        scan_matches(&self.re, text, |captures| {
            let Some(m) = captures.get(0) else {
                return false;
            };
            if !stands_alone(text, m.start(), m.end()) {
                return false;
            }
            let bytes = m.as_str().as_bytes();
            if bytes.len() == 15 {
                let valid = checks::check_id15(bytes);
                if valid {
                    hits.findings.push(finding(
                        m.start(),
                        m.end(),
                        PiiKind::IdCard,
                        "15-digit ID number",
                    ));
                }
                return valid;
            }
            match checks::check_id18(bytes) {
                IdCheck::Valid => {
                    hits.findings.push(finding(
                        m.start(),
                        m.end(),
                        PiiKind::IdCard,
                        "18-digit ID number, check character valid",
                    ));
                    true
                }
                IdCheck::ChecksumMismatch => {
                    hits.near_misses.push(near_miss(
                        m.start(),
                        m.end(),
                        PiiKind::IdCard,
                        "ID-number shape, but the check character is wrong",
                    ));
                    false
                }
                IdCheck::NotAnId => false,
            }
        });
    }
}

/// Bank card numbers: 15-19 digits (plain, or in groups of 4 or 4-6-5 separated by spaces or
/// dashes) with a card-scheme prefix, passing the Luhn check.
pub struct BankCard {
    re: Regex,
}

impl Default for BankCard {
    fn default() -> Self {
        Self::new()
    }
}

impl BankCard {
    pub fn new() -> Self {
        Self {
            re: builtin(
                r"\d{4}[ -]\d{6}[ -]\d{5}|\d{4}(?:[ -]\d{4}){2,3}(?:[ -]\d{1,4})?|\d{15,19}",
            ),
        }
    }
}

impl Detector for BankCard {
    fn name(&self) -> &str {
        "bank_card"
    }

    fn scan(&self, text: &str, hits: &mut Hits) {
        scan_matches(&self.re, text, |captures| {
            let Some(m) = captures.get(0) else {
                return false;
            };
            // A trailing short group may be a neighbouring number ("…7894 2张"): try without it.
            let mut end = m.end();
            let mut candidates = vec![end];
            if let Some(last_separator) = m.as_str().rfind([' ', '-'])
                && (m.as_str().len() - last_separator - 1 < 4 || digits_of(m.as_str()).len() > 16)
            {
                candidates.push(m.start() + last_separator);
            }
            let mut look_alike = None;
            for candidate_end in candidates {
                if !stands_alone(text, m.start(), candidate_end) {
                    continue;
                }
                let digits = digits_of(&text[m.start()..candidate_end]);
                if !(15..=19).contains(&digits.len()) || !checks::card_prefix_valid(&digits) {
                    continue;
                }
                if checks::luhn_valid(&digits) {
                    end = candidate_end;
                    hits.findings.push(finding(
                        m.start(),
                        end,
                        PiiKind::BankCard,
                        "card number, Luhn valid",
                    ));
                    return true;
                }
                look_alike.get_or_insert(candidate_end);
            }
            if let Some(candidate_end) = look_alike {
                hits.near_misses.push(near_miss(
                    m.start(),
                    candidate_end,
                    PiiKind::BankCard,
                    "card-number shape, but the Luhn check fails",
                ));
            }
            false
        });
    }
}

/// IPv4 addresses: four decimal octets 0-255 without leading zeros. All-single-digit
/// quadruples (`2.1.3.4`, section and version numbers) and the loopback, unspecified and
/// broadcast addresses are look-alikes.
pub struct Ipv4 {
    re: Regex,
}

impl Default for Ipv4 {
    fn default() -> Self {
        Self::new()
    }
}

impl Ipv4 {
    pub fn new() -> Self {
        Self {
            re: builtin(r"\d{1,3}(?:\.\d{1,3}){3}"),
        }
    }
}

impl Detector for Ipv4 {
    fn name(&self) -> &str {
        "ipv4"
    }

    fn scan(&self, text: &str, hits: &mut Hits) {
        scan_matches(&self.re, text, |captures| {
            let Some(m) = captures.get(0) else {
                return false;
            };
            let before = char_before(text, m.start());
            if before.is_some_and(|c| is_ascii_word(c) || c == '.')
                || !stands_alone(text, m.start(), m.end())
            {
                return false;
            }
            let octets: Vec<&str> = m.as_str().split('.').collect();
            if octets
                .iter()
                .any(|octet| octet.len() > 1 && octet.starts_with('0'))
            {
                hits.near_misses.push(near_miss(
                    m.start(),
                    m.end(),
                    PiiKind::Ipv4,
                    "dotted quad with leading zeros",
                ));
                return false;
            }
            let values: Vec<u32> = octets
                .iter()
                .filter_map(|octet| checks::parse_digits(octet.as_bytes()))
                .collect();
            if values.iter().any(|value| *value > 255) {
                hits.near_misses.push(near_miss(
                    m.start(),
                    m.end(),
                    PiiKind::Ipv4,
                    "dotted quad with an octet above 255",
                ));
                return false;
            }
            if values.iter().all(|value| *value < 10) {
                hits.near_misses.push(near_miss(
                    m.start(),
                    m.end(),
                    PiiKind::Ipv4,
                    "single-digit quad: a section or version number",
                ));
                return false;
            }
            if matches!(
                values.as_slice(),
                [127, ..] | [0, 0, 0, 0] | [255, 255, 255, 255]
            ) {
                hits.near_misses.push(near_miss(
                    m.start(),
                    m.end(),
                    PiiKind::Ipv4,
                    "loopback, unspecified or broadcast address",
                ));
                return false;
            }
            hits.findings
                .push(finding(m.start(), m.end(), PiiKind::Ipv4, "IPv4 address"));
            true
        });
    }
}

/// IPv6 addresses, parsed by the standard library; loopback (`::1`), unspecified (`::`) and
/// candidates with fewer than four hex digits are left alone.
pub struct Ipv6 {
    re: Regex,
}

impl Default for Ipv6 {
    fn default() -> Self {
        Self::new()
    }
}

impl Ipv6 {
    pub fn new() -> Self {
        Self {
            re: builtin(r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:\d{1,3}(?:\.\d{1,3}){3})?"),
        }
    }
}

impl Detector for Ipv6 {
    fn name(&self) -> &str {
        "ipv6"
    }

    fn scan(&self, text: &str, hits: &mut Hits) {
        scan_matches(&self.re, text, |captures| {
            let Some(m) = captures.get(0) else {
                return false;
            };
            let before = char_before(text, m.start());
            let after = char_after(text, m.end());
            if before.is_some_and(|c| is_ascii_word(c) || c == ':' || c == '.')
                || after.is_some_and(|c| is_ascii_word(c) || c == ':' || c == '.')
            {
                return false;
            }
            let Ok(address) = m.as_str().parse::<Ipv6Addr>() else {
                return false;
            };
            let hex_digits = m.as_str().bytes().filter(u8::is_ascii_hexdigit).count();
            if address.is_loopback() || address.is_unspecified() || hex_digits < 4 {
                return false;
            }
            hits.findings
                .push(finding(m.start(), m.end(), PiiKind::Ipv6, "IPv6 address"));
            true
        });
    }
}

/// Chinese vehicle plates: province character, letter (no I or O), an optional `·`, then
/// five characters with at least three digits, or the six-character new-energy forms.
pub struct VehiclePlate {
    re: Regex,
}

impl Default for VehiclePlate {
    fn default() -> Self {
        Self::new()
    }
}

impl VehiclePlate {
    pub fn new() -> Self {
        Self {
            re: builtin(concat!(
                "[京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼]",
                "[A-HJ-NP-Z][·•・ ]?",
                "(?:[DF][A-HJ-NP-Z0-9][0-9]{4}|[0-9]{5}[DF]|[A-HJ-NP-Z0-9]{4}[A-HJ-NP-Z0-9挂学警港澳])",
            )),
        }
    }
}

impl Detector for VehiclePlate {
    fn name(&self) -> &str {
        "plate"
    }

    fn scan(&self, text: &str, hits: &mut Hits) {
        scan_matches(&self.re, text, |captures| {
            let Some(m) = captures.get(0) else {
                return false;
            };
            if char_after(text, m.end()).is_some_and(is_ascii_word)
                || char_before(text, m.start()).is_some_and(is_ascii_word)
            {
                return false;
            }
            let serial: String = m
                .as_str()
                .chars()
                .skip(2)
                .filter(|c| c.is_ascii_alphanumeric())
                .collect();
            let digits = serial.bytes().filter(u8::is_ascii_digit).count();
            if serial.len() < 6 && digits < 3 {
                return false;
            }
            hits.findings
                .push(finding(m.start(), m.end(), PiiKind::Plate, "vehicle plate"));
            true
        });
    }
}

/// Credentials inside URLs: the value of query or fragment parameters named like a secret
/// (`token`, `access_token`, `api_key`, `sig`, `password`, …) and the password of
/// `scheme://user:password@host`. Only the value is replaced; the URL stays readable.
pub struct UrlToken {
    re: Regex,
}

const SECRET_PARAMETERS: &[&str] = &[
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "auth",
    "auth_token",
    "authorization",
    "api_key",
    "apikey",
    "key",
    "secret",
    "client_secret",
    "password",
    "passwd",
    "pwd",
    "sig",
    "signature",
    "session",
    "sessionid",
    "session_id",
    "sid",
    "ticket",
    "code",
    "x-amz-signature",
    "x-amz-security-token",
    "access_key",
    "accesskey",
    "private_token",
];

impl Default for UrlToken {
    fn default() -> Self {
        Self::new()
    }
}

impl UrlToken {
    pub fn new() -> Self {
        Self {
            re: builtin(r"[A-Za-z][A-Za-z0-9+.\-]{1,15}://[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+"),
        }
    }
}

fn is_secret_parameter(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMETERS.contains(&name.as_str())
        || name.ends_with("token")
        || name.ends_with("secret")
        || name.ends_with("_key")
        || name.ends_with("password")
}

impl Detector for UrlToken {
    fn name(&self) -> &str {
        "url_token"
    }

    fn scan(&self, text: &str, hits: &mut Hits) {
        for m in self.re.find_iter(text) {
            let url = m
                .as_str()
                .trim_end_matches(['.', ',', ';', ':', '!', '?', ')', ']', '\'']);
            let base = m.start();
            // user:password@host
            if let Some(scheme_end) = url.find("://") {
                let authority_start = scheme_end + 3;
                let authority_end = url[authority_start..]
                    .find(['/', '?', '#'])
                    .map_or(url.len(), |i| authority_start + i);
                let authority = &url[authority_start..authority_end];
                if let Some(at) = authority.rfind('@')
                    && let Some(colon) = authority[..at].find(':')
                {
                    let start = base + authority_start + colon + 1;
                    let end = base + authority_start + at;
                    if end > start {
                        hits.findings.push(finding(
                            start,
                            end,
                            PiiKind::UrlToken,
                            "password in URL",
                        ));
                    }
                }
            }
            // ?name=value&… and #name=value
            let Some(query_start) = url.find(['?', '#']) else {
                continue;
            };
            let mut position = query_start + 1;
            for part in url[query_start + 1..].split(['&', '#', ';', '?']) {
                let part_start = position;
                position += part.len() + 1;
                let Some((name, value)) = part.split_once('=') else {
                    continue;
                };
                if value.is_empty() || value.starts_with('<') || !is_secret_parameter(name) {
                    continue;
                }
                let start = base + part_start + name.len() + 1;
                hits.findings.push(finding(
                    start,
                    start + value.len(),
                    PiiKind::UrlToken,
                    "secret URL parameter",
                ));
            }
        }
    }
}

/// API keys and secrets with a recognisable shape, and values assigned to names such as
/// `password=` / `api_key:` / `密码：`.
pub struct Secret {
    patterns: Vec<(Regex, &'static str)>,
    assignment: Regex,
}

impl Default for Secret {
    fn default() -> Self {
        Self::new()
    }
}

impl Secret {
    pub fn new() -> Self {
        let patterns = [
            (
                r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
                "private key block",
            ),
            (r"(?:AKIA|ASIA)[0-9A-Z]{16}", "AWS access key id"),
            (r"gh[pousr]_[A-Za-z0-9]{36,255}", "GitHub token"),
            (r"github_pat_[A-Za-z0-9_]{22,255}", "GitHub token"),
            (r"glpat-[A-Za-z0-9_-]{20,}", "GitLab token"),
            (
                r"sk-(?:proj-|ant-[a-z0-9]+-)?[A-Za-z0-9_-]{20,}",
                "sk- API key",
            ),
            (r"xox[abposr]-[A-Za-z0-9-]{10,}", "Slack token"),
            (r"AIza[0-9A-Za-z_-]{35}", "Google API key"),
            (r"(?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{16,}", "Stripe key"),
            (r"LTAI[0-9A-Za-z]{12,20}", "Alibaba Cloud AccessKey id"),
            (r"AKID[0-9A-Za-z]{13,40}", "Tencent Cloud SecretId"),
            (
                r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
                "JSON Web Token",
            ),
            (r"(?i:bearer) +([A-Za-z0-9._~+/-]{20,}=*)", "bearer token"),
        ];
        let patterns = patterns
            .into_iter()
            .map(|(pattern, name)| (builtin(pattern), name))
            .collect();
        let assignment = builtin(concat!(
            r#"(?i:password|passwd|pwd|secret|api[_-]?key|access[_-]?key(?:[_-]?secret)?|secret[_-]?key|access[_-]?token|auth[_-]?token|client[_-]?secret|private[_-]?key)"#,
            r#"["']?\s*[:=]\s*["']?([A-Za-z0-9!#$%*+\-./:=?@^_`|~]{6,})"#,
            r#"|(?:密码|口令|密钥|秘钥|令牌)\s*(?:[:：=]|是|为)\s*["'“]?([A-Za-z0-9!#$%*+\-./:=?@^_`|~]{6,})"#,
        ));
        Self {
            patterns,
            assignment,
        }
    }
}

/// Whether a value mixes at least two of: lower case, upper case, digits, symbols (so plain
/// words like `password: required` and masks like `******` are not taken for secrets).
fn looks_random(value: &str) -> bool {
    let classes = [
        value.bytes().any(|b| b.is_ascii_lowercase()),
        value.bytes().any(|b| b.is_ascii_uppercase()),
        value.bytes().any(|b| b.is_ascii_digit()),
        value.bytes().any(|b| b.is_ascii_punctuation()),
    ];
    let alphanumeric = value.bytes().any(|b| b.is_ascii_alphanumeric());
    alphanumeric && classes.iter().filter(|c| **c).count() >= 2
}

impl Detector for Secret {
    fn name(&self) -> &str {
        "secret"
    }

    fn scan(&self, text: &str, hits: &mut Hits) {
        let first = hits.findings.len();
        for (re, name) in &self.patterns {
            scan_matches(re, text, |captures| {
                let Some(whole) = captures.get(0) else {
                    return false;
                };
                let m = captures.get(1).unwrap_or(whole);
                if char_before(text, whole.start()).is_some_and(is_ascii_word)
                    || char_after(text, m.end()).is_some_and(is_ascii_word)
                {
                    return false;
                }
                if !m.as_str().bytes().any(|b| b.is_ascii_digit()) && !name.starts_with("private") {
                    return false;
                }
                hits.findings
                    .push(finding(m.start(), m.end(), PiiKind::Secret, name));
                true
            });
        }
        scan_matches(&self.assignment, text, |captures| {
            let Some(m) = captures.get(1).or_else(|| captures.get(2)) else {
                return false;
            };
            let value = m
                .as_str()
                .trim_end_matches(['"', '\'', ',', ';', '.', ')', '}', ']']);
            let end = m.start() + value.len();
            let taken = hits.findings[first..]
                .iter()
                .any(|f| f.start < end && m.start() < f.end);
            if taken || value.len() < 6 || !looks_random(value) || value.starts_with('<') {
                return false;
            }
            hits.findings
                .push(finding(m.start(), end, PiiKind::Secret, "assigned secret"));
            true
        });
    }
}

/// A user rule from the scrub config: a regular expression or a word list, reported and
/// replaced under the rule's name.
pub struct Custom {
    name: String,
    kind: PiiKind,
    re: Regex,
    whole_words: bool,
}

impl Custom {
    /// A rule matching `pattern`.
    pub fn pattern(
        name: &str,
        pattern: &str,
        case_insensitive: bool,
    ) -> Result<Self, regex::Error> {
        let re = RegexBuilder::new(pattern)
            .case_insensitive(case_insensitive)
            .build()?;
        Ok(Self {
            name: name.to_owned(),
            kind: PiiKind::custom(name),
            re,
            whole_words: false,
        })
    }

    /// A rule matching any of `words` (longest first). Words that begin or end with an ASCII
    /// letter or digit only match as whole words.
    pub fn words(
        name: &str,
        words: &[String],
        case_insensitive: bool,
    ) -> Result<Self, regex::Error> {
        let mut words: Vec<&str> = words
            .iter()
            .map(|w| w.trim())
            .filter(|w| !w.is_empty())
            .collect();
        words.sort_by_key(|w| std::cmp::Reverse(w.len()));
        words.dedup();
        let alternation = words
            .iter()
            .map(|w| regex::escape(w))
            .collect::<Vec<_>>()
            .join("|");
        let pattern = if alternation.is_empty() {
            r"[^\s\S]".to_owned()
        } else {
            format!("(?:{alternation})")
        };
        let re = RegexBuilder::new(&pattern)
            .case_insensitive(case_insensitive)
            .size_limit(1 << 26)
            .build()?;
        Ok(Self {
            name: name.to_owned(),
            kind: PiiKind::custom(name),
            re,
            whole_words: true,
        })
    }
}

impl Detector for Custom {
    fn name(&self) -> &str {
        &self.name
    }

    fn scan(&self, text: &str, hits: &mut Hits) {
        scan_matches(&self.re, text, |captures| {
            let Some(m) = captures.get(0) else {
                return false;
            };
            if m.is_empty() {
                return false;
            }
            if self.whole_words {
                let starts_word = m.as_str().chars().next().is_some_and(is_ascii_word);
                let ends_word = m.as_str().chars().next_back().is_some_and(is_ascii_word);
                if (starts_word && char_before(text, m.start()).is_some_and(is_ascii_word))
                    || (ends_word && char_after(text, m.end()).is_some_and(is_ascii_word))
                {
                    return false;
                }
            }
            hits.findings.push(finding(
                m.start(),
                m.end(),
                self.kind.clone(),
                "custom rule",
            ));
            true
        });
    }
}

/// The built-in detectors by name, in the order they are documented.
pub fn builtin_detectors() -> Vec<Box<dyn Detector>> {
    vec![
        Box::new(MobilePhone::new()),
        Box::new(Landline::new()),
        Box::new(Email::new()),
        Box::new(IdCard::new()),
        Box::new(BankCard::new()),
        Box::new(Ipv4::new()),
        Box::new(Ipv6::new()),
        Box::new(VehiclePlate::new()),
        Box::new(UrlToken::new()),
        Box::new(Secret::new()),
    ]
}

/// The names `builtin_detectors` answers to, for config validation.
pub const BUILTIN_NAMES: [&str; 10] = [
    "phone",
    "landline",
    "email",
    "id_card",
    "bank_card",
    "ipv4",
    "ipv6",
    "plate",
    "url_token",
    "secret",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn found(detector: &dyn Detector, text: &str) -> Vec<String> {
        let mut hits = Hits::default();
        detector.scan(text, &mut hits);
        hits.findings
            .iter()
            .map(|f| text[f.start..f.end].to_owned())
            .collect()
    }

    fn look_alikes(detector: &dyn Detector, text: &str) -> Vec<String> {
        let mut hits = Hits::default();
        detector.scan(text, &mut hits);
        hits.near_misses
            .iter()
            .map(|f| text[f.start..f.end].to_owned())
            .collect()
    }

    #[test]
    fn builtin_names_match_the_detectors() {
        let names: Vec<String> = builtin_detectors()
            .iter()
            .map(|d| d.name().to_owned())
            .collect();
        assert_eq!(names, BUILTIN_NAMES);
    }

    #[test]
    fn mobile_numbers_with_prefixes_and_separators() {
        let d = MobilePhone::new();
        for text in [
            "手机13812345678。",
            "+86 138 1234 5678",
            "+86-13812345678",
            "(+86)13912345678",
            "0086 15012345678",
            "tel: 138-1234-5678",
            "联系19912345678或",
        ] {
            assert_eq!(found(&d, text).len(), 1, "{text}");
        }
        let text = "+86 138 1234 5678";
        assert_eq!(found(&d, text), vec![text.to_owned()]);
        for text in [
            "订单号2023101513812345678",
            "ORD13812345678",
            "3.13812345678",
            "1381234567",
            "138123456789",
        ] {
            assert_eq!(found(&d, text), Vec::<String>::new(), "{text}");
        }
        assert_eq!(look_alikes(&d, "测试账号 12345678901"), vec!["12345678901"]);
    }

    #[test]
    fn landlines_need_an_area_code_separator() {
        let d = Landline::new();
        for text in [
            "电话010-62345678",
            "(021)64321234",
            "0755 86123456",
            "+86 10 62345678",
            "010-62345678-123",
            "0571-8812345转601",
        ] {
            assert_eq!(found(&d, text).len(), 1, "{text}");
        }
        for text in ["2024-01-15", "01062345678", "010-1234", "版本 0.10.2"] {
            assert_eq!(found(&d, text), Vec::<String>::new(), "{text}");
        }
    }

    #[test]
    fn emails_but_not_mentions_or_local_hosts() {
        let d = Email::new();
        assert_eq!(
            found(&d, "发邮件给zhang.san+prd@example.com.cn即可"),
            vec!["zhang.san+prd@example.com.cn"]
        );
        assert_eq!(
            found(&d, "@张三 请看 admin@localhost"),
            Vec::<String>::new()
        );
        assert_eq!(
            found(&d, "redis://:pw1234@cache.example.com"),
            Vec::<String>::new()
        );
        assert_eq!(
            found(&d, "mailto:li.na@example.com"),
            vec!["li.na@example.com"]
        );
    }

    #[test]
    fn id_numbers_need_a_valid_check_character() {
        let d = IdCard::new();
        assert_eq!(
            found(&d, "身份证号11010519491231002X。"),
            vec!["11010519491231002X"]
        );
        assert_eq!(found(&d, "旧证110105491231002"), vec!["110105491231002"]);
        assert_eq!(
            look_alikes(&d, "身份证号110105194912310021"),
            vec!["110105194912310021"]
        );
        assert_eq!(found(&d, "订单20240115123456789"), Vec::<String>::new());
    }

    #[test]
    fn bank_cards_need_luhn() {
        let d = BankCard::new();
        assert_eq!(
            found(&d, "卡号6222021234567890128"),
            vec!["6222021234567890128"]
        );
        assert_eq!(
            found(&d, "卡号 4111 1111 1111 1111 已绑定"),
            vec!["4111 1111 1111 1111"]
        );
        assert_eq!(
            found(&d, "卡号 4111 1111 1111 1111 2张"),
            vec!["4111 1111 1111 1111"]
        );
        assert_eq!(
            look_alikes(&d, "卡号6222021234567890127"),
            vec!["6222021234567890127"]
        );
        assert_eq!(found(&d, "时间戳1700000000000000"), Vec::<String>::new());
    }

    #[test]
    fn ipv4_but_not_versions_or_sections() {
        let d = Ipv4::new();
        assert_eq!(found(&d, "服务器192.168.10.23。"), vec!["192.168.10.23"]);
        assert_eq!(
            found(&d, "见2.1.3.4节，版本v10.2.33.1"),
            Vec::<String>::new()
        );
        assert_eq!(look_alikes(&d, "见2.1.3.4节"), vec!["2.1.3.4"]);
        assert_eq!(look_alikes(&d, "地址300.1.2.3"), vec!["300.1.2.3"]);
        assert_eq!(found(&d, "1.2.3.4.5"), Vec::<String>::new());
    }

    #[test]
    fn ipv6_addresses() {
        let d = Ipv6::new();
        assert_eq!(
            found(&d, "地址2001:db8:85a3::8a2e:370:7334，"),
            vec!["2001:db8:85a3::8a2e:370:7334"]
        );
        assert_eq!(
            found(&d, "fe80::1ff:fe23:4567:890a"),
            vec!["fe80::1ff:fe23:4567:890a"]
        );
        assert_eq!(
            found(&d, "时间 12:30:45，std::vector，::1"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn plates() {
        let d = VehiclePlate::new();
        assert_eq!(found(&d, "车牌京A12345，"), vec!["京A12345"]);
        assert_eq!(found(&d, "粤B·D12345"), vec!["粤B·D12345"]);
        assert_eq!(found(&d, "沪AD12345"), vec!["沪AD12345"]);
        assert_eq!(found(&d, "全新ABCDEF型号，京A股"), Vec::<String>::new());
    }

    #[test]
    fn url_tokens_replace_only_the_value() {
        let d = UrlToken::new();
        let text = "回调 https://api.example.com/v1/cb?user=1&access_token=abc123XYZ&x=2 完成";
        assert_eq!(found(&d, text), vec!["abc123XYZ"]);
        assert_eq!(
            found(&d, "https://admin:s3cret@db.example.com/x"),
            vec!["s3cret"]
        );
        assert_eq!(
            found(&d, "https://example.com/docs?page=2"),
            Vec::<String>::new()
        );
        assert_eq!(
            found(
                &d,
                "连接串 mysql://app:S3cure_pw9@db.internal:3306/shop 写死了"
            ),
            vec!["S3cure_pw9"]
        );
    }

    #[test]
    fn secrets_by_shape_and_by_assignment() {
        let d = Secret::new();
        assert_eq!(
            found(&d, "key AKIAIOSFODNN7EXAMPLE"),
            vec!["AKIAIOSFODNN7EXAMPLE"]
        );
        assert_eq!(
            found(&d, "token ghp_1234567890abcdefghijABCDEFGHIJ123456"),
            vec!["ghp_1234567890abcdefghijABCDEFGHIJ123456"]
        );
        assert_eq!(
            found(&d, "OPENAI_API_KEY=sk-proj-Abc123def456GHI789jkl0"),
            vec!["sk-proj-Abc123def456GHI789jkl0"]
        );
        assert_eq!(found(&d, "password: Hunter2024!"), vec!["Hunter2024!"]);
        assert_eq!(found(&d, "数据库密码：Pa55word#1"), vec!["Pa55word#1"]);
        assert_eq!(
            found(
                &d,
                "password: required, 密码：******, scikit-learn, sk-learn"
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            found(&d, "GET /x?access_token=a8f5f167f44f4964&sort=desc"),
            vec!["a8f5f167f44f4964"]
        );
    }

    #[test]
    fn custom_words_match_whole_ascii_words_only() {
        let d =
            Custom::words("PERSON", &["张三".to_owned(), "Alice".to_owned()], false).expect("rule");
        assert_eq!(
            found(&d, "张三和Alice评审了，Alicetown不是人名"),
            vec!["张三", "Alice"]
        );
        let d = Custom::pattern("EMPLOYEE_ID", r"EMP-\d{6}", false).expect("rule");
        assert_eq!(found(&d, "工号EMP-001234"), vec!["EMP-001234"]);
    }
}
