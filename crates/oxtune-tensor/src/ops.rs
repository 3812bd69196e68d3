//! The ops the model families use.
//!
//! candle-nn's fused kernels (`rms_norm`, `rope`, `softmax_last_dim`) are fast but have no
//! backward: gradients through them come back `None` without a word. Each op here therefore
//! has two paths with the same numerics:
//! - a plain, differentiable composition of candle primitives (`*_reference`), and
//! - the fused kernel, used only when no input tracks gradients (`Tensor::track_op`).
//!
//! The tests at the bottom compare the two paths on random inputs.

use candle_core::{D, DType, Result, Tensor};

/// RMSNorm as Hugging Face computes it: statistics in f32, the normalised activations cast
/// back to the input dtype, then scaled by `weight`.
///
/// `xs`: (.., hidden), `weight`: (hidden,).
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if xs.track_op() || weight.track_op() {
        return rms_norm_reference(xs, weight, eps);
    }
    #[expect(
        clippy::cast_possible_truncation,
        reason = "eps is a small f32 constant in configs"
    )]
    let eps = eps as f32;
    candle_nn::ops::rms_norm(&xs.contiguous()?, weight, eps)
}

/// The differentiable reference for [`rms_norm`].
pub fn rms_norm_reference(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    let internal = if matches!(dtype, DType::F64) {
        DType::F64
    } else {
        DType::F32
    };
    let xs = xs.to_dtype(internal)?;
    let variance = xs.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xs.broadcast_mul(&(variance + eps)?.sqrt()?.recip()?)?;
    normed
        .to_dtype(dtype)?
        .broadcast_mul(&weight.to_dtype(dtype)?)
}

/// Rotary position embedding in the "rotate half" layout used by Hugging Face Llama, Qwen
/// and Mistral checkpoints.
///
/// `xs`: (b, h, t, d); `cos`, `sin`: (t, d/2) shared by the batch, or (b, t, d/2) per row
/// (packed samples restart their positions).
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if xs.track_op() {
        return rope_reference(xs, cos, sin);
    }
    candle_nn::rotary_emb::rope(&xs.contiguous()?, cos, sin)
}

/// The differentiable reference for [`rope`]: `x * cos + rotate_half(x) * sin`.
pub fn rope_reference(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = xs.dim(D::Minus1)? / 2;
    // (t, d/2) -> (1, 1, t, d); (b, t, d/2) -> (b, 1, t, d)
    let per_head = |table: &Tensor| -> Result<Tensor> {
        let full = Tensor::cat(&[table, table], D::Minus1)?;
        if full.rank() == 2 {
            full.unsqueeze(0)?.unsqueeze(0)
        } else {
            full.unsqueeze(1)
        }
    };
    let (cos, sin) = (per_head(cos)?, per_head(sin)?);
    let first = xs.narrow(D::Minus1, 0, half)?;
    let second = xs.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
    xs.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if xs.track_op() {
        return softmax_reference(xs);
    }
    candle_nn::ops::softmax_last_dim(&xs.contiguous()?)
}

/// The differentiable reference for [`softmax_last_dim`], stabilised by the row maximum.
pub fn softmax_reference(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let exp = xs.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Inverted dropout with a reproducible mask: each element is zeroed with probability `p`
/// and survivors are scaled by 1 / (1 - p). The mask depends only on `seed` (a seeded host
/// generator on the CPU, whose candle generator cannot be seeded; the device generator,
/// seeded, on a GPU), so a resumed run draws the same masks. Differentiable in `xs`.
pub fn dropout(xs: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(xs.clone());
    }
    let keep_scale = 1.0 / (1.0 - p);
    let mask = match xs.device() {
        candle_core::Device::Cpu => {
            use rand::{Rng as _, SeedableRng as _};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mask: Vec<f32> = (0..xs.elem_count())
                .map(|_| {
                    if rng.random::<f32>() < p {
                        0.0
                    } else {
                        keep_scale
                    }
                })
                .collect();
            Tensor::from_vec(mask, xs.shape(), xs.device())?
        }
        device => {
            device.set_seed(seed)?;
            let uniform = Tensor::rand(0f32, 1f32, xs.shape(), device)?;
            (uniform.ge(f64::from(p))?.to_dtype(DType::F32)? * f64::from(keep_scale))?
        }
    };
    xs.mul(&mask.to_dtype(xs.dtype())?)
}

