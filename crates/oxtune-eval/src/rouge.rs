//! ROUGE-N, ROUGE-L and ROUGE-Lsum equal to Google's rouge-score 0.1.2.
//!
//! - ROUGE-N: clipped n-gram overlap; precision over the prediction's n-grams, recall over
//!   the target's.
//! - ROUGE-L: longest common subsequence of the whole token sequences.
//! - ROUGE-Lsum: summary-level LCS over newline-separated sentences (the union LCS of each
//!   target sentence against every predicted sentence, each token counted at most as often as
//!   it occurs on both sides).
//! - Several targets: each score type takes the target with the highest F1 (the first on ties).
//!
//! Tokenizers: `default` is rouge-score's (lower case, runs of `[a-z0-9]` only, optional
//! Porter stemming of tokens longer than 3), which drops Chinese entirely; `jieba` segments
//! with jieba (precise mode with HMM, jieba-rs with the same dictionary as Python jieba
//! 0.42.1) and keeps the lower-cased segments holding a letter or digit.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::porter;

/// How texts become tokens for ROUGE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RougeTokenizer {
    /// rouge-score's default tokenizer.
    Default { stem: bool },
    /// jieba word segmentation (for Chinese and mixed text).
    Jieba,
}

impl RougeTokenizer {
    pub const NAMES: &'static str = "default, jieba";

    pub fn from_name(name: &str, stem: bool) -> Result<Self> {
        match name {
            "default" => Ok(Self::Default { stem }),
            "jieba" | "zh" => Ok(Self::Jieba),
            _ => Err(Error::UnknownOption {
                what: "ROUGE tokenizer",
                name: name.to_owned(),
                available: Self::NAMES.to_owned(),
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Default { stem: false } => "default",
            Self::Default { stem: true } => "default+porter",
            Self::Jieba => "jieba",
        }
    }

    /// The tokens of `text`.
    pub fn tokenize(self, text: &str) -> Vec<String> {
        match self {
            Self::Default { stem } => default_tokens(text, stem),
            Self::Jieba => jieba_tokens(text),
        }
    }
}

/// rouge-score's `tokenize.tokenize`.
fn default_tokens(text: &str, stem: bool) -> Vec<String> {
    let lower = text.to_lowercase();
    lower
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|token| !token.is_empty())
        .map(|token| {
            if stem && token.len() > 3 {
                porter::stem(token)
            } else {
                token.to_owned()
            }
        })
        .filter(|token| {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        .collect()
}

/// jieba's segmentation of `text` (precise mode, HMM on), equal to Python jieba 0.42.1's
/// `jieba.lcut(text)`.
///
/// jieba-rs keeps ASCII runs joined by `.`, `_` or `-` together (`example.com`, `Q3-2024`);
/// Python jieba's HMM fallback splits them with `[a-zA-Z0-9]+(?:\.\d+)?%?` (`example` `.` `com`,
/// but `3.5%` whole). Such tokens are split again here the Python way. (jieba's dictionary has
/// no ASCII words holding those characters, so no dictionary word is split.)
pub fn segment(text: &str) -> Vec<&str> {
    static PYTHON_SKIP: OnceLock<Regex> = OnceLock::new();
    let skip = PYTHON_SKIP
        .get_or_init(|| Regex::new(r"[a-zA-Z0-9]+(?:\.[0-9]+)?%?").expect("a fixed pattern"));
    let mut segments = Vec::new();
    for token in jieba().cut(text, true) {
        let word = token.word;
        let joined = word.len() > 1
            && word.is_ascii()
            && word.bytes().any(|b| matches!(b, b'.' | b'_' | b'-'))
            && word.bytes().any(|b| b.is_ascii_alphanumeric());
        if !joined {
            segments.push(word);
            continue;
        }
        let mut copied = 0;
        for m in skip.find_iter(word) {
            if m.start() > copied {
                segments.push(&word[copied..m.start()]);
            }
            segments.push(m.as_str());
            copied = m.end();
        }
        if copied < word.len() {
            segments.push(&word[copied..]);
        }
    }
    segments
}

/// The jieba segmenter, loaded once (the dictionary takes a moment).
pub fn jieba() -> &'static jieba_rs::Jieba {
    static JIEBA: OnceLock<jieba_rs::Jieba> = OnceLock::new();
    JIEBA.get_or_init(jieba_rs::Jieba::new)
}

/// Python's `str.isalnum()` for one character: a letter (L*) or a number (N*).
fn is_python_alnum(c: char) -> bool {
    static ALNUM: OnceLock<Regex> = OnceLock::new();
    let re = ALNUM.get_or_init(|| Regex::new(r"^[\p{L}\p{N}]$").expect("a fixed pattern"));
    let mut buffer = [0_u8; 4];
    re.is_match(c.encode_utf8(&mut buffer))
}

fn jieba_tokens(text: &str) -> Vec<String> {
    segment(text)
        .into_iter()
        .filter(|word| word.chars().any(is_python_alnum))
        .map(str::to_lowercase)
        .collect()
}

/// Precision, recall and F1 (0-1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

impl Prf {
    fn new(precision: f64, recall: f64) -> Self {
        let fmeasure = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        Self {
            precision,
            recall,
            fmeasure,
        }
    }
}

/// A ROUGE variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RougeType {
    N(usize),
    L,
    Lsum,
}

impl RougeType {
    /// Parses `rouge1`, `rouge2`, …, `rougeL`, `rougeLsum`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "rougeL" => Ok(Self::L),
            "rougeLsum" => Ok(Self::Lsum),
            _ => match name
                .strip_prefix("rouge")
                .and_then(|n| n.parse::<usize>().ok())
            {
                Some(n) if (1..=9).contains(&n) => Ok(Self::N(n)),
                _ => Err(Error::UnknownOption {
                    what: "ROUGE type",
                    name: name.to_owned(),
                    available: "rouge1 … rouge9, rougeL, rougeLsum".to_owned(),
                }),
            },
        }
    }

    pub fn name(self) -> String {
        match self {
            Self::N(n) => format!("rouge{n}"),
            Self::L => "rougeL".to_owned(),
            Self::Lsum => "rougeLsum".to_owned(),
        }
    }
}

