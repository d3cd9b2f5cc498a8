//! A layer loaded on the GPU: prepared weights, its pipeline of stages (`pipeline.rs`), a workspace
//! sized from the stages, and the entry points — on caller-owned device memory and a caller's stream
//! (`enqueue_on`, launches only, graph-capturable), and on host tensors (`forward`: copy in, enqueue,
//! copy out), which slices huge batches.

use std::sync::{Arc, Mutex};

use super::codec::{self, PreparedScales};
use super::device::{f32_bytes, i32_bytes, le_words, Device};
use super::pipeline::{
    main_loop_switches, wgmma_allowed, DeviceCall, DeviceRoutes, GemmTable, Pipeline,
    ProjectionBufs, Resident,
};
use super::prepare::{self, PreparedWeights};
use super::tactics::{self, Tactic, TacticChoice, TacticMode, TacticTable};
use super::workspace::{Scratch, Slot, Staging, Workspace};
use crate::backend::LoadedLayer;
use crate::config::RoutingMethod;
use crate::error::{MoeError, Result};
use crate::forward::{self, ForwardInput, ForwardOutput};
use crate::routing::{Routes, RoutingInput};
use crate::tensor::HostTensor;
use crate::weights::MoeLayer;

pub struct CudaLayer {
    pub(super) dev: Arc<Device>,
    pub(super) layer: Arc<MoeLayer>,
    pub(super) resident: Resident,
    pub(super) pipeline: Pipeline,
    /// The load log's line on the padding weight preparation applied.
    preparation: String,
    workspace: Mutex<Option<Workspace>>,
    /// Warp-specialised wgmma allowed here (the default tactic's choice).
    ws_on: bool,
    /// The GEMM tactics calls take (`tactics.rs`): tuned per shape class where the table was read
    /// or `tune` ran, a forced one while `tune` measures it, else the default.
    tactics: Mutex<Tactics>,
    /// This layer's key in the tactic table.
    tactic_key: String,
}

#[derive(Default)]
struct Tactics {
    choice: TacticChoice,
    forced: Option<Tactic>,
}

impl CudaLayer {
    /// Prepares and uploads the weights, then compiles (or fetches from the disk cache) every module
    /// the layer can use, so no forward call pays for NVRTC and a kernel that does not compile fails
    /// the load, not a later call.
    pub fn load(dev: Arc<Device>, layer: Arc<MoeLayer>) -> Result<CudaLayer> {
        let codec = codec::codec_for_device(layer.config(), wgmma_allowed(&dev.arch))
            .map_err(MoeError::Cuda)?;
        Self::load_with_codec(dev, layer, codec)
    }

    /// [`CudaLayer::load`] for `moerunner tune`: every GEMM form a candidate tactic may use is
    /// loaded, and the tactic table is not read (the default tactic is the baseline).
    pub fn load_for_tuning(dev: Arc<Device>, layer: Arc<MoeLayer>) -> Result<CudaLayer> {
        let codec = codec::codec_for_device(layer.config(), wgmma_allowed(&dev.arch))
            .map_err(MoeError::Cuda)?;
        Self::load_inner(dev, layer, codec, true, false)
    }

    /// [`CudaLayer::load`] as on a GPU without Hopper's wgmma (Blackwell; `MOERUNNER_WGMMA=0`): the
    /// codec and main loops such a device runs — mma.sync, and for the decoded formats the
    /// register-sourced mma.sync loop — so a Hopper GPU tests them.
    pub fn load_without_wgmma(dev: Arc<Device>, layer: Arc<MoeLayer>) -> Result<CudaLayer> {
        let codec = codec::codec_for_device(layer.config(), false).map_err(MoeError::Cuda)?;
        Self::load_inner(dev, layer, codec, false, true)
    }

