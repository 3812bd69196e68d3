//! `oxtune sft` and `oxtune pt`: fine-tuning and continued pre-training, one YAML file per job
//! (`-c job.yaml`) with `--key value` overrides, ms-swift's names (docs/configuration.md).
//!
//! The recipe, top to bottom: resolve and check the whole config (before any weight loads)
//! -> load the model -> attach LoRA/DoRA or make every weight trainable -> read, template,
//! mask, truncate and pack the data -> train (progress bar; logging.jsonl; atomic
//! checkpoints; exact resume) -> loss.png.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;
use oxtune_config::{
    Command, LossScale, LrSchedulerType, ResumeFrom, TargetModules, TrainArgs, TrainType,
};
use oxtune_data::sft::{DataLoader, DataOptions, Encoder, LoaderOptions, Task, prepare};
use oxtune_models::BatchLayout;
use oxtune_tensor::{Device, Tensor};
use oxtune_train::trainer::{
    BatchSource, MicroBatch, Observer, StepLog, Trainable, TrainerSettings, train,
};

/// The job's settings: `-c FILE` and/or `--key value` pairs (see docs/configuration.md).
#[derive(Debug, Args)]
#[command(disable_help_flag = false)]
pub struct TrainCommandArgs {
    /// `-c job.yaml`, then `--key value` overrides with ms-swift names (`--lora_rank 16`,
    /// `--dataset a.jsonl b.jsonl#500`, `--packing true`); every key is in
    /// docs/configuration.md.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "SETTINGS"
    )]
    pub settings: Vec<String>,
}

