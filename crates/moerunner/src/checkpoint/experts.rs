//! Experts stored the Hugging Face way, one module per expert: `{prefix}{e}.{proj}.weight` with its
//! scales beside it (`weight_scale_inv`, `weight_scale`, `weight_scale_2`, `input_scale`). Used by
//! Qwen-MoE, Mixtral, DeepSeek-V3, MiniMax-M2 (gated: gate then up) and Nemotron-H (`up_proj` only).
//!
//! The shipped format is read off the tensors themselves (dtype and which scales exist), not off
//! `quantization_config`: mixed-precision exports keep some layers in BF16, and the tensors are the
//! ground truth. Each rank reads, per expert, its rows of every W13 part and its columns of W2, and
//! the scale blocks that cover exactly those.

use std::ops::Range;

use safetensors::Dtype;

use super::shards::Shards;
use super::{ExpertSlice, LoadedExperts};
use crate::config::WeightFormat;
use crate::error::{MoeError, Result};
use crate::formats::e4m3;
use crate::weights::{BlockScales, QuantizedTensor};

/// The weight layout of one model's per-expert modules.
#[derive(Clone, Debug)]
pub struct PerExpertNames {
    /// e.g. `model.layers.3.mlp.experts.`; the expert id and `.{proj}.weight` follow.
    pub prefix: String,
    /// W13's parts in row order: `[gate, up]` for gated models, `[up]` for non-gated ones.
    pub w13_parts: Vec<&'static str>,
    /// W2's projection (`down_proj` or `w2`).
    pub down: &'static str,
}

impl PerExpertNames {
    fn base(&self, e: usize, proj: &str) -> String {
        format!("{}{e}.{proj}", self.prefix)
    }
}

/// How a checkpoint stores its expert weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `weight` BF16.
    Bf16,
    /// `weight` F8_E4M3 + `weight_scale_inv` F32 per 128×128 block (DeepSeek / Qwen FP8).
    Fp8Block,
    /// `weight` F8_E4M3 + `weight_scale` F32 scalar + `input_scale` F32 scalar (static FP8).
    Fp8Tensor,
    /// ModelOpt NVFP4: `weight` U8 [rows, K/2], `weight_scale` F8_E4M3 [rows, K/16],
    /// `weight_scale_2` F32 scalar, `input_scale` F32 scalar.
    Nvfp4,
}

impl Source {
    pub fn weight_format(self) -> WeightFormat {
        match self {
            Source::Bf16 => WeightFormat::Bf16,
            Source::Fp8Block => WeightFormat::Fp8Block,
            Source::Fp8Tensor => WeightFormat::Fp8,
            Source::Nvfp4 => WeightFormat::Nvfp4,
        }
    }
}

/// Reads the format of the module `base` (`...experts.0.gate_proj`) off its tensors.
pub fn detect(sh: &Shards, base: &str) -> Result<Source> {
    let w = sh.info(&format!("{base}.weight"))?;
    let has = |s: &str| sh.has(&format!("{base}.{s}"));
    match w.dtype {
        Dtype::BF16 => Ok(Source::Bf16),
        Dtype::F8_E4M3 if has("weight_scale_inv") => Ok(Source::Fp8Block),
        Dtype::F8_E4M3 if has("weight_scale") => Ok(Source::Fp8Tensor),
        Dtype::F8_E4M3 => Err(MoeError::missing(format!("tensor `{base}.weight_scale_inv` (128×128 block scales) or `{base}.weight_scale` (per-tensor scale) beside the FP8 weight"))),
        Dtype::U8 if has("weight_scale") && has("weight_scale_2") => Ok(Source::Nvfp4),
        Dtype::U8 => Err(MoeError::missing(format!("tensor `{base}.weight_scale` and `{base}.weight_scale_2` beside the packed NVFP4 weight"))),
        other => Err(MoeError::dtype(format!("{base}.weight"), "BF16, F8_E4M3 (FP8) or U8 (NVFP4)", format!("{other:?}"))),
    }
}

/// One expert's rows × columns of one projection, with the scales that cover them.
struct Part {
    data: Vec<u8>,
    block128: Vec<f32>,
    block_bytes: Vec<u8>,
    /// Fp8Tensor: `weight_scale`; Nvfp4: `weight_scale_2`.
    scalar: Option<f32>,
}

/// Rows (or columns) `r` of a dimension of `n` that splits into `block`-sized scale blocks must
/// start on a block and end on one (or at `n`); returns the block range.
fn block_range(
    name: &str,
    axis: &str,
    r: &Range<usize>,
    n: usize,
    block: usize,
) -> Result<Range<usize>> {
    if !r.start.is_multiple_of(block) || (!r.end.is_multiple_of(block) && r.end != n) {
        return Err(MoeError::invalid(format!("tensor `{name}`"), format!(
            "the tensor-parallel slice {axis}s {}..{} of {n} do not fall on its {block}-{axis} scale blocks; \
             choose a tp size R with (I / R) a multiple of {block}", r.start, r.end)));
    }
    Ok(r.start / block..r.end.div_ceil(block))
}

