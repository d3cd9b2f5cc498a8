//! The CUDA backend's folder on disk and how files land in it: compiled kernels (`nvrtc.rs`) and
//! the measured tactic table (`tactics.rs`). Plain Rust, so the table's tests run anywhere.
//!
//! `MOERUNNER_KERNEL_CACHE=DIR` moves the folder; `MOERUNNER_KERNEL_CACHE=off` disables it (no
//! kernel is cached, no tactic table is read or written).

use std::path::{Path, PathBuf};

/// The folder, or None when the cache is off (or there is no home to put it under).
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var("MOERUNNER_KERNEL_CACHE") {
        Ok(v) if v == "off" => None,
        Ok(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|base| base.join("moerunner").join("kernels")),
    }
}

/// 64-bit FNV-1a: stable across builds and platforms (unlike std's hasher), which a disk key needs.
/// Collisions are caught by comparing the stored key text.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`: a reader (another
/// process too) sees the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
