//! Weight quantizers (f32 → any weight format, bit-exact per `spec/formats.md`) and decoders of
//! quantized rows: the one primitive every backend and the reference build on.
//!
//! The quantizers are plain block loops over the spec's rules, kept slow and obvious because they
//! *are* the definition. The row decoders are hot (the CPU backend decodes cache-sized row blocks,
//! the reference whole experts), so they pick one loop per (format, scale kind) once per row and
//! run table lookups inside it: no per-element branch on the format.

use std::ops::{Mul, Range};

use super::{bf16, e2m1, e4m3, ue8m0};
use crate::config::WeightFormat;
use crate::error::{MoeError, Result};
use crate::weights::{BlockScales, QuantizedTensor};

/// fp8 scales never go below this amax, so an all-zero block still gets a finite, nonzero scale.
pub const FP8_AMAX_FLOOR: f32 = 1e-10;
/// 448 · 6: the ModelOpt divisor of NVFP4 global scales (exact in f32).
pub const NVFP4_GLOBAL_DIVISOR: f32 = 448.0 * 6.0;
/// Rows and columns of an fp8_block weight scale block.
pub const FP8_BLOCK: usize = 128;

/// Largest magnitude of `values` (0 for none). NaN-propagating, unlike `f32::max`, so a NaN that
/// reaches an activation quantizer poisons its block's scale (and the output) instead of vanishing
/// into a finite E2M1 code. Weights never get here with a NaN: `quantize_weights` refuses them.
pub(crate) fn amax(values: &[f32]) -> f32 {
    values.iter().fold(0f32, |m, v| {
        let a = v.abs();
        if a > m || a.is_nan() {
            a
        } else {
            m
        }
    })
}

/// The UE8M0 byte and its f32 scale for a block of amax `amax` whose element format's largest
/// value is `elem_max` (ceil-pow2 rule; amax = 0 → byte 0).
pub fn mx_scale(amax: f32, elem_max: f32) -> (u8, f32) {
    let byte = if amax == 0.0 {
        0
    } else {
        ue8m0::encode_ceil(amax / elem_max)
    };
    (byte, ue8m0::decode(byte))
}

/// The E4M3 scale byte and effective f32 scale s = dec(byte)·g of an NVFP4 block.
pub fn nvfp4_scale(amax: f32, global: f32) -> (u8, f32) {
    let byte = e4m3::encode(amax / e2m1::MAX / global);
    (byte, e4m3::decode(byte) * global)
}

/// E2M1 code of x / s, or code 0 when the block scale is 0 (spec: s = 0 → elements 0).
pub(crate) fn fp4_code(x: f32, s: f32) -> u8 {
    if s == 0.0 {
        0
    } else {
        e2m1::encode(x / s)
    }
}

