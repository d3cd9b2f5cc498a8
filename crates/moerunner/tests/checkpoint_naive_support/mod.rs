//! Miniature Hugging Face checkpoints for the loader tests: the real families' tensor names,
//! dtypes, shape conventions, `config.json` keys and sharding (several `model-0000i-of-0000n`
//! shards plus `model.safetensors.index.json`), at tiny sizes. Each writer also returns the
//! weights as the model means them (f64, per expert, in Hugging Face's own layout), so a test can
//! evaluate the layer naively and independently of our layouts.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use moerunner::formats::{bf16, e2m1, e4m3, ue8m0};
use moerunner::rng::SeededRng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

/// A checkpoint under construction: tensors by name and the config.
pub struct Ckpt {
    pub tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
    pub config: Value,
    pub rng: SeededRng,
}

/// One expert as the model means it (dequantized, f64, rows × cols row-major).
#[derive(Clone, Debug, Default)]
pub struct Expert {
    pub gate: Option<Vec<f64>>,
    pub up: Vec<f64>,
    pub down: Vec<f64>,
    pub gate_bias: Option<Vec<f64>>,
    pub up_bias: Option<Vec<f64>>,
    pub down_bias: Option<Vec<f64>>,
}

/// How a miniature ships its per-expert linear layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ship {
    Bf16,
    Fp8Block,
    Fp8Tensor,
    Nvfp4,
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| bf16::encode(*x).to_le_bytes())
        .collect()
}

impl Ckpt {
    pub fn new(seed: u64, config: Value) -> Self {
        Ckpt {
            tensors: BTreeMap::new(),
            config,
            rng: SeededRng::new(seed),
        }
    }

    pub fn add(&mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) {
        self.tensors
            .insert(name.to_string(), (dtype, shape.to_vec(), bytes));
    }

