//! The ops the model families use.
//!
//! candle-nn's fused kernels (`rms_norm`, `rope`, `softmax_last_dim`) are fast but have no
//! backward: gradients through them come back `None` without a word. Each op here therefore
//! has a plain, differentiable composition of candle primitives (`*_reference`) and a fast
//! path with the same numerics:
//! - on CUDA (f32, bf16, f16; `cuda` feature), our fused kernels (`crate::cuda`,
//!   `kernels/*.cu`), which carry their own backward kernels, so they serve training too;
//! - elsewhere, candle-nn's fused kernel when no input tracks gradients
//!   (`Tensor::track_op`), else the reference.
//!
//! The tests at the bottom compare the paths on random inputs and gradcheck the references;
//! `tests/cuda_ops.rs` checks every kernel and its gradients against the CPU.

use candle_core::{D, DType, Result, Tensor};
use candle_nn::Module as _;

/// Serving attention over a paged KV cache ([`crate::paged_attention`]).
pub use crate::paged_attention::{PagedContext, paged_attention, paged_attention_reference};

/// RMSNorm as Hugging Face computes it: statistics in f32, the normalised activations cast
/// back to the input dtype, then scaled by `weight`.
///
/// `xs`: (.., hidden), `weight`: (hidden,).
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::applies(&[xs]) && weight.device().same_device(xs.device()) {
        return crate::cuda::rms_norm(xs, weight, eps);
    }
    // candle-nn's kernel has no backward and no f64.
    if xs.track_op() || weight.track_op() || xs.dtype() == DType::F64 {
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
/// `xs`: (b, h, t, d), any layout (on CUDA a view with contiguous rows is read in place);
/// `cos`, `sin`: (t, d/2) shared by the batch, or (b, t, d/2) per row (packed samples restart
/// their positions). The result is contiguous.
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::applies(&[xs, cos, sin]) && !cos.track_op() && !sin.track_op() {
        return crate::cuda::rope(xs, cos, sin);
    }
    if xs.track_op() {
        return rope_reference(xs, cos, sin);
    }
    candle_nn::rotary_emb::rope(&xs.contiguous()?, cos, sin)
}

/// [`rope`] of a (b, t, h, d) projection, returning (b, h, t, d): what attention needs from
/// its q and k. On CUDA one kernel reads the projection in place and writes the rotated heads
/// in their order, and its backward writes the gradient back in (b, t, h, d) order, so the
/// transpose costs no copy either way; elsewhere [`rope`] of the transposed view.
pub fn rope_to_heads(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::applies(&[xs, cos, sin]) && !cos.track_op() && !sin.track_op() {
        return crate::cuda::rope_to_heads(xs, cos, sin);
    }
    rope(&xs.transpose(1, 2)?, cos, sin)
}

/// [`rope`] of a (b, t, h, d) projection that keeps its order: (b, t, h, d) in, a contiguous
/// (b, t, h, d) out (e.g. q and k as heads of a packed q/k/v projection, for an attention that
/// reads positions first). On CUDA one kernel reads the projection in place (any view with
/// contiguous rows of d), and its backward reads the (b, t, h, d) gradient and writes
/// (b, t, h, d); elsewhere [`rope`] of the transposed view, transposed back and copied.
pub fn rope_positions_first(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::applies(&[xs, cos, sin]) && !cos.track_op() && !sin.track_op() {
        return crate::cuda::rope_positions_first(xs, cos, sin);
    }
    rope(&xs.transpose(1, 2)?, cos, sin)?
        .transpose(1, 2)?
        .contiguous()
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
    #[cfg(feature = "cuda")]
    if crate::cuda::applies(&[xs]) {
        return crate::cuda::softmax(xs, 1.0, None);
    }
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

/// Which attention scores a query may not see, for [`scaled_masked_softmax`].
#[derive(Clone, Copy, Debug)]
pub enum ScoreMask<'a> {
    /// Every key is visible.
    None,
    /// Causal, from positions: scores are (.., t_q, t_k) and query i (the i-th of the t_q
    /// rows) sees keys j <= i + past_tokens. No mask tensor is built on CUDA.
    Causal {
        /// Keys before the first query (cached tokens); 0 for a training batch.
        past_tokens: usize,
    },
    /// An additive mask broadcastable to the scores: 0 where visible, -inf where not
    /// (e.g. [`packed_causal_mask`], or [`causal_mask`] with a sliding window).
    Additive(&'a Tensor),
}

/// softmax(scores * scale + mask) over the last dimension, in the dtype of `scores`
/// (attention keeps its scores in f32). On CUDA the scale, a causal mask and the softmax
/// are one kernel, and its backward another; elsewhere it is [`scaled_masked_softmax_reference`].
pub fn scaled_masked_softmax(scores: &Tensor, scale: f64, mask: ScoreMask<'_>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::applies(&[scores]) && scores.rank() >= 2 {
        match mask {
            ScoreMask::None => return crate::cuda::softmax(scores, scale, None),
            ScoreMask::Causal { past_tokens } => {
                let causal = crate::cuda::Causal {
                    queries: scores.dim(D::Minus2)?,
                    past: past_tokens,
                };
                return crate::cuda::softmax(scores, scale, Some(causal));
            }
            // softmax(scale * (scores + mask / scale)): the scale stays in the kernel, so the
            // scores are read once for the mask and once for the softmax.
            ScoreMask::Additive(additive) if scale.is_normal() => {
                let additive = (additive.to_dtype(scores.dtype())? * scale.recip())?;
                return crate::cuda::softmax(&scores.broadcast_add(&additive)?, scale, None);
            }
            ScoreMask::Additive(_) => {}
        }
    }
    scaled_masked_softmax_reference(scores, scale, mask)
}

