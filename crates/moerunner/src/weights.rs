//! The tensors of a layer: quantized expert weights with their scales, biases, static input scales
//! and the router bias, plus [`MoeLayer`], the validated pairing of a config with its tensors.
//!
//! Invariant: a `MoeLayer` that exists has passed every check of `spec/layer-file.md` — shapes agree
//! with the config, scales are finite (no UE8M0 255, no NaN), formats pair legally. Backends and the
//! reference therefore never re-validate weights.

use std::sync::Arc;

use crate::config::{LayerConfig, WeightFormat};
use crate::error::{MoeError, Result};
use crate::tensor::Bytes;

/// Per-block scales of a quantized tensor, in the linear layout of `spec/formats.md`.
#[derive(Clone, Debug, PartialEq)]
pub enum BlockScales {
    /// bf16: no scale.
    None,
    /// fp8 per-tensor: one f32 per expert, `[E]`.
    PerExpert(Vec<f32>),
    /// fp8_block: f32 `[E, ceil(rows/128), ceil(cols/128)]`.
    Block128(Vec<f32>),
    /// mxfp8 / mxfp4: UE8M0 bytes `[E, rows, cols/32]`.
    Ue8m0(Vec<u8>),
    /// nvfp4: E4M3 bytes `[E, rows, cols/16]` (multiplied by the per-expert global scale).
    E4m3(Vec<u8>),
}

/// One projection (W13 or W2) of all held experts: logically `[experts, rows, cols]`,
/// row = output feature, column = input feature (K).
#[derive(Clone, Debug)]
pub struct QuantizedTensor {
    pub format: WeightFormat,
    pub experts: usize,
    pub rows: usize,
    pub cols: usize,
    /// bf16: 2 bytes LE per element; fp8/fp8_block/mxfp8: one E4M3 byte per element;
    /// mxfp4/nvfp4: `cols / 2` bytes per row, element 2i in the low nibble.
    pub data: Bytes,
    pub scales: BlockScales,
    /// nvfp4 only: the per-expert global scale `[E]` (`weight_scale_2`); empty otherwise.
    pub global_scales: Vec<f32>,
}

impl QuantizedTensor {
    /// Concatenates single-expert (or any) quantized tensors of one format and shape along experts.
    pub fn concat_experts(parts: Vec<QuantizedTensor>) -> Result<QuantizedTensor> {
        let first = parts
            .first()
            .ok_or_else(|| MoeError::invalid("concat_experts", "no parts"))?;
        let (format, rows, cols) = (first.format, first.rows, first.cols);
        // Reserved whole: growing by doubling would briefly hold two copies of the result.
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        let mut globals = Vec::new();
        let mut experts = 0;
        let mut scales = match &first.scales {
            BlockScales::None => BlockScales::None,
            BlockScales::PerExpert(_) => BlockScales::PerExpert(Vec::new()),
            BlockScales::Block128(_) => BlockScales::Block128(Vec::new()),
            BlockScales::Ue8m0(_) => BlockScales::Ue8m0(Vec::new()),
            BlockScales::E4m3(_) => BlockScales::E4m3(Vec::new()),
        };
        for part in parts {
            if part.format != format || part.rows != rows || part.cols != cols {
                return Err(MoeError::invalid(
                    "concat_experts",
                    "parts differ in format or shape",
                ));
            }
            experts += part.experts;
            data.extend_from_slice(&part.data);
            globals.extend_from_slice(&part.global_scales);
            match (&mut scales, &part.scales) {
                (BlockScales::None, BlockScales::None) => {}
                (BlockScales::PerExpert(a), BlockScales::PerExpert(b))
                | (BlockScales::Block128(a), BlockScales::Block128(b)) => a.extend_from_slice(b),
                (BlockScales::Ue8m0(a), BlockScales::Ue8m0(b))
                | (BlockScales::E4m3(a), BlockScales::E4m3(b)) => a.extend_from_slice(b),
                _ => {
                    return Err(MoeError::invalid(
                        "concat_experts",
                        "parts differ in scale kind",
                    ))
                }
            }
        }
        Ok(QuantizedTensor {
            format,
            experts,
            rows,
            cols,
            data: data.into(),
            scales,
            global_scales: globals,
        })
    }

    /// Bytes of one expert's element data.
    /// Bytes of the tensor: element data, block scales and globals.
    pub fn byte_size(&self) -> usize {
        let scales = match &self.scales {
            BlockScales::None => 0,
            BlockScales::PerExpert(s) | BlockScales::Block128(s) => 4 * s.len(),
            BlockScales::Ue8m0(b) | BlockScales::E4m3(b) => b.len(),
        };
        self.data.len() + scales + 4 * self.global_scales.len()
    }
    pub fn expert_data_bytes(&self) -> usize {
        match self.format {
            WeightFormat::Bf16 => self.rows * self.cols * 2,
            WeightFormat::Mxfp4 | WeightFormat::Nvfp4 => self.rows * self.cols / 2,
            _ => self.rows * self.cols,
        }
    }
    /// Bytes of one row of element data.
    pub fn row_data_bytes(&self) -> usize {
        self.expert_data_bytes() / self.rows.max(1)
    }
    /// The element bytes of expert `e` (local index).
    pub fn expert_data(&self, e: usize) -> &[u8] {
        let n = self.expert_data_bytes();
        &self.data[e * n..(e + 1) * n]
    }
    pub fn shared(self) -> Arc<Self> {
        Arc::new(self)
    }
}

/// All tensors of one layer. Biases are held as f32 whatever their file dtype (BF16 is exact in f32).
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// `[E_local, M, H]`, M = 2I (gated, rows in `config.w13_order`) or I.
    pub w13: QuantizedTensor,
    /// `[E_local, H, I]`.
    pub w2: QuantizedTensor,
    /// `[E_local, M]`.
    pub w13_bias: Option<Vec<f32>>,
    /// `[E_local, H]`; on TP ranks other than 0 it is dropped by sharding (added once).
    pub w2_bias: Option<Vec<f32>>,
    /// fp8 / nvfp4 static: GEMM1's activation scale.
    pub w13_input_scale: Option<f32>,
    /// fp8 / nvfp4 static: GEMM2's activation scale.
    pub w2_input_scale: Option<f32>,
    /// `[E]` global: deepseek_v3 / minimax2 selection bias.
    pub router_bias: Option<Vec<f32>>,
}

/// A validated layer: config plus tensors. Construct with [`MoeLayer::new`] (validate.rs).
#[derive(Clone, Debug)]
pub struct MoeLayer {
    config: LayerConfig,
    weights: LayerWeights,
}

impl MoeLayer {
    /// Pairs tensors that have passed `validate_layer`: only [`MoeLayer::new`] (in validate.rs, so
    /// that this module of plain types imports nothing above it) calls this.
    pub(crate) fn from_validated(config: LayerConfig, weights: LayerWeights) -> Self {
        MoeLayer { config, weights }
    }
    pub fn config(&self) -> &LayerConfig {
        &self.config
    }
    pub fn weights(&self) -> &LayerWeights {
        &self.weights
    }
    pub fn into_parts(self) -> (LayerConfig, LayerWeights) {
        (self.config, self.weights)
    }
}
