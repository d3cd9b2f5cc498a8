//! The kernel sources embedded in the binary, and every variant (set of defines) the backend may
//! launch. CI compiles each variant with NVRTC for sm_90a, so a kernel that does not compile cannot
//! land; the list here is that contract.

use crate::config::{Activation, WeightFormat};

/// Pasted before every source: typedefs, number conversions and the named codes (`WFMT_*`,
/// `ARG_DTYPE_*`) shared by kernels and launchers.
pub const COMMON: &str = include_str!("kernels/common.cuh");

/// `(name, text)` of a piece of `kernels/`.
macro_rules! piece {
    ($name:literal) => {
        ($name, include_str!(concat!("kernels/", $name)))
    };
}

/// The pieces kernels include (`#include "gemm/wgmma.cuh"`), by the name they are included as.
/// `translation_unit` pastes each in place, once, between `#line` directives, so NVRTC still sees one
/// translation unit (the cache key and the source kept beside a cached binary cover every piece)
/// while its diagnostics and line info name the real files. The pasting ignores `#if`: a piece
/// included under a condition must be included nowhere else.
pub const HEADERS: [(&str, &str); 11] = [
    piece!("gemm/config.cuh"),
    piece!("gemm/ptx.cuh"),
    piece!("gemm/wgmma.cuh"),
    piece!("gemm/scale_bf16.cuh"),
    piece!("gemm/scale_fp8_tensor.cuh"),
    piece!("gemm/scale_fp8_block.cuh"),
    piece!("gemm/epilogue.cuh"),
    piece!("gemm/loads.cuh"),
    piece!("gemm/mainloop_mma.cuh"),
    piece!("gemm/mainloop_wgmma.cuh"),
    piece!("gemm/mainloop_wgmma_ws.cuh"),
];

/// `COMMON`, then `text` (compiled as `file`) with its `#include "..."` of `HEADERS` resolved.
/// An include that names no header is left for NVRTC to report.
pub fn translation_unit(file: &str, text: &str) -> String {
    fn paste(out: &mut String, file: &str, text: &str, seen: &mut Vec<&'static str>) {
        out.push_str(&format!("#line 1 \"{file}\"\n"));
        for (i, line) in text.split_inclusive('\n').enumerate() {
            let header = line
                .trim()
                .strip_prefix("#include \"")
                .and_then(|rest| rest.strip_suffix('"'))
                .and_then(|name| HEADERS.iter().find(|(n, _)| *n == name));
            match header {
                Some((name, _)) if seen.contains(name) => out.push('\n'),
                Some((name, body)) => {
                    seen.push(name);
                    paste(out, name, body, seen);
                    out.push_str(&format!("\n#line {} \"{file}\"\n", i + 2));
                }
                None => out.push_str(line),
            }
        }
    }
    let mut out = format!("{COMMON}\n");
    paste(&mut out, file, text, &mut Vec::new());
    out
}

/// One `.cu` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    Routing,
    Sort,
    Quant,
    Combine,
    Gemm,
}

impl Source {
    pub const ALL: [Source; 5] = [
        Source::Routing,
        Source::Sort,
        Source::Quant,
        Source::Combine,
        Source::Gemm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Source::Routing => "routing",
            Source::Sort => "sort",
            Source::Quant => "quant",
            Source::Combine => "combine",
            Source::Gemm => "moe_gemm",
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            Source::Routing => include_str!("kernels/routing.cu"),
            Source::Sort => include_str!("kernels/sort.cu"),
            Source::Quant => include_str!("kernels/quant.cu"),
            Source::Combine => include_str!("kernels/combine.cu"),
            Source::Gemm => include_str!("kernels/moe_gemm.cu"),
        }
    }

    /// The whole translation unit NVRTC compiles (`translation_unit`).
    pub fn full_text(self) -> String {
        translation_unit(&format!("{}.cu", self.name()), self.text())
    }
}

