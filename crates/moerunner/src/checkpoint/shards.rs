//! The tensors of a Hugging Face model folder: `model.safetensors.index.json` maps each tensor name to
//! the shard file that holds it (or a single `model.safetensors`). Shards are memory-mapped, so
//! opening one reads only its header; element bytes are paged in only when copied.
//!
//! Design decision: every copy of tensor bytes goes through [`Shards::read_box`], which counts the
//! bytes it copies. That count is what "a rank reads only its slice" is asserted against.

use std::cell::Cell;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::error::{MoeError, Result};
use crate::layer_file::MappedFile;
use crate::tensor::{DType, HostTensor};

pub(crate) const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";

/// The shards of one model folder, opened lazily (a shard holding none of the layer's tensors is
/// never mapped).
pub struct Shards {
    dir: PathBuf,
    /// Tensor name → shard file name, from the index.
    weight_map: HashMap<String, String>,
    open: std::cell::RefCell<HashMap<String, std::rc::Rc<MappedFile>>>,
    bytes_read: Cell<u64>,
}

/// A shard named by the index must stay inside the model folder: a relative path of plain names
/// (`model-00001-of-00002.safetensors`, `sub/x.safetensors`). Absolute paths, `..`, and prefixes
/// are refused, so a crafted index cannot make the loader open any file on the machine.
/// (Symlinks inside the folder are followed: the Hugging Face cache links shards to `../../blobs`.)
fn check_shard_path(index: &Path, tensor: &str, file: &str) -> Result<()> {
    use std::path::Component;
    let p = Path::new(file);
    let plain = !file.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if plain {
        return Ok(());
    }
    Err(MoeError::invalid(
        format!("{} key `weight_map.{tensor}`", index.display()),
        format!(
            "shard path `{file}` leaves the model folder (absolute, `..` or empty); \
             shards must be named relative to the folder"
        ),
    ))
}

