//! What the CLI's integration tests share: temp folders, running the binary (and asserting how it
//! ended), and miniature Hugging Face checkpoints (Qwen3 BF16, Nemotron-H NVFP4, GPT-OSS MXFP4)
//! written with the library's own safetensors writer.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use moerunner::layer_file;
use moerunner::{DType, HostTensor};
use serde_json::{json, Value};

/// A temp folder removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(test: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("moerunner-test-{}-{n}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn s(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The CLI under test: the one cargo built, or `MOERUNNER_BIN` (the same build carried to a GPU
/// machine, where the build path does not exist).
pub fn bin() -> Command {
    match std::env::var_os("MOERUNNER_BIN") {
        Some(path) => Command::new(path),
        None => Command::new(env!("CARGO_BIN_EXE_moerunner")),
    }
}

pub fn moerunner(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts that `out`, of the command `what`, succeeded; the failure message has its whole output.
fn succeeded(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed:\n{}", text(out));
}

/// Runs the binary and asserts success; returns stdout + stderr.
pub fn ok(args: &[&str]) -> String {
    let out = moerunner(args);
    succeeded(&out, &format!("moerunner {}", args.join(" ")));
    text(&out)
}

/// Runs the binary and asserts success; returns stdout alone, for a test that parses it (JSON) or
/// checks that a summary is printed there, where stderr's notes must not count.
pub fn ok_stdout(args: &[&str]) -> String {
    let out = moerunner(args);
    succeeded(&out, &format!("moerunner {}", args.join(" ")));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command prepared from `bin()` (arguments that are not `&str`, an environment) and asserts
/// success; returns stdout + stderr, as `ok` does.
pub fn ok_cmd(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    succeeded(&out, &format!("{cmd:?}"));
    text(&out)
}

/// Runs the binary and asserts a failure with exit status `code`, an `error: ` line and no panic;
/// returns stderr.
fn fails_with(args: &[&str], code: i32) -> String {
    let out = moerunner(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "moerunner {} should fail cleanly with status {code}:\n{}",
        args.join(" "),
        text(&out)
    );
    assert!(
        stderr.contains("error: ") && !stderr.contains("panicked"),
        "{stderr}"
    );
    stderr
}

/// Runs the binary and asserts a clean failure (exit 1, an `error:` line, no panic); returns stderr.
pub fn fails(args: &[&str]) -> String {
    fails_with(args, 1)
}

/// Runs the binary and asserts that clap refused the command line itself (conflicting flags, a
/// missing required one, a value its parser rejects): exit 2, clap's `error:` line, no panic;
/// returns stderr. Such a refusal never reaches the command, so it cannot exit 1 as `fails` asks.
pub fn fails_usage(args: &[&str]) -> String {
    fails_with(args, 2)
}

/// Deterministic values in [-0.25, 0.25).
pub fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) % 2001) as f32 / 4000.0
                - 0.25
        })
        .collect()
}

/// A miniature checkpoint: `config.json` and tensors, written as two shards and an index.
pub struct Checkpoint {
    pub config: Value,
    pub tensors: Vec<(String, HostTensor)>,
}

impl Checkpoint {
    pub fn write(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), self.config.to_string()).unwrap();
        let half = self.tensors.len().div_ceil(2).max(1);
        let mut weight_map = serde_json::Map::new();
        for (i, chunk) in self.tensors.chunks(half).enumerate() {
            let file = format!("model-{:05}-of-00002.safetensors", i + 1);
            layer_file::write_tensors(&dir.join(&file), chunk, HashMap::new()).unwrap();
            for (name, _) in chunk {
                weight_map.insert(name.clone(), json!(file));
            }
        }
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
        )
        .unwrap();
    }

    /// Writes the checkpoint as a single `model.safetensors` without an index (how a small model
    /// comes), `config.json` beside it.
    pub fn write_single(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), self.config.to_string()).unwrap();
        layer_file::write_tensors(
            &dir.join("model.safetensors"),
            &self.tensors,
            HashMap::new(),
        )
        .unwrap();
    }

    pub fn set(&mut self, key: &str, v: Value) {
        self.config[key] = v;
    }

    /// Replaces the bytes of tensor `name` (same dtype and shape).
    pub fn replace(&mut self, name: &str, t: HostTensor) {
        let slot = self
            .tensors
            .iter_mut()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no tensor {name}"));
        slot.1 = t;
    }
}

fn bf16(shape: Vec<usize>, seed: u32) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::encode_f32(DType::BF16, shape, &values(n, seed))
}

fn scalar(v: f32) -> HostTensor {
    HostTensor::from_f32(vec![], &[v])
}

/// Qwen3-MoE, layer 1 of 2, BF16: E experts, H, I, top k.
pub fn qwen(e: usize, h: usize, i: usize, k: usize) -> Checkpoint {
    let p = "model.layers.1.mlp.";
    let mut tensors = Vec::new();
    for x in 0..e {
        for (j, (proj, shape)) in [
            ("gate_proj", vec![i, h]),
            ("up_proj", vec![i, h]),
            ("down_proj", vec![h, i]),
        ]
        .into_iter()
        .enumerate()
        {
            tensors.push((
                format!("{p}experts.{x}.{proj}.weight"),
                bf16(shape, (x * 3 + j) as u32),
            ));
        }
    }
    tensors.push((format!("{p}gate.weight"), bf16(vec![e, h], 99)));
    Checkpoint {
        config: json!({ "model_type": "qwen3_moe", "num_hidden_layers": 2, "num_experts": e,
            "num_experts_per_tok": k, "moe_intermediate_size": i, "hidden_size": h,
            "norm_topk_prob": true, "hidden_act": "silu" }),
        tensors,
    }
}

