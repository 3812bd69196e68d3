//! Fused CUDA kernels with backward, as candle custom ops (`cuda` feature only).
//!
//! Each op here is a `CustomOp` whose `cuda_fwd` runs one kernel of `kernels/*.cu` and whose
//! `bwd` applies another custom op running the backward kernel, so gradients flow through
//! candle's autograd. The kernels read and write f32, bf16 or f16 and compute in f32; they
//! need contiguous inputs, which the functions below arrange. `ops.rs` calls these on CUDA
//! tensors and keeps its plain `*_reference` compositions for the CPU and for tests;
//! `kernels/README.md` lists launch shapes and what each op saves for backward.
//!
//! Models call `ops.rs`; the functions here are public for the GPU tests and benchmarks,
//! which time the backward kernels on their own.

pub(crate) mod adamw;
mod launch;

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaStorageSlice;
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape,
    Tensor, bail,
};

pub use launch::Causal;
use launch::{RopeShape, RowLayout, SwigluRows};

/// Whether the fused kernels take these tensors: all on one CUDA device, one dtype among
/// f32, bf16 and f16, and not empty.
pub(crate) fn applies(tensors: &[&Tensor]) -> bool {
    let Some(first) = tensors.first() else {
        return false;
    };
    first.device().is_cuda()
        && matches!(first.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && first.elem_count() > 0
        && tensors
            .iter()
            .all(|t| t.dtype() == first.dtype() && t.device().same_device(first.device()))
}

/// softmax(scale * xs) over the last dimension, optionally causally masked.
pub fn softmax(xs: &Tensor, scale: f64, causal: Option<Causal>) -> Result<Tensor> {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "attention scales are O(1) constants"
    )]
    let scale = scale as f32;
    xs.contiguous()?.apply_op1(Softmax { scale, causal })
}

/// RMSNorm; `weight` is cast to the dtype of `xs`, as the reference does. `xs` may be a view
/// with contiguous rows and at most three dimensions before them (e.g. (b, t, heads, d)
/// heads of a packed projection, any strides over b, t and heads): the kernel reads it in
/// place. The output (and the backward's dx) is contiguous.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "eps is a small f32 constant in configs"
    )]
    let eps = eps as f32;
    let weight = weight.to_dtype(xs.dtype())?.contiguous()?;
    rows_readable(xs)?.apply_op2(&weight, RmsNorm { eps })
}

/// `xs` itself when the RMSNorm kernels read its rows in place ([`RowLayout::of`]), else a
/// contiguous copy.
fn rows_readable(xs: &Tensor) -> Result<Tensor> {
    if RowLayout::of(xs.layout()).is_some() {
        Ok(xs.clone())
    } else {
        xs.contiguous()
    }
}

/// The view of `slice` from the first row of `layout` to the end of its last, and where the
/// rows lie, for the RMSNorm kernels.
fn rows_view<'a, T>(
    slice: &'a CudaSlice<T>,
    layout: &Layout,
    op: &str,
) -> Result<(CudaView<'a, T>, RowLayout)> {
    let Some(rows) = RowLayout::of(layout) else {
        bail!(
            "{op}: x's rows are not readable in place (shape {:?}, strides {:?})",
            layout.shape(),
            layout.stride()
        );
    };
    let (_, width) = rows_and_width(layout, op)?;
    let start = layout.start_offset();
    let view = slice
        .try_slice(start..start + rows.extent(width))
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: x out of its storage")))?;
    Ok((view, rows))
}

/// silu(gate) * up.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        bail!(
            "swiglu: gate {:?} and up {:?} differ in shape",
            gate.shape(),
            up.shape()
        );
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

/// silu(gate) * up of a packed (.., 2 * i) [gate | up] tensor (a fused gate/up projection),
/// (.., i). One kernel reads both halves of each row; the backward writes one (.., 2 * i)
/// [dgate | dup] gradient (no zero-padded narrow gradients to add up).
pub fn swiglu_packed(gate_up: &Tensor) -> Result<Tensor> {
    gate_up.contiguous()?.apply_op1(SwigluPacked)
}

/// RoPE; differentiable in `xs` only (the tables are constants). `xs` (b, h, t, d) may be any
/// view with contiguous rows (the kernel reads it in place); the output is contiguous.
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rotate(xs, cos, sin, RopeOrder::HeadsFirst, RopeOrder::HeadsFirst)
}

