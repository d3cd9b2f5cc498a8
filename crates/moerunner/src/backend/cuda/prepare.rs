//! Weight preparation for the CUDA kernels: from the layer's canonical layout (`spec/formats.md`) to
//! the kernels' private one, once, when a layer is loaded. Pure host code (no CUDA), so it is tested
//! on machines without a GPU.
//!
//! The kernel layout:
//! - I and H are padded to multiples of 128 (`Ip`, `Hp`) with zero rows/columns, each W13 half
//!   separately, so a K step of 128 is always one fp8 scale block and padding never mixes halves.
//! - Gated W13 rows are interleaved in groups of 8: prepared row r is feature j = (r/16)·8 + r%8 of the
//!   gate half when r%16 < 8, else of the up half. An m16n8 MMA tile thus holds gate and up of the same
//!   features in one thread's accumulators, and the activation runs in GEMM1's epilogue.
//! - fp8 block scales become one f32 per 8 prepared rows and 128 columns (`[E, Mp/8, Kp/128]`), which
//!   the kernel reads without knowing the original row order. That needs every group of 8 prepared rows
//!   to sit inside one 128-row scale block of the original: true when I % 8 == 0 (checked by `supports`).
//! - The decoded formats (mxfp8, mxfp4, nvfp4) are tiled ([`tile_decoded`]): per expert, per 128
//!   prepared rows, per 64-element K step, the rows' element bytes in the order the decoding threads
//!   read them, then their block-scale bytes; nvfp4's per-expert globals stay f32 `[E]`.

use rayon::prelude::*;

use super::codec::{Codec, PreparedScales};
use crate::config::{LayerConfig, W13Order};
use crate::error::{MoeError, Result};
use crate::weights::{BlockScales, LayerWeights, QuantizedTensor};

pub const PAD: usize = 128;

pub fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

/// The padded sizes of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub experts: usize,
    pub hidden: usize,
    pub inter: usize,
    pub gated: bool,
    /// H padded to 128: GEMM1's K and GEMM2's rows.
    pub hp: usize,
    /// I padded to 128: GEMM2's K and the width of the intermediate.
    pub ip: usize,
}

impl Dims {
    pub fn of(cfg: &LayerConfig) -> Dims {
        Dims {
            experts: cfg.num_local_experts(),
            hidden: cfg.hidden,
            inter: cfg.intermediate,
            gated: cfg.activation.is_gated(),
            hp: round_up(cfg.hidden, PAD),
            ip: round_up(cfg.intermediate, PAD),
        }
    }
    /// Rows of prepared W13.
    pub fn m1p(&self) -> usize {
        if self.gated {
            2 * self.ip
        } else {
            self.ip
        }
    }
}

/// One projection in kernel layout: element bytes `[E, Mp, Kp]` and its scales.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedTensor {
    pub rows: usize,
    pub cols: usize,
    /// bf16 little-endian pairs, E4M3 bytes, or the decoded formats' tiles.
    pub data: Vec<u8>,
    /// fp8 and nvfp4 (its globals): `[E]`; fp8_block: `[E, rows/8, cols/128]`; others: empty.
    pub scales: Vec<f32>,
}

/// Everything GEMM1 and GEMM2 read, in kernel layout.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedWeights {
    pub dims: Dims,
    pub w13: PreparedTensor,
    pub w2: PreparedTensor,
    /// `[E, m1p]` in prepared row order.
    pub w13_bias: Option<Vec<f32>>,
    /// `[E, hp]`.
    pub w2_bias: Option<Vec<f32>>,
}

impl PreparedWeights {
    /// Bytes the prepared weights take on the device (elements, tiles, f32 scales, biases).
    pub fn device_bytes(&self) -> usize {
        let t = |p: &PreparedTensor| p.data.len() + 4 * p.scales.len();
        let b = |v: &Option<Vec<f32>>| v.as_ref().map_or(0, |v| 4 * v.len());
        t(&self.w13) + t(&self.w2) + b(&self.w13_bias) + b(&self.w2_bias)
    }