/// Nemotron-H, layer 3 of 4 (`M*ME`), ModelOpt NVFP4 with static input scales: non-gated relu2.
pub fn nemotron_nvfp4(e: usize, h: usize, i: usize) -> Checkpoint {
    let p = "backbone.layers.3.mixer.";
    let mut tensors = Vec::new();
    for x in 0..e {
        for (j, (proj, rows, cols)) in [("up_proj", i, h), ("down_proj", h, i)]
            .into_iter()
            .enumerate()
        {
            let n = |what: &str| format!("{p}experts.{x}.{proj}.{what}");
            let seed = (x * 2 + j) as u32;
            let packed: Vec<u8> = values(rows * cols / 2, seed)
                .iter()
                .map(|v| ((v + 0.25) * 1000.0) as u8)
                .collect();
            tensors.push((
                n("weight"),
                HostTensor::from_u8(DType::U8, vec![rows, cols / 2], packed),
            ));
            // E4M3 0x38 = 1.0 for every block.
            tensors.push((
                n("weight_scale"),
                HostTensor::from_u8(
                    DType::F8E4M3,
                    vec![rows, cols / 16],
                    vec![0x38; rows * cols / 16],
                ),
            ));
            tensors.push((n("weight_scale_2"), scalar(0.01)));
            tensors.push((n("input_scale"), scalar(0.002)));
        }
    }
    tensors.push((format!("{p}gate.weight"), bf16(vec![e, h], 98)));
    tensors.push((
        format!("{p}gate.e_score_correction_bias"),
        HostTensor::from_f32(vec![e], &values(e, 5)),
    ));
    Checkpoint {
        config: json!({ "model_type": "nemotron_h", "num_hidden_layers": 4, "n_routed_experts": e,
            "num_experts_per_tok": 2, "moe_intermediate_size": i, "hidden_size": h,
            "hybrid_override_pattern": "M*ME", "mlp_hidden_act": "relu2", "n_group": 1,
            "topk_group": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": true,
            "quantization_config": { "quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16 } }),
        tensors,
    }
}

/// GPT-OSS, layer 1 of 2, MXFP4 experts with biases.
pub fn gpt_oss(e: usize, h: usize, i: usize) -> Checkpoint {
    let p = "model.layers.1.mlp.";
    let u8s = |n: usize, seed: u32| -> Vec<u8> {
        values(n, seed)
            .iter()
            .map(|v| ((v + 0.25) * 1000.0) as u8)
            .collect()
    };
    let ex = |s: &str| format!("{p}experts.{s}");
    let tensors = vec![
        (
            ex("gate_up_proj_blocks"),
            HostTensor::from_u8(
                DType::U8,
                vec![e, 2 * i, h / 32, 16],
                u8s(e * 2 * i * h / 2, 1),
            ),
        ),
        (
            ex("gate_up_proj_scales"),
            HostTensor::from_u8(
                DType::U8,
                vec![e, 2 * i, h / 32],
                vec![124; e * 2 * i * h / 32],
            ),
        ),
        (ex("gate_up_proj_bias"), bf16(vec![e, 2 * i], 2)),
        (
            ex("down_proj_blocks"),
            HostTensor::from_u8(DType::U8, vec![e, h, i / 32, 16], u8s(e * h * i / 2, 3)),
        ),
        (
            ex("down_proj_scales"),
            HostTensor::from_u8(DType::U8, vec![e, h, i / 32], vec![124; e * h * i / 32]),
        ),
        (ex("down_proj_bias"), bf16(vec![e, h], 4)),
        (format!("{p}router.weight"), bf16(vec![e, h], 5)),
        (format!("{p}router.bias"), bf16(vec![e], 6)),
    ];
    Checkpoint {
        config: json!({ "model_type": "gpt_oss", "num_hidden_layers": 2, "num_local_experts": e,
            "num_experts_per_tok": 2, "intermediate_size": i, "hidden_size": h, "swiglu_limit": 7.0,
            "hidden_act": "silu" }),
        tensors,
    }
}

/// An input file holding only `hidden_states` [T, H] (routed by the checkpoint's router).
pub fn hidden_only(path: &Path, t: usize, h: usize, v: &[f32]) {
    layer_file::write_tensors(
        path,
        &[("hidden_states".into(), HostTensor::from_f32(vec![t, h], v))],
        HashMap::new(),
    )
    .unwrap();
}

/// `make-layer --out PATH` in the small shape of the CLI tests (E = 8, H = 256, I = 128, k = 2),
/// then `extra`.
pub fn small_layer_args<'a>(path: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "make-layer",
        "--out",
        path,
        "--experts",
        "8",
        "--hidden",
        "256",
        "--intermediate",
        "128",
        "--top-k",
        "2",
    ];
    args.extend_from_slice(extra);
    args
}

/// Writes the small-shape layer `name` (`extra` flags added) and returns its path.
pub fn make_layer(dir: &TempDir, name: &str, extra: &[&str]) -> String {
    let path = dir.s(name);
    ok(&small_layer_args(&path, extra));
    path
}

/// Writes `tokens` rows of input `name` for `layer` (`extra` flags added) and returns its path.
pub fn make_input(dir: &TempDir, layer: &str, name: &str, tokens: usize, extra: &[&str]) -> String {
    let path = dir.s(name);
    let t = tokens.to_string();
    let mut args = vec![
        "make-input",
        "--layer",
        layer,
        "--out",
        &path,
        "--tokens",
        &t,
    ];
    args.extend_from_slice(extra);
    ok(&args);
    path
}
