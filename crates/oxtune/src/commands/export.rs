//! `oxtune export`: convert checkpoints.
//!
//! Today: `--from_gguf FILE --output_dir DIR` imports a llama.cpp GGUF file (llama, qwen2,
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
}

pub fn run(args: &ExportArgs) -> anyhow::Result<()> {
    let Some(gguf_path) = &args.from_gguf else {
        bail!(
            "nothing to export: pass --from_gguf FILE --output_dir DIR\nhint: export currently supports one conversion, a llama.cpp .gguf file (llama, qwen2, qwen3) into a Hugging Face directory"
        );
    };
    let Some(output_dir) = &args.output_dir else {
        bail!("--output_dir is required with --from_gguf\nhint: e.g. --output_dir models/{}", default_name(gguf_path));
    };
    let options = ImportOptions {
        dtype: oxtune_tensor::parse_dtype(&args.torch_dtype)?,
        overwrite: args.overwrite,
        ..ImportOptions::default()
    };

    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} importing [{bar:30}] {pos}/{len} tensors ({elapsed}) {wide_msg}")
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
    path.file_stem().map_or_else(|| "model".to_owned(), |s| s.to_string_lossy().into_owned())
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
        let cli = Cli::try_parse_from(["export", "--from_gguf", "m.gguf", "--output_dir", "out", "--overwrite"])?;
        assert_eq!(cli.args.from_gguf, Some(PathBuf::from("m.gguf")));
        assert_eq!(cli.args.torch_dtype, "bfloat16");
        assert!(cli.args.overwrite);
        assert!(Cli::try_parse_from(["export", "--torch_dtype", "int8"]).is_err());
        Ok(())
    }

    #[test]
    fn missing_flags_say_what_export_does() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(["export"])?;
        let message = run(&cli.args).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("--from_gguf") && message.contains("Hugging Face directory"), "{message}");
        let cli = Cli::try_parse_from(["export", "--from_gguf", "x/SmolLM2.Q4_1.gguf"])?;
        let message = run(&cli.args).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("--output_dir is required") && message.contains("models/SmolLM2.Q4_1"), "{message}");
        Ok(())
    }
}
