//! A Hugging Face model folder's sharded safetensors, memory-mapped, with every tensor read going
//! through one function that records the byte ranges it touched.
//!
//! Design decision: callers never see a shard's bytes directly. They ask for a *box* of a tensor
//! (one index range per dimension) and get back exactly those bytes; the reader turns the box into
//! contiguous runs of the file and logs each run. That log is how tests prove that a tensor- or
//! expert-parallel rank reads only its rows, columns, experts and scale blocks. Headers are parsed
//! once per shard and are not counted: they describe tensors, they are not tensor data.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use safetensors::{Dtype, SafeTensors};

use crate::error::{MoeError, Result};
use crate::tensor::{Bytes, DType, HostTensor};

/// The index file of a sharded checkpoint (`weight_map`: tensor name → shard file name).
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The single file of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// One mapped shard: its tensors' dtypes, shapes and absolute byte offsets in the map.
struct ShardFile {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    tensors: HashMap<String, (Dtype, Vec<usize>, usize, usize)>,
}

impl ShardFile {
    fn open(path: &Path) -> Result<Self> {
        let io = |source| MoeError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file changed underneath us by another process is outside
        // what any reader can defend against (the contract of every mmap-based loader).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let bad = |why: String| MoeError::Format {
            path: path.display().to_string(),
            why,
        };
        let st = SafeTensors::deserialize(&map).map_err(|e| bad(e.to_string()))?;
        let base = map.as_ptr() as usize;
        let tensors = st
            .iter()
            .map(|(name, v)| {
                let start = v.data().as_ptr() as usize - base;
                (
                    name.to_string(),
                    (v.dtype(), v.shape().to_vec(), start, v.data().len()),
                )
            })
            .collect();
        Ok(ShardFile {
            path: path.to_path_buf(),
            map: Arc::new(map),
            tensors,
        })
    }
}

/// A tensor's header entry: where it lives and what it holds.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// The safetensors dtype as spelled in the file (`BF16`, `F8_E4M3`, `U8`, ...).
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    shard: usize,
    start: usize,
    len: usize,
}

impl TensorInfo {
    /// Our dtype, or an error naming the tensor when the file's dtype is not one we read.
    pub fn our_dtype(&self) -> Result<DType> {
        Ok(match self.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F8_E4M3 => DType::F8E4M3,
            Dtype::U8 => DType::U8,
            Dtype::I32 => DType::I32,
            other => {
                return Err(MoeError::dtype(
                    &self.name,
                    "F32, F16, BF16, F8_E4M3, U8 or I32",
                    format!("{other:?}"),
                ))
            }
        })
    }
    /// Checks the dtype is one of `allowed` (spelled as safetensors spells them).
    pub fn expect_dtype(&self, allowed: &[Dtype]) -> Result<()> {
        if allowed.contains(&self.dtype) {
            return Ok(());
        }
        let names: Vec<String> = allowed.iter().map(|d| format!("{d:?}")).collect();
        Err(MoeError::dtype(
            &self.name,
            names.join(" or "),
            format!("{:?}", self.dtype),
        ))
    }
    /// Checks the shape equals `expected`.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape == expected {
            return Ok(());
        }
        Err(MoeError::shape(
            &self.name,
            format!("{expected:?}"),
            &self.shape,
        ))
    }
    /// Checks the tensor holds one value: shape `[]` or `[1]` (exporters write both).
    pub fn expect_scalar(&self) -> Result<()> {
        if self.shape.iter().product::<usize>() == 1 && self.shape.len() <= 1 {
            return Ok(());
        }
        Err(MoeError::shape(&self.name, "[] (a scalar)", &self.shape))
    }
}

/// The shards mapped so far, by file name.
type OpenShards = Vec<(String, Arc<ShardFile>)>;

/// One contiguous run of a shard that a read touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRange {
    pub file: PathBuf,
    pub tensor: String,
    pub start: usize,
    pub len: usize,
}

/// The model folder's shards, opened lazily: a shard is mapped when one of its tensors is first
/// looked up, so loading one layer maps only the shards that hold it.
pub struct Shards {
    dir: PathBuf,
    /// tensor name → shard file name (from the index, or every tensor of the single file).
    weight_map: HashMap<String, String>,
    files: Mutex<OpenShards>,
    log: Mutex<Vec<ReadRange>>,
}