pub fn run(command: Command, args: &TrainCommandArgs) -> anyhow::Result<()> {
    // 1. The whole config, checked before anything heavy happens.
    let config = TrainArgs::from_command_line(command, &args.settings)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let model_args = super::ModelArgs {
        base: super::BaseModelArgs {
            model: Some(config.model.clone()),
            model_type: None,
            device: config.device.clone(),
            torch_dtype: config.torch_dtype.as_str().to_owned(),
        },
        adapters: None,
    };
    let (device, _) = model_args.device_and_dtype()?;
    let output_dir = config.output_dir.clone();
    std::fs::create_dir_all(&output_dir)
        .with_context(|| format!("creating {}", output_dir.display()))?;
    let resume = match &config.resume_from_checkpoint {
        None => None,
        Some(ResumeFrom::Latest) => Some(oxtune_train::checkpoint::resolve_resume(
            &output_dir,
            "true",
        )?),
        Some(ResumeFrom::Path(path)) => Some(oxtune_train::checkpoint::resolve_resume(
            &output_dir,
            &path.display().to_string(),
        )?),
    };
    write_atomic(
        &output_dir.join("config.yaml"),
        config
            .to_yaml()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .as_bytes(),
    )?;
    if !config.modules_to_save.is_empty() {
        bail!(
            "modules_to_save is not supported yet\nhint: remove it, or use train_type: full to train every weight"
        );
    }
    if !config.report_to.is_empty() {
        tracing::warn!(
            "report_to tensorboard: TensorBoard event files are not written (no maintained Rust crate writes them); {}/logging.jsonl and loss.png hold the same curves",
            output_dir.display()
        );
    }

    // 2. The model, and what trains.
    let mut loaded = model_args.load()?;
    let trainable = if config.train_type == TrainType::Lora {
        let settings = oxtune_tuners::LoraSettings {
            rank: config.lora_rank,
            alpha: f64::from(config.lora_alpha),
            #[expect(clippy::cast_possible_truncation, reason = "a probability")]
            dropout: config.lora_dropout as f32,
            use_rslora: config.use_rslora,
            use_dora: config.use_dora,
            target_modules: match &config.target_modules {
                TargetModules::AllLinear => oxtune_tuners::TargetModules::AllLinear,
                TargetModules::Names(names) => oxtune_tuners::TargetModules::Names(names.clone()),
            },
        };
        Trainable::Lora(oxtune_tuners::LoraTuner::attach(
            &mut loaded.model,
            &settings,
            config.seed,
        )?)
    } else {
        Trainable::Full(oxtune_train::optimizer::make_all_trainable(
            &mut loaded.model,
        )?)
    };
    let trainable_parameters: usize = trainable
        .parameters()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();

    // 3. Data.
    let context = loaded.config.max_position_embeddings;
    let max_length = match config.max_length {
        Some(length) if length > context => {
            tracing::warn!(
                max_length = length,
                context,
                "max_length exceeds the model's context; using the context length"
            );
            context
        }
        Some(length) => length,
        None => context,
    };
    let options = DataOptions {
        task: if command == Command::Pt {
            Task::Pt
        } else {
            Task::Sft
        },
        dataset: config.dataset.clone(),
        val_dataset: config.val_dataset.clone(),
        split_dataset_ratio: config.split_dataset_ratio,
        data_seed: config.data_seed,
        strict: config.strict,
        system: config.system.clone(),
        max_length: Some(max_length),
        truncation_strategy: config.truncation_strategy.as_str().parse()?,
        loss_scale: match config.loss_scale {
            LossScale::Default => oxtune_data::sft::LossScale::Default,
            LossScale::LastRound => oxtune_data::sft::LossScale::LastRound,
            LossScale::All => oxtune_data::sft::LossScale::All,
        },
        packing: config.packing || command == Command::Pt,
        packing_length: config.packing_length,
    };
    let encoder = Encoder::for_model(&loaded)?;
    let prepared = prepare(&options, &encoder)?;
    tracing::info!("{}", prepared.report.summary());
    let pad_id = encoder.pad_id();
    let epochs = config.num_train_epochs.ceil().max(1.0);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "epoch counts"
    )]
    let loader = DataLoader::new(
        prepared.train,
        LoaderOptions {
            batch_size: config.per_device_train_batch_size,
            shuffle: config.dataset_shuffle,
            seed: config.data_seed,
            num_epochs: if config.max_steps.is_some() {
                None
            } else {
                Some(epochs as u64)
            },
            pad_id,
        },
    )?;
    let steps_per_epoch = loader
        .batches_per_epoch()
        .div_ceil(config.gradient_accumulation_steps.max(1))
        .max(1);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "step counts"
    )]
    let total_steps = match config.max_steps {
        Some(steps) => usize::try_from(steps)?,
        None => (steps_per_epoch as f64 * config.num_train_epochs).ceil() as usize,
    };
    let sliding_window = loaded.config.sliding_window;
    let mut train_data = Batches {
        loader,
        device: device.clone(),
        sliding_window,
    };
    let mut val_data = if prepared.val.is_empty() {
        None
    } else {
        Some(Batches {
            loader: DataLoader::new(
                prepared.val,
                LoaderOptions {
                    batch_size: config.per_device_eval_batch_size,
                    shuffle: false,
                    seed: 0,
                    num_epochs: Some(1),
                    pad_id,
                },
            )?,
            device: device.clone(),
            sliding_window,
        })
    };

    // 4. Train.
    let schedule_kind = match config.lr_scheduler_type {
        LrSchedulerType::Linear => oxtune_train::schedule::ScheduleKind::Linear,
        LrSchedulerType::Cosine => oxtune_train::schedule::ScheduleKind::Cosine,
        LrSchedulerType::Constant => oxtune_train::schedule::ScheduleKind::Constant,
        LrSchedulerType::ConstantWithWarmup => {
            oxtune_train::schedule::ScheduleKind::ConstantWithWarmup
        }
    };
    let mut schedule = oxtune_train::schedule::Schedule::new(
        schedule_kind,
        config.learning_rate,
        config.warmup_ratio,
        total_steps,
    );
    if config.warmup_steps > 0 {
        schedule.warmup_steps = config.warmup_steps;
    }
    let settings = TrainerSettings {
        output_dir: output_dir.clone(),
        base_model_dir: loaded.dir.clone(),
        schedule,
        adamw: oxtune_train::optimizer::AdamWConfig {
            beta1: config.adam_beta1,
            beta2: config.adam_beta2,
            eps: config.adam_epsilon,
            weight_decay: config.weight_decay,
        },
        gradient_accumulation_steps: config.gradient_accumulation_steps,
        max_grad_norm: config.max_grad_norm,
        logging_steps: config.logging_steps,
        save_steps: config.save_steps,
        save_total_limit: config.save_total_limit,
        eval_steps: config.eval_steps.unwrap_or(0),
        gradient_checkpointing: config.gradient_checkpointing,
        max_consecutive_skipped_steps: usize::try_from(config.max_nonfinite_steps)?,
        seed: config.seed,
    };
    tracing::info!(
        model = %loaded.dir.display(),
        train_type = config.train_type.as_str(),
        trainable_parameters,
        total_steps,
        "training"
    );
    let mut progress = Progress::new(total_steps, resume.is_some());
    let summary = train(
        &loaded.model,
        &trainable,
        &mut train_data,
        val_data.as_mut().map(|v| v as &mut dyn BatchSource),
        &settings,
        resume.as_deref(),
        &mut progress,
    )?;
    progress.bar.finish_and_clear();

    // 5. The curves.
    let plot = output_dir.join("loss.png");
    oxtune_train::plot::draw_loss_curves(&plot, &progress.points, &progress.eval)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "trained {} steps; last loss {:.4}; checkpoint {}; curves {}",
        summary.steps,
        summary.losses.last().copied().unwrap_or(f64::NAN),
        summary
            .last_checkpoint
            .as_deref()
            .map_or_else(|| "-".into(), |p| p.display().to_string()),
        plot.display()
    )?;
    Ok(())
}

