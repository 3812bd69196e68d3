//! Multi-tensor AdamW: fp32 state in one flat buffer, model weights updated in place.
//!
//! [`MultiTensorAdamW`] holds the optimizer state of many parameters in one f32 tensor,
//!
//! ```text
//! state: (2 * moments + masters,)  =  exp_avg (moments) | exp_avg_sq (moments) | masters
//! ```
//!
//! where `moments` is the parameters' total element count and `masters` that of the bf16/f16
//! parameters, whose fp32 master weights live here (f32 parameters are their own master).
//! A step applies torch's AdamW (`torch.optim.AdamW`, non-fused, non-amsgrad) to every
//! parameter and writes the new weights into the parameters' own storages:
//!
//! ```text
//! g  = grad * scale                                  (scale: the clip factor, or 1)
//! p  = master, or the weight when it is f32
//! p  = p * (1 - lr * weight_decay)                   (parameters that decay)
//! m  = beta1 * m + (1 - beta1) * g
//! v  = beta2 * v + (1 - beta2) * g^2
//! p  = p - (m / (sqrt(v) * (1 / sqrt(1 - beta2^t)) + eps)) * (lr / (1 - beta1^t))
//! master = p, weight = p rounded to the weight's dtype
//! ```
//!
//! in f32, operation for operation as the composition of candle ops it replaces (constants
//! computed in f64 and rounded to f32 once; no fused multiply-add), on the CPU and in the
//! CUDA kernel alike, so both round the same way.
//!
//! How the writes stay within candle's rules: candle tensors are immutable except through
//! `Var::set` (a copy) and the in-place ops (`Tensor::inplace_op1`), which hand a custom op
//! the `&mut` storage of one tensor under its write lock. The state buffer is updated by one
//! in-place op on `state`; inside it, each parameter's weight is reached by an in-place op on
//! that parameter's `Var`:
//! - CPU: one in-place op per parameter, a plain loop over its elements;
//! - CUDA (`cuda` feature, `src/cuda/adamw.rs`, `kernels/adamw.cu`): the in-place ops of up
//!   to 64 parameters of one dtype are nested, so all their write locks are held while one
//!   kernel launch updates all of them; their weight and gradient pointers travel in the
//!   launch's arguments (no table upload, no host sync). 392 LoRA tensors of one dtype are 7
//!   launches instead of ~5000 candle ops, and the weights are written once, not copied.
//!
//! [`MultiTensorAdamW::exp_avg`], [`MultiTensorAdamW::exp_avg_sq`] and
//! [`MultiTensorAdamW::master`] (checkpoints) copy one parameter's elements each, on the
//! state's device; a checkpoint that moves each to the host before taking the next adds at
//! most one parameter's size to the device's peak.
//!
//! Gradients are f32 (others are converted first) and are only read. [`sum_of_squares`] is
//! the global-norm reduction for clipping, read back with one host sync, and
//! [`accumulate_into`] sums micro-batch gradients into one flat f32 buffer (on CUDA one
//! launch per 120 gradients of a dtype); both use kernels of `adamw.cu` on CUDA.

use std::cell::RefCell;
use std::collections::HashSet;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Result, Tensor, Var, WithDType,
    bail,
};

/// One AdamW step: the hyper-parameters and the step number `step` (t, 1 for the first).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken, this one included (>= 1).
    pub step: u64,
}

/// What multiplies the gradients before the update (gradient clipping).
#[derive(Debug, Clone, Copy, Default)]
pub enum GradScale<'a> {
    /// The gradients as given.
    #[default]
    One,
    /// A factor known on the host.
    Factor(f64),
    /// A one-element f32 tensor on the parameters' device, read by the kernel itself (no
    /// host sync).
    Device(&'a Tensor),
}

/// The f32 constants of one step, shared by the CPU loop and the kernel.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepConstants {
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub inverse_bias_correction2_sqrt: f32,
    pub eps: f32,
    pub step_size: f32,
    pub decay_factor: f32,
}

