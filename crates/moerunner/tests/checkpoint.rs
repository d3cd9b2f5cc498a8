//! Loading layers from miniature Hugging Face checkpoints: one per family, with the real tensor
//! names, dtypes, shape conventions, config keys and sharding (several shards plus an index).
//! Each test assembles the expected layer independently from the generated tensors (in our
//! layout) and requires the float64 reference outputs to be identical; slicing tests require the
//! rank's layer to equal `shard::shard` of the whole one and count the bytes read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use moerunner::checkpoint::{load_layer, CheckpointLayer, LoadOptions};
use moerunner::config::ActivationFormat;
use moerunner::routing::route_logits;
use moerunner::{
    Activation, BlockScales, DType, HostTensor, LayerConfig, LayerWeights, MoeLayer, Parallelism,
    QuantizedTensor, RoutingConfig, RoutingMethod, W13Order, WeightFormat,
};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Miniature checkpoints

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn f32(&mut self) -> f32 {
        (self.next() % 2001) as f32 / 1000.0 - 1.0
    }
    fn bf16_bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|_| half::bf16::from_f32(self.f32() * 0.5).to_le_bytes())
            .collect()
    }
    /// E4M3 bytes, never NaN (0x7F / 0xFF).
    fn e4m3_bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| (self.byte() % 0x7E) | (self.byte() & 0x80))
            .collect()
    }
    /// Positive E4M3 scale bytes of moderate size.
    fn e4m3_scales(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| 0x20 + self.byte() % 0x30).collect()
    }
    fn positive(&mut self) -> f32 {
        0.001 + (self.next() % 1000) as f32 / 100000.0
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A miniature's folder, removed when the test is done with it.
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

/// Tensors of a checkpoint in the order they are written; split over shards in that order.
#[derive(Default)]
struct Mini {
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

impl Mini {
    fn add(&mut self, name: impl Into<String>, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) {
        self.tensors
            .push((name.into(), dtype, shape.to_vec(), bytes));
    }
    /// Writes `config.json`, `shards` shard files named as transformers names them, and the index.
    fn write(&self, name: &str, config: serde_json::Value, shards: usize) -> TempDir {
        // Tests run in parallel and several write the same family: one folder per call.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("moerunner-ckpt-{pid}-{n}-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&config).unwrap(),
        )
        .unwrap();
        let per = self.tensors.len().div_ceil(shards);
        let mut weight_map = serde_json::Map::new();
        let mut total = 0usize;
        for (i, chunk) in self.tensors.chunks(per).enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
            let views: Vec<(String, TensorView)> = chunk
                .iter()
                .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
                .collect();
            safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
            for (n, _, _, b) in chunk {
                weight_map.insert(n.clone(), json!(file));
                total += b.len();
            }
        }
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index).unwrap(),
        )
        .unwrap();
        TempDir(dir)
    }
}

/// Expected tensors in our layout, built alongside the checkpoint.
struct Expected {
    w13: Vec<u8>,
    w2: Vec<u8>,
    s13: Vec<u8>,
    s2: Vec<u8>,
    g13: Vec<f32>,
    g2: Vec<f32>,
    in13: f32,
    in2: f32,
}

/// Shape of a per-expert family's miniature.
struct PerExpert<'a> {
    e: usize,
    h: usize,
    i: usize,
    format: WeightFormat,
    prefix: &'a str,
    gate: Option<&'a str>,
    up: &'a str,
    down: &'a str,
}

fn fp8_scales(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
    (0..rows.div_ceil(128) * cols.div_ceil(128))
        .map(|_| rng.positive())
        .collect()
}

/// Adds per-expert weights (and scales) to `m`; returns them in our layout.
fn per_expert(m: &mut Mini, rng: &mut Rng, p: &PerExpert) -> Expected {
    let mut x = Expected {
        w13: vec![],
        w2: vec![],
        s13: vec![],
        s2: vec![],
        g13: vec![],
        g2: vec![],
        in13: 0.0,
        in2: 0.0,
    };
    let projs: Vec<&str> = p.gate.iter().copied().chain([p.up]).collect();
    for e in 0..p.e {
        let name = |proj: &str, what: &str| format!("{}{e}.{proj}.{what}", p.prefix);
        let mut add_proj = |m: &mut Mini,
                            proj: &str,
                            rows: usize,
                            cols: usize,
                            x_w: &mut Vec<u8>,
                            x_s: &mut Vec<u8>|
         -> (f32, f32) {
            match p.format {
                WeightFormat::Bf16 => {
                    let b = rng.bf16_bytes(rows * cols);
                    x_w.extend(&b);
                    m.add(name(proj, "weight"), Dtype::BF16, &[rows, cols], b);
                    (0.0, 0.0)
                }
                WeightFormat::Fp8Block => {
                    let b = rng.e4m3_bytes(rows * cols);
                    x_w.extend(&b);
                    m.add(name(proj, "weight"), Dtype::F8_E4M3, &[rows, cols], b);
                    let s = fp8_scales(rng, rows, cols);
                    x_s.extend(f32_bytes(&s));
                    m.add(
                        name(proj, "weight_scale_inv"),
                        Dtype::F32,
                        &[rows.div_ceil(128), cols.div_ceil(128)],
                        f32_bytes(&s),
                    );
                    (0.0, 0.0)
                }
                WeightFormat::Nvfp4 => {
                    let b: Vec<u8> = (0..rows * cols / 2).map(|_| rng.byte()).collect();
                    x_w.extend(&b);
                    m.add(name(proj, "weight"), Dtype::U8, &[rows, cols / 2], b);
                    let s = rng.e4m3_scales(rows * cols / 16);
                    x_s.extend(&s);
                    m.add(
                        name(proj, "weight_scale"),
                        Dtype::F8_E4M3,
                        &[rows, cols / 16],
                        s,
                    );
                    let (g, is) = (rng.positive(), rng.positive());
                    m.add(
                        name(proj, "weight_scale_2"),
                        Dtype::F32,
                        &[],
                        f32_bytes(&[g]),
                    );
                    m.add(name(proj, "input_scale"), Dtype::F32, &[], f32_bytes(&[is]));
                    (g, is)
                }
                other => panic!("no miniature for {other}"),
            }
        };
        // The same bytes in our layout: W13 = [gate; up] per expert (scales likewise).
        let (mut g13, mut in13) = (0.0, 0f32);
        for proj in &projs {
            let (g, is) = add_proj(m, proj, p.i, p.h, &mut x.w13, &mut x.s13);
            g13 = g;
            in13 = in13.max(is);
        }
        let (g2, in2) = add_proj(m, p.down, p.h, p.i, &mut x.w2, &mut x.s2);
        x.g13.push(g13);
        x.g2.push(g2);
        x.in13 = x.in13.max(in13);
        x.in2 = x.in2.max(in2);
    }
    x
}

