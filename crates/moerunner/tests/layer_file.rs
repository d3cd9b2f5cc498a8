//! The layer/input/output file contract (`spec/layer-file.md`): round trips for every format and
//! one test per rule a file can break, each asserting the error names the tensor or key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use moerunner::layer_file::{self, write_tensors, InputFile, MappedFile, RoutingTensors};
use moerunner::synth::{random_input, random_layer, RoutingMode};
use moerunner::tensor::Bytes;
use moerunner::{
    Activation, ActivationFormat, DType, HostTensor, LayerConfig, MoeLayer, Parallelism,
    RoutingConfig, RoutingMethod, W13Order, WeightFormat,
};

type Tensors = Vec<(String, HostTensor)>;
type Meta = HashMap<String, String>;

/// A fresh path per call (tests run in parallel threads and must never share a file), removed
/// when dropped.
struct Tmp(PathBuf);

impl std::ops::Deref for Tmp {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Tmp {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        // The (then empty) folder stays: removing it would race with other tests creating files.
        let _ = std::fs::remove_file(&self.0);
    }
}

fn tmp(name: &str) -> Tmp {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("moerunner-lf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Tmp(dir.join(format!(
        "{}-{name}.safetensors",
        SEQ.fetch_add(1, Ordering::Relaxed)
    )))
}

/// E = 4, H = 64, I = 32, k = 2: small enough for every format's block rules and fast.
fn small(wf: WeightFormat, af: ActivationFormat) -> LayerConfig {
    LayerConfig {
        num_experts: 4,
        hidden: 64,
        intermediate: 32,
        weight_format: wf,
        activation_format: af,
        activation: Activation::Swiglu,
        w13_order: W13Order::GateUp,
        routing: RoutingConfig::new(RoutingMethod::Renormalize, 2),
        local_experts: 0..4,
        parallelism: Parallelism::default(),
    }
}

fn layer(wf: WeightFormat) -> MoeLayer {
    random_layer(&small(wf, wf.default_activation_format()), 11, true).unwrap()
}

/// The tensors and metadata of a valid file of `layer`, to be broken by a test.
fn parts(layer: &MoeLayer) -> (Tensors, Meta) {
    let p = tmp("parts");
    layer_file::write_layer(&p, layer).unwrap();
    let f = MappedFile::open(&p).unwrap();
    let mut names: Vec<String> = f.names().map(String::from).collect();
    names.sort();
    let tensors = names
        .iter()
        .map(|n| (n.clone(), f.get(n).unwrap()))
        .collect();
    (tensors, f.metadata().clone())
}

/// Writes a (broken) layer file and returns the error reading it gives.
fn read_err(tensors: &[(String, HostTensor)], meta: Meta) -> String {
    let p = tmp("broken");
    write_tensors(&p, tensors, meta).unwrap();
    match layer_file::read_layer(&p) {
        Ok(_) => panic!("a broken file was accepted"),
        Err(e) => e.to_string(),
    }
}

/// Asserts reading fails with a message containing every needle.
fn check_err(case: &str, tensors: &[(String, HostTensor)], meta: Meta, needles: &[&str]) {
    let err = read_err(tensors, meta);
    for n in needles {
        assert!(
            err.contains(n),
            "{case}: error `{err}` does not mention `{n}`"
        );
    }
}

fn get(tensors: &[(String, HostTensor)], name: &str) -> HostTensor {
    tensors.iter().find(|(n, _)| n == name).unwrap().1.clone()
}

fn replace(tensors: &mut [(String, HostTensor)], name: &str, t: HostTensor) {
    tensors.iter_mut().find(|(n, _)| n == name).unwrap().1 = t;
}

fn remove(tensors: &mut Vec<(String, HostTensor)>, name: &str) {
    tensors.retain(|(n, _)| n != name);
}

fn key(k: &str) -> String {
    format!("moerunner.{k}")
}

fn assert_same_weights(a: &MoeLayer, b: &MoeLayer, case: &str) {
    assert_eq!(a.config(), b.config(), "{case}: config");
    let (a, b) = (a.weights(), b.weights());
    for (x, y) in [(&a.w13, &b.w13), (&a.w2, &b.w2)] {
        assert_eq!(&x.data[..], &y.data[..], "{case}: data");
        assert_eq!(x.scales, y.scales, "{case}: scales");
        assert_eq!(x.global_scales, y.global_scales, "{case}: globals");
    }
    assert_eq!(a.w13_bias, b.w13_bias, "{case}");
    assert_eq!(a.w2_bias, b.w2_bias, "{case}");
    assert_eq!(a.router_bias, b.router_bias, "{case}");
    assert_eq!(a.w13_input_scale, b.w13_input_scale, "{case}");
    assert_eq!(a.w2_input_scale, b.w2_input_scale, "{case}");
}

// ---------------------------------------------------------------------------------------------
// Round trips

