//! The `.safetensors` layer, input and output files of `spec/layer-file.md` (a stable contract:
//! names, dtypes and shapes exact).
//!
//! Design decision: reading memory-maps the file and hands out tensors that borrow the map
//! ([`Bytes::Mapped`]), so a layer of many gigabytes is never copied (only its small scale and
//! bias tensors are decoded); writing streams the tensors into `.moerunner-<pid>-<n>.tmp` beside
//! the output, syncs it and renames it into place, so a reader never sees a half-written file (a
//! writer killed mid-write leaves its temp file, which the next write into that folder removes).
//!
//! This file is the container (map, parse, write); `layer` holds the layer file's metadata and
//! tensor rules, `io` the input and output files.

mod compare;
mod io;
mod layer;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use crate::error::{MoeError, Result};
use crate::tensor::{Bytes, DType, HostTensor};

pub use compare::{compare_outputs, Comparison, TopkAgreement};
pub use io::{read_input, read_output, write_input, write_output, InputFile, RoutingTensors};
pub use layer::{
    layer_metadata, projection_tensors, read_layer, read_layer_config, read_layer_header,
    read_layer_router, read_layer_with_router, write_layer, write_layer_with_router, Router,
    METADATA_KEYS,
};

/// A safetensors file mapped into memory, its tensors addressable by name.
pub struct MappedFile {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    /// name → (dtype, shape, byte offset in the map, byte length)
    tensors: HashMap<String, (DType, Vec<usize>, usize, usize)>,
    /// Lenient opens only: name → the dtype we cannot represent (I64, BOOL, F8_E5M2, ...).
    unsupported: HashMap<String, String>,
    metadata: HashMap<String, String>,
}

fn dtype_from(d: Dtype, path: &Path, name: &str) -> Result<DType> {
    Ok(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F8_E4M3 => DType::F8E4M3,
        Dtype::U8 => DType::U8,
        Dtype::I32 => DType::I32,
        other => {
            return Err(MoeError::dtype(
                name,
                "one of F32, F16, BF16, F8_E4M3, U8, I32",
                format!("{other:?} (in {})", path.display()),
            ))
        }
    })
}

fn dtype_to(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F8E4M3 => Dtype::F8_E4M3,
        DType::U8 => Dtype::U8,
        DType::I32 => Dtype::I32,
    }
}

impl MappedFile {
    /// Maps and parses `path`; a truncated or malformed file is a `Format` error naming it, and
    /// so is any tensor of a dtype this library does not represent (our own file contracts).
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, false)
    }

    /// Like [`open`](Self::open), but tensors of unrepresented dtypes are only recorded: reading
    /// one is an error, the rest of the file stays usable. Checkpoint shards hold tensors of
    /// other layers and kinds (e.g. I64 buffers) that a MoE layer never reads.
    pub fn open_lenient(path: &Path) -> Result<Self> {
        Self::open_with(path, true)
    }

    fn open_with(path: &Path, lenient: bool) -> Result<Self> {
        let io = |source| MoeError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = open_regular(path)?;
        // SAFETY: the map is read-only; a file changed underneath us by another process is outside
        // what any reader can defend against (same contract as every mmap-based loader). Our own
        // writers never modify a file in place: they rename a new one over it.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let bad = |why: String| MoeError::Format {
            path: path.display().to_string(),
            why,
        };
        // `deserialize` checks the header and that the tensors tile the data exactly, so a
        // truncated file fails here rather than when a tensor is read.
        let st = SafeTensors::deserialize(&map).map_err(|e| bad(explain_header(&map, e)))?;
        let (_, meta) = SafeTensors::read_metadata(&map).map_err(|e| bad(e.to_string()))?;
        let base = map.as_ptr() as usize;
        let mut tensors = HashMap::new();
        let mut unsupported = HashMap::new();
        for (name, view) in st.iter() {
            let dtype = match dtype_from(view.dtype(), path, name) {
                Ok(d) => d,
                Err(_) if lenient => {
                    unsupported.insert(name.to_string(), format!("{:?}", view.dtype()));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let start = view.data().as_ptr() as usize - base;
            tensors.insert(
                name.to_string(),
                (dtype, view.shape().to_vec(), start, view.data().len()),
            );
        }
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(MappedFile {
            path: path.to_path_buf(),
            map: Arc::new(map),
            tensors,
            unsupported,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The `__metadata__` map (empty when the file has none).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors
            .keys()
            .chain(self.unsupported.keys())
            .map(|s| s.as_str())
    }
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.unsupported.contains_key(name)
    }
    /// The tensor `name`, borrowed from the map (no copy), or None if absent.
    pub fn get(&self, name: &str) -> Option<HostTensor> {
        let (dtype, shape, start, len) = self.tensors.get(name)?.clone();
        Some(HostTensor {
            dtype,
            shape,
            bytes: Bytes::Mapped {
                map: self.map.clone(),
                start,
                len,
            },
        })
    }
    /// The tensor `name`, or an error naming it and the file: `Missing`, or `DType` for a
    /// tensor a lenient open recorded as unrepresentable.
    pub fn require(&self, name: &str) -> Result<HostTensor> {
        if let Some(d) = self.unsupported.get(name) {
            return Err(MoeError::dtype(
                name,
                "one of F32, F16, BF16, F8_E4M3, U8, I32",
                format!("{d} (in {})", self.path.display()),
            ));
        }
        self.get(name)
            .ok_or_else(|| MoeError::missing(format!("tensor `{name}` in {}", self.path.display())))
    }
    /// The dtype and shape of `name` without touching its data.
    pub fn info(&self, name: &str) -> Option<(DType, &[usize])> {
        self.tensors
            .get(name)
            .map(|(d, s, _, _)| (*d, s.as_slice()))
    }
    /// Refuses any tensor not in `known` (a misspelt optional tensor would otherwise be ignored).
    pub fn expect_only(&self, known: &[&str], kind: &str) -> Result<()> {
        let mut unknown: Vec<&str> = self.names().filter(|n| !known.contains(n)).collect();
        unknown.sort();
        match unknown.first() {
            None => Ok(()),
            Some(name) => Err(MoeError::invalid(
                format!("tensor `{name}`"),
                format!(
                    "is not part of {kind} ({}); known: {}",
                    self.path.display(),
                    known.join(", ")
                ),
            )),
        }
    }
}

/// Opens `path` for reading if it is a regular file (after symlinks). A directory, FIFO, socket or
/// device is refused by name before it is opened: mapping a FIFO would block forever, and a
/// directory would fail with an unrelated OS message ("No such device").
pub fn open_regular(path: &Path) -> Result<std::fs::File> {
    let io = |source| MoeError::Io {
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a FIFO, socket or device)"
        };
        return Err(MoeError::invalid(
            path.display().to_string(),
            format!("is {kind}; a .safetensors file is expected"),
        ));
    }
    std::fs::File::open(path).map_err(io)
}

