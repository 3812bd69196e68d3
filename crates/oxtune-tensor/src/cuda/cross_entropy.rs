//! Summed cross-entropy over vocabulary rows (`kernels/cross_entropy.cu`): the logits are
//! read once in their own dtype, never copied to f32, and the gradient is written in that
//! dtype by one more pass.
//!
//! The op's raw output is (1 + rows) f32: the summed loss, then each row's log-sum-exp
//! (0 for ignored rows). [`cross_entropy_sum`] returns element 0; its backward therefore
//! receives `res` (the lse it needs, so the backward never recomputes it) and a gradient
//! that is `g` at 0 and zeros elsewhere (candle's backward of `narrow`), and hands the
//! backward kernel `[g, lse...]`, so `g` is read on the device without a host sync.

use std::mem::size_of;

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaStorageSlice;
use candle_core::cuda::WrapErr;
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape,
    Tensor, bail,
};

use super::launch::{KernelFloat, Module, expect_len, function, to_i32, to_u32};
use super::{no_cpu, view};

const CROSS_ENTROPY: Module = Module {
    name: "oxtune_cross_entropy",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx")),
};

/// Threads of the partial-statistics and backward blocks (`XENT_THREADS` in the kernel).
const THREADS: usize = 256;
/// 16-byte vectors each thread of those blocks loads (`XENT_UNROLL`).
const UNROLL: usize = 4;
/// Rows per block of the kernel merging the partials (one warp each).
const ROWS_PER_BLOCK: usize = 8;

/// sum over rows r with `targets[r] != ignore_index` of `-log_softmax(logits[r])[targets[r]]`,
/// as an f32 scalar; differentiable in `logits`.
///
/// `logits`: (rows, vocab) f32, bf16 or f16; `targets`: (rows,) i64 or u32. A target outside
/// `[0, vocab)` that is not `ignore_index` makes the loss NaN (checking it here would wait
/// for the device).
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor, ignore_index: i64) -> Result<Tensor> {
    Ok(cross_entropy_sum_with_lse(logits, targets, ignore_index)?.0)
}

/// [`cross_entropy_sum`] and the rows' log-sum-exp, (rows,) f32 (0 for ignored rows,
/// detached), for timing [`cross_entropy_backward`] on its own.
pub fn cross_entropy_sum_with_lse(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
) -> Result<(Tensor, Tensor)> {
    let op = "cross_entropy_sum";
    let (rows, _) = logits.dims2().map_err(|_| {
        candle_core::Error::Msg(format!(
            "{op}: logits {:?} are not (rows, vocab)",
            logits.shape()
        ))
    })?;
    let targets = checked_targets(op, logits, targets)?;
    let out = logits
        .contiguous()?
        .apply_op2(&targets, CrossEntropy { ignore_index })?;
    Ok((out.get(0)?, out.narrow(0, 1, rows)?.detach()))
}

/// The gradient of [`cross_entropy_sum`] with respect to the logits, in their dtype, from the
/// rows' log-sum-exp `lse` (rows,) f32 and the loss's gradient `grad` (a scalar f32).
pub fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    grad: &Tensor,
    ignore_index: i64,
) -> Result<Tensor> {
    let op = "cross_entropy_backward";
    let targets = checked_targets(op, logits, targets)?;
    let stats = Tensor::cat(
        &[
            &grad.to_dtype(DType::F32)?.reshape(1)?,
            &lse.to_dtype(DType::F32)?,
        ],
        0,
    )?;
    logits
        .contiguous()?
        .apply_op3_no_bwd(&targets, &stats, &CrossEntropyBackward { ignore_index })
}

/// `targets` as a contiguous (rows,) i64 tensor on the logits' device.
fn checked_targets(op: &str, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let rows = logits.dim(0)?;
    if targets.dims() != [rows] {
        bail!(
            "{op}: targets {:?} for logits {:?}; expected ({rows},)",
            targets.shape(),
            logits.shape()
        );
    }
    if !matches!(targets.dtype(), DType::I64 | DType::U32) {
        bail!(
            "{op}: targets are {:?}; expected i64 or u32",
            targets.dtype()
        );
    }
    targets
        .to_device(logits.device())?
        .to_dtype(DType::I64)?
        .contiguous()
}

