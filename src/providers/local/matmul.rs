//! The kernel the forward pass spends its time in: a matrix of quantised weights times a batch of
//! quantised activations, split across the model's threads.
//!
//! Weights are kept as Q8_0 (blocks of 32 `i8` sharing one scale): the file's Q4_1 is re-quantised
//! at load, because an 8-bit integer dot product is what CPUs do fast, and 135M parameters at
//! 8 bits still fit in ~150 MB. Keeping the layers at 4 bits (the file's own Q4_1, llama.cpp's
//! `Q4_1 × Q8_1`) was measured: 15 % slower on one thread and on two, with a different greedy
//! answer. Decoding here is bound by arithmetic, not by reading the weights, and unpacking
//! nibbles is more arithmetic (docs/benchmarks.md). Activations are quantised the same way per
//! product, so a block's dot product is integer arithmetic followed by one multiply by the two
//! scales — llama.cpp's `Q8_0 × Q8_0`.
//!
//! Speed comes from the compiler, not from hand-written intrinsics: the loops are plain Rust over
//! fixed 32-element blocks, which LLVM turns into SIMD. Built once for the baseline x86-64 (SSE2)
//! and once for AVX2, chosen at run time — the only `unsafe` in Mangoo is that choice.

use rayon::prelude::*;

use super::error::ModelError;
use super::quant::BLOCK;

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
                *q = round_half_away(v * inverse) as i8;
            }
        }
    }

    pub fn from_f32(values: &[f32]) -> Self {
        let mut q = Self::default();
        q.quantize_from(values);
        q
    }
}

/// `f32::round` (half away from zero) as an add and a truncating conversion, which vectorise
/// on every x86-64 (`round` and `trunc` are libm calls without SSE4.1). It differs only for the
/// float just below each half, which rounds up — harmless in a quantiser.
#[inline(always)]
fn round_half_away(v: f32) -> f32 {
    (v + 0.5f32.copysign(v)) as i32 as f32
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
        let whole = RowSpan {
            first: 0,
            rows: self.rows,
            cols: self.cols,
            stride: self.rows,
        };
        if self.rows * self.cols < PARALLEL_MIN_WEIGHTS || rayon::current_num_threads() < 2 {
            return matmul(&self.weights, whole, x, out);
        }
        self.apply_in_parallel(x, m, out);
    }

    /// Splits the weight rows among the threads of the rayon pool this runs in. Each task
    /// computes whole output features with exactly the arithmetic of the one-thread loop, so
    /// the result is the same bit for bit however the rows are split.
    fn apply_in_parallel(&self, x: &Q8, m: usize, out: &mut [f32]) {
        let chunk = self
            .rows
            .div_ceil(rayon::current_num_threads() * TASKS_PER_THREAD);
        // A task's results are laid out by activation row, `rows` apart: its own part of `out`
        // when there is one row, its own buffer otherwise.
        let span_of = |index: usize| {
            let rows = chunk.min(self.rows - index * chunk);
            RowSpan {
                first: index * chunk,
                rows,
                cols: self.cols,
                stride: rows,
            }
        };
        if m == 1 {
            // One activation row: the output features are contiguous, so each task writes its
            // own slice of `out`.
            out.par_chunks_mut(chunk)
                .enumerate()
                .for_each(|(index, part)| matmul(&self.weights, span_of(index), x, part));
            return;
        }
        // Several rows (a prompt): each task fills a buffer of its own, laid out by activation
        // row, which is then copied into place.
        let parts: Vec<(RowSpan, Vec<f32>)> = (0..self.rows.div_ceil(chunk))
            .into_par_iter()
            .map(|index| {
                let span = span_of(index);
                let mut part = vec![0f32; m * span.rows];
                matmul(&self.weights, span, x, &mut part);
                (span, part)
            })
            .collect();
        for (span, part) in parts {
            for (i, values) in part.chunks_exact(span.rows).enumerate() {
                let at = i * self.rows + span.first;
                out[at..at + span.rows].copy_from_slice(values);
            }
        }
    }
}

/// Below this many weights a matrix is multiplied on the calling thread: handing work to
/// another thread costs a few microseconds, as much as the whole product.
const PARALLEL_MIN_WEIGHTS: usize = 64 * 1024;
/// Tasks per thread in a parallel product: more than one, so that a thread slowed down (the
/// server runs on the same cores) is made up for by the others taking its share.
const TASKS_PER_THREAD: usize = 4;

