//! Run-time compilation of the kernel sources with NVRTC, for the device's exact architecture, with a
//! disk cache.
//!
//! The cache key covers everything that changes the binary: kernel name, the full source text (common
//! header included), the options (defines included), the architecture and the NVRTC version. Files are
//! written atomically (temporary file, then rename), so concurrent processes never read half a binary;
//! the source is kept beside each binary for inspection. `MOERUNNER_DUMP_PTX=DIR` also writes the PTX.
//! `MOERUNNER_KERNEL_CACHE=DIR` moves the cache; `MOERUNNER_KERNEL_CACHE=off` disables it.

use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result, sys};

use super::disk_cache::{cache_dir, fnv1a64, write_atomic};
use super::kernels::ModuleKey;
use crate::error::{MoeError, Result};

/// One compiled kernel module: a CUBIN for a real architecture (sm_90a, ...), plus its PTX.
pub struct Compiled {
    pub cubin: Vec<u8>,
    /// Whether the CUBIN came from the disk cache.
    pub cached: bool,
}

/// Whether libnvrtc can be loaded on this machine (checked before any call, which would panic).
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library; no NVRTC function is called.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's version as "major.minor".
pub fn version() -> Result<String> {
    if !available() {
        return Err(MoeError::Cuda(
            "libnvrtc (CUDA 13) was not found; put it on LD_LIBRARY_PATH".into(),
        ));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| MoeError::Cuda(format!("nvrtcVersion: {e:?}")))?;
    Ok(format!("{major}.{minor}"))
}

/// The options every kernel is compiled with, before its own defines.
pub fn base_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "-default-device".into(),
        "-lineinfo".into(),
    ]
}

/// Compiles module `key` for `arch` as a device loads it, or takes it from the cache: the one place
/// that turns a module key into NVRTC's name, options and source, so a cache warmed ahead of time
/// ([`warm_cache`]) is the cache a device reads.
pub fn compile_module(key: &ModuleKey, arch: &str) -> Result<Compiled> {
    compile(
        &key.label(),
        &key.source.full_text(),
        &module_options(key, arch),
        arch,
    )
}

/// [`compile_module`] without the cache, with the PTX and NVRTC's log (what the compile tests
/// inspect).
pub fn compile_module_fresh(key: &ModuleKey, arch: &str) -> Result<Fresh> {
    compile_fresh(
        &key.label(),
        &key.source.full_text(),
        &module_options(key, arch),
    )
}

/// The options module `key` is compiled with for `arch`: the base ones, then its defines.
fn module_options(key: &ModuleKey, arch: &str) -> Vec<String> {
    let mut options = base_options(arch);
    options.extend(key.defines.iter().cloned());
    options
}

/// What [`warm_cache`] did.
#[derive(Debug)]
pub struct Warmed {
    /// The cache folder.
    pub dir: PathBuf,
    pub modules: usize,
    /// Compiled now, and found already cached.
    pub compiled: usize,
    pub cached: usize,
    /// Modules that failed, each with NVRTC's error.
    pub failed: Vec<String>,
}

/// Compiles every module of `keys` for `arch` into the disk cache, in parallel on rayon's threads
/// (`RAYON_NUM_THREADS`): the first call of a layer then reads its kernels instead of compiling
/// them (hundreds of modules, minutes on one core). Needs no GPU: the cache key is the source,
/// options, architecture and NVRTC version. Refused when the cache is off or its folder cannot be
/// made; a module that fails is listed, the others are still compiled.
pub fn warm_cache(keys: &[ModuleKey], arch: &str) -> Result<Warmed> {
    use rayon::prelude::*;
    let dir = cache_dir().ok_or_else(|| {
        MoeError::invalid(
            "MOERUNNER_KERNEL_CACHE",
            "is `off`: there is no kernel cache to warm",
        )
    })?;
    std::fs::create_dir_all(&dir).map_err(|e| {
        MoeError::invalid(
            "MOERUNNER_KERNEL_CACHE",
            format!("cannot make the cache folder {}: {e}", dir.display()),
        )
    })?;
    version()?;
    let results: Vec<std::result::Result<bool, String>> = keys
        .par_iter()
        .map(|k| {
            compile_module(k, arch)
                .map(|c| c.cached)
                .map_err(|e| format!("{}: {e}", k.label()))
        })
        .collect();
    let cached = results.iter().filter(|r| matches!(r, Ok(true))).count();
    let compiled = results.iter().filter(|r| matches!(r, Ok(false))).count();
    let failed = results.into_iter().filter_map(|r| r.err()).collect();
    Ok(Warmed {
        dir,
        modules: keys.len(),
        compiled,
        cached,
        failed,
    })
}

/// Compiles `source` (already including the common header) for `arch`, or takes it from the cache.
pub fn compile(name: &str, source: &str, options: &[String], arch: &str) -> Result<Compiled> {
    let nvrtc_version = version()?;
    let key = format!(
        "{name}\n{arch}\nnvrtc {nvrtc_version}\n{}\n{source}",
        options.join(" ")
    );
    let stem = format!("{name}-{arch}-{:016x}", fnv1a64(key.as_bytes()));
    let cache = cache_dir();
    if let Some(dir) = &cache {
        if let Some(cubin) = read_cached(dir, &stem, &key) {
            return Ok(Compiled {
                cubin,
                cached: true,
            });
        }
    }
    let Fresh { cubin, ptx, .. } = compile_uncached(name, source, options)?;
    if let Ok(dir) = std::env::var("MOERUNNER_DUMP_PTX") {
        let dir = PathBuf::from(dir);
        // Best effort: a debugging aid must not fail the run.
        let _ = std::fs::create_dir_all(&dir)
            .and_then(|_| write_atomic(&dir.join(format!("{stem}.ptx")), ptx.as_bytes()));
    }
    if let Some(dir) = &cache {
        // The cache is an optimisation: a read-only or full disk only costs a recompile next time.
        let _ = store_cached(dir, &stem, &key, source, &cubin);
    }
    Ok(Compiled {
        cubin,
        cached: false,
    })
}

