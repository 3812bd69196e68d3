//! BLEU (Papineni et al., 2002) equal to sacrebleu 2.x: corpus BLEU from summed n-gram
//! statistics, sentence BLEU with effective order, the four smoothing methods of Chen & Cherry
//! (2014) as sacrebleu implements them, closest-reference length with ties to the shorter one,
//! and n-gram counts clipped by the maximum count over the references.
//!
//! Scores are on sacrebleu's 0-100 scale.

use std::collections::HashMap;

use serde::Serialize;

use crate::bleu_tokenize::BleuTokenizer;
use crate::error::{Error, Result};
use crate::text::{python_rstrip, python_split};

/// The maximum n-gram order (sacrebleu's default).
pub const MAX_NGRAM_ORDER: usize = 4;

/// sacrebleu's `my_log(0)`.
const LOG_ZERO: f64 = -9_999_999_999.0;

/// How zero n-gram matches are smoothed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Smoothing {
    /// No smoothing.
    None,
    /// Method 1: a zero count becomes `value` (default 0.1).
    Floor(f64),
    /// Method 2: add `value` (default 1) to counts and totals of orders above 1.
    AddK(f64),
    /// Method 3 (NIST, mteval-v13a): the k-th zero precision becomes 1 / (2^k · total).
    Exp,
}

impl Smoothing {
    pub const NAMES: &'static str = "none, floor, add-k, exp";

    /// Parses `none`, `floor`, `add-k`, `exp`, with an optional value: `floor:0.05`.
    pub fn from_name(name: &str) -> Result<Self> {
        let (method, value) = match name.split_once(':') {
            Some((method, value)) => {
                let value = value.parse::<f64>().map_err(|_| Error::Invalid {
                    message: format!("smoothing value `{value}` is not a number"),
                    hint: "write e.g. floor:0.1 or add-k:1".to_owned(),
                })?;
                (method, Some(value))
            }
            None => (name, None),
        };
        match method {
            "none" => Ok(Self::None),
            "floor" => Ok(Self::Floor(value.unwrap_or(0.1))),
            "add-k" => Ok(Self::AddK(value.unwrap_or(1.0))),
            "exp" => Ok(Self::Exp),
            _ => Err(Error::UnknownOption {
                what: "BLEU smoothing",
                name: name.to_owned(),
                available: Self::NAMES.to_owned(),
            }),
        }
    }

    pub fn name(self) -> String {
        match self {
            Self::None => "none".to_owned(),
            Self::Floor(value) => format!("floor[{value:.2}]"),
            Self::AddK(value) => format!("add-k[{value:.2}]"),
            Self::Exp => "exp".to_owned(),
        }
    }
}

/// BLEU settings; the defaults are sacrebleu's `corpus_bleu` defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BleuConfig {
    pub tokenizer: BleuTokenizer,
    pub smoothing: Smoothing,
    pub lowercase: bool,
    /// Leave out n-gram orders with no n-grams at all (sacrebleu's sentence BLEU default).
    pub effective_order: bool,
    pub max_ngram_order: usize,
}

impl Default for BleuConfig {
    fn default() -> Self {
        Self {
            tokenizer: BleuTokenizer::V13a,
            smoothing: Smoothing::Exp,
            lowercase: false,
            effective_order: false,
            max_ngram_order: MAX_NGRAM_ORDER,
        }
    }
}

impl BleuConfig {
    /// sacrebleu's reproducibility signature, e.g. `nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0`
    /// (the version is of the reference implementation these scores equal).
    pub fn signature(&self, num_refs: Option<usize>) -> String {
        let refs = num_refs.map_or("var".to_owned(), |n| n.to_string());
        let case = if self.lowercase { "lc" } else { "mixed" };
        let eff = if self.effective_order { "yes" } else { "no" };
        format!(
            "nrefs:{refs}|case:{case}|eff:{eff}|tok:{}|smooth:{}|version:2.6.0",
            self.tokenizer.name(),
            self.smoothing.name()
        )
    }
}

