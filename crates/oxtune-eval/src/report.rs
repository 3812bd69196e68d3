//! File-mode evaluation: corpus and per-sample scores, written as JSON and as a
//! self-contained HTML page (summary, score histograms, the lowest-scoring samples for human
//! review, and every sample).

use std::collections::BTreeMap;
use std::path::Path;

use oxtune_data::html;
use oxtune_data::writer::{write_file, write_json_pretty};
use rayon::prelude::*;
use serde::Serialize;

use crate::bleu::{BleuConfig, BleuScore, corpus_bleu, sentence_bleu};
use crate::bleu_tokenize::{BleuTokenizer, has_han};
use crate::error::{Error, Result};
use crate::input::Sample;
use crate::rouge::{Prf, RougeScorer, RougeTokenizer, RougeType};

/// A metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Bleu,
    Rouge,
}

impl Metric {
    pub const NAMES: &'static str = "bleu, rouge";

    /// Parses a comma-separated list such as `bleu,rouge`.
    pub fn parse_list(list: &str) -> Result<Vec<Self>> {
        let mut metrics = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let metric = match name.to_ascii_lowercase().as_str() {
                "bleu" => Self::Bleu,
                "rouge" => Self::Rouge,
                _ => {
                    return Err(Error::UnknownMetric {
                        name: name.to_owned(),
                        available: Self::NAMES.to_owned(),
                    });
                }
            };
            if !metrics.contains(&metric) {
                metrics.push(metric);
            }
        }
        if metrics.is_empty() {
            return Err(Error::UnknownMetric {
                name: list.to_owned(),
                available: Self::NAMES.to_owned(),
            });
        }
        Ok(metrics)
    }
}

/// What to compute. `None` tokenizers mean auto: `zh` / `jieba` when any text holds Chinese,
/// else `13a` / `default`.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub metrics: Vec<Metric>,
    pub bleu: BleuConfig,
    pub bleu_tokenizer: Option<BleuTokenizer>,
    pub rouge_tokenizer: Option<RougeTokenizer>,
    pub rouge_stem: bool,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            metrics: vec![Metric::Bleu, Metric::Rouge],
            bleu: BleuConfig::default(),
            bleu_tokenizer: None,
            rouge_tokenizer: None,
            rouge_stem: false,
        }
    }
}

/// Corpus BLEU as reported.
#[derive(Debug, Clone, Serialize)]
pub struct BleuResult {
    pub score: f64,
    /// sacrebleu's signature of the settings.
    pub signature: String,
    pub precisions: Vec<f64>,
    pub bp: f64,
    pub ratio: f64,
    pub sys_len: u64,
    pub ref_len: u64,
}

/// Corpus ROUGE: the mean of per-sample precision, recall and F1 (rouge-score has no corpus
/// form other than its bootstrap aggregate, whose mid point approximates this mean).
#[derive(Debug, Clone, Serialize)]
pub struct RougeResult {
    pub tokenizer: &'static str,
    pub scores: BTreeMap<String, Prf>,
}

/// One sample's scores.
#[derive(Debug, Clone, Serialize)]
pub struct SampleScores {
    pub index: usize,
    pub id: Option<String>,
    pub line: u64,
    pub prediction: String,
    pub references: Vec<String>,
    /// Sentence BLEU (exp smoothing, effective order), 0-100.
    pub bleu: Option<f64>,
    /// ROUGE F1 per type, 0-1.
    pub rouge: BTreeMap<String, f64>,
}

/// The result of `oxtune eval` in file mode.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub predictions: String,
    pub references: String,
    pub samples: usize,
    pub bleu: Option<BleuResult>,
    pub rouge: Option<RougeResult>,
    pub per_sample: Vec<SampleScores>,
}

/// A sample's sentence BLEU and ROUGE scores.
type Scored = (Option<f64>, Vec<(RougeType, Prf)>);

const ROUGE_TYPES: [RougeType; 4] = [
    RougeType::N(1),
    RougeType::N(2),
    RougeType::L,
    RougeType::Lsum,
];

