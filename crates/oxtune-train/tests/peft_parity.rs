//! Training parity with peft / transformers / torch on the tiny fixture models
//! (`tests/fixtures/peft/`, made by `tools/make_peft_fixtures.py`): loss, logits, every
//! LoRA / rsLoRA / DoRA / full-fine-tuning gradient, and two AdamW steps; gradient
//! accumulation normalised by target tokens, with clipping.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use oxtune_models::{BatchLayout, CausalLm, LoadedModel};
use oxtune_tensor::{DType, Device, Tensor, Var};
use oxtune_train::loss::causal_lm_loss_sum;
use oxtune_train::optimizer::{
    AdamW, AdamWConfig, accumulate_gradients, clip_factor, make_all_trainable,
};

const RELATIVE: f32 = 1e-4;
/// One AdamW step from the reference gradients equals torch's to this (lr = 1e-3).
const ADAMW_ABSOLUTE: f32 = 1e-6;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load_tensors(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    oxtune_tensor::candle::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))
}

struct Batch {
    input_ids: Tensor,
    labels: Tensor,
    lengths: Vec<usize>,
}

fn batch(rows: &[usize]) -> anyhow::Result<Batch> {
    let tensors = load_tensors(&fixtures().join("peft/batch.safetensors"))?;
    let pick = |name: &str| -> anyhow::Result<Tensor> {
        let all = tensors.get(name).context(name.to_owned())?;
        let index = Tensor::new(
            rows.iter()
                .map(|&r| u32::try_from(r))
                .collect::<Result<Vec<_>, _>>()?,
            &Device::Cpu,
        )?;
        Ok(all.index_select(&index, 0)?)
    };
    let mask: Vec<Vec<i64>> = pick("attention_mask")?.to_vec2()?;
    let lengths = mask
        .iter()
        .map(|row| row.iter().filter(|m| **m == 1).count())
        .collect();
    Ok(Batch {
        input_ids: pick("input_ids")?.to_dtype(DType::U32)?,
        labels: pick("labels")?,
        lengths,
    })
}

/// Forward + summed loss + backward over `batch`, gradients added to `grads` scaled by
/// 1 / `normaliser`. Returns (loss, logits).
fn step_gradients(
    model: &CausalLm,
    parameters: &[(String, Var)],
    batch: &Batch,
    normaliser: usize,
    grads: &mut HashMap<String, Tensor>,
) -> anyhow::Result<(f32, Tensor)> {
    let (_, t) = batch.input_ids.dims2()?;
    let layout = BatchLayout::unpacked(&batch.lengths, t, None, &Device::Cpu)?;
    let logits = model.forward_batch(&batch.input_ids, &layout)?;
    let (sum, _) = causal_lm_loss_sum(&logits, &batch.labels)?;
    #[expect(clippy::cast_precision_loss, reason = "token counts")]
    let loss = (sum / normaliser as f64)?;
    let store = loss.backward()?;
    accumulate_gradients(parameters, &store, grads)?;
    Ok((loss.to_scalar()?, logits))
}

