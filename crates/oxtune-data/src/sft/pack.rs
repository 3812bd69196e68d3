//! Sequences: the rows micro-batches are made of. Without packing a sequence is one sample;
//! with packing, several samples laid end to end up to `packing_length` tokens.
//!
//! Packing is first-fit decreasing: samples sorted by length, longest first (ties in input
//! order), each put into the first row it fits in, else into a new row. It is deterministic
//! (no seed), and it runs in O(n log n) with a max-tree over the rows' free space. Each row
//! records its samples' lengths, from which the trainer builds the block-diagonal attention
//! mask and per-sample positions (`oxtune_models::BatchLayout::packed`). The first token of
//! every sample has label -100, so no sample is predicted from the one before it.

use serde::Serialize;

use super::encode::{Encoded, IGNORE_INDEX, count_targets};
use crate::error::{Error, Result};

/// One row of a micro-batch before padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub input_ids: Vec<u32>,
    /// [`IGNORE_INDEX`] where there is no target.
    pub labels: Vec<i64>,
    /// The lengths of the samples laid end to end in this row (one entry when unpacked);
    /// they sum to `input_ids.len()`.
    pub sample_lengths: Vec<usize>,
}

impl Sequence {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    pub fn target_tokens(&self) -> usize {
        count_targets(&self.labels)
    }

    /// A row holding one sample.
    pub fn single(sample: Encoded) -> Self {
        let mut row = Self {
            sample_lengths: Vec::with_capacity(1),
            input_ids: Vec::new(),
            labels: Vec::new(),
        };
        row.push(sample);
        row
    }

    fn push(&mut self, sample: Encoded) {
        let start = self.labels.len();
        self.sample_lengths.push(sample.input_ids.len());
        self.input_ids.extend(sample.input_ids);
        self.labels.extend(sample.labels);
        if let Some(first) = self.labels.get_mut(start) {
            *first = IGNORE_INDEX;
        }
    }
}

/// One row per sample, in order.
pub fn unpacked(samples: Vec<Encoded>) -> Vec<Sequence> {
    samples.into_iter().map(Sequence::single).collect()
}

/// Packs samples into rows of at most `packing_length` tokens (first-fit decreasing).
pub fn pack(samples: Vec<Encoded>, packing_length: usize) -> Result<Vec<Sequence>> {
    let lengths: Vec<usize> = samples.iter().map(Encoded::len).collect();
    if let Some((index, &length)) = lengths
        .iter()
        .enumerate()
        .find(|(_, length)| **length > packing_length)
    {
        return Err(Error::Invalid {
            message: format!("{}: a sample of {length} tokens does not fit a packed row of {packing_length}", samples[index].origin),
            hint: "packing_length must be at least max_length; leave packing_length unset to use max_length".into(),
        });
    }
    let bins = pack_bins(&lengths, packing_length);
    let mut slots: Vec<Option<Encoded>> = samples.into_iter().map(Some).collect();
    Ok(bins
        .into_iter()
        .map(|bin| {
            let mut row = Sequence {
                input_ids: Vec::new(),
                labels: Vec::new(),
                sample_lengths: Vec::with_capacity(bin.len()),
            };
            for index in bin {
                if let Some(sample) = slots[index].take() {
                    row.push(sample);
                }
            }
            row
        })
        .collect())
}

/// First-fit decreasing: the indices of `lengths` in each bin of `capacity`, bins in the order
/// they were opened. Every length must be at most `capacity`.
pub fn pack_bins(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&index| std::cmp::Reverse(lengths[index]));
    // At most one bin per item; unopened bins have all their space free, so "the first bin
    // with room" is an open one or else the next one to open.
    let mut free = FreeSpaceTree::new(lengths.len(), capacity);
    let mut bins: Vec<Vec<usize>> = Vec::new();
    for index in order {
        let length = lengths[index];
        let Some(bin) = free.first_with(length) else {
            continue;
        };
        free.take(bin, length);
        if bin == bins.len() {
            bins.push(Vec::new());
        }
        bins[bin].push(index);
    }
    bins
}

/// A max segment tree over the bins' free space.
struct FreeSpaceTree {
    /// Leaves start at `leaves`; node i's children are 2i and 2i + 1.
    nodes: Vec<usize>,
    leaves: usize,
}

impl FreeSpaceTree {
    fn new(bins: usize, capacity: usize) -> Self {
        let leaves = bins.max(1).next_power_of_two();
        let mut nodes = vec![0; 2 * leaves];
        nodes[leaves..leaves + bins].fill(capacity);
        for node in (1..leaves).rev() {
            nodes[node] = nodes[2 * node].max(nodes[2 * node + 1]);
        }
        Self { nodes, leaves }
    }

