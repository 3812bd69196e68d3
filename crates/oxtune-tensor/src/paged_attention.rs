//! Attention of query rows over keys and values read straight from a paged KV cache.
//!
//! A paged cache (vLLM's layout) keeps every sequence's keys and values in two pools of
//! slots, `(slots, kv_h * d)` each; a sequence's slot table lists the slot of each of its
//! positions. One serving step attends `n` query rows, each belonging to one sequence: the
//! new tokens of a prefill chunk are consecutive rows of one sequence that share its table
//! and see growing prefixes of it (causal), a decode row sees its sequence's whole table.
//! [`PagedContext`] describes that once per step (two small u32 tensors), and
//! [`paged_attention`] computes every row's attention in one call: on CUDA one kernel
//! (`kernels/paged_attn.cu`) that reads each context key and value once per kv head, never
//! materialising the gathered, repeated context, the scores or a mask; elsewhere
//! [`paged_attention_reference`] (gather, repeat, f32 softmax), which is also the reference
//! the GPU tests compare against.
//!
//! Inference only: there is no backward, and [`paged_attention`] refuses inputs that track
//! gradients.

use candle_core::{DType, Device, Result, Tensor, bail};

/// Which keys each query row of [`paged_attention`] sees.
///
/// Row `i` reads the slot table starting at `slots[rows[i][0]]` and sees positions
/// `lo..rows[i][1]` of it, where `lo = rows[i][1] - sliding_window` when a window is set and
/// shorter than the row's context, else 0: its slots are `slots[rows[i][0] + lo ..
/// rows[i][0] + rows[i][1]]`, in position order. Rows of one sequence share one table. A
/// row that sees no keys (context length 0) gets zeros.
#[derive(Clone, Debug)]
pub struct PagedContext {
    /// `(total,)` u32: the sequences' slot tables, concatenated.
    pub slots: Tensor,
    /// `(n, 2)` u32: per query row, the offset of its table in `slots` and its context length
    /// (its own position + 1 for a causal row).
    pub rows: Tensor,
    /// The largest context length of `rows`, read on the host to size the launch (how many
    /// blocks split a row's context). A hint only: every row is attended in full whatever its
    /// length, and a wrong hint costs speed, not correctness. Keeping it fixed (e.g. at the
    /// model's context length) keeps the launch fixed, as a recorded CUDA graph needs.
    pub max_context: usize,
    /// A row sees only its last `sliding_window` positions (Mistral); `None`: all of them.
    pub sliding_window: Option<usize>,
}

impl PagedContext {
    /// The context of a step from host data: for each sequence, in the order of the query
    /// rows, its slot table (the slot of each position from 0) and the positions of its query
    /// rows, which are consecutive rows of `q`. The row at position `p` sees positions
    /// `0..=p` (the last `sliding_window` of them).
    pub fn from_sequences<'a>(
        sequences: impl IntoIterator<Item = (&'a [u32], std::ops::Range<usize>)>,
        sliding_window: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let mut slots = Vec::new();
        let mut rows = Vec::new();
        let mut max_context = 0;
        for (index, (table, positions)) in sequences.into_iter().enumerate() {
            if positions.end > table.len() {
                bail!(
                    "paged_attention: sequence {index} has query rows at positions {positions:?} \
                     but a slot table of {} positions",
                    table.len()
                );
            }
            let offset = to_u32(slots.len(), "the slot tables' total length")?;
            slots.extend_from_slice(&table[..positions.end]);
            for position in positions {
                rows.push([offset, to_u32(position + 1, "a context length")?]);
                max_context = max_context.max(position + 1);
            }
        }
        let total = slots.len();
        Ok(Self {
            slots: Tensor::from_vec(slots, total, device)?,
            rows: Tensor::from_vec(rows.concat(), (rows.len(), 2), device)?,
            max_context,
            sliding_window,
        })
    }

    /// The first position row `i` of context length `len` sees.
    fn first_visible(&self, len: usize) -> usize {
        self.sliding_window
            .filter(|&window| window < len)
            .map_or(0, |window| len - window)
    }
}

