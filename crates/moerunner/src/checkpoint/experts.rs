//! Loader of per-expert tensors (`{prefix}{e}.{gate,up,down}.weight` and their scales), the
//! layout of Qwen-MoE, Mixtral, DeepSeek-V3, MiniMax-M2 and Nemotron-H. The shipped format is
//! read off the dtype of the first expert's up weight: BF16 → bf16; F8_E4M3 with
//! `weight_scale_inv` → fp8_block (128×128); U8 with `weight_scale` → ModelOpt nvfp4.
//!
//! W13 is built as [gate rows; up rows] (`gate_up`) of the rank's features; W2 takes the same
//! columns. Rows are contiguous in the file, columns are short runs per row.

use super::shards::Shards;
use super::{ExpertLayout, LoadedExperts, Plan, Slice};
use crate::config::{W13Order, WeightFormat};
use crate::error::{MoeError, Result};
use crate::tensor::DType;
use crate::weights::{BlockScales, QuantizedTensor};

const FP8_BLOCK: usize = 128;
const NV_BLOCK: usize = 16;

pub(super) fn load(sh: &Shards, plan: &Plan, s: &Slice) -> Result<LoadedExperts> {
    let ExpertLayout::PerExpert {
        prefix,
        gate,
        up,
        down,
    } = &plan.experts
    else {
        return Err(MoeError::invalid(
            "checkpoint",
            "per-expert loader called on another layout",
        ));
    };
    let (h, inter) = (plan.hidden, plan.intermediate);
    let name = |e: usize, proj: &str, what: &str| format!("{prefix}{e}.{proj}.{what}");
    let probe = name(0, up, "weight");
    let (dtype, _) = sh.meta(&probe, &[DType::BF16, DType::F8E4M3, DType::U8])?;
    let format = match dtype {
        DType::BF16 => WeightFormat::Bf16,
        DType::F8E4M3 if sh.has(&name(0, up, "weight_scale_inv")) => WeightFormat::Fp8Block,
        // Per-tensor FP8 (ModelOpt, compressed-tensors): a scalar `weight_scale` per weight.
        DType::F8E4M3 if sh.has(&name(0, up, "weight_scale")) => WeightFormat::Fp8,
        DType::U8 if sh.has(&name(0, up, "weight_scale")) => WeightFormat::Nvfp4,
        _ => {
            return Err(MoeError::Unsupported(format!(
                "tensor `{probe}` is {dtype} without the scale tensor of a known layout \
                 (`weight_scale_inv` for FP8 128×128 blocks, a scalar `weight_scale` for per-tensor \
                 FP8, `weight_scale` for ModelOpt NVFP4)"
            )))
        }
    };
    let local = s.features.len();
    let (f0, f1) = (s.features.start, s.features.end);
    let projs13: Vec<&str> = gate.iter().copied().chain([*up]).collect();
    check_alignment(
        format,
        local,
        gate.is_some() || local != inter,
        &name(0, up, "weight"),
    )?;

    let mut w13 = Vec::new();
    let mut w2 = Vec::new();
    let mut scales = ScaleParts::default();
    for e in s.experts.iter() {
        for p in &projs13 {
            let n = name(e, p, "weight");
            let (row_bytes, dims) = elem_dims(format, inter, h);
            sh.check_tensor(&n, &[dtype], &dims)?;
            w13.extend(sh.read_box(&n, [1, inter, row_bytes], 0..1, f0..f1, 0..row_bytes)?);
        }
        let n = name(e, down, "weight");
        let (row_bytes, dims) = elem_dims(format, h, inter);
        sh.check_tensor(&n, &[dtype], &dims)?;
        let cols = match format {
            WeightFormat::Bf16 => f0 * 2..f1 * 2,
            WeightFormat::Nvfp4 => f0 / 2..f1 / 2,
            _ => f0..f1,
        };
        w2.extend(sh.read_box(&n, [1, h, row_bytes], 0..1, 0..h, cols)?);

        scales.read_expert(sh, format, e, &projs13, down, (f0..f1, inter, h), &name)?;
    }

    let ScaleParts {
        mut s13,
        mut s2,
        g13,
        g2,
        pt13,
        pt2,
    } = scales;
    let (mut in13, mut in2) =
        static_input_scales(sh, plan.num_experts, format, (&projs13, up, down), &name)?;
    let n_exp = s.experts.len();
    let m = projs13.len() * local;
    let mut format = format;
    if format == WeightFormat::Fp8 {
        let shape = Fp8Shape {
            local,
            h,
            gated_or_sliced: gate.is_some() || local != inter,
            probe: name(0, up, "weight"),
        };
        (format, s13, s2) = settle_per_tensor_fp8(&shape, &pt13, &pt2, in13.is_some())?;
        if format == WeightFormat::Fp8Block {
            (in13, in2) = (None, None);
        }
    }
    let (sc13, sc2) = block_scales(format, s13, s2);
    let w13 = QuantizedTensor {
        format,
        experts: n_exp,
        rows: m,
        cols: h,
        data: w13.into(),
        scales: sc13,
        global_scales: g13,
    };
    let w2 = QuantizedTensor {
        format,
        experts: n_exp,
        rows: h,
        cols: local,
        data: w2.into(),
        scales: sc2,
        global_scales: g2,
    };
    Ok(LoadedExperts {
        w13,
        w2,
        w13_order: W13Order::GateUp,
        w13_bias: None,
        w2_bias: None,
        w13_input_scale: in13,
        w2_input_scale: in2,
    })
}

