//! Exact resume: 8 steps straight vs 4 steps, stop, resume from the checkpoint for 4 more —
//! the losses are equal within 1e-6 (CPU f32), for LoRA with dropout and for full
//! fine-tuning with gradient accumulation and checkpointing.

use std::path::{Path, PathBuf};

use anyhow::ensure;
use oxtune_models::LoadedModel;
use oxtune_tensor::{DType, Device};
use oxtune_train::optimizer::{AdamWConfig, make_all_trainable};
use oxtune_train::schedule::{Schedule, ScheduleKind};
use oxtune_train::synthetic::SyntheticBatches;
use oxtune_train::trainer::{Observer, StepLog, Trainable, TrainerSettings, train};
use oxtune_tuners::{LoraSettings, LoraTuner, TargetModules};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// Two distinct micro-batches (so the loss can fall), served `total` times in all.
fn batches_of(total: usize) -> SyntheticBatches {
    SyntheticBatches::new(2, 12, 509, 2, total, &Device::Cpu)
}

struct Quiet;

impl Observer for Quiet {
    fn on_step(&mut self, _: &StepLog) {}
    fn on_eval(&mut self, _: usize, _: f64) {}
    fn on_save(&mut self, _: &Path) {}
}

fn settings(output_dir: &Path, accumulation: usize, checkpointing: bool) -> TrainerSettings {
    TrainerSettings {
        output_dir: output_dir.to_path_buf(),
        base_model_dir: fixture("tiny-qwen3"),
        schedule: Schedule::new(ScheduleKind::Cosine, 5e-3, 0.25, 8),
        adamw: AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        },
        gradient_accumulation_steps: accumulation,
        max_grad_norm: 1.0,
        logging_steps: 1,
        save_steps: 4,
        save_total_limit: Some(2),
        eval_steps: 0,
        gradient_checkpointing: checkpointing,
        max_consecutive_skipped_steps: 3,
        seed: 42,
    }
}

/// Builds a fresh model and what it trains.
fn build(full: bool) -> anyhow::Result<(LoadedModel, Trainable)> {
    let mut loaded = LoadedModel::load(&fixture("tiny-qwen3"), &Device::Cpu, DType::F32)?;
    let trainable = if full {
        Trainable::Full(make_all_trainable(&mut loaded.model)?)
    } else {
        let settings = LoraSettings {
            rank: 4,
            alpha: 8.0,
            dropout: 0.1,
            use_rslora: false,
            use_dora: true,
            target_modules: TargetModules::AllLinear,
        };
        Trainable::Lora(LoraTuner::attach(&mut loaded.model, &settings, 7)?)
    };
    Ok((loaded, trainable))
}

fn resume_equals_straight(
    full: bool,
    accumulation: usize,
    checkpointing: bool,
) -> anyhow::Result<()> {
    let batches = 8 * accumulation;
    let straight_dir = tempfile::tempdir()?;
    let (model, trainable) = build(full)?;
    let straight = train(
        &model.model,
        &trainable,
        &mut batches_of(batches),
        None,
        &settings(straight_dir.path(), accumulation, checkpointing),
        None,
        &mut Quiet,
    )?;
    ensure!(straight.losses.len() == 8, "8 steps");

    let resumed_dir = tempfile::tempdir()?;
    // First half: the same run stopped after step 4 (a 4-step budget with the 8-step schedule
    // would change the learning rates, so run the 8-step settings and stop at the save).
    let (model, trainable) = build(full)?;
    let mut first_settings = settings(resumed_dir.path(), accumulation, checkpointing);
    first_settings.save_steps = 4;
    let first = train(
        &model.model,
        &trainable,
        &mut batches_of(4 * accumulation),
        None,
        &first_settings,
        None,
        &mut Quiet,
    )?;
    ensure!(
        first.losses.len() == 4,
        "the first half stops when its data ends"
    );
    let checkpoint = oxtune_train::checkpoint::resolve_resume(resumed_dir.path(), "true")?;

    let (model, trainable) = build(full)?;
    let second = train(
        &model.model,
        &trainable,
        &mut batches_of(batches),
        None,
        &settings(resumed_dir.path(), accumulation, checkpointing),
        Some(&checkpoint),
        &mut Quiet,
    )?;
    let resumed: Vec<f64> = first.losses.iter().chain(&second.losses).copied().collect();
    ensure!(
        resumed.len() == 8,
        "resumed run has {} steps",
        resumed.len()
    );
    for (step, (a, b)) in straight.losses.iter().zip(&resumed).enumerate() {
        ensure!(
            (a - b).abs() <= 1e-6,
            "step {}: straight {a} vs resumed {b}\n  straight: {:?}\n  resumed:  {resumed:?}",
            step + 1,
            straight.losses
        );
    }
    ensure!(
        straight.losses[7] < straight.losses[0],
        "the loss falls: {:?}",
        straight.losses
    );
    Ok(())
}

#[test]
fn lora_with_dropout_resumes_exactly() -> anyhow::Result<()> {
    resume_equals_straight(false, 1, false)
}

#[test]
fn full_fine_tuning_with_accumulation_and_checkpointing_resumes_exactly() -> anyhow::Result<()> {
    resume_equals_straight(true, 2, true)
}

/// A model whose loss is not finite: every step is skipped (nothing is updated) and the run
/// stops after `max_consecutive_skipped_steps` with an error saying what to do.
#[test]
fn non_finite_steps_are_skipped_then_abort() -> anyhow::Result<()> {
    let (model, trainable) = build(true)?;
    if let Trainable::Full(parameters) = &trainable {
        let (_, norm) = parameters
            .iter()
            .find(|(name, _)| name == "model.norm.weight")
            .ok_or_else(|| anyhow::anyhow!("no final norm"))?;
        norm.set(&(norm.as_tensor() * f64::NAN)?)?;
    }
    let dir = tempfile::tempdir()?;
    let error = train(
        &model.model,
        &trainable,
        &mut batches_of(8),
        None,
        &settings(dir.path(), 1, false),
        None,
        &mut Quiet,
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    ensure!(
        error.contains("4 consecutive steps had a non-finite loss"),
        "{error}"
    );
    ensure!(error.contains("hint: lower learning_rate"), "{error}");
    let logged = std::fs::read_to_string(dir.path().join("logging.jsonl"))?;
    ensure!(logged.contains("\"skipped\":true"), "{logged}");
    Ok(())
}
