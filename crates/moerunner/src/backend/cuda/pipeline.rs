//! The forward pass on the GPU as a pipeline of stages (spec/layer.md): route → sort → quantize →
//! GEMM1 (+ activation) → requantize (where the codec needs it) → GEMM2 → combine. Each stage holds
//! the kernels it launches (resolved at load), declares the scratch it writes for a token capacity,
//! and enqueues its launches on a given stream: no allocation, no copy, no host wait, so a whole call
//! can be captured in a CUDA graph. Communication stages (expert-parallel dispatch and combine) and a
//! fused small-batch pipeline are further `Stage`s in the list.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use cudarc::driver::CudaFunction;

use super::codec::{Codec, RowQuant};
use super::device::{Buf, Device};
use super::kernels::combine::{self, CombineRows};
use super::kernels::decode::{self, DecodeVariant, MoeDecode};
use super::kernels::front::{self, FrontDims, RouteSortQuantize, RouteSource};
use super::kernels::moe_gemm::{self, GemmStage, GemmVariant, MoeGemm};
use super::kernels::quant::{self, QuantizeRows};
use super::kernels::routing::{self, RouteLogits, UnpackRoutes};
use super::kernels::sort::{self, SortCount, SortPairsByExpert, SortScan, SortScatter};
use super::kernels::{ElemCode, In, KernelArgs, ModuleKey, Out, Source};
use super::launch::{launch, RawStream};
use super::prepare::Dims;
use super::tactics::{Tactic, TacticChoice};
use super::workspace::{Capacity, Scratch, ScratchPlan, Slot};
use crate::config::{LayerConfig, RoutingMethod};
use crate::error::{MoeError, Result};
use crate::tensor::DType;

pub use super::device_call::{DeviceCall, DeviceRoutes};

/// What the load put on the device and every stage reads.
pub struct Resident {
    pub cfg: LayerConfig,
    pub codec: &'static Codec,
    pub dims: Dims,
    pub w13: ProjectionBufs,
    pub w2: ProjectionBufs,
    /// Static input scales of GEMM1 and GEMM2 (one f32 each) when the codec has them.
    pub a1_scale: Option<Buf>,
    pub a2_scale: Option<Buf>,
    pub router_bias: Option<Buf>,
}

pub struct ProjectionBufs {
    pub data: Buf,
    pub scales: Option<Buf>,
    pub bias: Option<Buf>,
}

fn addr(b: &Option<Buf>) -> u64 {
    b.as_ref().map_or(0, Buf::ptr)
}

impl Resident {
    fn top_k(&self) -> usize {
        self.cfg.routing.top_k
    }

    /// The tactic a call of `tokens` tokens takes under `choice` (tuned per shape class, else the
    /// built-in width for the mean pairs per local expert: no host sync, the real per-expert counts
    /// stay on the device).
    pub fn tactic_for(&self, choice: &TacticChoice, tokens: usize, ws_on: bool) -> Tactic {
        choice.pick(tokens, self.top_k(), self.dims.experts, ws_on)
    }
}

/// The sizes of one call, known from T alone.
#[derive(Clone, Copy, Debug)]
pub struct CallPlan {
    pub tokens: usize,
    pub pairs: usize,
    /// The GEMMs' token-tile width and main loops (`tactics.rs`).
    pub tactic: Tactic,
    pub bn: u32,
    /// Grid bound of the work list: every expert's last tile may be partial.
    pub max_tiles: usize,
}

/// Everything a stage's launches need for one call.
pub struct Run<'a> {
    pub dev: &'a Device,
    pub stream: RawStream,
    pub layer: &'a Resident,
    pub scratch: &'a Scratch,
    pub call: &'a DeviceCall,
    pub plan: CallPlan,
    /// Where the pairs' ids and weights are: the caller's (routed) or the route stage's output.
    pub ids: u64,
    pub weights: u64,
}

impl Run<'_> {
    fn launch<A: KernelArgs>(
        &self,
        f: &CudaFunction,
        shape: super::kernels::Shape,
        args: &A,
    ) -> Result<()> {
        launch(self.dev, self.stream, f, shape, args)
    }
    fn slot(&self, s: Slot) -> Result<u64> {
        self.scratch.ptr(s)
    }
    fn llama4(&self) -> bool {
        self.layer.cfg.routing.method == RoutingMethod::Llama4
    }
}

