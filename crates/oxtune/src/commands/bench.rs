//! `oxtune bench`: speed measurements.
//!
//! `oxtune bench infer` times prefill (tokens/s over one prompt) and greedy decode at batch 1
//! and at the `--batch_sizes` given (tokens/s over all sequences), through the serving
//! engine — the path `infer` and `deploy` take — of a checkpoint (`--model`) or of a
//! config.json with random weights (`--config`, so an 8B model can be measured without its
//! 16 GB checkpoint). Batch-1 decode is reported as a fraction of the memory-bandwidth bound:
//! every decoded token reads every weight once (all parameters but the input-embedding
//! lookup, the LM head included).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use oxtune_engine::{EngineConfig, EngineHandle, Event, Request, ServedModel};
use oxtune_models::{CausalLm, ModelConfig, RandomWeights};

use super::ModelArgs;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prefill and batch-1 decode speed of a model.
    Infer(BenchInferArgs),
    /// Training speed: tokens/s, step time, MFU and GPU memory of LoRA or full fine-tuning.
    Train(BenchTrainArgs),
    /// Load test of an OpenAI-compatible server (ours, vLLM, SGLang): TTFT, TPOT, ITL and
    /// throughput of streaming requests, like `vllm bench serve`.
    Serve(super::bench_serve::BenchServeArgs),
}

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// A config.json to build with random weights instead of loading --model.
    #[arg(long, value_name = "CONFIG_JSON", conflicts_with_all = ["model", "model_type"])]
    pub config: Option<PathBuf>,

    /// `lora` (DoRA with --use_dora true) or `full`.
    #[arg(long = "train_type", default_value = "lora")]
    pub train_type: String,

    #[arg(long = "lora_rank", default_value_t = 64)]
    pub lora_rank: usize,

    #[arg(long = "lora_alpha", default_value_t = 128.0)]
    pub lora_alpha: f64,

    #[arg(long = "use_dora", default_value_t = false, action = clap::ArgAction::Set)]
    pub use_dora: bool,

    /// Rows per step.
    #[arg(long = "per_device_train_batch_size", default_value_t = 1)]
    pub batch_size: usize,

    /// Tokens per row (random ids).
    #[arg(long = "max_length", default_value_t = 2048)]
    pub max_length: usize,

    /// Timed optimizer steps (after --warmup_steps untimed ones).
    #[arg(long = "max_steps", default_value_t = 10)]
    pub max_steps: usize,

    #[arg(long = "warmup_steps", default_value_t = 2)]
    pub warmup_steps: usize,

    #[arg(long = "learning_rate", default_value_t = 1e-4)]
    pub learning_rate: f64,

    #[arg(long = "gradient_checkpointing", default_value_t = false, action = clap::ArgAction::Set)]
    pub gradient_checkpointing: bool,

    /// Peak matmul throughput for MFU, in TFLOP/s (default: 790, an H200's measured bf16
    /// cuBLAS rate).
    #[arg(long = "peak_tflops", default_value_t = 790.0)]
    pub peak_tflops: f64,

    /// Also write the results as JSON here.
    #[arg(long = "output_json", value_name = "FILE")]
    pub output_json: Option<PathBuf>,
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

    /// Numbers of sequences decoded together (each with its own prompt), e.g. `1,8,32`.
    #[arg(long = "batch_sizes", value_delimiter = ',', default_value = "1")]
    pub batch_sizes: Vec<usize>,

    /// Timed repetitions; the best is reported (one untimed warm-up run comes first).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,

    /// Memory bandwidth in GB/s for the bound (default on CUDA: 4260, an H200's measured
    /// device-copy rate; none on CPU).
    #[arg(long = "bandwidth_gb_s")]
    pub bandwidth_gb_s: Option<f64>,

    /// Decode op by op instead of replaying recorded CUDA graphs.
    #[arg(long = "enforce_eager", default_value_t = false, action = clap::ArgAction::Set)]
    pub enforce_eager: bool,

    /// Also write the results as JSON here.
    #[arg(long = "output_json", value_name = "FILE")]
    pub output_json: Option<PathBuf>,
}

pub fn run(command: &BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Infer(args) => bench_infer(args),
        BenchCommand::Train(args) => bench_train(args),
        BenchCommand::Serve(args) => super::bench_serve::run(args),
    }
}

