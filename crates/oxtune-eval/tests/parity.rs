//! Parity with the reference implementations: every BLEU and ROUGE figure of
//! `tests/fixtures/metrics/reference.json` (written by `tools/make_metric_fixtures.py` with
//! pinned sacrebleu 2.6.0, rouge-score 0.1.2, nltk 3.10.4 and jieba 0.42.1) is recomputed here
//! and must agree to 4 decimals. On failure the first mismatches are printed side by side with
//! the largest difference.

#![expect(clippy::print_stderr, reason = "the parity figures go to the test log")]

use std::path::PathBuf;

use oxtune_eval::bleu::{
    BleuConfig, Smoothing, compute_bleu, corpus_bleu, segment_stats, sentence_bleu,
};
use oxtune_eval::bleu_tokenize::BleuTokenizer;
use oxtune_eval::porter;
use oxtune_eval::rouge::{self, RougeScorer, RougeTokenizer, RougeType};
use serde_json::Value;

/// 4 decimals: BLEU on sacrebleu's 0-100 scale, ROUGE on 0-1.
const TOLERANCE: f64 = 5e-5;

struct Pair {
    prediction: String,
    references: Vec<String>,
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/metrics")
}

fn load() -> (Vec<Pair>, Value) {
    let pairs = std::fs::read_to_string(fixtures().join("pairs.jsonl"))
        .expect("tests/fixtures/metrics/pairs.jsonl");
    let pairs = pairs
        .lines()
        .map(|line| {
            let row: Value = serde_json::from_str(line).expect("pair row");
            Pair {
                prediction: row["prediction"].as_str().expect("prediction").to_owned(),
                references: row["references"]
                    .as_array()
                    .expect("references")
                    .iter()
                    .map(|r| r.as_str().expect("reference").to_owned())
                    .collect(),
            }
        })
        .collect();
    let reference = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference.json")).expect("reference.json"),
    )
    .expect("reference JSON");
    (pairs, reference)
}

/// Collects (label, ours, theirs) and fails with the worst ones shown.
#[derive(Default)]
struct Comparison {
    checked: usize,
    max_diff: f64,
    mismatches: Vec<(String, f64, f64)>,
}

impl Comparison {
    fn check(&mut self, label: impl Into<String>, ours: f64, theirs: f64) {
        self.checked += 1;
        let diff = (ours - theirs).abs();
        self.max_diff = self.max_diff.max(diff);
        if diff > TOLERANCE {
            self.mismatches.push((label.into(), ours, theirs));
        }
    }

    fn assert_ok(&self, what: &str) {
        eprintln!(
            "{what}: {} values compared, max |diff| = {:.3e}",
            self.checked, self.max_diff
        );
        if !self.mismatches.is_empty() {
            let first: Vec<String> = self
                .mismatches
                .iter()
                .take(5)
                .map(|(label, ours, theirs)| {
                    format!("  {label}: ours {ours:.6} reference {theirs:.6}")
                })
                .collect();
            panic!(
                "{what}: {} of {} values differ by more than {TOLERANCE} (max {:.3e}); first:\n{}",
                self.mismatches.len(),
                self.checked,
                self.max_diff,
                first.join("\n")
            );
        }
    }
}

fn smoothing(name: &str) -> Smoothing {
    Smoothing::from_name(name).expect("smoothing name")
}

#[test]
fn bleu_equals_sacrebleu() {
    let (pairs, reference) = load();
    assert!(pairs.len() >= 50, "the issue asks for at least 50 pairs");
    let hypotheses: Vec<&str> = pairs.iter().map(|p| p.prediction.as_str()).collect();
    let references: Vec<Vec<&str>> = pairs
        .iter()
        .map(|p| p.references.iter().map(String::as_str).collect())
        .collect();
    let mut corpus = Comparison::default();
    let mut sentence = Comparison::default();
    for (key, entry) in reference["bleu"].as_object().expect("bleu section") {
        let (tokenizer, lowercase) = match key.strip_suffix("-lc") {
            Some(name) => (name, true),
            None => (key.as_str(), false),
        };
        let tokenizer = BleuTokenizer::from_name(tokenizer).expect("tokenizer");
        for (smooth, expected) in entry["corpus"].as_object().expect("corpus") {
            let (smooth, effective_order) = match smooth.strip_suffix("-effective") {
                Some(name) => (name, true),
                None => (smooth.as_str(), false),
            };
            let config = BleuConfig {
                tokenizer,
                smoothing: smoothing(smooth),
                lowercase,
                effective_order,
                ..BleuConfig::default()
            };
            let score = corpus_bleu(&hypotheses, &references, &config);
            let label = format!(
                "corpus {key} {smooth}{}",
                if effective_order { " eff" } else { "" }
            );
            corpus.check(
                format!("{label} score"),
                score.score,
                expected["score"].as_f64().expect("score"),
            );
            corpus.check(
                format!("{label} bp"),
                score.bp,
                expected["bp"].as_f64().expect("bp"),
            );
            corpus.check(
                format!("{label} sys_len"),
                score.sys_len as f64,
                expected["sys_len"].as_f64().expect("sys_len"),
            );
            corpus.check(
                format!("{label} ref_len"),
                score.ref_len as f64,
                expected["ref_len"].as_f64().expect("ref_len"),
            );
            for (order, (ours, theirs)) in score
                .counts
                .iter()
                .zip(expected["counts"].as_array().expect("counts"))
                .enumerate()
            {
                corpus.check(
                    format!("{label} counts[{order}]"),
                    *ours,
                    theirs.as_f64().expect("count"),
                );
            }
        }
        for (smooth, expected) in entry["sentence"].as_object().expect("sentence") {
            let config = BleuConfig {
                tokenizer,
                smoothing: smoothing(smooth),
                lowercase,
                effective_order: true,
                ..BleuConfig::default()
            };
            for (index, (pair, theirs)) in pairs
                .iter()
                .zip(expected.as_array().expect("scores"))
                .enumerate()
            {
                let refs: Vec<&str> = pair.references.iter().map(String::as_str).collect();
                let ours = sentence_bleu(&pair.prediction, &refs, &config).score;
                sentence.check(
                    format!("sentence {key} {smooth} pair {index}"),
                    ours,
                    theirs.as_f64().expect("score"),
                );
            }
        }
    }
    corpus.assert_ok("corpus BLEU");
    sentence.assert_ok("sentence BLEU");
}

