//! GGUF tensor names to Hugging Face names, and the one layout change llama.cpp makes to
//! the weights themselves: the q/k row permutation of `llama` files.
//!
//! ```text
//! token_embd.weight           -> model.embed_tokens.weight            (V, C)
//! blk.N.attn_norm.weight      -> model.layers.N.input_layernorm.weight (C)
//! blk.N.attn_q.{weight,bias}  -> model.layers.N.self_attn.q_proj.*     (H*D, C)  un-permuted (llama)
//! blk.N.attn_k.{weight,bias}  -> model.layers.N.self_attn.k_proj.*     (KV*D, C) un-permuted (llama)
//! blk.N.attn_v / attn_output  -> self_attn.v_proj / o_proj
//! blk.N.attn_q_norm / k_norm  -> self_attn.q_norm / k_norm              (D)       (qwen3)
//! blk.N.ffn_norm.weight       -> model.layers.N.post_attention_layernorm.weight
//! blk.N.ffn_gate / up / down  -> mlp.gate_proj / up_proj / down_proj
//! output_norm.weight          -> model.norm.weight
//! output.weight               -> lm_head.weight (absent: tied embeddings)
//! rope_freqs.weight           -> not written; becomes rope_scaling (llama3) in config.json
//! ```
//!
//! Shapes are candle's (GGUF lists dimensions fastest-first; candle reverses them), so a
//! linear weight is (out_features, in_features), as in PyTorch.

use oxtune_tensor::Tensor;
use serde_json::{Value as Json, json};

use super::hf_config::{Arch, HyperParams};

/// What becomes of one GGUF tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Written under `name`; `unpermute_heads` undoes llama.cpp's q/k permutation over that
    /// many heads.
    Weight {
        name: String,
        unpermute_heads: Option<usize>,
    },
    /// `rope_freqs.weight`: read into config.json's `rope_scaling`.
    RopeFreqs,
}

/// Why a GGUF tensor has no Hugging Face counterpart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmapped {
    pub hint: String,
}

/// The Hugging Face name (and layout fix) for a GGUF tensor of `arch`.
pub fn target(gguf_name: &str, hp: &HyperParams) -> Result<Target, Unmapped> {
    let weight = |name: &str| {
        Ok(Target::Weight {
            name: name.to_owned(),
            unpermute_heads: None,
        })
    };
    match gguf_name {
        "token_embd.weight" => return weight("model.embed_tokens.weight"),
        "output_norm.weight" => return weight("model.norm.weight"),
        "output.weight" => return weight("lm_head.weight"),
        "rope_freqs.weight" => return Ok(Target::RopeFreqs),
        _ => {}
    }
    let unknown = || Unmapped {
        hint: format!(
            "oxtune maps the tensors of dense {} models; this one (mixture-of-experts `ffn_*_exps`, fused `attn_qkv`, vision towers…) has no Hugging Face counterpart in oxtune",
            hp.arch.gguf_name()
        ),
    };
    let Some(rest) = gguf_name.strip_prefix("blk.") else {
        return Err(unknown());
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return Err(unknown());
    };
    let Ok(layer) = layer.parse::<usize>() else {
        return Err(unknown());
    };
    if layer >= hp.num_hidden_layers {
        return Err(Unmapped {
            hint: format!(
                "layer {layer} is beyond block_count {}; the file is inconsistent",
                hp.num_hidden_layers
            ),
        });
    }
    let Some((kind, suffix)) = rest.rsplit_once('.') else {
        return Err(unknown());
    };
    if suffix != "weight" && suffix != "bias" {
        return Err(unknown());
    }
    let module = match kind {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" if hp.arch == Arch::Qwen3 => "self_attn.q_norm",
        "attn_k_norm" if hp.arch == Arch::Qwen3 => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return Err(unknown()),
    };
    let unpermute_heads = match kind {
        "attn_q" if hp.arch.permutes_qk() => Some(hp.num_attention_heads),
        "attn_k" if hp.arch.permutes_qk() => Some(hp.num_key_value_heads),
        _ => None,
    };
    Ok(Target::Weight {
        name: format!("model.layers.{layer}.{module}.{suffix}"),
        unpermute_heads,
    })
}

