//! Launches of the multi-tensor AdamW kernel (`kernels/adamw.cu`) for `optim.rs`.
//!
//! `optim.rs` runs [`update`] inside an in-place op on the optimizer's flat state buffer, so
//! this holds the state's `&mut` storage. The parameters are grouped by dtype and taken 64
//! at a time (the kernel's argument struct holds 64 tensors in 4 KiB): for each group an
//! in-place op on the first weight's `Var` records its pointer and then applies the same op
//! to the next weight, nested, so when the last one launches the kernel every weight of the
//! launch is under its write lock and every gradient under its read lock. Pointers are taken
//! with cudarc's `device_ptr(_mut)`, whose guards order the launch after earlier work on
//! each buffer. Nothing is uploaded and nothing syncs.
#![allow(
    unsafe_code,
    reason = "launching the AdamW kernel with raw device pointers in its argument struct is unsafe FFI; kept to this module"
)]

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda::{CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, Layout, Result, Storage, Tensor, bail};

use super::launch::{self, KernelFloat, Module};
use crate::optim::{Scale, Slot, StepConstants};

const ADAMW: Module = Module {
    name: "oxtune_adamw",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx")),
};

/// Tensors of one launch (`ADAMW_MAX_TENSORS` in adamw.cu).
pub(crate) const MAX_TENSORS: usize = 64;
/// Elements a block takes at a time (`ADAMW_CHUNK`).
const CHUNK: usize = 4096;
/// The grid's cap; blocks loop over the chunks beyond it.
const MAX_BLOCKS: usize = 4096;

/// `AdamWTensor` of adamw.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct TensorArgs {
    grad: u64,
    weight: u64,
    len: u64,
    state: u64,
    master: i64,
    first: u64,
    decay: u64,
}

/// `AdamWArgs` of adamw.cu, passed by value as the kernel's one argument.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AdamWArgs {
    tensors: [TensorArgs; MAX_TENSORS],
    exp_avg: u64,
    exp_avg_sq: u64,
    masters: u64,
    scale_ptr: u64,
    total: u64,
    count: u32,
    scale: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    inverse_bias_correction2_sqrt: f32,
    eps: f32,
    step_size: f32,
    decay_factor: f32,
}

// adamw.cu asserts the same sizes.
const _: () = assert!(std::mem::size_of::<TensorArgs>() == 56);
const _: () = assert!(std::mem::size_of::<AdamWArgs>() == 64 * 56 + 5 * 8 + 10 * 4);

// SAFETY: plain data (integers and floats), #[repr(C)] with the layout of AdamWArgs in
// adamw.cu (sizes asserted on both sides); the kernel receives it by value.
unsafe impl DeviceRepr for AdamWArgs {}

/// What one step updates: the parameters, their f32 gradients (contiguous, distinct from
/// every weight and from the state), the step's constants and the gradient scale.
pub(crate) struct Update<'a> {
    pub slots: &'a [Slot],
    pub grads: &'a [Tensor],
    pub constants: StepConstants,
    pub scale: &'a Scale,
    pub moments: usize,
    pub masters: usize,
}

fn to_u64(value: usize) -> u64 {
    u64::try_from(value).expect("usize fits u64")
}

