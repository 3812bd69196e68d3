//! `oxtune data`: prepare datasets. The logic lives in `oxtune-data`; this file is flags,
//! progress bars and printing.
//!
//! ```text
//! oxtune data scrub --input raw.jsonl --output clean.jsonl [--report report.json] [--config scrub.yaml] [--replace pseudonym]
//! oxtune data check --input train.jsonl [--format alpaca]
//! oxtune data stats --input train.jsonl [--model DIR] [--max_length 8192] [--histogram lengths.png]
//! oxtune data dedup --input train.jsonl --output dedup.jsonl [--threshold 0.85] [--exact_only]
//! oxtune data split --input all.jsonl [--val_ratio 0.1] [--seed 42] [--train train.jsonl --val val.jsonl]
//! ```

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use oxtune_data::check::{CheckOptions, check_file};
use oxtune_data::dedup::{DedupOptions, dedup_file};
use oxtune_data::format::Format;
use oxtune_data::pii::{ReplaceMode, ScrubConfig, ScrubOptions, Scrubber, scrub_file};
use oxtune_data::split::{SplitOptions, split_file};
use oxtune_data::stats::{StatsOptions, dataset_stats};
use oxtune_data::writer::{sibling, write_json_pretty};

#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Find and replace personal data (phones, e-mail, ID and bank card numbers, IPs, plates,
    /// URL tokens, API keys, custom patterns) in every text field; writes a report.
    Scrub(ScrubArgs),
    /// Validate every row against its format; problems are printed as FILE:LINE.
    Check(CheckArgs),
    /// Rows, formats, turns, characters and (with --model) token lengths with a histogram PNG.
    Stats(StatsArgs),
    /// Drop exact and near-duplicate rows (MinHash), keeping the first of each.
    Dedup(DedupArgs),
    /// Split into train and validation files by ratio, reproducibly from a seed.
    Split(SplitArgs),
}

#[derive(Debug, Args)]
pub struct ScrubArgs {
    /// Dataset to scrub (.jsonl, .json or .csv); never modified.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,

    /// Scrubbed dataset to write (written atomically).
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,

    /// Report path: REPORT.json and REPORT.html are written [default: OUTPUT's name + .scrub_report].
    #[arg(long, value_name = "REPORT")]
    pub report: Option<PathBuf>,

    /// YAML config: replace mode, detectors to disable, custom patterns and word lists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// `placeholder` (<PHONE>) or `pseudonym` (<PHONE_1>, the same value gets the same name).
    #[arg(long, value_name = "MODE", value_parser = ["placeholder", "pseudonym"])]
    pub replace: Option<String>,

    /// Records per parallel batch.
    #[arg(long = "batch_size", alias = "batch-size", default_value_t = 4096)]
    pub batch_size: usize,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Dataset to check.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,

    /// The format every row must be in [default: detected from the first row].
    #[arg(long, value_name = "FORMAT", value_parser = ["messages", "sharegpt", "alpaca", "query-response", "preference", "kto"])]
    pub format: Option<String>,

    /// Print at most this many problems (all are counted).
    #[arg(long = "max_problems", alias = "max-problems", default_value_t = 200)]
    pub max_problems: usize,

    /// Also write the result as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Dataset to describe.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,

    /// Model directory (or tokenizer.json) whose tokenizer counts tokens.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,

    /// Count records longer than this many tokens (and mark it on the histogram).
    #[arg(long = "max_length", alias = "max-length", value_name = "TOKENS")]
    pub max_length: Option<u64>,

    /// Token-length histogram PNG [default: INPUT's name + .token_lengths.png, with --model].
    #[arg(long, value_name = "FILE")]
    pub histogram: Option<PathBuf>,

    /// Histogram bins.
    #[arg(long, default_value_t = 40)]
    pub bins: usize,

    /// Also write the statistics as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DedupArgs {
    /// Dataset to deduplicate; never modified.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,

    /// Deduplicated dataset to write.
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,

    /// Estimated Jaccard similarity (character 5-grams) at which rows are near duplicates.
    #[arg(long, default_value_t = 0.85)]
    pub threshold: f64,

    /// MinHash permutations (more: more precise, more memory).
    #[arg(long = "num_perm", alias = "num-perm", default_value_t = 128)]
    pub num_perm: usize,

    /// Only drop exact duplicates.
    #[arg(long = "exact_only", alias = "exact-only")]
    pub exact_only: bool,

    /// Seed of the MinHash permutations.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Also write the counts and examples as JSON.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SplitArgs {
    /// Dataset to split; never modified.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,

    /// Fraction of rows for validation.
    #[arg(
        long = "val_ratio",
        alias = "val-ratio",
        visible_alias = "split_dataset_ratio",
        default_value_t = 0.1
    )]
    pub val_ratio: f64,

    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Training output [default: INPUT's name + .train + extension].
    #[arg(long, value_name = "FILE")]
    pub train: Option<PathBuf>,

    /// Validation output [default: INPUT's name + .val + extension].
    #[arg(long, value_name = "FILE")]
    pub val: Option<PathBuf>,
}

pub fn run(args: &DataArgs) -> anyhow::Result<()> {
    match &args.command {
        DataCommand::Scrub(args) => scrub(args),
        DataCommand::Check(args) => check(args),
        DataCommand::Stats(args) => stats(args),
        DataCommand::Dedup(args) => dedup(args),
        DataCommand::Split(args) => split(args),
    }
}

