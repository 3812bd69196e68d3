//! `oxtune bench`: speed measurements.
//!
//! `oxtune bench infer` times prefill (tokens/s over one prompt) and batch-1 greedy decode
//! (tokens/s) of a checkpoint (`--model`) or of a config.json with random weights
//! (`--config`, so an 8B model can be measured without its 16 GB checkpoint), and reports
//! decode speed as a fraction of the memory-bandwidth bound: every decoded token reads every
//! weight once (all parameters but the input-embedding lookup, the LM head included).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use oxtune_models::{CausalLm, ModelConfig, RandomWeights};
use oxtune_tensor::{D, Device, Tensor};

use super::ModelArgs;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prefill and batch-1 decode speed of a model.
    Infer(BenchInferArgs),
}

#[derive(Debug, Args)]
pub struct BenchInferArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// A config.json to build with random weights instead of loading --model.
    #[arg(long, value_name = "CONFIG_JSON", conflicts_with_all = ["model", "model_type"])]
    pub config: Option<PathBuf>,

    /// Prompt length for the prefill measurement (random token ids).
    #[arg(long = "prompt_tokens", default_value_t = 512)]
    pub prompt_tokens: usize,

    /// Tokens decoded one at a time after the prompt.
    #[arg(long = "max_new_tokens", default_value_t = 256)]
    pub max_new_tokens: usize,

    /// Timed repetitions; the best is reported (one untimed warm-up run comes first).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,

    /// Memory bandwidth in GB/s for the bound (default on CUDA: 4260, an H200's measured
    /// device-copy rate; none on CPU).
    #[arg(long = "bandwidth_gb_s")]
    pub bandwidth_gb_s: Option<f64>,

    /// Also write the results as JSON here.
    #[arg(long = "output_json", value_name = "FILE")]
    pub output_json: Option<PathBuf>,
}

pub fn run(command: &BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Infer(args) => bench_infer(args),
    }
}

fn bench_infer(args: &BenchInferArgs) -> anyhow::Result<()> {
    let (device, dtype) = args.model.device_and_dtype()?;
    let (name, model) = match &args.config {
        Some(path) => {
            let config = ModelConfig::from_file(path)?;
            let model = CausalLm::load(&config, &RandomWeights::new(dtype, &device))
                .with_context(|| format!("building random weights for {}", path.display()))?;
            (format!("{} (random weights)", path.display()), model)
        }
        None => {
            let loaded = args.model.load()?;
            (loaded.dir.display().to_string(), loaded.model)
        }
    };
    let config = model.config().clone();
    anyhow::ensure!(
        args.prompt_tokens >= 1
            && args.prompt_tokens + args.max_new_tokens < config.max_position_embeddings,
        "--prompt_tokens {} + --max_new_tokens {} must be between 1 and the model's context ({})",
        args.prompt_tokens,
        args.max_new_tokens,
        config.max_position_embeddings
    );
    let vocab = u32::try_from(config.vocab_size)?;
    #[expect(clippy::cast_possible_truncation, reason = "ids below vocab_size")]
    let prompt: Vec<u32> = (0..args.prompt_tokens)
        .map(|i| ((i as u64 * 7919 + 13) % u64::from(vocab)) as u32)
        .collect();

    let mut best: Option<(f64, f64)> = None;
    for repeat in 0..=args.repeats {
        let (prefill, decode) = run_once(&model, &prompt, args.max_new_tokens, &device)?;
        if repeat > 0 {
            let current = best.unwrap_or((f64::INFINITY, f64::INFINITY));
            best = Some((current.0.min(prefill), current.1.min(decode)));
        }
    }
    let (prefill_seconds, decode_seconds) = best.context("--repeats must be at least 1")?;
    #[expect(clippy::cast_precision_loss, reason = "token counts for rates")]
    let (prefill_rate, decode_rate) = (
        args.prompt_tokens as f64 / prefill_seconds,
        args.max_new_tokens as f64 / decode_seconds,
    );
    let bytes_per_token = decode_bytes(&config) * dtype.size_in_bytes();
    let bandwidth = args.bandwidth_gb_s.or(device.is_cuda().then_some(4260.0));
    #[expect(clippy::cast_precision_loss, reason = "byte counts for a rate")]
    let bound = bandwidth.map(|gb_s| gb_s * 1e9 / bytes_per_token as f64);

    let report = serde_json::json!({
        "model": name,
        "device": format!("{device:?}"),
        "dtype": oxtune_tensor::dtype_name(dtype),
        "parameters": config.num_parameters(),
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.max_new_tokens,
        "prefill_tokens_per_second": prefill_rate,
        "decode_tokens_per_second": decode_rate,
        "decode_ms_per_token": 1000.0 / decode_rate,
        "weight_bytes_per_decoded_token": bytes_per_token,
        "bandwidth_gb_s": bandwidth,
        "bandwidth_bound_tokens_per_second": bound,
        "fraction_of_bound": bound.map(|b| decode_rate / b),
    });
    let mut table = format!(
        "model            {name}\ndevice, dtype    {device:?}, {}\nparameters       {:.3} B\nprefill          {prefill_rate:.1} tokens/s ({} tokens)\ndecode, batch 1  {decode_rate:.1} tokens/s ({:.2} ms/token, {} tokens)\n",
        oxtune_tensor::dtype_name(dtype),
        config.num_parameters() as f64 / 1e9,
        args.prompt_tokens,
        1000.0 / decode_rate,
        args.max_new_tokens,
    );
    if let Some(bound) = bound {
        table.push_str(&format!(
            "bandwidth bound  {bound:.1} tokens/s -> {:.1} % reached\n",
            100.0 * decode_rate / bound
        ));
    }
    #[expect(clippy::print_stdout, reason = "the report is the command's output")]
    {
        print!("{table}");
    }
    if let Some(path) = &args.output_json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Seconds for the prefill (to the first token) and for `new_tokens` greedy decode steps.
fn run_once(
    model: &CausalLm,
    prompt: &[u32],
    new_tokens: usize,
    device: &Device,
) -> anyhow::Result<(f64, f64)> {
    let mut cache = model.new_cache();
    let start = Instant::now();
    let input = Tensor::new(prompt, device)?.unsqueeze(0)?;
    let mut next = model.forward_last(&input, &mut cache)?.argmax(D::Minus1)?;
    let _: Vec<u32> = next.to_vec1()?;
    let prefill = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..new_tokens {
        next = model
            .forward_last(&next.unsqueeze(0)?, &mut cache)?
            .argmax(D::Minus1)?;
    }
    let _: Vec<u32> = next.to_vec1()?;
    Ok((prefill, start.elapsed().as_secs_f64()))
}

/// Weights read per decoded token: all but the input-embedding lookup.
fn decode_bytes(config: &ModelConfig) -> usize {
    let embedding = config.vocab_size * config.hidden_size;
    let lm_head_separate = if config.tie_word_embeddings {
        embedding
    } else {
        0
    };
    config.num_parameters() - embedding + lm_head_separate
}
