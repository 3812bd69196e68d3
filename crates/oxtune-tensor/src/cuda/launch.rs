//! Kernel launches: allocation of outputs and the `launch` calls of `kernels/*.cu`.
//!
//! Unsafe, like the other launch code of `src/cuda/` (each kernel family's file launches its
//! own kernels the same way), the driver calls of `device.rs` and the `Send` of `graph.rs`; no
//! other module of oxtune-tensor is. Each function checks, before it launches, that
//! every input view holds exactly the elements the kernel indexes and that the sizes fit
//! the kernel's integer types; the kernels write every element of the outputs they allocate.
//! Views come from candle storages, so they stay alive (and cudarc orders their events on
//! the device's stream) for the whole launch.
#![allow(
    unsafe_code,
    reason = "launching CUDA kernels and allocating their outputs is unsafe FFI; kept to this module"
)]

use candle_core::cuda::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda::{CudaDType, WrapErr};
use candle_core::{CudaDevice, Layout, Result, WithDType, bail};

/// The dtypes the kernels are compiled for (f32, bf16, f16), as cudarc and candle see them.
pub(crate) trait KernelFloat: DeviceRepr + WithDType + CudaDType {}
impl<T: DeviceRepr + WithDType + CudaDType> KernelFloat for T {}

/// One PTX module: its name in candle's module cache and its text.
pub(super) struct Module {
    pub(super) name: &'static str,
    pub(super) ptx: &'static str,
}

const SOFTMAX: Module = Module {
    name: "oxtune_softmax",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx")),
};
const RMS_NORM: Module = Module {
    name: "oxtune_rms_norm",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx")),
};
const SWIGLU: Module = Module {
    name: "oxtune_swiglu",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx")),
};
const ROPE: Module = Module {
    name: "oxtune_rope",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/rope.ptx")),
};

/// Widest row the dweight kernel of RMSNorm accumulates in: its f32 accumulator plus the
/// reduction scratch stay within the 48 KiB of shared memory a block gets without opting in.
pub(crate) const RMS_NORM_DW_MAX_WIDTH: usize = 12_000;
/// Rows each block of the dweight kernel sums: its rows run one after another (two block
/// reductions each), so narrow rows (q/k norms: d = 128, one warp a block) need many blocks.
const RMS_NORM_DW_ROWS_PER_CHUNK: usize = 32;
/// Bounds on the dweight kernel's blocks (row chunks), hence on the rows of its partial sums:
/// at least enough to fill the GPU, at most what keeps the partials and their sum small.
const RMS_NORM_DW_CHUNKS: std::ops::RangeInclusive<usize> = 256..=8192;

/// Widest row the warp-per-row RMSNorm kernels (`rms_norm_*_warp`) take, `WARP_ROW_MAX` of
/// `kernels/common.cuh`: one warp a row, 8 rows of a 256-thread block at a time, warp
/// shuffles only. Up to this width [`row_threads`] gives a one-block-per-row kernel a single
/// warp, and the warp kernels split and sum a row as that warp does, so y and dx are bit for
/// bit those of the block kernels (which keep the wider rows). Narrow rows are Qwen3's per-head
/// q/k norms (d = 128: 131,072 and 65,536 rows at 4 x 2048 tokens of Qwen3-0.6B), where a
/// block per row ran 32-thread blocks far from the GPU's bandwidth.
const RMS_NORM_WARP_MAX_WIDTH: usize = 256;
/// Threads of a block of the warp kernels: `NORM_WARPS` (8) warps.
const RMS_NORM_WARP_THREADS: u32 = 256;
/// Rows of one block's group in `rms_norm_fwd_warp` and `rms_norm_bwd_dx_warp`: `NORM_WARPS`
/// times `NORM_FWD_ROWS` (3) and `NORM_DX_ROWS` (2) of `kernels/rms_norm.cu`. The grids give
/// each block one group (the kernels loop, so any grid covers every row).
const RMS_NORM_WARP_FWD_ROWS_PER_BLOCK: usize = 24;
const RMS_NORM_WARP_DX_ROWS_PER_BLOCK: usize = 16;
/// Blocks of `rms_norm_bwd_dw_warp`, hence rows of its partial sums: one per 32 rows (4 a
/// warp) up to 1024 (an H200 holds 396 of them, 3 an SM, so 2.6 waves), so Qwen3's 131,072
/// q-norm rows give each warp 16 rows and partials of 1024 x 128 f32 (0.5 MiB, against
/// 67 MB of x and dy read).
const RMS_NORM_WARP_DW_MIN_ROWS_PER_BLOCK: usize = 32;
const RMS_NORM_WARP_DW_MAX_BLOCKS: usize = 1024;