/// Sufficient statistics of one segment or a corpus.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BleuStats {
    pub sys_len: u64,
    pub ref_len: u64,
    /// Clipped matches per order.
    pub correct: Vec<u64>,
    /// Hypothesis n-grams per order.
    pub total: Vec<u64>,
}

impl BleuStats {
    fn zero(order: usize) -> Self {
        Self {
            sys_len: 0,
            ref_len: 0,
            correct: vec![0; order],
            total: vec![0; order],
        }
    }

    fn add(&mut self, other: &Self) {
        self.sys_len += other.sys_len;
        self.ref_len += other.ref_len;
        for (a, b) in self.correct.iter_mut().zip(&other.correct) {
            *a += b;
        }
        for (a, b) in self.total.iter_mut().zip(&other.total) {
            *a += b;
        }
    }
}

/// A BLEU score with its parts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BleuScore {
    /// 0-100.
    pub score: f64,
    /// Per-order precisions, 0-100.
    pub precisions: Vec<f64>,
    /// Brevity penalty.
    pub bp: f64,
    pub sys_len: u64,
    pub ref_len: u64,
    pub counts: Vec<f64>,
    pub totals: Vec<f64>,
}

/// Lowercases (optionally) and tokenizes a segment, as sacrebleu's `_preprocess_segment`.
fn preprocess(text: &str, config: &BleuConfig) -> String {
    let text = if config.lowercase {
        text.to_lowercase()
    } else {
        text.to_owned()
    };
    config.tokenizer.tokenize(python_rstrip(&text))
}

type NgramCounts<'a> = HashMap<Vec<&'a str>, u64>;

fn ngram_counts<'a>(tokens: &[&'a str], max_order: usize) -> NgramCounts<'a> {
    let mut counts = HashMap::new();
    for n in 1..=max_order {
        for window in tokens.windows(n) {
            *counts.entry(window.to_vec()).or_insert(0) += 1;
        }
    }
    counts
}

/// The reference length closest to `hyp_len` (ties: the shorter).
fn closest_ref_len(hyp_len: u64, ref_lens: &[u64]) -> u64 {
    let mut closest: Option<(u64, u64)> = None;
    for &ref_len in ref_lens {
        let diff = hyp_len.abs_diff(ref_len);
        closest = match closest {
            Some((best_diff, best_len))
                if diff > best_diff || (diff == best_diff && ref_len >= best_len) =>
            {
                Some((best_diff, best_len))
            }
            _ => Some((diff, ref_len)),
        };
    }
    closest.map_or(0, |(_, len)| len)
}

/// The statistics of one hypothesis against its references.
pub fn segment_stats(hypothesis: &str, references: &[&str], config: &BleuConfig) -> BleuStats {
    let order = config.max_ngram_order;
    let hypothesis = preprocess(hypothesis, config);
    let references: Vec<String> = references.iter().map(|r| preprocess(r, config)).collect();
    let mut ref_max: NgramCounts<'_> = HashMap::new();
    let mut ref_lens = Vec::with_capacity(references.len());
    for reference in &references {
        let tokens: Vec<&str> = python_split(reference).collect();
        ref_lens.push(tokens.len() as u64);
        for (ngram, count) in ngram_counts(&tokens, order) {
            let entry = ref_max.entry(ngram).or_insert(0);
            *entry = (*entry).max(count);
        }
    }
    let tokens: Vec<&str> = python_split(&hypothesis).collect();
    let hyp_len = tokens.len() as u64;
    let mut stats = BleuStats::zero(order);
    stats.sys_len = hyp_len;
    stats.ref_len = closest_ref_len(hyp_len, &ref_lens);
    for (ngram, count) in ngram_counts(&tokens, order) {
        let n = ngram.len() - 1;
        stats.total[n] += count;
        if let Some(ref_count) = ref_max.get(&ngram) {
            stats.correct[n] += count.min(*ref_count);
        }
    }
    stats
}

