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

use std::collections::HashMap;

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

struct Parameter {
    name: String,
    var: Var,
    /// fp32 copy when `var` is not fp32.
    master: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

/// AdamW over named parameters.
pub struct AdamW {
    config: AdamWConfig,
    parameters: Vec<Parameter>,
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

    /// Optimizer steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The parameters, by name.
    pub fn parameters(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.parameters.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// One step with `grads` (name -> gradient, any float dtype) at `learning_rate`.
    /// A parameter without a gradient is an error: it would silently never train.
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

    /// Moments, master weights and the step count, for a checkpoint
    /// (`exp_avg.<name>`, `exp_avg_sq.<name>`, `master.<name>`, `step`).
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

    /// Restores what [`AdamW::state`] saved; every parameter must be present.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: &str| {
            state
                .get(key)
                .ok_or_else(|| Error::State(format!("`{key}` missing from the optimizer state")))
        };
        let step: Vec<i64> = get("step")?.to_vec1()?;
        self.step = step
            .first()
            .and_then(|s| u64::try_from(*s).ok())
            .ok_or_else(|| Error::State("bad `step`".into()))?;
        for p in &mut self.parameters {
            let device = p.var.device().clone();
            p.exp_avg = get(&format!("exp_avg.{}", p.name))?.to_device(&device)?;
            p.exp_avg_sq = get(&format!("exp_avg_sq.{}", p.name))?.to_device(&device)?;
            if p.master.is_some() {
                p.master = Some(get(&format!("master.{}", p.name))?.to_device(&device)?);
            }
        }
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
/// (`min(1, max_norm / (norm + 1e-6))`).
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
