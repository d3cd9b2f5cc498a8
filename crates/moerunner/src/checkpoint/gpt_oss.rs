//! GPT-OSS (`gpt_oss`): all experts of a layer in fused MXFP4 tensors under
//! `model.layers.{N}.mlp.experts.`: `gate_up_proj_blocks` U8 [E, 2I, H/32, 16] (two E2M1 a byte,
//! low nibble first; gate and up rows interleaved: even rows gate, odd rows up),
//! `gate_up_proj_scales` U8 [E, 2I, H/32] (UE8M0), `gate_up_proj_bias` BF16 [E, 2I], and
//! `down_proj_blocks` [E, H, I/32, 16], `down_proj_scales` [E, H, I/32], `down_proj_bias` [E, H].
//! Router `mlp.router.weight` [E, H] with a linear `mlp.router.bias` [E]. Keys:
//! `num_local_experts`, `num_experts_per_tok` (or `experts_per_token`), `intermediate_size`,
//! `swiglu_limit`, optional `swiglu_alpha` (default 1.702).
//!
//! The blocks flatten to our `[E, rows, K/2]` and the scales are already our linear layout, so a
//! rank's rows (interleaved: contiguous) are read straight from the map.

use safetensors::Dtype;

use super::config::HfConfig;
use super::shards::Shards;
use super::{ExpertSlice, Layout, LoadedExperts, Plan};
use crate::config::{Activation, RoutingConfig, RoutingMethod, W13Order, WeightFormat};
use crate::error::{MoeError, Result};
use crate::weights::{BlockScales, QuantizedTensor};

pub(crate) fn plan(cfg: &HfConfig, layer: usize) -> Result<Plan> {
    cfg.check_layer_index(layer, None)?;
    let top_k = if cfg.get("num_experts_per_tok").is_some() {
        cfg.usize("num_experts_per_tok")?
    } else {
        cfg.usize("experts_per_token")?
    };
    let limit = cfg.f32("swiglu_limit")?;
    if limit <= 0.0 {
        return Err(MoeError::invalid(
            cfg.key_name("swiglu_limit"),
            format!("must be positive, got {limit}"),
        ));
    }
    let alpha = cfg.f32_or("swiglu_alpha", 1.702)?;
    let p = format!("model.layers.{layer}.mlp.");
    Ok(Plan {
        num_experts: cfg.usize("num_local_experts")?,
        hidden: cfg.usize("hidden_size")?,
        intermediate: cfg.usize("intermediate_size")?,
        // GPT-OSS computes (up + 1) · clamp-SwiGLU(gate): β = 1.
        activation: Activation::SwigluOai {
            alpha,
            beta: 1.0,
            limit,
        },
        w13_order: W13Order::Interleaved,
        // Top-k over the logits, softmax over the selected ones.
        routing: RoutingConfig::new(RoutingMethod::Renormalize, top_k),
        router_weight: format!("{p}router.weight"),
        router_linear_bias: Some(format!("{p}router.bias")),
        selection_bias: None,
        layout: Layout::GptOss {
            prefix: format!("{p}experts."),
        },
    })
}

/// Reads experts `slice.experts`, rows `rows`, K-blocks `kb` of the fused projection `base`
/// (`{base}_blocks`, `{base}_scales`) of logical shape `[e, rows_full, k]`.
fn projection(
    sh: &Shards,
    base: &str,
    e: usize,
    [rows_full, k]: [usize; 2],
    slice: &ExpertSlice,
    rows: std::ops::Range<usize>,
    kb: std::ops::Range<usize>,
) -> Result<QuantizedTensor> {
    let blocks = sh.info(&format!("{base}_blocks"))?;
    blocks.expect_dtype(&[Dtype::U8])?;
    blocks.expect_shape(&[e, rows_full, k / 32, 16])?;
    let scales = sh.info(&format!("{base}_scales"))?;
    scales.expect_dtype(&[Dtype::U8])?;
    scales.expect_shape(&[e, rows_full, k / 32])?;
    let data = sh.read_box(
        &blocks,
        &[slice.experts.clone(), rows.clone(), kb.clone(), 0..16],
    )?;
    let s = sh
        .read_box(&scales, &[slice.experts.clone(), rows.clone(), kb.clone()])?
        .to_vec();
    if let Some(i) = s.iter().position(|&b| b == 255) {
        let nb = kb.len();
        return Err(MoeError::invalid(
            format!("tensor `{}`", scales.name),
            format!(
                "UE8M0 byte 255 (NaN) at [{}, {}, {}]",
                slice.experts.start + i / (rows.len() * nb),
                rows.start + (i / nb) % rows.len(),
                kb.start + i % nb
            ),
        ));
    }
    Ok(QuantizedTensor {
        format: WeightFormat::Mxfp4,
        experts: slice.experts.len(),
        rows: rows.len(),
        cols: kb.len() * 32,
        data,
        scales: BlockScales::Ue8m0(s),
        global_scales: Vec::new(),
    })
}

