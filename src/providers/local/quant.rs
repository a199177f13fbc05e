//! Reading the block formats GGUF stores weights in; the products over them, and the formats
//! weights are kept in while serving, are in [`super::matmul`].

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

    #[test]
    fn sizes_must_fill_whole_blocks() {
        assert_eq!(Kind::Q4_1.bytes_for(64), Some(40));
        assert_eq!(Kind::Q8_0.bytes_for(33), None);
        assert_eq!(Kind::F16.bytes_for(3), Some(6));
    }
}