/// Updates every parameter of `update` and the state buffer `state` (f32, `layout`
/// contiguous, 2 * moments + masters elements).
pub(crate) fn update(state: &mut CudaStorage, layout: &Layout, update: &Update<'_>) -> Result<()> {
    let op = "oxtune-adamw";
    let length = 2 * update.moments + update.masters;
    if !layout.is_contiguous() || layout.shape().elem_count() != length {
        bail!(
            "{op}: the state {:?} (stride {:?}) is not {length} contiguous elements",
            layout.shape(),
            layout.stride()
        );
    }
    let device = state.device.clone();
    let stream = device.cuda_stream();
    let slice = state.as_cuda_slice_mut::<f32>()?;
    let (base, _state_written) = slice.device_ptr_mut(&stream);
    let base = base + to_u64(layout.start_offset() * 4);

    let scale_storage = match update.scale {
        Scale::Device(tensor) => Some(tensor.storage_and_layout()),
        Scale::Host(_) => None,
    };
    let mut scale_reads = Vec::new();
    let (scale, scale_ptr) = match (update.scale, &scale_storage) {
        (Scale::Host(scale), _) => (*scale, 0),
        (Scale::Device(_), Some((storage, scale_layout))) => {
            let Storage::Cuda(storage) = &**storage else {
                bail!("{op}: the gradient scale is not on the GPU");
            };
            let (pointer, read) = storage.as_cuda_slice::<f32>()?.device_ptr(&stream);
            scale_reads.push(read);
            (1.0, pointer + to_u64(scale_layout.start_offset() * 4))
        }
        (Scale::Device(_), None) => unreachable!("a device scale has its storage"),
    };

    let c = update.constants;
    let empty = AdamWArgs {
        tensors: [TensorArgs::default(); MAX_TENSORS],
        exp_avg: base,
        exp_avg_sq: base + to_u64(update.moments * 4),
        masters: base + to_u64(2 * update.moments * 4),
        scale_ptr,
        total: 0,
        count: 0,
        scale,
        beta1: c.beta1,
        one_minus_beta1: c.one_minus_beta1,
        beta2: c.beta2,
        one_minus_beta2: c.one_minus_beta2,
        inverse_bias_correction2_sqrt: c.inverse_bias_correction2_sqrt,
        eps: c.eps,
        step_size: c.step_size,
        decay_factor: c.decay_factor,
    };
    for dtype in [
        candle_core::DType::F32,
        candle_core::DType::BF16,
        candle_core::DType::F16,
    ] {
        let of_dtype: Vec<usize> = (0..update.slots.len())
            .filter(|&index| update.slots[index].var.dtype() == dtype)
            .collect();
        for chunk in of_dtype.chunks(MAX_TENSORS) {
            let args = RefCell::new(empty);
            let collect = Collect {
                chunk,
                position: 0,
                update,
                args: &args,
            };
            update.slots[chunk[0]]
                .var
                .as_tensor()
                .inplace_op1(&collect)?;
        }
    }
    drop(scale_reads);
    Ok(())
}

/// The in-place op on one weight of a launch: records its pointers, then recurses into the
/// next weight, or launches when it is the last.
#[derive(Clone, Copy)]
struct Collect<'a> {
    /// Indices of the launch's parameters (one dtype, at most MAX_TENSORS).
    chunk: &'a [usize],
    /// This weight's place in `chunk`.
    position: usize,
    update: &'a Update<'a>,
    args: &'a RefCell<AdamWArgs>,
}

impl candle_core::InplaceOp1 for Collect<'_> {
    fn name(&self) -> &'static str {
        "oxtune-adamw"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        bail!("oxtune-adamw: a CPU weight in a CUDA update")
    }

    fn cuda_fwd(&self, weight: &mut CudaStorage, layout: &Layout) -> Result<()> {
        let device = weight.device.clone();
        match &mut weight.slice {
            CudaStorageSlice::F32(slice) => self.visit(slice, layout, &device),
            CudaStorageSlice::BF16(slice) => self.visit(slice, layout, &device),
            CudaStorageSlice::F16(slice) => self.visit(slice, layout, &device),
            _ => bail!("oxtune-adamw: no kernel for a {:?} weight", weight.dtype()),
        }
    }
}

impl Collect<'_> {
    fn visit<T: KernelFloat>(
        &self,
        weight: &mut CudaSlice<T>,
        layout: &Layout,
        device: &CudaDevice,
    ) -> Result<()> {
        let op = "oxtune-adamw";
        let index = self.chunk[self.position];
        let slot = &self.update.slots[index];
        let grad = &self.update.grads[index];
        if !layout.is_contiguous() || layout.shape().elem_count() != slot.len {
            bail!(
                "{op}: weight {index} {:?} (stride {:?}) is not {} contiguous elements",
                layout.shape(),
                layout.stride(),
                slot.len
            );
        }
        if slot.var.dtype() != T::DTYPE {
            bail!(
                "{op}: weight {index} is {:?} in a {:?} launch",
                slot.var.dtype(),
                T::DTYPE
            );
        }
        let stream = device.cuda_stream();
        let (weight_ptr, _weight_written) = weight.device_ptr_mut(&stream);
        let (grad_storage, grad_layout) = grad.storage_and_layout();
        let Storage::Cuda(grad_storage) = &*grad_storage else {
            bail!("{op}: gradient {index} is not on the GPU");
        };
        if !grad_layout.is_contiguous() || grad_layout.shape().elem_count() != slot.len {
            bail!(
                "{op}: gradient {index} {:?} (stride {:?}) is not {} contiguous elements",
                grad_layout.shape(),
                grad_layout.stride(),
                slot.len
            );
        }
        let (grad_ptr, _grad_read) = grad_storage.as_cuda_slice::<f32>()?.device_ptr(&stream);
        {
            let mut args = self.args.borrow_mut();
            let k = usize::try_from(args.count).expect("at most MAX_TENSORS");
            let first = args.total;
            args.tensors[k] = TensorArgs {
                grad: grad_ptr + to_u64(grad_layout.start_offset() * 4),
                weight: weight_ptr + to_u64(layout.start_offset() * std::mem::size_of::<T>()),
                len: to_u64(slot.len),
                state: to_u64(slot.offset),
                master: slot
                    .master
                    .map_or(Ok(-1), i64::try_from)
                    .or_else(|_| bail!("{op}: master offset beyond i64"))?,
                first,
                decay: u64::from(slot.decay),
            };
            args.count += 1;
            args.total += to_u64(slot.len);
        }
        if self.position + 1 < self.chunk.len() {
            let next = Collect {
                position: self.position + 1,
                ..*self
            };
            let next_weight = self.update.slots[self.chunk[self.position + 1]]
                .var
                .as_tensor();
            next_weight.inplace_op1(&next)
        } else {
            launch_adamw::<T>(device, &self.args.borrow())
        }
    }
}

