//! A serving step's per-head q/k RMSNorm, RoPE and paged KV cache write in one launch
//! (`kernels/rope_cache.cu`), for [`crate::ops::qk_norm_rope_cache_write`]. Inference only:
//! no backward (the op takes the composition when an input tracks a gradient).
//!
//! The pools are written in place, under their candle write locks. An in-place op on the
//! pool whose storage comes first in memory takes its write lock and device pointer, then
//! applies an in-place op to the other pool, which does the same and launches; the read-only
//! inputs (q, k, v, the tables, the slots and the norm weights) are read-locked there, each
//! storage once (q, k and v are usually narrows of one storage). Why this is sound:
//! - no other candle op can touch a pool's storage while the kernel is enqueued (write
//!   locks), and candle runs every op of a device on its one stream, so earlier work on the
//!   pools is ordered before the kernel and later work after it; cudarc's
//!   `device_ptr(_mut)` guards also order the launch against other streams when event
//!   tracking is on;
//! - the kernel writes only rows `slot < num_slots` of each pool, within the (num_slots,
//!   kv * d) elements its layout covers (checked against the allocation before launching),
//!   and the returned q, which it writes whole;
//! - the pools must be two storages, distinct from every input's (checked by storage
//!   address, before any lock is taken): otherwise the kernel would read what it writes, and
//!   the second lock on one storage would deadlock;
//! - the pools are locked in storage-address order, the order candle's own in-place ops use,
//!   and the inputs only after them, each once (a parking_lot read lock taken twice by one
//!   thread can deadlock behind a waiting writer).
//!
//! Nothing is uploaded, nothing synchronises, and the only allocation is the returned q, so
//! the op can be recorded in a CUDA graph.
#![allow(
    unsafe_code,
    reason = "launching a CUDA kernel on raw pool pointers and allocating its output is unsafe FFI"
)]

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaView, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda::{CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, DType, InplaceOp1, Layout, Result, Storage, StorageRef,
    Tensor, bail,
};

use super::launch::{KernelFloat, Module, expect_len, function, to_i32, to_u32};
use super::storage_address;
use crate::ops::{AttentionHeads, RopeCacheInputs};

const ROPE_CACHE: Module = Module {
    name: "oxtune_rope_cache",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/rope_cache.ptx")),
};

/// The largest head_dim the kernel takes (4 pairs a lane over a warp).
pub const ROPE_CACHE_MAX_HEAD_DIM: usize = 256;
/// Warps of a block (`RC_WARPS`), one (row, head) item each.
const WARPS: usize = 4;

/// Whether the kernel takes these inputs: one CUDA device and one float dtype (f32, bf16,
/// f16) for all (u32 slots), no gradient tracked, head_dim <= 256, q/k/v and the tables as
/// 2-D row views with a contiguous last dimension, the slots, norms and pools contiguous.
pub(crate) fn rope_cache_takes(inputs: &RopeCacheInputs<'_>) -> bool {
    let mut floats = vec![
        inputs.q,
        inputs.k,
        inputs.v,
        inputs.cos,
        inputs.sin,
        inputs.k_pool,
        inputs.v_pool,
    ];
    if let Some((q_norm, k_norm)) = inputs.norms {
        floats.extend([q_norm, k_norm]);
    }
    let rows_contiguous =
        |t: &Tensor| t.rank() == 2 && (t.dim(1).ok() == Some(1) || t.stride()[1] == 1);
    super::applies(&floats)
        && inputs.slots.dtype() == DType::U32
        && inputs.slots.device().same_device(inputs.q.device())
        && inputs.slots.is_contiguous()
        && !floats.iter().any(|t| t.track_op())
        && inputs.heads.head_dim <= ROPE_CACHE_MAX_HEAD_DIM
        && [inputs.q, inputs.k, inputs.v, inputs.cos, inputs.sin]
            .into_iter()
            .all(rows_contiguous)
        && inputs.k_pool.is_contiguous()
        && inputs.v_pool.is_contiguous()
        && inputs
            .norms
            .is_none_or(|(q_norm, k_norm)| q_norm.is_contiguous() && k_norm.is_contiguous())
}

