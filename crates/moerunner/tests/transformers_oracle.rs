//! transformers as an external oracle. `scripts/hf_fixtures.py` built tiny checkpoints for every
//! family with transformers' own config classes and `save_pretrained` (H = 128, E = 4, bf16,
//! sharded with an index) and ran transformers' own router and experts on fixed hidden states;
//! the folders and golden outputs are committed under `tests/fixtures/transformers/`. Here our
//! loader reads each folder as transformers wrote it, routes the same hidden states with the
//! checkpoint's router, and must choose transformers' experts and agree with its output within
//! bf16 rounding (transformers computes in bf16; our reference in f64 on bf16 weights).

use std::path::{Path, PathBuf};

use moerunner::checkpoint::{load_layer, LoadOptions};
use moerunner::layer_file::MappedFile;
use moerunner::routing::route_logits;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/transformers")
}

/// Relative error ‖a − b‖ / ‖b‖ and max |a − b| of our reference output against the fixture's
/// golden `output`, after checking that we chose transformers' experts for every token.
fn check(name: &str) -> (f64, f64) {
    check_against(name, "output")
}

fn check_against(name: &str, golden_tensor: &str) -> (f64, f64) {
    let dir = fixtures().join(name);
    let layer: usize = std::fs::read_to_string(dir.join("layer.txt"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let l =
        load_layer(&dir, layer, &LoadOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let golden = MappedFile::open(&dir.join("golden.safetensors")).unwrap();
    let hidden = golden.require("hidden_states").unwrap();
    let want = golden
        .require(golden_tensor)
        .unwrap()
        .to_f32_vec(golden_tensor)
        .unwrap();
    let ids = golden.require("topk_ids").unwrap();
    let want_ids: Vec<i32> = ids
        .bytes
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let cfg = l.layer.config();
    let (t, k) = (hidden.shape[0], cfg.routing.top_k);
    assert_eq!(ids.shape, vec![t, k], "{name}");
    let logits = l.router_logits(&hidden).unwrap().to_f32_vec("l").unwrap();
    let bias = l.layer.weights().router_bias.as_deref();
    let routes = route_logits(&cfg.routing, &logits, t, cfg.num_experts, bias).unwrap();
    for tok in 0..t {
        let mut ours: Vec<i32> = routes.ids[tok * k..(tok + 1) * k].to_vec();
        let mut theirs = want_ids[tok * k..(tok + 1) * k].to_vec();
        ours.sort();
        theirs.sort();
        assert_eq!(ours, theirs, "{name}: token {tok}'s experts");
    }
    let x = hidden.to_f32_vec("hidden_states").unwrap();
    let y = moerunner::reference::forward(&l.layer, &x, &routes).unwrap();
    let (mut num, mut den, mut max) = (0f64, 0f64, 0f64);
    for (a, b) in y.iter().zip(&want) {
        let d = a - *b as f64;
        num += d * d;
        den += (*b as f64) * (*b as f64);
        max = max.max(d.abs());
    }
    let rel = (num / den).sqrt();
    eprintln!("{name} vs `{golden_tensor}`: rel {rel:.2e}, max abs {max:.2e}");
    (rel, max)
}

macro_rules! oracle {
    ($($test:ident: $name:literal,)*) => {$(
        #[test]
        fn $test() {
            let (rel, _) = check($name);
            // bf16 rounding of transformers' intermediate and output: ~2–4e-3.
            assert!(rel < 1e-2, "{}: relative error {rel:.2e} against transformers", $name);
        }
    )*};
}

oracle! {
    qwen3_moe: "qwen3_moe",
    qwen3_moe_fused_layout: "qwen3_moe-fused",
    qwen2_moe: "qwen2_moe",
    mixtral: "mixtral",
    deepseek_v3: "deepseek_v3",
    minimax_m2: "minimax_m2",
    gpt_oss_bf16: "gpt_oss",
    nemotron_h: "nemotron_h",
}

/// The FP8 128×128 release derived from a transformers-built bf16 model (E4M3 weights with
/// `weight_scale_inv`): against the same layer with our activation quantization emulated in torch
/// (1×128 dynamic, the IEEE division rule; f32 matmuls) it agrees to accumulation order, and
/// against transformers' own block on the dequantized weights — which does not quantize
/// activations — by the activation quantization alone.
#[test]
fn qwen3_moe_fp8_block_release() {
    let (emulated, _) = check_against("qwen3_moe-fp8_block", "output_emulated");
    assert!(emulated < 1e-5, "against the emulation: {emulated:.2e}");
    let (plain, _) = check("qwen3_moe-fp8_block");
    assert!(
        plain < 1e-1,
        "against transformers' unquantized activations: {plain:.2e}"
    );
    assert!(plain > emulated, "{plain:.2e} vs {emulated:.2e}");
}

/// GPT-OSS's MXFP4 release derived from a transformers-built bf16 GPT-OSS (`_blocks` / `_scales`,
/// gate and up rows interleaved): W4A16 quantizes no activation, so against transformers' block on
/// the dequantized weights it differs by bf16 rounding only, and against the f32 emulation (bf16
/// intermediate, as our bf16 activation format rounds it) by accumulation order.
#[test]
fn gpt_oss_mxfp4_release() {
    let (emulated, _) = check_against("gpt_oss-mxfp4", "output_emulated");
    assert!(emulated < 1e-5, "against the emulation: {emulated:.2e}");
    let (plain, _) = check("gpt_oss-mxfp4");
    assert!(
        plain < 1e-2,
        "against transformers on the dequantized weights: {plain:.2e}"
    );
}

/// Nemotron-H's ModelOpt NVFP4 release derived from a transformers-built bf16 Nemotron-H
/// (`weight`, `weight_scale`, `weight_scale_2`, `input_scale` per expert): the static NVFP4
/// activations (the max `input_scale` over experts) against the f32 emulation of spec/formats.md's
/// rule, and against transformers' block on the dequantized weights (unquantized activations).
#[test]
fn nemotron_h_nvfp4_release() {
    let (emulated, _) = check_against("nemotron_h-nvfp4", "output_emulated");
    assert!(emulated < 1e-5, "against the emulation: {emulated:.2e}");
    let (plain, _) = check("nemotron_h-nvfp4");
    assert!(
        plain < 0.25,
        "against transformers' unquantized activations: {plain:.2e}"
    );
    assert!(plain > emulated, "{plain:.2e} vs {emulated:.2e}");
}
