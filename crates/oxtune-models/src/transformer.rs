//! The decoder-only transformer shared by every supported family (see [`crate::families`]
//! for what each family changes). Blocks appear in forward order: embedding, then
//! `num_hidden_layers` x (RMSNorm -> attention -> residual, RMSNorm -> SwiGLU MLP ->
//! residual), final RMSNorm, LM head.
//!
//! Letters used in shapes: b = batch, t = new tokens, p = past (cached) tokens, h = heads,
//! kv_h = key/value heads, d = head_dim, c = hidden_size, v = vocab_size.
//!
//! Weight names (`model.layers.{i}.self_attn.q_proj.weight`, …) are those of the Hugging Face
//! checkpoints, so a missing or mis-shaped tensor is reported under its checkpoint name.

use oxtune_tensor::attention::{AttentionMask, flash_attention, flash_attention_positions_first};
use oxtune_tensor::candle::backprop::GradStore;
use oxtune_tensor::ops::{self, PagedContext};
use oxtune_tensor::{DType, Tensor, Var};

use crate::Result;
use crate::checkpoint::WeightSource;
use crate::config::ModelConfig;
use crate::paged::{
    AdapterRouting, AttentionGroup, FreshChunk, PagedKvCache, PagedSequence, PagedStep,
    StepAttention,
};
use crate::rope::RotaryEmbedding;

/// What a tuner puts into a linear layer (LoRA, DoRA, …): given the input and the frozen base
/// layer, it returns the adapted layer's output. The model code never knows which tuner is
/// in use.
pub trait Adapter: std::fmt::Debug + Send + Sync {
    /// (.., in) -> (.., out)
    fn forward(&self, xs: &Tensor, base: &Linear) -> Result<Tensor>;

    /// When the adapter's whole effect is a low-rank update `x' A^T B^T` of its input x'
    /// ([`Adapter::low_rank_input`]): A (r, in) and B (out, r) in `dtype`, any scale folded
    /// into B, both differentiable into the adapter's parameters. The model then runs the
    /// layer (and layers sharing its input) through [`ops::lora_linear`]. `None` (the default)
    /// when the adapter does more (DoRA's magnitudes).
    fn low_rank(&self, dtype: DType) -> Result<Option<LowRank>> {
        let _ = dtype;
        Ok(None)
    }

    /// The input x' of [`Adapter::low_rank`]'s update for this forward pass, when it is not
    /// `xs` itself (dropout while training). The model then hands `x' A^T` to
    /// [`ops::lora_linear_projected`].
    fn low_rank_input(&self, xs: &Tensor) -> Result<Option<Tensor>> {
        let _ = xs;
        Ok(None)
    }
}

/// A low-rank update `x A^T B^T`: a (r, in), b (out, r).
#[derive(Debug, Clone)]
pub struct LowRank {
    pub a: Tensor,
    pub b: Tensor,
}

/// A linear layer `y = x W^T + b` with `W`: (out, in), optionally adapted by a tuner.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<std::sync::Arc<dyn Adapter>>,
    /// Adapters served side by side (multi-LoRA), by adapter index; a request picks one.
    served: Vec<Option<std::sync::Arc<dyn Adapter>>>,
}

impl Linear {
    fn load(
        weights: &dyn WeightSource,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = weights.get(&format!("{prefix}.weight"), &[out_features, in_features])?;
        let bias = if bias {
            Some(weights.get(&format!("{prefix}.bias"), &[out_features])?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            adapter: None,
            served: Vec::new(),
        })
    }

    /// The weight, (out, in).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, (out,), if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The adapter, if a tuner attached one.
    pub fn adapter(&self) -> Option<&std::sync::Arc<dyn Adapter>> {
        self.adapter.as_ref()
    }

    /// Attaches (or with `None`, removes) an adapter.
    pub fn set_adapter(&mut self, adapter: Option<std::sync::Arc<dyn Adapter>>) {
        self.adapter = adapter;
    }

    /// The weight and bias tensors, for replacing them (trainable copies, merged weights).
    pub fn tensors_mut(&mut self) -> (&mut Tensor, Option<&mut Tensor>) {
        (&mut self.weight, self.bias.as_mut())
    }

    /// Makes `adapter` the served adapter number `index` (multi-LoRA: requests pick it by
    /// index through [`AdapterRouting`]). `None` leaves this layer unadapted for that index.
    pub fn set_served_adapter(
        &mut self,
        index: usize,
        adapter: Option<std::sync::Arc<dyn Adapter>>,
    ) {
        if self.served.len() <= index {
            self.served.resize(index + 1, None);
        }
        self.served[index] = adapter;
    }

    /// The output of each row segment under its own adapter: (1, t, in) -> (1, t, out).
    /// Segments without an adapter (or whose adapter does not touch this layer) get
    /// [`Linear::forward`].
    /// `None` routes every row to [`Linear::forward`].
    pub fn forward_routed(&self, xs: &Tensor, routing: Option<&AdapterRouting>) -> Result<Tensor> {
        let Some(routing) = routing.filter(|routing| !routing.is_base_only()) else {
            return self.forward(xs);
        };
        let pieces = routing
            .segments
            .iter()
            .map(|segment| {
                let rows = xs.narrow(1, segment.start, segment.len)?;
                match segment
                    .adapter
                    .and_then(|i| self.served.get(i))
                    .and_then(Option::as_ref)
                {
                    Some(adapter) => adapter.forward(&rows, self),
                    None => self.forward(&rows),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&pieces, 1)?)
    }

    /// Whether every row of a step goes through these layers' base weights alone: no row is
    /// routed to an adapter and none is attached.
    fn all_base(linears: &[&Linear], routing: &AdapterRouting) -> bool {
        routing.is_base_only() && linears.iter().all(|linear| linear.adapter.is_none())
    }

    /// [`Linear::forward_routed`] for a serving step, through [`ops::linear_rows`] (one
    /// bandwidth-bound launch for the few rows of a decode step) when no adapter is involved.
    fn forward_serving(&self, xs: &Tensor, routing: &AdapterRouting) -> Result<Tensor> {
        if Self::all_base(&[self], routing) {
            Ok(ops::linear_rows(
                xs,
                &[&self.weight],
                &[self.bias.as_ref()],
            )?)
        } else {
            self.forward_routed(xs, Some(routing))
        }
    }

    /// The adapted output when an adapter is attached, else the base output.
    /// (.., in) -> (.., out)
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.adapter {
            Some(adapter) => match Self::forward_low_rank(&[self], xs)? {
                Some(ys) => Ok(ys),
                None => adapter.forward(xs, self),
            },
            None => self.base_forward(xs),
        }
    }