fn bench_infer(args: &BenchInferArgs) -> anyhow::Result<()> {
    let (device, dtype) = args.model.device_and_dtype()?;
    let (name, served) = bench_served_model(&args.model, args.config.as_ref())?;
    let config = served.model.config().clone();
    let context = args.prompt_tokens + args.max_new_tokens;
    anyhow::ensure!(
        args.prompt_tokens >= 1
            && args.max_new_tokens >= 2
            && context < config.max_position_embeddings,
        "--prompt_tokens {} + --max_new_tokens {} must fit the model's context ({}), with at least 1 prompt and 2 new tokens",
        args.prompt_tokens,
        args.max_new_tokens,
        config.max_position_embeddings
    );
    anyhow::ensure!(
        args.batch_sizes.iter().all(|&b| b >= 1),
        "--batch_sizes must be positive"
    );
    anyhow::ensure!(args.repeats >= 1, "--repeats must be at least 1");
    let largest = args.batch_sizes.iter().copied().max().unwrap_or(1);
    let engine = EngineHandle::start_model(
        served,
        &[],
        EngineConfig {
            max_num_seqs: largest,
            max_num_batched_tokens: args.prompt_tokens.max(2048),
            // Every repeat must compute its prompt again.
            enable_prefix_caching: false,
            max_model_len: Some(context + 1),
            enforce_eager: args.enforce_eager,
            ..EngineConfig::default()
        },
    )?;
    let vocab = u64::try_from(config.vocab_size)?;
    #[expect(clippy::cast_possible_truncation, reason = "ids below vocab_size")]
    let prompt = |seed: u64| -> Vec<u32> {
        (0..args.prompt_tokens as u64)
            .map(|i| ((i * 7919 + 13 + seed * 104_729) % vocab) as u32)
            .collect()
    };

    // Prefill: time from scheduling to the first token of one request.
    let mut prefill_seconds = f64::INFINITY;
    for repeat in 0..=args.repeats {
        let timings = run_requests(&engine, &[prompt(0)], 1)?;
        let seconds = timings[0]
            .first_token
            .saturating_duration_since(timings[0].scheduled);
        if repeat > 0 {
            prefill_seconds = prefill_seconds.min(seconds.as_secs_f64());
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "token counts for rates")]
    let prefill_rate = args.prompt_tokens as f64 / prefill_seconds;

    // Decode: all sequences of a batch start together; once the last one has its first
    // token every sequence is decoding, and the rate is taken from there to the last finish.
    let mut batches = Vec::new();
    for &batch in &args.batch_sizes {
        let prompts: Vec<Vec<u32>> = (0..batch as u64).map(|b| prompt(b + 1)).collect();
        let mut best = 0.0f64;
        for repeat in 0..=args.repeats {
            let timings = run_requests(&engine, &prompts, args.max_new_tokens)?;
            let decoding_from = timings.iter().map(|t| t.first_token).max();
            let done = timings.iter().map(|t| t.finished).max();
            let (Some(from), Some(done)) = (decoding_from, done) else {
                continue;
            };
            #[expect(clippy::cast_precision_loss, reason = "token counts for rates")]
            let rate = (batch * (args.max_new_tokens - 1)) as f64
                / done.saturating_duration_since(from).as_secs_f64().max(1e-9);
            if repeat > 0 {
                best = best.max(rate);
            }
        }
        batches.push((batch, best));
    }
    let decode_rate = batches
        .iter()
        .find(|(batch, _)| *batch == 1)
        .map(|(_, rate)| *rate);
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
        "decode_ms_per_token": decode_rate.map(|rate| 1000.0 / rate),
        "batches": batches.iter().map(|(batch, rate)| serde_json::json!({
            "batch_size": batch,
            "decode_tokens_per_second": rate,
            "per_sequence_tokens_per_second": rate / *batch as f64,
        })).collect::<Vec<_>>(),
        "weight_bytes_per_decoded_token": bytes_per_token,
        "bandwidth_gb_s": bandwidth,
        "bandwidth_bound_tokens_per_second": bound,
        "fraction_of_bound": bound.zip(decode_rate).map(|(b, rate)| rate / b),
    });
    #[expect(clippy::cast_precision_loss, reason = "counts for display")]
    let mut table = format!(
        "model            {name}\ndevice, dtype    {device:?}, {}\nparameters       {:.3} B\nprefill          {prefill_rate:.1} tokens/s ({} tokens)\n",
        oxtune_tensor::dtype_name(dtype),
        config.num_parameters() as f64 / 1e9,
        args.prompt_tokens,
    );
    for (batch, rate) in &batches {
        #[expect(clippy::cast_precision_loss, reason = "counts for display")]
        table.push_str(&format!(
            "decode, batch {batch:<3}{rate:.1} tokens/s ({:.2} ms/step, {} tokens each)\n",
            1000.0 * *batch as f64 / rate,
            args.max_new_tokens,
        ));
    }
    if let (Some(bound), Some(rate)) = (bound, decode_rate) {
        table.push_str(&format!(
            "bandwidth bound  {bound:.1} tokens/s at batch 1 -> {:.1} % reached\n",
            100.0 * rate / bound
        ));
    }
    engine.shutdown();
    publish(&table, &report, args.output_json.as_deref())
}

