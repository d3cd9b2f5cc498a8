//! Launcher of `moe_gemm.cu`: the grouped GEMM of one projection over the sorted pairs, GEMM1 with
//! the activation in its epilogue or GEMM2, and every compiled form of it (`GemmVariant`).

use super::super::codec::{Codec, GemmFormat, InterStore, MainLoop};
use super::{kernel_args, In, ModuleKey, Out, Shape, Source, Void};
use crate::config::Activation;

kernel_args! {
    /// One block per (BM weight rows, work tile of up to BN sorted pairs).
    pub struct MoeGemm for Gemm::"moe_gemm", pdl = true {
        /// [E_local, Mp, Kp] prepared weights (element type of the variant's format).
        w: In<u8>,
        /// The format's prepared weight scales (`codec::PreparedScales`), or null.
        w_scale: In<f32>,
        /// [rows, Kp] quantized activations.
        act: In<u8>,
        /// Activation scales: [1] static, [rows, Kp / 128] per block, or null.
        act_scale: In<f32>,
        /// [P] pair index at each sorted position.
        sorted_pair: In<i32>,
        /// Activation row of a sorted position: sorted_pair / gather_div (GEMM1: K), or the position
        /// itself when 0 (GEMM2).
        gather_div: i32,
        tile_expert: In<i32>,
        tile_row_start: In<i32>,
        tile_row_end: In<i32>,
        num_tiles: In<i32>,
        /// [E_local, Mp] bias, or null.
        bias: In<f32>,
        /// [P] routing weight applied to each row (Llama-4's GEMM1), or null.
        row_weight: In<f32>,
        /// [P, out_stride] rows of the variant's store type.
        out: Out<Void>,
        /// [1] GEMM2's static input scale when GEMM1 stores e4m3, else null.
        out_scale: In<f32>,
        Mp: i32,
        Kp: i32,
        out_stride: i32,
        act_alpha: f32,
        act_beta: f32,
        act_limit: f32,
    }
}

/// Which of the two grouped GEMMs, with its epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmStage {
    /// GEMM1 with a gated activation in the epilogue (`act` indexes ACT_SWIGLU, ACT_GEGLU,
    /// ACT_SWIGLU_OAI).
    Gated { act: u8 },
    /// GEMM1 with relu² in the epilogue.
    Relu2,
    /// GEMM2: plain f32 rows (plus bias).
    Down,
    /// GEMM2 with its rows rounded to bf16 (half the traffic into combine).
    DownBf16,
}

impl GemmStage {
    pub fn for_activation(act: &Activation) -> GemmStage {
        match act {
            Activation::Swiglu => GemmStage::Gated { act: 0 },
            Activation::Geglu => GemmStage::Gated { act: 1 },
            Activation::SwigluOai { .. } => GemmStage::Gated { act: 2 },
            Activation::Relu2 => GemmStage::Relu2,
        }
    }
    const ALL: [GemmStage; 6] = [
        GemmStage::Gated { act: 0 },
        GemmStage::Gated { act: 1 },
        GemmStage::Gated { act: 2 },
        GemmStage::Relu2,
        GemmStage::Down,
        GemmStage::DownBf16,
    ];
}

/// Token-tile widths the GEMM is built for (the host picks one from the mean tokens per expert).
pub const GEMM_BN: [u32; 4] = [16, 32, 64, 128];

/// The token-tile width for `mean` pairs per expert: the narrowest width that holds them, else the
/// widest (the layer passes the mean over its experts, a dense GEMM its M rows).
pub fn tile_width(mean: usize) -> u32 {
    let widest = GEMM_BN[GEMM_BN.len() - 1];
    GEMM_BN
        .iter()
        .copied()
        .find(|&bn| bn as usize >= mean)
        .unwrap_or(widest)
}

/// Weight-row tile height for a token-tile width: small tiles give decode enough blocks to fill the
/// chip.
pub fn gemm_bm(bn: u32) -> u32 {
    if bn <= 32 {
        64
    } else {
        128
    }
}

