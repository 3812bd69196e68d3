//! GGUF import: tokenization, tensor names and shapes, q/k un-permutation, configs and
//! errors, checked against references written by `tools/make_gguf_fixtures.py`
//! (transformers and SentencePiece reading the same files) and against the Hugging Face
//! fixtures in `tests/fixtures/tiny-*` converted to GGUF here.
//!
//! The SmolLM2 tests need `models/SmolLM2-135M-Instruct.Q4_1.gguf` (~98 MB, not committed);
//! they fail, naming `scripts/fetch-demo-model.sh`, when it is missing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail, ensure};
use oxtune_models::gguf::{self, GgufError, ImportOptions, ImportSummary};
use oxtune_tensor::candle::quantized::gguf_file::{self, Value};
use oxtune_tensor::candle::quantized::{GgmlDType, QTensor};
use oxtune_tensor::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::Value as Json;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

fn tiny_gguf() -> PathBuf {
    fixtures().join("gguf/tiny_llama_spm.gguf")
}

/// The real SmolLM2 file; a missing file fails the test with what to run.
fn smollm2_gguf() -> anyhow::Result<PathBuf> {
    let path = repo().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    ensure!(
        path.is_file(),
        "{} is missing\nhint: run scripts/fetch-demo-model.sh (CI runs it before the tests); it downloads SmolLM2-135M-Instruct Q4_1 (~98 MB)",
        path.display()
    );
    Ok(path)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn import_as(gguf_path: &Path, out: &Path, dtype: DType) -> Result<ImportSummary, GgufError> {
    let options = ImportOptions {
        dtype,
        ..ImportOptions::default()
    };
    gguf::import_with(gguf_path, out, &options, &mut |_, _, _| {})
}

/// All tensors of a Hugging Face directory (single file or shards).
fn load_weights(dir: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.is_file() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let index: Index = read_json(&index)?;
        let mut names: Vec<String> = index.weight_map.into_values().collect();
        names.sort();
        names.dedup();
        names.into_iter().map(|n| dir.join(n)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut all = HashMap::new();
    for file in files {
        all.extend(oxtune_tensor::candle::safetensors::load(
            &file,
            &Device::Cpu,
        )?);
    }
    Ok(all)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    ensure!(
        a.dims() == b.dims(),
        "shapes differ: {:?} vs {:?}",
        a.dims(),
        b.dims()
    );
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar()?)
}

fn max_abs(a: &Tensor) -> anyhow::Result<f32> {
    Ok(a.to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar()?)
}

#[derive(Debug, Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    #[serde(default)]
    with_special_tokens: Option<Vec<u32>>,
}