    /// [`CudaLayer::load`] with one of the layer's codecs named (a pairing with two GEMM paths,
    /// `codec::gemm_formats_of`: tests and comparisons run both in one process).
    pub fn load_with_codec(
        dev: Arc<Device>,
        layer: Arc<MoeLayer>,
        codec: &'static codec::Codec,
    ) -> Result<CudaLayer> {
        Self::load_inner(dev, layer, codec, false, false)
    }

    fn load_inner(
        dev: Arc<Device>,
        layer: Arc<MoeLayer>,
        codec: &'static codec::Codec,
        tuning: bool,
        without_wgmma: bool,
    ) -> Result<CudaLayer> {
        let cfg = layer.config();
        let w = layer.weights();
        codec::codec_for(cfg).map_err(MoeError::Cuda)?;
        if (codec.weight, codec.activation) != (cfg.weight_format, cfg.activation_format) {
            return Err(MoeError::Cuda(format!(
                "codec {} given for a {}×{} layer",
                codec.summary,
                cfg.weight_format.name(),
                cfg.activation_format.name()
            )));
        }
        prepare::check_epilogue_factors(w)?;
        prepare::check_decodable_elements(w)?;
        let prepared: PreparedWeights = prepare::prepare_weights(cfg, codec, w);
        let preparation = prepared.padding_note(
            w.w13.byte_size()
                + w.w2.byte_size()
                + 4 * (w.w13_bias.as_ref().map_or(0, Vec::len)
                    + w.w2_bias.as_ref().map_or(0, Vec::len)),
        );
        let upload_proj =
            |t: &prepare::PreparedTensor, bias: &Option<Vec<f32>>| -> Result<ProjectionBufs> {
                Ok(ProjectionBufs {
                    data: dev.upload(&t.data)?,
                    scales: match codec.weight_scales {
                        PreparedScales::None => None,
                        _ => Some(dev.upload_f32(&t.scales)?),
                    },
                    bias: bias.as_deref().map(|b| dev.upload_f32(b)).transpose()?,
                })
            };
        let w13 = upload_proj(&prepared.w13, &prepared.w13_bias)?;
        let w2 = upload_proj(&prepared.w2, &prepared.w2_bias)?;
        let static_scale = |s: Option<f32>, name: &str| match (codec.static_input_scales, s) {
            (true, Some(v)) => dev.upload_f32(&[v]).map(Some),
            (true, None) => Err(MoeError::Cuda(format!(
                "{} layer without the static input scale {name}",
                cfg.weight_format.name()
            ))),
            (false, _) => Ok(None),
        };
        let resident = Resident {
            a1_scale: static_scale(w.w13_input_scale, "w13_input_scale")?,
            a2_scale: static_scale(w.w2_input_scale, "w2_input_scale")?,
            router_bias: w
                .router_bias
                .as_deref()
                .map(|b| dev.upload_f32(b))
                .transpose()?,
            cfg: cfg.clone(),
            codec,
            dims: prepared.dims,
            w13,
            w2,
        };
        let (wgmma_on, ws_on) = if without_wgmma {
            main_loop_switches("(without wgmma)", codec, codec.summary)?;
            (false, false)
        } else {
            main_loop_switches(&dev.arch, codec, codec.summary)?
        };
        let tactic_key = tactics::layer_key(&tactics::KeyParts {
            device: &dev.name,
            arch: &dev.arch,
            driver: driver_version()?,
            nvrtc: &super::nvrtc::version()?,
            codec,
            experts: resident.dims.experts,
            hidden: resident.dims.hidden,
            inter: resident.dims.inter,
            top_k: cfg.routing.top_k,
            activation: &cfg.activation.to_string(),
        });
        let mode = if tuning {
            TacticMode::Off
        } else {
            tactics::mode()?
        };
        let choice = match tactics::table_to_read(mode, tactics::table_path())? {
            Some(path) => TacticTable::read(&path)?.choice(&tactic_key),
            None => TacticChoice::default(),
        };
        // (tuning at load needs every candidate's GEMM forms, like `tune`)
        let tuning = tuning || mode == TacticMode::Tune;
        let plain_wide = tuning
            || choice
                .per_class
                .iter()
                .flatten()
                .any(|t| t.needs_plain_wide_loops(ws_on));
        let gemm = GemmTable::load(&dev, codec, cfg, (wgmma_on, ws_on), plain_wide)?;
        let pipeline = Pipeline::standard(&dev, &resident, gemm)?;
        dev.sync()?;
        let loaded = CudaLayer {
            dev,
            layer,
            resident,
            pipeline,
            preparation,
            workspace: Mutex::new(None),
            ws_on,
            tactics: Mutex::new(Tactics {
                choice,
                forced: None,
            }),
            tactic_key,
        };
        if mode == TacticMode::Tune {
            loaded.tune_missing_classes()?;
        }
        Ok(loaded)
    }