/// [`rope`] of a (b, t, h, d) projection (any view with contiguous rows) into a contiguous
/// (b, h, t, d) tensor: the layout change costs no copy, and the backward writes the gradient
/// straight in (b, t, h, d) order.
pub fn rope_to_heads(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rotate(
        xs,
        cos,
        sin,
        RopeOrder::PositionsFirst,
        RopeOrder::HeadsFirst,
    )
}

/// [`rope`] of a (b, t, h, d) projection (any view with contiguous rows, e.g. q's heads of a
/// packed q/k/v projection) into a contiguous (b, t, h, d) tensor: the projection's order is
/// kept, and the backward reads the (b, t, h, d) gradient and writes (b, t, h, d).
pub fn rope_positions_first(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rotate(
        xs,
        cos,
        sin,
        RopeOrder::PositionsFirst,
        RopeOrder::PositionsFirst,
    )
}

fn rotate(
    xs: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    input: RopeOrder,
    output: RopeOrder,
) -> Result<Tensor> {
    let rope = Rope {
        sign: 1.0,
        input,
        output,
    };
    rows_contiguous(xs)?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, rope)
}

/// `xs` itself when it is 4-D with contiguous rows (what the RoPE kernel reads), else a copy.
fn rows_contiguous(xs: &Tensor) -> Result<Tensor> {
    if xs.rank() == 4 && xs.stride()[3] == 1 {
        Ok(xs.clone())
    } else {
        xs.contiguous()
    }
}

/// The gradient of [`softmax`] from its output `ys` and the output's gradient `grad`.
pub fn softmax_backward(
    ys: &Tensor,
    grad: &Tensor,
    scale: f64,
    causal: Option<Causal>,
) -> Result<Tensor> {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "attention scales are O(1) constants"
    )]
    let scale = scale as f32;
    ys.contiguous()?
        .apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward { scale, causal })
}

/// The gradients of [`rms_norm`]: dx, and dweight when `with_weight` (in the dtype of `xs`).
pub fn rms_norm_backward(
    xs: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    eps: f64,
    with_weight: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "eps is a small f32 constant in configs"
    )]
    let eps = eps as f32;
    let (xs, grad) = (rows_readable(xs)?, grad.contiguous()?);
    let weight = weight.to_dtype(xs.dtype())?.contiguous()?;
    let dx = xs.apply_op3_no_bwd(&weight, &grad, &RmsNormBackwardX { eps })?;
    let dweight = if with_weight {
        let width = xs.dim(D::Minus1)?;
        let sum = if width <= launch::RMS_NORM_DW_MAX_WIDTH {
            xs.apply_op2_no_bwd(&grad, &RmsNormBackwardWeight { eps })?
                .sum(0)?
        } else {
            rms_norm_dweight_composed(&xs, &grad, eps)?
        };
        Some(sum.to_dtype(xs.dtype())?)
    } else {
        None
    };
    Ok((dx, dweight))
}

/// The gradients (dgate, dup) of [`swiglu`].
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    // (2, ..): dgate then dup, from one kernel.
    let both = gate.contiguous()?.apply_op3_no_bwd(
        &up.contiguous()?,
        &grad.contiguous()?,
        &SwigluBackward,
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

/// The gradient of [`swiglu_packed`]: one (.., 2 * i) [dgate | dup] tensor, contiguous.
pub fn swiglu_packed_backward(gate_up: &Tensor, grad: &Tensor) -> Result<Tensor> {
    gate_up
        .contiguous()?
        .apply_op2_no_bwd(&grad.contiguous()?, &SwigluPackedBackward)
}

/// The gradient of [`rope`] with respect to x: the rotation by -sin applied to `grad`.
pub fn rope_backward(grad: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let backward = Rope {
        sign: -1.0,
        input: RopeOrder::HeadsFirst,
        output: RopeOrder::HeadsFirst,
    };
    rows_contiguous(grad)?.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &backward)
}

