//! `oxtune data split`: train and validation files by ratio, reproducible from a seed.
//!
//! Two passes over the input (count, then write), so memory is one bit per record. The
//! validation records are a seeded uniform sample of exactly `round(n × ratio)` records (at
//! least one when the ratio is above zero and there are two or more records); both outputs keep
//! the input order. The sample depends only on the seed and the record count, through our own
//! SplitMix64 generator, so a split stays the same across dependency upgrades.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::reader::RecordReader;
use crate::writer::{RecordWriter, ensure_distinct};

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-mixed, fully specified generator.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// A uniform integer below `bound` (Lemire's multiply-shift; the bias is below 2^-32 for
    /// any dataset size).
    pub fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }
}

/// The SplitMix64 finalizer: a bijective mix of 64 bits.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// How to split.
#[derive(Debug, Clone, Copy)]
pub struct SplitOptions {
    /// The fraction of records for validation, in [0, 1).
    pub val_ratio: f64,
    pub seed: u64,
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct SplitReport {
    pub input: String,
    pub train: String,
    pub val: String,
    pub seed: u64,
    pub val_ratio: f64,
    pub records: u64,
    pub train_records: u64,
    pub val_records: u64,
}

/// Which of `records` records go to validation.
pub fn validation_mask(records: usize, val_ratio: f64, seed: u64) -> Vec<bool> {
    let mut count = (records as f64 * val_ratio).round() as usize;
    if val_ratio > 0.0 && count == 0 && records >= 2 {
        count = 1;
    }
    let count = count.min(records.saturating_sub(1));
    // A partial Fisher-Yates shuffle: the first `count` slots are a uniform sample.
    let mut order: Vec<u32> = (0..records as u32).collect();
    let mut rng = SplitMix64::new(seed);
    for slot in 0..count {
        let pick = slot + rng.below((records - slot) as u64) as usize;
        order.swap(slot, pick);
    }
    let mut mask = vec![false; records];
    for &index in &order[..count] {
        mask[index as usize] = true;
    }
    mask
}

/// Splits `input` into `train` and `val`.
pub fn split_file(
    input: &Path,
    train: &Path,
    val: &Path,
    options: &SplitOptions,
) -> Result<SplitReport> {
    if !(0.0..1.0).contains(&options.val_ratio) {
        return Err(Error::Invalid {
            message: format!("validation ratio {} is outside [0, 1)", options.val_ratio),
            hint: "pass e.g. --val-ratio 0.1 for 10%".to_owned(),
        });
    }
    ensure_distinct(input, train)?;
    ensure_distinct(input, val)?;
    if train == val {
        return Err(Error::Invalid {
            message: format!("train and validation outputs are both {}", train.display()),
            hint: "give them different paths".to_owned(),
        });
    }
    let mut records = 0_usize;
    for record in RecordReader::open(input)? {
        record?;
        records += 1;
    }
    if records > u32::MAX as usize {
        return Err(Error::Invalid {
            message: format!(
                "{}: {records} records is more than split handles",
                input.display()
            ),
            hint: "split the file into parts first".to_owned(),
        });
    }
    let mask = validation_mask(records, options.val_ratio, options.seed);
    let reader = RecordReader::open(input)?;
    let mut train_writer = RecordWriter::create(train, reader.kind(), reader.headers())?;
    let mut val_writer = RecordWriter::create(val, reader.kind(), reader.headers())?;
    for (index, record) in reader.enumerate() {
        let record = record?;
        if mask.get(index).copied().unwrap_or(false) {
            val_writer.write_raw(&record.body)?;
        } else {
            train_writer.write_raw(&record.body)?;
        }
    }
    let train_records = train_writer.finish()?;
    let val_records = val_writer.finish()?;
    Ok(SplitReport {
        input: input.display().to_string(),
        train: train.display().to_string(),
        val: val.display().to_string(),
        seed: options.seed,
        val_ratio: options.val_ratio,
        records: records as u64,
        train_records,
        val_records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_has_the_asked_size_and_depends_only_on_the_seed() {
        let mask = validation_mask(1000, 0.1, 42);
        assert_eq!(mask.iter().filter(|v| **v).count(), 100);
        assert_eq!(mask, validation_mask(1000, 0.1, 42));
        assert_ne!(mask, validation_mask(1000, 0.1, 43));
        assert_eq!(
            validation_mask(5, 0.01, 0).iter().filter(|v| **v).count(),
            1
        );
        assert_eq!(validation_mask(1, 0.5, 0).iter().filter(|v| **v).count(), 0);
    }

    #[test]
    fn splitmix_matches_the_reference_sequence() {
        // First outputs of SplitMix64 seeded with 0, from the reference C implementation.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn splits_a_file_keeping_order_and_every_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("d.jsonl");
        let text: String = (0..20)
            .map(|i| format!("{{\"query\": \"q{i}\", \"response\": \"r\"}}\n"))
            .collect();
        std::fs::write(&input, &text).expect("write");
        let (train, val) = (dir.path().join("train.jsonl"), dir.path().join("val.jsonl"));
        let report = split_file(
            &input,
            &train,
            &val,
            &SplitOptions {
                val_ratio: 0.25,
                seed: 7,
            },
        )
        .expect("split");
        assert_eq!((report.train_records, report.val_records), (15, 5));
        let train_text = std::fs::read_to_string(&train).expect("train");
        let val_text = std::fs::read_to_string(&val).expect("val");
        let mut all: Vec<&str> = train_text.lines().chain(val_text.lines()).collect();
        all.sort_unstable();
        let mut expected: Vec<&str> = text.lines().collect();
        expected.sort_unstable();
        assert_eq!(all, expected);
    }
}
