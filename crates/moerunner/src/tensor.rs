//! Host tensors: a dtype, a shape and little-endian bytes that are either owned or borrowed from a
//! memory-mapped file (so checkpoints and layer files are never copied whole).

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use half::{bf16, f16};

use crate::error::{MoeError, Result};

/// Element types that cross the library boundary (the safetensors dtypes of `spec/layer-file.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    F8E4M3,
    U8,
    I32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 | DType::U8 => 1,
        }
    }
    /// The safetensors spelling.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
            DType::U8 => "U8",
            DType::I32 => "I32",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Tensor bytes, owned or a window into a shared memory map.
#[derive(Clone)]
pub enum Bytes {
    Owned(Vec<u8>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        start: usize,
        len: usize,
    },
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Mapped { map, start, len } => &map[*start..*start + *len],
        }
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.len())
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Bytes::Owned(v)
    }
}

#[derive(Clone, Debug)]
pub struct HostTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Bytes,
}

impl HostTensor {
    /// Wraps bytes after checking their length against dtype × shape.
    pub fn new(name: &str, dtype: DType, shape: Vec<usize>, bytes: Bytes) -> Result<Self> {
        let want = shape.iter().product::<usize>() * dtype.size();
        if bytes.len() != want {
            return Err(MoeError::invalid(
                format!("tensor `{name}`"),
                format!(
                    "{} bytes do not match {dtype} {shape:?} ({want} bytes)",
                    bytes.len()
                ),
            ));
        }
        Ok(HostTensor {
            dtype,
            shape,
            bytes,
        })
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        Self::encode_f32(DType::F32, shape, values)
    }
    pub fn from_i32(shape: Vec<usize>, values: &[i32]) -> Self {
        let bytes = values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>();
        HostTensor {
            dtype: DType::I32,
            shape,
            bytes: bytes.into(),
        }
    }
    pub fn from_u8(dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        HostTensor {
            dtype,
            shape,
            bytes: bytes.into(),
        }
    }
    /// Encodes f32 values as F32, F16 or BF16 (round to nearest even). Panics on other dtypes:
    /// a programming error, never reachable from user input.
    pub fn encode_f32(dtype: DType, shape: Vec<usize>, values: &[f32]) -> Self {
        let bytes: Vec<u8> = match dtype {
            DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::BF16 => values
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
            DType::F16 => values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            other => panic!("encode_f32 into {other} is not a float encoding"),
        };
        HostTensor {
            dtype,
            shape,
            bytes: bytes.into(),
        }
    }
    /// Decodes an F32, F16 or BF16 tensor to f32 (exact).
    pub fn to_f32_vec(&self, name: &str) -> Result<Vec<f32>> {
        let b = &self.bytes[..];
        Ok(match self.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => return Err(MoeError::dtype(name, "F32, F16 or BF16", other)),
        })
    }
    pub fn to_i32_vec(&self, name: &str) -> Result<Vec<i32>> {
        if self.dtype != DType::I32 {
            return Err(MoeError::dtype(name, "I32", self.dtype));
        }
        Ok(self
            .bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    /// Checks the dtype is one of `allowed`.
    pub fn expect_dtype(&self, name: &str, allowed: &[DType]) -> Result<()> {
        if allowed.contains(&self.dtype) {
            return Ok(());
        }
        let names: Vec<&str> = allowed.iter().map(|d| d.name()).collect();
        Err(MoeError::dtype(name, names.join(" or "), self.dtype))
    }
    /// Checks the shape equals `expected` exactly.
    pub fn expect_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        if self.shape == expected {
            return Ok(());
        }
        Err(MoeError::shape(name, format!("{expected:?}"), &self.shape))
    }
}