    /// One line for the load log: the padding weight preparation applied (H and I to multiples of
    /// 128, each W13 half on its own) and what it costs against `original_bytes`, the layer's own
    /// weights.
    pub fn padding_note(&self, original_bytes: usize) -> String {
        let d = &self.dims;
        let dim = |name: &str, n: usize, p: usize| {
            if n == p {
                format!("{name} = {n}")
            } else {
                format!("{name} {n} → {p}")
            }
        };
        let on_device = self.device_bytes();
        let extra = on_device.saturating_sub(original_bytes);
        format!(
            "weights prepared for the GPU: {}, {} (multiples of {PAD}); {} on the device, {} ({:.1} %) more than the layer's own",
            dim("H", d.hidden, d.hp),
            dim("I", d.inter, d.ip),
            human_bytes(on_device),
            human_bytes(extra),
            100.0 * extra as f64 / original_bytes.max(1) as f64
        )
    }
}

fn human_bytes(n: usize) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n => format!("{:.1} KiB", n as f64 / 1024.0),
    }
}

/// Where prepared W13 row `r` comes from in the original `[M, H]` rows (None: a padding row).
pub fn w13_source_row(dims: &Dims, order: W13Order, r: usize) -> Option<usize> {
    let i = dims.inter;
    if !dims.gated {
        return (r < i).then_some(r);
    }
    let j = (r / 16) * 8 + r % 8;
    let up = r % 16 >= 8;
    if j >= i {
        return None;
    }
    Some(match (order, up) {
        (W13Order::GateUp, false) => j,
        (W13Order::GateUp, true) => i + j,
        (W13Order::UpGate, false) => i + j,
        (W13Order::UpGate, true) => j,
        (W13Order::Interleaved, false) => 2 * j,
        (W13Order::Interleaved, true) => 2 * j + 1,
    })
}

/// The intermediate feature a prepared W13 row feeds (the output column of GEMM1's epilogue).
pub fn w13_feature(dims: &Dims, r: usize) -> usize {
    if dims.gated {
        (r / 16) * 8 + r % 8
    } else {
        r
    }
}

/// A layer's weights in the kernel layout (module docs), made on the host once at load.
/// Both projections of `w` in the layout `codec` names (element bytes, scale layout).
pub fn prepare_weights(cfg: &LayerConfig, codec: &Codec, w: &LayerWeights) -> PreparedWeights {
    let dims = Dims::of(cfg);
    let m1p = dims.m1p();
    let w13_map = |r: usize| w13_source_row(&dims, cfg.w13_order, r);
    let w2_map = |r: usize| (r < dims.hidden).then_some(r);
    let w13 = prepare_tensor(codec, &w.w13, m1p, dims.hp, &w13_map);
    let w2 = prepare_tensor(codec, &w.w2, dims.hp, dims.ip, &w2_map);
    let w13_bias = w
        .w13_bias
        .as_ref()
        .map(|b| permute_bias(b, dims.experts, w.w13.rows, m1p, &w13_map));
    let w2_bias = w
        .w2_bias
        .as_ref()
        .map(|b| permute_bias(b, dims.experts, w.w2.rows, dims.hp, &w2_map));
    PreparedWeights {
        dims,
        w13,
        w2,
        w13_bias,
        w2_bias,
    }
}

/// One dense weight `[1, N, K]` (a `DenseLinear`'s) in the layout `codec` names, with the identity
/// row map: rows padded to `round_up(N, 128)`, K to `round_up(K, 128)` (zero rows and columns), the
/// layout GEMM2 reads, so the grouped GEMM runs it as a one-expert projection.
pub fn prepare_dense(codec: &Codec, t: &QuantizedTensor) -> PreparedTensor {
    let (rows, cols) = (t.rows, t.cols);
    let map = |r: usize| (r < rows).then_some(r);
    prepare_tensor(codec, t, round_up(rows, PAD), round_up(cols, PAD), &map)
}

fn permute_bias(
    b: &[f32],
    experts: usize,
    rows: usize,
    rows_p: usize,
    map: &dyn Fn(usize) -> Option<usize>,
) -> Vec<f32> {
    let mut out = vec![0f32; experts * rows_p];
    for e in 0..experts {
        for r in 0..rows_p {
            if let Some(src) = map(r) {
                out[e * rows_p + r] = b[e * rows + src];
            }
        }
    }
    out
}