/// The composition [`scaled_masked_softmax`] stands for: scale, add the mask, then
/// [`softmax_last_dim`]; differentiable in `scores`.
pub fn scaled_masked_softmax_reference(
    scores: &Tensor,
    scale: f64,
    mask: ScoreMask<'_>,
) -> Result<Tensor> {
    let scaled = (scores * scale)?;
    let masked = match mask {
        ScoreMask::None => scaled,
        ScoreMask::Causal { past_tokens } => {
            let (queries, keys) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
            let mask: Vec<f32> = (0..queries)
                .flat_map(|i| {
                    (0..keys).map(move |j| {
                        if j <= i + past_tokens {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (queries, keys), scores.device())?;
            scaled.broadcast_add(&mask.to_dtype(scores.dtype())?)?
        }
        ScoreMask::Additive(mask) => scaled.broadcast_add(&mask.to_dtype(scores.dtype())?)?,
    };
    softmax_last_dim(&masked)
}

/// SwiGLU's gating, silu(gate) * up, for the MLP of Llama-style models. On CUDA one kernel
/// forward and one backward (f32 inside, one rounding); elsewhere [`swiglu_reference`].
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::applies(&[gate, up]) {
        return crate::cuda::swiglu(gate, up);
    }
    swiglu_reference(gate, up)
}

/// The differentiable reference for [`swiglu`]: candle's `silu` times `up`.
pub fn swiglu_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// [`swiglu`] of a packed (.., 2 * i) [gate | up] tensor (the output of one fused gate/up
/// projection: gate in columns [0, i), up in [i, 2i)), giving (.., i). On CUDA one kernel
/// forward and one backward, which returns ONE (.., 2 * i) [dgate | dup] gradient (two
/// `narrow`s would each pad their gradient to (.., 2 * i) with zeros and add them);
/// elsewhere [`swiglu_packed_reference`].
pub fn swiglu_packed(gate_up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::applies(&[gate_up]) {
        return crate::cuda::swiglu_packed(gate_up);
    }
    swiglu_packed_reference(gate_up)
}

/// The differentiable reference for [`swiglu_packed`]: [`swiglu_reference`] of the two
/// halves of the last dimension.
pub fn swiglu_packed_reference(gate_up: &Tensor) -> Result<Tensor> {
    let width = gate_up.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!(
            "swiglu_packed: the last dimension of {:?} is odd; a packed [gate | up] tensor \
             has 2 * i",
            gate_up.shape()
        );
    }
    let half = width / 2;
    swiglu_reference(
        &gate_up.narrow(D::Minus1, 0, half)?,
        &gate_up.narrow(D::Minus1, half, half)?,
    )
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

/// Summed cross-entropy of vocabulary rows: the sum over rows r with
/// `targets[r] != ignore_index` of `-log_softmax(logits[r])[targets[r]]`, statistics in f32
/// (f64 for f64 logits), as an f32 scalar (f64 for f64 logits); differentiable in `logits`.
///
/// `logits`: (rows, vocab) in any float dtype; `targets`: (rows,) i64 or u32. On CUDA
/// (f32, bf16, f16) two kernels read the logits once each, in their dtype (forward: loss and
/// each row's log-sum-exp, kept for the backward; backward: the gradient, written in the
/// logits' dtype, with ignored rows never read), and a target outside `[0, vocab)` that is
/// not `ignore_index` gives a NaN loss; elsewhere [`cross_entropy_sum_reference`].
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor, ignore_index: i64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::applies(&[logits]) && logits.rank() == 2 {
        return crate::cuda::cross_entropy_sum(logits, targets, ignore_index);
    }
    cross_entropy_sum_reference(logits, targets, ignore_index)
}

/// The differentiable reference for [`cross_entropy_sum`]: `logsumexp(logits) - logit[target]`
/// per row with candle ops on an f32 copy of the logits (f64 stays f64), masked and summed.
pub fn cross_entropy_sum_reference(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
) -> Result<Tensor> {
    let (rows, _) = logits.dims2()?;
    if targets.dims() != [rows] {
        candle_core::bail!(
            "cross_entropy_sum: targets {:?} for logits {:?}; expected ({rows},)",
            targets.shape(),
            logits.shape()
        );
    }
    let internal = if logits.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let targets = targets.to_device(logits.device())?.to_dtype(DType::I64)?;
    let kept = targets.ne(ignore_index)?;
    let ids = kept
        .where_cond(&targets, &targets.zeros_like()?)?
        .unsqueeze(1)?;
    let mask = kept.to_dtype(internal)?;
    let logits = logits.to_dtype(internal)?;
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
    (per_token * mask)?.sum_all()
}

/// Index of the largest value of each row over the last dimension, the first one on ties, as
/// candle's `argmax` gives it: (.., v) -> (..) u32.
///
/// candle's CUDA argmax gives each row one block, so the 151,936-wide row of a batch-1 decode
/// step takes about 0.1 ms on an H200. Rows of at least `16 * ARGMAX_CHUNKS` values are cut
/// into `ARGMAX_CHUNKS` chunks reduced in parallel (each chunk's max and first argmax, padded
/// with -inf), then the first chunk holding the row's max gives the index.
pub fn argmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    const ARGMAX_CHUNKS: usize = 128;
    let width = xs.dim(D::Minus1)?;
    if width < 16 * ARGMAX_CHUNKS {
        return xs.argmax(D::Minus1);
    }
    let lead = xs.dims()[..xs.rank() - 1].to_vec();
    let rows = lead.iter().product::<usize>();
    let chunk = width.div_ceil(ARGMAX_CHUNKS);
    let mut flat = xs.reshape((rows, width))?;
    if chunk * ARGMAX_CHUNKS > width {
        let pad = Tensor::full(
            f32::NEG_INFINITY,
            (rows, chunk * ARGMAX_CHUNKS - width),
            xs.device(),
        )?
        .to_dtype(xs.dtype())?;
        flat = Tensor::cat(&[&flat, &pad], 1)?;
    }
    // (rows, chunks, chunk) -> each chunk's max and first argmax: (rows, chunks)
    let chunks = flat.reshape((rows, ARGMAX_CHUNKS, chunk))?;
    let maxima = chunks.max(2)?;
    let within = chunks.argmax(2)?;
    // The first chunk holding the row's max (argmax keeps the first of equal values).
    let best = maxima.argmax_keepdim(1)?;
    let offset = within.gather(&best, 1)?;
    let chunk = u32::try_from(chunk)
        .map_err(|_| candle_core::Error::Msg(format!("argmax: rows of {width} values")))?;
    let start = best.broadcast_mul(&Tensor::new(&[chunk], xs.device())?)?;
    (start + offset)?.reshape(lead)
}

/// `xs` (.., k) times each weight's transpose (weights (n_i, k)), plus its bias (n_i,) where
/// given, concatenated on the last dimension: (.., n_1 + n_2 + ..). One linear layer, or
/// several reading the same input (q|k|v).
///
/// On CUDA, for at most [`GEMV_MAX_ROWS`](crate::cuda::GEMV_MAX_ROWS) rows (a decode step)
/// and nothing tracking a gradient, one bandwidth-bound launch for all the weights
/// (`kernels/gemv.cu`); otherwise candle's matmul per weight, as [`candle_nn::Linear`] runs
/// it, and a concatenation.
pub fn linear_rows(xs: &Tensor, weights: &[&Tensor], biases: &[Option<&Tensor>]) -> Result<Tensor> {
    if weights.is_empty() || weights.len() != biases.len() {
        candle_core::bail!(
            "linear_rows: {} weights and {} biases; give one bias entry (or None) per weight",
            weights.len(),
            biases.len()
        );
    }
    #[cfg(feature = "cuda")]
    if crate::cuda::gemv_takes(xs, weights, biases) && gemv_pays(xs, weights, false) {
        return crate::cuda::gemv_launch(xs, weights, biases, false);
    }
    let outputs = weights
        .iter()
        .zip(biases)
        .map(|(&weight, &bias)| candle_nn::Linear::new(weight.clone(), bias.cloned()).forward(xs))
        .collect::<Result<Vec<_>>>()?;
    match outputs.as_slice() {
        [one] => Ok(one.clone()),
        _ => Tensor::cat(&outputs, D::Minus1),
    }
}

/// [`crate::cuda::gemv_pays`] for these inputs (which the kernel takes).
#[cfg(feature = "cuda")]
fn gemv_pays(xs: &Tensor, weights: &[&Tensor], swiglu: bool) -> bool {
    let k = xs.dims().last().copied().unwrap_or(1).max(1);
    let bytes = weights.iter().map(|w| w.elem_count()).sum::<usize>() * xs.dtype().size_in_bytes();
    crate::cuda::gemv_pays(xs.elem_count() / k, k, weights.len(), bytes, swiglu)
}

/// `silu(xs gate^T) * (xs up^T)`: (.., k) -> (.., n) for gate and up (n, k), the gated MLP's
/// first half. On CUDA, for the rows of a decode step, one launch reading each weight once
/// (see [`linear_rows`]); otherwise two matmuls and [`swiglu`].
pub fn swiglu_linear_rows(xs: &Tensor, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gate.dims() == up.dims()
        && crate::cuda::gemv_takes(xs, &[gate, up], &[None, None])
        && gemv_pays(xs, &[gate, up], true)
    {
        return crate::cuda::gemv_launch(xs, &[gate, up], &[None, None], true);
    }
    let project = |weight: &Tensor| candle_nn::Linear::new(weight.clone(), None).forward(xs);
    swiglu(&project(gate)?, &project(up)?)
}

/// `xs W^T + b`: a linear layer, xs (.., k), weight (n, k), bias (n,). When the weight takes
/// a gradient (full fine-tuning), on CUDA [`crate::cuda::linear_trainable`]: its backward
/// computes dW = dy^T x over all rows at once, in W's layout (candle's matmul with a
/// broadcast, transposed weight makes one gradient per batch row, sums them and copies the
/// transpose back). Otherwise candle-nn's `Linear`.
pub fn linear(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if weight.track_op() && crate::cuda::applies(&[xs, weight]) && weight.rank() == 2 {
        let ys = crate::cuda::linear_trainable(xs, weight)?;
        return match bias {
            Some(bias) => ys.broadcast_add(bias),
            None => Ok(ys),
        };
    }
    candle_nn::Linear::new(weight.clone(), bias.cloned()).forward(xs)
}

/// LoRA linear layers sharing one input: for each weight W_i (n_i, k) with its adapter
/// A_i (r, k) and B_i (n_i, r) (the scale folded into B), `xs W_i^T + (xs A_i^T) B_i^T`,
/// concatenated on the last dimension: (.., k) -> (.., n_0 + n_1 + ..). `a` stacks the A_i
/// (P r, k) and `b` the B_i (n_0 + n_1 + .., r); the weights are frozen (no gradient),
/// `xs`, `a` and `b` are differentiable. A bias, if any, is the caller's to add.
///
/// On CUDA one op ([`crate::cuda::lora_linear`]) accumulates the adapter product into the
/// base output and, in the backward, every projection's input gradient into one (cuBLAS with
/// beta = 1), and keeps only its inputs for the backward; elsewhere
/// [`lora_linear_reference`].
pub fn lora_linear(xs: &Tensor, weights: &[&Tensor], a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::lora_linear_takes(xs, weights, a, b) {
        return crate::cuda::lora_linear(xs, weights, a, b);
    }
    lora_linear_reference(xs, weights, a, b)
}

/// The composition [`lora_linear`] stands for: h = xs A^T (every projection's r columns at
/// once), then [`lora_linear_projected_reference`].
pub fn lora_linear_reference(
    xs: &Tensor,
    weights: &[&Tensor],
    a: &Tensor,
    b: &Tensor,
) -> Result<Tensor> {
    let parts = weights.len();
    let (stacked, k) = a.dims2()?;
    let widths = weights
        .iter()
        .map(|w| w.dims2().map(|(n, _)| n))
        .collect::<Result<Vec<_>>>()?;
    if parts == 0
        || !stacked.is_multiple_of(parts)
        || b.dims2()? != (widths.iter().sum(), stacked / parts)
        || xs.dims().last() != Some(&k)
    {
        candle_core::bail!(
            "lora_linear: x {:?}, weights of {widths:?} rows, A {:?} and B {:?} do not fit \
             (A stacks one (r, k) block per weight, B one (n_i, r) block)",
            xs.dims(),
            a.dims(),
            b.dims()
        );
    }
    lora_linear_projected_reference(xs, weights, &xs.broadcast_matmul(&a.t()?)?, b)
}

/// [`lora_linear`] whose updates read the projected input `h` (.., P r): `xs W_i^T + h_i
/// B_i^T` with h_i the i-th r columns of h, e.g. `dropout(xs) A_i^T` (the adapters' input
/// after dropout, which differs from the base product's). Differentiable in xs, h and b. On
/// CUDA one op ([`crate::cuda::lora_linear_projected`]); elsewhere
/// [`lora_linear_projected_reference`].
pub fn lora_linear_projected(
    xs: &Tensor,
    weights: &[&Tensor],
    h: &Tensor,
    b: &Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::lora_linear_projected_takes(xs, weights, h, b) {
        return crate::cuda::lora_linear_projected(xs, weights, h, b);
    }
    lora_linear_projected_reference(xs, weights, h, b)
}

/// The composition [`lora_linear_projected`] stands for: per projection the base product
/// plus `h_i B_i^T`, then a concatenation (none for one projection).
pub fn lora_linear_projected_reference(
    xs: &Tensor,
    weights: &[&Tensor],
    h: &Tensor,
    b: &Tensor,
) -> Result<Tensor> {
    let parts = weights.len().max(1);
    let stacked = h.dim(D::Minus1)?;
    let rank = stacked / parts;
    let mut start = 0;
    let mut outputs = Vec::with_capacity(parts);
    for (part, &weight) in weights.iter().enumerate() {
        let width = weight.dim(0)?;
        let update = h
            .narrow(D::Minus1, part * rank, rank)?
            .broadcast_matmul(&b.narrow(0, start, width)?.t()?)?;
        outputs.push((xs.broadcast_matmul(&weight.t()?)? + update)?);
        start += width;
    }
    match outputs.as_slice() {
        [one] => Ok(one.clone()),
        _ => Tensor::cat(&outputs, D::Minus1),
    }
}

/// `acc + lhs^T rhs` for acc (m, n) f32, lhs (k, m) and rhs (k, n) of one dtype: a weight's
/// gradient summed over chunks of rows (lhs a chunk's output gradients, rhs its inputs),
/// accumulated in f32. On CUDA cuBLAS adds the product into `acc` in place (so `acc` must
/// not share its storage with a tensor that should keep its values) and returns it;
/// elsewhere a new tensor.
pub fn add_transposed_product(acc: Tensor, lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if acc.device().is_cuda()
        && acc.dtype() == DType::F32
        && acc.is_contiguous()
        && !acc.track_op()
        && crate::cuda::applies(&[lhs, rhs])
    {
        crate::cuda::accumulate_transposed_product(&acc, lhs, rhs)?;
        return Ok(acc);
    }
    acc + lhs.t()?.matmul(rhs)?.to_dtype(DType::F32)?
}

/// Residual add and RMSNorm: `(xs + residual, rms_norm(xs + residual, weight))`, the sum
/// rounded to the dtype of `xs` as candle's add rounds it, then [`rms_norm`]'s numerics.
/// Differentiable in xs, residual and weight (the weight's gradient is computed only when it
/// tracks one). On CUDA (f32, bf16, f16) one kernel writes both outputs; its backward is
/// RMSNorm's backward kernels on the sum; elsewhere candle's add, then [`rms_norm`] (which
/// takes candle-nn's kernel when no gradient flows, [`add_rms_norm_reference`]'s composition
/// otherwise).
///
/// `xs`, `residual`: (.., hidden); `weight`: (hidden,).
pub fn add_rms_norm(
    xs: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if crate::cuda::applies(&[xs, residual]) && weight.device().same_device(xs.device()) {
        return crate::cuda::add_rms_norm(xs, residual, weight, eps);
    }
    // The add, then [`rms_norm`] with its own fast path (candle-nn's kernel for inference).
    let sum = (xs + residual)?;
    let normed = rms_norm(&sum, weight, eps)?;
    Ok((sum, normed))
}

/// The differentiable reference for [`add_rms_norm`]: candle's add, then
/// [`rms_norm_reference`].
pub fn add_rms_norm_reference(
    xs: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let sum = (xs + residual)?;
    let normed = rms_norm_reference(&sum, weight, eps)?;
    Ok((sum, normed))
}

/// Embedding lookup: the rows of `weight` (vocab, hidden) at `ids` (any shape, u32 on the
/// weight's device; u8 and i64 also take the reference), ids.shape + (hidden,) in the weight's
/// dtype; differentiable in the weight.
///
/// On CUDA (f32, bf16, f16) when the weight tracks a gradient, [`crate::cuda::embedding`]: the
/// forward is candle's index_select, the backward `kernels/embedding.cu`, which sorts the rows
/// by (id, row) on the device (no host sync) and sums each id's rows in f32 in row order, one
/// block per id: deterministic (bit-identical runs), where candle's backward (`index_add`) is
/// one block for the whole batch. Ids >= vocab get no gradient. Elsewhere (the CPU, frozen
/// weights, serving) [`embedding_reference`].
pub fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::embedding_takes(weight, ids) {
        return crate::cuda::embedding(weight, ids);
    }
    embedding_reference(weight, ids)
}