/// Dispatches on the dtype of a storage: `$slice` is its typed `CudaSlice`, `$call` a
/// generic call returning `Result<CudaSlice<U>>`, wrapped back into a storage.
macro_rules! float_dispatch {
    ($op:expr, $storage:expr, |$slice:ident| $call:expr) => {{
        let storage: &CudaStorage = $storage;
        let device = storage.device.clone();
        match &storage.slice {
            CudaStorageSlice::F32($slice) => CudaStorage::wrap_cuda_slice($call?, device),
            CudaStorageSlice::BF16($slice) => CudaStorage::wrap_cuda_slice($call?, device),
            CudaStorageSlice::F16($slice) => CudaStorage::wrap_cuda_slice($call?, device),
            _ => bail!(
                "{}: no kernel for dtype {:?} (f32, bf16 and f16 have one)",
                $op,
                storage.dtype()
            ),
        }
    }};
}

/// The elements `layout` covers in `slice`, which must be contiguous.
fn view<'a, T>(
    slice: &'a CudaSlice<T>,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<CudaView<'a, T>> {
    if !layout.is_contiguous() {
        bail!("{op}: {what} is not contiguous ({:?})", layout.stride());
    }
    let start = layout.start_offset();
    let end = start + layout.shape().elem_count();
    slice
        .try_slice(start..end)
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} out of its storage")))
}

/// The same-dtype view of another input of the op.
fn view_as<'a, T: launch::KernelFloat>(
    storage: &'a CudaStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<CudaView<'a, T>> {
    view(storage.as_cuda_slice::<T>()?, layout, op, what)
}

/// (rows, width) of a tensor seen as rows of its last dimension.
fn rows_and_width(layout: &Layout, op: &str) -> Result<(usize, usize)> {
    let width = *layout
        .shape()
        .dims()
        .last()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: a scalar has no rows")))?;
    Ok((layout.shape().elem_count() / width.max(1), width))
}

fn same_shape(a: &Layout, b: &Layout, op: &str, what: &str) -> Result<()> {
    if a.shape() != b.shape() {
        bail!("{op}: {what} {:?} differs from {:?}", b.shape(), a.shape());
    }
    Ok(())
}

/// The address of a tensor's storage: equal for tensors sharing one, stable while it lives.
fn storage_address(tensor: &Tensor) -> usize {
    let (storage, _) = tensor.storage_and_layout();
    std::ptr::from_ref::<candle_core::Storage>(&storage).addr()
}

fn no_cpu<T>(op: &str) -> Result<T> {
    bail!("{op}: a CUDA kernel; on the CPU call the ops.rs function, which composes candle ops")
}

/// softmax(scale * x), causally masked if asked. Saves its output y for backward.
struct Softmax {
    scale: f32,
    causal: Option<Causal>,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "oxtune-softmax"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (rows, width) = rows_and_width(layout, op)?;
        let device = &storage.device;
        let out = float_dispatch!(op, storage, |x| launch::softmax_fwd(
            device,
            &view(x, layout, op, "x")?,
            rows,
            width,
            self.scale,
            self.causal
        ));
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let backward = SoftmaxBackward {
            scale: self.scale,
            causal: self.causal,
        };
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &backward)?))
    }
}

/// (y, dy) -> scale * y * (dy - sum(dy * y)).
struct SoftmaxBackward {
    scale: f32,
    causal: Option<Causal>,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "oxtune-softmax-backward"
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
        ys: &CudaStorage,
        ys_layout: &Layout,
        grad: &CudaStorage,
        grad_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        same_shape(ys_layout, grad_layout, op, "dy")?;
        let (rows, width) = rows_and_width(ys_layout, op)?;
        let device = &ys.device;
        let out = float_dispatch!(op, ys, |y| launch::softmax_bwd(
            device,
            &view(y, ys_layout, op, "y")?,
            &view_as(grad, grad_layout, op, "dy")?,
            rows,
            width,
            self.scale,
            self.causal
        ));
        Ok((out, ys_layout.shape().clone()))
    }
}

/// RMSNorm over the last dimension. Saves nothing beyond its inputs (x, weight): the
/// backward recomputes 1 / rms from x.
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "oxtune-rms-norm"
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
        xs: &CudaStorage,
        xs_layout: &Layout,
        weight: &CudaStorage,
        weight_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (_, width) = rows_and_width(xs_layout, op)?;
        if weight_layout.shape().dims() != [width] {
            bail!(
                "{op}: weight {:?} for rows of width {width}",
                weight_layout.shape()
            );
        }
        let device = &xs.device;
        let out = float_dispatch!(op, xs, |x| {
            let (x, x_rows) = rows_view(x, xs_layout, op)?;
            launch::rms_norm_fwd(
                device,
                &x,
                x_rows,
                &view_as(weight, weight_layout, op, "weight")?,
                width,
                self.eps,
            )
        });
        Ok((out, xs_layout.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Frozen norm weights (LoRA) get no gradient, and cost no second pass.
        let (dx, dweight) =
            rms_norm_backward(xs, weight, grad, f64::from(self.eps), weight.track_op())?;
        let dweight = dweight.map(|d| d.to_dtype(weight.dtype())).transpose()?;
        Ok((Some(dx), dweight))
    }
}