/// One step of the forward pass.
pub trait Stage: Send + Sync {
    fn name(&self) -> &'static str;
    /// The scratch this stage writes, for a workspace of `cap`.
    fn scratch(&self, layer: &Resident, cap: Capacity, plan: &mut ScratchPlan);
    /// Enqueues the stage's launches (launches only).
    fn enqueue(&self, run: &Run<'_>) -> Result<()>;
    /// Whether the stage also runs before the fused small-batch kernel (routing), rather than being
    /// replaced by it.
    fn feeds_decode(&self) -> bool {
        false
    }
    /// Whether the fused front (`FrontStage`: route, sort and quantize in one launch) stands in for
    /// this stage on the calls it takes; such stages are the pipeline's first ones.
    fn in_front(&self) -> bool {
        false
    }
}

/// The stages of a loaded layer, in order, and the fused small-batch kernel that replaces those
/// after routing for calls of few pairs.
pub struct Pipeline {
    stages: Vec<Box<dyn Stage>>,
    decode: Option<DecodeStage>,
    front: FrontStage,
}

impl Pipeline {
    /// The standard pipeline for `layer`'s codec, its kernels resolved on `dev`. `gemm` gives each
    /// GEMM variant's function and launch meta (threads, dynamic shared memory).
    pub fn standard(dev: &Device, layer: &Resident, gemm: GemmTable) -> Result<Pipeline> {
        let f = |source: Source, entry: &str| dev.function(&ModuleKey::plain(source), entry);
        let mut stages: Vec<Box<dyn Stage>> = vec![
            Box::new(RouteStage {
                logits: f(Source::Routing, RouteLogits::ENTRY)?,
                unpack: f(Source::Routing, UnpackRoutes::ENTRY)?,
            }),
            Box::new(SortStage {
                one_block: f(Source::Sort, SortPairsByExpert::ENTRY)?,
                count: f(Source::Sort, SortCount::ENTRY)?,
                scan: f(Source::Sort, SortScan::ENTRY)?,
                scatter: f(Source::Sort, SortScatter::ENTRY)?,
            }),
            Box::new(QuantizeInputStage {
                quant: f(Source::Quant, QuantizeRows::ENTRY)?,
            }),
            Box::new(Gemm1Stage { gemm: gemm.clone() }),
        ];
        if let Some(q) = layer.codec.inter_requant {
            stages.push(Box::new(RequantizeStage {
                quant: f(Source::Quant, QuantizeRows::ENTRY)?,
                mode: q,
            }));
        }
        stages.push(Box::new(Gemm2Stage { gemm }));
        stages.push(Box::new(CombineStage {
            combine: f(Source::Combine, CombineRows::ENTRY)?,
        }));
        let decode = match DecodeVariant::for_layer(layer.codec, &layer.cfg) {
            Some(v) => match decode_limits(v)? {
                Some((max_pairs, max_bytes)) => Some(DecodeStage {
                    kernel: load_decode(dev, v, layer)?,
                    variant: v,
                    max_pairs: AtomicUsize::new(max_pairs),
                    max_bytes: AtomicUsize::new(max_bytes),
                }),
                None => None,
            },
            None => None,
        };
        let front = FrontStage {
            kernel: f(Source::Front, RouteSortQuantize::ENTRY)?,
            max_tokens: AtomicUsize::new(front_max_tokens()?),
        };
        debug_assert!(
            stages
                .iter()
                .skip_while(|s| s.in_front())
                .all(|s| !s.in_front()),
            "the stages the fused front stands for come first"
        );
        Ok(Pipeline {
            stages,
            decode,
            front,
        })
    }

    /// Lets calls of at most `tokens` tokens take the fused front (0: none).
    pub fn set_front_max_tokens(&self, tokens: usize) {
        self.front.max_tokens.store(tokens, Ordering::Relaxed);
    }

    /// Whether a call of `tokens` tokens with `routes` runs the fused front (route, sort and quantize
    /// in one launch) rather than those three stages.
    pub fn takes_front(
        &self,
        dev: &Device,
        layer: &Resident,
        tokens: usize,
        routes: &DeviceRoutes,
    ) -> bool {
        !self.takes_decode(dev, layer, tokens)
            && self.front.shape(dev, layer, tokens, routes).is_some()
    }

    /// Whether a call of `tokens` tokens runs the fused small-batch kernel.
    pub fn takes_decode(&self, dev: &Device, layer: &Resident, tokens: usize) -> bool {
        self.decode
            .as_ref()
            .is_some_and(|d| d.takes(dev, layer, tokens * layer.top_k()))
    }

    /// Lets calls of at most `pairs` pairs take the fused small-batch kernel (0: none), whatever
    /// their weights' size; false when the layer has no such kernel (its format, or
    /// `MOERUNNER_DECODE_PAIRS=0` at load).
    pub fn set_decode_max_pairs(&self, pairs: usize) -> bool {
        self.set_decode_limits((pairs, usize::MAX));
        self.decode.is_some()
    }

    /// The fused small-batch kernel's limits now, as (most pairs, most bytes), or None when the
    /// layer has no such kernel.
    pub fn decode_limits(&self) -> Option<(usize, usize)> {
        self.decode.as_ref().map(|d| {
            (
                d.max_pairs.load(Ordering::Relaxed),
                d.max_bytes.load(Ordering::Relaxed),
            )
        })
    }

    /// Sets the limits `decode_limits` reads (no effect without the kernel).
    pub fn set_decode_limits(&self, (pairs, bytes): (usize, usize)) {
        if let Some(d) = &self.decode {
            d.max_pairs.store(pairs, Ordering::Relaxed);
            d.max_bytes.store(bytes, Ordering::Relaxed);
        }
    }

    /// The standard pipeline's stages (and the fused kernel's, when the layer has it).
    pub fn stage_names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.stages.iter().map(|s| s.name()).collect();
        if let Some(d) = &self.decode {
            names.push(d.name());
        }
        names
    }

    /// The scratch of every stage for `tokens` tokens.
    pub fn scratch_plan(&self, layer: &Resident, tokens: usize) -> (Capacity, ScratchPlan) {
        let cap = Capacity {
            tokens,
            pairs: tokens * layer.top_k(),
        };
        let mut plan = ScratchPlan::default();
        for s in &self.stages {
            s.scratch(layer, cap, &mut plan);
        }
        if let Some(d) = &self.decode {
            d.scratch(layer, cap, &mut plan);
        }
        (cap, plan)
    }

