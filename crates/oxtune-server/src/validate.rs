//! From a request body to engine requests: every field checked against its range and the
//! server's caps, naming the parameter at fault. What only the engine knows (vocabulary size,
//! context length, adapter names, grammar) it checks itself in `submit`, and its errors keep
//! their parameter names (see `ApiError::from`).

use oxtune_engine::grammar::ResponseFormat;
use oxtune_engine::{Request, SamplingParams};

use crate::ServerConfig;
use crate::error::ApiError;
use crate::protocol::{CommonParams, ResponseFormatIn};

/// Which model a request's `model` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Base,
    Adapter(String),
}

/// Resolves `model`: absent or the served name -> the base; an adapter's name -> that adapter;
/// anything else -> 404 with `param: "model"`.
pub fn resolve_model(
    model: Option<&str>,
    served_model_name: &str,
    adapters: &[String],
) -> Result<Target, ApiError> {
    match model {
        None => Ok(Target::Base),
        Some(name) if name == served_model_name => Ok(Target::Base),
        Some(name) if adapters.iter().any(|adapter| adapter == name) => {
            Ok(Target::Adapter(name.to_owned()))
        }
        Some(name) => Err(ApiError::ModelNotFound {
            name: crate::error::bounded(name),
        }),
    }
}

/// Everything but the prompt, checked; `template` is copied once per prompt and choice.
#[derive(Debug, Clone)]
pub struct Plan {
    pub template: Request,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
}

impl Plan {
    /// The engine requests for `prompts`: choice `p * n + i` is prompt `p` with seed `seed + i`.
    pub fn requests(&self, id: &str, prompts: Vec<Vec<u32>>) -> Vec<Request> {
        let mut requests = Vec::with_capacity(prompts.len() * self.n);
        for (p, prompt) in prompts.into_iter().enumerate() {
            for i in 0..self.n {
                let mut request = self.template.clone();
                request.id = format!("{id}-{}", p * self.n + i);
                request.prompt_token_ids.clone_from(&prompt);
                request.sampling.seed = self
                    .template
                    .sampling
                    .seed
                    .map(|seed| seed.wrapping_add(i as u64));
                requests.push(request);
            }
        }
        requests
    }
}

/// Checks the shared fields. `max_tokens` is the endpoint's choice between `max_tokens` and
/// `max_completion_tokens`; `logprobs` the number of alternatives asked for, if any.
pub fn plan(
    common: CommonParams,
    max_tokens: Option<u64>,
    logprobs: Option<usize>,
    target: Target,
    config: &ServerConfig,
) -> Result<Plan, ApiError> {
    let n = match common.n {
        None => 1,
        Some(n) if n == 0 || n > config.max_n as u64 => {
            return Err(ApiError::invalid(
                "n",
                format!("n must be in 1..={} (--max_n), not {n}", config.max_n),
            ));
        }
        Some(n) => usize::try_from(n).unwrap_or(1),
    };
    if let Some(best_of) = common.best_of
        && best_of != n as u64
    {
        return Err(ApiError::invalid(
            "best_of",
            "best_of is not supported; leave it out (or equal to n) and use n",
        ));
    }
    let max_tokens = match max_tokens {
        None => None,
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        Some(value) => Some(usize::try_from(value).unwrap_or(usize::MAX)),
    };
    let defaults = &config.default_sampling;
    let top_k = match common.top_k {
        None => defaults.top_k,
        Some(value) if value < 0 => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be >= 0 (0 = off), not {value}"),
            ));
        }
        Some(value) => usize::try_from(value).unwrap_or(usize::MAX),
    };
    let stop = common.stop.map(|stop| stop.into_vec()).unwrap_or_default();
    if stop.len() > config.max_stop_sequences {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "at most {} stop sequences are allowed (--max_stop_sequences), not {}",
                config.max_stop_sequences,
                stop.len()
            ),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "stop sequences must not be empty",
        ));
    }
    let stop_token_ids = common.stop_token_ids.unwrap_or_default();
    if stop_token_ids.len() > config.max_stop_sequences {
        return Err(ApiError::invalid(
            "stop_token_ids",
            format!(
                "at most {} stop token ids are allowed (--max_stop_sequences)",
                config.max_stop_sequences
            ),
        ));
    }
    let logit_bias = logit_bias(common.logit_bias, config.max_logit_bias)?;
    let response_format = match common.response_format {
        None | Some(ResponseFormatIn::Text) => None,
        Some(ResponseFormatIn::JsonObject) => Some(ResponseFormat::JsonObject),
        Some(ResponseFormatIn::JsonSchema { json_schema }) => match json_schema.schema {
            Some(schema) => Some(ResponseFormat::JsonSchema(schema)),
            None => {
                return Err(ApiError::invalid(
                    "response_format",
                    "response_format.json_schema.schema is missing: give the JSON Schema the output must match",
                ));
            }
        },
    };
    let stream = common.stream.unwrap_or(false);
    if common.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "stream_options is only allowed with stream: true",
        ));
    }
    let include_usage = common
        .stream_options
        .and_then(|options| options.include_usage)
        .unwrap_or(false);
    let finite = |name: &'static str, value: Option<f64>, default: f64| match value {
        Some(v) if !v.is_finite() => Err(ApiError::invalid(
            name,
            format!("{name} must be a finite number"),
        )),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let sampling = SamplingParams {
        temperature: finite("temperature", common.temperature, defaults.temperature)?,
        top_p: finite("top_p", common.top_p, defaults.top_p)?,
        top_k,
        min_p: finite("min_p", common.min_p, defaults.min_p)?,
        repetition_penalty: finite(
            "repetition_penalty",
            common.repetition_penalty,
            defaults.repetition_penalty,
        )?,
        presence_penalty: finite("presence_penalty", common.presence_penalty, 0.0)?,
        frequency_penalty: finite("frequency_penalty", common.frequency_penalty, 0.0)?,
        logit_bias,
        #[expect(
            clippy::cast_sign_loss,
            reason = "OpenAI seeds are int64; the bits seed the RNG"
        )]
        seed: common.seed.map(|seed| seed as u64),
    };
    sampling.validate().map_err(ApiError::from)?;
    let template = Request {
        id: String::new(),
        prompt_token_ids: Vec::new(),
        sampling,
        max_tokens,
        stop,
        stop_token_ids,
        ignore_eos: common.ignore_eos.unwrap_or(false),
        logprobs,
        adapter: match target {
            Target::Base => None,
            Target::Adapter(name) => Some(name),
        },
        response_format,
    };
    Ok(Plan {
        template,
        n,
        stream,
        include_usage,
    })
}

