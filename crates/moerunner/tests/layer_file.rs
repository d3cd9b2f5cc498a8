//! The layer/input/output file contract (`spec/layer-file.md`): round trips for every format and
//! one test per rule a file can break, each asserting the error names the tensor or key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use moerunner::layer_file::{self, layer_metadata, write_tensors, MappedFile};
use moerunner::presets::preset;
use moerunner::synth::{random_input, random_layer, RoutingMode};
use moerunner::{Activation, ActivationFormat, DType, HostTensor, LayerConfig, MoeLayer, Parallelism, RoutingConfig, RoutingMethod, W13Order, WeightFormat};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moerunner-lf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

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

/// The tensors and metadata a valid file of `layer` holds, to be broken by a test.
fn parts(layer: &MoeLayer) -> (Vec<(String, HostTensor)>, HashMap<String, String>) {
    let p = tmp(&format!("parts-{}.safetensors", layer.config().weight_format));
    layer_file::write_layer(&p, layer).unwrap();
    let f = MappedFile::open(&p).unwrap();
    let mut names: Vec<String> = f.names().map(String::from).collect();
    names.sort();
    let tensors = names.iter().map(|n| (n.clone(), f.get(n).unwrap())).collect();
    (tensors, f.metadata().clone())
}

/// Writes a broken variant and asserts reading it fails with a message containing every `needle`.
fn check_err(name: &str, tensors: &[(String, HostTensor)], meta: HashMap<String, String>, needles: &[&str]) {
    let p = tmp(&format!("{name}.safetensors"));
    write_tensors(&p, tensors, meta).unwrap();
    let err = layer_file::read_layer(&p).err().unwrap_or_else(|| panic!("{name}: file was accepted")).to_string();
    for n in needles {
        assert!(err.contains(n), "{name}: error `{err}` does not mention `{n}`");
    }
}

fn replace(tensors: &mut [(String, HostTensor)], name: &str, t: HostTensor) {
    tensors.iter_mut().find(|(n, _)| n == name).unwrap().1 = t;
}

fn remove(tensors: &mut Vec<(String, HostTensor)>, name: &str) {
    tensors.retain(|(n, _)| n != name);
}

#[test]
fn every_format_round_trips_bit_for_bit() {
    for wf in WeightFormat::ALL.iter().copied() {
        for &af in wf.legal_activation_formats() {
            let mut cfg = small(wf, af);
            cfg.activation = Activation::SwigluOai { alpha: 1.5, beta: 0.5, limit: 6.0 };
            cfg.w13_order = W13Order::Interleaved;
            cfg.routing = RoutingConfig { n_group: 2, topk_group: 1, routed_scaling_factor: 2.5, ..RoutingConfig::new(RoutingMethod::DeepseekV3, 2) };
            let l = random_layer(&cfg, 5, true).unwrap();
            let p = tmp(&format!("rt-{wf}-{af}.safetensors"));
            layer_file::write_layer(&p, &l).unwrap();
            let back = layer_file::read_layer(&p).unwrap();
            assert_eq!(back.config(), l.config(), "{wf}x{af} config");
            let (a, b) = (l.weights(), back.weights());
            for (x, y) in [(&a.w13, &b.w13), (&a.w2, &b.w2)] {
                assert_eq!(&x.data[..], &y.data[..], "{wf} data");
                assert_eq!(x.scales, y.scales, "{wf} scales");
                assert_eq!(x.global_scales, y.global_scales, "{wf} globals");
            }
            assert_eq!(a.w13_bias, b.w13_bias);
            assert_eq!(a.w2_bias, b.w2_bias);
            assert_eq!(a.router_bias, b.router_bias);
            assert_eq!(a.w13_input_scale, b.w13_input_scale);
            assert_eq!(a.w2_input_scale, b.w2_input_scale);
        }
    }
}

#[test]
fn missing_tensor() {
    let (mut t, m) = parts(&layer(WeightFormat::Fp8Block));
    remove(&mut t, "w2_scale");
    check_err("missing", &t, m, &["w2_scale", "missing"]);
}

#[test]
fn wrong_dtype() {
    let (mut t, m) = parts(&layer(WeightFormat::Fp8));
    let w13 = t.iter().find(|(n, _)| n == "w13").unwrap().1.clone();
    replace(&mut t, "w13", HostTensor::from_u8(DType::U8, w13.shape.clone(), w13.bytes.to_vec()));
    check_err("dtype", &t, m, &["w13", "F8_E4M3", "U8"]);
}

#[test]
fn wrong_scale_shape() {
    let (mut t, m) = parts(&layer(WeightFormat::Mxfp8));
    replace(&mut t, "w13_scale", HostTensor::from_u8(DType::U8, vec![4, 64, 1], vec![127; 256]));
    check_err("scale-shape", &t, m, &["w13_scale", "[4, 64, 2]"]);
}

