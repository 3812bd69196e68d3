//! `oxtune data stats`: records, formats, turns and characters, and (given a tokenizer)
//! token lengths with a histogram PNG.
//!
//! Token lengths count the record's turns joined by newlines, encoded without special tokens
//! and without the chat template (which adds a few tokens per turn).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::{Format, conversation, count_exchanges};
use crate::reader::RecordReader;

/// How to count.
#[derive(Debug, Clone, Default)]
pub struct StatsOptions {
    /// A Hugging Face `tokenizer.json` for token lengths.
    pub tokenizer: Option<PathBuf>,
    /// Report how many records are longer than this many tokens.
    pub max_length: Option<u64>,
    /// Where to draw the token-length histogram.
    pub histogram_png: Option<PathBuf>,
    /// Histogram bins.
    pub bins: usize,
    pub batch_records: usize,
}

/// Distribution of one per-record quantity.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Summary {
    pub total: u64,
    pub mean: f64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

impl Summary {
    /// Summarizes `values` (sorted in place).
    pub fn of(values: &mut [u64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_unstable();
        let total: u64 = values.iter().sum();
        // Nearest-rank percentiles.
        let rank =
            |p: f64| values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
        Self {
            total,
            mean: total as f64 / values.len() as f64,
            min: values[0],
            p50: rank(0.5),
            p90: rank(0.9),
            p99: rank(0.99),
            max: values[values.len() - 1],
        }
    }
}

/// Equal-width bins over [low, high).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Histogram {
    pub low: u64,
    pub bin_width: u64,
    pub counts: Vec<u64>,
}

impl Histogram {
    /// Bins `sorted` values into about `bins` bins of a round width.
    pub fn of(sorted: &[u64], bins: usize) -> Self {
        let (Some(&min), Some(&max)) = (sorted.first(), sorted.last()) else {
            return Self::default();
        };
        let bins = bins.max(1) as u64;
        let raw_width = ((max - min) / bins).max(1);
        let magnitude = 10_u64.pow(raw_width.ilog10());
        let bin_width = [1, 2, 5, 10]
            .iter()
            .map(|m| m * magnitude)
            .find(|w| *w >= raw_width)
            .unwrap_or(raw_width);
        let low = min / bin_width * bin_width;
        let count = ((max - low) / bin_width + 1) as usize;
        let mut counts = vec![0; count];
        for value in sorted {
            counts[((value - low) / bin_width) as usize] += 1;
        }
        Self {
            low,
            bin_width,
            counts,
        }
    }
}

/// Token-length statistics.
#[derive(Debug, Clone, Serialize)]
pub struct TokenStats {
    pub tokenizer: String,
    pub per_record: Summary,
    pub max_length: Option<u64>,
    pub over_max_length: Option<u64>,
    pub histogram: Histogram,
    pub histogram_png: Option<String>,
}

/// The statistics of one file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DatasetStats {
    pub path: String,
    pub records: u64,
    /// Records per format (`unknown` for rows no format fits).
    pub formats: BTreeMap<String, u64>,
    /// User→assistant exchanges per record.
    pub exchanges: Summary,
    /// Turns per role, over the whole file.
    pub turns_by_role: BTreeMap<String, u64>,
    /// Characters per record (all turns).
    pub characters: Summary,
    /// Characters per role, over the whole file.
    pub characters_by_role: BTreeMap<String, u64>,
    pub tokens: Option<TokenStats>,
}

impl DatasetStats {
    /// A readable table for the terminal.
    pub fn summary(&self) -> String {
        let mut out = format!("{}: {} records", self.path, self.records);
        for (format, count) in &self.formats {
            out.push_str(&format!("\n  format {format:<16} {count:>8}"));
        }
        let line = |name: &str, s: &Summary| {
            format!(
                "\n  {name:<22} total {:>10}  mean {:>9.1}  p50 {:>7}  p90 {:>7}  p99 {:>7}  max {:>7}",
                s.total, s.mean, s.p50, s.p90, s.p99, s.max
            )
        };
        out.push_str(&line("exchanges / record", &self.exchanges));
        out.push_str(&line("characters / record", &self.characters));
        for (role, count) in &self.turns_by_role {
            out.push_str(&format!(
                "\n  {role:<10} turns {count:>10}  characters {:>12}",
                self.characters_by_role.get(role).copied().unwrap_or(0)
            ));
        }
        if let Some(tokens) = &self.tokens {
            out.push_str(&line("tokens / record", &tokens.per_record));
            if let (Some(max_length), Some(over)) = (tokens.max_length, tokens.over_max_length) {
                out.push_str(&format!(
                    "\n  {over} records are longer than max_length {max_length} tokens"
                ));
            }
            if let Some(png) = &tokens.histogram_png {
                out.push_str(&format!("\n  histogram: {png}"));
            }
        }
        out
    }
}