/// `logit_bias` keys are token ids written as strings; biases in [-100, 100].
fn logit_bias(
    bias: Option<std::collections::BTreeMap<String, f64>>,
    cap: usize,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(bias) = bias else {
        return Ok(Vec::new());
    };
    if bias.len() > cap {
        return Err(ApiError::invalid(
            "logit_bias",
            format!(
                "at most {cap} logit_bias entries are allowed, not {}",
                bias.len()
            ),
        ));
    }
    bias.into_iter()
        .map(|(key, value)| {
            let token = key.trim().parse::<u32>().map_err(|_| {
                ApiError::invalid(
                    "logit_bias",
                    format!(
                        "logit_bias keys are token ids; `{}` is not one",
                        crate::error::bounded(&key)
                    ),
                )
            })?;
            if !(-100.0..=100.0).contains(&value) {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("logit_bias values must be in [-100, 100], not {value}"),
                ));
            }
            #[expect(clippy::cast_possible_truncation, reason = "checked range")]
            Ok((token, value as f32))
        })
        .collect()
}

/// The number of alternatives for chat's `logprobs` / `top_logprobs`.
pub fn chat_logprobs(
    logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    cap: usize,
) -> Result<Option<usize>, ApiError> {
    match (logprobs.unwrap_or(false), top_logprobs) {
        (false, Some(_)) => Err(ApiError::invalid(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        )),
        (false, None) => Ok(None),
        (true, top) => {
            let top = top.unwrap_or(0);
            if top > cap as u64 {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("top_logprobs must be in 0..={cap}, not {top}"),
                ));
            }
            Ok(Some(usize::try_from(top).unwrap_or(cap)))
        }
    }
}