    /// The standard pipeline's stages, in order (the fused small-batch kernel not among them).
    pub fn standard_stage_names(&self) -> Vec<&'static str> {
        self.stages.iter().map(|s| s.name()).collect()
    }

    /// Enqueues the whole layer for `call` on `stream` with `tactic`'s GEMMs (launches only), or
    /// with `first: Some(n)` only the first `n` stages of the standard pipeline (never the fused
    /// small-batch kernel or the fused front): what `CudaLayer`'s stage timing replays, and its
    /// routing alone (`enqueue_routes`).
    pub fn enqueue_stages(
        &self,
        dev: &Device,
        stream: RawStream,
        (layer, tactic): (&Resident, Tactic),
        scratch: &Scratch,
        call: &DeviceCall,
        first: Option<usize>,
    ) -> Result<()> {
        let t = call.tokens;
        if t == 0 {
            return Ok(());
        }
        if t > scratch.capacity.tokens {
            return Err(MoeError::Cuda(format!(
                "internal: workspace holds {} tokens, not {t}",
                scratch.capacity.tokens
            )));
        }
        let k = layer.top_k();
        let bn = tactic.bn;
        let plan = CallPlan {
            tokens: t,
            pairs: t * k,
            tactic,
            bn,
            max_tiles: (t * k).div_ceil(bn as usize) + layer.dims.experts,
        };
        let (ids, weights) = match call.routes {
            DeviceRoutes::TopK { ids, weights } => (ids, weights),
            _ => (scratch.ptr(Slot::Ids)?, scratch.ptr(Slot::Weights)?),
        };
        let run = Run {
            dev,
            stream,
            layer,
            scratch,
            call,
            plan,
            ids,
            weights,
        };
        let fused = self
            .decode
            .as_ref()
            .filter(|d| first.is_none() && d.takes(dev, layer, plan.pairs));
        // (a prefix of the stages, `first`, is what stage timing replays: the front never stands in)
        let front = match (fused, first) {
            (None, None) => self.front.shape(dev, layer, t, &call.routes),
            _ => None,
        };
        let mut front_enqueued = false;
        for s in self.stages.iter().take(first.unwrap_or(usize::MAX)) {
            if fused.is_some() && !s.feeds_decode() {
                continue;
            }
            match front {
                Some(shape) if s.in_front() => {
                    if !front_enqueued {
                        self.front.enqueue(&run, shape)?;
                        front_enqueued = true;
                    }
                }
                _ => s.enqueue(&run)?,
            }
        }
        if let Some(d) = fused {
            d.enqueue(&run)?;
        }
        Ok(())
    }
}

/// When calls of `v`'s layer take the fused small-batch kernel, as (most pairs, most bytes of expert
/// weights those pairs stream), or None for never: `MOERUNNER_DECODE_PAIRS` (a number of pairs,
/// whatever the bytes; 0: never) when set, else the format's measured default
/// (`DecodeVariant::default_limits`).
fn decode_limits(v: DecodeVariant) -> Result<Option<(usize, usize)>> {
    decode_limits_from(std::env::var("MOERUNNER_DECODE_PAIRS").ok().as_deref(), v)
}

/// [`decode_limits`] for the variable's value (None: unset).
fn decode_limits_from(value: Option<&str>, v: DecodeVariant) -> Result<Option<(usize, usize)>> {
    match value {
        None => Ok(Some(v.default_limits())),
        Some(s) => match s.trim().parse::<usize>() {
            Ok(0) => Ok(None),
            Ok(n) => Ok(Some((n, usize::MAX))),
            Err(_) => Err(MoeError::Cuda(format!(
                "MOERUNNER_DECODE_PAIRS={s:?}: expected a number of pairs (0 turns the fused small-batch kernel off)"
            ))),
        },
    }
}

/// The most tokens a call may have to take the fused front: `MOERUNNER_FUSED_FRONT` (a number of
/// tokens; 0: never) when set, else [`front::DEFAULT_MAX_TOKENS`].
fn front_max_tokens() -> Result<usize> {
    front_max_tokens_from(std::env::var("MOERUNNER_FUSED_FRONT").ok().as_deref())
}

/// [`front_max_tokens`] for the variable's value (None: unset).
fn front_max_tokens_from(value: Option<&str>) -> Result<usize> {
    match value {
        None => Ok(front::DEFAULT_MAX_TOKENS),
        Some(s) => s.trim().parse::<usize>().map_err(|_| {
            MoeError::Cuda(format!(
                "MOERUNNER_FUSED_FRONT={s:?}: expected a number of tokens (0 turns the fused front off)"
            ))
        }),
    }
}

// ---------------------------------------------------------------------------------------- stages

/// Routes from logits (one warp per token) or unpacked from the packed form; routed ids+weights
/// pass through untouched.
struct RouteStage {
    logits: CudaFunction,
    unpack: CudaFunction,
}

impl Stage for RouteStage {
    fn name(&self) -> &'static str {
        "route"
    }
    fn in_front(&self) -> bool {
        true
    }
    fn feeds_decode(&self) -> bool {
        true
    }
    fn scratch(&self, _: &Resident, cap: Capacity, plan: &mut ScratchPlan) {
        plan.need(Slot::Ids, cap.pairs * 4);
        plan.need(Slot::Weights, cap.pairs * 4);
    }
    fn enqueue(&self, run: &Run<'_>) -> Result<()> {
        let cfg = &run.layer.cfg;
        let (t, p, k) = (run.plan.tokens, run.plan.pairs, cfg.routing.top_k);
        match run.call.routes {
            DeviceRoutes::Logits { ptr, dtype } => run.launch(
                &self.logits,
                routing::route_shape(t, cfg.num_experts, k, run.dev.sm_count),
                &Self::logits_args(run, ptr, ElemCode::of(dtype)?)?,
            ),
            DeviceRoutes::Packed { ptr } => run.launch(
                &self.unpack,
                routing::unpack_shape(p),
                &UnpackRoutes {
                    packed: In::new(ptr),
                    n: p as i32,
                    ids: Out::new(run.ids),
                    w: Out::new(run.weights),
                },
            ),
            DeviceRoutes::TopK { .. } => Ok(()),
        }
    }
}

