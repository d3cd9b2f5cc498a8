//! The project's fuzz test (issue 11): a seeded generator of damaged layer and input files,
//! damaged checkpoints and absurd arguments, each case one run of the `moerunner` binary, checked
//! for the guarantees of docs/robustness.md:
//! - no panic, no death by signal: exit 0, or exit 1 with one `error:` line;
//! - no hang: every case ends within [`CASE_TIMEOUT`];
//! - bounded memory: the child's peak RSS stays under [`RSS_LIMIT_KB`] (the commands run with a
//!   256 MiB memory budget, so absurd sizes must be refused, not attempted);
//! - no replaced or half-written file: every file that existed before is byte-identical after, a
//!   failed command leaves no new file, a successful one only its output (no temp files);
//! - finite output or a named error: a `run` that succeeds writes only finite values, and an
//!   error names a tensor, key, flag or file.
//!
//! `cargo test --release -p moerunner-cli --test fuzz` runs the CI corpus ([`CI_CASES`] cases,
//! seed 1, well under 30 s on 2 cores). On demand:
//! `MOERUNNER_FUZZ_CASES=20000 MOERUNNER_FUZZ_SEED=7 cargo test --release -p moerunner-cli --test fuzz -- --nocapture`;
//! one case again: `MOERUNNER_FUZZ_CASE=<case seed>` (every failure prints it).
//! `MOERUNNER_FUZZ_BACKEND=cuda` (or cpu, reference, auto) picks the backend of `run` cases; a
//! backend that cannot run a case's layer makes that case a (counted, printed) clean refusal.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{gpt_oss, nemotron_nvfp4, qwen, values, Checkpoint, TempDir};
use moerunner::layer_file::{self, InputFile};
use moerunner::rng::SeededRng;
use moerunner::synth::{random_input, random_layer, RoutingMode};
use moerunner::{
    Activation, ActivationFormat, DType, HostTensor, LayerConfig, Parallelism, RoutingConfig,
    RoutingMethod, W13Order, WeightFormat,
};
use serde_json::{json, Value};

const CI_CASES: usize = 1000;
const CASE_TIMEOUT: Duration = Duration::from_secs(60);
const BUDGET: &str = "256M";
const RSS_LIMIT_KB: i64 = 600 * 1024;

