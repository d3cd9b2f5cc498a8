//! Checkpoints as transformers 5 writes them: its config spellings (`num_local_experts` for
//! Qwen3-MoE, Nemotron-H's `layers_block_type` without `num_hidden_layers`, the count and top-k
//! aliases of every config class's `attribute_map`), its fused expert layout
//! (`save_original_format=False`), GPT-OSS's BF16 layout, and per-tensor FP8.
//!
//! Each new spelling or layout is written from the same random tensors as a spelling the loader
//! already reads (the original per-expert names), following transformers' own conversion
//! (`MergeModulelist(dim=0)` then `Concatenate(dim=1)` of gate and up; Mixtral and MiniMax-M2's
//! `block_sparse_moe` → `mlp`, Nemotron-H's `backbone` → `model`), and both must load to the same
//! layer: the same config and bit-identical reference outputs, whole and for every TP × EP rank.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use moerunner::checkpoint::{load_layer, CheckpointLayer, LoadOptions};
use moerunner::config::ActivationFormat;
use moerunner::routing::route_logits;
use moerunner::{
    Activation, BlockScales, HostTensor, LayerConfig, LayerWeights, MoeLayer, Parallelism,
    QuantizedTensor, RoutingConfig, RoutingMethod, W13Order, WeightFormat,
};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn f32(&mut self) -> f32 {
        (self.next() % 2001) as f32 / 1000.0 - 1.0
    }
    fn bf16(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|_| half::bf16::from_f32(self.f32() * 0.5).to_le_bytes())
            .collect()
    }
    /// E4M3 bytes, never NaN.
    fn e4m3(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| (self.next() as u8 % 0x7E) | (self.next() as u8 & 0x80))
            .collect()
    }
}

struct TempDir(PathBuf);
impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

type Tensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Writes `config.json` and the tensors in two shards with an index.
fn write(name: &str, config: &Value, tensors: &[Tensor]) -> TempDir {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("moerunner-t5-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut map = serde_json::Map::new();
    let per = tensors.len().div_ceil(2).max(1);
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, TensorView)> = chunk
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for (n, ..) in chunk {
            map.insert(n.clone(), json!(file));
        }
    }
    let index = json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    TempDir(dir)
}

fn t(name: impl Into<String>, d: Dtype, shape: &[usize], bytes: Vec<u8>) -> Tensor {
    (name.into(), d, shape.to_vec(), bytes)
}