impl RouteStage {
    /// route_logits' arguments for `run`'s tokens, from `logits` of `dtype` into the call's routes.
    fn logits_args(run: &Run<'_>, logits: u64, dtype: ElemCode) -> Result<RouteLogits> {
        let cfg = &run.layer.cfg;
        let r = &cfg.routing;
        Ok(RouteLogits {
            logits: In::new(logits),
            logits_dtype: dtype.code(),
            bias: In::new(addr(&run.layer.router_bias)),
            T: run.plan.tokens as i32,
            E: cfg.num_experts as i32,
            K: r.top_k as i32,
            method: routing::method_code(r.method),
            n_group: r.n_group as i32,
            topk_group: r.topk_group as i32,
            routed_scaling_factor: r.routed_scaling_factor,
            norm_topk_prob: r.norm_topk_prob as i32,
            topk_ids: Out::new(run.ids),
            topk_w: Out::new(run.weights),
        })
    }
}

/// Pairs grouped by local expert, their positions, and the GEMMs' work list.
struct SortStage {
    one_block: CudaFunction,
    count: CudaFunction,
    scan: CudaFunction,
    scatter: CudaFunction,
}

impl Stage for SortStage {
    fn name(&self) -> &'static str {
        "sort"
    }
    fn in_front(&self) -> bool {
        true
    }
    fn scratch(&self, layer: &Resident, cap: Capacity, plan: &mut ScratchPlan) {
        let e = layer.dims.experts;
        let tiles = cap.pairs.div_ceil(moe_gemm::GEMM_BN[0] as usize) + e;
        plan.need(Slot::Offsets, (e + 1) * 4);
        plan.need(Slot::SortChunks, sort::scratch_ints(cap.pairs, e) * 4);
        plan.need(Slot::SortedPair, cap.pairs * 4);
        plan.need(Slot::PairPos, cap.pairs * 4);
        for s in [Slot::TileExpert, Slot::TileStart, Slot::TileEnd] {
            plan.need(s, tiles * 4);
        }
        plan.need(Slot::NumTiles, 4);
    }
    fn enqueue(&self, run: &Run<'_>) -> Result<()> {
        let e = run.layer.dims.experts;
        let first = run.layer.cfg.local_experts.start as i32;
        let CallPlan {
            pairs: p,
            bn,
            max_tiles,
            ..
        } = run.plan;
        let ids = In::new(run.ids);
        let tiles = (
            Out::new(run.slot(Slot::TileExpert)?),
            Out::new(run.slot(Slot::TileStart)?),
            Out::new(run.slot(Slot::TileEnd)?),
            Out::new(run.slot(Slot::NumTiles)?),
        );
        if !sort::multi_block(p, e) {
            return run.launch(
                &self.one_block,
                sort::one_block_shape(e),
                &Self::one_block_args(run)?,
            );
        }
        // Large P: count per chunk, scan (offsets, tiles, chunk starts), scatter.
        let (chunk, num_chunks) = sort::chunks(p);
        let counts = run.slot(Slot::SortChunks)?;
        run.launch(
            &self.count,
            sort::count_shape(p, e),
            &SortCount {
                topk_ids: ids,
                P: p as i32,
                chunk: chunk as i32,
                expert_start: first,
                E_local: e as i32,
                chunk_counts: Out::new(counts),
            },
        )?;
        run.launch(
            &self.scan,
            sort::scan_shape(e),
            &SortScan {
                chunk_counts: Out::new(counts),
                num_chunks: num_chunks as i32,
                E_local: e as i32,
                BN: bn as i32,
                max_tiles: max_tiles as i32,
                expert_offsets: Out::new(run.slot(Slot::Offsets)?),
                tile_expert: tiles.0,
                tile_row_start: tiles.1,
                tile_row_end: tiles.2,
                num_tiles: tiles.3,
            },
        )?;
        run.launch(
            &self.scatter,
            sort::scatter_shape(p, e),
            &SortScatter {
                topk_ids: ids,
                P: p as i32,
                chunk: chunk as i32,
                expert_start: first,
                E_local: e as i32,
                chunk_starts: In::new(counts),
                sorted_pair: Out::new(run.slot(Slot::SortedPair)?),
                pair_pos: Out::new(run.slot(Slot::PairPos)?),
            },
        )
    }
}

impl SortStage {
    /// sort_pairs_by_expert's arguments for `run`'s pairs.
    fn one_block_args(run: &Run<'_>) -> Result<SortPairsByExpert> {
        Ok(SortPairsByExpert {
            topk_ids: In::new(run.ids),
            P: run.plan.pairs as i32,
            expert_start: run.layer.cfg.local_experts.start as i32,
            E_local: run.layer.dims.experts as i32,
            BN: run.plan.bn as i32,
            max_tiles: run.plan.max_tiles as i32,
            expert_offsets: Out::new(run.slot(Slot::Offsets)?),
            sorted_pair: Out::new(run.slot(Slot::SortedPair)?),
            pair_pos: Out::new(run.slot(Slot::PairPos)?),
            tile_expert: Out::new(run.slot(Slot::TileExpert)?),
            tile_row_start: Out::new(run.slot(Slot::TileStart)?),
            tile_row_end: Out::new(run.slot(Slot::TileEnd)?),
            num_tiles: Out::new(run.slot(Slot::NumTiles)?),
        })
    }
}

/// The hidden states as GEMM1's operand (codec's input quantizer), padded to Hp.
struct QuantizeInputStage {
    quant: CudaFunction,
}

impl Stage for QuantizeInputStage {
    fn name(&self) -> &'static str {
        "quantize"
    }
    fn in_front(&self) -> bool {
        true
    }
    fn scratch(&self, layer: &Resident, cap: Capacity, plan: &mut ScratchPlan) {
        let hp = layer.dims.hp;
        let q = layer.codec.input_quant;
        plan.need(Slot::Xq, cap.tokens * hp * q.element_bytes());
        // (declared even when unused: the quantizer's `out_scales` argument names it)
        plan.need(
            Slot::XqScales,
            cap.tokens * q.scales_per_row(hp).unwrap_or(1) * 4,
        );
    }
    fn enqueue(&self, run: &Run<'_>) -> Result<()> {
        run.launch(
            &self.quant,
            quant::shape(run.plan.tokens, run.layer.dims.hp, run.dev.sm_count),
            &Self::args(run)?,
        )
    }
}