/// The composition [`embedding`] stands for: `weight.index_select(ids.flatten_all(), 0)`,
/// reshaped to ids.shape + (hidden,).
pub fn embedding_reference(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (_, hidden) = weight.dims2()?;
    let mut dims = ids.dims().to_vec();
    dims.push(hidden);
    weight.index_select(&ids.flatten_all()?, 0)?.reshape(dims)
}

/// Heads of one attention layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionHeads {
    /// Query heads (h).
    pub q: usize,
    /// Key/value heads (kv).
    pub kv: usize,
    /// Elements of a head (d), even.
    pub head_dim: usize,
}

/// One serving step's attention inputs after the q/k/v projections, made ready for paged
/// attention: per-head RMSNorm of q and k when `norms` = (q_norm, k_norm), each (d,), are
/// given (Qwen3; `eps`), RoPE of q and k ("rotate half", [`rope`]'s convention) by each row's
/// own row of `cos`/`sin` (t, d/2), and k and v written in place to rows `slots` (t,) u32 of
/// `k_pool`/`v_pool` (num_slots, kv * d). Returns the rotated q, (t, h, d), contiguous.
///
/// `q` (t, h * d), `k` and `v` (t, kv * d) may be row views whose last dimension is
/// contiguous but whose rows are strided, such as `narrow`s of one fused (t, (h + 2 kv) d)
/// projection output: the kernel reads them where they are.
///
/// On CUDA (f32, bf16, f16; every tensor on one device and of one dtype, none tracking a
/// gradient, d <= 256, pools contiguous) this is one kernel launch (`kernels/rope_cache.cu`)
/// with the composition's numerics: statistics and rotation in f32, the normalised heads
/// rounded to the dtype before RoPE. It uploads nothing, never synchronises and allocates only
/// q, so it can be recorded in a CUDA graph. There a slot outside the pool is skipped (that
/// row's k and v are not written; the engine never gives one). Elsewhere, and for inputs the
/// kernel does not take, it is [`qk_norm_rope_cache_write_reference`], where a slot of
/// u32::MAX is skipped and any other slot outside the pool is an error (candle's
/// `scatter_set`). Rows sharing a slot leave that pool row holding values of any of them
/// (on CUDA possibly mixed head by head); the engine gives every row a slot of its own.
/// Inference only: nothing flows back into q, k or v through the pools.
pub fn qk_norm_rope_cache_write(inputs: &RopeCacheInputs<'_>) -> Result<Tensor> {
    let rows = inputs.rows()?;
    #[cfg(feature = "cuda")]
    if crate::cuda::rope_cache_takes(inputs) {
        return crate::cuda::rope_cache_fused(inputs, rows);
    }
    rope_cache_composed(inputs, rows)
}

