//! Embedding lookup with a fast, deterministic backward (`kernels/embedding.cu`), for
//! [`crate::ops::embedding`].
//!
//! candle's backward of `weight.index_select(ids, 0)` is `index_add`, which its CUDA backend
//! launches as ONE block looping over every (id, column): 4.3 ms per Qwen3-0.6B training step
//! (8192 ids x 1024 columns) on an H200. Here the forward is still candle's index_select
//! (called on the storages inside the op); the backward sorts the rows by (id, row) on the
//! device and gives each present id one block that sums its rows' gradients in row order:
//! - no host sync: the sort is a rank sort (each row counts the (id, row) keys below its own,
//!   integer atomics only), O(n^2) compares for n ids, all parallel (67M at 8192 ids, a few
//!   µs); chosen over a host sort (one device-to-host copy of the ids and a sync per step) and
//!   over a device radix sort (many more kernels) for its simplicity at training's n;
//! - deterministic: the f32 sum of each weight row runs over its rows in increasing row
//!   order, and each output element is written by one thread, so two runs give the same bits
//!   (the trainer's resume test relies on it);
//! - one block owns an id's whole run: a token repeated thousands of times (padding) is
//!   summed by one block, with 8 rows' loads in flight per thread.
//!
//! The op is a `CustomOp2` on (weight (vocab, hidden), ids (n,) u32): differentiable in the
//! weight only.
#![allow(
    unsafe_code,
    reason = "launching CUDA kernels and allocating their outputs is unsafe FFI; kept to the cuda module"
)]

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaView, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda::{CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, bail,
};

use super::launch::{KernelFloat, Module, expect_len, function, to_i32, to_u32};
use super::{no_cpu, view};

const EMBEDDING: Module = Module {
    name: "oxtune_embedding",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/embedding.ptx")),
};

/// Threads of the rank kernel's blocks (`RANK_THREADS`) and ids each block compares them
/// with (`RANK_TILE`).
const RANK_THREADS: usize = 256;
const RANK_TILE: usize = 1024;

/// Whether [`embedding`] takes these inputs: an f32/bf16/f16 (vocab, hidden) weight on a CUDA
/// device that tracks a gradient (otherwise the backward kernel is never needed and the
/// plain index_select serves), and u32 ids on the same device.
pub(crate) fn embedding_takes(weight: &Tensor, ids: &Tensor) -> bool {
    super::applies(&[weight])
        && weight.rank() == 2
        && weight.track_op()
        && ids.dtype() == DType::U32
        && ids.elem_count() > 0
        && ids.device().same_device(weight.device())
}

/// The rows of `weight` (vocab, hidden) at `ids` (any shape, u32): ids.shape + (hidden,), in
/// the weight's dtype; differentiable in the weight, whose gradient comes from the
/// deterministic backward kernels (ids >= vocab get nothing). CUDA only.
pub fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (_, hidden) = weight.dims2()?;
    if ids.dtype() != DType::U32 {
        bail!("embedding: ids are {:?}; expected u32", ids.dtype());
    }
    let flat = ids.flatten_all()?.contiguous()?;
    let rows = weight.contiguous()?.apply_op2(&flat, Embedding)?;
    let mut dims = ids.dims().to_vec();
    dims.push(hidden);
    rows.reshape(dims)
}

/// The gradient of [`embedding`]'s weight: (vocab, hidden) in the dtype of `grad`, row v the
/// sum (in f32, in row order) of the rows of `grad` (n, hidden) whose id (`ids` (n,) u32) is
/// v, zero where no id is v. Public for the GPU tests, which time it on its own.
pub fn embedding_backward(grad: &Tensor, ids: &Tensor, vocab: usize) -> Result<Tensor> {
    grad.contiguous()?.apply_op2_no_bwd(
        &ids.flatten_all()?.contiguous()?,
        &EmbeddingBackward { vocab },
    )
}

/// (weight, ids) -> weight[ids], by candle's index_select on the storages.
struct Embedding;

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "oxtune-embedding"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        weight: &CudaStorage,
        weight_layout: &Layout,
        ids: &CudaStorage,
        ids_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let [_, hidden] = *weight_layout.shape().dims() else {
            bail!(
                "{op}: weight {:?} is not (vocab, hidden)",
                weight_layout.shape()
            );
        };
        let [n] = *ids_layout.shape().dims() else {
            bail!("{op}: ids {:?} are not flat", ids_layout.shape());
        };
        let out = weight.index_select(ids, weight_layout, ids_layout, 0)?;
        Ok((out, Shape::from((n, hidden))))
    }

    fn bwd(
        &self,
        weight: &Tensor,
        ids: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let vocab = weight.dim(0)?;
        let dweight = embedding_backward(&grad.to_dtype(weight.dtype())?, ids, vocab)?;
        Ok((Some(dweight), None))
    }
}

/// (dy (n, hidden), ids (n,)) -> dweight (vocab, hidden).
struct EmbeddingBackward {
    vocab: usize,
}