/// Which of the two grouped GEMMs, with its epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmStage {
    /// GEMM1 with a gated activation in the epilogue (ACT: 0 swiglu, 1 geglu, 2 swiglu_oai).
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
}

/// The element types the GEMM reads: W_FP8 0 = bf16, 1 = fp8 per-tensor, 2 = fp8 block-scale.
pub fn gemm_weight_code(format: WeightFormat) -> Option<u8> {
    match format {
        WeightFormat::Bf16 => Some(0),
        WeightFormat::Fp8 => Some(1),
        WeightFormat::Fp8Block => Some(2),
        _ => None,
    }
}

/// How GEMM1 stores the intermediate (OUT_TYPE): bf16 for bf16 activations, e4m3 with the static
/// GEMM2 input scale for fp8, f32 for fp8_block (the 1×128 requantization is a separate pass, which
/// needs the whole 128-wide block's amax).
pub fn gemm1_out_type(weight_code: u8) -> u8 {
    match weight_code {
        0 => 0,
        1 => 2,
        _ => 1,
    }
}

/// Token-tile widths the GEMM is built for (the host picks one from the mean tokens per expert).
pub const GEMM_BN: [u32; 4] = [16, 32, 64, 128];

/// Weight-row tile height for a token-tile width: small tiles give decode enough blocks to fill the chip.
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

/// One compiled form of the GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmVariant {
    pub weight_code: u8,
    pub stage: GemmStage,
    pub bn: u32,
    /// wgmma instead of mma.sync (sm_90a only; BN in `WGMMA_BN`).
    pub wgmma: bool,
    /// Warp-specialised wgmma: a loading warpgroup feeding two MMA warpgroups through mbarriers
    /// (BN in `WS_BN`).
    pub ws: bool,
}

/// Token-tile widths with a warp-specialised wgmma form. Measured on an H200 (check_gemm.py,
/// 2026-12-01), GEMM1 64 experts × 1024 rows: at BN = 128 fp8 753 vs 689 TFLOP/s, fp8 block-scale
/// 554 vs 496, bf16 equal (440); at BN = 64 it was slower (bf16 317 vs 344), so only 128.
pub const WS_BN: [u32; 1] = [128];

impl GemmVariant {
    pub fn bm(&self) -> u32 {
        gemm_bm(self.bn)
    }

    /// The `-D` defines of this variant, spelled with the kernel's named constants (common.cuh `WFMT_*`,
    /// gemm/config.cuh `EPI_*`, `ACT_*`, `STORE_*`, `MAINLOOP_*`); ACT only for the gated epilogue.
    pub fn defines(&self) -> Vec<String> {
        const WFMT: [&str; 3] = ["WFMT_BF16", "WFMT_E4M3_TENSOR", "WFMT_E4M3_BLOCK"];
        const ACT: [&str; 3] = ["ACT_SWIGLU", "ACT_GEGLU", "ACT_SWIGLU_OAI"];
        const STORE: [&str; 3] = ["STORE_BF16", "STORE_F32", "STORE_E4M3"];
        let gemm1_store = STORE[gemm1_out_type(self.weight_code) as usize];
        let (epi, act, store) = match self.stage {
            GemmStage::Gated { act } => ("EPI_GATED", Some(ACT[act as usize]), gemm1_store),
            GemmStage::Relu2 => ("EPI_RELU2", None, gemm1_store),
            GemmStage::Down => ("EPI_DOWN", None, "STORE_F32"),
            GemmStage::DownBf16 => ("EPI_DOWN", None, "STORE_BF16"),
        };
        let mainloop = match (self.wgmma, self.ws) {
            (false, _) => "MAINLOOP_MMA_SYNC",
            (true, false) => "MAINLOOP_WGMMA",
            (true, true) => "MAINLOOP_WGMMA_WS",
        };
        let mut d = vec![
            format!("-DWEIGHT_FORMAT={}", WFMT[self.weight_code as usize]),
            format!("-DEPILOGUE={epi}"),
        ];
        d.extend(act.map(|a| format!("-DACT={a}")));
        d.extend([
            format!("-DSTORE={store}"),
            format!("-DBN={}", self.bn),
            format!("-DBM={}", self.bm()),
            format!("-DMAINLOOP={mainloop}"),
        ]);
        d
    }