/// dweight = sum over rows of dy * T(x / rms(x)) with candle ops, for rows wider than the
/// dweight kernel's shared-memory accumulator.
fn rms_norm_dweight_composed(xs: &Tensor, grad: &Tensor, eps: f32) -> Result<Tensor> {
    let width = xs.dim(D::Minus1)?;
    let x = xs.to_dtype(DType::F32)?.reshape(((), width))?;
    let inverse_rms = (x.sqr()?.mean_keepdim(1)? + f64::from(eps))?
        .sqrt()?
        .recip()?;
    let normed = x
        .broadcast_mul(&inverse_rms)?
        .to_dtype(xs.dtype())?
        .to_dtype(DType::F32)?;
    let grad = grad.to_dtype(DType::F32)?.reshape(((), width))?;
    (normed * grad)?.sum(0)
}

/// (x, weight, dy) -> dx of RMSNorm.
struct RmsNormBackwardX {
    eps: f32,
}

impl CustomOp3 for RmsNormBackwardX {
    fn name(&self) -> &'static str {
        "oxtune-rms-norm-backward-x"
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
        weight: &CudaStorage,
        weight_layout: &Layout,
        grad: &CudaStorage,
        grad_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        same_shape(xs_layout, grad_layout, op, "dy")?;
        let (_, width) = rows_and_width(xs_layout, op)?;
        let device = &xs.device;
        let out = float_dispatch!(op, xs, |x| {
            let (x, x_rows) = rows_view(x, xs_layout, op)?;
            launch::rms_norm_bwd_dx(
                device,
                &x,
                x_rows,
                &view_as(weight, weight_layout, op, "weight")?,
                &view_as(grad, grad_layout, op, "dy")?,
                width,
                self.eps,
            )
        });
        Ok((out, xs_layout.shape().clone()))
    }
}

/// (x, dy) -> f32 partial sums of RMSNorm's dweight, (chunks, width).
struct RmsNormBackwardWeight {
    eps: f32,
}

impl CustomOp2 for RmsNormBackwardWeight {
    fn name(&self) -> &'static str {
        "oxtune-rms-norm-backward-weight"
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
        xs: &CudaStorage,
        xs_layout: &Layout,
        grad: &CudaStorage,
        grad_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        same_shape(xs_layout, grad_layout, op, "dy")?;
        let (_, width) = rows_and_width(xs_layout, op)?;
        let device = &xs.device;
        let mut chunks = 0;
        let out = float_dispatch!(op, xs, |x| {
            let (x, x_rows) = rows_view(x, xs_layout, op)?;
            launch::rms_norm_bwd_dw(
                device,
                &x,
                x_rows,
                &view_as(grad, grad_layout, op, "dy")?,
                width,
                self.eps,
            )
            .map(|(partials, used)| {
                chunks = used;
                partials
            })
        });
        Ok((out, Shape::from((chunks, width))))
    }
}

/// silu(gate) * up. Saves nothing beyond its inputs.
struct Swiglu;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "oxtune-swiglu"
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
        gate: &CudaStorage,
        gate_layout: &Layout,
        up: &CudaStorage,
        up_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        same_shape(gate_layout, up_layout, op, "up")?;
        let count = gate_layout.shape().elem_count();
        let device = &gate.device;
        let out = float_dispatch!(op, gate, |g| launch::swiglu_fwd(
            device,
            &view(g, gate_layout, op, "gate")?,
            &view_as(up, up_layout, op, "up")?,
            SwigluRows::flat(count)
        ));
        Ok((out, gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dgate, dup) = swiglu_backward(gate, up, grad)?;
        Ok((Some(dgate), Some(dup)))
    }
}

/// (gate, up, dy) -> (2, ..) holding dgate and dup.
struct SwigluBackward;

