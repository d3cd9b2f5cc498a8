//! One projection (W13 or W2) as the kernels read it: each expert's rows as bytes of a
//! [`Codec`] plus the per-group factors that turn raw decoded values into weights.
//!
//! Design decision: factors are computed per row on the fly from the stored scales (tables of
//! 256 entries for the byte-coded scales), never expanded to an f32 copy, so the bytes streamed
//! per weight stay what `spec/performance.md` counts.

use super::simd::{e4m3_raw, Codec, RowFormat, E4M3_RAW_FACTOR};
use crate::config::WeightFormat;
use crate::weights::{BlockScales, QuantizedTensor};

/// Where a kernel's rows come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Kernels decode the stored bytes themselves.
    Native,
    /// The folded factor would overflow f32 (E4M3 raw values carry 2^-120, so a scale ≥ 2^8
    /// cannot be folded): rows go through `QuantizedTensor::decode_rows_f32` into f32 first.
    Decoded,
}

/// How one projection is read; built once when a layer is loaded.
#[derive(Clone, Debug)]
pub struct ProjectionPlan {
    pub source: Source,
    /// The format kernels see (F32 for [`Source::Decoded`]).
    pub fmt: RowFormat,
    /// Byte scale code → factor (UE8M0 or E4M3 scales).
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
            WeightFormat::Nvfp4 => e4m3_raw(b as u8) * E4M3_RAW_FACTOR,
            _ => 1.0,
        }));
        let mut plan = ProjectionPlan {
            source: Source::Native,
            fmt: RowFormat::new(codec, k, group),
            table,
        };
        if !plan.factors_fold(t) {
            plan.source = Source::Decoded;
            plan.fmt = RowFormat::new(Codec::F32, k, k);
        }
        plan
    }

    /// Whether every factor of every row is a finite f32 (checked once at load).
    fn factors_fold(&self, t: &QuantizedTensor) -> bool {
        let finite = |v: f64| v.is_finite() && v.abs() <= f32::MAX as f64;
        let raw = E4M3_RAW_FACTOR as f64;
        match &t.scales {
            BlockScales::None => true,
            BlockScales::PerExpert(s) | BlockScales::Block128(s) => {
                s.iter().all(|&v| finite(v as f64 * raw))
            }
            BlockScales::Ue8m0(s) => s.iter().all(|&b| self.table[usize::from(b)].is_finite()),
            BlockScales::E4m3(s) => {
                let max_scale = s
                    .iter()
                    .map(|&b| self.table[usize::from(b)].abs() as f64)
                    .fold(0.0, f64::max);
                let max_global = t
                    .global_scales
                    .iter()
                    .map(|g| g.abs() as f64)
                    .fold(0.0, f64::max);
                finite(max_scale * max_global)
            }
        }
    }

    /// The bytes of row `r` of local expert `e` (native source).
    #[inline]
    pub fn row<'a>(&self, t: &'a QuantizedTensor, e: usize, r: usize) -> &'a [u8] {
        let rb = t.row_data_bytes();
        let base = e * t.expert_data_bytes() + r * rb;
        &t.data[base..base + rb]
    }

    /// Writes the factors of row `r` of expert `e` into `out[..fmt.groups()]` (native source).
    pub fn factors(&self, t: &QuantizedTensor, e: usize, r: usize, out: &mut [f32]) {
        let groups = self.fmt.groups();
        let out = &mut out[..groups];
        let raw = E4M3_RAW_FACTOR;
        match &t.scales {
            BlockScales::None => {}
            BlockScales::PerExpert(s) => out.fill(s[e] * raw),
            BlockScales::Block128(s) => {
                let (row_blocks, col_blocks) = (t.rows.div_ceil(128), t.cols.div_ceil(128));
                let base = (e * row_blocks + r / 128) * col_blocks;
                for (o, &v) in out.iter_mut().zip(&s[base..base + col_blocks]) {
                    *o = v * raw;
                }
            }
            BlockScales::Ue8m0(s) => {
                let base = (e * t.rows + r) * groups;
                for (o, &b) in out.iter_mut().zip(&s[base..base + groups]) {
                    *o = self.table[usize::from(b)];
                }
            }
            BlockScales::E4m3(s) => {
                let base = (e * t.rows + r) * groups;
                let g = t.global_scales[e];
                for (o, &b) in out.iter_mut().zip(&s[base..base + groups]) {
                    *o = self.table[usize::from(b)] * g;
                }
            }
        }
    }
}
