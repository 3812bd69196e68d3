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
//! loop that rounds exactly as those candle ops did. [`clip_factor`] reads the global norm
//! back once per step, and [`AdamW::step_scaled`] applies the clip factor inside the update.
//! The checkpoint keys (`exp_avg.<name>`, `exp_avg_sq.<name>`, `master.<name>`, `step`) are
//! per parameter, as before.

use std::collections::HashMap;

use oxtune_tensor::optim::{AdamWStep, GradScale, MultiTensorAdamW};
use oxtune_tensor::{DType, Tensor, Var};

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
    parameters: Vec<(String, Var)>,
    state: MultiTensorAdamW,
    /// Optimizer steps taken.
    step: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("config", &self.config)
            .field("parameters", &self.parameters.len())
            .field("step", &self.step)
            .finish()
    }
}

impl AdamW {
    pub fn new(parameters: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let state = MultiTensorAdamW::new(
            parameters
                .iter()
                .map(|(name, var)| (var.clone(), decays(name)))
                .collect(),
        )?;
        Ok(Self {
            config,
            parameters,
            state,
            step: 0,
        })
    }

    /// Optimizer steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The parameters, by name.
    pub fn parameters(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.parameters
            .iter()
            .map(|(name, var)| (name.as_str(), var))
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
            .parameters
            .iter()
            .map(|(name, _)| {
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
    /// (`exp_avg.<name>`, `exp_avg_sq.<name>`, `master.<name>`, `step`).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut state = HashMap::new();
        for (index, (name, _)) in self.parameters.iter().enumerate() {
            state.insert(format!("exp_avg.{name}"), self.state.exp_avg(index)?);
            state.insert(format!("exp_avg_sq.{name}"), self.state.exp_avg_sq(index)?);
            if let Some(master) = self.state.master(index)? {
                state.insert(format!("master.{name}"), master);
            }
        }
        #[expect(clippy::cast_possible_wrap, reason = "step counts are far below 2^63")]
        let step = Tensor::new(&[self.step as i64], &oxtune_tensor::Device::Cpu)?;
        state.insert("step".into(), step);
        Ok(state)
    }

    /// Restores what [`AdamW::state`] saved; every parameter must be present.
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
        for (index, (name, _)) in self.parameters.iter().enumerate() {
            exp_avg.push(get(&format!("exp_avg.{name}"))?);
            exp_avg_sq.push(get(&format!("exp_avg_sq.{name}"))?);
            masters.push(if self.state.master(index)?.is_some() {
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
/// sum, f32). A parameter the backward pass did not reach is an error naming it: an op
/// without a backward, or a parameter outside the graph, would otherwise never train.
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
    pub fn new(parameters: &[(String, Var)], device: &oxtune_tensor::Device) -> Result<Self> {
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
    /// error naming it, as in [`accumulate_gradients`].
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

    /// The summed gradients by name (f32 views of the buffer, shaped as their parameters).
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
/// (`min(1, max_norm / (norm + 1e-6))`). Each gradient's squares are summed in f32 on its
/// device and those sums in f64 there too, so the norm costs one host sync
/// ([`AdamW::step_scaled`] then applies the factor inside the update).
pub fn clip_factor(grads: &HashMap<String, Tensor>, max_norm: f64) -> Result<(f64, f64)> {
    let tensors: Vec<Tensor> = grads.values().cloned().collect();
    let device = tensors
        .first()
        .map_or(oxtune_tensor::Device::Cpu, |t| t.device().clone());
    let squares = oxtune_tensor::optim::sum_of_squares(&tensors, &device)?.to_scalar::<f64>()?;
    let norm = squares.sqrt();
    let factor = if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    };
    Ok((norm, factor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxtune_tensor::Device;

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

    /// The per-parameter composition of candle ops this optimizer replaced, kept as the
    /// reference: (weight, master, exp_avg, exp_avg_sq) per parameter.
    struct ComposedAdamW {
        config: AdamWConfig,
        parameters: Vec<(String, Var, Option<Tensor>, Tensor, Tensor)>,
        step: i32,
    }

    impl ComposedAdamW {
        fn new(parameters: &[(String, Var)], config: AdamWConfig) -> Result<Self> {
            let parameters = parameters
                .iter()
                .map(|(name, var)| {
                    let tensor = var.as_tensor();
                    let master = (tensor.dtype() != DType::F32)
                        .then(|| tensor.to_dtype(DType::F32))
                        .transpose()?;
                    let zeros = tensor.zeros_like()?.to_dtype(DType::F32)?;
                    Ok((name.clone(), var.clone(), master, zeros.clone(), zeros))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Self {
                config,
                parameters,
                step: 0,
            })
        }

        fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64, factor: f64) -> Result<()> {
            self.step += 1;
            let c = self.config;
            let bias_correction2_sqrt = (1.0 - c.beta2.powi(self.step)).sqrt();
            let step_size = lr / (1.0 - c.beta1.powi(self.step));
            for (name, var, master, exp_avg, exp_avg_sq) in &mut self.parameters {
                let mut grad = grads[name.as_str()].to_dtype(DType::F32)?;
                if factor < 1.0 {
                    grad = (grad * factor)?;
                }
                let current = master.clone().unwrap_or(var.as_tensor().copy()?);
                let current = if decays(name) && c.weight_decay != 0.0 {
                    (current * (1.0 - lr * c.weight_decay))?
                } else {
                    current
                };
                *exp_avg = ((&*exp_avg * c.beta1)? + (&grad * (1.0 - c.beta1))?)?;
                *exp_avg_sq = ((&*exp_avg_sq * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
                let denominator = ((exp_avg_sq.sqrt()? / bias_correction2_sqrt)? + c.eps)?;
                let updated = (current - (exp_avg.div(&denominator)? * step_size)?)?;
                var.set(&updated.to_dtype(var.dtype())?)?;
                if let Some(master) = master {
                    *master = updated;
                }
            }
            Ok(())
        }
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

    /// Mixed shapes, decaying and non-decaying, f32 and bf16 (with masters) parameters:
    /// four steps (clipped and not), a checkpoint after the second and a resume from it, all
    /// bit for bit equal to the per-parameter candle ops.
    #[test]
    fn equals_the_per_parameter_composition_and_resumes_exactly() -> Result<()> {
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
        let (fused_parameters, composed_parameters) = (build()?, build()?);
        let mut fused = AdamW::new(fused_parameters.clone(), config)?;
        let mut composed = ComposedAdamW::new(&composed_parameters, config)?;
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
            let (_, factor) = clip_factor(&grads, if step % 2 == 0 { 0.5 } else { 0.0 })?;
            let lr = 1e-2 / f64::from(step + 1);
            fused.step_scaled(&grads, lr, factor)?;
            composed.step(&grads, lr, factor)?;
            history.push((grads.clone(), lr, factor));
            for ((name, fused_var), (_, var, master, exp_avg, exp_avg_sq)) in
                fused_parameters.iter().zip(&composed.parameters)
            {
                let state = fused.state()?;
                assert_eq!(
                    bits(fused_var.as_tensor())?,
                    bits(var.as_tensor())?,
                    "{name} step {step}"
                );
                assert_eq!(
                    bits(&state[&format!("exp_avg.{name}")])?,
                    bits(exp_avg)?,
                    "{name}"
                );
                assert_eq!(
                    bits(&state[&format!("exp_avg_sq.{name}")])?,
                    bits(exp_avg_sq)?,
                    "{name}"
                );
                match master {
                    Some(master) => {
                        assert_eq!(
                            bits(&state[&format!("master.{name}")])?,
                            bits(master)?,
                            "{name}"
                        );
                    }
                    None => assert!(!state.contains_key(&format!("master.{name}")), "{name}"),
                }
            }
            if step == 1 {
                let weights: Vec<Tensor> = fused_parameters
                    .iter()
                    .map(|(_, var)| var.as_tensor().copy())
                    .collect::<oxtune_tensor::Result<_>>()?;
                checkpoint = Some((fused.state()?, weights));
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
    fn the_flat_accumulator_equals_accumulate_gradients() -> Result<()> {
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
                    bits(&got[name])?,
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