#[test]
fn inconsistent_experts_hidden_intermediate() {
    let (mut t, m) = parts(&layer(WeightFormat::Bf16));
    replace(&mut t, "w2", HostTensor::encode_f32(DType::BF16, vec![3, 64, 32], &vec![0.5; 3 * 64 * 32]));
    check_err("experts", &t, m.clone(), &["w2", "[4, 64"]);
    let (mut t, m2) = parts(&layer(WeightFormat::Bf16));
    replace(&mut t, "w2", HostTensor::encode_f32(DType::BF16, vec![4, 64, 48], &vec![0.5; 4 * 64 * 48]));
    check_err("intermediate", &t, m2, &["w13", "2I"]);
}

#[test]
fn unknown_metadata_value() {
    let (t, mut m) = parts(&layer(WeightFormat::Bf16));
    m.insert("moerunner.routing".into(), "softmax_please".into());
    check_err("routing-value", &t, m, &["moerunner.routing", "softmax_please", "renormalize"]);
}

#[test]
fn missing_metadata_key() {
    let (t, mut m) = parts(&layer(WeightFormat::Bf16));
    m.remove("moerunner.w13_order");
    check_err("no-order", &t, m, &["moerunner.w13_order"]);
    let (t, mut m) = parts(&layer(WeightFormat::Bf16));
    m.remove("moerunner.version");
    check_err("no-version", &t, m, &["moerunner.version"]);
}

#[test]
fn unparsable_number_and_bad_version() {
    let (t, mut m) = parts(&layer(WeightFormat::Bf16));
    m.insert("moerunner.top_k".into(), "two".into());
    check_err("top-k", &t, m, &["moerunner.top_k", "two"]);
    let (t, mut m) = parts(&layer(WeightFormat::Bf16));
    m.insert("moerunner.version".into(), "2".into());
    check_err("version", &t, m, &["moerunner.version", "2"]);
    let (t, mut m) = parts(&layer(WeightFormat::Bf16));
    m.insert("moerunner.top_k".into(), "5".into());
    check_err("top-k-range", &t, m, &["top_k", "1..=4"]);
}

#[test]
fn nan_f32_scale() {
    let (mut t, m) = parts(&layer(WeightFormat::Fp8Block));
    replace(&mut t, "w2_scale", HostTensor::from_f32(vec![4, 1, 1], &[1.0, f32::NAN, 1.0, 1.0]));
    check_err("nan-scale", &t, m, &["w2_scale", "NaN"]);
}

#[test]
fn ue8m0_255_is_rejected_with_its_index() {
    let (mut t, m) = parts(&layer(WeightFormat::Mxfp4));
    let mut bytes = vec![120u8; 4 * 64 * 1];
    bytes[64 + 5] = 255; // expert 1, row 5
    replace(&mut t, "w2_scale", HostTensor::from_u8(DType::U8, vec![4, 64, 1], bytes));
    check_err("ue8m0", &t, m, &["w2_scale", "255", "[1, 5, 0]"]);
}

#[test]
fn nvfp4_scale_bytes_must_be_positive_numbers() {
    for (bad, word) in [(0x7Fu8, "NaN"), (0xB8u8, "negative")] {
        let (mut t, m) = parts(&layer(WeightFormat::Nvfp4));
        let mut bytes = vec![0x38u8; 4 * 64 * 2];
        bytes[3] = bad;
        replace(&mut t, "w2_scale", HostTensor::from_u8(DType::F8E4M3, vec![4, 64, 2], bytes));
        check_err(&format!("nvfp4-{word}"), &t, m, &["w2_scale", word]);
    }
    let (mut t, m) = parts(&layer(WeightFormat::Nvfp4));
    replace(&mut t, "w13_global_scale", HostTensor::from_f32(vec![4], &[1.0, 0.0, 1.0, 1.0]));
    check_err("nvfp4-global", &t, m, &["w13_global_scale"]);
}

#[test]
fn illegal_format_pairing_lists_the_legal_ones() {
    let (t, mut m) = parts(&layer(WeightFormat::Mxfp4));
    m.insert("moerunner.activation_format".into(), "fp8_block".into());
    check_err("pairing", &t, m, &["activation_format", "bf16, mxfp8"]);
}

#[test]
fn fp8_needs_its_input_scales() {
    let (mut t, m) = parts(&layer(WeightFormat::Fp8));
    remove(&mut t, "w2_input_scale");
    check_err("input-scale", &t, m, &["w2_input_scale"]);
    let (mut t, m) = parts(&layer(WeightFormat::Fp8));
    replace(&mut t, "w13_input_scale", HostTensor::from_f32(vec![], &[-1.0]));
    check_err("input-scale-neg", &t, m, &["w13_input_scale", "positive"]);
}

