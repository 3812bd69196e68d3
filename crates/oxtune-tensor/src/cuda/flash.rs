//! FlashAttention-2 (`kernels/flash_attn.cu`): the forward as a candle `CustomOp3` on
//! (q, k, v) and its backward kernels, for bf16 and f16 with head_dim 64 or 128.
//!
//! What the backward needs: q, k, v (the op's inputs, which candle's autograd hands to
//! `bwd`), o (the op's result, also handed to `bwd`) and the log-sum-exp of each query row,
//! (b, h, t) f32. The LSE is a second output of the forward kernel, which a `CustomOp3`
//! cannot return, so `cuda_fwd` wraps it in a detached tensor and keeps it in the op struct
//! (`FlashForward::lse`, a `Mutex<Option<Tensor>>`); candle keeps the op, hence the LSE, in
//! the graph node of o for as long as the graph lives, and `bwd` reads it from there. Extra
//! memory is O(b * h * t): the LSE, and in the backward delta (f32) and dq (f32, atomics).
//!
//! The backward is a plain function over the tensors' storages (not a custom op: it has
//! three outputs of two dtypes), returning detached dq, dk, dv.
#![allow(
    unsafe_code,
    reason = "launching CUDA kernels and allocating their outputs is unsafe FFI; kept to the \
              launch modules"
)]

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
    bail,
};

use super::launch::{KernelFloat, Module, expect_len, function, to_i32, to_u32};
use super::{no_cpu, view, view_as};
use crate::attention::AttentionMask;

const FLASH: Module = Module {
    name: "oxtune_flash_attn",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/flash_attn.ptx")),
};

/// Queries per tile (forward block, backward inner loop) and keys per tile (the reverse).
const BLOCK_QUERIES: usize = 64;
const BLOCK_KEYS: usize = 64;
const THREADS: u32 = 128;
/// The largest grid y of a launch (b * h forward, b * kv_h backward).
const MAX_GRID_Y: usize = 65_535;

/// The head dims the kernels are compiled for.
pub(crate) const HEAD_DIMS: [usize; 2] = [64, 128];

/// Dynamic shared memory of the forward kernel: `FwdSmem<T, D>::BYTES` in flash_attn.cu
/// (the Q, K and V tiles, rows padded by 8 elements).
fn forward_shared_bytes(head_dim: usize) -> usize {
    let tile = (head_dim + 8) * 2;
    BLOCK_QUERIES * tile + 2 * BLOCK_KEYS * tile
}

/// Dynamic shared memory of the backward kernel: `BwdSmem<T, D>::BYTES` in flash_attn.cu
/// (the K and V tiles, two buffers each of Q and dO, and dS^T, keys x queries).
fn backward_shared_bytes(head_dim: usize) -> usize {
    let tile = (head_dim + 8) * 2;
    2 * BLOCK_KEYS * tile + 4 * BLOCK_QUERIES * tile + BLOCK_KEYS * (BLOCK_QUERIES + 8) * 2
}

/// Sizes of one attention call: q (batch, heads, positions, head_dim), k and v
/// (batch, kv_heads, positions, head_dim).
#[derive(Clone, Copy, Debug)]
struct FlashShape {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    positions: usize,
    head_dim: usize,
}

impl FlashShape {
    /// Checks q, k, v shapes against each other and against what the kernels support.
    fn new(op: &str, q: &Shape, k: &Shape, v: &Shape) -> Result<Self> {
        let (batch, heads, positions, head_dim) = q.dims4()?;
        let (kb, kv_heads, kt, kd) = k.dims4()?;
        if (kb, kt, kd) != (batch, positions, head_dim) || k != v || kv_heads == 0 {
            bail!(
                "{op}: q {q:?}, k {k:?}, v {v:?}; expected k = v = (b, kv_h, t, d) for q (b, h, t, d)"
            );
        }
        if heads % kv_heads != 0 {
            bail!(
                "{op}: {heads} query heads are not a multiple of {kv_heads} kv heads (q {q:?}, k {k:?})"
            );
        }
        if !HEAD_DIMS.contains(&head_dim) {
            bail!("{op}: head_dim {head_dim} (q {q:?}); the kernels take {HEAD_DIMS:?}");
        }
        Ok(Self {
            batch,
            heads,
            kv_heads,
            positions,
            head_dim,
        })
    }

