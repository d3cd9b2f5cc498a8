//! A layer loaded on the GPU: prepared weights, a workspace sized once per token capacity, and the
//! forward pass as a fixed sequence of launches on one stream with no host synchronisation, so it
//! can be captured in a CUDA graph (`enqueue`).
//!
//! Steps (spec/layer.md): route (or unpack) → sort pairs by expert and build the tile list →
//! quantize x → GEMM1 + activation (+ intermediate quantization in its epilogue for fp8) →
//! 1×128 requantization (fp8_block) → GEMM2 → deterministic combine in slot order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::device::{f32_bytes, Buf, Device};
use super::kernels::{self, GemmStage, GemmVariant, ModuleKey, Source};
use super::launch::{launch, Arg};
use super::prepare::{self, Dims, PreparedWeights};
use crate::backend::LoadedLayer;
use crate::config::{Activation, RoutingMethod};
use crate::error::{MoeError, Result};
use crate::forward::{self, ForwardInput, ForwardOutput};
use crate::routing::{Routes, RoutingInput};
use crate::tensor::{DType, HostTensor};
use crate::weights::MoeLayer;

/// Element type codes shared with kernels/common.cuh.
pub fn dtype_code(d: DType) -> Result<i32> {
    match d {
        DType::BF16 => Ok(0),
        DType::F16 => Ok(1),
        DType::F32 => Ok(2),
        other => Err(MoeError::Cuda(format!(
            "internal: dtype {} has no kernel code",
            other.name()
        ))),
    }
}

fn routing_code(m: RoutingMethod) -> i32 {
    match m {
        RoutingMethod::Default => 0,
        RoutingMethod::Renormalize => 1,
        RoutingMethod::RenormalizeNaive => 2,
        RoutingMethod::DeepseekV3 => 3,
        RoutingMethod::Llama4 => 4,
        RoutingMethod::TopK => 5,
        RoutingMethod::SigmoidRenorm => 6,
        RoutingMethod::Minimax2 => 7,
        RoutingMethod::Sigmoid => 8,
        RoutingMethod::TopkSigmoid => 9,
    }
}

/// Where the routes of an enqueued forward come from (the inputs already sit in the workspace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteSource {
    /// `ws.logits` holds `[T, E]` logits of this dtype (F32 or BF16).
    Logits(DType),
    /// `ws.ids` / `ws.weights` hold the caller's top-k (ids i32, weights f32).
    TopK,
    /// `ws.packed` holds FlashInfer's packed int32 form.
    Packed,
}

struct ProjectionBufs {
    data: Buf,
    scales: Option<Buf>,
    bias: Option<Buf>,
}

/// Scratch and staging memory for up to `tokens` tokens, allocated once and grown on demand.
pub struct Workspace {
    pub tokens: usize,
    pub x: Buf,
    pub logits: Buf,
    pub ids: Buf,
    pub weights: Buf,
    pub packed: Buf,
    xq: Buf,
    xq_scales: Buf,
    offsets: Buf,
    /// Per-(chunk, local expert) counts, then chunk starts, of the multi-block sort (large P).
    sort_chunks: Buf,
    sorted_pair: Buf,
    pair_pos: Buf,
    tile_expert: Buf,
    tile_start: Buf,
    tile_end: Buf,
    num_tiles: Buf,
    inter: Buf,
    inter_q: Buf,
    inter_scales: Buf,
    z: Buf,
    pub out: Buf,
}

pub struct CudaLayer {
    dev: Arc<Device>,
    layer: Arc<MoeLayer>,
    dims: Dims,
    weight_code: u8,
    w13: ProjectionBufs,
    w2: ProjectionBufs,
    /// fp8 static input scales of GEMM1 and GEMM2 (one f32 each), else absent.
    a1_scale: Option<Buf>,
    a2_scale: Option<Buf>,
    router_bias: Option<Buf>,
    /// Threads and dynamic shared memory of each GEMM variant, read from the module at load (no
    /// host round trip may happen inside `enqueue`).
    gemm_launch: HashMap<GemmVariant, (u32, u32)>,
    use_wgmma: bool,
    /// Warp-specialised wgmma for the widest tiles (`MOERUNNER_WG_WS=0` turns it off).
    use_ws: bool,
    workspace: Mutex<Option<Workspace>>,
}