#[test]
fn every_format_round_trips_bit_for_bit() {
    for wf in WeightFormat::ALL.iter().copied() {
        for &af in wf.legal_activation_formats() {
            let mut cfg = small(wf, af);
            cfg.activation = Activation::SwigluOai {
                alpha: 1.5,
                beta: 0.5,
                limit: 6.0,
            };
            cfg.w13_order = W13Order::Interleaved;
            cfg.routing = RoutingConfig {
                n_group: 2,
                topk_group: 1,
                routed_scaling_factor: 2.5,
                ..RoutingConfig::new(RoutingMethod::DeepseekV3, 2)
            };
            let l = random_layer(&cfg, 5, true).unwrap();
            let p = tmp(&format!("rt-{wf}-{af}"));
            layer_file::write_layer(&p, &l).unwrap();
            let back = layer_file::read_layer(&p).unwrap();
            assert_same_weights(&l, &back, &format!("{wf}x{af}"));
            // The expert weights are borrowed from the memory map, never copied.
            assert!(
                matches!(back.weights().w13.data, Bytes::Mapped { .. }),
                "{wf}: w13 copied"
            );
            assert!(
                matches!(back.weights().w2.data, Bytes::Mapped { .. }),
                "{wf}: w2 copied"
            );
        }
    }
}

#[test]
fn every_config_field_round_trips_and_only_applicable_keys_are_written() {
    let mut relu = small(WeightFormat::Bf16, ActivationFormat::Bf16);
    relu.activation = Activation::Relu2;
    relu.routing = RoutingConfig {
        norm_topk_prob: false,
        ..RoutingConfig::new(RoutingMethod::SigmoidRenorm, 3)
    };
    let mut minimax = small(WeightFormat::Fp8Block, ActivationFormat::Fp8Block);
    minimax.w13_order = W13Order::UpGate;
    minimax.routing = RoutingConfig {
        routed_scaling_factor: 2.5,
        ..RoutingConfig::new(RoutingMethod::Minimax2, 2)
    };
    let mut llama = small(WeightFormat::Nvfp4, ActivationFormat::Nvfp4PerToken);
    llama.activation = Activation::Geglu;
    llama.routing = RoutingConfig::new(RoutingMethod::Llama4, 1);
    let mut unlimited = small(WeightFormat::Mxfp4, ActivationFormat::Mxfp8);
    unlimited.activation = Activation::SwigluOai {
        alpha: 1.0,
        beta: 0.0,
        limit: f32::INFINITY,
    };
    for (case, cfg) in [
        ("relu2", &relu),
        ("minimax2", &minimax),
        ("llama4", &llama),
        ("no-limit", &unlimited),
    ] {
        let l = random_layer(cfg, 3, false).unwrap();
        let p = tmp(case);
        layer_file::write_layer(&p, &l).unwrap();
        assert_same_weights(&l, &layer_file::read_layer(&p).unwrap(), case);
        assert_eq!(
            layer_file::read_layer_header(&p).unwrap(),
            *cfg,
            "{case}: header"
        );
    }
    let meta = layer_file::layer_metadata(&relu);
    assert!(
        !meta.contains_key(&key("w13_order")),
        "relu2 has no row order: {meta:?}"
    );
    assert!(
        !meta.contains_key(&key("n_group")) && !meta.contains_key(&key("routed_scaling_factor")),
        "{meta:?}"
    );
    assert_eq!(meta[&key("norm_topk_prob")], "false");
    let meta = layer_file::layer_metadata(&minimax);
    assert_eq!(meta[&key("routed_scaling_factor")], "2.5");
    assert!(
        !meta.contains_key(&key("swiglu_alpha")) && !meta.contains_key(&key("norm_topk_prob")),
        "{meta:?}"
    );
}

#[test]
fn the_same_layer_gives_the_same_bytes() {
    let l = layer(WeightFormat::Nvfp4);
    let (a, b) = (tmp("same-a"), tmp("same-b"));
    layer_file::write_layer(&a, &l).unwrap();
    layer_file::write_layer(&b, &l).unwrap();
    assert!(std::fs::read(a).unwrap() == std::fs::read(b).unwrap());
}

#[test]
fn absent_optional_keys_take_the_spec_defaults() {
    let mut cfg = small(WeightFormat::Bf16, ActivationFormat::Bf16);
    cfg.activation = Activation::OAI_DEFAULT;
    let (t, mut m) = parts(&random_layer(&cfg, 1, false).unwrap());
    for k in [
        "swiglu_alpha",
        "swiglu_beta",
        "swiglu_limit",
        "routed_scaling_factor",
        "norm_topk_prob",
        "n_group",
        "topk_group",
    ] {
        m.remove(&key(k));
    }
    let p = tmp("defaults");
    write_tensors(&p, &t, m).unwrap();
    let c = layer_file::read_layer(&p).unwrap().config().clone();
    assert_eq!(
        c.activation,
        Activation::SwigluOai {
            alpha: 1.702,
            beta: 1.0,
            limit: 7.0
        }
    );
    assert_eq!(
        (
            c.routing.routed_scaling_factor,
            c.routing.norm_topk_prob,
            c.routing.n_group
        ),
        (1.0, true, 1)
    );
}