/// Where the rows of an RMSNorm input lie: rows numbered over `dims` (outer, middle, inner)
/// in row-major order, row (a, b, c) starting a * strides[0] + b * strides[1] + c * strides[2]
/// elements after the first. A contiguous input is (1, 1, rows) with strides (0, 0, width);
/// a (b, t, heads, d) view with contiguous rows of d (the heads of q in a packed q/k/v
/// projection) is (b, t, heads) with its own strides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RowLayout {
    pub dims: [usize; 3],
    pub strides: [usize; 3],
}

impl RowLayout {
    pub(crate) fn contiguous(rows: usize, width: usize) -> Self {
        Self {
            dims: [1, 1, rows],
            strides: [0, 0, width],
        }
    }

    /// The rows of `layout` when the kernels can read them in place: contiguous, or at most
    /// three dimensions before a contiguous last one; `None` otherwise (copy it first).
    pub(crate) fn of(layout: &Layout) -> Option<Self> {
        let dims = layout.shape().dims();
        let (&width, lead) = dims.split_last()?;
        if layout.is_contiguous() {
            return Some(Self::contiguous(lead.iter().product(), width));
        }
        let (&last_stride, lead_strides) = layout.stride().split_last()?;
        if (last_stride != 1 && width != 1) || lead.len() > 3 {
            return None;
        }
        let mut rows = Self {
            dims: [1; 3],
            strides: [0; 3],
        };
        let skip = 3 - lead.len();
        rows.dims[skip..].copy_from_slice(lead);
        rows.strides[skip..].copy_from_slice(lead_strides);
        Some(rows)
    }

    pub(crate) fn rows(self) -> usize {
        self.dims.iter().product()
    }

    /// Elements from the first row's start to the end of the last row (of `width`).
    pub(crate) fn extent(self, width: usize) -> usize {
        if self.rows() == 0 || width == 0 {
            return 0;
        }
        self.dims
            .iter()
            .zip(self.strides)
            .map(|(&n, stride)| (n - 1) * stride)
            .sum::<usize>()
            + width
    }

    /// (middle, inner, outer stride, middle stride, inner stride), the kernels' last
    /// arguments.
    fn args(self, kernel: &str) -> Result<(u32, u32, i64, i64, i64)> {
        let stride = |value: usize| {
            i64::try_from(value)
                .or_else(|_| bail!("{kernel}: a row stride {value} does not fit an i64"))
        };
        Ok((
            to_u32(self.dims[1], "rows' middle dimension", kernel)?,
            to_u32(self.dims[2], "rows' inner dimension", kernel)?,
            stride(self.strides[0])?,
            stride(self.strides[1])?,
            stride(self.strides[2])?,
        ))
    }
}

/// Causal masking of a softmax row: rows are (.., queries, keys) and query i sees keys
/// j <= i + past.
#[derive(Clone, Copy, Debug)]
pub struct Causal {
    /// Queries (rows) per attention matrix: the second-to-last dimension of the scores.
    pub queries: usize,
    /// Keys before the first query (cached tokens).
    pub past: usize,
}