/// Relative error max|a - b| / max|b|, with the first values side by side on failure.
fn check_relative(
    name: &str,
    ours: &Tensor,
    theirs: &Tensor,
    tolerance: f32,
) -> anyhow::Result<()> {
    ensure!(
        ours.dims() == theirs.dims(),
        "{name}: shape {:?} vs {:?}",
        ours.dims(),
        theirs.dims()
    );
    let ours: Vec<f32> = ours.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let theirs: Vec<f32> = theirs.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let diff = ours
        .iter()
        .zip(&theirs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    ensure!(
        diff / scale <= tolerance,
        "{name}: relative error {:e} > {tolerance:e}\n  ours:   {:?}\n  theirs: {:?}",
        diff / scale,
        &ours[..5.min(ours.len())],
        &theirs[..5.min(theirs.len())]
    );
    Ok(())
}

fn check_absolute(
    name: &str,
    ours: &Tensor,
    theirs: &Tensor,
    tolerance: f32,
) -> anyhow::Result<()> {
    let diff: f32 = (ours.to_dtype(DType::F32)? - theirs.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar()?;
    ensure!(
        diff <= tolerance,
        "{name}: max |diff| {diff:e} > {tolerance:e}"
    );
    Ok(())
}

fn adamw() -> AdamWConfig {
    AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    }
}

/// The reference's key for one of our parameter names (peft keeps `.default` in its
/// in-memory names).
fn reference_key(prefix: &str, name: &str) -> String {
    let peft = name
        .replace(".lora_A.weight", ".lora_A.default.weight")
        .replace(".lora_B.weight", ".lora_B.default.weight")
        .replace(
            ".lora_magnitude_vector",
            ".lora_magnitude_vector.default.weight",
        );
    format!("{prefix}.{peft}")
}

/// Loss, logits at real tokens, gradients, and two AdamW steps against the reference:
/// first the optimizer alone (fed the reference gradients), then end to end.
fn check_training(
    case: &str,
    build: impl Fn() -> anyhow::Result<(LoadedModel, Vec<(String, Var)>)>,
) -> anyhow::Result<()> {
    let reference = load_tensors(&fixtures().join(format!("peft/{case}/reference.safetensors")))?;
    let get = |key: String| {
        reference
            .get(&key)
            .cloned()
            .with_context(|| format!("{case}: reference has no `{key}`"))
    };
    let batch = batch(&[0, 1])?;
    let targets = target_count(&batch.labels)?;

    // The optimizer alone: torch's gradients in, torch's parameters out, for each step the
    // reference records.
    let (_model, parameters) = build()?;
    let mut optimizer = AdamW::new(parameters.clone(), adamw())?;
    for (grad_prefix, param_prefix) in [("grad", "after_step"), ("grad_step2", "after_step2")] {
        if !reference.contains_key(&reference_key(grad_prefix, &parameters[0].0)) {
            break;
        }
        let reference_grads = parameters
            .iter()
            .map(|(name, _)| Ok((name.clone(), get(reference_key(grad_prefix, name))?)))
            .collect::<anyhow::Result<HashMap<_, _>>>()?;
        optimizer.step(&reference_grads, 1e-3)?;
        for (name, var) in &parameters {
            check_absolute(
                &format!("{case} AdamW {param_prefix} {name}"),
                var.as_tensor(),
                &get(reference_key(param_prefix, name))?,
                ADAMW_ABSOLUTE,
            )?;
        }
    }

    // End to end: our loss, logits and gradients; then our own step, after which the loss
    // must equal torch's loss after its step (parameters are not compared element-wise here:
    // a near-zero gradient element may flip sign within the gradient tolerance and move its
    // Adam update by up to 2 lr).
    let (model, parameters) = build()?;
    let mut grads = HashMap::new();
    let (loss, logits) = step_gradients(&model.model, &parameters, &batch, targets, &mut grads)?;
    check_scalar(&format!("{case} loss"), loss, &get("loss".into())?)?;
    if let Some(expected) = reference.get("logits") {
        for (row, &length) in batch.lengths.iter().enumerate() {
            let ours = logits.get(row)?.narrow(0, 0, length)?;
            let theirs = expected.get(row)?.narrow(0, 0, length)?;
            check_relative(
                &format!("{case} logits row {row}"),
                &ours,
                &theirs,
                RELATIVE,
            )?;
        }
    }
    for (name, _) in &parameters {
        check_relative(
            &format!("{case} grad {name}"),
            &grads[name],
            &get(reference_key("grad", name))?,
            RELATIVE,
        )?;
    }
    AdamW::new(parameters.clone(), adamw())?.step(&grads, 1e-3)?;
    if let Some(expected) = reference.get("loss_step2") {
        let (loss, _) = step_gradients(
            &model.model,
            &parameters,
            &batch,
            targets,
            &mut HashMap::new(),
        )?;
        check_scalar(&format!("{case} loss after one step"), loss, expected)?;
    }
    Ok(())
}

fn check_scalar(name: &str, ours: f32, theirs: &Tensor) -> anyhow::Result<()> {
    let theirs: f32 = theirs
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?[0];
    ensure!(
        ((ours - theirs) / theirs).abs() <= RELATIVE,
        "{name}: {ours} vs {theirs}"
    );
    Ok(())
}

/// Positions whose next token is a target (labels shifted by one, -100 ignored).
fn target_count(labels: &Tensor) -> anyhow::Result<usize> {
    let labels: Vec<Vec<i64>> = labels.to_vec2()?;
    Ok(labels
        .iter()
        .map(|row| row.iter().skip(1).filter(|l| **l != -100).count())
        .sum())
}

fn lora_case(model_name: &str, variant: &str) -> anyhow::Result<()> {
    let case = format!("{model_name}-{variant}");
    check_training(&case, || {
        let mut loaded = LoadedModel::load(&fixtures().join(model_name), &Device::Cpu, DType::F32)?;
        let tuner = oxtune_tuners::peft::load(
            &mut loaded.model,
            &fixtures().join(format!("peft/{case}/adapter")),
            &Device::Cpu,
        )?;
        Ok((loaded, tuner.trainable()))
    })
}

#[test]
fn llama_lora() -> anyhow::Result<()> {
    lora_case("tiny-llama", "lora")
}

#[test]
fn llama_rslora() -> anyhow::Result<()> {
    lora_case("tiny-llama", "rslora")
}

#[test]
fn llama_dora() -> anyhow::Result<()> {
    lora_case("tiny-llama", "dora")
}

#[test]
fn qwen3_lora() -> anyhow::Result<()> {
    lora_case("tiny-qwen3", "lora")
}

#[test]
fn qwen3_rslora() -> anyhow::Result<()> {
    lora_case("tiny-qwen3", "rslora")
}

#[test]
fn qwen3_dora() -> anyhow::Result<()> {
    lora_case("tiny-qwen3", "dora")
}

#[test]
fn qwen2_dora() -> anyhow::Result<()> {
    lora_case("tiny-qwen2", "dora")
}

#[test]
fn qwen3_full_fine_tuning() -> anyhow::Result<()> {
    check_training("tiny-qwen3-full", || {
        let mut loaded =
            LoadedModel::load(&fixtures().join("tiny-qwen3"), &Device::Cpu, DType::F32)?;
        let parameters = make_all_trainable(&mut loaded.model)?;
        Ok((loaded, parameters))
    })
}

/// Two micro-batches of one row, each normalised by the step's total target tokens,
/// accumulated, clipped to a global norm of 0.5, then one AdamW step.
#[test]
fn accumulation_and_clipping() -> anyhow::Result<()> {
    let mut loaded = LoadedModel::load(&fixtures().join("tiny-llama"), &Device::Cpu, DType::F32)?;
    let tuner = oxtune_tuners::peft::load(
        &mut loaded.model,
        &fixtures().join("peft/tiny-llama-lora/adapter"),
        &Device::Cpu,
    )?;
    let parameters = tuner.trainable();
    let reference =
        load_tensors(&fixtures().join("peft/tiny-llama-lora-accum/reference.safetensors"))?;
    let total_targets = 19; // reference.json: micro_target_tokens [11, 8]
    let mut grads = HashMap::new();
    for row in 0..2 {
        step_gradients(
            &loaded.model,
            &parameters,
            &batch(&[row])?,
            total_targets,
            &mut grads,
        )?;
    }
    let (norm, factor) = clip_factor(&grads, 0.5)?;
    let expected_norm: f32 = reference["grad_norm_before_clip"]
        .flatten_all()?
        .to_vec1::<f32>()?[0];
    #[expect(clippy::cast_possible_truncation, reason = "comparison in f32")]
    let norm = norm as f32;
    ensure!(
        ((norm - expected_norm) / expected_norm).abs() <= RELATIVE,
        "grad norm {norm} vs {expected_norm}"
    );
    for grad in grads.values_mut() {
        *grad = (&*grad * factor)?;
    }
    for (name, _) in &parameters {
        check_relative(
            &format!("clipped grad {name}"),
            &grads[name],
            &reference[&reference_key("grad", name)],
            RELATIVE,
        )?;
    }
    let reference_grads: HashMap<String, Tensor> = parameters
        .iter()
        .map(|(name, _)| {
            (
                name.clone(),
                reference[&reference_key("grad", name)].clone(),
            )
        })
        .collect();
    AdamW::new(parameters.clone(), adamw())?.step(&reference_grads, 1e-3)?;
    for (name, var) in &parameters {
        check_absolute(
            &format!("accumulated step {name}"),
            var.as_tensor(),
            &reference[&reference_key("after_step", name)],
            ADAMW_ABSOLUTE,
        )?;
    }
    Ok(())
}
