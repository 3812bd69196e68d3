//! `oxtune sft` / `oxtune pt` through the real binary on the tiny fixture models: the
//! product brief's YAML as written, config errors before any weight loads, exact resume,
//! a kill during checkpointing, adapters that `infer` and `export --merge_lora` use.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context as _, ensure};

fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

fn oxtune(dir: &Path, args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_oxtune"))
        .args(args)
        .current_dir(dir)
        .env("OXTUNE_MODELS_FILE", dir.join("models.yaml"))
        .env("HF_HUB_CACHE", dir.join("no-hub"))
        .output()?)
}

fn success(output: &Output) -> anyhow::Result<String> {
    ensure!(
        output.status.success(),
        "oxtune failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout.clone())?)
}

fn failure(output: &Output) -> anyhow::Result<String> {
    ensure!(!output.status.success(), "oxtune should have failed");
    Ok(String::from_utf8(output.stderr.clone())?)
}

/// A working directory with a models registry naming the tiny Qwen3 `qwen3-7b-chat`, and the
/// PRD example data as `prd_data.jsonl`.
fn workspace() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("models.yaml"),
        format!(
            "qwen3-7b-chat: {}\n",
            repo("tests/fixtures/tiny-qwen3").display()
        ),
    )?;
    std::fs::copy(
        repo("examples/prd-assistant/data/prd_data.jsonl"),
        dir.path().join("prd_data.jsonl"),
    )?;
    Ok(dir)
}

fn losses(output_dir: &Path) -> anyhow::Result<Vec<f64>> {
    let text = std::fs::read_to_string(output_dir.join("logging.jsonl"))?;
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|v| v.get("loss").and_then(serde_json::Value::as_f64))
        .collect())
}

/// The product brief's SFT config, as written (the model name resolves through the registry).
const PRODUCT_YAML: &str = "model_type: qwen3-7b-chat\ntrain_dataset: prd_data.jsonl\nsft_type: lora\nlora_rank: 64\nlearning_rate: 2e-4\nmax_length: 8192\noutput_dir: ./checkpoints/prd-assistant-v1\n";

#[test]
fn the_product_yaml_trains_and_its_adapter_is_usable() -> anyhow::Result<()> {
    let dir = workspace()?;
    std::fs::write(dir.path().join("prd_generator.yaml"), PRODUCT_YAML)?;
    let stdout = success(&oxtune(
        dir.path(),
        &[
            "sft",
            "-c",
            "prd_generator.yaml",
            "--max_steps",
            "3",
            "--logging_steps",
            "1",
        ],
    )?)?;
    ensure!(stdout.contains("trained 3 steps"), "{stdout}");
    let out = dir.path().join("checkpoints/prd-assistant-v1");
    for file in [
        "config.yaml",
        "logging.jsonl",
        "loss.png",
        "checkpoint-3/adapter_config.json",
        "checkpoint-3/adapter_model.safetensors",
        "checkpoint-3/optimizer.safetensors",
        "checkpoint-3/trainer_state.json",
    ] {
        ensure!(
            out.join(file).is_file(),
            "{file} missing in {}",
            out.display()
        );
    }
    let config = std::fs::read_to_string(out.join("config.yaml"))?;
    ensure!(
        config.contains("lora_rank: 64") && config.contains("learning_rate: 0.0002"),
        "{config}"
    );
    ensure!(losses(&out)?.iter().all(|l| l.is_finite()), "finite losses");

    // The adapter serves and merges.
    let adapter = out.join("checkpoint-3");
    let adapter = adapter.to_str().context("utf-8 path")?;
    let answer = Command::new(env!("CARGO_BIN_EXE_oxtune"))
        .args([
            "infer",
            "--adapters",
            adapter,
            "--device",
            "cpu",
            "--max_new_tokens",
            "4",
        ])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .output()?;
    ensure!(!answer.status.success(), "empty stdin is refused");
    let merged = dir.path().join("merged");
    let stdout = success(&oxtune(
        dir.path(),
        &[
            "export",
            "--adapters",
            adapter,
            "--merge_lora",
            "true",
            "--output_dir",
            merged.to_str().context("path")?,
            "--torch_dtype",
            "float32",
        ],
    )?)?;
    ensure!(stdout.contains("max logit difference"), "{stdout}");
    ensure!(merged.join("model.safetensors").is_file() && merged.join("tokenizer.json").is_file());
    Ok(())
}

#[test]
fn config_errors_come_before_any_weight_loads() -> anyhow::Result<()> {
    let dir = workspace()?;
    // The model does not exist: the key errors must come first.
    let stderr = failure(&oxtune(
        dir.path(),
        &[
            "sft",
            "--model",
            "/nowhere",
            "--dataset",
            "x.jsonl",
            "--learning_rat",
            "1e-4",
        ],
    )?)?;
    ensure!(
        stderr.contains("learning_rat") && stderr.contains("did you mean `--learning_rate`"),
        "{stderr}"
    );
    std::fs::write(
        dir.path().join("qlora.yaml"),
        "sft_type: qlora\nlora_rank: 64\nlora_alpha: 16\ntarget_modules: [\"q_proj\", \"v_proj\"]\nquantization_bit: 4\n",
    )?;
    let stderr = failure(&oxtune(
        dir.path(),
        &[
            "sft",
            "-c",
            "qlora.yaml",
            "--model",
            "/nowhere",
            "--dataset",
            "x.jsonl",
        ],
    )?)?;
    ensure!(
        stderr.contains("qlora") && stderr.contains("not supported yet"),
        "{stderr}"
    );
    Ok(())
}