/// The peak-RSS bound of one case: [`RSS_LIMIT_KB`], plus `MOERUNNER_FUZZ_EXTRA_RSS_MB` where the
/// backend brings a fixed cost of its own (the CUDA driver maps several hundred MiB into a process
/// that opens a context, whatever the input).
fn rss_limit_kb() -> i64 {
    let extra_mb: i64 = std::env::var("MOERUNNER_FUZZ_EXTRA_RSS_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    RSS_LIMIT_KB + extra_mb * 1024
}

// ---------------------------------------------------------------------------------------------
// Fixtures: small valid layers (every weight format), inputs in the three routing forms, and
// three checkpoint families. Cases copy them and damage the copy.

struct Fixtures {
    dir: TempDir,
    /// (layer file, [input files]) per layer.
    layers: Vec<(PathBuf, Vec<PathBuf>)>,
}

fn layer_config(
    wf: WeightFormat,
    af: ActivationFormat,
    routing: RoutingMethod,
    relu2: bool,
) -> LayerConfig {
    let mut r = RoutingConfig::new(
        routing,
        if routing == RoutingMethod::Llama4 {
            1
        } else {
            2
        },
    );
    if routing == RoutingMethod::DeepseekV3 {
        (r.n_group, r.topk_group, r.routed_scaling_factor) = (2, 1, 2.5);
    }
    LayerConfig {
        num_experts: 8,
        hidden: 64,
        intermediate: 64,
        weight_format: wf,
        activation_format: af,
        activation: if relu2 {
            Activation::Relu2
        } else {
            Activation::Swiglu
        },
        w13_order: W13Order::GateUp,
        routing: r,
        local_experts: 0..8,
        parallelism: Parallelism::default(),
    }
}

fn fixtures() -> Fixtures {
    use ActivationFormat as A;
    use RoutingMethod as R;
    use WeightFormat as W;
    let dir = TempDir::new("fuzz-fixtures");
    let configs = [
        layer_config(W::Bf16, A::Bf16, R::Renormalize, false),
        layer_config(W::Fp8, A::Fp8, R::Default, false),
        layer_config(W::Fp8Block, A::Fp8Block, R::DeepseekV3, false),
        layer_config(W::Mxfp8, A::Mxfp8, R::TopK, true),
        layer_config(W::Mxfp4, A::Bf16, R::Renormalize, false),
        layer_config(W::Mxfp4, A::Mxfp8, R::Llama4, false),
        layer_config(W::Nvfp4, A::Nvfp4, R::Renormalize, true),
        layer_config(W::Nvfp4, A::Nvfp4PerToken, R::SigmoidRenorm, false),
    ];
    let mut layers = Vec::new();
    for (n, c) in configs.iter().enumerate() {
        let layer = random_layer(c, n as u64, n % 2 == 0).unwrap();
        let path = dir.path(&format!("layer{n}.safetensors"));
        layer_file::write_layer(&path, &layer).unwrap();
        let mut inputs = Vec::new();
        for (m, mode) in [RoutingMode::Logits, RoutingMode::TopK, RoutingMode::Packed]
            .into_iter()
            .enumerate()
        {
            let dtype = [DType::BF16, DType::F32, DType::F16][m];
            let input =
                InputFile::try_from(random_input(c, 5, mode, dtype, n as u64).unwrap()).unwrap();
            let p = dir.path(&format!("in{n}-{m}.safetensors"));
            layer_file::write_input(&p, &input).unwrap();
            inputs.push(p);
        }
        layers.push((path, inputs));
    }
    Fixtures { dir, layers }
}

// ---------------------------------------------------------------------------------------------
// The generator

struct Rng(SeededRng);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0.below(n.max(1) as u64) as usize
    }
    fn chance(&mut self, p: f32) -> bool {
        self.0.unit_f32() < p
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Numbers a hostile user types.
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "7",
    "8",
    "16",
    "32",
    "64",
    "100",
    "128",
    "100000",
    "2147483648",
    "4294967297",
    "4611686018427387904",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "-2.5",
    "1e3",
    "0x10",
    "abc",
    "",
    "nan",
    "inf",
];

/// JSON values a damaged config holds.
fn hostile_json(rng: &mut Rng) -> Value {
    match rng.below(14) {
        0 => json!(-1),
        1 => json!(0),
        2 => json!(1_000_000_000_000u64),
        3 => json!(u64::MAX),
        4 => json!("7"),
        5 => Value::Null,
        6 => json!([]),
        7 => json!({}),
        8 => json!(true),
        9 => json!(1.5),
        10 => json!(-7.0),
        11 => json!(1e300),
        12 => json!(["moe", 3, null]),
        _ => json!(4_611_686_018_427_387_904u64),
    }
}

/// Bytes that mean something special in one of the formats: NaN/inf/huge f32 and bf16, E4M3 NaN
/// and 448, UE8M0 254 and 255, the largest ids.
fn special_bytes(rng: &mut Rng, width: usize) -> Vec<u8> {
    let f32s: [f32; 8] = [f32::NAN, f32::INFINITY, -1.0, 0.0, 1e30, 3e38, -1e20, 1e-45];
    match width {
        4 => {
            if rng.chance(0.5) {
                rng.pick(&f32s).to_le_bytes().to_vec()
            } else {
                rng.pick(&[i32::MAX, i32::MIN, -1, 8, 1 << 20])
                    .to_le_bytes()
                    .to_vec()
            }
        }
        2 => rng
            .pick(&[
                [0x80u8, 0x7f],
                [0xc0, 0x7f],
                [0x7f, 0x7f],
                [0x00, 0xff],
                [0x00, 0x7c],
            ])
            .to_vec(),
        _ => vec![*rng.pick(&[0xffu8, 0xfe, 0x7f, 0x7e, 0x80, 0x00, 0xf7])],
    }
}

