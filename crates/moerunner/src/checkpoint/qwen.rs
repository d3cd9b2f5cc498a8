//! Qwen3-MoE (`qwen3_moe`) and Qwen2-MoE (`qwen2_moe`): per-expert
//! `model.layers.{N}.mlp.experts.{e}.{gate,up,down}_proj.weight` (BF16, or F8_E4M3 with
//! `weight_scale_inv` in the FP8 releases), router `mlp.gate.weight` `[E, H]`. Routing: softmax
//! top-k, renormalized when `norm_topk_prob` (Qwen3: `renormalize`, Qwen2: `renormalize_naive`),
//! else plain softmax weights (`default`). Qwen2-MoE's shared expert is outside this layer.

use super::hf_config::HfConfig;
use super::{check_layer_index, swiglu, ExpertLayout, Plan};
use crate::config::{RoutingConfig, RoutingMethod};
use crate::error::Result;

pub(super) fn plan(cfg: &HfConfig, layer: usize, qwen2: bool) -> Result<Plan> {
    check_layer_index(cfg, layer)?;
    if cfg.usize_list_or_empty("mlp_only_layers")?.contains(&layer) {
        return Err(cfg.unsupported(
            "mlp_only_layers",
            format!("layer {layer} is a dense MLP layer, not a MoE layer"),
        ));
    }
    let step = cfg.usize_or("decoder_sparse_step", 1)?;
    if step == 0 || !(layer + 1).is_multiple_of(step) {
        return Err(cfg.unsupported(
            "decoder_sparse_step",
            format!("layer {layer} is a dense MLP layer (MoE every {step} layers)"),
        ));
    }
    // transformers' default for both configs is False; shipped Qwen3 configs set it to true.
    let renorm = cfg.bool_or("norm_topk_prob", false)?;
    let method = match (renorm, qwen2) {
        (false, _) => RoutingMethod::Default,
        (true, false) => RoutingMethod::Renormalize,
        (true, true) => RoutingMethod::RenormalizeNaive,
    };
    let p = format!("model.layers.{layer}.mlp.");
    let (num_experts, experts_key) = cfg.num_experts("num_experts")?;
    Ok(Plan {
        family: if qwen2 { "qwen2_moe" } else { "qwen3_moe" },
        num_experts,
        experts_key,
        hidden: cfg.usize("hidden_size")?,
        intermediate: cfg.usize("moe_intermediate_size")?,
        routing: RoutingConfig::new(method, cfg.top_k()?),
        activation: swiglu(cfg)?,
        experts: ExpertLayout::PerExpert {
            prefix: format!("{p}experts."),
            gate: Some("gate_proj"),
            up: "up_proj",
            down: "down_proj",
        },
        router_weight: format!("{p}gate.weight"),
        router_linear_bias: None,
        renamed: None,
        correction_bias: None,
    })
}