impl StepConstants {
    /// As the candle-op composition rounds them: computed in f64, each rounded to f32 once.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "f32 constants, rounded as candle's affine rounds its f64 arguments"
    )]
    fn new(step: &AdamWStep) -> Result<Self> {
        let AdamWStep {
            learning_rate,
            beta1,
            beta2,
            eps,
            weight_decay,
            step,
        } = *step;
        if step == 0 {
            bail!("adamw: step numbers start at 1");
        }
        let t = i32::try_from(step).unwrap_or(i32::MAX);
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        Ok(Self {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            inverse_bias_correction2_sqrt: (1.0 / bias_correction2_sqrt) as f32,
            eps: eps as f32,
            step_size: (learning_rate / bias_correction1) as f32,
            decay_factor: (1.0 - learning_rate * weight_decay) as f32,
        })
    }
}

/// One parameter: its weight and where its state lives in the flat buffer.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub var: Var,
    pub decay: bool,
    /// Elements of the weight.
    pub len: usize,
    /// Offset of its moments within exp_avg and within exp_avg_sq.
    pub offset: usize,
    /// Offset of its master within the masters, when the weight is bf16/f16.
    pub master: Option<usize>,
}

/// AdamW state of many parameters in one flat f32 buffer; see the module docs.
pub struct MultiTensorAdamW {
    slots: Vec<Slot>,
    /// f32, (2 * moments + masters,): exp_avg | exp_avg_sq | masters.
    state: Tensor,
    /// Elements of all parameters.
    moments: usize,
    /// Elements of the parameters with a master.
    masters: usize,
    /// Storage identities of the weights, to refuse gradients that alias one.
    weight_storages: HashSet<usize>,
}

impl std::fmt::Debug for MultiTensorAdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultiTensorAdamW")
            .field("parameters", &self.slots.len())
            .field("moments", &self.moments)
            .field("masters", &self.masters)
            .finish_non_exhaustive()
    }
}

/// An identity of a tensor's storage (equal for tensors sharing one).
fn storage_key(tensor: &Tensor) -> usize {
    let (storage, _) = tensor.storage_and_layout();
    std::ptr::from_ref(&*storage).addr()
}

impl MultiTensorAdamW {
    /// State for `parameters` (weight, whether weight decay applies): zero moments, and
    /// masters copied from the bf16/f16 weights. The weights must be f32, bf16 or f16, on
    /// one device, contiguous, and not share storage with each other.
    pub fn new(parameters: Vec<(Var, bool)>) -> Result<Self> {
        let device = parameters
            .first()
            .map_or(Device::Cpu, |(var, _)| var.device().clone());
        let (mut moments, mut masters) = (0, 0);
        let mut slots = Vec::with_capacity(parameters.len());
        let mut weight_storages = HashSet::new();
        for (index, (var, decay)) in parameters.into_iter().enumerate() {
            let tensor = var.as_tensor();
            if !matches!(tensor.dtype(), DType::F32 | DType::BF16 | DType::F16) {
                bail!(
                    "adamw: parameter {index} is {:?}; f32, bf16 and f16 are supported",
                    tensor.dtype()
                );
            }
            if !tensor.device().same_device(&device) {
                bail!(
                    "adamw: parameter {index} is on {:?}, the first on {device:?}",
                    tensor.device()
                );
            }
            if !tensor.is_contiguous() {
                bail!(
                    "adamw: parameter {index} {:?} is not contiguous",
                    tensor.shape()
                );
            }
            if !weight_storages.insert(storage_key(tensor)) {
                bail!("adamw: parameter {index} shares its storage with an earlier parameter");
            }
            let len = tensor.elem_count();
            let master = if tensor.dtype() == DType::F32 {
                None
            } else {
                masters += len;
                Some(masters - len)
            };
            slots.push(Slot {
                var,
                decay,
                len,
                offset: moments,
                master,
            });
            moments += len;
        }
        // One allocation, each master copied into place (no concatenation's second copy).
        let state = Tensor::zeros(2 * moments + masters, DType::F32, &device)?;
        for slot in &slots {
            if let Some(offset) = slot.master {
                let master = slot.var.as_tensor().to_dtype(DType::F32)?.flatten_all()?;
                state.slice_set(&master, 0, 2 * moments + offset)?;
            }
        }
        Ok(Self {
            slots,
            state,
            moments,
            masters,
            weight_storages,
        })
    }

    /// Parameters.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Parameter `index`'s weight.
    pub fn var(&self, index: usize) -> Result<&Var> {
        self.slot(index).map(|slot| &slot.var)
    }