/// The tokenizer of a model directory (`DIR/tokenizer.json`) or a tokenizer file.
pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    if !file.exists() {
        return Err(Error::Tokenizer {
            path: file,
            message: "no such file".to_owned(),
        });
    }
    tokenizers::Tokenizer::from_file(&file).map_err(|e| Error::Tokenizer {
        path: file,
        message: e.to_string(),
    })
}

/// Per-record figures, computed in parallel.
struct RecordFigures {
    format: Option<Format>,
    exchanges: u64,
    characters: u64,
    turns: Vec<(&'static str, u64)>,
    tokens: Option<u64>,
}

/// Counts everything about `path`.
pub fn dataset_stats(path: &Path, options: &StatsOptions) -> Result<DatasetStats> {
    let tokenizer = options
        .tokenizer
        .as_deref()
        .map(load_tokenizer)
        .transpose()?;
    let mut reader = RecordReader::open(path)?;
    let headers: Vec<String> = reader.headers().map(<[String]>::to_vec).unwrap_or_default();
    let mut stats = DatasetStats {
        path: path.display().to_string(),
        ..DatasetStats::default()
    };
    let (mut exchanges, mut characters, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        let batch = reader.next_batch(options.batch_records.max(1))?;
        if batch.is_empty() {
            break;
        }
        let figures: Vec<Result<RecordFigures>> = batch
            .par_iter()
            .map(|record| {
                let row = crate::reader::parse_record(path, &headers, record)?;
                let format = Format::detect(&row.value);
                let turns = format
                    .map(|format| conversation(format, &row.value))
                    .unwrap_or_default();
                let text = turns
                    .iter()
                    .map(|t| t.text.as_ref())
                    .collect::<Vec<_>>()
                    .join("\n");
                let tokens = match &tokenizer {
                    Some(tokenizer) => Some(
                        tokenizer
                            .encode(text.as_str(), false)
                            .map_err(|e| {
                                Error::row(
                                    path,
                                    record.line,
                                    format!("cannot tokenize: {e}"),
                                    "the text may hold invalid characters",
                                )
                            })?
                            .len() as u64,
                    ),
                    None => None,
                };
                Ok(RecordFigures {
                    format,
                    exchanges: count_exchanges(&turns) as u64,
                    characters: turns.iter().map(|t| t.text.chars().count() as u64).sum(),
                    turns: turns
                        .iter()
                        .map(|t| (t.role.name(), t.text.chars().count() as u64))
                        .collect(),
                    tokens,
                })
            })
            .collect();
        for figures in figures {
            let figures = figures?;
            stats.records += 1;
            *stats
                .formats
                .entry(figures.format.map_or("unknown", Format::name).to_owned())
                .or_default() += 1;
            exchanges.push(figures.exchanges);
            characters.push(figures.characters);
            for (role, count) in figures.turns {
                *stats.turns_by_role.entry(role.to_owned()).or_default() += 1;
                *stats.characters_by_role.entry(role.to_owned()).or_default() += count;
            }
            tokens.extend(figures.tokens);
        }
    }
    stats.exchanges = Summary::of(&mut exchanges);
    stats.characters = Summary::of(&mut characters);
    if let Some(tokenizer_path) = &options.tokenizer {
        let per_record = Summary::of(&mut tokens);
        let histogram = Histogram::of(&tokens, if options.bins == 0 { 40 } else { options.bins });
        if let Some(png) = &options.histogram_png {
            let title = format!("Token length per record ({} records)", tokens.len());
            draw_histogram(png, &title, &histogram, options.max_length)?;
        }
        stats.tokens = Some(TokenStats {
            tokenizer: tokenizer_path.display().to_string(),
            over_max_length: options
                .max_length
                .map(|max| tokens.iter().filter(|t| **t > max).count() as u64),
            max_length: options.max_length,
            per_record,
            histogram,
            histogram_png: options
                .histogram_png
                .as_ref()
                .map(|p| p.display().to_string()),
        });
    }
    Ok(stats)
}

static FONT: OnceLock<bool> = OnceLock::new();

/// Registers the bundled ASCII font (DejaVu Sans subset) with plotters once, as
/// `sans-serif`; every PNG plot of oxtune draws its text with it. False if it failed to load.
pub fn ensure_font() -> bool {
    *FONT.get_or_init(|| {
        plotters::style::register_font(
            "sans-serif",
            plotters::style::FontStyle::Normal,
            include_bytes!("../assets/DejaVuSans-ascii.ttf"),
        )
        .is_ok()
    })
}

/// Draws a histogram as a PNG (labels in ASCII).
pub fn draw_histogram(
    path: &Path,
    title: &str,
    histogram: &Histogram,
    marker: Option<u64>,
) -> Result<()> {
    use plotters::prelude::*;
    let plot_error = |e: &dyn std::fmt::Display| Error::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    if !ensure_font() {
        return Err(plot_error(&"the bundled font did not load"));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::write(parent, e))?;
    }
    let high = histogram.low + histogram.bin_width * histogram.counts.len() as u64;
    let top = histogram.counts.iter().copied().max().unwrap_or(0).max(1);
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(
            histogram.low..high.max(histogram.low + 1),
            0_u64..top + top / 10 + 1,
        )
        .map_err(|e| plot_error(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("tokens per record")
        .y_desc("records")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| plot_error(&e))?;
    let bars = histogram.counts.iter().enumerate().map(|(index, count)| {
        let x0 = histogram.low + histogram.bin_width * index as u64;
        Rectangle::new(
            [(x0, 0), (x0 + histogram.bin_width, *count)],
            RGBColor(9, 105, 218).filled(),
        )
    });
    chart.draw_series(bars).map_err(|e| plot_error(&e))?;
    if let Some(marker) = marker.filter(|m| (histogram.low..high).contains(m)) {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(marker, 0), (marker, top)],
                RED.stroke_width(2),
            )))
            .map_err(|e| plot_error(&e))?;
    }
    root.present().map_err(|e| plot_error(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_uses_nearest_rank_percentiles() {
        let mut values: Vec<u64> = (1..=100).rev().collect();
        let summary = Summary::of(&mut values);
        assert_eq!(
            (
                summary.min,
                summary.p50,
                summary.p90,
                summary.p99,
                summary.max
            ),
            (1, 50, 90, 99, 100)
        );
        assert!((summary.mean - 50.5).abs() < 1e-12);
    }

    #[test]
    fn histogram_bins_have_round_widths_and_count_everything() {
        let values: Vec<u64> = vec![3, 17, 18, 250, 999];
        let histogram = Histogram::of(&values, 10);
        assert_eq!(histogram.bin_width, 100);
        assert_eq!(histogram.counts.iter().sum::<u64>(), 5);
        assert_eq!(histogram.counts[0], 3);
    }

    #[test]
    fn counts_records_turns_and_characters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "{\"instruction\": \"写PRD\", \"input\": \"\", \"output\": \"好的\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"ab\"}, {\"role\": \"assistant\", \"content\": \"cde\"}, {\"role\": \"user\", \"content\": \"f\"}, {\"role\": \"assistant\", \"content\": \"g\"}]}\n").expect("write");
        let stats = dataset_stats(
            &path,
            &StatsOptions {
                batch_records: 1,
                ..StatsOptions::default()
            },
        )
        .expect("stats");
        assert_eq!(stats.records, 2);
        assert_eq!(stats.formats["alpaca"], 1);
        assert_eq!(stats.exchanges.total, 3);
        assert_eq!(stats.characters.total, 6 + 7);
        assert_eq!(stats.turns_by_role["assistant"], 3);
    }

    #[test]
    fn draws_a_png() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("h.png");
        draw_histogram(
            &path,
            "Token length",
            &Histogram::of(&[1, 5, 9, 40, 41, 42], 8),
            Some(30),
        )
        .expect("draw");
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    }
}
