//! Micro-batches and the cursor that makes resume exact.
//!
//! Each epoch visits every sequence once, in an order shuffled with a seed derived from
//! (seed, epoch) (or in file order when shuffling is off). A micro-batch is the next
//! `batch_size` sequences of that order (the last one of an epoch may be smaller),
//! right-padded to its longest row with the pad id and labels -100.
//!
//! [`DataCursor`] is `{epoch, position}`: epochs done and sequences of this epoch handed
//! out, plus a fingerprint of the data and the order's seed. A loader built again from the
//! same data and settings and [`DataLoader::seek`]ed to a cursor yields exactly the
//! micro-batches the first loader would have yielded after it; a cursor from other data is
//! refused.

use serde::{Deserialize, Serialize};

use super::encode::{IGNORE_INDEX, count_targets};
use super::pack::Sequence;
use super::source::derive_seed;
use crate::error::{Error, Result};
use crate::split::{SplitMix64, mix64};

/// One micro-batch, as plain vectors (the trainer makes tensors). Shapes: b rows, t tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// (b, t), right-padded with the pad id.
    pub input_ids: Vec<Vec<u32>>,
    /// (b, t), [`IGNORE_INDEX`] on non-targets and padding.
    pub labels: Vec<Vec<i64>>,
    /// Per row, the lengths of its samples (summing to at most t; the rest is padding): the
    /// input of `BatchLayout::packed`.
    pub sample_lengths: Vec<Vec<usize>>,
    /// Labels that are targets. Every row's first label is -100, so this is also the number
    /// of predicted positions after the loss's shift by one.
    pub target_tokens: usize,
    /// Real (non-padding) tokens.
    pub tokens: usize,
}

impl Batch {
    /// b
    pub fn rows(&self) -> usize {
        self.input_ids.len()
    }

    /// t
    pub fn seq_len(&self) -> usize {
        self.input_ids.first().map_or(0, Vec::len)
    }

    /// Pads `rows` to the longest.
    pub fn from_rows(rows: &[&Sequence], pad_id: u32) -> Self {
        let seq_len = rows.iter().map(|row| row.len()).max().unwrap_or(0);
        let mut batch = Self {
            input_ids: Vec::with_capacity(rows.len()),
            labels: Vec::with_capacity(rows.len()),
            sample_lengths: Vec::with_capacity(rows.len()),
            target_tokens: 0,
            tokens: 0,
        };
        for row in rows {
            let padding = seq_len - row.len();
            batch.input_ids.push(
                row.input_ids
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad_id, padding))
                    .collect(),
            );
            batch.labels.push(
                row.labels
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(IGNORE_INDEX, padding))
                    .collect(),
            );
            batch.sample_lengths.push(row.sample_lengths.clone());
            batch.target_tokens += count_targets(&row.labels);
            batch.tokens += row.len();
        }
        batch
    }
}

/// Where a [`DataLoader`] continues; saved in checkpoints (`trainer_state.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    /// Epochs completed.
    pub epoch: u64,
    /// Sequences of this epoch's order already handed out.
    pub position: u64,
    /// The loader's [`DataLoader::fingerprint`]; a cursor without one (made by hand) skips
    /// the check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// How a [`DataLoader`] walks its sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderOptions {
    /// Sequences per micro-batch (`per_device_train_batch_size`).
    pub batch_size: usize,
    /// Shuffle each epoch (`dataset_shuffle`); off for evaluation.
    pub shuffle: bool,
    /// The order's seed (`data_seed`).
    pub seed: u64,
    /// Stop after this many epochs; `None` goes on forever (training by `max_steps`).
    pub num_epochs: Option<u64>,
    /// The padding id (`Encoder::pad_id`).
    pub pad_id: u32,
}

/// Hands out micro-batches epoch after epoch; see the module docs.
#[derive(Debug, Clone)]
pub struct DataLoader {
    sequences: Vec<Sequence>,
    options: LoaderOptions,
    fingerprint: String,
    epoch: u64,
    position: usize,
    /// The current epoch's order.
    order: Vec<usize>,
}

impl DataLoader {
    pub fn new(sequences: Vec<Sequence>, options: LoaderOptions) -> Result<Self> {
        if sequences.is_empty() {
            return Err(Error::Invalid { message: "no sequences to train on".into(), hint: "the dataset is empty after dropping malformed, too long and target-less samples; see the data report".into() });
        }
        if options.batch_size == 0 {
            return Err(Error::Invalid {
                message: "the batch size is 0".into(),
                hint: "set per_device_train_batch_size to 1 or more".into(),
            });
        }
        let fingerprint = fingerprint(&sequences, &options);
        let order = epoch_order(sequences.len(), &options, 0);
        Ok(Self {
            sequences,
            options,
            fingerprint,
            epoch: 0,
            position: 0,
            order,
        })
    }

