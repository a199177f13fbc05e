//! A reader for GGUF, llama.cpp's model file: a header of typed metadata (hyper-parameters, the
//! tokenizer's vocabulary and merges), a directory of tensors, then their data.
//!
//! Why our own: candle-core was the only other reader, and Mangoo used nothing else of it but one
//! matmul — yet it was the longest unit of a cold build (three minutes of CPU with its tokenizer
//! dependency). The format is small; what it needs is care with lengths, because every length in
//! the file is a number someone else wrote: each one is checked against the bytes the file has
//! before anything is allocated for it.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use super::error::ModelError;
use super::quant;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// More dimensions than any llama.cpp tensor has (it stops at four).
const MAX_DIMS: u32 = 4;

fn format_error(message: impl Into<String>) -> ModelError {
    ModelError::Format(message.into())
}

/// One metadata value, as typed in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any non-negative integer that fits a `usize`.
    pub fn to_usize(&self) -> Option<usize> {
        let wide: i128 = match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        };
        usize::try_from(wide).ok()
    }

    pub fn to_i32(&self) -> Option<i32> {
        match *self {
            Value::I32(v) => Some(v),
            Value::U32(v) => i32::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn to_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(values) => Some(values),
            _ => None,
        }
    }
}

/// Where one tensor's data is and how it is stored.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Dimensions as GGUF lists them: the first is the one that varies fastest (a row's length).
    pub dims: Vec<usize>,
    pub kind: quant::Kind,
    /// From the start of the data section.
    offset: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A GGUF file's header: metadata and the tensor directory. Tensor data is read on demand.
pub struct GgufFile {
    metadata: HashMap<String, Value>,
    tensors: HashMap<String, TensorInfo>,
    data_start: u64,
    file_len: u64,
}

impl GgufFile {
    pub fn read<R: Read + Seek>(reader: &mut R) -> Result<Self, ModelError> {
        let file_len = reader.seek(SeekFrom::End(0)).map_err(io_error)?;
        reader.seek(SeekFrom::Start(0)).map_err(io_error)?;
        let mut header = Header {
            reader,
            remaining: file_len,
        };
        if &header.bytes::<4>()? != MAGIC {
            return Err(format_error("not a GGUF file (bad magic)"));
        }
        let version = header.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format_error(format!(
                "GGUF version {version} is not supported"
            )));
        }
        let tensor_count = header.count()?;
        let metadata_count = header.count()?;
        let mut metadata = HashMap::new();
        for _ in 0..metadata_count {
            let key = header.string()?;
            let value_type = header.u32()?;
            let value = header.value(value_type)?;
            metadata.insert(key, value);
        }
        let mut tensors = HashMap::new();
        for _ in 0..tensor_count {
            let name = header.string()?;
            let info = header.tensor_info()?;
            tensors.insert(name, info);
        }
        let alignment = match metadata.get("general.alignment") {
            Some(value) => value
                .to_usize()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| format_error("general.alignment is not a power of two"))?
                as u64,
            None => DEFAULT_ALIGNMENT,
        };
        let header_len = file_len - header.remaining;
        let data_start = header_len.div_ceil(alignment) * alignment;
        Ok(Self {
            metadata,
            tensors,
            data_start,
            file_len,
        })
    }

    pub fn metadata(&self, key: &str) -> Result<&Value, ModelError> {
        self.metadata
            .get(key)
            .ok_or_else(|| format_error(format!("missing metadata {key}")))
    }

    /// An integer hyper-parameter.
    pub fn number(&self, key: &str) -> Result<usize, ModelError> {
        self.metadata(key)?
            .to_usize()
            .ok_or_else(|| format_error(format!("metadata {key} is not a count")))
    }

    pub fn float(&self, key: &str) -> Result<f32, ModelError> {
        self.metadata(key)?
            .to_f32()
            .ok_or_else(|| format_error(format!("metadata {key} is not a number")))
    }

    pub fn array(&self, key: &str) -> Result<&[Value], ModelError> {
        self.metadata(key)?
            .as_array()
            .ok_or_else(|| format_error(format!("metadata {key} is not an array")))
    }

    /// An array of strings, such as the vocabulary.
    pub fn strings(&self, key: &str) -> Result<Vec<&str>, ModelError> {
        self.array(key)?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| format_error(format!("{key} holds a non-string")))
            })
            .collect()
    }

    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo, ModelError> {
        self.tensors
            .get(name)
            .ok_or_else(|| format_error(format!("missing tensor {name}")))
    }

    /// A tensor's values as `f32`, whatever the file stores them as.
    pub fn tensor_f32<R: Read + Seek>(
        &self,
        reader: &mut R,
        name: &str,
    ) -> Result<Vec<f32>, ModelError> {
        let info = self.tensor_info(name)?;
        let elements = info.elements();
        let bytes = info
            .kind
            .bytes_for(elements)
            .ok_or_else(|| format_error(format!("tensor {name} does not fill whole blocks")))?;
        let start = self.data_start.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(bytes as u64));
        match (start, end) {
            (Some(start), Some(end)) if end <= self.file_len => {
                reader.seek(SeekFrom::Start(start)).map_err(io_error)?;
            }
            _ => return Err(format_error(format!("tensor {name} lies outside the file"))),
        }
        let mut raw = vec![0u8; bytes];
        reader.read_exact(&mut raw).map_err(io_error)?;
        let mut values = vec![0f32; elements];
        quant::dequantize(info.kind, &raw, &mut values);
        Ok(values)
    }
}

