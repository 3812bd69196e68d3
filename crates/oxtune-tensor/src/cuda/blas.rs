//! Matrix products on cuBLAS with f32 accumulation for the ops that need more than candle's
//! matmul: an output written at a column offset with a row stride (several projections into
//! one tensor), and `beta = 1` (a product added into an existing output, in place). Used by
//! the LoRA linear op ([`super::lora`]), [`accumulate_transposed_product`] and
//! [`linear_trainable`].
#![allow(
    unsafe_code,
    reason = "cuBLAS calls on device pointers are unsafe FFI; kept to the cuda module"
)]

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::cublas::{CudaBlas, result as cublas, sys};
use candle_core::cuda::cudarc::driver::CudaSlice;
use candle_core::cuda::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::cuda::{CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, DType, InplaceOp3, Layout, Result, Shape, Tensor, bail,
};

use super::launch::{KernelFloat, to_i32};
use super::view;

const OP: &str = "accumulate_transposed_product";

/// `acc += lhs^T rhs` in place: acc (m, n) f32, lhs (k, m) and rhs (k, n) of one float dtype,
/// all contiguous on one CUDA device (e.g. a weight's gradient summed over chunks of rows:
/// lhs the chunk's output gradients, rhs its inputs). The product accumulates in f32 and is
/// added to acc without rounding to the inputs' dtype.
pub fn accumulate_transposed_product(acc: &Tensor, lhs: &Tensor, rhs: &Tensor) -> Result<()> {
    let (k, m) = lhs.dims2()?;
    let (k_rhs, n) = rhs.dims2()?;
    if acc.dims2()? != (m, n)
        || k_rhs != k
        || acc.dtype() != DType::F32
        || lhs.dtype() != rhs.dtype()
        || !acc.is_contiguous()
        || acc.track_op()
        || !super::applies(&[lhs, rhs])
        || !acc.device().same_device(lhs.device())
    {
        bail!(
            "{OP}: takes acc (m, n) f32 contiguous and tracking no gradient, lhs (k, m) and rhs \
             (k, n) of one f32/bf16/f16 dtype on acc's CUDA device; got acc {:?} {:?}, lhs {:?} \
             {:?}, rhs {:?} {:?}",
            acc.dims(),
            acc.dtype(),
            lhs.dims(),
            lhs.dtype(),
            rhs.dims(),
            rhs.dtype()
        );
    }
    acc.inplace_op3(&lhs.contiguous()?, &rhs.contiguous()?, &AccumulateProduct)
}

struct AccumulateProduct;

impl AccumulateProduct {
    fn run<T: KernelFloat>(
        acc: &mut CudaStorage,
        acc_layout: &Layout,
        (lhs, lhs_layout): (&CudaSlice<T>, &Layout),
        (rhs, rhs_layout): (&CudaStorage, &Layout),
    ) -> Result<()> {
        let (k, m) = lhs_layout.shape().dims2()?;
        let n = rhs_layout.shape().dims2()?.1;
        let device = acc.device.clone();
        let stream = device.cuda_stream();
        let blas = device.cublas_handle();
        let lhs = view(lhs, lhs_layout, OP, "lhs")?;
        let rhs = view(rhs.as_cuda_slice::<T>()?, rhs_layout, OP, "rhs")?;
        let CudaStorageSlice::F32(acc) = &mut acc.slice else {
            bail!("{OP}: acc is not f32");
        };
        let start = acc_layout.start_offset();
        let mut acc = acc
            .try_slice_mut(start..start + m * n)
            .ok_or_else(|| candle_core::Error::Msg(format!("{OP}: acc out of its storage")))?;
        let (lhs_address, _lhs_sync) = lhs.device_ptr(&stream);
        let (rhs_address, _rhs_sync) = rhs.device_ptr(&stream);
        let (acc_address, _acc_sync) = acc.device_ptr_mut(&stream);
        // SAFETY: lhs (k, m), rhs (k, n) and acc (m, n) are contiguous views of exactly those
        // sizes (checked by accumulate_transposed_product and `view`), on the device's
        // stream, alive for the call.
        unsafe {
            gemm_typed(
                &blas,
                Dims {
                    m,
                    n,
                    k,
                    out_stride: n,
                },
                (
                    Operand::transposed(lhs_address, m),
                    Operand::plain(rhs_address, n),
                    data_type::<T>()?,
                ),
                (acc_address, sys::cudaDataType::CUDA_R_32F),
                1.0,
            )
        }
    }
}