/// Reorders and pads one projection. `map(r)` gives the source row of prepared row r.
fn prepare_tensor(
    codec: &Codec,
    t: &QuantizedTensor,
    rows_p: usize,
    cols_p: usize,
    map: &(dyn Fn(usize) -> Option<usize> + Sync),
) -> PreparedTensor {
    if let Some(row_bytes) = codec.gemm.decoded_row_bytes() {
        let (data, scales) = tile_decoded(t, rows_p, cols_p, map, row_bytes);
        return PreparedTensor {
            rows: rows_p,
            cols: cols_p,
            data,
            scales,
        };
    }
    let elem = codec.gemm.weight_element_bytes();
    let row_bytes = t.cols * elem;
    let row_bytes_p = cols_p * elem;
    let mut data = vec![0u8; t.experts * rows_p * row_bytes_p];
    // One expert per task: a DeepSeek-V3 bf16 layer is 22 GB to reorder, seconds on one thread.
    data.par_chunks_mut((rows_p * row_bytes_p).max(1))
        .enumerate()
        .for_each(|(e, dst)| {
            let src = t.expert_data(e);
            for r in 0..rows_p {
                if let Some(s) = map(r) {
                    dst[r * row_bytes_p..r * row_bytes_p + row_bytes]
                        .copy_from_slice(&src[s * row_bytes..(s + 1) * row_bytes]);
                }
            }
        });
    if codec.weight_scales == PreparedScales::Rows8x128FromUe8m0 {
        let (data, scales) = regroup_mx_scales(t, rows_p, cols_p, map);
        return PreparedTensor {
            rows: rows_p,
            cols: cols_p,
            data,
            scales,
        };
    }
    let scales = match (codec.weight_scales, &t.scales) {
        (PreparedScales::PerExpert, BlockScales::PerExpert(s)) => s.clone(),
        (PreparedScales::Rows8x128, BlockScales::Block128(s)) => {
            let (nbr, nbc) = (t.rows.div_ceil(128), t.cols.div_ceil(128));
            let (groups, kb_p) = (rows_p / 8, cols_p / 128);
            let mut out = vec![0f32; t.experts * groups * kb_p];
            for e in 0..t.experts {
                for g in 0..groups {
                    // Any non-padding row of the group names the block (all share it; see module doc).
                    let Some(src) = (0..8).find_map(|i| map(g * 8 + i)) else {
                        continue;
                    };
                    for kb in 0..nbc {
                        out[(e * groups + g) * kb_p + kb] = s[(e * nbr + src / 128) * nbc + kb];
                    }
                }
            }
            out
        }
        _ => Vec::new(),
    };
    PreparedTensor {
        rows: rows_p,
        cols: cols_p,
        data,
        scales,
    }
}

/// An E4M3 element of a block with scale s, re-expressed against a larger scale S of its group:
/// the E4M3 nearest its value · s/S (`ratio`, a power of two ≤ 1 computed in f32 as s / S). Exact
/// while the result stays in E4M3's normal range (≥ 2^-6), i.e. for elements within 2^14 of the
/// group's largest; smaller ones round as E4M3 subnormals (or to zero). A NaN code stays NaN. The
/// GPU's activation quantizer (`quant.cu` mode 6) computes the same in the same f32 steps.
pub fn reexpress_e4m3(code: u8, ratio: f32) -> u8 {
    if ratio == 1.0 {
        return code;
    }
    crate::formats::e4m3::encode(crate::formats::e4m3::decode(code) * ratio)
}

