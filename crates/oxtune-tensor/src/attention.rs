//! Scaled dot-product attention for training: softmax(q k^T * scale + mask) v with
//! grouped-query attention and the masks of packed batches (causal, per-sample segments,
//! sliding window), differentiable in q, k and v.
//!
//! [`flash_attention`] runs the fused FlashAttention-2 kernels on CUDA (bf16 and f16,
//! head_dim 64 or 128; `kernels/flash_attn.cu`, `cuda` feature): no (t, t) score matrix is
//! ever stored, kv heads are never repeated in memory, and the backward recomputes the
//! probabilities from the saved log-sum-exp. Everything else (the CPU, f32, other head dims)
//! runs [`flash_attention_reference`], the plain candle composition the models used before.
//!
//! Query and key lengths are equal (training: no KV cache).

use candle_core::{DType, Result, Tensor, bail};

use crate::ops;

/// Which keys a query sees. With every field off, all keys are visible.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttentionMask<'a> {
    /// Query i sees key j only if j <= i.
    pub causal: bool,
    /// (b, t) u32: query i sees key j only if `segments[b][i] == segments[b][j]` (samples
    /// packed into one row; give each padding token a segment of its own).
    pub segments: Option<&'a Tensor>,
    /// Query i sees key j only if i - j < window (Mistral); must be at least 1.
    pub sliding_window: Option<usize>,
}

/// softmax(q k^T * scale + mask) v with grouped-query attention.
///
/// q: (b, h, t, d); k, v: (b, kv_h, t, d) with h % kv_h == 0 (query head i reads kv head
/// i / (h / kv_h)); one dtype. -> (b, h, t, d) in that dtype. A query that sees no key
/// (impossible when causal, as each query sees itself) gets zeros from the kernels and NaN
/// from the reference.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: AttentionMask<'_>,
) -> Result<Tensor> {
    check(q, k, v, scale, &mask)?;
    #[cfg(feature = "cuda")]
    if crate::cuda::applies(&[q, k, v])
        && matches!(q.dtype(), DType::BF16 | DType::F16)
        && crate::cuda::FLASH_HEAD_DIMS.contains(&q.dim(3)?)
    {
        return crate::cuda::flash_attention(q, k, v, scale, &mask);
    }
    flash_attention_reference(q, k, v, scale, mask)
}

/// The composition [`flash_attention`] stands for, differentiable through candle's
/// autograd: repeat the kv heads, scores q k^T in f32 (f64 for f64 inputs), mask, softmax
/// ([`ops::scaled_masked_softmax`]), probabilities cast to the dtype of v, times v.
pub fn flash_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: AttentionMask<'_>,
) -> Result<Tensor> {
    check(q, k, v, scale, &mask)?;
    let (b, h, t, _) = q.dims4()?;
    let kv_h = k.dim(1)?;
    let k = ops::repeat_kv(k, h / kv_h)?.contiguous()?;
    let v = ops::repeat_kv(v, h / kv_h)?.contiguous()?;
    let score_dtype = if q.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    // (b, h, t, d) x (b, h, d, t) -> (b, h, t, t)
    let scores = q
        .to_dtype(score_dtype)?
        .contiguous()?
        .matmul(&k.to_dtype(score_dtype)?.t()?)?;
    let additive;
    let score_mask = match (mask.segments, mask.sliding_window) {
        (None, None) if mask.causal => ops::ScoreMask::Causal { past_tokens: 0 },
        (None, None) => ops::ScoreMask::None,
        (segments, window) => {
            additive = additive_mask(b, t, mask.causal, segments, window, score_dtype, q)?;
            ops::ScoreMask::Additive(&additive)
        }
    };
    let probs = ops::scaled_masked_softmax(&scores, scale, score_mask)?.to_dtype(v.dtype())?;
    probs.matmul(&v)
}

/// (b, 1, t, t): 0 where query i sees key j, -inf elsewhere.
fn additive_mask(
    b: usize,
    t: usize,
    causal: bool,
    segments: Option<&Tensor>,
    sliding_window: Option<usize>,
    dtype: DType,
    like: &Tensor,
) -> Result<Tensor> {
    let device = like.device();
    let positions: Vec<u8> = (0..t)
        .flat_map(|i| {
            (0..t).map(move |j| {
                let visible = (!causal || j <= i)
                    && sliding_window.is_none_or(|window| j > i || i - j < window);
                u8::from(visible)
            })
        })
        .collect();
    // (t, t) -> (b, t, t)
    let mut visible = Tensor::from_vec(positions, (1, t, t), device)?.broadcast_as((b, t, t))?;
    if let Some(segments) = segments {
        let segments = segments.to_device(device)?;
        // (b, t, 1) == (b, 1, t) -> (b, t, t)
        let same = segments
            .unsqueeze(2)?
            .broadcast_eq(&segments.unsqueeze(1)?)?;
        visible = (visible * same)?;
    }
    let zeros = Tensor::zeros((b, t, t), dtype, device)?;
    let hidden = Tensor::full(f32::NEG_INFINITY, (b, t, t), device)?.to_dtype(dtype)?;
    visible.where_cond(&zeros, &hidden)?.unsqueeze(1)
}