/// The kernel `<root>_<dtype>` of a module, loaded into the device's context on first use.
pub(super) fn function<T: WithDType>(
    device: &CudaDevice,
    module: &Module,
    root: &str,
) -> Result<CudaFunction> {
    let name = format!("{root}_{}", T::DTYPE.as_str());
    Ok(device
        .get_or_load_custom_func(&name, module.name, module.ptx)?
        .into_cuda_function())
}

pub(super) fn to_i32(value: usize, what: &str, kernel: &str) -> Result<i32> {
    i32::try_from(value).or_else(|_| bail!("{kernel}: {what} = {value} does not fit an i32"))
}

pub(super) fn to_u32(value: usize, what: &str, kernel: &str) -> Result<u32> {
    u32::try_from(value).or_else(|_| bail!("{kernel}: {what} = {value} does not fit a u32"))
}

pub(super) fn expect_len<T>(
    view: &CudaView<'_, T>,
    expected: usize,
    what: &str,
    kernel: &str,
) -> Result<()> {
    if view.len() != expected {
        bail!(
            "{kernel}: {what} holds {} elements, the kernel indexes {expected}",
            view.len()
        );
    }
    Ok(())
}

/// Threads of a one-block-per-row kernel: about 8 elements a thread, a whole number of
/// warps, 32 to 1024.
pub(super) fn row_threads(width: usize) -> u32 {
    let threads = width.div_ceil(8).next_multiple_of(32).clamp(32, 1024);
    u32::try_from(threads).expect("at most 1024")
}