    fn slot(&self, index: usize) -> Result<&Slot> {
        self.slots.get(index).ok_or_else(|| {
            candle_core::Error::Msg(format!("adamw: parameter {index} of {}", self.slots.len()))
        })
    }

    /// A copy of `len` state elements from `start`, shaped as parameter `index`, in a
    /// storage of exactly those elements.
    ///
    /// Not `Tensor::copy`: candle's `copy` clones the tensor's whole storage (`try_clone`
    /// ignores the layout) and keeps the view's offset, so a copy of one parameter's moment
    /// was a copy of the entire flat state. A checkpoint takes two or three of them per
    /// parameter and holds them all at once: for a Qwen3-0.6B LoRA r64 (392 parameters,
    /// 323 MB of state) that is 784 x 323 MB = 253 GB, the CUDA out-of-memory after the
    /// optimizer step. `force_contiguous` allocates the view's elements and copies only those.
    fn state_copy(&self, index: usize, start: usize) -> Result<Tensor> {
        let slot = self.slot(index)?;
        self.state
            .narrow(0, start, slot.len)?
            .reshape(slot.var.shape())?
            .force_contiguous()
    }

    /// A copy of parameter `index`'s first moment (f32, its shape, on the state's device; a
    /// storage of its own elements only).
    pub fn exp_avg(&self, index: usize) -> Result<Tensor> {
        self.state_copy(index, self.slot(index)?.offset)
    }

    /// A copy of parameter `index`'s second moment (as [`MultiTensorAdamW::exp_avg`]).
    pub fn exp_avg_sq(&self, index: usize) -> Result<Tensor> {
        self.state_copy(index, self.moments + self.slot(index)?.offset)
    }

    /// A copy of parameter `index`'s fp32 master weight (as [`MultiTensorAdamW::exp_avg`]);
    /// `None` for an f32 parameter.
    pub fn master(&self, index: usize) -> Result<Option<Tensor>> {
        match self.slot(index)?.master {
            Some(offset) => Ok(Some(self.state_copy(index, 2 * self.moments + offset)?)),
            None => Ok(None),
        }
    }

    /// Whether parameter `index` has an fp32 master weight (its weight is bf16/f16), without
    /// copying it.
    pub fn has_master(&self, index: usize) -> Result<bool> {
        Ok(self.slot(index)?.master.is_some())
    }

    /// Replaces the whole state: per parameter its two moments and, exactly for the bf16/f16
    /// parameters, its master (any float dtype and device; converted to f32 here).
    pub fn load(
        &mut self,
        exp_avg: &[Tensor],
        exp_avg_sq: &[Tensor],
        masters: &[Option<Tensor>],
    ) -> Result<()> {
        let count = self.slots.len();
        if exp_avg.len() != count || exp_avg_sq.len() != count || masters.len() != count {
            bail!(
                "adamw: loading {} exp_avg, {} exp_avg_sq and {} masters for {count} parameters",
                exp_avg.len(),
                exp_avg_sq.len(),
                masters.len()
            );
        }
        let device = self.state.device().clone();
        let piece = |index: usize, what: &str, tensor: &Tensor| -> Result<Tensor> {
            let shape = self.slots[index].var.shape();
            if tensor.shape() != shape {
                bail!(
                    "adamw: {what} of parameter {index} is {:?}, the parameter {shape:?}",
                    tensor.shape()
                );
            }
            tensor
                .to_device(&device)?
                .to_dtype(DType::F32)?
                .flatten_all()
        };
        // A fresh buffer, so that a failed load leaves the current state as it was.
        let state = Tensor::zeros(2 * self.moments + self.masters, DType::F32, &device)?;
        for (index, slot) in self.slots.iter().enumerate() {
            state.slice_set(&piece(index, "exp_avg", &exp_avg[index])?, 0, slot.offset)?;
            let second = piece(index, "exp_avg_sq", &exp_avg_sq[index])?;
            state.slice_set(&second, 0, self.moments + slot.offset)?;
            match (slot.master, &masters[index]) {
                (Some(offset), Some(tensor)) => {
                    let master = piece(index, "master", tensor)?;
                    state.slice_set(&master, 0, 2 * self.moments + offset)?;
                }
                (None, None) => {}
                (Some(_), None) => bail!("adamw: parameter {index} needs a master weight"),
                (None, Some(_)) => {
                    bail!("adamw: parameter {index} is f32 and has no master weight")
                }
            }
        }
        self.state = state;
        Ok(())
    }