    fn query_elements(self) -> usize {
        self.batch * self.heads * self.positions * self.head_dim
    }

    fn kv_elements(self) -> usize {
        self.batch * self.kv_heads * self.positions * self.head_dim
    }

    fn rows(self) -> usize {
        self.batch * self.heads * self.positions
    }
}

/// The mask as the kernels take it: causal flag and window (0: none).
#[derive(Clone, Copy, Debug)]
struct KernelMask {
    causal: bool,
    window: usize,
}

impl KernelMask {
    fn new(mask: &AttentionMask<'_>, positions: usize, op: &str) -> Result<Self> {
        let window = match mask.sliding_window {
            Some(0) => bail!("{op}: a sliding window of 0 hides every key"),
            // i - j < window holds for every pair when window >= t
            Some(window) if window < positions => window,
            _ => 0,
        };
        Ok(Self {
            causal: mask.causal,
            window,
        })
    }
}

/// The integer arguments every kernel of the module takes: (h, kv_h, t, causal, window).
fn int_args(shape: FlashShape, mask: KernelMask, kernel: &str) -> Result<[i32; 5]> {
    // every flat index inside a kernel fits an i64; row counts and b * h must fit an i32
    to_i32(shape.rows(), "b * h * t", kernel)?;
    Ok([
        to_i32(shape.heads, "heads", kernel)?,
        to_i32(shape.kv_heads, "kv heads", kernel)?,
        to_i32(shape.positions, "positions", kernel)?,
        i32::from(mask.causal),
        to_i32(mask.window, "sliding window", kernel)?,
    ])
}

/// The (b, t) u32 segment ids of a mask, checked, contiguous and on the device of `like`.
fn segments_for(
    mask: &AttentionMask<'_>,
    batch: usize,
    positions: usize,
    like: &Tensor,
    op: &str,
) -> Result<Option<Tensor>> {
    let Some(segments) = mask.segments else {
        return Ok(None);
    };
    if segments.dims() != [batch, positions] || segments.dtype() != DType::U32 {
        bail!(
            "{op}: segments {:?} {:?}; expected ({batch}, {positions}) u32 for q {:?}",
            segments.dims(),
            segments.dtype(),
            like.dims()
        );
    }
    if !segments.device().same_device(like.device()) {
        bail!(
            "{op}: segments on {:?}, q on {:?}",
            segments.device().location(),
            like.device().location()
        );
    }
    Ok(Some(segments.contiguous()?))
}

/// softmax(q k^T * scale + mask) v on the GPU; differentiable in q, k and v. The caller
/// (`attention::flash_attention`) has checked that the kernels take these tensors.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &AttentionMask<'_>,
) -> Result<Tensor> {
    let op = "flash_attention";
    let shape = FlashShape::new(op, q.shape(), k.shape(), v.shape())?;
    let segments = segments_for(mask, shape.batch, shape.positions, q, op)?;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "attention scales are O(1) constants"
    )]
    let scale = scale as f32;
    let forward = FlashForward {
        scale,
        mask: KernelMask::new(mask, shape.positions, op)?,
        segments,
        lse: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, forward)
}

/// The forward without autograd, returning (o, lse): lse (b, h, t) f32 is the natural-log
/// sum of exp(scores * scale) of each query row (+inf for a row that sees no key). For
/// benchmarks of [`flash_attention_backward`].
pub fn flash_attention_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &AttentionMask<'_>,
) -> Result<(Tensor, Tensor)> {
    let op = "flash_attention";
    let shape = FlashShape::new(op, q.shape(), k.shape(), v.shape())?;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "attention scales are O(1) constants"
    )]
    let scale = scale as f32;
    let forward = FlashForward {
        scale,
        mask: KernelMask::new(mask, shape.positions, op)?,
        segments: segments_for(mask, shape.batch, shape.positions, q, op)?,
        lse: Mutex::new(None),
    };
    let o = q
        .contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &forward)?;
    let lse = forward.take_lse()?;
    Ok((o, lse))
}

