//! Every trainable parameter receives a finite gradient (an op without a backward would
//! leave it `None`), for LoRA, DoRA and full fine-tuning of each family; and the training
//! pass — the loss computed in chunks of token rows, with or without activation
//! checkpointing — gives the same loss and gradients as the plain backward of the whole
//! logits (to 1e-5 of each tensor's largest element: a re-run block sees its input as a
//! variable, so RMSNorm takes the differentiable path instead of the fused kernel, which
//! rounds differently in f32).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use oxtune_models::{BatchLayout, CausalLm, LoadedModel, TrainingPass};
use oxtune_tensor::{DType, Device, Tensor, Var};
use oxtune_train::loss::{causal_lm_loss_sum, causal_targets, cross_entropy_sum, target_count};
use oxtune_train::optimizer::{accumulate_gradients, make_all_trainable};
use oxtune_tuners::{LoraSettings, LoraTuner, TargetModules};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// A packed batch: row 0 holds two samples, row 1 one sample and padding.
fn batch() -> anyhow::Result<(Tensor, Tensor, BatchLayout)> {
    let ids: Vec<u32> = (0..32).map(|i| (i * 37 + 11) % 500).collect();
    let input_ids = Tensor::from_vec(ids, (2, 16), &Device::Cpu)?;
    let labels: Vec<i64> = (0..32)
        .map(|i| {
            if i % 16 < 3 || i >= 28 {
                -100
            } else {
                (i * 37 + 11) % 500
            }
        })
        .collect();
    let labels = Tensor::from_vec(labels, (2, 16), &Device::Cpu)?;
    let layout = BatchLayout::packed(&[vec![9, 7], vec![12]], 16, None, &Device::Cpu)?;
    Ok((input_ids, labels, layout))
}

fn loss_of(logits: &Tensor, labels: &Tensor) -> oxtune_models::Result<Tensor> {
    let (sum, count) = causal_lm_loss_sum(logits, labels)
        .map_err(|e| oxtune_tensor::candle::Error::Msg(e.to_string()))?;
    #[expect(clippy::cast_precision_loss, reason = "token counts")]
    Ok((sum / count as f64)?)
}

/// The loss and gradients of the plain graph (`pass` = None) or of a training pass.
fn gradients(
    model: &CausalLm,
    parameters: &[(String, Var)],
    pass: Option<TrainingPass>,
) -> anyhow::Result<(f32, HashMap<String, Tensor>)> {
    let (input_ids, labels, layout) = batch()?;
    let (loss, store) = match pass {
        Some(pass) => {
            let targets = causal_targets(&labels)?;
            #[expect(clippy::cast_precision_loss, reason = "token counts")]
            let scale = 1.0 / target_count(&targets) as f64;
            model.forward_backward(&input_ids, &layout, pass, |logits, rows| {
                let sum = cross_entropy_sum(logits, &targets[rows])
                    .map_err(|e| oxtune_tensor::candle::Error::Msg(e.to_string()))?;
                Ok((sum * scale)?)
            })?
        }
        None => {
            let loss = loss_of(&model.forward_batch(&input_ids, &layout)?, &labels)?;
            let store = loss.backward()?;
            (loss, store)
        }
    };
    let mut grads = HashMap::new();
    accumulate_gradients(parameters, &store, &mut grads)?;
    Ok((loss.to_scalar()?, grads))
}

fn check(model: &CausalLm, parameters: &[(String, Var)], what: &str) -> anyhow::Result<()> {
    let (plain_loss, plain) = gradients(model, parameters, None)?;
    ensure!(!parameters.is_empty(), "{what}: nothing to train");
    // 32 token rows in chunks of 5 (chunks cross batch rows) or all at once.
    for (checkpoint, loss_chunk_rows) in [
        (false, 5),
        (true, 5),
        (false, 1000),
        (true, 32),
        (true, 31),
        (true, 1000),
    ] {
        let pass = TrainingPass {
            checkpoint,
            loss_chunk_rows,
        };
        let (loss, grads) = gradients(model, parameters, Some(pass))?;
        ensure!(
            (loss - plain_loss).abs() <= 1e-5 * plain_loss.abs(),
            "{what}: {pass:?} loss {loss} != {plain_loss}"
        );
        compare(parameters, &plain, &grads, &format!("{what} {pass:?}"))?;
    }
    Ok(())
}

fn compare(
    parameters: &[(String, Var)],
    plain: &HashMap<String, Tensor>,
    checkpointed: &HashMap<String, Tensor>,
    what: &str,
) -> anyhow::Result<()> {
    for (name, _) in parameters {
        let grad = &plain[name];
        let norm: f32 = grad.sqr()?.sum_all()?.to_scalar()?;
        ensure!(norm.is_finite(), "{what}: gradient of {name} is not finite");
        let scale: f32 = grad.abs()?.flatten_all()?.max(0)?.to_scalar()?;
        let diff: f32 = (grad - &checkpointed[name])?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar()?;
        ensure!(
            diff <= 1e-5 * scale.max(1e-6),
            "{what}: gradient of {name} differs by {diff:e} (scale {scale:e})"
        );
    }
    Ok(())
}