#[test]
fn bf16_biases_are_read_as_f32() {
    let (mut t, m) = parts(&layer(WeightFormat::Bf16));
    let values: Vec<f32> = (0..4 * 64).map(|i| i as f32 * 0.25 - 8.0).collect();
    replace(
        &mut t,
        "w13_bias",
        HostTensor::encode_f32(DType::BF16, vec![4, 64], &values),
    );
    let p = tmp("bf16-bias");
    write_tensors(&p, &t, m).unwrap();
    assert_eq!(
        layer_file::read_layer(&p)
            .unwrap()
            .weights()
            .w13_bias
            .as_deref(),
        Some(&values[..])
    );
}

// ---------------------------------------------------------------------------------------------
// One test per rule of the layer file

#[test]
fn missing_tensor() {
    for name in ["w2_scale", "w13"] {
        let (mut t, m) = parts(&layer(WeightFormat::Fp8Block));
        remove(&mut t, name);
        check_err(name, &t, m, &[&format!("`{name}`"), "missing"]);
    }
    let (mut t, m) = parts(&layer(WeightFormat::Nvfp4));
    remove(&mut t, "w2_global_scale");
    check_err("global", &t, m, &["`w2_global_scale`", "missing"]);
}

#[test]
fn wrong_dtype() {
    let (mut t, m) = parts(&layer(WeightFormat::Fp8));
    let w13 = get(&t, "w13");
    replace(
        &mut t,
        "w13",
        HostTensor::from_u8(DType::U8, w13.shape.clone(), w13.bytes.to_vec()),
    );
    check_err("w13", &t, m, &["`w13`", "F8_E4M3", "U8"]);
    let (mut t, m) = parts(&layer(WeightFormat::Fp8));
    replace(
        &mut t,
        "w2_scale",
        HostTensor::encode_f32(DType::BF16, vec![4], &[1.0; 4]),
    );
    check_err("scale", &t, m, &["`w2_scale`", "F32", "BF16"]);
}

#[test]
fn wrong_shape() {
    let (mut t, m) = parts(&layer(WeightFormat::Mxfp8));
    replace(
        &mut t,
        "w13_scale",
        HostTensor::from_u8(DType::U8, vec![4, 64, 1], vec![127; 256]),
    );
    check_err("scale", &t, m, &["`w13_scale`", "[4, 64, 2]", "[4, 64, 1]"]);
    let (mut t, m) = parts(&layer(WeightFormat::Bf16));
    replace(
        &mut t,
        "w13",
        HostTensor::encode_f32(DType::BF16, vec![4 * 64, 64], &vec![0.5; 4 * 64 * 64]),
    );
    check_err("rank", &t, m, &["`w13`", "[E, rows, cols]"]);
    let (mut t, m) = parts(&layer(WeightFormat::Bf16));
    replace(
        &mut t,
        "w2_bias",
        HostTensor::from_f32(vec![4, 32], &[0.0; 128]),
    );
    check_err("bias", &t, m, &["`w2_bias`", "[4, 64]"]);
    let (mut t, m) = parts(&layer(WeightFormat::Bf16));
    t.push((
        "router_bias".into(),
        HostTensor::from_f32(vec![3], &[0.0; 3]),
    ));
    check_err("router_bias", &t, m, &["`router_bias`", "[4]"]);
}

#[test]
fn inconsistent_experts_hidden_intermediate() {
    let bf16 = |shape: Vec<usize>| {
        let n = shape.iter().product();
        HostTensor::encode_f32(DType::BF16, shape, &vec![0.5; n])
    };
    let (mut t, m) = parts(&layer(WeightFormat::Bf16));
    replace(&mut t, "w2", bf16(vec![3, 64, 32]));
    check_err("E", &t, m, &["`w2`", "[4, 64, I]"]);
    let (mut t, m) = parts(&layer(WeightFormat::Bf16));
    replace(&mut t, "w2", bf16(vec![4, 48, 32]));
    check_err("H", &t, m, &["`w2`", "[4, 64, I]", "[4, 48, 32]"]);
    let (mut t, m) = parts(&layer(WeightFormat::Bf16));
    replace(&mut t, "w2", bf16(vec![4, 64, 48]));
    check_err("I", &t, m, &["`w13`", "2I", "I = 48"]);
    // 4-bit: I is twice w2's stored last dim.
    let (mut t, m) = parts(&layer(WeightFormat::Mxfp4));
    replace(
        &mut t,
        "w2",
        HostTensor::from_u8(DType::U8, vec![4, 64, 32], vec![0; 4 * 64 * 32]),
    );
    check_err("I fp4", &t, m, &["`w13`", "I = 64"]);
}

