//! The training loop, top to bottom for each optimizer step:
//! learning rate from the schedule -> micro-batches (forward, loss summed over target
//! tokens, divided by the step's total target tokens, backward, gradients accumulated) ->
//! non-finite guard -> clip -> AdamW -> log -> evaluate -> checkpoint.
//!
//! Exact resume: the schedule is a function of the step, the optimizer state, trainable
//! weights and the data cursor are in the checkpoint, and dropout masks are seeded from
//! (seed, step, micro-batch); so a run resumed at step k continues with the very losses the
//! uninterrupted run had.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use oxtune_models::{BatchLayout, CausalLm, TrainingPass};
use oxtune_tensor::{DType, Device, Tensor, Var};
use oxtune_tuners::LoraTuner;

use crate::checkpoint::{self, OPTIMIZER_STATE, TrainerState};
use crate::loss::{causal_targets, cross_entropy_sum, target_count};
use crate::optimizer::{AdamW, AdamWConfig, GradientAccumulator, clip_factor};
use crate::schedule::Schedule;
use crate::{Error, Result};

/// One micro-batch, as tensors on the model's device.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    /// (b, t) u32
    pub input_ids: Tensor,
    /// (b, t) i64, -100 where there is no target
    pub labels: Tensor,
    pub layout: BatchLayout,
    /// Positions with a target (after the shift by one).
    pub target_tokens: usize,
    /// Real (non-padding) tokens, for tokens/s.
    pub tokens: usize,
}

/// Where micro-batches come from.
pub trait BatchSource {
    /// The next micro-batch; `None` when the data is exhausted.
    fn next_batch(&mut self) -> Result<Option<MicroBatch>>;
    /// A serialisable position from which [`BatchSource::seek`] continues exactly.
    fn cursor(&self) -> serde_json::Value;
    fn seek(&mut self, cursor: &serde_json::Value) -> Result<()>;
    /// Epochs completed, fractional.
    fn epoch(&self) -> f64;
}

/// What is trained.
#[derive(Debug)]
pub enum Trainable {
    /// LoRA / rsLoRA / DoRA adapters on a frozen model.
    Lora(LoraTuner),
    /// Every weight of the model (`make_all_trainable`), by checkpoint name.
    Full(Vec<(String, Var)>),
}

impl Trainable {
    pub fn parameters(&self) -> Vec<(String, Var)> {
        match self {
            Self::Lora(tuner) => tuner.trainable(),
            Self::Full(parameters) => parameters.clone(),
        }
    }

    fn set_training(&self, training: bool, dropout_seed: u64) {
        if let Self::Lora(tuner) = self {
            tuner.set_training(training);
            tuner.set_dropout_seed(dropout_seed);
        }
    }

    /// Writes the trained weights into `dir`: a peft adapter, or a full Hugging Face
    /// checkpoint (weights plus the base model's config and tokenizer files).
    pub fn save(&self, dir: &Path, base_model_dir: &Path) -> Result<()> {
        match self {
            Self::Lora(tuner) => Ok(oxtune_tuners::peft::save(
                tuner,
                dir,
                Some(&base_model_dir.display().to_string()),
            )?),
            Self::Full(parameters) => {
                let tensors: HashMap<String, Tensor> = parameters
                    .iter()
                    .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
                    .collect();
                oxtune_tensor::candle::safetensors::save(&tensors, dir.join("model.safetensors"))?;
                let config = base_model_dir.join("config.json");
                std::fs::copy(&config, dir.join("config.json"))
                    .map_err(|e| Error::State(format!("{}: {e}", config.display())))?;
                oxtune_models::checkpoint::copy_companion_files(base_model_dir, dir)?;
                Ok(())
            }
        }
    }

