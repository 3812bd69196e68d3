//! LoRA linear layers as one op on cuBLAS, for [`crate::ops::lora_linear`]: one or several
//! projections of one input, `y_i = x W_i^T + (x A_i^T) B_i^T`, concatenated on the last
//! dimension, with a backward of its own.
//!
//! Composed from candle ops, each adapted layer keeps its base output, its adapter output and
//! their sum alive until the backward, adds them in the forward, and sums x's two gradients
//! (through W and through A) in the backward; q, k and v (or gate and up) add three (two)
//! such pairs into their shared input. Here cuBLAS accumulates instead (`beta = 1`): the
//! adapter product into the base output, and every projection's input gradient into one
//! dx. The op saves only its inputs; the backward recomputes `x A^T` (r columns per
//! projection), which costs a few percent of the base product.
//!
//! candle's custom ops take at most three tensors: the op runs on (x, A, B) with A the
//! projections' A_i stacked (P r, k) and B their B_i stacked (n_0 + n_1 + .., r); the frozen
//! weights ride along and are read-locked inside, each storage once (they must differ from
//! the inputs' and from each other's, which [`lora_linear_takes`] checks, as for the GEMV).
//!
//! With dropout on the adapters' input (training), the update reads a different x' than the
//! base product: [`lora_linear_projected`] then takes h = x' A^T, computed by candle (which
//! keeps the dropout's and A's backward), in place of A: (x, h, B). Its backward returns dh
//! where the other returns dA, and dx holds the base products' part only.
#![allow(
    unsafe_code,
    reason = "cuBLAS calls on device pointers and uninitialised outputs are unsafe FFI; kept to the cuda module"
)]

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaStorageSlice;
use candle_core::cuda::cudarc::cublas::CudaBlas;
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, Layout, Result, Shape, Storage, StorageRef,
    Tensor, bail,
};

use super::blas::{Dims, Operand, gemm};
use super::launch::KernelFloat;
use super::{no_cpu, storage_address, view, view_as};

const OP: &str = "lora_linear";

/// Whether the op takes x (.., k), `weights` W_i (n_i, k), `a` (P r, k) and `b` (sum n_i, r):
/// one CUDA device and dtype (f32, bf16, f16), frozen weights with contiguous rows (views
/// of a larger weight are fine), P = `weights.len()` >= 1 parts of equal rank, and every
/// storage distinct.
pub fn lora_linear_takes(xs: &Tensor, weights: &[&Tensor], a: &Tensor, b: &Tensor) -> bool {
    takes(xs, weights, a, b, Update::Factors)
}

/// [`lora_linear_takes`] for [`lora_linear_projected`]: `h` (.., P r) in place of `a`, with
/// x's leading dimensions.
pub fn lora_linear_projected_takes(
    xs: &Tensor,
    weights: &[&Tensor],
    h: &Tensor,
    b: &Tensor,
) -> bool {
    takes(xs, weights, h, b, Update::Projected)
}

fn takes(xs: &Tensor, weights: &[&Tensor], second: &Tensor, b: &Tensor, update: Update) -> bool {
    let Some(&k) = xs.dims().last() else {
        return false;
    };
    let parts = weights.len();
    let n: usize = weights.iter().filter_map(|w| w.dims().first()).sum();
    let stacked = match update {
        Update::Factors if second.rank() == 2 && second.dim(1).ok() == Some(k) => {
            second.dim(0).ok()
        }
        Update::Projected
            if second.dims().split_last().map(|(_, lead)| lead)
                == xs.dims().split_last().map(|(_, lead)| lead) =>
        {
            second.dims().last().copied()
        }
        _ => None,
    };
    let mut all: Vec<&Tensor> = vec![xs, second, b];
    all.extend(weights);
    let mut addresses: Vec<usize> = all.iter().map(|t| storage_address(t)).collect();
    addresses.sort_unstable();
    addresses.dedup();
    super::applies(&all)
        && parts >= 1
        && weights
            .iter()
            .all(|w| w.rank() == 2 && w.dim(1).ok() == Some(k) && w.stride() == [k, 1])
        && !weights.iter().any(|w| w.track_op())
        && stacked.is_some_and(|rows| rows > 0 && rows.is_multiple_of(parts))
        && b.rank() == 2
        && b.dim(0).ok() == Some(n)
        && b.dim(1).ok() == stacked.map(|rows| rows / parts)
        && addresses.len() == all.len()
}

