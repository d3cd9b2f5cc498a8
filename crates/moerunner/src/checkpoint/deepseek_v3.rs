//! DeepSeek-V3 / R1 / Kimi-K2 (`deepseek_v3`, `kimi_k2`): per-expert `gate_proj` / `up_proj` /
//! `down_proj` under `model.layers.{N}.mlp.experts.{e}` in FP8 E4M3 with `weight_scale_inv`
//! 128×128 blocks, router `mlp.gate.weight`, selection bias `mlp.gate.e_score_correction_bias`.
//! Keys: `n_routed_experts`, `num_experts_per_tok`, `moe_intermediate_size`, `n_group`,
//! `topk_group`, `routed_scaling_factor`, `scoring_func` (sigmoid), `topk_method` (noaux_tc),
//! `norm_topk_prob`, `first_k_dense_replace`, `moe_layer_freq`. The shared expert
//! (`mlp.shared_experts`) is a dense MLP outside this layer.

use super::config::HfConfig;
use super::experts::PerExpertNames;
use super::{Layout, Plan};
use crate::config::{RoutingConfig, RoutingMethod, W13Order};
use crate::error::{MoeError, Result};

pub(crate) fn plan(cfg: &HfConfig, layer: usize) -> Result<Plan> {
    cfg.check_layer_index(layer, None)?;
    let first_dense = cfg.usize_or("first_k_dense_replace", 0)?;
    let freq = cfg.usize_or("moe_layer_freq", 1)?.max(1);
    if layer < first_dense {
        return Err(MoeError::invalid(cfg.key_name("first_k_dense_replace"), format!(
            "layer {layer} is a dense MLP layer (the first {first_dense} layers are dense); MoE layers start at {first_dense}")));
    }
    if !layer.is_multiple_of(freq) {
        return Err(MoeError::invalid(
            cfg.key_name("moe_layer_freq"),
            format!("layer {layer} is a dense MLP layer (every {freq}th layer is MoE)"),
        ));
    }
    super::qwen_moe::check_block_size(cfg)?;
    cfg.expect_str("scoring_func", "sigmoid", &["sigmoid"])?;
    cfg.expect_str("topk_method", "noaux_tc", &["noaux_tc"])?;
    if !cfg.bool_or("norm_topk_prob", true)? {
        return Err(MoeError::invalid(
            cfg.key_name("norm_topk_prob"),
            "false is not supported: deepseek_v3 routing renormalizes the selected weights",
        ));
    }
    let mut routing =
        RoutingConfig::new(RoutingMethod::DeepseekV3, cfg.usize("num_experts_per_tok")?);
    routing.n_group = cfg.usize_or("n_group", 1)?;
    routing.topk_group = cfg.usize_or("topk_group", 1)?;
    routing.routed_scaling_factor = cfg.f32_or("routed_scaling_factor", 1.0)?;
    let p = format!("model.layers.{layer}.mlp.");
    Ok(Plan {
        num_experts: cfg.usize("n_routed_experts")?,
        hidden: cfg.usize("hidden_size")?,
        intermediate: cfg.usize("moe_intermediate_size")?,
        activation: cfg.gated_activation("hidden_act")?,
        w13_order: W13Order::GateUp,
        routing,
        router_weight: format!("{p}gate.weight"),
        router_linear_bias: None,
        selection_bias: Some(format!("{p}gate.e_score_correction_bias")),
        layout: Layout::PerExpert(PerExpertNames {
            prefix: format!("{p}experts."),
            w13_parts: vec!["gate_proj", "up_proj"],
            down: "down_proj",
        }),
    })
}
