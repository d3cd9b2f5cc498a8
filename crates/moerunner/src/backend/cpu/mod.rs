//! The fast CPU backend: multithreaded, deterministic, tokens grouped by expert so each expert's
//! weights are decoded once per call in cache-sized blocks.
//!
//! Codemap: `plan` groups (token, slot) pairs by expert and cuts rows into work items; `rows`
//! reads one projection's rows and factors; `simd` decodes weights in registers (AVX2+FMA or
//! scalar) and holds all `unsafe`; `gemm` multiplies one item; `forward` runs the phases.

mod forward;
mod gemm;
mod plan;
mod rows;
mod simd;

use std::sync::Arc;

use super::{Backend, BackendInfo, LoadedLayer};
use crate::config::LayerConfig;
use crate::error::Result;
use crate::forward::{ForwardInput, ForwardOutput};
use crate::weights::MoeLayer;

pub use simd::Isa;

/// `out[i * n + j] = Σ_c a[i * k + c] · b[j * k + c]`: the dense f32 GEMM the CPU path uses for
/// many tokens, exposed so `bench` measures the matrix-rate ceiling with the same kernel.
pub fn dense_sgemm(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], out: &mut [f32]) {
    simd::sgemm_abt(m, n, k, a, b, out, n);
}

pub struct CpuBackend;

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: self.name(),
            devices: vec![format!(
                "{} CPU threads, {} kernels",
                rayon::current_num_threads(),
                Isa::detect().name()
            )],
            supports: vec!["every format, routing method and activation of the spec".into()],
        }
    }
    fn supports(&self, _config: &LayerConfig) -> std::result::Result<(), String> {
        Ok(())
    }
    fn load(&self, layer: Arc<MoeLayer>) -> Result<Box<dyn LoadedLayer>> {
        Ok(Box::new(CpuLayer::new(layer, Isa::detect())))
    }
}

/// A layer loaded on the CPU backend. Public so tests and benchmarks can pick the kernels
/// ([`Isa::Scalar`] runs anywhere; [`CpuLayer::new`] falls back to it when the CPU lacks one).
pub struct CpuLayer {
    layer: Arc<MoeLayer>,
    isa: Isa,
    w13: rows::ProjectionPlan,
    w2: rows::ProjectionPlan,
    max_chunk_tokens: usize,
}

impl CpuLayer {
    /// Prepares `layer` for the kernels of `isa` (the scalar ones if this CPU cannot run `isa`).
    pub fn new(layer: Arc<MoeLayer>, isa: Isa) -> CpuLayer {
        let isa = if isa.available() { isa } else { Isa::Scalar };
        let w13 = rows::ProjectionPlan::new(&layer.weights().w13, isa);
        let w2 = rows::ProjectionPlan::new(&layer.weights().w2, isa);
        CpuLayer {
            layer,
            isa,
            w13,
            w2,
            max_chunk_tokens: usize::MAX,
        }
    }
    /// Caps the tokens one pass holds intermediates for (by default only a memory budget of
    /// 256 MiB does); each pass re-reads the routed experts' weights.
    pub fn with_max_chunk_tokens(mut self, tokens: usize) -> CpuLayer {
        self.max_chunk_tokens = tokens.max(1);
        self
    }
    /// The kernels this layer runs.
    pub fn isa(&self) -> Isa {
        self.isa
    }
}

impl LoadedLayer for CpuLayer {
    fn backend(&self) -> &'static str {
        "cpu"
    }
    fn layer(&self) -> &MoeLayer {
        &self.layer
    }
    fn forward(&self, input: &ForwardInput<'_>) -> Result<ForwardOutput> {
        forward::run(self, input)
    }
}
