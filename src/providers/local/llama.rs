//! A lean Llama forward pass for small GGUF models.
//!
//! Why not a general tensor library: for a 135M-parameter model the matmuls are only part of a
//! token's cost; the rest is tensor bookkeeping (an allocation and a dispatch per op, ~600 ops a
//! token). Here every buffer is allocated once per worker, Q/K/V and gate/up are fused into one
//! matmul each, and attention, RoPE and norms are plain loops. The maths is candle's
//! `quantized_llama`; a test compares the two.

use super::error::ModelError;
use super::gguf::GgufFile;
use rayon::prelude::*;

use super::matmul::{Matrix, Q8};
use super::quant::BLOCK;

struct Layer {
    attn_norm: Vec<f32>,
    /// Q, K and V stacked.
    qkv: Matrix,
    out: Matrix,
    ffn_norm: Vec<f32>,
    /// Gate and up stacked.
    gate_up: Matrix,
    down: Matrix,
}

/// The shared, read-only half of the model.
pub struct Weights {
    dim: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    hidden: usize,
    eps: f32,
    pub context: usize,
    /// Token embeddings, also the output head (tied weights).
    embeddings: Matrix,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// `cos`/`sin` of every position × frequency, interleaved RoPE as in llama.cpp's GGUF.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
}

pub fn vocab_size(weights: &Weights) -> usize {
    weights.embeddings.rows
}

impl Weights {
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        file: &GgufFile,
        reader: &mut R,
    ) -> Result<Self, ModelError> {
        let number = |key: &str| file.number(key);
        let dim = number("llama.embedding_length")?;
        let heads = number("llama.attention.head_count")?;
        let kv_heads = number("llama.attention.head_count_kv")?;
        let hidden = number("llama.feed_forward_length")?;
        let blocks = number("llama.block_count")?;
        let context = number("llama.context_length")?;
        let eps = file.float("llama.attention.layer_norm_rms_epsilon")?;
        let rope_base = file.float("llama.rope.freq_base").unwrap_or(10_000.0);
        if dim % heads != 0 || dim % BLOCK != 0 || hidden % BLOCK != 0 {
            return Err(ModelError::Format("unsupported tensor shapes".into()));
        }
        let head_dim = dim / heads;
        let mut tensor = |name: &str| file.tensor_f32(reader, name);
        let embeddings_f32 = tensor("token_embd.weight")?;
        let vocab = embeddings_f32.len() / dim;
        let embeddings = Matrix::from_f32(&embeddings_f32, vocab, dim)?;
        drop(embeddings_f32);
        let mut layers = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let name = |part: &str| format!("blk.{i}.{part}.weight");
            let kv_dim = kv_heads * head_dim;
            layers.push(Layer {
                attn_norm: tensor(&name("attn_norm"))?,
                qkv: stacked(
                    &[
                        (tensor(&name("attn_q"))?, dim),
                        (tensor(&name("attn_k"))?, kv_dim),
                        (tensor(&name("attn_v"))?, kv_dim),
                    ],
                    dim,
                )?,
                out: Matrix::from_f32(&tensor(&name("attn_output"))?, dim, dim)?,
                ffn_norm: tensor(&name("ffn_norm"))?,
                gate_up: stacked(
                    &[
                        (tensor(&name("ffn_gate"))?, hidden),
                        (tensor(&name("ffn_up"))?, hidden),
                    ],
                    dim,
                )?,
                down: Matrix::from_f32(&tensor(&name("ffn_down"))?, dim, hidden)?,
            });
        }
        let norm = tensor("output_norm.weight")?;
        let (rope_cos, rope_sin) = rope_tables(head_dim, rope_base, context);
        Ok(Self {
            dim,
            heads,
            kv_heads,
            head_dim,
            hidden,
            eps,
            context,
            embeddings,
            layers,
            norm,
            rope_cos,
            rope_sin,
        })
    }
}

/// Rows of several matrices with the same width, one after another: one matmul serves all.
fn stacked(parts: &[(Vec<f32>, usize)], cols: usize) -> Result<Matrix, ModelError> {
    let rows = parts.iter().map(|(_, r)| r).sum();
    let values: Vec<f32> = parts.iter().flat_map(|(v, _)| v.iter().copied()).collect();
    Matrix::from_f32(&values, rows, cols)
}