/// x (.., k) through P projections W_i (n_i, k) with LoRA adapters A_i (r, k) and B_i
/// (n_i, r) (any scale already in B), concatenated: (.., n_0 + n_1 + ..). `a` stacks the
/// A_i, `b` the B_i. Differentiable in x, a and b. Errors where [`lora_linear_takes`]
/// refuses the inputs.
pub fn lora_linear(xs: &Tensor, weights: &[&Tensor], a: &Tensor, b: &Tensor) -> Result<Tensor> {
    apply(xs, weights, a, b, Update::Factors)
}

/// [`lora_linear`] whose updates read the projected input `h` = x' A^T (.., P r) (x' the
/// adapters' input after dropout; the h_i side by side): x W_i^T + h_i B_i^T. Differentiable
/// in x, h and b. Errors where [`lora_linear_projected_takes`] refuses the inputs.
pub fn lora_linear_projected(
    xs: &Tensor,
    weights: &[&Tensor],
    h: &Tensor,
    b: &Tensor,
) -> Result<Tensor> {
    apply(xs, weights, h, b, Update::Projected)
}

fn apply(
    xs: &Tensor,
    weights: &[&Tensor],
    second: &Tensor,
    b: &Tensor,
    update: Update,
) -> Result<Tensor> {
    if !takes(xs, weights, second, b, update) {
        bail!(
            "{OP}: the op takes x (.., k), frozen weights (n_i, k) with contiguous rows, {} and \
             B (sum n_i, r) of one f32/bf16/f16 dtype on one CUDA device, in distinct storages; \
             got x {:?}, weights {:?}, {:?}, B {:?}",
            match update {
                Update::Factors => "A (P r, k)",
                Update::Projected => "h (.., P r)",
            },
            xs.dims(),
            weights.iter().map(|w| w.dims()).collect::<Vec<_>>(),
            second.dims(),
            b.dims()
        );
    }
    let op = LoraLinear {
        weights: weights.iter().map(|&w| w.clone()).collect(),
        update,
    };
    let n: usize = weights.iter().map(|w| w.dims()[0]).sum();
    let out = xs
        .contiguous()?
        .apply_op3(&second.contiguous()?, &b.contiguous()?, op)?;
    let mut dims = xs.dims().to_vec();
    *dims.last_mut().expect("checked rank") = n;
    out.reshape(dims)
}

/// The op's second input: the stacked A (the op computes h = x A^T itself), or h given.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Update {
    Factors,
    Projected,
}

/// The forward: x is the first input, the frozen weights ride along.
struct LoraLinear {
    weights: Vec<Tensor>,
    update: Update,
}

/// The backward, on (dy, x, A or h) with the weights and B riding along: one buffer holding
/// dx (when asked), dA or dh, and dB, in that order.
struct LoraLinearBackward {
    weights: Vec<Tensor>,
    b: Tensor,
    with_dx: bool,
    update: Update,
}

/// A frozen tensor's elements as a view of its (read-locked) CUDA storage.
fn riding_view<'a, T: KernelFloat>(
    storage: &'a Storage,
    tensor: &Tensor,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(storage) = storage else {
        bail!("{OP}: {what} is not on a CUDA device");
    };
    view(storage.as_cuda_slice::<T>()?, tensor.layout(), OP, what)
}

/// The frozen weights' elements as views of their read-locked storages (`guards`, one per
/// weight; `takes` checked the storages are distinct, so none is locked twice).
fn weight_views<'a, T: KernelFloat>(
    weights: &[Tensor],
    guards: &'a [(StorageRef<'a>, &'a Layout)],
) -> Result<Vec<CudaView<'a, T>>> {
    weights
        .iter()
        .zip(guards)
        .map(|(w, (guard, _))| riding_view::<T>(guard, w, "a weight"))
        .collect()
}

/// h (m, P r) = x (m, k) A^T, A (P r, k) stacked.
///
/// # Safety
/// As [`gemm`]: the addresses hold those matrices on `blas`'s stream, alive for the call.
unsafe fn project<T: KernelFloat>(
    blas: &CudaBlas,
    sizes: &Sizes,
    x: u64,
    a: u64,
    h: u64,
) -> Result<()> {
    let (stacked, k) = (sizes.stacked_rank(), sizes.k);
    let dims = Dims {
        m: sizes.m,
        n: stacked,
        k,
        out_stride: stacked,
    };
    // SAFETY: the caller's contract.
    unsafe {
        gemm::<T>(
            blas,
            dims,
            Operand::plain(x, k),
            Operand::transposed(a, k),
            h,
            0.0,
        )
    }
}

