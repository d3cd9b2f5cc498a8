//! GPT-OSS (`model_type: gpt_oss`): MXFP4 experts stacked over E in
//! `model.layers.{N}.mlp.experts.{gate_up_proj,down_proj}_{blocks,scales,bias}`.
//! `gate_up_proj_blocks` U8 `[E, 2I, H/32, 16]` (two E2M1 per byte, low nibble first) has gate and
//! up rows interleaved (row 2i gate, 2i+1 up) — our `interleaved` order; `_scales` U8
//! `[E, 2I, H/32]` are UE8M0 exponents; biases BF16 `[E, 2I]` / `[E, H]`. Router
//! `mlp.router.weight` `[E, H]` with a linear `mlp.router.bias` `[E]`; softmax over the top k
//! (`renormalize`); activation swiglu_oai with α = 1.702, β = 1 and `swiglu_limit`.

use super::fused::bf16_experts;
use super::hf_config::HfConfig;
use super::shards::Shards;
use super::{check_layer_index, ExpertLayout, LoadedExperts, Plan, Slice};
use crate::config::{Activation, RoutingConfig, RoutingMethod, W13Order, WeightFormat};
use crate::error::{MoeError, Result};
use crate::tensor::DType;
use crate::weights::{BlockScales, QuantizedTensor};

const MX_BLOCK: usize = 32;

pub(super) fn plan(cfg: &HfConfig, layer: usize) -> Result<Plan> {
    check_layer_index(cfg, layer)?;
    let (e, experts_key) = cfg.num_experts("num_local_experts")?;
    let k = cfg.top_k()?;
    let limit = cfg.f32("swiglu_limit")?;
    // Clamping to [−limit, limit] needs limit > 0; the layer file refuses the same values.
    if limit.is_nan() || limit <= 0.0 {
        return Err(cfg.unsupported(
            "swiglu_limit",
            format!("must be positive (gate and up are clamped to [-limit, limit]), got {limit}"),
        ));
    }
    let p = format!("model.layers.{layer}.mlp.");
    Ok(Plan {
        family: "gpt_oss",
        num_experts: e,
        experts_key,
        hidden: cfg.usize("hidden_size")?,
        intermediate: cfg.usize("intermediate_size")?,
        routing: RoutingConfig::new(RoutingMethod::Renormalize, k),
        activation: Activation::SwigluOai {
            alpha: cfg.f32_or("swiglu_alpha", 1.702)?,
            beta: 1.0,
            limit,
        },
        experts: ExpertLayout::GptOss {
            prefix: format!("{p}experts."),
        },
        router_weight: format!("{p}router.weight"),
        router_linear_bias: Some(format!("{p}router.bias")),
        renamed: None,
        correction_bias: None,
    })
}

pub(super) fn load(sh: &Shards, plan: &Plan, prefix: &str, s: &Slice) -> Result<LoadedExperts> {
    if !sh.has(&format!("{prefix}gate_up_proj_blocks")) {
        return load_bf16(sh, plan, prefix, s);
    }
    let (e, h, inter) = (plan.num_experts, plan.hidden, plan.intermediate);
    let local = s.features.len();
    let (f0, f1) = (s.features.start, s.features.end);
    let gu_blocks = format!("{prefix}gate_up_proj_blocks");
    let down_blocks = format!("{prefix}down_proj_blocks");
    if !h.is_multiple_of(MX_BLOCK) || !local.is_multiple_of(MX_BLOCK) {
        return Err(MoeError::invalid(
            format!("tensor `{down_blocks}`"),
            format!(
            "H = {h} and the rank's I = {local} must be multiples of the 32-element MXFP4 blocks"),
        ));
    }
    let (hb, ib) = (h / MX_BLOCK, inter / MX_BLOCK);
    sh.check_tensor(&gu_blocks, &[DType::U8], &[e, 2 * inter, hb, 16])?;
    let gu_scales = format!("{prefix}gate_up_proj_scales");
    sh.check_tensor(&gu_scales, &[DType::U8], &[e, 2 * inter, hb])?;
    sh.check_tensor(&down_blocks, &[DType::U8], &[e, h, ib, 16])?;
    let down_scales = format!("{prefix}down_proj_scales");
    sh.check_tensor(&down_scales, &[DType::U8], &[e, h, ib])?;

    // Interleaving keeps a feature's gate and up rows adjacent, so features f0..f1 are the one
    // contiguous row range 2·f0..2·f1 (and stay interleaved).
    let ex = &s.experts.runs()[..];
    let rows = 2 * f0..2 * f1;
    let w13 = sh.read_outer(
        &gu_blocks,
        [e, 2 * inter, hb * 16],
        ex,
        rows.clone(),
        0..hb * 16,
    )?;
    let s13 = sh.read_outer(&gu_scales, [e, 2 * inter, hb], ex, rows.clone(), 0..hb)?;
    let w2 = sh.read_outer(&down_blocks, [e, h, ib * 16], ex, 0..h, f0 / 2..f1 / 2)?;
    let s2 = sh.read_outer(
        &down_scales,
        [e, h, ib],
        ex,
        0..h,
        f0 / MX_BLOCK..f1 / MX_BLOCK,
    )?;
    let (b13, b2) = biases(sh, plan, prefix, s)?;

    let n = s.experts.len();
    let w13 = QuantizedTensor {
        format: WeightFormat::Mxfp4,
        experts: n,
        rows: 2 * local,
        cols: h,
        data: w13.into(),
        scales: BlockScales::Ue8m0(s13),
        global_scales: Vec::new(),
    };
    let w2 = QuantizedTensor {
        format: WeightFormat::Mxfp4,
        experts: n,
        rows: h,
        cols: local,
        data: w2.into(),
        scales: BlockScales::Ue8m0(s2),
        global_scales: Vec::new(),
    };
    Ok(LoadedExperts {
        w13,
        w2,
        w13_order: W13Order::Interleaved,
        w13_bias: Some(b13),
        w2_bias: b2,
        w13_input_scale: None,
        w2_input_scale: None,
    })
}

