//! Choosing the next token from logits.
//!
//! Processing order follows transformers' `generate`: repetition penalty, then temperature,
//! top-k, top-p and min-p, then a draw. Temperature 0 is greedy (argmax, after the
//! repetition penalty). The random draw uses a seeded `StdRng`, so a seed reproduces a text.

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{Error, Result};

/// Sampling knobs, named as in `swift infer` and the OpenAI API.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f64,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one (0 = off).
    pub min_p: f64,
    /// Divide positive (multiply negative) logits of tokens already seen, prompt included
    /// (1 = off; transformers' rule).
    pub repetition_penalty: f64,
    /// Subtracted once from the logit of every token already generated (OpenAI; 0 = off).
    pub presence_penalty: f64,
    /// Subtracted from a token's logit per time it was generated (OpenAI; 0 = off).
    pub frequency_penalty: f64,
    /// Added to the logits of these tokens before anything else (OpenAI `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// Seed of the draw; `None` draws a fresh seed from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Checks every knob's range, naming the one at fault.
    pub fn validate(&self) -> Result<()> {
        let check = |ok: bool, name: &'static str, value: f64, expected: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(Error::InvalidParameter {
                    name,
                    value: value.to_string(),
                    expected,
                })
            }
        };
        check(
            self.temperature >= 0.0 && self.temperature.is_finite(),
            "temperature",
            self.temperature,
            "a number >= 0 (0 = greedy)",
        )?;
        check(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "top_p",
            self.top_p,
            "a number in (0, 1]",
        )?;
        check(
            (0.0..=1.0).contains(&self.min_p),
            "min_p",
            self.min_p,
            "a number in [0, 1]",
        )?;
        check(
            self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite(),
            "repetition_penalty",
            self.repetition_penalty,
            "a number > 0 (1 = off)",
        )?;
        check(
            (-2.0..=2.0).contains(&self.presence_penalty),
            "presence_penalty",
            self.presence_penalty,
            "a number in [-2, 2]",
        )?;
        check(
            (-2.0..=2.0).contains(&self.frequency_penalty),
            "frequency_penalty",
            self.frequency_penalty,
            "a number in [-2, 2]",
        )?;
        for &(_, bias) in &self.logit_bias {
            check(
                (-100.0..=100.0).contains(&bias),
                "logit_bias",
                f64::from(bias),
                "biases in [-100, 100]",
            )?;
        }
        Ok(())
    }
}

/// Draws tokens with one [`SamplingParams`] and its own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler; fails on out-of-range settings.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Self { params, rng })
    }

    /// The next token for `logits` (one row, vocab-sized), given the tokens so far: the first
    /// `prompt_len` of `tokens` are the prompt, the rest were generated.
    pub fn sample(&mut self, logits: &mut [f32], tokens: &[u32], prompt_len: usize) -> u32 {
        let p = &self.params;
        for &(token, bias) in &p.logit_bias {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit += bias;
            }
        }
        if (p.repetition_penalty - 1.0).abs() > f64::EPSILON {
            apply_repetition_penalty(logits, tokens, p.repetition_penalty);
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            apply_openai_penalties(
                logits,
                tokens.get(prompt_len..).unwrap_or_default(),
                p.presence_penalty,
                p.frequency_penalty,
            );
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        #[expect(
            clippy::cast_possible_truncation,
            reason = "temperature is a small positive number"
        )]
        let temperature = p.temperature as f32;
        // Candidates sorted by logit, best first.
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (index_to_token(i), l / temperature))
            .collect();
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 && p.top_k < candidates.len() {
            candidates.truncate(p.top_k);
        }
        let max = candidates.first().map_or(0.0, |c| c.1);
        let mut probs: Vec<f64> = candidates
            .iter()
            .map(|c| f64::from(c.1 - max).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            // Keep the smallest prefix reaching top_p (always at least one token).
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|q| {
                    cumulative += q;
                    cumulative >= p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let threshold = probs.first().copied().unwrap_or(0.0) * p.min_p;
            let keep = probs.iter().take_while(|q| **q >= threshold).count().max(1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut draw = self.rng.random::<f64>() * total;
        for (i, q) in probs.iter().enumerate() {
            draw -= q;
            if draw <= 0.0 {
                return candidates[i].0;
            }
        }
        candidates[probs.len() - 1].0
    }
}

fn index_to_token(index: usize) -> u32 {
    u32::try_from(index).expect("vocabularies are far smaller than 2^32")
}

fn argmax(logits: &[f32]) -> u32 {
    let best = logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
            if l > best.1 { (i, l) } else { best }
        });
    index_to_token(best.0)
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each seen token once.
fn apply_repetition_penalty(logits: &mut [f32], previous: &[u32], penalty: f64) {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "penalties are small numbers"
    )]
    let penalty = penalty as f32;
    let mut seen = std::collections::HashSet::new();
    for &token in previous {
        if !seen.insert(token) {
            continue;
        }
        if let Some(logit) = logits.get_mut(token as usize) {
            *logit = if *logit > 0.0 {
                *logit / penalty
            } else {
                *logit * penalty
            };
        }
    }
}

