//! FlashAttention-2 (`kernels/flash_attn.cu`): the forward as a candle `CustomOp3` on
//! (q, k, v) and its backward kernels, for bf16 and f16 with head_dim 64 or 128.
//!
//! Layouts: the kernels address every tensor through its (batch, head, token) element strides
//! (`Layouts`, one kernel argument) with a contiguous head_dim, so the same kernels serve
//! [`flash_attention`] (q (b, h, t, d), k and v (b, kv_h, t, d), `Order::HeadsFirst`) and
//! [`flash_attention_positions_first`] (q (b, t, h, d), k and v (b, t, kv_h, d),
//! `Order::PositionsFirst`, e.g. head-narrows of one packed q|k|v projection). Inputs are
//! read in place when `reads_in_place` holds (last dim contiguous; start offset and every
//! other stride multiples of 8 elements, so each row is 16-byte aligned for cp.async and
//! ldmatrix); any other input, and an output gradient likewise, is first copied to a
//! contiguous tensor (`kernel_input`). Outputs (o; dq, dk, dv) are allocated contiguous in
//! the call's order; lse and delta are (b, h, t) f32 in both orders.
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
use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda::{CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
    bail,
};

use super::launch::{KernelFloat, Module, expect_len, function, to_i32, to_u32};
use super::{no_cpu, view};
use crate::attention::{AttentionMask, Order};

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
/// (batch, kv_heads, positions, head_dim), in either order of heads and positions.
#[derive(Clone, Copy, Debug)]
struct FlashShape {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    positions: usize,
    head_dim: usize,
}

/// (batch, heads, positions, head_dim) of a shape in `order`.
fn dims_in(order: Order, shape: &Shape) -> Result<(usize, usize, usize, usize)> {
    let (b, x, y, d) = shape.dims4()?;
    Ok(match order {
        Order::HeadsFirst => (b, x, y, d),
        Order::PositionsFirst => (b, y, x, d),
    })
}