fn load(dir: &Path, layer: usize, par: Parallelism) -> CheckpointLayer {
    let opts = LoadOptions {
        parallelism: par,
        ..Default::default()
    };
    load_layer(dir, layer, &opts).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn load_err(dir: &Path, layer: usize) -> String {
    match load_layer(dir, layer, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Reference outputs of `a` and `b` on the same hidden states, routed by `a`'s router.
fn same_outputs(a: &CheckpointLayer, b: &MoeLayer) {
    assert_eq!(a.layer.config(), b.config());
    let cfg = a.layer.config();
    let tokens = 6;
    let mut rng = Rng(99);
    let x: Vec<f32> = (0..tokens * cfg.hidden).map(|_| rng.f32()).collect();
    let hidden = HostTensor::from_f32(vec![tokens, cfg.hidden], &x);
    let logits = a.router_logits(&hidden).unwrap().to_f32_vec("l").unwrap();
    let bias = a.layer.weights().router_bias.as_deref();
    let routes = route_logits(&cfg.routing, &logits, tokens, cfg.num_experts, bias).unwrap();
    let ya = moerunner::reference::forward(&a.layer, &x, &routes).unwrap();
    let yb = moerunner::reference::forward(b, &x, &routes).unwrap();
    assert!(ya.iter().any(|v| *v != 0.0), "output is all zero");
    for (j, (p, q)) in ya.iter().zip(&yb).enumerate() {
        assert_eq!(p.to_bits(), q.to_bits(), "output[{j}]: {p} vs {q}");
    }
}

/// Both folders load to the same layer, whole and for every rank of EP 2 × TP 2.
fn same_layer(a: &Path, b: &Path, layer: usize) {
    for (ep, tp) in [(1, 1), (2, 2)] {
        for er in 0..ep {
            for tr in 0..tp {
                let par = Parallelism {
                    ep_size: ep,
                    ep_rank: er,
                    tp_size: tp,
                    tp_rank: tr,
                };
                let (la, lb) = (load(a, layer, par), load(b, layer, par));
                assert_eq!(la.router_bias, lb.router_bias);
                same_outputs(&la, &lb.layer);
                assert_eq!(la.bytes_read, lb.bytes_read, "ep {ep}.{er} tp {tp}.{tr}");
            }
        }
    }
    // An expert map's rank: experts 0, 2 and 3 (two runs of the stacked tensors).
    let par = Parallelism {
        ep_size: 2,
        ep_rank: 1,
        tp_size: 2,
        tp_rank: 1,
    };
    let opts = LoadOptions {
        parallelism: par,
        experts: Some(vec![0, 2, 3]),
        ..Default::default()
    };
    let (la, lb) = (
        load_layer(a, layer, &opts).unwrap(),
        load_layer(b, layer, &opts).unwrap(),
    );
    assert_eq!(la.layer.config().local_experts, 0..3);
    same_outputs(&la, &lb.layer);
    assert_eq!(la.bytes_read, lb.bytes_read, "experts 0, 2, 3");
}

/// One family's MoE block: random BF16 experts `gate`/`up` `[E, I, H]`, `down` `[E, H, I]`.
struct Block {
    e: usize,
    h: usize,
    i: usize,
    gate: Option<Vec<u8>>,
    up: Vec<u8>,
    down: Vec<u8>,
}

impl Block {
    fn new(seed: u64, e: usize, h: usize, i: usize, gated: bool) -> Self {
        let mut r = Rng(seed);
        let gate = gated.then(|| r.bf16(e * i * h));
        Block {
            e,
            h,
            i,
            gate,
            up: r.bf16(e * i * h),
            down: r.bf16(e * h * i),
        }
    }

    /// The original per-expert tensors `{prefix}{e}.{name}.weight`.
    fn per_expert(&self, prefix: &str, names: [&str; 3]) -> Vec<Tensor> {
        let (ih, hi) = (self.i * self.h * 2, self.h * self.i * 2);
        let mut out = Vec::new();
        for x in 0..self.e {
            if let Some(g) = &self.gate {
                let b = g[x * ih..(x + 1) * ih].to_vec();
                out.push(t(
                    format!("{prefix}{x}.{}.weight", names[0]),
                    Dtype::BF16,
                    &[self.i, self.h],
                    b,
                ));
            }
            let b = self.up[x * ih..(x + 1) * ih].to_vec();
            out.push(t(
                format!("{prefix}{x}.{}.weight", names[1]),
                Dtype::BF16,
                &[self.i, self.h],
                b,
            ));
            let b = self.down[x * hi..(x + 1) * hi].to_vec();
            out.push(t(
                format!("{prefix}{x}.{}.weight", names[2]),
                Dtype::BF16,
                &[self.h, self.i],
                b,
            ));
        }
        out
    }

    /// transformers 5's fused tensors: `gate_up_proj` `[E, 2I, H]` (gate, then up, per expert)
    /// or `up_proj` `[E, I, H]`, and `down_proj` `[E, H, I]`.
    fn fused(&self, prefix: &str) -> Vec<Tensor> {
        let (e, h, i) = (self.e, self.h, self.i);
        let ih = i * h * 2;
        let mut out = Vec::new();
        match &self.gate {
            Some(g) => {
                let mut b = Vec::new();
                for x in 0..e {
                    b.extend_from_slice(&g[x * ih..(x + 1) * ih]);
                    b.extend_from_slice(&self.up[x * ih..(x + 1) * ih]);
                }
                out.push(t(
                    format!("{prefix}gate_up_proj"),
                    Dtype::BF16,
                    &[e, 2 * i, h],
                    b,
                ));
            }
            None => out.push(t(
                format!("{prefix}up_proj"),
                Dtype::BF16,
                &[e, i, h],
                self.up.clone(),
            )),
        }
        out.push(t(
            format!("{prefix}down_proj"),
            Dtype::BF16,
            &[e, h, i],
            self.down.clone(),
        ));
        out
    }
}

fn router(seed: u64, name: &str, e: usize, h: usize, bias: Option<&str>) -> Vec<Tensor> {
    let mut r = Rng(seed);
    let mut out = vec![t(name, Dtype::BF16, &[e, h], r.bf16(e * h))];
    if let Some(b) = bias {
        let v: Vec<u8> = (0..e).flat_map(|_| (r.f32() * 0.1).to_le_bytes()).collect();
        out.push(t(b, Dtype::F32, &[e], v));
    }
    out
}

fn obj(v: Value, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut v = v;
    if let Some(m) = v.as_object_mut() {
        edit(m);
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Config spellings

fn qwen3_config() -> Value {
    // As Qwen3MoeConfig(...).save_pretrained writes it in transformers 5.
    json!({ "model_type": "qwen3_moe", "hidden_size": 128, "num_hidden_layers": 2,
            "moe_intermediate_size": 64, "intermediate_size": 256, "num_experts_per_tok": 2,
            "num_local_experts": 4, "norm_topk_prob": true, "hidden_act": "silu",
            "decoder_sparse_step": 1, "mlp_only_layers": [] })
}

#[test]
fn qwen3_moe_config_of_transformers5_uses_num_local_experts() {
    let b = Block::new(1, 4, 128, 64, true);
    let p = "model.layers.1.mlp.";
    let mut ts = b.per_expert(
        &format!("{p}experts."),
        ["gate_proj", "up_proj", "down_proj"],
    );
    ts.extend(router(2, &format!("{p}gate.weight"), 4, 128, None));
    let new = write("qwen3-t5", &qwen3_config(), &ts);
    let old_cfg = obj(qwen3_config(), |m| {
        m.remove("num_local_experts");
        m.insert("num_experts".into(), json!(4));
    });
    let old = write("qwen3-t4", &old_cfg, &ts);
    same_layer(&old, &new, 1);
    // Neither key: the error lists the spellings it looked for.
    let none = write(
        "qwen3-none",
        &obj(qwen3_config(), |m| drop(m.remove("num_local_experts"))),
        &ts,
    );
    let err = load_err(&none, 1);
    assert!(
        err.contains("num_experts")
            && err.contains("num_local_experts")
            && err.contains("n_routed_experts"),
        "{err}"
    );
}

#[test]
fn count_and_top_k_aliases_of_every_family() {
    // Each family's canonical key renamed to another alias of the same attribute_map group.
    let b = Block::new(3, 4, 128, 64, true);
    let p = "model.layers.0.block_sparse_moe.";
    let mut ts = b.per_expert(&format!("{p}experts."), ["w1", "w3", "w2"]);
    ts.extend(router(4, &format!("{p}gate.weight"), 4, 128, None));
    let cfg = json!({ "model_type": "mixtral", "hidden_size": 128, "num_hidden_layers": 1,
                      "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2 });
    let canonical = write("mixtral", &cfg, &ts);
    let aliased = obj(cfg, |m| {
        m.remove("num_local_experts");
        m.remove("num_experts_per_tok");
        m.insert("num_experts".into(), json!(4));
        m.insert("experts_per_token".into(), json!(2));
    });
    let aliased = write("mixtral-alias", &aliased, &ts);
    same_layer(&canonical, &aliased, 0);
}

fn nemotron_config(t5: bool) -> Value {
    let base = json!({ "model_type": "nemotron_h", "hidden_size": 128, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 64, "mlp_hidden_act": "relu2",
        "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": true });
    obj(base, |m| {
        if t5 {
            // NemotronHConfig in transformers 5: `num_hidden_layers` is a property, not saved.
            m.insert(
                "layers_block_type".into(),
                json!(["linear_attention", "moe", "full_attention", "moe"]),
            );
        } else {
            m.insert("num_hidden_layers".into(), json!(4));
            m.insert("hybrid_override_pattern".into(), json!("ME*E"));
        }
    })
}

fn nemotron_tensors(fused: bool) -> Vec<Tensor> {
    let b = Block::new(5, 4, 128, 64, false);
    let mut ts = if fused {
        b.fused("model.layers.3.mixer.experts.")
    } else {
        b.per_expert(
            "backbone.layers.3.mixer.experts.",
            ["", "up_proj", "down_proj"],
        )
    };
    let p = if fused { "model" } else { "backbone" };
    ts.extend(router(
        6,
        &format!("{p}.layers.3.mixer.gate.weight"),
        4,
        128,
        Some(&format!("{p}.layers.3.mixer.gate.e_score_correction_bias")),
    ));
    ts
}

#[test]
fn nemotron_h_config_of_transformers5_has_layers_block_type_only() {
    let ts = nemotron_tensors(false);
    let old = write("nemo-old", &nemotron_config(false), &ts);
    let new = write("nemo-t5", &nemotron_config(true), &ts);
    same_layer(&old, &new, 3);
    let err = load_err(&new, 2);
    assert!(
        err.contains("layers_block_type") && err.contains("full_attention"),
        "{err}"
    );
    let err = load_err(&new, 4);
    assert!(
        err.contains("layers_block_type") && err.contains("4 layers"),
        "{err}"
    );
    // The alias transformers' attribute_map gives it.
    let alias = obj(nemotron_config(true), |m| {
        let v = m.remove("layers_block_type").unwrap_or_default();
        m.insert("layer_types".into(), v);
    });
    same_layer(&old, &write("nemo-alias", &alias, &ts), 3);
}

// ---------------------------------------------------------------------------------------------
// transformers 5's fused layout (save_original_format=False)

#[test]
fn fused_layout_of_qwen3_moe_loads_as_the_per_expert_one() {
    let b = Block::new(7, 4, 128, 64, true);
    let p = "model.layers.1.mlp.";
    let r = router(8, &format!("{p}gate.weight"), 4, 128, None);
    let mut per = b.per_expert(
        &format!("{p}experts."),
        ["gate_proj", "up_proj", "down_proj"],
    );
    per.extend(r.clone());
    let mut fused = b.fused(&format!("{p}experts."));
    fused.extend(r);
    same_layer(
        &write("q-per", &qwen3_config(), &per),
        &write("q-fused", &qwen3_config(), &fused),
        1,
    );
}

#[test]
fn fused_layout_of_mixtral_and_minimax_under_mlp() {
    // transformers 5 renames `block_sparse_moe` to `mlp` for both (MiniMax-M2 maps to Mixtral's
    // conversion), the router and MiniMax's selection bias with it.
    for (model_type, bias) in [("mixtral", false), ("minimax_m2", true)] {
        let b = Block::new(9, 4, 128, 64, true);
        let cfg = json!({ "model_type": model_type, "hidden_size": 128, "num_hidden_layers": 1,
                          "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2 });
        let bias_name = |p: &str| format!("model.layers.0.{p}.e_score_correction_bias");
        let mut per = b.per_expert(
            "model.layers.0.block_sparse_moe.experts.",
            ["w1", "w3", "w2"],
        );
        let old_bias = bias_name("block_sparse_moe");
        per.extend(router(
            10,
            "model.layers.0.block_sparse_moe.gate.weight",
            4,
            128,
            bias.then_some(old_bias.as_str()),
        ));
        let mut fused = b.fused("model.layers.0.mlp.experts.");
        let new_bias = bias_name("mlp");
        fused.extend(router(
            10,
            "model.layers.0.mlp.gate.weight",
            4,
            128,
            bias.then_some(new_bias.as_str()),
        ));
        same_layer(
            &write("m-per", &cfg, &per),
            &write("m-fused", &cfg, &fused),
            0,
        );
    }
}

#[test]
fn fused_layout_of_nemotron_h_under_model() {
    let old = write(
        "nemo-per",
        &nemotron_config(false),
        &nemotron_tensors(false),
    );
    let new = write(
        "nemo-fused",
        &nemotron_config(true),
        &nemotron_tensors(true),
    );
    same_layer(&old, &new, 3);
}

#[test]
fn unsupported_layouts_are_named_not_a_missing_tensor() {
    // Experts in neither layout.
    let p = "model.layers.1.mlp.";
    let mut ts = router(8, &format!("{p}gate.weight"), 4, 128, None);
    ts.push(t(
        format!("{p}experts.w_in"),
        Dtype::BF16,
        &[4, 4],
        vec![0; 32],
    ));
    let err = load_err(&write("q-neither", &qwen3_config(), &ts), 1);
    assert!(
        err.contains("layout") && err.contains("gate_up_proj") && err.contains("experts.w_in"),
        "{err}"
    );
    // The fused layout in FP8.
    let mut ts = router(8, &format!("{p}gate.weight"), 4, 128, None);
    ts.push(t(
        format!("{p}experts.gate_up_proj"),
        Dtype::F8_E4M3,
        &[4, 128, 128],
        vec![0; 4 * 128 * 128],
    ));
    ts.push(t(
        format!("{p}experts.down_proj"),
        Dtype::F8_E4M3,
        &[4, 128, 64],
        vec![0; 4 * 128 * 64],
    ));
    let err = load_err(&write("q-fused-fp8", &qwen3_config(), &ts), 1);
    assert!(
        err.contains("fused expert layout") && err.contains("F8_E4M3"),
        "{err}"
    );
    // GPT-OSS with neither MXFP4 blocks nor BF16 gate_up_proj.
    let mut ts = router(
        8,
        "model.layers.0.mlp.router.weight",
        4,
        128,
        Some("model.layers.0.mlp.router.bias"),
    );
    ts.push(t(
        "model.layers.0.mlp.experts.gate_up_proj_packed",
        Dtype::U8,
        &[4],
        vec![0; 4],
    ));
    let err = load_err(&write("oss-neither", &gpt_oss_config(), &ts), 0);
    assert!(
        err.contains("MXFP4") && err.contains("BF16") && err.contains("gate_up_proj_packed"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// GPT-OSS BF16

fn gpt_oss_config() -> Value {
    json!({ "model_type": "gpt_oss", "hidden_size": 128, "num_hidden_layers": 1,
            "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
            "swiglu_limit": 7.0, "swiglu_alpha": 1.702 })
}

#[test]
fn gpt_oss_bf16_input_major_interleaved_with_biases() {
    let (e, h, i) = (4, 128, 64);
    let mut r = Rng(11);
    // transformers' GptOssExperts parameters: gate_up_proj [E, H, 2I] (column 2j gate, 2j+1 up).
    let gu = r.bf16(e * h * 2 * i);
    let down = r.bf16(e * i * h);
    let gu_bias: Vec<f32> = (0..e * 2 * i).map(|_| r.f32() * 0.1).collect();
    let down_bias: Vec<f32> = (0..e * h).map(|_| r.f32() * 0.1).collect();
    let bf = |v: &[f32]| -> Vec<u8> {
        v.iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect()
    };
    let p = "model.layers.0.mlp.";
    let mut ts = vec![
        t(
            format!("{p}experts.gate_up_proj"),
            Dtype::BF16,
            &[e, h, 2 * i],
            gu.clone(),
        ),
        t(
            format!("{p}experts.gate_up_proj_bias"),
            Dtype::BF16,
            &[e, 2 * i],
            bf(&gu_bias),
        ),
        t(
            format!("{p}experts.down_proj"),
            Dtype::BF16,
            &[e, i, h],
            down.clone(),
        ),
        t(
            format!("{p}experts.down_proj_bias"),
            Dtype::BF16,
            &[e, h],
            bf(&down_bias),
        ),
    ];
    ts.extend(router(12, &format!("{p}router.weight"), e, h, None));
    let rb: Vec<u8> = (0..e)
        .flat_map(|x| half::bf16::from_f32(x as f32 * 0.01).to_le_bytes())
        .collect();
    ts.push(t(format!("{p}router.bias"), Dtype::BF16, &[e], rb));
    let dir = write("oss-bf16", &gpt_oss_config(), &ts);

    // Our layer, assembled independently: W13 [E, 2I, H] = gate_upᵀ (rows interleaved), W2 [E, H, I] = downᵀ.
    let el = |b: &[u8], k: usize| [b[2 * k], b[2 * k + 1]];
    let mut w13 = Vec::new();
    let mut w2 = Vec::new();
    for x in 0..e {
        for row in 0..2 * i {
            for col in 0..h {
                w13.extend(el(&gu, (x * h + col) * 2 * i + row));
            }
        }
        for row in 0..h {
            for col in 0..i {
                w2.extend(el(&down, (x * i + col) * h + row));
            }
        }
    }
    let round = |v: &[f32]| {
        v.iter()
            .map(|x| half::bf16::from_f32(*x).to_f32())
            .collect::<Vec<f32>>()
    };
    let cfg = LayerConfig {
        num_experts: e,
        hidden: h,
        intermediate: i,
        weight_format: WeightFormat::Bf16,
        activation_format: ActivationFormat::Bf16,
        activation: Activation::SwigluOai {
            alpha: 1.702,
            beta: 1.0,
            limit: 7.0,
        },
        w13_order: W13Order::Interleaved,
        routing: RoutingConfig::new(RoutingMethod::Renormalize, 2),
        local_experts: 0..e,
        parallelism: Parallelism::default(),
    };
    let tensor = |rows, cols, data: Vec<u8>| QuantizedTensor {
        format: WeightFormat::Bf16,
        experts: e,
        rows,
        cols,
        data: data.into(),
        scales: BlockScales::None,
        global_scales: Vec::new(),
    };
    let weights = LayerWeights {
        w13: tensor(2 * i, h, w13),
        w2: tensor(h, i, w2),
        w13_bias: Some(round(&gu_bias)),
        w2_bias: Some(round(&down_bias)),
        w13_input_scale: None,
        w2_input_scale: None,
        router_bias: None,
    };
    let expected = MoeLayer::new(cfg, weights).unwrap();
    let whole = load(&dir, 0, Parallelism::default());
    same_outputs(&whole, &expected);
    for (ep, tp) in [(2, 2), (1, 2)] {
        for er in 0..ep {
            for tr in 0..tp {
                let par = Parallelism {
                    ep_size: ep,
                    ep_rank: er,
                    tp_size: tp,
                    tp_rank: tr,
                };
                let rank = load(&dir, 0, par);
                same_outputs(&rank, &moerunner::shard::shard(&whole.layer, par).unwrap());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Per-tensor FP8

/// Per-expert FP8 E4M3 experts with scalar `weight_scale`s (ModelOpt / compressed-tensors
/// per-tensor), and the same elements with 128×128 `weight_scale_inv` blocks all equal to them.
fn fp8_pair(shared: bool, input_scales: bool) -> (Vec<Tensor>, Vec<Tensor>) {
    let (e, h, i) = (4, 128, 128);
    let mut r = Rng(13);
    let p = "model.layers.1.mlp.";
    let (mut pt, mut blk) = (Vec::new(), Vec::new());
    for x in 0..e {
        let sg = 0.001 * (x + 1) as f32;
        for (proj, rows, cols, s) in [
            ("gate_proj", i, h, sg),
            ("up_proj", i, h, if shared { sg } else { sg * 1.5 }),
            ("down_proj", h, i, 0.002 * (x + 2) as f32),
        ] {
            let n = format!("{p}experts.{x}.{proj}");
            let w = r.e4m3(rows * cols);
            pt.push(t(
                format!("{n}.weight"),
                Dtype::F8_E4M3,
                &[rows, cols],
                w.clone(),
            ));
            pt.push(t(
                format!("{n}.weight_scale"),
                Dtype::F32,
                &[],
                s.to_le_bytes().to_vec(),
            ));
            if input_scales {
                let a = 0.01 * (x + 1) as f32;
                pt.push(t(
                    format!("{n}.input_scale"),
                    Dtype::F32,
                    &[],
                    a.to_le_bytes().to_vec(),
                ));
            }
            blk.push(t(format!("{n}.weight"), Dtype::F8_E4M3, &[rows, cols], w));
            let nb = rows.div_ceil(128) * cols.div_ceil(128);
            let sb: Vec<u8> = (0..nb).flat_map(|_| s.to_le_bytes()).collect();
            blk.push(t(
                format!("{n}.weight_scale_inv"),
                Dtype::F32,
                &[rows.div_ceil(128), cols.div_ceil(128)],
                sb,
            ));
        }
    }
    let rt = router(14, &format!("{p}gate.weight"), e, h, None);
    pt.extend(rt.clone());
    blk.extend(rt);
    (pt, blk)
}

fn qwen3_fp8_config() -> Value {
    obj(qwen3_config(), |m| {
        m.insert("moe_intermediate_size".into(), json!(128));
    })
}

#[test]
fn fp8_per_tensor_with_differing_gate_up_scales_loads_exactly_as_fp8_block() {
    let (pt, blk) = fp8_pair(false, true);
    let cfg = qwen3_fp8_config();
    let (pt, blk) = (write("fp8-pt", &cfg, &pt), write("fp8-blk", &cfg, &blk));
    let l = load(&pt, 1, Parallelism::default());
    assert_eq!(l.layer.config().weight_format, WeightFormat::Fp8Block);
    let want = load(&blk, 1, Parallelism::default());
    same_outputs(&l, &want.layer);
    let (pt2, blk2) = fp8_pair(false, false);
    same_outputs(
        &load(&write("fp8-pt-noin", &cfg, &pt2), 1, Parallelism::default()),
        &load(&write("fp8-blk2", &cfg, &blk2), 1, Parallelism::default()).layer,
    );
}

#[test]
fn fp8_per_tensor_with_shared_scales_and_input_scales_loads_as_fp8() {
    let (pt, _) = fp8_pair(true, true);
    let dir = write("fp8-pt-shared", &qwen3_fp8_config(), &pt);
    let l = load(&dir, 1, Parallelism::default());
    let c = l.layer.config();
    assert_eq!(
        (c.weight_format, c.activation_format),
        (WeightFormat::Fp8, ActivationFormat::Fp8)
    );
    let w = l.layer.weights();
    let want13: Vec<f32> = (0..4).map(|x| 0.001 * (x + 1) as f32).collect();
    let want2: Vec<f32> = (0..4).map(|x| 0.002 * (x + 2) as f32).collect();
    assert!(matches!(&w.w13.scales, BlockScales::PerExpert(v) if *v == want13));
    assert!(matches!(&w.w2.scales, BlockScales::PerExpert(v) if *v == want2));
    // Static input scales: the max over every expert (0.01 · 4).
    assert_eq!(
        (w.w13_input_scale, w.w2_input_scale),
        (Some(0.04), Some(0.04))
    );
    let rank = load(
        &dir,
        1,
        Parallelism {
            ep_size: 2,
            ep_rank: 1,
            tp_size: 1,
            tp_rank: 0,
        },
    );
    same_outputs(
        &rank,
        &moerunner::shard::shard(&l.layer, rank.layer.config().parallelism).unwrap(),
    );
}