#[test]
fn corpus_bleu_is_the_bleu_of_summed_statistics() {
    let (pairs, _) = load();
    let config = BleuConfig::default();
    let stats: Vec<_> = pairs
        .iter()
        .map(|p| {
            segment_stats(
                &p.prediction,
                &p.references.iter().map(String::as_str).collect::<Vec<_>>(),
                &config,
            )
        })
        .collect();
    let mut summed = stats[0].clone();
    for s in &stats[1..] {
        summed.sys_len += s.sys_len;
        summed.ref_len += s.ref_len;
        for n in 0..4 {
            summed.correct[n] += s.correct[n];
            summed.total[n] += s.total[n];
        }
    }
    let hypotheses: Vec<&str> = pairs.iter().map(|p| p.prediction.as_str()).collect();
    let references: Vec<Vec<&str>> = pairs
        .iter()
        .map(|p| p.references.iter().map(String::as_str).collect())
        .collect();
    assert_eq!(
        compute_bleu(&summed, &config),
        corpus_bleu(&hypotheses, &references, &config)
    );
}

#[test]
fn rouge_equals_rouge_score() {
    let (pairs, reference) = load();
    let types = vec![
        RougeType::N(1),
        RougeType::N(2),
        RougeType::L,
        RougeType::Lsum,
    ];
    for (name, tokenizer) in [
        ("default", RougeTokenizer::Default { stem: false }),
        ("default-stem", RougeTokenizer::Default { stem: true }),
        ("jieba", RougeTokenizer::Jieba),
    ] {
        let scorer = RougeScorer::new(types.clone(), tokenizer);
        let expected = &reference["rouge"][name];
        let mut comparison = Comparison::default();
        let mut sums = vec![[0.0_f64; 3]; types.len()];
        for (index, (pair, theirs)) in pairs
            .iter()
            .zip(expected["pairs"].as_array().expect("pairs"))
            .enumerate()
        {
            let refs: Vec<&str> = pair.references.iter().map(String::as_str).collect();
            for (slot, (rouge_type, prf)) in scorer
                .score_multi(&refs, &pair.prediction)
                .into_iter()
                .enumerate()
            {
                let values = &theirs[rouge_type.name()];
                for (component, (ours, label)) in
                    [(prf.precision, "p"), (prf.recall, "r"), (prf.fmeasure, "f")]
                        .into_iter()
                        .enumerate()
                {
                    comparison.check(
                        format!("{name} pair {index} {} {label}", rouge_type.name()),
                        ours,
                        values[component].as_f64().expect("value"),
                    );
                    sums[slot][component] += ours;
                }
            }
        }
        for (slot, rouge_type) in types.iter().enumerate() {
            for component in 0..3 {
                let mean = sums[slot][component] / pairs.len() as f64;
                comparison.check(
                    format!("{name} mean {} [{component}]", rouge_type.name()),
                    mean,
                    expected["mean"][rouge_type.name()][component]
                        .as_f64()
                        .expect("mean"),
                );
            }
        }
        comparison.assert_ok(&format!("ROUGE ({name})"));
    }
}

#[test]
fn porter_stems_equal_nltk() {
    let (_, reference) = load();
    let mismatches: Vec<String> = reference["porter"]
        .as_object()
        .expect("porter section")
        .iter()
        .filter_map(|(word, expected)| {
            let ours = porter::stem(word);
            (ours != expected.as_str().expect("stem"))
                .then(|| format!("{word}: ours {ours}, nltk {expected}"))
        })
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} stems differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[test]
fn jieba_segmentation_equals_python_jieba() {
    let (_, reference) = load();
    let mismatches: Vec<String> = reference["jieba"]
        .as_object()
        .expect("jieba section")
        .iter()
        .filter_map(|(text, expected)| {
            let ours = rouge::segment(text);
            let theirs: Vec<&str> = expected
                .as_array()
                .expect("segments")
                .iter()
                .map(|s| s.as_str().expect("segment"))
                .collect();
            (ours != theirs).then(|| format!("{text:?}:\n  ours   {ours:?}\n  python {theirs:?}"))
        })
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} segmentations differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}