    pub fn uniform(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.rng.uniform(-amp, amp)).collect()
    }

    /// A BF16 tensor of random values; returns the values (exactly representable).
    pub fn add_bf16(&mut self, name: &str, shape: &[usize], amp: f32) -> Vec<f32> {
        let v: Vec<f32> = self
            .uniform(shape.iter().product(), amp)
            .into_iter()
            .map(bf16::round)
            .collect();
        self.add(name, Dtype::BF16, shape, bf16_bytes(&v));
        v
    }

    pub fn add_f32(&mut self, name: &str, shape: &[usize], values: &[f32]) {
        self.add(name, Dtype::F32, shape, f32_bytes(values));
    }

    /// Filler tensors that a real checkpoint holds around the experts (never read by the loader).
    pub fn add_filler(&mut self, name: &str, shape: &[usize]) {
        self.add_bf16(name, shape, 0.1);
    }

    /// A linear layer `{base}.weight` `[rows, cols]` in `ship`, with its scales; returns its
    /// dequantized values. `global` fixes NVFP4's `weight_scale_2` (gate and up share one).
    pub fn add_linear(
        &mut self,
        base: &str,
        rows: usize,
        cols: usize,
        ship: Ship,
        global: Option<f32>,
    ) -> Vec<f64> {
        let amp = (3.0 / cols as f32).sqrt();
        let n = rows * cols;
        match ship {
            Ship::Bf16 => self
                .add_bf16(&format!("{base}.weight"), &[rows, cols], amp)
                .into_iter()
                .map(f64::from)
                .collect(),
            Ship::Fp8Block => {
                let (rb, cb) = (rows.div_ceil(128), cols.div_ceil(128));
                let s: Vec<f32> = (0..rb * cb)
                    .map(|_| amp / 448.0 * self.rng.uniform(0.5, 1.5))
                    .collect();
                let v = self.uniform(n, amp);
                let mut bytes = vec![0u8; n];
                let mut out = vec![0f64; n];
                for r in 0..rows {
                    for c in 0..cols {
                        let sc = s[(r / 128) * cb + c / 128];
                        bytes[r * cols + c] = e4m3::encode(v[r * cols + c] / sc);
                        out[r * cols + c] = e4m3::decode(bytes[r * cols + c]) as f64 * sc as f64;
                    }
                }
                self.add(
                    &format!("{base}.weight"),
                    Dtype::F8_E4M3,
                    &[rows, cols],
                    bytes,
                );
                self.add_f32(&format!("{base}.weight_scale_inv"), &[rb, cb], &s);
                out
            }
            Ship::Fp8Tensor => {
                let s = global.unwrap_or(amp / 448.0);
                let v = self.uniform(n, amp);
                let bytes: Vec<u8> = v.iter().map(|x| e4m3::encode(x / s)).collect();
                let out = bytes
                    .iter()
                    .map(|&b| e4m3::decode(b) as f64 * s as f64)
                    .collect();
                self.add(
                    &format!("{base}.weight"),
                    Dtype::F8_E4M3,
                    &[rows, cols],
                    bytes,
                );
                self.add_f32(&format!("{base}.weight_scale"), &[], &[s]);
                let input = self.rng.uniform(0.004, 0.006);
                self.add_f32(&format!("{base}.input_scale"), &[], &[input]);
                out
            }
            Ship::Nvfp4 => {
                let g = global.unwrap_or(amp / 2688.0);
                let bytes: Vec<u8> = (0..n / 2).map(|_| self.rng.below(256) as u8).collect();
                let scales: Vec<u8> = (0..n / 16)
                    .map(|_| e4m3::encode(amp / 6.0 / g * self.rng.uniform(0.5, 1.5)))
                    .collect();
                let mut out = vec![0f64; n];
                for (i, o) in out.iter_mut().enumerate() {
                    let b = bytes[i / 2];
                    let code = if i % 2 == 0 { b & 0xF } else { b >> 4 };
                    *o = e2m1::decode(code) as f64 * e4m3::decode(scales[i / 16]) as f64 * g as f64;
                }
                self.add(
                    &format!("{base}.weight"),
                    Dtype::U8,
                    &[rows, cols / 2],
                    bytes,
                );
                self.add(
                    &format!("{base}.weight_scale"),
                    Dtype::F8_E4M3,
                    &[rows, cols / 16],
                    scales,
                );
                self.add_f32(&format!("{base}.weight_scale_2"), &[], &[g]);
                let input = self.rng.uniform(0.0007, 0.0009);
                self.add_f32(&format!("{base}.input_scale"), &[], &[input]);
                out
            }
        }
    }

    /// Per-expert modules `{prefix}{e}.{gate|up|down}` ([I, H], [I, H], [H, I]).
    pub fn add_experts(
        &mut self,
        prefix: &str,
        names: [Option<&str>; 3],
        e: usize,
        h: usize,
        i: usize,
        ship: Ship,
    ) -> Vec<Expert> {
        (0..e)
            .map(|x| {
                let g = match ship {
                    Ship::Nvfp4 => {
                        Some((3.0 / h as f32).sqrt() / 2688.0 * self.rng.uniform(0.8, 1.2))
                    }
                    Ship::Fp8Tensor => Some((3.0 / h as f32).sqrt() / 448.0),
                    _ => None,
                };
                let gate =
                    names[0].map(|n| self.add_linear(&format!("{prefix}{x}.{n}"), i, h, ship, g));
                let up = self.add_linear(
                    &format!("{prefix}{x}.{}", names[1].unwrap_or("up_proj")),
                    i,
                    h,
                    ship,
                    g,
                );
                let down = self.add_linear(
                    &format!("{prefix}{x}.{}", names[2].unwrap_or("down_proj")),
                    h,
                    i,
                    ship,
                    None,
                );
                Expert {
                    gate,
                    up,
                    down,
                    ..Default::default()
                }
            })
            .collect()
    }

    /// Writes `config.json`, `n` shards and the index into `dir` (tensors in name order, split
    /// into `n` runs of about equal count, as exporters do).
    pub fn write(&self, dir: &Path, n: usize) {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&self.config).unwrap(),
        )
        .unwrap();
        let names: Vec<&String> = self.tensors.keys().collect();
        let per = names.len().div_ceil(n);
        let mut weight_map = serde_json::Map::new();
        let mut total = 0usize;
        for (s, chunk) in names.chunks(per).enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, n);
            let views: Vec<(String, TensorView)> = chunk
                .iter()
                .map(|name| {
                    let (dtype, shape, bytes) = &self.tensors[*name];
                    total += bytes.len();
                    weight_map.insert((*name).clone(), json!(file));
                    (
                        (*name).clone(),
                        TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
                    )
                })
                .collect();
            safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        }
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index).unwrap(),
        )
        .unwrap();
    }
}

pub fn tmp_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("moerunner-naive-{}-{name}", std::process::id()))
}

/// Decodes GPT-OSS MXFP4 blocks `[rows, K/32, 16]` + scales `[rows, K/32]` to f64 `[rows, K]`.
pub fn decode_mxfp4(blocks: &[u8], scales: &[u8], rows: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0f64; rows * k];
    for r in 0..rows {
        for c in 0..k {
            let b = blocks[r * k / 2 + c / 2];
            let code = if c % 2 == 0 { b & 0xF } else { b >> 4 };
            out[r * k + c] =
                e2m1::decode(code) as f64 * ue8m0::decode(scales[r * k / 32 + c / 32]) as f64;
        }
    }
    out
}