/// One compilation's products.
#[derive(Debug)]
pub struct Fresh {
    pub cubin: Vec<u8>,
    pub ptx: String,
    /// NVRTC's log of a successful compile: ptxas's notes (e.g. C7513, wgmma serialized).
    pub log: String,
}

/// ptxas's note that it serialized a kernel's wgmma (C7510..C7519 "Potential Performance Loss"):
/// the MMAs no longer overlap anything, a silent slowdown that CI's compile of every kernel refuses.
pub fn serialization_notes(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("Potential Performance Loss") || l.contains("is injected"))
        .collect()
}

/// Compiles without the disk cache (what CI's compile-every-kernel test uses).
pub fn compile_fresh(name: &str, source: &str, options: &[String]) -> Result<Fresh> {
    version()?;
    compile_uncached(name, source, options)
}

fn compile_uncached(name: &str, source: &str, options: &[String]) -> Result<Fresh> {
    let fail = |what: &str, e: result::NvrtcError| {
        MoeError::Cuda(format!("NVRTC {what} for kernel `{name}`: {e:?}"))
    };
    let src = CString::new(source)
        .map_err(|_| MoeError::Cuda(format!("kernel `{name}`: source contains a NUL byte")))?;
    let cname = CString::new(format!("{name}.cu"))
        .map_err(|_| MoeError::Cuda(format!("kernel `{name}`: name contains a NUL byte")))?;
    let prog = result::create_program(&src, Some(&cname)).map_err(|e| fail("create", e))?;
    // SAFETY: `prog` is live until the destroy at the end; every buffer is sized by NVRTC's own query.
    let outcome = unsafe {
        let compiled = result::compile_program(prog, options);
        let log = result::get_program_log(prog)
            .map(|l| c_chars_to_string(&l))
            .unwrap_or_default();
        match compiled {
            Err(e) => Err(MoeError::Cuda(format!(
                "NVRTC could not compile kernel `{name}` ({e:?}) with options `{}`:\n{}",
                options.join(" "),
                log.trim_end()
            ))),
            Ok(()) => {
                let ptx = result::get_ptx(prog).map(|p| c_chars_to_string(&p));
                let mut size = 0usize;
                let cubin = sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .and_then(|_| {
                        let mut buf = vec![0 as c_char; size];
                        sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr())
                            .result()
                            .map(|_| buf.into_iter().map(|c| c as u8).collect::<Vec<u8>>())
                    });
                match (cubin, ptx) {
                    (Ok(cubin), Ok(ptx)) if !cubin.is_empty() => Ok(Fresh { cubin, ptx, log }),
                    (Err(e), _) | (_, Err(e)) => Err(fail("output", e)),
                    _ => Err(MoeError::Cuda(format!(
                        "NVRTC gave no CUBIN for kernel `{name}`: the architecture must be a real one (sm_XX)"
                    ))),
                }
            }
        }
    };
    // SAFETY: created above and not destroyed before.
    let _ = unsafe { result::destroy_program(prog) };
    outcome
}

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn read_cached(dir: &Path, stem: &str, key: &str) -> Option<Vec<u8>> {
    let stored_key = std::fs::read_to_string(dir.join(format!("{stem}.key"))).ok()?;
    if stored_key != key {
        return None;
    }
    let cubin = std::fs::read(dir.join(format!("{stem}.cubin"))).ok()?;
    (!cubin.is_empty()).then_some(cubin)
}

fn store_cached(
    dir: &Path,
    stem: &str,
    key: &str,
    source: &str,
    cubin: &[u8],
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    write_atomic(&dir.join(format!("{stem}.cu")), source.as_bytes())?;
    // The binary lands before its key, so a key on disk always has its binary.
    write_atomic(&dir.join(format!("{stem}.cubin")), cubin)?;
    write_atomic(&dir.join(format!("{stem}.key")), key.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The notes as NVRTC 13.0's ptxas wrote them for the decoded formats' GEMM before its loop was
    /// restructured (2026-12-07), and for a fold that read an accumulator in flight.
    #[test]
    fn serialization_notes_are_found_in_a_log() {
        let log = "ptxas info    : (C7513) Potential Performance Loss: wgmma.mma_async instructions are \
                   serialized due to non wgmma instructions defining input registers of a wgmma between \
                   start and end of the pipeline stage in the function 'moe_gemm' in line 0\n\
                   ptxas info    : (C7517) wgmma.wait_group is injected in around line 1176 by compiler \
                   to allow use of registers defined by GMMA in function 'moe_gemm'\n\
                   ptxas info    : 0 bytes gmem\n";
        assert_eq!(serialization_notes(log).len(), 2);
        assert!(
            serialization_notes("ptxas info    : Used 168 registers, used 1 barriers\n").is_empty()
        );
    }
}