    pub fn sequences(&self) -> &[Sequence] {
        &self.sequences
    }

    /// Micro-batches in one epoch (the last may be smaller).
    pub fn batches_per_epoch(&self) -> usize {
        self.sequences.len().div_ceil(self.options.batch_size)
    }

    /// A hash of the sequences (ids, labels, sample lengths), the seed and whether the
    /// order is shuffled: the things an exact resume needs unchanged.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Where the next micro-batch starts.
    pub fn cursor(&self) -> DataCursor {
        let (epoch, position) = if self.position >= self.sequences.len() {
            (self.epoch + 1, 0)
        } else {
            (self.epoch, self.position as u64)
        };
        DataCursor {
            epoch,
            position,
            fingerprint: Some(self.fingerprint.clone()),
        }
    }

    /// Epochs done, fractional (for logs and `trainer_state.json`).
    pub fn epoch_progress(&self) -> f64 {
        self.epoch as f64 + self.position as f64 / self.sequences.len() as f64
    }

    /// Continues from `cursor`.
    pub fn seek(&mut self, cursor: &DataCursor) -> Result<()> {
        if let Some(saved) = &cursor.fingerprint
            && *saved != self.fingerprint
        {
            return Err(Error::Invalid {
                message: format!("the data cursor was saved for other data (fingerprint {saved}, now {} with {} sequences)", self.fingerprint, self.sequences.len()),
                hint: "resume with the same dataset files, data_seed, dataset_shuffle, max_length, truncation_strategy, packing and model tokenizer".into(),
            });
        }
        let position = usize::try_from(cursor.position).unwrap_or(usize::MAX);
        if position > self.sequences.len() {
            return Err(Error::Invalid {
                message: format!("the data cursor points at sequence {position} of an epoch of {}", self.sequences.len()),
                hint: "the cursor does not belong to this dataset; resume with the data the checkpoint was trained on".into(),
            });
        }
        if cursor.epoch != self.epoch || self.order.is_empty() {
            self.order = epoch_order(self.sequences.len(), &self.options, cursor.epoch);
        }
        self.epoch = cursor.epoch;
        self.position = position;
        Ok(())
    }

    /// Back to the first micro-batch of epoch 0.
    pub fn reset(&mut self) {
        self.order = epoch_order(self.sequences.len(), &self.options, 0);
        self.epoch = 0;
        self.position = 0;
    }

    /// The next micro-batch; `None` once `num_epochs` are done.
    pub fn next_batch(&mut self) -> Option<Batch> {
        if self.position >= self.sequences.len() {
            self.epoch += 1;
            self.position = 0;
            self.order = epoch_order(self.sequences.len(), &self.options, self.epoch);
        }
        if self
            .options
            .num_epochs
            .is_some_and(|epochs| self.epoch >= epochs)
        {
            return None;
        }
        let end = (self.position + self.options.batch_size).min(self.sequences.len());
        let rows: Vec<&Sequence> = self.order[self.position..end]
            .iter()
            .map(|&index| &self.sequences[index])
            .collect();
        self.position = end;
        Some(Batch::from_rows(&rows, self.options.pad_id))
    }
}

impl Iterator for DataLoader {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        self.next_batch()
    }
}

/// The order of epoch `epoch`: a Fisher-Yates shuffle seeded from (seed, epoch), or 0..len.
pub fn epoch_order(len: usize, options: &LoaderOptions, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if options.shuffle {
        let mut rng = SplitMix64::new(derive_seed(options.seed, &[STREAM_EPOCH, epoch]));
        for slot in (1..len).rev() {
            let pick = rng.below(slot as u64 + 1) as usize;
            order.swap(slot, pick);
        }
    }
    order
}

const STREAM_EPOCH: u64 = 3;