/// Scores every sample and the corpus.
pub fn evaluate(
    samples: &[Sample],
    config: &EvalConfig,
    predictions: &str,
    references: &str,
) -> EvalReport {
    let chinese = samples
        .iter()
        .any(|s| has_han(&s.prediction) || s.references.iter().any(|r| has_han(r)));
    let bleu_config = BleuConfig {
        tokenizer: config.bleu_tokenizer.unwrap_or(if chinese {
            BleuTokenizer::Zh
        } else {
            BleuTokenizer::V13a
        }),
        ..config.bleu
    };
    let sentence_config = BleuConfig {
        effective_order: true,
        ..bleu_config
    };
    let rouge_tokenizer = config.rouge_tokenizer.unwrap_or(if chinese {
        RougeTokenizer::Jieba
    } else {
        RougeTokenizer::Default {
            stem: config.rouge_stem,
        }
    });
    let scorer = RougeScorer::new(ROUGE_TYPES.to_vec(), rouge_tokenizer);
    let want_bleu = config.metrics.contains(&Metric::Bleu);
    let want_rouge = config.metrics.contains(&Metric::Rouge);

    let scored: Vec<Scored> = samples
        .par_iter()
        .map(|sample| {
            let references: Vec<&str> = sample.references.iter().map(String::as_str).collect();
            let bleu = want_bleu
                .then(|| sentence_bleu(&sample.prediction, &references, &sentence_config).score);
            let rouge = if want_rouge {
                scorer.score_multi(&references, &sample.prediction)
            } else {
                Vec::new()
            };
            (bleu, rouge)
        })
        .collect();

    let bleu = want_bleu.then(|| {
        let hypotheses: Vec<&str> = samples.iter().map(|s| s.prediction.as_str()).collect();
        let references: Vec<Vec<&str>> = samples
            .iter()
            .map(|s| s.references.iter().map(String::as_str).collect())
            .collect();
        let score: BleuScore = corpus_bleu(&hypotheses, &references, &bleu_config);
        let counts: Vec<usize> = samples.iter().map(|s| s.references.len()).collect();
        let num_refs = counts.iter().all(|c| *c == counts[0]).then(|| counts[0]);
        BleuResult {
            score: score.score,
            signature: bleu_config.signature(num_refs),
            ratio: if score.ref_len > 0 {
                score.sys_len as f64 / score.ref_len as f64
            } else {
                0.0
            },
            precisions: score.precisions,
            bp: score.bp,
            sys_len: score.sys_len,
            ref_len: score.ref_len,
        }
    });

    let rouge = want_rouge.then(|| {
        let mut scores = BTreeMap::new();
        for (slot, rouge_type) in ROUGE_TYPES.iter().enumerate() {
            let count = scored.len().max(1) as f64;
            let sum = scored.iter().fold((0.0, 0.0, 0.0), |acc, (_, rouge)| {
                (
                    acc.0 + rouge[slot].1.precision,
                    acc.1 + rouge[slot].1.recall,
                    acc.2 + rouge[slot].1.fmeasure,
                )
            });
            scores.insert(
                rouge_type.name(),
                Prf {
                    precision: sum.0 / count,
                    recall: sum.1 / count,
                    fmeasure: sum.2 / count,
                },
            );
        }
        RougeResult {
            tokenizer: rouge_tokenizer.name(),
            scores,
        }
    });

    let per_sample = samples
        .iter()
        .zip(scored)
        .enumerate()
        .map(|(index, (sample, (bleu, rouge)))| SampleScores {
            index,
            id: sample.id.clone(),
            line: sample.line,
            prediction: sample.prediction.clone(),
            references: sample.references.clone(),
            bleu,
            rouge: rouge
                .into_iter()
                .map(|(t, prf)| (t.name(), prf.fmeasure))
                .collect(),
        })
        .collect();
    EvalReport {
        predictions: predictions.to_owned(),
        references: references.to_owned(),
        samples: samples.len(),
        bleu,
        rouge,
        per_sample,
    }
}

/// Histogram of per-sample values in [0, high] over 20 bins.
fn histogram(values: &[f64], high: f64) -> Vec<u64> {
    let mut counts = vec![0; 20];
    for value in values {
        let bin = ((value / high) * 20.0).floor().clamp(0.0, 19.0) as usize;
        counts[bin] += 1;
    }
    counts
}

fn truncate(text: &str, chars: usize) -> String {
    let mut out: String = text.chars().take(chars).collect();
    if text.chars().count() > chars {
        out.push('…');
    }
    out
}