    /// Restores trained weights saved by [`Trainable::save`].
    fn load(&self, dir: &Path, device: &Device) -> Result<()> {
        let file = match self {
            Self::Lora(_) => dir.join(oxtune_tuners::peft::WEIGHTS_FILE),
            Self::Full(_) => dir.join("model.safetensors"),
        };
        let tensors = oxtune_tensor::candle::safetensors::load(&file, device)?;
        for (name, var) in self.parameters() {
            let tensor = tensors
                .get(&name)
                .ok_or_else(|| Error::State(format!("{}: `{name}` missing\nhint: the checkpoint was written for another model or tuner", file.display())))?;
            var.set(&tensor.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}

/// The loop's knobs (the recipe maps the user's config onto these).
#[derive(Debug, Clone)]
pub struct TrainerSettings {
    pub output_dir: PathBuf,
    /// The base model's directory, whose config and tokenizer a full checkpoint copies.
    pub base_model_dir: PathBuf,
    pub schedule: Schedule,
    pub adamw: AdamWConfig,
    pub gradient_accumulation_steps: usize,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    pub logging_steps: usize,
    /// 0 saves only at the end.
    pub save_steps: usize,
    pub save_total_limit: Option<usize>,
    /// 0 disables evaluation during training.
    pub eval_steps: usize,
    pub gradient_checkpointing: bool,
    /// Abort after this many consecutive non-finite steps.
    pub max_consecutive_skipped_steps: usize,
    pub seed: u64,
}

/// One logged optimizer step.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepLog {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: f64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
    pub step_seconds: f64,
    pub skipped: bool,
}

/// Progress reporting (progress bar, plots) without the loop knowing about terminals.
pub trait Observer {
    fn on_step(&mut self, log: &StepLog);
    fn on_eval(&mut self, step: usize, eval_loss: f64);
    fn on_save(&mut self, checkpoint: &Path);
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: usize,
    pub losses: Vec<f64>,
    pub last_checkpoint: Option<PathBuf>,
    pub skipped_steps: usize,
}

/// Runs training until `settings.schedule.total_steps` or the end of the data.
pub fn train(
    model: &CausalLm,
    trainable: &Trainable,
    data: &mut dyn BatchSource,
    mut eval_data: Option<&mut dyn BatchSource>,
    settings: &TrainerSettings,
    resume_from: Option<&Path>,
    observer: &mut dyn Observer,
) -> Result<TrainSummary> {
    let parameters = trainable.parameters();
    let mut optimizer = AdamW::new(parameters.clone(), settings.adamw)?;
    let mut accumulator = GradientAccumulator::new(&parameters, model.device())?;
    let total_steps = settings.schedule.total_steps;
    let mut state = TrainerState::new(total_steps, settings.seed);
    let device = model.device().clone();
    std::fs::create_dir_all(&settings.output_dir)
        .map_err(|e| Error::State(format!("{}: {e}", settings.output_dir.display())))?;
    let log_path = settings.output_dir.join("logging.jsonl");

    if let Some(dir) = resume_from {
        state = TrainerState::load(dir)?;
        trainable.load(dir, &device)?;
        // Read onto the host: each tensor then travels to the GPU straight into the
        // optimizer's state buffer, instead of the whole state arriving there first.
        optimizer.load_state(&oxtune_tensor::candle::safetensors::load(
            dir.join(OPTIMIZER_STATE),
            &Device::Cpu,
        )?)?;
        data.seek(&state.data_cursor)?;
        truncate_log(&log_path, state.global_step)?;
        tracing::info!(checkpoint = %dir.display(), step = state.global_step, "resumed");
    }
    let mut log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::State(format!("{}: {e}", log_path.display())))?;
    let mut losses = Vec::new();
    let mut consecutive_skipped = 0;
    let mut last_checkpoint = None;

    'steps: while state.global_step < total_steps {
        let step = state.global_step;
        let started = Instant::now();
        let learning_rate = settings.schedule.learning_rate(step);

        // Gather the step's micro-batches first: the loss is normalised by their total
        // target tokens.
        let mut micro_batches = Vec::with_capacity(settings.gradient_accumulation_steps);
        for _ in 0..settings.gradient_accumulation_steps {
            match data.next_batch()? {
                Some(batch) => micro_batches.push(batch),
                None => break,
            }
        }
        if micro_batches.is_empty() {
            tracing::info!(step, "training data exhausted");
            break 'steps;
        }
        let target_tokens: usize = micro_batches
            .iter()
            .map(|b| b.target_tokens)
            .sum::<usize>()
            .max(1);
        let tokens: usize = micro_batches.iter().map(|b| b.tokens).sum();

        let mut loss_sum = 0.0;
        for (micro, batch) in micro_batches.iter().enumerate() {
            trainable.set_training(true, dropout_seed(settings.seed, step, micro));
            #[expect(clippy::cast_precision_loss, reason = "token counts")]
            let scale = 1.0 / target_tokens as f64;
            let targets = causal_targets(&batch.labels)?;
            let loss_of = |logits: &Tensor, rows: std::ops::Range<usize>| {
                let sum = cross_entropy_sum(logits, &targets[rows])
                    .map_err(|e| oxtune_tensor::candle::Error::Msg(e.to_string()))?;
                Ok((sum * scale)?)
            };
            let pass =
                TrainingPass::new(settings.gradient_checkpointing, model.config().vocab_size);
            let (loss, store) =
                model.forward_backward(&batch.input_ids, &batch.layout, pass, loss_of)?;
            loss_sum += f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            accumulator.add(&store, micro == 0)?;
        }
        trainable.set_training(false, 0);
        let grads = accumulator.gradients()?;

        let (grad_norm, factor) = clip_factor(&grads, settings.max_grad_norm)?;
        let skipped = !loss_sum.is_finite() || !grad_norm.is_finite();
        if skipped {
            consecutive_skipped += 1;
            state.skipped_steps += 1;
            tracing::warn!(
                step = step + 1,
                loss = loss_sum,
                grad_norm,
                "non-finite loss or gradient: step skipped"
            );
            if consecutive_skipped > settings.max_consecutive_skipped_steps {
                return Err(Error::State(format!(
                    "{consecutive_skipped} consecutive steps had a non-finite loss or gradient (last at step {})\nhint: lower learning_rate, check the data, or use float32",
                    step + 1
                )));
            }
        } else {
            consecutive_skipped = 0;
            // The clip factor multiplies the gradients inside the (fused) update.
            optimizer.step_scaled(&grads, learning_rate, factor)?;
        }
        state.global_step += 1;
        state.epoch = data.epoch();
        state.data_cursor = data.cursor();
        losses.push(loss_sum);

        let step_seconds = started.elapsed().as_secs_f64();
        #[expect(clippy::cast_precision_loss, reason = "token counts")]
        let log = StepLog {
            step: state.global_step,
            total_steps,
            epoch: state.epoch,
            loss: loss_sum,
            learning_rate,
            grad_norm,
            tokens_per_second: tokens as f64 / step_seconds.max(1e-9),
            step_seconds,
            skipped,
        };
        observer.on_step(&log);
        let last = state.global_step == total_steps;
        if state
            .global_step
            .is_multiple_of(settings.logging_steps.max(1))
            || last
            || state.global_step == 1
        {
            let line = serde_json::to_value(&log).map_err(|e| Error::State(e.to_string()))?;
            writeln!(log_file, "{line}")
                .map_err(|e| Error::State(format!("{}: {e}", log_path.display())))?;
            state.log_history.push(line);
        }
        if let Some(eval) = eval_data.as_deref_mut()
            && settings.eval_steps > 0
            && (state.global_step.is_multiple_of(settings.eval_steps) || last)
        {
            let eval_loss = evaluate(model, eval)?;
            observer.on_eval(state.global_step, eval_loss);
            let line = serde_json::json!({"step": state.global_step, "eval_loss": eval_loss});
            writeln!(log_file, "{line}")
                .map_err(|e| Error::State(format!("{}: {e}", log_path.display())))?;
            state.log_history.push(line);
        }
        if (settings.save_steps > 0 && state.global_step.is_multiple_of(settings.save_steps))
            || last
        {
            let path = save_checkpoint(settings, trainable, &optimizer, &state)?;
            observer.on_save(&path);
            last_checkpoint = Some(path);
        }
    }
    if last_checkpoint.is_none() && state.global_step > 0 {
        let path = save_checkpoint(settings, trainable, &optimizer, &state)?;
        observer.on_save(&path);
        last_checkpoint = Some(path);
    }
    Ok(TrainSummary {
        steps: state.global_step,
        losses,
        last_checkpoint,
        skipped_steps: state.skipped_steps,
    })
}

