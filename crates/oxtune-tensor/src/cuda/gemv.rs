//! Linear layers for the few rows of a decode step (`kernels/gemv.cu`), for
//! [`crate::ops::linear_rows`] and [`crate::ops::swiglu_linear_rows`]. Inference only: no
//! backward (the ops take candle's matmuls when an input tracks a gradient).
//!
//! candle's custom ops take at most three tensors, so the op is a `CustomOp1` on x that holds
//! the weights and biases and read-locks their storages inside its forward, each storage once
//! (they must all differ from x's and from each other's, which [`gemv_takes`] checks: a
//! storage read-locked twice by one thread can deadlock behind a waiting writer).
#![allow(
    unsafe_code,
    reason = "launching a CUDA kernel and allocating its output is unsafe FFI; kept to the cuda module"
)]

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, bail,
};

use super::launch::{KernelFloat, Module, function, to_i32, to_u32};
use super::{no_cpu, storage_address};

const GEMV: Module = Module {
    name: "oxtune_gemv",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/gemv.ptx")),
};

/// Rows the kernels take (`GEMV_MAX_ROWS`).
pub const GEMV_MAX_ROWS: usize = 8;
/// Weights one `linear_rows` launch takes.
pub const GEMV_MAX_WEIGHTS: usize = 4;
/// Warps per block (`GEMV_WARPS`).
const WARPS: usize = 8;

/// Weights up to this many bytes: all of a Qwen3-0.6B layer's.
const SMALL_WEIGHTS_BYTES: usize = 16 << 20;

/// Whether the kernel beats candle's matmul (cuBLAS) for `rows` rows of x (.., k) times
/// `weights` weights (a SwiGLU pair when `swiglu`) of `bytes` bytes, from the H200 timings of
/// `tests/cuda_gemv.rs` (kernels/README.md): one launch for several weights (q|k|v, or gate
/// and up with the SwiGLU) wins at every row count for small weights, up to 4 rows for 8B's
/// q|k|v (k <= 4096) and up to 2 for 8B's gate/up pair; a single weight only at 1 or 2 rows
/// and when small (a single large weight streams as fast through cuBLAS, and from 4 rows on
/// the kernel's 2 x 8 accumulators per lane cost more than the padding cuBLAS pays).
pub fn gemv_pays(rows: usize, k: usize, weights: usize, bytes: usize, swiglu: bool) -> bool {
    let small = bytes <= SMALL_WEIGHTS_BYTES;
    if swiglu {
        small || rows <= 2
    } else if weights >= 2 {
        small || (rows <= 4 && k <= 4096)
    } else {
        small && rows <= 2
    }
}

/// Whether the kernels take x (.., k) times `weights` (n_i, k) (+ `biases`): one CUDA device
/// and dtype (f32, bf16, f16), nothing tracking a gradient, at most [`GEMV_MAX_ROWS`] rows,
/// k a multiple of 8, x and weights with contiguous rows starting 16-byte aligned, contiguous
/// biases, and every storage distinct.
pub(crate) fn gemv_takes(xs: &Tensor, weights: &[&Tensor], biases: &[Option<&Tensor>]) -> bool {
    let Some(&k) = xs.dims().last() else {
        return false;
    };
    let rows = xs.elem_count() / k.max(1);
    let mut all: Vec<&Tensor> = vec![xs];
    all.extend(weights);
    all.extend(biases.iter().flatten());
    let element = xs.dtype().size_in_bytes();
    let aligned_rows = |w: &&Tensor| {
        w.rank() == 2
            && w.dim(1).ok() == Some(k)
            && w.stride() == [k, 1]
            && (w.layout().start_offset() * element).is_multiple_of(16)
    };
    let mut addresses: Vec<usize> = all.iter().map(|t| storage_address(t)).collect();
    addresses.sort_unstable();
    addresses.dedup();
    super::applies(&all)
        && (1..=GEMV_MAX_WEIGHTS).contains(&weights.len())
        && biases.len() == weights.len()
        && (1..=GEMV_MAX_ROWS).contains(&rows)
        && k.is_multiple_of(8)
        // x is loaded in 16-byte vectors: a contiguous view (which `contiguous()` keeps as
        // it is) must start aligned
        && (!xs.is_contiguous() || (xs.layout().start_offset() * element).is_multiple_of(16))
        && !all.iter().any(|t| t.track_op())
        && weights.iter().all(aligned_rows)
        && biases
            .iter()
            .zip(weights)
            .all(|(b, w)| b.is_none_or(|b| b.is_contiguous() && b.dims() == [w.dims()[0]]))
        && addresses.len() == all.len()
}