/// See [`crate::ops::qk_norm_rope_cache_write`]; the kernel, or an error where it does not
/// take the inputs (the ops function then runs the composition instead).
pub fn qk_norm_rope_cache_write(inputs: &RopeCacheInputs<'_>) -> Result<Tensor> {
    let rows = inputs.rows()?;
    if !rope_cache_takes(inputs) {
        bail!(
            "qk_norm_rope_cache_write: the kernel takes f32/bf16/f16 tensors of one CUDA device \
             (u32 slots) that track no gradient, head_dim <= {ROPE_CACHE_MAX_HEAD_DIM}, rows with a \
             contiguous last dimension and contiguous pools"
        );
    }
    rope_cache_fused(inputs, rows)
}

/// Roles of the read-only inputs, indices into `Call::inputs`.
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const COS: usize = 3;
const SIN: usize = 4;
const SLOTS: usize = 5;
const Q_NORM: usize = 6;
const K_NORM: usize = 7;

/// One launch's inputs and where the frames leave what they take.
struct Call<'a> {
    /// q, k, v, cos, sin, slots, then q_norm and k_norm when given.
    inputs: Vec<&'a Tensor>,
    /// The inputs with distinct storages, each read-locked once, and each input's among them.
    distinct: Vec<&'a Tensor>,
    guard_of: Vec<usize>,
    heads: AttentionHeads,
    eps: f32,
    rows: usize,
    num_slots: usize,
    /// The pools' device pointers and dtypes, (k, v), as the frames take them.
    pools: RefCell<[Option<(u64, DType)>; 2]>,
    /// The rotated q, left by the launching frame.
    out: RefCell<Option<CudaStorage>>,
}

/// Runs the kernel on inputs [`rope_cache_takes`] accepted and whose shapes
/// `RopeCacheInputs::rows` checked (`rows` = t).
pub(crate) fn rope_cache_fused(inputs: &RopeCacheInputs<'_>, rows: usize) -> Result<Tensor> {
    let op = "qk_norm_rope_cache_write";
    let AttentionHeads {
        q: h, head_dim: d, ..
    } = inputs.heads;
    let mut tensors = vec![
        inputs.q,
        inputs.k,
        inputs.v,
        inputs.cos,
        inputs.sin,
        inputs.slots,
    ];
    if let Some((q_norm, k_norm)) = inputs.norms {
        tensors.extend([q_norm, k_norm]);
    }
    let addresses: Vec<usize> = tensors.iter().map(|t| storage_address(t)).collect();
    let pool_addresses = [inputs.k_pool, inputs.v_pool].map(storage_address);
    if pool_addresses[0] == pool_addresses[1] {
        bail!("{op}: k_pool and v_pool share one storage");
    }
    if addresses.iter().any(|a| pool_addresses.contains(a)) {
        bail!("{op}: an input shares its storage with a pool it would be written to");
    }
    let mut distinct: Vec<&Tensor> = Vec::new();
    let mut distinct_addresses: Vec<usize> = Vec::new();
    let mut guard_of = Vec::with_capacity(tensors.len());
    for (tensor, address) in tensors.iter().zip(&addresses) {
        let index = match distinct_addresses.iter().position(|a| a == address) {
            Some(index) => index,
            None => {
                distinct.push(tensor);
                distinct_addresses.push(*address);
                distinct.len() - 1
            }
        };
        guard_of.push(index);
    }
    #[expect(
        clippy::cast_possible_truncation,
        reason = "eps is a small f32 constant in configs"
    )]
    let eps = inputs.eps as f32;
    let call = Call {
        inputs: tensors,
        distinct,
        guard_of,
        heads: inputs.heads,
        eps,
        rows,
        num_slots: inputs.k_pool.dim(0)?,
        pools: RefCell::new([None, None]),
        out: RefCell::new(None),
    };
    // k is role 0, v role 1; the pool at the lower address is locked first.
    let order = if pool_addresses[0] < pool_addresses[1] {
        [(inputs.k_pool, 0), (inputs.v_pool, 1)]
    } else {
        [(inputs.v_pool, 1), (inputs.k_pool, 0)]
    };
    let frame = PoolFrame {
        call: &call,
        order,
        position: 0,
    };
    order[0].0.inplace_op1(&frame)?;
    let Some(out) = call.out.take() else {
        bail!("{op}: the launch left no output");
    };
    Ok(Tensor::from_storage(
        Storage::Cuda(out),
        (rows, h, d),
        BackpropOp::none(),
        false,
    ))
}