/// The safetensors crate's message, with the tensor named when the crate does not name it
/// (`TensorInvalidInfo`, overflow, misaligned): the header is re-read and the first tensor whose
/// shape × dtype disagrees with its `data_offsets` is reported.
fn explain_header(map: &[u8], e: safetensors::SafeTensorError) -> String {
    let base = e.to_string();
    let header = map
        .get(..8)
        .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as usize)
        .and_then(|n| map.get(8..8usize.checked_add(n)?))
        .and_then(|h| serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(h).ok());
    let Some(header) = header else { return base };
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
        let shape: Option<Vec<u64>> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect());
        let offsets: Option<Vec<u64>> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect());
        let bits: Option<u128> = match dtype {
            "F64" | "I64" | "U64" => Some(64),
            "F32" | "I32" | "U32" => Some(32),
            "F16" | "BF16" | "I16" | "U16" => Some(16),
            "F8_E4M3" | "F8_E5M2" | "F8_E8M0" | "I8" | "U8" | "BOOL" => Some(8),
            "F4" => Some(4),
            _ => None,
        };
        let (Some(shape), Some(offsets), Some(bits)) = (shape, offsets, bits) else {
            continue;
        };
        let [start, end] = offsets[..] else { continue };
        let need = shape
            .iter()
            .try_fold(bits, |acc, &d| acc.checked_mul(d as u128))
            .map(|b| b / 8);
        let have = end.checked_sub(start).map(|n| n as u128);
        if need != have {
            let need = need.map_or("more than 2^128".to_string(), |n| n.to_string());
            return format!(
                "{base}: tensor `{name}` ({dtype} {shape:?}) needs {need} bytes but its data_offsets [{start}, {end}] hold {}",
                have.map_or("a negative number of".to_string(), |n| n.to_string())
            );
        }
    }
    base
}

/// Refuses an output path that would replace one of the command's inputs (the same file by
/// device and inode: hard links and symlinks included), that is a directory, or whose folder does
/// not exist or cannot be written — all before any work is done. `inputs` pairs each path read
/// with the flag or key that named it.
pub fn check_output_path(output: &Path, flag: &str, inputs: &[(&Path, &str)]) -> Result<()> {
    let refuse = |why: String| MoeError::invalid(format!("{flag} {}", output.display()), why);
    if let Ok(out_meta) = std::fs::metadata(output) {
        if out_meta.is_dir() {
            return Err(refuse("is a directory; give a file name".into()));
        }
        for (input, input_flag) in inputs {
            if let Ok(in_meta) = std::fs::metadata(input) {
                if same_file(&out_meta, &in_meta) {
                    return Err(refuse(format!(
                        "is the same file as {input_flag} {}; writing it would replace an input \
                         being read (choose another output path)",
                        input.display()
                    )));
                }
            }
        }
    }
    let dir = parent_dir(output);
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(refuse(format!("{} is not a directory", dir.display()))),
        Err(e) => {
            return Err(refuse(format!(
                "its folder {} cannot be used: {e}",
                dir.display()
            )))
        }
    }
    if output.file_name().is_none() {
        return Err(refuse("names no file".into()));
    }
    Ok(())
}

