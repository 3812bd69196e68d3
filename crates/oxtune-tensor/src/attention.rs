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
//! Two layouts: [`flash_attention`] takes heads first, q (b, h, t, d);
//! [`flash_attention_positions_first`] takes the (b, t, h, d) projections as they come out
//! of the q/k/v linear layers (views of them, read in place) and returns (b, t, h, d), so
//! a model needs no transposes or copies around attention in either direction. The kernels
//! address every tensor by strides, so both run the same kernels.
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

/// Where the heads sit in attention's q, k, v and output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Order {
    /// (b, heads, t, d): [`flash_attention`].
    HeadsFirst,
    /// (b, t, heads, d): [`flash_attention_positions_first`].
    PositionsFirst,
}

impl Order {
    /// The public function taking this order (errors name it).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::HeadsFirst => "flash_attention",
            Self::PositionsFirst => "flash_attention_positions_first",
        }
    }

    /// The shape of q, as errors write it.
    pub(crate) fn q_shape(self) -> &'static str {
        match self {
            Self::HeadsFirst => "(b, h, t, d)",
            Self::PositionsFirst => "(b, t, h, d)",
        }
    }

    /// The shape of k and v, as errors write it.
    pub(crate) fn kv_shape(self) -> &'static str {
        match self {
            Self::HeadsFirst => "(b, kv_h, t, d)",
            Self::PositionsFirst => "(b, t, kv_h, d)",
        }
    }

    /// (b, heads, t, d) of a tensor in this order.
    fn dims(self, x: &Tensor) -> Result<(usize, usize, usize, usize)> {
        let (b, x1, x2, d) = x.dims4()?;
        Ok(match self {
            Self::HeadsFirst => (b, x1, x2, d),
            Self::PositionsFirst => (b, x2, x1, d),
        })
    }
}

/// softmax(q k^T * scale + mask) v with grouped-query attention.
///
/// q: (b, h, t, d); k, v: (b, kv_h, t, d) with h % kv_h == 0 (query head i reads kv head
/// i / (h / kv_h)); one dtype. -> (b, h, t, d) in that dtype, contiguous. A query that sees
/// no key (impossible when causal, as each query sees itself) gets zeros from the kernels and
/// NaN from the reference. On CUDA the kernels read strided views in place as
/// [`flash_attention_positions_first`] does (same conditions, same copy fallback); for the
/// (b, t, heads, d) projections of a model, that function also saves the output's transpose.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: AttentionMask<'_>,
) -> Result<Tensor> {
    check(q, k, v, scale, &mask, Order::HeadsFirst)?;
    #[cfg(feature = "cuda")]
    if takes_the_kernels(q, k, v)? {
        return crate::cuda::flash_attention(q, k, v, scale, &mask);
    }
    flash_attention_reference(q, k, v, scale, mask)
}

/// [`flash_attention`] in the layout of the q/k/v projections: positions before heads.
///
/// q: (b, t, h, d); k, v: (b, t, kv_h, d) with h % kv_h == 0; one dtype. -> (b, t, h, d) in
/// that dtype, contiguous (so `.reshape((b, t, h * d))` is free). Each input may be any view
/// whose last dimension is contiguous: the token stride may exceed heads * d, as in
/// `y.reshape((b, t, h + 2 * kv_h, d))?.narrow(2, h, kv_h)` of one packed q|k|v projection.
/// Differentiable in q, k and v; on CUDA the backward kernel reads the output's gradient in
/// (b, t, h, d) order (copied first only if its last dimension is not contiguous) and writes
/// dq (b, t, h, d) and dk, dv (b, t, kv_h, d) contiguous, with no transposes.
///
/// The kernels read a view in place when its start offset and the strides of its batch,
/// token and head dimensions are multiples of 8 elements (16-byte rows for cp.async); any
/// other input is copied to a contiguous tensor first. Where the kernels do not apply (the
/// CPU, f32, head dims other than 64 and 128) this is [`flash_attention_reference`] of the
/// inputs transposed to (b, h, t, d), its result transposed back and made contiguous: what
/// [`flash_attention`] computes, transposed.
pub fn flash_attention_positions_first(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: AttentionMask<'_>,
) -> Result<Tensor> {
    check(q, k, v, scale, &mask, Order::PositionsFirst)?;
    #[cfg(feature = "cuda")]
    if takes_the_kernels(q, k, v)? {
        return crate::cuda::flash_attention_positions_first(q, k, v, scale, &mask);
    }
    let heads_first = |x: &Tensor| x.transpose(1, 2);
    flash_attention_reference(
        &heads_first(q)?,
        &heads_first(k)?,
        &heads_first(v)?,
        scale,
        mask,
    )?
    .transpose(1, 2)?
    .contiguous()
}

