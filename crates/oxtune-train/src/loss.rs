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
    let targets = causal_targets(labels)?;
    let sum = cross_entropy_sum(&logits.reshape((b * t, v))?, &targets)?;
    Ok((sum, target_count(&targets)))
}

/// The target of every token row of a batch, flattened: position i of a row predicts the
/// label at i + 1; the last position of each row predicts nothing ([`IGNORE_INDEX`]).
/// `labels`: (b, t) i64 -> b * t targets.
pub fn causal_targets(labels: &Tensor) -> Result<Vec<i64>> {
    let t = labels.dim(1)?;
    let labels: Vec<Vec<i64>> = labels.to_vec2()?;
    Ok(labels
        .iter()
        .flat_map(|row| {
            row.iter()
                .skip(1)
                .copied()
                .chain(std::iter::once(IGNORE_INDEX))
                .take(t)
        })
        .collect())
}

/// Number of targets that count (not [`IGNORE_INDEX`]).
pub fn target_count(targets: &[i64]) -> usize {
    targets.iter().filter(|&&l| l != IGNORE_INDEX).count()
}

/// Summed cross-entropy of `logits` (n, v), in any dtype, against `targets` (n of them,
/// [`IGNORE_INDEX`] for none), with the statistics in f32.
pub fn cross_entropy_sum(logits: &Tensor, targets: &[i64]) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    let device = logits.device();
    let mask: Vec<f32> = targets
        .iter()
        .map(|&l| if l == IGNORE_INDEX { 0.0 } else { 1.0 })
        .collect();
    let ids = targets
        .iter()
        .map(|&l| u32::try_from(if l == IGNORE_INDEX { 0 } else { l }))
        .collect::<Result<Vec<u32>, _>>()
        .map_err(oxtune_tensor::candle::Error::wrap)?;
    let logits = logits.to_dtype(DType::F32)?;
    let ids = Tensor::from_vec(ids, (n, 1), device)?;
    let mask = Tensor::from_vec(mask, n, device)?;
    // -log_softmax at the target = logsumexp(logits) - logit[target]
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let logsumexp = logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .add(&max)?;
    let target_logit = logits.gather(&ids, D::Minus1)?;
    let per_token = (logsumexp - target_logit)?.squeeze(1)?;
    Ok((per_token * mask)?.sum_all()?)
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
