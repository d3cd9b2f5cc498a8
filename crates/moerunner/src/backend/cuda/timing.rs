//! Timing on the GPU: event-timed medians, the L2 flush between timed runs, and the whole layer
//! replayed from a CUDA graph (what `bench` reports). Kept apart from the layer and the ceilings,
//! which both use it.

use cudarc::driver::sys::CUevent_flags;

use super::device::{cuda_err, Buf, Device};
use crate::error::{MoeError, Result};

/// Bytes written between timed replays: several times the L2 (50 MB on H100, 60 MB on H200).
pub const L2_FLUSH_BYTES: usize = 512 << 20;

/// Median GPU time of `iters` runs of `work` (after `warmup` runs), timed with events; `between`
/// runs untimed before each (e.g. an L2 flush).
pub fn time_median_us(
    dev: &Device,
    warmup: usize,
    iters: usize,
    between: &mut dyn FnMut() -> Result<()>,
    work: &mut dyn FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        between()?;
        work()?;
    }
    let ev = |what| {
        dev.ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| cuda_err(what, e))
    };
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        between()?;
        let (start, end) = (ev("creating an event")?, ev("creating an event")?);
        start
            .record(&dev.stream)
            .map_err(|e| cuda_err("recording an event", e))?;
        work()?;
        end.record(&dev.stream)
            .map_err(|e| cuda_err("recording an event", e))?;
        end.synchronize()
            .map_err(|e| cuda_err("waiting for the GPU", e))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| cuda_err("reading an event timer", e))?;
        times.push(ms as f64 * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Writes zeros over `buf`: evicts earlier data from the L2 cache between timed runs.
pub fn flush(dev: &Device, buf: &Buf) -> Result<()> {
    fill(dev, buf, 0)
}

/// Sets every byte of `buf` to `byte` (stream-ordered).
pub fn fill(dev: &Device, buf: &Buf, byte: u8) -> Result<()> {
    dev.ctx
        .bind_to_thread()
        .map_err(|e| cuda_err("binding the CUDA context", e))?;
    // SAFETY: `buf` is a live allocation of `buf.len` bytes.
    unsafe {
        cudarc::driver::result::memset_d8_async(buf.ptr(), byte, buf.len, dev.stream.cu_stream())
    }
    .map_err(|e| cuda_err("filling a GPU buffer", e))
}

/// Median GPU time (µs) of `enqueue` (launches on the device's stream only) captured once in a CUDA
/// graph and replayed `iters` times, the L2 cache flushed before each replay (so weights come from
/// HBM as in a real model, where other layers run in between). `enqueue` runs once before the
/// capture (module loads and first-launch costs).
pub fn time_graph_replay_us(
    dev: &Device,
    iters: usize,
    enqueue: &mut dyn FnMut() -> Result<()>,
) -> Result<f64> {
    let flush_buf = dev.alloc(L2_FLUSH_BYTES)?;
    enqueue()?;
    dev.sync()?;
    dev.stream
        .begin_capture(
            cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )
        .map_err(|e| cuda_err("starting graph capture", e))?;
    let captured = enqueue();
    let graph = dev
        .stream
        .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
        .map_err(|e| cuda_err("ending graph capture", e))?;
    captured?;
    let graph = graph.ok_or_else(|| MoeError::Cuda("graph capture recorded nothing".into()))?;
    time_median_us(dev, 3, iters, &mut || flush(dev, &flush_buf), &mut || {
        graph
            .launch()
            .map_err(|e| cuda_err("replaying the layer graph", e))
    })
}
