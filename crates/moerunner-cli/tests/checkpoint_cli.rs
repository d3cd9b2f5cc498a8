//! `moerunner convert` and `moerunner run --checkpoint` end to end on a miniature Qwen3-MoE folder
//! (a single `model.safetensors`, no index): a hidden-only input is routed by the checkpoint's
//! router, the converted layer file (which carries the router) gives the same output on that input
//! and on one with the logits, and TP ranks add up to the whole.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use moerunner::checkpoint::{load_layer, LoadOptions};
use moerunner::layer_file::{self, InputFile, RoutingTensors};
use moerunner::{DType, HostTensor};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_moerunner"))
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) % 2001) as f32 / 4000.0
                - 0.25
        })
        .collect()
}

/// Qwen3-MoE, layer 1 of 2: E = 4, H = 64, I = 32, BF16.
fn checkpoint(dir: &Path) {
    let (e, h, i) = (4, 64, 32);
    let p = "model.layers.1.mlp.";
    let mut tensors = Vec::new();
    for x in 0..e {
        for (proj, shape) in [
            ("gate_proj", [i, h]),
            ("up_proj", [i, h]),
            ("down_proj", [h, i]),
        ] {
            let v = values(i * h, (x * 7 + proj.len()) as u32);
            tensors.push((
                format!("{p}experts.{x}.{proj}.weight"),
                HostTensor::encode_f32(DType::BF16, shape.to_vec(), &v),
            ));
        }
    }
    tensors.push((
        format!("{p}gate.weight"),
        HostTensor::encode_f32(DType::BF16, vec![e, h], &values(e * h, 99)),
    ));
    layer_file::write_tensors(&dir.join("model.safetensors"), &tensors, HashMap::new()).unwrap();
    let config = serde_json::json!({ "model_type": "qwen3_moe", "num_hidden_layers": 2, "num_experts": e, "num_experts_per_tok": 2,
        "moe_intermediate_size": i, "hidden_size": h, "norm_topk_prob": true, "hidden_act": "silu" });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

fn output(path: &Path) -> Vec<f32> {
    layer_file::read_output(path)
        .unwrap()
        .0
        .to_f32_vec("output")
        .unwrap()
}

/// A temp folder `tag` holding the checkpoint and `hidden.safetensors`: `tokens` rows of hidden
/// states alone (the checkpoint's router routes them). The folder, the input and its tensor.
fn fixture(tag: &str, tokens: usize, seed: u32) -> (PathBuf, PathBuf, HostTensor) {
    let d = std::env::temp_dir().join(format!("moerunner-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    checkpoint(&d);
    let hidden = HostTensor::from_f32(vec![tokens, 64], &values(tokens * 64, seed));
    let input = d.join("hidden.safetensors");
    layer_file::write_tensors(
        &input,
        &[("hidden_states".into(), hidden.clone())],
        HashMap::new(),
    )
    .unwrap();
    (d, input, hidden)
}

#[test]
fn run_checkpoint_and_convert_agree() {
    let (d, hidden_only, hidden) = fixture("ckpt", 3, 5);
    let s = |p: &Path| p.to_str().unwrap().to_string();

    let out1 = d.join("out1.safetensors");
    let text = ok(bin().args([
        "run",
        "--checkpoint",
        &s(&d),
        "--layer-index",
        "1",
        "--input",
        &s(&hidden_only),
        "--output",
        &s(&out1),
        "--reference",
    ]));
    assert!(!text.contains("deprecated"), "{text}");

    // The converted layer file, run on an input carrying the router's logits, gives the same output.
    let layer = d.join("layer.safetensors");
    let text = ok(bin().args([
        "convert",
        "--checkpoint",
        &s(&d),
        "--layer",
        "1",
        "--out",
        &s(&layer),
    ]));
    assert!(text.contains("qwen3_moe"), "{text}");
    let loaded = load_layer(&d, 1, &LoadOptions::default()).unwrap();
    let logits = loaded.router_logits(&hidden).unwrap();
    let with_logits = d.join("logits.safetensors");
    layer_file::write_input(
        &with_logits,
        &InputFile {
            hidden,
            routing: RoutingTensors::Logits(logits),
        },
    )
    .unwrap();
    let out2 = d.join("out2.safetensors");
    ok(bin().args([
        "run",
        "--layer",
        &s(&layer),
        "--input",
        &s(&with_logits),
        "--output",
        &s(&out2),
        "--reference",
    ]));
    let (a, b) = (output(&out1), output(&out2));
    assert!(a.iter().any(|v| *v != 0.0));
    assert_eq!(a, b);

    // The router travels with the converted file: the hidden-only input runs on it as well.
    let router = layer_file::read_layer_router(&layer)
        .unwrap()
        .expect("convert writes the router");
    assert_eq!(router.weight.shape, vec![4, 64]);
    let out3 = d.join("out3.safetensors");
    ok(bin().args([
        "run",
        "--layer",
        &s(&layer),
        "--input",
        &s(&hidden_only),
        "--output",
        &s(&out3),
        "--reference",
    ]));
    assert_eq!(
        a,
        output(&out3),
        "hidden-only input on the converted layer file"
    );
    // A layer file without a router still refuses a hidden-only input, naming what is missing.
    let bare = d.join("bare.safetensors");
    layer_file::write_layer(&bare, &layer_file::read_layer(&layer).unwrap()).unwrap();
    let out = bin()
        .args([
            "run",
            "--layer",
            &s(&bare),
            "--input",
            &s(&hidden_only),
            "--output",
            &s(&d.join("o4.safetensors")),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("router_logits"),
        "{err}"
    );

    // Two TP ranks read their halves from the checkpoint; their partial outputs add up.
    let mut sum = vec![0f32; a.len()];
    for r in 0..2 {
        let o = d.join(format!("tp{r}.safetensors"));
        // The old spelling, `--layer N` with `--checkpoint`, still works and says what replaces it.
        let text = ok(bin().args([
            "run",
            "--checkpoint",
            &s(&d),
            "--layer",
            "1",
            "--input",
            &s(&hidden_only),
            "--output",
            &s(&o),
            "--reference",
            "--tp-size",
            "2",
            "--tp-rank",
            &r.to_string(),
        ]));
        assert!(
            text.contains("deprecated") && text.contains("--layer-index 1"),
            "{text}"
        );
        for (x, y) in sum.iter_mut().zip(output(&o)) {
            *x += y;
        }
    }
    for (x, y) in sum.iter().zip(&a) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
    }

    // --quantize at load, and errors that name the problem.
    let q = d.join("q.safetensors");
    ok(bin().args([
        "run",
        "--checkpoint",
        &s(&d),
        "--layer",
        "1",
        "--input",
        &s(&hidden_only),
        "--output",
        &s(&q),
        "--quantize",
        "mxfp8",
    ]));
    let bad = bin()
        .args([
            "run",
            "--checkpoint",
            &s(&d),
            "--layer",
            "x",
            "--input",
            &s(&hidden_only),
            "--output",
            &s(&q),
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("layer index"));
    // `--layer-index` names a layer of a checkpoint only.
    let bad = bin()
        .args([
            "run",
            "--layer-index",
            "1",
            "--input",
            &s(&hidden_only),
            "--output",
            &s(&q),
        ])
        .output()
        .unwrap();
    assert!(
        !bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--checkpoint"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let bad = bin()
        .args([
            "convert",
            "--checkpoint",
            &s(&d),
            "--layer-index",
            "5",
            "--out",
            &s(&q),
        ])
        .output()
        .unwrap();
    assert!(
        !bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("num_hidden_layers")
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// `run --checkpoint --ep R / --tp R`: every rank reads only its slice (rank 0 in the main
/// thread, which also routes the hidden-only input), and the output is the unsplit run's: bit for
/// bit in all-to-all EP, within roundings for TP and TEP.
#[test]
fn run_checkpoint_split_over_ranks() {
    let d: PathBuf =
        std::env::temp_dir().join(format!("moerunner-cli-ckpt-split-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    checkpoint(&d);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let hidden = HostTensor::from_f32(vec![5, 64], &values(5 * 64, 6));
    let input = d.join("hidden.safetensors");
    layer_file::write_tensors(&input, &[("hidden_states".into(), hidden)], HashMap::new()).unwrap();
    let run = |name: &str, extra: &[&str]| {
        let o = d.join(name);
        let mut args = vec![
            "run".to_string(),
            "--checkpoint".into(),
            s(&d),
            "--layer-index".into(),
            "1".into(),
            "--input".into(),
            s(&input),
            "--output".into(),
            s(&o),
            "--backend".into(),
            "cpu".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let text = ok(bin().args(&args));
        (output(&o), text)
    };
    let (one, _) = run("one.safetensors", &[]);
    assert!(one.iter().any(|v| *v != 0.0));
    for ep in ["2", "4"] {
        let (out, text) = run("ep.safetensors", &["--ep", ep]);
        assert!(
            text.contains(&format!("× {ep} ranks through thread")),
            "{text}"
        );
        assert_eq!(out, one, "--ep {ep}");
    }
    for split in [&["--tp", "2"][..], &["--ep", "2", "--tp", "2"]] {
        let (out, _) = run("tp.safetensors", split);
        for (x, y) in out.iter().zip(&one) {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "{split:?}: {x} vs {y}"
            );
        }
        // Ranks as processes, each reading its own slice of the shards and the hidden-only input
        // (routed by its own copy of the router): the thread ranks' output, bit for bit.
        let (procs, text) = run(
            "proc.safetensors",
            &[split, &["--comm", "process"][..]].concat(),
        );
        assert!(text.contains("ranks through process"), "{text}");
        assert_eq!(procs, out, "{split:?} --comm process");
    }
    let (procs, _) = run("proc.safetensors", &["--ep", "2", "--comm", "process"]);
    assert_eq!(procs, one, "--ep 2 --comm process");
    let o = d.join("bad.safetensors");
    let err = bin()
        .args([
            "run",
            "--checkpoint",
            &s(&d),
            "--layer-index",
            "1",
            "--input",
            &s(&input),
        ])
        .args(["--output", &s(&o), "--ep", "2", "--expert-map", "0,0,1,1"])
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("--expert-map needs --layer"));
    let _ = std::fs::remove_dir_all(&d);
}