    /// One AdamW step with `grads` (one per parameter, in order, its shape, any float dtype;
    /// converted to f32 if needed) times `scale`.
    pub fn step(&mut self, grads: &[Tensor], step: &AdamWStep, scale: GradScale<'_>) -> Result<()> {
        if grads.len() != self.slots.len() {
            bail!(
                "adamw: {} gradients for {} parameters",
                grads.len(),
                self.slots.len()
            );
        }
        let device = self.state.device().clone();
        let state_storage = storage_key(&self.state);
        let mut f32_grads = Vec::with_capacity(grads.len());
        for (index, (grad, slot)) in grads.iter().zip(&self.slots).enumerate() {
            if grad.shape() != slot.var.shape() {
                bail!(
                    "adamw: gradient {index} {:?} for a parameter {:?}",
                    grad.shape(),
                    slot.var.shape()
                );
            }
            if !grad.device().same_device(&device) {
                bail!(
                    "adamw: gradient {index} is on {:?}, the parameters on {device:?}",
                    grad.device()
                );
            }
            let grad = grad.to_dtype(DType::F32)?.contiguous()?;
            let key = storage_key(&grad);
            if key == state_storage || self.weight_storages.contains(&key) {
                bail!("adamw: gradient {index} shares storage with a weight or the state");
            }
            f32_grads.push(grad);
        }
        if self.slots.is_empty() {
            return Ok(());
        }
        let constants = StepConstants::new(step)?;
        let scale = match scale {
            GradScale::One => Scale::Host(1.0),
            GradScale::Factor(factor) => {
                #[expect(clippy::cast_possible_truncation, reason = "gradients are f32")]
                let factor = factor as f32;
                Scale::Host(factor)
            }
            GradScale::Device(tensor) => {
                if tensor.elem_count() != 1 || !tensor.device().same_device(&device) {
                    bail!(
                        "adamw: the gradient scale must be one element on {device:?}, not {:?} on {:?}",
                        tensor.shape(),
                        tensor.device()
                    );
                }
                let tensor = tensor.to_dtype(DType::F32)?.flatten_all()?;
                if device.is_cuda() {
                    Scale::Device(tensor)
                } else {
                    Scale::Host(tensor.to_vec1::<f32>()?[0])
                }
            }
        };
        // On the CPU the gradients are read before any lock is taken.
        let host_grads = if device.is_cpu() {
            f32_grads
                .iter()
                .map(|g| g.flatten_all()?.to_vec1::<f32>())
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        self.state.inplace_op1(&StateUpdate {
            slots: &self.slots,
            grads: &f32_grads,
            host_grads: &host_grads,
            constants,
            scale: &scale,
            moments: self.moments,
            masters: self.masters,
        })
    }
}

/// The gradient scale as the update reads it.
pub(crate) enum Scale {
    Host(f32),
    /// A one-element contiguous f32 tensor on the CUDA device.
    #[cfg_attr(
        not(feature = "cuda"),
        expect(dead_code, reason = "read by the CUDA path")
    )]
    Device(Tensor),
}

/// The in-place op on the state buffer; it reaches each weight through its own in-place op.
struct StateUpdate<'a> {
    slots: &'a [Slot],
    grads: &'a [Tensor],
    /// The gradients as host vectors (CPU only).
    host_grads: &'a [Vec<f32>],
    constants: StepConstants,
    scale: &'a Scale,
    moments: usize,
    masters: usize,
}