fn fingerprint(sequences: &[Sequence], options: &LoaderOptions) -> String {
    let mut hash = mix64(options.seed ^ u64::from(options.shuffle));
    let mut add = |value: u64| hash = mix64(hash ^ value).wrapping_add(0x9E37_79B9_7F4A_7C15);
    add(sequences.len() as u64);
    for sequence in sequences {
        add(sequence.len() as u64);
        sequence.input_ids.iter().for_each(|&id| add(u64::from(id)));
        sequence.labels.iter().for_each(|&label| add(label as u64));
        sequence
            .sample_lengths
            .iter()
            .for_each(|&length| add(length as u64));
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequences(count: usize) -> Vec<Sequence> {
        (0..count)
            .map(|i| {
                let length = 2 + i % 5;
                let input_ids: Vec<u32> = (0..length as u32).map(|t| i as u32 * 10 + t).collect();
                let mut labels: Vec<i64> = input_ids.iter().map(|&id| i64::from(id)).collect();
                labels[0] = IGNORE_INDEX;
                Sequence {
                    input_ids,
                    labels,
                    sample_lengths: vec![length],
                }
            })
            .collect()
    }

    fn options(num_epochs: Option<u64>) -> LoaderOptions {
        LoaderOptions {
            batch_size: 3,
            shuffle: true,
            seed: 11,
            num_epochs,
            pad_id: 999,
        }
    }

    #[test]
    fn batches_are_padded_right_with_masked_labels() {
        let data = sequences(2);
        let batch = Batch::from_rows(&[&data[0], &data[1]], 999);
        assert_eq!(batch.input_ids, vec![vec![0, 1, 999], vec![10, 11, 12]]);
        assert_eq!(batch.labels, vec![vec![-100, 1, -100], vec![-100, 11, 12]]);
        assert_eq!(batch.sample_lengths, vec![vec![2], vec![3]]);
        assert_eq!(
            (
                batch.rows(),
                batch.seq_len(),
                batch.tokens,
                batch.target_tokens
            ),
            (2, 3, 5, 3)
        );
    }

    #[test]
    fn every_sequence_once_per_epoch_in_a_seeded_order() {
        let mut loader = DataLoader::new(sequences(10), options(Some(2))).expect("loader");
        assert_eq!(loader.batches_per_epoch(), 4);
        let batches: Vec<Batch> = loader.by_ref().collect();
        assert_eq!(batches.len(), 8);
        assert_eq!(batches[3].rows(), 1);
        let firsts = |range: std::ops::Range<usize>| {
            let mut ids: Vec<u32> = batches[range]
                .iter()
                .flat_map(|b| b.input_ids.iter().map(|row| row[0]))
                .collect();
            ids.sort_unstable();
            ids
        };
        assert_eq!(firsts(0..4), (0..10).map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(firsts(4..8), firsts(0..4));
        let order = |epoch| epoch_order(10, &options(None), epoch);
        assert_ne!(order(0), order(1), "each epoch has its own order");
        assert_eq!(order(1), epoch_order(10, &options(None), 1));
        assert_ne!(order(0), (0..10).collect::<Vec<_>>());
        let plain = LoaderOptions {
            shuffle: false,
            ..options(None)
        };
        assert_eq!(epoch_order(10, &plain, 5), (0..10).collect::<Vec<_>>());
        assert!(loader.next_batch().is_none());
        assert_eq!(
            loader.cursor(),
            DataCursor {
                epoch: 2,
                position: 0,
                fingerprint: Some(loader.fingerprint().to_owned())
            }
        );
    }

    #[test]
    fn resuming_from_a_cursor_yields_the_same_remaining_batches() {
        let straight: Vec<Batch> = DataLoader::new(sequences(10), options(Some(3)))
            .expect("loader")
            .collect();
        for stop in [0, 1, 3, 4, 5, 9, 12] {
            let mut first = DataLoader::new(sequences(10), options(Some(3))).expect("loader");
            let head: Vec<Batch> = first.by_ref().take(stop).collect();
            let json = serde_json::to_string(&first.cursor()).expect("serialise");
            let cursor: DataCursor = serde_json::from_str(&json).expect("deserialise");
            let mut resumed = DataLoader::new(sequences(10), options(Some(3))).expect("loader");
            resumed.seek(&cursor).expect("seek");
            let tail: Vec<Batch> = resumed.collect();
            assert_eq!(
                [head, tail].concat(),
                straight,
                "stopped after {stop} batches"
            );
        }
    }

    #[test]
    fn a_cursor_from_other_data_is_refused() {
        let loader = DataLoader::new(sequences(10), options(None)).expect("loader");
        let mut other = DataLoader::new(sequences(9), options(None)).expect("loader");
        let error = other
            .seek(&loader.cursor())
            .expect_err("other data")
            .to_string();
        assert!(
            error.contains("saved for other data") && error.contains("hint:"),
            "{error}"
        );
        let reseeded = DataLoader::new(
            sequences(10),
            LoaderOptions {
                seed: 12,
                ..options(None)
            },
        )
        .expect("loader");
        assert_ne!(reseeded.fingerprint(), loader.fingerprint());
        let mut by_hand = DataLoader::new(sequences(10), options(None)).expect("loader");
        by_hand
            .seek(&DataCursor {
                epoch: 1,
                position: 4,
                fingerprint: None,
            })
            .expect("no fingerprint");
        assert!((by_hand.epoch_progress() - 1.4).abs() < 1e-12);
        assert!(
            by_hand
                .seek(&DataCursor {
                    epoch: 0,
                    position: 11,
                    fingerprint: None
                })
                .is_err()
        );
        assert!(DataLoader::new(Vec::new(), options(None)).is_err());
    }
}