impl InplaceOp3 for AccumulateProduct {
    fn name(&self) -> &'static str {
        "oxtune-accumulate-transposed-product"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        super::no_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        acc: &mut CudaStorage,
        acc_layout: &Layout,
        lhs: &CudaStorage,
        lhs_layout: &Layout,
        rhs: &CudaStorage,
        rhs_layout: &Layout,
    ) -> Result<()> {
        let rhs = (rhs, rhs_layout);
        match &lhs.slice {
            CudaStorageSlice::F32(slice) => Self::run(acc, acc_layout, (slice, lhs_layout), rhs),
            CudaStorageSlice::BF16(slice) => Self::run(acc, acc_layout, (slice, lhs_layout), rhs),
            CudaStorageSlice::F16(slice) => Self::run(acc, acc_layout, (slice, lhs_layout), rhs),
            _ => bail!("{OP}: no product for dtype {:?}", lhs.dtype()),
        }
    }
}

/// `xs (.., k) W^T` for a weight W (n, k) that takes a gradient (full fine-tuning). candle's
/// matmul of x with a broadcast, transposed W computes W's gradient per batch row, sums the
/// rows and copies the transpose back into W's layout; here the backward is two products over
/// all rows: dx = dy W and dW = dy^T x, already in W's layout.
pub fn linear_trainable(xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let k = xs.dim(candle_core::D::Minus1)?;
    let (n, weight_k) = weight.dims2()?;
    if weight_k != k || !super::applies(&[xs, weight]) {
        bail!(
            "linear_trainable: x {:?} {:?} and weight {:?} {:?}: a weight (n, k) for x (.., k) \
             of one f32/bf16/f16 dtype on one CUDA device",
            xs.dims(),
            xs.dtype(),
            weight.dims(),
            weight.dtype()
        );
    }
    let mut dims = xs.dims().to_vec();
    *dims.last_mut().expect("x has a last dimension") = n;
    xs.contiguous()?
        .apply_op2(&weight.contiguous()?, TrainableLinear)?
        .reshape(dims)
}

/// y = x W^T on (x, W), differentiable in both.
struct TrainableLinear;

impl TrainableLinear {
    fn run<T: KernelFloat>(
        x: &CudaSlice<T>,
        x_layout: &Layout,
        weight: &CudaStorage,
        weight_layout: &Layout,
        device: &candle_core::CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let op = "linear_trainable";
        let (n, k) = weight_layout.shape().dims2()?;
        let m = x_layout.shape().elem_count() / k.max(1);
        let x = view(x, x_layout, op, "x")?;
        let weight = view(weight.as_cuda_slice::<T>()?, weight_layout, op, "weight")?;
        let stream = device.cuda_stream();
        let blas = device.cublas_handle();
        // SAFETY: the product below writes all m * n elements.
        let mut y = unsafe { device.alloc::<T>(m * n)? };
        {
            let (x_address, _x_sync) = x.device_ptr(&stream);
            let (w_address, _w_sync) = weight.device_ptr(&stream);
            let (y_address, _y_sync) = y.device_ptr_mut(&stream);
            // SAFETY: x (m, k), W (n, k) and y (m, n) are contiguous views of those sizes, on
            // the device's stream, alive for the call.
            unsafe {
                gemm::<T>(
                    &blas,
                    Dims {
                        m,
                        n,
                        k,
                        out_stride: n,
                    },
                    Operand::plain(x_address, k),
                    Operand::transposed(w_address, k),
                    y_address,
                    0.0,
                )?;
            }
        }
        Ok(y)
    }
}