/// One launch over the tensors of `args`, every pointer of which is held by a caller frame.
fn launch_adamw<T: KernelFloat>(device: &CudaDevice, args: &AdamWArgs) -> Result<()> {
    let kernel = "adamw";
    let Ok(total) = usize::try_from(args.total) else {
        bail!("{kernel}: {} elements do not fit a usize", args.total);
    };
    if total == 0 {
        return Ok(());
    }
    let blocks = launch::to_u32(total.div_ceil(CHUNK).min(MAX_BLOCKS), "blocks", kernel)?;
    let func = launch::function::<T>(device, &ADAMW, kernel)?;
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    builder.arg(args);
    let config = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: every tensor k < count of args points at `len` elements: its weight (of T,
    // under the caller frames' write locks), its f32 gradient (read-locked), and its state
    // at exp_avg/exp_avg_sq + state and masters + master, within the state buffer whose
    // length update() checked (offsets come from MultiTensorAdamW's layout). first/total
    // describe the tensors end to end; the argument struct matches adamw_<dtype>.
    unsafe { builder.launch(config) }.w()?;
    Ok(())
}

/// Tensors of one sum-of-squares launch (`SUM_SQUARES_MAX_TENSORS`).
const SUM_SQUARES_MAX_TENSORS: usize = 128;
/// The sum-of-squares grid's cap.
const SUM_SQUARES_MAX_BLOCKS: usize = 1024;

/// `SumSquaresTensor` of adamw.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SumSquaresTensor {
    data: u64,
    len: u64,
    first: u64,
}

/// `SumSquaresArgs` of adamw.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct SumSquaresArgs {
    tensors: [SumSquaresTensor; SUM_SQUARES_MAX_TENSORS],
    partials: u64,
    total: u64,
    count: u32,
    padding: u32,
}

const _: () = assert!(std::mem::size_of::<SumSquaresArgs>() == 128 * 24 + 3 * 8);

// SAFETY: plain integers, #[repr(C)] with the layout of SumSquaresArgs in adamw.cu (sizes
// asserted on both sides); passed by value.
unsafe impl DeviceRepr for SumSquaresArgs {}

/// sum of x^2 over `tensors` (f32, contiguous, on `device`), as an f64 scalar tensor: one
/// launch per 128 tensors writing per-block f64 partial sums, then one candle sum.
pub(crate) fn sum_of_squares(tensors: &[Tensor], device: &candle_core::Device) -> Result<Tensor> {
    let mut launches = Vec::new();
    let mut blocks = 0;
    for chunk in tensors.chunks(SUM_SQUARES_MAX_TENSORS) {
        let total: usize = chunk.iter().map(Tensor::elem_count).sum();
        let launch_blocks = total.div_ceil(CHUNK).clamp(1, SUM_SQUARES_MAX_BLOCKS);
        launches.push((chunk, blocks, launch_blocks));
        blocks += launch_blocks;
    }
    let partials = Tensor::zeros(blocks, candle_core::DType::F64, device)?;
    partials.inplace_op1(&SumSquares {
        launches: &launches,
    })?;
    partials.sum_all()
}

/// Writes the partial sums of every launch into the f64 tensor it is applied to.
struct SumSquares<'a> {
    /// (tensors, first partial, blocks) per launch.
    launches: &'a [(&'a [Tensor], usize, usize)],
}

