//! Rotary position embedding frequencies, with the scaling schemes of Hugging Face's
//! `ROPE_INIT_FUNCTIONS` that the supported families use: `default`, `linear` and `llama3`.

use oxtune_tensor::{DType, Device, Tensor};

use crate::Result;

/// How a checkpoint scales its rotary frequencies (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain `1 / theta^(2i/d)`.
    Default,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// `inv_freq` for `head_dim` rotary dimensions, in f64 on the host.
pub fn inverse_frequencies(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f64> {
    #[expect(clippy::cast_precision_loss, reason = "head dims are small")]
    let base: Vec<f64> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f64 / head_dim as f64))
        .collect();
    match *scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            #[expect(clippy::cast_precision_loss, reason = "context lengths fit in f64")]
            let original = original_max_position_embeddings as f64;
            let low_freq_wavelen = original / low_freq_factor;
            let high_freq_wavelen = original / high_freq_factor;
            base.into_iter()
                .map(|freq| {
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    if wavelen < high_freq_wavelen {
                        freq
                    } else if wavelen > low_freq_wavelen {
                        freq / factor
                    } else {
                        let smooth = (original / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect()
        }
    }
}

/// Precomputed `cos` and `sin` tables, (max_positions, head_dim / 2).
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
}

impl RotaryEmbedding {
    /// Builds the tables in f32 (as transformers does) and casts them to `dtype`.
    pub fn new(
        head_dim: usize,
        max_positions: usize,
        theta: f64,
        scaling: &RopeScaling,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "transformers keeps inv_freq in f32"
        )]
        let inv_freq: Vec<f32> = inverse_frequencies(head_dim, theta, scaling)
            .into_iter()
            .map(|f| f as f32)
            .collect();
        let half = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        #[expect(clippy::cast_precision_loss, reason = "positions are far below 2^24")]
        let positions: Vec<f32> = (0..max_positions).map(|p| p as f32).collect();
        let positions = Tensor::from_vec(positions, (max_positions, 1), device)?;
        let angles = positions.matmul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }

    /// The tables for positions `start .. start + len`.
    pub fn tables(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let available = self.cos.dim(0)?;
        if start + len > available {
            return Err(oxtune_tensor::candle::Error::Msg(format!(
                "position {} is beyond the model's context of {available} tokens\nhint: shorten the input or lower --max_new_tokens",
                start + len
            ))
            .into());
        }
        Ok((
            self.cos.narrow(0, start, len)?,
            self.sin.narrow(0, start, len)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let plain = inverse_frequencies(128, 500_000.0, &RopeScaling::Default);
        let scaled = inverse_frequencies(128, 500_000.0, &scaling);
        assert!(
            (scaled[0] - plain[0]).abs() < 1e-12,
            "highest frequency unchanged"
        );
        let last = plain.len() - 1;
        assert!(
            (scaled[last] - plain[last] / 8.0).abs() < 1e-15,
            "lowest frequency divided"
        );
    }
}