#[derive(Debug, Deserialize)]
struct TinyReference {
    config: Json,
    tokenizer: Json,
    tensor_types: BTreeMap<String, String>,
    tokenization: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Chat {
    rendered: String,
    input_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
struct SmolReference {
    gguf: Json,
    tokenization: Vec<Case>,
    chat: Chat,
}

/// Encodes every case and compares with the reference ids.
fn check_tokenization(
    tokenizer: &tokenizers::Tokenizer,
    cases: &[Case],
    add_bos: Option<u32>,
) -> anyhow::Result<()> {
    for case in cases {
        let ids = tokenizer
            .encode(case.text.as_str(), false)
            .map_err(anyhow::Error::msg)?
            .get_ids()
            .to_vec();
        ensure!(
            ids == case.ids,
            "{:?}: got {ids:?}, expected {:?}",
            case.text,
            case.ids
        );
        let with_special = tokenizer
            .encode(case.text.as_str(), true)
            .map_err(anyhow::Error::msg)?
            .get_ids()
            .to_vec();
        let expected: Vec<u32> = match (&case.with_special_tokens, add_bos) {
            (Some(ids), _) => ids.clone(),
            (None, Some(bos)) => std::iter::once(bos)
                .chain(case.ids.iter().copied())
                .collect(),
            (None, None) => case.ids.clone(),
        };
        ensure!(
            with_special == expected,
            "{:?} with special tokens: got {with_special:?}, expected {expected:?}",
            case.text
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tiny SentencePiece Llama (always runs)
// ---------------------------------------------------------------------------------------------

#[test]
fn tiny_spm_tokenization_matches_sentencepiece() -> anyhow::Result<()> {
    let reference: TinyReference =
        read_json(&fixtures().join("gguf/tiny_llama_spm_reference.json"))?;
    let tokenizer = gguf::read_tokenizer(&tiny_gguf())?;
    ensure!(
        tokenizer.kind == gguf::VocabKind::SentencePiece,
        "{:?}",
        tokenizer.kind
    );
    check_tokenization(&tokenizer.tokenizer, &reference.tokenization, None)?;
    // Decoding gives the text back (the space prefix is stripped again), except around added
    // tokens, where the prefix added to the following fragment stays.
    for case in reference
        .tokenization
        .iter()
        .filter(|c| !c.text.contains("<|im_"))
    {
        let text = tokenizer
            .tokenizer
            .decode(&case.ids, false)
            .map_err(anyhow::Error::msg)?;
        ensure!(text == case.text, "decode: {text:?} != {:?}", case.text);
    }
    Ok(())
}

#[test]
fn tiny_spm_import_matches_transformers_weights_and_undoes_the_permutation() -> anyhow::Result<()> {
    let reference: TinyReference =
        read_json(&fixtures().join("gguf/tiny_llama_spm_reference.json"))?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("tiny");
    let summary = import_as(&tiny_gguf(), &out, DType::F32)?;
    ensure!(
        summary.architecture == "LlamaForCausalLM" && summary.num_tensors == 21,
        "{summary:?}"
    );
    ensure!(!summary.tie_word_embeddings);

    let ours = load_weights(&out)?;
    let expected = oxtune_tensor::candle::safetensors::load(
        fixtures().join("gguf/tiny_llama_spm_weights.safetensors"),
        &Device::Cpu,
    )?;
    let mut names: Vec<&String> = expected
        .keys()
        .filter(|k| !k.starts_with("original."))
        .collect();
    names.sort();
    let mut ours_names: Vec<&String> = ours.keys().collect();
    ours_names.sort();
    ensure!(
        names == ours_names,
        "tensor names differ:\nours     {ours_names:?}\nexpected {names:?}"
    );
    for name in names {
        let (a, b) = (&ours[name], &expected[name]);
        ensure!(a.dtype() == DType::F32, "{name}: {:?}", a.dtype());
        let diff = max_abs_diff(a, b)?;
        // Both sides dequantize the same blocks; only float rounding may differ.
        ensure!(
            diff <= 1e-6 * max_abs(b)?.max(1.0),
            "{name}: max abs diff {diff}"
        );
    }

    // q/k come back in Hugging Face's layout: equal to the weights before quantization and
    // permutation, up to the quantization error of their GGUF type.
    for (hf, gguf_name) in [
        (
            "model.layers.0.self_attn.q_proj.weight",
            "blk.0.attn_q.weight",
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            "blk.0.attn_k.weight",
        ),
        (
            "model.layers.1.self_attn.q_proj.weight",
            "blk.1.attn_q.weight",
        ),
        (
            "model.layers.1.self_attn.k_proj.weight",
            "blk.1.attn_k.weight",
        ),
    ] {
        let original = &expected[&format!("original.{hf}")];
        let scale = max_abs(original)?;
        let tolerance = match reference.tensor_types[gguf_name].as_str() {
            "F32" => 0.0,
            "F16" => scale / 1024.0,
            "Q8_0" => scale / 100.0,
            other => bail!("unexpected type {other} for {gguf_name}"),
        };
        let diff = max_abs_diff(&ours[hf], original)?;
        ensure!(
            diff <= tolerance,
            "{hf}: max abs diff {diff} from the original weights (tolerance {tolerance})"
        );
        // Without the un-permutation the rows would be interleaved: far off.
        let heads = if hf.contains("q_proj") { 4 } else { 2 };
        let permuted = gguf::tensors::permute(original, heads)?;
        ensure!(
            max_abs_diff(&permuted, original)? > 10.0 * tolerance.max(1e-3),
            "{hf}: permutation is a no-op?"
        );
    }
    Ok(())
}

#[test]
fn tiny_spm_import_writes_hugging_face_configs() -> anyhow::Result<()> {
    let reference: TinyReference =
        read_json(&fixtures().join("gguf/tiny_llama_spm_reference.json"))?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("nested/tiny");
    // Default options: bfloat16, except tensors that were F32 in the file.
    let summary = gguf::import(&tiny_gguf(), &out)?;
    ensure!(summary.dtype == DType::BF16);
    let mut files = summary.files.clone();
    files.sort();
    ensure!(
        files
            == [
                "config.json",
                "generation_config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json"
            ],
        "{files:?}"
    );

    let config: Json = read_json(&out.join("config.json"))?;
    let Json::Object(expected) = &reference.config else {
        bail!("reference config is not an object")
    };
    for (key, value) in expected {
        ensure!(
            config.get(key) == Some(value),
            "config.json {key}: {:?}, expected {value}",
            config.get(key)
        );
    }
    ensure!(
        config["model_type"] == "llama"
            && config["torch_dtype"] == "bfloat16"
            && config["rope_scaling"].is_null(),
        "{config}"
    );

    let tokenizer_config: Json = read_json(&out.join("tokenizer_config.json"))?;
    for key in ["bos_token", "eos_token", "unk_token", "add_bos_token"] {
        ensure!(
            tokenizer_config[key] == reference.tokenizer[key],
            "tokenizer_config.json {key}: {}",
            tokenizer_config[key]
        );
    }
    ensure!(
        tokenizer_config["chat_template"]
            .as_str()
            .is_some_and(|t| t.contains("<|im_start|>"))
    );
    ensure!(tokenizer_config["model_max_length"] == 256);
    let generation: Json = read_json(&out.join("generation_config.json"))?;
    ensure!(
        generation["bos_token_id"] == 1 && generation["eos_token_id"] == 2,
        "{generation}"
    );

    // The directory loads with oxtune's own readers.
    let model_config = oxtune_models::ModelConfig::load(&out)?;
    ensure!(
        model_config.head_dim == 16 && model_config.eos_token_ids == [2],
        "{model_config:?}"
    );
    let tokenizer = oxtune_models::Tokenizer::load(&out)?;
    ensure!(tokenizer.encode("Hello world", true)? == [1, 331, 330, 290]);
    ensure!(tokenizer.special_tokens().bos_token.as_deref() == Some("<s>"));

    // Tensors that were F32 in the GGUF (norms, one q_proj) stay F32; the rest are bfloat16.
    for (name, tensor) in load_weights(&out)? {
        let gguf_type = reference
            .tensor_types
            .get(&gguf_name(&name)?)
            .context(name.clone())?;
        let expected = if gguf_type == "F32" {
            DType::F32
        } else {
            DType::BF16
        };
        ensure!(
            tensor.dtype() == expected,
            "{name} ({gguf_type} in the GGUF): {:?}",
            tensor.dtype()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Hugging Face fixtures converted to GGUF (F32) here, imported back: must be identical.
// ---------------------------------------------------------------------------------------------

/// Hugging Face name -> GGUF name, the inverse of the import's mapping.
fn gguf_name(hf: &str) -> anyhow::Result<String> {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return Ok((*g).to_owned());
    }
    let rest = hf.strip_prefix("model.layers.").context(hf.to_owned())?;
    let (layer, rest) = rest.split_once('.').context(hf.to_owned())?;
    let (module, suffix) = rest.rsplit_once('.').context(hf.to_owned())?;
    let kind = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => bail!("no GGUF name for {other}"),
    };
    Ok(format!("blk.{layer}.{kind}.{suffix}"))
}

/// Writes a GGUF file the way llama.cpp's converter would from a Hugging Face directory with
/// a byte-level BPE tokenizer: F32 tensors, q/k permuted for `llama`, Llama 3 rope scaling as
/// a `rope_freqs` tensor.
fn gguf_from_hf(hf_dir: &Path, arch: &str, out: &Path) -> anyhow::Result<()> {
    let config: Json = read_json(&hf_dir.join("config.json"))?;
    let tokenizer: Json = read_json(&hf_dir.join("tokenizer.json"))?;
    let tokenizer_config: Json = read_json(&hf_dir.join("tokenizer_config.json"))?;
    let usize_of = |key: &str| {
        config[key]
            .as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("config.json {key}"))
    };
    let (hidden, heads) = (usize_of("hidden_size")?, usize_of("num_attention_heads")?);
    let kv_heads = usize_of("num_key_value_heads")?;
    let head_dim = config["head_dim"]
        .as_u64()
        .map_or(hidden / heads, |d| d as usize);
    let theta = config["rope_theta"].as_f64().context("rope_theta")?;
    let u32_value = |v: usize| Value::U32(v as u32);
    let key = |name: &str| format!("{arch}.{name}");

    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            key("block_count"),
            u32_value(usize_of("num_hidden_layers")?),
        ),
        (
            key("context_length"),
            u32_value(usize_of("max_position_embeddings")?),
        ),
        (key("embedding_length"), u32_value(hidden)),
        (
            key("feed_forward_length"),
            u32_value(usize_of("intermediate_size")?),
        ),
        (key("attention.head_count"), u32_value(heads)),
        (key("attention.head_count_kv"), u32_value(kv_heads)),
        (key("attention.key_length"), u32_value(head_dim)),
        (key("attention.value_length"), u32_value(head_dim)),
        (key("rope.dimension_count"), u32_value(head_dim)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(config["rms_norm_eps"].as_f64().context("rms_norm_eps")? as f32),
        ),
        (key("rope.freq_base"), Value::F32(theta as f32)),
    ];

    // Vocabulary: model vocab plus added tokens, by id; special added tokens are CONTROL (3).
    let vocab_size = usize_of("vocab_size")?;
    let mut tokens = vec![String::new(); vocab_size];
    let mut types = vec![Value::I32(1); vocab_size];
    for (token, id) in tokenizer["model"]["vocab"].as_object().context("vocab")? {
        tokens[id.as_u64().context("id")? as usize] = token.clone();
    }
    for added in tokenizer["added_tokens"]
        .as_array()
        .context("added_tokens")?
    {
        let id = added["id"].as_u64().context("id")? as usize;
        tokens[id] = added["content"].as_str().context("content")?.to_owned();
        types[id] = Value::I32(if added["special"] == true { 3 } else { 4 });
    }
    let merges: Vec<Value> = tokenizer["model"]["merges"]
        .as_array()
        .context("merges")?
        .iter()
        .map(|m| {
            Value::String(format!(
                "{} {}",
                m[0].as_str().unwrap_or_default(),
                m[1].as_str().unwrap_or_default()
            ))
        })
        .collect();
    metadata.extend([
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt-2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(
                tokenizer_config["chat_template"]
                    .as_str()
                    .context("chat_template")?
                    .into(),
            ),
        ),
    ]);
    for (hf_key, gguf_key) in [
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
        ("bos_token_id", "bos_token_id"),
    ] {
        if let Some(id) = config[hf_key].as_u64() {
            metadata.push((format!("tokenizer.ggml.{gguf_key}"), Value::U32(id as u32)));
        }
    }

    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut weights: Vec<(String, Tensor)> = load_weights(hf_dir)?.into_iter().collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, tensor) in weights {
        let mut tensor = tensor.to_dtype(DType::F32)?;
        if arch == "llama" && name.ends_with("q_proj.weight") {
            tensor = gguf::tensors::permute(&tensor, heads)?;
        } else if arch == "llama" && name.ends_with("k_proj.weight") {
            tensor = gguf::tensors::permute(&tensor, kv_heads)?;
        }
        tensors.push((
            gguf_name(&name)?,
            QTensor::quantize(&tensor, GgmlDType::F32)?,
        ));
    }
    if config["rope_scaling"]["rope_type"] == "llama3" {
        let s = &config["rope_scaling"];
        let number = |k: &str| s[k].as_f64().with_context(|| format!("rope_scaling.{k}"));
        let factors = gguf::tensors::llama3_rope_factors(
            head_dim,
            theta,
            number("factor")?,
            number("low_freq_factor")?,
            number("high_freq_factor")?,
            number("original_max_position_embeddings")?,
        );
        let factors = Tensor::from_vec(factors, head_dim / 2, &Device::Cpu)?;
        tensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&factors, GgmlDType::F32)?,
        ));
    }

    let metadata_refs: Vec<(&str, &Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(out)?;
    gguf_file::write(&mut file, &metadata_refs, &tensor_refs)?;
    Ok(())
}