/// Splits a safetensors file into (header JSON, data); None if it does not parse.
fn split(bytes: &[u8]) -> Option<(serde_json::Map<String, Value>, Vec<u8>)> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = serde_json::from_slice(bytes.get(8..8 + n)?).ok()?;
    Some((header, bytes[8 + n..].to_vec()))
}

fn join(header: &serde_json::Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// One random damage to a safetensors file: container (truncation, header bytes, header length,
/// shapes, dtypes, offsets, names, metadata) or values (special bytes inside a tensor).
fn damage_safetensors(rng: &mut Rng, bytes: &mut Vec<u8>) -> String {
    let Some((mut header, mut data)) = split(bytes) else {
        bytes.truncate(rng.below(bytes.len()));
        return "truncated (unparsable)".into();
    };
    let names: Vec<String> = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    let name = rng.pick(&names).clone();
    let what = match rng.below(12) {
        0 => {
            let at = rng.below(bytes.len());
            bytes.truncate(at);
            return format!("truncated at {at}");
        }
        1 => {
            let n = 1 + rng.below(8);
            for _ in 0..n {
                let i = 8 + rng.below(bytes.len() - 8);
                bytes[i] = rng.below(256) as u8;
            }
            return format!("{n} random bytes");
        }
        2 => {
            let len = *rng.pick(&[0u64, 1, 7, u64::MAX, 1 << 40, (bytes.len() as u64) * 2]);
            bytes[..8].copy_from_slice(&len.to_le_bytes());
            return format!("header length {len}");
        }
        3 => {
            let dims = header[&name]["shape"].as_array().map_or(0, |a| a.len());
            let v = *rng.pick(&[0u64, 1, 1_000_000_000_000, u64::MAX, 3, 1 << 32]);
            if dims > 0 {
                header[&name]["shape"][rng.below(dims)] = json!(v);
            } else {
                header[&name]["shape"] = json!([v]);
            }
            format!("`{name}` shape dim {v}")
        }
        4 => {
            let d = rng.pick(&[
                "F64", "I64", "BOOL", "F8_E5M2", "U8", "F32", "I32", "BF16", "Q4", "F4",
            ]);
            header[&name]["dtype"] = json!(d);
            format!("`{name}` dtype {d}")
        }
        5 => {
            let e = header[&name]["data_offsets"][1].as_u64().unwrap_or(0);
            let v = *rng.pick(&[0, e + 1, e.saturating_sub(1), u64::MAX, 1 << 50]);
            header[&name]["data_offsets"][rng.below(2)] = json!(v);
            format!("`{name}` offset {v}")
        }
        6 => {
            let v = header.remove(&name).unwrap();
            if rng.chance(0.5) {
                header.insert(format!("{name}_x"), v);
            }
            format!("`{name}` removed or renamed")
        }
        7 => {
            let meta = header.entry("__metadata__").or_insert(json!({}));
            let keys: Vec<String> = meta
                .as_object()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            let key = if keys.is_empty() || rng.chance(0.2) {
                "moerunner.unknown".to_string()
            } else {
                rng.pick(&keys).clone()
            };
            let v = rng.pick(&[
                "-1",
                "0",
                "1e40",
                "NaN",
                "inf",
                "-inf",
                "18446744073709551616",
                "x",
                "",
                "true",
                "99999999999",
            ]);
            meta[&key] = json!(v);
            format!("metadata {key} = {v}")
        }
        8 => {
            header.insert("__metadata__".into(), hostile_json(rng));
            "metadata not a map of strings".into()
        }
        _ => {
            // Values: a few elements of one tensor set to special bytes (container still valid).
            let info = &header[&name];
            let width = match info["dtype"].as_str() {
                Some("F32" | "I32") => 4,
                Some("BF16" | "F16") => 2,
                _ => 1,
            };
            let (s, e) = (
                info["data_offsets"][0].as_u64().unwrap_or(0) as usize,
                info["data_offsets"][1].as_u64().unwrap_or(0) as usize,
            );
            if e <= s || e > data.len() {
                return "no values to damage".into();
            }
            let n = 1 + rng.below(3);
            let b = special_bytes(rng, width);
            for _ in 0..n {
                let at = s + rng.below((e - s) / width) * width;
                data[at..at + width].copy_from_slice(&b);
            }
            format!("`{name}` {n} values {b:02x?}")
        }
    };
    *bytes = join(&header, &data);
    what
}

/// A command and the file it may create.
struct Case {
    args: Vec<String>,
    what: String,
    /// The file the command writes (created or replaced only on success).
    writes: Option<PathBuf>,
    /// Whether that file is a `run` output whose values must be finite.
    finite: bool,
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn copy(from: &Path, dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(from, &to).unwrap();
    to
}

fn backend() -> String {
    std::env::var("MOERUNNER_FUZZ_BACKEND").unwrap_or_else(|_| "cpu".into())
}

fn run_args(layer: &Path, input: &Path, out: &Path, rng: &mut Rng) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "run".into(),
        "--layer".into(),
        s(layer),
        "--input".into(),
        s(input),
        "--output".into(),
        s(out),
        "--backend".into(),
        backend(),
    ];
    if rng.chance(0.15) {
        let flag = rng.pick(&["--ep-size", "--ep-rank", "--tp-size", "--tp-rank"]);
        a.extend([flag.to_string(), rng.pick(NUMBERS).to_string()]);
    }
    if rng.chance(0.1) {
        a.push("--save-routing".into());
    }
    a
}