fn to_u32(value: usize, what: &str) -> Result<u32> {
    u32::try_from(value)
        .or_else(|_| bail!("paged_attention: {what} {value} does not fit a u32 slot index"))
}

/// The dimensions of a paged attention call: rows `n`, heads `h`, kv heads `kv_h`, head
/// size `d`, pool slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PagedDims {
    pub(crate) rows: usize,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) pool_slots: usize,
    pub(crate) total_slots: usize,
}

/// Checks the shapes and dtypes of a call (the same checks on every device).
pub(crate) fn check(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    context: &PagedContext,
) -> Result<PagedDims> {
    let op = "paged_attention";
    let (rows, heads, head_dim) = match q.dims() {
        &[n, h, d] => (n, h, d),
        other => bail!("{op}: q {other:?}, expected (n, h, d)"),
    };
    let (pool_slots, width) = match k_pool.dims() {
        &[slots, width] => (slots, width),
        other => bail!("{op}: k_pool {other:?}, expected (slots, kv_h * d)"),
    };
    if v_pool.dims() != k_pool.dims() {
        bail!(
            "{op}: v_pool {:?} differs from k_pool {:?}",
            v_pool.dims(),
            k_pool.dims()
        );
    }
    if head_dim == 0 || width % head_dim != 0 || width == 0 {
        bail!(
            "{op}: pools of width {width} for heads of {head_dim} (q {:?})",
            q.dims()
        );
    }
    let kv_heads = width / head_dim;
    if heads % kv_heads != 0 {
        bail!(
            "{op}: {heads} query heads (q {:?}) do not split evenly over {kv_heads} kv heads \
             (pools {:?})",
            q.dims(),
            k_pool.dims()
        );
    }
    if k_pool.dtype() != q.dtype() || v_pool.dtype() != q.dtype() {
        bail!(
            "{op}: q {:?}, k_pool {:?} and v_pool {:?} differ in dtype",
            q.dtype(),
            k_pool.dtype(),
            v_pool.dtype()
        );
    }
    let total_slots = match context.slots.dims() {
        &[total] => total,
        other => bail!("{op}: slots {other:?}, expected (total,)"),
    };
    if context.rows.dims() != [rows, 2] {
        bail!(
            "{op}: rows {:?} for q {:?}, expected ({rows}, 2)",
            context.rows.dims(),
            q.dims()
        );
    }
    if context.slots.dtype() != DType::U32 || context.rows.dtype() != DType::U32 {
        bail!(
            "{op}: slots ({:?}) and rows ({:?}) must be u32",
            context.slots.dtype(),
            context.rows.dtype()
        );
    }
    for (what, tensor) in [
        ("k_pool", k_pool),
        ("v_pool", v_pool),
        ("slots", &context.slots),
        ("rows", &context.rows),
    ] {
        if !tensor.device().same_device(q.device()) {
            bail!(
                "{op}: {what} is on {:?}, q on {:?}",
                tensor.device(),
                q.device()
            );
        }
    }
    if context.sliding_window == Some(0) {
        bail!("{op}: a sliding window of 0 positions sees nothing");
    }
    Ok(PagedDims {
        rows,
        heads,
        kv_heads,
        head_dim,
        pool_slots,
        total_slots,
    })
}

