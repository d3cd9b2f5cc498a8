//! Nemotron-H (`nemotron_h`), e.g. the ModelOpt NVFP4 release: hybrid Mamba/attention/MoE layers
//! chosen by `hybrid_override_pattern` (`E` marks a MoE layer; newer configs list
//! `layers_block_type` instead, `moe` marking one). Experts are non-gated relu2:
//! `backbone.layers.{N}.mixer.experts.{e}.{up,down}_proj.weight` — U8 `[out, in/2]` E2M1 pairs
//! (low nibble first) with `weight_scale` E4M3 `[out, in/16]`, `weight_scale_2` F32 scalar (our
//! per-expert global) and `input_scale` F32 scalar; or BF16 / FP8 block in other releases. Router
//! `mixer.gate.weight`, selection bias `mixer.gate.e_score_correction_bias`; routing `deepseek_v3`
//! with `n_group`, `topk_group`, `routed_scaling_factor`. The shared expert is outside this layer.

use super::deepseek::deepseek_v3_routing;
use super::hf_config::HfConfig;
use super::{check_layer_index, ExpertLayout, Plan};
use crate::config::Activation;
use crate::error::Result;

pub(super) fn plan(cfg: &HfConfig, layer: usize) -> Result<Plan> {
    check_layer_index(cfg, layer)?;
    check_moe_layer(cfg, layer)?;
    if cfg.get("moe_latent_size").is_some() {
        return Err(cfg.unsupported(
            "moe_latent_size",
            "latent MoE (experts on a projected hidden size) is not supported",
        ));
    }
    cfg.expect_str("mlp_hidden_act", &["relu2"])?;
    let routing = deepseek_v3_routing(cfg)?;
    let p = format!("backbone.layers.{layer}.mixer.");
    let (num_experts, experts_key) = cfg.num_experts("n_routed_experts")?;
    Ok(Plan {
        family: "nemotron_h",
        num_experts,
        experts_key,
        hidden: cfg.usize("hidden_size")?,
        intermediate: cfg.usize("moe_intermediate_size")?,
        routing,
        activation: Activation::Relu2,
        experts: ExpertLayout::PerExpert {
            prefix: format!("{p}experts."),
            gate: None,
            up: "up_proj",
            down: "down_proj",
        },
        router_weight: format!("{p}gate.weight"),
        router_linear_bias: None,
        renamed: Some(("backbone.", "model.")),
        correction_bias: Some(format!("{p}gate.e_score_correction_bias")),
    })
}

/// The layer must be a MoE layer: `E` in `hybrid_override_pattern`, or `moe` in the
/// `layers_block_type` list that newer configs carry instead.
fn check_moe_layer(cfg: &HfConfig, layer: usize) -> Result<()> {
    // transformers 5 writes `layers_block_type` (its config class reads `layer_types` as an alias).
    let list_key = ["layers_block_type", "layer_types"]
        .into_iter()
        .find(|k| cfg.get(k).is_some())
        .unwrap_or("layers_block_type");
    if cfg.get("hybrid_override_pattern").is_none() {
        if let Some(types) = cfg.get(list_key) {
            // Entries are read by position: a non-string entry is an error, not skipped (skipping
            // it would shift every later layer's kind by one).
            let Some(list) = types.as_array() else {
                return Err(
                    cfg.unsupported(list_key, format!("must be a list of strings, got {types}"))
                );
            };
            if let Some((i, v)) = list.iter().enumerate().find(|(_, v)| !v.is_string()) {
                return Err(cfg.unsupported(
                    list_key,
                    format!("entry {i} is {v}, not a string (`moe`, `mamba`, `attention`, `mlp`)"),
                ));
            }
            let kinds: Vec<&str> = list.iter().filter_map(|v| v.as_str()).collect();
            return match kinds.get(layer) {
                Some(&"moe") => Ok(()),
                Some(k) => Err(cfg.unsupported(
                    list_key,
                    format!("layer {layer} is `{k}`, not a MoE layer (`moe`)"),
                )),
                None => {
                    Err(cfg.unsupported(list_key, format!("has no string entry for layer {layer}")))
                }
            };
        }
    }
    let pattern = cfg.str("hybrid_override_pattern")?;
    match pattern.chars().nth(layer) {
        Some('E') => Ok(()),
        Some(c) => Err(cfg.unsupported(
            "hybrid_override_pattern",
            format!(
                "layer {layer} is `{c}`, not a MoE layer (`E`); MoE layers: {:?}",
                pattern
                    .char_indices()
                    .filter(|(_, c)| *c == 'E')
                    .map(|(i, _)| i)
                    .collect::<Vec<_>>()
            ),
        )),
        None => Err(cfg.unsupported(
            "hybrid_override_pattern",
            format!("has no entry for layer {layer}"),
        )),
    }
}