fn hf_round_trip(fixture: &str, arch: &str) -> anyhow::Result<()> {
    let hf_dir = fixtures().join(fixture);
    let dir = tempfile::tempdir()?;
    let gguf_path = dir.path().join(format!("{fixture}.gguf"));
    gguf_from_hf(&hf_dir, arch, &gguf_path)?;
    let out = dir.path().join("imported");
    import_as(&gguf_path, &out, DType::F32)?;

    // Weights: identical, name for name.
    let theirs = load_weights(&hf_dir)?;
    let ours = load_weights(&out)?;
    let mut their_names: Vec<&String> = theirs.keys().collect();
    let mut our_names: Vec<&String> = ours.keys().collect();
    their_names.sort();
    our_names.sort();
    ensure!(
        their_names == our_names,
        "{fixture}: names differ:\nours   {our_names:?}\ntheirs {their_names:?}"
    );
    for name in their_names {
        ensure!(
            max_abs_diff(&ours[name], &theirs[name])? == 0.0,
            "{fixture}: {name} differs"
        );
    }

    // Config: everything the model code reads agrees.
    let a = oxtune_models::ModelConfig::load(&hf_dir)?;
    let b = oxtune_models::ModelConfig::load(&out)?;
    let fields = |c: &oxtune_models::ModelConfig| {
        format!(
            "{:?} {} {} {} {} {} {} {} {} {} {} {:?} {} {} {} {} {} {:?} {:?}",
            c.family,
            c.architecture,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.vocab_size,
            c.rms_norm_eps,
            c.rope_theta,
            c.rope_scaling,
            c.tie_word_embeddings,
            c.qkv_bias,
            c.o_bias,
            c.mlp_bias,
            c.qk_norm,
            c.sliding_window,
            c.eos_token_ids
        )
    };
    ensure!(
        fields(&a) == fields(&b),
        "{fixture}: configs differ:\nours   {}\ntheirs {}",
        fields(&b),
        fields(&a)
    );
    ensure!(a.max_position_embeddings == b.max_position_embeddings);

    // Tokenizer: same ids, same text back.
    let theirs = tokenizers::Tokenizer::from_file(hf_dir.join("tokenizer.json"))
        .map_err(anyhow::Error::msg)?;
    let ours =
        tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).map_err(anyhow::Error::msg)?;
    for text in [
        "Hello world, it's 2024!",
        "  spaces\tand\nnewlines  ",
        "你好 🦀",
        "<|im_start|>user\nhi<|im_end|>",
    ] {
        let a = theirs
            .encode(text, true)
            .map_err(anyhow::Error::msg)?
            .get_ids()
            .to_vec();
        let b = ours
            .encode(text, true)
            .map_err(anyhow::Error::msg)?
            .get_ids()
            .to_vec();
        ensure!(a == b, "{fixture} {text:?}: ours {b:?}, theirs {a:?}");
        ensure!(
            ours.decode(&b, false).map_err(anyhow::Error::msg)? == text,
            "{fixture}: decode {text:?}"
        );
    }
    let their_template: Json = read_json(&hf_dir.join("tokenizer_config.json"))?;
    let our_template: Json = read_json(&out.join("tokenizer_config.json"))?;
    ensure!(
        their_template["chat_template"] == our_template["chat_template"],
        "{fixture}: chat templates differ"
    );
    Ok(())
}

