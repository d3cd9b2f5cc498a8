//! One projection (W13 or W2) as the kernels read it: each expert's rows as bytes of a
//! [`Codec`] plus the per-group factors that turn raw decoded values into weights.
//!
//! Design decision: factors are computed per row on the fly from the stored scales (tables of
//! 256 entries for the byte-coded scales), never expanded to an f32 copy, so the bytes streamed
//! per weight stay what `spec/performance.md` counts.

use std::ops::Range;

use super::simd::{self, e4m3_raw, Codec, RowFormat, Scale, E4M3_RAW_FACTOR};
use crate::config::WeightFormat;
use crate::weights::{BlockScales, QuantizedTensor};

/// Where a kernel's rows come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Kernels decode the stored bytes themselves.
    Native,
    /// Rows go through `QuantizedTensor::decode_rows_f32` into f32 first: when a folded factor
    /// would overflow f32 (E4M3 raw values carry 2^-120, so a scale ≥ 2^8 cannot be folded), or
    /// when E4M3 elements hold NaN codes (the in-register decoder has no NaN; the exact decoder
    /// keeps the spec's NaN, which then reaches the output as the reference's does).
    Decoded,
}

/// How one projection is read; built once when a layer is loaded.
#[derive(Clone, Debug)]
pub struct ProjectionPlan {
    pub source: Source,
    codec: Codec,
    k: usize,
    group: usize,
    /// Byte scale code → factor, constants folded in (UE8M0 and E4M3 scales).
    table: Box<[f32; 256]>,
}

impl ProjectionPlan {
    pub fn new(t: &QuantizedTensor) -> ProjectionPlan {
        let k = t.cols;
        let (codec, group) = match t.format {
            WeightFormat::Bf16 => (Codec::Bf16, k),
            WeightFormat::Fp8 => (Codec::E4m3, k),
            WeightFormat::Fp8Block => (Codec::E4m3, 128),
            WeightFormat::Mxfp8 => (Codec::E4m3, 32),
            WeightFormat::Mxfp4 => (Codec::E2m1, 32),
            WeightFormat::Nvfp4 => (Codec::E2m1, 16),
        };
        let table: Box<[f32; 256]> = Box::new(std::array::from_fn(|b| match t.format {
            // 2^(b − 127), times 2^120 for E4M3 raw values (infinite past b = 134: not foldable).
            WeightFormat::Mxfp8 => (2f64.powi(b as i32 - 127) * E4M3_RAW_FACTOR as f64) as f32,
            WeightFormat::Mxfp4 => 2f64.powi(b as i32 - 127) as f32,
            // The E4M3 block scale's value; the expert's global scale multiplies the dot product.
            WeightFormat::Nvfp4 => e4m3_raw(b as u8) * E4M3_RAW_FACTOR,
            _ => 1.0,
        }));
        let mut plan = ProjectionPlan {
            source: Source::Native,
            codec,
            k,
            group,
            table,
        };
        // One vectorized pass over the element bytes at load (the weights are read anyway).
        let nan_codes = codec == Codec::E4m3 && t.data.iter().any(|&b| b & 0x7F == 0x7F);
        if !plan.factors_fold(t) || nan_codes {
            plan.source = Source::Decoded;
        }
        plan
    }

    /// Whether every factor of every row is a finite f32 (checked once at load).
    fn factors_fold(&self, t: &QuantizedTensor) -> bool {
        let raw = E4M3_RAW_FACTOR as f64;
        match &t.scales {
            BlockScales::None | BlockScales::E4m3(_) => true,
            BlockScales::PerExpert(s) | BlockScales::Block128(s) => {
                s.iter().all(|&v| (v as f64 * raw).abs() <= f32::MAX as f64)
            }
            BlockScales::Ue8m0(s) => s.iter().all(|&b| self.table[usize::from(b)].is_finite()),
        }
    }

    /// The format kernels read expert `e`'s rows in.
    pub fn fmt_for(&self, t: &QuantizedTensor, e: usize) -> RowFormat<'_> {
        if self.source == Source::Decoded {
            return RowFormat::f32(self.k);
        }
        let scale = match &t.scales {
            BlockScales::None => Scale::None,
            BlockScales::PerExpert(_) | BlockScales::Block128(_) => Scale::F32 {
                mul: E4M3_RAW_FACTOR,
            },
            BlockScales::Ue8m0(_) | BlockScales::E4m3(_) => Scale::Table(&self.table),
        };
        let out_mul = t.global_scales.get(e).copied().unwrap_or(1.0);
        RowFormat::new(self.codec, self.k, self.group, scale, out_mul)
    }

    /// The codec activation rows must be ordered for.
    pub fn codec(&self) -> Codec {
        if self.source == Source::Decoded {
            Codec::F32
        } else {
            self.codec
        }
    }

    /// Bytes of one row as the kernels read it.
    pub fn row_bytes(&self) -> usize {
        self.codec().bytes(self.k)
    }

    /// The bytes of row `r` of local expert `e` (native source).
    #[inline]
    pub fn row<'a>(&self, t: &'a QuantizedTensor, e: usize, r: usize) -> &'a [u8] {
        let rb = t.row_data_bytes();
        let base = e * t.expert_data_bytes() + r * rb;
        &t.data[base..base + rb]
    }

    /// The bytes and scale bytes of local expert `e`'s rows `rows`, back to back (native source;
    /// `None` unless the scales are one byte a group, the E2M1 and MX formats).
    pub fn row_block<'a>(
        &self,
        t: &'a QuantizedTensor,
        e: usize,
        rows: Range<usize>,
    ) -> Option<(&'a [u8], &'a [u8])> {
        let rb = t.row_data_bytes();
        let base = e * t.expert_data_bytes();
        let data = &t.data[base + rows.start * rb..base + rows.end * rb];
        match &t.scales {
            BlockScales::Ue8m0(s) | BlockScales::E4m3(s) => {
                let groups = t.cols / self.group;
                let first = e * t.rows;
                Some((
                    data,
                    &s[(first + rows.start) * groups..(first + rows.end) * groups],
                ))
            }
            _ => None,
        }
    }

    /// The scale bytes of row `r` of local expert `e` (native source; empty when unscaled).
    #[inline]
    pub fn scales<'a>(&self, t: &'a QuantizedTensor, e: usize, r: usize) -> &'a [u8] {
        match &t.scales {
            BlockScales::None => &[],
            BlockScales::PerExpert(s) => simd::f32_bytes(&s[e..e + 1]),
            BlockScales::Block128(s) => {
                let (row_blocks, col_blocks) = (t.rows.div_ceil(128), t.cols.div_ceil(128));
                let base = (e * row_blocks + r / 128) * col_blocks;
                simd::f32_bytes(&s[base..base + col_blocks])
            }
            BlockScales::Ue8m0(s) | BlockScales::E4m3(s) => {
                let groups = t.cols / self.group;
                let base = (e * t.rows + r) * groups;
                &s[base..base + groups]
            }
        }
    }
}
