//! The one description of each weight × activation pairing the CUDA backend runs: its element
//! bytes, how weight preparation lays out its scales, how GEMM1's input and the intermediate are
//! quantized, and which GEMM main loops may run it. `supports()`, `moerunner info`, weight
//! preparation, the workspace and the launch sequence all read it; nothing else names a format by
//! number. Plain Rust: the answer is the same with or without a GPU.
//!
//! Adding a format to the GPU is one entry in [`CODECS`] plus what the entry names (a decode piece
//! in the GEMM, a quantizer mode): ARCHITECTURE.md, "Adding a format".

use crate::config::{ActivationFormat, LayerConfig, WeightFormat};

/// The element type the GEMM main loop reads, and so how its MMA multiplies and where scales apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmFormat {
    /// bf16 weights × bf16 activations, no scales.
    Bf16,
    /// e4m3 × e4m3, one f32 scale per expert (weights) and per tensor (activations), applied once
    /// in the epilogue.
    E4m3Tensor,
    /// e4m3 × e4m3, weights one f32 per 8 prepared rows × 128 columns, activations one per row × 128:
    /// every 128-wide K step is promoted into f32 with both scales.
    E4m3Block,
    /// `E4m3Block` with every 32-wide K sub-step promoted instead (each k32 wgmma into a fresh
    /// partial, waited for and folded with the step's scales): the fp8 tensor core's
    /// reduced-precision accumulation then spans 32 products, not 128.
    E4m3BlockK32,
    /// MXFP8 weights (E4M3, UE8M0 per 32) decoded to bf16 in registers × bf16 activations that hold
    /// exact quantized values: Hopper has no block-scaled MMA, and every E4M3 × 2^s is a bf16 value,
    /// so a bf16 MMA computes the format's products exactly (`gemm/scale_decoded.cuh`).
    Mxfp8Decoded,
    /// MXFP4 weights (E2M1, UE8M0 per 32) decoded to bf16 the same way.
    Mxfp4Decoded,
    /// NVFP4 weights (E2M1, E4M3 per 16) decoded to bf16; the weight and activation globals are
    /// applied in the epilogue.
    Nvfp4Decoded,
}

impl GemmFormat {
    pub fn name(self) -> &'static str {
        match self {
            GemmFormat::Bf16 => "bf16",
            GemmFormat::E4m3Tensor => "e4m3_tensor",
            GemmFormat::E4m3Block => "e4m3_block",
            GemmFormat::E4m3BlockK32 => "e4m3_block_k32",
            GemmFormat::Mxfp8Decoded => "mxfp8_decoded",
            GemmFormat::Mxfp4Decoded => "mxfp4_decoded",
            GemmFormat::Nvfp4Decoded => "nvfp4_decoded",
        }
    }
    /// Bytes of one activation (B operand) element, as the GEMM reads it.
    pub fn act_element_bytes(self) -> usize {
        match self {
            GemmFormat::E4m3Tensor | GemmFormat::E4m3Block | GemmFormat::E4m3BlockK32 => 1,
            _ => 2,
        }
    }
    /// The decoded formats' tiled weight layout (`prepare::tile_decoded`): element and scale bytes
    /// of one row per 64-element K step; None for the formats whose weights the MMA reads as stored.
    pub fn decoded_row_bytes(self) -> Option<(usize, usize)> {
        match self {
            GemmFormat::Mxfp8Decoded => Some((64, 2)),
            GemmFormat::Mxfp4Decoded => Some((32, 2)),
            GemmFormat::Nvfp4Decoded => Some((32, 4)),
            _ => None,
        }
    }
    /// Bytes of one weight element of the prepared layout where the MMA reads the stored elements.
    pub fn weight_element_bytes(self) -> usize {
        match self {
            GemmFormat::Bf16 => 2,
            _ => 1,
        }
    }
    /// Bytes of one expert's prepared `rows` × `cols` (padded) weights as the kernels stream them:
    /// the elements, and for the decoded formats the scale bytes tiled among them.
    pub fn prepared_bytes(self, rows: usize, cols: usize) -> usize {
        match self.decoded_row_bytes() {
            Some((wb, sb)) => rows * (cols / 64) * (wb + sb),
            None => rows * cols * self.weight_element_bytes(),
        }
    }
}