impl CustomOp3 for SwigluBackward {
    fn name(&self) -> &'static str {
        "oxtune-swiglu-backward"
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
        gate: &CudaStorage,
        gate_layout: &Layout,
        up: &CudaStorage,
        up_layout: &Layout,
        grad: &CudaStorage,
        grad_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        same_shape(gate_layout, up_layout, op, "up")?;
        same_shape(gate_layout, grad_layout, op, "dy")?;
        let count = gate_layout.shape().elem_count();
        let device = &gate.device;
        let out = float_dispatch!(op, gate, |g| launch::swiglu_bwd(
            device,
            &view(g, gate_layout, op, "gate")?,
            &view_as(up, up_layout, op, "up")?,
            &view_as(grad, grad_layout, op, "dy")?,
            SwigluRows::flat(count)
        ));
        let mut dims = vec![2];
        dims.extend_from_slice(gate_layout.shape().dims());
        Ok((out, Shape::from(dims)))
    }
}

/// (rows, i) of a packed (.., 2 * i) [gate | up] layout.
fn packed_rows(layout: &Layout, op: &str) -> Result<SwigluRows> {
    let (rows, width) = rows_and_width(layout, op)?;
    if width % 2 != 0 {
        bail!(
            "{op}: the last dimension of {:?} is odd; a packed [gate | up] tensor has 2 * i",
            layout.shape()
        );
    }
    Ok(SwigluRows::packed(rows, width / 2))
}

/// The shape of a packed (.., 2 * i) tensor with its last dimension halved.
fn halved(layout: &Layout) -> Shape {
    let mut dims = layout.shape().dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last /= 2;
    }
    Shape::from(dims)
}

/// The gate and up rows of a contiguous packed view: gate from its start, up `width` after
/// it, each spanning the rows' extent (the whole view less one half row).
fn packed_halves<'a, T>(
    x: &CudaView<'a, T>,
    shape: SwigluRows,
    op: &str,
) -> Result<(CudaView<'a, T>, CudaView<'a, T>)> {
    let extent = shape.extent();
    let halves = x
        .try_slice(..extent)
        .zip(x.try_slice(shape.width..shape.width + extent));
    halves.ok_or_else(|| candle_core::Error::Msg(format!("{op}: gate_up out of its storage")))
}

/// silu(gate) * up of a packed [gate | up] tensor, (.., 2 * i) -> (.., i). Saves nothing
/// beyond its input.
struct SwigluPacked;

impl CustomOp1 for SwigluPacked {
    fn name(&self) -> &'static str {
        "oxtune-swiglu-packed"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let shape = packed_rows(layout, op)?;
        let device = &storage.device;
        let out = float_dispatch!(op, storage, |x| {
            let x = view(x, layout, op, "gate_up")?;
            let (gate, up) = packed_halves(&x, shape, op)?;
            launch::swiglu_fwd(device, &gate, &up, shape)
        });
        Ok((out, halved(layout)))
    }

    fn bwd(&self, gate_up: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(swiglu_packed_backward(gate_up, grad)?))
    }
}

/// (gate_up, dy) -> one (.., 2 * i) [dgate | dup] gradient.
struct SwigluPackedBackward;

impl CustomOp2 for SwigluPackedBackward {
    fn name(&self) -> &'static str {
        "oxtune-swiglu-packed-backward"
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
        gate_up: &CudaStorage,
        gate_up_layout: &Layout,
        grad: &CudaStorage,
        grad_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let shape = packed_rows(gate_up_layout, op)?;
        if grad_layout.shape() != &halved(gate_up_layout) {
            bail!(
                "{op}: dy {:?} for gate_up {:?}",
                grad_layout.shape(),
                gate_up_layout.shape()
            );
        }
        let device = &gate_up.device;
        let out = float_dispatch!(op, gate_up, |x| {
            let x = view(x, gate_up_layout, op, "gate_up")?;
            let (gate, up) = packed_halves(&x, shape, op)?;
            launch::swiglu_bwd(
                device,
                &gate,
                &up,
                &view_as(grad, grad_layout, op, "dy")?,
                shape,
            )
        });
        Ok((out, gate_up_layout.shape().clone()))
    }
}

/// Which middle dimension of a RoPE tensor comes first: (b, h, t, d) or (b, t, h, d).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RopeOrder {
    HeadsFirst,
    PositionsFirst,
}