fn layer_file_case(rng: &mut Rng, fx: &Fixtures, dir: &Path) -> Case {
    let (layer, inputs) = rng.pick(&fx.layers);
    let l = copy(layer, dir, "layer.safetensors");
    let i = copy(rng.pick::<PathBuf>(inputs), dir, "in.safetensors");
    let mut bytes = std::fs::read(&l).unwrap();
    let what = damage_safetensors(rng, &mut bytes);
    std::fs::write(&l, bytes).unwrap();
    let out = dir.join("out.safetensors");
    Case {
        args: run_args(&l, &i, &out, rng),
        what: format!("layer file: {what}"),
        writes: Some(out),
        finite: true,
    }
}

fn input_file_case(rng: &mut Rng, fx: &Fixtures, dir: &Path) -> Case {
    let (layer, inputs) = rng.pick(&fx.layers);
    let l = copy(layer, dir, "layer.safetensors");
    let i = copy(rng.pick::<PathBuf>(inputs), dir, "in.safetensors");
    let mut bytes = std::fs::read(&i).unwrap();
    let what = damage_safetensors(rng, &mut bytes);
    std::fs::write(&i, bytes).unwrap();
    let out = dir.join("out.safetensors");
    Case {
        args: run_args(&l, &i, &out, rng),
        what: format!("input file: {what}"),
        writes: Some(out),
        finite: true,
    }
}