/// The gradients (dq, dk, dv) of [`flash_attention`] from its inputs, its output `o`, the
/// LSE of [`flash_attention_with_lse`] and the output's gradient `grad`. dk and dv of a kv
/// head are summed over the query heads of its group.
#[expect(clippy::too_many_arguments, reason = "the saved tensors of attention")]
pub fn flash_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    grad: &Tensor,
    scale: f64,
    mask: &AttentionMask<'_>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "flash_attention_backward";
    let shape = FlashShape::new(op, q.shape(), k.shape(), v.shape())?;
    if o.shape() != q.shape() || grad.shape() != q.shape() {
        bail!(
            "{op}: o {:?} and its gradient {:?} for q {:?}",
            o.shape(),
            grad.shape(),
            q.shape()
        );
    }
    if lse.dims() != [shape.batch, shape.heads, shape.positions] || lse.dtype() != DType::F32 {
        bail!(
            "{op}: lse {:?} {:?} for q {:?}; expected (b, h, t) f32",
            lse.dims(),
            lse.dtype(),
            q.shape()
        );
    }
    for (what, t) in [("k", k), ("v", v), ("o", o), ("grad", grad)] {
        if t.dtype() != q.dtype() {
            bail!("{op}: {what} is {:?}, q is {:?}", t.dtype(), q.dtype());
        }
    }
    #[expect(
        clippy::cast_possible_truncation,
        reason = "attention scales are O(1) constants"
    )]
    let scale = scale as f32;
    let kernel_mask = KernelMask::new(mask, shape.positions, op)?;
    let segments = segments_for(mask, shape.batch, shape.positions, q, op)?;
    let tensors = [q, k, v, o, grad, lse].map(Tensor::contiguous);
    let [q, k, v, o, grad, lse] = tensors;
    let (q, k, v, o, grad, lse) = (q?, k?, v?, o?, grad?, lse?);

    let guards = [&q, &k, &v, &o, &grad, &lse].map(Tensor::storage_and_layout);
    let mut storages = Vec::with_capacity(6);
    for ((storage, layout), what) in guards.iter().zip(["q", "k", "v", "o", "grad", "lse"]) {
        match &**storage {
            Storage::Cuda(cuda) => storages.push((cuda, *layout)),
            _ => bail!("{op}: {what} is not on a CUDA device"),
        }
    }
    let segment_guard = segments.as_ref().map(Tensor::storage_and_layout);
    let segment_view = segments_view(segment_guard.as_ref(), op)?;
    let (q_storage, q_layout) = storages[0];
    let device = q_storage.device.clone();
    let inputs = BackwardInputs {
        k: storages[1],
        v: storages[2],
        o: storages[3],
        grad: storages[4],
        lse: storages[5],
        segments: segment_view.as_ref(),
    };
    let (dq, dk, dv) = match &q_storage.slice {
        CudaStorageSlice::BF16(q) => {
            let (dq, dk, dv) = backward_typed(
                &device,
                &view(q, q_layout, op, "q")?,
                &inputs,
                shape,
                scale,
                kernel_mask,
            )?;
            (
                dq,
                CudaStorage::wrap_cuda_slice(dk, device.clone()),
                CudaStorage::wrap_cuda_slice(dv, device.clone()),
            )
        }
        CudaStorageSlice::F16(q) => {
            let (dq, dk, dv) = backward_typed(
                &device,
                &view(q, q_layout, op, "q")?,
                &inputs,
                shape,
                scale,
                kernel_mask,
            )?;
            (
                dq,
                CudaStorage::wrap_cuda_slice(dk, device.clone()),
                CudaStorage::wrap_cuda_slice(dv, device.clone()),
            )
        }
        _ => bail!(
            "{op}: no kernel for {:?} (bf16 and f16 have one)",
            q.dtype()
        ),
    };
    let dq = CudaStorage::wrap_cuda_slice(dq, device.clone());
    let dq = Tensor::from_storage(Storage::Cuda(dq), q.shape(), BackpropOp::none(), false);
    let dk = Tensor::from_storage(Storage::Cuda(dk), k.shape(), BackpropOp::none(), false);
    let dv = Tensor::from_storage(Storage::Cuda(dv), v.shape(), BackpropOp::none(), false);
    Ok((dq.to_dtype(q.dtype())?, dk, dv))
}

/// The storages the backward reads besides q.
struct BackwardInputs<'a> {
    k: (&'a CudaStorage, &'a Layout),
    v: (&'a CudaStorage, &'a Layout),
    o: (&'a CudaStorage, &'a Layout),
    grad: (&'a CudaStorage, &'a Layout),
    lse: (&'a CudaStorage, &'a Layout),
    segments: Option<&'a CudaView<'a, u32>>,
}