impl CustomOp2 for EmbeddingBackward {
    fn name(&self) -> &'static str {
        "oxtune-embedding-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        grad: &CudaStorage,
        grad_layout: &Layout,
        ids: &CudaStorage,
        ids_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let [n, hidden] = *grad_layout.shape().dims() else {
            bail!("{op}: dy {:?} is not (n, hidden)", grad_layout.shape());
        };
        if ids_layout.shape().dims() != [n] {
            bail!(
                "{op}: ids {:?} for dy {:?}; expected ({n},)",
                ids_layout.shape(),
                grad_layout.shape()
            );
        }
        let ids = view(ids.as_cuda_slice::<u32>()?, ids_layout, op, "ids")?;
        let device = &grad.device;
        let vocab = self.vocab;
        let out = float_dispatch!(op, grad, |dy| backward(
            device,
            &view(dy, grad_layout, op, "dy")?,
            &ids,
            vocab,
            hidden
        ));
        Ok((out, Shape::from((vocab, hidden))))
    }
}

/// dweight (vocab, hidden) from dy (n, hidden) and ids (n,): rank, scatter, then the sums.
fn backward<T: KernelFloat + ValidAsZeroBits>(
    device: &CudaDevice,
    dy: &CudaView<'_, T>,
    ids: &CudaView<'_, u32>,
    vocab: usize,
    hidden: usize,
) -> Result<CudaSlice<T>> {
    let kernel = "embedding_bwd";
    let n = ids.len();
    expect_len(dy, n * hidden, "dy", kernel)?;
    let n_i32 = to_i32(n, "ids", kernel)?;
    let hidden_i32 = to_i32(hidden, "hidden", kernel)?;
    let vocab_u32 = to_u32(vocab, "vocab", kernel)?;
    let tiles = n.div_ceil(RANK_TILE);
    if tiles > 65_535 {
        bail!("{kernel}: {n} ids need {tiles} tiles of the rank kernel's grid y (at most 65535)");
    }
    // Rows never written stay zero: ids not present (and ids >= vocab).
    let mut dw = device.alloc_zeros::<T>(vocab * hidden)?;
    if n == 0 || hidden == 0 {
        return Ok(dw);
    }
    let mut pos = device.alloc_zeros::<u32>(n)?;
    // SAFETY: embedding_scatter writes order[pos[r]] for every r, and pos is a permutation of
    // 0..n (the (id, row) keys are distinct), so every element.
    let mut order = unsafe { device.alloc::<u32>(n)? };
    let stream = device.cuda_stream();

    let func = device
        .get_or_load_custom_func("embedding_rank", EMBEDDING.name, EMBEDDING.ptx)?
        .into_cuda_function();
    let mut builder = stream.launch_builder(&func);
    builder.arg(ids).arg(&mut pos).arg(&n_i32);
    let config = LaunchConfig {
        grid_dim: (
            to_u32(n.div_ceil(RANK_THREADS), "rank blocks", kernel)?,
            to_u32(tiles, "rank tiles", kernel)?,
            1,
        ),
        block_dim: (RANK_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: grid (ceil(n / 256), ceil(n / 1024)); block (x, y) reads ids[y * 1024 ..][..1024]
    // within n and its rows r < n, and adds to pos[r]; ids and pos hold n (checked/allocated);
    // arguments match embedding_rank.
    unsafe { builder.launch(config) }.w()?;

    let func = device
        .get_or_load_custom_func("embedding_scatter", EMBEDDING.name, EMBEDDING.ptx)?
        .into_cuda_function();
    let mut builder = stream.launch_builder(&func);
    builder.arg(&pos).arg(&mut order).arg(&n_i32);
    let config = LaunchConfig {
        grid_dim: (to_u32(n.div_ceil(256), "scatter blocks", kernel)?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: thread r < n writes order[pos[r]], pos[r] < n (a rank among n distinct keys);
    // arguments match embedding_scatter.
    unsafe { builder.launch(config) }.w()?;

    let func = function::<T>(device, &EMBEDDING, kernel)?;
    let mut builder = stream.launch_builder(&func);
    builder.arg(dy).arg(ids).arg(&order).arg(&mut dw);
    builder.arg(&n_i32).arg(&hidden_i32).arg(&vocab_u32);
    let vector = 16 / std::mem::size_of::<T>();
    let columns = if hidden.is_multiple_of(vector) {
        hidden / vector
    } else {
        hidden
    };
    let config = LaunchConfig {
        grid_dim: (to_u32(n, "sum blocks", kernel)?, 1, 1),
        block_dim: (
            to_u32(
                columns.next_multiple_of(32).clamp(32, 256),
                "threads",
                kernel,
            )?,
            1,
            1,
        ),
        shared_mem_bytes: 0,
    };
    // SAFETY: block p reads order[p..end] (< n) and ids at those rows, dy rows order[q] < n of
    // `hidden` elements (dy holds n * hidden, checked), and writes row ids[order[p]] < vocab of
    // dw (vocab * hidden); a multiple of 32 threads, at most 256 (the kernel's launch bounds);
    // arguments match embedding_bwd_<dtype>.
    unsafe { builder.launch(config) }.w()?;
    Ok(dw)
}