#[test]
fn unknown_metadata_value() {
    for (k, v, legal) in [
        ("routing", "softmax_please", "renormalize"),
        ("weight_format", "int4", "mxfp4"),
        ("w13_order", "down_up", "gate_up"),
        ("norm_topk_prob", "yes", "true"),
    ] {
        let (t, mut m) = parts(&layer(WeightFormat::Bf16));
        m.insert(key(k), v.into());
        check_err(k, &t, m, &[&key(k), v, legal]);
    }
}

#[test]
fn unknown_metadata_key() {
    let (t, mut m) = parts(&layer(WeightFormat::Bf16));
    m.insert(key("topk"), "2".into());
    check_err("topk", &t, m.clone(), &["`moerunner.topk`", "top_k"]);
    // Keys of other tools (e.g. torch's `format`) are none of our business.
    m.remove(&key("topk"));
    m.insert("format".into(), "pt".into());
    let p = tmp("foreign-key");
    write_tensors(&p, &t, m).unwrap();
    layer_file::read_layer(&p).unwrap();
}

#[test]
fn missing_metadata_key() {
    for k in [
        "version",
        "weight_format",
        "activation_format",
        "activation",
        "w13_order",
        "routing",
        "top_k",
    ] {
        let (t, mut m) = parts(&layer(WeightFormat::Bf16));
        m.remove(&key(k));
        check_err(k, &t, m, &[&format!("`moerunner.{k}`"), "missing"]);
    }
}

#[test]
fn unparsable_number() {
    for (k, v) in [
        ("top_k", "two"),
        ("swiglu_alpha", "1.7.0"),
        ("routed_scaling_factor", "2,5"),
        ("n_group", "-1"),
    ] {
        let (t, mut m) = parts(&layer(WeightFormat::Bf16));
        m.insert(key(k), v.into());
        check_err(k, &t, m, &[&key(k), v, "not a valid number"]);
    }
    let (t, mut m) = parts(&layer(WeightFormat::Bf16));
    m.insert(key("swiglu_beta"), "NaN".into());
    check_err("nan", &t, m, &[&key("swiglu_beta"), "finite"]);
}

#[test]
fn unsupported_version_and_out_of_range_values() {
    let (t, mut m) = parts(&layer(WeightFormat::Bf16));
    m.insert(key("version"), "2".into());
    check_err("version", &t, m, &[&key("version"), "`2`"]);
    let (t, mut m) = parts(&layer(WeightFormat::Bf16));
    m.insert(key("top_k"), "5".into());
    check_err("top_k", &t, m, &["top_k", "1..=4"]);
    let (t, mut m) = parts(&layer(WeightFormat::Bf16));
    m.insert(key("swiglu_limit"), "-1".into());
    check_err("limit", &t, m, &[&key("swiglu_limit"), "positive"]);
}

#[test]
fn nan_or_nonpositive_f32_scale() {
    let (mut t, m) = parts(&layer(WeightFormat::Fp8Block));
    replace(
        &mut t,
        "w2_scale",
        HostTensor::from_f32(vec![4, 1, 1], &[1.0, f32::NAN, 1.0, 1.0]),
    );
    check_err("nan", &t, m, &["`w2_scale`", "NaN", "[1, 0, 0]"]);
    let (mut t, m) = parts(&layer(WeightFormat::Fp8));
    replace(
        &mut t,
        "w13_scale",
        HostTensor::from_f32(vec![4], &[1.0, 1.0, 0.0, 1.0]),
    );
    check_err("zero", &t, m, &["`w13_scale`", "[2]", "positive"]);
}

#[test]
fn ue8m0_255_is_rejected_with_its_index() {
    let (mut t, m) = parts(&layer(WeightFormat::Mxfp4));
    let mut bytes = vec![120u8; 4 * 64];
    bytes[64 + 5] = 255; // expert 1, row 5, block 0
    replace(
        &mut t,
        "w2_scale",
        HostTensor::from_u8(DType::U8, vec![4, 64, 1], bytes),
    );
    check_err("ue8m0", &t, m, &["`w2_scale`", "255", "[1, 5, 0]"]);
}

#[test]
fn nvfp4_scale_bytes_must_not_be_nan_or_negative() {
    for (bad, word) in [(0x7Fu8, "NaN"), (0xFFu8, "NaN"), (0xB8u8, "negative")] {
        let (mut t, m) = parts(&layer(WeightFormat::Nvfp4));
        let mut bytes = vec![0x38u8; 4 * 64 * 2];
        bytes[2 * 64 * 2 + 3] = bad; // expert 2, row 1, block 1
        replace(
            &mut t,
            "w2_scale",
            HostTensor::from_u8(DType::F8E4M3, vec![4, 64, 2], bytes),
        );
        check_err(word, &t, m, &["`w2_scale`", word, "[2, 1, 1]"]);
    }
}

#[test]
fn nvfp4_global_scales_must_be_positive() {
    for bad in [0.0, -1.0, f32::INFINITY] {
        let (mut t, m) = parts(&layer(WeightFormat::Nvfp4));
        replace(
            &mut t,
            "w13_global_scale",
            HostTensor::from_f32(vec![4], &[1.0, bad, 1.0, 1.0]),
        );
        check_err("global", &t, m, &["`w13_global_scale`", "[1]"]);
    }
}