/// Scores a prediction against targets.
#[derive(Debug, Clone)]
pub struct RougeScorer {
    pub types: Vec<RougeType>,
    pub tokenizer: RougeTokenizer,
}

impl RougeScorer {
    pub fn new(types: Vec<RougeType>, tokenizer: RougeTokenizer) -> Self {
        Self { types, tokenizer }
    }

    /// rouge-score's `score(target, prediction)`.
    pub fn score(&self, target: &str, prediction: &str) -> Vec<(RougeType, Prf)> {
        let needs_tokens = self.types.iter().any(|t| *t != RougeType::Lsum);
        let (target_tokens, prediction_tokens) = if needs_tokens {
            (
                self.tokenizer.tokenize(target),
                self.tokenizer.tokenize(prediction),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        self.types
            .iter()
            .map(|rouge_type| {
                let prf = match rouge_type {
                    RougeType::N(n) => {
                        score_ngrams(&ngrams(&target_tokens, *n), &ngrams(&prediction_tokens, *n))
                    }
                    RougeType::L => score_lcs(&target_tokens, &prediction_tokens),
                    RougeType::Lsum => {
                        let target_sentences: Vec<Vec<String>> = sentences(target)
                            .map(|s| self.tokenizer.tokenize(s))
                            .collect();
                        let prediction_sentences: Vec<Vec<String>> = sentences(prediction)
                            .map(|s| self.tokenizer.tokenize(s))
                            .collect();
                        summary_level_lcs(&target_sentences, &prediction_sentences)
                    }
                };
                (*rouge_type, prf)
            })
            .collect()
    }

    /// rouge-score's `score_multi(targets, prediction)`: per type, the target with the best F1.
    pub fn score_multi(&self, targets: &[&str], prediction: &str) -> Vec<(RougeType, Prf)> {
        let per_target: Vec<Vec<(RougeType, Prf)>> = targets
            .iter()
            .map(|target| self.score(target, prediction))
            .collect();
        self.types
            .iter()
            .enumerate()
            .map(|(index, rouge_type)| {
                let mut best = Prf::default();
                let mut best_f = f64::NEG_INFINITY;
                for scores in &per_target {
                    let prf = scores[index].1;
                    if prf.fmeasure > best_f {
                        best_f = prf.fmeasure;
                        best = prf;
                    }
                }
                (*rouge_type, best)
            })
            .collect()
    }
}

fn sentences(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n').filter(|s| !s.is_empty())
}

fn ngrams(tokens: &[String], n: usize) -> HashMap<&[String], u64> {
    let mut counts = HashMap::new();
    for window in tokens.windows(n) {
        *counts.entry(window).or_insert(0) += 1;
    }
    counts
}

fn score_ngrams(target: &HashMap<&[String], u64>, prediction: &HashMap<&[String], u64>) -> Prf {
    let overlap: u64 = target
        .iter()
        .map(|(ngram, count)| (*count).min(prediction.get(ngram).copied().unwrap_or(0)))
        .sum();
    let target_count: u64 = target.values().sum();
    let prediction_count: u64 = prediction.values().sum();
    Prf::new(
        overlap as f64 / prediction_count.max(1) as f64,
        overlap as f64 / target_count.max(1) as f64,
    )
}

/// The LCS length table, `(rows+1) × (cols+1)`.
fn lcs_table(reference: &[String], candidate: &[String]) -> Vec<Vec<u32>> {
    let mut table = vec![vec![0_u32; candidate.len() + 1]; reference.len() + 1];
    for i in 1..=reference.len() {
        for j in 1..=candidate.len() {
            table[i][j] = if reference[i - 1] == candidate[j - 1] {
                table[i - 1][j - 1] + 1
            } else {
                table[i - 1][j].max(table[i][j - 1])
            };
        }
    }
    table
}

fn score_lcs(target: &[String], prediction: &[String]) -> Prf {
    if target.is_empty() || prediction.is_empty() {
        return Prf::default();
    }
    let lcs = f64::from(lcs_table(target, prediction)[target.len()][prediction.len()]);
    Prf::new(lcs / prediction.len() as f64, lcs / target.len() as f64)
}

/// The reference indices of one LCS, backtracking as rouge-score does (on ties, step back in
/// the reference).
fn lcs_indices(reference: &[String], candidate: &[String]) -> Vec<usize> {
    let table = lcs_table(reference, candidate);
    let (mut i, mut j) = (reference.len(), candidate.len());
    let mut indices = Vec::new();
    while i > 0 && j > 0 {
        if reference[i - 1] == candidate[j - 1] {
            indices.push(i - 1);
            i -= 1;
            j -= 1;
        } else if table[i][j - 1] > table[i - 1][j] {
            j -= 1;
        } else {
            i -= 1;
        }
    }
    indices.reverse();
    indices
}

fn summary_level_lcs(reference: &[Vec<String>], candidate: &[Vec<String>]) -> Prf {
    if reference.is_empty() || candidate.is_empty() {
        return Prf::default();
    }
    let m: usize = reference.iter().map(Vec::len).sum();
    let n: usize = candidate.iter().map(Vec::len).sum();
    if m == 0 || n == 0 {
        return Prf::default();
    }
    let mut reference_counts: HashMap<&str, u64> = HashMap::new();
    let mut candidate_counts: HashMap<&str, u64> = HashMap::new();
    for token in reference.iter().flatten() {
        *reference_counts.entry(token).or_default() += 1;
    }
    for token in candidate.iter().flatten() {
        *candidate_counts.entry(token).or_default() += 1;
    }
    let mut hits = 0_u64;
    for sentence in reference {
        let mut union: Vec<usize> = candidate
            .iter()
            .flat_map(|c| lcs_indices(sentence, c))
            .collect();
        union.sort_unstable();
        union.dedup();
        for index in union {
            let token = sentence[index].as_str();
            let (Some(c), Some(r)) = (
                candidate_counts.get_mut(token),
                reference_counts.get_mut(token),
            ) else {
                continue;
            };
            if *c > 0 && *r > 0 {
                hits += 1;
                *c -= 1;
                *r -= 1;
            }
        }
    }
    Prf::new(hits as f64 / n as f64, hits as f64 / m as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rouge_score_readme_example() {
        let scorer = RougeScorer::new(
            vec![RougeType::N(1), RougeType::L],
            RougeTokenizer::Default { stem: true },
        );
        let scores = scorer.score(
            "The quick brown fox jumps over the lazy dog",
            "The quick brown dog jumps on the log.",
        );
        assert!((scores[0].1.precision - 0.75).abs() < 1e-12);
        assert!((scores[0].1.recall - 0.666_666_666_666_666_6).abs() < 1e-12);
    }

    #[test]
    fn default_tokenizer_drops_everything_but_ascii_letters_and_digits() {
        assert_eq!(
            RougeTokenizer::Default { stem: false }.tokenize("PRD评审 v2.1, OK!"),
            vec!["prd", "v2", "1", "ok"]
        );
    }

    #[test]
    fn jieba_segments_chinese() {
        let tokens = RougeTokenizer::Jieba.tokenize("支持用户通过手机号登录。");
        assert!(tokens.contains(&"手机号".to_owned()), "{tokens:?}");
        assert!(!tokens.iter().any(|t| t == "。"));
    }

    #[test]
    fn rouge_types_parse() {
        assert_eq!(
            RougeType::from_name("rouge2").expect("rouge2"),
            RougeType::N(2)
        );
        assert_eq!(
            RougeType::from_name("rougeLsum").expect("lsum"),
            RougeType::Lsum
        );
        assert!(RougeType::from_name("rougeX").is_err());
    }
}