impl QuantizeInputStage {
    /// quantize_rows' arguments for `run`'s hidden states.
    fn args(run: &Run<'_>) -> Result<QuantizeRows> {
        let d = run.layer.dims;
        Ok(QuantizeRows {
            x: In::new(run.call.hidden),
            x_dtype: ElemCode::of(run.call.hidden_dtype)?.code(),
            rows: run.plan.tokens as i32,
            cols: d.hidden as i32,
            in_stride: d.hidden as i64,
            out: Out::new(run.slot(Slot::Xq)?),
            out_stride: d.hp as i32,
            mode: run.layer.codec.input_quant.mode(),
            static_scale: In::new(addr(&run.layer.a1_scale)),
            out_scales: Out::new(run.slot(Slot::XqScales)?),
        })
    }
}

/// The GEMM main loops this device and environment allow — wgmma on sm_90a unless
/// `MOERUNNER_WGMMA=0`, warp specialisation unless `MOERUNNER_WG_WS=0` — as (wgmma_on, ws_on), or
/// why `codec`, whose loops need wgmma, cannot run here (`what` names the layer in the error).
pub fn main_loop_switches(arch: &str, codec: &Codec, what: &str) -> Result<(bool, bool)> {
    let wgmma_on = wgmma_allowed(arch);
    let ws_on = std::env::var("MOERUNNER_WG_WS").map_or(true, |v| v != "0");
    if !wgmma_on && !codec.runs_without_wgmma() {
        return Err(MoeError::Cuda(format!(
            "{what}: {}",
            needs_wgmma_reason(arch)
        )));
    }
    Ok((wgmma_on, ws_on))
}

/// Whether wgmma may run here: sm_90a, unless `MOERUNNER_WGMMA=0`.
pub fn wgmma_allowed(arch: &str) -> bool {
    arch == super::kernels::WGMMA_ARCH
        && std::env::var("MOERUNNER_WGMMA").map_or(true, |v| v != "0")
}

/// Why a codec that runs only on wgmma cannot run here (`arch`, or the MOERUNNER_WGMMA switch).
pub fn needs_wgmma_reason(arch: &str) -> String {
    if arch == super::kernels::WGMMA_ARCH {
        "runs only on Hopper's wgmma, which MOERUNNER_WGMMA=0 switched off".into()
    } else {
        format!("runs only on Hopper's wgmma (sm_90a), not on {arch}")
    }
}

/// Each GEMM variant a layer may launch: its function and launch meta (threads, shared memory).
#[derive(Clone)]
pub struct GemmTable {
    pub variants: HashMap<GemmVariant, (CudaFunction, u32, u32)>,
    /// wgmma allowed on this device and not switched off.
    pub wgmma_on: bool,
    /// Warp-specialised wgmma allowed (`MOERUNNER_WG_WS=0` turns it off).
    pub ws_on: bool,
    /// The 4-bit formats on mma.sync at `moe_gemm::MMA_RS_BN` (`MOERUNNER_MMA_RS=0` turns it off),
    /// read once at load so every launch picks a variant that was loaded.
    pub narrow_mma_rs: bool,
}

