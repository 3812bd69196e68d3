//! LoRA, rsLoRA and DoRA on linear layers, with peft's numerics:
//!
//! - LoRA: `y = W x + b + s * B (A dropout(x))`, A: (r, in), B: (out, r), s = alpha / r
//!   (rsLoRA: alpha / sqrt(r)).
//! - DoRA: `y = W x + b + (m / n - 1) * W x' + (m / n) * s * B A x'` where x' is the dropped
//!   out input, m: (out,) the trained magnitude and n = ||W + s B A|| per output row, treated
//!   as a constant (detached) as the DoRA paper and peft do. peft initialises m to n.
//!
//! Initialisation follows peft's default: A kaiming-uniform (a = sqrt(5)), B zero, so the
//! adapted model starts equal to the base model.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use oxtune_models::CausalLm;
use oxtune_models::transformer::{Adapter, Linear, LowRank};
use oxtune_tensor::{D, DType, Tensor, Var};

use crate::{Error, Result};

/// Which linear layers get an adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// Every linear layer but the LM head (peft's `all-linear`).
    AllLinear,
    /// Layers whose name ends with one of these (peft's suffix match: `q_proj`, `mlp.up_proj`).
    Names(Vec<String>),
}

impl TargetModules {
    fn matches(&self, module: &str) -> bool {
        match self {
            Self::AllLinear => module != "lm_head",
            Self::Names(names) => names
                .iter()
                .any(|name| module == name || module.ends_with(&format!(".{name}"))),
        }
    }
}

/// LoRA hyper-parameters (ms-swift / peft names).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub target_modules: TargetModules,
}

impl LoraSettings {
    /// The factor s applied to `B A x`.
    pub fn scaling(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "ranks are small")]
        let rank = self.rank as f64;
        if self.use_rslora {
            self.alpha / rank.sqrt()
        } else {
            self.alpha / rank
        }
    }

    fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::Setting {
                name: "lora_rank",
                message: "must be at least 1".into(),
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Setting {
                name: "lora_dropout",
                message: format!("{} is not in [0, 1)", self.dropout),
            });
        }
        Ok(())
    }
}

/// One adapted linear layer's trainable tensors.
#[derive(Debug)]
pub struct LoraAdapter {
    /// (r, in)
    pub a: Var,
    /// (out, r)
    pub b: Var,
    /// DoRA magnitude, (out,).
    pub magnitude: Option<Var>,
    scaling: f64,
    dropout: f32,
    /// Position among the tuner's adapters, mixed into the dropout seed.
    index: u64,
    state: Arc<DropoutState>,
}

/// Whether dropout is on, and the seed of the current micro-batch's masks.
#[derive(Debug, Default)]
struct DropoutState {
    training: AtomicBool,
    seed: AtomicU64,
}

impl LoraAdapter {
    /// `s B A` as a dense (out, in) matrix.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling)?)
    }

    /// A frozen adapter from tensors read from disk (for merging without a model).
    pub(crate) fn frozen(
        a: &Tensor,
        b: &Tensor,
        magnitude: Option<&Tensor>,
        scaling: f64,
    ) -> Result<Self> {
        Ok(Self {
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
            magnitude: magnitude
                .map(|m| Var::from_tensor(&m.to_dtype(DType::F32)?))
                .transpose()?,
            scaling,
            dropout: 0.0,
            index: 0,
            state: Arc::default(),
        })
    }

    /// The base weight with this adapter folded in, computed in f32 and returned in the
    /// weight's dtype: LoRA `W + s B A`, DoRA `m / ||W + s B A|| * (W + s B A)` row by row.
    pub fn merged_weight(&self, weight: &Tensor) -> Result<Tensor> {
        let updated = (weight.to_dtype(DType::F32)? + self.delta_weight()?.detach())?;
        let merged = match &self.magnitude {
            None => updated,
            Some(magnitude) => {
                let norm = updated.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
                updated.broadcast_mul(
                    &magnitude
                        .as_tensor()
                        .detach()
                        .unsqueeze(1)?
                        .broadcast_div(&norm)?,
                )?
            }
        };
        Ok(merged.to_dtype(weight.dtype())?)
    }

    /// ||W + s B A|| per output row, detached: (out,).
    fn weight_norm(&self, weight: &Tensor) -> Result<Tensor> {
        let delta = self.delta_weight()?.detach().to_dtype(weight.dtype())?;
        Ok((weight + delta)?.sqr()?.sum(D::Minus1)?.sqrt()?.detach())
    }
}

