//! Launcher of `decode.cu`: the fused small-batch layer — GEMM1 with the activation, the
//! intermediate's quantization, GEMM2 and the combine in one persistent, cooperative kernel after
//! routing, the input's quantization included — and its compiled forms (`DecodeVariant`): one
//! body for the formats whose weights the kernel reads as stored (bf16, fp8, fp8_block), one for
//! the tiled microscaling formats (`decode_tiled.cuh`: mxfp8, mxfp4, nvfp4).

use super::super::codec::{Codec, GemmFormat, InterStore, RowQuant};
use super::moe_gemm::GemmStage;
use super::{kernel_args, In, ModuleKey, Out, Shape, Source, Void};
use crate::config::LayerConfig;

kernel_args! {
    /// One CTA per SM, all resident (cooperative): phase 1 (pair, feature) items, a grid barrier,
    /// phase 2 (token, output row) items.
    pub struct MoeDecode for Decode::"moe_decode", pdl = true, cooperative = true {
        /// [E_local, M1p, Hp] prepared W13, its scales (`codec::PreparedScales`) or null, bias or null.
        w13: In<u8>,
        w13_scale: In<f32>,
        b13: In<f32>,
        /// [E_local, Hp, Ip] prepared W2, its scales or null, bias or null.
        w2: In<u8>,
        w2_scale: In<f32>,
        b2: In<f32>,
        /// [T, H] hidden states of `x_dtype` (`ElemCode`), quantized in the kernel as GEMM1's input.
        x: In<Void>,
        x_dtype: i32,
        /// [1] GEMM1's static input scale (fp8 per tensor), else null.
        a1_scale: In<f32>,
        /// [1] the intermediate's static scale (fp8 per tensor), else null.
        a2_scale: In<f32>,
        /// [T, K] global expert ids and routing weights.
        topk_ids: In<i32>,
        topk_w: In<f32>,
        /// 1: the routing weight multiplies GEMM1's row (Llama-4) and the combine weighs slots 1.
        llama4: i32,
        T: i32,
        K: i32,
        expert_start: i32,
        E_local: i32,
        H: i32,
        Hp: i32,
        Ip: i32,
        /// [T * K, Ip] f32 scratch.
        inter: Out<f32>,
        /// [2] the grid barrier's words, zero at allocation.
        barrier: Out<u32>,
        /// [T, H] of `out_dtype`.
        out: Out<Void>,
        out_dtype: i32,
        act_alpha: f32,
        act_beta: f32,
        act_limit: f32,
    }
}

/// Threads of a CTA (`DC_THREADS`).
pub const THREADS: u32 = 512;

/// The default policy's bounds (`DecodeVariant::default_limits`): pairs, and bytes of expert weights.
pub const DEFAULT_MAX_PAIRS: usize = 16;
pub const DEFAULT_MAX_STREAM_BYTES: usize = 160 << 20;

/// The most dynamic shared memory the host lets the kernel ask for (of 227 KB).
const MAX_SMEM: usize = 200 * 1024;

/// One compiled form of the fused small-batch kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodeVariant {
    pub format: GemmFormat,
    /// GEMM1's epilogue: a gated activation or relu².
    pub stage: GemmStage,
    /// How the intermediate becomes GEMM2's operand (the codec's `inter_store`).
    pub store: InterStore,
    /// The tiled formats: how GEMM1's input and the intermediate are quantized (quant.cu's modes,
    /// the codec's `input_quant` and `inter_requant`, bf16 where the intermediate is stored so);
    /// None for the stored-element formats, whose format implies both.
    pub tiled_quant: Option<(RowQuant, RowQuant)>,
}

/// The quantizers the tiled body stages rows with (`dt_stage`): bf16 and the microscaling
/// activations held as bf16 values.
fn stages_as_bf16(q: RowQuant) -> bool {
    matches!(
        q,
        RowQuant::Bf16
            | RowQuant::Mxfp8AsBf16
            | RowQuant::Nvfp4StaticAsBf16
            | RowQuant::Nvfp4TokenAsBf16
    )
}

impl DecodeVariant {
    /// The form that runs a layer of `codec`, or None where the kernel does not serve its format:
    /// the stored-element formats whose intermediate is rounded to bf16, quantized with a static
    /// scale or requantized 1×128 (bf16, fp8, fp8_block), and the tiled microscaling formats with
    /// bf16-valued activations (every codec but mxfp8 on the fp8 block-scale kernel).
    pub fn for_layer(codec: &Codec, cfg: &LayerConfig) -> Option<DecodeVariant> {
        Self::for_codec(codec, GemmStage::for_activation(&cfg.activation))
    }