/// Attention of `n` query rows over keys and values read from paged pools: for each row
/// and head, softmax(scale * q . k) . v over the row's visible keys ([`PagedContext`]),
/// query head `j` using kv head `j / (h / kv_h)` (grouped-query attention).
///
/// `q`: (n, h, d); `k_pool`, `v_pool`: (slots, kv_h * d), the layer's cache pools -> (n, h,
/// d) in the dtype of `q`. Scores, softmax and the weighted sum are computed in f32.
///
/// On CUDA (f32, bf16, f16; head_dim <= 256) one kernel, or two when a row's context is split
/// over several blocks (`kernels/paged_attn.cu`); a slot index outside the pool, or a row
/// whose table runs past `slots`, turns that row into NaN there (the kernel cannot report an
/// error, and the host does not read device indices back). Elsewhere
/// [`paged_attention_reference`], which reads `slots` and `rows` back to the host.
/// Inference only: an input that tracks gradients is refused.
pub fn paged_attention(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    context: &PagedContext,
    scale: f64,
) -> Result<Tensor> {
    for (what, tensor) in [("q", q), ("k_pool", k_pool), ("v_pool", v_pool)] {
        if tensor.track_op() {
            bail!(
                "paged_attention: {what} {:?} tracks gradients, but the op has no backward \
                 (inference only)\nhint: detach it, or use the training attention",
                tensor.dims()
            );
        }
    }
    #[cfg(feature = "cuda")]
    if crate::cuda::applies(&[q, k_pool, v_pool])
        && q.dim(2)? <= crate::cuda::PAGED_ATTENTION_MAX_HEAD_DIM
    {
        return crate::cuda::paged_attention(q, k_pool, v_pool, context, scale);
    }
    paged_attention_reference(q, k_pool, v_pool, context, scale)
}

