//! The device-memory entry point of a loaded layer: one forward call on caller-owned device buffers
//! (hidden states, logits or top-k, output) on a caller-given stream — launches only, so PyTorch
//! (or any caller) can capture it in a CUDA graph. The host entry point (`layer.rs`) copies in,
//! calls the same pipeline and copies out.

use super::launch::RawStream;
use super::layer::CudaLayer;
use super::workspace::Scratch;
use crate::error::{MoeError, Result};
use crate::tensor::DType;

/// Where a call's routes are on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRoutes {
    /// `[T, E]` router logits, f32 or bf16.
    Logits { ptr: u64, dtype: DType },
    /// `[T, K]` expert ids (i32; ids outside this rank's experts, and -1, are skipped) and `[T, K]`
    /// f32 weights.
    TopK { ids: u64, weights: u64 },
    /// `[T, K]` FlashInfer's packed int32 (id << 16 | bf16 weight bits).
    Packed { ptr: u64 },
}

/// One forward call on device memory: `[T, H]` hidden states of `hidden_dtype` (bf16, f16 or f32),
/// the routes, and a `[T, H]` output of `out_dtype` (bf16, f16 or f32; the hidden states' dtype
/// unless a caller wants the f32 sums themselves, as device all-to-all's partial rows do).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceCall {
    pub tokens: usize,
    pub hidden: u64,
    pub hidden_dtype: DType,
    pub routes: DeviceRoutes,
    pub out: u64,
    pub out_dtype: DType,
}

impl CudaLayer {
    /// Enqueues the whole layer for `call` on `stream` (the device's own stream when `None`):
    /// launches only — no allocation (after `reserve`), no copy, no host wait — so it can be
    /// captured in a CUDA graph. Nothing about the inputs is checked on the device: ids outside this
    /// rank's experts (and -1) are skipped, NaN stays in its token. Calls on different streams must
    /// not overlap: they share the workspace.
    ///
    /// # Safety
    /// Every address in `call` must be device memory of this layer's device, of the size the call
    /// implies (`[T, H]` hidden states in `hidden_dtype` and output in `out_dtype`, `[T, E]` logits, `[T, K]` ids,
    /// weights or packed routes), valid until `stream` has run the call, and `stream` a live stream
    /// of this device's context.
    pub unsafe fn enqueue_on(&self, call: &DeviceCall, stream: Option<RawStream>) -> Result<()> {
        self.check_device_call(call)?;
        if call.tokens == 0 {
            return Ok(()); // nothing to launch (and no workspace needed)
        }
        let stream = stream.unwrap_or_else(|| self.dev.stream.cu_stream());
        let mut guard = self.lock_workspace()?;
        let need = call.tokens.min(self.max_tokens_per_launch());
        let have = guard.as_ref().map_or(0, |w| w.scratch.capacity.tokens);
        if have < need && stream_is_capturing(stream)? {
            return Err(MoeError::Cuda(format!(
                "the workspace holds {have} tokens and the stream is capturing a graph: \
                 call reserve({}) before the capture",
                call.tokens
            )));
        }
        // Allocates only when the workspace is too small (never under a capture: refused above).
        let ws = self.reserve_locked(&mut guard, need, false)?;
        self.enqueue_checked(&ws.scratch, call, stream)
    }

    /// Enqueues a checked call whose slices fit `scratch`: the one path of both entry points.
    /// Huge calls run as several launch sequences over slices of their tokens (every step is per
    /// token): this bounds the workspace and keeps GEMM grids under 65535 work tiles.
    pub(super) fn enqueue_checked(
        &self,
        scratch: &Scratch,
        call: &DeviceCall,
        stream: RawStream,
    ) -> Result<()> {
        self.enqueue_slices(scratch, call, stream, None, |_, _| Ok(()))
    }

    /// `enqueue_checked`'s slicing with the pipeline's first `first` stages only (all: None), and
    /// `after(start, slice)` enqueued behind each slice's launches.
    fn enqueue_slices(
        &self,
        scratch: &Scratch,
        call: &DeviceCall,
        stream: RawStream,
        first: Option<usize>,
        mut after: impl FnMut(usize, &DeviceCall) -> Result<()>,
    ) -> Result<()> {
        let chunk = self.max_tokens_per_launch();
        for start in (0..call.tokens).step_by(chunk) {
            let part = self.slice_call(call, start, (start + chunk).min(call.tokens))?;
            let tactic = self.tactic_for(part.tokens)?;
            self.pipeline.enqueue_stages(
                &self.dev,
                stream,
                (&self.resident, tactic),
                scratch,
                &part,
                first,
            )?;
            after(start, &part)?;
        }
        Ok(())
    }