#[test]
fn illegal_format_pairing_lists_the_legal_ones() {
    let (t, mut m) = parts(&layer(WeightFormat::Mxfp4));
    m.insert(key("activation_format"), "fp8_block".into());
    check_err(
        "pairing",
        &t,
        m,
        &["activation_format", "mxfp4", "bf16, mxfp8"],
    );
}

#[test]
fn static_activation_formats_need_their_input_scales() {
    for name in ["w13_input_scale", "w2_input_scale"] {
        let (mut t, m) = parts(&layer(WeightFormat::Fp8));
        remove(&mut t, name);
        check_err(name, &t, m, &[&format!("`{name}`"), "missing", "fp8"]);
    }
    let (mut t, m) = parts(&layer(WeightFormat::Nvfp4));
    remove(&mut t, "w13_input_scale");
    check_err("nvfp4", &t, m, &["`w13_input_scale`", "nvfp4"]);
    let (mut t, m) = parts(&layer(WeightFormat::Fp8));
    replace(
        &mut t,
        "w13_input_scale",
        HostTensor::from_f32(vec![], &[-1.0]),
    );
    check_err("negative", &t, m, &["`w13_input_scale`", "positive"]);
    let (mut t, m) = parts(&layer(WeightFormat::Fp8));
    replace(
        &mut t,
        "w2_input_scale",
        HostTensor::from_f32(vec![1], &[0.1]),
    );
    check_err("shape", &t, m, &["`w2_input_scale`", "[]"]);
    // Per-token nvfp4 computes its own scales: absent is fine.
    let l = random_layer(
        &small(WeightFormat::Nvfp4, ActivationFormat::Nvfp4PerToken),
        2,
        false,
    )
    .unwrap();
    let (mut t, m) = parts(&l);
    remove(&mut t, "w13_input_scale");
    remove(&mut t, "w2_input_scale");
    let p = tmp("per-token");
    write_tensors(&p, &t, m).unwrap();
    layer_file::read_layer(&p).unwrap();
}

#[test]
fn scales_that_do_not_belong_to_the_format() {
    let (mut t, m) = parts(&layer(WeightFormat::Bf16));
    t.push(("w13_scale".into(), HostTensor::from_f32(vec![4], &[1.0; 4])));
    check_err("bf16 scale", &t, m, &["`w13_scale`", "bf16"]);
    let (mut t, m) = parts(&layer(WeightFormat::Fp8));
    t.push((
        "w2_global_scale".into(),
        HostTensor::from_f32(vec![4], &[1.0; 4]),
    ));
    check_err("global", &t, m, &["`w2_global_scale`", "nvfp4"]);
}

#[test]
fn non_finite_biases() {
    let (mut t, m) = parts(&layer(WeightFormat::Bf16));
    let mut v = vec![0.0f32; 4 * 64];
    v[70] = f32::NAN;
    replace(&mut t, "w2_bias", HostTensor::from_f32(vec![4, 64], &v));
    check_err("w2_bias", &t, m, &["`w2_bias`", "70", "NaN"]);
    let (mut t, m) = parts(&layer(WeightFormat::Bf16));
    t.push((
        "router_bias".into(),
        HostTensor::from_f32(vec![4], &[0.0, f32::INFINITY, 0.0, 0.0]),
    ));
    check_err("router_bias", &t, m, &["`router_bias`", "inf"]);
}

#[test]
fn unknown_tensor() {
    let (mut t, m) = parts(&layer(WeightFormat::Bf16));
    t.push((
        "w13_scales".into(),
        HostTensor::from_f32(vec![4], &[1.0; 4]),
    ));
    check_err(
        "unknown",
        &t,
        m,
        &["`w13_scales`", "not part of a layer file"],
    );
}

