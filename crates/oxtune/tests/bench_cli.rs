//! `oxtune bench infer` through the real binary, on a tiny random-weight model: every batch
//! size asked for is measured, through the serving engine, and reported as JSON.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, ensure};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

#[test]
fn bench_infer_reports_prefill_and_each_batch_size() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("bench.json");
    let config = repo_path("tests/fixtures/tiny-qwen3/config.json");
    let output = Command::new(env!("CARGO_BIN_EXE_oxtune"))
        .args(["bench", "infer", "--config"])
        .arg(&config)
        .args([
            "--prompt_tokens",
            "24",
            "--max_new_tokens",
            "6",
            "--batch_sizes",
            "1,3",
            "--repeats",
            "1",
            "--output_json",
        ])
        .arg(&json)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(stdout.contains("decode, batch 3"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    ensure!(report["prefill_tokens_per_second"].as_f64().unwrap_or(0.0) > 0.0);
    ensure!(report["decode_tokens_per_second"].as_f64().unwrap_or(0.0) > 0.0);
    let batches = report["batches"].as_array().context("batches")?;
    let sizes: Vec<u64> = batches
        .iter()
        .filter_map(|b| b["batch_size"].as_u64())
        .collect();
    ensure!(sizes == [1, 3], "{report}");
    ensure!(
        batches
            .iter()
            .all(|b| b["decode_tokens_per_second"].as_f64().unwrap_or(0.0) > 0.0),
        "{report}"
    );
    Ok(())
}

#[test]
fn bench_infer_refuses_a_request_beyond_the_context() -> anyhow::Result<()> {
    let output = Command::new(env!("CARGO_BIN_EXE_oxtune"))
        .args(["bench", "infer", "--config"])
        .arg(repo_path("tests/fixtures/tiny-qwen3/config.json"))
        .args(["--prompt_tokens", "100000"])
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success());
    ensure!(stderr.contains("--prompt_tokens 100000"), "{stderr}");
    Ok(())
}
