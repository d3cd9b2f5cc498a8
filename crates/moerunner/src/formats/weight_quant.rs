//! Weight quantizers (f32 → any weight format, bit-exact per `spec/formats.md`) and decoders of
//! quantized rows: the one primitive every backend and the reference build on.

use std::ops::Range;

use super::{e2m1, e4m3, ue8m0};
use crate::config::WeightFormat;
use crate::error::{MoeError, Result};
use crate::weights::{BlockScales, QuantizedTensor};

/// fp8 scales never go below this amax, so an all-zero block still gets a finite, nonzero scale.
pub const FP8_AMAX_FLOOR: f32 = 1e-10;
/// 448 · 6: the ModelOpt divisor of NVFP4 global scales.
pub const NVFP4_GLOBAL_DIVISOR: f32 = 448.0 * 6.0;

pub(crate) fn amax(values: &[f32]) -> f32 {
    values.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// The UE8M0 byte and its f32 scale for a block of amax `amax` whose element format's largest
/// value is `elem_max` (ceil-pow2 rule; amax = 0 → byte 0).
pub(crate) fn mx_scale(amax: f32, elem_max: f32) -> (u8, f32) {
    let byte = if amax == 0.0 { 0 } else { ue8m0::encode_ceil(amax / elem_max) };
    (byte, ue8m0::decode(byte))
}

/// The E4M3 scale byte and effective f32 scale s = dec(byte)·g of an NVFP4 block.
pub(crate) fn nvfp4_scale(amax: f32, global: f32) -> (u8, f32) {
    let byte = e4m3::encode(amax / e2m1::MAX / global);
    (byte, e4m3::decode(byte) * global)
}

/// E2M1 code of x / s, or code 0 when the block scale is 0 (spec: s = 0 → elements 0).
pub(crate) fn fp4_code(x: f32, s: f32) -> u8 {
    if s == 0.0 { 0 } else { e2m1::encode(x / s) }
}

/// Quantizes f32 weights `[experts, rows, cols]` into `format`.
/// Scales are chosen from the data: fp8 per-tensor s = max(amax_expert, 1e-10)/448; fp8_block
/// s = max(amax_block, 1e-10)/448 per 128×128 block; mx per `spec/formats.md`; nvfp4 with
/// `global_scales` if given, else g = amax_expert / (448·6) per expert (g = 1 for an all-zero
/// expert, where any g gives zeros).
pub fn quantize_weights(
    format: WeightFormat,
    experts: usize,
    rows: usize,
    cols: usize,
    values: &[f32],
    global_scales: Option<&[f32]>,
) -> Result<QuantizedTensor> {
    let n = experts * rows * cols;
    if values.len() != n {
        return Err(MoeError::invalid("quantize_weights", format!(
            "{} values for [{experts}, {rows}, {cols}] ({n} expected)", values.len())));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(MoeError::invalid("quantize_weights", format!("value at index {i} is {}, not finite", values[i])));
    }
    if let Some(block) = format.k_block().filter(|&b| b <= 32) {
        if cols % block != 0 {
            return Err(MoeError::invalid("quantize_weights", format!("{format} needs K = {cols} to be a multiple of {block}")));
        }
    }
    if let Some(g) = global_scales {
        if g.len() != experts || g.iter().any(|v| !v.is_finite() || *v <= 0.0) {
            return Err(MoeError::invalid("global_scales", format!("need {experts} finite positive values")));
        }
    }
    let expert = |e: usize| &values[e * rows * cols..(e + 1) * rows * cols];
    let mut global_out = Vec::new();
    let (data, scales): (Vec<u8>, BlockScales) = match format {
        WeightFormat::Bf16 => (values.iter().flat_map(|v| super::bf16::encode(*v).to_le_bytes()).collect(), BlockScales::None),
        WeightFormat::Fp8 => {
            let mut data = Vec::with_capacity(n);
            let mut s_all = Vec::with_capacity(experts);
            for e in 0..experts {
                let s = amax(expert(e)).max(FP8_AMAX_FLOOR) / e4m3::MAX;
                data.extend(expert(e).iter().map(|v| e4m3::encode(v / s)));
                s_all.push(s);
            }
            (data, BlockScales::PerExpert(s_all))
        }
        WeightFormat::Fp8Block => {
            let (rb, cb) = (rows.div_ceil(128), cols.div_ceil(128));
            let mut data = vec![0u8; n];
            let mut s_all = Vec::with_capacity(experts * rb * cb);
            for e in 0..experts {
                let w = expert(e);
                for bi in 0..rb {
                    for bj in 0..cb {
                        let (r0, r1) = (bi * 128, ((bi + 1) * 128).min(rows));
                        let (c0, c1) = (bj * 128, ((bj + 1) * 128).min(cols));
                        let a = (r0..r1).map(|r| amax(&w[r * cols + c0..r * cols + c1])).fold(0f32, f32::max);
                        let s = a.max(FP8_AMAX_FLOOR) / e4m3::MAX;
                        for r in r0..r1 {
                            for c in c0..c1 {
                                data[e * rows * cols + r * cols + c] = e4m3::encode(w[r * cols + c] / s);
                            }
                        }
                        s_all.push(s);
                    }
                }
            }
            (data, BlockScales::Block128(s_all))
        }
        WeightFormat::Mxfp8 => {
            let mut data = Vec::with_capacity(n);
            let mut bytes = Vec::with_capacity(n / 32);
            for block in values.chunks_exact(32) {
                let (byte, s) = mx_scale(amax(block), e4m3::MAX);
                data.extend(block.iter().map(|v| e4m3::encode(v / s)));
                bytes.push(byte);
            }
            (data, BlockScales::Ue8m0(bytes))
        }
        WeightFormat::Mxfp4 => {
            let mut data = Vec::with_capacity(n / 2);
            let mut bytes = Vec::with_capacity(n / 32);
            for block in values.chunks_exact(32) {
                let (byte, s) = mx_scale(amax(block), e2m1::MAX);
                data.extend(block.chunks_exact(2).map(|p| e2m1::pack(fp4_code(p[0], s), fp4_code(p[1], s))));
                bytes.push(byte);
            }
            (data, BlockScales::Ue8m0(bytes))
        }
        WeightFormat::Nvfp4 => {
            let mut data = Vec::with_capacity(n / 2);
            let mut bytes = Vec::with_capacity(n / 16);
            for e in 0..experts {
                let g = match global_scales {
                    Some(g) => g[e],
                    None => {
                        let a = amax(expert(e));
                        if a == 0.0 { 1.0 } else { a / NVFP4_GLOBAL_DIVISOR }
                    }
                };
                global_out.push(g);
                for block in expert(e).chunks_exact(16) {
                    let (byte, s) = nvfp4_scale(amax(block), g);
                    data.extend(block.chunks_exact(2).map(|p| e2m1::pack(fp4_code(p[0], s), fp4_code(p[1], s))));
                    bytes.push(byte);
                }
            }
            (data, BlockScales::E4m3(bytes))
        }
    };
    Ok(QuantizedTensor { format, experts, rows, cols, data: data.into(), scales, global_scales: global_out })
}

/// Element values of a row (exact), without scales, into `out` (`cols` values).
fn row_elements(t: &QuantizedTensor, e: usize, r: usize, out: &mut [f32]) {
    let rb = t.row_data_bytes();
    let start = e * t.expert_data_bytes() + r * rb;
    let bytes = &t.data[start..start + rb];
    match t.format {
        WeightFormat::Bf16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = super::bf16::decode(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        WeightFormat::Fp8 | WeightFormat::Fp8Block | WeightFormat::Mxfp8 => {
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = e4m3::DECODE[b as usize];
            }
        }
        WeightFormat::Mxfp4 | WeightFormat::Nvfp4 => {
            for (o, &b) in out.chunks_exact_mut(2).zip(bytes) {
                o.copy_from_slice(&e2m1::PAIRS[b as usize]);
            }
        }
    }
}

impl QuantizedTensor {
    /// The dequant scale of (local expert e, row r, column block j) in f64: block scale × global.
    /// `j` counts blocks of `format.k_block()` (ignored for bf16 / per-tensor fp8).
    pub fn block_scale_f64(&self, e: usize, r: usize, j: usize) -> f64 {
        let (rows, cols) = (self.rows, self.cols);
        match &self.scales {
            BlockScales::None => 1.0,
            BlockScales::PerExpert(s) => s[e] as f64,
            BlockScales::Block128(s) => s[(e * rows.div_ceil(128) + r / 128) * cols.div_ceil(128) + j] as f64,
            BlockScales::Ue8m0(b) => ue8m0::decode(b[(e * rows + r) * (cols / 32) + j]) as f64,
            BlockScales::E4m3(b) => {
                e4m3::decode(b[(e * rows + r) * (cols / 16) + j]) as f64 * self.global_scales[e] as f64
            }
        }
    }

    /// Dequantizes rows `rows` of local expert `expert` into `out` (`rows.len() * cols` f32, row-major).
    pub fn decode_rows_f32(&self, expert: usize, rows: Range<usize>, out: &mut [f32]) {
        let cols = self.cols;
        let block = self.format.k_block().unwrap_or(cols.max(1));
        for (i, r) in rows.enumerate() {
            let o = &mut out[i * cols..(i + 1) * cols];
            row_elements(self, expert, r, o);
            if matches!(self.scales, BlockScales::None) {
                continue;
            }
            for (j, chunk) in o.chunks_mut(block).enumerate() {
                let s = self.block_scale_f64(expert, r, j) as f32;
                for v in chunk {
                    *v *= s;
                }
            }
        }
    }

    /// Same as [`decode_rows_f32`](Self::decode_rows_f32) in f64 (element × scale × global, exact).
    pub fn decode_rows_f64(&self, expert: usize, rows: Range<usize>, out: &mut [f64]) {
        let cols = self.cols;
        let block = self.format.k_block().unwrap_or(cols.max(1));
        let mut tmp = vec![0f32; cols];
        for (i, r) in rows.enumerate() {
            row_elements(self, expert, r, &mut tmp);
            let o = &mut out[i * cols..(i + 1) * cols];
            for (j, (oc, tc)) in o.chunks_mut(block).zip(tmp.chunks(block)).enumerate() {
                let s = self.block_scale_f64(expert, r, j);
                for (ov, tv) in oc.iter_mut().zip(tc) {
                    *ov = *tv as f64 * s;
                }
            }
        }
    }
}
