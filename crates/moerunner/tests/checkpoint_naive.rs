//! Loading MoE layers from Hugging Face model folders (`docs/checkpoints.md`): one miniature
//! checkpoint per family with the real names, dtypes, shape conventions, config keys and sharding.
//! Each loaded layer must match a naive float64 evaluation of the weights as the model means them
//! (Hugging Face layout, written by the test), every TP/EP rank must equal the whole layer sliced
//! by `shard::shard` and read exactly its own bytes, and bad folders fail naming the key or tensor.

mod checkpoint_naive_support;

use std::path::PathBuf;

use checkpoint_naive_support::{bf16_bytes, decode_mxfp4, tmp_dir, Ckpt, Expert, Ship};
use moerunner::activation::{gated_f64, plain_f64};
use moerunner::checkpoint::{load_layer, CheckpointLayer, LoadOptions};
use moerunner::formats::{quantize_rows, quantize_weights};
use moerunner::routing::route_logits;
use moerunner::{
    Activation, ActivationFormat, HostTensor, MoeLayer, Parallelism, RoutingConfig, RoutingMethod,
    WeightFormat,
};
use safetensors::Dtype;
use serde_json::json;

/// A miniature on disk plus what the test knows about it.
struct Built {
    dir: PathBuf,
    layer: usize,
    experts: Vec<Expert>,
    router: Vec<f32>,
    router_bias: Option<Vec<f32>>,
    selection_bias: Option<Vec<f32>>,
    e: usize,
    h: usize,
    i: usize,
    activation: Activation,
    routing: RoutingConfig,
    format: WeightFormat,
    act_format: ActivationFormat,
    input_scales: Option<(f32, f32)>,
    /// Bytes a rank must read: router (+ biases) and, per expert, its rows/columns and scales.
    expected_bytes: Box<dyn Fn(Parallelism) -> usize>,
}