    /// The tactic a call (or launch slice) of `tokens` tokens takes.
    pub(super) fn tactic_for(&self, tokens: usize) -> Result<Tactic> {
        let t = self.lock_tactics()?;
        Ok(t.forced
            .unwrap_or_else(|| self.resident.tactic_for(&t.choice, tokens, self.ws_on)))
    }

    /// Runs every call with `tactic` until set back to None (what `tune` measures).
    pub(super) fn force_tactic(&self, tactic: Option<Tactic>) -> Result<()> {
        self.lock_tactics()?.forced = tactic;
        Ok(())
    }

    /// Makes calls take `choice`'s tuned tactics (what `tune` found, or a table read later).
    pub fn set_tactics(&self, choice: TacticChoice) -> Result<()> {
        self.lock_tactics()?.choice = choice;
        Ok(())
    }

    /// The tuned tactics calls take now.
    pub fn tactic_choice(&self) -> Result<TacticChoice> {
        Ok(self.lock_tactics()?.choice)
    }

    fn lock_tactics(&self) -> Result<std::sync::MutexGuard<'_, Tactics>> {
        self.tactics
            .lock()
            .map_err(|_| MoeError::Cuda("tactics lock poisoned".into()))
    }

    /// This layer's key in the tactic table.
    pub fn tactic_key(&self) -> &str {
        &self.tactic_key
    }

    /// Warp-specialised wgmma allowed on this device (the default tactic's choice).
    pub fn ws_on(&self) -> bool {
        self.ws_on
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    /// The stages of a forward call, in order (the fused small-batch kernel last, when the layer
    /// has it: it replaces every stage after routing for calls of few pairs).
    pub fn stage_names(&self) -> Vec<&'static str> {
        self.pipeline.stage_names()
    }

    /// Whether a call of `tokens` tokens runs the fused small-batch kernel.
    pub fn takes_fused_small_batch(&self, tokens: usize) -> bool {
        tokens > 0
            && self
                .pipeline
                .takes_decode(&self.dev, &self.resident, tokens)
    }

    /// Lets calls of at most `pairs` (token, expert) pairs take the fused small-batch kernel (0:
    /// none), whatever their weights' size; the default is `MOERUNNER_DECODE_PAIRS` or the format's
    /// measured limits (`DecodeVariant::default_limits`). False when the layer has no fused kernel.
    pub fn set_fused_max_pairs(&self, pairs: usize) -> bool {
        self.pipeline.set_decode_max_pairs(pairs)
    }

    /// Lets calls of at most `tokens` tokens take the fused front (route, sort and quantize in one
    /// launch, `front.cu`; 0: none); the default is `MOERUNNER_FUSED_FRONT` or
    /// `front::DEFAULT_MAX_TOKENS`.
    pub fn set_fused_front_max_tokens(&self, tokens: usize) {
        self.pipeline.set_front_max_tokens(tokens)
    }

    /// Whether a call of `tokens` tokens with `routes` runs the fused front.
    pub fn takes_fused_front(&self, tokens: usize, routes: &DeviceRoutes) -> bool {
        tokens > 0
            && self
                .pipeline
                .takes_front(&self.dev, &self.resident, tokens, routes)
    }

    pub(super) fn top_k(&self) -> usize {
        self.layer.config().routing.top_k
    }

    /// Makes sure the workspace holds `tokens` tokens (and host staging when `staging`), growing it
    /// (rounded up to a power of two) outside any capture. Call it before capturing `enqueue_on`
    /// into a graph.
    pub fn reserve(&self, tokens: usize, staging: bool) -> Result<()> {
        let mut guard = self.lock_workspace()?;
        self.reserve_locked(&mut guard, tokens, staging).map(|_| ())
    }

    pub(super) fn lock_workspace(&self) -> Result<std::sync::MutexGuard<'_, Option<Workspace>>> {
        self.workspace
            .lock()
            .map_err(|_| MoeError::Cuda("workspace lock poisoned".into()))
    }

    /// Grows `ws` to hold `tokens` tokens (and host staging when `staging`, or when the workspace
    /// being replaced had it: a host call that staged before will stage again); returns it.
    pub(super) fn reserve_locked<'w>(
        &self,
        ws: &'w mut Option<Workspace>,
        tokens: usize,
        staging: bool,
    ) -> Result<&'w mut Workspace> {
        let cfg = self.layer.config();
        // (a call of more tokens runs in slices of one launch sequence's at most)
        let tokens = tokens.min(self.max_tokens_per_launch());
        let mut staging = staging;
        let mut grew = false;
        if ws
            .as_ref()
            .is_none_or(|w| w.scratch.capacity.tokens < tokens)
        {
            staging |= ws.as_ref().is_some_and(|w| w.staging.is_some());
            *ws = None; // free the old one first: the new one may need the room
            let cap = self.workspace_capacity(tokens);
            let (capacity, plan) = self.pipeline.scratch_plan(&self.resident, cap);
            *ws = Some(Workspace {
                scratch: Scratch::alloc(&self.dev, capacity, &plan)?,
                staging: None,
            });
            grew = true;
        }
        let w = ws
            .as_mut()
            .ok_or_else(|| MoeError::Cuda("internal: no workspace".into()))?;
        if staging && w.staging.as_ref().is_none_or(|s| s.tokens < tokens) {
            w.staging = None;
            grew = true;
            w.staging = Some(Staging::alloc(
                &self.dev,
                w.scratch.capacity.tokens,
                cfg.hidden,
                cfg.num_experts,
                self.top_k(),
            )?);
        }
        // Allocations are ordered on the device's stream; a caller's stream must see them done.
        if grew {
            self.dev.sync()?;
        }
        Ok(w)
    }

    /// The token capacity of the workspace calls of `tokens` tokens get: one launch sequence's at
    /// most (larger calls run in slices), rounded up to a power of two, at least 16.
    fn workspace_capacity(&self, tokens: usize) -> usize {
        tokens
            .min(self.max_tokens_per_launch())
            .next_power_of_two()
            .max(16)
    }

    /// Bytes of device memory the workspace of calls of up to `tokens` tokens holds besides the
    /// weights — what `reserve(tokens, staging)` allocates (scratch between the stages, plus the
    /// host entry's staging buffers with `staging`) — without allocating anything: an engine sizes
    /// its KV cache after it. Bounded for any `tokens`: huge calls run in slices.
    pub fn workspace_bytes(&self, tokens: usize, staging: bool) -> usize {
        let cfg = self.layer.config();
        let cap = self.workspace_capacity(tokens);
        let (_, plan) = self.pipeline.scratch_plan(&self.resident, cap);
        let staged: usize = if staging {
            Staging::sizes(cap, cfg.hidden, cfg.num_experts, self.top_k())
                .iter()
                .sum()
        } else {
            0
        };
        plan.total_bytes() + staged
    }

    /// Bytes of device memory the workspace holds now (0 before the first call or `reserve`).
    pub fn reserved_bytes(&self) -> Result<usize> {
        Ok(self.lock_workspace()?.as_ref().map_or(0, |w| {
            w.scratch.bytes() + w.staging.as_ref().map_or(0, Staging::bytes)
        }))
    }

    /// Tokens of one launch sequence: at most MAX_PAIRS_PER_LAUNCH (token, slot) pairs.
    pub(super) fn max_tokens_per_launch(&self) -> usize {
        (MAX_PAIRS_PER_LAUNCH / self.top_k().max(1)).max(1)
    }

    /// Host entry: checks the inputs (as every backend does), then per slice of at most
    /// MAX_PAIRS_PER_LAUNCH pairs copies it in, enqueues, waits and copies the output (and the
    /// routes) out.
    fn forward_host(&self, input: &ForwardInput<'_>) -> Result<ForwardOutput> {
        let cfg = self.layer.config();
        // The same checks (and error messages) as every backend: shapes, dtypes, finite values,
        // routed ids and duplicates. Logits are only checked here: the GPU routes them.
        let (tokens, host_routes) = forward::validate_input(&self.layer, input)?;
        let (h, k) = (cfg.hidden, self.top_k());
        let weight_on_input = cfg.routing.method == RoutingMethod::Llama4;
        let elem = input.hidden.dtype.size();
        let mut out_bytes = Vec::with_capacity(tokens * h * elem);
        let mut routes = Routes {
            tokens,
            top_k: k,
            ids: Vec::with_capacity(tokens * k),
            weights: Vec::with_capacity(tokens * k),
            weight_on_input,
        };
        let chunk = self.max_tokens_per_launch();
        for start in (0..tokens).step_by(chunk) {
            let end = (start + chunk).min(tokens);
            let part = self.forward_slice(input, host_routes.as_ref(), start, end)?;
            out_bytes.extend_from_slice(&part.out);
            routes.ids.extend_from_slice(&part.ids);
            routes.weights.extend_from_slice(&part.weights);
        }
        if tokens == 0 {
            return Ok(ForwardOutput {
                output: forward::output_like(input.hidden, &[], 0, h),
                routes,
            });
        }
        let output = HostTensor::new(
            "output",
            input.hidden.dtype,
            vec![tokens, h],
            out_bytes.into(),
        )?;
        Ok(ForwardOutput { output, routes })
    }

    /// Tokens [start, end) of a checked host call: staged, run, read back (output bytes, ids,
    /// weights).
    fn forward_slice(
        &self,
        input: &ForwardInput<'_>,
        host_routes: Option<&Routes>,
        start: usize,
        end: usize,
    ) -> Result<SliceOutput> {
        let t = end - start;
        let k = self.top_k();
        let out_len = t * self.layer.config().hidden * input.hidden.dtype.size();
        let mut guard = self.lock_workspace()?;
        let ws = self.reserve_locked(&mut guard, t, true)?;
        let call = self.stage_inputs(ws, input, host_routes, start, end)?;
        let dev = &*self.dev;
        let staging = ws
            .staging
            .as_ref()
            .ok_or_else(|| MoeError::Cuda("internal: no staging buffers".into()))?;
        // Poison the output (all-ones bytes are NaN in f32, bf16 and f16): a row the kernels fail
        // to write shows as NaN, which never passes a check.
        super::timing::fill(dev, &staging.out, 0xFF)?;
        // The device entry's path (its checks too) on the staged copies.
        self.check_device_call(&call)?;
        self.enqueue_checked(&ws.scratch, &call, dev.stream.cu_stream())?;
        let out = dev.read(&staging.out, out_len)?;
        let routes = match (call.routes, host_routes) {
            (DeviceRoutes::TopK { .. }, Some(r)) => (
                r.ids[start * k..end * k].to_vec(),
                r.weights[start * k..end * k].to_vec(),
            ),
            (DeviceRoutes::TopK { .. }, None) => {
                return Err(MoeError::Cuda(
                    "internal: routed input without its checked routes".into(),
                ))
            }
            _ => (
                le_words(
                    &dev.read(ws.scratch.buf(Slot::Ids)?, t * k * 4)?,
                    i32::from_le_bytes,
                ),
                le_words(
                    &dev.read(ws.scratch.buf(Slot::Weights)?, t * k * 4)?,
                    f32::from_le_bytes,
                ),
            ),
        };
        Ok(SliceOutput {
            out,
            ids: routes.0,
            weights: routes.1,
        })
    }

    /// Copies tokens [start, end) of a checked host call into the staging buffers (routed ids and
    /// weights into the route stage's slots); returns the device call over them.
    fn stage_inputs(
        &self,
        ws: &mut Workspace,
        input: &ForwardInput<'_>,
        host_routes: Option<&Routes>,
        start: usize,
        end: usize,
    ) -> Result<DeviceCall> {
        let dev = &*self.dev;
        fn rows(t: &HostTensor, start: usize, end: usize) -> &[u8] {
            let n = t.shape.first().copied().unwrap_or(0);
            let per_row = t.bytes.len().checked_div(n).unwrap_or(0);
            &t.bytes[start * per_row..end * per_row]
        }
        let staging = ws
            .staging
            .as_mut()
            .ok_or_else(|| MoeError::Cuda("internal: no staging buffers".into()))?;
        dev.write(&mut staging.x, 0, rows(input.hidden, start, end))?;
        let routes = match input.routing {
            RoutingInput::Logits(l) => {
                dev.write(&mut staging.logits, 0, rows(l, start, end))?;
                DeviceRoutes::Logits {
                    ptr: staging.logits.ptr(),
                    dtype: l.dtype,
                }
            }
            RoutingInput::Packed(pk) => {
                dev.write(&mut staging.packed, 0, rows(pk, start, end))?;
                DeviceRoutes::Packed {
                    ptr: staging.packed.ptr(),
                }
            }
            RoutingInput::TopK { .. } => {
                // Host-resolved (weights as f32; padding ids keep their id, weight 0).
                let r = host_routes.ok_or_else(|| {
                    MoeError::Cuda("internal: routed input without its checked routes".into())
                })?;
                let k = self.top_k();
                dev.write(
                    ws.scratch.buf_mut(Slot::Ids)?,
                    0,
                    &i32_bytes(&r.ids[start * k..end * k]),
                )?;
                dev.write(
                    ws.scratch.buf_mut(Slot::Weights)?,
                    0,
                    &f32_bytes(&r.weights[start * k..end * k]),
                )?;
                DeviceRoutes::TopK {
                    ids: ws.scratch.ptr(Slot::Ids)?,
                    weights: ws.scratch.ptr(Slot::Weights)?,
                }
            }
        };
        let staging = ws
            .staging
            .as_ref()
            .ok_or_else(|| MoeError::Cuda("internal: no staging buffers".into()))?;
        Ok(DeviceCall {
            tokens: end - start,
            hidden: staging.x.ptr(),
            hidden_dtype: input.hidden.dtype,
            routes,
            out: staging.out.ptr(),
            out_dtype: input.hidden.dtype,
        })
    }

    /// Each stage of the standard pipeline timed as its prefix: stages 1..=n replayed from a CUDA
    /// graph as `time_graph` replays the whole, for every n, on the one staged call; a stage's
    /// marginal time is what it adds to the prefix before it. The fused small-batch kernel is never
    /// part of it.
    fn time_stages(
        &self,
        input: &ForwardInput<'_>,
        iters: usize,
    ) -> Result<Vec<crate::backend::StageTime>> {
        let names = self.pipeline.standard_stage_names();
        let firsts: Vec<Option<usize>> = (1..=names.len()).map(Some).collect();
        let mut before = 0.0;
        Ok(names
            .iter()
            .zip(self.time_graphs(input, iters, &firsts)?)
            .map(|(name, cumulative)| {
                let marginal = cumulative - before;
                before = cumulative;
                crate::backend::StageTime {
                    stage: name.to_string(),
                    cumulative_us: cumulative,
                    marginal_us: marginal,
                }
            })
            .collect())
    }

    /// Median GPU time (µs) of the whole layer (one launch sequence) replayed from a CUDA graph with
    /// the L2 flushed before each replay (`timing.rs`).
    fn time_graph(&self, input: &ForwardInput<'_>, iters: usize) -> Result<f64> {
        Ok(self.time_graphs(input, iters, &[None])?[0])
    }

    /// [`Self::time_graph`] for each of `firsts`: the whole layer (None) or the standard pipeline's
    /// first n stages, all on one staged call (the input validated and uploaded once).
    fn time_graphs(
        &self,
        input: &ForwardInput<'_>,
        iters: usize,
        firsts: &[Option<usize>],
    ) -> Result<Vec<f64>> {
        let (tokens, host_routes) = forward::validate_input(&self.layer, input)?;
        if tokens == 0 {
            return Ok(vec![0.0; firsts.len()]);
        }
        let end = tokens.min(self.max_tokens_per_launch());
        let mut guard = self.lock_workspace()?;
        let ws = self.reserve_locked(&mut guard, end, true)?;
        let call = self.stage_inputs(ws, input, host_routes.as_ref(), 0, end)?;
        let dev = &*self.dev;
        let scratch = &ws.scratch;
        let tactic = self.tactic_for(call.tokens)?;
        firsts
            .iter()
            .map(|&first| {
                super::timing::time_graph_replay_us(dev, iters, &mut || {
                    self.pipeline.enqueue_stages(
                        dev,
                        dev.stream.cu_stream(),
                        (&self.resident, tactic),
                        scratch,
                        &call,
                        first,
                    )
                })
            })
            .collect()
    }
}