fn checkpoint_case(rng: &mut Rng, dir: &Path) -> Case {
    let (mut c, layer, h): (Checkpoint, &str, usize) = match rng.below(3) {
        0 => (qwen(4, 64, 32, 2), "1", 64),
        1 => (nemotron_nvfp4(4, 64, 64), "3", 64),
        _ => (gpt_oss(4, 64, 64), "1", 64),
    };
    let family = c.config["model_type"].as_str().unwrap_or("?").to_string();
    let ck = dir.join("ckpt");
    let mut what = String::new();
    if rng.chance(0.4) {
        let keys: Vec<String> = c.config.as_object().unwrap().keys().cloned().collect();
        let key = rng.pick(&keys).clone();
        let v = hostile_json(rng);
        what = format!("config `{key}` = {v}");
        c.set(&key, v);
    } else if rng.chance(0.3) {
        // Special values in one tensor (scales, router, weights), the container intact.
        let n = rng.below(c.tensors.len());
        let t = &c.tensors[n].1;
        let width = t.dtype.size();
        let mut bytes = t.bytes.to_vec();
        let b = special_bytes(rng, width);
        let at = rng.below(bytes.len() / width) * width;
        bytes[at..at + width].copy_from_slice(&b);
        what = format!("`{}` value {b:02x?}", c.tensors[n].0);
        c.tensors[n].1 = HostTensor::from_u8(t.dtype, t.shape.clone(), bytes);
    }
    c.write(&ck);
    if what.is_empty() {
        match rng.below(4) {
            0 => {
                let f = ck.join(rng.pick(&["config.json", "model.safetensors.index.json"]));
                let mut text = std::fs::read(&f).unwrap();
                text.truncate(rng.below(text.len()));
                std::fs::write(&f, text).unwrap();
                what = format!("{} truncated", f.file_name().unwrap().to_string_lossy());
            }
            1 => {
                let index = ck.join("model.safetensors.index.json");
                let mut j: Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
                let map = j["weight_map"].as_object_mut().unwrap();
                let keys: Vec<String> = map.keys().cloned().collect();
                let key = rng.pick(&keys).clone();
                let v = match rng.below(5) {
                    0 => json!("../outside.safetensors"),
                    1 => json!("/etc/hostname"),
                    2 => json!("missing.safetensors"),
                    3 => json!(""),
                    _ => json!(7),
                };
                what = format!("index `{key}` → {v}");
                map.insert(key, v);
                std::fs::write(&index, j.to_string()).unwrap();
            }
            _ => {
                let shard = ck.join(rng.pick(&[
                    "model-00001-of-00002.safetensors",
                    "model-00002-of-00002.safetensors",
                ]));
                let mut bytes = std::fs::read(&shard).unwrap();
                what = format!("shard: {}", damage_safetensors(rng, &mut bytes));
                std::fs::write(&shard, bytes).unwrap();
            }
        }
    }
    let out = dir.join("out.safetensors");
    let what = format!("checkpoint {family}: {what}");
    if rng.chance(0.5) {
        let mut args: Vec<String> = [
            "convert",
            "--checkpoint",
            &s(&ck),
            "--layer",
            layer,
            "--out",
            &s(&out),
        ]
        .map(String::from)
        .to_vec();
        if rng.chance(0.2) {
            args.extend([
                "--quantize".into(),
                rng.pick(&["mxfp8", "nvfp4", "fp8", "bf16", "x"])
                    .to_string(),
            ]);
        }
        return Case {
            args,
            what,
            writes: Some(out),
            finite: false,
        };
    }
    let input = dir.join("h.safetensors");
    let scale = *rng.pick(&[1.0f32, 1.0, 1e20, 3e38]);
    let x: Vec<f32> = values(3 * h, 3).iter().map(|v| v * scale).collect();
    common::hidden_only(&input, 3, h, &x);
    let mut args = vec![
        "run".into(),
        "--checkpoint".into(),
        s(&ck),
        "--layer".into(),
        layer.into(),
    ];
    args.extend(run_args(&input, &input, &out, rng).into_iter().skip(3));
    Case {
        args,
        what: format!("{what}; hidden × {scale}"),
        writes: Some(out),
        finite: true,
    }
}