/// OpenAI's presence and frequency penalties over the generated tokens.
fn apply_openai_penalties(logits: &mut [f32], generated: &[u32], presence: f64, frequency: f64) {
    let mut counts = std::collections::HashMap::<u32, u32>::new();
    for &token in generated {
        *counts.entry(token).or_default() += 1;
    }
    for (token, count) in counts {
        if let Some(logit) = logits.get_mut(token as usize) {
            #[expect(
                clippy::cast_possible_truncation,
                reason = "penalties are small numbers"
            )]
            let penalty = (presence + frequency * f64::from(count)) as f32;
            *logit -= penalty;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Result<Sampler> {
        Sampler::new(params)
    }

    #[test]
    fn greedy_picks_the_argmax() -> Result<()> {
        let mut s = sampler(SamplingParams::default())?;
        assert_eq!(s.sample(&mut [0.1, 2.0, -1.0], &[], 0), 1);
        Ok(())
    }

    #[test]
    fn repetition_penalty_matches_transformers() -> Result<()> {
        let mut logits = [2.0, -1.0, 3.0];
        apply_repetition_penalty(&mut logits, &[0, 1, 0], 2.0);
        assert_eq!(logits, [1.0, -2.0, 3.0]);
        let mut s = sampler(SamplingParams {
            repetition_penalty: 4.0,
            ..SamplingParams::default()
        })?;
        assert_eq!(s.sample(&mut [3.0, 1.0], &[0], 1), 1);
        Ok(())
    }

    #[test]
    fn same_seed_same_draws() -> Result<()> {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..SamplingParams::default()
        };
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |params: SamplingParams| -> Result<Vec<u32>> {
            let mut s = sampler(params)?;
            Ok((0..20)
                .map(|_| s.sample(&mut logits.clone(), &[], 0))
                .collect())
        };
        assert_eq!(draw(params.clone())?, draw(params.clone())?);
        assert_ne!(
            draw(params.clone())?,
            draw(SamplingParams {
                seed: Some(8),
                ..params
            })?
        );
        Ok(())
    }

    #[test]
    fn top_k_top_p_and_min_p_restrict_the_candidates() -> Result<()> {
        let logits = [5.0, 4.9, 0.0, -1.0];
        for params in [
            SamplingParams {
                temperature: 1.0,
                top_k: 2,
                seed: Some(1),
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 0.9,
                seed: Some(1),
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: 1.0,
                min_p: 0.5,
                seed: Some(1),
                ..SamplingParams::default()
            },
        ] {
            let mut s = sampler(params.clone())?;
            for _ in 0..200 {
                let token = s.sample(&mut logits.clone(), &[], 0);
                assert!(token < 2, "{params:?} drew {token}");
            }
        }
        let mut s = sampler(SamplingParams {
            temperature: 1.0,
            top_p: 0.01,
            seed: Some(3),
            ..SamplingParams::default()
        })?;
        assert_eq!(
            s.sample(&mut logits.clone(), &[], 0),
            0,
            "top_p keeps at least the best token"
        );
        Ok(())
    }

    #[test]
    fn presence_frequency_and_bias_follow_openai() -> Result<()> {
        let mut logits = [1.0, 1.0, 1.0];
        // Prompt token 2 is not penalised; token 0 generated twice, token 1 once.
        apply_openai_penalties(&mut logits, &[0, 1, 0], 0.5, 0.25);
        assert_eq!(logits, [0.0, 0.25, 1.0]);
        let mut s = sampler(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            logit_bias: vec![(1, -5.0)],
            ..SamplingParams::default()
        })?;
        assert_eq!(s.sample(&mut [1.0, 1.1, 0.9], &[2, 0, 0], 1), 2);
        Ok(())
    }

    #[test]
    fn out_of_range_settings_are_named() {
        let message = Sampler::new(SamplingParams {
            top_p: 1.5,
            ..SamplingParams::default()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(message.contains("`top_p` = 1.5"), "{message}");
    }
}
