//! Which expert layout a folder holds, and the loader of transformers 5's fused layout.
//!
//! transformers 5 keeps a MoE block's experts as stacked parameters: `experts.gate_up_proj`
//! `[E, 2I, H]` (each expert's gate rows, then its up rows: `Concatenate(dim=1)` of the per-expert
//! weights) and `experts.down_proj` `[E, H, I]`; a non-gated family (Nemotron-H) has
//! `experts.up_proj` `[E, I, H]`. `save_pretrained` writes them back in the original per-expert
//! names unless `save_original_format=False`, which also keeps transformers' module renames
//! (Mixtral and MiniMax-M2 `block_sparse_moe` → `mlp`, Nemotron-H `backbone` → `model`).
//!
//! A folder whose tensors match no layout this loader reads is refused with the layouts it looked
//! for and what it found under the experts' prefix, never with one missing tensor's name.

use super::shards::Shards;
use super::{ExpertLayout, LoadedExperts, Plan, Slice};
use crate::config::{W13Order, WeightFormat};
use crate::error::{MoeError, Result};
use crate::tensor::DType;
use crate::weights::{BlockScales, QuantizedTensor};

/// Replaces the plan's per-expert layout by the fused one when the folder holds that (renaming
/// the router's tensors along with it), or refuses a folder that holds neither, naming both.
pub(super) fn resolve_layout(sh: &Shards, plan: &mut Plan) -> Result<()> {
    let (experts_prefix, looked_for) = match &plan.experts {
        ExpertLayout::PerExpert {
            prefix, gate, up, ..
        } => {
            if sh.has(&format!("{prefix}0.{up}.weight")) {
                return Ok(());
            }
            let fused = if gate.is_some() {
                "gate_up_proj"
            } else {
                "up_proj"
            };
            let mut candidates = vec![(prefix.clone(), None)];
            if let Some((from, to)) = plan.renamed {
                candidates.push((prefix.replace(from, to), Some((from, to))));
            }
            for (p, rename) in &candidates {
                if sh.has(&format!("{p}{fused}")) {
                    if let Some((from, to)) = rename {
                        plan.router_weight = plan.router_weight.replace(from, to);
                        plan.correction_bias =
                            plan.correction_bias.as_ref().map(|b| b.replace(from, to));
                    }
                    plan.experts = ExpertLayout::Fused {
                        prefix: p.clone(),
                        gated: gate.is_some(),
                    };
                    return Ok(());
                }
            }
            let fused_names: Vec<String> = candidates
                .iter()
                .map(|(p, _)| format!("`{p}{fused}`"))
                .collect();
            (
                prefix.clone(),
                format!(
                    "the original per-expert layout (`{prefix}0.{up}.weight`, …) or transformers 5's \
                     fused layout ({})",
                    fused_names.join(" or ")
                ),
            )
        }
        ExpertLayout::GptOss { prefix } => {
            if sh.has(&format!("{prefix}gate_up_proj_blocks"))
                || sh.has(&format!("{prefix}gate_up_proj"))
            {
                return Ok(());
            }
            (
                prefix.clone(),
                format!(
                    "GPT-OSS's MXFP4 layout (`{prefix}gate_up_proj_blocks`, `_scales`) or its BF16 \
                     layout (`{prefix}gate_up_proj` [E, H, 2I])"
                ),
            )
        }
        ExpertLayout::Fused { .. } => return Ok(()),
    };
    let found = sh.names_under(&experts_prefix);
    let found = if found.is_empty() {
        format!("no tensor starts with `{experts_prefix}`")
    } else {
        let shown: Vec<String> = found.iter().take(6).map(|n| format!("`{n}`")).collect();
        let more = found.len().saturating_sub(shown.len());
        format!(
            "found {}{}",
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        )
    };
    Err(MoeError::Unsupported(format!(
        "{} layer's experts are in a layout this loader does not read: it reads {looked_for}; {found}",
        plan.family
    )))
}

/// The rank's slice of transformers 5's fused experts (BF16).
pub(super) fn load(
    sh: &Shards,
    plan: &Plan,
    prefix: &str,
    gated: bool,
    s: &Slice,
) -> Result<LoadedExperts> {
    let (e, h, inter) = (plan.num_experts, plan.hidden, plan.intermediate);
    let w13_name = format!("{prefix}{}", if gated { "gate_up_proj" } else { "up_proj" });
    let down_name = format!("{prefix}down_proj");
    let m = if gated { 2 * inter } else { inter };
    for (name, shape) in [(&w13_name, [e, m, h]), (&down_name, [e, h, inter])] {
        let (dtype, got) = sh.meta(name, &[DType::BF16, DType::F8E4M3, DType::U8, DType::F32])?;
        if dtype != DType::BF16 {
            return Err(MoeError::Unsupported(format!(
                "transformers 5's fused expert layout in {dtype} (`{name}`) is not supported, only \
                 BF16; save the quantized model with save_original_format=True (per-expert tensors)"
            )));
        }
        if got != shape {
            return Err(MoeError::shape(
                name,
                format!("{shape:?} (transformers 5's fused layout: [E, out, in])"),
                &got,
            ));
        }
    }
    let (f0, f1) = (s.features.start, s.features.end);
    let mut w13 = Vec::new();
    for x in s.experts.iter() {
        // Per expert: its gate rows of the slice, then its up rows (our `gate_up` order).
        w13.extend(sh.read_box(&w13_name, [e, m, 2 * h], x..x + 1, f0..f1, 0..2 * h)?);
        if gated {
            let up = inter + f0..inter + f1;
            w13.extend(sh.read_box(&w13_name, [e, m, 2 * h], x..x + 1, up, 0..2 * h)?);
        }
    }
    let w2 = sh.read_outer(
        &down_name,
        [e, h, 2 * inter],
        &s.experts.runs(),
        0..h,
        2 * f0..2 * f1,
    )?;
    let n = s.experts.len();
    let local = s.features.len();
    Ok(bf16_experts(
        n,
        (if gated { 2 * local } else { local }, w13),
        (local, w2),
        h,
        W13Order::GateUp,
        (None, None),
    ))
}

/// Loaded BF16 experts: W13 `[n, rows, h]`, W2 `[n, h, local]`, with optional biases.
pub(super) fn bf16_experts(
    n: usize,
    (w13_rows, w13): (usize, Vec<u8>),
    (local, w2): (usize, Vec<u8>),
    h: usize,
    w13_order: W13Order,
    (w13_bias, w2_bias): (Option<Vec<f32>>, Option<Vec<f32>>),
) -> LoadedExperts {
    let tensor = |rows, cols, data: Vec<u8>| QuantizedTensor {
        format: WeightFormat::Bf16,
        experts: n,
        rows,
        cols,
        data: data.into(),
        scales: BlockScales::None,
        global_scales: Vec::new(),
    };
    LoadedExperts {
        w13: tensor(w13_rows, h, w13),
        w2: tensor(h, local, w2),
        w13_order,
        w13_bias,
        w2_bias,
        w13_input_scale: None,
        w2_input_scale: None,
    }
}