    /// The form for `codec` with GEMM1's epilogue `stage`, or None where the kernel does not serve it.
    pub fn for_codec(codec: &Codec, stage: GemmStage) -> Option<DecodeVariant> {
        if codec.gemm.decoded_row_bytes().is_some() {
            let inter = match (codec.inter_store, codec.inter_requant) {
                (InterStore::Bf16, None) => RowQuant::Bf16,
                (InterStore::F32, Some(q)) => q,
                _ => return None,
            };
            return (stages_as_bf16(codec.input_quant) && stages_as_bf16(inter)).then_some(
                DecodeVariant {
                    format: codec.gemm,
                    stage,
                    store: codec.inter_store,
                    tiled_quant: Some((codec.input_quant, inter)),
                },
            );
        }
        let served = matches!(
            (
                codec.gemm,
                codec.input_quant,
                codec.inter_store,
                codec.inter_requant
            ),
            (GemmFormat::Bf16, RowQuant::Bf16, InterStore::Bf16, None)
                | (
                    GemmFormat::E4m3Tensor,
                    RowQuant::E4m3Static,
                    InterStore::E4m3Static,
                    None
                )
                | (
                    GemmFormat::E4m3Block,
                    RowQuant::E4m3Block128,
                    InterStore::F32,
                    Some(RowQuant::E4m3Block128)
                )
        );
        served.then_some(DecodeVariant {
            format: codec.gemm,
            stage,
            store: codec.inter_store,
            tiled_quant: None,
        })
    }

    pub fn defines(&self) -> Vec<String> {
        let format = match self.format {
            GemmFormat::Bf16 => "WFMT_BF16",
            GemmFormat::E4m3Tensor => "WFMT_E4M3_TENSOR",
            GemmFormat::Mxfp8Decoded => "WFMT_MXFP8",
            GemmFormat::Mxfp4Decoded => "WFMT_MXFP4",
            GemmFormat::Nvfp4Decoded => "WFMT_NVFP4",
            _ => "WFMT_E4M3_BLOCK",
        };
        let store = match self.store {
            InterStore::Bf16 => "STORE_BF16",
            InterStore::F32 => "STORE_F32",
            InterStore::E4m3Static => "STORE_E4M3",
        };
        const ACT: [&str; 3] = ["ACT_SWIGLU", "ACT_GEGLU", "ACT_SWIGLU_OAI"];
        let mut d = vec![format!("-DWEIGHT_FORMAT={format}")];
        match self.stage {
            GemmStage::Gated { act } => {
                d.push("-DEPILOGUE=EPI_GATED".into());
                d.push(format!("-DACT={}", ACT[act as usize % 3]));
            }
            _ => d.push("-DEPILOGUE=EPI_RELU2".into()),
        }
        match self.tiled_quant {
            Some((input, inter)) => {
                d.push(format!("-DIN_QUANT={}", input.mode()));
                d.push(format!("-DINTER_QUANT={}", inter.mode()));
            }
            None => d.push(format!("-DSTORE={store}")),
        }
        d
    }

    pub fn module(self) -> ModuleKey {
        ModuleKey {
            source: Source::Decode,
            defines: self.defines(),
        }
    }

    /// Every form a layer may load: each served codec × each GEMM1 epilogue.
    pub fn all() -> Vec<DecodeVariant> {
        let mut all = Vec::new();
        for codec in super::super::codec::CODECS {
            for stage in [
                GemmStage::Gated { act: 0 },
                GemmStage::Gated { act: 1 },
                GemmStage::Gated { act: 2 },
                GemmStage::Relu2,
            ] {
                if let Some(v) = DecodeVariant::for_codec(codec, stage) {
                    if !all.contains(&v) {
                        all.push(v);
                    }
                }
            }
        }
        all
    }