impl CustomOp2 for TrainableLinear {
    fn name(&self) -> &'static str {
        "oxtune-linear-trainable"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        super::no_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        weight: &CudaStorage,
        weight_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, k) = weight_layout.shape().dims2()?;
        let m = x_layout.shape().elem_count() / k.max(1);
        let device = &x.device;
        let y = float_dispatch!(self.name(), x, |slice| Self::run(
            slice,
            x_layout,
            weight,
            weight_layout,
            device
        ));
        Ok((y, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k) = weight.dims2()?;
        let rows = x.elem_count() / k.max(1);
        let grad = grad.reshape((rows, n))?;
        let dx = if x.track_op() {
            Some(grad.matmul(weight)?.reshape(x.shape())?)
        } else {
            None
        };
        let dweight = grad.t()?.matmul(&x.reshape((rows, k))?)?;
        Ok((dx, Some(dweight)))
    }
}

/// A row-major matrix operand of [`gemm`]: its device address, its row stride in elements,
/// and whether the product reads it transposed.
#[derive(Clone, Copy)]
pub(super) struct Operand {
    pub(super) address: u64,
    stride: usize,
    transposed: bool,
}

impl Operand {
    pub(super) fn plain(address: u64, stride: usize) -> Self {
        Self {
            address,
            stride,
            transposed: false,
        }
    }

    pub(super) fn transposed(address: u64, stride: usize) -> Self {
        Self {
            address,
            stride,
            transposed: true,
        }
    }

    /// The operand starting `elements` further on (a column or row offset).
    pub(super) fn offset<T>(self, elements: usize) -> Self {
        Self {
            address: self.address + (elements * std::mem::size_of::<T>()) as u64,
            ..self
        }
    }
}

/// The (m, n, k) of one product and its output's row stride.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) out_stride: usize,
}

/// The cuBLAS type of a kernel dtype.
fn data_type<T: KernelFloat>() -> Result<sys::cudaDataType> {
    Ok(match T::DTYPE {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        other => bail!("no cuBLAS product for {other:?}"),
    })
}

/// Row-major `out (m, n) = op(lhs) op(rhs) + beta out` with f32 accumulation, where op(lhs)
/// is (m, k) and op(rhs) (k, n), all of dtype `T`. cuBLAS is column-major, so it computes
/// the transpose, `out^T = op(rhs)^T op(lhs)^T`, on the same memory.
///
/// # Safety
/// The addresses must hold the matrices their strides and `dims` describe, on the device
/// of `blas`'s stream, alive until the stream reaches the call.
pub(super) unsafe fn gemm<T: KernelFloat>(
    blas: &CudaBlas,
    dims: Dims,
    lhs: Operand,
    rhs: Operand,
    out: u64,
    beta: f32,
) -> Result<()> {
    let dtype = data_type::<T>()?;
    // SAFETY: the caller's contract.
    unsafe { gemm_typed(blas, dims, (lhs, rhs, dtype), (out, dtype), beta) }
}

/// [`gemm`] with inputs of type `inputs.2` and an output of type `out.1` (f32 outputs of
/// bf16/f16 inputs accumulate without rounding).
///
/// # Safety
/// As [`gemm`].
unsafe fn gemm_typed(
    blas: &CudaBlas,
    dims: Dims,
    (lhs, rhs, input_type): (Operand, Operand, sys::cudaDataType),
    (out, out_type): (u64, sys::cudaDataType),
    beta: f32,
) -> Result<()> {
    let op = |transposed: bool| {
        if transposed {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let int = |value: usize, what: &str| to_i32(value, what, "gemm");
    let alpha = 1f32;
    // SAFETY: the caller's contract; alpha and beta are f32 host scalars, as
    // CUBLAS_COMPUTE_32F takes them.
    unsafe {
        cublas::gemm_ex(
            *blas.handle(),
            op(rhs.transposed),
            op(lhs.transposed),
            int(dims.n, "n")?,
            int(dims.m, "m")?,
            int(dims.k, "k")?,
            std::ptr::from_ref(&alpha).cast(),
            rhs.address as *const _,
            input_type,
            int(rhs.stride, "a row stride")?,
            lhs.address as *const _,
            input_type,
            int(lhs.stride, "a row stride")?,
            std::ptr::from_ref(&beta).cast(),
            out as *mut _,
            out_type,
            int(dims.out_stride, "a row stride")?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .w()
}