/// What the per-expert loop gathers of each local expert's scales, in expert order.
#[derive(Default)]
struct ScaleParts {
    /// W13's and W2's block scales as bytes (fp8_block f32, nvfp4 e4m3).
    s13: Vec<u8>,
    s2: Vec<u8>,
    /// nvfp4: each expert's global scale of W13 and W2.
    g13: Vec<f32>,
    g2: Vec<f32>,
    /// Per-tensor FP8: each expert's scalar scales, [gate, up] (or [up]) and down.
    pt13: Vec<Vec<f32>>,
    pt2: Vec<f32>,
}

impl ScaleParts {
    /// Reads expert `e`'s scales of `format` for the feature slice `f` of `inter` (checked against
    /// the checkpoint's shapes, named by the checkpoint's tensor names).
    #[allow(clippy::too_many_arguments)]
    fn read_expert(
        &mut self,
        sh: &Shards,
        format: WeightFormat,
        e: usize,
        projs13: &[&str],
        down: &str,
        (f, inter, h): (std::ops::Range<usize>, usize, usize),
        name: &dyn Fn(usize, &str, &str) -> String,
    ) -> Result<()> {
        let (f0, f1) = (f.start, f.end);
        match format {
            WeightFormat::Bf16 => {}
            WeightFormat::Fp8 => {
                let mut scales = Vec::new();
                for p in projs13 {
                    let n = name(e, p, "weight_scale");
                    scales.push(positive(&n, sh.read_scalar(&n)?)?);
                }
                self.pt13.push(scales);
                let n = name(e, down, "weight_scale");
                self.pt2.push(positive(&n, sh.read_scalar(&n)?)?);
            }
            WeightFormat::Fp8Block => {
                let (ib, hb) = (inter.div_ceil(FP8_BLOCK), h.div_ceil(FP8_BLOCK));
                let rows = f0 / FP8_BLOCK..f1.div_ceil(FP8_BLOCK);
                // F32 in DeepSeek-style releases; BF16 is accepted too (exact in f32).
                let scale_types = [DType::F32, DType::BF16];
                for p in projs13 {
                    let n = name(e, p, "weight_scale_inv");
                    let d = sh.check_tensor(&n, &scale_types, &[ib, hb])?;
                    let b = sh.read_box(
                        &n,
                        [1, ib, hb * d.size()],
                        0..1,
                        rows.clone(),
                        0..hb * d.size(),
                    )?;
                    self.s13.extend(positive_block_scales(&n, f32_le(&b, d))?);
                }
                let n = name(e, down, "weight_scale_inv");
                let d = sh.check_tensor(&n, &scale_types, &[hb, ib])?;
                let z = d.size();
                let b = sh.read_box(
                    &n,
                    [1, hb, ib * z],
                    0..1,
                    0..hb,
                    rows.start * z..rows.end * z,
                )?;
                self.s2.extend(positive_block_scales(&n, f32_le(&b, d))?);
            }
            WeightFormat::Nvfp4 => {
                let (ib, hb) = (inter / NV_BLOCK, h / NV_BLOCK);
                let mut globals = Vec::new();
                for p in projs13 {
                    let n = name(e, p, "weight_scale");
                    sh.check_tensor(&n, &[DType::F8E4M3], &[inter, hb])?;
                    self.s13.extend(e4m3_scales(
                        &n,
                        sh.read_box(&n, [1, inter, hb], 0..1, f0..f1, 0..hb)?,
                    )?);
                    let g = name(e, p, "weight_scale_2");
                    globals.push((g.clone(), positive(&g, sh.read_scalar(&g)?)?));
                }
                // W13 has one global scale per expert, so a gated expert's gate and up must share it.
                if let [(gn, g), (un, u)] = globals.as_slice() {
                    if g != u {
                        return Err(MoeError::Unsupported(format!(
                            "`{gn}` = {g} differs from `{un}` = {u}; the fused W13 holds one global scale per expert"
                        )));
                    }
                }
                self.g13.push(globals.last().map_or(1.0, |x| x.1));
                let n = name(e, down, "weight_scale");
                sh.check_tensor(&n, &[DType::F8E4M3], &[h, ib])?;
                self.s2.extend(e4m3_scales(
                    &n,
                    sh.read_box(&n, [1, h, ib], 0..1, 0..h, f0 / NV_BLOCK..f1 / NV_BLOCK)?,
                )?);
                let g = name(e, down, "weight_scale_2");
                self.g2.push(positive(&g, sh.read_scalar(&g)?)?);
            }
            other => return Err(MoeError::Unsupported(format!("shipped format {other}"))),
        }
        Ok(())
    }
}