impl Shards {
    /// Reads the index of `dir` (or lists the single `model.safetensors`).
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        let weight_map = if index.exists() {
            let json = super::hf_config::read_json(&index)?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    MoeError::missing(format!(
                        "key `weight_map` (an object) in {}",
                        index.display()
                    ))
                })?;
            let mut out = HashMap::with_capacity(map.len());
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    MoeError::invalid(
                        format!("{} key `weight_map.{name}`", index.display()),
                        "must be a shard file name (a string)",
                    )
                })?;
                check_shard_path(&index, name, file)?;
                out.insert(name.clone(), file.to_string());
            }
            out
        } else if dir.join(SINGLE_FILE).exists() {
            let file = MappedFile::open_lenient(&dir.join(SINGLE_FILE))?;
            file.names()
                .map(|n| (n.to_string(), SINGLE_FILE.to_string()))
                .collect()
        } else {
            return Err(MoeError::missing(format!(
                "{INDEX_FILE} (or {SINGLE_FILE}) in {}",
                dir.display()
            )));
        };
        Ok(Shards {
            dir: dir.to_path_buf(),
            weight_map,
            open: Default::default(),
            bytes_read: Cell::new(0),
        })
    }

    /// Every file the folder's tensors are read from (the index's shards, or the single file),
    /// each once: what an output must never replace.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut names: Vec<&String> = self.weight_map.values().collect();
        names.sort();
        names.dedup();
        names.into_iter().map(|f| self.dir.join(f)).collect()
    }

    pub fn has(&self, name: &str) -> bool {
        self.weight_map.contains_key(name)
    }

    /// The tensor names that start with `prefix`, sorted (to say what a folder holds when no
    /// known layout matches).
    pub fn names_under(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .weight_map
            .keys()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// Bytes copied out of the shards so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.get()
    }

    /// The tensor `name` as a borrowed window of its shard (nothing is read yet).
    fn tensor(&self, name: &str) -> Result<HostTensor> {
        let file = self.weight_map.get(name).ok_or_else(|| {
            MoeError::missing(format!(
                "tensor `{name}` (not in the index of {})",
                self.dir.display()
            ))
        })?;
        let mut open = self.open.borrow_mut();
        let shard = match open.get(file) {
            Some(s) => s.clone(),
            None => {
                let s = std::rc::Rc::new(MappedFile::open_lenient(&self.dir.join(file))?);
                open.insert(file.clone(), s.clone());
                s
            }
        };
        if !shard.has(name) {
            return Err(MoeError::missing(format!(
                "tensor `{name}` in shard {} (the index names that shard)",
                shard.path().display()
            )));
        }
        shard.require(name)
    }

    /// Dtype and shape of `name`, checked against the allowed dtypes.
    pub fn meta(&self, name: &str, allowed: &[DType]) -> Result<(DType, Vec<usize>)> {
        let t = self.tensor(name)?;
        t.expect_dtype(name, allowed)?;
        Ok((t.dtype, t.shape))
    }

    /// Checks `name` has dtype in `allowed` and exactly `shape`; returns its dtype.
    pub fn check_tensor(&self, name: &str, allowed: &[DType], shape: &[usize]) -> Result<DType> {
        let (dtype, got) = self.meta(name, allowed)?;
        if got != shape {
            return Err(MoeError::shape(name, format!("{shape:?}"), &got));
        }
        Ok(dtype)
    }

    /// Copies a box of `name`, viewed as `[outer, rows, row_bytes]` (`dims`, the last in bytes):
    /// for every outer index in `outer` and row in `rows`, the bytes `cols` of that row. Rows of a
    /// row-major tensor are contiguous, so a row slice costs exactly its bytes; a column slice costs
    /// one short run per row. Only the copied bytes are counted (and paged in).
    pub fn read_box(
        &self,
        name: &str,
        dims: [usize; 3],
        outer: Range<usize>,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<Vec<u8>> {
        let t = self.tensor(name)?;
        let [o, r, c] = dims;
        if o * r * c != t.bytes.len()
            || outer.end > o
            || rows.end > r
            || cols.end > c
            || outer.start > outer.end
            || rows.start > rows.end
            || cols.start > cols.end
        {
            return Err(MoeError::shape(
                name,
                format!("a tensor of {o}×{r}×{c} bytes covering {outer:?}×{rows:?}×{cols:?}"),
                &t.shape,
            ));
        }
        let bytes = &t.bytes[..];
        let mut out = Vec::with_capacity(outer.len() * rows.len() * cols.len());
        for a in outer {
            for b in rows.clone() {
                let start = (a * r + b) * c;
                out.extend_from_slice(&bytes[start + cols.start..start + cols.end]);
            }
        }
        self.bytes_read
            .set(self.bytes_read.get() + out.len() as u64);
        Ok(out)
    }

    /// [`Self::read_box`] over each range of outer indices in `runs` (a rank's experts in runs of
    /// consecutive ids), concatenated.
    pub fn read_outer(
        &self,
        name: &str,
        dims: [usize; 3],
        runs: &[Range<usize>],
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for run in runs {
            out.extend(self.read_box(name, dims, run.clone(), rows.clone(), cols.clone())?);
        }
        Ok(out)
    }

    /// The whole tensor `name` (dtype checked), copied and counted.
    pub fn read_all(&self, name: &str, allowed: &[DType]) -> Result<HostTensor> {
        let (dtype, shape) = self.meta(name, allowed)?;
        let n = shape.iter().product::<usize>() * dtype.size();
        let bytes = self.read_box(name, [1, 1, n], 0..1, 0..1, 0..n)?;
        HostTensor::new(name, dtype, shape, bytes.into())
    }

    /// A float tensor (F32, BF16 or F16) as f32 values, copied and counted.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self.read_all(name, &[DType::F32, DType::BF16, DType::F16])?;
        let v = t.to_f32_vec(name)?;
        Ok((t.shape, v))
    }

    /// A scalar F32 (shape `[]` or `[1]`), as ModelOpt stores `weight_scale_2` and `input_scale`.
    pub fn read_scalar(&self, name: &str) -> Result<f32> {
        let (shape, v) = self.read_f32(name)?;
        match v.as_slice() {
            [x] if shape.len() <= 1 => Ok(*x),
            _ => Err(MoeError::shape(name, "[] or [1] (a scalar)", &shape)),
        }
    }
}