/// Reads `rows` × `cols` of the module `base` of logical shape `[full_rows, full_cols]`.
fn read_part(
    sh: &Shards,
    base: &str,
    src: Source,
    full: [usize; 2],
    rows: Range<usize>,
    cols: Range<usize>,
) -> Result<Part> {
    let [fr, fc] = full;
    let w = sh.info(&format!("{base}.weight"))?;
    let mut part = Part {
        data: Vec::new(),
        block128: Vec::new(),
        block_bytes: Vec::new(),
        scalar: None,
    };
    match src {
        Source::Bf16 | Source::Fp8Block | Source::Fp8Tensor => {
            w.expect_dtype(&[if src == Source::Bf16 {
                Dtype::BF16
            } else {
                Dtype::F8_E4M3
            }])?;
            w.expect_shape(&[fr, fc])?;
            part.data = sh.read_box(&w, &[rows.clone(), cols.clone()])?.to_vec();
        }
        Source::Nvfp4 => {
            w.expect_dtype(&[Dtype::U8])?;
            w.expect_shape(&[fr, fc / 2])?;
            // Whole 16-element blocks keep both the packed bytes and the block scales intact.
            let cb = block_range(&w.name, "column", &cols, fc, 16)?;
            part.data = sh
                .read_box(&w, &[rows.clone(), cols.start / 2..cols.end / 2])?
                .to_vec();
            let s = sh.info(&format!("{base}.weight_scale"))?;
            s.expect_dtype(&[Dtype::F8_E4M3])?;
            s.expect_shape(&[fr, fc / 16])?;
            part.block_bytes = sh.read_box(&s, &[rows.clone(), cb])?.to_vec();
            let g = sh.info(&format!("{base}.weight_scale_2"))?;
            part.scalar = Some(sh.read_scalar_f32(&g)?);
        }
    }
    match src {
        Source::Fp8Block => {
            let s = sh.info(&format!("{base}.weight_scale_inv"))?;
            s.expect_dtype(&[Dtype::F32, Dtype::BF16])?;
            s.expect_shape(&[fr.div_ceil(128), fc.div_ceil(128)])?;
            let rb = block_range(&w.name, "row", &rows, fr, 128)?;
            let cb = block_range(&w.name, "column", &cols, fc, 128)?;
            let dtype = s.our_dtype()?;
            let shape = vec![rb.len(), cb.len()];
            let bytes = sh.read_box(&s, &[rb, cb])?;
            part.block128 = crate::tensor::HostTensor::new(&s.name, dtype, shape, bytes)?
                .to_f32_vec(&s.name)?;
        }
        Source::Fp8Tensor => {
            let s = sh.info(&format!("{base}.weight_scale"))?;
            part.scalar = Some(sh.read_scalar_f32(&s)?);
        }
        _ => {}
    }
    Ok(part)
}

/// Joins the parts of one expert's projection (W13: gate then up) into a one-expert tensor.
fn join(
    name: &str,
    src: Source,
    parts: Vec<Part>,
    rows_per_part: usize,
    cols: usize,
) -> Result<QuantizedTensor> {
    let rows = rows_per_part * parts.len();
    let format = src.weight_format();
    let mut t = QuantizedTensor {
        format,
        experts: 1,
        rows,
        cols,
        data: Vec::new().into(),
        scales: BlockScales::None,
        global_scales: Vec::new(),
    };
    let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
    match src {
        Source::Bf16 => parts.iter().for_each(|p| data.extend_from_slice(&p.data)),
        Source::Fp8Block => {
            // Each part's row blocks stack under the previous part's only when the part ends on a
            // block boundary; otherwise one 128-row block of W13 would straddle gate and up.
            if parts.len() > 1 && !rows_per_part.is_multiple_of(128) {
                return Err(MoeError::invalid(format!("tensor `{name}`"), format!(
                    "the gate and up halves ({rows_per_part} rows each on this rank) are not multiples of the 128-row scale blocks, \
                     so they cannot share one fp8_block W13; convert with --quantize to another format")));
            }
            let mut s = Vec::new();
            for p in &parts {
                data.extend_from_slice(&p.data);
                s.extend_from_slice(&p.block128);
            }
            t.scales = BlockScales::Block128(s);
        }
        Source::Fp8Tensor => {
            // One scale per expert and GEMM: parts with a smaller scale are requantized onto the
            // largest (SGLang does the same), which is exact for the part that already has it.
            let scales: Vec<f32> = parts.iter().map(|p| p.scalar.unwrap_or(1.0)).collect();
            let s_max = scales.iter().fold(0f32, |m, &v| m.max(v));
            if !(s_max.is_finite() && s_max > 0.0) {
                return Err(MoeError::invalid(
                    format!("tensor `{name}.weight_scale`"),
                    format!("must be finite and positive, got {s_max}"),
                ));
            }
            for (p, &s) in parts.iter().zip(&scales) {
                if s == s_max {
                    data.extend_from_slice(&p.data);
                } else {
                    data.extend(
                        p.data
                            .iter()
                            .map(|&b| e4m3::encode(e4m3::decode(b) * (s / s_max))),
                    );
                }
            }
            t.scales = BlockScales::PerExpert(vec![s_max]);
        }
        Source::Nvfp4 => {
            let g = parts[0].scalar.unwrap_or(1.0);
            if parts.iter().any(|p| p.scalar != Some(g)) {
                return Err(MoeError::invalid(format!("tensor `{name}.weight_scale_2`"), format!(
                    "the gate and up halves have different global scales ({:?}); nvfp4 W13 shares one global scale per expert",
                    parts.iter().map(|p| p.scalar.unwrap_or(0.0)).collect::<Vec<_>>())));
            }
            let mut s = Vec::new();
            for p in &parts {
                data.extend_from_slice(&p.data);
                s.extend_from_slice(&p.block_bytes);
            }
            t.scales = BlockScales::E4m3(s);
            t.global_scales = vec![g];
        }
    }
    t.data = data.into();
    Ok(t)
}

