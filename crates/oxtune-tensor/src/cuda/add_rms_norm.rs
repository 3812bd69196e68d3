//! Residual add + RMSNorm (`kernels/add_rms_norm.cu`): one kernel reads xs, residual and the
//! weight once and writes the sum and the normalised sum.
//!
//! candle's custom ops have one output, so the two outputs are two ops sharing the one
//! launch: `AddRmsNormSum` (xs, residual, weight) runs the kernel, returns the sum and
//! leaves the normalised storage in a slot, which `ProvidedRmsNorm` (sum, weight) takes as
//! its output without computing anything. Their backwards are the add's (the sum's gradient
//! to xs and to residual) and RMSNorm's (`rms_norm_backward` on the sum, dweight only when
//! the weight tracks a gradient); candle's autograd adds the norm's dx to the sum's own
//! gradient.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaStorageSlice;
use candle_core::cuda::WrapErr;
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp2, CustomOp3, D, Layout, Result, Shape, Tensor,
    bail,
};

use super::launch::{KernelFloat, Module, expect_len, function, row_threads, to_i32, to_u32};
use super::{no_cpu, rms_norm_backward, rows_and_width, same_shape, view, view_as};

const ADD_RMS_NORM: Module = Module {
    name: "oxtune_add_rms_norm",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/add_rms_norm.ptx")),
};

/// The normalised output of the launch, handed from the first op to the second.
type Slot = Arc<Mutex<Option<CudaStorage>>>;

/// (xs + residual, rms_norm(xs + residual) * weight), the sum rounded to the dtype of `xs`
/// first, as the composition does; `weight` is cast to that dtype. Differentiable in xs,
/// residual and weight.
pub fn add_rms_norm(
    xs: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let op = "add_rms_norm";
    if xs.shape() != residual.shape() {
        bail!(
            "{op}: xs {:?} and residual {:?} differ in shape",
            xs.shape(),
            residual.shape()
        );
    }
    let width = xs.dim(D::Minus1)?;
    if weight.dims() != [width] {
        bail!(
            "{op}: weight {:?} for xs {:?}; expected ({width},)",
            weight.shape(),
            xs.shape()
        );
    }
    #[expect(
        clippy::cast_possible_truncation,
        reason = "eps is a small f32 constant in configs"
    )]
    let eps = eps as f32;
    let weight = weight.to_dtype(xs.dtype())?.contiguous()?;
    let slot = Slot::default();
    let sum = xs.contiguous()?.apply_op3(
        &residual.contiguous()?,
        &weight,
        AddRmsNormSum {
            eps,
            normed: slot.clone(),
        },
    )?;
    let normed = take(&slot)?
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: the kernel left no output")))?;
    let normed = sum.apply_op2(
        &weight,
        ProvidedRmsNorm {
            eps,
            normed: Arc::new(Mutex::new(Some(normed))),
        },
    )?;
    Ok((sum, normed))
}

fn take(slot: &Slot) -> Result<Option<CudaStorage>> {
    Ok(slot
        .lock()
        .map_err(|_| candle_core::Error::Msg("add_rms_norm: a poisoned output slot".into()))?
        .take())
}

/// (xs, residual, weight) -> xs + residual; leaves the normalised sum in `normed`.
struct AddRmsNormSum {
    eps: f32,
    normed: Slot,
}

impl CustomOp3 for AddRmsNormSum {
    fn name(&self) -> &'static str {
        "oxtune-add-rms-norm"
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
        xs: &CudaStorage,
        xs_layout: &Layout,
        residual: &CudaStorage,
        residual_layout: &Layout,
        weight: &CudaStorage,
        weight_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        same_shape(xs_layout, residual_layout, op, "residual")?;
        let (rows, width) = rows_and_width(xs_layout, op)?;
        if weight_layout.shape().dims() != [width] {
            bail!(
                "{op}: weight {:?} for rows of width {width}",
                weight_layout.shape()
            );
        }
        let device = &xs.device;
        let mut normed = None;
        let sum = float_dispatch!(op, xs, |x| forward(
            device,
            &view(x, xs_layout, op, "xs")?,
            &view_as(residual, residual_layout, op, "residual")?,
            &view_as(weight, weight_layout, op, "weight")?,
            rows,
            width,
            self.eps
        )
        .map(|(sum, y)| {
            normed = Some(CudaStorage::wrap_cuda_slice(y, device.clone()));
            sum
        }));
        *self
            .normed
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{op}: a poisoned output slot")))? =
            normed;
        Ok((sum, xs_layout.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        residual: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let pass = |input: &Tensor| input.track_op().then(|| grad.clone());
        Ok((pass(xs), pass(residual), None))
    }
}

/// (sum, weight) -> rms_norm(sum) * weight, already computed by [`AddRmsNormSum`]'s launch;
/// its backward is RMSNorm's.
struct ProvidedRmsNorm {
    eps: f32,
    normed: Slot,
}

impl CustomOp2 for ProvidedRmsNorm {
    fn name(&self) -> &'static str {
        "oxtune-add-rms-norm-normed"
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
        _: &CudaStorage,
        sum_layout: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let normed = take(&self.normed)?
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: applied twice")))?;
        Ok((normed, sum_layout.shape().clone()))
    }

    fn bwd(
        &self,
        sum: &Tensor,
        weight: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Frozen norm weights (LoRA) get no gradient, and cost no second pass.
        let (dx, dweight) =
            rms_norm_backward(sum, weight, grad, f64::from(self.eps), weight.track_op())?;
        let dweight = dweight.map(|d| d.to_dtype(weight.dtype())).transpose()?;
        Ok((Some(dx), dweight))
    }
}

/// (sum, normed) over rows of `width`, one block per row.
#[allow(
    unsafe_code,
    reason = "launching a CUDA kernel and allocating its outputs is unsafe FFI; kept to this function"
)]
fn forward<T: KernelFloat>(
    device: &CudaDevice,
    xs: &CudaView<'_, T>,
    residual: &CudaView<'_, T>,
    weight: &CudaView<'_, T>,
    rows: usize,
    width: usize,
    eps: f32,
) -> Result<(CudaSlice<T>, CudaSlice<T>)> {
    let kernel = "add_rms_norm_fwd";
    let count = rows * width;
    expect_len(xs, count, "xs", kernel)?;
    expect_len(residual, count, "residual", kernel)?;
    expect_len(weight, width, "weight", kernel)?;
    let n = to_i32(width, "width", kernel)?;
    let blocks = to_u32(rows, "rows", kernel)?;
    let func = function::<T>(device, &ADD_RMS_NORM, kernel)?;
    // SAFETY: the kernel writes every element of every row of both outputs.
    let (mut sum, mut normed) = unsafe { (device.alloc::<T>(count)?, device.alloc::<T>(count)?) };
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    builder.arg(xs).arg(residual).arg(weight);
    builder.arg(&mut sum).arg(&mut normed).arg(&n).arg(&eps);
    let config = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (row_threads(width), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: one block per row; lengths of xs, residual and weight checked above, both
    // outputs hold rows * width; arguments match add_rms_norm_fwd_<dtype>.
    unsafe { builder.launch(config) }.w()?;
    Ok((sum, normed))
}