fn save_checkpoint(
    settings: &TrainerSettings,
    trainable: &Trainable,
    optimizer: &AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    checkpoint::save(
        &settings.output_dir,
        state.global_step,
        settings.save_total_limit,
        |dir| {
            trainable.save(dir, &settings.base_model_dir)?;
            oxtune_tensor::candle::safetensors::save(
                &optimizer.state()?,
                dir.join(OPTIMIZER_STATE),
            )?;
            let json =
                serde_json::to_string_pretty(state).map_err(|e| Error::State(e.to_string()))?;
            std::fs::write(dir.join(checkpoint::TRAINER_STATE), json)
                .map_err(|e| Error::State(format!("{}: {e}", dir.display())))
        },
    )
}

/// Mean loss per target token over every batch of `data` (dropout off).
pub fn evaluate(model: &CausalLm, data: &mut dyn BatchSource) -> Result<f64> {
    data.seek(&serde_json::Value::Null)?;
    let (mut sum, mut count) = (0.0, 0);
    let chunk = TrainingPass::new(false, model.config().vocab_size).loss_chunk_rows;
    while let Some(batch) = data.next_batch()? {
        let hidden = model
            .hidden_batch(&batch.input_ids, &batch.layout)?
            .detach();
        let (b, t, c) = hidden.dims3()?;
        let hidden = hidden.reshape((b * t, c))?;
        let targets = causal_targets(&batch.labels)?;
        for start in (0..b * t).step_by(chunk) {
            let end = (start + chunk).min(b * t);
            let logits = model.lm_head(&hidden.narrow(0, start, end - start)?)?;
            let loss = cross_entropy_sum(&logits, &targets[start..end])?;
            sum += f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        }
        count += target_count(&targets);
    }
    #[expect(clippy::cast_precision_loss, reason = "token counts")]
    Ok(if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    })
}

/// The dropout seed of micro-batch `micro` of optimizer step `step`.
fn dropout_seed(seed: u64, step: usize, micro: usize) -> u64 {
    let step = u64::try_from(step).unwrap_or(u64::MAX);
    let micro = u64::try_from(micro).unwrap_or(u64::MAX);
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ micro
}

/// Drops log lines after `step` (a resumed run rewrites them).
fn truncate_log(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
                .is_some_and(|s| usize::try_from(s).is_ok_and(|s| s <= step))
        })
        .collect();
    let mut joined = kept.join("\n");
    if !joined.is_empty() {
        joined.push('\n');
    }
    std::fs::write(path, joined).map_err(|e| Error::State(format!("{}: {e}", path.display())))
}