/// The plain composition [`paged_attention`] stands for, row by row: gather the row's
/// visible keys and values, repeat the kv heads, f32 scores (f64 for f64 inputs), softmax,
/// cast the probabilities to the dtype of `v_pool`, multiply. Reads `slots` and `rows` back to
/// the host; usable on any device, and differentiable.
pub fn paged_attention_reference(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    context: &PagedContext,
    scale: f64,
) -> Result<Tensor> {
    let dims = check(q, k_pool, v_pool, context)?;
    let PagedDims {
        rows: n,
        heads: h,
        kv_heads: kv_h,
        head_dim: d,
        pool_slots,
        total_slots,
    } = dims;
    let internal = if q.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let slots: Vec<u32> = context.slots.to_vec1()?;
    let rows: Vec<Vec<u32>> = context.rows.to_vec2()?;
    let device = q.device();
    let mut outputs = Vec::with_capacity(n);
    for (i, row) in rows.iter().enumerate() {
        let (offset, len) = (row[0] as usize, row[1] as usize);
        if offset + len > total_slots {
            bail!(
                "paged_attention: row {i} reads slots {offset}..{} of {total_slots}",
                offset + len
            );
        }
        let visible = &slots[offset + context.first_visible(len)..offset + len];
        if let Some(bad) = visible.iter().find(|&&slot| slot as usize >= pool_slots) {
            bail!("paged_attention: row {i} reads slot {bad} of a pool of {pool_slots}");
        }
        if visible.is_empty() {
            outputs.push(Tensor::zeros((h, d), q.dtype(), device)?);
            continue;
        }
        let l = visible.len();
        let index = Tensor::new(visible, device)?;
        // (l, kv_h * d) -> (1, kv_h, l, d) -> (h, l, d)
        let per_head = |pool: &Tensor| -> Result<Tensor> {
            let gathered = pool
                .index_select(&index, 0)?
                .reshape((1, l, kv_h, d))?
                .transpose(1, 2)?;
            crate::ops::repeat_kv(&gathered, h / kv_h)?
                .squeeze(0)?
                .contiguous()
        };
        let (keys, values) = (per_head(k_pool)?, per_head(v_pool)?);
        // (h, 1, d) x (h, d, l) -> (h, 1, l)
        let query = q.get(i)?.unsqueeze(1)?.to_dtype(internal)?;
        let scores = (query.matmul(&keys.to_dtype(internal)?.t()?)? * scale)?;
        let probs = crate::ops::softmax_last_dim(&scores)?.to_dtype(values.dtype())?;
        outputs.push(probs.matmul(&values)?.squeeze(1)?.to_dtype(q.dtype())?);
    }
    if outputs.is_empty() {
        return Tensor::zeros((0, h, d), q.dtype(), device);
    }
    Tensor::stack(&outputs, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attention of one row written out as loops over f64 values.
    fn naive_row(
        q: &[Vec<f64>],    // (h, d)
        keys: &[Vec<f64>], // (visible, kv_h * d)
        values: &[Vec<f64>],
        kv_heads: usize,
        scale: f64,
    ) -> Vec<Vec<f64>> {
        let (h, d) = (q.len(), q[0].len());
        let per_kv = h / kv_heads;
        (0..h)
            .map(|head| {
                let kv = head / per_kv;
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|k| scale * (0..d).map(|e| q[head][e] * k[kv * d + e]).sum::<f64>())
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                (0..d)
                    .map(|e| {
                        weights
                            .iter()
                            .zip(values)
                            .map(|(w, v)| w * v[kv * d + e])
                            .sum::<f64>()
                            / sum
                    })
                    .collect()
            })
            .collect()
    }

    fn random(shape: (usize, usize), seed: u64) -> Vec<Vec<f64>> {
        // a small deterministic generator: values in [-2, 2)
        let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (0..shape.0)
            .map(|_| {
                (0..shape.1)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1_442_695_040_888_963_407);
                        ((state >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
                    })
                    .collect()
            })
            .collect()
    }

    /// Sequences (slot table, query positions) over a pool, with scrambled slots, rows of one
    /// prefill chunk sharing a table, ragged context lengths; checked against [`naive_row`].
    fn check_against_loops(
        heads: usize,
        kv_heads: usize,
        sliding_window: Option<usize>,
    ) -> Result<()> {
        let d = 8;
        let pool_slots = 97;
        let device = Device::Cpu;
        let k_pool = random((pool_slots, kv_heads * d), 1);
        let v_pool = random((pool_slots, kv_heads * d), 2);
        // each table: positions -> slots, scrambled across the pool
        let table = |start: usize, len: usize| -> Vec<u32> {
            (0..len)
                .map(|p| u32::try_from((start + p * 37) % pool_slots).unwrap_or(0))
                .collect()
        };
        let tables = [table(0, 1), table(5, 23), table(11, 9), table(3, 40)];
        // decode rows (last position), a prefill chunk of 6 rows, a row mid-table
        let sequences: Vec<(&[u32], std::ops::Range<usize>)> = vec![
            (&tables[0], 0..1),
            (&tables[1], 17..23),
            (&tables[2], 8..9),
            (&tables[3], 20..21),
        ];
        let context = PagedContext::from_sequences(sequences.clone(), sliding_window, &device)?;
        let n = 1 + 6 + 1 + 1;
        assert_eq!(context.rows.dims(), [n, 2]);
        assert_eq!(context.max_context, 23);
        let q = random((n, heads * d), 3);
        let to_tensor = |rows: &[Vec<f64>], shape: &[usize]| -> Result<Tensor> {
            Tensor::from_vec(rows.concat(), shape, &device)
        };
        let scale = 0.3;
        let got = paged_attention_reference(
            &to_tensor(&q, &[n, heads, d])?,
            &to_tensor(&k_pool, &[pool_slots, kv_heads * d])?,
            &to_tensor(&v_pool, &[pool_slots, kv_heads * d])?,
            &context,
            scale,
        )?;
        // f32 inputs: the same call in f32 (the dtype the models serve the CPU in)
        let got_f32 = paged_attention(
            &to_tensor(&q, &[n, heads, d])?.to_dtype(DType::F32)?,
            &to_tensor(&k_pool, &[pool_slots, kv_heads * d])?.to_dtype(DType::F32)?,
            &to_tensor(&v_pool, &[pool_slots, kv_heads * d])?.to_dtype(DType::F32)?,
            &context,
            scale,
        )?;
        assert_eq!(got_f32.dtype(), DType::F32);
        let got: Vec<Vec<Vec<f64>>> = got.to_vec3()?;
        let got_f32: Vec<Vec<Vec<f32>>> = got_f32.to_vec3()?;
        let mut row = 0;
        for (table, positions) in sequences {
            for position in positions {
                let len = position + 1;
                let first = sliding_window.map_or(0, |w| len.saturating_sub(w));
                let visible = &table[first..len];
                let keys: Vec<Vec<f64>> = visible
                    .iter()
                    .map(|&s| k_pool[s as usize].clone())
                    .collect();
                let values: Vec<Vec<f64>> = visible
                    .iter()
                    .map(|&s| v_pool[s as usize].clone())
                    .collect();
                let query: Vec<Vec<f64>> = q[row].chunks(d).map(<[f64]>::to_vec).collect();
                let expected = naive_row(&query, &keys, &values, kv_heads, scale);
                for head in 0..heads {
                    for e in 0..d {
                        let (want, have) = (expected[head][e], got[row][head][e]);
                        assert!(
                            (want - have).abs() < 1e-12,
                            "h {heads}, kv_h {kv_heads}, window {sliding_window:?}: row {row} \
                             (position {position}) head {head} [{e}]: {have} vs {want}"
                        );
                        let have = f64::from(got_f32[row][head][e]);
                        assert!(
                            (want - have).abs() < 1e-5,
                            "f32, h {heads}, kv_h {kv_heads}: row {row} head {head} [{e}]: \
                             {have} vs {want}"
                        );
                    }
                }
                row += 1;
            }
        }
        Ok(())
    }

    #[test]
    fn reference_matches_loops_with_grouped_heads_and_shared_tables() -> Result<()> {
        for (heads, kv_heads) in [(1, 1), (2, 1), (4, 2), (8, 2), (6, 3)] {
            check_against_loops(heads, kv_heads, None)?;
        }
        Ok(())
    }

    #[test]
    fn reference_matches_loops_with_a_sliding_window() -> Result<()> {
        check_against_loops(4, 2, Some(5))?;
        check_against_loops(2, 2, Some(1))
    }

    #[test]
    fn a_row_without_keys_is_zeros() -> Result<()> {
        let device = Device::Cpu;
        let context = PagedContext {
            slots: Tensor::new(&[0u32, 1], &device)?,
            rows: Tensor::new(&[[0u32, 0], [0, 2]], &device)?,
            max_context: 2,
            sliding_window: None,
        };
        let q = Tensor::ones((2, 2, 4), DType::F32, &device)?;
        let pool = Tensor::ones((3, 4), DType::F32, &device)?;
        let out = paged_attention(&q, &pool, &pool, &context, 0.5)?.to_vec3::<f32>()?;
        assert_eq!(out[0], [[0.0; 4], [0.0; 4]]);
        assert_eq!(out[1], [[1.0; 4], [1.0; 4]]);
        Ok(())
    }

    #[test]
    fn bad_inputs_are_refused_with_their_shapes() -> Result<()> {
        let device = Device::Cpu;
        let context = PagedContext::from_sequences([(&[0u32, 2][..], 1..2)], None, &device)?;
        let q = Tensor::zeros((1, 3, 4), DType::F32, &device)?;
        let pool = Tensor::zeros((3, 8), DType::F32, &device)?;
        let message =
            |result: Result<Tensor>| result.err().map(|e| e.to_string()).unwrap_or_default();
        let error = message(paged_attention(&q, &pool, &pool, &context, 1.0));
        assert!(error.contains("3 query heads"), "{error}");
        let q = Tensor::zeros((2, 2, 4), DType::F32, &device)?;
        let error = message(paged_attention(&q, &pool, &pool, &context, 1.0));
        assert!(error.contains("expected (2, 2)"), "{error}");
        let q = candle_core::Var::zeros((1, 2, 4), DType::F32, &device)?;
        let error = message(paged_attention(q.as_tensor(), &pool, &pool, &context, 1.0));
        assert!(error.contains("inference only"), "{error}");
        let small = Tensor::zeros((2, 8), DType::F32, &device)?;
        let q = Tensor::zeros((1, 2, 4), DType::F32, &device)?;
        let error = message(paged_attention(&q, &small, &small, &context, 1.0));
        assert!(error.contains("slot 2 of a pool of 2"), "{error}");
        let error = message(
            PagedContext::from_sequences([(&[0u32][..], 0..2)], None, &device).map(|c| c.rows),
        );
        assert!(error.contains("slot table of 1"), "{error}");
        Ok(())
    }
}
