//! Quantised numbers: reading the block formats GGUF stores weights in, and the one kernel the
//! forward pass spends its time in — a matrix of 8-bit weights times a batch of activations.
//!
//! Weights are kept as Q8_0 (blocks of 32 `i8` sharing one scale): the file's Q4_1 is re-quantised
//! at load, because an 8-bit integer dot product is what CPUs do fast, and 135M parameters at
//! 8 bits still fit in ~150 MB. Activations are quantised the same way per matmul, so a block's
//! dot product is integer arithmetic followed by one multiply by the two scales — llama.cpp's
//! `Q8_0 × Q8_0`.
//!
//! Speed comes from the compiler, not from hand-written intrinsics: the loops are plain Rust over
//! fixed 32-element blocks, which LLVM turns into SIMD. Built once for the baseline x86-64 (SSE2)
//! and once for AVX2, chosen at run time — the only `unsafe` in Mangoo is that choice.

use super::error::ModelError;

/// Values per quantised block, in every format here.
pub const BLOCK: usize = 32;

/// How a tensor's values are stored (GGML's type ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl Kind {
    pub fn from_ggml(id: u32) -> Result<Self, ModelError> {
        Ok(match id {
            0 => Kind::F32,
            1 => Kind::F16,
            2 => Kind::Q4_0,
            3 => Kind::Q4_1,
            8 => Kind::Q8_0,
            other => {
                return Err(ModelError::Format(format!(
                    "tensor type {other} is not supported (F32, F16, Q4_0, Q4_1 and Q8_0 are)"
                )));
            }
        })
    }

    /// (values, bytes) of one stored block; a plain float is a block of one.
    fn block_layout(self) -> (usize, usize) {
        match self {
            Kind::F32 => (1, 4),
            Kind::F16 => (1, 2),
            Kind::Q4_0 => (BLOCK, 2 + BLOCK / 2),
            Kind::Q4_1 => (BLOCK, 4 + BLOCK / 2),
            Kind::Q8_0 => (BLOCK, 2 + BLOCK),
        }
    }

    /// Bytes that `elements` values take, if they fill whole blocks.
    pub fn bytes_for(self, elements: usize) -> Option<usize> {
        let (values, bytes) = self.block_layout();
        if !elements.is_multiple_of(values) {
            return None;
        }
        (elements / values).checked_mul(bytes)
    }
}

/// IEEE half precision to single: every half value, subnormals and infinities included, is
/// exactly representable, and powers of two multiply exactly.
pub fn f16_to_f32(bits: u16) -> f32 {
    let exponent = i32::from((bits >> 10) & 0x1f);
    let mantissa = f32::from(bits & 0x3ff);
    let magnitude = match exponent {
        0 => mantissa * 2f32.powi(-24),
        0x1f if mantissa == 0.0 => f32::INFINITY,
        0x1f => f32::NAN,
        _ => (1.0 + mantissa / 1024.0) * 2f32.powi(exponent - 15),
    };
    if bits >> 15 == 1 {
        -magnitude
    } else {
        magnitude
    }
}

fn half(bytes: &[u8]) -> f32 {
    f16_to_f32(u16::from_le_bytes([bytes[0], bytes[1]]))
}

/// Decodes `raw` (whole blocks of `kind`) into `out`, which holds exactly its values.
pub fn dequantize(kind: Kind, raw: &[u8], out: &mut [f32]) {
    let (values_per_block, bytes_per_block) = kind.block_layout();
    let blocks = out
        .chunks_exact_mut(values_per_block)
        .zip(raw.chunks_exact(bytes_per_block));
    for (values, block) in blocks {
        match kind {
            Kind::F32 => values[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]),
            Kind::F16 => values[0] = half(block),
            // Nibbles: the low halves of the 16 bytes are values 0..16, the high halves 16..32.
            Kind::Q4_0 => {
                let scale = half(&block[..2]);
                unpack_nibbles(&block[2..], values, |q| (f32::from(q) - 8.0) * scale);
            }
            Kind::Q4_1 => {
                let (scale, min) = (half(&block[..2]), half(&block[2..4]));
                unpack_nibbles(&block[4..], values, |q| f32::from(q) * scale + min);
            }
            Kind::Q8_0 => {
                let scale = half(&block[..2]);
                for (value, q) in values.iter_mut().zip(&block[2..]) {
                    *value = f32::from(*q as i8) * scale;
                }
            }
        }
    }
}

