//! Causal-LM cross-entropy as transformers' `ForCausalLMLoss` computes it: logits at
//! position i predict the label at i + 1, labels of -100 are ignored, statistics in f32.
//!
//! The loss is returned as a SUM over target tokens together with their count, so the
//! trainer can divide by the number of target tokens of a whole accumulation window.

use oxtune_tensor::{D, DType, Tensor};

use crate::Result;

/// The label that marks a position without loss (prompt tokens, padding).
pub const IGNORE_INDEX: i64 = -100;

/// Summed cross-entropy over target tokens and how many there are.
/// `logits`: (b, t, v); `labels`: (b, t) i64 with [`IGNORE_INDEX`] where there is no target.
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    // Shift: positions 0..t-1 predict labels 1..t.
    let logits = logits
        .narrow(1, 0, t - 1)?
        .to_dtype(DType::F32)?
        .reshape((b * (t - 1), v))?;
    let labels: Vec<i64> = labels.narrow(1, 1, t - 1)?.flatten_all()?.to_vec1()?;
    let mask: Vec<f32> = labels
        .iter()
        .map(|&l| if l == IGNORE_INDEX { 0.0 } else { 1.0 })
        .collect();
    let targets = labels
        .iter()
        .map(|&l| u32::try_from(if l == IGNORE_INDEX { 0 } else { l }))
        .collect::<Result<Vec<u32>, _>>()
        .map_err(oxtune_tensor::candle::Error::wrap)?;
    let count = mask.iter().filter(|m| **m > 0.0).count();
    let device = logits.device();
    let targets = Tensor::from_vec(targets, (b * (t - 1), 1), device)?;
    let mask = Tensor::from_vec(mask, b * (t - 1), device)?;
    // -log_softmax at the target = logsumexp(logits) - logit[target]
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let logsumexp = logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .add(&max)?;
    let target_logit = logits.gather(&targets, D::Minus1)?;
    let per_token = (logsumexp - target_logit)?.squeeze(1)?;
    Ok(((per_token * mask)?.sum_all()?, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxtune_tensor::Device;

    #[test]
    fn matches_a_hand_computed_cross_entropy() -> Result<()> {
        let device = Device::Cpu;
        // one row, three positions, vocab 2; targets are labels[1..]
        let logits = Tensor::new(&[[[0.0f32, 1.0], [2.0, 0.0], [5.0, 5.0]]], &device)?;
        let labels = Tensor::new(&[[IGNORE_INDEX, 1, IGNORE_INDEX]], &device)?;
        let (sum, count) = causal_lm_loss_sum(&logits, &labels)?;
        let expected = (1.0f32.exp() + 1.0).ln() - 1.0; // -log softmax([0, 1])[1]
        assert_eq!(count, 1);
        assert!((sum.to_scalar::<f32>()? - expected).abs() < 1e-6);
        Ok(())
    }
}
