//! SmolLM2's tokenizer, rebuilt from the GGUF metadata: GPT-2 byte-level BPE with the `smollm`
//! pre-tokenizer (every digit on its own, GPT-2's word pattern, no prefix space), and the ChatML
//! prompt around it.
//!
//! Our own rather than Hugging Face's `tokenizers` crate, which cost a cold build nearly a minute
//! of CPU for the hundred lines used here; `tests/local_model.rs` checks this one against it,
//! id for id, on text in many scripts.
//!
//! There are no added special tokens on purpose: text is always encoded as text, so
//! `<|im_start|>` typed by a user is just characters, and control tokens enter a prompt only
//! where [`ChatTokenizer::chat_prompt`] puts them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use regex::Regex;

use super::error::ModelError;
use super::gguf::GgufFile;
use crate::domain::Role;

/// The system prompt SmolLM2's own chat template uses when none is given.
const DEFAULT_SYSTEM_PROMPT: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
/// GGUF token type of control tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, ...).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GPT-2's word pattern without its one look-ahead, `\s+(?!\S)`, which the `regex` crate does
/// not have: [`Bpe::words`] applies it by hand.
const WORD_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";

pub struct ChatTokenizer {
    bpe: Bpe,
    /// Each token's raw bytes (byte-level BPE strings decoded), for exact incremental UTF-8.
    token_bytes: Vec<Vec<u8>>,
    is_control: Vec<bool>,
    im_start: u32,
    im_end: u32,
    newline: Vec<u32>,
}