#[cfg(unix)]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(_a: &std::fs::Metadata, _b: &std::fs::Metadata) -> bool {
    false
}

/// The folder a file `path` lives in (`.` for a bare name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Distinguishes temp files of concurrent writes from one process (threads, tests).
static WRITE_SEQ: AtomicUsize = AtomicUsize::new(0);

const TEMP_PREFIX: &str = ".moerunner-";
const TEMP_SUFFIX: &str = ".tmp";

/// The temp file beside `path`: `.moerunner-<pid>-<n>.tmp`, a short name whatever the length of
/// the output's (a legal 255-byte output name still gets a legal temp name).
fn temp_path(path: &Path) -> PathBuf {
    parent_dir(path).join(format!(
        "{TEMP_PREFIX}{}-{}{TEMP_SUFFIX}",
        std::process::id(),
        WRITE_SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Removes temp files that writers killed mid-write left in `dir`: ours by name, and only those
/// whose process is gone (Linux: no `/proc/<pid>`), so a concurrent writer's file is never touched.
fn remove_stale_temps(dir: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(mid) = name
            .strip_prefix(TEMP_PREFIX)
            .and_then(|n| n.strip_suffix(TEMP_SUFFIX))
        else {
            continue;
        };
        let Some((pid, seq)) = mid.split_once('-') else {
            continue;
        };
        if pid.parse::<u32>().is_err() || seq.parse::<u64>().is_err() {
            continue;
        }
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Writes named tensors and metadata to `path` atomically: streamed into a temp file beside it,
/// synced, then renamed over `path`. On any error the temp file is removed and `path` is untouched.
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, HostTensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let invalid = |why: String| MoeError::invalid(format!("writing {}", path.display()), why);
    let mut seen = HashSet::new();
    for (name, t) in tensors {
        if name == "__metadata__" {
            return Err(invalid(
                "`__metadata__` is reserved by safetensors, not a tensor name".into(),
            ));
        }
        if !seen.insert(name.as_str()) {
            return Err(invalid(format!("tensor `{name}` given twice")));
        }
        let want = t.numel() * t.dtype.size();
        if t.bytes.len() != want {
            return Err(invalid(format!(
                "tensor `{name}` has {} bytes, {} {:?} needs {want}",
                t.bytes.len(),
                t.dtype,
                t.shape
            )));
        }
    }
    // Wider elements first (as the safetensors crate orders them): the header is padded to 8 bytes,
    // so every tensor then starts at a multiple of its element size inside the map.
    let mut order: Vec<&(String, HostTensor)> = tensors.iter().collect();
    order.sort_by(|(an, a), (bn, b)| b.dtype.size().cmp(&a.dtype.size()).then_with(|| an.cmp(bn)));
    let mut infos = Vec::with_capacity(order.len());
    let mut offset = 0;
    for (name, t) in &order {
        let n = t.bytes.len();
        infos.push((
            name.clone(),
            TensorInfo {
                dtype: dtype_to(t.dtype),
                shape: t.shape.clone(),
                data_offsets: (offset, offset + n),
            },
        ));
        offset += n;
    }
    // The header is built as a sorted JSON map (serde_json's default `Map` is a BTreeMap), not
    // serialized from `Metadata`, whose HashMaps iterate in a random order: the same layer must
    // give the same bytes. `Metadata::new` still checks offsets and sizes as every reader will.
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta: serde_json::Map<String, serde_json::Value> =
            metadata.into_iter().map(|(k, v)| (k, v.into())).collect();
        header.insert("__metadata__".into(), meta.into());
    }
    for (name, info) in &infos {
        header.insert(
            name.clone(),
            serde_json::to_value(info).map_err(|e| invalid(e.to_string()))?,
        );
    }
    Metadata::new(None, infos).map_err(|e| invalid(e.to_string()))?;
    let mut header = serde_json::to_vec(&header).map_err(|e| invalid(e.to_string()))?;
    header.resize(header.len().next_multiple_of(8), b' ');

    remove_stale_temps(&parent_dir(path));
    let tmp = temp_path(path);
    let write = || -> std::io::Result<()> {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for (_, t) in &order {
            w.write_all(&t.bytes)?;
        }
        // The data must be on disk before the new name points at it, or a crash could leave a
        // complete-looking but empty file under `path`.
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        MoeError::Io {
            path: path.display().to_string(),
            source,
        }
    })
}