/// Token-tile widths that have a Hopper warpgroup-MMA (wgmma, sm_90a) form (all of them: on sm_90
/// ptxas emulates the e4m3 mma.sync, so fp8 needs wgmma even where it is bandwidth-bound).
pub const WGMMA_BN: [u32; 4] = [16, 32, 64, 128];

/// Token-tile widths with a warp-specialised wgmma form (only 128: docs/cuda.md, "Measurements").
pub const WS_BN: [u32; 1] = [128];

/// Token-tile widths at which the 4-bit decoded formats (mxfp4, nvfp4) run the register-sourced
/// `mma.sync` loop even where wgmma exists: at these widths the E2M1 decode, not the MMA, bounds
/// the loop, and mma.sync's loop issues fewer instructions a K step (162 against 184 at BN 16,
/// 173 against 192 at 32); measured 2–5 % faster on an H100 at T = 16 and 128 on every 4-bit row
/// of gpt-oss-120b, nemotron-3-nano and qwen3-30b-a3b, and 15–19 % slower at the 64- and 128-wide
/// tiles of T = 1024 (docs/cuda.md, "The register-sourced mma.sync loop on Hopper").
/// `MOERUNNER_MMA_RS=0` keeps wgmma at every width.
pub const MMA_RS_BN: [u32; 2] = [16, 32];

/// Whether the 4-bit formats take `mma.sync` at the `MMA_RS_BN` widths (unless `MOERUNNER_MMA_RS=0`).
pub fn narrow_mma_rs_allowed() -> bool {
    std::env::var("MOERUNNER_MMA_RS").map_or(true, |v| v != "0")
}

/// One compiled form of the GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmVariant {
    pub format: GemmFormat,
    /// How GEMM1 stores the intermediate (the codec's `inter_store`; GEMM2's stages store their own).
    pub gemm1_store: InterStore,
    pub stage: GemmStage,
    pub bn: u32,
    pub main_loop: MainLoop,
}

impl GemmVariant {
    pub fn bm(&self) -> u32 {
        gemm_bm(self.bn)
    }

    /// The defines this form is compiled with: named values of `common.cuh` / `gemm/config.cuh`.
    pub fn defines(&self) -> Vec<String> {
        let store_name = |s: InterStore| match s {
            InterStore::Bf16 => "STORE_BF16",
            InterStore::F32 => "STORE_F32",
            InterStore::E4m3Static => "STORE_E4M3",
        };
        let gemm1_store = store_name(self.gemm1_store);
        const ACT: [&str; 3] = ["ACT_SWIGLU", "ACT_GEGLU", "ACT_SWIGLU_OAI"];
        let (epi, act, store) = match self.stage {
            GemmStage::Gated { act } => ("EPI_GATED", ACT.get(act as usize), gemm1_store),
            GemmStage::Relu2 => ("EPI_RELU2", None, gemm1_store),
            GemmStage::Down => ("EPI_DOWN", None, "STORE_F32"),
            GemmStage::DownBf16 => ("EPI_DOWN", None, "STORE_BF16"),
        };
        let format = match self.format {
            GemmFormat::Bf16 => "WFMT_BF16",
            GemmFormat::E4m3Tensor => "WFMT_E4M3_TENSOR",
            GemmFormat::E4m3Block | GemmFormat::E4m3BlockK32 => "WFMT_E4M3_BLOCK",
            GemmFormat::Mxfp8Decoded => "WFMT_MXFP8",
            GemmFormat::Mxfp4Decoded => "WFMT_MXFP4",
            GemmFormat::Nvfp4Decoded => "WFMT_NVFP4",
        };
        let mainloop = match self.main_loop {
            MainLoop::MmaSync => "MAINLOOP_MMA_SYNC",
            MainLoop::Wgmma => "MAINLOOP_WGMMA",
            MainLoop::WgmmaWs => "MAINLOOP_WGMMA_WS",
            MainLoop::WgmmaRs => "MAINLOOP_WGMMA_RS",
            MainLoop::WgmmaRsWs => "MAINLOOP_WGMMA_RS_WS",
            MainLoop::MmaRs => "MAINLOOP_MMA_RS",
        };
        let mut d = vec![
            format!("-DWEIGHT_FORMAT={format}"),
            format!("-DEPILOGUE={epi}"),
        ];
        d.extend(act.map(|a| format!("-DACT={a}")));
        d.extend([
            format!("-DSTORE={store}"),
            format!("-DBN={}", self.bn),
            format!("-DBM={}", self.bm()),
            format!("-DMAINLOOP={mainloop}"),
        ]);
        if self.format == GemmFormat::E4m3BlockK32 {
            d.push("-DFOLD_K32=1".into());
        }
        d
    }