    /// The leftmost bin with at least `length` free.
    fn first_with(&self, length: usize) -> Option<usize> {
        if self.nodes[1] < length {
            return None;
        }
        let mut node = 1;
        while node < self.leaves {
            node = if self.nodes[2 * node] >= length {
                2 * node
            } else {
                2 * node + 1
            };
        }
        Some(node - self.leaves)
    }

    fn take(&mut self, bin: usize, length: usize) {
        let mut node = bin + self.leaves;
        self.nodes[node] -= length;
        while node > 1 {
            node /= 2;
            self.nodes[node] = self.nodes[2 * node].max(self.nodes[2 * node + 1]);
        }
    }
}

/// How full the packed rows are.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PackReport {
    pub samples: usize,
    pub rows: usize,
    /// Tokens / (rows × packing_length).
    pub fill: f64,
}

impl PackReport {
    pub fn new(rows: &[Sequence], packing_length: usize) -> Self {
        let tokens: usize = rows.iter().map(Sequence::len).sum();
        let samples = rows.iter().map(|row| row.sample_lengths.len()).sum();
        let fill = if rows.is_empty() {
            0.0
        } else {
            tokens as f64 / (rows.len() * packing_length) as f64
        };
        Self {
            samples,
            rows: rows.len(),
            fill,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::super::source::Origin;
    use super::*;

    fn sample(line: u64, length: usize) -> Encoded {
        let input_ids: Vec<u32> = (0..length as u32).map(|i| line as u32 * 100 + i).collect();
        Encoded {
            labels: input_ids.iter().map(|&id| i64::from(id)).collect(),
            input_ids,
            origin: Origin {
                path: Arc::from(Path::new("d.jsonl")),
                line,
            },
        }
    }

    #[test]
    fn first_fit_decreasing_bins() {
        // Sorted: 6 (i1), 5 (i3), 4 (i0), 3 (i4), 2 (i2), 2 (i5); capacity 8.
        assert_eq!(
            pack_bins(&[4, 6, 2, 5, 3, 2], 8),
            vec![vec![1, 2], vec![3, 4], vec![0, 5]]
        );
        assert_eq!(pack_bins(&[8, 8, 1], 8), vec![vec![0], vec![1], vec![2]]);
        assert_eq!(pack_bins(&[], 8), Vec::<Vec<usize>>::new());
        // Same input, same bins: no randomness.
        let lengths: Vec<usize> = (0..500).map(|i| 1 + (i * 7919) % 97).collect();
        let bins = pack_bins(&lengths, 128);
        assert_eq!(bins, pack_bins(&lengths, 128));
        let mut seen: Vec<usize> = bins.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..500).collect::<Vec<_>>());
        assert!(
            bins.iter()
                .all(|bin| bin.iter().map(|&i| lengths[i]).sum::<usize>() <= 128)
        );
        // FFD stays within 11/9 OPT + 1 of the lower bound.
        let lower = lengths.iter().sum::<usize>().div_ceil(128);
        assert!(
            bins.len() * 9 <= lower * 11 + 9,
            "{} bins for a lower bound of {lower}",
            bins.len()
        );
    }

    #[test]
    fn packed_rows_record_lengths_and_mask_first_tokens() {
        let rows = pack(vec![sample(1, 4), sample(2, 6), sample(3, 2)], 8).expect("pack");
        assert_eq!(
            rows.iter()
                .map(|r| r.sample_lengths.clone())
                .collect::<Vec<_>>(),
            vec![vec![6, 2], vec![4]]
        );
        let first = &rows[0];
        assert_eq!(first.input_ids, [200, 201, 202, 203, 204, 205, 300, 301]);
        assert_eq!(first.labels, [-100, 201, 202, 203, 204, 205, -100, 301]);
        assert_eq!(first.target_tokens(), 6);
        let error = pack(vec![sample(9, 9)], 8)
            .expect_err("too long")
            .to_string();
        assert!(
            error.contains("d.jsonl:9: a sample of 9 tokens does not fit a packed row of 8"),
            "{error}"
        );
        let report = PackReport::new(&rows, 8);
        assert_eq!((report.samples, report.rows), (3, 2));
        assert!((report.fill - 12.0 / 16.0).abs() < 1e-12);
    }

    #[test]
    fn unpacked_rows_are_single_samples() {
        let rows = unpacked(vec![sample(1, 3), sample(2, 2)]);
        assert_eq!(
            rows.iter()
                .map(|r| r.sample_lengths.clone())
                .collect::<Vec<_>>(),
            vec![vec![3], vec![2]]
        );
        assert_eq!(rows[0].labels, [-100, 101, 102]);
    }
}