#[test]
fn hf_llama_round_trips_through_gguf_with_llama3_rope_and_permutation() -> anyhow::Result<()> {
    hf_round_trip("tiny-llama", "llama")
}

#[test]
fn hf_qwen2_round_trips_through_gguf_with_bias_and_tied_embeddings() -> anyhow::Result<()> {
    hf_round_trip("tiny-qwen2", "qwen2")
}

#[test]
fn hf_qwen3_round_trips_through_gguf_with_qk_norm_and_head_dim() -> anyhow::Result<()> {
    hf_round_trip("tiny-qwen3", "qwen3")
}

// ---------------------------------------------------------------------------------------------
// SmolLM2-135M-Instruct Q4_1 (needs scripts/fetch-demo-model.sh)
// ---------------------------------------------------------------------------------------------

#[test]
fn smollm2_tokenization_matches_reference() -> anyhow::Result<()> {
    let path = smollm2_gguf()?;
    let reference: SmolReference = read_json(&fixtures().join("gguf/smollm2_reference.json"))?;
    let size = std::fs::metadata(&path)?.len();
    ensure!(
        reference.gguf["bytes"].as_u64() == Some(size),
        "{} has {size} bytes, the references were made from a file of {}\nhint: delete it and run scripts/fetch-demo-model.sh again",
        path.display(),
        reference.gguf["bytes"]
    );
    let tokenizer = gguf::read_tokenizer(&path)?;
    ensure!(
        tokenizer.kind == gguf::VocabKind::ByteLevelBpe(gguf::PreTokenizer::SmolLm),
        "{:?}",
        tokenizer.kind
    );
    ensure!(!tokenizer.add_bos_token);
    check_tokenization(&tokenizer.tokenizer, &reference.tokenization, None)?;
    for case in &reference.tokenization {
        let text = tokenizer
            .tokenizer
            .decode(&case.ids, false)
            .map_err(anyhow::Error::msg)?;
        ensure!(text == case.text, "decode: {text:?} != {:?}", case.text);
    }
    let prompt = tokenizer
        .tokenizer
        .encode(reference.chat.rendered.as_str(), true)
        .map_err(anyhow::Error::msg)?;
    ensure!(
        prompt.get_ids() == reference.chat.input_ids,
        "chat prompt ids: {:?}",
        prompt.get_ids()
    );
    Ok(())
}

