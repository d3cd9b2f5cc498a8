//! The CUDA backend: the whole layer on an NVIDIA GPU, with kernels compiled at run time by NVRTC
//! for the device's exact architecture (sm_90a on Hopper).
//!
//! cudarc is loaded dynamically, so this builds anywhere; with no driver, no GPU or no NVRTC,
//! `create` returns the reason and the runner falls back. Without the `cuda` feature only the stub
//! `create` exists (same API). `prepare` (weight layout) is plain host code and always built.
//!
//! Adding Blackwell (sm_100a) is adding kernel variants to `kernels` and choosing them by
//! `Device::arch`; the layer, workspace and launch sequence do not change.

pub mod codec;
pub mod cubin;
pub mod disk_cache;
pub mod kernels;
pub mod prepare;
pub mod tactics;

#[cfg(feature = "cuda")]
pub mod ceilings;
#[cfg(feature = "cuda")]
pub mod dense;
#[cfg(feature = "cuda")]
pub mod device;
#[cfg(feature = "cuda")]
pub mod device_call;
#[cfg(feature = "cuda")]
pub mod launch;
#[cfg(feature = "cuda")]
pub mod layer;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
pub mod online_quant;
#[cfg(feature = "cuda")]
pub mod pipeline;
#[cfg(feature = "cuda")]
pub mod quant_bench;
#[cfg(feature = "cuda")]
pub mod timing;
#[cfg(feature = "cuda")]
pub mod tune;
#[cfg(feature = "cuda")]
pub mod workspace;

use crate::config::LayerConfig;
use crate::dense::DenseLinear;
use crate::error::Result;
use crate::tensor::HostTensor;

/// What `moerunner gemm --backend cuda` measured (`dense_bench`): the GPU's output, its median
/// time, and cuBLASLt's per-tensor fp8 GEMM at the same M, N, K in the same run.
#[derive(Clone, Debug)]
pub struct DenseGpuReport {
    pub device: String,
    /// `[M, N]`, the bf16 outputs widened to f32.
    pub output: Vec<f32>,
    /// Median of graph replays, L2 flushed before each (µs).
    pub median_us: f64,
    /// cuBLASLt fp8 (per-tensor, unit scales, bf16 out), timed the same way (µs).
    pub cublas_fp8_us: Option<f64>,
    /// Why there is no cuBLASLt time, if there is none.
    pub cublas_error: Option<String>,
}

/// A dense linear layer on the GPU with its timing and cuBLASLt's ceiling (`dense::bench`); the
/// same entry without the `cuda` feature, always unavailable.
pub fn dense_bench(linear: &DenseLinear, x: &HostTensor, iters: usize) -> Result<DenseGpuReport> {
    #[cfg(feature = "cuda")]
    {
        dense::bench(linear, x, iters)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (linear, x, iters);
        Err(crate::error::MoeError::Cuda(
            "this build has no CUDA backend (the `cuda` feature is off)".into(),
        ))
    }
}

/// Whether the CUDA backend runs `config` (its codec, `codec::codec_for`); the same answer with or
/// without a GPU, so `info` and the runner's "no backend" message can say it on any machine.
pub fn supports_config(config: &LayerConfig) -> std::result::Result<(), String> {
    codec::codec_for(config).map(|_| ())
}

#[cfg(feature = "cuda")]
mod backend_impl {
    use std::sync::Arc;

    use super::device::Device;
    use super::layer::CudaLayer;
    use crate::backend::{Backend, BackendInfo, DeviceCeilings, LoadedLayer};
    use crate::config::LayerConfig;
    use crate::error::Result;
    use crate::weights::MoeLayer;

    pub struct CudaBackend {
        dev: Arc<Device>,
    }

    impl CudaBackend {
        pub fn device(&self) -> &Arc<Device> {
            &self.dev
        }
    }

    impl Backend for CudaBackend {
        fn name(&self) -> &'static str {
            "cuda"
        }
        fn info(&self) -> BackendInfo {
            BackendInfo {
                name: "cuda",
                devices: vec![format!(
                    "GPU {}: {} ({}, {} SMs, {:.0} GiB)",
                    self.dev.ordinal,
                    self.dev.name,
                    self.dev.arch,
                    self.dev.sm_count,
                    self.dev.total_memory as f64 / (1u64 << 30) as f64
                )],
                supports: super::codec::supports_lines(),
            }
        }
        fn supports(&self, config: &LayerConfig) -> std::result::Result<(), String> {
            let wgmma_on = super::pipeline::wgmma_allowed(&self.dev.arch);
            let codec = super::codec::codec_for_device(config, wgmma_on)?;
            let wgmma_only = !codec.runs_without_wgmma();
            if wgmma_only && !wgmma_on {
                return Err(format!(
                    "{}: {}",
                    codec.summary,
                    super::pipeline::needs_wgmma_reason(&self.dev.arch)
                ));
            }
            Ok(())
        }
        fn load(&self, layer: Arc<MoeLayer>) -> Result<Box<dyn LoadedLayer>> {
            Ok(Box::new(CudaLayer::load(self.dev.clone(), layer)?))
        }
        fn measure_ceilings(&self) -> Option<Result<DeviceCeilings>> {
            Some(super::ceilings::measure(&self.dev).map(|c| DeviceCeilings {
                read_gbps: c.copy_gbps,
                bf16_tflops: c.bf16_tflops,
                fp8_tflops: c.fp8_tflops,
            }))
        }
    }

    /// The backend on GPU 0 (`MOERUNNER_CUDA_DEVICE` picks another), or why it is unavailable.
    pub fn create() -> Result<Box<dyn Backend>> {
        Ok(Box::new(create_concrete()?))
    }

    pub fn create_concrete() -> Result<CudaBackend> {
        let ordinal = std::env::var("MOERUNNER_CUDA_DEVICE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(CudaBackend {
            dev: Device::open(ordinal)?,
        })
    }

    /// The backend on GPU `ordinal` (one rank per GPU: `parallel::forward_nccl`).
    pub fn create_on(ordinal: usize) -> Result<Box<dyn Backend>> {
        Ok(Box::new(CudaBackend {
            dev: Device::open(ordinal)?,
        }))
    }
}

#[cfg(feature = "cuda")]
pub use backend_impl::{create, create_concrete, create_on, CudaBackend};

/// Without the `cuda` feature: the same entry point, always unavailable.
#[cfg(not(feature = "cuda"))]
pub fn create() -> crate::error::Result<Box<dyn super::Backend>> {
    Err(crate::error::MoeError::Cuda(
        "this build has no CUDA backend (the `cuda` feature is off)".into(),
    ))
}

/// Without the `cuda` feature: always unavailable.
#[cfg(not(feature = "cuda"))]
pub fn create_on(_ordinal: usize) -> crate::error::Result<Box<dyn super::Backend>> {
    create()
}
