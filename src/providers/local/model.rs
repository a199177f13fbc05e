//! SmolLM2-135M-Instruct on the CPU: loading the GGUF and the decoding loop. Synchronous on
//! purpose: it runs on dedicated threads, never on the async runtime.

use std::collections::VecDeque;
use std::path::Path;

pub use super::error::ModelError;
use super::gguf::GgufFile;
use super::llama::{Session, Weights};
use super::sampling::Sampler;
pub use super::tokenizer::ChatTokenizer;

/// The 135M model loops without a repeat penalty.
const REPEAT_PENALTY: f32 = 1.1;
const REPEAT_WINDOW: usize = 64;

/// Weights plus tokenizer, shared read-only by every worker thread.
pub struct LocalModel {
    pub weights: Weights,
    pub tokenizer: ChatTokenizer,
}

impl LocalModel {
    /// Loads the GGUF, re-quantising every matrix to Q8_0 (see [`super::quant`]).
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let open_error = |source| ModelError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(open_error)?;
        let mut reader = std::io::BufReader::new(file);
        let gguf = GgufFile::read(&mut reader)?;
        let tokenizer = ChatTokenizer::from_gguf(&gguf)?;
        let weights = Weights::from_gguf(&gguf, &mut reader)?;
        if super::llama::vocab_size(&weights) < tokenizer.vocab_size() {
            return Err(ModelError::Format(
                "the vocabulary is larger than the embeddings".into(),
            ));
        }
        Ok(Self { weights, tokenizer })
    }
}

/// Turns token bytes into text without ever splitting a UTF-8 character: bytes of an
/// incomplete character wait for the next token.
#[derive(Default)]
pub struct Utf8Assembler {
    pending: Vec<u8>,
}

impl Utf8Assembler {
    pub fn push(&mut self, bytes: &[u8]) -> Option<String> {
        self.pending.extend_from_slice(bytes);
        let complete = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // Bytes that can never become valid are passed on (as U+FFFD) rather than held.
            Err(e) if e.error_len().is_some() => self.pending.len(),
            Err(e) => e.valid_up_to(),
        };
        if complete == 0 {
            return None;
        }
        let rest = self.pending.split_off(complete);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        Some(text)
    }

    /// Whatever is left when generation stops, replacement characters included.
    pub fn finish(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return None;
        }
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Some(text)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SamplingParams {
    pub max_tokens: u32,
    /// `None` or 0: greedy (deterministic).
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    EndOfTurn,
    MaxTokens,
    ContextFull,
    Cancelled,
}

#[derive(Debug, Clone, Copy)]
pub struct Generated {
    pub prompt_tokens: usize,
    /// Prompt tokens computed, not found in the session's cache (fewer when cancelled early).
    pub prompt_computed: usize,
    pub output_tokens: usize,
    pub stop: StopReason,
}

/// Decodes one answer. `emit` receives text as soon as it forms whole characters and returns
/// false to stop; `cancelled` is checked before every prompt chunk and every token, so a stop
/// costs at most one of either.
pub fn generate(
    weights: &Weights,
    session: &mut Session,
    tokenizer: &ChatTokenizer,
    prompt: &[u32],
    sampling: SamplingParams,
    cancelled: impl Fn() -> bool,
    mut emit: impl FnMut(String) -> bool,
) -> Result<Generated, ModelError> {
    if prompt.len() >= weights.context {
        return Err(ModelError::ContextFull(weights.context));
    }
    let mut sampler = Sampler::new(sampling.seed, sampling.temperature, sampling.top_p);
    let mut recent: VecDeque<u32> = VecDeque::with_capacity(REPEAT_WINDOW);
    let mut text = Utf8Assembler::default();
    let mut output_tokens = 0;
    let prefilled = session.prefill_until(weights, prompt, &cancelled)?;
    if !prefilled.complete {
        return Ok(Generated {
            prompt_tokens: prompt.len(),
            prompt_computed: prefilled.computed,
            output_tokens: 0,
            stop: StopReason::Cancelled,
        });
    }
    let stop = loop {
        if cancelled() {
            break StopReason::Cancelled;
        }
        if output_tokens >= sampling.max_tokens as usize {
            break StopReason::MaxTokens;
        }
        penalise_repeats(&mut session.logits, &recent);
        let next = sampler.sample(&session.logits);
        if tokenizer.is_stop(next) {
            break StopReason::EndOfTurn;
        }
        output_tokens += 1;
        if recent.len() == REPEAT_WINDOW {
            recent.pop_front();
        }
        recent.push_back(next);
        if let Some(piece) = text.push(tokenizer.bytes(next))
            && !emit(piece)
        {
            break StopReason::Cancelled;
        }
        if prompt.len() + output_tokens >= weights.context {
            break StopReason::ContextFull;
        }
        session.forward(weights, &[next])?;
    };
    if stop != StopReason::Cancelled
        && let Some(rest) = text.finish()
    {
        emit(rest);
    }
    Ok(Generated {
        prompt_tokens: prompt.len(),
        prompt_computed: prefilled.computed,
        output_tokens,
        stop,
    })
}

/// The usual repeat penalty (as in llama.cpp and candle): divide positive logits of recently
/// generated tokens by the penalty, multiply negative ones.
fn penalise_repeats(logits: &mut [f32], recent: &VecDeque<u32>) {
    let mut seen = std::collections::HashSet::with_capacity(recent.len());
    for &token in recent {
        if seen.insert(token)
            && let Some(logit) = logits.get_mut(token as usize)
        {
            *logit = if *logit >= 0.0 {
                *logit / REPEAT_PENALTY
            } else {
                *logit * REPEAT_PENALTY
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_characters_split_across_tokens_are_held_back() {
        let mut text = Utf8Assembler::default();
        let euro = "€".as_bytes();
        assert_eq!(text.push(&euro[..1]), None);
        assert_eq!(text.push(&euro[1..2]), None);
        assert_eq!(text.push(&[euro[2], b'!']).as_deref(), Some("€!"));
        assert_eq!(text.push(b"ok").as_deref(), Some("ok"));
        assert_eq!(text.push(&[0xF0]), None);
        assert_eq!(text.finish().as_deref(), Some("\u{FFFD}"));
    }
}