/// x (.., k) times each weight's transpose, plus its bias, concatenated on the last
/// dimension: (.., n_0 + n_1 + ..). Errors where [`gemv_takes`] refuses the inputs.
pub fn linear_rows(xs: &Tensor, weights: &[&Tensor], biases: &[Option<&Tensor>]) -> Result<Tensor> {
    if !gemv_takes(xs, weights, biases) {
        bail!(
            "linear_rows: the kernel takes 1 to {GEMV_MAX_WEIGHTS} f32/bf16/f16 weights of one \
             CUDA device tracking no gradient, at most {GEMV_MAX_ROWS} rows, k a multiple of 8, \
             16-byte aligned weight rows and storages distinct from each other"
        );
    }
    gemv_launch(xs, weights, biases, false)
}

/// silu(x gate^T) * (x up^T): (.., n) from gate and up (n, k). Errors where [`gemv_takes`]
/// refuses the inputs.
pub fn swiglu_linear_rows(xs: &Tensor, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !gemv_takes(xs, &[gate, up], &[None, None]) || gate.dims() != up.dims() {
        bail!(
            "swiglu_linear_rows: the kernel takes gate and up of one shape, f32/bf16/f16 on one \
             CUDA device tracking no gradient, at most {GEMV_MAX_ROWS} rows, k a multiple of \
             8, 16-byte aligned rows and distinct storages"
        );
    }
    gemv_launch(xs, &[gate, up], &[None, None], true)
}

/// The kernel on inputs [`gemv_takes`] accepted (gate and up of one shape when `swiglu`):
/// (.., n_0 + n_1 + ..), or (.., n) for the SwiGLU pair.
pub(crate) fn gemv_launch(
    xs: &Tensor,
    weights: &[&Tensor],
    biases: &[Option<&Tensor>],
    swiglu: bool,
) -> Result<Tensor> {
    let op = Gemv {
        weights: weights.iter().map(|&w| w.clone()).collect(),
        biases: biases.iter().map(|b| b.cloned()).collect(),
        swiglu,
    };
    let n: usize = if swiglu {
        weights[0].dims()[0]
    } else {
        weights.iter().map(|w| w.dims()[0]).sum()
    };
    let xs = xs.contiguous()?;
    let out = xs.apply_op1_no_bwd(&op)?;
    let mut dims = xs.dims().to_vec();
    *dims.last_mut().expect("checked rank") = n;
    out.reshape(dims)
}

/// The launch: x is the op's input, the weights and biases ride along.
struct Gemv {
    weights: Vec<Tensor>,
    biases: Vec<Option<Tensor>>,
    swiglu: bool,
}

/// A tensor's elements as a view of its CUDA storage (checked contiguous from its offset).
fn tensor_view<'a, T: KernelFloat>(
    storage: &'a Storage,
    tensor: &Tensor,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(storage) = storage else {
        bail!("linear_rows: {what} is not on a CUDA device");
    };
    let slice = storage.as_cuda_slice::<T>()?;
    let start = tensor.layout().start_offset();
    let end = start + tensor.elem_count();
    slice
        .try_slice(start..end)
        .ok_or_else(|| candle_core::Error::Msg(format!("linear_rows: {what} out of its storage")))
}

