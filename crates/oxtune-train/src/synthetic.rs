//! Synthetic training data: deterministic pseudo-random token rows, for speed measurements
//! (`oxtune bench train`) and tests that need batches without a tokenizer. Every position but
//! the first of each row is a target.

use oxtune_models::BatchLayout;
use oxtune_tensor::{Device, Tensor};

use crate::Result;
use crate::trainer::{BatchSource, MicroBatch};

/// `distinct` different micro-batches of `batch_size` rows x `seq_len` tokens, repeated
/// until `total` micro-batches have been served.
#[derive(Debug, Clone)]
pub struct SyntheticBatches {
    pub batch_size: usize,
    pub seq_len: usize,
    pub vocab_size: usize,
    pub distinct: usize,
    pub total: usize,
    pub device: Device,
    position: usize,
}

impl SyntheticBatches {
    pub fn new(
        batch_size: usize,
        seq_len: usize,
        vocab_size: usize,
        distinct: usize,
        total: usize,
        device: &Device,
    ) -> Self {
        Self {
            batch_size,
            seq_len,
            vocab_size,
            distinct: distinct.max(1),
            total,
            device: device.clone(),
            position: 0,
        }
    }
}

impl BatchSource for SyntheticBatches {
    fn next_batch(&mut self) -> Result<Option<MicroBatch>> {
        if self.position >= self.total {
            return Ok(None);
        }
        let pattern = self.position % self.distinct;
        self.position += 1;
        let (b, t) = (self.batch_size, self.seq_len);
        let ids: Vec<u32> = (0..b * t)
            .map(|i| {
                let value = (i.wrapping_mul(2_654_435_761) ^ pattern.wrapping_mul(40_503))
                    % self.vocab_size;
                u32::try_from(value).unwrap_or(0)
            })
            .collect();
        let labels: Vec<i64> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| if i % t == 0 { -100 } else { i64::from(id) })
            .collect();
        Ok(Some(MicroBatch {
            input_ids: Tensor::from_vec(ids, (b, t), &self.device)?,
            labels: Tensor::from_vec(labels, (b, t), &self.device)?,
            layout: BatchLayout::unpacked(&vec![t; b], t, None, &self.device)?,
            target_tokens: b * (t - 1),
            tokens: b * t,
        }))
    }

    fn cursor(&self) -> serde_json::Value {
        serde_json::json!(self.position)
    }

    fn seek(&mut self, cursor: &serde_json::Value) -> Result<()> {
        self.position = cursor
            .as_u64()
            .and_then(|p| usize::try_from(p).ok())
            .unwrap_or(0);
        Ok(())
    }

    fn epoch(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "small counts")]
        let epoch = self.position as f64 / (self.distinct.max(1)) as f64;
        epoch
    }
}