/// MXFP8 weights for the fp8 block-scale GEMM (`PreparedScales::Rows8x128FromUe8m0`): E4M3 bytes
/// `[E, rows_p, cols_p]` as `prepare_tensor` lays out stored fp8, and one f32 per 8 prepared rows ×
/// 128 columns, `[E, rows_p/8, cols_p/128]`: the largest UE8M0 scale S of the group's (up to 8 × 4)
/// blocks, every element of the group re-expressed against it (`reexpress_e4m3`). On seeded
/// weights with a per-row scale spread this adds ~1e-6 relative error to W·x
/// (`scripts/mx_operand_offset_study.py`); what it gains is the fp8 MMA rate.
pub fn regroup_mx_scales(
    t: &QuantizedTensor,
    rows_p: usize,
    cols_p: usize,
    map: &(dyn Fn(usize) -> Option<usize> + Sync),
) -> (Vec<u8>, Vec<f32>) {
    let BlockScales::Ue8m0(scale_bytes) = &t.scales else {
        return (vec![0u8; t.experts * rows_p * cols_p], Vec::new());
    };
    let nb = t.cols / 32;
    let (groups, kb_p) = (rows_p / 8, cols_p / 128);
    let expert_bytes = rows_p * cols_p;
    let per_expert = t.rows * nb;
    let mut data = vec![0u8; t.experts * expert_bytes];
    let mut scales = vec![0f32; t.experts * groups * kb_p];
    data.par_chunks_mut(expert_bytes.max(1))
        .zip(scales.par_chunks_mut((groups * kb_p).max(1)))
        .enumerate()
        .for_each(|(e, (dst, sdst))| {
            let src = t.expert_data(e);
            let bytes = &scale_bytes[e * per_expert..(e + 1) * per_expert];
            for g in 0..groups {
                let rows: Vec<(usize, usize)> = (g * 8..g * 8 + 8)
                    .filter_map(|r| map(r).map(|s| (r, s)))
                    .collect();
                for kb in 0..kb_p {
                    let blocks = (kb * 4..(kb * 4 + 4).min(nb)).collect::<Vec<_>>();
                    // the group's largest scale byte (0, 2^-127, for a group of padding only)
                    let top = rows
                        .iter()
                        .flat_map(|&(_, s)| blocks.iter().map(move |&b| bytes[s * nb + b]))
                        .max()
                        .unwrap_or(0);
                    let group_scale = crate::formats::ue8m0::decode(top);
                    sdst[g * kb_p + kb] = group_scale;
                    for &(r, s) in &rows {
                        for &b in &blocks {
                            let ratio =
                                crate::formats::ue8m0::decode(bytes[s * nb + b]) / group_scale;
                            let (c0, c1) = (b * 32, (b * 32 + 32).min(t.cols));
                            let from = &src[s * t.cols + c0..s * t.cols + c1];
                            let to = &mut dst[r * cols_p + c0..r * cols_p + c1];
                            for (o, &code) in to.iter_mut().zip(from) {
                                *o = reexpress_e4m3(code, ratio);
                            }
                        }
                    }
                }
            }
        });
    (data, scales)
}

/// Rows of a decoded format's tile, and its K step in elements (`gemm/scale_decoded.cuh`).
pub const TILE_ROWS: usize = 128;
pub const TILE_K: usize = 64;

/// Where element k (0..64) of a row's K step sits in the row's element bytes of the step: byte
/// index and, for four-bit elements, whether it is the high nibble. Thread t = lane % 4 reads bytes
/// [t·W/4, (t+1)·W/4) and decodes the elements 16q + 2t + {0, 1, 8, 9} (q = 0..3) of its m16n8k16 A
/// fragments: e4m3 word q holds them in that order; e2m1 word h holds sub-steps 2h, 2h+1, pair k
/// (k = 0..3, first element 16q + 2t + 8(k % 2) with q = 2h + k/2) in nibbles k and k + 4.
pub fn tile_position(four_bit: bool, k: usize) -> (usize, bool) {
    let (q, within) = (k / 16, k % 16);
    let (t, upper) = ((within % 8) / 2, within >= 8);
    let second = within % 2 == 1;
    if !four_bit {
        (
            t * 16 + q * 4 + 2 * usize::from(upper) + usize::from(second),
            false,
        )
    } else {
        let (h, pair) = (q / 2, 2 * (q % 2) + usize::from(upper));
        let nibble = pair + 4 * usize::from(second);
        (t * 8 + h * 4 + nibble / 2, nibble % 2 == 1)
    }
}

/// The bf16 exponent field of 2^NVFP4_FACTOR_SHIFT, the smallest NVFP4 decode factor's: the tile's
/// code c of a block means the bf16 factor with bits (c << 4) + (NVFP4_CODE_BASE << 7).
pub const NVFP4_CODE_BASE: u32 = 228;
/// NVFP4 block scales are decoded as scale · 2^110 (`gemm/scale_decoded.cuh`), so the epilogue
/// multiplies by 2^16 (with the raw E2M1 bits' 2^-126): exact powers of two.
pub const NVFP4_EPILOGUE_SHIFT: i32 = 16;

/// The raw bits the kernel makes of an element are its value times 2^-RAW_SHIFT (E4M3: 120, E2M1:
/// 126), so a block of scale 2^s needs the factor 2^(RAW_SHIFT + s).
fn raw_shift(four_bit: bool) -> i32 {
    if four_bit {
        126
    } else {
        120
    }
}