fn bias(
    sh: &Shards,
    name: &str,
    shape: [usize; 2],
    slice: &ExpertSlice,
    cols: std::ops::Range<usize>,
) -> Result<Vec<f32>> {
    let t = sh.info(name)?;
    t.expect_dtype(&[Dtype::BF16, Dtype::F32])?;
    t.expect_shape(&shape)?;
    let dtype = t.our_dtype()?;
    let bytes = sh.read_box(&t, &[slice.experts.clone(), cols.clone()])?;
    crate::tensor::HostTensor::new(name, dtype, vec![slice.experts.len(), cols.len()], bytes)?
        .to_f32_vec(name)
}

pub(crate) fn load(
    sh: &Shards,
    prefix: &str,
    e: usize,
    h: usize,
    i: usize,
    slice: &ExpertSlice,
) -> Result<LoadedExperts> {
    if !h.is_multiple_of(32) || !i.is_multiple_of(32) {
        return Err(MoeError::invalid(
            format!("tensor `{prefix}gate_up_proj_blocks`"),
            format!("H = {h} and I = {i} must be multiples of 32 for MXFP4"),
        ));
    }
    if let Some(f) = slice.quantize.filter(|f| *f != WeightFormat::Mxfp4) {
        return Err(MoeError::invalid("quantize", format!("online quantization reads BF16 checkpoints; GPT-OSS ships mxfp4 weights (asked for {f})")));
    }
    let f = &slice.features;
    // Interleaved rows: features i0..i1 are rows 2·i0..2·i1, one contiguous range.
    let w13_rows = 2 * f.start..2 * f.end;
    if !f.start.is_multiple_of(32) || !f.end.is_multiple_of(32) {
        return Err(MoeError::invalid(format!("tensor `{prefix}down_proj_blocks`"), format!(
            "the tensor-parallel slice columns {}..{} of I = {i} do not fall on its 32-column scale blocks; choose a tp size R with (I / R) a multiple of 32", f.start, f.end)));
    }
    let w13 = projection(
        sh,
        &format!("{prefix}gate_up_proj"),
        e,
        [2 * i, h],
        slice,
        w13_rows.clone(),
        0..h / 32,
    )?;
    let w2 = projection(
        sh,
        &format!("{prefix}down_proj"),
        e,
        [h, i],
        slice,
        0..h,
        f.start / 32..f.end / 32,
    )?;
    let w13_bias = bias(
        sh,
        &format!("{prefix}gate_up_proj_bias"),
        [e, 2 * i],
        slice,
        w13_rows,
    )?;
    // The GEMM2 bias is added once over the TP group, by rank 0; other ranks never read it.
    let w2_bias = if slice.tp_rank == 0 {
        Some(bias(
            sh,
            &format!("{prefix}down_proj_bias"),
            [e, h],
            slice,
            0..h,
        )?)
    } else {
        None
    };
    Ok(LoadedExperts {
        shipped: WeightFormat::Mxfp4,
        w13,
        w2,
        w13_bias: Some(w13_bias),
        w2_bias,
        w13_input_scale: None,
        w2_input_scale: None,
    })
}