/// When each request of a round started, got its first token and finished.
struct RequestTimes {
    scheduled: Instant,
    first_token: Instant,
    finished: Instant,
}

/// Runs one greedy request per prompt, all submitted at once, each generating exactly
/// `new_tokens` (end-of-sequence ignored).
fn run_requests(
    engine: &EngineHandle,
    prompts: &[Vec<u32>],
    new_tokens: usize,
) -> anyhow::Result<Vec<RequestTimes>> {
    let receivers = prompts
        .iter()
        .enumerate()
        .map(|(index, prompt)| {
            let mut request = Request::new(format!("bench-{index}"), prompt.clone());
            request.max_tokens = Some(new_tokens);
            request.ignore_eos = true;
            engine.submit(request)
        })
        .collect::<Result<Vec<_>, _>>()?;
    receivers
        .into_iter()
        .map(|mut events| {
            loop {
                match events.blocking_recv() {
                    Some(Event::Token { .. }) => {}
                    Some(Event::Finished { timings, .. }) => {
                        break Ok(RequestTimes {
                            scheduled: timings.scheduled.unwrap_or(timings.arrived),
                            first_token: timings.first_token.unwrap_or(timings.finished),
                            finished: timings.finished,
                        });
                    }
                    Some(Event::Error { message }) => anyhow::bail!("generation failed: {message}"),
                    None => anyhow::bail!("the engine stopped"),
                }
            }
        })
        .collect()
}

/// The model to serve for `bench infer`: `--config` with random weights and a stand-in
/// tokenizer, or the checkpoint of `--model`.
fn bench_served_model(
    model: &ModelArgs,
    config: Option<&PathBuf>,
) -> anyhow::Result<(String, ServedModel)> {
    if config.is_none() {
        let loaded = model.load()?;
        let name = loaded.dir.display().to_string();
        let eos_token_ids = loaded.eos_token_ids();
        return Ok((
            name,
            ServedModel {
                model: loaded.model,
                tokenizer: loaded.tokenizer,
                chat_template: loaded.chat_template,
                eos_token_ids,
            },
        ));
    }
    let (name, model, _) = bench_model(model, config)?;
    let tokenizer = oxtune_models::Tokenizer::synthetic(model.config().vocab_size)?;
    Ok((
        name,
        ServedModel {
            model,
            tokenizer,
            chat_template: None,
            eos_token_ids: Vec::new(),
        },
    ))
}

/// A model from `--config` (random weights) or `--model`, and its name for the report.
fn bench_model(
    model: &ModelArgs,
    config: Option<&PathBuf>,
) -> anyhow::Result<(String, CausalLm, PathBuf)> {
    let (device, dtype) = model.device_and_dtype()?;
    Ok(match config {
        Some(path) => {
            let config = ModelConfig::from_file(path)?;
            let built = CausalLm::load(&config, &RandomWeights::new(dtype, &device))
                .with_context(|| format!("building random weights for {}", path.display()))?;
            let dir = path.parent().map(PathBuf::from).unwrap_or_default();
            (format!("{} (random weights)", path.display()), built, dir)
        }
        None => {
            let loaded = model.load()?;
            (loaded.dir.display().to_string(), loaded.model, loaded.dir)
        }
    })
}

struct Timings {
    steps: Vec<oxtune_train::trainer::StepLog>,
}

impl oxtune_train::trainer::Observer for Timings {
    fn on_step(&mut self, log: &oxtune_train::trainer::StepLog) {
        self.steps.push(log.clone());
    }
    fn on_eval(&mut self, _: usize, _: f64) {}
    fn on_save(&mut self, _: &std::path::Path) {}
}