impl FlashShape {
    /// Checks q, k, v shapes against each other and against what the kernels support.
    fn new(op: &str, q: &Shape, k: &Shape, v: &Shape, order: Order) -> Result<Self> {
        let (batch, heads, positions, head_dim) = dims_in(order, q)?;
        let (kb, kv_heads, kt, kd) = dims_in(order, k)?;
        if (kb, kt, kd) != (batch, positions, head_dim) || k != v || kv_heads == 0 {
            bail!(
                "{op}: q {q:?}, k {k:?}, v {v:?}; expected k = v = {} for q {}",
                order.kv_shape(),
                order.q_shape()
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

/// Element strides of one (b, heads, t, d) tensor over (batch, head, token), d contiguous:
/// `Strides` in flash_attn.cu (the token stride an i32: a row's offset is one 32 x 32 -> 64
/// multiply there; the batch and head offsets are 64-bit).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Strides {
    batch: i64,
    head: i64,
    token: i32,
    unused: i32,
}

impl Strides {
    /// The strides of a contiguous tensor of `heads` heads in `order`.
    fn contiguous(
        order: Order,
        heads: usize,
        positions: usize,
        head_dim: usize,
        kernel: &str,
    ) -> Result<Self> {
        let (head, token) = match order {
            Order::HeadsFirst => (positions * head_dim, head_dim),
            Order::PositionsFirst => (head_dim, heads * head_dim),
        };
        Self::new(heads * positions * head_dim, head, token, kernel)
    }

    /// The strides of a layout in `order`; its last dimension must be contiguous. The stride
    /// of a dimension of size 1 is never used to address anything and counts as 0.
    fn of(layout: &Layout, order: Order, kernel: &str, what: &str) -> Result<Self> {
        let (dims, strides) = (layout.dims(), layout.stride());
        if dims.len() != 4 || strides[3] != 1 {
            bail!(
                "{kernel}: {what} {dims:?} has strides {strides:?}; the kernels need a contiguous last dimension"
            );
        }
        let used = |i: usize| if dims[i] == 1 { 0 } else { strides[i] };
        let (head, token) = match order {
            Order::HeadsFirst => (used(1), used(2)),
            Order::PositionsFirst => (used(2), used(1)),
        };
        Self::new(used(0), head, token, kernel)
    }

    fn new(batch: usize, head: usize, token: usize, kernel: &str) -> Result<Self> {
        let wide = |value: usize, what: &str| {
            i64::try_from(value)
                .or_else(|_| bail!("{kernel}: {what} stride {value} does not fit an i64"))
        };
        Ok(Self {
            batch: wide(batch, "batch")?,
            head: wide(head, "head")?,
            token: to_i32(token, "token stride", kernel)?,
            unused: 0,
        })
    }
}

/// The strides of every tensor the kernels address: `Layouts` in flash_attn.cu (192 bytes,
/// asserted on both sides). One value goes to each kernel, which reads its own tensors'
/// (forward: q, k, v, o; delta: o, dout; backward: q, k, v, dout, dq, dk, dv); the others
/// stay zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Layouts {
    q: Strides,
    k: Strides,
    v: Strides,
    o: Strides,
    dout: Strides,
    dq: Strides,
    dk: Strides,
    dv: Strides,
}

const _: () = assert!(std::mem::size_of::<Layouts>() == 192);

// SAFETY: plain integers, #[repr(C)] with the layout of flash::Layouts in flash_attn.cu
// (size asserted on both sides); the kernels receive it by value.
unsafe impl DeviceRepr for Layouts {}

/// Whether the kernels read a (b, ., ., d) tensor of this layout (in `order`) in place: its
/// last dimension contiguous, its token stride an i32, and its start offset and the stride
/// of every other dimension longer than 1 multiples of 8 elements, so that every row is
/// 16-byte aligned (cp.async and ldmatrix move 16 bytes; candle's CUDA allocations are
/// aligned; the kernels check the pointers again and fall back to element loads).
fn reads_in_place(layout: &Layout, order: Order) -> bool {
    let (dims, strides) = (layout.dims(), layout.stride());
    let token = match order {
        Order::HeadsFirst => 2,
        Order::PositionsFirst => 1,
    };
    dims.len() == 4
        && strides[3] == 1
        && layout.start_offset().is_multiple_of(8)
        && (0..3).all(|i| dims[i] == 1 || strides[i].is_multiple_of(8))
        && (dims[token] == 1 || i32::try_from(strides[token]).is_ok())
}

/// `tensor` (in `order`) as the kernels read it: itself when `reads_in_place`, otherwise a
/// fresh contiguous copy (also of a contiguous tensor at an unaligned start offset). The
/// copy is a candle op, so gradients flow through it.
fn kernel_input(tensor: &Tensor, order: Order) -> Result<Tensor> {
    if reads_in_place(tensor.layout(), order) {
        Ok(tensor.clone())
    } else {
        tensor.force_contiguous()
    }
}

/// The part of a storage that a (possibly strided) layout addresses, from its start offset
/// to one past its last element; the kernels index nothing else.
fn strided_view<'a, T>(
    slice: &'a CudaSlice<T>,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let start = layout.start_offset();
    let span = if layout.shape().elem_count() == 0 {
        0
    } else {
        1 + layout
            .dims()
            .iter()
            .zip(layout.stride())
            .map(|(&n, &s)| (n - 1) * s)
            .sum::<usize>()
    };
    slice
        .try_slice(start..start + span)
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} out of its storage")))
}

/// The same-dtype strided view of another input of the op.
fn strided_view_as<'a, T: KernelFloat>(
    storage: &'a CudaStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<CudaView<'a, T>> {
    strided_view(storage.as_cuda_slice::<T>()?, layout, op, what)
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

/// softmax(q k^T * scale + mask) v on the GPU for q (b, h, t, d), k and v (b, kv_h, t, d);
/// differentiable in q, k and v; -> (b, h, t, d), contiguous. The caller
/// (`attention::flash_attention`) has checked that the kernels take these tensors. Inputs
/// are read in place when `reads_in_place` holds, else copied (`kernel_input`).
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &AttentionMask<'_>,
) -> Result<Tensor> {
    forward_in_order(q, k, v, scale, mask, Order::HeadsFirst)
}