fn io_error(e: std::io::Error) -> ModelError {
    format_error(format!("read failed: {e}"))
}

/// The header being read, with the bytes still left in the file: no length is trusted beyond it.
struct Header<'a, R> {
    reader: &'a mut R,
    remaining: u64,
}

impl<R: Read> Header<'_, R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], ModelError> {
        self.take(N as u64)?;
        let mut buffer = [0u8; N];
        self.reader.read_exact(&mut buffer).map_err(io_error)?;
        Ok(buffer)
    }

    /// Claims `n` bytes of what is left, or fails: the file is shorter than it says.
    fn take(&mut self, n: u64) -> Result<(), ModelError> {
        self.remaining = self
            .remaining
            .checked_sub(n)
            .ok_or_else(|| format_error("the file ends early (truncated or a length is wrong)"))?;
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// A count of things each taking at least one byte: never more than the bytes left.
    fn count(&mut self) -> Result<u64, ModelError> {
        let count = self.u64()?;
        if count > self.remaining {
            return Err(format_error("a count is larger than the file"));
        }
        Ok(count)
    }

    fn string(&mut self) -> Result<String, ModelError> {
        let len = self.count()?;
        self.take(len)?;
        let mut buffer = vec![0u8; len as usize];
        self.reader.read_exact(&mut buffer).map_err(io_error)?;
        String::from_utf8(buffer).map_err(|_| format_error("a string is not UTF-8"))
    }

    fn value(&mut self, value_type: u32) -> Result<Value, ModelError> {
        Ok(match value_type {
            0 => Value::U8(u8::from_le_bytes(self.bytes()?)),
            1 => Value::I8(i8::from_le_bytes(self.bytes()?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => Value::Bool(u8::from_le_bytes(self.bytes()?) != 0),
            8 => Value::String(self.string()?),
            9 => {
                let element_type = self.u32()?;
                if element_type == 9 {
                    return Err(format_error("nested metadata arrays are not supported"));
                }
                let count = self.count()?;
                let mut values = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    values.push(self.value(element_type)?);
                }
                Value::Array(values)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            other => return Err(format_error(format!("unknown metadata type {other}"))),
        })
    }

    fn tensor_info(&mut self) -> Result<TensorInfo, ModelError> {
        let n_dims = self.u32()?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format_error(format!("a tensor has {n_dims} dimensions")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut elements: usize = 1;
        for _ in 0..n_dims {
            let dim = usize::try_from(self.u64()?).ok();
            elements = dim
                .and_then(|d| elements.checked_mul(d))
                .ok_or_else(|| format_error("a tensor's size overflows"))?;
            dims.push(dim.unwrap_or_default());
        }
        let kind = quant::Kind::from_ggml(self.u32()?)?;
        let offset = self.u64()?;
        Ok(TensorInfo { dims, kind, offset })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// A GGUF with two metadata keys and one 2×32 F32 tensor holding 0, 1, 2, ...
    fn small_file() -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(MAGIC);
        out.extend(3u32.to_le_bytes());
        out.extend(1u64.to_le_bytes());
        out.extend(2u64.to_le_bytes());
        string(&mut out, "llama.block_count");
        out.extend(4u32.to_le_bytes());
        out.extend(30u32.to_le_bytes());
        string(&mut out, "tokenizer.ggml.tokens");
        out.extend(9u32.to_le_bytes());
        out.extend(8u32.to_le_bytes());
        out.extend(2u64.to_le_bytes());
        string(&mut out, "a");
        string(&mut out, "b");
        string(&mut out, "w");
        out.extend(2u32.to_le_bytes());
        out.extend(32u64.to_le_bytes());
        out.extend(2u64.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        while out.len() % 32 != 0 {
            out.push(0);
        }
        for i in 0..64 {
            out.extend((i as f32).to_le_bytes());
        }
        out
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let bytes = small_file();
        let mut reader = Cursor::new(bytes);
        let file = GgufFile::read(&mut reader).unwrap();
        assert_eq!(file.number("llama.block_count").unwrap(), 30);
        assert_eq!(file.strings("tokenizer.ggml.tokens").unwrap(), ["a", "b"]);
        assert_eq!(file.tensor_info("w").unwrap().dims, [32, 2]);
        let values = file.tensor_f32(&mut reader, "w").unwrap();
        assert_eq!(values, (0..64).map(|i| i as f32).collect::<Vec<_>>());
        assert!(file.number("missing").is_err());
    }

    #[test]
    fn lengths_beyond_the_file_are_refused_before_allocating() {
        let mut bytes = small_file();
        // The first key's length, made absurd.
        bytes[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        let error = GgufFile::read(&mut Cursor::new(bytes)).err().unwrap();
        assert!(
            error.to_string().contains("larger than the file"),
            "{error}"
        );

        let mut truncated = small_file();
        truncated.truncate(truncated.len() - 4);
        let mut reader = Cursor::new(truncated);
        let file = GgufFile::read(&mut reader).unwrap();
        let error = file.tensor_f32(&mut reader, "w").err().unwrap();
        assert!(error.to_string().contains("outside the file"), "{error}");

        let mut not_gguf = small_file();
        not_gguf[0] = b'X';
        assert!(GgufFile::read(&mut Cursor::new(not_gguf)).is_err());
    }
}
