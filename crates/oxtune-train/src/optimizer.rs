//! AdamW, step for step as `torch.optim.AdamW` (non-fused, non-amsgrad) computes it:
//!
//! ```text
//! p    <- p * (1 - lr * weight_decay)                    (decoupled; only where decay applies)
//! m    <- beta1 * m + (1 - beta1) * g
//! v    <- beta2 * v + (1 - beta2) * g^2
//! p    <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! Parameters stored in bf16/f16 keep an fp32 master copy here; moments are always fp32.
//! Weight decay follows transformers' Trainer (and so ms-swift): every parameter decays but
//! biases and norm weights ([`decays`]).
//!
//! The update itself is `oxtune_tensor::optim::MultiTensorAdamW`: the moments and masters of
//! all parameters in one flat fp32 buffer, the weights written in place; on CUDA one kernel
//! launch per 64 parameters of a dtype (instead of ~12 candle ops per parameter), on the CPU a
//! loop that rounds exactly as those candle ops did. [`GradientAccumulator`] sums a step's
//! micro-batch gradients into one flat f32 buffer, [`clip_factor`] reads the global norm back
//! once per step, and [`AdamW::step_scaled`] applies the clip factor inside the update.
//! The checkpoint keys (`exp_avg.<name>`, `exp_avg_sq.<name>`, `master.<name>`, `step`) are
//! per parameter, as they were on the per-parameter path ([`reference`]).
//!
//! Flat buffers and candle: `Tensor::copy`, `to_device` and (on CUDA) `to_vec1` of a view of
//! a flat buffer (a `narrow` of it) clone the buffer's *whole* storage, whatever the view's
//! layout. So [`AdamW::state`] takes each parameter's state as a copy of its own elements
//! (`MultiTensorAdamW::exp_avg` and co., `force_contiguous`) and moves it to the host at once,
//! and the gradient views of [`GradientAccumulator::gradients`] are only ever read by ops.

use std::collections::HashMap;

use oxtune_tensor::optim::{AdamWStep, GradScale, MultiTensorAdamW};
use oxtune_tensor::{DType, Device, Tensor, Var};

use crate::{Error, Result};

/// AdamW hyper-parameters (transformers' names and defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over named parameters: names and the step count here, the state and the update
/// in [`MultiTensorAdamW`] (one flat fp32 buffer; on CUDA a multi-tensor kernel, on the CPU
/// a loop that rounds exactly as the composed candle ops did).
pub struct AdamW {
    config: AdamWConfig,
    /// Parameter names, in the order of `state`'s parameters.
    names: Vec<String>,
    state: MultiTensorAdamW,
    /// Optimizer steps taken.
    step: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("config", &self.config)
            .field("parameters", &self.names.len())
            .field("step", &self.step)
            .finish()
    }
}

impl AdamW {
    pub fn new(parameters: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let (names, vars): (Vec<String>, Vec<Var>) = parameters.into_iter().unzip();
        let state = MultiTensorAdamW::new(
            names
                .iter()
                .zip(vars)
                .map(|(name, var)| (var, decays(name)))
                .collect(),
        )?;
        Ok(Self {
            config,
            names,
            state,
            step: 0,
        })
    }