/// [`flash_attention`] for q (b, t, h, d), k and v (b, t, kv_h, d), any views with a
/// contiguous last dimension (such as head-narrows of one packed (b, t, h + 2 kv_h, d)
/// projection; read in place when `reads_in_place` holds, else copied); -> (b, t, h, d),
/// contiguous. The backward reads the output gradient in (b, t, h, d) order and writes dq
/// (b, t, h, d) and dk, dv (b, t, kv_h, d) contiguous. The caller
/// (`attention::flash_attention_positions_first`) has checked that the kernels take these
/// tensors.
pub fn flash_attention_positions_first(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &AttentionMask<'_>,
) -> Result<Tensor> {
    forward_in_order(q, k, v, scale, mask, Order::PositionsFirst)
}

fn forward_in_order(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &AttentionMask<'_>,
    order: Order,
) -> Result<Tensor> {
    let forward = FlashForward::new(q, k, v, scale, mask, order)?;
    kernel_input(q, order)?.apply_op3(&kernel_input(k, order)?, &kernel_input(v, order)?, forward)
}

/// The forward of [`flash_attention`] (heads first) without autograd, returning (o, lse):
/// lse (b, h, t) f32 is the natural-log sum of exp(scores * scale) of each query row (+inf
/// for a row that sees no key). For benchmarks of [`flash_attention_backward`].
pub fn flash_attention_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &AttentionMask<'_>,
) -> Result<(Tensor, Tensor)> {
    let order = Order::HeadsFirst;
    let forward = FlashForward::new(q, k, v, scale, mask, order)?;
    let o = kernel_input(q, order)?.apply_op3_no_bwd(
        &kernel_input(k, order)?,
        &kernel_input(v, order)?,
        &forward,
    )?;
    let lse = forward.take_lse()?;
    Ok((o, lse))
}

/// The gradients (dq, dk, dv) of [`flash_attention`] (heads first) from its inputs, its
/// output `o`, the LSE of [`flash_attention_with_lse`] and the output's gradient `grad`,
/// each read in place when `reads_in_place` holds; dq, dk, dv come back contiguous. dk
/// and dv of a kv head are summed over the query heads of its group.
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
    backward_in_order(
        &Forwarded { q, k, v, o, lse },
        grad,
        scale,
        mask,
        Order::HeadsFirst,
    )
}

/// What a forward leaves for its backward: its inputs, its output and the LSE.
struct Forwarded<'a> {
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    o: &'a Tensor,
    lse: &'a Tensor,
}