/// Quantizes f32 weights `[experts, rows, cols]` into `format`.
///
/// Scales are chosen from the data: fp8 per-tensor s = max(amax_expert, 1e-10)/448; fp8_block
/// s = max(amax_block, 1e-10)/448 per 128×128 block (partial blocks over the elements present);
/// mxfp8 / mxfp4 ceil-pow2(amax/448) / ceil-pow2(amax/6) per 1×32; nvfp4 per 1×16 with
/// `global_scales` if given (one per expert), else g = amax_expert / (448·6) per expert. An
/// all-zero expert gets g = 1 instead of 0: every block scale is then 0 and every element 0 for any
/// g, and a 0 global would be refused by the layer validator. `global_scales` is ignored by the
/// other formats.
///
/// Errors: `values` not `experts · rows · cols` long, a non-finite value, K (`cols`) not a multiple
/// of the block for mxfp8 / mxfp4 / nvfp4, or `global_scales` of the wrong length or not finite
/// and positive.
pub fn quantize_weights(
    format: WeightFormat,
    experts: usize,
    rows: usize,
    cols: usize,
    values: &[f32],
    global_scales: Option<&[f32]>,
) -> Result<QuantizedTensor> {
    let n = check_weight_values(format, experts, rows, cols, values)?;
    let globals = weight_globals(format, experts, rows * cols, values, global_scales)?;
    let per_expert = rows * cols;
    let expert = |e: usize| &values[e * per_expert..(e + 1) * per_expert];
    let (data, scales): (Vec<u8>, BlockScales) = match format {
        WeightFormat::Bf16 => (
            values
                .iter()
                .flat_map(|v| bf16::encode(*v).to_le_bytes())
                .collect(),
            BlockScales::None,
        ),
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
        WeightFormat::Fp8Block => encode_fp8_block(experts, rows, cols, values),
        WeightFormat::Mxfp8 => {
            let mut data = Vec::with_capacity(n);
            let mut bytes = Vec::with_capacity(n / 32);
            // cols % 32 == 0, so 32-chunks of the flat array never straddle rows or experts.
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
                data.extend(
                    block
                        .chunks_exact(2)
                        .map(|p| e2m1::pack(fp4_code(p[0], s), fp4_code(p[1], s))),
                );
                bytes.push(byte);
            }
            (data, BlockScales::Ue8m0(bytes))
        }
        WeightFormat::Nvfp4 => {
            let mut data = Vec::with_capacity(n / 2);
            let mut bytes = Vec::with_capacity(n / 16);
            for (e, &g) in globals.iter().enumerate() {
                for block in expert(e).chunks_exact(16) {
                    let (byte, s) = nvfp4_scale(amax(block), g);
                    data.extend(
                        block
                            .chunks_exact(2)
                            .map(|p| e2m1::pack(fp4_code(p[0], s), fp4_code(p[1], s))),
                    );
                    bytes.push(byte);
                }
            }
            (data, BlockScales::E4m3(bytes))
        }
    };
    Ok(QuantizedTensor {
        format,
        experts,
        rows,
        cols,
        data: data.into(),
        scales,
        global_scales: globals,
    })
}

/// The element count of `values` once its shape, finiteness and K blocking are checked.
fn check_weight_values(
    format: WeightFormat,
    experts: usize,
    rows: usize,
    cols: usize,
    values: &[f32],
) -> Result<usize> {
    let what = "quantize_weights: `values`";
    let n = experts
        .checked_mul(rows)
        .and_then(|n| n.checked_mul(cols))
        .ok_or_else(|| {
            MoeError::invalid(
                what,
                format!("shape [{experts}, {rows}, {cols}] overflows usize"),
            )
        })?;
    if values.len() != n {
        return Err(MoeError::invalid(
            what,
            format!(
                "{} values do not match [{experts}, {rows}, {cols}] ({n} values)",
                values.len()
            ),
        ));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        let per = (rows * cols).max(1);
        return Err(MoeError::invalid(
            what,
            format!(
                "element [{}, {}, {}] is {}, not a finite number",
                i / per,
                (i % per) / cols.max(1),
                i % cols.max(1),
                values[i]
            ),
        ));
    }
    // Whole blocks along K for the MX/NV formats (fp8_block's 128 takes partial blocks).
    if let Some(block) = format.k_block().filter(|&b| b <= 32) {
        if cols.checked_rem(block) != Some(0) {
            return Err(MoeError::invalid(
                "quantize_weights: K (`cols`)",
                format!("{format} needs K = {cols} to be a multiple of {block}"),
            ));
        }
    }
    Ok(n)
}

/// nvfp4's given per-expert global scales, checked: one per expert, each finite and positive.
pub fn checked_global_scales(g: &[f32], experts: usize) -> Result<Vec<f32>> {
    if g.len() != experts {
        return Err(MoeError::invalid(
            "quantize_weights: `global_scales`",
            format!("{} values for {experts} experts (one per expert)", g.len()),
        ));
    }
    if let Some(i) = g.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(MoeError::invalid(
            "quantize_weights: `global_scales`",
            format!(
                "value at index {i} is {}, not a finite positive number",
                g[i]
            ),
        ));
    }
    Ok(g.to_vec())
}

