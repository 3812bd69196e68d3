//! `oxtune data` through the real binary: the scrub of the example PRD dataset (every planted
//! item replaced, every look-alike kept, both reported), check, stats, dedup, split, and the
//! errors for bad input.

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

fn succeed(args: &[&str]) -> anyhow::Result<String> {
    let output = oxtune(args)?;
    ensure!(
        output.status.success(),
        "oxtune {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

fn fail(args: &[&str]) -> anyhow::Result<String> {
    let output = oxtune(args)?;
    ensure!(
        !output.status.success(),
        "oxtune {args:?} should have failed"
    );
    Ok(String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout))
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("utf-8 path")
}

#[test]
fn scrubbing_the_example_prd_dataset_removes_every_planted_item_and_keeps_look_alikes()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let input = repo_path("examples/prd-assistant/data/prd_data_with_pii.jsonl");
    let config = repo_path("examples/prd-assistant/scrub.yaml");
    let output = dir.path().join("scrubbed.jsonl");
    let report = dir.path().join("report");
    let before = std::fs::read(&input)?;
    let stdout = succeed(&[
        "data",
        "scrub",
        "--input",
        path_str(&input)?,
        "--output",
        path_str(&output)?,
        "--config",
        path_str(&config)?,
        "--report",
        path_str(&report)?,
    ])?;
    assert_eq!(
        std::fs::read(&input)?,
        before,
        "the input is never modified"
    );

    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(repo_path(
        "examples/prd-assistant/data/planted_pii.json",
    ))?)?;
    let scrubbed = std::fs::read_to_string(&output)?;
    // Compare decoded text too, so JSON escaping cannot hide a value.
    let decoded: Vec<Value> = scrubbed
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let text = decoded.iter().map(row_text).collect::<Vec<_>>().join("\n");
    let mut left = Vec::new();
    let mut expected_counts = std::collections::BTreeMap::<String, u64>::new();
    for planted in manifest["planted"].as_array().context("planted")? {
        let value = planted["value"].as_str().context("value")?;
        if text.contains(value) || scrubbed.contains(value) {
            left.push(value.to_owned());
        }
        *expected_counts
            .entry(planted["kind"].as_str().context("kind")?.to_owned())
            .or_default() += 1;
    }
    assert!(
        left.is_empty(),
        "planted values left in the output: {left:?}"
    );
    let removed: Vec<&str> = manifest["look_alikes"]
        .as_array()
        .context("look_alikes")?
        .iter()
        .filter_map(Value::as_str)
        .filter(|v| !text.contains(v))
        .collect();
    assert!(
        removed.is_empty(),
        "look-alikes that were replaced: {removed:?}"
    );

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json"))?)?;
    let counts: std::collections::BTreeMap<String, u64> = report["by_kind"]
        .as_object()
        .context("by_kind")?
        .iter()
        .map(|(k, v)| (k.clone(), v["count"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(counts, expected_counts, "findings per kind");
    assert!(
        report["look_alikes_left"]
            .as_u64()
            .context("look_alikes_left")?
            >= 5
    );
    assert_eq!(report["records"], 25);
    let html = std::fs::read_to_string(dir.path().join("report.html"))?;
    assert!(html.contains("Look-alikes left in place") && html.contains("ID_CARD"));
    for planted in manifest["planted"].as_array().context("planted")? {
        let value = planted["value"].as_str().context("value")?;
        assert!(
            !html.contains(value) && !report.to_string().contains(value),
            "the report shows {value} unmasked"
        );
    }
    assert!(stdout.contains("33 findings replaced"), "{stdout}");
    Ok(())
}

fn row_text(row: &Value) -> String {
    match row {
        Value::String(text) => text.clone(),
        Value::Array(items) => items.iter().map(row_text).collect::<Vec<_>>().join("\n"),
        Value::Object(map) => map.values().map(row_text).collect::<Vec<_>>().join("\n"),
        _ => String::new(),
    }
}

#[test]
fn scrub_placeholders_csv_and_refusing_to_overwrite_the_input() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("raw.csv");
    std::fs::write(
        &input,
        "query,response\n\"我的邮箱是 a.b@example.com\",收到\n",
    )?;
    let output = dir.path().join("clean.csv");
    succeed(&[
        "data",
        "scrub",
        "--input",
        path_str(&input)?,
        "--output",
        path_str(&output)?,
        "--replace",
        "placeholder",
    ])?;
    assert_eq!(
        std::fs::read_to_string(&output)?,
        "query,response\n我的邮箱是 <EMAIL>,收到\n"
    );
    assert!(dir.path().join("clean.scrub_report.html").exists());
    let error = fail(&[
        "data",
        "scrub",
        "--input",
        path_str(&input)?,
        "--output",
        path_str(&input)?,
    ])?;
    assert!(
        error.contains("is the input file") && error.contains("hint:"),
        "{error}"
    );
    Ok(())
}

#[test]
fn check_prints_file_and_line_for_every_problem() -> anyhow::Result<()> {
    let clean = succeed(&[
        "data",
        "check",
        "--input",
        path_str(&repo_path("examples/prd-assistant/data/prd_data.jsonl"))?,
    ])?;
    assert!(
        clean.contains("30 records (alpaca 30), 0 errors"),
        "{clean}"
    );

    let dir = tempfile::tempdir()?;
    let input = dir.path().join("bad.jsonl");
    std::fs::write(
        &input,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n{\"messages\": \n",
    )?;
    let output = fail(&["data", "check", "--input", path_str(&input)?])?;
    assert!(
        output.contains("bad.jsonl:2: error: messages[0]: the last turn is user"),
        "{output}"
    );
    assert!(
        output.contains("bad.jsonl:3: error: not valid JSON"),
        "{output}"
    );
    assert!(output.contains("has 2 errors"), "{output}");
    Ok(())
}

#[test]
fn stats_counts_tokens_and_draws_a_histogram() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let png = dir.path().join("lengths.png");
    let json = dir.path().join("stats.json");
    let input = repo_path("examples/prd-assistant/data/prd_data.jsonl");
    let model = repo_path("tests/fixtures/tiny-qwen3");
    let stdout = succeed(&[
        "data",
        "stats",
        "--input",
        path_str(&input)?,
        "--model",
        path_str(&model)?,
        "--max_length",
        "200",
        "--histogram",
        path_str(&png)?,
        "--json",
        path_str(&json)?,
    ])?;
    assert!(stdout.contains("30 records"), "{stdout}");
    assert_eq!(&std::fs::read(&png)?[..4], b"\x89PNG");
    let stats: Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    assert_eq!(stats["records"], 30);
    assert!(
        stats["tokens"]["per_record"]["max"]
            .as_u64()
            .context("max tokens")?
            > 50
    );
    let error = fail(&[
        "data",
        "stats",
        "--input",
        path_str(&input)?,
        "--model",
        path_str(&dir.path().join("nowhere"))?,
    ])?;
    assert!(
        error.contains("tokenizer.json") && error.contains("hint:"),
        "{error}"
    );
    Ok(())
}

#[test]
fn dedup_and_split() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("d.jsonl");
    let clean = std::fs::read_to_string(repo_path("examples/prd-assistant/data/prd_data.jsonl"))?;
    let first = clean.lines().next().context("a row")?;
    let near = first.replace("10分钟", "15分钟");
    std::fs::write(&input, format!("{clean}{first}\n{near}\n"))?;
    let output = dir.path().join("dedup.jsonl");
    let stdout = succeed(&[
        "data",
        "dedup",
        "--input",
        path_str(&input)?,
        "--output",
        path_str(&output)?,
    ])?;
    assert!(
        stdout.contains("32 records in, 1 exact duplicates, 1 near duplicates"),
        "{stdout}"
    );
    assert_eq!(std::fs::read_to_string(&output)?, clean);

    let stdout = succeed(&[
        "data",
        "split",
        "--input",
        path_str(&output)?,
        "--val_ratio",
        "0.2",
        "--seed",
        "3",
    ])?;
    assert!(stdout.contains("30 records: 24 train"), "{stdout}");
    let train = std::fs::read_to_string(dir.path().join("dedup.train.jsonl"))?;
    let again = dir.path().join("again.jsonl");
    succeed(&[
        "data",
        "split",
        "--input",
        path_str(&output)?,
        "--val_ratio",
        "0.2",
        "--seed",
        "3",
        "--train",
        path_str(&again)?,
        "--val",
        path_str(&dir.path().join("again.val.jsonl"))?,
    ])?;
    assert_eq!(
        std::fs::read_to_string(&again)?,
        train,
        "the same seed gives the same split"
    );
    Ok(())
}

#[test]
fn unreadable_and_unknown_inputs_are_clear_errors() -> anyhow::Result<()> {
    let error = fail(&["data", "check", "--input", "no/such/file.jsonl"])?;
    assert!(error.contains("cannot read no/such/file.jsonl"), "{error}");
    let dir = tempfile::tempdir()?;
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "hello")?;
    let error = fail(&["data", "check", "--input", path_str(&text)?])?;
    assert!(
        error.contains("cannot tell the file type") && error.contains("hint:"),
        "{error}"
    );
    Ok(())
}