    /// Optimizer steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One step with `grads` (name -> gradient, any float dtype) at `learning_rate`.
    /// A parameter without a gradient is an error: it would silently never train.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, learning_rate: f64) -> Result<()> {
        self.step_scaled(grads, learning_rate, 1.0)
    }

    /// [`AdamW::step`] with every gradient multiplied by `grad_scale` (the clip factor of
    /// [`clip_factor`]) inside the update, instead of by a pass over the gradients first.
    pub fn step_scaled(
        &mut self,
        grads: &HashMap<String, Tensor>,
        learning_rate: f64,
        grad_scale: f64,
    ) -> Result<()> {
        let ordered = self
            .names
            .iter()
            .map(|name| {
                grads.get(name).cloned().ok_or_else(|| {
                    Error::State(format!(
                        "no gradient for `{name}`: it does not reach the loss"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let step = AdamWStep {
            learning_rate,
            beta1,
            beta2,
            eps,
            weight_decay,
            step: self.step + 1,
        };
        let scale = if grad_scale == 1.0 {
            GradScale::One
        } else {
            GradScale::Factor(grad_scale)
        };
        self.state.step(&ordered, &step, scale)?;
        self.step += 1;
        Ok(())
    }

    /// Moments, master weights and the step count, for a checkpoint
    /// (`exp_avg.<name>`, `exp_avg_sq.<name>`, `master.<name>`, `step`), all on the host.
    ///
    /// Each is a copy of its parameter's elements only, moved to the host before the next is
    /// taken: the checkpoint adds at most one parameter's size to the GPU's peak, never a
    /// second copy of the state.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let host = |tensor: Tensor| tensor.to_device(&Device::Cpu);
        let mut state = HashMap::new();
        for (index, name) in self.names.iter().enumerate() {
            state.insert(format!("exp_avg.{name}"), host(self.state.exp_avg(index)?)?);
            state.insert(
                format!("exp_avg_sq.{name}"),
                host(self.state.exp_avg_sq(index)?)?,
            );
            if let Some(master) = self.state.master(index)? {
                state.insert(format!("master.{name}"), host(master)?);
            }
        }
        #[expect(clippy::cast_possible_wrap, reason = "step counts are far below 2^63")]
        let step = Tensor::new(&[self.step as i64], &Device::Cpu)?;
        state.insert("step".into(), step);
        Ok(state)
    }

    /// Restores what [`AdamW::state`] saved (on any device; the host is best, as each tensor
    /// then travels to the GPU straight into the state buffer). Every parameter's moments
    /// must be present, and the master of every bf16/f16 parameter; the state is unchanged
    /// when one is missing or misshapen.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: &str| {
            state
                .get(key)
                .cloned()
                .ok_or_else(|| Error::State(format!("`{key}` missing from the optimizer state")))
        };
        let step: Vec<i64> = get("step")?.to_vec1()?;
        let step = step
            .first()
            .and_then(|s| u64::try_from(*s).ok())
            .ok_or_else(|| Error::State("bad `step`".into()))?;
        let (mut exp_avg, mut exp_avg_sq, mut masters) = (Vec::new(), Vec::new(), Vec::new());
        for (index, name) in self.names.iter().enumerate() {
            exp_avg.push(get(&format!("exp_avg.{name}"))?);
            exp_avg_sq.push(get(&format!("exp_avg_sq.{name}"))?);
            masters.push(if self.state.has_master(index)? {
                Some(get(&format!("master.{name}"))?)
            } else {
                None
            });
        }
        self.state.load(&exp_avg, &exp_avg_sq, &masters)?;
        self.step = step;
        Ok(())
    }
}

/// Whether weight decay applies to parameter `name`: not for biases and norm weights, as
/// transformers' `Trainer.get_decay_parameter_names` decides (module names containing
/// `bias`, `layernorm`, `rmsnorm`, a `norm` segment or a `_norm` suffix).
pub fn decays(name: &str) -> bool {
    let module = name.to_lowercase();
    let module = module.strip_suffix(".weight").unwrap_or(&module);
    let segment_is_norm = module
        .split('.')
        .any(|segment| segment == "norm" || segment.ends_with("_norm"));
    !(module.contains("bias")
        || module.contains("layernorm")
        || module.contains("rmsnorm")
        || segment_is_norm)
}

/// Adds the gradients of `parameters` from one backward pass to `into` (name -> running
/// sum, f32), a conversion and an add per parameter: the gradients by name, and the
/// reference of [`GradientAccumulator`] (which the trainer uses). A parameter the backward
/// pass did not reach is an error naming it.
pub fn accumulate_gradients(
    parameters: &[(String, Var)],
    store: &oxtune_tensor::candle::backprop::GradStore,
    into: &mut HashMap<String, Tensor>,
) -> Result<()> {
    for (name, var) in parameters {
        let grad = store
            .get(var.as_tensor())
            .ok_or_else(|| {
                Error::State(format!(
                    "no gradient reached `{name}`: an op on its path has no backward"
                ))
            })?
            .to_dtype(DType::F32)?;
        let sum = match into.remove(name) {
            Some(previous) => (previous + grad)?,
            None => grad,
        };
        into.insert(name.clone(), sum);
    }
    Ok(())
}

/// The gradients of a step summed over its micro-batches in one flat f32 buffer (reused
/// every step): on CUDA one launch per 120 gradients of a dtype per micro-batch instead of a
/// conversion and an add per parameter. [`GradientAccumulator::gradients`] hands out views of
/// the buffer, valid until the next [`GradientAccumulator::add`].
#[derive(Debug)]
pub struct GradientAccumulator {
    parameters: Vec<(String, Var)>,
    /// Where each parameter's gradient starts in `flat`.
    offsets: Vec<usize>,
    /// f32, (total elements,).
    flat: Tensor,
}

impl GradientAccumulator {
    pub fn new(parameters: &[(String, Var)], device: &Device) -> Result<Self> {
        let mut offsets = Vec::with_capacity(parameters.len());
        let mut total = 0;
        for (_, var) in parameters {
            offsets.push(total);
            total += var.elem_count();
        }
        Ok(Self {
            parameters: parameters.to_vec(),
            offsets,
            flat: Tensor::zeros(total, DType::F32, device)?,
        })
    }

    /// Adds the gradients of one backward pass (`first`: the step's first micro-batch, which
    /// replaces what the buffer held). A parameter the backward pass did not reach is an
    /// error naming it: an op without a backward, or a parameter outside the graph, would
    /// otherwise never train.
    pub fn add(
        &mut self,
        store: &oxtune_tensor::candle::backprop::GradStore,
        first: bool,
    ) -> Result<()> {
        let sources = self
            .parameters
            .iter()
            .map(|(name, var)| {
                store.get(var.as_tensor()).cloned().ok_or_else(|| {
                    Error::State(format!(
                        "no gradient reached `{name}`: an op on its path has no backward"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        oxtune_tensor::optim::accumulate_into(&self.flat, &self.offsets, &sources, first)?;
        Ok(())
    }

    /// The summed gradients by name: f32 views of the buffer, shaped as their parameters.
    /// Read them with ops (the update, [`clip_factor`]); `copy`, `to_device` or `to_vec1` of
    /// one would clone the whole buffer (`force_contiguous` first copies only the view).
    pub fn gradients(&self) -> Result<HashMap<String, Tensor>> {
        self.parameters
            .iter()
            .zip(&self.offsets)
            .map(|((name, var), &offset)| {
                let view = self
                    .flat
                    .narrow(0, offset, var.elem_count())?
                    .reshape(var.shape())?;
                Ok((name.clone(), view))
            })
            .collect()
    }
}

/// Replaces every weight of `model` by a trainable copy (full fine-tuning) and returns them
/// by checkpoint name.
pub fn make_all_trainable(model: &mut oxtune_models::CausalLm) -> Result<Vec<(String, Var)>> {
    let mut trainable = Vec::new();
    for (name, tensor) in model.parameters_mut() {
        let var = Var::from_tensor(tensor)?;
        *tensor = var.as_tensor().clone();
        trainable.push((name, var));
    }
    Ok(trainable)
}

/// The global L2 norm of `grads`, and the factor torch's `clip_grad_norm_` scales them by
/// (`min(1, max_norm / (norm + 1e-6))`), with one host sync: `optim::sum_of_squares` sums
/// the squares on the gradients' device (on CUDA in f64 by its kernel; elsewhere in f32 per
/// gradient, those sums in f64), in the order of the names, so a run and its resumption
/// round alike. [`AdamW::step_scaled`] then applies the factor inside the update.
pub fn clip_factor(grads: &HashMap<String, Tensor>, max_norm: f64) -> Result<(f64, f64)> {
    let mut named: Vec<(&String, &Tensor)> = grads.iter().collect();
    named.sort_unstable_by_key(|(name, _)| *name);
    let tensors: Vec<Tensor> = named.into_iter().map(|(_, grad)| grad.clone()).collect();
    let device = tensors.first().map_or(Device::Cpu, |t| t.device().clone());
    let squares = oxtune_tensor::optim::sum_of_squares(&tensors, &device)?.to_scalar::<f64>()?;
    Ok(norm_and_factor(squares, max_norm))
}

/// The norm of a sum of squares and torch's clip factor for it.
fn norm_and_factor(squares: f64, max_norm: f64) -> (f64, f64) {
    let norm = squares.sqrt();
    let factor = if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    };
    (norm, factor)
}

/// The per-parameter path the trainer ran before the multi-tensor one (with
/// [`accumulate_gradients`]): a host sync per gradient for the norm, ~12 candle ops per
/// parameter for the update. Kept as the reference the tests compare the multi-tensor path
/// with: on the CPU bit for bit, on the GPU within a tolerance (`tests/gpu_optimizer.rs`).
/// Its checkpoint keys are [`AdamW::state`]'s.
pub mod reference {
    use std::collections::HashMap;

    use oxtune_tensor::{DType, Tensor, Var};

    use super::{AdamWConfig, decays, norm_and_factor};
    use crate::{Error, Result};

    struct Parameter {
        name: String,
        var: Var,
        /// fp32 copy when `var` is not fp32.
        master: Option<Tensor>,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        decay: bool,
    }

    /// AdamW with each parameter's state in tensors of its own.
    pub struct AdamW {
        config: AdamWConfig,
        parameters: Vec<Parameter>,
        /// Optimizer steps taken.
        step: u64,
    }

    impl std::fmt::Debug for AdamW {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("reference::AdamW")
                .field("config", &self.config)
                .field("parameters", &self.parameters.len())
                .field("step", &self.step)
                .finish()
        }
    }

    impl AdamW {
        pub fn new(parameters: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
            let parameters = parameters
                .into_iter()
                .map(|(name, var)| {
                    let tensor = var.as_tensor();
                    let master = if tensor.dtype() == DType::F32 {
                        None
                    } else {
                        Some(tensor.to_dtype(DType::F32)?.detach())
                    };
                    Ok(Parameter {
                        exp_avg: tensor.zeros_like()?.to_dtype(DType::F32)?,
                        exp_avg_sq: tensor.zeros_like()?.to_dtype(DType::F32)?,
                        decay: decays(&name),
                        master,
                        name,
                        var,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Self {
                config,
                parameters,
                step: 0,
            })
        }

        /// One step with `grads` (name -> gradient, any float dtype, already clipped) at
        /// `learning_rate`.
        pub fn step(&mut self, grads: &HashMap<String, Tensor>, learning_rate: f64) -> Result<()> {
            self.step += 1;
            let AdamWConfig {
                beta1,
                beta2,
                eps,
                weight_decay,
            } = self.config;
            #[expect(
                clippy::cast_possible_truncation,
                reason = "step counts are far below 2^31"
            )]
            let t = self.step as i32;
            let bias_correction1 = 1.0 - beta1.powi(t);
            let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
            let step_size = learning_rate / bias_correction1;
            for parameter in &mut self.parameters {
                let grad = grads
                    .get(&parameter.name)
                    .ok_or_else(|| {
                        Error::State(format!(
                            "no gradient for `{}`: it does not reach the loss",
                            parameter.name
                        ))
                    })?
                    .to_dtype(DType::F32)?;
                let current = match &parameter.master {
                    Some(master) => master.clone(),
                    None => parameter.var.as_tensor().detach(),
                };
                let current = if parameter.decay && weight_decay != 0.0 {
                    (current * (1.0 - learning_rate * weight_decay))?
                } else {
                    current
                };
                parameter.exp_avg = ((&parameter.exp_avg * beta1)? + (&grad * (1.0 - beta1))?)?;
                parameter.exp_avg_sq =
                    ((&parameter.exp_avg_sq * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
                let denominator = ((parameter.exp_avg_sq.sqrt()? / bias_correction2_sqrt)? + eps)?;
                let updated = (current - (parameter.exp_avg.div(&denominator)? * step_size)?)?;
                match &mut parameter.master {
                    Some(master) => {
                        parameter
                            .var
                            .set(&updated.to_dtype(parameter.var.dtype())?)?;
                        *master = updated;
                    }
                    None => parameter.var.set(&updated)?,
                }
            }
            Ok(())
        }

        /// Moments, master weights and the step count, under [`super::AdamW::state`]'s keys
        /// (on the parameters' device).
        pub fn state(&self) -> Result<HashMap<String, Tensor>> {
            let mut state = HashMap::new();
            for p in &self.parameters {
                state.insert(format!("exp_avg.{}", p.name), p.exp_avg.clone());
                state.insert(format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.clone());
                if let Some(master) = &p.master {
                    state.insert(format!("master.{}", p.name), master.clone());
                }
            }
            #[expect(clippy::cast_possible_wrap, reason = "step counts are far below 2^63")]
            let step = Tensor::new(&[self.step as i64], &oxtune_tensor::Device::Cpu)?;
            state.insert("step".into(), step);
            Ok(state)
        }
    }

    /// [`super::clip_factor`] with each gradient's squares summed in f32 and read back on its
    /// own (a host sync per gradient), those sums added in f64 on the host.
    pub fn clip_factor(grads: &HashMap<String, Tensor>, max_norm: f64) -> Result<(f64, f64)> {
        let mut squares = 0.0;
        for grad in grads.values() {
            squares += grad
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()
                .map(f64::from)?;
        }
        Ok(norm_and_factor(squares, max_norm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_step_by_hand() -> Result<()> {
        let var = Var::new(&[[1.0f32, -2.0]], &Device::Cpu)?;
        let mut adam = AdamW::new(
            vec![("w".into(), var.clone())],
            AdamWConfig {
                weight_decay: 0.1,
                ..AdamWConfig::default()
            },
        )?;
        let grads = HashMap::from([(
            "w".to_owned(),
            Tensor::new(&[[0.5f32, -0.25]], &Device::Cpu)?,
        )]);
        adam.step(&grads, 0.01)?;
        // After one step m/(1-b1) = g and sqrt(v/(1-b2)) = |g|: p * (1 - lr*wd) - lr * sign(g) (eps negligible)
        let got: Vec<Vec<f32>> = var.as_tensor().to_vec2()?;
        let expected = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (g, e) in got[0].iter().zip(expected) {
            assert!((f64::from(*g) - e).abs() < 1e-6, "{g} vs {e}");
        }
        Ok(())
    }

    fn bits(tensor: &Tensor) -> Result<Vec<u32>> {
        Ok(tensor
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    }

    /// Elements in the host storage behind `tensor` (more than its own for a view).
    fn storage_elements(tensor: &Tensor) -> usize {
        use oxtune_tensor::candle::{CpuStorage, Storage};
        let (storage, _) = tensor.storage_and_layout();
        match &*storage {
            Storage::Cpu(CpuStorage::F32(values)) => values.len(),
            _ => usize::MAX,
        }
    }

    /// Mixed shapes, decaying and non-decaying, f32 and bf16 (with masters) parameters:
    /// four steps (clipped and not), a checkpoint after the second and a resume from it, all
    /// bit for bit equal to the per-parameter path ([`reference`]); the checkpoint's tensors
    /// are host tensors of their parameter's elements only.
    #[test]
    fn equals_the_per_parameter_path_and_resumes_exactly() -> Result<()> {
        let device = Device::Cpu;
        let specs: [(&str, &[usize], DType); 5] = [
            ("layers.0.q_proj.lora_A.weight", &[4, 7], DType::F32),
            ("layers.0.q_proj.lora_B.weight", &[7, 4], DType::BF16),
            ("layers.0.input_layernorm.weight", &[7], DType::BF16),
            ("layers.0.o_proj.bias", &[1], DType::F32),
            ("embed_tokens.weight", &[33, 3], DType::F32),
        ];
        let build = || -> Result<Vec<(String, Var)>> {
            specs
                .iter()
                .enumerate()
                .map(|(i, (name, shape, dtype))| {
                    let values: Vec<f32> = (0..shape.iter().product::<usize>())
                        .map(|j| ((i * 31 + j * 7) % 19) as f32 / 9.5 - 1.0)
                        .collect();
                    let tensor = Tensor::from_vec(values, *shape, &device)?.to_dtype(*dtype)?;
                    Ok(((*name).to_owned(), Var::from_tensor(&tensor)?))
                })
                .collect()
        };
        let config = AdamWConfig {
            weight_decay: 0.05,
            ..AdamWConfig::default()
        };
        let (fused_parameters, reference_parameters) = (build()?, build()?);
        let mut fused = AdamW::new(fused_parameters.clone(), config)?;
        let mut per_parameter = reference::AdamW::new(reference_parameters.clone(), config)?;
        let mut checkpoint = None;
        let mut history = Vec::new();
        for step in 0..4 {
            let grads: HashMap<String, Tensor> = specs
                .iter()
                .map(|(name, shape, dtype)| {
                    let grad = Tensor::randn(0f32, 1.0, *shape, &device)?.to_dtype(*dtype)?;
                    Ok(((*name).to_owned(), grad))
                })
                .collect::<Result<_>>()?;
            let max_norm = if step % 2 == 0 { 0.5 } else { 0.0 };
            let (norm, factor) = clip_factor(&grads, max_norm)?;
            let (reference_norm, _) = reference::clip_factor(&grads, max_norm)?;
            assert!(
                (norm - reference_norm).abs() <= 1e-12 * reference_norm,
                "norm {norm} vs {reference_norm}"
            );
            assert_eq!(factor < 1.0, step % 2 == 0, "step {step}: factor {factor}");
            let lr = 1e-2 / f64::from(step + 1);
            fused.step_scaled(&grads, lr, factor)?;
            // The per-parameter path clipped the gradients before its step.
            let clipped = grads
                .iter()
                .map(|(name, grad)| {
                    let grad = grad.to_dtype(DType::F32)?;
                    let grad = if factor < 1.0 { (grad * factor)? } else { grad };
                    Ok((name.clone(), grad))
                })
                .collect::<Result<HashMap<_, _>>>()?;
            per_parameter.step(&clipped, lr)?;
            history.push((grads, lr, factor));
            for ((name, fused_var), (_, var)) in fused_parameters.iter().zip(&reference_parameters)
            {
                assert_eq!(
                    bits(fused_var.as_tensor())?,
                    bits(var.as_tensor())?,
                    "{name} step {step}"
                );
            }
            let (state, expected) = (fused.state()?, per_parameter.state()?);
            let mut keys: Vec<&String> = state.keys().collect();
            let mut expected_keys: Vec<&String> = expected.keys().collect();
            keys.sort();
            expected_keys.sort();
            assert_eq!(keys, expected_keys, "step {step}");
            for (key, tensor) in &state {
                assert!(tensor.device().is_cpu(), "{key}");
                if key != "step" {
                    assert_eq!(bits(tensor)?, bits(&expected[key])?, "{key} step {step}");
                    assert_eq!(tensor.dims(), expected[key].dims(), "{key}");
                    assert_eq!(tensor.layout().start_offset(), 0, "{key}");
                    assert_eq!(storage_elements(tensor), tensor.elem_count(), "{key}");
                }
            }
            if step == 1 {
                let weights: Vec<Tensor> = fused_parameters
                    .iter()
                    .map(|(_, var)| var.as_tensor().copy())
                    .collect::<oxtune_tensor::Result<_>>()?;
                checkpoint = Some((state, weights));
            }
        }
        // Resume from the checkpoint after step 2 into fresh parameters: steps 3 and 4 with
        // the same gradients end where the uninterrupted run did.
        let (state, weights) = checkpoint.expect("saved at step 2");
        let resumed_parameters = build()?;
        for ((_, var), weight) in resumed_parameters.iter().zip(&weights) {
            var.set(weight)?;
        }
        let mut resumed = AdamW::new(resumed_parameters.clone(), config)?;
        // A bf16 parameter's master is needed; without it the state stays as it was.
        let mut without_master = state.clone();
        without_master.remove("master.layers.0.input_layernorm.weight");
        let error = resumed
            .load_state(&without_master)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            error.contains("master.layers.0.input_layernorm.weight"),
            "{error}"
        );
        assert_eq!(resumed.steps_taken(), 0);
        resumed.load_state(&state)?;
        assert_eq!(resumed.steps_taken(), 2);
        let saved = resumed.state()?;
        for (key, tensor) in &state {
            if key != "step" {
                assert_eq!(bits(&saved[key])?, bits(tensor)?, "{key} after load");
            }
        }
        for (grads, lr, factor) in &history[2..] {
            resumed.step_scaled(grads, *lr, *factor)?;
        }
        for ((name, resumed_var), (_, var)) in resumed_parameters.iter().zip(&fused_parameters) {
            assert_eq!(
                bits(resumed_var.as_tensor())?,
                bits(var.as_tensor())?,
                "{name} after resuming"
            );
        }
        Ok(())
    }

    /// The flat accumulator sums exactly as `accumulate_gradients` does, over three backward
    /// passes of f32 and bf16 parameters, and reuses its buffer across steps.
    #[test]
    fn the_flat_accumulator_equals_the_per_parameter_sums() -> Result<()> {
        let device = Device::Cpu;
        let parameters = vec![
            (
                "a".to_owned(),
                Var::new(&[[0.5f32, -1.0], [2.0, 0.25]], &device)?,
            ),
            (
                "b".to_owned(),
                Var::from_tensor(
                    &Tensor::new(&[1.5f32, -0.75, 3.0], &device)?.to_dtype(DType::BF16)?,
                )?,
            ),
        ];
        let mut accumulator = GradientAccumulator::new(&parameters, &device)?;
        for step in 0..2 {
            let mut expected = HashMap::new();
            for micro in 0..3 {
                let x = Tensor::randn(0f32, 1.0, (4, 2), &device)?;
                let a = parameters[0].1.as_tensor();
                let b = parameters[1].1.as_tensor().to_dtype(DType::F32)?;
                let loss = ((x.matmul(a)?.sqr()?.sum_all()? * f64::from(step + 1))?
                    + (b.sqr()?.sum_all()? * f64::from(micro + 1))?)?;
                let store = loss.backward()?;
                accumulate_gradients(&parameters, &store, &mut expected)?;
                accumulator.add(&store, micro == 0)?;
            }
            let got = accumulator.gradients()?;
            for (name, _) in &parameters {
                assert_eq!(
                    bits(&got[name].force_contiguous()?)?,
                    bits(&expected[name])?,
                    "{name} step {step}"
                );
                assert_eq!(got[name].dims(), expected[name].dims(), "{name}");
            }
        }
        Ok(())
    }

    #[test]
    fn decay_follows_the_transformers_trainer() {
        for name in [
            "model.norm.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.q_norm.weight",
            "model.layers.0.self_attn.q_proj.bias",
        ] {
            assert!(!decays(name), "{name}");
        }
        for name in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector",
        ] {
            assert!(decays(name), "{name}");
        }
    }

    #[test]
    fn a_missing_gradient_is_an_error() -> Result<()> {
        let var = Var::new(&[1.0f32], &Device::Cpu)?;
        let mut adam = AdamW::new(vec![("bias".into(), var)], AdamWConfig::default())?;
        let error = adam
            .step(&HashMap::new(), 0.1)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("no gradient for `bias`"), "{error}");
        Ok(())
    }
}