fn arguments_case(rng: &mut Rng, fx: &Fixtures, dir: &Path) -> Case {
    let (layer, inputs) = rng.pick(&fx.layers);
    let l = copy(layer, dir, "layer.safetensors");
    let i = copy(rng.pick::<PathBuf>(inputs), dir, "in.safetensors");
    let out = dir.join("out.safetensors");
    // Outputs: fresh, an input, a folder, a missing folder, a long name.
    let out_path = match rng.below(8) {
        0 => l.clone(),
        1 => i.clone(),
        2 => dir.to_path_buf(),
        3 => dir.join("nodir/x.safetensors"),
        4 => dir.join("b".repeat(253)),
        _ => out.clone(),
    };
    let num = |rng: &mut Rng| rng.pick(NUMBERS).to_string();
    let mut args: Vec<String> = match rng.below(4) {
        0 => {
            let mut a: Vec<String> = vec!["make-layer".into(), "--out".into(), s(&out_path)];
            if rng.chance(0.2) {
                a.extend([
                    "--preset".into(),
                    rng.pick(&["qwen3-30b-a3b", "deepseek-v3", "gpt-oss-120b", "nope"])
                        .to_string(),
                ]);
            } else {
                for flag in ["--experts", "--hidden", "--intermediate", "--top-k"] {
                    if rng.chance(0.9) {
                        let v = if rng.chance(0.5) {
                            rng.pick(&["8", "64", "32", "2"]).to_string()
                        } else {
                            num(rng)
                        };
                        a.extend([flag.to_string(), v]);
                    }
                }
            }
            if rng.chance(0.5) {
                a.extend([
                    "--weight-format".into(),
                    rng.pick(&["bf16", "fp8", "fp8_block", "mxfp8", "mxfp4", "nvfp4", "fp4"])
                        .to_string(),
                ]);
            }
            if rng.chance(0.3) {
                a.extend([
                    "--routing".into(),
                    rng.pick(&["deepseek_v3", "llama4", "topk", "renormalize"])
                        .to_string(),
                ]);
            }
            if rng.chance(0.3) {
                let flag = rng.pick(&["--n-group", "--topk-group", "--routed-scaling-factor"]);
                a.extend([flag.to_string(), num(rng)]);
            }
            a
        }
        1 => {
            let mut a: Vec<String> = vec![
                "make-input".into(),
                "--out".into(),
                s(&out_path),
                "--tokens".into(),
                num(rng),
            ];
            if rng.chance(0.8) {
                a.extend(["--layer".into(), s(&l)]);
            } else {
                a.extend(["--preset".into(), "qwen3-30b-a3b".into()]);
            }
            a
        }
        2 => {
            let mut a: Vec<String> = vec![
                "bench".into(),
                "--iters".into(),
                "1".into(),
                "--tokens".into(),
                num(rng),
            ];
            if rng.chance(0.5) {
                a.extend(["--json".into(), s(&out_path)]);
            }
            a
        }
        _ => run_args(&l, &i, &out_path, rng),
    };
    if rng.chance(0.1) {
        args.insert(0, "--memory-budget".into());
        args.insert(
            1,
            rng.pick(&["0", "1", "1M", "-5", "1e30", "x", "64M"])
                .to_string(),
        );
    }
    let finite = args[0] == "run" || args.get(2).map(String::as_str) == Some("run");
    Case {
        what: format!("arguments: {}", args.join(" ")),
        args,
        writes: Some(out_path),
        finite,
    }
}

fn generate(seed: u64, fx: &Fixtures, dir: &Path) -> Case {
    let mut rng = Rng(SeededRng::new(seed));
    match rng.below(10) {
        0..=2 => layer_file_case(&mut rng, fx, dir),
        3..=4 => input_file_case(&mut rng, fx, dir),
        5..=7 => checkpoint_case(&mut rng, dir),
        _ => arguments_case(&mut rng, fx, dir),
    }
}

// ---------------------------------------------------------------------------------------------
// Running and checking one case

/// Every file under `dir` with its bytes' hash.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(_) => {
                    let bytes = std::fs::read(&p).unwrap_or_default();
                    let h = bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
                        (h ^ b as u64).wrapping_mul(0x100000001b3)
                    });
                    out.insert(p, h);
                }
                Err(_) => {}
            }
        }
    }
    out
}