    /// When a call takes the kernel unless told otherwise, as (most pairs, most bytes of expert
    /// weights those pairs stream), from H100 measurements (docs/cuda.md, "The fused small-batch
    /// kernel"): it wins where launch ramps and tails, not bytes, dominate — qwen3-30b-a3b at T = 1
    /// and 2 (bf16: 61.9 → 52.5 µs at T = 1; fp8_block 46.9 → 45.2) — and loses where the call
    /// streams hundreds of MB (deepseek-v3 at T = 1: 291 → 295 µs bf16, 188 → 201 fp8_block) or
    /// more pairs (qwen3 T = 4: 122 → 132 µs bf16). Per-tensor fp8's standard path was as fast or
    /// faster at every size measured (qwen3 T = 1: 45.9 against 49.5 µs), so it stays there. The
    /// tiled body (the microscaling formats) lost to their standard pipeline on every row measured
    /// (H100, 2026-12-07: qwen3-30b-a3b, gpt-oss-120b and nemotron-3-nano at T = 1, 2, 4, e.g.
    /// qwen3 mxfp4 × bf16 T = 1 49.3 → 62.8 µs, nvfp4 53.9 → 86.7), so it runs only when asked for
    /// (`MOERUNNER_DECODE_PAIRS`).
    pub fn default_limits(&self) -> (usize, usize) {
        match self.format {
            GemmFormat::E4m3Tensor => (0, 0),
            _ if self.tiled_quant.is_some() => (0, 0),
            _ => (DEFAULT_MAX_PAIRS, DEFAULT_MAX_STREAM_BYTES),
        }
    }

    fn block_scales(&self) -> bool {
        self.format == GemmFormat::E4m3Block
    }

    /// Dynamic shared memory for a layer of `hp` × `ip` (padded) with `k` slots a token: the larger
    /// of phase 1's (two tokens' quantized input rows and block scales) and phase 2's (two tokens'
    /// k quantized intermediate rows and block scales). The tiled body stages bf16 rows and one
    /// global each, and keeps 16 partial sums for each unit of a batch (`decode_tiled.cuh`: at most
    /// the warps, or k when k exceeds them).
    pub fn smem_bytes(&self, hp: usize, ip: usize, k: usize) -> usize {
        if self.tiled_quant.is_some() {
            let warps = THREADS as usize / 32;
            let phase1 = 2 * hp * 2 + 16 + warps * 16 * 4;
            let phase2 = 2 * k * ip * 2 + 2 * k * 4 + warps.max(k) * 16 * 4;
            return phase1.max(phase2);
        }
        let esz = self.format.weight_element_bytes();
        let scales = |cols: usize, rows: usize| {
            if self.block_scales() {
                rows * (cols / 128) * 4
            } else {
                0
            }
        };
        let phase1 = 2 * hp * esz + scales(hp, 2);
        let phase2 = 2 * k * ip * esz + scales(ip, 2 * k);
        phase1.max(phase2)
    }

    /// Whether a call of `pairs` pairs fits the kernel on `sms` SMs: every pair within the grid (so
    /// each CTA's ranges touch at most two tokens) and the shared memory within bounds.
    pub fn fits(&self, pairs: usize, sms: u32, hp: usize, ip: usize, k: usize) -> bool {
        pairs <= sms as usize && self.smem_bytes(hp, ip, k) <= MAX_SMEM
    }
}

