//! `config.json` of a Hugging Face model folder: which family the model is, and typed reads of its
//! keys whose errors name the key (a missing or malformed key is the user's first clue).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::Activation;
use crate::error::{MoeError, Result};

/// The model families whose MoE layers we load (`docs/checkpoints.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Qwen3Moe,
    Qwen2Moe,
    Mixtral,
    DeepseekV3,
    GptOss,
    NemotronH,
    MinimaxM2,
}

impl Family {
    /// (`model_type`, `architectures[0]`, family) for detection.
    const KNOWN: &'static [(&'static str, &'static str, Family)] = &[
        ("qwen3_moe", "Qwen3MoeForCausalLM", Family::Qwen3Moe),
        ("qwen2_moe", "Qwen2MoeForCausalLM", Family::Qwen2Moe),
        ("mixtral", "MixtralForCausalLM", Family::Mixtral),
        ("deepseek_v3", "DeepseekV3ForCausalLM", Family::DeepseekV3),
        ("kimi_k2", "DeepseekV3ForCausalLM", Family::DeepseekV3),
        ("gpt_oss", "GptOssForCausalLM", Family::GptOss),
        ("nemotron_h", "NemotronHForCausalLM", Family::NemotronH),
        ("minimax_m2", "MiniMaxM2ForCausalLM", Family::MinimaxM2),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Family::Qwen3Moe => "Qwen3-MoE",
            Family::Qwen2Moe => "Qwen2-MoE",
            Family::Mixtral => "Mixtral",
            Family::DeepseekV3 => "DeepSeek-V3",
            Family::GptOss => "GPT-OSS",
            Family::NemotronH => "Nemotron-H",
            Family::MinimaxM2 => "MiniMax-M2",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A parsed `config.json` with typed, key-naming accessors.
pub struct HfConfig {
    path: PathBuf,
    json: Value,
}

impl HfConfig {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| MoeError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| MoeError::Format {
            path: path.display().to_string(),
            why: format!("not valid JSON: {e}"),
        })?;
        if !json.is_object() {
            return Err(MoeError::Format {
                path: path.display().to_string(),
                why: "the top level is not a JSON object".into(),
            });
        }
        Ok(HfConfig { path, json })
    }

    /// The family, from `model_type`, else from `architectures[0]`.
    pub fn family(&self) -> Result<Family> {
        let model_type = self.json.get("model_type").and_then(Value::as_str);
        let arch = self
            .json
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str);
        if let Some(mt) = model_type {
            if let Some((_, _, f)) = Family::KNOWN.iter().find(|(m, _, _)| *m == mt) {
                return Ok(*f);
            }
        }
        if let Some(a) = arch {
            if let Some((_, _, f)) = Family::KNOWN.iter().find(|(_, x, _)| *x == a) {
                return Ok(*f);
            }
        }
        let known: Vec<&str> = Family::KNOWN.iter().map(|(m, _, _)| *m).collect();
        Err(MoeError::invalid(
            self.key_name("model_type"),
            format!(
                "unsupported model (model_type = {}, architectures[0] = {}); supported model_type values: {}",
                model_type.unwrap_or("absent"),
                arch.unwrap_or("absent"),
                known.join(", ")
            ),
        ))
    }

    /// "key `k` in /path/config.json": how errors name a key.
    pub fn key_name(&self, key: &str) -> String {
        format!("key `{key}` in {}", self.path.display())
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| MoeError::missing(self.key_name(key)))
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.required(key)?;
        v.as_u64().map(|n| n as usize).ok_or_else(|| {
            MoeError::invalid(
                self.key_name(key),
                format!("`{v}` is not a non-negative integer"),
            )
        })
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.get(key).is_none() {
            Ok(default)
        } else {
            self.usize(key)
        }
    }

    pub fn f32(&self, key: &str) -> Result<f32> {
        let v = self.required(key)?;
        match v.as_f64() {
            Some(x) if x.is_finite() => Ok(x as f32),
            _ => Err(MoeError::invalid(
                self.key_name(key),
                format!("`{v}` is not a finite number"),
            )),
        }
    }

    pub fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        if self.get(key).is_none() {
            Ok(default)
        } else {
            self.f32(key)
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                MoeError::invalid(self.key_name(key), format!("`{v}` is not true or false"))
            }),
        }
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        let v = self.required(key)?;
        v.as_str()
            .ok_or_else(|| MoeError::invalid(self.key_name(key), format!("`{v}` is not a string")))
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str> {
        if self.get(key).is_none() {
            Ok(default)
        } else {
            self.str(key)
        }
    }

    /// A list of integers (e.g. Qwen's `mlp_only_layers`); absent means empty.
    pub fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64().map(|n| n as usize).ok_or_else(|| {
                        MoeError::invalid(
                            self.key_name(key),
                            format!("element `{v}` is not a non-negative integer"),
                        )
                    })
                })
                .collect(),
            Some(v) => Err(MoeError::invalid(
                self.key_name(key),
                format!("`{v}` is not a list of integers"),
            )),
        }
    }

    /// Requires `key` (if present) to equal one of `allowed`, else an error naming the key.
    pub fn expect_str(&self, key: &str, default: &str, allowed: &[&str]) -> Result<()> {
        let v = self.str_or(key, default)?;
        if allowed.contains(&v) {
            return Ok(());
        }
        Err(MoeError::invalid(
            self.key_name(key),
            format!("`{v}` is not supported; expected {}", allowed.join(" or ")),
        ))
    }

    /// The gated activation named by `key` (`hidden_act`): silu → swiglu, gelu → geglu.
    pub fn gated_activation(&self, key: &str) -> Result<Activation> {
        match self.str_or(key, "silu")? {
            "silu" | "swish" => Ok(Activation::Swiglu),
            "gelu" => Ok(Activation::Geglu),
            other => Err(MoeError::invalid(
                self.key_name(key),
                format!("activation `{other}` is not supported; expected silu or gelu"),
            )),
        }
    }

    /// Checks `layer < num_hidden_layers` (when the key is present).
    pub fn check_layer_index(&self, layer: usize, layers: Option<usize>) -> Result<()> {
        let n = match layers {
            Some(n) => n,
            None => self.usize("num_hidden_layers")?,
        };
        if layer >= n {
            return Err(MoeError::invalid(
                self.key_name("num_hidden_layers"),
                format!("layer {layer} does not exist: the model has {n} layers (0..{n})"),
            ));
        }
        Ok(())
    }

    /// The FP8 block size of `quantization_config.weight_block_size`, when the checkpoint says.
    pub fn weight_block_size(&self) -> Result<Option<Vec<usize>>> {
        let Some(q) = self.get("quantization_config") else {
            return Ok(None);
        };
        match q.get("weight_block_size") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64().map(|n| n as usize).ok_or_else(|| {
                        MoeError::invalid(
                            self.key_name("quantization_config.weight_block_size"),
                            format!("`{v}` is not an integer"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(MoeError::invalid(
                self.key_name("quantization_config.weight_block_size"),
                format!("`{v}` is not a list"),
            )),
        }
    }
}