impl candle_core::InplaceOp1 for SumSquares<'_> {
    fn name(&self) -> &'static str {
        "oxtune-sum-of-squares"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        bail!(
            "oxtune-sum-of-squares: a CUDA kernel; optim::sum_of_squares composes candle ops on the CPU"
        )
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> Result<()> {
        let kernel = "sum_squares";
        let device = storage.device.clone();
        let stream = device.cuda_stream();
        let blocks: usize = self.launches.iter().map(|(_, _, blocks)| blocks).sum();
        if !layout.is_contiguous() || layout.shape().elem_count() != blocks {
            bail!(
                "{kernel}: partials {:?} for {blocks} blocks",
                layout.shape()
            );
        }
        let partials = storage.as_cuda_slice_mut::<f64>()?;
        let (partials, _partials_written) = partials.device_ptr_mut(&stream);
        let partials = partials + to_u64(layout.start_offset() * 8);
        let func = launch::function::<f32>(&device, &ADAMW, kernel)?;
        for &(tensors, first_block, launch_blocks) in self.launches {
            let storages: Vec<_> = tensors.iter().map(Tensor::storage_and_layout).collect();
            let mut reads = Vec::with_capacity(storages.len());
            let mut args = SumSquaresArgs {
                tensors: [SumSquaresTensor::default(); SUM_SQUARES_MAX_TENSORS],
                partials: partials + to_u64(first_block * 8),
                total: 0,
                count: 0,
                padding: 0,
            };
            for (k, (storage, tensor_layout)) in storages.iter().enumerate() {
                let Storage::Cuda(storage) = &**storage else {
                    bail!("{kernel}: tensor {k} of a launch is not on the GPU");
                };
                if !tensor_layout.is_contiguous() {
                    bail!(
                        "{kernel}: tensor {k} {:?} (stride {:?}) is not contiguous",
                        tensor_layout.shape(),
                        tensor_layout.stride()
                    );
                }
                let (pointer, read) = storage.as_cuda_slice::<f32>()?.device_ptr(&stream);
                reads.push(read);
                let len = tensor_layout.shape().elem_count();
                args.tensors[k] = SumSquaresTensor {
                    data: pointer + to_u64(tensor_layout.start_offset() * 4),
                    len: to_u64(len),
                    first: args.total,
                };
                args.total += to_u64(len);
                args.count += 1;
            }
            let mut builder = stream.launch_builder(&func);
            builder.arg(&args);
            let config = LaunchConfig {
                grid_dim: (launch::to_u32(launch_blocks, "blocks", kernel)?, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: each of the `count` tensors points at `len` f32 elements of a storage
            // read-locked in `storages`; the launch's `launch_blocks` blocks write partials
            // [first_block, first_block + launch_blocks) of the f64 tensor this op holds
            // (its length checked above); arguments match sum_squares_f32.
            unsafe { builder.launch(config) }.w()?;
            drop(reads);
        }
        Ok(())
    }
}

/// Gradients of one accumulation launch (`ACCUMULATE_MAX_TENSORS`).
const ACCUMULATE_MAX_TENSORS: usize = 120;

/// `AccumulateTensor` of adamw.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct AccumulateTensor {
    src: u64,
    len: u64,
    first: u64,
    offset: u64,
}

/// `AccumulateArgs` of adamw.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AccumulateArgs {
    tensors: [AccumulateTensor; ACCUMULATE_MAX_TENSORS],
    dst: u64,
    total: u64,
    count: u32,
    assign: u32,
}

const _: () = assert!(std::mem::size_of::<AccumulateArgs>() == 120 * 32 + 3 * 8);

// SAFETY: plain integers, #[repr(C)] with the layout of AccumulateArgs in adamw.cu (sizes
// asserted on both sides); passed by value.
unsafe impl DeviceRepr for AccumulateArgs {}

/// `flat[offsets[i]..][..len]` = (or +=) f32(`sources[i]`): one launch per 120 sources of a
/// dtype (f32, bf16, f16; contiguous, on the GPU, not sharing `flat`'s storage). `flat` is
/// f32, contiguous, and every region fits in it (`optim::accumulate_into` checks).
pub(crate) fn accumulate(
    flat: &Tensor,
    offsets: &[usize],
    sources: &[Tensor],
    assign: bool,
) -> Result<()> {
    for dtype in [
        candle_core::DType::F32,
        candle_core::DType::BF16,
        candle_core::DType::F16,
    ] {
        let of_dtype: Vec<usize> = (0..sources.len())
            .filter(|&index| sources[index].dtype() == dtype)
            .collect();
        for chunk in of_dtype.chunks(ACCUMULATE_MAX_TENSORS) {
            flat.inplace_op1(&Accumulate {
                chunk,
                offsets,
                sources,
                assign,
            })?;
        }
    }
    Ok(())
}

