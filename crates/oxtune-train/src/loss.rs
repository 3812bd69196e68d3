//! Causal-LM cross-entropy as transformers' `ForCausalLMLoss` computes it: logits at
//! position i predict the label at i + 1, labels of -100 are ignored, statistics in f32.
//!
//! The loss is returned as a SUM over target tokens together with their count, so the
//! trainer can divide by the number of target tokens of a whole accumulation window.

use oxtune_tensor::{Tensor, ops};

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
/// [`IGNORE_INDEX`] for none), with the statistics in f32: [`ops::cross_entropy_sum`], which
/// on CUDA reads the logits in their dtype (no f32 copy) and writes their gradient in it.
/// Each target is checked here, on the host, to be an index into the vocabulary.
pub fn cross_entropy_sum(logits: &Tensor, targets: &[i64]) -> Result<Tensor> {
    let (n, vocab) = logits.dims2()?;
    if targets.len() != n {
        return Err(oxtune_tensor::candle::Error::Msg(format!(
            "cross_entropy_sum: {} targets for {n} rows of logits",
            targets.len()
        ))
        .into());
    }
    if let Some((row, target)) = targets
        .iter()
        .enumerate()
        .find(|(_, t)| **t != IGNORE_INDEX && usize::try_from(**t).map_or(true, |t| t >= vocab))
    {
        return Err(oxtune_tensor::candle::Error::Msg(format!(
            "cross_entropy_sum: target {target} of row {row} is not a token of the \
             {vocab}-token vocabulary (nor {IGNORE_INDEX})"
        ))
        .into());
    }
    let targets = Tensor::from_slice(targets, n, logits.device())?;
    Ok(ops::cross_entropy_sum(logits, &targets, IGNORE_INDEX)?)
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

    #[test]
    fn rejects_targets_outside_the_vocabulary() -> Result<()> {
        let logits = Tensor::zeros((2, 3), oxtune_tensor::DType::F32, &Device::Cpu)?;
        for bad in [[0, 3], [-1, 0], [IGNORE_INDEX, 7]] {
            let error = cross_entropy_sum(&logits, &bad).expect_err("an out-of-range target");
            assert!(error.to_string().contains("3-token vocabulary"), "{error}");
        }
        assert!(
            cross_entropy_sum(&logits, &[0]).is_err(),
            "a target count that differs"
        );
        let sum = cross_entropy_sum(&logits, &[IGNORE_INDEX, 2])?.to_scalar::<f32>()?;
        assert!((sum - 3f32.ln()).abs() < 1e-6, "{sum}");
        Ok(())
    }
}