/// The composition [`qk_norm_rope_cache_write`] stands for, as the model ran it: q and k
/// reshaped to (t, heads, d), [`rms_norm`] per head, [`rope`] of (t, heads, 1, d) by the
/// tables unsqueezed to (t, 1, d/2), then `k_pool.scatter_set` and `v_pool.scatter_set` of the
/// rows at `slots` broadcast to (t, kv * d).
pub fn qk_norm_rope_cache_write_reference(inputs: &RopeCacheInputs<'_>) -> Result<Tensor> {
    rope_cache_composed(inputs, inputs.rows()?)
}

/// The tensors of one [`qk_norm_rope_cache_write`] call: one attention layer's step, as the
/// model holds them.
#[derive(Clone, Copy)]
pub struct RopeCacheInputs<'a> {
    /// (t, h * d) rows with a contiguous last dimension (a view of the fused projection).
    pub q: &'a Tensor,
    /// (t, kv * d), like `q`.
    pub k: &'a Tensor,
    /// (t, kv * d), like `q`.
    pub v: &'a Tensor,
    pub heads: AttentionHeads,
    /// The per-head q and k RMSNorm weights (d,) of Qwen3, or None.
    pub norms: Option<(&'a Tensor, &'a Tensor)>,
    pub eps: f64,
    /// (t, d / 2) RoPE tables at each row's position.
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// (t,) u32 cache slots, one per row.
    pub slots: &'a Tensor,
    /// The layer's key and value pools, written in place.
    pub k_pool: &'a Tensor,
    pub v_pool: &'a Tensor,
}

impl RopeCacheInputs<'_> {
    /// Checks every shape against the heads; returns the step's rows t.
    pub(crate) fn rows(&self) -> Result<usize> {
        let op = "qk_norm_rope_cache_write";
        let AttentionHeads {
            q: h,
            kv,
            head_dim: d,
        } = self.heads;
        if h == 0 || kv == 0 || d == 0 || d % 2 != 0 {
            candle_core::bail!(
                "{op}: {h} query heads, {kv} key/value heads of {d} elements; expected heads and \
                 an even head_dim"
            );
        }
        let t = self.q.dim(0)?;
        let expect = |what: &str, tensor: &Tensor, dims: &[usize]| -> Result<()> {
            if tensor.dims() != dims {
                candle_core::bail!(
                    "{op}: {what} {:?}; expected {dims:?} (t {t}, h {h}, kv {kv}, d {d})",
                    tensor.shape()
                );
            }
            Ok(())
        };
        expect("q", self.q, &[t, h * d])?;
        expect("k", self.k, &[t, kv * d])?;
        expect("v", self.v, &[t, kv * d])?;
        expect("cos", self.cos, &[t, d / 2])?;
        expect("sin", self.sin, &[t, d / 2])?;
        expect("slots", self.slots, &[t])?;
        if self.slots.dtype() != DType::U32 {
            candle_core::bail!("{op}: slots are {:?}; expected u32", self.slots.dtype());
        }
        let num_slots = self.k_pool.dim(0)?;
        expect("k_pool", self.k_pool, &[num_slots, kv * d])?;
        expect("v_pool", self.v_pool, &[num_slots, kv * d])?;
        if let Some((q_norm, k_norm)) = self.norms {
            expect("q_norm", q_norm, &[d])?;
            expect("k_norm", k_norm, &[d])?;
        }
        Ok(t)
    }
}