/// The number of alternatives for completions' `logprobs`.
pub fn completion_logprobs(logprobs: Option<u64>, cap: usize) -> Result<Option<usize>, ApiError> {
    match logprobs {
        None => Ok(None),
        Some(k) if k > cap as u64 => Err(ApiError::invalid(
            "logprobs",
            format!("logprobs must be in 0..={cap}, not {k}"),
        )),
        Some(k) => Ok(Some(usize::try_from(k).unwrap_or(cap))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::StringOrList;

    fn param_of(result: Result<Plan, ApiError>) -> Option<String> {
        result.err().and_then(|error| error.param())
    }

    #[test]
    fn out_of_range_fields_are_named() {
        let config = ServerConfig::default();
        let cases: Vec<(&str, CommonParams)> = vec![
            (
                "temperature",
                CommonParams {
                    temperature: Some(-1.0),
                    ..Default::default()
                },
            ),
            (
                "top_p",
                CommonParams {
                    top_p: Some(0.0),
                    ..Default::default()
                },
            ),
            (
                "top_p",
                CommonParams {
                    top_p: Some(1.5),
                    ..Default::default()
                },
            ),
            (
                "top_k",
                CommonParams {
                    top_k: Some(-2),
                    ..Default::default()
                },
            ),
            (
                "n",
                CommonParams {
                    n: Some(0),
                    ..Default::default()
                },
            ),
            (
                "n",
                CommonParams {
                    n: Some(1000),
                    ..Default::default()
                },
            ),
            (
                "best_of",
                CommonParams {
                    best_of: Some(3),
                    ..Default::default()
                },
            ),
            (
                "stop",
                CommonParams {
                    stop: Some(StringOrList::Many(vec!["x".into(); 100])),
                    ..Default::default()
                },
            ),
            (
                "stop",
                CommonParams {
                    stop: Some(StringOrList::One(String::new())),
                    ..Default::default()
                },
            ),
            (
                "presence_penalty",
                CommonParams {
                    presence_penalty: Some(3.0),
                    ..Default::default()
                },
            ),
            (
                "frequency_penalty",
                CommonParams {
                    frequency_penalty: Some(-3.0),
                    ..Default::default()
                },
            ),
            (
                "repetition_penalty",
                CommonParams {
                    repetition_penalty: Some(0.0),
                    ..Default::default()
                },
            ),
            (
                "min_p",
                CommonParams {
                    min_p: Some(2.0),
                    ..Default::default()
                },
            ),
            (
                "logit_bias",
                CommonParams {
                    logit_bias: Some([("abc".to_owned(), 1.0)].into_iter().collect()),
                    ..Default::default()
                },
            ),
            (
                "logit_bias",
                CommonParams {
                    logit_bias: Some([("5".to_owned(), 500.0)].into_iter().collect()),
                    ..Default::default()
                },
            ),
            (
                "stream_options",
                CommonParams {
                    stream_options: Some(Default::default()),
                    ..Default::default()
                },
            ),
        ];
        for (param, common) in cases {
            let got = param_of(plan(common, None, None, Target::Base, &config));
            assert_eq!(got.as_deref(), Some(param));
        }
        assert_eq!(
            param_of(plan(
                CommonParams::default(),
                Some(0),
                None,
                Target::Base,
                &config
            ))
            .as_deref(),
            Some("max_tokens")
        );
    }

    #[test]
    fn n_choices_get_consecutive_seeds() -> Result<(), ApiError> {
        let config = ServerConfig::default();
        let common = CommonParams {
            n: Some(3),
            seed: Some(7),
            ..Default::default()
        };
        let plan = plan(common, Some(4), None, Target::Base, &config)?;
        let requests = plan.requests("x", vec![vec![1, 2], vec![3]]);
        let seeds: Vec<_> = requests.iter().map(|r| r.sampling.seed).collect();
        assert_eq!(
            seeds,
            [Some(7), Some(8), Some(9), Some(7), Some(8), Some(9)]
        );
        assert_eq!(requests[4].prompt_token_ids, [3]);
        assert_eq!(requests[0].max_tokens, Some(4));
        Ok(())
    }

    #[test]
    fn models_resolve_to_base_adapters_or_404() {
        let adapters = vec!["lora-a".to_owned()];
        assert_eq!(resolve_model(None, "base", &adapters), Ok(Target::Base));
        assert_eq!(
            resolve_model(Some("base"), "base", &adapters),
            Ok(Target::Base)
        );
        assert_eq!(
            resolve_model(Some("lora-a"), "base", &adapters),
            Ok(Target::Adapter("lora-a".into()))
        );
        let error = resolve_model(Some("nope"), "base", &adapters).err();
        assert_eq!(error.map(|e| e.status().as_u16()), Some(404));
    }

    #[test]
    fn logprob_caps() {
        assert_eq!(chat_logprobs(None, None, 20), Ok(None));
        assert_eq!(chat_logprobs(Some(true), None, 20), Ok(Some(0)));
        assert_eq!(chat_logprobs(Some(true), Some(5), 20), Ok(Some(5)));
        assert!(chat_logprobs(Some(true), Some(21), 20).is_err());
        assert!(chat_logprobs(None, Some(2), 20).is_err());
        assert!(completion_logprobs(Some(21), 20).is_err());
    }
}