#[test]
fn bias_shape_and_unknown_tensor() {
    let (mut t, m) = parts(&layer(WeightFormat::Bf16));
    replace(&mut t, "w13_bias", HostTensor::from_f32(vec![4, 32], &vec![0.0; 128]));
    check_err("bias", &t, m, &["w13_bias", "[4, 64]"]);
    let (mut t, m) = parts(&layer(WeightFormat::Bf16));
    t.push(("w13_scales".into(), HostTensor::from_f32(vec![4], &[1.0; 4])));
    check_err("unknown", &t, m, &["w13_scales", "not part of a layer file"]);
}

#[test]
fn truncated_and_garbage_files_are_format_errors() {
    let l = layer(WeightFormat::Bf16);
    let p = tmp("whole.safetensors");
    layer_file::write_layer(&p, &l).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    for (name, content) in [("truncated", bytes[..bytes.len() - 100].to_vec()), ("garbage", b"definitely not safetensors".to_vec()), ("empty", vec![])] {
        let q = tmp(&format!("{name}.safetensors"));
        std::fs::write(&q, content).unwrap();
        let err = layer_file::read_layer(&q).err().unwrap().to_string();
        assert!(err.contains(&q.display().to_string()) && err.contains("not a valid safetensors"), "{name}: {err}");
    }
    let err = layer_file::read_layer(Path::new("/nonexistent/layer.safetensors")).err().unwrap().to_string();
    assert!(err.contains("/nonexistent/layer.safetensors"), "{err}");
}

#[test]
fn sharded_layers_are_not_written_and_writes_are_atomic() {
    let mut cfg = small(WeightFormat::Bf16, ActivationFormat::Bf16);
    cfg.local_experts = 0..2;
    let l = random_layer(&cfg, 1, false).unwrap();
    let p = tmp("shard.safetensors");
    assert!(layer_file::write_layer(&p, &l).is_err());
    assert!(!p.exists(), "nothing half-written");
    let dir = p.parent().unwrap();
    assert!(std::fs::read_dir(dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp-")), "no temp files left");
}

#[test]
fn input_files_need_exactly_one_routing_source() {
    let cfg = preset("qwen3-30b-a3b").unwrap().config(WeightFormat::Bf16, None);
    for mode in [RoutingMode::Logits, RoutingMode::TopK, RoutingMode::Packed] {
        let s = random_input(&cfg, 3, mode, DType::BF16, 2).unwrap();
        let mut t = vec![("hidden_states".to_string(), s.hidden.clone())];
        for (n, v) in [("router_logits", &s.router_logits), ("topk_ids", &s.topk_ids), ("topk_weights", &s.topk_weights), ("topk_packed", &s.topk_packed)] {
            if let Some(v) = v {
                t.push((n.to_string(), v.clone()));
            }
        }
        let p = tmp(&format!("in-{mode:?}.safetensors"));
        write_tensors(&p, &t, HashMap::new()).unwrap();
        let back = layer_file::read_input(&p).unwrap();
        assert_eq!(back.tokens(), 3);
        assert_eq!(&back.hidden.bytes[..], &s.hidden.bytes[..]);
        // Add a second source: refused.
        let extra = if mode == RoutingMode::Packed { ("router_logits", s.hidden.clone()) } else { ("topk_packed", HostTensor::from_i32(vec![3, 8], &[0; 24])) };
        t.push((extra.0.to_string(), extra.1));
        write_tensors(&p, &t, HashMap::new()).unwrap();
        let err = layer_file::read_input(&p).err().unwrap().to_string();
        assert!(err.contains("exactly one routing source"), "{err}");
    }
    let s = random_input(&cfg, 2, RoutingMode::Logits, DType::F32, 2).unwrap();
    let p = tmp("no-routing.safetensors");
    write_tensors(&p, &[("hidden_states".to_string(), s.hidden.clone())], HashMap::new()).unwrap();
    assert!(layer_file::read_input(&p).err().unwrap().to_string().contains("found: none"));
    write_tensors(&p, &[("router_logits".to_string(), s.router_logits.clone().unwrap())], HashMap::new()).unwrap();
    assert!(layer_file::read_input(&p).err().unwrap().to_string().contains("hidden_states"));
    let bad = HostTensor::from_i32(vec![2, 2048], &vec![0; 4096]);
    write_tensors(&p, &[("hidden_states".to_string(), bad), ("router_logits".to_string(), s.router_logits.unwrap())], HashMap::new()).unwrap();
    assert!(layer_file::read_input(&p).err().unwrap().to_string().contains("hidden_states"));
}