impl Gemv {
    fn launch<T: KernelFloat>(
        &self,
        device: &CudaDevice,
        x: &CudaView<'_, T>,
        rows: usize,
        k: usize,
    ) -> Result<CudaSlice<T>> {
        let kernel = if self.swiglu {
            "swiglu_linear_rows"
        } else {
            "linear_rows"
        };
        if x.len() != rows * k {
            bail!("{kernel}: x holds {} elements, not {rows} x {k}", x.len());
        }
        // Each storage read-locked once (gemv_takes checked they are distinct).
        let weight_guards: Vec<_> = self
            .weights
            .iter()
            .map(Tensor::storage_and_layout)
            .collect();
        let weights = self
            .weights
            .iter()
            .zip(&weight_guards)
            .map(|(w, (guard, _))| tensor_view::<T>(guard, w, "a weight"))
            .collect::<Result<Vec<_>>>()?;
        let bias_guards: Vec<_> = self
            .biases
            .iter()
            .map(|b| b.as_ref().map(Tensor::storage_and_layout))
            .collect();
        let biases = self
            .biases
            .iter()
            .zip(&bias_guards)
            .map(|(b, guard)| match (b, guard) {
                (Some(b), Some((guard, _))) => tensor_view::<T>(guard, b, "a bias").map(Some),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let widths: Vec<usize> = self.weights.iter().map(|w| w.dims()[0]).collect();
        let n = if self.swiglu {
            widths[0]
        } else {
            widths.iter().sum()
        };
        let func = function::<T>(device, &GEMV, kernel)?;
        // SAFETY: the kernel writes all rows * n outputs (every column j < n by one warp).
        let mut out = unsafe { device.alloc::<T>(rows * n)? };
        let (n_arg, rows_arg, k_arg) = (
            to_i32(n, "outputs", kernel)?,
            to_i32(rows, "rows", kernel)?,
            to_i32(k, "k", kernel)?,
        );
        let stream = device.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder.arg(x);
        if self.swiglu {
            builder.arg(&weights[0]).arg(&weights[1]);
        } else {
            // Absent weights and biases are never read (their ranges are empty, their bits
            // unset); any valid pointer stands in.
            for index in 0..GEMV_MAX_WEIGHTS {
                builder.arg(weights.get(index).unwrap_or(&weights[0]));
            }
            for index in 0..GEMV_MAX_WEIGHTS {
                match biases.get(index).and_then(Option::as_ref) {
                    Some(bias) => builder.arg(bias),
                    None => builder.arg(x),
                };
            }
        }
        let ends: Vec<i32> = widths
            .iter()
            .scan(0, |end, width| {
                *end += width;
                Some(*end)
            })
            .map(|end| to_i32(end, "outputs", kernel))
            .chain(std::iter::repeat_with(|| Ok(n_arg)))
            .take(3)
            .collect::<Result<_>>()?;
        let has_bias: i32 = biases
            .iter()
            .enumerate()
            .filter(|(_, b)| b.is_some())
            .map(|(index, _)| 1 << index)
            .sum();
        if !self.swiglu {
            builder
                .arg(&ends[0])
                .arg(&ends[1])
                .arg(&ends[2])
                .arg(&n_arg)
                .arg(&has_bias);
        } else {
            builder.arg(&n_arg);
        }
        builder.arg(&rows_arg).arg(&k_arg).arg(&mut out);
        // linear_rows: a warp per two output columns; swiglu_linear_rows: a warp per column
        // (gate and up rows together).
        let columns_per_block = if self.swiglu { WARPS } else { 2 * WARPS };
        let config = LaunchConfig {
            grid_dim: (
                to_u32(n.div_ceil(columns_per_block), "blocks", kernel)?,
                1,
                1,
            ),
            block_dim: (to_u32(WARPS * 32, "threads", kernel)?, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every output column is covered (two per warp for linear_rows, one for
        // swiglu_linear_rows, over the blocks above of 8 warps); x holds rows
        // * k elements, each weight view (n_i, k) and each bias view n_i (gemv_takes checked
        // the shapes, 16-byte aligned rows and k % 8 == 0 for the vector loads); out holds rows
        // * n; arguments match `linear_rows_<dtype>` / `swiglu_linear_rows_<dtype>` in gemv.cu.
        unsafe { builder.launch(config) }.w()?;
        Ok(out)
    }
}

impl CustomOp1 for Gemv {
    fn name(&self) -> &'static str {
        "oxtune-linear-rows"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let k = *layout.shape().dims().last().unwrap_or(&0);
        let rows = layout.shape().elem_count() / k.max(1);
        let n = if self.swiglu {
            self.weights[0].dims()[0]
        } else {
            self.weights.iter().map(|w| w.dims()[0]).sum()
        };
        let device = &storage.device;
        let out = float_dispatch!(op, storage, |x| self.launch(
            device,
            &super::view(x, layout, op, "x")?,
            rows,
            k
        ));
        Ok((out, Shape::from((rows, n))))
    }
}