impl CudaLayer {
    pub fn load(dev: Arc<Device>, layer: Arc<MoeLayer>) -> Result<CudaLayer> {
        let cfg = layer.config();
        let w = layer.weights();
        let weight_code = kernels::gemm_weight_code(cfg.weight_format).ok_or_else(|| {
            MoeError::Cuda(format!(
                "internal: {} reached the CUDA loader",
                cfg.weight_format.name()
            ))
        })?;
        let prepared: PreparedWeights = prepare::prepare_weights(cfg, w);
        let upload_proj =
            |t: &prepare::PreparedTensor, bias: &Option<Vec<f32>>| -> Result<ProjectionBufs> {
                Ok(ProjectionBufs {
                    data: dev.upload(&t.data)?,
                    scales: if t.scales.is_empty() {
                        None
                    } else {
                        Some(dev.upload_f32(&t.scales)?)
                    },
                    bias: match bias {
                        Some(b) => Some(dev.upload_f32(b)?),
                        None => None,
                    },
                })
            };
        let w13 = upload_proj(&prepared.w13, &prepared.w13_bias)?;
        let w2 = upload_proj(&prepared.w2, &prepared.w2_bias)?;
        let scalar = |s: Option<f32>| -> Result<Option<Buf>> {
            match (weight_code, s) {
                (1, Some(v)) => Ok(Some(dev.upload_f32(&[v])?)),
                (1, None) => Err(MoeError::Cuda(
                    "fp8 layer without a static input scale".into(),
                )),
                _ => Ok(None),
            }
        };
        let a1_scale = scalar(w.w13_input_scale)?;
        let a2_scale = scalar(w.w2_input_scale)?;
        let router_bias = match &w.router_bias {
            Some(b) => Some(dev.upload_f32(b)?),
            None => None,
        };
        let dev_arch = dev.arch.clone();
        let loaded = CudaLayer {
            dims: prepared.dims,
            dev,
            layer,
            weight_code,
            w13,
            w2,
            a1_scale,
            a2_scale,
            router_bias,
            gemm_launch: HashMap::new(),
            use_wgmma: wgmma_allowed(&dev_arch),
            use_ws: std::env::var("MOERUNNER_WG_WS").map_or(true, |v| v != "0"),
            workspace: Mutex::new(None),
        };
        // Compile (or fetch from the disk cache) every module this layer can use, so no forward call
        // pays for NVRTC and a kernel that does not compile fails the load, not a later call.
        let mut loaded = loaded;
        for source in [
            Source::Routing,
            Source::Sort,
            Source::Quant,
            Source::Combine,
        ] {
            let key = ModuleKey::plain(source);
            loaded.dev.function(&key, key_entry(&key))?;
        }
        for v in loaded.gemm_variants() {
            let key = ModuleKey::gemm(v);
            let f = loaded.dev.function(&key, "moe_gemm")?;
            // moe_gemm_meta = {NTHREADS, SMEM, BM, BN, STAGES, WARPS_M, WARPS_N, WARPS_K}.
            let meta = loaded
                .dev
                .module_ints(&key, "moe_gemm", "moe_gemm_meta", 8)?;
            if meta[2] as u32 != v.bm() || meta[3] as u32 != v.bn {
                return Err(MoeError::Cuda(format!(
                    "internal: moe_gemm built for BM={} BN={}, expected {}x{}",
                    meta[2],
                    meta[3],
                    v.bm(),
                    v.bn
                )));
            }
            set_smem_limit(&f, meta[1] as u32)?;
            loaded
                .gemm_launch
                .insert(v, (meta[0] as u32, meta[1] as u32));
        }
        loaded.dev.sync()?;
        Ok(loaded)
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    fn top_k(&self) -> usize {
        self.layer.config().routing.top_k
    }

    /// The GEMM variant for a stage and token-tile width (the rule: `GemmVariant::choose`).
    fn gemm_variant(&self, stage: GemmStage, bn: u32) -> GemmVariant {
        GemmVariant::choose(self.weight_code, stage, bn, self.use_wgmma, self.use_ws)
    }

    fn gemm_variants(&self) -> Vec<GemmVariant> {
        let stage1 = GemmStage::for_activation(&self.layer.config().activation);
        let mut out = Vec::new();
        for bn in kernels::GEMM_BN {
            for stage in [stage1, GemmStage::Down, GemmStage::DownBf16] {
                out.push(self.gemm_variant(stage, bn));
            }
        }
        out
    }

    /// Token-tile width for `tokens`: the mean number of pairs per local expert, rounded up to a
    /// supported width (no host sync: the real per-expert counts stay on the device).
    fn pick_bn(&self, tokens: usize) -> u32 {
        let pairs = tokens * self.top_k();
        let mean = pairs.div_ceil(self.dims.experts.max(1));
        kernels::GEMM_BN
            .iter()
            .copied()
            .find(|&bn| bn as usize >= mean)
            .unwrap_or(*kernels::GEMM_BN.last().unwrap_or(&128))
    }

    fn max_tiles(&self, tokens: usize, bn: u32) -> usize {
        (tokens * self.top_k()).div_ceil(bn as usize) + self.dims.experts
    }

    /// Makes sure the workspace holds `tokens` tokens; grows it (rounded up) outside any capture.
    pub fn reserve(&self, tokens: usize) -> Result<()> {
        let mut ws = self
            .workspace
            .lock()
            .map_err(|_| MoeError::Cuda("workspace lock poisoned".into()))?;
        if ws.as_ref().is_some_and(|w| w.tokens >= tokens) {
            return Ok(());
        }
        let cap = tokens.next_power_of_two().max(16);
        *ws = None; // free the old one first: the new one may need the room
        *ws = Some(self.alloc_workspace(cap)?);
        Ok(())
    }

    fn alloc_workspace(&self, t: usize) -> Result<Workspace> {
        let d = &self.dims;
        let dev = &self.dev;
        let k = self.top_k();
        let e_glob = self.layer.config().num_experts;
        let p = t * k;
        let min_bn = kernels::GEMM_BN[0] as usize;
        let tiles = p.div_ceil(min_bn) + d.experts;
        let elem = if self.weight_code == 0 { 2 } else { 1 };
        Ok(Workspace {
            tokens: t,
            x: dev.alloc(t * d.hidden * 4)?,
            logits: dev.alloc(t * e_glob * 4)?,
            ids: dev.alloc(p * 4)?,
            weights: dev.alloc(p * 4)?,
            packed: dev.alloc(p * 4)?,
            xq: dev.alloc(t * d.hp * elem)?,
            xq_scales: dev.alloc(t * (d.hp / 128) * 4)?,
            offsets: dev.alloc((d.experts + 1) * 4)?,
            sort_chunks: dev.alloc(shapes::sort_scratch_ints(p, d.experts) * 4)?,
            sorted_pair: dev.alloc(p * 4)?,
            pair_pos: dev.alloc(p * 4)?,
            tile_expert: dev.alloc(tiles * 4)?,
            tile_start: dev.alloc(tiles * 4)?,
            tile_end: dev.alloc(tiles * 4)?,
            num_tiles: dev.alloc(4)?,
            inter: dev.alloc(p * d.ip * 4)?,
            inter_q: dev.alloc(if self.weight_code == 2 { p * d.ip } else { 0 })?,
            inter_scales: dev.alloc(if self.weight_code == 2 {
                p * (d.ip / 128) * 4
            } else {
                0
            })?,
            z: dev.alloc(p * d.hp * 4)?,
            out: dev.alloc(t * d.hidden * 4)?,
        })
    }

    /// Runs `f` with the workspace (reserved for at least `tokens`).
    pub fn with_workspace<R>(
        &self,
        tokens: usize,
        f: impl FnOnce(&mut Workspace) -> Result<R>,
    ) -> Result<R> {
        self.reserve(tokens)?;
        let mut guard = self
            .workspace
            .lock()
            .map_err(|_| MoeError::Cuda("workspace lock poisoned".into()))?;
        let ws = guard
            .as_mut()
            .ok_or_else(|| MoeError::Cuda("internal: no workspace".into()))?;
        f(ws)
    }

    /// Enqueues the whole layer for `tokens` tokens whose inputs are in `ws` (hidden states of
    /// `hidden` dtype in `ws.x`, routes per `source`); the output lands in `ws.out` in the same dtype.
    /// Launches only: no allocation, no host synchronisation (graph-capturable).
    pub fn enqueue(
        &self,
        ws: &Workspace,
        tokens: usize,
        hidden: DType,
        source: RouteSource,
    ) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        if tokens > ws.tokens {
            return Err(MoeError::Cuda(format!(
                "internal: workspace holds {} tokens, not {tokens}",
                ws.tokens
            )));
        }
        let cfg = self.layer.config();
        let d = self.dims;
        let dev = &*self.dev;
        let k = self.top_k();
        let t = tokens;
        let p = t * k;
        let e_glob = cfg.num_experts;
        let llama4 = cfg.routing.method == RoutingMethod::Llama4;

        // 1. Routes.
        match source {
            RouteSource::Logits(dtype) => {
                let f = dev.function(&ModuleKey::plain(Source::Routing), "route_logits")?;
                let r = &cfg.routing;
                launch(
                    dev,
                    &f,
                    shapes::routing(t, e_glob, k, dev.sm_count),
                    &[
                        Arg::Ptr(ws.logits.ptr()),
                        Arg::I32(dtype_code(dtype)?),
                        Arg::Ptr(self.router_bias.as_ref().map_or(0, |b| b.ptr())),
                        Arg::I32(t as i32),
                        Arg::I32(e_glob as i32),
                        Arg::I32(k as i32),
                        Arg::I32(routing_code(r.method)),
                        Arg::I32(r.n_group as i32),
                        Arg::I32(r.topk_group as i32),
                        Arg::F32(r.routed_scaling_factor),
                        Arg::I32(r.norm_topk_prob as i32),
                        Arg::Ptr(ws.ids.ptr()),
                        Arg::Ptr(ws.weights.ptr()),
                    ],
                )?;
            }
            RouteSource::Packed => {
                let f = dev.function(&ModuleKey::plain(Source::Routing), "unpack_routes")?;
                launch(
                    dev,
                    &f,
                    shapes::unpack(p),
                    &[
                        Arg::Ptr(ws.packed.ptr()),
                        Arg::I32(p as i32),
                        Arg::Ptr(ws.ids.ptr()),
                        Arg::Ptr(ws.weights.ptr()),
                    ],
                )?;
            }
            RouteSource::TopK => {}
        }

        // 2. Sort pairs by local expert; tile list for the chosen token-tile width.
        let bn = self.pick_bn(t);
        let max_tiles = self.max_tiles(t, bn);
        let sort_key = ModuleKey::plain(Source::Sort);
        if shapes::sort_multi_block(p, d.experts) {
            // Large P: count per chunk, scan (offsets, tiles, chunk starts), scatter (sort.cu).
            let (chunk, num_chunks) = shapes::sort_chunks(p);
            // sort_count and sort_scatter walk the same chunks of ids into the same counts.
            let chunks = [
                Arg::Ptr(ws.ids.ptr()),
                Arg::I32(p as i32),
                Arg::I32(chunk as i32),
                Arg::I32(cfg.local_experts.start as i32),
                Arg::I32(d.experts as i32),
                Arg::Ptr(ws.sort_chunks.ptr()),
            ];
            launch(
                dev,
                &dev.function(&sort_key, "sort_count")?,
                shapes::sort_count(p, d.experts),
                &chunks,
            )?;
            let [ids, pairs, chunk_len, first, experts, counts] = chunks;
            launch(
                dev,
                &dev.function(&sort_key, "sort_scan")?,
                shapes::sort_scan(d.experts),
                &[
                    Arg::Ptr(ws.sort_chunks.ptr()),
                    Arg::I32(num_chunks as i32),
                    Arg::I32(d.experts as i32),
                    Arg::I32(bn as i32),
                    Arg::I32(max_tiles as i32),
                    Arg::Ptr(ws.offsets.ptr()),
                    Arg::Ptr(ws.tile_expert.ptr()),
                    Arg::Ptr(ws.tile_start.ptr()),
                    Arg::Ptr(ws.tile_end.ptr()),
                    Arg::Ptr(ws.num_tiles.ptr()),
                ],
            )?;
            launch(
                dev,
                &dev.function(&sort_key, "sort_scatter")?,
                shapes::sort_scatter(p, d.experts),
                &[
                    ids,
                    pairs,
                    chunk_len,
                    first,
                    experts,
                    counts,
                    Arg::Ptr(ws.sorted_pair.ptr()),
                    Arg::Ptr(ws.pair_pos.ptr()),
                ],
            )?;
        } else {
            let f = dev.function(&sort_key, "sort_pairs_by_expert")?;
            launch(
                dev,
                &f,
                shapes::sort(d.experts),
                &[
                    Arg::Ptr(ws.ids.ptr()),
                    Arg::I32(p as i32),
                    Arg::I32(cfg.local_experts.start as i32),
                    Arg::I32(d.experts as i32),
                    Arg::I32(bn as i32),
                    Arg::I32(max_tiles as i32),
                    Arg::Ptr(ws.offsets.ptr()),
                    Arg::Ptr(ws.sorted_pair.ptr()),
                    Arg::Ptr(ws.pair_pos.ptr()),
                    Arg::Ptr(ws.tile_expert.ptr()),
                    Arg::Ptr(ws.tile_start.ptr()),
                    Arg::Ptr(ws.tile_end.ptr()),
                    Arg::Ptr(ws.num_tiles.ptr()),
                ],
            )?;
        }

        // 3. Quantize x for GEMM1 (mode 0 bf16, 1 fp8 static, 2 fp8 1×128).
        let quant = dev.function(&ModuleKey::plain(Source::Quant), "quantize_rows")?;
        let mode = self.weight_code as i32;
        launch(
            dev,
            &quant,
            shapes::quant(t, d.hp, dev.sm_count),
            &[
                Arg::Ptr(ws.x.ptr()),
                Arg::I32(dtype_code(hidden)?),
                Arg::I32(t as i32),
                Arg::I32(d.hidden as i32),
                Arg::I64(d.hidden as i64),
                Arg::Ptr(ws.xq.ptr()),
                Arg::I32(d.hp as i32),
                Arg::I32(mode),
                Arg::Ptr(self.a1_scale.as_ref().map_or(0, |b| b.ptr())),
                Arg::Ptr(ws.xq_scales.ptr()),
            ],
        )?;

        // 4. GEMM1 with the activation in its epilogue.
        let (alpha, beta, limit) = match cfg.activation {
            Activation::SwigluOai { alpha, beta, limit } => (alpha, beta, limit),
            _ => (1.0, 0.0, f32::INFINITY),
        };
        let v1 = self.gemm_variant(GemmStage::for_activation(&cfg.activation), bn);
        let act_scale1 = match self.weight_code {
            1 => self.a1_scale.as_ref().map_or(0, |b| b.ptr()),
            2 => ws.xq_scales.ptr(),
            _ => 0,
        };
        self.gemm(
            v1,
            &self.w13,
            ws.xq.ptr(),
            act_scale1,
            ws,
            k as i32,
            max_tiles,
            if llama4 { ws.weights.ptr() } else { 0 },
            ws.inter.ptr(),
            self.a2_scale.as_ref().map_or(0, |b| b.ptr()),
            d.m1p(),
            d.hp,
            d.ip,
            (alpha, beta, limit),
        )?;

        // 5. The intermediate for GEMM2: fp8_block requantizes 1×128 from f32.
        let (act2, act_scale2) = match self.weight_code {
            2 => {
                launch(
                    dev,
                    &quant,
                    shapes::quant(p, d.ip, dev.sm_count),
                    &[
                        Arg::Ptr(ws.inter.ptr()),
                        Arg::I32(2),
                        Arg::I32(p as i32),
                        Arg::I32(d.ip as i32),
                        Arg::I64(d.ip as i64),
                        Arg::Ptr(ws.inter_q.ptr()),
                        Arg::I32(d.ip as i32),
                        Arg::I32(2),
                        Arg::NULL,
                        Arg::Ptr(ws.inter_scales.ptr()),
                    ],
                )?;
                (ws.inter_q.ptr(), ws.inter_scales.ptr())
            }
            1 => (
                ws.inter.ptr(),
                self.a2_scale.as_ref().map_or(0, |b| b.ptr()),
            ),
            _ => (ws.inter.ptr(), 0),
        };

        // 6. GEMM2.
        // GEMM2's rows in bf16 when the output is 16-bit anyway (halves their traffic into
        // combine); f32 for f32 hidden states.
        let z_bf16 = hidden != DType::F32;
        let v2 = self.gemm_variant(
            if z_bf16 {
                GemmStage::DownBf16
            } else {
                GemmStage::Down
            },
            bn,
        );
        self.gemm(
            v2,
            &self.w2,
            act2,
            act_scale2,
            ws,
            0,
            max_tiles,
            0,
            ws.z.ptr(),
            0,
            d.hp,
            d.ip,
            d.hp,
            (0.0, 0.0, 0.0),
        )?;

        // 7. Combine in slot order.
        let f = dev.function(&ModuleKey::plain(Source::Combine), "combine_rows")?;
        launch(
            dev,
            &f,
            shapes::combine(t, d.hidden, dev.sm_count),
            &[
                Arg::Ptr(ws.z.ptr()),
                Arg::I32(dtype_code(if z_bf16 { DType::BF16 } else { DType::F32 })?),
                Arg::I32(d.hp as i32),
                Arg::Ptr(ws.pair_pos.ptr()),
                Arg::Ptr(if llama4 { 0 } else { ws.weights.ptr() }),
                Arg::I32(t as i32),
                Arg::I32(k as i32),
                Arg::I32(d.hidden as i32),
                Arg::Ptr(ws.out.ptr()),
                Arg::I32(dtype_code(hidden)?),
            ],
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        v: GemmVariant,
        w: &ProjectionBufs,
        act: u64,
        act_scale: u64,
        ws: &Workspace,
        gather_div: i32,
        max_tiles: usize,
        row_weight: u64,
        out: u64,
        out_scale: u64,
        mp: usize,
        kp: usize,
        out_stride: usize,
        (alpha, beta, limit): (f32, f32, f32),
    ) -> Result<()> {
        let key = ModuleKey::gemm(v);
        let f = self.dev.function(&key, "moe_gemm")?;
        let &(threads, smem) = self.gemm_launch.get(&v).ok_or_else(|| {
            MoeError::Cuda(format!("internal: GEMM variant {v:?} was not loaded"))
        })?;
        let shape = shapes::gemm(v.bm(), threads, smem, mp, max_tiles);
        launch(
            &self.dev,
            &f,
            shape,
            &[
                Arg::Ptr(w.data.ptr()),
                Arg::Ptr(w.scales.as_ref().map_or(0, |b| b.ptr())),
                Arg::Ptr(act),
                Arg::Ptr(act_scale),
                Arg::Ptr(ws.sorted_pair.ptr()),
                Arg::I32(gather_div),
                Arg::Ptr(ws.tile_expert.ptr()),
                Arg::Ptr(ws.tile_start.ptr()),
                Arg::Ptr(ws.tile_end.ptr()),
                Arg::Ptr(ws.num_tiles.ptr()),
                Arg::Ptr(w.bias.as_ref().map_or(0, |b| b.ptr())),
                Arg::Ptr(row_weight),
                Arg::Ptr(out),
                Arg::Ptr(out_scale),
                Arg::I32(mp as i32),
                Arg::I32(kp as i32),
                Arg::I32(out_stride as i32),
                Arg::F32(alpha),
                Arg::F32(beta),
                Arg::F32(limit),
            ],
        )
    }

    /// Copies one call's inputs into the workspace; returns where the routes come from.
    fn stage_inputs(
        &self,
        ws: &mut Workspace,
        input: &ForwardInput<'_>,
        host_routes: Option<&Routes>,
    ) -> Result<RouteSource> {
        let dev = &*self.dev;
        dev.write(&mut ws.x, 0, &input.hidden.bytes)?;
        Ok(match input.routing {
            RoutingInput::Logits(l) => {
                dev.write(&mut ws.logits, 0, &l.bytes)?;
                RouteSource::Logits(l.dtype)
            }
            RoutingInput::Packed(pk) => {
                dev.write(&mut ws.packed, 0, &pk.bytes)?;
                RouteSource::Packed
            }
            RoutingInput::TopK { .. } => {
                // Host-resolved (weights as f32; padding ids keep their id, weight 0).
                let routes = host_routes.ok_or_else(|| {
                    MoeError::Cuda("internal: routed input without its checked routes".into())
                })?;
                dev.write(&mut ws.ids, 0, &super::device::i32_bytes(&routes.ids))?;
                dev.write(&mut ws.weights, 0, &f32_bytes(&routes.weights))?;
                RouteSource::TopK
            }
        })
    }

    /// Median GPU time (µs) of the whole layer replayed from a CUDA graph, the L2 cache flushed
    /// before each replay (so weights come from HBM as in a real model, where other layers run
    /// in between).
    fn time_graph(&self, input: &ForwardInput<'_>, iters: usize) -> Result<f64> {
        let (tokens, host_routes) = forward::validate_input(&self.layer, input)?;
        if tokens == 0 {
            return Ok(0.0);
        }
        let flush_buf = self.dev.alloc(L2_FLUSH_BYTES)?;
        self.with_workspace(tokens, |ws| {
            let dev = &*self.dev;
            let source = self.stage_inputs(ws, input, host_routes.as_ref())?;
            // Warm-up outside the capture: module loads and the first-launch costs.
            self.enqueue(ws, tokens, input.hidden.dtype, source)?;
            dev.sync()?;
            dev.stream
                .begin_capture(
                    cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                )
                .map_err(|e| super::device::cuda_err("starting graph capture", e))?;
            let captured = self.enqueue(ws, tokens, input.hidden.dtype, source);
            let graph = dev
                .stream
                .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
                .map_err(|e| super::device::cuda_err("ending graph capture", e))?;
            captured?;
            let graph =
                graph.ok_or_else(|| MoeError::Cuda("graph capture recorded nothing".into()))?;
            super::ceilings::time_median_us(
                dev,
                3,
                iters,
                &mut || super::ceilings::flush(dev, &flush_buf),
                &mut || {
                    graph
                        .launch()
                        .map_err(|e| super::device::cuda_err("replaying the layer graph", e))
                },
            )
        })
    }

    /// Host entry: checks and uploads the inputs, enqueues, waits, and reads the output and routes.
    fn forward_host(&self, input: &ForwardInput<'_>) -> Result<ForwardOutput> {
        let layer = &*self.layer;
        let cfg = layer.config();
        // The same checks (and error messages) as every backend: shapes, dtypes, finite values,
        // routed ids and duplicates. Logits are only checked here: the GPU routes them.
        let (tokens, host_routes) = forward::validate_input(layer, input)?;
        let hidden = input.hidden;
        let h = cfg.hidden;
        let k = self.top_k();
        let weight_on_input = cfg.routing.method == RoutingMethod::Llama4;
        if tokens == 0 {
            return Ok(ForwardOutput {
                output: forward::output_like(hidden, &[], 0, h),
                routes: Routes {
                    tokens: 0,
                    top_k: k,
                    ids: Vec::new(),
                    weights: Vec::new(),
                    weight_on_input,
                },
            });
        }
        // Huge batches run in slices of at most MAX_PAIRS_PER_LAUNCH (token, slot) pairs: every step
        // is per token, so slicing changes nothing in the result, and it bounds the workspace
        // (GEMM2's rows alone are pairs × H) and the GEMM grids (≤ 65535 work tiles).
        let chunk = (MAX_PAIRS_PER_LAUNCH / k).max(1);
        if tokens <= chunk {
            return self.forward_slice(input, host_routes);
        }
        let mut out_bytes = Vec::with_capacity(tokens * h * hidden.dtype.size());
        let mut routes = Routes {
            tokens,
            top_k: k,
            ids: Vec::with_capacity(tokens * k),
            weights: Vec::with_capacity(tokens * k),
            weight_on_input,
        };
        for start in (0..tokens).step_by(chunk) {
            let end = (start + chunk).min(tokens);
            let x = row_slice(hidden, "hidden_states", start, end)?;
            let (logits, ids, weights);
            let routing = match input.routing {
                RoutingInput::Logits(l) => {
                    logits = row_slice(l, "router_logits", start, end)?;
                    RoutingInput::Logits(&logits)
                }
                RoutingInput::TopK { ids: i, weights: w } => {
                    ids = row_slice(i, "topk_ids", start, end)?;
                    weights = row_slice(w, "topk_weights", start, end)?;
                    RoutingInput::TopK {
                        ids: &ids,
                        weights: &weights,
                    }
                }
                RoutingInput::Packed(pk) => {
                    logits = row_slice(pk, "topk_packed", start, end)?;
                    RoutingInput::Packed(&logits)
                }
            };
            let part_routes = host_routes.as_ref().map(|r| Routes {
                tokens: end - start,
                top_k: k,
                ids: r.ids[start * k..end * k].to_vec(),
                weights: r.weights[start * k..end * k].to_vec(),
                weight_on_input,
            });
            let part = self.forward_slice(
                &ForwardInput {
                    hidden: &x,
                    routing,
                },
                part_routes,
            )?;
            out_bytes.extend_from_slice(&part.output.bytes);
            routes.ids.extend_from_slice(&part.routes.ids);
            routes.weights.extend_from_slice(&part.routes.weights);
        }
        let output = HostTensor::new("output", hidden.dtype, vec![tokens, h], out_bytes.into())?;
        Ok(ForwardOutput { output, routes })
    }

    /// One launch sequence for an already validated input of at most MAX_PAIRS_PER_LAUNCH pairs.
    fn forward_slice(
        &self,
        input: &ForwardInput<'_>,
        host_routes: Option<Routes>,
    ) -> Result<ForwardOutput> {
        let hidden = input.hidden;
        let tokens = hidden.shape[0];
        let h = self.layer.config().hidden;
        let k = self.top_k();
        self.with_workspace(tokens, |ws| {
            let dev = &*self.dev;
            let source = self.stage_inputs(ws, input, host_routes.as_ref())?;
            // Poison the output (all-ones bytes are NaN in f32, bf16 and f16): a row the kernels
            // fail to write shows as NaN, which never passes a check.
            super::ceilings::fill(dev, &ws.out, 0xFF)?;
            self.enqueue(ws, tokens, hidden.dtype, source)?;
            let out = dev.read(&ws.out, tokens * h * hidden.dtype.size())?;
            let routes = match source {
                RouteSource::Logits(_) => {
                    let ids = dev.read(&ws.ids, tokens * k * 4)?;
                    let w = dev.read(&ws.weights, tokens * k * 4)?;
                    Routes {
                        tokens,
                        top_k: k,
                        ids: ids
                            .chunks_exact(4)
                            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect(),
                        weights: w
                            .chunks_exact(4)
                            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect(),
                        weight_on_input: self.layer.config().routing.method
                            == RoutingMethod::Llama4,
                    }
                }
                _ => host_routes.ok_or_else(|| {
                    MoeError::Cuda("internal: routed input without its checked routes".into())
                })?,
            };
            let output = HostTensor::new("output", hidden.dtype, vec![tokens, h], out.into())?;
            Ok(ForwardOutput { output, routes })
        })
    }
}

/// Pairs (tokens × k) one launch sequence handles; larger calls are sliced by tokens.
pub const MAX_PAIRS_PER_LAUNCH: usize = 1 << 19;

/// Rows [start, end) of a tensor whose first dimension is tokens.
fn row_slice(t: &HostTensor, name: &str, start: usize, end: usize) -> Result<HostTensor> {
    let rows = t.shape.first().copied().unwrap_or(0);
    let row_bytes = t.bytes.len().checked_div(rows).unwrap_or(0);
    let mut shape = t.shape.clone();
    if let Some(first) = shape.first_mut() {
        *first = end - start;
    }
    HostTensor::new(
        name,
        t.dtype,
        shape,
        t.bytes[start * row_bytes..end * row_bytes].to_vec().into(),
    )
}

fn wgmma_allowed(arch: &str) -> bool {
    arch == "sm_90a" && std::env::var("MOERUNNER_WGMMA").map_or(true, |v| v != "0")
}

fn key_entry(key: &ModuleKey) -> &'static str {
    match key.source {
        Source::Routing => "route_logits",
        Source::Sort => "sort_pairs_by_expert",
        Source::Quant => "quantize_rows",
        Source::Combine => "combine_rows",
        Source::Gemm => "moe_gemm",
    }
}