impl GemmTable {
    /// Loads (compiling or reading the disk cache) every variant a layer of `codec` can run; with
    /// `plain_wide` also the forms a tactic may ask for instead of warp specialisation (the
    /// tactics' candidates, `tactics.rs`).
    pub fn load(
        dev: &Device,
        codec: &Codec,
        cfg: &LayerConfig,
        (wgmma_on, ws_on): (bool, bool),
        plain_wide: bool,
    ) -> Result<GemmTable> {
        let mut variants = HashMap::new();
        let narrow_mma_rs = moe_gemm::narrow_mma_rs_allowed();
        let mut wanted = Self::variants_for(codec, cfg, (wgmma_on, ws_on, narrow_mma_rs));
        if plain_wide && ws_on {
            wanted.extend(Self::variants_for(
                codec,
                cfg,
                (wgmma_on, false, narrow_mma_rs),
            ));
        }
        for v in wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = variants.entry(v) {
                slot.insert(load_gemm(dev, v)?);
            }
        }
        Ok(GemmTable {
            variants,
            wgmma_on,
            ws_on,
            narrow_mma_rs,
        })
    }

    /// The variants `layer` can run: its GEMM1 stage and both GEMM2 stores at every tile width,
    /// under the switches (wgmma, warp specialisation, narrow mma.sync) of `GemmVariant::choose_with`.
    pub fn variants_for(
        layer_codec: &Codec,
        cfg: &LayerConfig,
        switches: (bool, bool, bool),
    ) -> Vec<GemmVariant> {
        let stage1 = GemmStage::for_activation(&cfg.activation);
        let mut out = Vec::new();
        for bn in moe_gemm::GEMM_BN {
            for stage in [stage1, GemmStage::Down, GemmStage::DownBf16] {
                out.extend(GemmVariant::choose_with(layer_codec, stage, bn, switches));
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        run: &Run<'_>,
        (stage, ws): (GemmStage, bool),
        w: &ProjectionBufs,
        act: u64,
        act_scale: u64,
        gather_div: i32,
        row_weight: u64,
        out: u64,
        out_scale: u64,
        (mp, kp, out_stride): (usize, usize, usize),
        (alpha, beta, limit): (f32, f32, f32),
    ) -> Result<()> {
        let v = GemmVariant::choose_with(
            run.layer.codec,
            stage,
            run.plan.bn,
            (self.wgmma_on, self.ws_on && ws, self.narrow_mma_rs),
        )
        .ok_or_else(|| MoeError::Cuda("internal: no GEMM main loop for this layer".into()))?;
        let (f, threads, smem) = self.variants.get(&v).ok_or_else(|| {
            MoeError::Cuda(format!("internal: GEMM variant {v:?} was not loaded"))
        })?;
        run.launch(
            f,
            v.shape(*threads, *smem, mp, run.plan.max_tiles),
            &MoeGemm {
                w: In::new(w.data.ptr()),
                w_scale: In::new(addr(&w.scales)),
                act: In::new(act),
                act_scale: In::new(act_scale),
                sorted_pair: In::new(run.slot(Slot::SortedPair)?),
                gather_div,
                tile_expert: In::new(run.slot(Slot::TileExpert)?),
                tile_row_start: In::new(run.slot(Slot::TileStart)?),
                tile_row_end: In::new(run.slot(Slot::TileEnd)?),
                num_tiles: In::new(run.slot(Slot::NumTiles)?),
                bias: In::new(addr(&w.bias)),
                row_weight: In::new(row_weight),
                out: Out::new(out),
                out_scale: In::new(out_scale),
                Mp: mp as i32,
                Kp: kp as i32,
                out_stride: out_stride as i32,
                act_alpha: alpha,
                act_beta: beta,
                act_limit: limit,
            },
        )
    }
}

/// A GEMM variant's function, with the threads and dynamic shared memory its module exports
/// (`moe_gemm_meta` = {NTHREADS, SMEM, BM, BN, STAGES, WARPS_M, WARPS_N, WARPS_K}), read at load: no
/// host round trip may happen inside a call.
pub(super) fn load_gemm(
    dev: &Device,
    v: GemmVariant,
) -> Result<(cudarc::driver::CudaFunction, u32, u32)> {
    let key: ModuleKey = v.module();
    let f = dev.function(&key, "moe_gemm")?;
    let meta = dev.module_ints(&key, "moe_gemm", "moe_gemm_meta", 8)?;
    if meta[2] as u32 != v.bm() || meta[3] as u32 != v.bn {
        return Err(MoeError::Cuda(format!(
            "internal: moe_gemm built for BM={} BN={}, expected {}x{}",
            meta[2],
            meta[3],
            v.bm(),
            v.bn
        )));
    }
    if meta[1] > 48 * 1024 {
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            meta[1],
        )
        .map_err(|e| super::device::cuda_err("raising a kernel's shared-memory limit", e))?;
    }
    Ok((f, meta[0] as u32, meta[1] as u32))
}

/// GEMM1 over the gathered input rows, the activation (and biases, and Llama-4's routing weight) in
/// its epilogue, the intermediate stored as the codec says.
struct Gemm1Stage {
    gemm: GemmTable,
}

impl Stage for Gemm1Stage {
    fn name(&self) -> &'static str {
        "gemm1"
    }
    fn scratch(&self, layer: &Resident, cap: Capacity, plan: &mut ScratchPlan) {
        // (as stored: a bf16 or e4m3 intermediate needs a half or a quarter of an f32 one's bytes;
        // the fused small-batch kernel, where the layer has it, asks this slot for its f32 rows
        // itself, for every call `set_decode_max_pairs` may let it take: `DecodeStage::scratch`)
        let bytes = layer.codec.inter_store.element_bytes();
        plan.need(Slot::Inter, cap.pairs * layer.dims.ip * bytes);
    }
    fn enqueue(&self, run: &Run<'_>) -> Result<()> {
        let l = run.layer;
        let act_scale = match l.codec.input_quant {
            RowQuant::E4m3Static => addr(&l.a1_scale),
            q if q.scales_per_row(l.dims.hp).is_some() => run.slot(Slot::XqScales)?,
            _ => 0,
        };
        self.gemm.launch(
            run,
            (
                GemmStage::for_activation(&l.cfg.activation),
                run.plan.tactic.ws_gemm1,
            ),
            &l.w13,
            run.slot(Slot::Xq)?,
            act_scale,
            l.top_k() as i32,
            if run.llama4() { run.weights } else { 0 },
            run.slot(Slot::Inter)?,
            addr(&l.a2_scale),
            (l.dims.m1p(), l.dims.hp, l.dims.ip),
            moe_gemm::activation_params(&l.cfg.activation),
        )
    }
}

/// The intermediate requantized for GEMM2 where GEMM1 cannot store it quantized (1×128 blocks).
struct RequantizeStage {
    quant: CudaFunction,
    mode: RowQuant,
}

impl Stage for RequantizeStage {
    fn name(&self) -> &'static str {
        "requantize"
    }
    fn scratch(&self, layer: &Resident, cap: Capacity, plan: &mut ScratchPlan) {
        let ip = layer.dims.ip;
        plan.need(Slot::InterQ, cap.pairs * ip * self.mode.element_bytes());
        plan.need(
            Slot::InterScales,
            cap.pairs * self.mode.scales_per_row(ip).unwrap_or(1) * 4,
        );
    }
    fn enqueue(&self, run: &Run<'_>) -> Result<()> {
        let ip = run.layer.dims.ip;
        let p = run.plan.pairs;
        run.launch(
            &self.quant,
            quant::shape(p, ip, run.dev.sm_count),
            &QuantizeRows {
                x: In::new(run.slot(Slot::Inter)?),
                x_dtype: ElemCode::F32.code(),
                rows: p as i32,
                cols: ip as i32,
                in_stride: ip as i64,
                out: Out::new(run.slot(Slot::InterQ)?),
                out_stride: ip as i32,
                mode: self.mode.mode(),
                static_scale: In::new(if self.mode.reads_static_scale() {
                    addr(&run.layer.a2_scale)
                } else {
                    0
                }),
                out_scales: Out::new(run.slot(Slot::InterScales)?),
            },
        )
    }
}