/// One CTA per SM (the grid barrier needs every CTA resident; cooperative launch guarantees it).
pub fn shape(sms: u32, smem: usize) -> Shape {
    Shape {
        grid: (sms, 1, 1),
        block: THREADS,
        smem: smem as u32,
        pdl: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::codec::{codec_of, CODECS};
    use crate::config::{ActivationFormat, WeightFormat};

    /// Every codec has a fused form per GEMM1 epilogue but mxfp8 on the fp8 block-scale kernel
    /// (its activations re-expressed per 128, which neither body stages): the stored-element
    /// formats without quantizer defines, the tiled ones with their input's and intermediate's.
    #[test]
    fn the_fused_kernel_serves_every_codec_but_mxfp8_on_the_fp8_kernel() {
        let all = DecodeVariant::all();
        assert_eq!(all.len(), (3 + 5) * 4, "{all:?}");
        for codec in CODECS {
            let v = DecodeVariant::for_codec(codec, GemmStage::Relu2);
            let on_fp8_kernel =
                codec.weight == WeightFormat::Mxfp8 && codec.gemm != GemmFormat::Mxfp8Decoded;
            assert_eq!(v.is_some(), !on_fp8_kernel, "{}", codec.summary);
            if let Some(v) = v {
                let tiled = codec.gemm.decoded_row_bytes().is_some();
                assert_eq!(v.tiled_quant.is_some(), tiled, "{}", codec.summary);
                let d = v.defines();
                assert_eq!(
                    d.iter().any(|d| d.starts_with("-DIN_QUANT=")),
                    tiled,
                    "{d:?}"
                );
                assert_eq!(d.iter().any(|d| d.starts_with("-DSTORE=")), !tiled, "{d:?}");
            }
        }
        let w4a16 = codec_of(WeightFormat::Mxfp4, ActivationFormat::Bf16).expect("codec");
        let v = DecodeVariant::for_codec(w4a16, GemmStage::Gated { act: 2 }).expect("served");
        assert_eq!(v.tiled_quant, Some((RowQuant::Bf16, RowQuant::Bf16)));
        assert_eq!(
            v.default_limits(),
            (0, 0),
            "the tiled body runs when asked for"
        );
        let nv = codec_of(WeightFormat::Nvfp4, ActivationFormat::Nvfp4PerToken).expect("codec");
        let v = DecodeVariant::for_codec(nv, GemmStage::Relu2).expect("served");
        assert!(v.defines().contains(&"-DINTER_QUANT=5".to_string()));
        let fp8 = codec_of(WeightFormat::Fp8, ActivationFormat::Fp8).expect("codec");
        let v = DecodeVariant::for_codec(fp8, GemmStage::Gated { act: 0 }).expect("served");
        assert_eq!(
            v.default_limits(),
            (0, 0),
            "per-tensor fp8 stays on its standard path"
        );
        let bf16 = codec_of(WeightFormat::Bf16, ActivationFormat::Bf16).expect("codec");
        let v = DecodeVariant::for_codec(bf16, GemmStage::Gated { act: 2 }).expect("served");
        assert_eq!(
            v.default_limits(),
            (DEFAULT_MAX_PAIRS, DEFAULT_MAX_STREAM_BYTES)
        );
        assert!(v.defines().contains(&"-DACT=ACT_SWIGLU_OAI".to_string()));
    }

    /// A call fits while its pairs are at most the grid and its two tokens' rows fit shared memory:
    /// qwen3-30b-a3b's shapes fit at 8 pairs; 133 pairs exceed 132 SMs; mixtral's bf16 intermediate
    /// rows (I = 14336, k = 2) need 114 KB, deepseek-v3's bf16 (I = 2048, k = 8) 128 KB.
    #[test]
    fn a_call_fits_within_the_grid_and_shared_memory() {
        let bf16 = codec_of(WeightFormat::Bf16, ActivationFormat::Bf16).expect("codec");
        let v = DecodeVariant::for_codec(bf16, GemmStage::Gated { act: 0 }).expect("served");
        assert!(v.fits(8, 132, 2048, 768, 8));
        assert!(!v.fits(133, 132, 2048, 768, 8));
        assert_eq!(v.smem_bytes(4096, 14336, 2), 2 * 2 * 14336 * 2);
        assert_eq!(v.smem_bytes(7168, 2048, 8), 2 * 8 * 2048 * 2);
        assert!(
            !v.fits(8, 132, 7168, 2048, 32),
            "k = 32 of 2048-wide bf16 rows: 512 KB"
        );
        // The tiled body stages bf16 rows too, plus a global per row and 16 partials per unit
        // (16 units a batch, or k when k is larger): deepseek-v3 mxfp8 (k = 8) 66 KB, gpt-oss
        // W4A16 (Ip = 2944, k = 4) 48 KB; 40 slots of deepseek's rows do not fit.
        let mx = codec_of(WeightFormat::Mxfp8, ActivationFormat::Mxfp8).expect("codec");
        let v = DecodeVariant::for_codec(mx, GemmStage::Gated { act: 0 }).expect("served");
        assert_eq!(
            v.smem_bytes(7168, 2048, 8),
            2 * 8 * 2048 * 2 + 2 * 8 * 4 + 16 * 16 * 4
        );
        assert!(v.fits(8, 132, 7168, 2048, 8));
        assert_eq!(
            v.smem_bytes(7168, 2048, 40),
            2 * 40 * 2048 * 2 + 2 * 40 * 4 + 40 * 16 * 4
        );
        assert!(!v.fits(8, 132, 7168, 2048, 40));
        let w4 = codec_of(WeightFormat::Mxfp4, ActivationFormat::Bf16).expect("codec");
        let v = DecodeVariant::for_codec(w4, GemmStage::Gated { act: 2 }).expect("served");
        assert_eq!(
            v.smem_bytes(2944, 2944, 4),
            2 * 4 * 2944 * 2 + 2 * 4 * 4 + 16 * 16 * 4
        );
        assert_eq!(
            v.smem_bytes(2944, 256, 1),
            2 * 2944 * 2 + 16 + 16 * 16 * 4,
            "phase 1 (two input rows) is the larger"
        );
    }
}