fn set_smem_limit(f: &cudarc::driver::CudaFunction, bytes: u32) -> Result<()> {
    if bytes > 48 * 1024 {
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .map_err(|e| super::device::cuda_err("raising a kernel's shared-memory limit", e))?;
    }
    Ok(())
}

impl LoadedLayer for CudaLayer {
    fn backend(&self) -> &'static str {
        "cuda"
    }
    fn layer(&self) -> &MoeLayer {
        &self.layer
    }
    fn forward(&self, input: &ForwardInput<'_>) -> Result<ForwardOutput> {
        self.forward_host(input)
    }
    fn time_device_forward(&self, input: &ForwardInput<'_>, iters: usize) -> Option<Result<f64>> {
        Some(self.time_graph(input, iters))
    }
}

/// Bytes written between timed replays: several times the L2 (50 MB on H100, 60 MB on H200).
const L2_FLUSH_BYTES: usize = 512 << 20;

/// Launch shapes of each kernel, from the formulas documented at the top of its source.
mod shapes {
    use super::super::launch::Shape;

    fn grid_cap(items: usize, per_block: usize, sms: u32) -> u32 {
        items.div_ceil(per_block).clamp(1, 32 * sms as usize) as u32
    }

    /// routing.cu: one warp per token, W warps a block, a per-warp shared-memory region (keys and
    /// scratch of the shared-memory path; the register path uses it only for softmax / group scores).
    pub fn routing(tokens: usize, experts: usize, k: usize, sms: u32) -> Shape {
        let warp_bytes = (12 * experts + 8 * k + 15) & !15;
        let warps = (49152 / warp_bytes).clamp(1, 8);
        Shape {
            grid: (grid_cap(tokens, warps, sms), 1, 1),
            block: 32 * warps as u32,
            smem: (warps * warp_bytes) as u32,
            pdl: true,
        }
    }
    /// routing.cu unpack_routes.
    pub fn unpack(n: usize) -> Shape {
        Shape {
            grid: (n.div_ceil(256).clamp(1, 1024) as u32, 1, 1),
            block: 256,
            smem: 0,
            pdl: true,
        }
    }
    /// Dynamic shared memory the sort kernels may ask for without the opt-in attribute: the 48 KiB
    /// default counts static memory too (256 B in sort_pairs_by_expert / sort_scan), so 47 KiB.
    const SORT_SMEM_CAP: usize = 47 * 1024;
    /// sort.cu: one block of 1024 threads; 32 counting segments when they fit under the cap (the
    /// kernel takes its one-pair-per-thread path when P <= 32 * segments).
    pub fn sort(experts: usize) -> Shape {
        let full = 4 * (34 * experts + 2);
        let min = 4 * (3 * experts + 2);
        Shape {
            grid: (1, 1, 1),
            block: 1024,
            smem: full.min(SORT_SMEM_CAP.max(min)) as u32,
            pdl: true,
        }
    }

