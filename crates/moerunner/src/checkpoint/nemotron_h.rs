//! Nemotron-H / Nemotron-3 (`nemotron_h`): hybrid Mamba/attention/MoE; layer N is MoE where
//! `hybrid_override_pattern[N]` is `E` (or `layers_block_type[N]` is `moe`). Non-gated relu2
//! experts: `up_proj` / `down_proj` under `backbone.layers.{N}.mixer.experts.{e}`, router
//! `mixer.gate.weight`, selection bias `mixer.gate.e_score_correction_bias`. Shipped in BF16, FP8
//! or ModelOpt NVFP4 (`weight` U8, `weight_scale` E4M3, `weight_scale_2`, `input_scale`). Routing
//! `deepseek_v3` with `n_group`, `topk_group`, `routed_scaling_factor`. The shared expert
//! (`mixer.shared_experts`) is a dense MLP outside this layer.

use super::config::HfConfig;
use super::experts::PerExpertNames;
use super::{Layout, Plan};
use crate::config::{Activation, RoutingConfig, RoutingMethod, W13Order};
use crate::error::{MoeError, Result};

/// The layer kinds, one per layer, from `hybrid_override_pattern` or `layers_block_type`.
fn layer_kinds(cfg: &HfConfig) -> Result<(String, Vec<String>)> {
    if let Some(p) = cfg.get("hybrid_override_pattern") {
        let s = p.as_str().ok_or_else(|| {
            MoeError::invalid(cfg.key_name("hybrid_override_pattern"), "is not a string")
        })?;
        return Ok((
            "hybrid_override_pattern".into(),
            s.chars().map(|c| c.to_string()).collect(),
        ));
    }
    if let Some(serde_json::Value::Array(a)) = cfg.get("layers_block_type") {
        let kinds = a
            .iter()
            .map(|v| v.as_str().unwrap_or("?").to_string())
            .collect();
        return Ok(("layers_block_type".into(), kinds));
    }
    Err(MoeError::missing(format!(
        "{} (or `layers_block_type`)",
        cfg.key_name("hybrid_override_pattern")
    )))
}

pub(crate) fn plan(cfg: &HfConfig, layer: usize) -> Result<Plan> {
    let (key, kinds) = layer_kinds(cfg)?;
    cfg.check_layer_index(layer, Some(kinds.len()))?;
    let kind = kinds[layer].as_str();
    if kind != "E" && kind != "moe" {
        let what = match kind {
            "M" | "mamba" | "linear_attention" => "a Mamba layer",
            "*" | "attention" | "full_attention" => "an attention layer",
            "-" | "mlp" => "a dense MLP layer",
            _ => "not a MoE layer",
        };
        return Err(MoeError::invalid(
            cfg.key_name(&key),
            format!("layer {layer} is {what} (`{kind}`), not a MoE layer (`E`)"),
        ));
    }
    if cfg.get("moe_latent_size").is_some() {
        return Err(MoeError::invalid(
            cfg.key_name("moe_latent_size"),
            "latent MoE (experts behind fc1/fc2 latent projections) is not supported",
        ));
    }
    cfg.expect_str("mlp_hidden_act", "relu2", &["relu2"])?;
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
    let p = format!("backbone.layers.{layer}.mixer.");
    Ok(Plan {
        num_experts: cfg.usize("n_routed_experts")?,
        hidden: cfg.usize("hidden_size")?,
        intermediate: cfg.usize("moe_intermediate_size")?,
        activation: Activation::Relu2,
        w13_order: W13Order::GateUp,
        routing,
        router_weight: format!("{p}gate.weight"),
        router_linear_bias: None,
        selection_bias: Some(format!("{p}gate.e_score_correction_bias")),
        layout: Layout::PerExpert(PerExpertNames {
            prefix: format!("{p}experts."),
            w13_parts: vec!["up_proj"],
            down: "down_proj",
        }),
    })
}