/// (logits, targets) -> (1 + rows) f32: the summed loss, then each row's log-sum-exp.
struct CrossEntropy {
    ignore_index: i64,
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "oxtune-cross-entropy"
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
        logits: &CudaStorage,
        logits_layout: &Layout,
        targets: &CudaStorage,
        targets_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (rows, vocab) = rows_and_vocab(logits_layout, targets_layout, op)?;
        let targets = view(
            targets.as_cuda_slice::<i64>()?,
            targets_layout,
            op,
            "targets",
        )?;
        let device = &logits.device;
        let out = float_dispatch!(op, logits, |x| forward(
            device,
            &view(x, logits_layout, op, "logits")?,
            &targets,
            rows,
            vocab,
            self.ignore_index
        ));
        Ok((out, Shape::from(1 + rows)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // grad is (1 + rows): the loss's gradient at 0, zeros over the lse entries
        let rows = logits.dim(0)?;
        let stats = Tensor::cat(
            &[
                &grad.narrow(0, 0, 1)?.to_dtype(DType::F32)?,
                &res.detach().narrow(0, 1, rows)?,
            ],
            0,
        )?;
        let backward = CrossEntropyBackward {
            ignore_index: self.ignore_index,
        };
        let dlogits = logits.apply_op3_no_bwd(targets, &stats, &backward)?;
        Ok((Some(dlogits), None))
    }
}

/// (logits, targets, [g, lse...]) -> dlogits in the logits' dtype.
struct CrossEntropyBackward {
    ignore_index: i64,
}

impl CustomOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "oxtune-cross-entropy-backward"
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
        logits: &CudaStorage,
        logits_layout: &Layout,
        targets: &CudaStorage,
        targets_layout: &Layout,
        stats: &CudaStorage,
        stats_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (rows, vocab) = rows_and_vocab(logits_layout, targets_layout, op)?;
        if stats_layout.shape().dims() != [1 + rows] {
            bail!(
                "{op}: stats {:?} for {rows} rows; expected ({},) (the gradient, then the lse)",
                stats_layout.shape(),
                1 + rows
            );
        }
        let targets = view(
            targets.as_cuda_slice::<i64>()?,
            targets_layout,
            op,
            "targets",
        )?;
        let stats = view(stats.as_cuda_slice::<f32>()?, stats_layout, op, "stats")?;
        let device = &logits.device;
        let out = float_dispatch!(op, logits, |x| backward(
            device,
            &view(x, logits_layout, op, "logits")?,
            &targets,
            &stats,
            rows,
            vocab,
            self.ignore_index
        ));
        Ok((out, logits_layout.shape().clone()))
    }
}

/// (rows, vocab) of the logits, checked against the targets' (rows,).
fn rows_and_vocab(logits: &Layout, targets: &Layout, op: &str) -> Result<(usize, usize)> {
    let [rows, vocab] = *logits.shape().dims() else {
        bail!("{op}: logits {:?} are not (rows, vocab)", logits.shape());
    };
    if targets.shape().dims() != [rows] {
        bail!(
            "{op}: targets {:?} for logits {:?}",
            targets.shape(),
            logits.shape()
        );
    }
    if vocab == 0 {
        bail!("{op}: logits {:?} have no vocabulary", logits.shape());
    }
    Ok((rows, vocab))
}

/// Elements of a row one block covers: `THREADS * UNROLL` 16-byte vectors.
fn span<T>() -> usize {
    THREADS * UNROLL * (16 / size_of::<T>())
}

/// Blocks per row and their span, checked against the grid's y limit.
fn splits<T>(vocab: usize, kernel: &str) -> Result<(u32, i32)> {
    let span = span::<T>();
    let splits = vocab.div_ceil(span);
    if splits > 65_535 {
        bail!("{kernel}: a vocabulary of {vocab} needs {splits} blocks per row (at most 65535)");
    }
    Ok((
        to_u32(splits, "splits", kernel)?,
        to_i32(span, "span", kernel)?,
    ))
}