/// The in-place op on one pool: takes its pointer under its write lock, then applies itself
/// to the other pool, or launches when both are held.
#[derive(Clone, Copy)]
struct PoolFrame<'a> {
    call: &'a Call<'a>,
    /// The pools in lock order, with their roles (0 k, 1 v).
    order: [(&'a Tensor, usize); 2],
    /// This frame's place in `order`.
    position: usize,
}

impl InplaceOp1 for PoolFrame<'_> {
    fn name(&self) -> &'static str {
        "oxtune-rope-cache"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        bail!("oxtune-rope-cache: a CPU pool in a CUDA launch")
    }

    fn cuda_fwd(&self, pool: &mut CudaStorage, layout: &Layout) -> Result<()> {
        let device = pool.device.clone();
        match &mut pool.slice {
            CudaStorageSlice::F32(slice) => self.visit(slice, layout, &device),
            CudaStorageSlice::BF16(slice) => self.visit(slice, layout, &device),
            CudaStorageSlice::F16(slice) => self.visit(slice, layout, &device),
            _ => bail!("oxtune-rope-cache: no kernel for a {:?} pool", pool.dtype()),
        }
    }
}

impl PoolFrame<'_> {
    fn visit<T: KernelFloat>(
        &self,
        pool: &mut CudaSlice<T>,
        layout: &Layout,
        device: &CudaDevice,
    ) -> Result<()> {
        let op = "oxtune-rope-cache";
        let call = self.call;
        let role = self.order[self.position].1;
        let width = call.heads.kv * call.heads.head_dim;
        if !layout.is_contiguous() || layout.shape().dims() != [call.num_slots, width] {
            bail!(
                "{op}: pool {:?} (stride {:?}) is not ({}, {width}) contiguous",
                layout.shape(),
                layout.stride(),
                call.num_slots
            );
        }
        let start = layout.start_offset();
        let mut pool = pool
            .try_slice_mut(start..start + call.num_slots * width)
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: pool out of its storage")))?;
        let stream = device.cuda_stream();
        // The guard records the kernel's write on drop, after the launch below.
        let (pointer, _written) = pool.device_ptr_mut(&stream);
        call.pools.borrow_mut()[role] = Some((pointer, T::DTYPE));
        if self.position == 0 {
            let next = Self {
                position: 1,
                ..*self
            };
            self.order[1].0.inplace_op1(&next)
        } else {
            let out = launch::<T>(device, call)?;
            *call.out.borrow_mut() = Some(CudaStorage::wrap_cuda_slice(out, device.clone()));
            Ok(())
        }
    }
}

fn cuda_storage<'g>(guard: &'g StorageRef<'_>, op: &str, what: &str) -> Result<&'g CudaStorage> {
    match &**guard {
        Storage::Cuda(storage) => Ok(storage),
        _ => bail!("{op}: {what} is not on the GPU"),
    }
}

/// A (rows, width) row view whose last dimension is contiguous: the elements from its first
/// to its last, and the distance between rows.
fn rows_view<'a, U>(
    slice: &'a CudaSlice<U>,
    layout: &Layout,
    (rows, width): (usize, usize),
    op: &str,
    what: &str,
) -> Result<(CudaView<'a, U>, u64)> {
    let [stride, step] = layout.stride() else {
        bail!("{op}: {what} {:?} is not a matrix", layout.shape());
    };
    if layout.shape().dims() != [rows, width] || (width > 1 && *step != 1) {
        bail!(
            "{op}: {what} {:?} (stride {:?}) is not ({rows}, {width}) with contiguous rows",
            layout.shape(),
            layout.stride()
        );
    }
    let start = layout.start_offset();
    let len = if rows == 0 {
        0
    } else {
        (rows - 1) * stride + width
    };
    let view = slice
        .try_slice(start..start + len)
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} out of its storage")))?;
    Ok((view, *stride as u64))
}