    /// The outputs of layers reading the same input, concatenated on the last dimension,
    /// through one [`ops::lora_linear`] when every layer's adapter is a plain low-rank update
    /// ([`Adapter::low_rank`]) of one rank and only a single layer may have a bias (with
    /// dropout, each adapter's `x' A^T` first, then one [`ops::lora_linear_projected`]);
    /// `None` otherwise (the caller runs each layer's [`Linear::forward`]).
    fn forward_low_rank(linears: &[&Linear], xs: &Tensor) -> Result<Option<Tensor>> {
        if linears.len() > 1 && linears.iter().any(|linear| linear.bias.is_some()) {
            return Ok(None);
        }
        let mut adapters = Vec::with_capacity(linears.len());
        let mut updates = Vec::with_capacity(linears.len());
        for linear in linears {
            let Some(adapter) = &linear.adapter else {
                return Ok(None);
            };
            let Some(update) = adapter.low_rank(xs.dtype())? else {
                return Ok(None);
            };
            adapters.push(adapter);
            updates.push(update);
        }
        if updates
            .windows(2)
            .any(|pair| pair[0].a.dims().first() != pair[1].a.dims().first())
        {
            return Ok(None);
        }
        // Only now that the layers run as one op: the dropped inputs (dropout while training).
        let inputs = adapters
            .iter()
            .map(|adapter| adapter.low_rank_input(xs))
            .collect::<Result<Vec<_>>>()?;
        let stack = |parts: Vec<&Tensor>, dim: usize| -> Result<Tensor> {
            match parts.as_slice() {
                [one] => Ok((*one).clone()),
                all => Ok(Tensor::cat(all, dim)?),
            }
        };
        let weights: Vec<&Tensor> = linears.iter().map(|linear| &linear.weight).collect();
        let b = stack(updates.iter().map(|u| &u.b).collect(), 0)?;
        let ys = if inputs.iter().all(Option::is_none) {
            let a = stack(updates.iter().map(|u| &u.a).collect(), 0)?;
            ops::lora_linear(xs, &weights, &a, &b)?
        } else {
            let projected = updates
                .iter()
                .zip(&inputs)
                .map(|(update, input)| {
                    Ok(input
                        .as_ref()
                        .unwrap_or(xs)
                        .broadcast_matmul(&update.a.t()?)?)
                })
                .collect::<Result<Vec<_>>>()?;
            let h = stack(projected.iter().collect(), xs.rank() - 1)?;
            ops::lora_linear_projected(xs, &weights, &h, &b)?
        };
        Ok(Some(match &linears[0].bias {
            Some(bias) => ys.broadcast_add(bias)?,
            None => ys,
        }))
    }

    /// `x W^T + b`, ignoring any adapter.
    pub fn base_forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(ops::linear(xs, &self.weight, self.bias.as_ref())?)
    }
}

/// RMSNorm with a learned scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// The scale, for replacing it (trainable copies).
    pub fn weight_mut(&mut self) -> &mut Tensor {
        &mut self.weight
    }

    fn load(weights: &dyn WeightSource, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weights.get(&format!("{name}.weight"), &[size])?,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(ops::rms_norm(xs, &self.weight, self.eps)?)
    }

    /// The residual stream `xs + residual` and its norm, from one fused kernel on a GPU.
    fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(ops::add_rms_norm(xs, residual, &self.weight, self.eps)?)
    }
}

/// Keys and values of the tokens seen so far, one entry per layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|layer| *layer = None);
        self.len = 0;
    }

    /// Keeps the first `len` positions, dropping the rest (to reuse a shared prompt prefix).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        for layer in &mut self.layers {
            if let Some((k, v)) = layer.take() {
                *layer = if len == 0 {
                    None
                } else {
                    Some((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?))
                };
            }
        }
        self.len = len;
        Ok(())
    }

    /// Appends this step's keys/values for `layer` and returns all of them:
    /// (b, kv_h, t, d) -> (b, kv_h, p + t, d).
    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.layers[layer].take() {
            Some((past_k, past_v)) => (
                Tensor::cat(&[&past_k, &k], 2)?,
                Tensor::cat(&[&past_v, &v], 2)?,
            ),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// How attention sees context in one forward call; built once and shared by every layer.
struct AttentionContext<'a> {
    /// RoPE tables for the new tokens: (t, d/2), or (b, t, d/2) when rows differ.
    cos: Tensor,
    sin: Tensor,
    /// Additive mask broadcastable to (b, h, t, p + t); `None` when every key is visible
    /// or when `segments` masks instead.
    mask: Option<Tensor>,
    /// Training on a GPU: (b, t) u32 sample of each token, for the fused attention kernel,
    /// which masks causally within a sample (and the model's sliding window) by itself.
    segments: Option<Tensor>,
    /// Keys/values of earlier tokens (inference); `None` in training.
    cache: Option<&'a mut KvCache>,
}

/// How [`CausalLm::forward_backward`] trades memory for compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainingPass {
    /// Keep only each decoder block's input and re-run the block in the backward.
    pub checkpoint: bool,
    /// Token rows whose logits are computed at once (the LM head and loss run chunk by chunk).
    pub loss_chunk_rows: usize,
}

impl TrainingPass {
    /// Logits elements (rows x vocab) per loss chunk: 2^27 f32 values are 512 MiB.
    const CHUNK_ELEMENTS: usize = 1 << 27;

    /// Chunks of at most 2^27 logits for a vocabulary of `vocab_size`.
    pub fn new(checkpoint: bool, vocab_size: usize) -> Self {
        Self {
            checkpoint,
            loss_chunk_rows: (Self::CHUNK_ELEMENTS / vocab_size.max(1)).max(1),
        }
    }
}

/// Positions and visibility of a training batch, for [`CausalLm::forward_batch`].
#[derive(Debug, Clone)]
pub struct BatchLayout {
    /// (b, t) u32: each token's position within its own sample.
    positions: Tensor,
    /// (b, t) u32: the sample each token belongs to (padding tokens: one each).
    segments: Tensor,
    /// (b, 1, t, t) f32 additive mask: causal within a sample, nothing across samples. Only
    /// off the GPU: there the fused attention kernel masks from `segments`.
    mask: Option<Tensor>,
}