fn router(m: &mut Mini, rng: &mut Rng, name: &str, e: usize, h: usize) {
    m.add(name, Dtype::BF16, &[e, h], rng.bf16_bytes(e * h));
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The expected whole layer from our-layout tensors.
fn assemble(
    cfg: LayerConfig,
    x: Expected,
    w13_bias: Option<Vec<f32>>,
    w2_bias: Option<Vec<f32>>,
    router_bias: Option<Vec<f32>>,
) -> MoeLayer {
    let f = cfg.weight_format;
    let (sc13, sc2, g13, g2) = match f {
        WeightFormat::Bf16 => (BlockScales::None, BlockScales::None, vec![], vec![]),
        WeightFormat::Fp8Block => (
            BlockScales::Block128(f32s(&x.s13)),
            BlockScales::Block128(f32s(&x.s2)),
            vec![],
            vec![],
        ),
        WeightFormat::Nvfp4 => (
            BlockScales::E4m3(x.s13),
            BlockScales::E4m3(x.s2),
            x.g13,
            x.g2,
        ),
        WeightFormat::Mxfp4 => (
            BlockScales::Ue8m0(x.s13),
            BlockScales::Ue8m0(x.s2),
            vec![],
            vec![],
        ),
        other => panic!("{other}"),
    };
    let (e, m, h, i) = (
        cfg.num_experts,
        cfg.w13_rows(),
        cfg.hidden,
        cfg.intermediate,
    );
    let static_in = cfg.activation_format.needs_input_scale();
    let weights = LayerWeights {
        w13: QuantizedTensor {
            format: f,
            experts: e,
            rows: m,
            cols: h,
            data: x.w13.into(),
            scales: sc13,
            global_scales: g13,
        },
        w2: QuantizedTensor {
            format: f,
            experts: e,
            rows: h,
            cols: i,
            data: x.w2.into(),
            scales: sc2,
            global_scales: g2,
        },
        w13_bias,
        w2_bias,
        w13_input_scale: static_in.then_some(x.in13),
        w2_input_scale: static_in.then_some(x.in2),
        router_bias,
    };
    MoeLayer::new(cfg, weights).unwrap()
}

fn config(
    e: usize,
    h: usize,
    i: usize,
    f: WeightFormat,
    act: Activation,
    order: W13Order,
    routing: RoutingConfig,
) -> LayerConfig {
    LayerConfig {
        num_experts: e,
        hidden: h,
        intermediate: i,
        weight_format: f,
        activation_format: f.default_activation_format(),
        activation: act,
        w13_order: order,
        routing,
        local_experts: 0..e,
        parallelism: Parallelism::default(),
    }
}

/// Hidden states, routed by the checkpoint's router.
fn run_both(loaded: &CheckpointLayer, expected: &MoeLayer, tokens: usize) -> (Vec<f64>, Vec<f64>) {
    let cfg = loaded.layer.config();
    let mut rng = Rng(99);
    let x: Vec<f32> = (0..tokens * cfg.hidden).map(|_| rng.f32()).collect();
    let hidden = HostTensor::from_f32(vec![tokens, cfg.hidden], &x);
    let logits = loaded
        .router_logits(&hidden)
        .unwrap()
        .to_f32_vec("logits")
        .unwrap();
    let routes = route_logits(
        &cfg.routing,
        &logits,
        tokens,
        cfg.num_experts,
        loaded.layer.weights().router_bias.as_deref(),
    )
    .unwrap();
    let a = moerunner::reference::forward(&loaded.layer, &x, &routes).unwrap();
    let b = moerunner::reference::forward(expected, &x, &routes).unwrap();
    (a, b)
}

fn check_equal(loaded: &CheckpointLayer, expected: &MoeLayer) {
    assert_eq!(loaded.layer.config(), expected.config());
    let (a, b) = run_both(loaded, expected, 5);
    assert!(a.iter().any(|v| *v != 0.0), "output is all zero");
    for (j, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(
            x.to_bits(),
            y.to_bits(),
            "output[{j}]: loaded {x} vs expected {y}"
        );
    }
}

/// Every TP × EP split of the checkpoint equals `shard::shard` of the whole loaded layer.
fn check_slices(
    dir: &Path,
    layer: usize,
    whole: &CheckpointLayer,
    splits: &[(usize, usize)],
) -> HashMap<(usize, usize, usize, usize), u64> {
    let mut bytes = HashMap::new();
    for &(ep, tp) in splits {
        for er in 0..ep {
            for tr in 0..tp {
                let par = Parallelism {
                    ep_size: ep,
                    ep_rank: er,
                    tp_size: tp,
                    tp_rank: tr,
                };
                let opts = LoadOptions {
                    parallelism: par,
                    ..Default::default()
                };
                let rank = load_layer(dir, layer, &opts).unwrap();
                let want = moerunner::shard::shard(&whole.layer, par).unwrap();
                check_equal(&rank, &want);
                bytes.insert((ep, er, tp, tr), rank.bytes_read);
            }
        }
    }
    bytes
}

/// An expert map's ranks (`LoadOptions::experts`: any ascending list, gaps where replicas or
/// other ranks' experts sit) at every TP rank of `tp`: each equals `shard::shard_experts` of the
/// whole loaded layer. Returns each load's bytes read, by (list, TP rank).
fn check_expert_lists(
    dir: &Path,
    layer: usize,
    whole: &CheckpointLayer,
    lists: &[&[usize]],
    tp: usize,
) -> HashMap<(Vec<usize>, usize), u64> {
    let mut bytes = HashMap::new();
    for (er, list) in lists.iter().enumerate() {
        for tr in 0..tp {
            let par = Parallelism {
                ep_size: lists.len(),
                ep_rank: er,
                tp_size: tp,
                tp_rank: tr,
            };
            let opts = LoadOptions {
                parallelism: par,
                experts: Some(list.to_vec()),
                ..Default::default()
            };
            let rank = load_layer(dir, layer, &opts).unwrap();
            let want =
                moerunner::shard::shard_experts(&whole.layer, list, (er, lists.len()), (tr, tp))
                    .unwrap();
            check_equal(&rank, &want);
            bytes.insert((list.to_vec(), tr), rank.bytes_read);
        }
    }
    bytes
}

fn base_config(model_type: &str, layers: usize) -> serde_json::Value {
    json!({ "model_type": model_type, "num_hidden_layers": layers, "hidden_act": "silu", "torch_dtype": "bfloat16" })
}

fn merge(mut a: serde_json::Value, b: serde_json::Value) -> serde_json::Value {
    for (k, v) in b.as_object().unwrap() {
        a[k] = v.clone();
    }
    a
}

/// A tensor of another layer, so the index names more than the layer asked for, and an I64
/// buffer beside it: real shards hold dtypes a MoE layer never reads, which must not stop loading.
fn distractor(m: &mut Mini, name: &str) {
    m.add(name, Dtype::BF16, &[4, 4], vec![0; 32]);
    m.add(
        format!("{name}.position_ids"),
        Dtype::I64,
        &[4],
        vec![0; 32],
    );
}

// ---------------------------------------------------------------------------------------------
// Families

const LAYER: usize = 1;

fn qwen3(name: &str, format: WeightFormat, e: usize, h: usize, i: usize) -> (TempDir, MoeLayer) {
    let mut rng = Rng(1);
    let mut m = Mini::default();
    distractor(&mut m, "model.layers.0.self_attn.q_proj.weight");
    let p = format!("model.layers.{LAYER}.mlp.");
    let x = per_expert(
        &mut m,
        &mut rng,
        &PerExpert {
            e,
            h,
            i,
            format,
            prefix: &format!("{p}experts."),
            gate: Some("gate_proj"),
            up: "up_proj",
            down: "down_proj",
        },
    );
    router(&mut m, &mut rng, &format!("{p}gate.weight"), e, h);
    let mut cfg = base_config("qwen3_moe", 2);
    cfg = merge(
        cfg,
        json!({ "num_experts": e, "num_experts_per_tok": 2, "moe_intermediate_size": i, "hidden_size": h,
        "intermediate_size": 4 * i, "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [] }),
    );
    if format == WeightFormat::Fp8Block {
        cfg["quantization_config"] = json!({ "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128] });
    }
    let dir = m.write(name, cfg, 3);
    let c = config(
        e,
        h,
        i,
        format,
        Activation::Swiglu,
        W13Order::GateUp,
        RoutingConfig::new(RoutingMethod::Renormalize, 2),
    );
    (dir, assemble(c, x, None, None, None))
}

#[test]
fn qwen3_moe_bf16() {
    let (dir, expected) = qwen3("qwen3-bf16", WeightFormat::Bf16, 4, 64, 32);
    let l = load_layer(&dir, LAYER, &LoadOptions::default()).unwrap();
    assert_eq!(l.family, "qwen3_moe");
    check_equal(&l, &expected);
}

#[test]
fn qwen3_moe_fp8_block_with_partial_blocks() {
    // H = 192 = 1.5 blocks of 128: the last column block of W13 and row block of W2 are partial.
    let (dir, expected) = qwen3("qwen3-fp8", WeightFormat::Fp8Block, 4, 192, 256);
    let l = load_layer(&dir, LAYER, &LoadOptions::default()).unwrap();
    check_equal(&l, &expected);
    check_slices(&dir, LAYER, &l, &[(2, 1), (1, 2), (2, 2)]);
}

#[test]
fn qwen3_moe_tp_ep_reads_only_the_rank_slice() {
    let (e, h, i) = (4, 64, 32);
    let (dir, _) = qwen3("qwen3-bytes", WeightFormat::Bf16, e, h, i);
    let whole = load_layer(&dir, LAYER, &LoadOptions::default()).unwrap();
    let router = e * h * 2;
    // Whole layer: 3 projections of I × H BF16 per expert, plus the router.
    assert_eq!(whole.bytes_read, (e * 3 * i * h * 2 + router) as u64);
    let bytes = check_slices(&dir, LAYER, &whole, &[(2, 2), (4, 1), (1, 2)]);
    for ((ep, _, tp, _), got) in bytes {
        let want = (e / ep) * 3 * (i / tp) * h * 2 + router;
        assert_eq!(got, want as u64, "ep {ep} tp {tp}");
    }
    // An expert map's ranks (uneven, a replica of expert 2 on both) read their experts only.
    let lists: &[&[usize]] = &[&[0, 2], &[1, 2, 3]];
    for ((list, _), got) in check_expert_lists(&dir, LAYER, &whole, lists, 2) {
        let want = list.len() * 3 * (i / 2) * h * 2 + router;
        assert_eq!(got, want as u64, "experts {list:?}");
    }
    // 12 800 bytes for ep 2 × tp 2, against 25 088 for the whole layer.
    assert_eq!(
        load_layer(
            &dir,
            LAYER,
            &LoadOptions {
                parallelism: Parallelism {
                    ep_size: 2,
                    ep_rank: 1,
                    tp_size: 2,
                    tp_rank: 1
                },
                ..Default::default()
            }
        )
        .unwrap()
        .bytes_read,
        12_800
    );
}

#[test]
fn qwen2_moe_routing_is_renormalize_naive() {
    let mut rng = Rng(2);
    let mut m = Mini::default();
    let (e, h, i) = (4, 32, 32);
    let p = format!("model.layers.{LAYER}.mlp.");
    let x = per_expert(
        &mut m,
        &mut rng,
        &PerExpert {
            e,
            h,
            i,
            format: WeightFormat::Bf16,
            prefix: &format!("{p}experts."),
            gate: Some("gate_proj"),
            up: "up_proj",
            down: "down_proj",
        },
    );
    router(&mut m, &mut rng, &format!("{p}gate.weight"), e, h);
    // Qwen2-MoE's shared expert lives beside the routed experts; it is outside this layer.
    m.add(
        format!("{p}shared_expert.up_proj.weight"),
        Dtype::BF16,
        &[i, h],
        rng.bf16_bytes(i * h),
    );
    let cfg = merge(
        base_config("qwen2_moe", 2),
        json!({ "num_experts": e, "num_experts_per_tok": 2, "moe_intermediate_size": i,
        "hidden_size": h, "norm_topk_prob": true, "shared_expert_intermediate_size": i }),
    );
    let dir = m.write("qwen2", cfg, 2);
    let c = config(
        e,
        h,
        i,
        WeightFormat::Bf16,
        Activation::Swiglu,
        W13Order::GateUp,
        RoutingConfig::new(RoutingMethod::RenormalizeNaive, 2),
    );
    check_equal(
        &load_layer(&dir, LAYER, &LoadOptions::default()).unwrap(),
        &assemble(c, x, None, None, None),
    );
}

/// Mixtral with w1 = gate, w3 = up, w2 = down; FP8 with `weight_scale_inv` stored as F32 or BF16.
fn mixtral(format: WeightFormat, bf16_scales: bool) {
    let mut rng = Rng(3);
    let mut m = Mini::default();
    let (e, h, i) = if format == WeightFormat::Bf16 {
        (4, 32, 64)
    } else {
        (4, 128, 128)
    };
    let p = format!("model.layers.{LAYER}.block_sparse_moe.");
    let mut x = per_expert(
        &mut m,
        &mut rng,
        &PerExpert {
            e,
            h,
            i,
            format,
            prefix: &format!("{p}experts."),
            gate: Some("w1"),
            up: "w3",
            down: "w2",
        },
    );
    router(&mut m, &mut rng, &format!("{p}gate.weight"), e, h);
    if bf16_scales {
        // Store the scales as BF16 and expect their (exact) f32 values.
        let round = |b: &[u8]| -> Vec<f32> {
            f32s(b)
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_f32())
                .collect()
        };
        for t in m
            .tensors
            .iter_mut()
            .filter(|t| t.0.ends_with("weight_scale_inv"))
        {
            let v = round(&t.3);
            t.1 = Dtype::BF16;
            t.3 = v
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect();
        }
        x.s13 = f32_bytes(&round(&x.s13));
        x.s2 = f32_bytes(&round(&x.s2));
    }
    let cfg = merge(
        base_config("mixtral", 2),
        json!({ "num_local_experts": e, "num_experts_per_tok": 2, "intermediate_size": i, "hidden_size": h }),
    );
    let dir = m.write("mixtral", cfg, 3);
    let c = config(
        e,
        h,
        i,
        format,
        Activation::Swiglu,
        W13Order::GateUp,
        RoutingConfig::new(RoutingMethod::Renormalize, 2),
    );
    let l = load_layer(&dir, LAYER, &LoadOptions::default()).unwrap();
    check_equal(&l, &assemble(c, x, None, None, None));
    // FP8 at I = 128 cannot split I further (128-row blocks); BF16 can.
    let splits: &[(usize, usize)] = if format == WeightFormat::Bf16 {
        &[(2, 2)]
    } else {
        &[(2, 1)]
    };
    check_slices(&dir, LAYER, &l, splits);
}

#[test]
fn mixtral_bf16_w1_gate_w3_up_w2_down() {
    mixtral(WeightFormat::Bf16, false);
}

#[test]
fn mixtral_fp8_block_with_bf16_weight_scale_inv() {
    mixtral(WeightFormat::Fp8Block, true);
}

fn deepseek() -> (TempDir, MoeLayer, usize) {
    let mut rng = Rng(4);
    let mut m = Mini::default();
    let (e, h, i) = (8, 192, 256);
    distractor(&mut m, "model.layers.0.mlp.gate_proj.weight");
    let p = format!("model.layers.{LAYER}.mlp.");
    let x = per_expert(
        &mut m,
        &mut rng,
        &PerExpert {
            e,
            h,
            i,
            format: WeightFormat::Fp8Block,
            prefix: &format!("{p}experts."),
            gate: Some("gate_proj"),
            up: "up_proj",
            down: "down_proj",
        },
    );
    router(&mut m, &mut rng, &format!("{p}gate.weight"), e, h);
    let bias: Vec<f32> = (0..e).map(|_| rng.f32() * 0.1).collect();
    m.add(
        format!("{p}gate.e_score_correction_bias"),
        Dtype::F32,
        &[e],
        f32_bytes(&bias),
    );
    let cfg = merge(
        base_config("deepseek_v3", 3),
        json!({ "n_routed_experts": e, "num_experts_per_tok": 2, "moe_intermediate_size": i,
        "hidden_size": h, "intermediate_size": 4 * i, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": true,
        "n_shared_experts": 1,
        "quantization_config": { "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128] } }),
    );
    let dir = m.write("deepseek", cfg, 3);
    let mut r = RoutingConfig::new(RoutingMethod::DeepseekV3, 2);
    (r.n_group, r.topk_group, r.routed_scaling_factor) = (4, 2, 2.5);
    let c = config(
        e,
        h,
        i,
        WeightFormat::Fp8Block,
        Activation::Swiglu,
        W13Order::GateUp,
        r,
    );
    (dir, assemble(c, x, None, None, Some(bias)), h)
}

#[test]
fn deepseek_v3_fp8_block_with_correction_bias_and_groups() {
    let (dir, expected, _) = deepseek();
    let l = load_layer(&dir, LAYER, &LoadOptions::default()).unwrap();
    assert_eq!(l.family, "deepseek_v3");
    check_equal(&l, &expected);
}

#[test]
fn deepseek_v3_tp_reads_only_its_rows_columns_and_scale_blocks() {
    let (dir, _, h) = deepseek();
    let whole = load_layer(&dir, LAYER, &LoadOptions::default()).unwrap();
    let bytes = check_slices(&dir, LAYER, &whole, &[(1, 2), (2, 2)]);
    let (e, i) = (8, 256);
    let router = e * h * 2 + e * 4;
    // Per expert: gate and up rows (I/R × H bytes each), down columns (H × I/R), and scales:
    // one 128-row block × 2 column blocks for gate and up, 2 row blocks × one column block for down.
    let per_expert =
        |tp: usize| 3 * (i / tp) * h + (2 * (i / tp / 128) * 2 + 2 * (i / tp).div_ceil(128)) * 4;
    for ((ep, _, tp, _), got) in bytes {
        assert_eq!(
            got,
            ((e / ep) * per_expert(tp) + router) as u64,
            "ep {ep} tp {tp}"
        );
    }
    assert_eq!(whole.bytes_read, (e * per_expert(1) + router) as u64);
    // An expert map's ranks (expert 5 replicated) read their experts' blocks and scales only.
    let lists: &[&[usize]] = &[&[0, 1, 5, 7], &[2, 3, 4, 5, 6]];
    for ((list, _), got) in check_expert_lists(&dir, LAYER, &whole, lists, 2) {
        let want = list.len() * per_expert(2) + router;
        assert_eq!(got, want as u64, "experts {list:?}");
    }
}

#[test]
fn deepseek_v3_dense_layer_is_refused() {
    let (dir, _, _) = deepseek();
    let err = load_layer(&dir, 0, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("first_k_dense_replace") && err.contains("dense"),
        "{err}"
    );
}

fn minimax() -> (TempDir, MoeLayer) {
    let mut rng = Rng(5);
    let mut m = Mini::default();
    let (e, h, i) = (4, 128, 128);
    let p = format!("model.layers.{LAYER}.block_sparse_moe.");
    let x = per_expert(
        &mut m,
        &mut rng,
        &PerExpert {
            e,
            h,
            i,
            format: WeightFormat::Fp8Block,
            prefix: &format!("{p}experts."),
            gate: Some("w1"),
            up: "w3",
            down: "w2",
        },
    );
    router(&mut m, &mut rng, &format!("{p}gate.weight"), e, h);
    let bias: Vec<f32> = (0..e).map(|_| rng.f32() * 0.1).collect();
    m.add(
        format!("{p}e_score_correction_bias"),
        Dtype::F32,
        &[e],
        f32_bytes(&bias),
    );
    let cfg = merge(
        base_config("minimax_m2", 2),
        json!({ "num_local_experts": e, "num_experts_per_tok": 2, "intermediate_size": i,
        "hidden_size": h, "scoring_func": "sigmoid", "use_routing_bias": true, "routed_scaling_factor": 1.5,
        "quantization_config": { "quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic", "weight_block_size": [128, 128] } }),
    );
    let dir = m.write("minimax", cfg, 2);
    let mut r = RoutingConfig::new(RoutingMethod::Minimax2, 2);
    r.routed_scaling_factor = 1.5;
    let c = config(
        e,
        h,
        i,
        WeightFormat::Fp8Block,
        Activation::Swiglu,
        W13Order::GateUp,
        r,
    );
    (dir, assemble(c, x, None, None, Some(bias)))
}

#[test]
fn minimax_m2_fp8_block_minimax2_routing() {
    let (dir, expected) = minimax();
    let l = load_layer(&dir, LAYER, &LoadOptions::default()).unwrap();
    check_equal(&l, &expected);
    check_slices(&dir, LAYER, &l, &[(2, 1), (4, 1)]);
}

#[test]
fn fp8_block_tp_slice_not_aligned_to_128_is_an_error() {
    let (dir, _) = minimax();
    let opts = LoadOptions {
        parallelism: Parallelism {
            tp_size: 2,
            ..Default::default()
        },
        ..Default::default()
    };
    let err = load_layer(&dir, LAYER, &opts).unwrap_err().to_string();
    assert!(
        err.contains("experts.0.w3.weight") && err.contains("128"),
        "{err}"
    );
}

fn nemotron(format: WeightFormat) -> (TempDir, MoeLayer) {
    let mut rng = Rng(6);
    let mut m = Mini::default();
    let (e, h, i) = (4, 64, 64);
    distractor(&mut m, "backbone.layers.0.mixer.in_proj.weight");
    let p = "backbone.layers.3.mixer.";
    let x = per_expert(
        &mut m,
        &mut rng,
        &PerExpert {
            e,
            h,
            i,
            format,
            prefix: &format!("{p}experts."),
            gate: None,
            up: "up_proj",
            down: "down_proj",
        },
    );
    router(&mut m, &mut rng, &format!("{p}gate.weight"), e, h);
    let bias: Vec<f32> = (0..e).map(|_| rng.f32() * 0.1).collect();
    m.add(
        format!("{p}gate.e_score_correction_bias"),
        Dtype::F32,
        &[e],
        f32_bytes(&bias),
    );
    m.add(
        format!("{p}shared_experts.up_proj.weight"),
        Dtype::BF16,
        &[i, h],
        rng.bf16_bytes(i * h),
    );
    let mut cfg = merge(
        base_config("nemotron_h", 4),
        json!({ "n_routed_experts": e, "num_experts_per_tok": 2, "moe_intermediate_size": i,
        "moe_shared_expert_intermediate_size": i, "hidden_size": h, "hybrid_override_pattern": "M*ME", "mlp_hidden_act": "relu2",
        "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": true,
        "quantization_config": { "quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16 } }),
    );
    if format == WeightFormat::Bf16 {
        // The BF16 release, with the layer kinds spelled as newer configs spell them.
        let c = cfg.as_object_mut().unwrap();
        c.remove("quantization_config");
        c.remove("hybrid_override_pattern");
        c.insert(
            "layers_block_type".into(),
            json!(["mamba", "attention", "mamba", "moe"]),
        );
    }
    let dir = m.write("nemotron", cfg, 3);
    let mut r = RoutingConfig::new(RoutingMethod::DeepseekV3, 2);
    r.routed_scaling_factor = 2.5;
    let c = config(e, h, i, format, Activation::Relu2, W13Order::GateUp, r);
    (dir, assemble(c, x, None, None, Some(bias)))
}

#[test]
fn nemotron_h_nvfp4_relu2_with_static_input_scales() {
    let (dir, expected) = nemotron(WeightFormat::Nvfp4);
    let l = load_layer(&dir, 3, &LoadOptions::default()).unwrap();
    assert_eq!(l.family, "nemotron_h");
    assert_eq!(l.layer.config().activation_format, ActivationFormat::Nvfp4);
    check_equal(&l, &expected);
    let bytes = check_slices(&dir, 3, &l, &[(2, 2), (1, 4)]);
    // Per expert and projection: L rows (up) or columns (down) of H/2 packed bytes, their E4M3
    // scales (one per 16), and the 4-byte weight_scale_2; plus every expert's two input_scales
    // (the layer's static scale is their max), the router [E, H] BF16 and the bias [E] F32.
    let (e, h, i) = (4, 64, 64);
    let want = |ep: usize, tp: usize| {
        let l = i / tp;
        (e / ep) * 2 * (l * h / 2 + l * h / 16 + 4) + e * 2 * 4 + e * h * 2 + e * 4
    };
    assert_eq!(l.bytes_read, want(1, 1) as u64);
    for ((ep, _, tp, _), got) in bytes {
        assert_eq!(got, want(ep, tp) as u64, "ep {ep} tp {tp}");
    }
}

#[test]
fn nemotron_h_non_moe_layer_names_the_pattern() {
    let (dir, _) = nemotron(WeightFormat::Nvfp4);
    let err = load_layer(&dir, 1, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hybrid_override_pattern") && err.contains("`*`"),
        "{err}"
    );
}

#[test]
fn nemotron_h_bf16_with_layers_block_type() {
    let (dir, expected) = nemotron(WeightFormat::Bf16);
    let l = load_layer(&dir, 3, &LoadOptions::default()).unwrap();
    check_equal(&l, &expected);
    check_slices(&dir, 3, &l, &[(2, 2)]);
    let err = load_layer(&dir, 2, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layers_block_type") && err.contains("`mamba`"),
        "{err}"
    );
}

fn gpt_oss() -> (TempDir, MoeLayer) {
    let mut rng = Rng(7);
    let mut m = Mini::default();
    let (e, h, i) = (4, 64, 64);
    let p = format!("model.layers.{LAYER}.mlp.");
    let w13: Vec<u8> = (0..e * 2 * i * h / 2).map(|_| rng.byte()).collect();
    let s13: Vec<u8> = (0..e * 2 * i * h / 32)
        .map(|_| 120 + rng.byte() % 10)
        .collect();
    let w2: Vec<u8> = (0..e * h * i / 2).map(|_| rng.byte()).collect();
    let s2: Vec<u8> = (0..e * h * i / 32).map(|_| 120 + rng.byte() % 10).collect();
    let b13 = rng.bf16_bytes(e * 2 * i);
    let b2 = rng.bf16_bytes(e * h);
    m.add(
        format!("{p}experts.gate_up_proj_blocks"),
        Dtype::U8,
        &[e, 2 * i, h / 32, 16],
        w13.clone(),
    );
    m.add(
        format!("{p}experts.gate_up_proj_scales"),
        Dtype::U8,
        &[e, 2 * i, h / 32],
        s13.clone(),
    );
    m.add(
        format!("{p}experts.gate_up_proj_bias"),
        Dtype::BF16,
        &[e, 2 * i],
        b13.clone(),
    );
    m.add(
        format!("{p}experts.down_proj_blocks"),
        Dtype::U8,
        &[e, h, i / 32, 16],
        w2.clone(),
    );
    m.add(
        format!("{p}experts.down_proj_scales"),
        Dtype::U8,
        &[e, h, i / 32],
        s2.clone(),
    );
    m.add(
        format!("{p}experts.down_proj_bias"),
        Dtype::BF16,
        &[e, h],
        b2.clone(),
    );
    router(&mut m, &mut rng, &format!("{p}router.weight"), e, h);
    let rb = rng.bf16_bytes(e);
    m.add(format!("{p}router.bias"), Dtype::BF16, &[e], rb);
    let cfg = merge(
        base_config("gpt_oss", 2),
        json!({ "num_local_experts": e, "num_experts_per_tok": 2, "experts_per_token": 2,
        "intermediate_size": i, "hidden_size": h, "swiglu_limit": 7.0,
        "quantization_config": { "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"] } }),
    );
    let dir = m.write("gpt-oss", cfg, 3);
    let c = config(
        e,
        h,
        i,
        WeightFormat::Mxfp4,
        Activation::SwigluOai {
            alpha: 1.702,
            beta: 1.0,
            limit: 7.0,
        },
        W13Order::Interleaved,
        RoutingConfig::new(RoutingMethod::Renormalize, 2),
    );
    let bf = |b: &[u8]| {
        b.chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect::<Vec<f32>>()
    };
    let x = Expected {
        w13,
        w2,
        s13,
        s2,
        g13: vec![],
        g2: vec![],
        in13: 0.0,
        in2: 0.0,
    };
    (dir, assemble(c, x, Some(bf(&b13)), Some(bf(&b2)), None))
}

#[test]
fn gpt_oss_mxfp4_interleaved_with_biases() {
    let (dir, expected) = gpt_oss();
    let l = load_layer(&dir, LAYER, &LoadOptions::default()).unwrap();
    assert_eq!(l.family, "gpt_oss");
    assert!(l.router_bias.is_some());
    check_equal(&l, &expected);
    let bytes = check_slices(&dir, LAYER, &l, &[(2, 2), (1, 2)]);
    // Per expert: 2L rows of H/2 packed bytes + H/32 scales + a BF16 bias each, H rows of L/2
    // bytes + L/32 scales, and (TP rank 0 only) the H BF16 GEMM2 bias; plus the router and its bias.
    let (e, h, i) = (4, 64, 64);
    for ((ep, _, tp, tr), got) in &bytes {
        let l = i / tp;
        let b2 = if *tr == 0 { h * 2 } else { 0 };
        let per = 2 * l * (h / 2 + h / 32 + 2) + h * (l / 2 + l / 32) + b2;
        assert_eq!(
            *got,
            ((e / ep) * per + e * h * 2 + e * 2) as u64,
            "ep {ep} tp {tp}"
        );
    }
    // An expert map's ranks: the stacked tensors are read in runs of consecutive experts.
    let lists: &[&[usize]] = &[&[0, 1, 3], &[2, 3]];
    for ((list, tr), got) in check_expert_lists(&dir, LAYER, &l, lists, 2) {
        let l = i / 2;
        let b2 = if tr == 0 { h * 2 } else { 0 };
        let per = 2 * l * (h / 2 + h / 32 + 2) + h * (l / 2 + l / 32) + b2;
        assert_eq!(
            got,
            (list.len() * per + e * h * 2 + e * 2) as u64,
            "experts {list:?} tp rank {tr}"
        );
    }
    // TP rank 1 does not read the GEMM2 bias (e/ep × H BF16 values).
    for ep in [1, 2] {
        let (r0, r1) = (bytes[&(ep, 0, 2, 0)], bytes[&(ep, 0, 2, 1)]);
        assert_eq!(r0 - r1, (4 / ep * 64 * 2) as u64, "ep {ep}");
    }
}

#[test]
fn online_quantization_of_a_bf16_checkpoint() {
    let (dir, _) = qwen3("qwen3-quant", WeightFormat::Bf16, 4, 64, 32);
    let whole = load_layer(&dir, LAYER, &LoadOptions::default()).unwrap();
    for f in [
        WeightFormat::Mxfp8,
        WeightFormat::Mxfp4,
        WeightFormat::Nvfp4,
        WeightFormat::Fp8Block,
        WeightFormat::Bf16,
    ] {
        let l = load_layer(
            &dir,
            LAYER,
            &LoadOptions {
                quantize: Some(f),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(l.layer.config().weight_format, f);
        // The same as quantizing the decoded weights ourselves.
        let w = whole.layer.weights();
        let q = |t: &QuantizedTensor| {
            let mut v = vec![0f32; t.experts * t.rows * t.cols];
            for (x, c) in v.chunks_exact_mut(t.rows * t.cols).enumerate() {
                t.decode_rows_f32(x, 0..t.rows, c);
            }
            moerunner::formats::quantize_weights(f, t.experts, t.rows, t.cols, &v, None).unwrap()
        };
        let (a, b) = (q(&w.w13), &l.layer.weights().w13);
        assert_eq!(&a.data[..], &b.data[..], "{f}");
        assert_eq!(a.scales, b.scales, "{f}");
        let mut cfg = whole.layer.config().clone();
        cfg.weight_format = f;
        cfg.activation_format = l.layer.config().activation_format;
        let expected = MoeLayer::new(
            cfg,
            LayerWeights {
                w13: a,
                w2: q(&w.w2),
                ..w.clone()
            },
        )
        .unwrap();
        check_equal(&l, &expected);
    }
    let err = load_layer(
        &dir,
        LAYER,
        &LoadOptions {
            quantize: Some(WeightFormat::Fp8),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("input scales"), "{err}");
}

/// A stand-in for the GPU quantizer (`LoadOptions::quantizer`): the CPU pass under another name,
/// recording what it was asked to quantize; it declines mxfp4.
#[derive(Debug, Default)]
struct RecordingQuantizer {
    calls: std::sync::Mutex<Vec<String>>,
}

impl moerunner::checkpoint::ExpertQuantizer for RecordingQuantizer {
    fn supports(&self, format: WeightFormat) -> bool {
        format != WeightFormat::Mxfp4
    }
    fn quantize(
        &self,
        t: &QuantizedTensor,
        format: WeightFormat,
        name: &str,
    ) -> moerunner::Result<QuantizedTensor> {
        self.calls.lock().unwrap().push(format!("{name} {format}"));
        let mut v = vec![0f32; t.experts * t.rows * t.cols];
        for (x, c) in v.chunks_exact_mut((t.rows * t.cols).max(1)).enumerate() {
            t.decode_rows_f32(x, 0..t.rows, c);
        }
        moerunner::formats::quantize_weights(format, t.experts, t.rows, t.cols, &v, None)
    }
}

/// `--quantize` goes to `LoadOptions::quantizer` for the formats it supports (naming layer and
/// tensor), to the CPU pass for the others, with the same layer either way.
#[test]
fn online_quantization_goes_to_the_given_quantizer() {
    let (dir, _) = qwen3("qwen3-quantizer", WeightFormat::Bf16, 4, 64, 32);
    let rec = std::sync::Arc::new(RecordingQuantizer::default());
    for f in [WeightFormat::Mxfp8, WeightFormat::Mxfp4] {
        let opts =
            |quantizer: Option<std::sync::Arc<dyn moerunner::checkpoint::ExpertQuantizer>>| {
                LoadOptions {
                    quantize: Some(f),
                    quantizer,
                    ..Default::default()
                }
            };
        let cpu = load_layer(&dir, LAYER, &opts(None)).unwrap();
        let given = load_layer(&dir, LAYER, &opts(Some(rec.clone()))).unwrap();
        check_equal(&given, &cpu.layer);
        let (g, c) = (given.layer.weights(), cpu.layer.weights());
        for (a, b) in [(&g.w13, &c.w13), (&g.w2, &c.w2)] {
            assert_eq!((&a.data[..], &a.scales), (&b.data[..], &b.scales), "{f}");
        }
    }
    assert_eq!(
        *rec.calls.lock().unwrap(),
        [
            format!("layer {LAYER} w13 mxfp8"),
            format!("layer {LAYER} w2 mxfp8")
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Errors name the key or the tensor

fn small_qwen(name: &str, edit: impl FnOnce(&mut serde_json::Value, &mut Mini)) -> TempDir {
    let mut rng = Rng(8);
    let mut m = Mini::default();
    let (e, h, i) = (2, 32, 32);
    let p = format!("model.layers.{LAYER}.mlp.");
    per_expert(
        &mut m,
        &mut rng,
        &PerExpert {
            e,
            h,
            i,
            format: WeightFormat::Bf16,
            prefix: &format!("{p}experts."),
            gate: Some("gate_proj"),
            up: "up_proj",
            down: "down_proj",
        },
    );
    router(&mut m, &mut rng, &format!("{p}gate.weight"), e, h);
    let mut cfg = merge(
        base_config("qwen3_moe", 2),
        json!({ "num_experts": e, "num_experts_per_tok": 1, "moe_intermediate_size": i, "hidden_size": h, "norm_topk_prob": true }),
    );
    edit(&mut cfg, &mut m);
    m.write(name, cfg, 2)
}

fn load_err(dir: &Path) -> String {
    load_layer(dir, LAYER, &LoadOptions::default())
        .unwrap_err()
        .to_string()
}

#[test]
fn unknown_model_type_names_the_key() {
    let dir = small_qwen("err-type", |c, _| c["model_type"] = json!("llama"));
    let err = load_err(&dir);
    assert!(
        err.contains("model_type") && err.contains("llama") && err.contains("qwen3_moe"),
        "{err}"
    );
}

#[test]
fn missing_config_key_is_named() {
    let dir = small_qwen("err-key", |c, _| {
        c.as_object_mut().unwrap().remove("moe_intermediate_size");
    });
    let err = load_err(&dir);
    assert!(err.contains("moe_intermediate_size"), "{err}");
}

#[test]
fn unsupported_activation_names_the_key() {
    let dir = small_qwen("err-act", |c, _| c["hidden_act"] = json!("gelu"));
    assert!(load_err(&dir).contains("hidden_act"));
}

#[test]
fn dense_qwen_layer_names_the_key() {
    let dir = small_qwen("err-dense", |c, _| c["mlp_only_layers"] = json!([1]));
    assert!(load_err(&dir).contains("mlp_only_layers"));
}

#[test]
fn missing_tensor_is_named() {
    let dir = small_qwen("err-missing", |_, m| {
        m.tensors
            .retain(|t| !t.0.ends_with("experts.1.down_proj.weight"))
    });
    let err = load_err(&dir);
    assert!(
        err.contains("model.layers.1.mlp.experts.1.down_proj.weight"),
        "{err}"
    );
}

#[test]
fn bad_dtype_is_named() {
    let dir = small_qwen("err-dtype", |_, m| {
        for t in &mut m.tensors {
            if t.0.ends_with("experts.1.up_proj.weight") {
                t.1 = Dtype::F16;
            }
        }
    });
    let err = load_err(&dir);
    assert!(
        err.contains("experts.1.up_proj.weight") && err.contains("F16"),
        "{err}"
    );
}

#[test]
fn bad_shape_is_named() {
    let dir = small_qwen("err-shape", |_, m| {
        for t in &mut m.tensors {
            if t.0.ends_with("experts.0.down_proj.weight") {
                t.2 = vec![16, 64];
            }
        }
    });
    let err = load_err(&dir);
    assert!(
        err.contains("experts.0.down_proj.weight") && err.contains("[32, 32]"),
        "{err}"
    );
}

#[test]
fn uneven_parallelism_names_the_size() {
    let dir = small_qwen("err-ep", |_, _| {});
    let opts = LoadOptions {
        parallelism: Parallelism {
            ep_size: 3,
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(load_layer(&dir, LAYER, &opts)
        .unwrap_err()
        .to_string()
        .contains("ep_size"));
}

#[test]
fn a_bad_expert_list_is_named() {
    let dir = small_qwen("err-experts", |_, _| {});
    for (list, says) in [
        (vec![], "empty"),
        (vec![0, 9], "expert 9 is out of range (E = 2)"),
        (vec![1, 0], "not ascending"),
        (vec![1, 1], "not ascending"),
    ] {
        let opts = LoadOptions {
            experts: Some(list.clone()),
            ..Default::default()
        };
        let err = load_layer(&dir, LAYER, &opts).unwrap_err().to_string();
        assert!(
            err.contains("experts to load") && err.contains(says),
            "{list:?}: {err}"
        );
    }
}

#[test]
fn router_logits_use_the_router_in_f32() {
    let dir = small_qwen("logits", |_, _| {});
    let l = load_layer(&dir, LAYER, &LoadOptions::default()).unwrap();
    let w = l.router_weight.as_ref().unwrap();
    assert_eq!(w.dtype, DType::BF16);
    let wv = w.to_f32_vec("w").unwrap();
    let x: Vec<f32> = (0..32).map(|j| j as f32 / 32.0).collect();
    let logits = l
        .router_logits(&HostTensor::from_f32(vec![1, 32], &x))
        .unwrap()
        .to_f32_vec("l")
        .unwrap();
    for (e, got) in logits.iter().enumerate() {
        let want: f32 = x
            .iter()
            .zip(&wv[e * 32..(e + 1) * 32])
            .map(|(a, b)| a * b)
            .sum();
        assert_eq!(*got, want);
    }
}