/// GEMM2 over the intermediate, one row per pair (plus the bias).
struct Gemm2Stage {
    gemm: GemmTable,
}

impl Stage for Gemm2Stage {
    fn name(&self) -> &'static str {
        "gemm2"
    }
    fn scratch(&self, layer: &Resident, cap: Capacity, plan: &mut ScratchPlan) {
        plan.need(Slot::Z, cap.pairs * layer.dims.hp * 4);
    }
    fn enqueue(&self, run: &Run<'_>) -> Result<()> {
        let l = run.layer;
        let (act, act_scale) = match (l.codec.inter_requant, l.codec.static_input_scales) {
            (Some(q), _) if q.scales_per_row(l.dims.ip).is_none() => (run.slot(Slot::InterQ)?, 0),
            (Some(_), _) => (run.slot(Slot::InterQ)?, run.slot(Slot::InterScales)?),
            (None, true) => (run.slot(Slot::Inter)?, addr(&l.a2_scale)),
            (None, false) => (run.slot(Slot::Inter)?, 0),
        };
        self.gemm.launch(
            run,
            (gemm2_stage(run.call.hidden_dtype), run.plan.tactic.ws_gemm2),
            &l.w2,
            act,
            act_scale,
            0,
            0,
            run.slot(Slot::Z)?,
            0,
            (l.dims.hp, l.dims.ip, l.dims.hp),
            (0.0, 0.0, 0.0),
        )
    }
}

/// GEMM2's rows in bf16 when the hidden states are 16-bit (halves their traffic into combine); f32
/// for f32 hidden states. Keyed on the input, not the output: a call that asks for f32 sums of
/// 16-bit hidden states (device all-to-all's partial rows) adds the same per-slot rows as the
/// single device does.
fn gemm2_stage(hidden: DType) -> GemmStage {
    if hidden != DType::F32 {
        GemmStage::DownBf16
    } else {
        GemmStage::Down
    }
}

/// Each token's k rows in slot order times their weights, stored in the input's dtype.
struct CombineStage {
    combine: CudaFunction,
}

impl Stage for CombineStage {
    fn name(&self) -> &'static str {
        "combine"
    }
    fn scratch(&self, _: &Resident, _: Capacity, _: &mut ScratchPlan) {}
    fn enqueue(&self, run: &Run<'_>) -> Result<()> {
        let l = run.layer;
        let t = run.plan.tokens;
        let z_dtype = match gemm2_stage(run.call.hidden_dtype) {
            GemmStage::DownBf16 => ElemCode::Bf16,
            _ => ElemCode::F32,
        };
        run.launch(
            &self.combine,
            combine::shape(t, l.dims.hidden, run.dev.sm_count),
            &CombineRows {
                z: In::new(run.slot(Slot::Z)?),
                z_dtype: z_dtype.code(),
                z_stride: l.dims.hp as i32,
                pair_pos: In::new(run.slot(Slot::PairPos)?),
                topk_w: In::new(if run.llama4() { 0 } else { run.weights }),
                T: t as i32,
                K: l.top_k() as i32,
                H: l.dims.hidden as i32,
                out: Out::new(run.call.out),
                out_dtype: ElemCode::of(run.call.out_dtype)?.code(),
            },
        )
    }
}

/// Routing (or unpacking the packed routes), the one-block sort and the input's quantization in one
/// launch (`front.cu`), for calls of at most `max_tokens` tokens the fused small-batch kernel does not
/// take: two launches fewer than the route, sort and quantize stages it stands for, which build its
/// arguments (`RouteSortQuantize::from_parts`), so its outputs are theirs bit for bit.
struct FrontStage {
    kernel: CudaFunction,
    /// Calls of more tokens take the three stages (changed only by tests and measurements).
    max_tokens: AtomicUsize,
}

impl FrontStage {
    /// The launch for a call of `tokens` tokens with `routes`, or None where the front does not take
    /// it (too many tokens, or a sort or routing the one block cannot hold).
    fn shape(
        &self,
        dev: &Device,
        layer: &Resident,
        tokens: usize,
        routes: &DeviceRoutes,
    ) -> Option<super::kernels::Shape> {
        if tokens > self.max_tokens.load(Ordering::Relaxed) {
            return None;
        }
        let dims = FrontDims {
            tokens,
            experts: layer.cfg.num_experts,
            top_k: layer.top_k(),
            local_experts: layer.dims.experts,
            hp: layer.dims.hp,
            quant_mode: layer.codec.input_quant.mode(),
        };
        front::shape(dims, route_source(routes), dev.sm_count)
    }

    fn enqueue(&self, run: &Run<'_>, shape: super::kernels::Shape) -> Result<()> {
        let (source, logits, dtype, packed) = match run.call.routes {
            DeviceRoutes::Logits { ptr, dtype } => {
                (RouteSource::Logits, ptr, ElemCode::of(dtype)?, 0)
            }
            DeviceRoutes::Packed { ptr } => (RouteSource::Packed, 0, ElemCode::F32, ptr),
            DeviceRoutes::TopK { .. } => (RouteSource::Given, 0, ElemCode::F32, 0),
        };
        let args = RouteSortQuantize::from_parts(
            source,
            packed,
            &RouteStage::logits_args(run, logits, dtype)?,
            &SortStage::one_block_args(run)?,
            &QuantizeInputStage::args(run)?,
        );
        run.launch(&self.kernel, shape, &args)
    }
}

fn route_source(routes: &DeviceRoutes) -> RouteSource {
    match routes {
        DeviceRoutes::Logits { .. } => RouteSource::Logits,
        DeviceRoutes::Packed { .. } => RouteSource::Packed,
        DeviceRoutes::TopK { .. } => RouteSource::Given,
    }
}