impl BatchLayout {
    /// Layout of rows made of consecutive samples. `sample_lengths[row]` lists the lengths of
    /// the samples packed into that row; positions after them (padding up to `t`) each form a
    /// sample of one token, so they see only themselves and never produce NaNs.
    /// `sliding_window` is the model's (`ModelConfig::sliding_window`).
    pub fn packed(
        sample_lengths: &[Vec<usize>],
        t: usize,
        sliding_window: Option<usize>,
        device: &oxtune_tensor::Device,
    ) -> Result<Self> {
        let mut positions = Vec::with_capacity(sample_lengths.len() * t);
        let mut segments = Vec::with_capacity(sample_lengths.len());
        for lengths in sample_lengths {
            let used: usize = lengths.iter().sum();
            if used > t {
                return Err(oxtune_tensor::candle::Error::Msg(format!(
                    "samples of {used} tokens do not fit a row of {t}"
                ))
                .into());
            }
            let mut row = Vec::with_capacity(t);
            for (sample, &length) in lengths
                .iter()
                .chain(std::iter::repeat_n(&1, t - used))
                .enumerate()
            {
                let sample = u32::try_from(sample).map_err(oxtune_tensor::candle::Error::wrap)?;
                for position in 0..length {
                    positions
                        .push(u32::try_from(position).map_err(oxtune_tensor::candle::Error::wrap)?);
                    row.push(sample);
                }
            }
            segments.push(row);
        }
        let mask = if device.is_cuda() {
            None
        } else {
            Some(ops::packed_causal_mask(
                &segments,
                sliding_window,
                DType::F32,
                device,
            )?)
        };
        let b = sample_lengths.len();
        Ok(Self {
            positions: Tensor::from_vec(positions, (b, t), device)?,
            segments: Tensor::from_vec(segments.concat(), (b, t), device)?,
            mask,
        })
    }

    /// One sample per row (plain causal attention), padded at the end to `t`.
    pub fn unpacked(
        lengths: &[usize],
        t: usize,
        sliding_window: Option<usize>,
        device: &oxtune_tensor::Device,
    ) -> Result<Self> {
        let rows: Vec<Vec<usize>> = lengths.iter().map(|&length| vec![length]).collect();
        Self::packed(&rows, t, sliding_window, device)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// A query sees only the last this many positions (Mistral).
    sliding_window: Option<usize>,
}

impl Attention {
    fn load(cfg: &ModelConfig, weights: &dyn WeightSource, prefix: &str) -> Result<Self> {
        let (c, h, kv_h, d) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let norm = |name: &str| -> Result<Option<RmsNorm>> {
            if cfg.qk_norm {
                Ok(Some(RmsNorm::load(
                    weights,
                    &format!("{prefix}.{name}"),
                    d,
                    cfg.rms_norm_eps,
                )?))
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            q_proj: Linear::load(weights, &format!("{prefix}.q_proj"), c, h * d, cfg.qkv_bias)?,
            k_proj: Linear::load(
                weights,
                &format!("{prefix}.k_proj"),
                c,
                kv_h * d,
                cfg.qkv_bias,
            )?,
            v_proj: Linear::load(
                weights,
                &format!("{prefix}.v_proj"),
                c,
                kv_h * d,
                cfg.qkv_bias,
            )?,
            o_proj: Linear::load(weights, &format!("{prefix}.o_proj"), h * d, c, cfg.o_bias)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            num_heads: h,
            num_kv_heads: kv_h,
            head_dim: d,
            sliding_window: cfg.sliding_window,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        context: &mut AttentionContext<'_>,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let (h, kv_h, d) = (self.num_heads, self.num_kv_heads, self.head_dim);

        // 1-2. Project: (b, t, c) -> (b, t, heads, d), per-head RMSNorm over d (Qwen3)
        let (q, k) = self.project_qk(xs, None)?;
        let v = self.v_proj.forward(xs)?.reshape((b, t, kv_h, d))?;

        // Training (packed samples, no cache): RoPE and attention keep the projections'
        // (b, t, heads, d) order, so no transpose is copied either way (on a GPU).
        if let (Some(segments), None) = (&context.segments, &context.cache) {
            let q = ops::rope_positions_first(&q, &context.cos, &context.sin)?;
            let k = ops::rope_positions_first(&k, &context.cos, &context.sin)?;
            let mask = AttentionMask {
                causal: true,
                segments: Some(segments),
                sliding_window: self.sliding_window,
            };
            let out = flash_attention_positions_first(&q, &k, &v, self.scale(), mask)?;
            return self.o_proj.forward(&out.reshape((b, t, h * d))?);
        }

        // 3. (b, t, heads, d) -> (b, heads, t, d), RoPE at each token's position (on a GPU one
        // kernel each for q and k, with no copy for the transpose)
        let q = ops::rope_to_heads(&q, &context.cos, &context.sin)?;
        let k = ops::rope_to_heads(&k, &context.cos, &context.sin)?;
        let v = v.transpose(1, 2)?.contiguous()?;

        // 4. Append to the cache: (b, kv_h, p + t, d)
        let (k, v) = match context.cache.as_deref_mut() {
            Some(cache) => cache.append(layer, k, v)?,
            None => (k, v),
        };
        // 5. (b, h, t, d) -> (b, t, h * d) -> o_proj
        let out = match &context.segments {
            Some(segments) => {
                let mask = AttentionMask {
                    causal: true,
                    segments: Some(segments),
                    sliding_window: self.sliding_window,
                };
                flash_attention(&q, &k, &v, self.scale(), mask)?
            }
            None => self.attend(&q, &k, &v, context.mask.as_ref())?,
        };
        let out = out.transpose(1, 2)?.reshape((b, t, h * d))?;
        self.o_proj.forward(&out)
    }

    /// Scaled dot-product attention with grouped kv heads: q (b, h, t, d), k and v
    /// (b, kv_h, l, d), mask broadcastable to (b, h, t, l) -> (b, h, t, d).
    ///
    /// Scores are computed in f32, masked, softmaxed, then cast back to the compute dtype. Not
    /// in bf16: scores of a few hundred would be rounded to whole numbers, enough to change
    /// which token a head attends to (SmolLM2 turns to gibberish).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let groups = self.num_heads / self.num_kv_heads;
        let k = ops::repeat_kv(k, groups)?.contiguous()?;
        let v = ops::repeat_kv(v, groups)?.contiguous()?;
        let scale = self.scale();
        let scores = q
            .to_dtype(DType::F32)?
            .matmul(&k.to_dtype(DType::F32)?.t()?)?;
        let mask = match mask {
            Some(mask) => ops::ScoreMask::Additive(mask),
            None => ops::ScoreMask::None,
        };
        let probs = ops::scaled_masked_softmax(&scores, scale, mask)?.to_dtype(v.dtype())?;
        Ok(probs.matmul(&v)?)
    }

    /// 1 / sqrt(head_dim), the scale of attention scores.
    fn scale(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "head_dim is small")]
        let head_dim = self.head_dim as f64;
        1.0 / head_dim.sqrt()
    }