/// Undoes convert_hf_to_gguf.py's `permute` of q/k rows (and biases).
///
/// Per head, Hugging Face keeps the rotary pairs as two halves, rows `[x_0..x_{D/2}, y_0..y_{D/2}]`;
/// llama.cpp interleaves them as `[x_0, y_0, x_1, y_1, ...]`. So the GGUF rows are a
/// (heads, D/2, 2) grid, and swapping its last two axes gives back (heads, 2, D/2).
pub fn unpermute(tensor: &Tensor, heads: usize) -> oxtune_tensor::Result<Tensor> {
    let dims = tensor.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if heads == 0 || rows == 0 || rows % (2 * heads) != 0 {
        oxtune_tensor::candle::bail!(
            "{rows} rows cannot be split into {heads} heads of rotary pairs"
        );
    }
    let mut grid = vec![heads, rows / heads / 2, 2];
    grid.extend_from_slice(dims.get(1..).unwrap_or_default());
    tensor
        .reshape(grid)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The inverse of [`unpermute`], as llama.cpp's converter applies it (tests use it to check the
/// round trip).
pub fn permute(tensor: &Tensor, heads: usize) -> oxtune_tensor::Result<Tensor> {
    let dims = tensor.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if heads == 0 || rows == 0 || rows % (2 * heads) != 0 {
        oxtune_tensor::candle::bail!(
            "{rows} rows cannot be split into {heads} heads of rotary pairs"
        );
    }
    let mut grid = vec![heads, 2, rows / heads / 2];
    grid.extend_from_slice(dims.get(1..).unwrap_or_default());
    tensor
        .reshape(grid)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The factor llama.cpp stores for one rotary frequency under Llama 3 scaling
/// (`1 / ((1 - smooth) / factor + smooth)` on the ramp), i.e. `freq / scaled_freq`.
fn llama3_factor(freq: f64, factor: f64, low: f64, high: f64, original: f64) -> f64 {
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < original / high {
        1.0
    } else if wavelen > original / low {
        factor
    } else {
        let smooth = (original / wavelen - low) / (high - low);
        1.0 / ((1.0 - smooth) / factor + smooth)
    }
}

/// Llama 3.1-style `rope_scaling` from llama.cpp's `rope_freqs` tensor.
///
/// llama.cpp does not record the scaling parameters: it stores, per rotary frequency, the
/// factor it divides that frequency by. `factor` is the largest stored value; for the others
/// the usual values are tried first (`low_freq_factor 1`, `high_freq_factor 4`,
/// `original_max_position_embeddings 8192`, as in every Llama 3.x release), then other
/// powers of two. The first set that reproduces every stored factor (to 1e-4) is returned;
/// any such set gives the same frequencies, hence the same model.
/// `Ok(None)`: all factors are 1 (no scaling). `Err(message)`: not Llama 3 scaling.
pub fn llama3_rope_scaling(
    factors: &[f32],
    head_dim: usize,
    rope_theta: f64,
) -> Result<Option<Json>, String> {
    if factors.len() * 2 != head_dim {
        return Err(format!(
            "{} factors for head_dim {head_dim}; expected head_dim / 2",
            factors.len()
        ));
    }
    if factors.iter().all(|f| (f - 1.0).abs() < 1e-6) {
        return Ok(None);
    }
    let factor = f64::from(factors.iter().copied().fold(f32::MIN, f32::max));
    let factor = (factor * 1000.0).round() / 1000.0;
    let freqs: Vec<f64> = (0..factors.len())
        .map(|i| 1.0 / rope_theta.powf((2 * i) as f64 / head_dim as f64))
        .collect();
    let reproduces = |low: f64, high: f64, original: f64| {
        freqs.iter().zip(factors).all(|(&freq, &stored)| {
            let expected = llama3_factor(freq, factor, low, high, original);
            (expected - f64::from(stored)).abs() <= 1e-4 * expected
        })
    };
    let originals = std::iter::once(8192.0).chain((4..=20).map(|k| f64::from(1u32 << k)));
    let mut candidates: Vec<(f64, f64, f64)> = Vec::new();
    for original in originals {
        for (low, high) in [(1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)] {
            candidates.push((low, high, original));
        }
    }
    let found = candidates
        .into_iter()
        .find(|&(low, high, original)| reproduces(low, high, original));
    let Some((low, high, original)) = found else {
        return Err(format!(
            "the factors (largest {factor}) do not follow Llama 3 scaling with any usual low_freq_factor, high_freq_factor and original_max_position_embeddings"
        ));
    };
    Ok(Some(json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original as u64,
    })))
}

