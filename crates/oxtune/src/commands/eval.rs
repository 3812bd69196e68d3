//! `oxtune eval` in file mode: score predictions against references with BLEU (equal to
//! sacrebleu) and ROUGE (equal to rouge-score); writes a JSON result and an HTML report.
//!
//! ```text
//! oxtune eval --metrics bleu,rouge --predictions preds.jsonl --references refs.jsonl \
//!     [--result result.json] [--report report.html] [--bleu_tokenize zh] [--rouge_tokenizer jieba]
//! ```

use std::io::Write as _;
use std::path::PathBuf;

use clap::Args;
use oxtune_data::writer::sibling;
use oxtune_eval::bleu::{BleuConfig, Smoothing};
use oxtune_eval::bleu_tokenize::BleuTokenizer;
use oxtune_eval::rouge::RougeTokenizer;
use oxtune_eval::{EvalConfig, Fields, Metric, evaluate, read_samples};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Comma-separated metrics: bleu, rouge.
    #[arg(long, default_value = "bleu,rouge")]
    pub metrics: String,

    /// Predictions: .jsonl/.json/.csv rows (field `prediction`, `response`, …) or .txt lines.
    #[arg(long, value_name = "FILE")]
    pub predictions: PathBuf,

    /// References, matched row by row [default: the `references`/`labels`/… field of the
    /// predictions' rows].
    #[arg(long, value_name = "FILE")]
    pub references: Option<PathBuf>,

    /// The predictions' text field [default: the first of prediction, response, predict, output, text, content].
    #[arg(
        long = "prediction_field",
        alias = "prediction-field",
        value_name = "NAME"
    )]
    pub prediction_field: Option<String>,

    /// The references' text field [default: the first of references, reference, labels, label, target, answer, output, response, text].
    #[arg(
        long = "reference_field",
        alias = "reference-field",
        value_name = "NAME"
    )]
    pub reference_field: Option<String>,

    /// BLEU tokenizer: auto (zh if any text is Chinese, else 13a), 13a, zh, intl, char, none.
    #[arg(
        long = "bleu_tokenize",
        alias = "bleu-tokenize",
        default_value = "auto"
    )]
    pub bleu_tokenize: String,

    /// BLEU smoothing: exp, floor[:value], add-k[:value], none.
    #[arg(long, default_value = "exp")]
    pub smooth: String,

    /// Lowercase before BLEU.
    #[arg(long)]
    pub lowercase: bool,

    /// ROUGE tokenizer: auto (jieba if any text is Chinese, else default), default, jieba.
    #[arg(
        long = "rouge_tokenizer",
        alias = "rouge-tokenizer",
        default_value = "auto"
    )]
    pub rouge_tokenizer: String,

    /// Porter-stem English tokens for ROUGE (default tokenizer).
    #[arg(long = "use_stemmer", alias = "use-stemmer")]
    pub use_stemmer: bool,

    /// JSON result [default: PREDICTIONS' name + .eval.json].
    #[arg(long, value_name = "FILE")]
    pub result: Option<PathBuf>,

    /// HTML report [default: PREDICTIONS' name + .eval.html].
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
}

pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    let metrics = Metric::parse_list(&args.metrics)?;
    let bleu_tokenizer = match args.bleu_tokenize.as_str() {
        "auto" => None,
        name => Some(BleuTokenizer::from_name(name)?),
    };
    let rouge_tokenizer = match args.rouge_tokenizer.as_str() {
        "auto" => None,
        name => Some(RougeTokenizer::from_name(name, args.use_stemmer)?),
    };
    let config = EvalConfig {
        metrics,
        bleu: BleuConfig {
            smoothing: Smoothing::from_name(&args.smooth)?,
            lowercase: args.lowercase,
            ..BleuConfig::default()
        },
        bleu_tokenizer,
        rouge_tokenizer,
        rouge_stem: args.use_stemmer,
    };
    let fields = Fields {
        prediction: args.prediction_field.clone(),
        reference: args.reference_field.clone(),
    };
    let samples = read_samples(&args.predictions, args.references.as_deref(), &fields)?;
    let (predictions, references) =
        oxtune_eval::input::describe(&args.predictions, args.references.as_deref());
    let report = evaluate(&samples, &config, &predictions, &references);
    let result = args
        .result
        .clone()
        .unwrap_or_else(|| sibling(&args.predictions, ".eval.json"));
    let html = args
        .report
        .clone()
        .unwrap_or_else(|| sibling(&args.predictions, ".eval.html"));
    report.write_json(&result)?;
    report.write_html(&html)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", report.summary())?;
    writeln!(
        stdout,
        "result {}\nreport {}",
        result.display(),
        html.display()
    )?;
    Ok(())
}
