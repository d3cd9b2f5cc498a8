//! The GPU's ceilings, measured in the same run as a benchmark (spec/performance.md): device-to-device
//! copy bandwidth (bytes read + written) and dense 8192³ GEMM rates through cuBLASLt in bf16 and fp8
//! (per-tensor scaled e4m3, bf16 output), on random data (never zeros: they run faster); and any
//! M × N × K through [`cublaslt_gemm_us`], the ceiling `moerunner gemm` compares its dense GEMM with.

use std::ffi::c_void;

use super::device::{cuda_err, Device};
use super::timing::time_median_us;
use crate::error::{MoeError, Result};
use crate::rng::SeededRng;
use cudarc::cublaslt::{result as lt, sys as ltsys};

pub struct GpuCeilings {
    pub copy_gbps: f64,
    pub bf16_tflops: f64,
    pub fp8_tflops: Option<f64>,
}

pub fn measure(dev: &Device) -> Result<GpuCeilings> {
    let copy_gbps = copy_bandwidth(dev)?;
    let bf16_tflops = gemm_tflops(dev, false)?;
    // fp8 GEMM needs sm_89+; report null where cuBLASLt has no kernel for it.
    let fp8_tflops = gemm_tflops(dev, true).ok();
    Ok(GpuCeilings {
        copy_gbps,
        bf16_tflops,
        fp8_tflops,
    })
}

/// Device-to-device copy bandwidth in GB/s, bytes read + written (2 GiB copied, median of 10).
pub fn copy_bandwidth(dev: &Device) -> Result<f64> {
    const BYTES: usize = 2 << 30;
    let src = dev.alloc(BYTES)?;
    let mut dst = dev.alloc(BYTES)?;
    let us = time_median_us(dev, 2, 10, &mut || Ok(()), &mut || {
        dev.stream
            .memcpy_dtod(src.slice(), dst.slice_mut())
            .map_err(|e| cuda_err("device-to-device copy", e))
    })?;
    Ok(2.0 * BYTES as f64 / us / 1e3)
}

/// Random e4m3 (never NaN) or bf16 values in [-1, 1], as bytes.
fn random_matrix(n: usize, fp8: bool, seed: u64) -> Vec<u8> {
    let mut rng = SeededRng::new(seed);
    if fp8 {
        (0..n)
            .map(|_| crate::formats::e4m3::encode(rng.uniform(-1.0, 1.0)))
            .collect()
    } else {
        (0..n)
            .flat_map(|_| half::bf16::from_f32(rng.uniform(-1.0, 1.0)).to_le_bytes())
            .collect()
    }
}

fn lt_err(what: &str, e: impl std::fmt::Debug) -> MoeError {
    MoeError::Cuda(format!("cuBLASLt {what}: {e:?}"))
}

/// Dense 8192³ GEMM rate through cuBLASLt (TFLOP/s), caches warm as in its own benchmarks.
fn gemm_tflops(dev: &Device, fp8: bool) -> Result<f64> {
    const N: usize = 8192;
    let us = cublaslt_gemm_us(dev, (N, N, N), fp8, false)?;
    Ok(2.0 * (N as f64).powi(3) / us / 1e6)
}