/// The tile's scale byte of an NVFP4 block scale (E4M3 byte `b`): the 8-bit code of the bf16 value
/// dec(b) · 2^110 (exponent − NVFP4_CODE_BASE, 3 mantissa bits), 0 for a zero scale (whose block's
/// elements are zeroed: element × 0 = 0, and code 0 decodes to a nonzero factor).
pub fn nvfp4_scale_code(b: u8) -> u8 {
    let sc = crate::formats::e4m3::decode(b);
    if sc == 0.0 {
        return 0;
    }
    let bits = crate::formats::bf16::encode(sc * 2f32.powi(110)) as u32;
    debug_assert_eq!(bits & 0xF, 0, "an E4M3 scale has 3 mantissa bits");
    let exp = (bits >> 7) & 0xFF;
    (((exp - NVFP4_CODE_BASE) << 3) | ((bits >> 4) & 7)) as u8
}

/// The tiled layout of a decoded format (module docs): `[E, rows_p/128, cols_p/64]` blocks of
/// 128 rows × element bytes, then 128 rows × scale bytes (`row_bytes` = (element, scale) bytes of a
/// row per step: mxfp8 (64, 2), mxfp4 (32, 2), nvfp4 (32, 4)), and one f32 per expert for the
/// epilogue. Padding rows and columns are zero codes.
///
/// So that the kernel decodes with one multiply, a scale byte in the tile is not the checkpoint's
/// but the block's bf16 decode factor in short: for UE8M0 scales the factor's exponent field
/// `byte + RAW_SHIFT − c_e` (the factor 2^(RAW_SHIFT + s − c_e)), with c_e ≥ 0 the smallest shift that
/// keeps every factor of expert e ≤ 2^127 (0 unless a block scale exceeds 2 (E2M1) or 2^7 (E4M3))
/// and 2^c_e the expert's epilogue factor; for NVFP4 `nvfp4_scale_code`, the epilogue factor being
/// the expert's global × 2^16. Decoded weights that overflow f32 are refused before (validation), so
/// every factor is a normal bf16 number.
pub fn tile_decoded(
    t: &QuantizedTensor,
    rows_p: usize,
    cols_p: usize,
    map: &(dyn Fn(usize) -> Option<usize> + Sync),
    (wb, sb): (usize, usize),
) -> (Vec<u8>, Vec<f32>) {
    let four_bit = wb == 32;
    let steps = cols_p / TILE_K;
    let block_bytes = TILE_ROWS * (wb + sb);
    let expert_bytes = (rows_p / TILE_ROWS) * steps * block_bytes;
    let (scale_bytes, block_cols, nvfp4): (&[u8], usize, bool) = match &t.scales {
        BlockScales::Ue8m0(b) => (b, 32, false),
        BlockScales::E4m3(b) => (b, 16, true),
        _ => (&[], 32, false),
    };
    let nb = t.cols / block_cols;
    let src_row_bytes = if four_bit { t.cols / 2 } else { t.cols };
    let positions: Vec<(usize, bool)> = (0..TILE_K).map(|k| tile_position(four_bit, k)).collect();
    let shift = raw_shift(four_bit);
    // Each expert's shift c_e (UE8M0) and epilogue factor.
    let per_expert = t.rows * nb;
    let expert_scales = |e: usize| {
        scale_bytes
            .get(e * per_expert..(e + 1) * per_expert)
            .unwrap_or(&[])
    };
    let shifts: Vec<i32> = (0..t.experts)
        .map(|e| {
            let max = expert_scales(e).iter().copied().max().unwrap_or(0) as i32;
            if nvfp4 {
                0
            } else {
                (max - 127 + shift - 127).max(0)
            }
        })
        .collect();
    let factors: Vec<f32> = (0..t.experts)
        .map(|e| {
            if nvfp4 {
                t.global_scales[e] * 2f32.powi(NVFP4_EPILOGUE_SHIFT)
            } else {
                2f32.powi(shifts[e])
            }
        })
        .collect();
    let mut data = vec![0u8; t.experts * expert_bytes];
    data.par_chunks_mut(expert_bytes.max(1))
        .enumerate()
        .for_each(|(e, dst)| {
            let src = t.expert_data(e);
            let scales = expert_scales(e);
            let tile_byte = |b: u8| -> u8 {
                if nvfp4 {
                    nvfp4_scale_code(b)
                } else {
                    // 1..=254 by the choice of the shift and the overflow rule (module docs)
                    (b as i32 + shift - shifts[e]).clamp(1, 254) as u8
                }
            };
            for r in 0..rows_p {
                let Some(s) = map(r) else { continue };
                let row = &src[s * src_row_bytes..(s + 1) * src_row_bytes];
                let (tile, i) = (r / TILE_ROWS, r % TILE_ROWS);
                for ks in 0..steps {
                    let base = (tile * steps + ks) * block_bytes;
                    let sdst = base + TILE_ROWS * wb + i * sb;
                    let mut zero_block = [false; 4];
                    for j in 0..sb {
                        let blk = (ks * TILE_K) / block_cols + j;
                        if blk < nb {
                            let b = scales[s * nb + blk];
                            dst[sdst + j] = tile_byte(b);
                            zero_block[j] = nvfp4 && crate::formats::e4m3::decode(b) == 0.0;
                        }
                    }
                    let elems = &mut dst[base + i * wb..base + (i + 1) * wb];
                    for (k, &(byte, high)) in positions.iter().enumerate() {
                        let c = ks * TILE_K + k;
                        if c >= t.cols {
                            break;
                        }
                        if zero_block[k / (TILE_K / sb)] {
                            continue; // a zero NVFP4 scale: the elements are 0
                        }
                        if four_bit {
                            let code = (row[c / 2] >> (4 * (c % 2))) & 0xF;
                            elems[byte] |= code << (4 * usize::from(high));
                        } else {
                            elems[byte] = row[c];
                        }
                    }
                }
            }
        });
    (data, factors)
}