    /// Pairs above which the sort runs as three multi-block kernels (sort_count, sort_scan,
    /// sort_scatter); at or below, the one-block kernel (its small-P path is what decode needs).
    pub const SORT_MULTI_MIN_PAIRS: usize = 4096;
    /// Largest local expert count of the multi-block path (sort_scatter's 8 warp segments of
    /// 4 * E_local bytes each stay within 32 KiB of shared memory).
    pub const SORT_MULTI_MAX_EXPERTS: usize = 1024;
    /// Pairs per sort_count / sort_scatter block at most chunks (the chunk grows past that, in
    /// steps of SORT_CHUNK, so the one-block scan reads at most SORT_MAX_CHUNKS * E_local counts).
    const SORT_CHUNK: usize = 1024;
    const SORT_MAX_CHUNKS: usize = 256;
    const SORT_BLOCK: u32 = 256;
    const SORT_SEGMENTS: usize = 8; // = SORT_BLOCK / 32

    pub fn sort_multi_block(pairs: usize, experts: usize) -> bool {
        pairs > SORT_MULTI_MIN_PAIRS && experts <= SORT_MULTI_MAX_EXPERTS
    }
    /// (chunk, num_chunks) for P pairs (P >= 1): chunk = SORT_CHUNK * ceil(P / (SORT_CHUNK *
    /// SORT_MAX_CHUNKS)), num_chunks = ceil(P / chunk) <= min(SORT_MAX_CHUNKS, ceil(P / SORT_CHUNK)).
    pub fn sort_chunks(pairs: usize) -> (usize, usize) {
        let p = pairs.max(1);
        let chunk = SORT_CHUNK * p.div_ceil(SORT_CHUNK * SORT_MAX_CHUNKS);
        (chunk, p.div_ceil(chunk))
    }
    /// Ints of the chunk-count scratch for up to `pairs` pairs (the bound of sort_chunks is monotone
    /// in P, so a workspace sized for its capacity fits every smaller call); 0 when only the
    /// one-block kernel can run.
    pub fn sort_scratch_ints(pairs: usize, experts: usize) -> usize {
        if !sort_multi_block(pairs, experts) {
            return 0;
        }
        SORT_MAX_CHUNKS.min(pairs.div_ceil(SORT_CHUNK)) * experts
    }
    /// sort.cu sort_count: one block of 256 per chunk, a histogram of E_local ints.
    pub fn sort_count(pairs: usize, experts: usize) -> Shape {
        Shape {
            grid: (sort_chunks(pairs).1 as u32, 1, 1),
            block: SORT_BLOCK,
            smem: (4 * experts) as u32,
            pdl: true,
        }
    }
    /// sort.cu sort_scan: one block of 1024; 2*(E+1) ints plus G = min(32, 1024/E) groups of E.
    pub fn sort_scan(experts: usize) -> Shape {
        let groups = experts.max((32 * experts).min(1024));
        Shape {
            grid: (1, 1, 1),
            block: 1024,
            smem: (4 * (2 * (experts + 1) + groups)) as u32,
            pdl: true,
        }
    }
    /// sort.cu sort_scatter: same grid as sort_count, 8 warp segments of E_local cursors each.
    pub fn sort_scatter(pairs: usize, experts: usize) -> Shape {
        Shape {
            grid: (sort_chunks(pairs).1 as u32, 1, 1),
            block: SORT_BLOCK,
            smem: (4 * SORT_SEGMENTS * experts) as u32,
            pdl: true,
        }
    }
    /// quant.cu: one thread per 16 output columns.
    pub fn quant(rows: usize, cols_p: usize, sms: u32) -> Shape {
        Shape {
            grid: (grid_cap(rows * cols_p / 16, 256, sms), 1, 1),
            block: 256,
            smem: 0,
            pdl: true,
        }
    }
    /// combine.cu: one thread per (token, 4 columns); blocks of 128 while that gives at most one block
    /// per SM (small T: spread over more SMs), else 256.
    pub fn combine(tokens: usize, h: usize, sms: u32) -> Shape {
        let items = tokens * h.div_ceil(4);
        let block = if items <= 128 * sms as usize {
            128
        } else {
            256
        };
        Shape {
            grid: (grid_cap(items, block, sms), 1, 1),
            block: block as u32,
            smem: 0,
            pdl: true,
        }
    }
    /// moe_gemm.cu: threads and dynamic shared memory as the module exports them (`moe_gemm_meta`).
    pub fn gemm(bm: u32, threads: u32, smem: u32, mp: usize, max_tiles: usize) -> Shape {
        Shape {
            grid: ((mp as u32) / bm, max_tiles as u32, 1),
            block: threads,
            smem,
            pdl: true,
        }
    }
}