impl Drop for Built {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const TOKENS: usize = 7;

/// Bytes of one rank's per-expert reads for a gated (`parts` = 2) or non-gated (1) layout.
fn per_expert_bytes(
    ship: Ship,
    parts: usize,
    e: usize,
    h: usize,
    i: usize,
    p: Parallelism,
) -> usize {
    let (el, il) = (e / p.ep_size, i / p.tp_size);
    let elems = (parts + 1) * il * h;
    let per_expert = match ship {
        Ship::Bf16 => 2 * elems,
        Ship::Fp8Block => elems + 4 * (parts + 1) * il.div_ceil(128) * h.div_ceil(128),
        Ship::Fp8Tensor => elems + 4 * (parts + 1),
        Ship::Nvfp4 => elems / 2 + elems / 16 + 4 * (parts + 1),
    };
    // Static input scales are read for every expert: one layer-wide scale per GEMM.
    let input_scales = if matches!(ship, Ship::Fp8Tensor | Ship::Nvfp4) {
        4 * e * (parts + 1)
    } else {
        0
    };
    el * per_expert + input_scales
}

fn scalar(ck: &Ckpt, name: &str) -> f32 {
    let b = &ck.tensors[name].2;
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The largest `input_scale` over experts of the modules `projs`.
fn max_input(ck: &Ckpt, prefix: &str, e: usize, projs: &[&str]) -> f32 {
    (0..e)
        .flat_map(|x| {
            projs
                .iter()
                .map(move |p| format!("{prefix}{x}.{p}.input_scale"))
        })
        .map(|n| scalar(ck, &n))
        .fold(0.0, f32::max)
}

fn qwen3(name: &str, ship: Ship) -> Built {
    let (e, h, i, k) = if ship == Ship::Bf16 {
        (8, 64, 64, 2)
    } else {
        (4, 192, 256, 2)
    };
    let mut config = json!({
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": h,
        "intermediate_size": 96, "moe_intermediate_size": i, "num_experts": e, "num_experts_per_tok": k,
        "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [0], "num_hidden_layers": 3,
        "hidden_act": "silu", "vocab_size": 16, "torch_dtype": "bfloat16"
    });
    if ship == Ship::Fp8Block {
        config["quantization_config"] = json!({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]});
    }
    let mut ck = Ckpt::new(1, config);
    ck.add_filler("model.embed_tokens.weight", &[16, h]);
    for l in 0..3 {
        ck.add_filler(&format!("model.layers.{l}.input_layernorm.weight"), &[h]);
        ck.add_filler(
            &format!("model.layers.{l}.self_attn.o_proj.weight"),
            &[h, h],
        );
    }
    for p in ["gate_proj", "up_proj"] {
        ck.add_filler(&format!("model.layers.0.mlp.{p}.weight"), &[96, h]);
    }
    ck.add_filler("model.layers.0.mlp.down_proj.weight", &[h, 96]);
    let amp = 2.0 * (3.0 / h as f32).sqrt();
    let router = ck.add_bf16("model.layers.1.mlp.gate.weight", &[e, h], amp);
    let experts = ck.add_experts(
        "model.layers.1.mlp.experts.",
        [Some("gate_proj"), Some("up_proj"), Some("down_proj")],
        e,
        h,
        i,
        ship,
    );
    ck.add_bf16("model.layers.2.mlp.gate.weight", &[e, h], amp);
    ck.add_experts(
        "model.layers.2.mlp.experts.",
        [Some("gate_proj"), Some("up_proj"), Some("down_proj")],
        e,
        h,
        i,
        ship,
    );
    let dir = tmp_dir(name);
    ck.write(&dir, 3);
    let format = if ship == Ship::Bf16 {
        WeightFormat::Bf16
    } else {
        WeightFormat::Fp8Block
    };
    Built {
        dir,
        layer: 1,
        experts,
        router,
        router_bias: None,
        selection_bias: None,
        e,
        h,
        i,
        activation: Activation::Swiglu,
        routing: RoutingConfig::new(RoutingMethod::Renormalize, k),
        format,
        act_format: format.default_activation_format(),
        input_scales: None,
        expected_bytes: Box::new(move |p| e * h * 2 + per_expert_bytes(ship, 2, e, h, i, p)),
    }
}

fn mixtral(name: &str, ship: Ship) -> Built {
    let (e, h, i, k) = (4, 64, 32, 2);
    let config = json!({
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": h, "intermediate_size": i,
        "num_local_experts": e, "num_experts_per_tok": k, "num_hidden_layers": 2, "hidden_act": "silu", "vocab_size": 16
    });
    let mut ck = Ckpt::new(2, config);
    ck.add_filler("model.embed_tokens.weight", &[16, h]);
    let amp = 2.0 * (3.0 / h as f32).sqrt();
    ck.add_bf16("model.layers.0.block_sparse_moe.gate.weight", &[e, h], amp);
    ck.add_experts(
        "model.layers.0.block_sparse_moe.experts.",
        [Some("w1"), Some("w3"), Some("w2")],
        e,
        h,
        i,
        ship,
    );
    let router = ck.add_bf16("model.layers.1.block_sparse_moe.gate.weight", &[e, h], amp);
    let prefix = "model.layers.1.block_sparse_moe.experts.";
    let experts = ck.add_experts(prefix, [Some("w1"), Some("w3"), Some("w2")], e, h, i, ship);
    ck.add_filler("model.layers.1.post_attention_layernorm.weight", &[h]);
    let input_scales = (ship == Ship::Fp8Tensor).then(|| {
        (
            max_input(&ck, prefix, e, &["w1", "w3"]),
            max_input(&ck, prefix, e, &["w2"]),
        )
    });
    let dir = tmp_dir(name);
    ck.write(&dir, 2);
    let format = if ship == Ship::Bf16 {
        WeightFormat::Bf16
    } else {
        WeightFormat::Fp8
    };
    Built {
        dir,
        layer: 1,
        experts,
        router,
        router_bias: None,
        selection_bias: None,
        e,
        h,
        i,
        activation: Activation::Swiglu,
        routing: RoutingConfig::new(RoutingMethod::Renormalize, k),
        format,
        act_format: format.default_activation_format(),
        input_scales,
        expected_bytes: Box::new(move |p| e * h * 2 + per_expert_bytes(ship, 2, e, h, i, p)),
    }
}

fn deepseek(name: &str) -> Built {
    let (e, h, i, k) = (8, 192, 256, 2);
    let config = json!({
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": h,
        "intermediate_size": 320, "moe_intermediate_size": i, "n_routed_experts": e, "n_shared_experts": 1,
        "num_experts_per_tok": k, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": true,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "num_hidden_layers": 3, "hidden_act": "silu",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    });
    let mut ck = Ckpt::new(3, config);
    // Layer 0 is dense (first_k_dense_replace = 1); layers 1 and 2 are MoE with a shared expert.
    ck.add_linear("model.layers.0.mlp.gate_proj", 320, h, Ship::Fp8Block, None);
    ck.add_linear("model.layers.0.mlp.up_proj", 320, h, Ship::Fp8Block, None);
    ck.add_linear("model.layers.0.mlp.down_proj", h, 320, Ship::Fp8Block, None);
    let amp = 2.0 * (3.0 / h as f32).sqrt();
    let layer = |ck: &mut Ckpt, l: usize| {
        let p = format!("model.layers.{l}.mlp.");
        let router = ck.add_bf16(&format!("{p}gate.weight"), &[e, h], amp);
        let bias = ck.uniform(e, 0.1);
        ck.add_f32(&format!("{p}gate.e_score_correction_bias"), &[e], &bias);
        let experts = ck.add_experts(
            &format!("{p}experts."),
            [Some("gate_proj"), Some("up_proj"), Some("down_proj")],
            e,
            h,
            i,
            Ship::Fp8Block,
        );
        ck.add_linear(
            &format!("{p}shared_experts.gate_proj"),
            i,
            h,
            Ship::Fp8Block,
            None,
        );
        (router, bias, experts)
    };
    let (router, bias, experts) = layer(&mut ck, 1);
    layer(&mut ck, 2);
    let dir = tmp_dir(name);
    ck.write(&dir, 4);
    let mut routing = RoutingConfig::new(RoutingMethod::DeepseekV3, k);
    routing.n_group = 4;
    routing.topk_group = 2;
    routing.routed_scaling_factor = 2.5;
    Built {
        dir,
        layer: 1,
        experts,
        router,
        router_bias: None,
        selection_bias: Some(bias),
        e,
        h,
        i,
        activation: Activation::Swiglu,
        routing,
        format: WeightFormat::Fp8Block,
        act_format: ActivationFormat::Fp8Block,
        input_scales: None,
        expected_bytes: Box::new(move |p| {
            e * h * 2 + e * 4 + per_expert_bytes(Ship::Fp8Block, 2, e, h, i, p)
        }),
    }
}

fn minimax(name: &str) -> Built {
    let (e, h, i, k) = (8, 128, 128, 2);
    let config = json!({
        "model_type": "minimax_m2", "architectures": ["MiniMaxM2ForCausalLM"], "hidden_size": h, "intermediate_size": i,
        "num_local_experts": e, "num_experts_per_tok": k, "scoring_func": "sigmoid", "use_routing_bias": true,
        "num_hidden_layers": 2, "hidden_act": "silu",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8", "weight_block_size": [128, 128]}
    });
    let mut ck = Ckpt::new(4, config);
    let amp = 2.0 * (3.0 / h as f32).sqrt();
    let p = "model.layers.1.block_sparse_moe.";
    let router = ck.uniform(e * h, amp);
    ck.add_f32(&format!("{p}gate.weight"), &[e, h], &router);
    let bias = ck.uniform(e, 0.1);
    ck.add_f32(&format!("{p}e_score_correction_bias"), &[e], &bias);
    let experts = ck.add_experts(
        &format!("{p}experts."),
        [Some("w1"), Some("w3"), Some("w2")],
        e,
        h,
        i,
        Ship::Fp8Block,
    );
    ck.add_experts(
        "model.layers.0.block_sparse_moe.experts.",
        [Some("w1"), Some("w3"), Some("w2")],
        e,
        h,
        i,
        Ship::Fp8Block,
    );
    let dir = tmp_dir(name);
    ck.write(&dir, 3);
    Built {
        dir,
        layer: 1,
        experts,
        router,
        router_bias: None,
        selection_bias: Some(bias),
        e,
        h,
        i,
        activation: Activation::Swiglu,
        routing: RoutingConfig::new(RoutingMethod::Minimax2, k),
        format: WeightFormat::Fp8Block,
        act_format: ActivationFormat::Fp8Block,
        input_scales: None,
        expected_bytes: Box::new(move |p| {
            e * h * 4 + e * 4 + per_expert_bytes(Ship::Fp8Block, 2, e, h, i, p)
        }),
    }
}

fn nemotron(name: &str) -> Built {
    let (e, h, i, k) = (8, 64, 32, 2);
    let config = json!({
        "model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "hybrid_override_pattern": "ME*E",
        "hidden_size": h, "moe_intermediate_size": i, "moe_shared_expert_intermediate_size": 64, "n_shared_experts": 1,
        "n_routed_experts": e, "num_experts_per_tok": k, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.5,
        "norm_topk_prob": true, "mlp_hidden_act": "relu2", "num_hidden_layers": 4,
        "quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}
    });
    let mut ck = Ckpt::new(5, config);
    ck.add_filler("backbone.embeddings.weight", &[16, h]);
    ck.add_filler("backbone.layers.0.mixer.A_log", &[8]);
    ck.add_filler("backbone.layers.2.mixer.o_proj.weight", &[h, h]);
    let amp = 2.0 * (3.0 / h as f32).sqrt();
    let mut keep = None;
    for l in [1, 3] {
        let p = format!("backbone.layers.{l}.mixer.");
        let router = ck.add_bf16(&format!("{p}gate.weight"), &[e, h], amp);
        let bias = ck.uniform(e, 0.1);
        ck.add_f32(&format!("{p}gate.e_score_correction_bias"), &[e], &bias);
        let experts = ck.add_experts(
            &format!("{p}experts."),
            [None, Some("up_proj"), Some("down_proj")],
            e,
            h,
            i,
            Ship::Nvfp4,
        );
        ck.add_linear(
            &format!("{p}shared_experts.up_proj"),
            64,
            h,
            Ship::Nvfp4,
            None,
        );
        if l == 3 {
            keep = Some((router, bias, experts));
        }
    }
    let (router, bias, experts) = keep.unwrap();
    let prefix = "backbone.layers.3.mixer.experts.";
    let input_scales = Some((
        max_input(&ck, prefix, e, &["up_proj"]),
        max_input(&ck, prefix, e, &["down_proj"]),
    ));
    let dir = tmp_dir(name);
    ck.write(&dir, 3);
    let mut routing = RoutingConfig::new(RoutingMethod::DeepseekV3, k);
    routing.routed_scaling_factor = 2.5;
    Built {
        dir,
        layer: 3,
        experts,
        router,
        router_bias: None,
        selection_bias: Some(bias),
        e,
        h,
        i,
        activation: Activation::Relu2,
        routing,
        format: WeightFormat::Nvfp4,
        act_format: ActivationFormat::Nvfp4,
        input_scales,
        expected_bytes: Box::new(move |p| {
            e * h * 2 + e * 4 + per_expert_bytes(Ship::Nvfp4, 1, e, h, i, p)
        }),
    }
}

fn gpt_oss(name: &str) -> Built {
    let (e, h, i, k) = (4, 64, 64, 2);
    let config = json!({
        "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "hidden_size": h, "intermediate_size": i,
        "num_local_experts": e, "num_experts_per_tok": k, "experts_per_token": k, "swiglu_limit": 7.0,
        "num_hidden_layers": 2, "vocab_size": 16,
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    });
    let mut ck = Ckpt::new(6, config);
    ck.add_filler("model.embed_tokens.weight", &[16, h]);
    let amp = 2.0 * (3.0 / h as f32).sqrt();
    let mut keep = None;
    for l in 0..2 {
        let p = format!("model.layers.{l}.mlp.");
        let router = ck.add_bf16(&format!("{p}router.weight"), &[e, h], amp);
        let rbias = ck.add_bf16(&format!("{p}router.bias"), &[e], 0.5);
        let proj = |ck: &mut Ckpt, name: &str, rows: usize, kk: usize| {
            let blocks: Vec<u8> = (0..e * rows * kk / 2)
                .map(|_| ck.rng.below(256) as u8)
                .collect();
            let scales: Vec<u8> = (0..e * rows * kk / 32)
                .map(|_| 121 + ck.rng.below(3) as u8)
                .collect();
            ck.add(
                &format!("{p}experts.{name}_blocks"),
                Dtype::U8,
                &[e, rows, kk / 32, 16],
                blocks.clone(),
            );
            ck.add(
                &format!("{p}experts.{name}_scales"),
                Dtype::U8,
                &[e, rows, kk / 32],
                scales.clone(),
            );
            (0..e)
                .map(|x| {
                    decode_mxfp4(
                        &blocks[x * rows * kk / 2..(x + 1) * rows * kk / 2],
                        &scales[x * rows * kk / 32..(x + 1) * rows * kk / 32],
                        rows,
                        kk,
                    )
                })
                .collect::<Vec<_>>()
        };
        let gu = proj(&mut ck, "gate_up_proj", 2 * i, h);
        let dn = proj(&mut ck, "down_proj", h, i);
        let gub = ck.add_bf16(&format!("{p}experts.gate_up_proj_bias"), &[e, 2 * i], 0.5);
        let dnb = ck.add_bf16(&format!("{p}experts.down_proj_bias"), &[e, h], 0.5);
        let experts: Vec<Expert> = (0..e)
            .map(|x| {
                // Row-interleaved: even rows are the gate, odd rows up.
                let rows = |parity: usize| {
                    (0..i)
                        .flat_map(|r| {
                            gu[x][(2 * r + parity) * h..(2 * r + parity + 1) * h].to_vec()
                        })
                        .collect::<Vec<f64>>()
                };
                let b = |parity: usize| {
                    (0..i)
                        .map(|r| gub[x * 2 * i + 2 * r + parity] as f64)
                        .collect::<Vec<f64>>()
                };
                Expert {
                    gate: Some(rows(0)),
                    up: rows(1),
                    down: dn[x].clone(),
                    gate_bias: Some(b(0)),
                    up_bias: Some(b(1)),
                    down_bias: Some(dnb[x * h..(x + 1) * h].iter().map(|&v| v as f64).collect()),
                }
            })
            .collect();
        if l == 1 {
            keep = Some((router, rbias, experts));
        }
    }
    let (router, rbias, experts) = keep.unwrap();
    let dir = tmp_dir(name);
    ck.write(&dir, 3);
    Built {
        dir,
        layer: 1,
        experts,
        router,
        router_bias: Some(rbias),
        selection_bias: None,
        e,
        h,
        i,
        activation: Activation::OAI_DEFAULT,
        routing: RoutingConfig::new(RoutingMethod::Renormalize, k),
        format: WeightFormat::Mxfp4,
        act_format: ActivationFormat::Bf16,
        input_scales: None,
        expected_bytes: Box::new(move |p| {
            let (el, il) = (e / p.ep_size, i / p.tp_size);
            let w13 = el * 2 * il * (h / 2 + h / 32 + 2);
            let w2 = el * h * (il / 2 + il / 32) + if p.tp_rank == 0 { el * h * 2 } else { 0 };
            e * h * 2 + e * 2 + w13 + w2
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// The naive evaluation

fn hidden(b: &Built) -> Vec<f32> {
    let mut rng = moerunner::rng::SeededRng::new(99);
    (0..TOKENS * b.h)
        .map(|_| moerunner::formats::bf16::round(rng.uniform(-2.0, 2.0)))
        .collect()
}

fn logits(b: &Built, x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; TOKENS * b.e];
    for t in 0..TOKENS {
        for j in 0..b.e {
            let dot: f32 = x[t * b.h..(t + 1) * b.h]
                .iter()
                .zip(&b.router[j * b.h..(j + 1) * b.h])
                .map(|(a, w)| a * w)
                .sum();
            out[t * b.e + j] = dot + b.router_bias.as_ref().map_or(0.0, |r| r[j]);
        }
    }
    out
}

/// Activation quantization as the layer's format prescribes, dequantized to f64.
fn quant(b: &Built, row: &[f32], static_scale: Option<f32>) -> Vec<f64> {
    let q = quantize_rows(b.act_format, row, 1, row.len(), static_scale).unwrap();
    (0..row.len())
        .map(|c| q.values[c] as f64 * q.scales[c / q.block] as f64)
        .collect()
}

fn matvec(w: &[f64], x: &[f64], bias: Option<&Vec<f64>>) -> Vec<f64> {
    let k = x.len();
    (0..w.len() / k)
        .map(|r| {
            w[r * k..(r + 1) * k]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum::<f64>()
                + bias.map_or(0.0, |v| v[r])
        })
        .collect()
}

/// The layer evaluated from the Hugging Face weights, one (token, expert) at a time.
fn naive(b: &Built, x: &[f32], routes: &moerunner::Routes) -> Vec<f64> {
    let mut out = vec![0f64; TOKENS * b.h];
    for t in 0..TOKENS {
        let xq = quant(b, &x[t * b.h..(t + 1) * b.h], b.input_scales.map(|s| s.0));
        for j in 0..routes.top_k {
            let (id, w) = (
                routes.ids[t * routes.top_k + j] as usize,
                routes.weights[t * routes.top_k + j] as f64,
            );
            let ex = &b.experts[id];
            let up = matvec(&ex.up, &xq, ex.up_bias.as_ref());
            let a: Vec<f32> = match &ex.gate {
                Some(g) => matvec(g, &xq, ex.gate_bias.as_ref())
                    .iter()
                    .zip(&up)
                    .map(|(g, u)| gated_f64(&b.activation, *g, *u) as f32)
                    .collect(),
                None => up
                    .iter()
                    .map(|y| plain_f64(&b.activation, *y) as f32)
                    .collect(),
            };
            let z = matvec(
                &ex.down,
                &quant(b, &a, b.input_scales.map(|s| s.1)),
                ex.down_bias.as_ref(),
            );
            for (o, v) in out[t * b.h..(t + 1) * b.h].iter_mut().zip(z) {
                *o += w * v;
            }
        }
    }
    out
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// Loads the whole layer and checks config, router and output against the naive evaluation.
fn check_family(b: &Built) -> CheckpointLayer {
    let l = load_layer(&b.dir, b.layer, &LoadOptions::default()).unwrap();
    let cfg = l.layer.config();
    assert_eq!(
        (cfg.num_experts, cfg.hidden, cfg.intermediate),
        (b.e, b.h, b.i)
    );
    assert_eq!(cfg.routing, b.routing);
    assert_eq!(cfg.activation, b.activation);
    assert_eq!(
        (cfg.weight_format, cfg.activation_format),
        (b.format, b.act_format)
    );
    let w = l.layer.weights();
    assert_eq!(w.router_bias, b.selection_bias);
    assert_eq!(w.w13_input_scale.zip(w.w2_input_scale), b.input_scales);
    let x = hidden(b);
    let want_logits = logits(b, &x);
    let got_logits = l
        .router_logits(&HostTensor::from_f32(vec![TOKENS, b.h], &x))
        .unwrap()
        .to_f32_vec("logits")
        .unwrap();
    for (g, w) in got_logits.iter().zip(&want_logits) {
        assert!(
            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "router logits differ: {g} vs {w}"
        );
    }
    let routes = route_logits(
        &cfg.routing,
        &want_logits,
        TOKENS,
        b.e,
        b.selection_bias.as_deref(),
    )
    .unwrap();
    let got = moerunner::reference::forward(&l.layer, &x, &routes).unwrap();
    let want = naive(b, &x, &routes);
    let err = rel_err(&got, &want);
    assert!(
        err < 1e-4,
        "{}: relative error {err} against the naive evaluation",
        b.dir.display()
    );
    l
}

/// Asserts two layers hold identical configs and tensors.
fn assert_same(a: &MoeLayer, b: &MoeLayer) {
    assert_eq!(a.config(), b.config());
    let (x, y) = (a.weights(), b.weights());
    for (p, q, n) in [(&x.w13, &y.w13, "w13"), (&x.w2, &y.w2, "w2")] {
        assert_eq!(
            (p.format, p.experts, p.rows, p.cols),
            (q.format, q.experts, q.rows, q.cols),
            "{n}"
        );
        assert!(p.data[..] == q.data[..], "{n} data differ");
        assert_eq!(p.scales, q.scales, "{n} scales");
        assert_eq!(p.global_scales, q.global_scales, "{n} global scales");
    }
    assert_eq!(x.w13_bias, y.w13_bias);
    assert_eq!(x.w2_bias, y.w2_bias);
    assert_eq!(
        (x.w13_input_scale, x.w2_input_scale),
        (y.w13_input_scale, y.w2_input_scale)
    );
    assert_eq!(x.router_bias, y.router_bias);
}

/// Every rank of `pars` equals the whole layer sliced by `shard::shard` and reads exactly its
/// expected bytes.
fn check_slicing(b: &Built, full: &CheckpointLayer, pars: &[Parallelism]) {
    for &par in pars {
        let opts = LoadOptions {
            parallelism: par,
            ..Default::default()
        };
        let got = load_layer(&b.dir, b.layer, &opts).unwrap();
        assert_same(
            &got.layer,
            &moerunner::shard::shard(&full.layer, par).unwrap(),
        );
        assert_eq!(
            got.bytes_read as usize,
            (b.expected_bytes)(par),
            "{par:?}: bytes read"
        );
    }
}

fn par(ep_size: usize, ep_rank: usize, tp_size: usize, tp_rank: usize) -> Parallelism {
    Parallelism {
        ep_size,
        ep_rank,
        tp_size,
        tp_rank,
    }
}

const SPLITS: [Parallelism; 5] = [
    Parallelism {
        ep_size: 1,
        ep_rank: 0,
        tp_size: 1,
        tp_rank: 0,
    },
    Parallelism {
        ep_size: 2,
        ep_rank: 1,
        tp_size: 1,
        tp_rank: 0,
    },
    Parallelism {
        ep_size: 1,
        ep_rank: 0,
        tp_size: 2,
        tp_rank: 1,
    },
    Parallelism {
        ep_size: 1,
        ep_rank: 0,
        tp_size: 2,
        tp_rank: 0,
    },
    Parallelism {
        ep_size: 2,
        ep_rank: 0,
        tp_size: 2,
        tp_rank: 1,
    },
];

// ---------------------------------------------------------------------------------------------
// One test per family

#[test]
fn qwen3_moe_bf16() {
    let b = qwen3("qwen3-bf16", Ship::Bf16);
    let full = check_family(&b);
    check_slicing(&b, &full, &SPLITS);
}

#[test]
fn qwen3_moe_fp8_block() {
    let b = qwen3("qwen3-fp8", Ship::Fp8Block);
    let full = check_family(&b);
    check_slicing(&b, &full, &SPLITS);
}

#[test]
fn mixtral_bf16() {
    let b = mixtral("mixtral-bf16", Ship::Bf16);
    let full = check_family(&b);
    check_slicing(&b, &full, &SPLITS);
}

#[test]
fn deepseek_v3_fp8_block() {
    let b = deepseek("deepseek");
    let full = check_family(&b);
    check_slicing(&b, &full, &SPLITS);
}

#[test]
fn minimax_m2_fp8_block() {
    let b = minimax("minimax");
    let full = check_family(&b);
    check_slicing(&b, &full, &SPLITS[..2]);
}

#[test]
fn nemotron_h_nvfp4() {
    let b = nemotron("nemotron");
    let full = check_family(&b);
    check_slicing(&b, &full, &SPLITS);
}

#[test]
fn gpt_oss_mxfp4() {
    let b = gpt_oss("gpt-oss");
    let full = check_family(&b);
    check_slicing(&b, &full, &SPLITS);
}

// ---------------------------------------------------------------------------------------------
// Online quantization

#[test]
fn online_quantization_of_bf16_matches_the_quantizer() {
    let b = qwen3("qwen3-quant", Ship::Bf16);
    let bf = load_layer(&b.dir, 1, &LoadOptions::default()).unwrap();
    for f in [
        WeightFormat::Mxfp8,
        WeightFormat::Fp8Block,
        WeightFormat::Mxfp4,
        WeightFormat::Nvfp4,
    ] {
        let for_rank = |p: Parallelism| {
            let l = load_layer(
                &b.dir,
                1,
                &LoadOptions {
                    parallelism: p,
                    quantize: Some(f),
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(
                l.bytes_read as usize,
                (b.expected_bytes)(p),
                "{f} {p:?} reads the bf16 slice only"
            );
            l
        };
        let q = for_rank(Parallelism::default());
        let want_act = if f == WeightFormat::Nvfp4 {
            ActivationFormat::Nvfp4PerToken
        } else {
            f.default_activation_format()
        };
        assert_eq!(q.layer.config().activation_format, want_act);
        // Each expert equals the quantizer applied to that expert's bf16 values.
        let (src, got) = (&bf.layer.weights().w13, &q.layer.weights().w13);
        for e in 0..src.experts {
            let mut v = vec![0f32; src.rows * src.cols];
            src.decode_rows_f32(e, 0..src.rows, &mut v);
            let want = quantize_weights(f, 1, src.rows, src.cols, &v, None).unwrap();
            assert!(got.expert_data(e) == &want.data[..], "{f}: expert {e} data");
        }
        // Quantizing a TP rank's slice: its shape is the slice's, and the bytes read are bf16's.
        let r = for_rank(par(2, 1, 2, 0));
        assert_eq!(
            (
                r.layer.config().intermediate,
                r.layer.config().local_experts.clone()
            ),
            (b.i / 2, 4..8)
        );
    }
    // Per-tensor fp8 has no dynamic activation mode, and a BF16 checkpoint has no static scales.
    assert!(load_layer(
        &b.dir,
        1,
        &LoadOptions {
            quantize: Some(WeightFormat::Fp8),
            ..Default::default()
        },
    )
    .is_err());
}

#[test]
fn converted_layer_file_round_trips() {
    let b = nemotron("nemotron-convert");
    let l = load_layer(&b.dir, b.layer, &LoadOptions::default()).unwrap();
    let out = b.dir.join("layer3.safetensors");
    moerunner::layer_file::write_layer(&out, &l.layer).unwrap();
    assert_same(&moerunner::layer_file::read_layer(&out).unwrap(), &l.layer);
}

// ---------------------------------------------------------------------------------------------
// Errors name the key or tensor

fn err_of(dir: &std::path::Path, layer: usize, opts: &LoadOptions) -> String {
    match load_layer(dir, layer, opts) {
        Ok(_) => panic!("{} layer {layer} was accepted", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(b: &Built, f: impl FnOnce(&mut serde_json::Value)) {
    let p = b.dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn dense_and_non_moe_layers_are_refused() {
    let d = deepseek("deepseek-dense");
    let err = err_of(&d.dir, 0, &LoadOptions::default());
    assert!(
        err.contains("first_k_dense_replace") && err.contains("dense"),
        "{err}"
    );
    let err = err_of(&d.dir, 3, &LoadOptions::default());
    assert!(err.contains("num_hidden_layers"), "{err}");
    let n = nemotron("nemotron-mamba");
    let err = err_of(&n.dir, 0, &LoadOptions::default());
    assert!(err.contains("hybrid_override_pattern"), "{err}");
    let q = qwen3("qwen3-dense", Ship::Bf16);
    let err = err_of(&q.dir, 0, &LoadOptions::default());
    assert!(err.contains("mlp_only_layers"), "{err}");
}

#[test]
fn bad_configs_name_the_key() {
    let b = mixtral("mixtral-badcfg", Ship::Bf16);
    edit_config(&b, |v| v["model_type"] = json!("llama"));
    edit_config(&b, |v| v["architectures"] = json!(["LlamaForCausalLM"]));
    let err = err_of(&b.dir, 1, &LoadOptions::default());
    assert!(err.contains("model_type") && err.contains("llama"), "{err}");
    edit_config(&b, |v| {
        v["model_type"] = json!("mixtral");
        v.as_object_mut().unwrap().remove("num_experts_per_tok");
    });
    assert!(err_of(&b.dir, 1, &LoadOptions::default()).contains("num_experts_per_tok"));
    edit_config(&b, |v| {
        v["num_experts_per_tok"] = json!(2);
        v["hidden_act"] = json!("tanh");
    });
    assert!(err_of(&b.dir, 1, &LoadOptions::default()).contains("hidden_act"));
    let d = deepseek("deepseek-badcfg");
    edit_config(&d, |v| v["scoring_func"] = json!("softmax"));
    assert!(err_of(&d.dir, 1, &LoadOptions::default()).contains("scoring_func"));
    let g = gpt_oss("gpt-oss-badcfg");
    edit_config(&g, |v| {
        v.as_object_mut().unwrap().remove("swiglu_limit");
    });
    assert!(err_of(&g.dir, 1, &LoadOptions::default()).contains("swiglu_limit"));
}

#[test]
fn bad_tensors_and_shards_name_the_tensor() {
    // A missing shard file names the file and a tensor it should hold.
    let b = qwen3("qwen3-noshard", Ship::Bf16);
    std::fs::remove_file(b.dir.join("model-00002-of-00003.safetensors")).unwrap();
    let err = err_of(&b.dir, 1, &LoadOptions::default());
    assert!(err.contains("model-00002-of-00003.safetensors"), "{err}");

    // A tensor absent from the index.
    let b = mixtral("mixtral-missing", Ship::Bf16);
    let p = b.dir.join("model.safetensors.index.json");
    let mut idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    idx["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("model.layers.1.block_sparse_moe.experts.2.w3.weight");
    std::fs::write(&p, idx.to_string()).unwrap();
    let err = err_of(&b.dir, 1, &LoadOptions::default());
    assert!(
        err.contains("model.layers.1.block_sparse_moe.experts.2.w3.weight"),
        "{err}"
    );

    // A wrong dtype names the tensor and both dtypes.
    let mut ck = Ckpt::new(
        7,
        json!({"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 32, "num_local_experts": 2, "num_experts_per_tok": 1, "num_hidden_layers": 1}),
    );
    ck.add_bf16("model.layers.0.block_sparse_moe.gate.weight", &[2, 64], 0.1);
    ck.add_experts(
        "model.layers.0.block_sparse_moe.experts.",
        [Some("w1"), Some("w3"), Some("w2")],
        2,
        64,
        32,
        Ship::Bf16,
    );
    let name = "model.layers.0.block_sparse_moe.experts.1.w2.weight";
    let v = vec![0u8; 64 * 32 * 2];
    ck.add(name, Dtype::F16, &[64, 32], v);
    let dir = tmp_dir("mixtral-dtype");
    ck.write(&dir, 2);
    let err = err_of(&dir, 0, &LoadOptions::default());
    assert!(err.contains(name) && err.contains("F16"), "{err}");

    // A wrong shape names the tensor.
    ck.add(
        name,
        Dtype::BF16,
        &[32, 64],
        bf16_bytes(&vec![0.0; 64 * 32]),
    );
    ck.write(&dir, 2);
    let err = err_of(&dir, 0, &LoadOptions::default());
    assert!(err.contains(name) && err.contains("[64, 32]"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn misaligned_tensor_parallel_slices_are_refused() {
    // DeepSeek's 128×128 blocks: I = 256 over 4 ranks gives 64-row slices.
    let d = deepseek("deepseek-tp4");
    let err = err_of(
        &d.dir,
        1,
        &LoadOptions {
            parallelism: par(1, 0, 4, 1),
            ..Default::default()
        },
    );
    assert!(
        err.contains("128") && err.contains("weight_scale_inv") || err.contains("scale blocks"),
        "{err}"
    );
    // GPT-OSS's 32-column MXFP4 blocks: I = 64 over 4 ranks gives 16 columns.
    let g = gpt_oss("gpt-oss-tp4");
    let err = err_of(
        &g.dir,
        1,
        &LoadOptions {
            parallelism: par(1, 0, 4, 1),
            ..Default::default()
        },
    );
    assert!(
        err.contains("down_proj_blocks") && err.contains("32"),
        "{err}"
    );
    let err = err_of(
        &g.dir,
        1,
        &LoadOptions {
            parallelism: par(3, 0, 1, 0),
            ..Default::default()
        },
    );
    assert!(err.contains("ep_size"), "{err}");
}
