//! The training-data pipeline of `oxtune sft` and `oxtune pt`:
//!
//! ```text
//! dataset specs --source--> Samples (conversation | text, each with file:line)
//!   -> validation split, path#N sampling            (source.rs, seeded by data_seed)
//!   --encode--> input_ids + labels (-100 off the assistant replies) -> truncation (encode.rs)
//!   --pack--> Sequences (one sample, or several packed with their lengths)     (pack.rs)
//!   --DataLoader--> Batch per micro-batch, DataCursor for exact resume         (batch.rs)
//! ```
//!
//! The trainer calls [`prepare`] once (with an [`Encoder`] made from the loaded model), wraps
//! [`PreparedData::train`] in a [`DataLoader`], logs [`DataReport::summary`], and saves
//! [`DataLoader::cursor`] in each checkpoint.
//!
//! ```no_run
//! use oxtune_data::sft::{DataLoader, DataOptions, Encoder, LoaderOptions, prepare};
//!
//! fn train(model: &oxtune_models::LoadedModel) -> oxtune_data::Result<()> {
//!     let encoder = Encoder::for_model(model)?;
//!     let options = DataOptions {
//!         dataset: vec!["train.jsonl#500".into()],
//!         max_length: Some(2048),
//!         ..DataOptions::default()
//!     };
//!     let data = prepare(&options, &encoder)?;
//!     let mut loader = DataLoader::new(
//!         data.train,
//!         LoaderOptions {
//!             batch_size: 4,
//!             shuffle: true,
//!             seed: options.data_seed,
//!             num_epochs: Some(3),
//!             pad_id: encoder.pad_id(),
//!         },
//!     )?;
//!     while let Some(batch) = loader.next_batch() {
//!         // tensors from batch.input_ids, batch.labels; the attention layout from
//!         // BatchLayout::packed(&batch.sample_lengths, batch.seq_len(), ..)
//!         let _ = batch;
//!     }
//!     Ok(())
//! }
//! ```

pub mod batch;
pub mod encode;
pub mod pack;
pub mod source;

use serde::Serialize;

pub use batch::{Batch, DataCursor, DataLoader, LoaderOptions};
pub use encode::{
    EncodeOptions, EncodeReport, Encoded, Encoder, IGNORE_INDEX, LossScale, TruncationStrategy,
    encode_samples,
};
pub use pack::{PackReport, Sequence, pack, unpacked};
pub use source::{
    DatasetSpec, Origin, ReadOptions, Sample, SampleContent, SourceReport, Task, load_samples,
};

use crate::error::{Error, Result};

/// The data settings of `oxtune sft` / `oxtune pt` (ms-swift names; the trainer copies them
/// from its config).
#[derive(Debug, Clone, PartialEq)]
pub struct DataOptions {
    pub task: Task,
    /// `path` or `path#N` specs.
    pub dataset: Vec<String>,
    pub val_dataset: Vec<String>,
    /// The share of each training file held out for validation, in [0, 1).
    pub split_dataset_ratio: f64,
    /// Seeds the split, `#N` sampling (and, in [`LoaderOptions`], the epoch order).
    pub data_seed: u64,
    /// Fail on a malformed row (true) or drop and count it (false, the default as in
    /// ms-swift and the config).
    pub strict: bool,
    /// The system prompt of rows without their own.
    pub system: Option<String>,
    pub max_length: Option<usize>,
    pub truncation_strategy: TruncationStrategy,
    pub loss_scale: LossScale,
    pub packing: bool,
    /// The length of a packed row; `None`: `max_length`.
    pub packing_length: Option<usize>,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            task: Task::Sft,
            dataset: Vec::new(),
            val_dataset: Vec::new(),
            split_dataset_ratio: 0.0,
            data_seed: 42,
            strict: false,
            system: None,
            max_length: None,
            truncation_strategy: TruncationStrategy::Delete,
            loss_scale: LossScale::Default,
            packing: false,
            packing_length: None,
        }
    }
}

/// Train and validation sequences, ready for [`DataLoader`]s, and what happened on the way.
#[derive(Debug, Clone)]
pub struct PreparedData {
    pub train: Vec<Sequence>,
    /// Empty when there is no validation set.
    pub val: Vec<Sequence>,
    pub report: DataReport,
}

/// Everything the trainer logs about the data (`Serialize` for logging.jsonl).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DataReport {
    pub sources: Vec<SourceReport>,
    pub train: EncodeReport,
    pub val: EncodeReport,
    /// With packing.
    pub train_packing: Option<PackReport>,
    pub val_packing: Option<PackReport>,
}