/// SiLU (x * sigmoid(x)); candle's `silu` has a backward.
pub fn silu(xs: &Tensor) -> Result<Tensor> {
    xs.silu()
}

/// Repeats each key/value head `repeats` times for grouped-query attention:
/// (b, kv_h, t, d) -> (b, kv_h * repeats, t, d).
pub fn repeat_kv(xs: &Tensor, repeats: usize) -> Result<Tensor> {
    if repeats == 1 {
        return Ok(xs.clone());
    }
    let (b, kv_h, t, d) = xs.dims4()?;
    xs.unsqueeze(2)?
        .expand((b, kv_h, repeats, t, d))?
        .reshape((b, kv_h * repeats, t, d))
}

/// Additive attention mask for `new_tokens` queries placed after `past_tokens` cached keys:
/// (new_tokens, past_tokens + new_tokens), 0 where a query may look and -inf where it may not.
/// `sliding_window` limits how far back a query looks (Mistral).
pub fn causal_mask(
    new_tokens: usize,
    past_tokens: usize,
    sliding_window: Option<usize>,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let total = past_tokens + new_tokens;
    let mask: Vec<f32> = (0..new_tokens)
        .flat_map(|i| {
            let query_position = past_tokens + i;
            (0..total).map(move |j| {
                let visible = j <= query_position
                    && sliding_window.is_none_or(|window| query_position - j < window);
                if visible { 0.0 } else { f32::NEG_INFINITY }
            })
        })
        .collect();
    Tensor::from_vec(mask, (new_tokens, total), device)?.to_dtype(dtype)
}