impl Shards {
    /// Opens `dir`: `model.safetensors.index.json` if present, else `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        let shards = Shards {
            dir: dir.to_path_buf(),
            weight_map: HashMap::new(),
            files: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
        };
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| MoeError::Io {
                path: index.display().to_string(),
                source,
            })?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| MoeError::Format {
                    path: index.display().to_string(),
                    why: format!("not valid JSON: {e}"),
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    MoeError::missing(format!("key `weight_map` in {}", index.display()))
                })?;
            let mut weight_map = HashMap::with_capacity(map.len());
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    MoeError::invalid(
                        format!("key `weight_map.{name}` in {}", index.display()),
                        "must be a file name",
                    )
                })?;
                weight_map.insert(name.clone(), file.to_string());
            }
            return Ok(Shards {
                weight_map,
                ..shards
            });
        }
        let single = dir.join(SINGLE_FILE);
        if !single.exists() {
            return Err(MoeError::missing(format!(
                "{INDEX_FILE} or {SINGLE_FILE} in {}",
                dir.display()
            )));
        }
        let file = Arc::new(ShardFile::open(&single)?);
        let weight_map = file
            .tensors
            .keys()
            .map(|k| (k.clone(), SINGLE_FILE.to_string()))
            .collect();
        let shards = Shards {
            weight_map,
            ..shards
        };
        shards.lock_files()?.push((SINGLE_FILE.to_string(), file));
        Ok(shards)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the index names `name`.
    pub fn has(&self, name: &str) -> bool {
        self.weight_map.contains_key(name)
    }

    /// Every tensor name the index lists (unordered).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.weight_map.keys().map(|s| s.as_str())
    }

    fn lock_files(&self) -> Result<std::sync::MutexGuard<'_, OpenShards>> {
        self.files
            .lock()
            .map_err(|_| MoeError::invalid("checkpoint reader", "a previous read panicked"))
    }

    fn shard(&self, index: usize) -> Result<Arc<ShardFile>> {
        let files = self.lock_files()?;
        files
            .get(index)
            .map(|(_, f)| f.clone())
            .ok_or_else(|| MoeError::invalid("checkpoint reader", "stale tensor handle"))
    }

    /// The header entry of `name`, mapping its shard on first use.
    pub fn info(&self, name: &str) -> Result<TensorInfo> {
        let file_name = self.weight_map.get(name).ok_or_else(|| {
            MoeError::missing(format!(
                "tensor `{name}` (not listed in the checkpoint {})",
                self.dir.display()
            ))
        })?;
        let mut files = self.lock_files()?;
        let index = match files.iter().position(|(n, _)| n == file_name) {
            Some(i) => i,
            None => {
                let path = self.dir.join(file_name);
                if !path.exists() {
                    return Err(MoeError::missing(format!(
                        "shard file {} (holds tensor `{name}`)",
                        path.display()
                    )));
                }
                files.push((file_name.clone(), Arc::new(ShardFile::open(&path)?)));
                files.len() - 1
            }
        };
        let file = &files[index].1;
        let (dtype, shape, start, len) = file.tensors.get(name).cloned().ok_or_else(|| {
            MoeError::missing(format!(
                "tensor `{name}` in {} (the index says it is there)",
                file.path.display()
            ))
        })?;
        Ok(TensorInfo {
            name: name.to_string(),
            dtype,
            shape,
            shard: index,
            start,
            len,
        })
    }

    /// Reads the box `ranges` (one index range per dimension) of `t`, row-major, and logs the
    /// contiguous runs it touched. A box that is one run comes back as a window of the map
    /// (no copy); otherwise the runs are copied into one buffer.
    pub fn read_box(&self, t: &TensorInfo, ranges: &[Range<usize>]) -> Result<Bytes> {
        if ranges.len() != t.shape.len() {
            return Err(MoeError::invalid(
                format!("tensor `{}`", t.name),
                format!(
                    "a read of {} dimensions from a tensor of shape {:?}",
                    ranges.len(),
                    t.shape
                ),
            ));
        }
        for (d, (r, &n)) in ranges.iter().zip(&t.shape).enumerate() {
            if r.start > r.end || r.end > n {
                return Err(MoeError::invalid(
                    format!("tensor `{}`", t.name),
                    format!(
                        "range {r:?} of dimension {d} is outside its size {n} (shape {:?})",
                        t.shape
                    ),
                ));
            }
        }
        let elem = t.len / t.shape.iter().product::<usize>().max(1);
        // The innermost dimensions that are read whole merge into the run; the first dimension
        // (from the inside) that is cut sets the run's length, and every outer index is a run.
        let mut inner = elem;
        let mut cut = ranges.len();
        while cut > 0 && ranges[cut - 1] == (0..t.shape[cut - 1]) {
            inner *= t.shape[cut - 1];
            cut -= 1;
        }
        let (run_dim, run_len) = if cut == 0 {
            (0, inner)
        } else {
            (cut - 1, ranges[cut - 1].len() * inner)
        };
        let outer: Vec<Range<usize>> = ranges[..run_dim].to_vec();
        let total: usize = ranges.iter().map(|r| r.len()).product::<usize>() * elem;
        let mut starts = Vec::new();
        if total > 0 {
            // Row-major strides in bytes.
            let mut strides = vec![elem; t.shape.len()];
            for d in (0..t.shape.len().saturating_sub(1)).rev() {
                strides[d] = strides[d + 1] * t.shape[d + 1];
            }
            let base = if cut == 0 {
                0
            } else {
                ranges[run_dim].start * strides[run_dim]
            };
            // Every combination of the outer indices starts one run (mixed-radix count).
            let count: usize = outer.iter().map(|r| r.len()).product();
            for mut k in 0..count {
                let mut off = base;
                for d in (0..outer.len()).rev() {
                    let n = outer[d].len();
                    off += (outer[d].start + k % n) * strides[d];
                    k /= n;
                }
                starts.push(off);
            }
        }
        let file = self.shard(t.shard)?;
        {
            let mut log = self
                .log
                .lock()
                .map_err(|_| MoeError::invalid("checkpoint reader", "a previous read panicked"))?;
            for &s in &starts {
                log.push(ReadRange {
                    file: file.path.clone(),
                    tensor: t.name.clone(),
                    start: t.start + s,
                    len: run_len,
                });
            }
        }
        if starts.len() == 1 {
            return Ok(Bytes::Mapped {
                map: file.map.clone(),
                start: t.start + starts[0],
                len: run_len,
            });
        }
        let mut out = Vec::with_capacity(total);
        for s in starts {
            out.extend_from_slice(&file.map[t.start + s..t.start + s + run_len]);
        }
        Ok(Bytes::Owned(out))
    }

    /// Reads the whole tensor.
    pub fn read_all(&self, t: &TensorInfo) -> Result<Bytes> {
        let ranges: Vec<Range<usize>> = t.shape.iter().map(|&n| 0..n).collect();
        self.read_box(t, &ranges)
    }

    /// Reads a whole F32/F16/BF16 tensor as f32 values.
    pub fn read_f32(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let dtype = t.our_dtype()?;
        let bytes = self.read_all(t)?;
        HostTensor::new(&t.name, dtype, t.shape.clone(), bytes)?.to_f32_vec(&t.name)
    }

    /// Reads a one-value F32 tensor (shape `[]` or `[1]`).
    pub fn read_scalar_f32(&self, t: &TensorInfo) -> Result<f32> {
        t.expect_dtype(&[Dtype::F32])?;
        t.expect_scalar()?;
        let v = self.read_f32(t)?;
        v.first()
            .copied()
            .ok_or_else(|| MoeError::shape(&t.name, "[] (a scalar)", &t.shape))
    }

    /// Every run read so far, in order.
    pub fn read_log(&self) -> Vec<ReadRange> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Total bytes read so far.
    pub fn bytes_read(&self) -> usize {
        self.log
            .lock()
            .map(|l| l.iter().map(|r| r.len).sum())
            .unwrap_or(0)
    }
}