/// BLEU from statistics, step for step as sacrebleu's `compute_bleu`.
pub fn compute_bleu(stats: &BleuStats, config: &BleuConfig) -> BleuScore {
    let order = config.max_ngram_order;
    let mut correct: Vec<f64> = stats.correct.iter().map(|c| *c as f64).collect();
    let mut total: Vec<f64> = stats.total.iter().map(|t| *t as f64).collect();
    let (sys_len, ref_len) = (stats.sys_len, stats.ref_len);
    let mut bp = 1.0;
    if sys_len < ref_len {
        bp = if sys_len > 0 {
            (1.0 - ref_len as f64 / sys_len as f64).exp()
        } else {
            0.0
        };
    }
    let mut precisions = vec![0.0; order];
    let score = |score, precisions, correct, total| BleuScore {
        score,
        precisions,
        bp,
        sys_len,
        ref_len,
        counts: correct,
        totals: total,
    };
    if stats.correct.iter().all(|c| *c == 0) {
        return score(0.0, precisions, correct, total);
    }
    let mut smooth_mteval = 1.0;
    let mut effective_order = order;
    for n in 0..order {
        if let Smoothing::AddK(k) = config.smoothing
            && n > 0
        {
            correct[n] += k;
            total[n] += k;
        }
        if total[n] == 0.0 {
            break;
        }
        if config.effective_order {
            effective_order = n + 1;
        }
        if correct[n] == 0.0 {
            match config.smoothing {
                Smoothing::Exp => {
                    smooth_mteval *= 2.0;
                    precisions[n] = 100.0 / (smooth_mteval * total[n]);
                }
                Smoothing::Floor(value) => precisions[n] = 100.0 * value / total[n],
                Smoothing::None | Smoothing::AddK(_) => {}
            }
        } else {
            precisions[n] = 100.0 * correct[n] / total[n];
        }
    }
    let log_sum: f64 = precisions[..effective_order]
        .iter()
        .map(|p| if *p == 0.0 { LOG_ZERO } else { p.ln() })
        .sum();
    let value = bp * (log_sum / effective_order as f64).exp();
    score(value, precisions, correct, total)
}

/// Corpus BLEU: `references[i]` are the references of `hypotheses[i]` (one or more).
pub fn corpus_bleu(
    hypotheses: &[&str],
    references: &[Vec<&str>],
    config: &BleuConfig,
) -> BleuScore {
    let mut stats = BleuStats::zero(config.max_ngram_order);
    for (hypothesis, refs) in hypotheses.iter().zip(references) {
        stats.add(&segment_stats(hypothesis, refs, config));
    }
    compute_bleu(&stats, config)
}

/// Sentence BLEU as sacrebleu's `sentence_bleu` (effective order on by default: set it in
/// `config`).
pub fn sentence_bleu(hypothesis: &str, references: &[&str], config: &BleuConfig) -> BleuScore {
    compute_bleu(&segment_stats(hypothesis, references, config), config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_sentences_score_100() {
        let config = BleuConfig {
            effective_order: true,
            ..BleuConfig::default()
        };
        let score = sentence_bleu(
            "The cat sat on the mat.",
            &["The cat sat on the mat."],
            &config,
        );
        assert!((score.score - 100.0).abs() < 1e-9);
    }

    #[test]
    fn empty_hypothesis_scores_0_with_zero_brevity_penalty() {
        let score = sentence_bleu("", &["a b c"], &BleuConfig::default());
        assert_eq!(score.score, 0.0);
        assert_eq!(score.bp, 0.0);
    }

    #[test]
    fn closest_reference_length_prefers_the_shorter_on_ties() {
        assert_eq!(closest_ref_len(5, &[7, 3]), 3);
        assert_eq!(closest_ref_len(5, &[6, 4]), 4);
        assert_eq!(closest_ref_len(5, &[9, 6]), 6);
    }

    #[test]
    fn smoothing_names_parse() {
        assert_eq!(
            Smoothing::from_name("floor").expect("floor"),
            Smoothing::Floor(0.1)
        );
        assert_eq!(
            Smoothing::from_name("add-k:2").expect("add-k"),
            Smoothing::AddK(2.0)
        );
        assert!(Smoothing::from_name("laplace").is_err());
    }
}