/// Additive attention mask for rows of packed samples: (b, 1, t, t), 0 where query i may
/// look at key j (same sample, j <= i) and -inf elsewhere. `segments[row][position]` is the
/// sample a token belongs to; give each padding token a segment of its own.
/// `sliding_window` limits how far back a query looks (Mistral).
pub fn packed_causal_mask(
    segments: &[Vec<u32>],
    sliding_window: Option<usize>,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let b = segments.len();
    let t = segments.first().map_or(0, Vec::len);
    let mut mask = Vec::with_capacity(b * t * t);
    for row in segments {
        if row.len() != t {
            candle_core::bail!(
                "packed_causal_mask: rows of different lengths ({} and {t})",
                row.len()
            );
        }
        for i in 0..t {
            for j in 0..t {
                let visible = j <= i
                    && row[i] == row[j]
                    && sliding_window.is_none_or(|window| i - j < window);
                mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
            }
        }
    }
    Tensor::from_vec(mask, (b, 1, t, t), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn fused_paths_match_their_references() -> Result<()> {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &device)?;
        let weight = Tensor::randn(1f32, 0.1, 8, &device)?;
        let fused = rms_norm(&xs, &weight, 1e-6)?;
        assert!(max_abs_diff(&fused, &rms_norm_reference(&xs, &weight, 1e-6)?)? < 1e-5);

        let cos = Tensor::randn(0f32, 1.0, (5, 4), &device)?;
        let sin = Tensor::randn(0f32, 1.0, (5, 4), &device)?;
        let fused = rope(&xs, &cos, &sin)?;
        assert!(max_abs_diff(&fused, &rope_reference(&xs, &cos, &sin)?)? < 1e-5);

        let cos = Tensor::randn(0f32, 1.0, (2, 5, 4), &device)?;
        let sin = Tensor::randn(0f32, 1.0, (2, 5, 4), &device)?;
        let fused = rope(&xs, &cos, &sin)?;
        assert!(
            max_abs_diff(&fused, &rope_reference(&xs, &cos, &sin)?)? < 1e-5,
            "per-row tables"
        );

        let fused = softmax_last_dim(&xs)?;
        assert!(max_abs_diff(&fused, &softmax_reference(&xs)?)? < 1e-6);
        Ok(())
    }

    #[test]
    fn gradients_flow_through_every_op() -> Result<()> {
        let device = Device::Cpu;
        let xs = Var::randn(0f32, 1.0, (1, 2, 3, 4), &device)?;
        let weight = Var::randn(1f32, 0.1, 4, &device)?;
        let cos = Tensor::randn(0f32, 1.0, (3, 2), &device)?;
        let sin = Tensor::randn(0f32, 1.0, (3, 2), &device)?;
        let out = rms_norm(xs.as_tensor(), weight.as_tensor(), 1e-6)?;
        let out = softmax_last_dim(&rope(&out, &cos, &sin)?)?;
        let grads = (out * Tensor::randn(0f32, 1.0, (1, 2, 3, 4), &device)?)?
            .sum_all()?
            .backward()?;
        for var in [&xs, &weight] {
            let grad = grads.get(var.as_tensor());
            assert!(grad.is_some(), "a parameter got no gradient");
        }
        Ok(())
    }

    #[test]
    fn rms_norm_gradient_matches_finite_differences() -> Result<()> {
        let device = Device::Cpu;
        let base = Tensor::new(&[[0.3f64, -1.2, 0.7, 2.0]], &device)?;
        let weight = Tensor::new(&[1.1f64, 0.9, -0.5, 1.3], &device)?;
        let probe = Tensor::new(&[[0.2f64, -0.4, 1.0, 0.5]], &device)?;
        let loss = |x: &Tensor| -> Result<f64> {
            (rms_norm_reference(x, &weight, 1e-6)? * &probe)?
                .sum_all()?
                .to_scalar::<f64>()
        };
        let var = Var::from_tensor(&base)?;
        let grads = (rms_norm(var.as_tensor(), &weight, 1e-6)? * &probe)?
            .sum_all()?
            .backward()?;
        let analytic: Vec<f64> = grads
            .get(var.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?
            .flatten_all()?
            .to_vec1()?;
        let h = 1e-6;
        for (i, analytic) in analytic.iter().enumerate() {
            let mut plus = base.flatten_all()?.to_vec1::<f64>()?;
            let mut minus = plus.clone();
            plus[i] += h;
            minus[i] -= h;
            let plus = Tensor::from_vec(plus, (1, 4), &device)?;
            let minus = Tensor::from_vec(minus, (1, 4), &device)?;
            let numeric = (loss(&plus)? - loss(&minus)?) / (2.0 * h);
            assert!(
                (numeric - analytic).abs() < 1e-6,
                "element {i}: {numeric} vs {analytic}"
            );
        }
        Ok(())
    }

    #[test]
    fn dropout_is_reproducible_and_unbiased() -> Result<()> {
        let xs = Tensor::ones((64, 64), DType::F32, &Device::Cpu)?;
        let a = dropout(&xs, 0.25, 7)?;
        assert_eq!(
            a.to_vec2::<f32>()?,
            dropout(&xs, 0.25, 7)?.to_vec2::<f32>()?
        );
        assert_ne!(
            a.to_vec2::<f32>()?,
            dropout(&xs, 0.25, 8)?.to_vec2::<f32>()?
        );
        let mean = a.mean_all()?.to_scalar::<f32>()?;
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
        Ok(())
    }

    #[test]
    fn packed_mask_keeps_samples_apart() -> Result<()> {
        let mask = packed_causal_mask(&[vec![0, 0, 1, 1]], None, DType::F32, &Device::Cpu)?;
        let rows = mask.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?;
        let visible: Vec<Vec<bool>> = rows
            .iter()
            .map(|r| r.iter().map(|v| *v == 0.0).collect())
            .collect();
        assert_eq!(visible[1], [true, true, false, false]);
        assert_eq!(visible[2], [false, false, true, false]);
        assert_eq!(visible[3], [false, false, true, true]);
        Ok(())
    }

    #[test]
    fn causal_mask_respects_past_and_window() -> Result<()> {
        let mask = causal_mask(2, 3, Some(2), DType::F32, &Device::Cpu)?.to_vec2::<f32>()?;
        // query at position 3 sees positions 2 and 3; query at position 4 sees 3 and 4
        let visible: Vec<Vec<bool>> = mask
            .iter()
            .map(|row| row.iter().map(|v| *v == 0.0).collect())
            .collect();
        assert_eq!(visible[0], [false, false, true, true, false]);
        assert_eq!(visible[1], [false, false, false, true, true]);
        Ok(())
    }
}