/// The biases `gate_up_proj_bias` `[E, 2I]` (interleaved like the rows) and `down_proj_bias`
/// `[E, H]`, the rank's slice of each.
fn biases(
    sh: &Shards,
    plan: &Plan,
    prefix: &str,
    s: &Slice,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let (e, h, inter) = (plan.num_experts, plan.hidden, plan.intermediate);
    let gu_bias = format!("{prefix}gate_up_proj_bias");
    sh.check_tensor(&gu_bias, &[DType::BF16, DType::F32], &[e, 2 * inter])?;
    let down_bias = format!("{prefix}down_proj_bias");
    let bias_dtype = sh.check_tensor(&down_bias, &[DType::BF16, DType::F32], &[e, h])?;
    let bsz = bias_dtype.size();
    let ex = &s.experts.runs()[..];
    let rows = 2 * s.features.start..2 * s.features.end;
    let b13 = decode(
        sh.read_outer(&gu_bias, [e, 2 * inter, bsz], ex, rows, 0..bsz)?,
        bias_dtype,
    );
    // The GEMM2 bias is added once over the TP group: by rank 0, and only rank 0 reads it.
    let b2 = if s.tp_rank == 0 {
        Some(decode(
            sh.read_outer(&down_bias, [e, h, bsz], ex, 0..h, 0..bsz)?,
            bias_dtype,
        ))
    } else {
        None
    };
    Ok((b13, b2))
}

/// The BF16 layout of dequantized GPT-OSS releases and fine-tunes (transformers' own parameters):
/// `gate_up_proj` `[E, H, 2I]` — input-major, gate and up interleaved by column (column 2i gate,
/// 2i+1 up) — and `down_proj` `[E, I, H]`. Our W13 `[2I, H]` (interleaved rows) and W2 `[H, I]`
/// are their transposes; the rank's features are the contiguous columns 2·f0..2·f1 of gate_up
/// and the rows f0..f1 of down.
fn load_bf16(sh: &Shards, plan: &Plan, prefix: &str, s: &Slice) -> Result<LoadedExperts> {
    let (e, h, inter) = (plan.num_experts, plan.hidden, plan.intermediate);
    let gu = format!("{prefix}gate_up_proj");
    let down = format!("{prefix}down_proj");
    for (name, shape) in [(&gu, [e, h, 2 * inter]), (&down, [e, inter, h])] {
        let (dtype, got) = sh.meta(name, &[DType::BF16, DType::F8E4M3, DType::U8, DType::F32])?;
        if dtype != DType::BF16 {
            return Err(MoeError::Unsupported(format!(
                "GPT-OSS experts `{name}` in {dtype} are not a layout this loader reads: it reads                  MXFP4 (`gate_up_proj_blocks`/`_scales`) and BF16 `gate_up_proj` [E, H, 2I]"
            )));
        }
        if got != shape {
            return Err(MoeError::shape(
                name,
                format!("{shape:?} (GPT-OSS's BF16 layout: [E, in, out])"),
                &got,
            ));
        }
    }
    let (f0, f1) = (s.features.start, s.features.end);
    let local = s.features.len();
    let mut w13 = Vec::with_capacity(s.experts.len() * 2 * local * h * 2);
    let mut w2 = Vec::with_capacity(s.experts.len() * h * local * 2);
    for x in s.experts.iter() {
        let a = sh.read_box(&gu, [e, h, 4 * inter], x..x + 1, 0..h, 4 * f0..4 * f1)?;
        w13.extend(transpose_bf16(&a, h, 2 * local));
        let b = sh.read_box(&down, [e, inter, 2 * h], x..x + 1, f0..f1, 0..2 * h)?;
        w2.extend(transpose_bf16(&b, local, h));
    }
    let (b13, b2) = biases(sh, plan, prefix, s)?;
    let n = s.experts.len();
    Ok(bf16_experts(
        n,
        (2 * local, w13),
        (local, w2),
        h,
        W13Order::Interleaved,
        (Some(b13), b2),
    ))
}

/// `[rows, cols]` of 2-byte elements → `[cols, rows]`.
fn transpose_bf16(bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let mut out = vec![0u8; bytes.len()];
    for r in 0..rows {
        for c in 0..cols {
            let (i, o) = (2 * (r * cols + c), 2 * (c * rows + r));
            out[o..o + 2].copy_from_slice(&bytes[i..i + 2]);
        }
    }
    out
}

fn decode(bytes: Vec<u8>, dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        _ => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}