    pub fn module(self) -> ModuleKey {
        ModuleKey {
            source: Source::Gemm,
            defines: self.defines(),
        }
    }

    /// The variant a layer of `codec` runs for a tile of `bn` tokens: the codec's most preferred
    /// main loop the device allows — wgmma (plain or register-sourced) where `wgmma_on` (sm_90a, not
    /// switched off) and BN is in `WGMMA_BN`, warp-specialised where `ws_on` and BN is in `WS_BN`,
    /// mma.sync everywhere, and the 4-bit formats' register-sourced mma.sync at the `MMA_RS_BN`
    /// widths (unless `MOERUNNER_MMA_RS=0`) — or None when the codec has no such loop.
    pub fn choose(
        codec: &Codec,
        stage: GemmStage,
        bn: u32,
        wgmma_on: bool,
        ws_on: bool,
    ) -> Option<GemmVariant> {
        Self::choose_with(codec, stage, bn, (wgmma_on, ws_on, narrow_mma_rs_allowed()))
    }

    /// [`Self::choose`] with the `MMA_RS_BN` preference given (`narrow_mma_rs`).
    pub fn choose_with(
        codec: &Codec,
        stage: GemmStage,
        bn: u32,
        (wgmma_on, ws_on, narrow_mma_rs): (bool, bool, bool),
    ) -> Option<GemmVariant> {
        let four_bit = matches!(
            codec.gemm,
            GemmFormat::Mxfp4Decoded | GemmFormat::Nvfp4Decoded
        );
        let wgmma_rs_here = !(narrow_mma_rs && four_bit && MMA_RS_BN.contains(&bn));
        let allowed = |l: &MainLoop| match l {
            MainLoop::MmaSync | MainLoop::MmaRs => true,
            MainLoop::Wgmma => wgmma_on && WGMMA_BN.contains(&bn),
            MainLoop::WgmmaRs => wgmma_on && WGMMA_BN.contains(&bn) && wgmma_rs_here,
            MainLoop::WgmmaWs | MainLoop::WgmmaRsWs => wgmma_on && ws_on && WS_BN.contains(&bn),
        };
        let main_loop = codec.main_loops.iter().copied().find(allowed)?;
        let gemm1 = !matches!(stage, GemmStage::Down | GemmStage::DownBf16);
        Some(GemmVariant {
            format: codec.gemm,
            // (GEMM2's stages store their own: one variant serves codecs that differ only here)
            gemm1_store: if gemm1 {
                codec.inter_store
            } else {
                InterStore::F32
            },
            stage,
            bn,
            main_loop,
        })
    }

    /// Every GEMM variant the backend may launch, under any setting of the wgmma switches.
    pub fn all() -> Vec<GemmVariant> {
        let mut all: Vec<GemmVariant> = Vec::new();
        for codec in super::super::codec::CODECS {
            for stage in GemmStage::ALL {
                for bn in GEMM_BN {
                    for (wgmma_on, ws_on) in [(false, false), (true, false), (true, true)] {
                        for narrow in [true, false] {
                            let switches = (wgmma_on, ws_on, narrow);
                            let Some(v) = GemmVariant::choose_with(codec, stage, bn, switches)
                            else {
                                continue;
                            };
                            if !all.contains(&v) {
                                all.push(v);
                            }
                        }
                    }
                }
            }
        }
        all
    }

