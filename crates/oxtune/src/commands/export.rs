//! `oxtune export`: convert checkpoints.
//!
//! `--adapters DIR --merge_lora true --output_dir OUT` folds a LoRA / DoRA adapter into its
//! base model and writes a Hugging Face checkpoint (sharded at 5 GB) tensor by tensor, one
//! shard in memory at a time; then checks on a probe prompt that the merged model's logits
//! equal the adapted model's — a mismatch is an error and nothing is written.
//!
//! `--from_gguf FILE --output_dir DIR` imports a llama.cpp GGUF file (llama, qwen2,
//! qwen3 architectures; any quantization candle dequantizes) into a Hugging Face directory:
//! config.json, generation_config.json, tokenizer.json, tokenizer_config.json (with the chat
//! template) and safetensors weights. The directory is built beside DIR and renamed into
//! place, so an interrupted import leaves nothing half-written.
//!
//! ```text
//! oxtune export --from_gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --output_dir models/SmolLM2-135M-Instruct [--torch_dtype bfloat16] [--overwrite]
//! ```

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use oxtune_models::gguf::{self, ImportOptions};

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A llama.cpp GGUF file to import into a Hugging Face directory.
    #[arg(long = "from_gguf", value_name = "FILE")]
    pub from_gguf: Option<PathBuf>,

    /// The Hugging Face directory to write (must be absent or empty unless --overwrite).
    #[arg(long = "output_dir", value_name = "DIR")]
    pub output_dir: Option<PathBuf>,

    /// Dtype of the dequantized weights. Tensors stored as F32 in the GGUF (norms) stay
    /// float32; use float32 for exact parity with llama.cpp's dequantized values.
    #[arg(
        long = "torch_dtype",
        value_name = "DTYPE",
        default_value = "bfloat16",
        value_parser = ["float32", "bfloat16", "float16"]
    )]
    pub torch_dtype: String,

    /// Replace --output_dir if it exists and is not empty.
    #[arg(long)]
    pub overwrite: bool,

    /// A LoRA / DoRA adapter (peft format) to merge into its base model.
    #[arg(long, value_name = "DIR", requires = "merge_lora")]
    pub adapters: Option<PathBuf>,

    /// Merge --adapters into the base weights (`--merge_lora true`).
    #[arg(long = "merge_lora", default_value_t = false, action = clap::ArgAction::Set)]
    pub merge_lora: bool,

    /// The base model (default: the adapter's base_model_name_or_path).
    #[arg(long, value_name = "PATH_OR_NAME")]
    pub model: Option<String>,
}

pub fn run(args: &ExportArgs) -> anyhow::Result<()> {
    if args.merge_lora {
        return merge(args);
    }
    let Some(gguf_path) = &args.from_gguf else {
        bail!(
            "nothing to export: pass --from_gguf FILE --output_dir DIR, or --adapters DIR --merge_lora true --output_dir DIR\nhint: export imports llama.cpp .gguf files (llama, qwen2, qwen3) and merges LoRA/DoRA adapters"
        );
    };
    let Some(output_dir) = &args.output_dir else {
        bail!(
            "--output_dir is required with --from_gguf\nhint: e.g. --output_dir models/{}",
            default_name(gguf_path)
        );
    };
    let options = ImportOptions {
        dtype: oxtune_tensor::parse_dtype(&args.torch_dtype)?,
        overwrite: args.overwrite,
        ..ImportOptions::default()
    };

    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} importing [{bar:30}] {pos}/{len} tensors ({elapsed}) {wide_msg}",
        )
        .context("progress bar template")?
        .progress_chars("=> "),
    );
    let summary = gguf::import_with(gguf_path, output_dir, &options, &mut |done, total, name| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(name.to_owned());
    });
    bar.finish_and_clear();
    let summary = summary.with_context(|| format!("importing {}", gguf_path.display()))?;

    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "{} -> {} ({}, {}.{}M parameters in {} tensors, {}; tokenizer: {})",
        gguf_path.display(),
        summary.output_dir.display(),
        summary.architecture,
        summary.num_parameters / 1_000_000,
        summary.num_parameters / 100_000 % 10,
        summary.num_tensors,
        oxtune_tensor::dtype_name(summary.dtype),
        summary.tokenizer,
    )?;
    writeln!(stdout, "files: {}", summary.files.join(", "))?;
    Ok(())
}

/// `SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct.Q4_1`, for the hint.
fn default_name(path: &std::path::Path) -> String {
    path.file_stem()
        .map_or_else(|| "model".to_owned(), |s| s.to_string_lossy().into_owned())
}

/// The largest tolerated |merged - adapted| logit difference, relative to the largest
/// logit: merging reorders float operations (float32 output), and rounds the merged weights
/// (bfloat16 / float16 output), nothing more.
fn merge_tolerance(dtype: oxtune_tensor::DType) -> f32 {
    if dtype == oxtune_tensor::DType::F32 {
        1e-4
    } else {
        2e-2
    }
}

/// Logits of the probe prompt (the chat template's rendering when the model has one).
fn probe_logits(model: &oxtune_models::LoadedModel) -> anyhow::Result<oxtune_tensor::Tensor> {
    let probe_text = "Write the overview section of a PRD for phone-number login.";
    let probe = match &model.chat_template {
        Some(template) => {
            template.render(&[oxtune_models::ChatMessage::new("user", probe_text)], true)?
        }
        None => probe_text.to_owned(),
    };
    let device = model.model.device();
    let ids =
        oxtune_tensor::Tensor::new(model.tokenizer.encode(&probe, false)?.as_slice(), device)?
            .unsqueeze(0)?;
    Ok(model.model.forward(&ids, &mut model.model.new_cache())?)
}