fn unpack_nibbles(packed: &[u8], values: &mut [f32], decode: impl Fn(u8) -> f32) {
    let (low, high) = values.split_at_mut(BLOCK / 2);
    for ((byte, lo), hi) in packed.iter().zip(low).zip(high) {
        *lo = decode(byte & 0x0f);
        *hi = decode(byte >> 4);
    }
}

/// Numbers quantised to Q8_0: each block of 32 is `scale × i8`, the scale chosen so the block's
/// largest magnitude maps to 127. Scales stay `f32` (GGUF stores them as `f16`).
#[derive(Debug, Clone, Default)]
pub struct Q8 {
    pub quants: Vec<i8>,
    pub scales: Vec<f32>,
}

impl Q8 {
    /// Replaces the contents with `values` quantised (`values.len()` a multiple of 32).
    pub fn quantize_from(&mut self, values: &[f32]) {
        self.quants.resize(values.len(), 0);
        self.scales.resize(values.len() / BLOCK, 0.0);
        for ((block, quants), scale) in values
            .chunks_exact(BLOCK)
            .zip(self.quants.chunks_exact_mut(BLOCK))
            .zip(&mut self.scales)
        {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            *scale = max / 127.0;
            let inverse = if max > 0.0 { 127.0 / max } else { 0.0 };
            for (q, v) in quants.iter_mut().zip(block) {
                *q = (v * inverse).round() as i8;
            }
        }
    }

    pub fn from_f32(values: &[f32]) -> Self {
        let mut q = Self::default();
        q.quantize_from(values);
        q
    }
}

/// A weight matrix, `rows` output features × `cols` inputs, quantised row by row.
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    weights: Q8,
}

impl Matrix {
    pub fn from_f32(values: &[f32], rows: usize, cols: usize) -> Result<Self, ModelError> {
        if values.len() != rows * cols || !cols.is_multiple_of(BLOCK) {
            return Err(ModelError::Format(format!(
                "a {rows}×{cols} matrix cannot hold {} values in blocks of {BLOCK}",
                values.len()
            )));
        }
        Ok(Self {
            rows,
            cols,
            weights: Q8::from_f32(values),
        })
    }

    /// One row, decoded (an embedding lookup).
    pub fn row(&self, index: usize, out: &mut [f32]) {
        let quants = &self.weights.quants[index * self.cols..(index + 1) * self.cols];
        let scales =
            &self.weights.scales[index * self.cols / BLOCK..(index + 1) * self.cols / BLOCK];
        for ((values, block), scale) in out
            .chunks_exact_mut(BLOCK)
            .zip(quants.chunks_exact(BLOCK))
            .zip(scales)
        {
            for (v, q) in values.iter_mut().zip(block) {
                *v = f32::from(*q) * scale;
            }
        }
    }

    /// `out[m × rows] = x[m × cols] · selfᵀ`, with `x` already quantised by [`Q8::quantize_from`].
    pub fn apply(&self, x: &Q8, m: usize, out: &mut [f32]) {
        assert_eq!(
            x.quants.len(),
            m * self.cols,
            "activations of the wrong width"
        );
        let out = &mut out[..m * self.rows];
        matmul(&self.weights, self.rows, self.cols, x, out);
    }
}