/// The `rope_freqs` factors llama.cpp's converter writes for Llama 3 scaling (tests build
/// GGUF files with them).
pub fn llama3_rope_factors(
    head_dim: usize,
    rope_theta: f64,
    factor: f64,
    low: f64,
    high: f64,
    original: f64,
) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / rope_theta.powf((2 * i) as f64 / head_dim as f64);
            llama3_factor(freq, factor, low, high, original) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxtune_tensor::Device;

    fn hp(arch: Arch) -> HyperParams {
        HyperParams {
            arch,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            max_position_embeddings: 256,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
        }
    }

    fn name(gguf: &str, arch: Arch) -> Option<(String, Option<usize>)> {
        match target(gguf, &hp(arch)) {
            Ok(Target::Weight {
                name,
                unpermute_heads,
            }) => Some((name, unpermute_heads)),
            _ => None,
        }
    }

    #[test]
    fn names_map_to_hugging_face() {
        let llama = |g: &str| name(g, Arch::Llama);
        assert_eq!(
            llama("token_embd.weight"),
            Some(("model.embed_tokens.weight".into(), None))
        );
        assert_eq!(
            llama("blk.1.attn_q.weight"),
            Some(("model.layers.1.self_attn.q_proj.weight".into(), Some(4)))
        );
        assert_eq!(
            llama("blk.1.attn_k.weight"),
            Some(("model.layers.1.self_attn.k_proj.weight".into(), Some(2)))
        );
        assert_eq!(
            llama("blk.0.attn_v.weight"),
            Some(("model.layers.0.self_attn.v_proj.weight".into(), None))
        );
        assert_eq!(
            llama("blk.0.ffn_norm.weight"),
            Some((
                "model.layers.0.post_attention_layernorm.weight".into(),
                None
            ))
        );
        assert_eq!(
            llama("blk.0.ffn_down.weight"),
            Some(("model.layers.0.mlp.down_proj.weight".into(), None))
        );
        assert_eq!(
            llama("output.weight"),
            Some(("lm_head.weight".into(), None))
        );
        assert_eq!(
            llama("output_norm.weight"),
            Some(("model.norm.weight".into(), None))
        );
        // Qwen files are not permuted, Qwen2 has biases, Qwen3 has q/k norms.
        assert_eq!(
            name("blk.0.attn_q.bias", Arch::Qwen2),
            Some(("model.layers.0.self_attn.q_proj.bias".into(), None))
        );
        assert_eq!(
            name("blk.1.attn_k_norm.weight", Arch::Qwen3),
            Some(("model.layers.1.self_attn.k_norm.weight".into(), None))
        );
        assert_eq!(llama("blk.1.attn_k_norm.weight"), None);
        assert_eq!(llama("blk.2.attn_q.weight"), None, "beyond block_count");
        assert_eq!(llama("blk.0.ffn_gate_exps.weight"), None, "MoE");
        assert_eq!(
            target("rope_freqs.weight", &hp(Arch::Llama)),
            Ok(Target::RopeFreqs)
        );
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> oxtune_tensor::Result<()> {
        // 2 heads of head_dim 4 over 3 input features; rows are numbered 0..8.
        let rows: Vec<f32> = (0..8).flat_map(|r| [r as f32; 3]).collect();
        let hf = Tensor::from_vec(rows, (8, 3), &Device::Cpu)?;
        let gguf = permute(&hf, 2)?;
        // llama.cpp interleaves the halves of each head: [0, 2, 1, 3, 4, 6, 5, 7].
        let order: Vec<f32> = gguf.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
        assert_eq!(order, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        let back = unpermute(&gguf, 2)?;
        assert_eq!(back.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        // Biases are 1-D.
        let bias = Tensor::arange(0f32, 8.0, &Device::Cpu)?;
        assert_eq!(
            unpermute(&permute(&bias, 2)?, 2)?.to_vec1::<f32>()?,
            bias.to_vec1::<f32>()?
        );
        assert!(unpermute(&bias, 3).is_err());
        Ok(())
    }

    #[test]
    fn llama3_scaling_is_recovered_from_rope_freqs() -> Result<(), String> {
        // Llama 3.1 8B: head_dim 128, theta 500000, factor 8.
        let factors = llama3_rope_factors(128, 500_000.0, 8.0, 1.0, 4.0, 8192.0);
        let scaling = llama3_rope_scaling(&factors, 128, 500_000.0)?.ok_or("no scaling found")?;
        assert_eq!(scaling["factor"].as_f64(), Some(8.0));
        assert_eq!(
            scaling["original_max_position_embeddings"].as_u64(),
            Some(8192)
        );
        // An unusual original context (the tiny test model's 64) is found too.
        let tiny = llama3_rope_factors(16, 500_000.0, 8.0, 1.0, 4.0, 64.0);
        let scaling = llama3_rope_scaling(&tiny, 16, 500_000.0)?.ok_or("no scaling found")?;
        assert_eq!(
            scaling["original_max_position_embeddings"].as_u64(),
            Some(64)
        );
        assert_eq!(llama3_rope_scaling(&vec![1.0; 64], 128, 500_000.0)?, None);
        let mut odd = factors;
        odd[40] = 3.0;
        assert!(llama3_rope_scaling(&odd, 128, 500_000.0).is_err());
        Ok(())
    }
}