impl InplaceOp1 for StateUpdate<'_> {
    fn name(&self) -> &'static str {
        "oxtune-adamw"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let op = InplaceOp1::name(self);
        let CpuStorage::F32(state) = storage else {
            bail!("{op}: the state is {:?}, not f32", storage.dtype());
        };
        let start = layout.start_offset();
        let Some(state) = state.get_mut(start..start + 2 * self.moments + self.masters) else {
            bail!("{op}: the state is shorter than its layout");
        };
        let (exp_avg, rest) = state.split_at_mut(self.moments);
        let (exp_avg_sq, masters) = rest.split_at_mut(self.moments);
        let scale = match self.scale {
            Scale::Host(scale) => *scale,
            Scale::Device(_) => bail!("{op}: a device gradient scale on the CPU"),
        };
        for (slot, grad) in self.slots.iter().zip(self.host_grads) {
            let moments = slot.offset..slot.offset + slot.len;
            let update = WeightUpdate {
                grad,
                exp_avg: RefCell::new(&mut exp_avg[moments.clone()]),
                exp_avg_sq: RefCell::new(&mut exp_avg_sq[moments]),
                master: RefCell::new(
                    slot.master
                        .map(|offset| &mut masters[offset..offset + slot.len]),
                ),
                constants: self.constants,
                scale,
                decay: slot.decay,
            };
            slot.var.as_tensor().inplace_op1(&update)?;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> Result<()> {
        crate::cuda::adamw::update(
            storage,
            layout,
            &crate::cuda::adamw::Update {
                slots: self.slots,
                grads: self.grads,
                constants: self.constants,
                scale: self.scale,
                moments: self.moments,
                masters: self.masters,
            },
        )
    }

    #[cfg(not(feature = "cuda"))]
    fn cuda_fwd(&self, _: &mut CudaStorage, _: &Layout) -> Result<()> {
        let _ = self.grads;
        bail!("oxtune-adamw: built without the `cuda` feature")
    }
}

/// One parameter's update on the CPU, in place in its weight's storage.
struct WeightUpdate<'a> {
    grad: &'a [f32],
    exp_avg: RefCell<&'a mut [f32]>,
    exp_avg_sq: RefCell<&'a mut [f32]>,
    master: RefCell<Option<&'a mut [f32]>>,
    constants: StepConstants,
    scale: f32,
    decay: bool,
}

impl InplaceOp1 for WeightUpdate<'_> {
    fn name(&self) -> &'static str {
        "oxtune-adamw-weight"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let op = InplaceOp1::name(self);
        if !layout.is_contiguous() {
            bail!("{op}: the weight {:?} is not contiguous", layout.shape());
        }
        let range = layout.start_offset()..layout.start_offset() + layout.shape().elem_count();
        match storage {
            CpuStorage::F32(weights) => self.apply(weights.get_mut(range)),
            CpuStorage::BF16(weights) => self.apply(weights.get_mut(range)),
            CpuStorage::F16(weights) => self.apply(weights.get_mut(range)),
            other => bail!("{op}: no update for a {:?} weight", other.dtype()),
        }
    }
}

impl WeightUpdate<'_> {
    fn apply<T: WithDType>(&self, weights: Option<&mut [T]>) -> Result<()> {
        let mut exp_avg = self.exp_avg.borrow_mut();
        let mut exp_avg_sq = self.exp_avg_sq.borrow_mut();
        let mut master = self.master.borrow_mut();
        let len = self.grad.len();
        let Some(weights) = weights.filter(|w| w.len() == len) else {
            bail!("oxtune-adamw-weight: the weight is not the gradient's {len} elements");
        };
        if exp_avg.len() != len
            || exp_avg_sq.len() != len
            || master.as_ref().is_some_and(|m| m.len() != len)
        {
            bail!("oxtune-adamw-weight: state slices differ from the gradient's {len} elements");
        }
        let c = &self.constants;
        let mut updated = Vec::with_capacity(len);
        for j in 0..len {
            let g = self.grad[j] * self.scale;
            #[expect(
                clippy::cast_possible_truncation,
                reason = "f32, bf16 and f16 values are exact in f32"
            )]
            let mut p = match master.as_deref() {
                Some(master) => master[j],
                None => weights[j].to_f64() as f32,
            };
            if self.decay {
                p *= c.decay_factor;
            }
            let m = exp_avg[j] * c.beta1 + g * c.one_minus_beta1;
            let v = exp_avg_sq[j] * c.beta2 + (g * g) * c.one_minus_beta2;
            let denominator = v.sqrt() * c.inverse_bias_correction2_sqrt + c.eps;
            p -= (m / denominator) * c.step_size;
            exp_avg[j] = m;
            exp_avg_sq[j] = v;
            if let Some(master) = master.as_deref_mut() {
                master[j] = p;
            }
            updated.push(p);
        }
        // Rounded by candle's f32 cast, as the composition's `to_dtype` and the kernel's
        // `from_float` round (to nearest, ties to even). Not `T::from_f64`: half's f64 -> bf16
        // conversion rounds values just above a halfway point down (1 + 2^-8 + 2^-23 -> 1).
        let rounded = Tensor::from_vec(updated, len, &Device::Cpu)?
            .to_dtype(T::DTYPE)?
            .to_vec1::<T>()?;
        weights.copy_from_slice(&rounded);
        Ok(())
    }
}