/// The largest `input_scale` over all experts (not just this rank's) of the modules `bases`: one
/// static activation scale per GEMM for the whole layer, so every rank quantizes alike.
fn max_input_scale(sh: &Shards, bases: impl Iterator<Item = String>) -> Result<f32> {
    let mut m = 0f32;
    for b in bases {
        let t = sh.info(&format!("{b}.input_scale"))?;
        let v = sh.read_scalar_f32(&t)?;
        if !(v.is_finite() && v > 0.0) {
            return Err(MoeError::invalid(
                format!("tensor `{}`", t.name),
                format!("must be finite and positive, got {v}"),
            ));
        }
        m = m.max(v);
    }
    Ok(m)
}

/// Loads this rank's experts of a per-expert layout: `[I, H]` W13 parts and `[H, I]` W2.
pub(crate) fn load(
    sh: &Shards,
    names: &PerExpertNames,
    num_experts: usize,
    hidden: usize,
    inter: usize,
    slice: &ExpertSlice,
) -> Result<LoadedExperts> {
    let first = slice.experts.start;
    let src = detect(sh, &names.base(first, names.w13_parts[0]))?;
    let local_i = slice.features.len();
    let mut w13 = Vec::with_capacity(slice.experts.len());
    let mut w2 = Vec::with_capacity(slice.experts.len());
    for e in slice.experts.clone() {
        let mut parts = Vec::with_capacity(names.w13_parts.len());
        for proj in &names.w13_parts {
            let base = names.base(e, proj);
            let got = detect(sh, &base)?;
            if got != src {
                return Err(MoeError::invalid(
                    format!("tensor `{base}.weight`"),
                    format!("is stored as {got:?} but expert {first} as {src:?}"),
                ));
            }
            parts.push(read_part(
                sh,
                &base,
                src,
                [inter, hidden],
                slice.features.clone(),
                0..hidden,
            )?);
        }
        let w13_name = names.base(e, names.w13_parts[0]);
        w13.push(slice.finish(join(&w13_name, src, parts, local_i, hidden)?)?);
        let base = names.base(e, names.down);
        if detect(sh, &base)? != src {
            return Err(MoeError::invalid(
                format!("tensor `{base}.weight`"),
                format!("is not stored as {src:?} like the other experts"),
            ));
        }
        let part = read_part(
            sh,
            &base,
            src,
            [hidden, inter],
            0..hidden,
            slice.features.clone(),
        )?;
        w2.push(slice.finish(join(&base, src, vec![part], hidden, local_i)?)?);
    }
    let (w13_input_scale, w2_input_scale) = if matches!(src, Source::Fp8Tensor | Source::Nvfp4) {
        let w13_bases =
            (0..num_experts).flat_map(|e| names.w13_parts.iter().map(move |p| names.base(e, p)));
        let w2_bases = (0..num_experts).map(|e| names.base(e, names.down));
        (
            Some(max_input_scale(sh, w13_bases)?),
            Some(max_input_scale(sh, w2_bases)?),
        )
    } else {
        (None, None)
    };
    Ok(LoadedExperts {
        shipped: src.weight_format(),
        w13: crate::synth::concat_experts(w13)?,
        w2: crate::synth::concat_experts(w2)?,
        w13_bias: None,
        w2_bias: None,
        w13_input_scale,
        w2_input_scale,
    })
}