    /// Threads and dynamic shared memory come from the module (`moe_gemm_meta`); one block per
    /// (BM weight rows, work tile).
    pub fn shape(&self, threads: u32, smem: u32, mp: usize, max_tiles: usize) -> Shape {
        Shape {
            grid: ((mp as u32) / self.bm(), max_tiles as u32, 1),
            block: threads,
            smem,
            pdl: true,
        }
    }
}

/// Activation parameters of GEMM1's epilogue (α, β, limit): GPT-OSS's clamped SwiGLU, else the
/// values that make the others ignore them.
pub fn activation_params(act: &Activation) -> (f32, f32, f32) {
    match *act {
        Activation::SwigluOai { alpha, beta, limit } => (alpha, beta, limit),
        _ => (1.0, 0.0, f32::INFINITY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3 stored formats × 6 stages × 4 widths on mma.sync, wgmma for bf16 and fp8_block, warp
    /// specialisation at BN = 128; the 3 decoded formats × 6 stages × 4 widths on register-sourced
    /// wgmma, mxfp4's GEMM1 stages twice (bf16 and f32 stores of its two activation formats),
    /// again warp-specialised at BN = 128, and again (every width, both mxfp4 stores) on
    /// register-sourced mma.sync; mxfp8's k32-folding block-scale path on wgmma only (6 stages × 4
    /// widths, warp-specialised at 128).
    #[test]
    fn variants_cover_every_codec_stage_and_width() {
        let all = GemmVariant::all();
        assert_eq!(
            all.len(),
            3 * 6 * 4 + 2 * 6 * 4 + 2 * 6 + 2 * (3 * 6 * 4 + 4 * 4) + (6 * 4 + 6) + (3 * 6 + 4)
        );
        // every decoded variant has a form without wgmma (the same stages and widths)
        for v in all.iter().filter(|v| v.main_loop == MainLoop::WgmmaRs) {
            assert!(all.contains(&GemmVariant {
                main_loop: MainLoop::MmaRs,
                ..*v
            }));
        }
        assert!(all
            .iter()
            .all(|v| v.main_loop.decodes_in_registers() == v.format.decoded_row_bytes().is_some()));
        assert!(all
            .iter()
            .all(|v| v.format != GemmFormat::E4m3Tensor || v.main_loop == MainLoop::MmaSync));
        assert!(all
            .iter()
            .filter(|v| v.main_loop.is_warp_specialised())
            .all(|v| v.bn == 128));
    }

    /// With wgmma on, the 4-bit decoded formats take the register-sourced mma.sync loop at the
    /// `MMA_RS_BN` widths and wgmma above them; mxfp8 keeps wgmma; the switch off keeps wgmma.
    #[test]
    fn four_bit_formats_take_mma_rs_at_the_narrow_widths() {
        use super::super::super::codec::CODECS;
        for codec in CODECS {
            if !codec.main_loops.contains(&MainLoop::WgmmaRs) {
                continue;
            }
            let four_bit = matches!(
                codec.gemm,
                GemmFormat::Mxfp4Decoded | GemmFormat::Nvfp4Decoded
            );
            for bn in GEMM_BN {
                for narrow in [true, false] {
                    let v = GemmVariant::choose_with(
                        codec,
                        GemmStage::ALL[0],
                        bn,
                        (true, true, narrow),
                    )
                    .expect("a decoded codec with wgmma");
                    let want = if narrow && four_bit && MMA_RS_BN.contains(&bn) {
                        MainLoop::MmaRs
                    } else if WS_BN.contains(&bn) {
                        MainLoop::WgmmaRsWs
                    } else {
                        MainLoop::WgmmaRs
                    };
                    assert_eq!(
                        v.main_loop, want,
                        "{} bn {bn} narrow {narrow}",
                        codec.summary
                    );
                }
            }
        }
    }
}
