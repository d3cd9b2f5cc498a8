//! One projection (W13 or W2) as the kernels read it: each expert's rows as bytes of a
//! [`Codec`] plus the per-group factors that turn raw decoded values into weights.
//!
//! Design decision: factors are computed per row on the fly from the stored scales (tables of
//! 256 entries for the byte-coded scales), never expanded to an f32 copy, so the bytes streamed
//! per weight stay what `spec/performance.md` counts.

use std::ops::Range;

use super::simd::{self, e4m3_raw, Codec, Isa, PairScales, RowFormat, Scale, E4M3_RAW_FACTOR};
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
    /// mxfp4 only: the UE8M0 scales again, regrouped by row pairs for the one-token integer
    /// kernel ([`PairScales`]).
    pair_scales: Option<PairScaleCopy>,
}

/// Every expert's UE8M0 scales with rows 2p and 2p + 1 interleaved per group (an odd last row
/// paired with itself): `bytes[((e · pairs + p) · groups + g) · 2 + i]` is row 2p + i's scale of
/// group g. Design decision: a copy (1/16 of the mxfp4 weight bytes) so that one 16-bit load
/// gives the integer kernel both rows' factors of a chunk; the kernel then builds the factor
/// vector with a shuffle and a shift instead of two table lookups, a blend and a multiply
/// (~20 % more weights a second, measured).
#[derive(Clone, Debug)]
struct PairScaleCopy {
    bytes: Vec<u8>,
    /// Row pairs per expert.
    pairs: usize,
    groups: usize,
    /// Least and greatest scale byte.
    range: (u8, u8),
}

impl PairScaleCopy {
    fn new(t: &QuantizedTensor, s: &[u8], groups: usize) -> Option<PairScaleCopy> {
        let (lo, hi) = s
            .iter()
            .fold((u8::MAX, u8::MIN), |(lo, hi), &b| (lo.min(b), hi.max(b)));
        if s.is_empty() || t.rows == 0 {
            return None;
        }
        let pairs = t.rows.div_ceil(2);
        let mut bytes = Vec::with_capacity(t.experts * pairs * groups * 2);
        for e in 0..t.experts {
            let row = |r: usize| &s[(e * t.rows + r) * groups..(e * t.rows + r + 1) * groups];
            for p in 0..pairs {
                let (a, b) = (row(2 * p), row((2 * p + 1).min(t.rows - 1)));
                bytes.extend(a.iter().zip(b).flat_map(|(&x, &y)| [x, y]));
            }
        }
        Some(PairScaleCopy {
            bytes,
            pairs,
            groups,
            range: (lo, hi),
        })
    }
}

impl ProjectionPlan {
    /// `isa`: the kernels that will read it (the row-pair scale copy is made only for a CPU that
    /// runs the integer kernel).
    pub fn new(t: &QuantizedTensor, isa: Isa) -> ProjectionPlan {
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
            pair_scales: None,
        };
        // One vectorized pass over the element bytes at load (the weights are read anyway).
        let nan_codes = codec == Codec::E4m3 && t.data.iter().any(|&b| b & 0x7F == 0x7F);
        if !plan.factors_fold(t) || nan_codes {
            plan.source = Source::Decoded;
        }
        if let (WeightFormat::Mxfp4, BlockScales::Ue8m0(s), Source::Native, true) = (
            t.format,
            &t.scales,
            plan.source,
            simd::has_fixed_kernel(isa, Codec::E2m1),
        ) {
            plan.pair_scales = PairScaleCopy::new(t, s, k / group);
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

    /// Local expert `e`'s scales of rows `rows` regrouped by pairs, pairs starting at
    /// `rows.start` (mxfp4 only, and only for an even `rows.start`).
    pub fn pair_scale_block(&self, e: usize, rows: Range<usize>) -> Option<PairScales<'_>> {
        let c = self.pair_scales.as_ref()?;
        if !rows.start.is_multiple_of(2) {
            return None;
        }
        let first = e * c.pairs;
        let (p0, p1) = (first + rows.start / 2, first + rows.end.div_ceil(2));
        Some(PairScales {
            bytes: &c.bytes[p0 * c.groups * 2..p1 * c.groups * 2],
            range: c.range,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An mxfp4 tensor of `experts` × `rows` × 64 whose scale byte of (expert, row, group) is
    /// `code(e, r, g)`, and its plan.
    fn mxfp4(
        experts: usize,
        rows: usize,
        code: impl Fn(usize, usize, usize) -> u8,
    ) -> QuantizedTensor {
        let cols = 64;
        let scales = (0..experts * rows * 2)
            .map(|i| code(i / (rows * 2), i / 2 % rows, i % 2))
            .collect();
        QuantizedTensor {
            format: WeightFormat::Mxfp4,
            experts,
            rows,
            cols,
            data: vec![0x21; experts * rows * cols / 2].into(),
            scales: BlockScales::Ue8m0(scales),
            global_scales: Vec::new(),
        }
    }

    #[test]
    fn mxfp4_scales_regroup_by_row_pairs() {
        // 3 experts × 5 rows (an odd last row pairs with itself); byte = 100 + 10e + 2r + g.
        let t = mxfp4(3, 5, |e, r, g| (100 + 10 * e + 2 * r + g) as u8);
        if !simd::has_fixed_kernel(Isa::Avx2Fma, Codec::E2m1) {
            eprintln!("skipped: this CPU has no integer E2M1 kernel (no copy is made)");
            return;
        }
        let plan = ProjectionPlan::new(&t, Isa::Avx2Fma);
        assert!(ProjectionPlan::new(&t, Isa::Scalar)
            .pair_scale_block(0, 0..2)
            .is_none());
        let p = plan.pair_scale_block(1, 2..5).expect("even start");
        // Pairs (2, 3) and (4, 4) of expert 1, groups interleaved row by row.
        assert_eq!(p.bytes, &[114, 116, 115, 117, 118, 118, 119, 119]);
        assert_eq!(p.range, (100, 129));
        let first = plan.pair_scale_block(0, 0..1).expect("even start");
        assert_eq!(first.bytes, &[100, 102, 101, 103]);
        assert!(plan.pair_scale_block(2, 1..3).is_none(), "odd start");
        // Other formats keep only their row-major scales.
        let nv = QuantizedTensor {
            format: WeightFormat::Nvfp4,
            scales: BlockScales::E4m3(vec![0x38; 3 * 5 * 4]),
            global_scales: vec![1.0; 3],
            ..mxfp4(3, 5, |_, _, _| 127)
        };
        assert!(ProjectionPlan::new(&nv, Isa::Avx2Fma)
            .pair_scale_block(0, 0..2)
            .is_none());
    }
}