/// Whether the fused kernels take these (checked) inputs: one CUDA device, bf16 or f16, a
/// head_dim they are compiled for (the last dimension in both orders).
#[cfg(feature = "cuda")]
fn takes_the_kernels(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<bool> {
    Ok(crate::cuda::applies(&[q, k, v])
        && matches!(q.dtype(), DType::BF16 | DType::F16)
        && crate::cuda::FLASH_HEAD_DIMS.contains(&q.dim(3)?))
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
    check(q, k, v, scale, &mask, Order::HeadsFirst)?;
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

/// The checks both paths share, with errors naming the op and the shapes; q, k and v are
/// in `order`.
fn check(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &AttentionMask<'_>,
    order: Order,
) -> Result<()> {
    let op = order.name();
    let (Ok((b, h, t, d)), Ok((kb, kv_h, kt, kd))) = (order.dims(q), order.dims(k)) else {
        bail!(
            "{op}: q {:?}, k {:?}; expected q {}, k and v {}",
            q.dims(),
            k.dims(),
            order.q_shape(),
            order.kv_shape()
        );
    };
    if (kb, kt, kd) != (b, t, d) || k.dims() != v.dims() {
        bail!(
            "{op}: q {:?}, k {:?}, v {:?}; expected k = v = {} for q {} (query and key \
             lengths are equal: no KV cache)",
            q.dims(),
            k.dims(),
            v.dims(),
            order.kv_shape(),
            order.q_shape()
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

    /// The positions-first function on q, k, v narrowed from one packed (b, t, h + 2 kv_h, d)
    /// tensor equals the heads-first one on transposed contiguous copies, transposed back, and
    /// so do the gradients that reach the packed tensor (on the CPU both are the reference).
    #[test]
    fn positions_first_is_the_transposed_heads_first_attention() -> Result<()> {
        let device = Device::Cpu;
        let (b, t, h, kv_h, d) = (2, 9, 4, 2, 8);
        let segments = Tensor::new(
            vec![
                [vec![0u32; 4], vec![1; 5]].concat(),
                [vec![0u32; 2], vec![1; 7]].concat(),
            ],
            &device,
        )?;
        let split = |packed: &Tensor| -> Result<(Tensor, Tensor, Tensor)> {
            Ok((
                packed.narrow(2, 0, h)?,
                packed.narrow(2, h, kv_h)?,
                packed.narrow(2, h + kv_h, kv_h)?,
            ))
        };
        let heads_first = |x: &Tensor| x.transpose(1, 2)?.contiguous();
        let flat = |x: &Tensor| -> Result<Vec<f64>> { x.flatten_all()?.to_vec1() };
        for (causal, with_segments, window) in [
            (false, false, None),
            (true, false, None),
            (true, true, Some(3)),
            (false, true, None),
        ] {
            let mask = AttentionMask {
                causal,
                segments: with_segments.then_some(&segments),
                sliding_window: window,
            };
            let packed = Var::randn(0f64, 1.0, (b, t, h + 2 * kv_h, d), &device)?;
            let (q, k, v) = split(packed.as_tensor())?;
            assert!(!q.is_contiguous() && !k.is_contiguous());
            let out = flash_attention_positions_first(&q, &k, &v, 0.35, mask)?;
            assert_eq!(out.dims(), [b, t, h, d]);
            assert!(out.is_contiguous(), "the output is contiguous (b, t, h, d)");

            let packed_copy = Var::from_tensor(packed.as_tensor())?;
            let (q2, k2, v2) = split(packed_copy.as_tensor())?;
            let expected = flash_attention(
                &heads_first(&q2)?,
                &heads_first(&k2)?,
                &heads_first(&v2)?,
                0.35,
                mask,
            )?
            .transpose(1, 2)?;
            let label = format!("causal {causal}, segments {with_segments}, window {window:?}");
            let error = max_abs_diff(&flat(&out)?, &flat(&expected)?);
            assert!(error < 1e-12, "{label}: output differs by {error:e}");

            let probe = Tensor::randn(0f64, 1.0, (b, t, h, d), &device)?;
            let grads = (&out * &probe)?.sum_all()?.backward()?;
            let expected_grads = (&expected * &probe)?.sum_all()?.backward()?;
            let grad = grads
                .get(packed.as_tensor())
                .expect("a gradient for the packed q|k|v");
            let expected_grad = expected_grads
                .get(packed_copy.as_tensor())
                .expect("a gradient for the packed copy");
            let error = max_abs_diff(&flat(grad)?, &flat(expected_grad)?);
            assert!(error < 1e-12, "{label}: gradients differ by {error:e}");
            assert!(
                flat(grad)?.iter().any(|x| *x != 0.0),
                "{label}: zero gradient"
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
        // positions first: q (1, 4, 3, 8) has 3 heads, k (1, 4, 2, 8) 2 kv heads
        let q = Tensor::zeros((1, 4, 3, 8), DType::F32, &device)?;
        let k = Tensor::zeros((1, 4, 2, 8), DType::F32, &device)?;
        let error = flash_attention_positions_first(&q, &k, &k, 1.0, AttentionMask::default())
            .expect_err("3 heads over 2 kv heads")
            .to_string();
        assert!(
            error.contains("flash_attention_positions_first") && error.contains("[1, 4, 3, 8]"),
            "{error}"
        );
        let k = Tensor::zeros((1, 5, 3, 8), DType::F32, &device)?;
        let error = flash_attention_positions_first(&q, &k, &k, 1.0, AttentionMask::default())
            .expect_err("5 key positions for 4 queries")
            .to_string();
        assert!(error.contains("(b, t, kv_h, d)"), "{error}");
        Ok(())
    }
}
