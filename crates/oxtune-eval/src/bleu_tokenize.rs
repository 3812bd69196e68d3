//! sacrebleu 2.x's tokenizers, reproduced character for character: `13a` (mteval-v13a, the
//! default), `zh` (every CJK character a token, the rest as 13a), `intl` (mteval-v14
//! international), `char` and `none`.
//!
//! Each returns the tokens joined by single spaces, as sacrebleu does; BLEU then splits on
//! (Python) whitespace.

use std::sync::OnceLock;

use regex::Regex;

use crate::error::{Error, Result};
use crate::text::{collapse_whitespace, python_strip};

/// Which tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BleuTokenizer {
    #[serde(rename = "13a")]
    V13a,
    Zh,
    Intl,
    Char,
    None,
}

impl BleuTokenizer {
    pub const NAMES: &'static str = "13a, zh, intl, char, none";

    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "13a" => Ok(Self::V13a),
            "zh" => Ok(Self::Zh),
            "intl" => Ok(Self::Intl),
            "char" => Ok(Self::Char),
            "none" => Ok(Self::None),
            _ => Err(Error::UnknownOption {
                what: "BLEU tokenizer",
                name: name.to_owned(),
                available: Self::NAMES.to_owned(),
            }),
        }
    }

    /// sacrebleu's signature name.
    pub fn name(self) -> &'static str {
        match self {
            Self::V13a => "13a",
            Self::Zh => "zh",
            Self::Intl => "intl",
            Self::Char => "char",
            Self::None => "none",
        }
    }

    /// Tokenizes one segment.
    pub fn tokenize(self, line: &str) -> String {
        match self {
            Self::V13a => tokenize_13a(line),
            Self::Zh => tokenize_zh(line),
            Self::Intl => tokenize_intl(line),
            Self::Char => line.chars().map(String::from).collect::<Vec<_>>().join(" "),
            Self::None => line.to_owned(),
        }
    }
}