struct Outcome {
    code: Option<i32>,
    signal: Option<i32>,
    stderr: String,
    max_rss_kb: i64,
    elapsed: Duration,
}

/// Runs the binary with the fuzz budget; waits with `wait4` for the child's own peak RSS; kills
/// it after [`CASE_TIMEOUT`].
// The child is reaped by `wait4` (which also gives its rusage), not by `Child::wait`.
#[allow(clippy::zombie_processes)]
fn execute(args: &[String], dir: &Path) -> Outcome {
    let err_path = dir.with_extension("stderr");
    let started = Instant::now();
    let child = common::bin()
        .args(args)
        .env("MOERUNNER_MEMORY_BUDGET", BUDGET)
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let (mut status, mut usage): (libc::c_int, libc::rusage) = (0, unsafe { std::mem::zeroed() });
    let mut killed = false;
    loop {
        // SAFETY: `pid` is our child, not yet reaped (std's `Child` is never waited on here).
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        if !killed && started.elapsed() > CASE_TIMEOUT {
            // SAFETY: signalling our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&err_path);
    let (code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else {
        (None, Some(libc::WTERMSIG(status)))
    };
    Outcome {
        code,
        signal,
        stderr,
        max_rss_kb: usage.ru_maxrss,
        elapsed: started.elapsed(),
    }
}

/// An error line names what is wrong: a tensor or key in backticks, a flag, a file, or a key
/// leading a message part (`error: slicing the layer: ep_size: E = 8 ...`).
fn names_something(line: &str, dir: &Path) -> bool {
    let key = line
        .split(": ")
        .skip(1)
        .any(|k| k.len() > 1 && k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        || line
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .any(|w| {
                w.len() > 3
                    && w.contains('_')
                    && w.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            });
    key || line.contains('`')
        || line.contains("--")
        || line.contains(&s(dir))
        || line.contains("config.json")
        || line.contains("index.json")
}

/// How a case ended, for the summary.
#[derive(Clone, Copy)]
enum End {
    Succeeded,
    Refused,
    /// Refused because the chosen backend cannot run that layer (counted apart: on the GPU,
    /// formats the CUDA backend does not cover are not exercised there).
    Unsupported,
}

/// Checks one case; the problems found, empty when it kept every guarantee.
fn check(case: &Case, dir: &Path, fx_dir: &Path) -> (Vec<String>, End) {
    let before = snapshot(dir);
    let fx_before = snapshot(fx_dir);
    let o = execute(&case.args, dir);
    let after = snapshot(dir);
    let mut problems = Vec::new();
    if o.elapsed > CASE_TIMEOUT {
        problems.push(format!("hang: killed after {:?}", o.elapsed));
    }
    if let Some(sig) = o.signal {
        problems.push(format!("killed by signal {sig}"));
    }
    if o.stderr.contains("panicked") || o.code == Some(101) {
        problems.push("panic".into());
    }
    if o.max_rss_kb > rss_limit_kb() {
        problems.push(format!(
            "peak RSS {} MiB over {} MiB",
            o.max_rss_kb / 1024,
            rss_limit_kb() / 1024
        ));
    }
    let written = |p: &Path| o.code == Some(0) && case.writes.as_deref() == Some(p);
    for (p, h) in &before {
        match after.get(p) {
            _ if written(p) => {}
            Some(h2) if h2 == h => {}
            Some(_) => problems.push(format!("input {} was modified", p.display())),
            None => problems.push(format!("input {} was removed", p.display())),
        }
    }
    if snapshot(fx_dir) != fx_before {
        problems.push("a fixture changed".into());
    }
    let new: Vec<&PathBuf> = after.keys().filter(|p| !before.contains_key(*p)).collect();
    let ok = o.code == Some(0);
    match o.code {
        Some(0) => {
            for p in &new {
                if p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".moerunner-"))
                {
                    problems.push(format!("temp file left: {}", p.display()));
                }
            }
            if let Some(out) = case.writes.as_ref().filter(|_| case.finite) {
                match layer_file::read_output(out) {
                    Ok((t, _)) => match t.to_f32_vec("output") {
                        Ok(v) if v.iter().all(|x| x.is_finite()) => {}
                        Ok(_) => problems.push("exit 0 with a non-finite output".into()),
                        Err(e) => problems.push(format!("unreadable output: {e}")),
                    },
                    Err(e) => problems.push(format!("exit 0 but output unreadable: {e}")),
                }
            }
        }
        Some(1) => {
            if !new.is_empty() {
                problems.push(format!("failed but left files: {new:?}"));
            }
            // The error and the lines under it (the runner lists each backend's reason).
            let line = o.stderr.find("error: ").map_or("", |at| &o.stderr[at..]);
            if line.is_empty() {
                problems.push(format!("exit 1 without an `error:` line: {:?}", o.stderr));
            } else if !names_something(line, dir) {
                problems.push(format!("error names nothing: {line}"));
            }
        }
        // clap's usage errors (a flag's value that does not parse) exit 2 with a message.
        Some(2) if o.stderr.contains("error:") && o.stderr.contains("--") => {}
        other => problems.push(format!("exit {other:?}: {}", o.stderr)),
    }
    if !problems.is_empty() {
        problems.push(format!("stderr: {}", o.stderr.trim()));
    }
    let end = if ok {
        End::Succeeded
    } else if o.stderr.contains("no backend can run this layer") {
        End::Unsupported
    } else {
        End::Refused
    };
    (problems, end)
}

fn case_seed(base: u64, i: usize) -> u64 {
    base.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
        ^ 0x5851_F42D_4C95_7F2D
}

#[test]
fn fuzz_hostile_files_checkpoints_and_arguments() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let cases = env("MOERUNNER_FUZZ_CASES").map_or(CI_CASES, |n| n as usize);
    let base = env("MOERUNNER_FUZZ_SEED").unwrap_or(1);
    let seeds: Vec<u64> = match env("MOERUNNER_FUZZ_CASE") {
        Some(one) => vec![one],
        None => (0..cases).map(|i| case_seed(base, i)).collect(),
    };
    let fx = fixtures();
    let root = TempDir::new("fuzz-cases");
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let ends = [(); 3].map(|_| AtomicUsize::new(0));
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(4);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&seed) = seeds.get(i) else { break };
                let dir = root.path(&format!("case-{seed}"));
                std::fs::create_dir_all(&dir).unwrap();
                let case = generate(seed, &fx, &dir);
                let (problems, end) = check(&case, &dir, &fx.dir.0);
                ends[end as usize].fetch_add(1, Ordering::Relaxed);
                if !problems.is_empty() {
                    let msg = format!(
                        "case seed {seed} ({}): {}\n  moerunner {}\n  {}",
                        case.what,
                        problems.first().map_or("", |p| p.as_str()),
                        case.args.join(" "),
                        problems[1..].join("\n  ")
                    );
                    println!("FAIL {msg}\n  rerun: MOERUNNER_FUZZ_CASE={seed} cargo test --release -p moerunner-cli --test fuzz");
                    failures.lock().unwrap().push(msg);
                }
                let _ = std::fs::remove_dir_all(&dir);
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    println!(
        "fuzz: {} cases (seed {base}, backend {}) in {:.1} s: {} succeeded, {} refused cleanly \
         ({} of them because backend {} cannot run the layer), {} failed",
        seeds.len(),
        backend(),
        started.elapsed().as_secs_f64(),
        ends[End::Succeeded as usize].load(Ordering::Relaxed),
        ends[End::Refused as usize].load(Ordering::Relaxed)
            + ends[End::Unsupported as usize].load(Ordering::Relaxed),
        ends[End::Unsupported as usize].load(Ordering::Relaxed),
        backend(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} fuzz cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