/// RoPE rotation by (cos, sign * sin) of an `input`-ordered tensor with contiguous rows into a
/// contiguous `output`-ordered one; its backward is the same op with the sign flipped and the
/// orders swapped, applied to dy. Saves nothing (the tables are inputs).
struct Rope {
    sign: f32,
    input: RopeOrder,
    output: RopeOrder,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "oxtune-rope"
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
        cos: &CudaStorage,
        cos_layout: &Layout,
        sin: &CudaStorage,
        sin_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (batch, middle, inner, head_dim) = xs_layout.shape().dims4()?;
        let &[stride_b, stride_1, stride_2, 1] = xs_layout.stride() else {
            bail!(
                "{op}: x's rows are not contiguous (strides {:?})",
                xs_layout.stride()
            );
        };
        // (heads, positions) and x's strides over (batch, heads, positions)
        let (heads, positions, x_strides) = match self.input {
            RopeOrder::HeadsFirst => (middle, inner, [stride_b, stride_1, stride_2]),
            RopeOrder::PositionsFirst => (inner, middle, [stride_b, stride_2, stride_1]),
        };
        let half = head_dim / 2;
        same_shape(cos_layout, sin_layout, op, "sin")?;
        let per_batch = match cos_layout.shape().dims() {
            [t, h] if *t == positions && *h == half => false,
            [b, t, h] if *b == batch && *t == positions && *h == half => true,
            other => bail!(
                "{op}: cos/sin {other:?} for x {:?}; expected ({positions}, {half}) or \
                 ({batch}, {positions}, {half})",
                xs_layout.shape()
            ),
        };
        let shape = RopeShape {
            batch,
            heads,
            positions,
            head_dim,
            per_batch,
            x_strides,
            transposed_out: self.output == RopeOrder::PositionsFirst,
        };
        let extent = if xs_layout.shape().elem_count() == 0 {
            0
        } else {
            (batch - 1) * stride_b + (middle - 1) * stride_1 + (inner - 1) * stride_2 + head_dim
        };
        let start = xs_layout.start_offset();
        let device = &xs.device;
        let out = float_dispatch!(op, xs, |x| launch::rope(
            device,
            &x.try_slice(start..start + extent)
                .ok_or_else(|| candle_core::Error::Msg(format!("{op}: x out of its storage")))?,
            &view_as(cos, cos_layout, op, "cos")?,
            &view_as(sin, sin_layout, op, "sin")?,
            shape,
            self.sign
        ));
        let dims = match self.output {
            RopeOrder::HeadsFirst => (batch, heads, positions, head_dim),
            RopeOrder::PositionsFirst => (batch, positions, heads, head_dim),
        };
        Ok((out, Shape::from(dims)))
    }

    fn bwd(
        &self,
        _: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let backward = Rope {
            sign: -self.sign,
            input: self.output,
            output: self.input,
        };
        let dx = rows_contiguous(grad)?.apply_op3_no_bwd(cos, sin, &backward)?;
        Ok((Some(dx), None, None))
    }
}

// Ops in files of their own (each with its launch code); the macro and helpers above are
// visible to them.
mod add_rms_norm;
mod blas;
mod cross_entropy;
mod embedding;
mod flash;
mod gemv;
mod lora;
mod paged;
mod rope_cache;

pub use add_rms_norm::add_rms_norm;
pub use blas::{accumulate_transposed_product, linear_trainable};
pub use cross_entropy::{cross_entropy_backward, cross_entropy_sum, cross_entropy_sum_with_lse};
pub(crate) use embedding::embedding_takes;
pub use embedding::{embedding, embedding_backward};
pub(crate) use flash::HEAD_DIMS as FLASH_HEAD_DIMS;
pub use flash::{
    flash_attention, flash_attention_backward, flash_attention_positions_first,
    flash_attention_with_lse,
};
pub use gemv::{GEMV_MAX_ROWS, GEMV_MAX_WEIGHTS, gemv_pays, linear_rows, swiglu_linear_rows};
pub(crate) use gemv::{gemv_launch, gemv_takes};
pub use lora::{
    lora_linear, lora_linear_projected, lora_linear_projected_takes, lora_linear_takes,
};
pub use paged::{PAGED_ATTENTION_MAX_HEAD_DIM, paged_attention};
pub use rope_cache::{ROPE_CACHE_MAX_HEAD_DIM, qk_norm_rope_cache_write};
pub(crate) use rope_cache::{rope_cache_fused, rope_cache_takes};