/// Picks the widest instruction set this CPU has for [`matmul_portable`]'s loops.
#[allow(unsafe_code)]
fn matmul(w: &Q8, rows: usize, cols: usize, x: &Q8, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: `matmul_avx2` only differs from `matmul_portable` in the instructions the
        // compiler may use, and this CPU has them: both features were detected just above.
        return unsafe { matmul_avx2(w, rows, cols, x, out) };
    }
    matmul_portable(w, rows, cols, x, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn matmul_avx2(w: &Q8, rows: usize, cols: usize, x: &Q8, out: &mut [f32]) {
    matmul_portable(w, rows, cols, x, out)
}

/// Each weight row is read once and met by every activation row while it is in L1.
#[inline(always)]
fn matmul_portable(w: &Q8, rows: usize, cols: usize, x: &Q8, out: &mut [f32]) {
    let blocks = cols / BLOCK;
    for row in 0..rows {
        let wq = &w.quants[row * cols..(row + 1) * cols];
        let ws = &w.scales[row * blocks..(row + 1) * blocks];
        for (i, (xq, xs)) in x
            .quants
            .chunks_exact(cols)
            .zip(x.scales.chunks_exact(blocks))
            .enumerate()
        {
            out[i * rows + row] = row_dot(wq, ws, xq, xs);
        }
    }
}

#[inline(always)]
fn row_dot(wq: &[i8], ws: &[f32], xq: &[i8], xs: &[f32]) -> f32 {
    let mut sum = 0f32;
    for ((wb, xb), (sw, sx)) in wq
        .chunks_exact(BLOCK)
        .zip(xq.chunks_exact(BLOCK))
        .zip(ws.iter().zip(xs))
    {
        // i8 × i8 always fits an i16: written so, the products pair up into `pmaddwd`.
        let dot: i32 = wb
            .iter()
            .zip(xb)
            .map(|(a, b)| i32::from(i16::from(*a) * i16::from(*b)))
            .sum();
        sum += dot as f32 * (sw * sx);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_decode_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x8001), -(2f32.powi(-24)));
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn q4_blocks_decode_low_nibbles_first() {
        // scale 0.5 (0x3800), min -1.0 (0xbc00); byte j holds value j (low) and 15 - j (high).
        let mut block = vec![0x00, 0x38, 0x00, 0xbc];
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut values = [0f32; 32];
        dequantize(Kind::Q4_1, &block, &mut values);
        assert_eq!(values[0], -1.0);
        assert_eq!(values[3], 0.5);
        assert_eq!(values[16], 6.5);
        assert_eq!(values[31], -1.0);

        let mut q4_0 = vec![0x00, 0x38];
        q4_0.extend(std::iter::repeat_n(0xf0u8, 16));
        dequantize(Kind::Q4_0, &q4_0, &mut values);
        assert_eq!((values[0], values[16]), (-4.0, 3.5));
    }

    fn dequantized(q: &Q8) -> Vec<f64> {
        q.quants
            .iter()
            .enumerate()
            .map(|(i, v)| f64::from(*v) * f64::from(q.scales[i / BLOCK]))
            .collect()
    }

    #[test]
    fn the_matmul_is_the_dot_product_of_the_quantised_values() {
        let (rows, cols, m) = (37, 96, 3);
        let wave = |i: usize, f: f32| ((i as f32) * f).sin();
        let weights: Vec<f32> = (0..rows * cols).map(|i| wave(i, 0.37)).collect();
        let x: Vec<f32> = (0..m * cols).map(|i| wave(i, 1.3) * 4.0).collect();
        let matrix = Matrix::from_f32(&weights, rows, cols).unwrap();
        let x = Q8::from_f32(&x);
        let mut out = vec![0f32; m * rows];
        matrix.apply(&x, m, &mut out);
        let (wd, xd) = (dequantized(&matrix.weights), dequantized(&x));
        for i in 0..m {
            for r in 0..rows {
                let exact: f64 = (0..cols).map(|c| xd[i * cols + c] * wd[r * cols + c]).sum();
                let got = f64::from(out[i * rows + r]);
                assert!(
                    (got - exact).abs() < 1e-4 * (1.0 + exact.abs()),
                    "{got} vs {exact}"
                );
            }
        }
        // Quantising loses at most half a step of 1/127 of each block's largest magnitude.
        let round_trip = dequantized(&Q8::from_f32(&weights));
        for (a, b) in round_trip.iter().zip(&weights) {
            assert!((a - f64::from(*b)).abs() <= 0.5 / 127.0 + 1e-6);
        }
        // The portable loops and the dispatched ones agree exactly (same integer maths).
        let mut portable = vec![0f32; m * rows];
        matmul_portable(&matrix.weights, rows, cols, &x, &mut portable);
        assert_eq!(out, portable);
    }

    #[test]
    fn sizes_must_fill_whole_blocks() {
        assert_eq!(Kind::Q4_1.bytes_for(64), Some(40));
        assert_eq!(Kind::Q8_0.bytes_for(33), None);
        assert_eq!(Kind::F16.bytes_for(3), Some(6));
        assert!(Matrix::from_f32(&[0.0; 30], 1, 30).is_err());
    }
}
