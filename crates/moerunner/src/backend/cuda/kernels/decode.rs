//! Launcher of `decode.cu`: the fused small-batch layer — GEMM1 with the activation, the
//! intermediate's quantization, GEMM2 and the combine in one persistent, cooperative kernel after
//! routing, the input's quantization included — and its compiled forms (`DecodeVariant`).

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
}

impl DecodeVariant {
    /// The form that runs a layer of `codec`, or None where the kernel does not serve its format:
    /// the stored-element formats whose intermediate is rounded to bf16, quantized with a static
    /// scale or requantized 1×128 (bf16, fp8, fp8_block). The microscaling formats keep the standard
    /// pipeline.
    pub fn for_layer(codec: &Codec, cfg: &LayerConfig) -> Option<DecodeVariant> {
        Self::for_codec(codec, GemmStage::for_activation(&cfg.activation))
    }

    /// The form for `codec` with GEMM1's epilogue `stage`, or None where the kernel does not serve it.
    pub fn for_codec(codec: &Codec, stage: GemmStage) -> Option<DecodeVariant> {
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
        })
    }

    pub fn defines(&self) -> Vec<String> {
        let format = match self.format {
            GemmFormat::Bf16 => "WFMT_BF16",
            GemmFormat::E4m3Tensor => "WFMT_E4M3_TENSOR",
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
        d.push(format!("-DSTORE={store}"));
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
    /// faster at every size measured (qwen3 T = 1: 45.9 against 49.5 µs), so it stays there.
    pub fn default_limits(&self) -> (usize, usize) {
        match self.format {
            GemmFormat::E4m3Tensor => (0, 0),
            _ => (DEFAULT_MAX_PAIRS, DEFAULT_MAX_STREAM_BYTES),
        }
    }

    fn block_scales(&self) -> bool {
        self.format == GemmFormat::E4m3Block
    }

    /// Dynamic shared memory for a layer of `hp` × `ip` (padded) with `k` slots a token: the larger
    /// of phase 1's (two tokens' quantized input rows and block scales) and phase 2's (two tokens'
    /// k quantized intermediate rows and block scales).
    pub fn smem_bytes(&self, hp: usize, ip: usize, k: usize) -> usize {
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

    /// bf16, fp8 and fp8_block have a fused form per GEMM1 epilogue; the microscaling formats (and
    /// mxfp8 on the fp8 kernel, whose intermediate is requantized another way) do not.
    #[test]
    fn the_fused_kernel_serves_the_stored_element_formats() {
        let all = DecodeVariant::all();
        assert_eq!(all.len(), 3 * 4, "{all:?}");
        for codec in CODECS {
            let served = DecodeVariant::for_codec(codec, GemmStage::Relu2).is_some();
            let want = matches!(
                (codec.weight, codec.activation),
                (WeightFormat::Bf16, ActivationFormat::Bf16)
                    | (WeightFormat::Fp8, ActivationFormat::Fp8)
                    | (WeightFormat::Fp8Block, ActivationFormat::Fp8Block)
            );
            assert_eq!(served, want, "{}", codec.summary);
        }
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
    }
}