const RESUME_ARGS: &[&str] = &[
    "sft",
    "--model",
    "qwen3-7b-chat",
    "--dataset",
    "prd_data.jsonl",
    "--max_steps",
    "8",
    "--save_steps",
    "4",
    "--logging_steps",
    "1",
    "--learning_rate",
    "1e-3",
    "--per_device_train_batch_size",
    "2",
    "--gradient_accumulation_steps",
    "2",
    "--lora_dropout",
    "0.1",
    "--packing",
    "true",
    "--max_length",
    "256",
];

#[test]
fn a_resumed_run_repeats_the_straight_losses() -> anyhow::Result<()> {
    let dir = workspace()?;
    let straight: Vec<&str> = RESUME_ARGS
        .iter()
        .copied()
        .chain(["--output_dir", "straight"])
        .collect();
    success(&oxtune(dir.path(), &straight)?)?;
    // The same job stopped at step 4: a copy of the straight run's first checkpoint.
    let first_half: Vec<&str> = RESUME_ARGS
        .iter()
        .copied()
        .chain(["--output_dir", "halves"])
        .collect();
    success(&oxtune(dir.path(), &first_half)?)?;
    std::fs::remove_dir_all(dir.path().join("halves/checkpoint-8"))?;
    let resumed: Vec<&str> = first_half
        .iter()
        .copied()
        .chain(["--resume_from_checkpoint", "true"])
        .collect();
    let stdout = success(&oxtune(dir.path(), &resumed)?)?;
    ensure!(stdout.contains("trained 8 steps"), "{stdout}");
    let (a, b) = (
        losses(&dir.path().join("straight"))?,
        losses(&dir.path().join("halves"))?,
    );
    ensure!(a.len() == 8 && b.len() == 8, "{a:?} / {b:?}");
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        ensure!((x - y).abs() <= 1e-6, "step {}: {x} vs {y}", step + 1);
    }
    Ok(())
}

/// Killed at an arbitrary moment while saving a checkpoint every step: every checkpoint left
/// is complete, and resume picks the newest and finishes.
#[test]
fn a_kill_during_saves_leaves_a_resumable_checkpoint() -> anyhow::Result<()> {
    let dir = workspace()?;
    let args = [
        "sft",
        "--model",
        "qwen3-7b-chat",
        "--dataset",
        "prd_data.jsonl",
        "--max_steps",
        "12",
        "--save_steps",
        "1",
        "--save_total_limit",
        "3",
        "--output_dir",
        "killed",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_oxtune"))
        .args(args)
        .current_dir(dir.path())
        .env("OXTUNE_MODELS_FILE", dir.path().join("models.yaml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let out = dir.path().join("killed");
    let started = std::time::Instant::now();
    while oxtune_checkpoints(&out).len() < 2 && started.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill()?; // SIGKILL, wherever it is
    child.wait()?;
    let complete = oxtune_checkpoints(&out);
    ensure!(
        !complete.is_empty(),
        "a checkpoint was written before the kill"
    );
    for checkpoint in std::fs::read_dir(&out)? {
        let path = checkpoint?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if name.starts_with("checkpoint-") && !name.ends_with(".tmp") {
            ensure!(
                path.join("trainer_state.json").is_file()
                    && path.join("adapter_model.safetensors").is_file(),
                "{name} is incomplete"
            );
        }
    }
    let resumed: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--resume_from_checkpoint", "true", "--max_steps", "12"])
        .collect();
    let stdout = success(&oxtune(dir.path(), &resumed)?)?;
    ensure!(stdout.contains("trained 12 steps"), "{stdout}");
    Ok(())
}

fn oxtune_checkpoints(out: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(out)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.join("trainer_state.json").is_file() && !p.to_string_lossy().ends_with(".tmp")
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn pt_trains_on_raw_text() -> anyhow::Result<()> {
    let dir = workspace()?;
    std::fs::write(
        dir.path().join("notes.txt"),
        "A PRD states the problem, the users and the scope.\nEvery requirement needs an acceptance test.\nLogin by phone number needs a verification code.\n",
    )?;
    let stdout = success(&oxtune(
        dir.path(),
        &[
            "pt",
            "--model",
            "qwen3-7b-chat",
            "--dataset",
            "notes.txt",
            "--max_steps",
            "2",
            "--output_dir",
            "pt-out",
            "--train_type",
            "full",
            "--max_length",
            "64",
        ],
    )?)?;
    ensure!(stdout.contains("trained 2 steps"), "{stdout}");
    ensure!(
        dir.path()
            .join("pt-out/checkpoint-2/model.safetensors")
            .is_file()
    );
    Ok(())
}

#[test]
fn merging_an_adapter_into_the_wrong_base_fails_and_writes_nothing() -> anyhow::Result<()> {
    let dir = workspace()?;
    let adapter = repo("tests/fixtures/peft/tiny-qwen3-lora/adapter");
    let base = repo("tests/fixtures/tiny-llama");
    let stderr = failure(&oxtune(
        dir.path(),
        &[
            "export",
            "--adapters",
            adapter.to_str().context("path")?,
            "--model",
            base.to_str().context("path")?,
            "--merge_lora",
            "true",
            "--output_dir",
            "merged",
        ],
    )?)?;
    ensure!(stderr.contains("trained on another base model"), "{stderr}");
    ensure!(!dir.path().join("merged").exists(), "nothing is written");
    Ok(())
}