/// nvfp4's per-expert global scales: the caller's (checked), else amax / NVFP4_GLOBAL_DIVISOR of each expert;
/// empty for other formats.
fn weight_globals(
    format: WeightFormat,
    experts: usize,
    per_expert: usize,
    values: &[f32],
    global_scales: Option<&[f32]>,
) -> Result<Vec<f32>> {
    Ok(match (format, global_scales) {
        (WeightFormat::Nvfp4, Some(g)) => checked_global_scales(g, experts)?,
        (WeightFormat::Nvfp4, None) => (0..experts)
            .map(|e| {
                let a = amax(&values[e * per_expert..(e + 1) * per_expert]);
                if a == 0.0 {
                    1.0
                } else {
                    a / NVFP4_GLOBAL_DIVISOR
                }
            })
            .collect(),
        _ => Vec::new(),
    })
}

/// fp8_block: one f32 scale per 128 × 128 block (partial blocks at the edges), e4m3 elements.
fn encode_fp8_block(
    experts: usize,
    rows: usize,
    cols: usize,
    values: &[f32],
) -> (Vec<u8>, BlockScales) {
    let n = values.len();
    let per_expert = rows * cols;
    let expert = |e: usize| &values[e * per_expert..(e + 1) * per_expert];
    let (rb, cb) = (rows.div_ceil(FP8_BLOCK), cols.div_ceil(FP8_BLOCK));
    let mut data = vec![0u8; n];
    let mut s_all = Vec::with_capacity(experts * rb * cb);
    for e in 0..experts {
        let w = expert(e);
        let d = &mut data[e * per_expert..(e + 1) * per_expert];
        for bi in 0..rb {
            let rr = bi * FP8_BLOCK..((bi + 1) * FP8_BLOCK).min(rows);
            for bj in 0..cb {
                let cr = bj * FP8_BLOCK..((bj + 1) * FP8_BLOCK).min(cols);
                // The block's part of row r, as indices into the expert.
                let part = |r: usize| r * cols + cr.start..r * cols + cr.end;
                let a = rr.clone().map(|r| amax(&w[part(r)])).fold(0f32, f32::max);
                let s = a.max(FP8_AMAX_FLOOR) / e4m3::MAX;
                for r in rr.clone() {
                    for (o, v) in d[part(r)].iter_mut().zip(&w[part(r)]) {
                        *o = e4m3::encode(v / s);
                    }
                }
                s_all.push(s);
            }
        }
    }
    (data, BlockScales::Block128(s_all))
}

/// The float types rows decode into: f32 for backends, f64 for the exact reference.
trait Lane: Copy + Mul<Output = Self> {
    fn of(x: f32) -> Self;
}

impl Lane for f32 {
    #[inline(always)]
    fn of(x: f32) -> f32 {
        x
    }
}

impl Lane for f64 {
    #[inline(always)]
    fn of(x: f32) -> f64 {
        x as f64
    }
}

/// `dst[c] = bf16(src[2c..2c+2])`. Bytes may be unaligned (mmap), hence `from_le_bytes`.
fn bf16_row<T: Lane>(src: &[u8], dst: &mut [T]) {
    for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *o = T::of(bf16::decode(u16::from_le_bytes([c[0], c[1]])));
    }
}

/// One row of E4M3 bytes in blocks of `block` columns: element (table) × the block's scale.
#[inline(always)]
fn e4m3_row<T: Lane>(src: &[u8], dst: &mut [T], block: usize, scale: impl Fn(usize) -> T) {
    for (j, (d, s)) in dst.chunks_mut(block).zip(src.chunks(block)).enumerate() {
        let sc = scale(j);
        for (o, &b) in d.iter_mut().zip(s) {
            *o = T::of(e4m3::DECODE[b as usize]) * sc;
        }
    }
}

/// One row of packed E2M1 pairs in blocks of `block` columns (`block / 2` bytes), low nibble first.
#[inline(always)]
fn e2m1_row<T: Lane>(src: &[u8], dst: &mut [T], block: usize, scale: impl Fn(usize) -> T) {
    for (j, (d, s)) in dst.chunks_mut(block).zip(src.chunks(block / 2)).enumerate() {
        let sc = scale(j);
        for (o, &b) in d.chunks_exact_mut(2).zip(s) {
            let [lo, hi] = e2m1::PAIRS[b as usize];
            o[0] = T::of(lo) * sc;
            o[1] = T::of(hi) * sc;
        }
    }
}