fn rope_tables(head_dim: usize, base: f32, context: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(context * half);
    let mut sin = Vec::with_capacity(context * half);
    for pos in 0..context {
        for i in 0..half {
            let theta = 1.0 / base.powf((2 * i) as f32 / head_dim as f32);
            let angle = pos as f32 * theta;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}

/// Prompt tokens run per forward pass while prefilling: large enough that the matmuls stay
/// efficient, small enough that a cancellation is noticed within a fraction of a second.
pub const PREFILL_CHUNK: usize = 128;

/// What a prefill did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefilled {
    /// Tokens computed (not taken from the cache).
    pub computed: usize,
    /// False when it was cancelled before the end of the prompt.
    pub complete: bool,
}

/// One worker's mutable half: the KV cache and scratch buffers, reused for every answer.
pub struct Session {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// The tokens whose keys and values are cached, in order.
    tokens: Vec<u32>,
    len: usize,
    x: Vec<f32>,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    /// The activations of the matmul at hand, quantised.
    quantized: Q8,
    scores: Vec<f32>,
    pub logits: Vec<f32>,
}

impl Session {
    pub fn new(weights: &Weights) -> Self {
        Self {
            keys: vec![Vec::new(); weights.layers.len()],
            values: vec![Vec::new(); weights.layers.len()],
            tokens: Vec::new(),
            len: 0,
            x: Vec::new(),
            normed: Vec::new(),
            qkv: Vec::new(),
            attn: Vec::new(),
            proj: Vec::new(),
            gate_up: Vec::new(),
            act: Vec::new(),
            quantized: Q8::default(),
            scores: Vec::new(),
            logits: vec![0.0; weights.embeddings.rows],
        }
    }

    /// Runs a prompt, reusing the cached keys and values of whatever prefix it shares with what
    /// this session saw last: a bot's system prompt, or the earlier turns of a chat, are then
    /// not computed again. At least the last token always runs, for its logits.
    pub fn prefill(&mut self, w: &Weights, prompt: &[u32]) -> Result<(), ModelError> {
        self.prefill_until(w, prompt, &|| false).map(|_| ())
    }

    /// [`Session::prefill`] in chunks of [`PREFILL_CHUNK`] tokens, asking `cancelled` before each:
    /// a long prompt whose client left stops within one chunk instead of holding the thread
    /// (and every answer queued behind it) for the whole prompt. The result is the same as one
    /// pass — each chunk attends to the cache the earlier ones filled.
    pub fn prefill_until(
        &mut self,
        w: &Weights,
        prompt: &[u32],
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Prefilled, ModelError> {
        let shared = self
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len().saturating_sub(1));
        self.truncate(w, shared);
        let mut computed = 0;
        for chunk in prompt[shared..].chunks(PREFILL_CHUNK) {
            if cancelled() {
                return Ok(Prefilled {
                    computed,
                    complete: false,
                });
            }
            self.forward(w, chunk)?;
            computed += chunk.len();
        }
        Ok(Prefilled {
            computed,
            complete: true,
        })
    }

    fn truncate(&mut self, w: &Weights, len: usize) {
        let kv_dim = w.kv_heads * w.head_dim;
        self.len = len;
        self.tokens.truncate(len);
        for cache in self.keys.iter_mut().chain(self.values.iter_mut()) {
            cache.truncate(len * kv_dim);
        }
    }

    /// Runs `tokens` (at positions `len..len + tokens.len()`) and leaves the last one's logits
    /// in `self.logits`.
    pub fn forward(&mut self, w: &Weights, tokens: &[u32]) -> Result<(), ModelError> {
        let m = tokens.len();
        if m == 0 {
            return Ok(());
        }
        if self.len + m > w.context {
            return Err(ModelError::ContextFull(w.context));
        }
        let (dim, kv_dim) = (w.dim, w.kv_heads * w.head_dim);
        resize(&mut self.x, m * dim);
        for (row, &token) in tokens.iter().enumerate() {
            if token as usize >= w.embeddings.rows {
                return Err(ModelError::Format(format!("token {token} out of range")));
            }
            w.embeddings
                .row(token as usize, &mut self.x[row * dim..(row + 1) * dim]);
        }
        resize(&mut self.normed, m * dim);
        resize(&mut self.qkv, m * (dim + 2 * kv_dim));
        resize(&mut self.attn, m * dim);
        resize(&mut self.proj, m * dim);
        resize(&mut self.gate_up, m * 2 * w.hidden);
        resize(&mut self.act, m * w.hidden);
        for (index, layer) in w.layers.iter().enumerate() {
            self.attention(w, layer, index, m);
            self.feed_forward(w, layer, m);
        }
        self.len += m;
        self.tokens.extend_from_slice(tokens);
        let last = &self.x[(m - 1) * dim..m * dim];
        rms_norm(last, &w.norm, w.eps, &mut self.normed[..dim]);
        project(
            &mut self.quantized,
            &w.embeddings,
            &self.normed[..dim],
            &mut self.logits,
        );
        Ok(())
    }

    fn attention(&mut self, w: &Weights, layer: &Layer, index: usize, m: usize) {
        let (dim, hd) = (w.dim, w.head_dim);
        let kv_dim = w.kv_heads * hd;
        let width = dim + 2 * kv_dim;
        for row in 0..m {
            let span = row * dim..(row + 1) * dim;
            rms_norm(
                &self.x[span.clone()],
                &layer.attn_norm,
                w.eps,
                &mut self.normed[span],
            );
        }
        project(&mut self.quantized, &layer.qkv, &self.normed, &mut self.qkv);
        let half = hd / 2;
        for row in 0..m {
            let pos = self.len + row;
            let angles = pos * half..(pos + 1) * half;
            let (cos, sin) = (&w.rope_cos[angles.clone()], &w.rope_sin[angles]);
            let qkv = &mut self.qkv[row * width..(row + 1) * width];
            for head in qkv[..dim + kv_dim].chunks_exact_mut(hd) {
                rope(head, cos, sin);
            }
            self.keys[index].extend_from_slice(&qkv[dim..dim + kv_dim]);
            self.values[index].extend_from_slice(&qkv[dim + kv_dim..]);
        }
        let cache = LayerCache {
            keys: &self.keys[index],
            values: &self.values[index],
            head_dim: hd,
            kv_dim,
            group: w.heads / w.kv_heads,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        let (qkv, len, heads) = (&self.qkv, self.len, w.heads);
        // Every (row, head) pair is independent; with a long context they are most of a token's
        // work outside the products, so they are split across the threads too.
        let attend = |pair: usize, out: &mut [f32], scores: &mut Vec<f32>| {
            let (row, h) = (pair / heads, pair % heads);
            let q = &qkv[row * width + h * hd..row * width + (h + 1) * hd];
            cache.attend(h, q, len + row + 1, scores, out);
        };
        let attn = &mut self.attn[..m * dim];
        if rayon::current_num_threads() > 1 && (len + m) * m >= PARALLEL_ATTENTION_MIN {
            attn.par_chunks_mut(hd)
                .enumerate()
                .for_each_init(Vec::new, |scores, (pair, out)| attend(pair, out, scores));
        } else {
            for (pair, out) in attn.chunks_mut(hd).enumerate() {
                attend(pair, out, &mut self.scores);
            }
        }
        project(&mut self.quantized, &layer.out, &self.attn, &mut self.proj);
        self.x.iter_mut().zip(&self.proj).for_each(|(x, p)| *x += p);
    }

    fn feed_forward(&mut self, w: &Weights, layer: &Layer, m: usize) {
        let (dim, hidden) = (w.dim, w.hidden);
        for row in 0..m {
            let span = row * dim..(row + 1) * dim;
            rms_norm(
                &self.x[span.clone()],
                &layer.ffn_norm,
                w.eps,
                &mut self.normed[span],
            );
        }
        project(
            &mut self.quantized,
            &layer.gate_up,
            &self.normed,
            &mut self.gate_up,
        );
        for row in 0..m {
            let gate_up = &self.gate_up[row * 2 * hidden..(row + 1) * 2 * hidden];
            let (gate, up) = gate_up.split_at(hidden);
            let act = &mut self.act[row * hidden..(row + 1) * hidden];
            for ((a, g), u) in act.iter_mut().zip(gate).zip(up) {
                *a = g / (1.0 + (-g).exp()) * u;
            }
        }
        project(&mut self.quantized, &layer.down, &self.act, &mut self.proj);
        self.x.iter_mut().zip(&self.proj).for_each(|(x, p)| *x += p);
    }
}

/// Below this many (position, row) pairs a layer's attention runs on the calling thread.
const PARALLEL_ATTENTION_MIN: usize = 256;

/// One layer's cached keys and values, and the shape of its heads.
struct LayerCache<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    head_dim: usize,
    kv_dim: usize,
    /// Query heads per key/value head (grouped-query attention).
    group: usize,
    scale: f32,
}

impl LayerCache<'_> {
    /// Query head `h` against the first `visible` cached positions, into `out`.
    fn attend(&self, h: usize, q: &[f32], visible: usize, scores: &mut Vec<f32>, out: &mut [f32]) {
        let (hd, kv_dim) = (self.head_dim, self.kv_dim);
        let kv_offset = (h / self.group) * hd;
        resize(scores, visible);
        for (t, score) in scores.iter_mut().enumerate() {
            let k = &self.keys[t * kv_dim + kv_offset..t * kv_dim + kv_offset + hd];
            *score = dot(q, k) * self.scale;
        }
        softmax(scores);
        out.fill(0.0);
        for (t, p) in scores.iter().enumerate() {
            let v = &self.values[t * kv_dim + kv_offset..t * kv_dim + kv_offset + hd];
            out.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
        }
    }
}

/// `out = x · matrixᵀ` for every row of `x`, through `scratch` (the rows quantised).
fn project(scratch: &mut Q8, matrix: &Matrix, x: &[f32], out: &mut [f32]) {
    scratch.quantize_from(x);
    matrix.apply(scratch, x.len() / matrix.cols, out);
}

fn resize(buffer: &mut Vec<f32>, len: usize) {
    buffer.resize(len, 0.0);
}

fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean_square + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// Interleaved rotary embedding: pairs (2i, 2i+1) turn by position × θᵢ.
fn rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    for (pair, (c, s)) in head.chunks_exact_mut(2).zip(cos.iter().zip(sin)) {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * c - b * s;
        pair[1] = a * s + b * c;
    }
}

/// In eight lanes, so the compiler can keep them in one SIMD register: a plain sum must add in
/// order, one float at a time, and attention over a long context is mostly these sums.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for lane in 0..8 {
            lanes[lane] += x[lane] * y[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

fn softmax(values: &mut [f32]) {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in values.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    values.iter_mut().for_each(|v| *v /= sum);
}
