//! `config.json` of a Hugging Face model folder: typed getters whose errors name the key and the
//! file, and the family chosen by `model_type`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{MoeError, Result};

/// The parsed `config.json`.
pub struct HfConfig {
    path: PathBuf,
    json: Value,
}

impl HfConfig {
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_file(&dir.join("config.json"))
    }

    /// A `config.json` read on its own (`bench --config`), without a model folder around it.
    pub fn open_file(path: &Path) -> Result<Self> {
        let path = path.to_path_buf();
        let json = read_json(&path)?;
        if !json.is_object() {
            return Err(MoeError::Json {
                path: path.display().to_string(),
                why: "the top level is not an object".into(),
            });
        }
        Ok(HfConfig { path, json })
    }

    fn what(&self, key: &str) -> String {
        format!("{} key `{key}`", self.path.display())
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| MoeError::missing(format!("key `{key}` in {}", self.path.display())))
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.require(key)?;
        v.as_u64().map(|x| x as usize).ok_or_else(|| {
            MoeError::invalid(
                self.what(key),
                format!("must be a non-negative integer, got {v}"),
            )
        })
    }

    /// The expert count under any of the names transformers' config classes map to it through
    /// their `attribute_map` (`num_experts` ↔ `num_local_experts` ↔ `n_routed_experts`);
    /// `canonical` (the family's own name) is read first. Returns the value and the key read.
    pub fn num_experts(&self, canonical: &'static str) -> Result<(usize, &'static str)> {
        self.alias(
            canonical,
            &["num_experts", "num_local_experts", "n_routed_experts"],
        )
    }

    /// Top-k under any of its spellings (`num_experts_per_tok`, GPT-OSS's `experts_per_token`).
    pub fn top_k(&self) -> Result<usize> {
        self.alias(
            "num_experts_per_tok",
            &["num_experts_per_tok", "experts_per_token"],
        )
        .map(|(v, _)| v)
    }

    fn alias(
        &self,
        canonical: &'static str,
        aliases: &[&'static str],
    ) -> Result<(usize, &'static str)> {
        let keys: Vec<&'static str> = std::iter::once(canonical)
            .chain(aliases.iter().copied().filter(|k| *k != canonical))
            .collect();
        let key = keys.iter().copied().find(|k| self.get(k).is_some());
        match key {
            Some(k) => Ok((self.usize(k)?, k)),
            None => Err(MoeError::missing(format!(
                "key `{}` in {}",
                keys.join("` or `"),
                self.path.display()
            ))),
        }
    }

    /// The model's layer count: `num_hidden_layers`, or — in configs transformers 5 writes for
    /// hybrid models (Nemotron-H), which derive it — the length of `layers_block_type` (alias
    /// `layer_types`) or of `hybrid_override_pattern`.
    pub fn num_layers(&self) -> Result<(usize, &'static str)> {
        if self.get("num_hidden_layers").is_some() {
            return Ok((self.usize("num_hidden_layers")?, "num_hidden_layers"));
        }
        for key in ["layers_block_type", "layer_types"] {
            if let Some(v) = self.get(key) {
                let list = v.as_array().ok_or_else(|| {
                    self.unsupported(key, format!("must be a list of strings, got {v}"))
                })?;
                return Ok((list.len(), key));
            }
        }
        if self.get("hybrid_override_pattern").is_some() {
            let n = self.str("hybrid_override_pattern")?.chars().count();
            return Ok((n, "hybrid_override_pattern"));
        }
        Err(MoeError::missing(format!(
            "key `num_hidden_layers` (or `layers_block_type`) in {}",
            self.path.display()
        )))
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.get(key).is_some() {
            self.usize(key)
        } else {
            Ok(default)
        }
    }

    pub fn f32(&self, key: &str) -> Result<f32> {
        let v = self.require(key)?;
        v.as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| MoeError::invalid(self.what(key), format!("must be a number, got {v}")))
    }

    /// Keys with a default documented by the model's `transformers` config class.
    pub fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        if self.get(key).is_some() {
            self.f32(key)
        } else {
            Ok(default)
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                MoeError::invalid(self.what(key), format!("must be true or false, got {v}"))
            }),
        }
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str()
            .ok_or_else(|| MoeError::invalid(self.what(key), format!("must be a string, got {v}")))
    }

    /// Requires `key`, when present, to equal one of `allowed` (absent: the family's default).
    pub fn expect_str(&self, key: &str, allowed: &[&str]) -> Result<()> {
        if self.get(key).is_none() {
            return Ok(());
        }
        let s = self.str(key)?;
        if allowed.contains(&s) {
            return Ok(());
        }
        Err(self.unsupported(
            key,
            format!(
                "`{s}` is not supported here; expected {}",
                allowed.join(" or ")
            ),
        ))
    }

    pub fn usize_list_or_empty(&self, key: &str) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64().map(|x| x as usize).ok_or_else(|| {
                        MoeError::invalid(self.what(key), format!("must list integers, got {v}"))
                    })
                })
                .collect(),
            Some(v) => Err(MoeError::invalid(
                self.what(key),
                format!("must be a list of integers, got {v}"),
            )),
        }
    }

    /// An error about `key` (its value is legal JSON but not something this loader maps).
    pub fn unsupported(&self, key: &str, why: impl Into<String>) -> MoeError {
        MoeError::invalid(self.what(key), why)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads and parses a JSON file of the model folder (`config.json`, the index). A FIFO or folder
/// is refused by name before it is read; parse errors are JSON errors naming the file.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    use std::io::Read;
    let mut text = String::new();
    crate::layer_file::open_regular(path)?
        .read_to_string(&mut text)
        .map_err(|source| MoeError::Io {
            path: path.display().to_string(),
            source,
        })?;
    serde_json::from_str(&text).map_err(|e| MoeError::Json {
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

/// The model families this loader maps, by `config.json`'s `model_type`.
pub const MODEL_TYPES: &[&str] = &[
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "deepseek_v3",
    "gpt_oss",
    "nemotron_h",
    "minimax_m2",
];