struct Rules {
    regexp: [(Regex, &'static str); 4],
    intl: [(Regex, &'static str); 3],
}

fn rules() -> &'static Rules {
    static RULES: OnceLock<Rules> = OnceLock::new();
    RULES.get_or_init(|| {
        let re =
            |pattern: &str| Regex::new(pattern).expect("tokenizer patterns are tested to compile");
        Rules {
            regexp: [
                // Punctuation and symbols of ASCII: { | } ~ [ \ ] ^ _ ` space ! " # $ % & ( ) * + : ; < = > ? @ /
                (
                    re(r"([\x7B-\x7E\x5B-\x60\x20-\x26\x28-\x2B\x3A-\x40\x2F])"),
                    " ${1} ",
                ),
                // Period and comma unless preceded by a digit
                (re(r"([^0-9])([.,])"), "${1} ${2} "),
                // Period and comma unless followed by a digit
                (re(r"([.,])([^0-9])"), " ${1} ${2}"),
                // Dash after a digit
                (re(r"([0-9])(-)"), "${1} ${2} "),
            ],
            intl: [
                (re(r"(\P{N})(\p{P})"), "${1} ${2} "),
                (re(r"(\p{P})(\P{N})"), " ${1} ${2}"),
                (re(r"(\p{S})"), " ${1} "),
            ],
        }
    })
}

/// sacrebleu's `TokenizerRegexp`: the four mteval rules, then whitespace collapsed.
fn tokenize_regexp(line: &str) -> String {
    let mut line = line.to_owned();
    for (re, replacement) in &rules().regexp {
        line = re.replace_all(&line, *replacement).into_owned();
    }
    collapse_whitespace(&line)
}

/// `13a`: mteval-v13a's normalization, then the regexp rules on the line padded with spaces.
pub fn tokenize_13a(line: &str) -> String {
    let mut line = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    tokenize_regexp(&format!(" {line} "))
}

/// `zh`: every character sacrebleu counts as Chinese becomes its own token.
pub fn tokenize_zh(line: &str) -> String {
    let line = python_strip(line);
    let mut spaced = String::with_capacity(line.len() * 2);
    for c in line.chars() {
        if is_chinese_char(c) {
            spaced.push(' ');
            spaced.push(c);
            spaced.push(' ');
        } else {
            spaced.push(c);
        }
    }
    tokenize_regexp(&spaced)
}

/// `intl`: punctuation split off unless between digits, symbols always split off.
pub fn tokenize_intl(line: &str) -> String {
    let mut line = line.to_owned();
    for (re, replacement) in &rules().intl {
        line = re.replace_all(&line, *replacement).into_owned();
    }
    collapse_whitespace(&line)
}

/// The character ranges sacrebleu's `zh` tokenizer splits off, as it actually applies them.
///
/// sacrebleu writes two of its ranges as `u'\u20000'..u'\u2a6d6'` and `u'\u2f800'..u'\u2fa1d'`,
/// which Python reads as the two-character strings "\u2000" "0" … "\u2a6d" "6"; compared with a
/// single character they select U+2001..=U+2A6D and U+2F81..=U+2FA1 (so CJK Extension B is not
/// split off, while general punctuation such as "…" and "—" is). We reproduce that.
const CHINESE_RANGES: [(char, char); 22] = [
    ('\u{3400}', '\u{4db5}'),
    ('\u{4e00}', '\u{9fa5}'),
    ('\u{9fa6}', '\u{9fbb}'),
    ('\u{f900}', '\u{fa2d}'),
    ('\u{fa30}', '\u{fa6a}'),
    ('\u{fa70}', '\u{fad9}'),
    ('\u{2001}', '\u{2a6d}'),
    ('\u{2f81}', '\u{2fa1}'),
    ('\u{ff00}', '\u{ffef}'),
    ('\u{2e80}', '\u{2eff}'),
    ('\u{3000}', '\u{303f}'),
    ('\u{31c0}', '\u{31ef}'),
    ('\u{2f00}', '\u{2fdf}'),
    ('\u{2ff0}', '\u{2fff}'),
    ('\u{3100}', '\u{312f}'),
    ('\u{31a0}', '\u{31bf}'),
    ('\u{fe10}', '\u{fe1f}'),
    ('\u{fe30}', '\u{fe4f}'),
    ('\u{2600}', '\u{26ff}'),
    ('\u{2700}', '\u{27bf}'),
    ('\u{3200}', '\u{32ff}'),
    ('\u{3300}', '\u{33ff}'),
];

/// Whether sacrebleu's `zh` tokenizer treats `c` as a Chinese character.
pub fn is_chinese_char(c: char) -> bool {
    CHINESE_RANGES
        .iter()
        .any(|(low, high)| (*low..=*high).contains(&c))
}

/// Whether `text` holds any Han character (used to pick `zh` when the tokenizer is `auto`).
pub fn has_han(text: &str) -> bool {
    text.chars()
        .any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c) || ('\u{3400}'..='\u{4dbf}').contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v13a_splits_punctuation_but_not_numbers() {
        assert_eq!(
            tokenize_13a("Revenue grew 3.5% to $1,234.56, up."),
            "Revenue grew 3.5 % to $ 1,234.56 , up ."
        );
        assert_eq!(tokenize_13a("Tom &amp; Jerry"), "Tom & Jerry");
        assert_eq!(tokenize_13a("Q3-2024 don't"), "Q3 - 2024 don't");
    }

    #[test]
    fn zh_splits_every_chinese_character() {
        assert_eq!(
            tokenize_zh("支持iOS和Android，v2.1。"),
            "支 持 iOS 和 Android ， v2.1 。"
        );
        // The sacrebleu range quirk: general punctuation counts as Chinese.
        assert!(is_chinese_char('…') && is_chinese_char('—') && !is_chinese_char('\u{2000}'));
        assert!(!is_chinese_char('\u{20000}'));
    }
}