/// How rows are quantized on the GPU before a GEMM reads them (quant.cu's `mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum RowQuant {
    /// Rounded to bf16.
    Bf16 = 0,
    /// e4m3 of x / s with the layer's static input scale s.
    E4m3Static = 1,
    /// e4m3 with one dynamic scale per row × 128 columns (amax / 448).
    E4m3Block128 = 2,
    /// mxfp8 per row × 32 (ceil-pow2(amax / 448)), stored as the bf16 of each value (exact).
    Mxfp8AsBf16 = 3,
    /// nvfp4 per row × 16 with the layer's static global, stored as bf16 of element × block scale
    /// (exact); the global goes to the per-row scales for the GEMM's epilogue.
    Nvfp4StaticAsBf16 = 4,
    /// nvfp4 with a per-row global amax / (448·6), stored as mode 4.
    Nvfp4TokenAsBf16 = 5,
    /// mxfp8 per row × 32 as mode 3, then each 128-column block re-expressed against its largest
    /// 32-block scale S: e4m3(element · s/S), one f32 S per row × 128 (`prepare::reexpress_e4m3`;
    /// exact but for elements that fall below E4M3's normal range, > 2^14 under the block's amax).
    Mxfp8AsE4m3Block128 = 6,
}

impl RowQuant {
    pub fn mode(self) -> i32 {
        self as i32
    }
    /// Bytes of one element of the quantized rows.
    pub fn element_bytes(self) -> usize {
        match self {
            RowQuant::E4m3Static | RowQuant::E4m3Block128 | RowQuant::Mxfp8AsE4m3Block128 => 1,
            _ => 2,
        }
    }
    /// Whether the quantizer reads the layer's static input scale.
    pub fn reads_static_scale(self) -> bool {
        matches!(self, RowQuant::E4m3Static | RowQuant::Nvfp4StaticAsBf16)
    }
    /// Floats of per-row scales it writes for a row of `cols` (the GEMM's `act_scale`), if any.
    pub fn scales_per_row(self, cols: usize) -> Option<usize> {
        match self {
            RowQuant::E4m3Block128 | RowQuant::Mxfp8AsE4m3Block128 => Some(cols / 128),
            RowQuant::Nvfp4StaticAsBf16 | RowQuant::Nvfp4TokenAsBf16 => Some(1),
            _ => None,
        }
    }
}

/// How GEMM1's epilogue stores the intermediate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InterStore {
    /// bf16, GEMM2's operand as is.
    Bf16,
    /// e4m3 of a / s with the layer's static GEMM2 input scale.
    E4m3Static,
    /// f32, requantized by a separate pass (a 1×128 block's amax needs the whole block).
    F32,
}

impl InterStore {
    /// Bytes of one stored element (GEMM1's output row is `ip` of them).
    pub fn element_bytes(self) -> usize {
        match self {
            InterStore::Bf16 => 2,
            InterStore::F32 => 4,
            InterStore::E4m3Static => 1,
        }
    }
}

/// How weight preparation lays out a projection's scales for the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PreparedScales {
    None,
    /// One f32 per expert.
    PerExpert,
    /// One f32 per 8 prepared (interleaved) rows × 128 columns: needs I % 8 = 0 for gated layers.
    Rows8x128,
    /// The block scales travel inside the tiled weight layout (`prepare::tile_decoded`), as the
    /// exponent (or a short code) of each block's bf16 decode factor, and one f32 per expert
    /// multiplies the sum in the epilogue (a power of two, times NVFP4's `weight_scale_2`).
    InTiles,
    /// MXFP8 weights for the fp8 block-scale kernel: as `Rows8x128` (one f32 per 8 prepared rows ×
    /// 128 columns), that f32 the largest UE8M0 scale S of the group's 8 × 4 blocks, each element
    /// re-expressed against it (`prepare::reexpress_e4m3`). No I % 8 condition: the groups are made
    /// here, not found in the checkpoint.
    Rows8x128FromUe8m0,
}