/// The gathered scale bytes as the layer's scales of `format`.
fn block_scales(format: WeightFormat, s13: Vec<u8>, s2: Vec<u8>) -> (BlockScales, BlockScales) {
    let f32s = |b: Vec<u8>| {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect::<Vec<f32>>()
    };
    match format {
        WeightFormat::Fp8Block => (
            BlockScales::Block128(f32s(s13)),
            BlockScales::Block128(f32s(s2)),
        ),
        WeightFormat::Nvfp4 => (BlockScales::E4m3(s13), BlockScales::E4m3(s2)),
        WeightFormat::Fp8 => (
            BlockScales::PerExpert(f32s(s13)),
            BlockScales::PerExpert(f32s(s2)),
        ),
        _ => (BlockScales::None, BlockScales::None),
    }
}

/// Static activation scales are per GEMM in our layer, per expert in ModelOpt's: the max over *all*
/// experts (not just local ones), so every EP rank quantizes activations alike; None when the
/// format has none or none ship. Each is checked before the max: `f32::max` drops a NaN, so a NaN
/// (or negative) scale of one expert would otherwise vanish.
fn static_input_scales(
    sh: &Shards,
    num_experts: usize,
    format: WeightFormat,
    (projs13, up, down): (&[&str], &str, &str),
    name: &dyn Fn(usize, &str, &str) -> String,
) -> Result<(Option<f32>, Option<f32>)> {
    let static_inputs = matches!(format, WeightFormat::Nvfp4 | WeightFormat::Fp8);
    if !(static_inputs && sh.has(&name(0, up, "input_scale"))) {
        return Ok((None, None));
    }
    let (mut a, mut b) = (0f32, 0f32);
    for e in 0..num_experts {
        for p in projs13 {
            let n = name(e, p, "input_scale");
            a = a.max(positive(&n, sh.read_scalar(&n)?)?);
        }
        let n = name(e, down, "input_scale");
        b = b.max(positive(&n, sh.read_scalar(&n)?)?);
    }
    Ok((Some(a), Some(b)))
}

/// The slice a per-tensor FP8 layer is loaded into: local features, H, whether W13 has a gate/up
/// seam or is a TP slice, and a tensor to name in errors.
struct Fp8Shape {
    local: usize,
    h: usize,
    gated_or_sliced: bool,
    probe: String,
}