#[test]
fn smollm2_import_names_shapes_and_config() -> anyhow::Result<()> {
    let path = smollm2_gguf()?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("smollm2");
    let mut seen = 0;
    let options = ImportOptions::default();
    let summary = gguf::import_with(&path, &out, &options, &mut |done, total, _| {
        seen = done;
        assert_eq!(total, 272);
    })?;
    ensure!(seen == 272, "progress callback reached {seen}");
    ensure!(
        summary.tie_word_embeddings
            && summary.vocab_size == 49152
            && summary.num_parameters == 134_515_008,
        "{summary:?}"
    );

    let config: Json = read_json(&out.join("config.json"))?;
    let expected = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "vocab_size": 49152,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    });
    for (key, value) in expected.as_object().context("object")? {
        ensure!(
            config.get(key) == Some(value),
            "config.json {key}: {:?}, expected {value}",
            config.get(key)
        );
    }
    let tokenizer_config: Json = read_json(&out.join("tokenizer_config.json"))?;
    ensure!(
        tokenizer_config["eos_token"] == "<|im_end|>"
            && tokenizer_config["bos_token"] == "<|im_start|>"
    );
    ensure!(tokenizer_config["add_bos_token"] == false);
    ensure!(
        tokenizer_config["chat_template"]
            .as_str()
            .is_some_and(|t| t.contains("<|im_start|>"))
    );

    let weights = load_weights(&out)?;
    ensure!(
        weights.len() == 272 && !weights.contains_key("lm_head.weight"),
        "{} tensors",
        weights.len()
    );
    let shape = |name: &str| weights.get(name).map(|t| t.dims().to_vec());
    ensure!(shape("model.embed_tokens.weight") == Some(vec![49152, 576]));
    ensure!(shape("model.norm.weight") == Some(vec![576]));
    for layer in 0..30 {
        let p = format!("model.layers.{layer}");
        for (name, dims) in [
            ("self_attn.q_proj.weight", vec![576, 576]),
            ("self_attn.k_proj.weight", vec![192, 576]),
            ("self_attn.v_proj.weight", vec![192, 576]),
            ("self_attn.o_proj.weight", vec![576, 576]),
            ("mlp.gate_proj.weight", vec![1536, 576]),
            ("mlp.up_proj.weight", vec![1536, 576]),
            ("mlp.down_proj.weight", vec![576, 1536]),
            ("input_layernorm.weight", vec![576]),
            ("post_attention_layernorm.weight", vec![576]),
        ] {
            let full = format!("{p}.{name}");
            ensure!(
                shape(&full) == Some(dims.clone()),
                "{full}: {:?}, expected {dims:?}",
                shape(&full)
            );
            let dtype = weights[&full].dtype();
            let expected = if name.contains("norm") {
                DType::F32
            } else {
                DType::BF16
            };
            ensure!(dtype == expected, "{full}: {dtype:?}");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

fn import_error(gguf_path: &Path, out: &Path) -> anyhow::Result<String> {
    match import_as(gguf_path, out, DType::F32) {
        Ok(summary) => bail!("import succeeded: {summary:?}"),
        Err(error) => Ok(error.to_string()),
    }
}

/// A copy of the tiny GGUF with metadata edited and tensors added.
fn edited_tiny(
    out: &Path,
    metadata_edits: &[(&str, Value)],
    extra_tensors: &[(&str, Tensor)],
) -> anyhow::Result<()> {
    let mut reader = std::io::BufReader::new(std::fs::File::open(tiny_gguf())?);
    let content = gguf_file::Content::read(&mut reader)?;
    let mut metadata: Vec<(String, Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (key, value) in metadata_edits {
        metadata.retain(|(k, _)| k != key);
        metadata.push(((*key).to_owned(), value.clone()));
    }
    let mut tensors = Vec::new();
    for name in content.tensor_infos.keys() {
        tensors.push((
            name.clone(),
            content.tensor(&mut reader, name, &Device::Cpu)?,
        ));
    }
    for (name, tensor) in extra_tensors {
        tensors.push((
            (*name).to_owned(),
            QTensor::quantize(tensor, GgmlDType::F32)?,
        ));
    }
    let metadata_refs: Vec<(&str, &Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(
        &mut std::fs::File::create(out)?,
        &metadata_refs,
        &tensor_refs,
    )?;
    Ok(())
}

#[test]
fn missing_file_is_named() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let message = import_error(&dir.path().join("nope.gguf"), &dir.path().join("out"))?;
    ensure!(
        message.contains("nope.gguf: no such file") && message.contains("hint:"),
        "{message}"
    );
    ensure!(!dir.path().join("out").exists());
    Ok(())
}

#[test]
fn corrupt_and_truncated_files_are_refused_before_writing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bytes = std::fs::read(tiny_gguf())?;
    let out = dir.path().join("out");

    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a gguf file at all, just some text")?;
    let message = import_error(&garbage, &out)?;
    ensure!(
        message.contains("garbage.gguf is not a readable GGUF file") && message.contains("hint:"),
        "{message}"
    );

    let header_cut = dir.path().join("header-cut.gguf");
    std::fs::write(&header_cut, &bytes[..200])?;
    let message = import_error(&header_cut, &out)?;
    ensure!(
        message.contains("header-cut.gguf is not a readable GGUF file"),
        "{message}"
    );

    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() * 3 / 4])?;
    let message = import_error(&truncated, &out)?;
    ensure!(
        message.contains("truncated.gguf: tensor `") && message.contains("the file is truncated"),
        "{message}"
    );

    // Nothing was left behind: neither the output nor the staging directory.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("out"))
        .collect();
    ensure!(leftovers.is_empty(), "{leftovers:?}");
    Ok(())
}

