//! The CUDA backend: the whole layer on an NVIDIA GPU, with kernels compiled at run time by NVRTC
//! for the device's exact architecture (sm_90a on Hopper).
//!
//! cudarc is loaded dynamically, so this builds anywhere; with no driver, no GPU or no NVRTC,
//! `create` returns the reason and the runner falls back. Without the `cuda` feature only the stub
//! `create` exists (same API). `prepare` (weight layout) is plain host code and always built.
//!
//! Adding Blackwell (sm_100a) is adding kernel variants to `kernels` and choosing them by
//! `Device::arch`; the layer, workspace and launch sequence do not change.

pub mod prepare;

#[cfg(feature = "cuda")]
pub mod ceilings;
#[cfg(feature = "cuda")]
pub mod device;
#[cfg(feature = "cuda")]
pub mod kernels;
#[cfg(feature = "cuda")]
pub mod launch;
#[cfg(feature = "cuda")]
pub mod layer;
#[cfg(feature = "cuda")]
pub mod nvrtc;

use crate::config::{ActivationFormat, LayerConfig, WeightFormat};

/// What the CUDA kernels of this issue cover; the same answer with or without a GPU, so `info` and
/// the runner's "no backend" message can say it on any machine.
pub fn supports_config(config: &LayerConfig) -> std::result::Result<(), String> {
    let legal = matches!(
        (config.weight_format, config.activation_format),
        (WeightFormat::Bf16, ActivationFormat::Bf16)
            | (WeightFormat::Fp8, ActivationFormat::Fp8)
            | (WeightFormat::Fp8Block, ActivationFormat::Fp8Block)
    );
    if !legal {
        return Err(format!(
            "the CUDA backend runs bf16×bf16, fp8×fp8 and fp8_block×fp8_block layers, not {}×{}",
            config.weight_format.name(),
            config.activation_format.name()
        ));
    }
    if config.weight_format == WeightFormat::Fp8Block
        && config.activation.is_gated()
        && !config.intermediate.is_multiple_of(8)
    {
        return Err(format!(
            "fp8_block on CUDA needs I % 8 == 0 (I = {}): gate/up rows are interleaved in groups of 8 \
             that must share a scale block",
            config.intermediate
        ));
    }
    if config.num_experts > MAX_ROUTING_EXPERTS {
        return Err(format!(
            "the CUDA routing kernel handles up to {MAX_ROUTING_EXPERTS} experts, not {}",
            config.num_experts
        ));
    }
    Ok(())
}

/// Largest E the routing kernel handles (keys of one token live in shared memory).
pub const MAX_ROUTING_EXPERTS: usize = 2048;

pub const SUPPORTS: &[&str] = &[
    "bf16 × bf16, fp8 × fp8 (static), fp8_block × fp8_block (1×128 dynamic)",
    "all ten routing methods on the GPU, routed ids+weights and packed",
    "swiglu, geglu, swiglu_oai, relu2; biases; every W13 order",
    "EP and TP ranks (partial sums)",
];

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
                supports: super::SUPPORTS.iter().map(|s| s.to_string()).collect(),
            }
        }
        fn supports(&self, config: &LayerConfig) -> std::result::Result<(), String> {
            super::supports_config(config)
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
}

#[cfg(feature = "cuda")]
pub use backend_impl::{create, create_concrete, CudaBackend};

/// Without the `cuda` feature: the same entry point, always unavailable.
#[cfg(not(feature = "cuda"))]
pub fn create() -> crate::error::Result<Box<dyn super::Backend>> {
    Err(crate::error::MoeError::Cuda(
        "this build has no CUDA backend (the `cuda` feature is off)".into(),
    ))
}