/// `--adapters DIR --merge_lora true`: the merged checkpoint is streamed tensor by tensor
/// from the base checkpoint (one shard in memory at a time), then loaded and compared with the
/// adapted model on a probe prompt; it replaces `--output_dir` only when they agree.
fn merge(args: &ExportArgs) -> anyhow::Result<()> {
    use oxtune_tensor::{DType, Device};
    let adapter = args
        .adapters
        .as_ref()
        .context("--merge_lora true needs --adapters DIR")?;
    let output_dir = args
        .output_dir
        .as_ref()
        .context("--merge_lora true needs --output_dir DIR")?;
    if output_dir.exists() && std::fs::read_dir(output_dir)?.next().is_some() && !args.overwrite {
        bail!(
            "{} exists and is not empty\nhint: choose another --output_dir or pass --overwrite",
            output_dir.display()
        );
    }
    let out_dtype = oxtune_tensor::parse_dtype(&args.torch_dtype)?;
    let model_args = super::ModelArgs {
        base: super::BaseModelArgs {
            model: args.model.clone(),
            model_type: None,
            device: "cpu".into(),
            torch_dtype: "float32".into(),
        },
        adapters: Some(adapter.clone()),
    };
    let base_dir = model_args.resolve_dir(DType::F32)?;

    // 1. The adapted model's logits on the probe prompt (then the model is dropped).
    let adapted = probe_logits(&model_args.load()?)?;

    // 2. The merged checkpoint, tensor by tensor, into a temporary folder beside the output.
    let temporary = output_dir.with_extension("tmp-merge");
    if temporary.exists() {
        std::fs::remove_dir_all(&temporary)?;
    }
    std::fs::create_dir_all(&temporary)?;
    let base = oxtune_models::Weights::load(&base_dir, DType::F32, &Device::Cpu)?;
    let merged_layers =
        match oxtune_tuners::peft::merge_checkpoint(&base, adapter, &temporary, out_dtype, 5 << 30)
        {
            Ok(layers) => layers,
            Err(error) => {
                std::fs::remove_dir_all(&temporary)?;
                return Err(anyhow::Error::from(error).context(format!(
                    "merging {} into {} (nothing was written)",
                    adapter.display(),
                    base_dir.display()
                )));
            }
        };
    drop(base);
    oxtune_models::checkpoint::copy_companion_files(&base_dir, &temporary)?;
    let config_path = base_dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
    config["torch_dtype"] = oxtune_tensor::dtype_name(out_dtype).into();
    std::fs::write(
        temporary.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;

    // 3. The merged model must reproduce the adapted one.
    let merged = probe_logits(&oxtune_models::LoadedModel::load(
        &temporary,
        &Device::Cpu,
        DType::F32,
    )?)?;
    let scale: f32 = adapted.abs()?.flatten_all()?.max(0)?.to_scalar()?;
    let diff: f32 = (&merged - &adapted)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar()?;
    let tolerance = merge_tolerance(out_dtype) * scale.max(1.0);
    if diff.is_nan() || diff > tolerance {
        std::fs::remove_dir_all(&temporary)?;
        bail!(
            "the merged model does not reproduce the adapted model: max |logit difference| {diff:e} on the probe prompt (tolerance {tolerance:e})\nhint: nothing was written; the adapter may not match this base model"
        );
    }
    if output_dir.exists() {
        std::fs::remove_dir_all(output_dir)?;
    }
    std::fs::rename(&temporary, output_dir)
        .with_context(|| format!("moving the merged model to {}", output_dir.display()))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "merged {} ({merged_layers} layers) into {} -> {} ({}, max logit difference {diff:.2e} on a probe prompt)",
        adapter.display(),
        base_dir.display(),
        output_dir.display(),
        oxtune_tensor::dtype_name(out_dtype)
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ExportArgs,
    }

    #[test]
    fn flags_are_snake_case_with_a_bfloat16_default() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from([
            "export",
            "--from_gguf",
            "m.gguf",
            "--output_dir",
            "out",
            "--overwrite",
        ])?;
        assert_eq!(cli.args.from_gguf, Some(PathBuf::from("m.gguf")));
        assert_eq!(cli.args.torch_dtype, "bfloat16");
        assert!(cli.args.overwrite);
        assert!(Cli::try_parse_from(["export", "--torch_dtype", "int8"]).is_err());
        Ok(())
    }

    #[test]
    fn missing_flags_say_what_export_does() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(["export"])?;
        let message = run(&cli.args)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains("--from_gguf") && message.contains("--merge_lora true"),
            "{message}"
        );
        let cli = Cli::try_parse_from(["export", "--merge_lora", "true"])?;
        let message = run(&cli.args)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains("--merge_lora true needs --adapters DIR"),
            "{message}"
        );
        let cli = Cli::try_parse_from(["export", "--from_gguf", "x/SmolLM2.Q4_1.gguf"])?;
        let message = run(&cli.args)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains("--output_dir is required") && message.contains("models/SmolLM2.Q4_1"),
            "{message}"
        );
        Ok(())
    }
}