    /// The variant a layer of `weight_code` runs for a tile of `bn` tokens: wgmma where the device
    /// allows it (`wgmma_on`: sm_90a, not switched off) and warp-specialised wgmma where it is
    /// faster (`ws_on` and BN in `WS_BN`), mma.sync otherwise.
    ///
    /// Per-tensor fp8 always stays on mma.sync. Hopper's fp8 wgmma accumulates with reduced
    /// precision (about 14 bits, as DeepSeek-V3's report says; measured: 3e-4..1.6e-3 relative GEMM
    /// error against 4e-8 for mma.sync's f32 accumulation). fp8_block folds every 128-wide K step
    /// into f32, which keeps whole layers at 2.5–5e-3; per-tensor fp8 stores its intermediate as
    /// e4m3 with a static scale, which turns that error into rounding flips, and one small layer
    /// of the seeded matrix (seed 570624503439497085: H = I = 128, a single K step no fold can
    /// help, Llama-4 routing) lands at 2.1e-2 through wgmma, over its 2e-2 tolerance (mma.sync:
    /// 8e-3 at most).
    pub fn choose(weight_code: u8, stage: GemmStage, bn: u32, wgmma_on: bool, ws_on: bool) -> Self {
        let wgmma = wgmma_on && weight_code != 1 && WGMMA_BN.contains(&bn);
        GemmVariant {
            weight_code,
            stage,
            bn,
            wgmma,
            ws: wgmma && ws_on && WS_BN.contains(&bn),
        }
    }

    /// Every GEMM variant the backend may launch, under any setting of the wgmma switches.
    pub fn all() -> Vec<GemmVariant> {
        let stages = [
            GemmStage::Gated { act: 0 },
            GemmStage::Gated { act: 1 },
            GemmStage::Gated { act: 2 },
            GemmStage::Relu2,
            GemmStage::Down,
            GemmStage::DownBf16,
        ];
        let mut all: Vec<GemmVariant> = Vec::new();
        for weight_code in 0..3 {
            for stage in stages {
                for bn in GEMM_BN {
                    for (wgmma_on, ws_on) in [(false, false), (true, false), (true, true)] {
                        let v = GemmVariant::choose(weight_code, stage, bn, wgmma_on, ws_on);
                        if !all.contains(&v) {
                            all.push(v);
                        }
                    }
                }
            }
        }
        all
    }
}

/// A source with its defines: the unit of compilation and of the module cache.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModuleKey {
    pub source: Source,
    pub defines: Vec<String>,
}

impl ModuleKey {
    pub fn plain(source: Source) -> Self {
        ModuleKey {
            source,
            defines: Vec::new(),
        }
    }

    pub fn gemm(variant: GemmVariant) -> Self {
        ModuleKey {
            source: Source::Gemm,
            defines: variant.defines(),
        }
    }

    /// Every module the backend may load: what CI compiles.
    pub fn all() -> Vec<ModuleKey> {
        let mut all: Vec<ModuleKey> = Source::ALL
            .iter()
            .filter(|s| **s != Source::Gemm)
            .map(|s| ModuleKey::plain(*s))
            .collect();
        all.extend(GemmVariant::all().into_iter().map(ModuleKey::gemm));
        all
    }

    /// A readable name for logs and cache files.
    pub fn label(&self) -> String {
        let mut s = self.source.name().to_string();
        for d in &self.defines {
            s.push('_');
            s.push_str(d.trim_start_matches("-D").replace('=', "").as_str());
        }
        s
    }
}