#[test]
fn unsupported_architecture_names_it_and_the_supported_ones() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("mamba.gguf");
    edited_tiny(
        &path,
        &[("general.architecture", Value::String("mamba".into()))],
        &[],
    )?;
    let message = import_error(&path, &dir.path().join("out"))?;
    ensure!(
        message.contains("architecture `mamba` (general.architecture) is not supported"),
        "{message}"
    );
    ensure!(
        message.contains("llama") && message.contains("qwen2") && message.contains("qwen3"),
        "{message}"
    );
    Ok(())
}

#[test]
fn unknown_tensors_and_tokenizers_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let moe = dir.path().join("moe.gguf");
    let experts = Tensor::zeros((4, 64), DType::F32, &Device::Cpu)?;
    edited_tiny(&moe, &[], &[("blk.0.ffn_gate_exps.weight", experts)])?;
    let message = import_error(&moe, &dir.path().join("out"))?;
    ensure!(
        message.contains("tensor `blk.0.ffn_gate_exps.weight`")
            && message.contains("mixture-of-experts"),
        "{message}"
    );

    let bert = dir.path().join("bert.gguf");
    edited_tiny(
        &bert,
        &[("tokenizer.ggml.model", Value::String("bert".into()))],
        &[],
    )?;
    let message = import_error(&bert, &dir.path().join("out"))?;
    ensure!(
        message.contains("tokenizer model `bert`")
            && message.contains("gpt2")
            && message.contains("llama"),
        "{message}"
    );

    let pre = dir.path().join("pre.gguf");
    edited_tiny(
        &pre,
        &[
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("made-up".into())),
            ("tokenizer.ggml.merges", Value::Array(vec![])),
        ],
        &[],
    )?;
    let message = import_error(&pre, &dir.path().join("out"))?;
    ensure!(
        message.contains("pre-tokenizer `made-up`") && message.contains("smollm"),
        "{message}"
    );

    let no_heads = dir.path().join("no-heads.gguf");
    edited_tiny(
        &no_heads,
        &[("llama.attention.head_count_kv", Value::U32(3))],
        &[],
    )?;
    let message = import_error(&no_heads, &dir.path().join("out"))?;
    ensure!(
        message.contains("metadata key `llama.attention.head_count_kv`"),
        "{message}"
    );
    Ok(())
}