/// dq (f32), dk and dv (T).
type Gradients<T> = (CudaSlice<f32>, CudaSlice<T>, CudaSlice<T>);

fn backward_typed<T: KernelFloat>(
    device: &CudaDevice,
    q: &CudaView<'_, T>,
    inputs: &BackwardInputs<'_>,
    shape: FlashShape,
    scale: f32,
    mask: KernelMask,
) -> Result<Gradients<T>> {
    let op = "flash_attention_backward";
    let k = view_as::<T>(inputs.k.0, inputs.k.1, op, "k")?;
    let v = view_as::<T>(inputs.v.0, inputs.v.1, op, "v")?;
    let o = view_as::<T>(inputs.o.0, inputs.o.1, op, "o")?;
    let grad = view_as::<T>(inputs.grad.0, inputs.grad.1, op, "grad")?;
    let lse = view(
        inputs.lse.0.as_cuda_slice::<f32>()?,
        inputs.lse.1,
        op,
        "lse",
    )?;
    let delta = backward_delta(device, &o, &grad, shape)?;
    backward_main(
        device,
        &Saved {
            q,
            k: &k,
            v: &v,
            grad: &grad,
            lse: &lse,
            delta: &delta.as_view(),
            segments: inputs.segments,
        },
        shape,
        scale,
        mask,
    )
}

/// The device view of a (b, t) u32 segments tensor, from its storage guard.
fn segments_view<'a>(
    guard: Option<&'a (candle_core::StorageRef<'a>, &'a Layout)>,
    op: &str,
) -> Result<Option<CudaView<'a, u32>>> {
    match guard {
        Some((storage, layout)) => match &**storage {
            Storage::Cuda(cuda) => Ok(Some(view(
                cuda.as_cuda_slice::<u32>()?,
                layout,
                op,
                "segments",
            )?)),
            _ => bail!("{op}: segments are not on a CUDA device"),
        },
        None => Ok(None),
    }
}

/// softmax(q k^T * scale + mask) v with grouped-query attention; saves the LSE for `bwd`.
struct FlashForward {
    scale: f32,
    mask: KernelMask,
    /// (b, t) u32, contiguous, on the device of q.
    segments: Option<Tensor>,
    /// (b, h, t) f32, set by `cuda_fwd`.
    lse: Mutex<Option<Tensor>>,
}

impl FlashForward {
    fn take_lse(&self) -> Result<Tensor> {
        self.lse
            .lock()
            .map_err(|_| {
                candle_core::Error::Msg("flash_attention: the LSE lock is poisoned".into())
            })?
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("flash_attention: the forward saved no LSE".into())
            })
    }
}