impl LoraAdapter {
    /// Whether this forward pass drops adapter inputs out (training with dropout > 0).
    fn dropping(&self) -> bool {
        self.dropout > 0.0 && self.state.training.load(Ordering::Relaxed)
    }

    /// The adapter's input with this micro-batch's dropout mask (seeded per adapter).
    fn dropped(&self, xs: &Tensor) -> oxtune_models::Result<Tensor> {
        let seed = self
            .state
            .seed
            .load(Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ self.index;
        Ok(oxtune_tensor::ops::dropout(xs, self.dropout, seed)?)
    }

    /// A and s B in `dtype`, as the forward multiplies them.
    fn factors(&self, dtype: DType) -> oxtune_models::Result<(Tensor, Tensor)> {
        let a = self.a.as_tensor().to_dtype(dtype)?;
        // s B A: the scale goes on B (out, r), not on the (.., out) product, which saves a
        // pass over the layer's output in the forward and in the backward.
        let b = (self.b.as_tensor() * self.scaling)?.to_dtype(dtype)?;
        Ok((a, b))
    }
}

impl Adapter for LoraAdapter {
    fn low_rank(&self, dtype: DType) -> oxtune_models::Result<Option<LowRank>> {
        if self.magnitude.is_some() {
            return Ok(None);
        }
        let (a, b) = self.factors(dtype)?;
        Ok(Some(LowRank { a, b }))
    }

    fn low_rank_input(&self, xs: &Tensor) -> oxtune_models::Result<Option<Tensor>> {
        Ok(if self.dropping() {
            Some(self.dropped(xs)?)
        } else {
            None
        })
    }

