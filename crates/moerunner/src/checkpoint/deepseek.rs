//! DeepSeek-V3 (`deepseek_v3`): FP8 E4M3 experts `model.layers.{N}.mlp.experts.{e}.{gate,up,down}_proj`
//! `.weight` with F32 `weight_scale_inv` `[ceil(out/128), ceil(in/128)]` (a dequant multiplier,
//! despite the name); router `mlp.gate.weight` and the selection bias
//! `mlp.gate.e_score_correction_bias` `[E]`. Routing `deepseek_v3` with `n_group`, `topk_group`,
//! `routed_scaling_factor`. Layers below `first_k_dense_replace` are dense and refused.

use super::hf_config::HfConfig;
use super::{check_layer_index, swiglu, ExpertLayout, Plan};
use crate::config::{RoutingConfig, RoutingMethod};
use crate::error::Result;

pub(super) fn plan(cfg: &HfConfig, layer: usize) -> Result<Plan> {
    check_layer_index(cfg, layer)?;
    let dense = cfg.usize("first_k_dense_replace")?;
    if layer < dense {
        return Err(cfg.unsupported("first_k_dense_replace", format!(
            "layer {layer} is a dense MLP layer (the first {dense} layers are dense); MoE layers start at {dense}")));
    }
    let freq = cfg.usize_or("moe_layer_freq", 1)?;
    if freq == 0 || !layer.is_multiple_of(freq) {
        return Err(cfg.unsupported(
            "moe_layer_freq",
            format!("layer {layer} is a dense MLP layer (MoE every {freq} layers)"),
        ));
    }
    cfg.expect_str("scoring_func", &["sigmoid"])?;
    cfg.expect_str("topk_method", &["noaux_tc"])?;
    let routing = deepseek_v3_routing(cfg)?;
    let p = format!("model.layers.{layer}.mlp.");
    let (num_experts, experts_key) = cfg.num_experts("n_routed_experts")?;
    Ok(Plan {
        family: "deepseek_v3",
        num_experts,
        experts_key,
        hidden: cfg.usize("hidden_size")?,
        intermediate: cfg.usize("moe_intermediate_size")?,
        routing,
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
        correction_bias: Some(format!("{p}gate.e_score_correction_bias")),
    })
}

/// The `deepseek_v3` routing a config describes (`num_experts_per_tok`, `n_group`, `topk_group`,
/// `routed_scaling_factor`); shared with Nemotron-H, which routes the same way.
pub(super) fn deepseek_v3_routing(cfg: &HfConfig) -> Result<RoutingConfig> {
    if !cfg.bool_or("norm_topk_prob", true)? {
        return Err(cfg.unsupported(
            "norm_topk_prob",
            "false is not supported: deepseek_v3 routing renormalizes the selected weights",
        ));
    }
    let mut routing = RoutingConfig::new(RoutingMethod::DeepseekV3, cfg.top_k()?);
    routing.n_group = cfg.usize("n_group")?;
    routing.topk_group = cfg.usize("topk_group")?;
    routing.routed_scaling_factor = cfg.f32("routed_scaling_factor")?;
    Ok(routing)
}