impl CustomOp3 for FlashForward {
    fn name(&self) -> &'static str {
        "oxtune-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_layout: &Layout,
        k: &CudaStorage,
        k_layout: &Layout,
        v: &CudaStorage,
        v_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let shape = FlashShape::new(op, q_layout.shape(), k_layout.shape(), v_layout.shape())?;
        let device = q.device.clone();
        let segment_guard = self.segments.as_ref().map(Tensor::storage_and_layout);
        let segments = segments_view(segment_guard.as_ref(), op)?;
        let (out, lse) = match &q.slice {
            CudaStorageSlice::BF16(slice) => {
                let (o, lse) = forward_launch(
                    &device,
                    &view(slice, q_layout, op, "q")?,
                    &view_as(k, k_layout, op, "k")?,
                    &view_as(v, v_layout, op, "v")?,
                    segments.as_ref(),
                    shape,
                    self.scale,
                    self.mask,
                )?;
                (CudaStorage::wrap_cuda_slice(o, device.clone()), lse)
            }
            CudaStorageSlice::F16(slice) => {
                let (o, lse) = forward_launch(
                    &device,
                    &view(slice, q_layout, op, "q")?,
                    &view_as(k, k_layout, op, "k")?,
                    &view_as(v, v_layout, op, "v")?,
                    segments.as_ref(),
                    shape,
                    self.scale,
                    self.mask,
                )?;
                (CudaStorage::wrap_cuda_slice(o, device.clone()), lse)
            }
            _ => bail!(
                "{op}: no kernel for {:?} (bf16 and f16 have one)",
                q.dtype()
            ),
        };
        let lse = Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(lse, device)),
            (shape.batch, shape.heads, shape.positions),
            BackpropOp::none(),
            false,
        );
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{op}: the LSE lock is poisoned")))? =
            Some(lse);
        Ok((out, q_layout.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.take_lse()?;
        let mask = AttentionMask {
            causal: self.mask.causal,
            segments: self.segments.as_ref(),
            sliding_window: (self.mask.window > 0).then_some(self.mask.window),
        };
        let (dq, dk, dv) =
            flash_attention_backward(q, k, v, res, &lse, grad, f64::from(self.scale), &mask)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Opts a kernel in to `bytes` of dynamic shared memory (above the default 48 KiB).
fn with_shared_memory(
    func: &candle_core::cuda::cudarc::driver::CudaFunction,
    bytes: usize,
    kernel: &str,
) -> Result<u32> {
    let bytes_i32 = to_i32(bytes, "shared memory", kernel)?;
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes_i32,
    )
    .w()?;
    to_u32(bytes, "shared memory", kernel)
}

#[expect(clippy::too_many_arguments, reason = "the kernel's arguments")]
fn forward_launch<T: KernelFloat>(
    device: &CudaDevice,
    q: &CudaView<'_, T>,
    k: &CudaView<'_, T>,
    v: &CudaView<'_, T>,
    segments: Option<&CudaView<'_, u32>>,
    shape: FlashShape,
    scale: f32,
    mask: KernelMask,
) -> Result<(CudaSlice<T>, CudaSlice<f32>)> {
    let kernel = format!("flash_fwd_d{}", shape.head_dim);
    expect_len(q, shape.query_elements(), "q", &kernel)?;
    expect_len(k, shape.kv_elements(), "k", &kernel)?;
    expect_len(v, shape.kv_elements(), "v", &kernel)?;
    if let Some(segments) = segments {
        expect_len(segments, shape.batch * shape.positions, "segments", &kernel)?;
    }
    let [h, kv_h, t, causal, window] = int_args(shape, mask, &kernel)?;
    let heads_total = shape.batch * shape.heads;
    if heads_total > MAX_GRID_Y {
        bail!("{kernel}: b * h = {heads_total} > {MAX_GRID_Y} (the grid's y)");
    }
    let func = function::<T>(device, &FLASH, &kernel)?;
    let shared = with_shared_memory(&func, forward_shared_bytes(shape.head_dim), &kernel)?;
    // SAFETY: every query row below t of every (b, h) belongs to one block, which writes its
    // D outputs and its LSE.
    let mut out = unsafe { device.alloc::<T>(shape.query_elements())? };
    let mut lse = unsafe { device.alloc::<f32>(shape.rows())? };
    let null: u64 = 0;
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    builder.arg(q).arg(k).arg(v).arg(&mut out).arg(&mut lse);
    match segments {
        Some(segments) => builder.arg(segments),
        None => builder.arg(&null),
    };
    builder
        .arg(&h)
        .arg(&kv_h)
        .arg(&t)
        .arg(&scale)
        .arg(&causal)
        .arg(&window);
    let config = LaunchConfig {
        grid_dim: (
            to_u32(
                shape.positions.div_ceil(BLOCK_QUERIES),
                "query tiles",
                &kernel,
            )?,
            to_u32(heads_total, "b * h", &kernel)?,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared,
    };
    // SAFETY: grid (query tiles, b * h) of 128 threads with the shared memory of FwdSmem;
    // q, k, v, segments hold what the kernel indexes (checked above), out and lse are sized
    // for (b, h, t, d) and (b, h, t); the argument list matches flash_fwd_d<D>_<dtype>
    // (segments: a pointer, null when absent).
    unsafe { builder.launch(config) }.w()?;
    Ok((out, lse))
}

/// delta = rowsum(dO * O) in f32, (b, h, t).
fn backward_delta<T: KernelFloat>(
    device: &CudaDevice,
    o: &CudaView<'_, T>,
    grad: &CudaView<'_, T>,
    shape: FlashShape,
) -> Result<CudaSlice<f32>> {
    let kernel = "flash_bwd_delta";
    expect_len(o, shape.query_elements(), "o", kernel)?;
    expect_len(grad, shape.query_elements(), "grad", kernel)?;
    let rows = to_i32(shape.rows(), "rows", kernel)?;
    let d = to_i32(shape.head_dim, "head_dim", kernel)?;
    let func = function::<T>(device, &FLASH, kernel)?;
    // SAFETY: one warp per row writes each of the rows.
    let mut delta = unsafe { device.alloc::<f32>(shape.rows())? };
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    builder.arg(o).arg(grad).arg(&mut delta).arg(&rows).arg(&d);
    let config = LaunchConfig {
        grid_dim: (to_u32(shape.rows().div_ceil(8), "blocks", kernel)?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: 8 warps a block, one row each, over `rows` rows of d elements (lengths checked);
    // arguments match flash_bwd_delta_<dtype>.
    unsafe { builder.launch(config) }.w()?;
    Ok(delta)
}

/// What the main backward kernel reads.
struct Saved<'a, 'b, T> {
    q: &'a CudaView<'b, T>,
    k: &'a CudaView<'b, T>,
    v: &'a CudaView<'b, T>,
    grad: &'a CudaView<'b, T>,
    lse: &'a CudaView<'b, f32>,
    delta: &'a CudaView<'a, f32>,
    segments: Option<&'a CudaView<'b, u32>>,
}

fn backward_main<T: KernelFloat>(
    device: &CudaDevice,
    saved: &Saved<'_, '_, T>,
    shape: FlashShape,
    scale: f32,
    mask: KernelMask,
) -> Result<Gradients<T>> {
    let kernel = format!("flash_bwd_d{}", shape.head_dim);
    expect_len(saved.q, shape.query_elements(), "q", &kernel)?;
    expect_len(saved.k, shape.kv_elements(), "k", &kernel)?;
    expect_len(saved.v, shape.kv_elements(), "v", &kernel)?;
    expect_len(saved.grad, shape.query_elements(), "grad", &kernel)?;
    expect_len(saved.lse, shape.rows(), "lse", &kernel)?;
    expect_len(saved.delta, shape.rows(), "delta", &kernel)?;
    if let Some(segments) = saved.segments {
        expect_len(segments, shape.batch * shape.positions, "segments", &kernel)?;
    }
    let [h, kv_h, t, causal, window] = int_args(shape, mask, &kernel)?;
    let kv_total = shape.batch * shape.kv_heads;
    if kv_total > MAX_GRID_Y {
        bail!("{kernel}: b * kv_h = {kv_total} > {MAX_GRID_Y} (the grid's y)");
    }
    let func = function::<T>(device, &FLASH, &kernel)?;
    let shared = with_shared_memory(&func, backward_shared_bytes(shape.head_dim), &kernel)?;
    // dq is accumulated with atomics: zeros first.
    let mut dq = device.alloc_zeros::<f32>(shape.query_elements())?;
    // SAFETY: every key row below t of every (b, kv_h) belongs to one block, which writes its
    // D gradients (zeros when no query sees the key).
    let mut dk = unsafe { device.alloc::<T>(shape.kv_elements())? };
    let mut dv = unsafe { device.alloc::<T>(shape.kv_elements())? };
    let null: u64 = 0;
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    builder
        .arg(saved.q)
        .arg(saved.k)
        .arg(saved.v)
        .arg(saved.grad)
        .arg(saved.lse)
        .arg(saved.delta);
    match saved.segments {
        Some(segments) => builder.arg(segments),
        None => builder.arg(&null),
    };
    builder.arg(&mut dq).arg(&mut dk).arg(&mut dv);
    builder
        .arg(&h)
        .arg(&kv_h)
        .arg(&t)
        .arg(&scale)
        .arg(&causal)
        .arg(&window);
    let config = LaunchConfig {
        grid_dim: (
            to_u32(shape.positions.div_ceil(BLOCK_KEYS), "key tiles", &kernel)?,
            to_u32(kv_total, "b * kv_h", &kernel)?,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared,
    };
    // SAFETY: grid (key tiles, b * kv_h) of 128 threads with the shared memory of BwdSmem;
    // every input holds what the kernel indexes (checked above); dq (zeroed) is (b, h, t, d)
    // f32, dk and dv (b, kv_h, t, d); the argument list matches flash_bwd_d<D>_<dtype>.
    unsafe { builder.launch(config) }.w()?;
    Ok((dq, dk, dv))
}