/// The shapes of one call: rows m of x, its width k, the projections' widths, the rank.
struct Sizes {
    m: usize,
    k: usize,
    widths: Vec<usize>,
    rank: usize,
}

impl Sizes {
    fn new(x: &Layout, second: &Layout, weights: &[Tensor], update: Update) -> Self {
        let k = *x.shape().dims().last().unwrap_or(&0);
        let widths: Vec<usize> = weights.iter().map(|w| w.dims()[0]).collect();
        let stacked = match update {
            Update::Factors => second.shape().dims()[0],
            Update::Projected => *second.shape().dims().last().unwrap_or(&0),
        };
        let rank = stacked / widths.len();
        Self {
            m: x.shape().elem_count() / k.max(1),
            k,
            widths,
            rank,
        }
    }

    fn n(&self) -> usize {
        self.widths.iter().sum()
    }

    /// Rows of the stacked A (columns of h).
    fn stacked_rank(&self) -> usize {
        self.rank * self.widths.len()
    }

    /// Each projection's first output column.
    fn starts(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        self.widths
            .iter()
            .scan(0, |start, &width| {
                let first = *start;
                *start += width;
                Some((first, width))
            })
            .enumerate()
            .map(|(part, (start, width))| (part, start, width))
    }
}

impl LoraLinear {
    fn run<T: KernelFloat>(
        &self,
        device: &CudaDevice,
        x: &CudaView<'_, T>,
        second: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        sizes: &Sizes,
    ) -> Result<CudaSlice<T>> {
        let Sizes { m, k, rank, .. } = *sizes;
        let (n, stacked) = (sizes.n(), sizes.stacked_rank());
        let guards: Vec<_> = self
            .weights
            .iter()
            .map(Tensor::storage_and_layout)
            .collect();
        let weights = weight_views::<T>(&self.weights, &guards)?;
        let stream = device.cuda_stream();
        let blas = device.cublas_handle();
        // SAFETY: y, and h when the op makes it, are written in full below (h by one product,
        // every column of y by its projection's base product) before anything reads them.
        let mut y = unsafe { device.alloc::<T>(m * n)? };
        let mut made_h = match self.update {
            Update::Factors => Some(unsafe { device.alloc::<T>(m * stacked)? }),
            Update::Projected => None,
        };
        // The device addresses, and their stream syncs, live until the products are queued.
        {
            let (x_address, _x_sync) = x.device_ptr(&stream);
            let (second_address, _second_sync) = second.device_ptr(&stream);
            let (b_address, _b_sync) = b.device_ptr(&stream);
            let made_h = made_h.as_mut().map(|h| h.device_ptr_mut(&stream));
            let (y_address, _y_sync) = y.device_ptr_mut(&stream);
            let weight_addresses: Vec<_> = weights.iter().map(|w| w.device_ptr(&stream)).collect();
            let x_rows = Operand::plain(x_address, k);
            let h_address = made_h
                .as_ref()
                .map_or(second_address, |(address, _)| *address);
            let h_rows = Operand::plain(h_address, stacked);
            // SAFETY (every product below): x (m, k), A (P r, k) or h (m, P r), B (n, r),
            // each weight (n_i, k) and y (m, n) hold what their strides and the dims say (the
            // views are checked contiguous, `takes` checked the shapes); all are on the
            // device's stream, which cuBLAS runs on, and outlive the calls.
            unsafe {
                if made_h.is_some() {
                    project::<T>(&blas, sizes, x_address, second_address, h_address)?;
                }
                for (part, start, width) in sizes.starts() {
                    let out = Operand::plain(y_address, n).offset::<T>(start).address;
                    // y_i = x W_i^T, then y_i += h_i B_i^T
                    gemm::<T>(
                        &blas,
                        Dims {
                            m,
                            n: width,
                            k,
                            out_stride: n,
                        },
                        x_rows,
                        Operand::transposed(weight_addresses[part].0, k),
                        out,
                        0.0,
                    )?;
                    gemm::<T>(
                        &blas,
                        Dims {
                            m,
                            n: width,
                            k: rank,
                            out_stride: n,
                        },
                        h_rows.offset::<T>(part * rank),
                        Operand::transposed(b_address, rank).offset::<T>(start * rank),
                        out,
                        1.0,
                    )?;
                }
            }
        }
        Ok(y)
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "oxtune-lora-linear"
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
        x: &CudaStorage,
        x_layout: &Layout,
        a: &CudaStorage,
        a_layout: &Layout,
        b: &CudaStorage,
        b_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let sizes = Sizes::new(x_layout, a_layout, &self.weights, self.update);
        let device = &x.device;
        let y = float_dispatch!(OP, x, |slice| self.run(
            device,
            &view(slice, x_layout, OP, "x")?,
            &view_as(a, a_layout, OP, "A or h")?,
            &view_as(b, b_layout, OP, "B")?,
            &sizes
        ));
        Ok((y, Shape::from((sizes.m, sizes.n()))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        second: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let with_dx = x.track_op();
        let backward = LoraLinearBackward {
            weights: self.weights.clone(),
            b: b.clone(),
            with_dx,
            update: self.update,
        };
        let k = x.dim(candle_core::D::Minus1)?;
        let m = x.elem_count() / k.max(1);
        let (second_len, b_len) = (second.elem_count(), b.elem_count());
        let packed = grad.contiguous()?.apply_op3_no_bwd(x, second, &backward)?;
        let dx_len = if with_dx { m * k } else { 0 };
        let dx = if with_dx {
            Some(packed.narrow(0, 0, dx_len)?.reshape(x.shape())?)
        } else {
            None
        };
        // dA, or dh
        let dsecond = packed
            .narrow(0, dx_len, second_len)?
            .reshape(second.shape())?;
        let db = packed
            .narrow(0, dx_len + second_len, b_len)?
            .reshape(b.shape())?;
        Ok((dx, Some(dsecond), Some(db)))
    }
}

impl LoraLinearBackward {
    /// Elements of the gradient of the op's second input: dA (P r, k), or dh (m, P r).
    fn second_len(&self, sizes: &Sizes) -> usize {
        match self.update {
            Update::Factors => sizes.stacked_rank() * sizes.k,
            Update::Projected => sizes.m * sizes.stacked_rank(),
        }
    }

    fn run<T: KernelFloat>(
        &self,
        device: &CudaDevice,
        dy: &CudaView<'_, T>,
        x: &CudaView<'_, T>,
        second: &CudaView<'_, T>,
        sizes: &Sizes,
    ) -> Result<CudaSlice<T>> {
        let Sizes { m, k, rank, .. } = *sizes;
        let (n, stacked) = (sizes.n(), sizes.stacked_rank());
        let dx_len = if self.with_dx { m * k } else { 0 };
        let factors = self.update == Update::Factors;
        let guards: Vec<_> = self
            .weights
            .iter()
            .map(Tensor::storage_and_layout)
            .collect();
        let weights = weight_views::<T>(&self.weights, &guards)?;
        let (b_guard, _) = self.b.storage_and_layout();
        let b = riding_view::<T>(&b_guard, &self.b, "B")?;
        let stream = device.cuda_stream();
        let blas = device.cublas_handle();
        // SAFETY: every section of the output, and h and dh when the op makes them (from A),
        // are written in full below before anything reads them (dx by its first product
        // with beta 0).
        let mut out = unsafe { device.alloc::<T>(dx_len + self.second_len(sizes) + n * rank)? };
        let mut made = if factors {
            // SAFETY: as above.
            Some(unsafe {
                (
                    device.alloc::<T>(m * stacked)?,
                    device.alloc::<T>(m * stacked)?,
                )
            })
        } else {
            None
        };
        // The device addresses, and their stream syncs, live until the products are queued.
        {
            let (dy_address, _dy_sync) = dy.device_ptr(&stream);
            let (x_address, _x_sync) = x.device_ptr(&stream);
            let (second_address, _second_sync) = second.device_ptr(&stream);
            let (b_address, _b_sync) = b.device_ptr(&stream);
            let (out_address, _out_sync) = out.device_ptr_mut(&stream);
            let made = made
                .as_mut()
                .map(|(h, dh)| (h.device_ptr_mut(&stream), dh.device_ptr_mut(&stream)));
            let weight_addresses: Vec<_> = weights.iter().map(|w| w.device_ptr(&stream)).collect();
            let dx_address = out_address;
            let second_grad = Operand::plain(out_address, k).offset::<T>(dx_len).address;
            let db = Operand::plain(out_address, rank).offset::<T>(dx_len + self.second_len(sizes));
            // h: made from A, or the second input; dh: made, or the output's section
            let (h_address, dh_address) = match &made {
                Some(((h, _), (dh, _))) => (*h, *dh),
                None => (second_address, second_grad),
            };
            let x_rows = Operand::plain(x_address, k);
            let dy_rows = Operand::plain(dy_address, n);
            let h_rows = Operand::plain(h_address, stacked);
            let dh_rows = Operand::plain(dh_address, stacked);
            // SAFETY (every product below): dy (m, n), x (m, k), A (P r, k) or h (m, P r),
            // B (n, r), each weight (n_i, k), h and dh (m, P r) and the output's sections dx
            // (m, k), dA (P r, k) or dh, and dB (n, r) hold what their strides and the dims
            // say (views checked contiguous, shapes by `takes` and the forward); all on the
            // device's stream, alive for the calls.
            unsafe {
                if factors {
                    // again: cheaper than keeping h alive from the forward
                    project::<T>(&blas, sizes, x_address, second_address, h_address)?;
                }
                for (part, start, width) in sizes.starts() {
                    let dy_part = dy_rows.offset::<T>(start);
                    let b_part = Operand::plain(b_address, rank).offset::<T>(start * rank);
                    // dh_i = dy_i B_i
                    gemm::<T>(
                        &blas,
                        Dims {
                            m,
                            n: rank,
                            k: width,
                            out_stride: stacked,
                        },
                        dy_part,
                        b_part,
                        dh_rows.offset::<T>(part * rank).address,
                        0.0,
                    )?;
                    // dB_i = dy_i^T h_i
                    gemm::<T>(
                        &blas,
                        Dims {
                            m: width,
                            n: rank,
                            k: m,
                            out_stride: rank,
                        },
                        Operand::transposed(dy_part.address, n),
                        h_rows.offset::<T>(part * rank),
                        db.offset::<T>(start * rank).address,
                        0.0,
                    )?;
                    // dx = sum_i dy_i W_i (+ dh A below)
                    if self.with_dx {
                        gemm::<T>(
                            &blas,
                            Dims {
                                m,
                                n: k,
                                k: width,
                                out_stride: k,
                            },
                            dy_part,
                            Operand::plain(weight_addresses[part].0, k),
                            dx_address,
                            if part == 0 { 0.0 } else { 1.0 },
                        )?;
                    }
                }
                if factors {
                    // dA = dh^T x
                    gemm::<T>(
                        &blas,
                        Dims {
                            m: stacked,
                            n: k,
                            k: m,
                            out_stride: k,
                        },
                        Operand::transposed(dh_address, stacked),
                        x_rows,
                        second_grad,
                        0.0,
                    )?;
                    if self.with_dx {
                        gemm::<T>(
                            &blas,
                            Dims {
                                m,
                                n: k,
                                k: stacked,
                                out_stride: k,
                            },
                            dh_rows,
                            Operand::plain(second_address, k),
                            dx_address,
                            1.0,
                        )?;
                    }
                }
            }
        }
        Ok(out)
    }
}

impl CustomOp3 for LoraLinearBackward {
    fn name(&self) -> &'static str {
        "oxtune-lora-linear-backward"
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
        dy: &CudaStorage,
        dy_layout: &Layout,
        x: &CudaStorage,
        x_layout: &Layout,
        a: &CudaStorage,
        a_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let sizes = Sizes::new(x_layout, a_layout, &self.weights, self.update);
        if dy_layout.shape().elem_count() != sizes.m * sizes.n() {
            bail!(
                "{OP}: the output's gradient {:?} does not match {} rows of {} outputs",
                dy_layout.shape(),
                sizes.m,
                sizes.n()
            );
        }
        let device = &dy.device;
        let out = float_dispatch!(OP, dy, |slice| self.run(
            device,
            &view(slice, dy_layout, OP, "dy")?,
            &view_as(x, x_layout, OP, "x")?,
            &view_as(a, a_layout, OP, "A or h")?,
            &sizes
        ));
        let dx_len = if self.with_dx { sizes.m * sizes.k } else { 0 };
        let len = dx_len + self.second_len(&sizes) + sizes.n() * sizes.rank;
        Ok((out, Shape::from(len)))
    }
}