/// The fused small-batch kernel (`decode.cu`): the input's quantization, GEMM1 with the
/// activation, the intermediate's quantization, GEMM2 and the combine in one cooperative launch,
/// for calls of few pairs.
struct DecodeStage {
    kernel: (CudaFunction, usize),
    variant: DecodeVariant,
    /// Calls of more pairs, or whose pairs' expert weights come to more bytes, take the standard
    /// pipeline (changed only by tests and measurements).
    max_pairs: AtomicUsize,
    max_bytes: AtomicUsize,
}

/// The fused kernel's function and its dynamic shared memory for `layer`, the limit raised to it.
fn load_decode(dev: &Device, v: DecodeVariant, layer: &Resident) -> Result<(CudaFunction, usize)> {
    let f = dev.function(&v.module(), MoeDecode::ENTRY)?;
    let smem = v.smem_bytes(layer.dims.hp, layer.dims.ip, layer.top_k());
    if smem > 48 * 1024 {
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(|e| super::device::cuda_err("raising a kernel's shared-memory limit", e))?;
    }
    Ok((f, smem))
}

impl DecodeStage {
    fn takes(&self, dev: &Device, layer: &Resident, pairs: usize) -> bool {
        let d = layer.dims;
        let gemm = layer.codec.gemm;
        let expert_bytes = gemm.prepared_bytes(d.m1p(), d.hp) + gemm.prepared_bytes(d.hp, d.ip);
        pairs <= self.max_pairs.load(Ordering::Relaxed)
            && pairs.saturating_mul(expert_bytes) <= self.max_bytes.load(Ordering::Relaxed)
            && self.variant.fits(
                pairs,
                dev.sm_count,
                layer.dims.hp,
                layer.dims.ip,
                layer.top_k(),
            )
    }
}

impl Stage for DecodeStage {
    fn name(&self) -> &'static str {
        "fused_small_batch"
    }
    fn scratch(&self, layer: &Resident, cap: Capacity, plan: &mut ScratchPlan) {
        plan.need(Slot::Inter, cap.pairs * layer.dims.ip * 4);
        plan.need(Slot::GridBarrier, 8);
    }
    fn enqueue(&self, run: &Run<'_>) -> Result<()> {
        let l = run.layer;
        let d = l.dims;
        let (alpha, beta, limit) = moe_gemm::activation_params(&l.cfg.activation);
        run.launch(
            &self.kernel.0,
            decode::shape(run.dev.sm_count, self.kernel.1),
            &MoeDecode {
                w13: In::new(l.w13.data.ptr()),
                w13_scale: In::new(addr(&l.w13.scales)),
                b13: In::new(addr(&l.w13.bias)),
                w2: In::new(l.w2.data.ptr()),
                w2_scale: In::new(addr(&l.w2.scales)),
                b2: In::new(addr(&l.w2.bias)),
                x: In::new(run.call.hidden),
                x_dtype: ElemCode::of(run.call.hidden_dtype)?.code(),
                a1_scale: In::new(addr(&l.a1_scale)),
                a2_scale: In::new(addr(&l.a2_scale)),
                topk_ids: In::new(run.ids),
                topk_w: In::new(run.weights),
                llama4: run.llama4() as i32,
                T: run.plan.tokens as i32,
                K: l.top_k() as i32,
                expert_start: l.cfg.local_experts.start as i32,
                E_local: d.experts as i32,
                H: d.hidden as i32,
                Hp: d.hp as i32,
                Ip: d.ip as i32,
                inter: Out::new(run.slot(Slot::Inter)?),
                barrier: Out::new(run.slot(Slot::GridBarrier)?),
                out: Out::new(run.call.out),
                out_dtype: ElemCode::of(run.call.out_dtype)?.code(),
                act_alpha: alpha,
                act_beta: beta,
                act_limit: limit,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::codec::codec_of;
    use crate::config::{ActivationFormat, WeightFormat};

    /// `MOERUNNER_FUSED_FRONT`: unset, the default (off until measured); a number of tokens; anything
    /// else, an error naming the variable.
    #[test]
    fn fused_front_variable_sets_the_most_tokens() {
        assert_eq!(
            front_max_tokens_from(None).unwrap(),
            front::DEFAULT_MAX_TOKENS
        );
        assert_eq!(front_max_tokens_from(Some(" 64 ")).unwrap(), 64);
        assert_eq!(front_max_tokens_from(Some("0")).unwrap(), 0);
        let err = front_max_tokens_from(Some("-1")).unwrap_err().to_string();
        assert!(
            err.contains("MOERUNNER_FUSED_FRONT") && err.contains("-1"),
            "{err}"
        );
    }

    /// `MOERUNNER_DECODE_PAIRS`: unset, the format's measured limits; a number, that many pairs
    /// whatever the bytes; 0, no fused kernel; anything else, an error naming the variable.
    #[test]
    fn decode_pairs_variable_sets_the_fused_kernels_limits() {
        let codec = codec_of(WeightFormat::Fp8Block, ActivationFormat::Fp8Block).expect("codec");
        let v = DecodeVariant::for_codec(codec, moe_gemm::GemmStage::Gated { act: 0 })
            .expect("fp8_block is served");
        assert_eq!(
            decode_limits_from(None, v).unwrap(),
            Some(v.default_limits())
        );
        assert_eq!(
            decode_limits_from(Some(" 24 "), v).unwrap(),
            Some((24, usize::MAX))
        );
        assert_eq!(decode_limits_from(Some("0"), v).unwrap(), None);
        let err = decode_limits_from(Some("lots"), v).unwrap_err().to_string();
        assert!(
            err.contains("MOERUNNER_DECODE_PAIRS") && err.contains("lots"),
            "{err}"
        );
    }
}
