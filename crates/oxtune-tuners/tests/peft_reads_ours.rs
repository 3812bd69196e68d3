//! peft loads the adapters oxtune writes. `tests/fixtures/peft/oxtune-saved/adapter/` was
//! written by [`oxtune_tuners::peft::save`] (regenerate with `OXTUNE_BLESS=1`), and
//! `tools/check_oxtune_adapter.py` loaded it with `peft.PeftModel.from_pretrained` and
//! recorded the logits (`peft_logits.safetensors`). This test checks that oxtune still writes
//! the same adapter, and that its logits with that adapter equal peft's.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use oxtune_models::{BatchLayout, LoadedModel};
use oxtune_tensor::{DType, Device, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The DoRA fixture adapter, changed so that it is no longer peft's own output: B x 1.5 and
/// the magnitudes x 1.01.
fn altered_tuner(model: &mut LoadedModel) -> anyhow::Result<oxtune_tuners::LoraTuner> {
    let tuner = oxtune_tuners::peft::load(
        &mut model.model,
        &fixtures().join("peft/tiny-llama-dora/adapter"),
        &Device::Cpu,
    )?;
    for (name, var) in tuner.trainable() {
        let factor = if name.contains("lora_B") {
            1.5
        } else if name.contains("magnitude") {
            1.01
        } else {
            1.0
        };
        var.set(&(var.as_tensor() * factor)?)?;
    }
    Ok(tuner)
}

#[test]
fn peft_reads_the_adapters_oxtune_writes() -> anyhow::Result<()> {
    let committed = fixtures().join("peft/oxtune-saved/adapter");
    let mut model = LoadedModel::load(&fixtures().join("tiny-llama"), &Device::Cpu, DType::F32)?;
    let tuner = altered_tuner(&mut model)?;
    let written = tempfile::tempdir()?;
    let target = if std::env::var_os("OXTUNE_BLESS").is_some() {
        committed.clone()
    } else {
        written.path().to_path_buf()
    };
    oxtune_tuners::peft::save(&tuner, &target, Some("tests/fixtures/tiny-llama"))?;

    // oxtune still writes what peft was shown.
    let ours = oxtune_tensor::candle::safetensors::load(
        target.join("adapter_model.safetensors"),
        &Device::Cpu,
    )?;
    let theirs = oxtune_tensor::candle::safetensors::load(
        committed.join("adapter_model.safetensors"),
        &Device::Cpu,
    )?;
    ensure!(
        ours.len() == theirs.len(),
        "{} tensors vs {}",
        ours.len(),
        theirs.len()
    );
    for (name, tensor) in &ours {
        let other = theirs
            .get(name)
            .with_context(|| format!("`{name}` not in the committed adapter"))?;
        let diff: f32 = (tensor - other)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar()?;
        ensure!(
            diff == 0.0,
            "`{name}` differs from the committed adapter by {diff:e}"
        );
    }
    let config = |dir: &Path| -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(
            dir.join("adapter_config.json"),
        )?)?)
    };
    ensure!(
        config(&target)? == config(&committed)?,
        "adapter_config.json changed"
    );

    // The logits peft computed with it are ours.
    let reference = oxtune_tensor::candle::safetensors::load(
        committed
            .parent()
            .context("parent")?
            .join("peft_logits.safetensors"),
        &Device::Cpu,
    )?;
    let batch = oxtune_tensor::candle::safetensors::load(
        fixtures().join("peft/batch.safetensors"),
        &Device::Cpu,
    )?;
    let input_ids = batch["input_ids"].to_dtype(DType::U32)?;
    let mask: Vec<Vec<i64>> = batch["attention_mask"].to_vec2()?;
    let lengths: Vec<usize> = mask
        .iter()
        .map(|row| row.iter().filter(|m| **m == 1).count())
        .collect();
    let (_, t) = input_ids.dims2()?;
    let logits = model.model.forward_batch(
        &input_ids,
        &BatchLayout::unpacked(&lengths, t, None, &Device::Cpu)?,
    )?;
    let expected: &Tensor = reference.get("logits").context("logits")?;
    for (row, &length) in lengths.iter().enumerate() {
        let diff: f32 = (logits.get(row)?.narrow(0, 0, length)?
            - expected.get(row)?.narrow(0, 0, length)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar()?;
        ensure!(
            diff <= 1e-4,
            "row {row}: oxtune vs peft logits differ by {diff:e}"
        );
    }
    Ok(())
}