impl ChatTokenizer {
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let tokens = file.strings("tokenizer.ggml.tokens")?;
        let merges = file.strings("tokenizer.ggml.merges")?;
        let types: Vec<i32> = file
            .array("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| {
                v.to_i32()
                    .ok_or_else(|| ModelError::Format("a token type is not an integer".into()))
            })
            .collect::<Result<_, _>>()?;
        let vocab: HashMap<&str, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (*t, i as u32))
            .collect();
        let id = |token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| ModelError::Format(format!("the vocabulary has no {token}")))
        };
        let byte_to_char = byte_alphabet();
        let mut token_bytes: Vec<Vec<u8>> = Vec::with_capacity(tokens.len());
        let char_to_byte: HashMap<char, u8> = byte_to_char
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        for token in &tokens {
            token_bytes.push(
                token
                    .chars()
                    .filter_map(|c| char_to_byte.get(&c).copied())
                    .collect(),
            );
        }
        let mut this = Self {
            bpe: Bpe::new(&vocab, &merges, &byte_to_char)?,
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

    /// The number of tokens, the size the embeddings must have at least.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Encodes text as plain text: no special tokens, whatever it contains.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        self.bpe
            .pre_tokenize(text, |piece| self.bpe.encode_piece(piece, &mut ids));
        Ok(ids)
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

/// Byte-level BPE: text is split into words, each word's UTF-8 bytes start as one token per byte,
/// then the pair of neighbours with the best-ranked merge is joined, again and again.
struct Bpe {
    /// The token of each byte's one-character stand-in. SmolLM2's vocabulary lacks a few control
    /// bytes; like `tokenizers` without an unknown token, those bytes are left out.
    byte_tokens: [Option<u32>; 256],
    /// (left, right) → (rank, merged token).
    merges: HashMap<(u32, u32), (u32, u32)>,
    words: Regex,
}

impl Bpe {
    fn new(
        vocab: &HashMap<&str, u32>,
        merges: &[&str],
        byte_to_char: &[char; 256],
    ) -> Result<Self, ModelError> {
        let mut byte_tokens = [None; 256];
        for (token, c) in byte_tokens.iter_mut().zip(byte_to_char) {
            *token = vocab.get(c.to_string().as_str()).copied();
        }
        let lookup = |part: &str| {
            vocab
                .get(part)
                .copied()
                .ok_or_else(|| ModelError::Format(format!("a merge names unknown token '{part}'")))
        };
        let mut ranked = HashMap::with_capacity(merges.len());
        for (rank, merge) in merges.iter().enumerate() {
            let (left, right) = merge
                .split_once(' ')
                .ok_or_else(|| ModelError::Format(format!("bad merge '{merge}'")))?;
            let merged = lookup(&format!("{left}{right}"))?;
            ranked.insert((lookup(left)?, lookup(right)?), (rank as u32, merged));
        }
        let words = Regex::new(WORD_PATTERN).map_err(|e| ModelError::Format(e.to_string()))?;
        Ok(Self {
            byte_tokens,
            merges: ranked,
            words,
        })
    }

    /// SmolLM's pre-tokenizer: every numeric character is a piece of its own, and the text
    /// between them is split by GPT-2's word pattern.
    fn pre_tokenize<'t>(&self, text: &'t str, mut piece: impl FnMut(&'t str)) {
        let mut start = 0;
        for (at, c) in text.char_indices() {
            if c.is_numeric() {
                self.words(&text[start..at], &mut piece);
                let end = at + c.len_utf8();
                piece(&text[at..end]);
                start = end;
            }
        }
        self.words(&text[start..], &mut piece);
    }

    /// GPT-2's pattern. Its `\s+(?!\S)` alternative takes a run of whitespace except the last
    /// character when a word follows (so that word keeps its leading space); a plain `\s+` match
    /// is cut the same way here.
    fn words<'t>(&self, span: &'t str, piece: &mut impl FnMut(&'t str)) {
        let mut at = 0;
        while at < span.len() {
            let Some(found) = self.words.find_at(span, at) else {
                piece(&span[at..]);
                return;
            };
            let mut end = found.end();
            let text = found.as_str();
            if end < span.len()
                && text.chars().all(char::is_whitespace)
                && let Some((last, _)) = text.char_indices().next_back().filter(|(i, _)| *i > 0)
            {
                end = found.start() + last;
            }
            piece(&span[at..end]);
            at = end;
        }
    }

    /// Merges by rank, lowest first, the leftmost pair among equals — as `tokenizers` does, with a
    /// heap so that a long word costs n·log n, not n².
    fn encode_piece(&self, piece: &str, out: &mut Vec<u32>) {
        let tokens: Vec<u32> = piece
            .bytes()
            .filter_map(|b| self.byte_tokens[usize::from(b)])
            .collect();
        let mut symbols: Vec<Symbol> = (0..tokens.len())
            .map(|i| Symbol {
                token: tokens[i],
                prev: i.checked_sub(1),
                next: Some(i + 1).filter(|n| *n < tokens.len()),
                alive: true,
            })
            .collect();
        let mut queue = BinaryHeap::new();
        for pos in 0..symbols.len().saturating_sub(1) {
            self.push_pair(&symbols, pos, &mut queue);
        }
        while let Some(Reverse((_, pos, merged))) = queue.pop() {
            let Some(next) = symbols[pos].next.filter(|_| symbols[pos].alive) else {
                continue;
            };
            let pair = (symbols[pos].token, symbols[next].token);
            if self.merges.get(&pair).map(|m| m.1) != Some(merged) {
                continue; // an entry made stale by an earlier merge
            }
            symbols[pos].token = merged;
            symbols[pos].next = symbols[next].next;
            symbols[next].alive = false;
            if let Some(after) = symbols[next].next {
                symbols[after].prev = Some(pos);
            }
            if let Some(prev) = symbols[pos].prev {
                self.push_pair(&symbols, prev, &mut queue);
            }
            self.push_pair(&symbols, pos, &mut queue);
        }
        out.extend(symbols.iter().filter(|s| s.alive).map(|s| s.token));
    }

    fn push_pair(&self, symbols: &[Symbol], pos: usize, queue: &mut BinaryHeap<MergeEntry>) {
        if let Some(next) = symbols[pos].next
            && let Some((rank, merged)) =
                self.merges.get(&(symbols[pos].token, symbols[next].token))
        {
            queue.push(Reverse((*rank, pos, *merged)));
        }
    }
}

/// (rank, position of the left symbol, merged token), smallest first.
type MergeEntry = Reverse<(u32, usize, u32)>;

struct Symbol {
    token: u32,
    prev: Option<usize>,
    next: Option<usize>,
    alive: bool,
}

/// GPT-2's byte-level alphabet: each byte's printable stand-in character.
pub fn byte_alphabet() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut alphabet = ['\0'; 256];
    let mut next = 256u32;
    for byte in 0..=255u8 {
        alphabet[usize::from(byte)] = if printable(byte) {
            char::from(byte)
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
    }
    alphabet
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bpe(tokens: &[&str], merges: &[&str]) -> Bpe {
        let mut vocab: HashMap<&str, u32> = HashMap::new();
        let alphabet: Vec<String> = byte_alphabet().iter().map(char::to_string).collect();
        for t in alphabet
            .iter()
            .map(String::as_str)
            .chain(tokens.iter().copied())
        {
            let next = vocab.len() as u32;
            vocab.entry(t).or_insert(next);
        }
        Bpe::new(&vocab, merges, &byte_alphabet()).unwrap()
    }

    fn pieces(text: &str) -> Vec<&str> {
        let bpe = bpe(&[], &[]);
        let mut out = Vec::new();
        bpe.pre_tokenize(text, |p| out.push(p));
        out
    }

    #[test]
    fn the_byte_alphabet_covers_every_byte_once() {
        let alphabet = byte_alphabet();
        let distinct: std::collections::HashSet<char> = alphabet.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert_eq!(alphabet[usize::from(b' ')], 'Ġ');
        assert_eq!(alphabet[usize::from(b'\n')], 'Ċ');
        assert_eq!(alphabet[usize::from(b'a')], 'a');
    }

    #[test]
    fn words_keep_their_leading_space_and_digits_stand_alone() {
        assert_eq!(pieces("Hello   world"), ["Hello", "  ", " world"]);
        assert_eq!(pieces("a\n\nb"), ["a", "\n", "\n", "b"]);
        assert_eq!(pieces("end  "), ["end", "  "]);
        assert_eq!(
            pieces("it's 2024!"),
            ["it", "'s", " ", "2", "0", "2", "4", "!"]
        );
        assert_eq!(pieces(" ?!x"), [" ?!", "x"]);
    }

    #[test]
    fn merges_apply_by_rank_then_from_the_left() {
        let bpe = bpe(&["aa", "aaa", "ab"], &["a a", "a b", "aa a"]);
        let encode = |text: &str| {
            let mut ids = Vec::new();
            bpe.encode_piece(text, &mut ids);
            ids
        };
        // "aaab": "a a" (rank 0) at the left first → "aa" "a" "b"; then "a b" (rank 1) → "aa" "ab".
        assert_eq!(encode("aaab"), [encode("aa"), encode("ab")].concat());
        assert_eq!(encode("aaa").len(), 1, "aa + a merges into aaa");
        // The heap gives what merging the best pair, leftmost first, one at a time gives.
        for text in [
            "aaaaaaa",
            "abaaabab",
            "baaaaab",
            &"ab".repeat(50),
            &"a".repeat(301),
        ] {
            assert_eq!(encode(text), naive(&bpe, text), "{text}");
        }
    }

    /// The textbook loop, quadratic: find the best-ranked pair, merge it, repeat.
    fn naive(bpe: &Bpe, text: &str) -> Vec<u32> {
        let mut tokens: Vec<u32> = text
            .bytes()
            .filter_map(|b| bpe.byte_tokens[usize::from(b)])
            .collect();
        loop {
            let best = (0..tokens.len().saturating_sub(1))
                .filter_map(|i| {
                    bpe.merges
                        .get(&(tokens[i], tokens[i + 1]))
                        .map(|m| (m.0, i, m.1))
                })
                .min();
            let Some((_, i, merged)) = best else {
                return tokens;
            };
            tokens.splice(i..i + 2, [merged]);
        }
    }
}