fn bench_train(args: &BenchTrainArgs) -> anyhow::Result<()> {
    use oxtune_train::trainer::{Trainable, TrainerSettings, train};
    let (device, dtype) = args.model.device_and_dtype()?;
    let (name, mut model, base_dir) = bench_model(&args.model, args.config.as_ref())?;
    let config = model.config().clone();
    let trainable = match args.train_type.as_str() {
        "lora" => {
            let settings = oxtune_tuners::LoraSettings {
                rank: args.lora_rank,
                alpha: args.lora_alpha,
                dropout: 0.0,
                use_rslora: false,
                use_dora: args.use_dora,
                target_modules: oxtune_tuners::TargetModules::AllLinear,
            };
            Trainable::Lora(oxtune_tuners::LoraTuner::attach(&mut model, &settings, 0)?)
        }
        "full" => Trainable::Full(oxtune_train::optimizer::make_all_trainable(&mut model)?),
        other => anyhow::bail!("--train_type `{other}`: expected lora or full"),
    };
    let steps = args.warmup_steps + args.max_steps;
    let scratch = tempfile::tempdir()?;
    // The final checkpoint of full fine-tuning copies the base's config.json: for a
    // random-weight model that is the --config file, under its expected name.
    let base_dir = match &args.config {
        Some(config) => {
            let base = scratch.path().join("base");
            std::fs::create_dir_all(&base)?;
            std::fs::copy(config, base.join("config.json"))
                .with_context(|| format!("copying {}", config.display()))?;
            base
        }
        None => base_dir,
    };
    let settings = TrainerSettings {
        output_dir: scratch.path().to_path_buf(),
        base_model_dir: base_dir,
        schedule: oxtune_train::schedule::Schedule::new(
            oxtune_train::schedule::ScheduleKind::Constant,
            args.learning_rate,
            0.0,
            steps,
        ),
        adamw: oxtune_train::optimizer::AdamWConfig::default(),
        gradient_accumulation_steps: 1,
        max_grad_norm: 1.0,
        logging_steps: 1,
        save_steps: 0,
        save_total_limit: Some(1),
        eval_steps: 0,
        gradient_checkpointing: args.gradient_checkpointing,
        max_consecutive_skipped_steps: 0,
        seed: 0,
    };
    let mut data = oxtune_train::synthetic::SyntheticBatches::new(
        args.batch_size,
        args.max_length,
        config.vocab_size,
        2,
        steps,
        &device,
    );
    let mut timings = Timings { steps: Vec::new() };
    train(
        &model,
        &trainable,
        &mut data,
        None,
        &settings,
        None,
        &mut timings,
    )?;
    let timed = timings.steps.get(args.warmup_steps..).unwrap_or_default();
    anyhow::ensure!(!timed.is_empty(), "no timed steps: raise --max_steps");
    let losses: Vec<f64> = timings.steps.iter().map(|s| s.loss).collect();
    anyhow::ensure!(
        losses.iter().all(|l| l.is_finite()),
        "non-finite loss: {losses:?}"
    );
    #[expect(clippy::cast_precision_loss, reason = "counts for rates")]
    let step_seconds = timed.iter().map(|s| s.step_seconds).sum::<f64>() / timed.len() as f64;
    #[expect(clippy::cast_precision_loss, reason = "counts for rates")]
    let tokens_per_step = (args.batch_size * args.max_length) as f64;
    let tokens_per_second = tokens_per_step / step_seconds;
    // nanoGPT's estimate: 6 N flops per token for the weights plus 12 L T d per token for
    // attention (scores and values, forward and backward).
    #[expect(clippy::cast_precision_loss, reason = "flop estimates")]
    let flops_per_token = 6.0 * config.num_parameters() as f64
        + 12.0
            * (config.num_hidden_layers
                * config.num_attention_heads
                * config.head_dim
                * args.max_length) as f64;
    let mfu = flops_per_token * tokens_per_second / (args.peak_tflops * 1e12);
    let memory = oxtune_tensor::memory_in_use(&device)?;
    let report = serde_json::json!({
        "model": name,
        "device": format!("{device:?}"),
        "dtype": oxtune_tensor::dtype_name(dtype),
        "train_type": if args.use_dora { "dora" } else { args.train_type.as_str() },
        "lora_rank": args.lora_rank,
        "batch_size": args.batch_size,
        "seq_len": args.max_length,
        "gradient_checkpointing": args.gradient_checkpointing,
        "timed_steps": timed.len(),
        "step_seconds": step_seconds,
        "tokens_per_second": tokens_per_second,
        "mfu": mfu,
        "gpu_memory_bytes": memory,
        "losses": losses,
    });
    let mut table = format!(
        "model            {name}\ntraining         {} {}, batch {} x {} tokens, checkpointing {}\nstep time        {:.3} s ({} timed steps)\nthroughput       {tokens_per_second:.0} tokens/s, MFU {:.1} %\nlosses           {:.4} -> {:.4}\n",
        args.train_type,
        oxtune_tensor::dtype_name(dtype),
        args.batch_size,
        args.max_length,
        args.gradient_checkpointing,
        step_seconds,
        timed.len(),
        100.0 * mfu,
        losses.first().copied().unwrap_or(f64::NAN),
        losses.last().copied().unwrap_or(f64::NAN),
    );
    if let Some(bytes) = memory {
        #[expect(clippy::cast_precision_loss, reason = "bytes for display")]
        table.push_str(&format!(
            "GPU memory       {:.1} GiB (peak: the pool keeps freed memory)\n",
            bytes as f64 / (1u64 << 30) as f64
        ));
    }
    publish(&table, &report, args.output_json.as_deref())
}

/// Prints the table and writes the JSON report when asked.
fn publish(
    table: &str,
    report: &serde_json::Value,
    output_json: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    #[expect(clippy::print_stdout, reason = "the report is the command's output")]
    {
        print!("{table}");
    }
    if let Some(path) = output_json {
        std::fs::write(path, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
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