/// One slice of a host call, read back: output bytes, and the routes the GPU chose (or was given).
struct SliceOutput {
    out: Vec<u8>,
    ids: Vec<i32>,
    weights: Vec<f32>,
}

/// The driver's CUDA version (e.g. 13000), part of the tactic table's key.
fn driver_version() -> Result<i32> {
    let mut v = 0;
    // SAFETY: a plain out-parameter; the driver is loaded (a device is open).
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| super::device::cuda_err("reading the driver version", e))?;
    Ok(v)
}

/// Pairs (tokens × k) one launch sequence handles; larger calls are sliced by tokens.
pub const MAX_PAIRS_PER_LAUNCH: usize = 1 << 19;

impl LoadedLayer for CudaLayer {
    fn backend(&self) -> &'static str {
        "cuda"
    }
    fn as_cuda(&self) -> Option<&CudaLayer> {
        Some(self)
    }
    fn workspace_bytes(&self, tokens: usize) -> Option<usize> {
        Some(CudaLayer::workspace_bytes(self, tokens, false))
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
    fn time_device_stages(
        &self,
        input: &ForwardInput<'_>,
        iters: usize,
    ) -> Option<Result<Vec<crate::backend::StageTime>>> {
        Some(self.time_stages(input, iters))
    }
    fn preparation(&self) -> Option<String> {
        Some(self.preparation.clone())
    }
    fn tactic(&self, tokens: usize) -> Option<String> {
        let part = tokens.min(self.max_tokens_per_launch());
        if self.takes_fused_small_batch(part) {
            return Some("fused_small_batch".into());
        }
        Some(match self.tactic_for(part) {
            Ok(t) => t.label(),
            Err(e) => e.to_string(),
        })
    }
    fn kernel_path(&self) -> Option<&'static str> {
        let cfg = self.layer.config();
        let paths = codec::gemm_formats_of(cfg.weight_format, cfg.activation_format);
        (paths.len() > 1).then(|| self.resident.codec.gemm.name())
    }
}