    /// The route stage alone: `tokens` tokens' router logits (or packed routes) routed on the
    /// device with this layer's router, their `[T, K]` expert ids (i32, global) and f32 weights
    /// left in `ids` / `weights` — for code that moves tokens by their routes before the layer
    /// runs (device all-to-all, `parallel::device_ep`). On the device's own stream; launches and
    /// device copies only. Given routes (`TopK`) need no routing and are refused.
    ///
    /// # Safety
    /// As [`Self::enqueue_on`] for `routes`; `ids` and `weights` must be device memory of this
    /// layer's device of `[T, K]` 4-byte elements each.
    pub(crate) unsafe fn enqueue_routes(
        &self,
        tokens: usize,
        routes: DeviceRoutes,
        ids: u64,
        weights: u64,
    ) -> Result<()> {
        if matches!(routes, DeviceRoutes::TopK { .. }) {
            return Err(MoeError::Cuda(
                "internal: given routes need no routing".into(),
            ));
        }
        // (the call's hidden states and output are never read by the route stage)
        let call = DeviceCall {
            tokens,
            hidden: ids,
            hidden_dtype: DType::F32,
            routes,
            out: weights,
            out_dtype: DType::F32,
        };
        self.check_device_call(&call)?;
        if tokens == 0 {
            return Ok(());
        }
        if ids == 0 || weights == 0 {
            return Err(MoeError::invalid(
                "topk_ids",
                "null device pointer".to_string(),
            ));
        }
        if self.pipeline.standard_stage_names().first() != Some(&"route") {
            return Err(MoeError::Cuda(
                "internal: the pipeline's first stage is not routing".into(),
            ));
        }
        let stream = self.dev.stream.cu_stream();
        let k = self.top_k();
        let mut guard = self.lock_workspace()?;
        let need = tokens.min(self.max_tokens_per_launch());
        let ws = self.reserve_locked(&mut guard, need, false)?;
        let (from_ids, from_weights) = (
            ws.scratch.ptr(super::workspace::Slot::Ids)?,
            ws.scratch.ptr(super::workspace::Slot::Weights)?,
        );
        self.enqueue_slices(&ws.scratch, &call, stream, Some(1), |start, part| {
            let (at, bytes) = ((start * k * 4) as u64, part.tokens * k * 4);
            for (to, from) in [(ids, from_ids), (weights, from_weights)] {
                // SAFETY: `from` is the workspace's route slot, holding this slice's `bytes`; `to`
                // has room for all `tokens` (the caller's contract); both on this device, ordered
                // on its stream after the route kernel.
                unsafe { cudarc::driver::result::memcpy_dtod_async(to + at, from, bytes, stream) }
                    .map_err(|e| super::device::cuda_err("copying routes on the GPU", e))?;
            }
            Ok(())
        })
    }

    /// What can be checked of a device call without reading device memory.
    pub(super) fn check_device_call(&self, call: &DeviceCall) -> Result<()> {
        let bad = |what: &str, why: String| {
            Err(MoeError::Invalid {
                what: what.into(),
                why,
            })
        };
        for (name, dtype) in [
            ("hidden_states", call.hidden_dtype),
            ("output", call.out_dtype),
        ] {
            if !matches!(dtype, DType::BF16 | DType::F16 | DType::F32) {
                return bad(
                    name,
                    format!("dtype {} (bf16, f16 or f32 expected)", dtype.name()),
                );
            }
        }
        if let DeviceRoutes::Logits { dtype, .. } = call.routes {
            if !matches!(dtype, DType::BF16 | DType::F32) {
                return bad(
                    "router_logits",
                    format!("dtype {} (f32 or bf16 expected)", dtype.name()),
                );
            }
        }
        if call.tokens > i32::MAX as usize / self.top_k().max(1) {
            return bad(
                "hidden_states",
                format!("{} tokens: more than a call can address", call.tokens),
            );
        }
        let null = match call.routes {
            _ if call.tokens == 0 => None,
            _ if call.hidden == 0 => Some("hidden_states"),
            _ if call.out == 0 => Some("output"),
            DeviceRoutes::Logits { ptr: 0, .. } => Some("router_logits"),
            DeviceRoutes::Packed { ptr: 0 } => Some("topk_packed"),
            DeviceRoutes::TopK { ids: 0, .. } => Some("topk_ids"),
            DeviceRoutes::TopK { weights: 0, .. } => Some("topk_weights"),
            _ => None,
        };
        match null {
            Some(name) => bad(name, "null device pointer".into()),
            None => Ok(()),
        }
    }

    /// Tokens [start, end) of a call: every address moved to the slice's first row.
    fn slice_call(&self, call: &DeviceCall, start: usize, end: usize) -> Result<DeviceCall> {
        let cfg = self.layer.config();
        let k = self.top_k();
        let row = |ptr: u64, bytes_per_token: usize| ptr + (start * bytes_per_token) as u64;
        let h_bytes = cfg.hidden * call.hidden_dtype.size();
        Ok(DeviceCall {
            tokens: end - start,
            hidden: row(call.hidden, h_bytes),
            hidden_dtype: call.hidden_dtype,
            out: row(call.out, cfg.hidden * call.out_dtype.size()),
            out_dtype: call.out_dtype,
            routes: match call.routes {
                DeviceRoutes::Logits { ptr, dtype } => DeviceRoutes::Logits {
                    ptr: row(ptr, cfg.num_experts * dtype.size()),
                    dtype,
                },
                DeviceRoutes::TopK { ids, weights } => DeviceRoutes::TopK {
                    ids: row(ids, 4 * k),
                    weights: row(weights, 4 * k),
                },
                DeviceRoutes::Packed { ptr } => DeviceRoutes::Packed {
                    ptr: row(ptr, 4 * k),
                },
            },
        })
    }
}

fn stream_is_capturing(stream: RawStream) -> Result<bool> {
    let mut status = cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: `stream` is a live stream (the caller's contract); `status` is a plain out-parameter.
    unsafe { cudarc::driver::sys::cuStreamIsCapturing(stream, &mut status) }
        .result()
        .map_err(|e| super::device::cuda_err("asking whether a stream is capturing", e))?;
    Ok(status != cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}