fn lora(model_name: &str, use_dora: bool) -> anyhow::Result<()> {
    let mut loaded = LoadedModel::load(&fixture(model_name), &Device::Cpu, DType::F32)?;
    let settings = LoraSettings {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        use_dora,
        target_modules: TargetModules::AllLinear,
    };
    let tuner = LoraTuner::attach(&mut loaded.model, &settings, 7)?;
    // peft initialises B to zero, which would leave A without gradient: perturb B first.
    for (_, var) in tuner
        .trainable()
        .iter()
        .filter(|(name, _)| name.contains("lora_B"))
    {
        var.set(&Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu)?)?;
    }
    check(
        &loaded.model,
        &tuner.trainable(),
        &format!("{model_name} {}", if use_dora { "dora" } else { "lora" }),
    )
}

#[test]
fn lora_every_family() -> anyhow::Result<()> {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
        lora(name, false).with_context(|| name.to_owned())?;
    }
    Ok(())
}

#[test]
fn dora_every_family() -> anyhow::Result<()> {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
        lora(name, true).with_context(|| name.to_owned())?;
    }
    Ok(())
}

#[test]
fn full_fine_tuning_every_family() -> anyhow::Result<()> {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
        let mut loaded = LoadedModel::load(&fixture(name), &Device::Cpu, DType::F32)?;
        let parameters = make_all_trainable(&mut loaded.model)?;
        check(&loaded.model, &parameters, &format!("{name} full"))
            .with_context(|| name.to_owned())?;
    }
    Ok(())
}

/// Two samples packed into one row give the loss and gradients of the same two samples as
/// separate rows: attention never crosses the samples, positions restart at each.
#[test]
fn packed_rows_train_like_separate_rows() -> anyhow::Result<()> {
    let mut loaded = LoadedModel::load(&fixture("tiny-qwen3"), &Device::Cpu, DType::F32)?;
    let parameters = make_all_trainable(&mut loaded.model)?;
    let first: Vec<u32> = (0..9).map(|i| (i * 53 + 5) % 500).collect();
    let second: Vec<u32> = (0..7).map(|i| (i * 71 + 3) % 500).collect();
    let labels_of = |ids: &[u32]| -> Vec<i64> {
        ids.iter()
            .enumerate()
            .map(|(i, &id)| if i == 0 { -100 } else { i64::from(id) })
            .collect()
    };

    let mut separate_ids = first.clone();
    separate_ids.extend(second.iter().copied().chain(std::iter::repeat_n(0, 2)));
    let mut separate_labels = labels_of(&first);
    separate_labels.extend(
        labels_of(&second)
            .into_iter()
            .chain(std::iter::repeat_n(-100, 2)),
    );
    let separate = (
        Tensor::from_vec(separate_ids, (2, 9), &Device::Cpu)?,
        Tensor::from_vec(separate_labels, (2, 9), &Device::Cpu)?,
        BatchLayout::unpacked(&[9, 7], 9, None, &Device::Cpu)?,
    );
    let packed_ids: Vec<u32> = first.iter().chain(&second).copied().collect();
    let packed_labels: Vec<i64> = labels_of(&first)
        .into_iter()
        .chain(labels_of(&second))
        .collect();
    let packed = (
        Tensor::from_vec(packed_ids, (1, 16), &Device::Cpu)?,
        Tensor::from_vec(packed_labels, (1, 16), &Device::Cpu)?,
        BatchLayout::packed(&[vec![9, 7]], 16, None, &Device::Cpu)?,
    );
    let run = |(ids, labels, layout): &(Tensor, Tensor, BatchLayout)| -> anyhow::Result<(f32, HashMap<String, Tensor>)> {
        let loss = loss_of(&loaded.model.forward_batch(ids, layout)?, labels)?;
        let mut grads = HashMap::new();
        accumulate_gradients(&parameters, &loss.backward()?, &mut grads)?;
        Ok((loss.to_scalar()?, grads))
    };
    let (separate_loss, separate_grads) = run(&separate)?;
    let (packed_loss, packed_grads) = run(&packed)?;
    ensure!(
        (separate_loss - packed_loss).abs() <= 1e-5,
        "loss {separate_loss} vs {packed_loss}"
    );
    for (name, _) in &parameters {
        let scale: f32 = separate_grads[name]
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar()?;
        let diff: f32 = (&separate_grads[name] - &packed_grads[name])?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar()?;
        ensure!(
            diff <= 1e-5 * scale.max(1e-6),
            "packed gradient of {name} differs by {diff:e}"
        );
    }
    Ok(())
}
