//! SmolLM2-135M-Instruct on the CPU with candle: loading the GGUF, its byte-level BPE tokenizer,
//! the ChatML prompt and the decoding loop. Synchronous on purpose: it runs on dedicated threads,
//! never on the async runtime.

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;

pub use super::error::ModelError;
use super::llama::{Session, Weights};
use super::sampling::Sampler;
use crate::domain::Role;

/// The system prompt SmolLM2's own chat template uses when none is given.
const DEFAULT_SYSTEM_PROMPT: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
/// The 135M model loops without a repeat penalty.
const REPEAT_PENALTY: f32 = 1.1;
const REPEAT_WINDOW: usize = 64;
/// GGUF token type of control tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, ...).
const TOKEN_TYPE_CONTROL: i32 = 3;

fn format_error(e: impl std::fmt::Display) -> ModelError {
    ModelError::Format(e.to_string())
}

/// Weights plus tokenizer, shared read-only by every worker thread.
pub struct LocalModel {
    pub weights: Weights,
    pub tokenizer: ChatTokenizer,
}

impl LocalModel {
    /// Loads the GGUF, re-quantising every matrix to Q8_0: candle has SIMD kernels for Q8_0 and
    /// only a scalar one for the file's Q4_1, and 135M parameters at 8 bits still fit in ~150 MB.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let open_error = |source| ModelError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(open_error)?;
        let mut reader = std::io::BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader).map_err(format_error)?;
        let tokenizer = ChatTokenizer::from_gguf(&content)?;
        let weights = Weights::from_gguf(&content, &mut reader)?;
        if super::llama::vocab_size(&weights) < tokenizer.token_bytes.len() {
            return Err(ModelError::Format(
                "the vocabulary is larger than the embeddings".into(),
            ));
        }
        Ok(Self { weights, tokenizer })
    }
}

/// SmolLM2's tokenizer, rebuilt from the GGUF metadata: GPT-2 byte-level BPE with the `smollm`
/// pre-tokenizer (digits split one by one, no prefix space). It has no added special tokens on
/// purpose: text is always encoded as text, so `<|im_start|>` typed by a user is just characters,
/// and control tokens enter a prompt only where [`ChatTokenizer::chat_prompt`] puts them.
pub struct ChatTokenizer {
    bpe: tokenizers::Tokenizer,
    /// Each token's raw bytes (byte-level BPE strings decoded), for exact incremental UTF-8.
    token_bytes: Vec<Vec<u8>>,
    is_control: Vec<bool>,
    im_start: u32,
    im_end: u32,
    newline: Vec<u32>,
}

impl ChatTokenizer {
    fn from_gguf(content: &gguf_file::Content) -> Result<Self, ModelError> {
        let meta = |key: &str| {
            content
                .metadata
                .get(key)
                .ok_or_else(|| ModelError::Format(format!("missing metadata {key}")))
        };
        let strings = |key: &str| -> Result<Vec<String>, ModelError> {
            meta(key)?
                .to_vec()
                .map_err(format_error)?
                .iter()
                .map(|v| v.to_string().cloned().map_err(format_error))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| ModelError::Format(format!("bad merge '{m}'")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let types: Vec<i32> = meta("tokenizer.ggml.token_type")?
            .to_vec()
            .map_err(format_error)?
            .iter()
            .map(|v| v.to_i32().map_err(format_error))
            .collect::<Result<_, _>>()?;
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe_vocab: Vocab = vocab.iter().map(|(t, i)| (t.clone(), *i)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(bpe_vocab, merges)
            .build()
            .map_err(format_error)?;
        let mut tokenizer = tokenizers::Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        let id = |token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| ModelError::Format(format!("the vocabulary has no {token}")))
        };
        let unicode_to_byte = unicode_to_byte();
        let token_bytes = tokens
            .iter()
            .map(|t| {
                t.chars()
                    .filter_map(|c| unicode_to_byte.get(&c).copied())
                    .collect()
            })
            .collect();
        let mut this = Self {
            bpe: tokenizer,
            token_bytes,
            is_control: types.iter().map(|t| *t == TOKEN_TYPE_CONTROL).collect(),
            im_start: id("<|im_start|>")?,
            im_end: id("<|im_end|>")?,
            newline: Vec::new(),
        };
        this.is_control.resize(tokens.len(), false);
        this.newline = this.encode("\n")?;
        Ok(this)
    }

    /// Encodes text as plain text: no special tokens, whatever it contains.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self.bpe.encode(text, false).map_err(format_error)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The ChatML prompt: `<|im_start|>{role}\n{content}<|im_end|>\n` per message, then the
    /// opening of the assistant's turn.
    pub fn chat_prompt(
        &self,
        system: Option<&str>,
        messages: &[(Role, &str)],
    ) -> Result<Vec<u32>, ModelError> {
        let mut ids = self.system_prefix(system)?;
        for (role, content) in messages {
            self.push_turn(&mut ids, role.as_str(), content)?;
        }
        ids.extend(self.answer_opening()?);
        Ok(ids)
    }

    /// One message as a ChatML turn, for prompts assembled turn by turn.
    pub fn turn(&self, role: Role, content: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = Vec::new();
        self.push_turn(&mut ids, role.as_str(), content)?;
        Ok(ids)
    }

    /// What follows the last turn: the opening of the assistant's answer.
    pub fn answer_opening(&self) -> Result<Vec<u32>, ModelError> {
        let mut ids = vec![self.im_start];
        ids.extend(self.encode("assistant")?);
        ids.extend(&self.newline);
        Ok(ids)
    }

    /// The system turn alone: the prefix every conversation with that system prompt shares.
    pub fn system_prefix(&self, system: Option<&str>) -> Result<Vec<u32>, ModelError> {
        let mut ids = Vec::new();
        self.push_turn(&mut ids, "system", system.unwrap_or(DEFAULT_SYSTEM_PROMPT))?;
        Ok(ids)
    }

    fn push_turn(&self, ids: &mut Vec<u32>, role: &str, content: &str) -> Result<(), ModelError> {
        ids.push(self.im_start);
        ids.extend(self.encode(role)?);
        ids.extend(&self.newline);
        ids.extend(self.encode(content)?);
        ids.push(self.im_end);
        ids.extend(&self.newline);
        Ok(())
    }

    pub fn is_stop(&self, id: u32) -> bool {
        id == self.im_end || self.is_control.get(id as usize).copied().unwrap_or(true)
    }

    pub fn bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }
}

/// GPT-2's byte-level alphabet, reversed: each printable stand-in character to its byte.
fn unicode_to_byte() -> HashMap<char, u8> {
    let mut printable: Vec<u8> = (b'!'..=b'~').collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map = HashMap::with_capacity(256);
    let mut next = 0u32;
    for byte in 0..=255u8 {
        let c = if printable.contains(&byte) {
            char::from(byte)
        } else {
            let c = char::from_u32(256 + next).expect("valid code point");
            next += 1;
            c
        };
        map.insert(c, byte);
    }
    map
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

    #[test]
    fn the_byte_alphabet_covers_every_byte() {
        let map = unicode_to_byte();
        assert_eq!(map.len(), 256);
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'Ċ'], b'\n');
        assert_eq!(map[&'a'], b'a');
    }
}
