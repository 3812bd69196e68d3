//! End to end through the GGUF importer and the model code: logits of imported checkpoints
//! against transformers reading the same GGUF file (references by
//! `tools/make_gguf_fixtures.py`), and the demo model's greedy continuation.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use oxtune_models::LoadedModel;
use oxtune_models::gguf::{ImportOptions, import_with};
use oxtune_tensor::{D, DType, Device, Tensor};

fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

fn import_f32(gguf: &Path) -> anyhow::Result<(tempfile::TempDir, LoadedModel)> {
    let temp = tempfile::tempdir()?;
    let dir = temp.path().join("model");
    let options = ImportOptions {
        dtype: DType::F32,
        ..ImportOptions::default()
    };
    import_with(gguf, &dir, &options, &mut |_, _, _| {})?;
    let model = LoadedModel::load(&dir, &Device::Cpu, DType::F32)?;
    Ok((temp, model))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar()?)
}

#[test]
fn tiny_sentencepiece_llama_logits_match_transformers() -> anyhow::Result<()> {
    let (_temp, model) = import_f32(&repo("tests/fixtures/gguf/tiny_llama_spm.gguf"))?;
    let reference = oxtune_tensor::candle::safetensors::load(
        repo("tests/fixtures/gguf/tiny_llama_spm_logits.safetensors"),
        &Device::Cpu,
    )?;
    let input_ids = reference["input_ids"].to_dtype(DType::U32)?.unsqueeze(0)?;
    let logits = model
        .model
        .forward(&input_ids, &mut model.model.new_cache())?
        .squeeze(0)?;
    let diff = max_abs_diff(&logits, &reference["logits"])?;
    ensure!(diff <= 1e-4, "tiny SPM llama: max |diff| {diff:e}");
    Ok(())
}

/// The real SmolLM2-135M-Instruct Q4_1 file (fetched by `scripts/fetch-demo-model.sh`).
#[test]
fn smollm2_logits_and_greedy_match_transformers() -> anyhow::Result<()> {
    let gguf = repo("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    ensure!(
        gguf.is_file(),
        "{} is missing: run scripts/fetch-demo-model.sh first",
        gguf.display()
    );
    let (_temp, model) = import_f32(&gguf)?;
    let tensors = oxtune_tensor::candle::safetensors::load(
        repo("tests/fixtures/gguf/smollm2_logits.safetensors"),
        &Device::Cpu,
    )?;
    let input_ids = tensors["input_ids"].to_dtype(DType::U32)?.unsqueeze(0)?;
    let logits = model
        .model
        .forward(&input_ids, &mut model.model.new_cache())?
        .squeeze(0)?;
    let last = logits.dim(0)?;
    let diff = max_abs_diff(&logits.narrow(0, last - 4, 4)?, &tensors["logits"])?;
    ensure!(
        diff <= 5e-4,
        "SmolLM2: max |diff| of the last 4 positions {diff:e}"
    );

    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(repo(
        "tests/fixtures/gguf/smollm2_reference.json",
    ))?)?;
    let expected: Vec<u32> =
        serde_json::from_value(reference["greedy"]["new_ids"].clone()).context("greedy.new_ids")?;
    let mut cache = model.model.new_cache();
    let mut input = input_ids;
    let mut generated = Vec::new();
    for _ in 0..expected.len() {
        let next: u32 = model
            .model
            .forward_last(&input, &mut cache)?
            .argmax(D::Minus1)?
            .squeeze(0)?
            .to_scalar()?;
        generated.push(next);
        input = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
    }
    ensure!(
        generated == expected,
        "SmolLM2 greedy:\n  ours:   {generated:?}\n  theirs: {expected:?}"
    );
    Ok(())
}