#[test]
fn existing_output_is_refused_unless_overwriting() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out");
    std::fs::create_dir(&out)?;
    std::fs::write(out.join("keep.txt"), "precious")?;
    let message = import_error(&tiny_gguf(), &out)?;
    ensure!(
        message.contains("already exists and is not empty") && message.contains("--overwrite"),
        "{message}"
    );
    ensure!(out.join("keep.txt").is_file());

    let options = ImportOptions {
        overwrite: true,
        dtype: DType::F32,
        ..ImportOptions::default()
    };
    gguf::import_with(&tiny_gguf(), &out, &options, &mut |_, _, _| {})?;
    ensure!(!out.join("keep.txt").exists() && out.join("model.safetensors").is_file());
    // An empty directory is fine without overwrite.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty)?;
    import_as(&tiny_gguf(), &empty, DType::F32)?;
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    ensure!(
        leftovers.len() == 2,
        "staging directories left behind: {leftovers:?}"
    );
    Ok(())
}

#[test]
fn large_checkpoints_are_sharded_with_an_index() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out");
    let options = ImportOptions {
        dtype: DType::F32,
        max_shard_bytes: 100_000,
        ..ImportOptions::default()
    };
    let summary = gguf::import_with(&tiny_gguf(), &out, &options, &mut |_, _, _| {})?;
    ensure!(
        summary.files.contains(&gguf::INDEX_FILE.to_owned()),
        "{:?}",
        summary.files
    );
    ensure!(
        summary
            .files
            .iter()
            .filter(|f| f.starts_with("model-0"))
            .count()
            >= 3,
        "{:?}",
        summary.files
    );
    let single = dir.path().join("single");
    import_as(&tiny_gguf(), &single, DType::F32)?;
    let (sharded, whole) = (load_weights(&out)?, load_weights(&single)?);
    ensure!(sharded.len() == whole.len());
    for (name, tensor) in &whole {
        ensure!(max_abs_diff(tensor, &sharded[name])? == 0.0, "{name}");
    }
    Ok(())
}