/// One accumulation launch, applied in place to the flat f32 buffer.
struct Accumulate<'a> {
    /// Indices of the launch's sources (one dtype).
    chunk: &'a [usize],
    offsets: &'a [usize],
    sources: &'a [Tensor],
    assign: bool,
}

/// A source's device pointer (held by the returned guard) and the kernel for its dtype.
fn source_pointer<'a, T: KernelFloat>(
    slice: &'a CudaSlice<T>,
    stream: &'a std::sync::Arc<candle_core::cuda::cudarc::driver::CudaStream>,
    device: &CudaDevice,
) -> Result<(
    u64,
    candle_core::cuda::cudarc::driver::SyncOnDrop<'a>,
    candle_core::cuda::cudarc::driver::CudaFunction,
    usize,
)> {
    let (pointer, read) = slice.device_ptr(stream);
    let func = launch::function::<T>(device, &ADAMW, "accumulate")?;
    Ok((pointer, read, func, std::mem::size_of::<T>()))
}

impl candle_core::InplaceOp1 for Accumulate<'_> {
    fn name(&self) -> &'static str {
        "oxtune-accumulate-gradients"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        bail!(
            "oxtune-accumulate-gradients: a CUDA kernel; optim::accumulate_into uses candle ops on the CPU"
        )
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> Result<()> {
        let kernel = "accumulate";
        let flat_len = layout.shape().elem_count();
        if !layout.is_contiguous() {
            bail!("{kernel}: the flat buffer is not contiguous");
        }
        let device = storage.device.clone();
        let stream = device.cuda_stream();
        let flat = storage.as_cuda_slice_mut::<f32>()?;
        let (flat, _flat_written) = flat.device_ptr_mut(&stream);
        let flat = flat + to_u64(layout.start_offset() * 4);
        let storages: Vec<_> = self
            .chunk
            .iter()
            .map(|&index| self.sources[index].storage_and_layout())
            .collect();
        let mut reads = Vec::with_capacity(storages.len());
        let mut func = None;
        let mut args = AccumulateArgs {
            tensors: [AccumulateTensor::default(); ACCUMULATE_MAX_TENSORS],
            dst: flat,
            total: 0,
            count: 0,
            assign: u32::from(self.assign),
        };
        for (k, (&index, (storage, source_layout))) in self.chunk.iter().zip(&storages).enumerate()
        {
            let Storage::Cuda(storage) = &**storage else {
                bail!("{kernel}: gradient {index} is not on the GPU");
            };
            let len = source_layout.shape().elem_count();
            let offset = self.offsets[index];
            if !source_layout.is_contiguous() || offset + len > flat_len {
                bail!(
                    "{kernel}: gradient {index} {:?} (stride {:?}) at {offset} in a buffer of {flat_len}",
                    source_layout.shape(),
                    source_layout.stride()
                );
            }
            let (pointer, read, kernel_func, size) = match &storage.slice {
                CudaStorageSlice::F32(slice) => source_pointer(slice, &stream, &device)?,
                CudaStorageSlice::BF16(slice) => source_pointer(slice, &stream, &device)?,
                CudaStorageSlice::F16(slice) => source_pointer(slice, &stream, &device)?,
                _ => bail!(
                    "{kernel}: gradient {index} is {:?}; f32, bf16 and f16 have a kernel",
                    storage.dtype()
                ),
            };
            reads.push(read);
            func.get_or_insert(kernel_func);
            args.tensors[k] = AccumulateTensor {
                src: pointer + to_u64(source_layout.start_offset() * size),
                len: to_u64(len),
                first: args.total,
                offset: to_u64(offset),
            };
            args.total += to_u64(len);
            args.count += 1;
        }
        let (Some(func), Ok(total)) = (func, usize::try_from(args.total)) else {
            return Ok(());
        };
        if total == 0 {
            return Ok(());
        }
        let blocks = launch::to_u32(total.div_ceil(CHUNK).min(MAX_BLOCKS), "blocks", kernel)?;
        let mut builder = stream.launch_builder(&func);
        builder.arg(&args);
        let config = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: each of the `count` sources points at `len` elements of its dtype (the
        // launch's one dtype: `accumulate` grouped them) in a storage read-locked in
        // `storages`; each writes flat[offset, offset + len), within the buffer this op holds
        // (checked above); arguments match accumulate_<dtype>.
        unsafe { builder.launch(config) }.w()?;
        drop(reads);
        Ok(())
    }
}