impl EvalReport {
    pub fn write_json(&self, path: &Path) -> Result<()> {
        Ok(write_json_pretty(path, self)?)
    }

    pub fn write_html(&self, path: &Path) -> Result<()> {
        Ok(write_file(path, self.to_html().as_bytes())?)
    }

    /// A few lines for the terminal.
    pub fn summary(&self) -> String {
        let mut out = format!("{} samples", self.samples);
        if let Some(bleu) = &self.bleu {
            out.push_str(&format!(
                "\nBLEU = {:.2}  {}  (BP = {:.3}, ratio = {:.3}, hyp_len = {}, ref_len = {})",
                bleu.score, bleu.signature, bleu.bp, bleu.ratio, bleu.sys_len, bleu.ref_len
            ));
        }
        if let Some(rouge) = &self.rouge {
            for (name, prf) in &rouge.scores {
                out.push_str(&format!(
                    "\n{name:<10} P {:.4}  R {:.4}  F1 {:.4}   (tokenizer: {})",
                    prf.precision, prf.recall, prf.fmeasure, rouge.tokenizer
                ));
            }
        }
        out
    }

    /// The HTML page.
    pub fn to_html(&self) -> String {
        let mut body = format!(
            "<p class=\"muted\">predictions: {} · references: {}</p><div class=\"cards\">",
            html::escape(&self.predictions),
            html::escape(&self.references)
        );
        body.push_str(&html::card(&self.samples.to_string(), "samples"));
        if let Some(bleu) = &self.bleu {
            body.push_str(&html::card(&format!("{:.2}", bleu.score), "corpus BLEU"));
        }
        if let Some(rouge) = &self.rouge {
            for name in ["rouge1", "rougeL"] {
                if let Some(prf) = rouge.scores.get(name) {
                    body.push_str(&html::card(
                        &format!("{:.4}", prf.fmeasure),
                        &format!("{name} F1"),
                    ));
                }
            }
        }
        body.push_str("</div>");

        if let Some(bleu) = &self.bleu {
            body.push_str("<h2>BLEU</h2>");
            let precisions = bleu
                .precisions
                .iter()
                .map(|p| format!("{p:.1}"))
                .collect::<Vec<_>>()
                .join(" / ");
            body.push_str(&html::table(
                &[
                    "score",
                    "n-gram precisions",
                    "BP",
                    "ratio",
                    "hyp_len",
                    "ref_len",
                    "signature",
                ],
                &[vec![
                    format!("{:.2}", bleu.score),
                    precisions,
                    format!("{:.3}", bleu.bp),
                    format!("{:.3}", bleu.ratio),
                    bleu.sys_len.to_string(),
                    bleu.ref_len.to_string(),
                    format!("<code>{}</code>", html::escape(&bleu.signature)),
                ]],
            ));
            let values: Vec<f64> = self.per_sample.iter().filter_map(|s| s.bleu).collect();
            body.push_str(
                "<p class=\"muted\">Sentence BLEU per sample (exp smoothing, effective order):</p>",
            );
            body.push_str(&html::histogram_svg(
                &histogram(&values, 100.0),
                0.0,
                100.0,
                "sentence BLEU",
            ));
        }
        if let Some(rouge) = &self.rouge {
            body.push_str(&format!("<h2>ROUGE</h2><p class=\"muted\">Mean over samples; tokenizer: <code>{}</code>.</p>", html::escape(rouge.tokenizer)));
            let rows: Vec<Vec<String>> = rouge
                .scores
                .iter()
                .map(|(name, prf)| {
                    vec![
                        name.clone(),
                        format!("{:.4}", prf.precision),
                        format!("{:.4}", prf.recall),
                        format!("{:.4}", prf.fmeasure),
                    ]
                })
                .collect();
            body.push_str(&html::table(&["type", "precision", "recall", "F1"], &rows));
            let values: Vec<f64> = self
                .per_sample
                .iter()
                .filter_map(|s| s.rouge.get("rougeL").copied())
                .collect();
            body.push_str("<p class=\"muted\">ROUGE-L F1 per sample:</p>");
            body.push_str(&html::histogram_svg(
                &histogram(&values, 1.0),
                0.0,
                1.0,
                "ROUGE-L F1",
            ));
        }

        let key = |s: &SampleScores| {
            s.rouge
                .get("rougeL")
                .copied()
                .or(s.bleu.map(|b| b / 100.0))
                .unwrap_or(0.0)
        };
        let mut lowest: Vec<&SampleScores> = self.per_sample.iter().collect();
        lowest.sort_by(|a, b| key(a).total_cmp(&key(b)).then(a.index.cmp(&b.index)));
        body.push_str("<h2>For human review: the 10 lowest-scoring samples</h2>");
        body.push_str(&self.samples_table(&lowest[..lowest.len().min(10)], usize::MAX));
        body.push_str("<h2>All samples</h2>");
        let all: Vec<&SampleScores> = self.per_sample.iter().collect();
        body.push_str(&self.samples_table(&all, 300));
        html::page("oxtune eval report", &body)
    }

