//! Every bad-input path of model loading gives an error that names the file, key or tensor
//! and says what to do. Each test damages a copy of a fixture model in a temporary directory.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use oxtune_models::LoadedModel;
use oxtune_tensor::{DType, Device};

fn copy_fixture(name: &str) -> anyhow::Result<(tempfile::TempDir, PathBuf)> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name);
    let temp = tempfile::tempdir()?;
    let dir = temp.path().join(name);
    std::fs::create_dir_all(&dir)?;
    for entry in
        std::fs::read_dir(&source).with_context(|| format!("reading {}", source.display()))?
    {
        let entry = entry?;
        std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
    }
    Ok((temp, dir))
}

fn load_error(dir: &Path) -> String {
    match LoadedModel::load(dir, &Device::Cpu, DType::F32) {
        Ok(_) => "loaded without error".into(),
        Err(error) => error.to_string(),
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> anyhow::Result<()> {
    let mut value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    edit(&mut value);
    std::fs::write(path, serde_json::to_string_pretty(&value)?)?;
    Ok(())
}

#[test]
fn missing_config_names_the_file() -> anyhow::Result<()> {
    let (_temp, dir) = copy_fixture("tiny-llama")?;
    std::fs::remove_file(dir.join("config.json"))?;
    let message = load_error(&dir);
    assert!(
        message.contains("config.json: missing") && message.contains("hint:"),
        "{message}"
    );
    Ok(())
}

#[test]
fn missing_weights_and_shards_are_named() -> anyhow::Result<()> {
    let (_temp, dir) = copy_fixture("tiny-llama")?;
    std::fs::remove_file(dir.join("model.safetensors"))?;
    let message = load_error(&dir);
    assert!(message.contains("model.safetensors: missing"), "{message}");

    let (_temp, dir) = copy_fixture("tiny-qwen3")?;
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.join("model.safetensors.index.json"),
    )?)?;
    let shard = index["weight_map"]["model.embed_tokens.weight"]
        .as_str()
        .context("a shard name")?
        .to_owned();
    std::fs::remove_file(dir.join(&shard))?;
    let message = load_error(&dir);
    assert!(
        message.contains(&shard) && message.contains("lists this shard"),
        "{message}"
    );
    Ok(())
}

#[test]
fn corrupt_safetensors_names_the_file() -> anyhow::Result<()> {
    let (_temp, dir) = copy_fixture("tiny-llama")?;
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path)?;
    std::fs::write(&path, &bytes[..bytes.len() / 2])?;
    let message = load_error(&dir);
    assert!(
        message.contains("model.safetensors: not a readable safetensors file"),
        "{message}"
    );
    assert!(message.contains("truncated or corrupt"), "{message}");
    Ok(())
}

#[test]
fn shape_mismatch_names_the_tensor() -> anyhow::Result<()> {
    let (_temp, dir) = copy_fixture("tiny-llama")?;
    edit_json(&dir.join("config.json"), |config| {
        config["intermediate_size"] = 96.into()
    })?;
    let message = load_error(&dir);
    assert!(
        message.contains("tensor `model.layers.0.mlp.gate_proj.weight`"),
        "{message}"
    );
    assert!(message.contains("[96, 64]"), "{message}");
    Ok(())
}

#[test]
fn missing_tensor_is_named() -> anyhow::Result<()> {
    let (_temp, dir) = copy_fixture("tiny-qwen2")?;
    // Qwen2 has q/k/v biases; declaring the checkpoint Qwen3 asks for q_norm, which it lacks.
    edit_json(&dir.join("config.json"), |config| {
        config["architectures"] = serde_json::json!(["Qwen3ForCausalLM"])
    })?;
    let message = load_error(&dir);
    assert!(
        message.contains("tensor `model.layers.0.self_attn.q_norm.weight` not found"),
        "{message}"
    );
    Ok(())
}

#[test]
fn unknown_architecture_lists_the_supported_ones() -> anyhow::Result<()> {
    let (_temp, dir) = copy_fixture("tiny-llama")?;
    edit_json(&dir.join("config.json"), |config| {
        config["architectures"] = serde_json::json!(["FalconForCausalLM"])
    })?;
    let message = load_error(&dir);
    assert!(
        message.contains("architecture `FalconForCausalLM` is not supported"),
        "{message}"
    );
    assert!(message.contains("Qwen3ForCausalLM"), "{message}");
    Ok(())
}

#[test]
fn bad_template_names_the_file_and_line() -> anyhow::Result<()> {
    let (_temp, dir) = copy_fixture("tiny-llama")?;
    let _ = std::fs::remove_file(dir.join("chat_template.jinja"));
    edit_json(&dir.join("tokenizer_config.json"), |config| {
        config["chat_template"] = "{% for m in messages %}\n{{ m.content }\n{% endfor %}".into();
    })?;
    let message = load_error(&dir);
    assert!(
        message.contains("tokenizer_config.json (key chat_template)"),
        "{message}"
    );
    assert!(message.contains("line 2"), "{message}");
    Ok(())
}

#[test]
fn broken_json_names_file_and_line() -> anyhow::Result<()> {
    let (_temp, dir) = copy_fixture("tiny-llama")?;
    std::fs::write(
        dir.join("config.json"),
        "{\n  \"architectures\": [\"LlamaForCausalLM\"],\n  oops\n}",
    )?;
    let message = load_error(&dir);
    assert!(
        message.contains("config.json is not valid JSON") && message.contains("line 3"),
        "{message}"
    );
    Ok(())
}