    /// One serving step over the paged cache: xs (1, t, c) holds every scheduled sequence's
    /// new tokens; their keys/values are written to the cache, then attention reads each
    /// token's context from it: on a GPU one paged-attention kernel for the whole step (and
    /// FlashAttention for fresh prompts), elsewhere each attention group gathers its
    /// sequences' padded context. -> (1, t, c)
    ///
    /// Without adapters, q, k and v come from one launch ([`ops::linear_rows`]); unless a fresh
    /// prompt needs its own keys, the norms, RoPE and the cache write are one more
    /// ([`ops::qk_norm_rope_cache_write`]).
    fn forward_paged(
        &self,
        xs: &Tensor,
        step: &PagedStep,
        cache: &PagedKvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let t = xs.dim(1)?;
        let (h, kv_h, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let routing = &step.routing;
        // (1, t, c) -> (t, h * d), (t, kv_h * d), (t, kv_h * d)
        let projections = [&self.q_proj, &self.k_proj, &self.v_proj];
        let (q, k, v) = if Linear::all_base(&projections, routing) {
            let weights = projections.map(|linear| &linear.weight);
            let biases = projections.map(|linear| linear.bias.as_ref());
            let qkv = ops::linear_rows(xs, &weights, &biases)?.squeeze(0)?;
            (
                qkv.narrow(1, 0, h * d)?,
                qkv.narrow(1, h * d, kv_h * d)?,
                qkv.narrow(1, (h + kv_h) * d, kv_h * d)?,
            )
        } else {
            let project = |linear: &Linear| -> Result<Tensor> {
                Ok(linear.forward_routed(xs, Some(routing))?.squeeze(0)?)
            };
            (
                project(&self.q_proj)?,
                project(&self.k_proj)?,
                project(&self.v_proj)?,
            )
        };

        let out = match &step.attention {
            StepAttention::Kernel { paged, fresh } if !fresh.is_empty() => {
                // Fresh prompts attend over their own rotated keys, so those are kept.
                let (q, k) = self.norm_and_rotate(&q, &k, step)?;
                cache.write(layer, &step.slots, &k.reshape((t, kv_h * d))?, &v)?;
                let v = v.reshape((t, kv_h, d))?;
                self.attend_step(&q, &k, &v, paged.as_ref(), fresh, cache, layer)?
            }
            attention => {
                let (k_pool, v_pool) = cache.pools(layer);
                let norms = self
                    .q_norm
                    .as_ref()
                    .zip(self.k_norm.as_ref())
                    .map(|(q_norm, k_norm)| (&q_norm.weight, &k_norm.weight));
                let eps = self.q_norm.as_ref().map_or(0.0, |norm| norm.eps);
                let heads = ops::AttentionHeads {
                    q: h,
                    kv: kv_h,
                    head_dim: d,
                };
                let q = ops::qk_norm_rope_cache_write(&ops::RopeCacheInputs {
                    q: &q,
                    k: &k,
                    v: &v,
                    heads,
                    norms,
                    eps,
                    cos: &step.cos,
                    sin: &step.sin,
                    slots: &step.slots,
                    k_pool,
                    v_pool,
                })?;
                match attention {
                    StepAttention::Kernel { paged, .. } => {
                        self.attend_step(&q, &k, &v, paged.as_ref(), &[], cache, layer)?
                    }
                    StepAttention::Groups(groups) => {
                        self.attend_groups(&q, groups, cache, layer)?
                    }
                }
            }
        };
        let out = out.reshape((1, t, h * d))?;
        self.o_proj.forward_serving(&out, routing)
    }

    /// The per-head norms (Qwen3) and RoPE of a step's rows: q (t, h * d), k (t, kv_h * d)
    /// -> (t, h, d), (t, kv_h, d), each row rotated by its own position's table row.
    fn norm_and_rotate(
        &self,
        q: &Tensor,
        k: &Tensor,
        step: &PagedStep,
    ) -> Result<(Tensor, Tensor)> {
        let t = q.dim(0)?;
        let (h, kv_h, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let norm = |x: Tensor, norm: Option<&RmsNorm>| -> Result<Tensor> {
            match norm {
                Some(norm) => norm.forward(&x),
                None => Ok(x),
            }
        };
        let q = norm(q.reshape((t, h, d))?, self.q_norm.as_ref())?;
        let k = norm(k.reshape((t, kv_h, d))?, self.k_norm.as_ref())?;
        // (t, heads, d) -> (t, heads, 1, d): each token a batch row of its own, rotated by
        // its own position's (1, d/2) table row; no transposes
        let (cos, sin) = (step.cos.unsqueeze(1)?, step.sin.unsqueeze(1)?);
        let q = ops::rope(&q.unsqueeze(2)?, &cos, &sin)?.squeeze(2)?;
        let k = ops::rope(&k.unsqueeze(2)?, &cos, &sin)?.squeeze(2)?;
        Ok((q, k))
    }

    /// Attention off a GPU: per group, the padded context gathered from the cache and masked.
    /// q (t, h, d) -> (t, h, d).
    fn attend_groups(
        &self,
        q: &Tensor,
        groups: &[AttentionGroup],
        cache: &PagedKvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (h, kv_h, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let mut outputs = Vec::with_capacity(groups.len());
        for group in groups {
            let (b, l) = (group.sequences, group.context);
            let queries = group.rows / b;
            let q = q
                .narrow(0, group.start, group.rows)?
                .reshape((b, queries, h, d))?
                .transpose(1, 2)?
                .contiguous()?;
            let (keys, values) = cache.gather(layer, &group.slots)?;
            let keys = keys.reshape((b, l, kv_h, d))?.transpose(1, 2)?;
            let values = values.reshape((b, l, kv_h, d))?.transpose(1, 2)?;
            let out = self.attend(&q, &keys, &values, Some(&group.mask))?;
            outputs.push(out.transpose(1, 2)?.reshape((group.rows, h, d))?);
        }
        Ok(Tensor::cat(&outputs, 0)?)
    }

    /// Attention of a step's rows on a GPU: q (t, h, d), the step's own k and v (t, kv_h,
    /// d) -> (t, h, d). Each fresh prefill chunk runs FlashAttention over its own keys; the
    /// other rows, in order, read the pools through the paged kernel.
    #[expect(clippy::too_many_arguments, reason = "one step's parts, all needed")]
    fn attend_step(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        paged: Option<&PagedContext>,
        fresh: &[FreshChunk],
        cache: &PagedKvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let t = q.dim(0)?;
        let (k_pool, v_pool) = cache.pools(layer);
        if fresh.is_empty() {
            let context = paged.ok_or_else(|| {
                oxtune_tensor::candle::Error::Msg("a step without rows to attend".into())
            })?;
            return Ok(ops::paged_attention(
                q,
                k_pool,
                v_pool,
                context,
                self.scale(),
            )?);
        }
        // (len, heads, d) -> (1, heads, len, d)
        let heads_first = |x: &Tensor, start: usize, len: usize| -> Result<Tensor> {
            Ok(x.narrow(0, start, len)?
                .transpose(0, 1)?
                .unsqueeze(0)?
                .contiguous()?)
        };
        // Rows between fresh chunks, then the chunks, each in its place.
        let mut pieces: Vec<(usize, usize, Option<Tensor>)> = Vec::new();
        let mut cursor = 0;
        for chunk in fresh {
            if chunk.start > cursor {
                pieces.push((cursor, chunk.start - cursor, None));
            }
            let mask = AttentionMask {
                causal: true,
                segments: None,
                sliding_window: self.sliding_window,
            };
            let out = flash_attention(
                &heads_first(q, chunk.start, chunk.len)?,
                &heads_first(k, chunk.start, chunk.len)?,
                &heads_first(v, chunk.start, chunk.len)?,
                self.scale(),
                mask,
            )?;
            let out = out.squeeze(0)?.transpose(0, 1)?;
            pieces.push((chunk.start, chunk.len, Some(out)));
            cursor = chunk.start + chunk.len;
        }
        if cursor < t {
            pieces.push((cursor, t - cursor, None));
        }
        let paged_rows: Vec<Tensor> = pieces
            .iter()
            .filter(|(_, _, out)| out.is_none())
            .map(|&(start, len, _)| q.narrow(0, start, len))
            .collect::<std::result::Result<_, _>>()?;
        let mut paged_out = match (paged, paged_rows.is_empty()) {
            (Some(context), false) => {
                let rows = Tensor::cat(&paged_rows, 0)?.contiguous()?;
                Some(ops::paged_attention(
                    &rows,
                    k_pool,
                    v_pool,
                    context,
                    self.scale(),
                )?)
            }
            _ => None,
        };
        let mut taken = 0;
        let mut outputs = Vec::with_capacity(pieces.len());
        for (_, len, out) in pieces {
            match out {
                Some(out) => outputs.push(out),
                None => {
                    let all = paged_out.as_mut().ok_or_else(|| {
                        oxtune_tensor::candle::Error::Msg(
                            "rows outside fresh chunks but no paged context".into(),
                        )
                    })?;
                    outputs.push(all.narrow(0, taken, len)?);
                    taken += len;
                }
            }
        }
        Ok(Tensor::cat(&outputs, 0)?)
    }

    /// q and k projections with the per-head norms (Qwen3): (b, t, c) -> (b, t, heads, d).
    fn project_qk(
        &self,
        xs: &Tensor,
        routing: Option<&AdapterRouting>,
    ) -> Result<(Tensor, Tensor)> {
        let (b, t, _) = xs.dims3()?;
        let (h, kv_h, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self
            .q_proj
            .forward_routed(xs, routing)?
            .reshape((b, t, h, d))?;
        let k = self
            .k_proj
            .forward_routed(xs, routing)?
            .reshape((b, t, kv_h, d))?;
        let q = match &self.q_norm {
            Some(norm) => norm.forward(&q)?,
            None => q,
        };
        let k = match &self.k_norm {
            Some(norm) => norm.forward(&k)?,
            None => k,
        };
        Ok((q, k))
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(cfg: &ModelConfig, weights: &dyn WeightSource, prefix: &str) -> Result<Self> {
        let (c, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: Linear::load(weights, &format!("{prefix}.gate_proj"), c, i, bias)?,
            up_proj: Linear::load(weights, &format!("{prefix}.up_proj"), c, i, bias)?,
            down_proj: Linear::load(weights, &format!("{prefix}.down_proj"), i, c, bias)?,
        })
    }

    /// SwiGLU: down(silu(gate(x)) * up(x)), each row through its routed adapter. With plain
    /// low-rank adapters on gate and up (training LoRA), both run as one
    /// [`ops::lora_linear`] and the SwiGLU reads its packed output.
    fn forward(&self, xs: &Tensor, routing: Option<&AdapterRouting>) -> Result<Tensor> {
        let routed = routing.is_some_and(|routing| !routing.is_base_only());
        let packed = if routed {
            None
        } else {
            Linear::forward_low_rank(&[&self.gate_proj, &self.up_proj], xs)?
        };
        let hidden = match packed {
            Some(gate_up) => ops::swiglu_packed(&gate_up)?,
            None => ops::swiglu(
                &self.gate_proj.forward_routed(xs, routing)?,
                &self.up_proj.forward_routed(xs, routing)?,
            )?,
        };
        self.down_proj.forward_routed(&hidden, routing)
    }

    /// [`Mlp::forward`] for a serving step: without adapters or biases, gate, up and the
    /// SwiGLU run as one launch for the few rows of a decode step ([`ops::swiglu_linear_rows`]).
    fn forward_serving(&self, xs: &Tensor, routing: &AdapterRouting) -> Result<Tensor> {
        let (gate, up) = (&self.gate_proj, &self.up_proj);
        if !Linear::all_base(&[gate, up], routing) || gate.bias.is_some() || up.bias.is_some() {
            return self.forward(xs, Some(routing));
        }
        let hidden = ops::swiglu_linear_rows(xs, &gate.weight, &up.weight)?;
        self.down_proj.forward_serving(&hidden, routing)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// A block's attention and MLP linear layers, and its q/k norms (Qwen3), under their names
/// relative to the block.
#[expect(clippy::type_complexity, reason = "two named lists of borrows")]
fn block_parts<'a>(
    attention: &'a mut Attention,
    mlp: &'a mut Mlp,
) -> (
    Vec<(&'static str, &'a mut Linear)>,
    Vec<(&'static str, &'a mut RmsNorm)>,
) {
    let Attention {
        q_proj,
        k_proj,
        v_proj,
        o_proj,
        q_norm,
        k_norm,
        ..
    } = attention;
    let linears = vec![
        ("self_attn.q_proj", q_proj),
        ("self_attn.k_proj", k_proj),
        ("self_attn.v_proj", v_proj),
        ("self_attn.o_proj", o_proj),
        ("mlp.gate_proj", &mut mlp.gate_proj),
        ("mlp.up_proj", &mut mlp.up_proj),
        ("mlp.down_proj", &mut mlp.down_proj),
    ];
    let norms = [
        ("self_attn.q_norm", q_norm.as_mut()),
        ("self_attn.k_norm", k_norm.as_mut()),
    ]
    .into_iter()
    .filter_map(|(name, norm)| norm.map(|norm| (name, norm)))
    .collect();
    (linears, norms)
}

impl DecoderLayer {
    fn load(cfg: &ModelConfig, weights: &dyn WeightSource, layer: usize) -> Result<Self> {
        let prefix = format!("model.layers.{layer}");
        Ok(Self {
            input_layernorm: RmsNorm::load(
                weights,
                &format!("{prefix}.input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            self_attn: Attention::load(cfg, weights, &format!("{prefix}.self_attn"))?,
            post_attention_layernorm: RmsNorm::load(
                weights,
                &format!("{prefix}.post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::load(cfg, weights, &format!("{prefix}.mlp"))?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        context: &mut AttentionContext<'_>,
        layer: usize,
    ) -> Result<Tensor> {
        let attention =
            self.self_attn
                .forward(&self.input_layernorm.forward(xs)?, context, layer)?;
        let (xs, normed) = self
            .post_attention_layernorm
            .forward_residual(xs, &attention)?;
        let mlp = self.mlp.forward(&normed, None)?;
        Ok((xs + mlp)?)
    }

    /// One serving step of the block. The residual stream arrives as `xs` plus the previous
    /// block's MLP output `pending` (not yet added, so that the add and this block's input
    /// norm are one kernel) and leaves the same way: (stream, this block's MLP output).
    fn forward_paged(
        &self,
        xs: &Tensor,
        pending: Option<&Tensor>,
        step: &PagedStep,
        cache: &PagedKvCache,
        layer: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (xs, normed) = match pending {
            Some(mlp) => self.input_layernorm.forward_residual(xs, mlp)?,
            None => (xs.clone(), self.input_layernorm.forward(xs)?),
        };
        let attention = self.self_attn.forward_paged(&normed, step, cache, layer)?;
        let (xs, normed) = self
            .post_attention_layernorm
            .forward_residual(&xs, &attention)?;
        let mlp = self.mlp.forward_serving(&normed, &step.routing)?;
        Ok((xs, mlp))
    }
}

/// A causal language model of any supported family.
#[derive(Debug, Clone)]
pub struct CausalLm {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None` when the embeddings are tied.
    lm_head: Option<Linear>,
    rope: RotaryEmbedding,
}

impl CausalLm {
    /// Builds the model from checkpoint weights, checking every tensor's name and shape.
    pub fn load(config: &ModelConfig, weights: &dyn WeightSource) -> Result<Self> {
        let (c, v) = (config.hidden_size, config.vocab_size);
        let embed_tokens = weights.get("model.embed_tokens.weight", &[v, c])?;
        let layers = (0..config.num_hidden_layers)
            .map(|layer| DecoderLayer::load(config, weights, layer))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(weights, "model.norm", c, config.rms_norm_eps)?;
        // Some tied checkpoints still ship lm_head.weight; untied ones must.
        let lm_head = if config.tie_word_embeddings && !weights.contains("lm_head.weight") {
            None
        } else {
            Some(Linear::load(weights, "lm_head", c, v, false)?)
        };
        let rope = RotaryEmbedding::new(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            &config.rope_scaling,
            weights.dtype(),
            weights.device(),
        )?;
        Ok(Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &oxtune_tensor::Device {
        self.embed_tokens.device()
    }

    /// The dtype of the weights (and of activations and the KV cache).
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// Every linear layer under its Hugging Face module name (`model.layers.0.self_attn.q_proj`,
    /// …, `lm_head` when untied), in checkpoint order.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (index, layer) in self.layers.iter_mut().enumerate() {
            let prefix = format!("model.layers.{index}");
            for (name, linear) in block_parts(&mut layer.self_attn, &mut layer.mlp).0 {
                out.push((format!("{prefix}.{name}"), linear));
            }
        }
        if let Some(head) = &mut self.lm_head {
            out.push(("lm_head".to_owned(), head));
        }
        out
    }

    /// Every weight tensor under its checkpoint name (`model.norm.weight`, …), for full
    /// fine-tuning (replace each by a trainable copy) and for saving.
    pub fn parameters_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out: Vec<(String, &mut Tensor)> = vec![(
            "model.embed_tokens.weight".to_owned(),
            &mut self.embed_tokens,
        )];
        for (index, layer) in self.layers.iter_mut().enumerate() {
            let prefix = format!("model.layers.{index}");
            let DecoderLayer {
                input_layernorm,
                self_attn,
                post_attention_layernorm,
                mlp,
            } = layer;
            out.push((
                format!("{prefix}.input_layernorm.weight"),
                input_layernorm.weight_mut(),
            ));
            out.push((
                format!("{prefix}.post_attention_layernorm.weight"),
                post_attention_layernorm.weight_mut(),
            ));
            let (linears, norms) = block_parts(self_attn, mlp);
            for (name, norm) in norms {
                out.push((format!("{prefix}.{name}.weight"), norm.weight_mut()));
            }
            for (name, linear) in linears {
                let (weight, bias) = linear.tensors_mut();
                out.push((format!("{prefix}.{name}.weight"), weight));
                if let Some(bias) = bias {
                    out.push((format!("{prefix}.{name}.bias"), bias));
                }
            }
        }
        out.push(("model.norm.weight".to_owned(), self.norm.weight_mut()));
        if let Some(head) = &mut self.lm_head {
            out.push(("lm_head.weight".to_owned(), head.tensors_mut().0));
        }
        out
    }

    /// A fresh, empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Final hidden states after the last norm: input_ids (b, t) -> (b, t, c). The tokens
    /// are placed after those already in `cache`, which grows by t.
    pub fn forward_hidden(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let t = input_ids.dim(1)?;
        let past = cache.len();
        let (cos, sin) = self.rope.tables(past, t)?;
        let window = self.config.sliding_window;
        let mask = if t > 1 || window.is_some_and(|w| past + t > w) {
            Some(ops::causal_mask(
                t,
                past,
                window,
                DType::F32,
                input_ids.device(),
            )?)
        } else {
            None
        };
        let hidden = self.run_layers(
            input_ids,
            &mut AttentionContext {
                cos,
                sin,
                mask,
                segments: None,
                cache: Some(&mut *cache),
            },
        )?;
        cache.len += t;
        Ok(hidden)
    }

    /// Final hidden states of a training batch (after the last norm): (b, t) -> (b, t, c).
    pub fn hidden_batch(&self, input_ids: &Tensor, layout: &BatchLayout) -> Result<Tensor> {
        self.run_layers(input_ids, &mut self.batch_context(input_ids, layout)?)
    }

    /// Logits of a training batch without a cache: input_ids (b, t) -> (b, t, v), with each
    /// token's position and visibility given by `layout` (packed samples never see each other).
    pub fn forward_batch(&self, input_ids: &Tensor, layout: &BatchLayout) -> Result<Tensor> {
        self.lm_head(&self.hidden_batch(input_ids, layout)?)
    }

    /// Forward and backward of a training batch, with the LM head and the loss computed
    /// `pass.loss_chunk_rows` token rows at a time: each chunk's logits (rows, v) exist only
    /// while its loss and gradients are computed, so the full (b, t, v) logits — and their f32
    /// copy and gradient — are never materialised.
    ///
    /// `loss(logits, rows)` turns the logits of the flattened token rows `rows` (row
    /// `r` = batch row `r / t`, position `r % t`) into a scalar; the batch loss is the sum over
    /// chunks. With `pass.checkpoint`, activations are checkpointed per decoder block: the
    /// forward keeps only each block's input (every block runs on a detached copy), and the
    /// backward re-runs each block, last to first, on its input as a fresh variable and
    /// backpropagates `sum(output * grad_output)`.
    ///
    /// The gradients equal those of `loss(forward_batch(..)).backward()`. Returns the loss and
    /// the gradients.
    pub fn forward_backward(
        &self,
        input_ids: &Tensor,
        layout: &BatchLayout,
        pass: TrainingPass,
        loss: impl Fn(&Tensor, std::ops::Range<usize>) -> Result<Tensor>,
    ) -> Result<(Tensor, GradStore)> {
        let (b, t) = input_ids.dims2()?;
        let c = self.config.hidden_size;
        let mut context = self.batch_context(input_ids, layout)?;
        let embedded = ops::embedding(&self.embed_tokens, input_ids)?.reshape((b, t, c))?;

        // 1. Blocks: with checkpointing each runs on a detached input; without, one graph.
        let mut block_inputs = Vec::with_capacity(self.layers.len());
        let mut xs = if pass.checkpoint {
            embedded.detach()
        } else {
            embedded.clone()
        };
        for (index, layer) in self.layers.iter().enumerate() {
            if pass.checkpoint {
                block_inputs.push(xs.clone());
                xs = layer.forward(&xs, &mut context, index)?.detach();
            } else {
                xs = layer.forward(&xs, &mut context, index)?;
            }
        }
        let top = Var::from_tensor(&xs.detach())?;
        let hidden = self.norm.forward(top.as_tensor())?;

        // 2. Head and loss chunk by chunk, each backpropagated to the (detached) hidden states.
        let rows = b * t;
        let flat = hidden.detach().reshape((rows, c))?;
        let chunk = pass.loss_chunk_rows.max(1);
        let (total, mut grads, grad_hidden) = match self.plain_head_weight() {
            Some(weight) => Self::plain_head_loss(&flat, weight, chunk, &loss)?,
            None => self.head_loss(&flat, chunk, &loss)?,
        };
        let grad_hidden = grad_hidden.reshape((b, t, c))?;

        // 3. Through the final norm to the last block's output, then the blocks.
        grads.extend((hidden * grad_hidden)?.sum_all()?.backward()?)?;
        let mut grad_output = take_grad(&mut grads, top.as_tensor())?;
        if pass.checkpoint {
            for (index, layer) in self.layers.iter().enumerate().rev() {
                let input = Var::from_tensor(&block_inputs[index])?;
                let output = layer.forward(input.as_tensor(), &mut context, index)?;
                let mut block_grads = (output * &grad_output)?.sum_all()?.backward()?;
                grad_output = take_grad(&mut block_grads, input.as_tensor())?;
                grads.extend(block_grads)?;
            }
            if embedded.track_op() {
                grads.extend((embedded * grad_output)?.sum_all()?.backward()?)?;
            }
        } else if xs.track_op() {
            grads.extend((xs * grad_output)?.sum_all()?.backward()?)?;
        }
        Ok((total, grads))
    }

    /// The LM head's weight when the head is a plain product (tied to the embedding, or a
    /// linear layer without bias or adapter).
    fn plain_head_weight(&self) -> Option<&Tensor> {
        match &self.lm_head {
            None => Some(&self.embed_tokens),
            Some(head) if head.adapter.is_none() && head.bias.is_none() => Some(&head.weight),
            Some(_) => None,
        }
    }

    /// The summed loss over `flat` (rows, c) chunk by chunk, the gradients it leaves
    /// (the head's weight's when it is trainable) and the gradient of `flat`, for a head
    /// that is the product with `weight` (v, c). Each chunk's logits are a leaf: its input
    /// gradient is one product written in place, and a trainable weight's gradient is one f32
    /// sum that each chunk's product is added into ([`ops::add_transposed_product`]), instead
    /// of a (v, c) gradient per chunk, transposed and added up.
    fn plain_head_loss(
        flat: &Tensor,
        weight: &Tensor,
        chunk: usize,
        loss: &impl Fn(&Tensor, std::ops::Range<usize>) -> Result<Tensor>,
    ) -> Result<(Tensor, GradStore, Tensor)> {
        let (rows, c) = flat.dims2()?;
        let vocab = weight.dim(0)?;
        let frozen = weight.detach();
        let grad_flat = Tensor::zeros((rows, c), flat.dtype(), flat.device())?;
        let mut grad_weight = if weight.track_op() {
            Some(Tensor::zeros((vocab, c), DType::F32, flat.device())?)
        } else {
            None
        };
        let mut summed = ChunkSum::default();
        for start in (0..rows).step_by(chunk) {
            let end = (start + chunk).min(rows);
            let rows_in = flat.narrow(0, start, end - start)?;
            let logits = Var::from_tensor(&rows_in.matmul(&frozen.t()?)?)?;
            let value = loss(logits.as_tensor(), start..end)?;
            let mut chunk_grads = value.backward()?;
            let grad = take_grad(&mut chunk_grads, logits.as_tensor())?.to_dtype(flat.dtype())?;
            grad_flat.slice_set(&grad.matmul(&frozen)?, 0, start)?;
            if let Some(sum) = grad_weight.take() {
                grad_weight = Some(ops::add_transposed_product(sum, &grad, &rows_in)?);
            }
            summed.add(&value, chunk_grads)?;
        }
        let (total, mut grads) = summed.finish()?;
        if let Some(sum) = grad_weight {
            // The chunks' logits were leaves, so no other gradient of the weight exists yet.
            grads.insert(weight, sum.to_dtype(weight.dtype())?);
        }
        Ok((total, grads, grad_flat))
    }

    /// [`Self::plain_head_loss`] for any head: each chunk backpropagated through the head.
    fn head_loss(
        &self,
        flat: &Tensor,
        chunk: usize,
        loss: &impl Fn(&Tensor, std::ops::Range<usize>) -> Result<Tensor>,
    ) -> Result<(Tensor, GradStore, Tensor)> {
        let rows = flat.dim(0)?;
        let flat = Var::from_tensor(flat)?;
        let mut summed = ChunkSum::default();
        for start in (0..rows).step_by(chunk) {
            let end = (start + chunk).min(rows);
            let logits = self.lm_head(&flat.as_tensor().narrow(0, start, end - start)?)?;
            let value = loss(&logits, start..end)?;
            let chunk_grads = value.backward()?;
            summed.add(&value, chunk_grads)?;
        }
        let (total, mut grads) = summed.finish()?;
        let grad_flat = take_grad(&mut grads, flat.as_tensor())?;
        Ok((total, grads, grad_flat))
    }

    /// RoPE tables and mask of a training batch.
    fn batch_context(
        &self,
        input_ids: &Tensor,
        layout: &BatchLayout,
    ) -> Result<AttentionContext<'static>> {
        let (b, t) = input_ids.dims2()?;
        let half = self.config.head_dim / 2;
        let positions = layout.positions.flatten_all()?;
        let context = self.rope.cos.dim(0)?;
        let last: u32 = positions.max(0)?.to_scalar()?;
        if last as usize >= context {
            return Err(oxtune_tensor::candle::Error::Msg(format!(
                "a sample of {} tokens exceeds the model's context of {context} tokens\nhint: lower max_length",
                last + 1
            ))
            .into());
        }
        let cos = self
            .rope
            .cos
            .index_select(&positions, 0)?
            .reshape((b, t, half))?;
        let sin = self
            .rope
            .sin
            .index_select(&positions, 0)?
            .reshape((b, t, half))?;
        Ok(AttentionContext {
            cos,
            sin,
            segments: layout.mask.is_none().then(|| layout.segments.clone()),
            mask: layout.mask.clone(),
            cache: None,
        })
    }

    /// Embedding, every decoder layer, final norm: (b, t) -> (b, t, c).
    fn run_layers(&self, input_ids: &Tensor, context: &mut AttentionContext<'_>) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let c = self.config.hidden_size;
        let mut xs = ops::embedding(&self.embed_tokens, input_ids)?.reshape((b, t, c))?;
        for (index, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, context, index)?;
        }
        self.norm.forward(&xs)
    }

    /// One serving step: every sequence's new tokens (`input_ids`, concatenated in the order
    /// of `sequences`) run as one batch over the paged `cache`, whose slots receive their
    /// keys/values. Returns f32 logits at each sequence's last new token: (sequences, v).
    pub fn forward_paged(
        &self,
        input_ids: &[u32],
        sequences: &[PagedSequence],
        cache: &PagedKvCache,
    ) -> Result<Tensor> {
        let t: usize = sequences.iter().map(|s| s.num_new_tokens).sum();
        if t != input_ids.len() || sequences.is_empty() {
            return Err(oxtune_tensor::candle::Error::Msg(format!(
                "a paged step of {} sequences with {t} new tokens got {} input ids",
                sequences.len(),
                input_ids.len()
            ))
            .into());
        }
        let device = self.device();
        let step = PagedStep::new(
            sequences,
            &self.rope.cos,
            &self.rope.sin,
            self.config.sliding_window,
            device,
        )?;
        let ids = Tensor::new(input_ids, device)?;
        // Decode-only steps need every row; otherwise each sequence's last new token.
        let last = if t == sequences.len() {
            None
        } else {
            let mut last = Vec::with_capacity(sequences.len());
            let mut end = 0u32;
            for sequence in sequences {
                end += u32::try_from(sequence.num_new_tokens)
                    .map_err(oxtune_tensor::candle::Error::wrap)?;
                last.push(end - 1);
            }
            Some(Tensor::new(last.as_slice(), device)?)
        };
        let head_routing = AdapterRouting::of_last_tokens(sequences);
        self.paged_logits(&ids, &step, cache, last.as_ref(), &head_routing)
    }

    /// f32 logits of a serving step at rows `last` of the flattened batch (every row when
    /// `None`): (rows, v). `ids` (t,) u32 are the step's new tokens, `head_routing` the
    /// adapters of the rows kept. Issues no host-device copy, so that a recorded CUDA graph
    /// can replay it ([`crate::decode_graph`]).
    pub(crate) fn paged_logits(
        &self,
        ids: &Tensor,
        step: &PagedStep,
        cache: &PagedKvCache,
        last: Option<&Tensor>,
        head_routing: &AdapterRouting,
    ) -> Result<Tensor> {
        let mut xs = ops::embedding(&self.embed_tokens, ids)?.unsqueeze(0)?;
        let mut pending = None;
        for (index, layer) in self.layers.iter().enumerate() {
            let (stream, mlp) = layer.forward_paged(&xs, pending.as_ref(), step, cache, index)?;
            (xs, pending) = (stream, Some(mlp));
        }
        // (1, t, c) -> (rows, c), the last block's MLP output added with the final norm
        let rows = |x: Tensor| -> Result<Tensor> {
            let x = x.squeeze(0)?;
            Ok(match last {
                Some(rows) => x.index_select(rows, 0)?,
                None => x,
            })
        };
        let xs = rows(xs)?;
        let hidden = match pending {
            Some(mlp) => self.norm.forward_residual(&xs, &rows(mlp)?)?.1,
            None => self.norm.forward(&xs)?,
        };
        let logits = match &self.lm_head {
            Some(head) => head.forward_serving(&hidden.unsqueeze(0)?, head_routing)?,
            None => ops::linear_rows(&hidden.unsqueeze(0)?, &[&self.embed_tokens], &[None])?,
        };
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?)
    }

    /// The RoPE tables (cos, sin) over every position the model handles: (positions, d/2).
    pub(crate) fn rope_tables(&self) -> (&Tensor, &Tensor) {
        (&self.rope.cos, &self.rope.sin)
    }

    /// Positions the model handles (the length of its RoPE tables).
    pub fn max_positions(&self) -> usize {
        self.rope.cos.dims()[0]
    }

    /// Logits for hidden states: (.., c) -> (.., v).
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => Ok(hidden.broadcast_matmul(&self.embed_tokens.t()?)?),
        }
    }

    /// Logits at every position: input_ids (b, t) -> (b, t, v).
    pub fn forward(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, cache)?;
        self.lm_head(&hidden)
    }

    /// Logits at the last position only, in f32: input_ids (b, t) -> (b, v).
    pub fn forward_last(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, cache)?;
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        Ok(self.lm_head(&last)?.to_dtype(DType::F32)?)
    }
}

/// The loss summed over a batch's chunks, and the gradients their backward passes left.
#[derive(Default)]
struct ChunkSum(Option<(Tensor, GradStore)>);

impl ChunkSum {
    fn add(&mut self, value: &Tensor, grads: GradStore) -> Result<()> {
        let value = value.detach();
        self.0 = Some(match self.0.take() {
            Some((total, mut sum)) => {
                sum.extend(grads)?;
                ((total + value)?, sum)
            }
            None => (value, grads),
        });
        Ok(())
    }

    fn finish(self) -> Result<(Tensor, GradStore)> {
        self.0.ok_or_else(|| {
            oxtune_tensor::candle::Error::Msg("a training batch without tokens".into()).into()
        })
    }
}

/// Removes and returns the gradient of `tensor`, detached: candle leaves a leaf variable's
/// gradient attached to the graph that computed it (e.g. `grad_logits @ W`), and feeding it
/// to the next backward would add a second gradient to `W`. A block whose input got no
/// gradient means the graph is broken, which must not pass silently.
fn take_grad(grads: &mut GradStore, tensor: &Tensor) -> Result<Tensor> {
    grads
        .remove(tensor)
        .map(|grad| grad.detach())
        .ok_or_else(|| {
            oxtune_tensor::candle::Error::Msg(
                "activation checkpointing: no gradient reached a block input".into(),
            )
            .into()
        })
}