/// Median time (µs) of one dense GEMM through cuBLASLt, y[M, N] (bf16) = x[M, K] · W[N, K]ᵀ with x
/// and W in bf16 or per-tensor e4m3 (unit scales), on random data: cuBLAS's column-major
/// D[N, M] = Aᵀ·B with A = W (K × N, transposed: "TN", as fp8 requires) and B = x (K × M). With
/// `flush_l2` the L2 is flushed before each timed run (as `timing::time_graph_replay_us` does, so
/// the two compare like with like). An error where cuBLASLt has no algorithm for the shape (fp8
/// needs sm_89+ and 16-byte-aligned leading dimensions).
pub fn cublaslt_gemm_us(
    dev: &Device,
    (m, n, k): (usize, usize, usize),
    fp8: bool,
    flush_l2: bool,
) -> Result<f64> {
    // SAFETY: dlopen only.
    if !unsafe { ltsys::is_culib_present() } {
        return Err(MoeError::Cuda("libcublasLt (CUDA 13) was not found".into()));
    }
    let a = dev.upload(&random_matrix(n * k, fp8, 11))?;
    let b = dev.upload(&random_matrix(m * k, fp8, 12))?;
    let d = dev.alloc(m * n * 2)?;
    let flush_buf = if flush_l2 {
        Some(dev.alloc(super::timing::L2_FLUSH_BYTES)?)
    } else {
        None
    };
    let ws_bytes = 64usize << 20;
    let ws = dev.alloc(ws_bytes)?;
    let in_type = if fp8 {
        ltsys::cudaDataType::CUDA_R_8F_E4M3
    } else {
        ltsys::cudaDataType::CUDA_R_16BF
    };
    let out_type = ltsys::cudaDataType::CUDA_R_16BF;
    let handle = lt::create_handle().map_err(|e| lt_err("handle", e))?;
    let desc = lt::create_matmul_desc(
        ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ltsys::cudaDataType::CUDA_R_32F,
    )
    .map_err(|e| lt_err("matmul descriptor", e))?;
    // cublasOperation_t: CUBLAS_OP_T = 1 (an i32 enum in cuBLAS; cuBLASLt takes it by value).
    let transa: i32 = 1;
    // SAFETY: attribute buffers are the documented types and sizes.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc,
            ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &transa as *const _ as *const c_void,
            std::mem::size_of_val(&transa),
        )
    }
    .map_err(|e| lt_err("transA", e))?;
    let (mu, nu, ku) = (m as u64, n as u64, k as u64);
    let la =
        lt::create_matrix_layout(in_type, ku, nu, k as i64).map_err(|e| lt_err("layout", e))?;
    let lb =
        lt::create_matrix_layout(in_type, ku, mu, k as i64).map_err(|e| lt_err("layout", e))?;
    let ld =
        lt::create_matrix_layout(out_type, nu, mu, n as i64).map_err(|e| lt_err("layout", e))?;
    let pref = lt::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
    // SAFETY: as above.
    unsafe {
        lt::set_matmul_pref_attribute(
            pref,
            ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &ws_bytes as *const _ as *const c_void,
            std::mem::size_of_val(&ws_bytes),
        )
    }
    .map_err(|e| lt_err("workspace preference", e))?;
    // SAFETY: descriptors created above.
    let heuristic = unsafe { lt::get_matmul_algo_heuristic(handle, desc, la, lb, ld, ld, pref) }
        .map_err(|e| {
            lt_err(
                if fp8 {
                    "has no fp8 algorithm here"
                } else {
                    "has no bf16 algorithm here"
                },
                e,
            )
        })?;
    let (alpha, beta) = (1.0f32, 0.0f32);
    let stream = dev.stream.cu_stream() as ltsys::cudaStream_t;
    let mut between = || match &flush_buf {
        Some(f) => super::timing::flush(dev, f),
        None => Ok(()),
    };
    let result = time_median_us(dev, 3, 10, &mut between, &mut || {
        // SAFETY: every buffer is live and sized for its layout's elements of its type.
        unsafe {
            lt::matmul(
                handle,
                desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                a.ptr() as *const c_void,
                la,
                b.ptr() as *const c_void,
                lb,
                d.ptr() as *const c_void,
                ld,
                d.ptr() as *mut c_void,
                ld,
                &heuristic.algo,
                ws.ptr() as *mut c_void,
                ws_bytes,
                stream,
            )
        }
        .map_err(|e| lt_err("matmul", e))
    });
    // SAFETY: created above, destroyed once.
    unsafe {
        let _ = lt::destroy_matmul_pref(pref);
        let _ = lt::destroy_matrix_layout(la);
        let _ = lt::destroy_matrix_layout(lb);
        let _ = lt::destroy_matrix_layout(ld);
        let _ = lt::destroy_matmul_desc(desc);
        let _ = lt::destroy_handle(handle);
    }
    result
}