/// The weight rows `first..first + rows` of a matrix of `cols` inputs; their results go to
/// `out[i × stride + (row - first)]` for activation row `i`.
#[derive(Debug, Clone, Copy)]
struct RowSpan {
    first: usize,
    rows: usize,
    cols: usize,
    stride: usize,
}

/// Picks the widest instruction set this CPU has for [`matmul_portable`]'s loops.
#[allow(unsafe_code)]
fn matmul(w: &Q8, span: RowSpan, x: &Q8, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: `matmul_avx2` only differs from `matmul_portable` in the instructions the
        // compiler may use, and this CPU has them: both features were detected just above.
        return unsafe { matmul_avx2(w, span, x, out) };
    }
    matmul_portable(w, span, x, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn matmul_avx2(w: &Q8, span: RowSpan, x: &Q8, out: &mut [f32]) {
    matmul_portable(w, span, x, out)
}

/// Each weight row is read once and met by every activation row while it is in L1.
#[inline(always)]
fn matmul_portable(w: &Q8, span: RowSpan, x: &Q8, out: &mut [f32]) {
    let RowSpan {
        first,
        rows,
        cols,
        stride,
    } = span;
    let blocks = cols / BLOCK;
    for row in 0..rows {
        let at = first + row;
        let wq = &w.quants[at * cols..(at + 1) * cols];
        let ws = &w.scales[at * blocks..(at + 1) * blocks];
        for (i, (xq, xs)) in x
            .quants
            .chunks_exact(cols)
            .zip(x.scales.chunks_exact(blocks))
            .enumerate()
        {
            out[i * stride + row] = row_dot(wq, ws, xq, xs);
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

    fn dequantized(q: &Q8) -> Vec<f64> {
        q.quants
            .iter()
            .enumerate()
            .map(|(i, v)| f64::from(*v) * f64::from(q.scales[i / BLOCK]))
            .collect()
    }

    fn decoded(matrix: &Matrix) -> Vec<f64> {
        let mut row = vec![0f32; matrix.cols];
        (0..matrix.rows)
            .flat_map(|r| {
                matrix.row(r, &mut row);
                row.iter().map(|v| f64::from(*v)).collect::<Vec<_>>()
            })
            .collect()
    }

    fn wave(i: usize, f: f32) -> f32 {
        ((i as f32) * f).sin()
    }

    /// The product of `rows × cols` weights and `m` activation rows, checked against the
    /// decoded values in f64, and the same whichever thread count computes it.
    fn check_product(rows: usize, cols: usize, m: usize) {
        let weights: Vec<f32> = (0..rows * cols).map(|i| wave(i, 0.37)).collect();
        let x: Vec<f32> = (0..m * cols).map(|i| wave(i, 1.3) * 4.0).collect();
        let matrix = Matrix::from_f32(&weights, rows, cols).unwrap();
        let x = Q8::from_f32(&x);
        let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build();
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build();
        let product = |pool: &rayon::ThreadPool| {
            let mut out = vec![0f32; m * rows];
            pool.install(|| matrix.apply(&x, m, &mut out));
            out
        };
        let out = product(&one_thread.unwrap());
        let (wd, xd) = (decoded(&matrix), dequantized(&x));
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
        assert_eq!(out, product(&three.unwrap()), "split across threads");
    }

    #[test]
    fn products_are_the_dot_products_of_the_quantised_values() {
        check_product(37, 96, 3);
        // Large enough to be split across threads, with a last task shorter than the rest.
        check_product(1001, 96, 1);
        check_product(1001, 96, 5);
    }

    #[test]
    fn quantising_loses_at_most_half_a_step() {
        let weights: Vec<f32> = (0..64 * 96).map(|i| wave(i, 0.37) * 3.0).collect();
        let round_trip = dequantized(&Q8::from_f32(&weights));
        for (block, values) in round_trip.chunks(BLOCK).zip(weights.chunks(BLOCK)) {
            let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in block.iter().zip(values) {
                assert!((a - f64::from(*b)).abs() <= f64::from(max) * 0.5 / 127.0 + 1e-6);
            }
        }
    }

    #[test]
    fn rounding_matches_the_standard_library() {
        for v in (-128_000..=128_000)
            .map(|i| i as f32 / 1000.0)
            .chain([0.5, -0.5, 2.5])
        {
            assert_eq!(round_half_away(v), v.round(), "{v}");
        }
    }

    #[test]
    fn sizes_must_fill_whole_blocks() {
        assert!(Matrix::from_f32(&[0.0; 30], 1, 30).is_err());
    }
}