/// A GEMM main loop (moe_gemm.cu's forms of its inner loop).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MainLoop {
    /// ldmatrix + mma.sync, every architecture.
    MmaSync,
    /// Hopper warpgroup MMA with a cp.async pipeline (sm_90a).
    Wgmma,
    /// Warp-specialised wgmma: one loading warpgroup, two MMA warpgroups (sm_90a, 128-wide tiles).
    WgmmaWs,
    /// wgmma with the weights decoded to bf16 in registers (sm_90a): the decoded formats' loop.
    WgmmaRs,
    /// The same, warp-specialised: one loading warpgroup, two decoding MMA warpgroups (sm_90a,
    /// 128-wide tiles).
    WgmmaRsWs,
    /// The weights decoded to bf16 in registers as `WgmmaRs` does, fed to mma.sync: the decoded
    /// formats where wgmma does not run (Blackwell, or `MOERUNNER_WGMMA=0`).
    MmaRs,
}

impl MainLoop {
    pub fn name(self) -> &'static str {
        match self {
            MainLoop::MmaSync => "mma_sync",
            MainLoop::Wgmma => "wgmma",
            MainLoop::WgmmaWs => "wgmma_ws",
            MainLoop::WgmmaRs => "wgmma_rs",
            MainLoop::WgmmaRsWs => "wgmma_rs_ws",
            MainLoop::MmaRs => "mma_rs",
        }
    }

    /// A loop that needs Hopper's wgmma (sm_90a); the others run on every architecture.
    pub fn needs_wgmma(self) -> bool {
        !matches!(self, MainLoop::MmaSync | MainLoop::MmaRs)
    }

    /// A loop with a loading warpgroup (where `MOERUNNER_WG_WS` and a tactic's ws flags apply).
    pub fn is_warp_specialised(self) -> bool {
        matches!(self, MainLoop::WgmmaWs | MainLoop::WgmmaRsWs)
    }

    /// A loop that decodes the weights in registers (the decoded formats' loops, and only theirs).
    pub fn decodes_in_registers(self) -> bool {
        matches!(
            self,
            MainLoop::WgmmaRs | MainLoop::WgmmaRsWs | MainLoop::MmaRs
        )
    }
}

/// One weight × activation pairing the GPU runs.
#[derive(Debug, PartialEq, Eq)]
pub struct Codec {
    pub weight: WeightFormat,
    pub activation: ActivationFormat,
    pub gemm: GemmFormat,
    pub weight_scales: PreparedScales,
    /// x → GEMM1's operand.
    pub input_quant: RowQuant,
    /// GEMM1's epilogue store of the intermediate.
    pub inter_store: InterStore,
    /// A separate pass between GEMM1 and GEMM2, when the store cannot quantize by itself.
    pub inter_requant: Option<RowQuant>,
    /// The layer carries static input scales for GEMM1 and GEMM2 (uploaded as one f32 each).
    pub static_input_scales: bool,
    /// Main loops that may run it, in order of preference on sm_90a.
    pub main_loops: &'static [MainLoop],
    /// One line for `moerunner info`.
    pub summary: &'static str,
}

/// The main loops of the stored-element formats that have wgmma forms (bf16, fp8_block, mxfp8 on
/// the fp8 kernel), in order of preference.
const STORED_LOOPS: &[MainLoop] = &[MainLoop::WgmmaWs, MainLoop::Wgmma, MainLoop::MmaSync];

/// The decoded formats' main loops: warp-specialised at the widths that have it, else plain, and
/// mma.sync where wgmma does not run.
const DECODED_LOOPS: &[MainLoop] = &[MainLoop::WgmmaRsWs, MainLoop::WgmmaRs, MainLoop::MmaRs];