/// The checks both paths share, with errors naming the op and the shapes.
fn check(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: &AttentionMask<'_>) -> Result<()> {
    let op = "flash_attention";
    let (Ok((b, h, t, d)), Ok((kb, kv_h, kt, kd))) = (q.dims4(), k.dims4()) else {
        bail!(
            "{op}: q {:?}, k {:?}; expected q (b, h, t, d), k and v (b, kv_h, t, d)",
            q.dims(),
            k.dims()
        );
    };
    if (kb, kt, kd) != (b, t, d) || k.dims() != v.dims() {
        bail!(
            "{op}: q {:?}, k {:?}, v {:?}; expected k = v = (b, kv_h, t, d) for q (b, h, t, d) \
             (query and key lengths are equal: no KV cache)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if kv_h == 0 || h % kv_h != 0 {
        bail!(
            "{op}: {h} query heads are not a multiple of {kv_h} kv heads (q {:?}, k {:?})",
            q.dims(),
            k.dims()
        );
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        bail!(
            "{op}: q {:?}, k {:?}, v {:?} differ in dtype",
            q.dtype(),
            k.dtype(),
            v.dtype()
        );
    }
    if !scale.is_finite() {
        bail!("{op}: scale {scale} is not finite");
    }
    if mask.sliding_window == Some(0) {
        bail!(
            "{op}: a sliding window of 0 hides every key (q {:?})",
            q.dims()
        );
    }
    if let Some(segments) = mask.segments
        && (segments.dims() != [b, t] || segments.dtype() != DType::U32)
    {
        bail!(
            "{op}: segments {:?} {:?}; expected ({b}, {t}) u32 for q {:?}",
            segments.dims(),
            segments.dtype(),
            q.dims()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Attention one (batch, head, query) at a time in f64, from the definition.
    fn per_head_loop(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        causal: bool,
        segments: Option<&[Vec<u32>]>,
        window: Option<usize>,
    ) -> Result<Vec<f64>> {
        let (b, h, t, d) = q.dims4()?;
        let kv_h = k.dim(1)?;
        let flat =
            |x: &Tensor| -> Result<Vec<f64>> { x.to_dtype(DType::F64)?.flatten_all()?.to_vec1() };
        let (q, k, v) = (flat(q)?, flat(k)?, flat(v)?);
        let mut out = vec![0f64; b * h * t * d];
        for bi in 0..b {
            for hi in 0..h {
                let kvi = hi / (h / kv_h);
                for i in 0..t {
                    let query = &q[((bi * h + hi) * t + i) * d..][..d];
                    let visible: Vec<usize> = (0..t)
                        .filter(|&j| {
                            (!causal || j <= i)
                                && window.is_none_or(|w| j > i || i - j < w)
                                && segments.is_none_or(|s| s[bi][i] == s[bi][j])
                        })
                        .collect();
                    let scores: Vec<f64> = visible
                        .iter()
                        .map(|&j| {
                            let key = &k[((bi * kv_h + kvi) * t + j) * d..][..d];
                            scale * query.iter().zip(key).map(|(a, b)| a * b).sum::<f64>()
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    let row = &mut out[((bi * h + hi) * t + i) * d..][..d];
                    for (&j, w) in visible.iter().zip(&weights) {
                        let value = &v[((bi * kv_h + kvi) * t + j) * d..][..d];
                        for (o, x) in row.iter_mut().zip(value) {
                            *o += w / total * x;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()))
    }

    #[test]
    fn reference_matches_a_per_head_loop() -> Result<()> {
        let device = Device::Cpu;
        let (b, h, t, d) = (2, 4, 13, 8);
        let segments = vec![
            [vec![0u32; 5], vec![1; 8]].concat(),
            [vec![0u32; 3], vec![1; 4], vec![2; 6]].concat(),
        ];
        let segment_tensor = Tensor::new(segments.clone(), &device)?;
        for kv_h in [4, 2, 1] {
            let q = Tensor::randn(0f64, 1.0, (b, h, t, d), &device)?;
            let k = Tensor::randn(0f64, 1.0, (b, kv_h, t, d), &device)?;
            let v = Tensor::randn(0f64, 1.0, (b, kv_h, t, d), &device)?;
            for (causal, with_segments, window) in [
                (false, false, None),
                (true, false, None),
                (true, true, None),
                (true, false, Some(4)),
                (true, true, Some(3)),
                (false, true, Some(2)),
                (false, true, None),
            ] {
                let mask = AttentionMask {
                    causal,
                    segments: with_segments.then_some(&segment_tensor),
                    sliding_window: window,
                };
                let got: Vec<f64> = flash_attention_reference(&q, &k, &v, 0.35, mask)?
                    .flatten_all()?
                    .to_vec1()?;
                let expected = per_head_loop(
                    &q,
                    &k,
                    &v,
                    0.35,
                    causal,
                    with_segments.then_some(segments.as_slice()),
                    window,
                )?;
                let error = max_abs_diff(&got, &expected);
                assert!(
                    error < 1e-12,
                    "kv_h {kv_h}, causal {causal}, segments {with_segments}, window {window:?}: \
                     max error {error:e}"
                );
                // on the CPU the public function is the reference
                let public: Vec<f64> = flash_attention(&q, &k, &v, 0.35, mask)?
                    .flatten_all()?
                    .to_vec1()?;
                assert_eq!(public, got);
            }
        }
        Ok(())
    }

    #[test]
    fn reference_keeps_low_precision_inputs_in_their_dtype() -> Result<()> {
        let device = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 5, 4), &device)?.to_dtype(DType::BF16)?;
        let k = Tensor::randn(0f32, 1.0, (1, 1, 5, 4), &device)?.to_dtype(DType::BF16)?;
        let mask = AttentionMask {
            causal: true,
            ..AttentionMask::default()
        };
        let out = flash_attention(&q, &k, &k, 0.5, mask)?;
        assert_eq!(out.dtype(), DType::BF16);
        assert_eq!(out.dims(), [1, 2, 5, 4]);
        Ok(())
    }

    #[test]
    fn reference_gradients_reach_q_k_and_v() -> Result<()> {
        let device = Device::Cpu;
        let (b, h, kv_h, t, d) = (2, 4, 2, 9, 8);
        let segments = Tensor::new(
            vec![
                [vec![0u32; 4], vec![1; 5]].concat(),
                [vec![0u32; 2], vec![1; 7]].concat(),
            ],
            &device,
        )?;
        let q = Var::randn(0f32, 1.0, (b, h, t, d), &device)?;
        let k = Var::randn(0f32, 1.0, (b, kv_h, t, d), &device)?;
        let v = Var::randn(0f32, 1.0, (b, kv_h, t, d), &device)?;
        let mask = AttentionMask {
            causal: true,
            segments: Some(&segments),
            sliding_window: Some(3),
        };
        let out = flash_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.35, mask)?;
        let probe = Tensor::randn(0f32, 1.0, out.shape(), &device)?;
        let grads = (out * probe)?.sum_all()?.backward()?;
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            assert_eq!(grad.dims(), var.dims(), "{name}");
            let values: Vec<f32> = grad.flatten_all()?.to_vec1()?;
            assert!(
                values.iter().all(|x| x.is_finite()),
                "{name}: non-finite gradient"
            );
            assert!(
                values.iter().any(|x| *x != 0.0),
                "{name}: all-zero gradient"
            );
        }
        Ok(())
    }

    #[test]
    fn checks_name_the_op_and_shapes() -> Result<()> {
        let device = Device::Cpu;
        let q = Tensor::zeros((1, 3, 4, 8), DType::F32, &device)?;
        let k = Tensor::zeros((1, 2, 4, 8), DType::F32, &device)?;
        let error = flash_attention(&q, &k, &k, 1.0, AttentionMask::default())
            .expect_err("3 heads over 2 kv heads")
            .to_string();
        assert!(
            error.contains("flash_attention") && error.contains("[1, 3, 4, 8]"),
            "{error}"
        );
        let k = Tensor::zeros((1, 3, 5, 8), DType::F32, &device)?;
        assert!(flash_attention(&q, &k, &k, 1.0, AttentionMask::default()).is_err());
        let segments = Tensor::zeros((1, 4), DType::F32, &device)?;
        let mask = AttentionMask {
            segments: Some(&segments),
            ..AttentionMask::default()
        };
        let error = flash_attention(&q, &q, &q, 1.0, mask)
            .expect_err("f32 segments")
            .to_string();
        assert!(error.contains("u32"), "{error}");
        let mask = AttentionMask {
            sliding_window: Some(0),
            ..AttentionMask::default()
        };
        assert!(flash_attention(&q, &q, &q, 1.0, mask).is_err());
        Ok(())
    }
}