impl DataReport {
    /// Rows and samples dropped anywhere, of train and val together.
    pub fn dropped(&self) -> usize {
        self.sources
            .iter()
            .map(SourceReport::dropped)
            .sum::<usize>()
            + self.train.dropped()
            + self.val.dropped()
    }

    /// A few lines for the log: counts per file, what was dropped and why (with examples).
    pub fn summary(&self) -> String {
        let mut lines = Vec::new();
        for source in &self.sources {
            lines.push(format!(
                "{}: {} rows ({}), {} train, {} val, dropped {} malformed + {} in another format",
                source.spec,
                source.records,
                source.format.unwrap_or("no rows"),
                source.train,
                source.val,
                source.dropped_malformed,
                source.dropped_format_mismatch,
            ));
        }
        for (name, report, packing) in [
            ("train", &self.train, &self.train_packing),
            ("val", &self.val, &self.val_packing),
        ] {
            if report.samples == 0 {
                continue;
            }
            let mut line = format!(
                "{name}: {} samples kept of {}, {} tokens ({} targets), longest {}; truncated {}, dropped {} too long, {} without targets, {} refused by the template",
                report.kept,
                report.samples,
                report.tokens,
                report.target_tokens,
                report.longest,
                report.truncated,
                report.dropped_too_long,
                report.dropped_no_target,
                report.dropped_template,
            );
            if let Some(packing) = packing {
                line.push_str(&format!(
                    "; packed into {} rows ({:.1}% full)",
                    packing.rows,
                    packing.fill * 100.0
                ));
            }
            lines.push(line);
        }
        let examples = self
            .sources
            .iter()
            .flat_map(|s| &s.dropped_examples)
            .chain(&self.train.dropped_examples)
            .chain(&self.val.dropped_examples);
        lines.extend(examples.map(|example| format!("  dropped: {example}")));
        lines.join("\n")
    }
}

/// Reads, splits, samples, encodes, truncates and (optionally) packs the datasets of `options`.
pub fn prepare(options: &DataOptions, encoder: &Encoder<'_>) -> Result<PreparedData> {
    encoder.check_task(options.task)?;
    if options.dataset.is_empty() {
        return Err(Error::Invalid { message: "no dataset given".into(), hint: "set `dataset` to one or more files (jsonl, json, csv; .txt for pt), e.g. `--dataset train.jsonl`".into() });
    }
    let packing_length = match (
        options.packing,
        options.packing_length.or(options.max_length),
    ) {
        (false, _) => None,
        (true, Some(length)) if length >= 2 => Some(length),
        (true, _) => {
            return Err(Error::Invalid {
                message: "packing needs a row length".into(),
                hint: "set max_length (or packing_length) to at least 2 tokens".into(),
            });
        }
    };
    let parse = |specs: &[String]| {
        specs
            .iter()
            .map(|spec| DatasetSpec::parse(spec))
            .collect::<Result<Vec<_>>>()
    };
    let read = ReadOptions {
        task: options.task,
        strict: options.strict,
        system: options.system.clone(),
    };
    let samples = load_samples(
        &parse(&options.dataset)?,
        &parse(&options.val_dataset)?,
        options.split_dataset_ratio,
        options.data_seed,
        &read,
    )?;
    let encode = EncodeOptions {
        max_length: options.max_length,
        truncation_strategy: options.truncation_strategy,
        loss_scale: options.loss_scale,
        strict: options.strict,
    };
    let (train, train_report) = encode_samples(encoder, &samples.train, &encode)?;
    let (val, val_report) = encode_samples(encoder, &samples.val, &encode)?;
    let mut report = DataReport {
        sources: samples.sources,
        train: train_report,
        val: val_report,
        train_packing: None,
        val_packing: None,
    };
    if train.is_empty() {
        return Err(Error::Invalid {
            message: format!("no training samples left\n{}", report.summary()),
            hint: "check the dropped rows above; raise max_length or use truncation_strategy left/right if samples are too long".into(),
        });
    }
    let (train, val) = match packing_length {
        Some(length) => {
            let (train, val) = (pack(train, length)?, pack(val, length)?);
            report.train_packing = Some(PackReport::new(&train, length));
            report.val_packing = (!val.is_empty()).then(|| PackReport::new(&val, length));
            (train, val)
        }
        None => (unpacked(train), unpacked(val)),
    };
    Ok(PreparedData { train, val, report })
}