/// mxfp8 × mxfp8 on the fp8 block-scale kernel (`e4m3_block`); its k32-folding form differs only in
/// its GEMM format and loops.
const MXFP8_ON_FP8_KERNEL: Codec = Codec {
    weight: WeightFormat::Mxfp8,
    activation: ActivationFormat::Mxfp8,
    gemm: GemmFormat::E4m3Block,
    weight_scales: PreparedScales::Rows8x128FromUe8m0,
    input_quant: RowQuant::Mxfp8AsE4m3Block128,
    inter_store: InterStore::F32,
    inter_requant: Some(RowQuant::Mxfp8AsE4m3Block128),
    static_input_scales: false,
    main_loops: STORED_LOOPS,
    summary:
        "mxfp8 × mxfp8 [e4m3_block] on the fp8 tensor cores (per-32 scales re-expressed per 8 \
              rows × 128 (weights) and 1 × 128 (activations), folded every 128 of K)",
};

/// Per-tensor fp8 stays on mma.sync: Hopper's fp8 wgmma accumulates with ~14 bits and the static
/// e4m3 intermediate turns that into rounding flips (docs/cuda.md, "Measurements").
pub const CODECS: &[Codec] = &[
    Codec {
        weight: WeightFormat::Bf16,
        activation: ActivationFormat::Bf16,
        gemm: GemmFormat::Bf16,
        weight_scales: PreparedScales::None,
        input_quant: RowQuant::Bf16,
        inter_store: InterStore::Bf16,
        inter_requant: None,
        static_input_scales: false,
        main_loops: STORED_LOOPS,
        summary: "bf16 × bf16",
    },
    Codec {
        weight: WeightFormat::Fp8,
        activation: ActivationFormat::Fp8,
        gemm: GemmFormat::E4m3Tensor,
        weight_scales: PreparedScales::PerExpert,
        input_quant: RowQuant::E4m3Static,
        inter_store: InterStore::E4m3Static,
        inter_requant: None,
        static_input_scales: true,
        main_loops: &[MainLoop::MmaSync],
        summary: "fp8 × fp8 (per-tensor, static input scales)",
    },
    Codec {
        weight: WeightFormat::Fp8Block,
        activation: ActivationFormat::Fp8Block,
        gemm: GemmFormat::E4m3Block,
        weight_scales: PreparedScales::Rows8x128,
        input_quant: RowQuant::E4m3Block128,
        inter_store: InterStore::F32,
        inter_requant: Some(RowQuant::E4m3Block128),
        static_input_scales: false,
        main_loops: STORED_LOOPS,
        summary: "fp8_block × fp8_block (128×128 weights, 1×128 dynamic activations; I % 8 = 0)",
    },
    Codec {
        weight: WeightFormat::Mxfp8,
        activation: ActivationFormat::Mxfp8,
        gemm: GemmFormat::Mxfp8Decoded,
        weight_scales: PreparedScales::InTiles,
        input_quant: RowQuant::Mxfp8AsBf16,
        inter_store: InterStore::F32,
        inter_requant: Some(RowQuant::Mxfp8AsBf16),
        static_input_scales: false,
        main_loops: DECODED_LOOPS,
        summary: "mxfp8 × mxfp8 [mxfp8_decoded] (weights decoded to bf16 in registers, exact)",
    },
    MXFP8_ON_FP8_KERNEL,
    Codec {
        gemm: GemmFormat::E4m3BlockK32,
        main_loops: &[MainLoop::WgmmaWs, MainLoop::Wgmma],
        summary: "mxfp8 × mxfp8 [e4m3_block_k32] as e4m3_block, each 32 of K folded into f32 \
                  (sm_90a)",
        ..MXFP8_ON_FP8_KERNEL
    },
    Codec {
        weight: WeightFormat::Mxfp4,
        activation: ActivationFormat::Bf16,
        gemm: GemmFormat::Mxfp4Decoded,
        weight_scales: PreparedScales::InTiles,
        input_quant: RowQuant::Bf16,
        inter_store: InterStore::Bf16,
        inter_requant: None,
        static_input_scales: false,
        main_loops: DECODED_LOOPS,
        summary: "mxfp4 × bf16 (W4A16; weights decoded to bf16 in registers)",
    },
    Codec {
        weight: WeightFormat::Mxfp4,
        activation: ActivationFormat::Mxfp8,
        gemm: GemmFormat::Mxfp4Decoded,
        weight_scales: PreparedScales::InTiles,
        input_quant: RowQuant::Mxfp8AsBf16,
        inter_store: InterStore::F32,
        inter_requant: Some(RowQuant::Mxfp8AsBf16),
        static_input_scales: false,
        main_loops: DECODED_LOOPS,
        summary: "mxfp4 × mxfp8 (W4A8, computed exactly on the bf16 MMA)",
    },
    Codec {
        weight: WeightFormat::Nvfp4,
        activation: ActivationFormat::Nvfp4,
        gemm: GemmFormat::Nvfp4Decoded,
        weight_scales: PreparedScales::InTiles,
        input_quant: RowQuant::Nvfp4StaticAsBf16,
        inter_store: InterStore::F32,
        inter_requant: Some(RowQuant::Nvfp4StaticAsBf16),
        static_input_scales: true,
        main_loops: DECODED_LOOPS,
        summary: "nvfp4 × nvfp4 (static activation globals; exact on the bf16 MMA)",
    },
    Codec {
        weight: WeightFormat::Nvfp4,
        activation: ActivationFormat::Nvfp4PerToken,
        gemm: GemmFormat::Nvfp4Decoded,
        weight_scales: PreparedScales::InTiles,
        input_quant: RowQuant::Nvfp4TokenAsBf16,
        inter_store: InterStore::F32,
        inter_requant: Some(RowQuant::Nvfp4TokenAsBf16),
        static_input_scales: false,
        main_loops: DECODED_LOOPS,
        summary: "nvfp4 × nvfp4_per_token (per-token activation globals; exact on the bf16 MMA)",
    },
];