    fn forward(&self, xs: &Tensor, base: &Linear) -> oxtune_models::Result<Tensor> {
        let result = base.base_forward(xs)?;
        let dropping = self.dropping();
        let x = if dropping {
            self.dropped(xs)?
        } else {
            xs.clone()
        };
        // (.., in) -> (.., r) -> (.., out)
        let Some(magnitude) = &self.magnitude else {
            let (a, b) = self.factors(x.dtype())?;
            let lora = x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
            return Ok((result + lora)?);
        };
        let a = self.a.as_tensor().to_dtype(x.dtype())?;
        let b = self.b.as_tensor().to_dtype(x.dtype())?;
        let lora = x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
        let base_result = if dropping {
            x.broadcast_matmul(&base.weight().t()?)?
        } else {
            match base.bias() {
                Some(bias) => result.broadcast_sub(bias)?,
                None => result.clone(),
            }
        };
        let norm = self.weight_norm(base.weight()).map_err(|e| match e {
            Error::Model(e) => e,
            Error::Tensor(e) => e.into(),
            other => oxtune_tensor::candle::Error::Msg(other.to_string()).into(),
        })?;
        let scale = magnitude
            .as_tensor()
            .to_dtype(x.dtype())?
            .broadcast_div(&norm)?; // (out,)
        let dora = (base_result.broadcast_mul(&(&scale - 1.0)?)?
            + lora.broadcast_mul(&(scale * self.scaling)?)?)?;
        Ok((result + dora)?)
    }
}

/// LoRA/DoRA adapters attached to a model, by module name.
#[derive(Debug)]
pub struct LoraTuner {
    pub settings: LoraSettings,
    /// (module name, adapter), in the model's layer order.
    pub adapters: Vec<(String, Arc<LoraAdapter>)>,
    state: Arc<DropoutState>,
}

impl LoraTuner {
    /// Attaches freshly initialised adapters (peft's default init) to the targeted layers.
    /// Adapter tensors are f32, whatever the model's dtype (fp32 master weights); A is drawn
    /// from a generator seeded with `seed`, so runs with the same seed start identically.
    pub fn attach(model: &mut CausalLm, settings: &LoraSettings, seed: u64) -> Result<Self> {
        use rand::{Rng as _, SeedableRng as _};
        settings.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Self::attach_with(model, settings, |_, linear| {
            let (out_features, in_features) = linear.weight().dims2()?;
            let device = linear.weight().device();
            // kaiming_uniform(a = sqrt(5)) on (r, in): bound = 1 / sqrt(in)
            #[expect(
                clippy::cast_precision_loss,
                reason = "layer widths are far below 2^24"
            )]
            let bound = 1.0 / (in_features as f32).sqrt();
            let a: Vec<f32> = (0..settings.rank * in_features)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let a = Tensor::from_vec(a, (settings.rank, in_features), device)?;
            let b = Tensor::zeros((out_features, settings.rank), DType::F32, device)?;
            Ok((a, b, None))
        })
    }

    /// Attaches adapters whose tensors `make(module, layer)` returns as (A, B, magnitude);
    /// DoRA magnitudes default to the weight norm, as peft initialises them.
    pub fn attach_with(
        model: &mut CausalLm,
        settings: &LoraSettings,
        mut make: impl FnMut(&str, &Linear) -> Result<(Tensor, Tensor, Option<Tensor>)>,
    ) -> Result<Self> {
        let state = Arc::new(DropoutState::default());
        let mut adapters = Vec::new();
        let mut available = Vec::new();
        for (name, linear) in model.linears_mut() {
            available.push(name.rsplit('.').next().unwrap_or(&name).to_owned());
            if !settings.target_modules.matches(&name) {
                continue;
            }
            let (a, b, magnitude) = make(&name, linear)?;
            let mut adapter = LoraAdapter {
                a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
                b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
                magnitude: None,
                scaling: settings.scaling(),
                dropout: settings.dropout,
                index: u64::try_from(adapters.len()).unwrap_or(u64::MAX),
                state: state.clone(),
            };
            if settings.use_dora {
                let magnitude = match magnitude {
                    Some(m) => m.to_dtype(DType::F32)?,
                    None => adapter.weight_norm(&linear.weight().to_dtype(DType::F32)?)?,
                };
                adapter.magnitude = Some(Var::from_tensor(&magnitude)?);
            }
            let adapter = Arc::new(adapter);
            linear.set_adapter(Some(adapter.clone()));
            adapters.push((name, adapter));
        }
        if adapters.is_empty() {
            available.sort();
            available.dedup();
            let requested = match &settings.target_modules {
                TargetModules::AllLinear => vec!["all-linear".to_owned()],
                TargetModules::Names(names) => names.clone(),
            };
            return Err(Error::NoTargets {
                requested,
                available: available.join(", "),
            });
        }
        Ok(Self {
            settings: settings.clone(),
            adapters,
            state,
        })
    }

    /// Turns dropout on (training) or off (evaluation, inference).
    pub fn set_training(&self, training: bool) {
        self.state.training.store(training, Ordering::Relaxed);
    }

    /// Seeds the dropout masks of the next forward passes (the trainer derives it from the
    /// run's seed and the micro-batch, so a resumed run draws the same masks).
    pub fn set_dropout_seed(&self, seed: u64) {
        self.state.seed.store(seed, Ordering::Relaxed);
    }

    /// Every trainable tensor under its peft name
    /// (`base_model.model.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (module, adapter) in &self.adapters {
            out.push((
                format!("base_model.model.{module}.lora_A.weight"),
                adapter.a.clone(),
            ));
            out.push((
                format!("base_model.model.{module}.lora_B.weight"),
                adapter.b.clone(),
            ));
            if let Some(magnitude) = &adapter.magnitude {
                out.push((
                    format!("base_model.model.{module}.lora_magnitude_vector"),
                    magnitude.clone(),
                ));
            }
        }
        out
    }

    /// Folds every adapter into its base weight and detaches it: LoRA `W + s B A`, DoRA
    /// `m / ||W + s B A|| * (W + s B A)` row by row.
    pub fn merge_into(&self, model: &mut CausalLm) -> Result<()> {
        let adapters: std::collections::HashMap<&str, &Arc<LoraAdapter>> = self
            .adapters
            .iter()
            .map(|(name, adapter)| (name.as_str(), adapter))
            .collect();
        for (name, linear) in model.linears_mut() {
            let Some(adapter) = adapters.get(name.as_str()) else {
                continue;
            };
            let merged = adapter.merged_weight(linear.weight())?;
            *linear.tensors_mut().0 = merged;
            linear.set_adapter(None);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_follows_peft() {
        let mut settings = LoraSettings {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            use_rslora: false,
            use_dora: false,
            target_modules: TargetModules::AllLinear,
        };
        assert!((settings.scaling() - 2.0).abs() < 1e-12);
        settings.use_rslora = true;
        assert!((settings.scaling() - 8.0).abs() < 1e-12);
    }

    #[test]
    fn target_names_match_suffixes() {
        let names = TargetModules::Names(vec!["q_proj".into(), "mlp.up_proj".into()]);
        assert!(names.matches("model.layers.0.self_attn.q_proj"));
        assert!(names.matches("model.layers.3.mlp.up_proj"));
        assert!(!names.matches("model.layers.0.self_attn.k_proj"));
        assert!(!TargetModules::AllLinear.matches("lm_head"));
    }
}
