//! `oxtune eval` (file mode) through the real binary: scores equal to the sacrebleu and
//! rouge-score reference values, the JSON and HTML outputs, and errors naming file and line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context as _, ensure};
use serde_json::Value;

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

fn oxtune(args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_oxtune"))
        .args(args)
        .output()?)
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("utf-8 path")
}

#[test]
fn scores_equal_the_reference_implementations() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // pairs.jsonl holds `prediction` and `references` in each row: no --references needed.
    let pairs = repo_path("tests/fixtures/metrics/pairs.jsonl");
    let result = dir.path().join("result.json");
    let report = dir.path().join("report.html");
    let output = oxtune(&[
        "eval",
        "--metrics",
        "bleu,rouge",
        "--predictions",
        path_str(&pairs)?,
        "--bleu_tokenize",
        "13a",
        "--rouge_tokenizer",
        "default",
        "--result",
        path_str(&result)?,
        "--report",
        path_str(&report)?,
    ])?;
    ensure!(
        output.status.success(),
        "eval failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout)?;
    assert!(
        stdout.contains("61 samples") && stdout.contains("BLEU = "),
        "{stdout}"
    );

    let reference: Value = serde_json::from_str(&std::fs::read_to_string(repo_path(
        "tests/fixtures/metrics/reference.json",
    ))?)?;
    let ours: Value = serde_json::from_str(&std::fs::read_to_string(&result)?)?;
    let bleu = ours["bleu"]["score"].as_f64().context("bleu")?;
    let expected = reference["bleu"]["13a"]["corpus"]["exp"]["score"]
        .as_f64()
        .context("reference bleu")?;
    assert!(
        (bleu - expected).abs() < 5e-5,
        "BLEU {bleu} vs sacrebleu {expected}"
    );
    for rouge_type in ["rouge1", "rouge2", "rougeL", "rougeLsum"] {
        let f = ours["rouge"]["scores"][rouge_type]["fmeasure"]
            .as_f64()
            .context("rouge f")?;
        let expected = reference["rouge"]["default"]["mean"][rouge_type][2]
            .as_f64()
            .context("reference rouge")?;
        assert!(
            (f - expected).abs() < 5e-5,
            "{rouge_type} F1 {f} vs rouge-score {expected}"
        );
    }
    assert_eq!(
        ours["per_sample"].as_array().context("per_sample")?.len(),
        61
    );
    let html = std::fs::read_to_string(&report)?;
    assert!(html.contains("<svg") && html.contains("lowest-scoring") && !html.contains("<script"));
    Ok(())
}

#[test]
fn chinese_predictions_use_the_chinese_tokenizers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let predictions = dir.path().join("p.jsonl");
    let references = dir.path().join("r.jsonl");
    std::fs::write(
        &predictions,
        "{\"id\": 1, \"response\": \"验证码有效期为5分钟，连续失败3次后锁定账号。\"}\n",
    )?;
    std::fs::write(
        &references,
        "{\"id\": 1, \"output\": \"验证码5分钟内有效；连续输错3次，账号锁定。\"}\n",
    )?;
    let output = oxtune(&[
        "eval",
        "--predictions",
        path_str(&predictions)?,
        "--references",
        path_str(&references)?,
    ])?;
    ensure!(
        output.status.success(),
        "eval failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("p.eval.json"))?)?;
    assert!(
        result["bleu"]["signature"]
            .as_str()
            .context("signature")?
            .contains("tok:zh")
    );
    assert_eq!(result["rouge"]["tokenizer"], "jieba");
    assert!(dir.path().join("p.eval.html").exists());
    Ok(())
}

#[test]
fn bad_inputs_are_named_with_file_and_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let predictions = dir.path().join("p.jsonl");
    std::fs::write(
        &predictions,
        "{\"prediction\": \"a\", \"reference\": \"a\"}\n{\"prediction\": \n",
    )?;
    let output = oxtune(&["eval", "--predictions", path_str(&predictions)?])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("p.jsonl:2: not valid JSON"),
        "{stderr}"
    );

    std::fs::write(
        &predictions,
        "{\"prediction\": \"a\"}\n{\"prediction\": \"b\"}\n",
    )?;
    let references = dir.path().join("r.jsonl");
    std::fs::write(&references, "{\"reference\": \"a\"}\n")?;
    let output = oxtune(&[
        "eval",
        "--predictions",
        path_str(&predictions)?,
        "--references",
        path_str(&references)?,
    ])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success()
            && stderr.contains("p.jsonl has 2 rows but")
            && stderr.contains("r.jsonl has 1"),
        "{stderr}"
    );

    let output = oxtune(&[
        "eval",
        "--metrics",
        "bleu,bertscore",
        "--predictions",
        path_str(&predictions)?,
    ])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success()
            && stderr.contains("unknown metric `bertscore`")
            && stderr.contains("hint: available metrics: bleu, rouge"),
        "{stderr}"
    );

    let output = oxtune(&[
        "eval",
        "--predictions",
        path_str(&dir.path().join("missing.jsonl"))?,
    ])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success()
            && stderr.contains("cannot read")
            && stderr.contains("missing.jsonl"),
        "{stderr}"
    );
    Ok(())
}