fn rope_cache_composed(inputs: &RopeCacheInputs<'_>, t: usize) -> Result<Tensor> {
    let AttentionHeads {
        q: h,
        kv,
        head_dim: d,
    } = inputs.heads;
    // (t, heads * d) -> (t, heads, d), each head normalised on its own
    let q = inputs.q.reshape((t, h, d))?;
    let k = inputs.k.reshape((t, kv, d))?;
    let (q, k) = match inputs.norms {
        Some((q_norm, k_norm)) => (
            rms_norm(&q, q_norm, inputs.eps)?,
            rms_norm(&k, k_norm, inputs.eps)?,
        ),
        None => (q, k),
    };
    // (t, heads, d) -> (t, heads, 1, d): each row a batch row of its own, rotated by its own
    // (1, d/2) table row
    let (cos, sin) = (inputs.cos.unsqueeze(1)?, inputs.sin.unsqueeze(1)?);
    let q = rope(&q.unsqueeze(2)?, &cos, &sin)?.squeeze(2)?;
    let k = rope(&k.unsqueeze(2)?, &cos, &sin)?.squeeze(2)?;
    let index = inputs
        .slots
        .reshape((t, 1))?
        .broadcast_as((t, kv * d))?
        .contiguous()?;
    inputs
        .k_pool
        .scatter_set(&index, &k.reshape((t, kv * d))?.contiguous()?, 0)?;
    inputs
        .v_pool
        .scatter_set(&index, &inputs.v.contiguous()?, 0)?;
    q.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn linear_rows_off_the_gpu_equals_one_linear_layer_per_weight() -> Result<()> {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (1, 3, 16), &device)?;
        let q = Tensor::randn(0f32, 1.0, (8, 16), &device)?;
        let k = Tensor::randn(0f32, 1.0, (4, 16), &device)?;
        let bias = Tensor::randn(0f32, 1.0, 4, &device)?;
        let both = linear_rows(&xs, &[&q, &k], &[None, Some(&bias)])?;
        assert_eq!(both.dims(), [1, 3, 12]);
        let expected_q = xs.broadcast_matmul(&q.t()?)?;
        let expected_k = xs.broadcast_matmul(&k.t()?)?.broadcast_add(&bias)?;
        assert!(max_abs_diff(&both.narrow(2, 0, 8)?, &expected_q)? < 1e-5);
        assert!(max_abs_diff(&both.narrow(2, 8, 4)?, &expected_k)? < 1e-5);

        let up = Tensor::randn(0f32, 1.0, (8, 16), &device)?;
        let expected = swiglu_reference(&expected_q, &xs.broadcast_matmul(&up.t()?)?)?;
        assert!(max_abs_diff(&swiglu_linear_rows(&xs, &q, &up)?, &expected)? < 1e-5);
        assert!(linear_rows(&xs, &[&q], &[]).is_err());
        Ok(())
    }

    #[test]
    fn chunked_argmax_equals_candles_on_wide_rows_and_ties() -> Result<()> {
        let device = Device::Cpu;
        for width in [100, 2048, 5000, 151_936] {
            let xs = Tensor::randn(0f32, 1.0, (3, width), &device)?;
            let expected: Vec<u32> = xs.argmax(D::Minus1)?.to_vec1()?;
            assert_eq!(
                argmax_last_dim(&xs)?.to_vec1::<u32>()?,
                expected,
                "width {width}"
            );
            let bf16 = xs.to_dtype(DType::BF16)?;
            let expected: Vec<u32> = bf16.argmax(D::Minus1)?.to_vec1()?;
            assert_eq!(
                argmax_last_dim(&bf16)?.to_vec1::<u32>()?,
                expected,
                "bf16 {width}"
            );
        }
        // Ties within a chunk and across chunks: the first index wins, as with candle.
        let mut row = vec![0f32; 4099];
        for index in [7, 40, 3000, 4098] {
            row[index] = 5.0;
        }
        let xs = Tensor::from_vec(row, (1, 1, 4099), &device)?;
        assert_eq!(argmax_last_dim(&xs)?.to_vec2::<u32>()?, vec![vec![7]]);
        let flat = Tensor::full(f32::NEG_INFINITY, (2, 4096), &device)?;
        assert_eq!(argmax_last_dim(&flat)?.to_vec1::<u32>()?, vec![0, 0]);
        Ok(())
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

    /// Checks the gradients of `loss(inputs) = sum(f(inputs) * probe)` with respect to every
    /// input (f64, on the CPU) against central finite differences.
    fn gradcheck(
        name: &str,
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
        inputs: &[Tensor],
        seed_probe: u64,
    ) -> Result<()> {
        let device = Device::Cpu;
        let out_shape = f(inputs)?.shape().clone();
        let probe: Vec<f64> = (0..out_shape.elem_count())
            .map(|i| ((i as f64 + 1.0) * 0.618 + seed_probe as f64).sin())
            .collect();
        let probe = Tensor::from_vec(probe, out_shape, &device)?;
        let loss =
            |xs: &[Tensor]| -> Result<f64> { (f(xs)? * &probe)?.sum_all()?.to_scalar::<f64>() };
        let vars = inputs
            .iter()
            .map(Var::from_tensor)
            .collect::<Result<Vec<_>>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let grads = (f(&tensors)? * &probe)?.sum_all()?.backward()?;
        let h = 1e-6;
        for (k, var) in vars.iter().enumerate() {
            let analytic: Vec<f64> = grads
                .get(var.as_tensor())
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!("{name}: input {k} got no gradient"))
                })?
                .flatten_all()?
                .to_vec1()?;
            let base: Vec<f64> = inputs[k].flatten_all()?.to_vec1()?;
            for (i, analytic) in analytic.iter().enumerate() {
                let nudged = |delta: f64| -> Result<f64> {
                    let mut values = base.clone();
                    values[i] += delta;
                    let mut xs = inputs.to_vec();
                    xs[k] = Tensor::from_vec(values, inputs[k].shape(), &device)?;
                    loss(&xs)
                };
                let numeric = (nudged(h)? - nudged(-h)?) / (2.0 * h);
                assert!(
                    (numeric - analytic).abs() <= 1e-6 * (1.0 + numeric.abs()),
                    "{name}: d loss / d input {k}[{i}]: finite differences {numeric}, autograd {analytic}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn swiglu_is_silu_times_up() -> Result<()> {
        let device = Device::Cpu;
        let gate = Tensor::randn(0f32, 2.0, (3, 7), &device)?;
        let up = Tensor::randn(0f32, 1.0, (3, 7), &device)?;
        let composed = (gate.silu()? * &up)?;
        assert_eq!(
            swiglu(&gate, &up)?.to_vec2::<f32>()?,
            composed.to_vec2::<f32>()?
        );
        let gate = Tensor::randn(0f64, 2.0, (2, 5), &device)?;
        let up = Tensor::randn(0f64, 1.0, (2, 5), &device)?;
        gradcheck("swiglu", |xs| swiglu(&xs[0], &xs[1]), &[gate, up], 1)
    }

    #[test]
    fn swiglu_packed_is_swiglu_of_the_halves() -> Result<()> {
        let device = Device::Cpu;
        // (.., 2 * i) with i = 7 and i = 8, rank 2 and 3
        for shape in [vec![3, 14], vec![2, 3, 16]] {
            let i = shape[shape.len() - 1] / 2;
            let gate_up = Var::randn(0f32, 2.0, shape.as_slice(), &device)?;
            let gate = Var::from_tensor(&gate_up.narrow(D::Minus1, 0, i)?.contiguous()?)?;
            let up = Var::from_tensor(&gate_up.narrow(D::Minus1, i, i)?.contiguous()?)?;
            let packed = swiglu_packed(gate_up.as_tensor())?;
            let composed = (gate.silu()? * up.as_tensor())?;
            assert_eq!(packed.dims(), composed.dims());
            let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            assert_eq!(flat(&packed)?, flat(&composed)?, "{shape:?}: forward");
            let probe = Tensor::randn(0f32, 1.0, composed.shape(), &device)?;
            let packed_grads = (packed * &probe)?.sum_all()?.backward()?;
            let composed_grads = (composed * &probe)?.sum_all()?.backward()?;
            let grad = |grads: &candle_core::backprop::GradStore, var: &Var| {
                grads
                    .get(var.as_tensor())
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))
            };
            let expected = Tensor::cat(
                &[grad(&composed_grads, &gate)?, grad(&composed_grads, &up)?],
                D::Minus1,
            )?;
            let got = grad(&packed_grads, &gate_up)?;
            assert_eq!(
                got.dims(),
                shape.as_slice(),
                "one gradient for the packed input"
            );
            assert_eq!(flat(&got)?, flat(&expected)?, "{shape:?}: [dgate | dup]");
        }
        assert!(swiglu_packed(&Tensor::zeros((2, 5), DType::F32, &device)?).is_err());
        let gate_up = Tensor::randn(0f64, 2.0, (2, 3, 10), &device)?;
        gradcheck(
            "swiglu_packed",
            |xs| swiglu_packed(&xs[0]),
            std::slice::from_ref(&gate_up),
            7,
        )
    }

    #[test]
    fn rope_positions_first_is_rope_of_the_transpose() -> Result<()> {
        let device = Device::Cpu;
        // (b, t, h, d) heads of a wider (b, t, h + 2, d) projection: a view with strided rows
        let (b, t, h, d) = (2, 5, 3, 8);
        let projection = Tensor::randn(0f32, 1.0, (b, t, h + 2, d), &device)?;
        let xs = projection.narrow(2, 1, h)?;
        for per_row in [false, true] {
            let angles = if per_row {
                Tensor::randn(0f32, 3.0, (b, t, d / 2), &device)?
            } else {
                Tensor::randn(0f32, 3.0, (t, d / 2), &device)?
            };
            let (cos, sin) = (angles.cos()?, angles.sin()?);
            let out = rope_positions_first(&xs, &cos, &sin)?;
            assert_eq!(out.dims(), [b, t, h, d]);
            assert!(out.is_contiguous());
            let expected = rope_reference(&xs.transpose(1, 2)?, &cos, &sin)?.transpose(1, 2)?;
            assert!(
                max_abs_diff(&out, &expected)? < 1e-6,
                "per-row tables: {per_row}"
            );
        }
        let xs = Tensor::randn(0f64, 1.0, (2, 3, 2, 4), &device)?;
        let angles = Tensor::randn(0f64, 2.0, (3, 2), &device)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        gradcheck(
            "rope_positions_first",
            |inputs| rope_positions_first(&inputs[0], &cos, &sin),
            std::slice::from_ref(&xs),
            8,
        )
    }

    #[test]
    fn scaled_masked_softmax_is_scale_mask_softmax() -> Result<()> {
        let device = Device::Cpu;
        let scale = 0.125;
        // (b, h, t_q, t_k) with 2 cached tokens before 3 queries
        let scores = Tensor::randn(0f32, 4.0, (2, 3, 3, 5), &device)?;
        let scaled = (&scores * scale)?;
        let cases = [
            (
                ScoreMask::Causal { past_tokens: 2 },
                scaled.broadcast_add(&causal_mask(3, 2, None, DType::F32, &device)?)?,
            ),
            (ScoreMask::None, scaled.clone()),
        ];
        for (mask, composed) in cases {
            let fused = scaled_masked_softmax(&scores, scale, mask)?;
            let expected = softmax_reference(&composed)?;
            assert!(
                max_abs_diff(&fused, &expected)? < 1e-6,
                "{mask:?}: {} vs {}",
                fused,
                expected
            );
        }
        // packed samples: an additive mask of shape (b, 1, t, t)
        let scores = Tensor::randn(0f32, 4.0, (1, 2, 4, 4), &device)?;
        let packed = packed_causal_mask(&[vec![0, 0, 1, 1]], None, DType::F32, &device)?;
        let fused = scaled_masked_softmax(&scores, scale, ScoreMask::Additive(&packed))?;
        let expected = softmax_reference(&(&scores * scale)?.broadcast_add(&packed)?)?;
        assert!(max_abs_diff(&fused, &expected)? < 1e-6);
        // masked keys get exactly zero probability
        let row = fused.get(0)?.get(0)?.get(1)?.to_vec1::<f32>()?;
        assert_eq!(&row[2..], [0.0, 0.0]);
        Ok(())
    }

    #[test]
    fn scaled_masked_softmax_gradient_matches_finite_differences() -> Result<()> {
        let device = Device::Cpu;
        let scores = Tensor::randn(0f64, 2.0, (1, 2, 3, 4), &device)?;
        gradcheck(
            "causal",
            |xs| scaled_masked_softmax(&xs[0], 0.7, ScoreMask::Causal { past_tokens: 1 }),
            std::slice::from_ref(&scores),
            2,
        )?;
        let packed = packed_causal_mask(&[vec![0, 1, 1, 1]], None, DType::F64, &device)?;
        let packed = packed.narrow(2, 1, 3)?; // queries 1..4 over all 4 keys
        gradcheck(
            "additive",
            |xs| scaled_masked_softmax(&xs[0], 0.7, ScoreMask::Additive(&packed)),
            std::slice::from_ref(&scores),
            3,
        )?;
        gradcheck(
            "unmasked",
            |xs| scaled_masked_softmax(&xs[0], 1.3, ScoreMask::None),
            &[scores],
            4,
        )
    }

    #[test]
    fn rope_and_softmax_gradients_match_finite_differences() -> Result<()> {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f64, 1.0, (1, 2, 3, 4), &device)?;
        let angles = Tensor::randn(0f64, 2.0, (3, 2), &device)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        gradcheck(
            "rope",
            |inputs| rope(&inputs[0], &cos, &sin),
            std::slice::from_ref(&xs),
            5,
        )?;
        gradcheck("softmax", |inputs| softmax_last_dim(&inputs[0]), &[xs], 6)
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

    /// -log softmax(row)[target] summed over the rows whose target is not -100, in f64 loops.
    fn naive_cross_entropy(logits: &[Vec<f64>], targets: &[i64]) -> f64 {
        logits
            .iter()
            .zip(targets)
            .filter(|(_, t)| **t != -100)
            .map(|(row, t)| {
                let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
                lse - row[usize::try_from(*t).expect("a kept target is an index")]
            })
            .sum()
    }

    #[test]
    fn cross_entropy_reference_matches_a_naive_sum() -> Result<()> {
        let device = Device::Cpu;
        let logits = Tensor::randn(0f64, 3.0, (5, 11), &device)?;
        let rows: Vec<Vec<f64>> = logits.to_vec2()?;
        let argmax = rows[1]
            .iter()
            .enumerate()
            .fold((0, f64::NEG_INFINITY), |best, (j, v)| {
                if *v > best.1 { (j, *v) } else { best }
            })
            .0;
        // targets at 0, the row's max, the last column, an ignored row, one in the middle
        let targets = [0, i64::try_from(argmax).expect("small"), 10, -100, 4];
        let expected = naive_cross_entropy(&rows, &targets);
        let ids = Tensor::new(&targets, &device)?;
        let got = cross_entropy_sum(&logits, &ids, -100)?.to_scalar::<f64>()?;
        assert!((got - expected).abs() < 1e-12, "f64: {got} vs {expected}");
        let got = cross_entropy_sum_reference(&logits.to_dtype(DType::F32)?, &ids, -100)?;
        assert_eq!(got.dtype(), DType::F32);
        let got = f64::from(got.to_scalar::<f32>()?);
        assert!(
            (got - expected).abs() < 1e-5 * expected.abs(),
            "f32: {got} vs {expected}"
        );
        // u32 targets with an ignore index of their own
        let unsigned = Tensor::new(&[0u32, 3, 10, 7, 4], &device)?;
        let kept = [0, 3, 10, -100, 4];
        let got = cross_entropy_sum(&logits, &unsigned, 7)?.to_scalar::<f64>()?;
        let expected = naive_cross_entropy(&rows, &kept);
        assert!((got - expected).abs() < 1e-12, "u32: {got} vs {expected}");
        // every row ignored: zero
        let none = Tensor::new(&[-100i64; 5], &device)?;
        assert_eq!(
            cross_entropy_sum(&logits, &none, -100)?.to_scalar::<f64>()?,
            0.0
        );
        Ok(())
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() -> Result<()> {
        let device = Device::Cpu;
        let logits = Tensor::randn(0f64, 2.0, (4, 6), &device)?;
        let targets = Tensor::new(&[5i64, -100, 0, 2], &device)?;
        gradcheck(
            "cross_entropy_sum",
            |xs| cross_entropy_sum(&xs[0], &targets, -100),
            &[logits],
            7,
        )
    }

    #[test]
    fn add_rms_norm_is_the_sum_then_rms_norm() -> Result<()> {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f64, 1.0, (3, 7), &device)?;
        let residual = Tensor::randn(0f64, 1.0, (3, 7), &device)?;
        let weight = Tensor::randn(1f64, 0.2, 7, &device)?;
        let (sum, normed) = add_rms_norm(&xs, &residual, &weight, 1e-6)?;
        let (x, r, w): (Vec<Vec<f64>>, Vec<Vec<f64>>, Vec<f64>) =
            (xs.to_vec2()?, residual.to_vec2()?, weight.to_vec1()?);
        let (sum, normed): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (sum.to_vec2()?, normed.to_vec2()?);
        for row in 0..3 {
            let s: Vec<f64> = x[row].iter().zip(&r[row]).map(|(a, b)| a + b).collect();
            let rms = (s.iter().map(|v| v * v).sum::<f64>() / 7.0 + 1e-6).sqrt();
            for j in 0..7 {
                assert!((sum[row][j] - s[j]).abs() < 1e-12, "sum [{row}, {j}]");
                let y = s[j] / rms * w[j];
                assert!(
                    (normed[row][j] - y).abs() < 1e-12,
                    "normed [{row}, {j}]: {} vs {y}",
                    normed[row][j]
                );
            }
        }
        // bf16: the sum is rounded before the norm, as the composition rounds it
        let bf16 = |t: &Tensor| t.to_dtype(DType::BF16);
        let (sum, normed) = add_rms_norm(&bf16(&xs)?, &bf16(&residual)?, &bf16(&weight)?, 1e-6)?;
        let composed = (bf16(&xs)? + bf16(&residual)?)?;
        let values = |t: &Tensor| t.to_dtype(DType::F32)?.to_vec2::<f32>();
        assert_eq!(values(&sum)?, values(&composed)?);
        assert_eq!(
            values(&normed)?,
            values(&rms_norm(&composed, &bf16(&weight)?, 1e-6)?)?
        );
        Ok(())
    }

    #[test]
    fn add_rms_norm_gradients_match_finite_differences() -> Result<()> {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f64, 1.0, (2, 5), &device)?;
        let residual = Tensor::randn(0f64, 1.0, (2, 5), &device)?;
        let weight = Tensor::randn(1f64, 0.2, 5, &device)?;
        // both outputs at once: (2, 2, 5) = [sum, normed]
        gradcheck(
            "add_rms_norm",
            |xs| {
                let (sum, normed) = add_rms_norm(&xs[0], &xs[1], &xs[2], 1e-6)?;
                Tensor::stack(&[sum, normed], 0)
            },
            &[xs, residual, weight],
            8,
        )
    }

    /// f64 loops of [`qk_norm_rope_cache_write`] for one row and head of width `d`: the
    /// head normalised by `weight` (when given), then rotated by the row's (cos, sin).
    fn naive_norm_rope(x: &[f64], weight: Option<&[f64]>, cos: &[f64], sin: &[f64]) -> Vec<f64> {
        let d = x.len();
        let half = d / 2;
        let normed: Vec<f64> = match weight {
            Some(w) => {
                let rms = (x.iter().map(|v| v * v).sum::<f64>() / d as f64 + 1e-6).sqrt();
                x.iter().zip(w).map(|(v, w)| v / rms * w).collect()
            }
            None => x.to_vec(),
        };
        let mut y = vec![0.0; d];
        for i in 0..half {
            let (a, b) = (normed[i], normed[i + half]);
            y[i] = a * cos[i] - b * sin[i];
            y[i + half] = b * cos[i] + a * sin[i];
        }
        y
    }

    #[test]
    fn qk_norm_rope_cache_write_is_norm_rope_then_scatter() -> Result<()> {
        let device = Device::Cpu;
        let (t, h, kv, d, num_slots) = (5, 4, 2, 8, 12);
        let heads = AttentionHeads {
            q: h,
            kv,
            head_dim: d,
        };
        // q, k and v as narrows of one fused projection output (strided rows)
        let qkv = Tensor::randn(0f64, 1.0, (t, (h + 2 * kv) * d), &device)?;
        let q = qkv.narrow(1, 0, h * d)?;
        let k = qkv.narrow(1, h * d, kv * d)?;
        let v = qkv.narrow(1, (h + kv) * d, kv * d)?;
        let q_norm = Tensor::randn(1f64, 0.2, d, &device)?;
        let k_norm = Tensor::randn(1f64, 0.2, d, &device)?;
        let angles = Tensor::randn(0f64, 2.0, (t, d / 2), &device)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let slots_host = [7u32, 2, 11, 0, 5];
        let slots = Tensor::new(&slots_host, &device)?;
        let initial = Tensor::randn(0f64, 1.0, (2, num_slots, kv * d), &device)?;
        let rows: Vec<Vec<f64>> = qkv.to_vec2()?;
        let (cos_host, sin_host): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (cos.to_vec2()?, sin.to_vec2()?);
        let (q_weight, k_weight): (Vec<f64>, Vec<f64>) = (q_norm.to_vec1()?, k_norm.to_vec1()?);
        for with_norms in [true, false] {
            // fresh pools holding other values, to see which rows change
            let k_pool = initial.get(0)?.copy()?;
            let v_pool = initial.get(1)?.copy()?;
            let norms = with_norms.then_some((&q_norm, &k_norm));
            let out = qk_norm_rope_cache_write(&RopeCacheInputs {
                q: &q,
                k: &k,
                v: &v,
                heads,
                norms,
                eps: 1e-6,
                cos: &cos,
                sin: &sin,
                slots: &slots,
                k_pool: &k_pool,
                v_pool: &v_pool,
            })?;
            assert_eq!(out.dims(), [t, h, d]);
            let out: Vec<Vec<Vec<f64>>> = out.to_vec3()?;
            let (k_rows, v_rows): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
                (k_pool.to_vec2()?, v_pool.to_vec2()?);
            let before: Vec<Vec<Vec<f64>>> = initial.to_vec3()?;
            let close = |got: &[f64], expected: &[f64], what: &str| {
                for (i, (g, e)) in got.iter().zip(expected).enumerate() {
                    assert!(
                        (g - e).abs() < 1e-12,
                        "norms {with_norms}, {what}[{i}]: {g} vs {e}"
                    );
                }
            };
            for row in 0..t {
                let slot = slots_host[row] as usize;
                let (c, s) = (&cos_host[row], &sin_host[row]);
                for j in 0..h {
                    let x = &rows[row][j * d..(j + 1) * d];
                    let weight = with_norms.then_some(q_weight.as_slice());
                    let expected = naive_norm_rope(x, weight, c, s);
                    close(&out[row][j], &expected, &format!("q row {row} head {j}"));
                }
                for j in 0..kv {
                    let x = &rows[row][(h + j) * d..(h + j + 1) * d];
                    let weight = with_norms.then_some(k_weight.as_slice());
                    let expected = naive_norm_rope(x, weight, c, s);
                    let got = &k_rows[slot][j * d..(j + 1) * d];
                    close(got, &expected, &format!("k row {row} head {j}"));
                    let x = &rows[row][(h + kv + j) * d..(h + kv + j + 1) * d];
                    assert_eq!(&v_rows[slot][j * d..(j + 1) * d], x, "v row {row} head {j}");
                }
            }
            for slot in (0..num_slots).filter(|s| !slots_host.contains(&(*s as u32))) {
                assert_eq!(
                    k_rows[slot], before[0][slot],
                    "k_pool row {slot} was written"
                );
                assert_eq!(
                    v_rows[slot], before[1][slot],
                    "v_pool row {slot} was written"
                );
            }
        }
        // contiguous inputs give the same q as the strided views
        let views = RopeCacheInputs {
            q: &q,
            k: &k,
            v: &v,
            heads,
            norms: None,
            eps: 1e-6,
            cos: &cos,
            sin: &sin,
            slots: &slots,
            k_pool: &initial.get(0)?.copy()?,
            v_pool: &initial.get(1)?.copy()?,
        };
        let strided = qk_norm_rope_cache_write_reference(&views)?;
        let contiguous = qk_norm_rope_cache_write(&RopeCacheInputs {
            q: &q.contiguous()?,
            k: &k.contiguous()?,
            v: &v.contiguous()?,
            k_pool: &initial.get(0)?.copy()?,
            v_pool: &initial.get(1)?.copy()?,
            ..views
        })?;
        assert!(
            max_abs_diff(
                &strided.to_dtype(DType::F32)?,
                &contiguous.to_dtype(DType::F32)?
            )? == 0.0
        );
        // u32::MAX slots are skipped; a wrong shape is an error naming the tensor
        let k_pool = initial.get(0)?.copy()?;
        let skipped = Tensor::new(&[u32::MAX, 2, u32::MAX, 0, 5], &device)?;
        qk_norm_rope_cache_write(&RopeCacheInputs {
            slots: &skipped,
            k_pool: &k_pool,
            v_pool: &initial.get(1)?.copy()?,
            ..views
        })?;
        let k_rows: Vec<Vec<f64>> = k_pool.to_vec2()?;
        let before: Vec<Vec<f64>> = initial.get(0)?.to_vec2()?;
        assert_eq!(k_rows[7], before[7]);
        assert_eq!(k_rows[11], before[11]);
        assert_ne!(k_rows[2], before[2]);
        let error = qk_norm_rope_cache_write(&RopeCacheInputs {
            heads: AttentionHeads {
                q: h,
                kv: 1,
                head_dim: d,
            },
            k_pool: &k_pool,
            v_pool: &initial.get(1)?.copy()?,
            ..views
        })
        .expect_err("k has 2 heads, not 1");
        assert!(error.to_string().contains("k [5, 16]"), "{error}");
        Ok(())
    }

    #[test]
    fn embedding_is_index_select_of_the_flat_ids() -> Result<()> {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (11, 5), &device)?;
        let ids = Tensor::new(&[[3u32, 0, 10], [3, 7, 3]], &device)?;
        let rows = embedding(&weight, &ids)?;
        assert_eq!(rows.dims(), [2, 3, 5]);
        let expected = weight
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((2, 3, 5))?;
        assert_eq!(max_abs_diff(&rows, &expected)?, 0.0);
        assert_eq!(
            max_abs_diff(&embedding_reference(&weight, &ids)?, &expected)?,
            0.0
        );
        // a single id of any rank: (hidden,) per id
        let one = embedding(&weight, &Tensor::new(&[9u32], &device)?)?;
        assert_eq!(max_abs_diff(&one.squeeze(0)?, &weight.get(9)?)?, 0.0);
        Ok(())
    }

    #[test]
    fn embedding_gradient_is_index_add_and_matches_finite_differences() -> Result<()> {
        let device = Device::Cpu;
        let (vocab, hidden) = (9, 7);
        // repeated ids, the first and last rows, ids never looked up
        let ids = Tensor::new(&[[4u32, 0, 8, 4], [4, 2, 0, 8]], &device)?;
        let weight = Var::from_tensor(&Tensor::randn(0f64, 1.0, (vocab, hidden), &device)?)?;
        let grad_out = Tensor::randn(0f64, 1.0, (2, 4, hidden), &device)?;
        let grads = (embedding(weight.as_tensor(), &ids)? * &grad_out)?
            .sum_all()?
            .backward()?;
        let got: Vec<Vec<f64>> = grads
            .get(weight.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("no gradient for the weight".into()))?
            .to_vec2()?;
        // each row of the weight's gradient sums the output gradients of its ids' rows
        let flat_ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let flat_grad: Vec<Vec<f64>> = grad_out.reshape((8, hidden))?.to_vec2()?;
        let mut expected = vec![vec![0.0; hidden]; vocab];
        for (row, &id) in flat_ids.iter().enumerate() {
            for (e, g) in expected[id as usize].iter_mut().zip(&flat_grad[row]) {
                *e += g;
            }
        }
        for (v, (got, expected)) in got.iter().zip(&expected).enumerate() {
            for (j, (a, b)) in got.iter().zip(expected).enumerate() {
                assert!((a - b).abs() < 1e-12, "dweight [{v}, {j}]: {a} vs {b}");
            }
        }
        // the same as candle's index_add of the output gradient into zeros
        let index_add = Tensor::zeros((vocab, hidden), DType::F64, &device)?.index_add(
            &ids.flatten_all()?,
            &grad_out.reshape((8, hidden))?,
            0,
        )?;
        let index_add: Vec<Vec<f64>> = index_add.to_vec2()?;
        assert_eq!(got, index_add);
        gradcheck(
            "embedding",
            |xs| embedding(&xs[0], &ids),
            &[Tensor::randn(0f64, 1.0, (vocab, hidden), &device)?],
            3,
        )
    }
}
