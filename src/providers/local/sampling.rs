//! Picking the next token from the logits: greedy, or with a temperature — over every token, or
//! over the 40 most likely then the smallest set of those holding `top_p` of the probability
//! (nucleus sampling). Our own rather than candle-transformers' `LogitsProcessor`: it is the only
//! thing Mangoo used from that crate, whose build took three minutes of a cold build's CPU.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Top-p needs the candidates sorted; sorting all 49k logits every token costs more than the
/// rest of sampling, so nucleus sampling runs within the 40 most likely tokens (the usual top-k).
pub const TOP_K: usize = 40;

pub struct Sampler {
    rng: StdRng,
    mode: Mode,
    /// Candidates of the top-k step, reused for every token.
    scratch: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Greedy,
    All { temperature: f64 },
    TopKThenTopP { p: f64, temperature: f64 },
}

impl Sampler {
    /// `temperature` absent or 0: greedy. `top_p` in (0, 1): nucleus sampling within the top k.
    pub fn new(seed: u64, temperature: Option<f64>, top_p: Option<f64>) -> Self {
        let mode = match (temperature, top_p) {
            (Some(t), Some(p)) if t > 0.0 && p > 0.0 && p < 1.0 => {
                Mode::TopKThenTopP { p, temperature: t }
            }
            (Some(t), _) if t > 0.0 => Mode::All { temperature: t },
            _ => Mode::Greedy,
        };
        Self {
            rng: StdRng::seed_from_u64(seed),
            mode,
            scratch: Vec::with_capacity(TOP_K),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        match self.mode {
            Mode::Greedy => argmax(logits),
            Mode::All { temperature } => {
                let candidates: Vec<(u32, f32)> = logits
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (i as u32, *l))
                    .collect();
                self.pick(&candidates, temperature, 1.0)
            }
            Mode::TopKThenTopP { p, temperature } => {
                let mut top = std::mem::take(&mut self.scratch);
                top_k(logits, TOP_K, &mut top);
                let token = self.pick(&top, temperature, p);
                self.scratch = top;
                token
            }
        }
    }

    /// Softmax of `candidates` (sorted most likely first when `p < 1`) at `temperature`, cut to
    /// the smallest prefix holding `p` of the probability, then one draw.
    fn pick(&mut self, candidates: &[(u32, f32)], temperature: f64, p: f64) -> u32 {
        let max = candidates
            .iter()
            .map(|(_, l)| *l)
            .fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = candidates
            .iter()
            .map(|(_, l)| (f64::from(*l - max) / temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut kept = 0;
        let mut mass = 0.0;
        for weight in &weights {
            kept += 1;
            mass += weight / total;
            if mass >= p {
                break;
            }
        }
        let kept_total: f64 = weights[..kept].iter().sum();
        let mut draw = self.rng.random::<f64>() * kept_total;
        for (index, weight) in weights[..kept].iter().enumerate() {
            draw -= weight;
            if draw <= 0.0 {
                return candidates[index].0;
            }
        }
        candidates[kept - 1].0
    }
}

/// The index of the largest logit (the first, on a tie).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (index, logit) in logits.iter().enumerate() {
        if *logit > logits[best] {
            best = index;
        }
    }
    best as u32
}

/// The `k` largest logits with their tokens, most likely first.
fn top_k(logits: &[f32], k: usize, out: &mut Vec<(u32, f32)>) {
    out.clear();
    out.extend(logits.iter().enumerate().map(|(i, l)| (i as u32, *l)));
    let k = k.min(out.len());
    if k < out.len() {
        out.select_nth_unstable_by(k, |a, b| b.1.total_cmp(&a.1));
        out.truncate(k);
    }
    out.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut sampler = Sampler::new(1, None, None);
        assert_eq!(sampler.sample(&[0.1, 3.0, -2.0, 2.9]), 1);
        let mut zero = Sampler::new(1, Some(0.0), Some(0.9));
        assert_eq!(
            zero.sample(&[0.1, 3.0, -2.0, 2.9]),
            1,
            "temperature 0 is greedy"
        );
    }

    #[test]
    fn nucleus_sampling_never_picks_outside_the_nucleus() {
        // Token 2 holds almost all the probability; with p = 0.5 it is the whole nucleus.
        let logits = [0.0, 1.0, 12.0, 0.5];
        let mut sampler = Sampler::new(7, Some(1.0), Some(0.5));
        for _ in 0..200 {
            assert_eq!(sampler.sample(&logits), 2);
        }
    }

    #[test]
    fn temperature_sampling_follows_the_probabilities() {
        // Two equal logits: each drawn about half of the time, the rest never.
        let logits = [5.0, 5.0, -30.0];
        let mut sampler = Sampler::new(42, Some(1.0), None);
        let mut counts = [0; 3];
        for _ in 0..2000 {
            counts[sampler.sample(&logits) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        assert!(counts[0] > 800 && counts[1] > 800, "{counts:?}");
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        let draws = |seed| {
            let mut sampler = Sampler::new(seed, Some(0.8), Some(0.9));
            (0..20).map(|_| sampler.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draws(3), draws(3));
    }

    #[test]
    fn top_k_keeps_the_largest_in_order() {
        let mut out = Vec::new();
        top_k(&[0.5, 9.0, 3.0, 7.0, -1.0], 3, &mut out);
        let tokens: Vec<u32> = out.iter().map(|(t, _)| *t).collect();
        assert_eq!(tokens, [1, 3, 2]);
    }
}