/// Shared body of `decode_rows_f32` / `decode_rows_f64`.
fn decode_rows<T: Lane>(t: &QuantizedTensor, e: usize, rows: Range<usize>, out: &mut [T]) {
    let cols = t.cols;
    // NOTE: out-of-range arguments are a caller bug (never user input: layers are validated), so
    // they panic with the numbers rather than returning an error from this hot path.
    assert!(
        e < t.experts
            && rows.start <= rows.end
            && rows.end <= t.rows
            && out.len() >= rows.len() * cols,
        "decode_rows: expert {e} of {}, rows {rows:?} of {}, out {} < {} values",
        t.experts,
        t.rows,
        out.len(),
        rows.len() * cols
    );
    let data: &[u8] = &t.data;
    let row_bytes = t.row_data_bytes();
    let base = e * t.expert_data_bytes();
    let whole_row = cols.max(1);
    for (i, r) in rows.enumerate() {
        let src = &data[base + r * row_bytes..base + (r + 1) * row_bytes];
        let dst = &mut out[i * cols..(i + 1) * cols];
        match (t.format, &t.scales) {
            (WeightFormat::Bf16, BlockScales::None) => bf16_row(src, dst),
            (WeightFormat::Fp8, BlockScales::PerExpert(s)) => {
                let s = T::of(s[e]);
                e4m3_row(src, dst, whole_row, |_| s)
            }
            (WeightFormat::Fp8Block, BlockScales::Block128(s)) => {
                let cb = cols.div_ceil(FP8_BLOCK);
                let srow = &s[(e * t.rows.div_ceil(FP8_BLOCK) + r / FP8_BLOCK) * cb..][..cb];
                e4m3_row(src, dst, FP8_BLOCK, |j| T::of(srow[j]))
            }
            (WeightFormat::Mxfp8, BlockScales::Ue8m0(b)) => {
                let srow = &b[(e * t.rows + r) * (cols / 32)..][..cols / 32];
                e4m3_row(src, dst, 32, |j| T::of(ue8m0::decode(srow[j])))
            }
            (WeightFormat::Mxfp4, BlockScales::Ue8m0(b)) => {
                let srow = &b[(e * t.rows + r) * (cols / 32)..][..cols / 32];
                e2m1_row(src, dst, 32, |j| T::of(ue8m0::decode(srow[j])))
            }
            (WeightFormat::Nvfp4, BlockScales::E4m3(b)) => {
                let srow = &b[(e * t.rows + r) * (cols / 16)..][..cols / 16];
                let g = T::of(t.global_scales[e]);
                // In f32 this product is the quantizer's s = dec(byte)·g, rounded once the same way.
                e2m1_row(src, dst, 16, |j| T::of(e4m3::DECODE[srow[j] as usize]) * g)
            }
            (format, scales) => {
                panic!("QuantizedTensor of format {format} carries mismatched scales {scales:?}")
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
            BlockScales::Block128(s) => {
                s[(e * rows.div_ceil(FP8_BLOCK) + r / FP8_BLOCK) * cols.div_ceil(FP8_BLOCK) + j]
                    as f64
            }
            BlockScales::Ue8m0(b) => ue8m0::decode(b[(e * rows + r) * (cols / 32) + j]) as f64,
            BlockScales::E4m3(b) => {
                e4m3::decode(b[(e * rows + r) * (cols / 16) + j]) as f64
                    * self.global_scales[e] as f64
            }
        }
    }

    /// Dequantizes rows `rows` of local expert `expert` into `out` (`rows.len() * cols` f32,
    /// row-major): element × block scale, one f32 rounding (nvfp4: the block scale dec(byte)·g is
    /// first rounded to f32, exactly as the quantizer computed it).
    ///
    /// Panics if `expert` or `rows` is out of range or `out` is too short (a caller bug).
    pub fn decode_rows_f32(&self, expert: usize, rows: Range<usize>, out: &mut [f32]) {
        decode_rows(self, expert, rows, out)
    }

    /// Same as [`decode_rows_f32`](Self::decode_rows_f32) in f64: element × scale (× global for
    /// nvfp4), exact, as every factor has few enough significant bits.
    pub fn decode_rows_f64(&self, expert: usize, rows: Range<usize>, out: &mut [f64]) {
        decode_rows(self, expert, rows, out)
    }
}