/// MXFP8 weights are decoded by moving bits (`gemm/scale_decoded.cuh`), which would turn an E4M3
/// NaN code (0x7F, 0xFF) into a finite 480 · 2^s; the tensor cores of the stored-fp8 formats and the
/// CPU turn it into NaN outputs for every token routed there. Neither is a useful layer: a NaN
/// weight is refused at load, naming the tensor and where it sits.
pub fn check_decodable_elements(w: &LayerWeights) -> Result<()> {
    for (name, t) in [("w13", &w.w13), ("w2", &w.w2)] {
        if t.format != crate::config::WeightFormat::Mxfp8 {
            continue;
        }
        let data: &[u8] = &t.data;
        let found = data
            .par_chunks(1 << 20)
            .enumerate()
            .find_map_first(|(i, c)| {
                c.iter()
                    .position(|&b| b & 0x7F == 0x7F)
                    .map(|p| i * (1 << 20) + p)
            });
        if let Some(idx) = found {
            let (per_expert, cols) = (t.rows * t.cols, t.cols.max(1));
            return Err(MoeError::invalid(
                format!("tensor `{name}`"),
                format!(
                    "E4M3 NaN code {:#04x} at [expert {}, row {}, column {}]: weights must be numbers",
                    data[idx],
                    idx / per_expert.max(1),
                    (idx % per_expert.max(1)) / cols,
                    idx % cols
                ),
            ));
        }
    }
    Ok(())
}

/// The per-tensor fp8 epilogue multiplies each accumulator by one factor, w_scale[e] · input scale:
/// both are finite (validation), but their product may not be, and a zero sum times an infinite
/// factor is NaN where the reference gives 0. Such a layer is refused here, naming both tensors.
pub fn check_epilogue_factors(w: &LayerWeights) -> Result<()> {
    for (name, t, input, input_name) in [
        ("w13_scale", &w.w13, w.w13_input_scale, "w13_input_scale"),
        ("w2_scale", &w.w2, w.w2_input_scale, "w2_input_scale"),
    ] {
        let (BlockScales::PerExpert(scales), Some(a)) = (&t.scales, input) else {
            continue;
        };
        if let Some(e) = scales.iter().position(|s| !(s * a).is_finite()) {
            return Err(MoeError::Invalid {
                what: format!("{name}[{e}] × {input_name}"),
                why: format!(
                    "{} × {a} overflows f32: the GPU applies the two scales as one factor",
                    scales[e]
                ),
            });
        }
    }
    Ok(())
}