/// Largest E the routing kernel handles (keys of one token live in shared memory).
pub const MAX_ROUTING_EXPERTS: usize = 2048;

/// The environment variable that picks among a pairing's codecs by its GEMM format's name
/// (`GemmFormat::name`), e.g. `mxfp8_decoded` for the exact bf16 path of mxfp8 × mxfp8.
pub const GEMM_FORMAT_VAR: &str = "MOERUNNER_GEMM_FORMAT";

/// The codec of a pairing, if the GPU runs it: the first of [`CODECS`] for the pairing, unless
/// `MOERUNNER_GEMM_FORMAT` names the GEMM format of another one (a name no codec of the pairing
/// has leaves the first: the variable is a preference across layers of different formats).
pub fn codec_of(weight: WeightFormat, activation: ActivationFormat) -> Option<&'static Codec> {
    let preferred = std::env::var(GEMM_FORMAT_VAR).ok();
    codec_preferring(weight, activation, preferred.as_deref())
}

/// [`codec_of`] with the preference given.
pub fn codec_preferring(
    weight: WeightFormat,
    activation: ActivationFormat,
    preferred: Option<&str>,
) -> Option<&'static Codec> {
    let mut matching = CODECS
        .iter()
        .filter(move |c| c.weight == weight && c.activation == activation);
    let first = matching.clone().next();
    preferred
        .and_then(|name| matching.find(|c| c.gemm.name() == name))
        .or(first)
}

/// The GEMM formats a pairing can run on, in order of preference (more than one: the choice
/// `MOERUNNER_GEMM_FORMAT` makes).
pub fn gemm_formats_of(weight: WeightFormat, activation: ActivationFormat) -> Vec<GemmFormat> {
    CODECS
        .iter()
        .filter(|c| c.weight == weight && c.activation == activation)
        .map(|c| c.gemm)
        .collect()
}