/// (1 + rows) f32: the summed loss, then each row's log-sum-exp.
#[allow(
    unsafe_code,
    reason = "launching CUDA kernels and allocating their outputs is unsafe FFI; kept to these two functions"
)]
fn forward<T: KernelFloat>(
    device: &CudaDevice,
    logits: &CudaView<'_, T>,
    targets: &CudaView<'_, i64>,
    rows: usize,
    vocab: usize,
    ignore_index: i64,
) -> Result<CudaSlice<f32>> {
    let kernel = "cross_entropy_fwd";
    expect_len(logits, rows * vocab, "logits", kernel)?;
    expect_len(targets, rows, "targets", kernel)?;
    let (splits, span) = splits::<T>(vocab, kernel)?;
    let n = to_i32(vocab, "vocab", kernel)?;
    let rows_i32 = to_i32(rows, "rows", kernel)?;
    let splits_i32 = to_i32(splits as usize, "splits", kernel)?;
    let stream = device.cuda_stream();
    // SAFETY: xent_partials writes the (max, sum) pair of every (row, split); xent_rows every
    // row's loss and out[1 + row]; xent_total out[0].
    let (mut partials, mut row_loss, mut out) = unsafe {
        (
            device.alloc::<f32>(2 * rows * splits as usize)?,
            device.alloc::<f32>(rows)?,
            device.alloc::<f32>(1 + rows)?,
        )
    };

    let func = function::<T>(device, &CROSS_ENTROPY, "xent_partials")?;
    let mut builder = stream.launch_builder(&func);
    builder.arg(logits).arg(targets).arg(&mut partials);
    builder.arg(&n).arg(&span).arg(&ignore_index);
    let config = LaunchConfig {
        grid_dim: (rows_i32.unsigned_abs(), splits, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: grid (rows, splits) over rows of `vocab` logits and `rows` targets (lengths
    // checked above), splits * span >= vocab; partials holds rows * splits float2;
    // arguments match xent_partials_<dtype> in cross_entropy.cu.
    unsafe { builder.launch(config) }.w()?;

    let func = function::<T>(device, &CROSS_ENTROPY, "xent_rows")?;
    let mut builder = stream.launch_builder(&func);
    builder.arg(logits).arg(targets).arg(&partials);
    builder.arg(&mut out).arg(&mut row_loss);
    builder
        .arg(&rows_i32)
        .arg(&n)
        .arg(&splits_i32)
        .arg(&ignore_index);
    let blocks = to_u32(rows.div_ceil(ROWS_PER_BLOCK).max(1), "blocks", kernel)?;
    let config = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: ((32 * ROWS_PER_BLOCK) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: one warp per row of `rows`; it reads the row's `splits` partials and, for a
    // target in [0, vocab), one logit of its row; writes out[1 + row] and row_loss[row];
    // arguments match xent_rows_<dtype>.
    unsafe { builder.launch(config) }.w()?;

    let func = device
        .get_or_load_custom_func("xent_total", CROSS_ENTROPY.name, CROSS_ENTROPY.ptx)?
        .into_cuda_function();
    let mut builder = stream.launch_builder(&func);
    builder.arg(&row_loss).arg(&mut out).arg(&rows_i32);
    let config = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: one block reads the `rows` row losses and writes out[0]; arguments match
    // xent_total.
    unsafe { builder.launch(config) }.w()?;
    Ok(out)
}

/// dlogits (rows, vocab) in T from `stats` = [g, lse...].
#[allow(
    unsafe_code,
    reason = "launching CUDA kernels and allocating their outputs is unsafe FFI; kept to these two functions"
)]
fn backward<T: KernelFloat>(
    device: &CudaDevice,
    logits: &CudaView<'_, T>,
    targets: &CudaView<'_, i64>,
    stats: &CudaView<'_, f32>,
    rows: usize,
    vocab: usize,
    ignore_index: i64,
) -> Result<CudaSlice<T>> {
    let kernel = "cross_entropy_bwd";
    let count = rows * vocab;
    expect_len(logits, count, "logits", kernel)?;
    expect_len(targets, rows, "targets", kernel)?;
    expect_len(stats, 1 + rows, "stats", kernel)?;
    let (splits, span) = splits::<T>(vocab, kernel)?;
    let n = to_i32(vocab, "vocab", kernel)?;
    let rows_u32 = to_u32(rows, "rows", kernel)?;
    let func = function::<T>(device, &CROSS_ENTROPY, "xent_bwd")?;
    // SAFETY: the blocks of each row write all of its `vocab` elements (zeros when ignored).
    let mut out = unsafe { device.alloc::<T>(count)? };
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    builder.arg(logits).arg(targets).arg(stats).arg(&mut out);
    builder.arg(&n).arg(&span).arg(&ignore_index);
    let config = LaunchConfig {
        grid_dim: (rows_u32, splits, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: grid (rows, splits), splits * span >= vocab; logits and dlogits hold
    // rows * vocab, targets rows and stats 1 + rows (checked above); arguments match
    // xent_bwd_<dtype>.
    unsafe { builder.launch(config) }.w()?;
    Ok(out)
}