    fn samples_table(&self, samples: &[&SampleScores], max_chars: usize) -> String {
        let mut headers = vec!["#", "line"];
        if self.bleu.is_some() {
            headers.push("BLEU");
        }
        if self.rouge.is_some() {
            headers.extend(["ROUGE-1", "ROUGE-2", "ROUGE-L"]);
        }
        headers.extend(["prediction", "reference(s)"]);
        let rows: Vec<Vec<String>> = samples
            .iter()
            .map(|s| {
                let mut row = vec![
                    s.id.clone().unwrap_or_else(|| s.index.to_string()),
                    s.line.to_string(),
                ];
                if let Some(bleu) = s.bleu {
                    row.push(format!("{bleu:.2}"));
                }
                if self.rouge.is_some() {
                    for name in ["rouge1", "rouge2", "rougeL"] {
                        row.push(
                            s.rouge
                                .get(name)
                                .map_or(String::new(), |f| format!("{f:.4}")),
                        );
                    }
                }
                row.push(format!(
                    "<pre>{}</pre>",
                    html::escape(&truncate(&s.prediction, max_chars))
                ));
                row.push(
                    s.references
                        .iter()
                        .map(|r| format!("<pre>{}</pre>", html::escape(&truncate(r, max_chars))))
                        .collect::<Vec<_>>()
                        .join("<hr>"),
                );
                row
            })
            .collect();
        html::table(&headers, &rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(prediction: &str, reference: &str) -> Sample {
        Sample {
            id: None,
            line: 1,
            prediction: prediction.to_owned(),
            references: vec![reference.to_owned()],
        }
    }

    #[test]
    fn unknown_metrics_are_named_with_the_list() {
        let error = Metric::parse_list("bleu,meteor")
            .expect_err("meteor")
            .to_string();
        assert!(
            error.contains("unknown metric `meteor`") && error.contains("bleu, rouge"),
            "{error}"
        );
        assert_eq!(
            Metric::parse_list(" rouge , bleu,rouge").expect("list"),
            vec![Metric::Rouge, Metric::Bleu]
        );
    }

    #[test]
    fn chinese_text_picks_the_chinese_tokenizers() {
        let report = evaluate(
            &[sample("支持手机号登录", "支持手机号验证码登录")],
            &EvalConfig::default(),
            "p",
            "r",
        );
        assert!(
            report
                .bleu
                .as_ref()
                .expect("bleu")
                .signature
                .contains("tok:zh")
        );
        assert_eq!(report.rouge.as_ref().expect("rouge").tokenizer, "jieba");
        let report = evaluate(
            &[sample("the cat", "the cat")],
            &EvalConfig::default(),
            "p",
            "r",
        );
        assert!(
            report
                .bleu
                .as_ref()
                .expect("bleu")
                .signature
                .contains("tok:13a")
        );
    }

    #[test]
    fn html_report_is_self_contained_and_escaped() {
        let report = evaluate(
            &[sample("<b>x</b>", "x"), sample("y", "y")],
            &EvalConfig::default(),
            "p.jsonl",
            "r.jsonl",
        );
        let page = report.to_html();
        assert!(page.contains("&lt;b&gt;x&lt;/b&gt;") && !page.contains("<b>x</b>"));
        assert!(page.contains("<svg") && !page.contains("<script") && !page.contains("<link"));
    }
}