/// Scalar-scale FP8 experts in our formats. Our fp8 holds one scale per expert for W13 and static
/// input scales: used when the gate's and up's scales agree and input scales ship. Otherwise the
/// weights are kept exactly as fp8_block whose 128×128 blocks all carry the tensor's scale
/// (activations then 1×128 dynamic), which needs the gate/up seam and the slice on block
/// boundaries. Returns the format and the W13 and W2 scale bytes (f32, little-endian).
fn settle_per_tensor_fp8(
    shape: &Fp8Shape,
    pt13: &[Vec<f32>],
    pt2: &[f32],
    input_scales: bool,
) -> Result<(WeightFormat, Vec<u8>, Vec<u8>)> {
    let shared = pt13.iter().all(|v| v.windows(2).all(|w| w[0] == w[1]));
    if shared && input_scales {
        return Ok((
            WeightFormat::Fp8,
            pt13.iter().flat_map(|v| v[0].to_le_bytes()).collect(),
            pt2.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }
    check_alignment(
        WeightFormat::Fp8Block,
        shape.local,
        shape.gated_or_sliced,
        &shape.probe,
    )
    .map_err(|e| {
        MoeError::Unsupported(format!(
            "per-tensor FP8 experts whose gate and up scales differ (or without \
             `input_scale`) are loaded as fp8_block, and: {e}"
        ))
    })?;
    let (rb, hb, ib) = (
        shape.local.div_ceil(FP8_BLOCK),
        shape.h.div_ceil(FP8_BLOCK),
        shape.local.div_ceil(FP8_BLOCK),
    );
    let mut s13 = Vec::new();
    for v in pt13 {
        for sc in v {
            s13.extend((0..rb * hb).flat_map(|_| sc.to_le_bytes()));
        }
    }
    let s2 = pt2
        .iter()
        .flat_map(|sc| (0..hb * ib).flat_map(move |_| sc.to_le_bytes()))
        .collect();
    Ok((WeightFormat::Fp8Block, s13, s2))
}

/// A scalar scale (ModelOpt's `weight_scale_2`, `input_scale`) must be finite and positive; the
/// error names the checkpoint's tensor, not the layer file's.
fn positive(name: &str, v: f32) -> Result<f32> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(MoeError::invalid(
            format!("tensor `{name}`"),
            format!("is {v}; scales must be finite and positive"),
        ))
    }
}

/// F32 little-endian block scales (`weight_scale_inv`), each finite and positive.
fn positive_block_scales(name: &str, bytes: Vec<u8>) -> Result<Vec<u8>> {
    for (i, c) in bytes.chunks_exact(4).enumerate() {
        let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        if !(v.is_finite() && v > 0.0) {
            return Err(MoeError::invalid(
                format!("tensor `{name}`"),
                format!("block {i} of the rank's slice is {v}; scales must be finite and positive"),
            ));
        }
    }
    Ok(bytes)
}

/// E4M3 block scales (ModelOpt's `weight_scale`): no NaN byte, no sign bit.
fn e4m3_scales(name: &str, bytes: Vec<u8>) -> Result<Vec<u8>> {
    if let Some(i) = bytes
        .iter()
        .position(|&b| b & 0x80 != 0 || crate::formats::e4m3::decode(b).is_nan())
    {
        return Err(MoeError::invalid(
            format!("tensor `{name}`"),
            format!(
                "E4M3 scale byte {:#04x} at {i} of the rank's slice is NaN or negative; scales must be positive numbers or zero",
                bytes[i]
            ),
        ));
    }
    Ok(bytes)
}

/// Bytes per row and the file shape of a `[rows, cols]` weight in `format`.
fn elem_dims(format: WeightFormat, rows: usize, cols: usize) -> (usize, Vec<usize>) {
    match format {
        WeightFormat::Bf16 => (cols * 2, vec![rows, cols]),
        WeightFormat::Nvfp4 => (cols / 2, vec![rows, cols / 2]),
        _ => (cols, vec![rows, cols]),
    }
}

/// Scale blocks must not straddle the slice or the gate/up seam of W13.
fn check_alignment(
    format: WeightFormat,
    local: usize,
    gated_or_sliced: bool,
    tensor: &str,
) -> Result<()> {
    let block = match format {
        WeightFormat::Fp8Block => FP8_BLOCK,
        WeightFormat::Nvfp4 => NV_BLOCK,
        _ => return Ok(()),
    };
    // NVFP4 blocks run along K only: rows never straddle; W2's column slice must hold whole blocks.
    let needs = match format {
        WeightFormat::Nvfp4 => true,
        _ => gated_or_sliced,
    };
    if needs && !local.is_multiple_of(block) {
        return Err(MoeError::invalid(format!("tensor `{tensor}`"), format!(
            "the rank's I = {local} is not a multiple of the {block}-element scale blocks of {format}: \
             its blocks would straddle the gate/up seam or the tensor-parallel slice"
        )));
    }
    Ok(())
}

/// Scale values as f32 little-endian bytes (the layout `BlockScales::Block128` is decoded from).
fn f32_le(bytes: &[u8], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::BF16 => bytes
            .chunks_exact(2)
            .flat_map(|c| {
                half::bf16::from_le_bytes([c[0], c[1]])
                    .to_f32()
                    .to_le_bytes()
            })
            .collect(),
        _ => bytes.to_vec(),
    }
}