#[test]
fn truncated_and_garbage_files_are_format_errors() {
    let p = tmp("whole");
    layer_file::write_layer(&p, &layer(WeightFormat::Bf16)).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let cases = [
        ("truncated", bytes[..bytes.len() - 100].to_vec()),
        ("header-only", bytes[..64].to_vec()),
        ("garbage", b"definitely not safetensors".to_vec()),
        (
            "huge-header",
            [u64::MAX.to_le_bytes().to_vec(), vec![b'{'; 32]].concat(),
        ),
        ("empty", vec![]),
    ];
    for (case, content) in cases {
        let q = tmp(case);
        std::fs::write(&q, content).unwrap();
        for err in [
            layer_file::read_layer(&q).err(),
            layer_file::read_input(&q).err(),
            layer_file::read_layer_header(&q).err(),
        ] {
            let err = err.unwrap().to_string();
            assert!(
                err.contains(&q.display().to_string()) && err.contains("not a valid safetensors"),
                "{case}: {err}"
            );
        }
    }
    let err = layer_file::read_layer(Path::new("/nonexistent/layer.safetensors"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/nonexistent/layer.safetensors"), "{err}");
}

#[test]
fn writes_are_atomic_and_sharded_layers_are_refused() {
    let mut cfg = small(WeightFormat::Bf16, ActivationFormat::Bf16);
    cfg.local_experts = 0..2;
    let p = tmp("shard");
    let err = layer_file::write_layer(&p, &random_layer(&cfg, 1, false).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("sharded"), "{err}");
    assert!(!p.exists(), "nothing half-written");
    // Overwriting replaces the file whole; a failed write leaves the old file and no temp file.
    let a = layer(WeightFormat::Bf16);
    layer_file::write_layer(&p, &a).unwrap();
    let before = std::fs::read(&p).unwrap();
    let bad = HostTensor::from_u8(DType::U8, vec![4, 4], vec![0; 15]);
    assert!(write_tensors(&p, &[("x".into(), bad)], HashMap::new()).is_err());
    assert_eq!(std::fs::read(&p).unwrap(), before);
    let missing_dir = p
        .parent()
        .unwrap()
        .join("no-such-dir")
        .join("x.safetensors");
    let err = layer_file::write_layer(&missing_dir, &a)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no-such-dir"), "{err}");
    // A write that fails after its temp file is written (the rename over a folder) removes the
    // temp file: the folder, of its own, holds only what it held.
    let own = p
        .parent()
        .unwrap()
        .join(format!("failed-rename-{}", std::process::id()));
    std::fs::create_dir_all(own.join("d")).unwrap();
    assert!(layer_file::write_layer(&own.join("d"), &a).is_err());
    let leftovers: Vec<_> = std::fs::read_dir(&own)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(leftovers, ["d"], "temp files left");
    std::fs::remove_dir_all(&own).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Input and output files

fn input_tensors(cfg: &LayerConfig, tokens: usize, mode: RoutingMode) -> Tensors {
    let s = random_input(cfg, tokens, mode, DType::BF16, 2).unwrap();
    let mut t = vec![("hidden_states".to_string(), s.hidden.clone())];
    for (n, v) in [
        ("router_logits", &s.router_logits),
        ("topk_ids", &s.topk_ids),
        ("topk_weights", &s.topk_weights),
        ("topk_packed", &s.topk_packed),
    ] {
        if let Some(v) = v {
            t.push((n.to_string(), v.clone()));
        }
    }
    t
}

fn input_err(tensors: &[(String, HostTensor)]) -> String {
    let p = tmp("bad-input");
    write_tensors(&p, tensors, HashMap::new()).unwrap();
    layer_file::read_input(&p)
        .expect_err("a broken input was accepted")
        .to_string()
}

#[test]
fn input_files_round_trip_for_every_routing_source_and_t_0() {
    let cfg = small(WeightFormat::Bf16, ActivationFormat::Bf16);
    for mode in [RoutingMode::Logits, RoutingMode::TopK, RoutingMode::Packed] {
        for tokens in [0, 1, 5] {
            let s = random_input(&cfg, tokens, mode, DType::F16, 4).unwrap();
            let input = InputFile::try_from(s).unwrap();
            let p = tmp("input");
            layer_file::write_input(&p, &input).unwrap();
            let back = layer_file::read_input(&p).unwrap();
            assert_eq!(back.tokens(), tokens);
            back.validate_against(&cfg).unwrap();
            assert_eq!(&back.hidden.bytes[..], &input.hidden.bytes[..]);
            let same = match (&back.routing, &input.routing) {
                (RoutingTensors::Logits(a), RoutingTensors::Logits(b))
                | (RoutingTensors::Packed(a), RoutingTensors::Packed(b)) => {
                    a.bytes[..] == b.bytes[..]
                }
                (
                    RoutingTensors::TopK { ids: a, weights: w },
                    RoutingTensors::TopK { ids: b, weights: v },
                ) => a.bytes[..] == b.bytes[..] && w.bytes[..] == v.bytes[..],
                _ => false,
            };
            assert!(same, "{mode:?} T={tokens}: routing differs");
        }
    }
}

#[test]
fn input_with_zero_or_two_routing_sources() {
    let cfg = small(WeightFormat::Bf16, ActivationFormat::Bf16);
    let t = input_tensors(&cfg, 3, RoutingMode::Logits);
    let err = input_err(&t[..1]);
    assert!(
        err.contains("exactly one routing source") && err.contains("found: none"),
        "{err}"
    );
    let mut two = t.clone();
    two.push((
        "topk_packed".into(),
        HostTensor::from_i32(vec![3, 2], &[0; 6]),
    ));
    let err = input_err(&two);
    assert!(
        err.contains("exactly one routing source") && err.contains("router_logits, topk_packed"),
        "{err}"
    );
    let mut half = input_tensors(&cfg, 3, RoutingMode::TopK);
    remove(&mut half, "topk_weights");
    let err = input_err(&half);
    assert!(
        err.contains("`topk_weights`") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn input_tensors_with_wrong_dtype_shape_or_name() {
    let cfg = small(WeightFormat::Bf16, ActivationFormat::Bf16);
    let mut t = input_tensors(&cfg, 3, RoutingMode::Logits);
    replace(
        &mut t,
        "hidden_states",
        HostTensor::from_i32(vec![3, 64], &[0; 192]),
    );
    assert!(input_err(&t).contains("`hidden_states`: expected dtype"));
    let mut t = input_tensors(&cfg, 3, RoutingMode::Logits);
    remove(&mut t, "hidden_states");
    let err = input_err(&t);
    assert!(
        err.contains("`hidden_states`") && err.contains("missing"),
        "{err}"
    );
    let mut t = input_tensors(&cfg, 3, RoutingMode::Logits);
    replace(
        &mut t,
        "router_logits",
        HostTensor::from_f32(vec![2, 4], &[0.0; 8]),
    );
    let err = input_err(&t);
    assert!(
        err.contains("`router_logits`") && err.contains("T = 3"),
        "{err}"
    );
    let mut t = input_tensors(&cfg, 3, RoutingMode::TopK);
    replace(
        &mut t,
        "topk_weights",
        HostTensor::from_f32(vec![3, 1], &[0.5; 3]),
    );
    assert!(input_err(&t).contains("`topk_weights`"));
    let mut t = input_tensors(&cfg, 3, RoutingMode::Packed);
    replace(
        &mut t,
        "topk_packed",
        HostTensor::from_f32(vec![3, 2], &[0.5; 6]),
    );
    assert!(input_err(&t).contains("`topk_packed`: expected dtype I32"));
    let mut t = input_tensors(&cfg, 3, RoutingMode::Packed);
    t.push(("hidden".into(), HostTensor::from_f32(vec![1], &[0.0])));
    let err = input_err(&t);
    assert!(
        err.contains("`hidden`") && err.contains("not part of an input file"),
        "{err}"
    );
}

#[test]
fn input_with_wrong_h_e_or_k_for_the_layer() {
    let cfg = small(WeightFormat::Bf16, ActivationFormat::Bf16);
    let mut wide = cfg.clone();
    wide.hidden = 128;
    wide.num_experts = 8;
    wide.local_experts = 0..8;
    wide.routing.top_k = 3;
    for (mode, name) in [
        (RoutingMode::Logits, "router_logits"),
        (RoutingMode::TopK, "topk_ids"),
        (RoutingMode::Packed, "topk_packed"),
    ] {
        let input =
            InputFile::try_from(random_input(&cfg, 2, mode, DType::F32, 1).unwrap()).unwrap();
        let mut h_only = wide.clone();
        h_only.num_experts = 4;
        h_only.local_experts = 0..4;
        h_only.routing.top_k = 2;
        let err = input.validate_against(&h_only).unwrap_err().to_string();
        assert!(
            err.contains("`hidden_states`") && err.contains("[2, 128]"),
            "{err}"
        );
        let mut routing_only = wide.clone();
        routing_only.hidden = 64;
        let err = input
            .validate_against(&routing_only)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("`{name}`")), "{mode:?}: {err}");
    }
    // The same check when the layer runs (the reference backend needs no other engineer's code path).
    let l = random_layer(&wide, 1, false).unwrap();
    let input =
        InputFile::try_from(random_input(&cfg, 2, RoutingMode::Logits, DType::F32, 1).unwrap())
            .unwrap();
    let err = moerunner::runner::run_once(
        l,
        &moerunner::BackendChoice::Named("reference".into()),
        &moerunner::ForwardInput {
            hidden: &input.hidden,
            routing: input.routing_input(),
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("hidden_states"), "{err}");
}

#[test]
fn output_files_with_and_without_routes() {
    let out = HostTensor::encode_f32(DType::BF16, vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let routes = moerunner::Routes {
        tokens: 2,
        top_k: 2,
        ids: vec![0, 3, 1, 2],
        weights: vec![0.5, 0.25, 0.75, 0.125],
        weight_on_input: false,
    };
    let p = tmp("output");
    layer_file::write_output(&p, &out, Some(&routes)).unwrap();
    let (back, saved) = layer_file::read_output(&p).unwrap();
    assert_eq!(
        (back.dtype, &back.shape, &back.bytes[..]),
        (DType::BF16, &vec![2, 3], &out.bytes[..])
    );
    let (ids, w) = saved.unwrap();
    assert_eq!(
        (ids.dtype, &ids.shape, ids.to_i32_vec("ids").unwrap()),
        (DType::I32, &vec![2, 2], routes.ids.clone())
    );
    assert_eq!(
        (w.dtype, &w.shape, w.to_f32_vec("w").unwrap()),
        (DType::F32, &vec![2, 2], routes.weights.clone())
    );
    let empty = HostTensor::from_f32(vec![0, 3], &[]);
    layer_file::write_output(&p, &empty, None).unwrap();
    let (back, saved) = layer_file::read_output(&p).unwrap();
    assert_eq!(back.shape, vec![0, 3]);
    assert!(saved.is_none());
}

// ---------------------------------------------------------------------------------------------
// Rules only a caller building `LayerWeights` in memory can break (a file cannot express them)

#[test]
fn in_memory_weights_with_wrong_bytes_scale_kind_or_format() {
    let (cfg, w) = layer(WeightFormat::Mxfp8).into_parts();
    let mut short = w.clone();
    short.w2.data = Bytes::Owned(short.w2.data[1..].to_vec());
    let err = MoeLayer::new(cfg.clone(), short).unwrap_err().to_string();
    assert!(err.contains("`w2`") && err.contains("bytes"), "{err}");
    let mut kind = w.clone();
    kind.w13.scales = moerunner::BlockScales::PerExpert(vec![1.0; 4]);
    let err = MoeLayer::new(cfg.clone(), kind).unwrap_err().to_string();
    assert!(
        err.contains("`w13_scale`") && err.contains("UE8M0"),
        "{err}"
    );
    let mut other = cfg.clone();
    other.weight_format = WeightFormat::Mxfp4;
    other.activation_format = ActivationFormat::Bf16;
    let err = MoeLayer::new(other, w.clone()).unwrap_err().to_string();
    assert!(err.contains("`w13`") && err.contains("mxfp4"), "{err}");
    let mut bias = w;
    bias.router_bias = Some(vec![0.0; 3]);
    let err = MoeLayer::new(cfg, bias).unwrap_err().to_string();
    assert!(
        err.contains("`router_bias`") && err.contains("[4]"),
        "{err}"
    );
}

#[test]
fn unrepresentable_dtypes_fail_strict_opens_and_only_their_own_reads_when_lenient() {
    use safetensors::tensor::{Dtype, TensorView};
    let p = tmp("i64.safetensors");
    let (f, i) = (vec![0u8; 16], vec![0u8; 16]);
    let views = vec![
        (
            "weights".to_string(),
            TensorView::new(Dtype::F32, vec![4], &f).unwrap(),
        ),
        (
            "steps".to_string(),
            TensorView::new(Dtype::I64, vec![2], &i).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &p).unwrap();
    let err = MappedFile::open(&p).err().unwrap().to_string();
    assert!(err.contains("steps") && err.contains("I64"), "{err}");
    let lenient = MappedFile::open_lenient(&p).unwrap();
    assert_eq!(lenient.require("weights").unwrap().shape, vec![4]);
    assert!(lenient.has("steps"));
    let err = lenient.require("steps").err().unwrap().to_string();
    assert!(err.contains("steps") && err.contains("I64"), "{err}");
}

/// The router a layer file may carry (`router_weight`, `router_linear_bias`): written and read back
/// as it was; a wrong shape, a non-finite value or a bias without a weight is refused naming the
/// tensor; a file without one reads as None.
#[test]
fn a_layer_file_carries_its_router() {
    let l = layer(WeightFormat::Bf16);
    let w: Vec<f32> = (0..4 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
    let router = layer_file::Router {
        weight: HostTensor::encode_f32(DType::BF16, vec![4, 64], &w),
        linear_bias: Some(vec![0.5, -0.25, 0.0, 1.0]),
    };
    let p = tmp("router");
    layer_file::write_layer_with_router(&p, &l, Some(&router)).unwrap();
    let back = layer_file::read_layer_router(&p)
        .unwrap()
        .expect("a router");
    assert_eq!(
        back.weight.to_f32_vec("w").unwrap(),
        router.weight.to_f32_vec("w").unwrap()
    );
    assert_eq!(back.linear_bias, router.linear_bias);
    layer_file::read_layer(&p).expect("the layer reads as before");
    let plain = tmp("no-router");
    layer_file::write_layer(&plain, &l).unwrap();
    assert!(layer_file::read_layer_router(&plain).unwrap().is_none());

    let (tensors, meta) = parts(&l);
    let router_err = |extra: Vec<(String, HostTensor)>| {
        let p = tmp("bad-router");
        let mut all = tensors.clone();
        all.extend(extra);
        write_tensors(&p, &all, meta.clone()).unwrap();
        layer_file::read_layer_router(&p).unwrap_err().to_string()
    };
    let e = router_err(vec![(
        "router_weight".into(),
        HostTensor::from_f32(vec![4, 63], &vec![0.0; 252]),
    )]);
    assert!(e.contains("router_weight"), "{e}");
    let mut nan = vec![0.0; 256];
    nan[70] = f32::NAN;
    let e = router_err(vec![(
        "router_weight".into(),
        HostTensor::from_f32(vec![4, 64], &nan),
    )]);
    assert!(e.contains("router_weight") && e.contains("[1, 6]"), "{e}");
    let e = router_err(vec![(
        "router_linear_bias".into(),
        HostTensor::from_f32(vec![4], &[0.0; 4]),
    )]);
    assert!(e.contains("router_linear_bias"), "{e}");
}