/// The backward in either order: dq in the order and shape of q, dk and dv of k, all three
/// contiguous.
fn backward_in_order(
    forwarded: &Forwarded<'_>,
    grad: &Tensor,
    scale: f64,
    mask: &AttentionMask<'_>,
    order: Order,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "flash_attention_backward";
    let Forwarded { q, k, v, o, lse } = *forwarded;
    let shape = FlashShape::new(op, q.shape(), k.shape(), v.shape(), order)?;
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
    let tensors = [q, k, v, o, grad].map(|x| kernel_input(x, order));
    let [q, k, v, o, grad] = tensors;
    let (q, k, v, o, grad, lse) = (q?, k?, v?, o?, grad?, lse.contiguous()?);

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
    let layouts = Layouts {
        q: Strides::of(q_layout, order, op, "q")?,
        k: Strides::of(inputs.k.1, order, op, "k")?,
        v: Strides::of(inputs.v.1, order, op, "v")?,
        o: Strides::of(inputs.o.1, order, op, "o")?,
        dout: Strides::of(inputs.grad.1, order, op, "grad")?,
        dq: Strides::contiguous(order, shape.heads, shape.positions, shape.head_dim, op)?,
        dk: Strides::contiguous(order, shape.kv_heads, shape.positions, shape.head_dim, op)?,
        dv: Strides::contiguous(order, shape.kv_heads, shape.positions, shape.head_dim, op)?,
    };
    let (dq, dk, dv) = match &q_storage.slice {
        CudaStorageSlice::BF16(q) => {
            let (dq, dk, dv) = backward_typed(
                &device,
                &strided_view(q, q_layout, op, "q")?,
                &inputs,
                shape,
                &layouts,
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
                &strided_view(q, q_layout, op, "q")?,
                &inputs,
                shape,
                &layouts,
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
    // dq's f32 accumulator is laid out as dq itself (contiguous in the call's order), so the
    // cast below is a plain contiguous one
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
    layouts: &Layouts,
    scale: f32,
    mask: KernelMask,
) -> Result<Gradients<T>> {
    let op = "flash_attention_backward";
    let k = strided_view_as::<T>(inputs.k.0, inputs.k.1, op, "k")?;
    let v = strided_view_as::<T>(inputs.v.0, inputs.v.1, op, "v")?;
    let o = strided_view_as::<T>(inputs.o.0, inputs.o.1, op, "o")?;
    let grad = strided_view_as::<T>(inputs.grad.0, inputs.grad.1, op, "grad")?;
    let lse = view(
        inputs.lse.0.as_cuda_slice::<f32>()?,
        inputs.lse.1,
        op,
        "lse",
    )?;
    let delta = backward_delta(device, &o, &grad, shape, layouts)?;
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
        layouts,
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
    /// Where the heads sit in q, k, v and o.
    order: Order,
    /// (b, h, t) f32, set by `cuda_fwd`.
    lse: Mutex<Option<Tensor>>,
}

impl FlashForward {
    /// The op for these inputs, their shapes and the mask checked.
    fn new(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        mask: &AttentionMask<'_>,
        order: Order,
    ) -> Result<Self> {
        let op = order.name();
        let shape = FlashShape::new(op, q.shape(), k.shape(), v.shape(), order)?;
        #[expect(
            clippy::cast_possible_truncation,
            reason = "attention scales are O(1) constants"
        )]
        let scale = scale as f32;
        Ok(Self {
            scale,
            mask: KernelMask::new(mask, shape.positions, op)?,
            segments: segments_for(mask, shape.batch, shape.positions, q, op)?,
            order,
            lse: Mutex::new(None),
        })
    }

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
        let order = self.order;
        let shape = FlashShape::new(
            op,
            q_layout.shape(),
            k_layout.shape(),
            v_layout.shape(),
            order,
        )?;
        let device = q.device.clone();
        let segment_guard = self.segments.as_ref().map(Tensor::storage_and_layout);
        let segments = segments_view(segment_guard.as_ref(), op)?;
        let layouts = Layouts {
            q: Strides::of(q_layout, order, op, "q")?,
            k: Strides::of(k_layout, order, op, "k")?,
            v: Strides::of(v_layout, order, op, "v")?,
            o: Strides::contiguous(order, shape.heads, shape.positions, shape.head_dim, op)?,
            ..Layouts::default()
        };
        let (out, lse) = match &q.slice {
            CudaStorageSlice::BF16(slice) => {
                let (o, lse) = forward_launch(
                    &device,
                    &strided_view(slice, q_layout, op, "q")?,
                    &strided_view_as(k, k_layout, op, "k")?,
                    &strided_view_as(v, v_layout, op, "v")?,
                    segments.as_ref(),
                    shape,
                    &layouts,
                    self.scale,
                    self.mask,
                )?;
                (CudaStorage::wrap_cuda_slice(o, device.clone()), lse)
            }
            CudaStorageSlice::F16(slice) => {
                let (o, lse) = forward_launch(
                    &device,
                    &strided_view(slice, q_layout, op, "q")?,
                    &strided_view_as(k, k_layout, op, "k")?,
                    &strided_view_as(v, v_layout, op, "v")?,
                    segments.as_ref(),
                    shape,
                    &layouts,
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
        let forwarded = Forwarded {
            q,
            k,
            v,
            o: res,
            lse: &lse,
        };
        let (dq, dk, dv) =
            backward_in_order(&forwarded, grad, f64::from(self.scale), &mask, self.order)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// A grid's y dimension of `tiles` tiles (at most 65535: 4M tokens of 64).
fn tile_count(tiles: usize, kernel: &str) -> Result<u32> {
    if tiles > 65_535 {
        bail!("{kernel}: {tiles} tiles of 64 tokens exceed a grid's 65535 rows");
    }
    to_u32(tiles, "tiles", kernel)
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
    layouts: &Layouts,
    scale: f32,
    mask: KernelMask,
) -> Result<(CudaSlice<T>, CudaSlice<f32>)> {
    let kernel = format!("flash_fwd_d{}", shape.head_dim);
    // q, k, v are strided views spanning exactly what their layouts (and so `layouts`)
    // address; o is allocated contiguous with the strides of `layouts.o`
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
        .arg(layouts)
        .arg(&h)
        .arg(&kv_h)
        .arg(&t)
        .arg(&scale)
        .arg(&causal)
        .arg(&window);
    // Heads along x (launched first), tiles along y: every head's heaviest tiles run before
    // any lighter one, which packs the causal triangle's uneven blocks onto the SMs.
    let config = LaunchConfig {
        grid_dim: (
            to_u32(heads_total, "b * h", &kernel)?,
            tile_count(shape.positions.div_ceil(BLOCK_QUERIES), &kernel)?,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared,
    };
    // SAFETY: grid (b * h, query tiles) of 128 threads with the shared memory of FwdSmem;
    // q, k, v hold every element their strides in `layouts` address (views spanning their
    // layouts), segments (b, t) (checked above); out (b * h * t * d, `layouts.o` contiguous
    // in the call's order) and lse (b, h, t) are sized for what the kernel writes; the
    // argument list matches flash_fwd_d<D>_<dtype> (segments: a pointer, null when absent;
    // layouts: the 192-byte Layouts by value).
    unsafe { builder.launch(config) }.w()?;
    Ok((out, lse))
}

/// delta = rowsum(dO * O) in f32, (b, h, t); o and dO read through `layouts.o` and
/// `layouts.dout`.
fn backward_delta<T: KernelFloat>(
    device: &CudaDevice,
    o: &CudaView<'_, T>,
    grad: &CudaView<'_, T>,
    shape: FlashShape,
    layouts: &Layouts,
) -> Result<CudaSlice<f32>> {
    let kernel = "flash_bwd_delta";
    let rows = to_i32(shape.rows(), "rows", kernel)?;
    let h = to_i32(shape.heads, "heads", kernel)?;
    let t = to_i32(shape.positions, "positions", kernel)?;
    let d = to_i32(shape.head_dim, "head_dim", kernel)?;
    let func = function::<T>(device, &FLASH, kernel)?;
    // SAFETY: one warp per row writes each of the rows.
    let mut delta = unsafe { device.alloc::<f32>(shape.rows())? };
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    builder
        .arg(o)
        .arg(grad)
        .arg(&mut delta)
        .arg(layouts)
        .arg(&h)
        .arg(&t)
        .arg(&rows)
        .arg(&d);
    let config = LaunchConfig {
        grid_dim: (to_u32(shape.rows().div_ceil(8), "blocks", kernel)?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: 8 warps a block, one row each, over `rows` = b * h * t rows of d elements, o and
    // grad views spanning what their strides in `layouts` address; arguments match
    // flash_bwd_delta_<dtype>.
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
    layouts: &Layouts,
    scale: f32,
    mask: KernelMask,
) -> Result<Gradients<T>> {
    let kernel = format!("flash_bwd_d{}", shape.head_dim);
    // q, k, v, grad are strided views spanning exactly what their layouts address
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
    builder.arg(&mut dq).arg(&mut dk).arg(&mut dv).arg(layouts);
    builder
        .arg(&h)
        .arg(&kv_h)
        .arg(&t)
        .arg(&scale)
        .arg(&causal)
        .arg(&window);
    // As the forward: heads along x, key tiles along y (the first, which see the most
    // queries, first).
    let config = LaunchConfig {
        grid_dim: (
            to_u32(kv_total, "b * kv_h", &kernel)?,
            tile_count(shape.positions.div_ceil(BLOCK_KEYS), &kernel)?,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared,
    };
    // SAFETY: grid (b * kv_h, key tiles) of 128 threads with the shared memory of BwdSmem;
    // every input holds what its strides in `layouts` address (lse, delta, segments checked
    // above); dq (zeroed, f32), dk and dv are allocated contiguous in the call's order, as
    // `layouts.dq`, `.dk`, `.dv` address them; the argument list matches
    // flash_bwd_d<D>_<dtype>.
    unsafe { builder.launch(config) }.w()?;
    Ok((dq, dk, dv))
}