/// The kernel over the inputs of `call`, both pool pointers taken by the caller frames.
fn launch<T: KernelFloat>(device: &CudaDevice, call: &Call<'_>) -> Result<CudaSlice<T>> {
    let kernel = "rope_cache";
    let AttentionHeads {
        q: h,
        kv,
        head_dim: d,
    } = call.heads;
    let t = call.rows;
    let pools = *call.pools.borrow();
    let (k_pool, v_pool) = match pools {
        [Some((k, k_dtype)), Some((v, v_dtype))] if k_dtype == T::DTYPE && v_dtype == T::DTYPE => {
            (k, v)
        }
        _ => bail!(
            "{kernel}: the pools are not both held, or not {:?}",
            T::DTYPE
        ),
    };
    let guards: Vec<StorageRef<'_>> = call
        .distinct
        .iter()
        .map(|tensor| tensor.storage_and_layout().0)
        .collect();
    let storage =
        |role: usize, what: &str| cuda_storage(&guards[call.guard_of[role]], kernel, what);
    let layout = |role: usize| call.inputs[role].layout();
    let (q, q_stride) = rows_view(
        storage(Q, "q")?.as_cuda_slice::<T>()?,
        layout(Q),
        (t, h * d),
        kernel,
        "q",
    )?;
    let (k, k_stride) = rows_view(
        storage(K, "k")?.as_cuda_slice::<T>()?,
        layout(K),
        (t, kv * d),
        kernel,
        "k",
    )?;
    let (v, v_stride) = rows_view(
        storage(V, "v")?.as_cuda_slice::<T>()?,
        layout(V),
        (t, kv * d),
        kernel,
        "v",
    )?;
    let (cos, cos_stride) = rows_view(
        storage(COS, "cos")?.as_cuda_slice::<T>()?,
        layout(COS),
        (t, d / 2),
        kernel,
        "cos",
    )?;
    let (sin, sin_stride) = rows_view(
        storage(SIN, "sin")?.as_cuda_slice::<T>()?,
        layout(SIN),
        (t, d / 2),
        kernel,
        "sin",
    )?;
    let slots = super::view(
        storage(SLOTS, "slots")?.as_cuda_slice::<u32>()?,
        layout(SLOTS),
        kernel,
        "slots",
    )?;
    expect_len(&slots, t, "slots", kernel)?;
    let norms = if call.inputs.len() > K_NORM {
        let q_norm = super::view(
            storage(Q_NORM, "q_norm")?.as_cuda_slice::<T>()?,
            layout(Q_NORM),
            kernel,
            "q_norm",
        )?;
        let k_norm = super::view(
            storage(K_NORM, "k_norm")?.as_cuda_slice::<T>()?,
            layout(K_NORM),
            kernel,
            "k_norm",
        )?;
        expect_len(&q_norm, d, "q_norm", kernel)?;
        expect_len(&k_norm, d, "k_norm", kernel)?;
        Some((q_norm, k_norm))
    } else {
        None
    };
    if d % 2 != 0 || d > ROPE_CACHE_MAX_HEAD_DIM {
        bail!("{kernel}: head_dim {d} is odd or > {ROPE_CACHE_MAX_HEAD_DIM}");
    }
    let items = t * (h + 2 * kv);
    let blocks = to_u32(items.div_ceil(WARPS), "blocks", kernel)?;
    let (t_i32, h_i32, kv_i32, d_i32) = (
        to_i32(t, "rows", kernel)?,
        to_i32(h, "heads", kernel)?,
        to_i32(kv, "kv heads", kernel)?,
        to_i32(d, "head_dim", kernel)?,
    );
    to_i32(h + 2 * kv, "heads + 2 kv heads", kernel)?;
    let num_slots = call.num_slots as u64;
    let func = function::<T>(device, &ROPE_CACHE, kernel)?;
    // SAFETY: every (row, query head) item writes all d elements of its head of q.
    let mut out = unsafe { device.alloc::<T>(t * h * d)? };
    if items == 0 {
        return Ok(out);
    }
    let null = 0u64;
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    builder.arg(&q).arg(&k).arg(&v);
    match &norms {
        Some((q_norm, k_norm)) => builder.arg(q_norm).arg(k_norm),
        None => builder.arg(&null).arg(&null),
    };
    builder.arg(&cos).arg(&sin).arg(&slots);
    builder.arg(&k_pool).arg(&v_pool).arg(&mut out);
    builder
        .arg(&q_stride)
        .arg(&k_stride)
        .arg(&v_stride)
        .arg(&cos_stride)
        .arg(&sin_stride);
    builder
        .arg(&t_i32)
        .arg(&h_i32)
        .arg(&kv_i32)
        .arg(&d_i32)
        .arg(&call.eps)
        .arg(&num_slots);
    let config = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (to_u32(WARPS * 32, "threads", kernel)?, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: one warp per (row, head) item over t * (h + 2 kv) items. The views of q, k, v
    // and the tables span their (t, width) rows at the strides passed (rows_view); slots and
    // the norms hold t and d elements (checked); the pools are (num_slots, kv * d) contiguous
    // elements of T held under the caller frames' write locks, and the kernel writes only rows
    // slot < num_slots of them; out holds (t, h, d); d is even and <= 256 (4 pairs a lane);
    // the arguments match rope_cache_<dtype> in rope_cache.cu (pointers as 8-byte values).
    unsafe { builder.launch(config) }.w()?;
    Ok(out)
}
