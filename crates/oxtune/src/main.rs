//! `oxtune`: one binary, one subcommand per stage of a model's life.
//!
//! `main` parses the command line, runs one subcommand and prints any error once, as the
//! whole context chain (`{:#}`), returning a non-zero exit code.

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Take a large language model from data to a production endpoint.
#[derive(Debug, Parser)]
#[command(name = "oxtune", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Supervised fine-tuning (LoRA, DoRA, full): `oxtune sft -c job.yaml [--key value ...]`.
    Sft(commands::train::TrainCommandArgs),
    /// Continued pre-training on raw text: `oxtune pt -c job.yaml [--key value ...]`.
    Pt(commands::train::TrainCommandArgs),
    /// Chat with a model in the terminal, answer piped input, or run a dataset in batch.
    Infer(commands::infer::InferArgs),
    /// Convert checkpoints: import a GGUF file into a Hugging Face directory.
    Export(commands::export::ExportArgs),
    /// Prepare datasets: scrub personal data, check, stats, dedup, split.
    Data(commands::data::DataArgs),
    /// Score predictions against references: BLEU and ROUGE, with a JSON result and HTML report.
    Eval(commands::eval::EvalArgs),
    /// Serve a model behind an OpenAI-compatible API (native engine, or vllm/sglang/lmdeploy).
    Deploy(commands::deploy::DeployArgs),
    /// Measure speed: decode and prefill tokens/s.
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    commands::init_logging();
    let result = match cli.command {
        Command::Sft(args) => commands::train::run(oxtune_config::Command::Sft, &args),
        Command::Pt(args) => commands::train::run(oxtune_config::Command::Pt, &args),
        Command::Infer(args) => commands::infer::run(&args),
        Command::Export(args) => commands::export::run(&args),
        Command::Bench(command) => commands::bench::run(&command),
        Command::Data(args) => commands::data::run(&args),
        Command::Eval(args) => commands::eval::run(&args),
        Command::Deploy(args) => commands::deploy::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if commands::is_broken_pipe(&error) {
                return ExitCode::SUCCESS;
            }
            #[expect(clippy::print_stderr, reason = "the one place errors reach the user")]
            {
                eprintln!("error: {error:#}");
            }
            ExitCode::FAILURE
        }
    }
}