/// Micro-batches from the data loader, as tensors on the training device.
struct Batches {
    loader: DataLoader,
    device: Device,
    sliding_window: Option<usize>,
}

impl BatchSource for Batches {
    fn next_batch(&mut self) -> oxtune_train::Result<Option<MicroBatch>> {
        let Some(batch) = self.loader.next_batch() else {
            return Ok(None);
        };
        let (b, t) = (batch.rows(), batch.seq_len());
        let ids: Vec<u32> = batch.input_ids.concat();
        let labels: Vec<i64> = batch.labels.concat();
        Ok(Some(MicroBatch {
            input_ids: Tensor::from_vec(ids, (b, t), &self.device)?,
            labels: Tensor::from_vec(labels, (b, t), &self.device)?,
            layout: BatchLayout::packed(
                &batch.sample_lengths,
                t,
                self.sliding_window,
                &self.device,
            )?,
            target_tokens: batch.target_tokens,
            tokens: batch.tokens,
        }))
    }

    fn cursor(&self) -> serde_json::Value {
        serde_json::to_value(self.loader.cursor()).unwrap_or(serde_json::Value::Null)
    }

    fn seek(&mut self, cursor: &serde_json::Value) -> oxtune_train::Result<()> {
        if cursor.is_null() {
            self.loader.reset();
            return Ok(());
        }
        let cursor = serde_json::from_value(cursor.clone())
            .map_err(|e| oxtune_train::Error::State(format!("data cursor: {e}")))?;
        self.loader
            .seek(&cursor)
            .map_err(|e| oxtune_train::Error::State(e.to_string()))
    }

    fn epoch(&self) -> f64 {
        self.loader.epoch_progress()
    }
}

/// The progress bar (loss, learning rate, grad norm, tokens/s, ETA) and the curve points.
struct Progress {
    bar: indicatif::ProgressBar,
    points: Vec<oxtune_train::plot::Point>,
    eval: Vec<(usize, f64)>,
}

impl Progress {
    fn new(total_steps: usize, resumed: bool) -> Self {
        let bar = indicatif::ProgressBar::new(total_steps as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        ) {
            bar.set_style(style);
        }
        if resumed {
            bar.set_message("resuming");
        }
        Self {
            bar,
            points: Vec::new(),
            eval: Vec::new(),
        }
    }
}

impl Observer for Progress {
    fn on_step(&mut self, log: &StepLog) {
        self.bar.set_position(log.step as u64);
        self.bar.set_message(format!(
            "loss {:.4} lr {:.2e} grad_norm {:.3} {:.0} tokens/s{}",
            log.loss,
            log.learning_rate,
            log.grad_norm,
            log.tokens_per_second,
            if log.skipped {
                " (skipped: non-finite)"
            } else {
                ""
            }
        ));
        self.points.push(oxtune_train::plot::Point {
            step: log.step,
            loss: log.loss,
            learning_rate: log.learning_rate,
        });
    }

    fn on_eval(&mut self, step: usize, eval_loss: f64) {
        self.bar
            .println(format!("step {step}: eval_loss {eval_loss:.4}"));
        self.eval.push((step, eval_loss));
    }

    fn on_save(&mut self, checkpoint: &Path) {
        self.bar.println(format!("saved {}", checkpoint.display()));
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let temporary: PathBuf = path.with_extension("tmp");
    std::fs::write(&temporary, bytes)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))
}