fn row_config(rows: u32, width: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows, 1, 1),
        block_dim: (row_threads(width), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride launch of 256-thread blocks over `items` work items.
fn flat_config(items: usize, kernel: &str) -> Result<LaunchConfig> {
    let blocks = to_u32(items.div_ceil(256).max(1), "blocks", kernel)?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn causal_args(causal: Option<Causal>, width: usize, kernel: &str) -> Result<(i32, i32, i32)> {
    Ok(match causal {
        None => (0, 1, 0),
        Some(Causal { queries, past }) => {
            if queries == 0 {
                bail!("{kernel}: causal masking over 0 queries");
            }
            (
                1,
                to_i32(queries, "queries", kernel)?,
                // keys past the row's end are never visible anyway
                to_i32(past.min(width), "past", kernel)?,
            )
        }
    })
}

/// y = softmax(scale * x) over rows of `width`, causally masked if asked.
pub(crate) fn softmax_fwd<T: KernelFloat>(
    device: &CudaDevice,
    xs: &CudaView<'_, T>,
    rows: usize,
    width: usize,
    scale: f32,
    causal: Option<Causal>,
) -> Result<CudaSlice<T>> {
    let kernel = "softmax_fwd";
    let count = rows * width;
    expect_len(xs, count, "x", kernel)?;
    let (is_causal, queries, past) = causal_args(causal, width, kernel)?;
    let (n, grid) = (
        to_i32(width, "width", kernel)?,
        to_i32(rows, "rows", kernel)?,
    );
    let func = function::<T>(device, &SOFTMAX, kernel)?;
    // SAFETY: the kernel writes all rows * width elements (zeros in the masked tail).
    let mut out = unsafe { device.alloc::<T>(count)? };
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    builder.arg(xs).arg(&mut out).arg(&n).arg(&scale);
    builder.arg(&is_causal).arg(&queries).arg(&past);
    let config = row_config(grid.unsigned_abs(), width);
    // SAFETY: one block per row over `rows` rows of `width` elements, the length of x and
    // out checked above; the argument list matches softmax_fwd_<dtype> in softmax.cu.
    unsafe { builder.launch(config) }.w()?;
    Ok(out)
}

/// dx = scale * y * (dy - sum(dy * y)) over rows of `width`.
pub(crate) fn softmax_bwd<T: KernelFloat>(
    device: &CudaDevice,
    ys: &CudaView<'_, T>,
    grad: &CudaView<'_, T>,
    rows: usize,
    width: usize,
    scale: f32,
    causal: Option<Causal>,
) -> Result<CudaSlice<T>> {
    let kernel = "softmax_bwd";
    let count = rows * width;
    expect_len(ys, count, "y", kernel)?;
    expect_len(grad, count, "dy", kernel)?;
    let (is_causal, queries, past) = causal_args(causal, width, kernel)?;
    let (n, grid) = (
        to_i32(width, "width", kernel)?,
        to_i32(rows, "rows", kernel)?,
    );
    let func = function::<T>(device, &SOFTMAX, kernel)?;
    // SAFETY: the kernel writes all rows * width elements (zeros in the masked tail).
    let mut out = unsafe { device.alloc::<T>(count)? };
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    builder.arg(ys).arg(grad).arg(&mut out).arg(&n).arg(&scale);
    builder.arg(&is_causal).arg(&queries).arg(&past);
    // SAFETY: one block per row; lengths of y, dy and dx checked above; arguments match
    // softmax_bwd_<dtype>.
    unsafe { builder.launch(row_config(grid.unsigned_abs(), width)) }.w()?;
    Ok(out)
}

/// The launch of a warp-per-row RMSNorm kernel over `rows` rows, `rows_per_block` a block.
fn rms_norm_warp_config(rows: usize, rows_per_block: usize, kernel: &str) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (
            to_u32(rows.div_ceil(rows_per_block).max(1), "blocks", kernel)?,
            1,
            1,
        ),
        block_dim: (RMS_NORM_WARP_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// y = T(x * rsqrt(mean(x^2) + eps)) * w over rows of `width`; x's rows lie as `x_rows`
/// says (`xs` spans their extent), y is contiguous. Rows of at most
/// [`RMS_NORM_WARP_MAX_WIDTH`] take `rms_norm_fwd_warp`, wider ones `rms_norm_fwd` (a block
/// per row).
pub(crate) fn rms_norm_fwd<T: KernelFloat>(
    device: &CudaDevice,
    xs: &CudaView<'_, T>,
    x_rows: RowLayout,
    weight: &CudaView<'_, T>,
    width: usize,
    eps: f32,
) -> Result<CudaSlice<T>> {
    let narrow = width <= RMS_NORM_WARP_MAX_WIDTH;
    let kernel = if narrow {
        "rms_norm_fwd_warp"
    } else {
        "rms_norm_fwd"
    };
    let rows = x_rows.rows();
    let count = rows * width;
    expect_len(xs, x_rows.extent(width), "x", kernel)?;
    expect_len(weight, width, "weight", kernel)?;
    let (middle, inner, outer_stride, middle_stride, inner_stride) = x_rows.args(kernel)?;
    let (n, rows_i32) = (
        to_i32(width, "width", kernel)?,
        to_i32(rows, "rows", kernel)?,
    );
    let config = if narrow {
        rms_norm_warp_config(rows, RMS_NORM_WARP_FWD_ROWS_PER_BLOCK, kernel)?
    } else {
        row_config(rows_i32.unsigned_abs(), width)
    };
    let func = function::<T>(device, &RMS_NORM, kernel)?;
    // SAFETY: the kernel writes every element of every row.
    let mut out = unsafe { device.alloc::<T>(count)? };
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    builder.arg(xs).arg(weight).arg(&mut out);
    if narrow {
        builder.arg(&rows_i32);
    }
    builder.arg(&n).arg(&eps);
    builder.arg(&middle).arg(&inner);
    builder
        .arg(&outer_stride)
        .arg(&middle_stride)
        .arg(&inner_stride);
    // SAFETY: a block per row (rms_norm_fwd), or warps looping over rows [0, rows) (the warp
    // kernel, given the row count); x spans every row's extent, w and y their lengths
    // (checked above); arguments match rms_norm_fwd_<dtype> / rms_norm_fwd_warp_<dtype> in
    // rms_norm.cu.
    unsafe { builder.launch(config) }.w()?;
    Ok(out)
}

/// dx of RMSNorm, a warp per row up to [`RMS_NORM_WARP_MAX_WIDTH`] (`rms_norm_bwd_dx_warp`),
/// else a block per row; x's rows lie as `x_rows` says, dy and dx are contiguous.
pub(crate) fn rms_norm_bwd_dx<T: KernelFloat>(
    device: &CudaDevice,
    xs: &CudaView<'_, T>,
    x_rows: RowLayout,
    weight: &CudaView<'_, T>,
    grad: &CudaView<'_, T>,
    width: usize,
    eps: f32,
) -> Result<CudaSlice<T>> {
    let narrow = width <= RMS_NORM_WARP_MAX_WIDTH;
    let kernel = if narrow {
        "rms_norm_bwd_dx_warp"
    } else {
        "rms_norm_bwd_dx"
    };
    let rows = x_rows.rows();
    let count = rows * width;
    expect_len(xs, x_rows.extent(width), "x", kernel)?;
    expect_len(weight, width, "weight", kernel)?;
    expect_len(grad, count, "dy", kernel)?;
    let (middle, inner, outer_stride, middle_stride, inner_stride) = x_rows.args(kernel)?;
    let (n, rows_i32) = (
        to_i32(width, "width", kernel)?,
        to_i32(rows, "rows", kernel)?,
    );
    let config = if narrow {
        rms_norm_warp_config(rows, RMS_NORM_WARP_DX_ROWS_PER_BLOCK, kernel)?
    } else {
        row_config(rows_i32.unsigned_abs(), width)
    };
    let func = function::<T>(device, &RMS_NORM, kernel)?;
    // SAFETY: the kernel writes every element of every row.
    let mut out = unsafe { device.alloc::<T>(count)? };
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    builder.arg(xs).arg(weight).arg(grad).arg(&mut out);
    if narrow {
        builder.arg(&rows_i32);
    }
    builder.arg(&n).arg(&eps);
    builder.arg(&middle).arg(&inner);
    builder
        .arg(&outer_stride)
        .arg(&middle_stride)
        .arg(&inner_stride);
    // SAFETY: a block per row, or warps looping over rows [0, rows) (the warp kernel, given
    // the row count); x spans every row's extent, w, dy and dx their lengths (checked
    // above); arguments match rms_norm_bwd_dx_<dtype> / rms_norm_bwd_dx_warp_<dtype>.
    unsafe { builder.launch(config) }.w()?;
    Ok(out)
}

/// f32 partial sums of RMSNorm's dweight, (chunks, width): sum them over the chunks. x's
/// rows lie as `x_rows` says, dy is contiguous. Rows of at most [`RMS_NORM_WARP_MAX_WIDTH`]
/// take `rms_norm_bwd_dw_warp` (each warp sums its rows in registers, 8 warps a chunk), wider
/// ones `rms_norm_bwd_dw` (a chunk's rows one after another in shared memory).
pub(crate) fn rms_norm_bwd_dw<T: KernelFloat>(
    device: &CudaDevice,
    xs: &CudaView<'_, T>,
    x_rows: RowLayout,
    grad: &CudaView<'_, T>,
    width: usize,
    eps: f32,
) -> Result<(CudaSlice<f32>, usize)> {
    let narrow = width <= RMS_NORM_WARP_MAX_WIDTH;
    let kernel = if narrow {
        "rms_norm_bwd_dw_warp"
    } else {
        "rms_norm_bwd_dw"
    };
    let rows = x_rows.rows();
    let count = rows * width;
    expect_len(xs, x_rows.extent(width), "x", kernel)?;
    expect_len(grad, count, "dy", kernel)?;
    let (middle, inner, outer_stride, middle_stride, inner_stride) = x_rows.args(kernel)?;
    if width > RMS_NORM_DW_MAX_WIDTH {
        bail!("{kernel}: width {width} > {RMS_NORM_DW_MAX_WIDTH} (its shared-memory accumulator)");
    }
    let chunks = if narrow {
        rows.div_ceil(RMS_NORM_WARP_DW_MIN_ROWS_PER_BLOCK)
            .clamp(1, RMS_NORM_WARP_DW_MAX_BLOCKS)
    } else {
        rows.div_ceil(RMS_NORM_DW_ROWS_PER_CHUNK)
            .clamp(*RMS_NORM_DW_CHUNKS.start(), *RMS_NORM_DW_CHUNKS.end())
            .clamp(1, rows.max(1))
    };
    let rows_per_chunk = rows.div_ceil(chunks).max(1);
    let n = to_i32(width, "width", kernel)?;
    let rows_i32 = to_i32(rows, "rows", kernel)?;
    let per_chunk = to_i32(rows_per_chunk, "rows per chunk", kernel)?;
    let func = function::<T>(device, &RMS_NORM, kernel)?;
    // SAFETY: each of the `chunks` blocks writes its whole row of `width` partial sums
    // (zeros when its chunk of rows is empty).
    let mut out = unsafe { device.alloc::<f32>(chunks * width)? };
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    builder.arg(xs).arg(grad).arg(&mut out);
    builder.arg(&rows_i32).arg(&per_chunk).arg(&n).arg(&eps);
    builder.arg(&middle).arg(&inner);
    builder
        .arg(&outer_stride)
        .arg(&middle_stride)
        .arg(&inner_stride);
    let config = if narrow {
        LaunchConfig {
            grid_dim: (to_u32(chunks, "chunks", kernel)?, 1, 1),
            block_dim: (RMS_NORM_WARP_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    } else {
        LaunchConfig {
            grid_dim: (to_u32(chunks, "chunks", kernel)?, 1, 1),
            block_dim: (row_threads(width), 1, 1),
            shared_mem_bytes: to_u32(width * 4, "shared memory", kernel)?,
        }
    };
    // SAFETY: `chunks` blocks cover rows [0, rows) in chunks of rows_per_chunk; x spans every
    // row's extent, dy holds rows * width (checked); the block kernel's f32 accumulator
    // (width * 4 <= 48_000 bytes, plus 128 bytes of static scratch) is within the 48 KiB a
    // block may use without opting in (the warp kernel's is 8 KiB, static); out holds
    // chunks * width; arguments match rms_norm_bwd_dw_<dtype> / rms_norm_bwd_dw_warp_<dtype>.
    unsafe { builder.launch(config) }.w()?;
    Ok((out, chunks))
}

/// The rows a SwiGLU launch reads: `rows` rows of `width` elements, row r of gate and of up
/// `r * stride` elements after their first. `ops::swiglu` is one flat row of two contiguous
/// tensors; `ops::swiglu_packed` rows of one (rows, 2 * width) [gate | up] tensor (stride
/// 2 * width, up `width` after gate). The output is contiguous (rows, width); the backward's
/// (dgate, dup) buffer has the inputs' rows: (2, count) for a flat row, (rows, 2 * width)
/// [dgate | dup] when packed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SwigluRows {
    pub rows: usize,
    pub width: usize,
    pub packed: bool,
}

impl SwigluRows {
    /// One flat row of `count` elements of two tensors.
    pub(crate) fn flat(count: usize) -> Self {
        Self {
            rows: 1,
            width: count,
            packed: false,
        }
    }

    /// `rows` rows of a packed (rows, 2 * width) [gate | up] tensor.
    pub(crate) fn packed(rows: usize, width: usize) -> Self {
        Self {
            rows,
            width,
            packed: true,
        }
    }

    fn count(self) -> usize {
        self.rows * self.width
    }

    /// Elements between consecutive rows of gate, up and the (dgate, dup) buffer.
    fn stride(self) -> usize {
        if self.packed {
            2 * self.width
        } else {
            self.width
        }
    }

    /// Where dup starts in the (dgate, dup) buffer (and up in a packed input).
    fn up_offset(self) -> usize {
        if self.packed {
            self.width
        } else {
            self.count()
        }
    }

    /// Elements from the start of gate's (or up's) first row to the end of its last.
    pub(crate) fn extent(self) -> usize {
        if self.count() == 0 {
            0
        } else {
            (self.rows - 1) * self.stride() + self.width
        }
    }

    /// (rows, width, stride) as the kernels take them.
    fn args(self) -> [u64; 3] {
        [self.rows as u64, self.width as u64, self.stride() as u64]
    }
}

/// y = silu(gate) * up over the rows of `shape`, written contiguous (rows, width).
pub(crate) fn swiglu_fwd<T: KernelFloat>(
    device: &CudaDevice,
    gate: &CudaView<'_, T>,
    up: &CudaView<'_, T>,
    shape: SwigluRows,
) -> Result<CudaSlice<T>> {
    let kernel = "swiglu_fwd";
    let count = shape.count();
    expect_len(gate, shape.extent(), "gate", kernel)?;
    expect_len(up, shape.extent(), "up", kernel)?;
    let func = function::<T>(device, &SWIGLU, kernel)?;
    // SAFETY: the grid-stride loop writes all `count` elements.
    let mut out = unsafe { device.alloc::<T>(count)? };
    let [rows, width, stride] = shape.args();
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    builder.arg(gate).arg(up).arg(&mut out);
    builder.arg(&rows).arg(&width).arg(&stride);
    let config = flat_config(count.div_ceil(16 / std::mem::size_of::<T>()), kernel)?;
    // SAFETY: grid-stride over rows * width elements; gate and up hold the rows' extent and
    // y rows * width (checked above); arguments match swiglu_fwd_<dtype> in swiglu.cu.
    unsafe { builder.launch(config) }.w()?;
    Ok(out)
}

/// (dgate, dup) of SwiGLU as one buffer of 2 * count elements laid out as `shape` says.
pub(crate) fn swiglu_bwd<T: KernelFloat>(
    device: &CudaDevice,
    gate: &CudaView<'_, T>,
    up: &CudaView<'_, T>,
    grad: &CudaView<'_, T>,
    shape: SwigluRows,
) -> Result<CudaSlice<T>> {
    let kernel = "swiglu_bwd";
    let count = shape.count();
    expect_len(gate, shape.extent(), "gate", kernel)?;
    expect_len(up, shape.extent(), "up", kernel)?;
    expect_len(grad, count, "dy", kernel)?;
    let func = function::<T>(device, &SWIGLU, kernel)?;
    // SAFETY: the grid-stride loop writes dgate and dup of every element: the two halves of
    // a flat row's (2, count), both halves of every packed row.
    let mut out = unsafe { device.alloc::<T>(2 * count)? };
    let [rows, width, stride] = shape.args();
    let up_offset = shape.up_offset() as u64;
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    builder.arg(gate).arg(up).arg(grad).arg(&mut out);
    builder.arg(&rows).arg(&width).arg(&stride).arg(&up_offset);
    let config = flat_config(count.div_ceil(16 / std::mem::size_of::<T>()), kernel)?;
    // SAFETY: grid-stride over rows * width elements; gate and up hold the rows' extent, dy
    // rows * width, out 2 * rows * width, and the last dup element (up_offset + extent - 1)
    // is its last (checked above); arguments match swiglu_bwd_<dtype>.
    unsafe { builder.launch(config) }.w()?;
    Ok(out)
}

/// The shape of a RoPE launch: x (batch, heads, positions, head_dim) with `x_strides` over its
/// first three dimensions (its rows contiguous); tables (positions, head_dim / 2), or (batch,
/// positions, head_dim / 2) when `per_batch`. The output is contiguous (batch, heads,
/// positions, head_dim), or (batch, positions, heads, head_dim) when `transposed_out`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RopeShape {
    pub batch: usize,
    pub heads: usize,
    pub positions: usize,
    pub head_dim: usize,
    pub per_batch: bool,
    pub x_strides: [usize; 3],
    pub transposed_out: bool,
}

/// Rotates x by (cos, sign * sin): sign 1 is the forward, -1 the backward. `xs` starts at x's
/// first element and spans its strided extent.
pub(crate) fn rope<T: KernelFloat>(
    device: &CudaDevice,
    xs: &CudaView<'_, T>,
    cos: &CudaView<'_, T>,
    sin: &CudaView<'_, T>,
    shape: RopeShape,
    sign: f32,
) -> Result<CudaSlice<T>> {
    let kernel = "rope";
    let RopeShape {
        batch,
        heads,
        positions,
        head_dim,
        per_batch,
        x_strides,
        transposed_out,
    } = shape;
    if head_dim % 2 != 0 {
        bail!("{kernel}: head_dim {head_dim} is odd");
    }
    let rows = batch * heads * positions;
    let count = rows * head_dim;
    let half = head_dim / 2;
    let table = if per_batch { batch } else { 1 } * positions * half;
    let extent = if count == 0 {
        0
    } else {
        [batch, heads, positions]
            .iter()
            .zip(x_strides)
            .map(|(&n, stride)| (n - 1) * stride)
            .sum::<usize>()
            + head_dim
    };
    expect_len(xs, extent, "x", kernel)?;
    expect_len(cos, table, "cos", kernel)?;
    expect_len(sin, table, "sin", kernel)?;
    let y_strides = if transposed_out {
        [positions * heads * head_dim, head_dim, heads * head_dim]
    } else {
        [heads * positions * head_dim, positions * head_dim, head_dim]
    };
    let strides = |values: [usize; 3], what: &str| -> Result<[i64; 3]> {
        let mut out = [0i64; 3];
        for (slot, value) in out.iter_mut().zip(values) {
            *slot = i64::try_from(value)
                .map_err(|_| candle_core::Error::Msg(format!("{kernel}: {what} stride {value}")))?;
        }
        Ok(out)
    };
    let [xb, xh, xt] = strides(x_strides, "x")?;
    let [yb, yh, yt] = strides(y_strides, "y")?;
    let h = to_i32(heads, "heads", kernel)?;
    let t = to_i32(positions, "positions", kernel)?;
    let d = to_i32(head_dim, "head_dim", kernel)?;
    let per_batch = i32::from(per_batch);
    let rows_u64 = rows as u64;
    let func = function::<T>(device, &ROPE, kernel)?;
    // SAFETY: the grid-stride loop writes both halves of every row.
    let mut out = unsafe { device.alloc::<T>(count)? };
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    builder.arg(xs).arg(cos).arg(sin).arg(&mut out);
    builder
        .arg(&h)
        .arg(&t)
        .arg(&d)
        .arg(&per_batch)
        .arg(&sign)
        .arg(&rows_u64);
    builder
        .arg(&xb)
        .arg(&xh)
        .arg(&xt)
        .arg(&yb)
        .arg(&yh)
        .arg(&yt);
    let vector = 16 / std::mem::size_of::<T>();
    let items = rows
        * if half % vector == 0 {
            half / vector
        } else {
            half
        };
    // SAFETY: grid-stride over rows * head_dim / 2 pairs; every row of x lies in its extent
    // and y holds rows * head_dim elements in either order, the tables what the kernel
    // indexes (checked above); arguments match rope_<dtype> in rope.cu.
    unsafe { builder.launch(flat_config(items, kernel)?) }.w()?;
    Ok(out)
}