fn byte_progress(total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, eta {eta})",
    ) {
        bar.set_style(style);
    }
    bar
}

fn input_size(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len())
}

fn scrub(args: &ScrubArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => ScrubConfig::load(path)?,
        None => ScrubConfig::default(),
    };
    let replace = match args.replace.as_deref() {
        Some("pseudonym") => ReplaceMode::Pseudonym,
        Some(_) => ReplaceMode::Placeholder,
        None => config.replace.unwrap_or_default(),
    };
    let scrubber = Scrubber::from_config(&config)?;
    let bar = byte_progress(input_size(&args.input)?);
    let options = ScrubOptions {
        replace,
        batch_records: args.batch_size,
    };
    let report = scrub_file(
        &args.input,
        &args.output,
        &scrubber,
        &options,
        &|done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    );
    bar.finish_and_clear();
    let report = report?;
    let base = match &args.report {
        Some(path) if path.extension().is_some_and(|e| e == "json" || e == "html") => {
            path.with_extension("")
        }
        Some(path) => path.clone(),
        None => sibling(&args.output, ".scrub_report"),
    };
    let with_suffix = |suffix: &str| {
        let mut name = base.as_os_str().to_os_string();
        name.push(suffix);
        PathBuf::from(name)
    };
    let (json, html) = (with_suffix(".json"), with_suffix(".html"));
    report.write_json(&json)?;
    report.write_html(&html)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", report.summary())?;
    writeln!(
        stdout,
        "wrote {}\nreport {} and {}",
        args.output.display(),
        json.display(),
        html.display()
    )?;
    Ok(())
}

fn check(args: &CheckArgs) -> anyhow::Result<()> {
    let options = CheckOptions {
        format: args.format.as_deref().and_then(Format::from_name),
        max_problems: args.max_problems,
    };
    let report = check_file(&args.input, &options)?;
    if let Some(path) = &args.json {
        write_json_pretty(path, &report)?;
    }
    let mut stdout = std::io::stdout().lock();
    for line in report.problem_lines() {
        writeln!(stdout, "{line}")?;
    }
    let shown = report.problems.len() as u64;
    let total = report.errors + report.warnings;
    if total > shown {
        writeln!(
            stdout,
            "… {} more problems not shown (raise --max_problems)",
            total - shown
        )?;
    }
    let formats = report
        .formats
        .iter()
        .map(|(f, n)| format!("{f} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    writeln!(
        stdout,
        "{}: {} records ({}), {} errors, {} warnings",
        args.input.display(),
        report.records,
        if formats.is_empty() {
            "no format"
        } else {
            &formats
        },
        report.errors,
        report.warnings
    )?;
    if !report.is_ok() {
        bail!("{} has {} errors", args.input.display(), report.errors);
    }
    Ok(())
}

fn stats(args: &StatsArgs) -> anyhow::Result<()> {
    let histogram = match (&args.model, &args.histogram) {
        (_, Some(path)) => Some(path.clone()),
        (Some(_), None) => Some(sibling(&args.input, ".token_lengths.png")),
        (None, None) => None,
    };
    if args.model.is_none() && (args.histogram.is_some() || args.max_length.is_some()) {
        bail!(
            "--histogram and --max_length count tokens, which needs a tokenizer\nhint: add --model DIR (a model directory with tokenizer.json)"
        );
    }
    let options = StatsOptions {
        tokenizer: args.model.clone(),
        max_length: args.max_length,
        histogram_png: histogram,
        bins: args.bins,
        batch_records: 1024,
    };
    let stats = dataset_stats(&args.input, &options)?;
    if let Some(path) = &args.json {
        write_json_pretty(path, &stats)?;
    }
    writeln!(std::io::stdout().lock(), "{}", stats.summary())?;
    Ok(())
}

fn dedup(args: &DedupArgs) -> anyhow::Result<()> {
    let options = DedupOptions {
        near: !args.exact_only,
        threshold: args.threshold,
        num_perm: args.num_perm,
        seed: args.seed,
        ..DedupOptions::default()
    };
    let bar = byte_progress(input_size(&args.input)?);
    let report = dedup_file(&args.input, &args.output, &options, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let report = report?;
    if let Some(path) = &args.report {
        write_json_pretty(path, &report)?;
    }
    writeln!(
        std::io::stdout().lock(),
        "{} records in, {} exact duplicates, {} near duplicates (threshold {}, {} bands x {} rows), {} records out -> {}",
        report.records_in,
        report.exact_duplicates,
        report.near_duplicates,
        report.threshold,
        report.bands,
        report.rows_per_band,
        report.records_out,
        args.output.display()
    )?;
    Ok(())
}

fn split(args: &SplitArgs) -> anyhow::Result<()> {
    let extension = args
        .input
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "jsonl".to_owned());
    let train = args
        .train
        .clone()
        .unwrap_or_else(|| sibling(&args.input, &format!(".train.{extension}")));
    let val = args
        .val
        .clone()
        .unwrap_or_else(|| sibling(&args.input, &format!(".val.{extension}")));
    let report = split_file(
        &args.input,
        &train,
        &val,
        &SplitOptions {
            val_ratio: args.val_ratio,
            seed: args.seed,
        },
    )?;
    writeln!(
        std::io::stdout().lock(),
        "{} records: {} train -> {}, {} val -> {} (seed {})",
        report.records,
        report.train_records,
        train.display(),
        report.val_records,
        val.display(),
        report.seed
    )?;
    Ok(())
}
