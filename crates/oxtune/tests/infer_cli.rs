//! `oxtune infer` through the real binary: piped input, seeds, batch datasets, bad input,
//! and the demo model answering in English.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context as _, ensure};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

fn oxtune(args: &[&str], stdin: &str) -> anyhow::Result<Output> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_oxtune"))
        .args(args)
        .env(
            "OXTUNE_MODELS_FILE",
            repo_path("tests/fixtures/no-such-registry.yaml"),
        )
        .env("HF_HUB_CACHE", repo_path("tests/fixtures/no-such-hub"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // A run that fails before reading its input (an unknown model) closes the pipe first: the
    // write then meets a broken pipe, which is the run's own business, not the test's.
    match child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())
    {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other?,
    }
    Ok(child.wait_with_output()?)
}

fn stdout_of(output: &Output) -> anyhow::Result<String> {
    ensure!(
        output.status.success(),
        "oxtune failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout.clone())?)
}

fn tiny(name: &str) -> String {
    repo_path(&format!("tests/fixtures/{name}"))
        .display()
        .to_string()
}

#[test]
fn piped_input_is_answered_and_seeds_reproduce() -> anyhow::Result<()> {
    let model = tiny("tiny-qwen2");
    let run = |seed: &str| -> anyhow::Result<String> {
        let args = [
            "infer",
            "--model",
            &model,
            "--device",
            "cpu",
            "--max_new_tokens",
            "12",
            "--temperature",
            "1.0",
            "--seed",
            seed,
        ];
        stdout_of(&oxtune(&args, "hello there\n")?)
    };
    let first = run("1")?;
    assert!(!first.trim().is_empty(), "empty answer");
    assert_eq!(first, run("1")?, "same seed, same text");
    assert_ne!(first, run("2")?, "another seed, another text");
    Ok(())
}

#[test]
fn batch_dataset_answers_every_format() -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let dataset = temp.path().join("in.jsonl");
    std::fs::write(
        &dataset,
        concat!(
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#,
            "\n",
            r#"{"instruction": "根据功能描述生成PRD章节", "input": "手机号登录", "output": "1. 功能概述"}"#,
            "\n",
            r#"{"query": "what is a PRD?", "response": "a document"}"#,
            "\n",
        ),
    )?;
    let result = temp.path().join("out/answers.jsonl");
    let model = tiny("tiny-llama");
    let args = [
        "infer",
        "--model",
        &model,
        "--device",
        "cpu",
        "--max_new_tokens",
        "4",
        "--val_dataset",
        dataset.to_str().context("utf-8 path")?,
        "--result_path",
        result.to_str().context("utf-8 path")?,
    ];
    stdout_of(&oxtune(&args, "")?)?;
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&result)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["labels"], "hello");
    assert_eq!(
        lines[1]["messages"][0]["content"],
        "根据功能描述生成PRD章节\n手机号登录"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["response"].is_string()
                && l["usage"]["completion_tokens"].as_u64() <= Some(4))
    );
    Ok(())
}

#[test]
fn a_broken_row_names_file_and_line_and_writes_nothing() -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let dataset = temp.path().join("in.jsonl");
    std::fs::write(
        &dataset,
        "{\"query\": \"ok\"}\n{\"text\": \"no known format\"}\n",
    )?;
    let result = temp.path().join("out.jsonl");
    let model = tiny("tiny-llama");
    let output = oxtune(
        &[
            "infer",
            "--model",
            &model,
            "--device",
            "cpu",
            "--val_dataset",
            dataset.to_str().context("path")?,
            "--result_path",
            result.to_str().context("path")?,
        ],
        "",
    )?;
    let stderr = String::from_utf8(output.stderr)?;
    assert!(!output.status.success());
    assert!(
        stderr.contains("in.jsonl:2: expected `messages`"),
        "{stderr}"
    );
    assert!(!result.exists(), "no partial output");
    Ok(())
}

#[test]
fn an_unknown_model_says_where_it_looked() -> anyhow::Result<()> {
    let output = oxtune(&["infer", "--model_type", "qwen3-7b-chat"], "hi")?;
    let stderr = String::from_utf8(output.stderr)?;
    assert!(!output.status.success());
    assert!(
        stderr.contains("model `qwen3-7b-chat` not found"),
        "{stderr}"
    );
    assert!(stderr.contains("no-such-registry.yaml"), "{stderr}");
    assert!(stderr.contains("hint:"), "{stderr}");
    Ok(())
}

/// The demo model must answer coherently in English. `scripts/fetch-demo-model.sh` puts it
/// in `models/` (the test suite runs it first).
#[test]
fn the_demo_model_answers_in_english() -> anyhow::Result<()> {
    let model = repo_path("models/SmolLM2-135M-Instruct");
    ensure!(
        model.join("config.json").is_file(),
        "{} is missing: run scripts/fetch-demo-model.sh first",
        model.display()
    );
    let model = model.display().to_string();
    let answer = stdout_of(&oxtune(
        &[
            "infer",
            "--model",
            &model,
            "--device",
            "cpu",
            "--max_new_tokens",
            "40",
        ],
        "What is the capital of France?",
    )?)?;
    assert!(answer.contains("Paris"), "answer: {answer}");
    Ok(())
}