/// sum over `tensors` of sum(t^2), as a scalar f64 tensor on their device, with no host
/// sync (`to_scalar::<f64>()` reads it). On CUDA the multi-tensor kernel of `adamw.cu` sums
/// the squares in f64 (one launch per 128 tensors and one candle sum of the per-block
/// partials); elsewhere each tensor's squares are summed in f32 by candle and those sums in
/// f64. `device` is where the sum of no tensors lives.
pub fn sum_of_squares(tensors: &[Tensor], device: &Device) -> Result<Tensor> {
    if tensors.is_empty() {
        return Tensor::zeros((), DType::F64, device);
    }
    #[cfg(feature = "cuda")]
    if tensors
        .iter()
        .all(|t| t.device().is_cuda() && t.device().same_device(device))
    {
        // One launch per 128 tensors, squares summed in f64 (more exact than below).
        let tensors = tensors
            .iter()
            .map(|t| t.to_dtype(DType::F32)?.contiguous())
            .collect::<Result<Vec<_>>>()?;
        return crate::cuda::adamw::sum_of_squares(&tensors, device);
    }
    let sums = tensors
        .iter()
        .map(|t| t.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&sums, 0)?.to_dtype(DType::F64)?.sum_all()
}

/// Gradient accumulation into one flat f32 buffer: `flat[offsets[i]..][..len_i]` becomes
/// `sources[i]` (`assign`, a step's first micro-batch) or that plus `sources[i]`, in f32 as
/// candle's `a + b` adds. `flat` is a contiguous 1-D f32 tensor, written in place; the
/// regions must not overlap. On CUDA: one launch per 120 sources of a dtype (f32, bf16 or
/// f16, read in their dtype); elsewhere candle ops and `slice_set` per source.
pub fn accumulate_into(
    flat: &Tensor,
    offsets: &[usize],
    sources: &[Tensor],
    assign: bool,
) -> Result<()> {
    let op = "accumulate_into";
    if flat.dtype() != DType::F32 || flat.rank() != 1 || !flat.is_contiguous() {
        bail!(
            "{op}: the buffer is {:?} {:?}; a contiguous 1-D f32 tensor is needed",
            flat.dtype(),
            flat.shape()
        );
    }
    if offsets.len() != sources.len() {
        bail!(
            "{op}: {} offsets for {} gradients",
            offsets.len(),
            sources.len()
        );
    }
    let flat_len = flat.elem_count();
    let flat_storage = storage_key(flat);
    for (index, (source, &offset)) in sources.iter().zip(offsets).enumerate() {
        if offset + source.elem_count() > flat_len {
            bail!(
                "{op}: gradient {index} {:?} at {offset} overruns the buffer of {flat_len}",
                source.shape()
            );
        }
        if !source.device().same_device(flat.device()) {
            bail!(
                "{op}: gradient {index} is on {:?}, the buffer on {:?}",
                source.device(),
                flat.device()
            );
        }
        if storage_key(source) == flat_storage {
            bail!("{op}: gradient {index} shares the buffer's storage");
        }
    }
    #[cfg(feature = "cuda")]
    if flat.device().is_cuda() {
        let sources = sources
            .iter()
            .map(|s| match s.dtype() {
                DType::F32 | DType::BF16 | DType::F16 => s.contiguous(),
                _ => s.to_dtype(DType::F32)?.contiguous(),
            })
            .collect::<Result<Vec<_>>>()?;
        return crate::cuda::adamw::accumulate(flat, offsets, &sources, assign);
    }
    for (source, &offset) in sources.iter().zip(offsets) {
        let source = source.to_dtype(DType::F32)?.flatten_all()?;
        let value = if assign {
            source
        } else {
            (flat.narrow(0, offset, source.elem_count())? + source)?
        };
        flat.slice_set(&value, 0, offset)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The composition of candle ops the fused step replaces, for one parameter.
    fn composed(
        weight: &Tensor,
        grad: &Tensor,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
        step: &AdamWStep,
        decay: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let t = i32::try_from(step.step).unwrap_or(i32::MAX);
        let current = if decay && step.weight_decay != 0.0 {
            (weight * (1.0 - step.learning_rate * step.weight_decay))?
        } else {
            weight.clone()
        };
        let m = ((exp_avg * step.beta1)? + (grad * (1.0 - step.beta1))?)?;
        let v = ((exp_avg_sq * step.beta2)? + (grad.sqr()? * (1.0 - step.beta2))?)?;
        let denominator = ((v.sqrt()? / (1.0 - step.beta2.powi(t)).sqrt())? + step.eps)?;
        let step_size = step.learning_rate / (1.0 - step.beta1.powi(t));
        let updated = (current - (m.div(&denominator)? * step_size)?)?;
        Ok((updated, m, v))
    }

    #[test]
    fn equals_the_candle_composition_bit_for_bit() -> Result<()> {
        let device = Device::Cpu;
        let shapes: [&[usize]; 3] = [&[3, 5], &[1], &[7]];
        let dtypes = [DType::F32, DType::BF16, DType::F32];
        let decays = [true, false, true];
        let vars = shapes
            .iter()
            .zip(dtypes)
            .map(|(shape, dtype)| {
                Var::from_tensor(&Tensor::randn(0f32, 1.0, *shape, &device)?.to_dtype(dtype)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut adam = MultiTensorAdamW::new(vars.iter().cloned().zip(decays).collect())?;
        let mut reference = vars
            .iter()
            .map(|v| {
                let w = v.as_tensor().to_dtype(DType::F32)?.copy()?;
                Ok((w.clone(), w.zeros_like()?, w.zeros_like()?))
            })
            .collect::<Result<Vec<_>>>()?;
        for t in 1..=3 {
            let step = AdamWStep {
                learning_rate: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
                step: t,
            };
            let grads = shapes
                .iter()
                .map(|shape| Tensor::randn(0f32, 1.0, *shape, &device))
                .collect::<Result<Vec<_>>>()?;
            adam.step(&grads, &step, GradScale::One)?;
            for (index, grad) in grads.iter().enumerate() {
                let (w, m, v) = &reference[index];
                reference[index] = composed(w, grad, m, v, &step, decays[index])?;
                let (w, m, v) = &reference[index];
                let same = |a: &Tensor, b: &Tensor| -> Result<bool> {
                    let a: Vec<f32> = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    let b: Vec<f32> = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    Ok(a == b)
                };
                assert!(same(&adam.exp_avg(index)?, m)?, "exp_avg {index} step {t}");
                assert!(
                    same(&adam.exp_avg_sq(index)?, v)?,
                    "exp_avg_sq {index} step {t}"
                );
                let weight = adam
                    .master(index)?
                    .unwrap_or(vars[index].as_tensor().clone());
                assert!(same(&weight, w)?, "weight {index} step {t}");
                assert!(
                    same(vars[index].as_tensor(), &w.to_dtype(dtypes[index])?)?,
                    "rounded weight {index} step {t}"
                );
            }
        }
        Ok(())
    }

    /// Elements in a CPU tensor's storage (not its view).
    fn storage_elements(tensor: &Tensor) -> usize {
        let (storage, _) = tensor.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(CpuStorage::F32(values)) => values.len(),
            _ => usize::MAX,
        }
    }

    /// The state copies hold their parameter's elements only (candle's `Tensor::copy` of a
    /// view cloned the whole flat state for each), at offset 0, and later steps leave them as
    /// they were.
    #[test]
    fn state_copies_hold_only_their_parameter() -> Result<()> {
        let device = Device::Cpu;
        let vars = [
            Tensor::randn(0f32, 1.0, (3, 5), &device)?,
            Tensor::randn(0f32, 1.0, 7, &device)?.to_dtype(DType::BF16)?,
            Tensor::randn(0f32, 1.0, (2, 2), &device)?.to_dtype(DType::F16)?,
        ]
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<Vec<_>>>()?;
        let mut adam = MultiTensorAdamW::new(vars.iter().map(|v| (v.clone(), true)).collect())?;
        let step = AdamWStep {
            learning_rate: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 1,
        };
        let grads = |device: &Device| -> Result<Vec<Tensor>> {
            vars.iter()
                .map(|v| Tensor::randn(0f32, 1.0, v.shape(), device))
                .collect()
        };
        adam.step(&grads(&device)?, &step, GradScale::One)?;
        let mut copies = Vec::new();
        for (index, var) in vars.iter().enumerate() {
            let mut tensors = vec![adam.exp_avg(index)?, adam.exp_avg_sq(index)?];
            tensors.extend(adam.master(index)?);
            assert_eq!(adam.has_master(index)?, var.dtype() != DType::F32);
            for tensor in tensors {
                assert_eq!(tensor.shape(), var.shape(), "parameter {index}");
                assert_eq!(tensor.layout().start_offset(), 0, "parameter {index}");
                assert_eq!(
                    storage_elements(&tensor),
                    var.elem_count(),
                    "parameter {index}: the copy holds more than its parameter"
                );
                let values: Vec<f32> = tensor.flatten_all()?.to_vec1()?;
                copies.push((tensor, values));
            }
        }
        adam.step(
            &grads(&device)?,
            &AdamWStep { step: 2, ..step },
            GradScale::One,
        )?;
        for (tensor, values) in &copies {
            assert_eq!(&tensor.flatten_all()?.to_vec1::<f32>()?, values);
        }
        Ok(())
    }

    /// A master just above a bf16 rounding tie (1 + 2^-8 + 2^-23) rounds up, as candle's cast
    /// and the kernel round it (`bf16::from_f64` of the same value rounds down).
    /// A first AdamW step without weight decay.
    fn first_step() -> AdamWStep {
        AdamWStep {
            learning_rate: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 1,
        }
    }

    #[test]
    fn bf16_weights_round_as_candle_casts() -> Result<()> {
        let device = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1f32], &device)?.to_dtype(DType::BF16)?)?;
        let mut adam = MultiTensorAdamW::new(vec![(var.clone(), false)])?;
        let master = Tensor::new(&[f32::from_bits(0x3f80_8001)], &device)?;
        let zeros = Tensor::zeros(1, DType::F32, &device)?;
        let zero_moments = std::slice::from_ref(&zeros);
        adam.load(zero_moments, zero_moments, &[Some(master.clone())])?;
        let step = first_step();
        // A zero gradient leaves the master as it is: the weight is the master rounded.
        adam.step(&[zeros], &step, GradScale::One)?;
        let weight: Vec<f32> = var.as_tensor().to_dtype(DType::F32)?.to_vec1()?;
        let expected: Vec<f32> = master
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        assert_eq!(weight, expected);
        assert_eq!(weight, [1.0078125]);
        Ok(())
    }

    #[test]
    fn accumulation_equals_candle_adds() -> Result<()> {
        let device = Device::Cpu;
        let flat = Tensor::zeros(21, DType::F32, &device)?;
        let offsets = [0, 13, 6];
        let mut sums: Vec<Option<Tensor>> = vec![None; 3];
        for round in 0..3 {
            let sources = [
                Tensor::randn(0f32, 1.0, (2, 3), &device)?,
                Tensor::randn(0f32, 1.0, 8, &device)?.to_dtype(DType::BF16)?,
                Tensor::randn(0f32, 1.0, 7, &device)?,
            ];
            accumulate_into(&flat, &offsets, &sources, round == 0)?;
            for (sum, source) in sums.iter_mut().zip(&sources) {
                let source = source.to_dtype(DType::F32)?.flatten_all()?;
                *sum = Some(match sum.take() {
                    Some(previous) => (previous + source)?,
                    None => source,
                });
            }
        }
        for ((sum, offset), index) in sums.iter().zip(offsets).zip(0..) {
            let sum = sum.as_ref().expect("three rounds");
            let got: Vec<f32> = flat.narrow(0, offset, sum.elem_count())?.to_vec1()?;
            let expected: Vec<f32> = sum.to_vec1()?;
            assert_eq!(got, expected, "gradient {index}");
        }
        Ok(())
    }

    #[test]
    fn refuses_mismatched_gradients() -> Result<()> {
        let var = Var::new(&[1f32, 2.0], &Device::Cpu)?;
        let mut adam = MultiTensorAdamW::new(vec![(var.clone(), true)])?;
        let step = first_step();
        let error = adam
            .step(
                &[Tensor::new(&[1f32], &Device::Cpu)?],
                &step,
                GradScale::One,
            )
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            error.contains("gradient 0 [1] for a parameter [2]"),
            "{error}"
        );
        let error = adam
            .step(&[var.as_tensor().clone()], &step, GradScale::One)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("shares storage"), "{error}");
        Ok(())
    }
}
