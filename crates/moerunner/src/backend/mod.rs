//! Backends: each one file (or folder) behind the [`Backend`] trait, declaring what it supports.
//! The runner only ever talks to this trait (it never names a concrete backend's type).

pub mod cpu;
pub mod cuda;
pub mod reference;

use std::sync::Arc;

use crate::config::LayerConfig;
use crate::error::Result;
use crate::forward::{ForwardInput, ForwardOutput};
use crate::weights::MoeLayer;

/// What `moerunner info` prints about a backend.
#[derive(Clone, Debug)]
pub struct BackendInfo {
    pub name: &'static str,
    /// Devices the backend runs on, in words (e.g. "2 CPU threads", "NVIDIA H100 80GB (sm_90a)").
    pub devices: Vec<String>,
    /// Supported weight × activation pairs and features, in words.
    pub supports: Vec<String>,
}

pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    fn info(&self) -> BackendInfo;
    /// Ok when this backend can run `config`; otherwise the reason, in words, for the user.
    fn supports(&self, config: &LayerConfig) -> std::result::Result<(), String>;
    /// Whether automatic choice may pick this backend (the slow float64 reference may not).
    fn auto_eligible(&self) -> bool {
        true
    }
    /// Prepares a layer (weight layout, workspaces) once; the result runs many forward calls.
    fn load(&self, layer: Arc<MoeLayer>) -> Result<Box<dyn LoadedLayer>>;
    /// The device's ceilings measured now, for backends with a device of their own (the GPU);
    /// `None` means the host's (measured by `bench` itself).
    fn measure_ceilings(&self) -> Option<Result<DeviceCeilings>> {
        None
    }
}

/// One stage of a backend's launch sequence, timed as its prefix: the device time of the stages up
/// to and including it (`cumulative_us`), and what it adds to the ones before (`marginal_us`, which
/// under overlapping launches is the stage's cost on the critical path, not its time alone).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct StageTime {
    pub stage: String,
    pub cumulative_us: f64,
    pub marginal_us: f64,
}

/// A device's measured limits (`spec/performance.md`, "Floor").
#[derive(Clone, Copy, Debug)]
pub struct DeviceCeilings {
    /// Copy bandwidth, GB/s, bytes read + written.
    pub read_gbps: f64,
    pub bf16_tflops: f64,
    pub fp8_tflops: Option<f64>,
}

/// A layer prepared by one backend.
pub trait LoadedLayer: Send + Sync {
    fn backend(&self) -> &'static str;
    fn layer(&self) -> &MoeLayer;
    fn forward(&self, input: &ForwardInput<'_>) -> Result<ForwardOutput>;
    /// Median device time (µs) of the forward pass alone, for backends that can time it without
    /// the host transfers (the GPU: CUDA-graph replay, L2 flushed between runs). `None`: time
    /// `forward` from the host.
    fn time_device_forward(&self, _input: &ForwardInput<'_>, _iters: usize) -> Option<Result<f64>> {
        None
    }
    /// Where the device time of the backend's standard launch sequence goes, stage by stage: each
    /// prefix of its stages timed as `time_device_forward` times the whole (the GPU: route, sort,
    /// quantize, GEMM1, …, combine; never the fused small-batch kernel). `None`: no stages to time.
    fn time_device_stages(
        &self,
        _input: &ForwardInput<'_>,
        _iters: usize,
    ) -> Option<Result<Vec<StageTime>>> {
        None
    }
    /// What the backend's weight preparation did to the layer, when it changed its size (the GPU's
    /// alignment padding and the memory it costs), for the load log.
    fn preparation(&self) -> Option<String> {
        None
    }
    /// Which of its kernel paths the backend runs this layer on, where a format has more than one
    /// (the GPU's mxfp8: `e4m3_block` or `mxfp8_decoded`, `codec::GemmFormat::name`); for bench rows.
    fn kernel_path(&self) -> Option<&'static str> {
        None
    }
    /// The GEMM tactic a call of `tokens` tokens takes, where the backend has tactics (the GPU's
    /// token-tile width and main loops, `backend/cuda/tactics.rs`, or `fused_small_batch` where the
    /// call runs the GPU's fused small-batch kernel instead of the GEMMs); for bench rows.
    fn tactic(&self, _tokens: usize) -> Option<String> {
        None
    }
    /// Device memory the layer's workspace takes for calls of `tokens` tokens besides its weights,
    /// where the backend keeps one (the GPU: `CudaLayer::workspace_bytes` of its device entry);
    /// None on the host backends.
    fn workspace_bytes(&self, _tokens: usize) -> Option<usize> {
        None
    }
    /// The CUDA layer behind this one, for code that drives the GPU's device entry itself (expert
    /// parallelism on device buffers, `parallel::device_ep`); None on the other backends.
    #[cfg(feature = "cuda")]
    fn as_cuda(&self) -> Option<&cuda::layer::CudaLayer> {
        None
    }
}