impl Codec {
    /// Whether one of its main loops runs without Hopper's wgmma (off sm_90a, or with
    /// `MOERUNNER_WGMMA=0`).
    pub fn runs_without_wgmma(&self) -> bool {
        self.main_loops.iter().any(|l| !l.needs_wgmma())
    }
}

/// The codec a layer runs with on a device with (`wgmma_on`) or without Hopper's wgmma: the
/// preferred one ([`codec_for`]), or where the device cannot run it another of the pairing that it
/// can ([`runnable`]).
pub fn codec_for_device(
    config: &LayerConfig,
    wgmma_on: bool,
) -> std::result::Result<&'static Codec, String> {
    let named = std::env::var(GEMM_FORMAT_VAR).ok();
    Ok(runnable(codec_for(config)?, named.as_deref(), wgmma_on))
}

/// `preferred`, unless it needs wgmma the device lacks, `named` (`MOERUNNER_GEMM_FORMAT`) did not
/// ask for it by name, and another codec of its pairing has an mma.sync loop (mxfp8 off Hopper:
/// `e4m3_block`, whose mma.sync accumulates in f32). A name the pairing lacks asks for nothing here.
pub fn runnable(preferred: &'static Codec, named: Option<&str>, wgmma_on: bool) -> &'static Codec {
    let runs_here = |c: &Codec| wgmma_on || c.runs_without_wgmma();
    if runs_here(preferred) || named == Some(preferred.gemm.name()) {
        return preferred;
    }
    CODECS
        .iter()
        .find(|c| {
            (c.weight, c.activation) == (preferred.weight, preferred.activation) && runs_here(c)
        })
        .unwrap_or(preferred)
}

/// The codec a layer runs with, or why the GPU cannot run it.
pub fn codec_for(config: &LayerConfig) -> std::result::Result<&'static Codec, String> {
    let codec = codec_of(config.weight_format, config.activation_format).ok_or_else(|| {
        format!(
            "the CUDA backend runs {}, not {}×{}",
            {
                let mut pairs: Vec<String> = Vec::new();
                for c in CODECS {
                    let pair = format!("{}×{}", c.weight.name(), c.activation.name());
                    if !pairs.contains(&pair) {
                        pairs.push(pair);
                    }
                }
                pairs.join(", ")
            },
            config.weight_format.name(),
            config.activation_format.name()
        )
    })?;
    if codec.weight_scales == PreparedScales::Rows8x128
        && config.activation.is_gated()
        && !config.intermediate.is_multiple_of(8)
    {
        return Err(format!(
            "{} on CUDA needs I % 8 == 0 (I = {}): gate/up rows are interleaved in groups of 8 \
             that must share a scale block",
            config.weight_format.name(),
            config.intermediate
        ));
    }
    if config.num_experts > MAX_ROUTING_EXPERTS {
        return Err(format!(
            "the CUDA routing kernel handles up to {MAX_ROUTING_EXPERTS} experts, not {}",
            config.num_experts
        ));
    }
    Ok(codec)
}

/// What `moerunner info` prints under the CUDA backend: one line per codec, then what every codec
/// shares.
pub fn supports_lines() -> Vec<String> {
    let mut lines: Vec<String> = CODECS.iter().map(|c| c.summary.to_string()).collect();
    lines.extend(
        [
            "all ten routing methods on the GPU, routed ids+weights and packed",
            "swiglu, geglu, swiglu_oai, relu2; biases; every W13 order",
            "EP and TP ranks (partial sums)",
            "calls of few pairs: one fused kernel after routing (every pairing but mxfp8 [e4m3_block]; MOERUNNER_DECODE_PAIRS)",
            "a pairing listed twice runs the first [path] (without wgmma: the first with an mma.sync loop) unless MOERUNNER_GEMM_FORMAT names the other",
        ]
        .map(String::from),
    );
    lines
}
