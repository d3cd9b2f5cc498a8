//! Expert parallelism with the tokens on the GPU ([`super::EpMode::DeviceAllToAll`]): the dispatch,
//! the experts and the combine run on each rank's device, and only the per-destination counts
//! cross host memory.
//!
//! Design decision: the same exchange as the host all-to-all (`a2a.rs`) — each token's row goes
//! once to each rank that serves one of its slots — but what comes back is one row per (token,
//! rank): the serving rank runs the rows it received through the CUDA backend's device entry
//! ([`crate::backend::cuda::layer::CudaLayer::enqueue_on`]) with routed ids that keep only its own
//! slots (−1 elsewhere), so the pipeline's own combine adds that rank's slots in slot order, in f32,
//! and the owner adds the ranks' f32 rows in rank order (combine.cu's `combine_rows`, weight 1)
//! before the one rounding to the hidden states' dtype. That moves a row per (token, rank) back
//! instead of a row per (token, slot) — at deepseek-v3's k = 8 over two ranks about half the bytes
//! of the host all-to-all's f32 per-slot rows — and the result differs from the single device's
//! only in how the f32 additions of a token's slots are grouped (the per-slot rows are the same),
//! not bit for bit (the host all-to-all stays the bitwise mode). One call per rank: route on the
//! host (`front`), upload the tokens and routes, plan and pack (`ep.cu`), exchange the counts
//! through host memory, the rows and routes device to device
//! ([`Communicator::all_to_all_v_device`]: NCCL, or copies between ranks sharing a GPU), compute,
//! return the partial rows the same way, combine, download — or, called through
//! [`super::forward_rank_device`], with the tokens and routes already on the GPU (logits routed
//! there by the layer's own route stage) and the output left there. Host waits separate the steps (the
//! counts size the exchanges); a graph-captured form with fixed-capacity buffers is the next step
//! (docs/parallel.md, "What remains").

use std::sync::Arc;

use cudarc::driver::CudaFunction;

use super::comm::{Communicator, DeviceExchange};
use super::{ExpertMap, Owned, RankLayer};
use crate::backend::cuda::device::{f32_bytes, i32_bytes, le_words, Buf, Device};
use crate::backend::cuda::device_call::{DeviceCall, DeviceRoutes};
use crate::backend::cuda::kernels::combine::{self, CombineRows};
use crate::backend::cuda::kernels::ep::{self, EpPack, EpPlan};
use crate::backend::cuda::kernels::{ElemCode, In, KernelArgs, ModuleKey, Out, Source};
use crate::backend::cuda::launch::launch;
use crate::backend::cuda::layer::CudaLayer;
use crate::error::{MoeError, Result};
use crate::tensor::{DType, HostTensor};

/// One rank's kernels, expert-map tables and buffers (grown as calls need, kept between calls).
pub(crate) struct State {
    dev: Arc<Device>,
    plan: CudaFunction,
    pack: CudaFunction,
    combine: CudaFunction,
    /// The expert map (`ep.cu`'s header): each expert's first replica, each replica's rank and the
    /// id that rank's layer knows the expert by.
    rep_start: Buf,
    rep_rank: Buf,
    rep_id: Buf,
    bufs: Bufs,
    /// What the tokens in `bufs.hidden` / `ids` / `weights` are: the last call's, which
    /// [`forward_staged`] runs again.
    staged: Option<Staged>,
}

/// The shape of a call's tokens on the device.
#[derive(Clone, Copy, Debug)]
struct Staged {
    tokens: usize,
    top_k: usize,
    dtype: DType,
    /// The global index of the rank's first token.
    first: usize,
}

/// Where a call's tokens, routes and output are: `[T, H]` hidden states, `[T, K]` global expert ids
/// and f32 weights, `[T, H]` output in the hidden states' dtype.
#[derive(Clone, Copy, Debug)]
struct At {
    hidden: u64,
    ids: u64,
    weights: u64,
    out: u64,
}

/// One rank's tokens on its GPU, for [`super::forward_rank_device`].
#[derive(Clone, Copy, Debug)]
pub struct DeviceTokens {
    pub tokens: usize,
    /// `[T, H]` hidden states of `dtype` (bf16, f16 or f32) in the rank's GPU memory.
    pub hidden: u64,
    pub dtype: DType,
    /// Router logits or packed routes (routed on the device with the layer's router), or given
    /// top-k ids (global) and f32 weights.
    pub routes: DeviceRoutes,
    /// The global index of the rank's first token: replicated experts pick their replica by it.
    pub first_token: usize,
}

#[derive(Default)]
struct Bufs {
    hidden: Option<Buf>,
    ids: Option<Buf>,
    weights: Option<Buf>,
    dest_row: Option<Buf>,
    counts: Option<Buf>,
    send_rows: Option<Buf>,
    send_ids: Option<Buf>,
    send_w: Option<Buf>,
    recv_rows: Option<Buf>,
    recv_ids: Option<Buf>,
    recv_w: Option<Buf>,
    partial: Option<Buf>,
    returned: Option<Buf>,
    out: Option<Buf>,
}

/// This rank's tokens' outputs, f32 `[T_r, H]`, by device all-to-all. Every rank of the group calls
/// it at once (the first call of each also makes its tables: a collective).
pub(super) fn forward(
    comm: &dyn Communicator,
    layer: &RankLayer,
    own: &Owned<'_>,
) -> Result<Vec<f32>> {
    let cuda = cuda_layer(comm, layer)?;
    with_state(comm, layer, cuda, |s| s.forward(comm, layer, cuda, own))
}

/// The rank's state locked (one call at a time uses its buffers).
fn lock_state(layer: &RankLayer) -> Result<std::sync::MutexGuard<'_, Option<State>>> {
    layer
        .device_ep
        .lock()
        .map_err(|_| MoeError::Cuda("device all-to-all: a rank's state lock is poisoned".into()))
}

/// `f` on the rank's state, made at its first call (a collective: every rank makes its own in the
/// same call).
fn with_state<T>(
    comm: &dyn Communicator,
    layer: &RankLayer,
    cuda: &CudaLayer,
    f: impl FnOnce(&mut State) -> Result<T>,
) -> Result<T> {
    let mut state = lock_state(layer)?;
    if state.is_none() {
        *state = Some(State::new(comm, layer, cuda)?);
    }
    match state.as_mut() {
        Some(s) => f(s),
        None => Err(MoeError::Cuda(
            "internal: device all-to-all state missing".into(),
        )),
    }
}

/// The rank's last device all-to-all call again, on the tokens and routes it left on the device,
/// its output left there too: what a split's timing repeats (`timing::time_split`), so that a timed
/// call is what it would be for an engine whose tokens live on the GPU — no upload, no host
/// routing, no download; it returns once the rank's output is complete on its device.
pub(super) fn forward_staged(comm: &dyn Communicator, layer: &RankLayer) -> Result<()> {
    let cuda = cuda_layer(comm, layer)?;
    let mut state = lock_state(layer)?;
    let s = state.as_mut().ok_or_else(|| {
        MoeError::Cuda("internal: a staged device call before any call staged tokens".into())
    })?;
    let staged = s.staged.ok_or_else(|| {
        MoeError::Cuda("internal: a staged device call before any call staged tokens".into())
    })?;
    let at = s.staged_at(&layer.global, staged)?;
    s.exchange_and_compute(comm, layer, cuda, staged, at)?;
    s.dev.sync()
}

/// [`super::forward_rank_device`]: the rank's tokens and routes already on its GPU, the output
/// left in `out`; routes from logits or the packed form are routed on the device first.
pub(super) fn forward_device(
    comm: &dyn Communicator,
    layer: &RankLayer,
    tokens: &DeviceTokens,
    out: u64,
) -> Result<()> {
    let cuda = cuda_layer(comm, layer)?;
    let t = tokens.tokens;
    let null = [("hidden_states", tokens.hidden), ("output", out)]
        .into_iter()
        .find(|&(_, p)| t > 0 && p == 0);
    if let Some((name, _)) = null {
        return Err(MoeError::invalid(name, "null device pointer".to_string()));
    }
    check_dtype(tokens.dtype)?;
    let k = layer.global.routing.top_k;
    check_tokens(t, k, (comm.rank(), comm.size()))?;
    with_state(comm, layer, cuda, |s| {
        s.forward_device(comm, layer, cuda, tokens, out)
    })
}

impl State {
    /// [`forward_device`] on this state: the routes routed into its buffers where they are logits
    /// or packed, then the exchange straight from the caller's buffers into `out`.
    fn forward_device(
        &mut self,
        comm: &dyn Communicator,
        layer: &RankLayer,
        cuda: &CudaLayer,
        tokens: &DeviceTokens,
        out: u64,
    ) -> Result<()> {
        let (t, k) = (tokens.tokens, layer.global.routing.top_k);
        let (ids, weights) = match tokens.routes {
            DeviceRoutes::TopK { ids, weights } => (ids, weights),
            routes => {
                let ids = room(&self.dev, &mut self.bufs.ids, t * k * 4)?;
                let weights = room(&self.dev, &mut self.bufs.weights, t * k * 4)?;
                // SAFETY: the routes are the caller's device memory of `t` tokens (its contract);
                // `ids` / `weights` were just sized for `t × k` elements on this device.
                unsafe { cuda.enqueue_routes(t, routes, ids, weights) }?;
                (ids, weights)
            }
        };
        let staged = Staged {
            tokens: t,
            top_k: k,
            dtype: tokens.dtype,
            first: tokens.first_token,
        };
        let at = At {
            hidden: tokens.hidden,
            ids,
            weights,
            out,
        };
        self.staged = None; // (the caller's buffers are not this state's to run again)
        self.exchange_and_compute(comm, layer, cuda, staged, at)?;
        self.dev.sync()
    }
}

/// The rank's CUDA layer, or why device all-to-all cannot run on its backend.
fn cuda_layer<'l>(comm: &dyn Communicator, layer: &'l RankLayer) -> Result<&'l CudaLayer> {
    layer.loaded.as_cuda().ok_or_else(|| {
        MoeError::invalid(
            "ep mode",
            format!(
                "device-all-to-all computes through the CUDA backend's device entry; rank {} \
                 loaded its slice on `{}`",
                comm.rank(),
                layer.loaded.backend()
            ),
        )
    })
}

/// That `tokens` tokens of `k` routes over `ranks` ranks fit the kernels' 32-bit counts (tokens,
/// records and their routes), checked before anything is sized by them.
fn check_tokens(tokens: usize, k: usize, (rank, ranks): (usize, usize)) -> Result<()> {
    if tokens > i32::MAX as usize / k.max(ranks).max(1) {
        return Err(MoeError::invalid(
            "hidden_states",
            format!(
                "{tokens} tokens on rank {rank}: more than a device all-to-all call can address"
            ),
        ));
    }
    Ok(())
}

/// The dtypes device all-to-all moves.
fn check_dtype(dtype: DType) -> Result<()> {
    if matches!(dtype, DType::BF16 | DType::F16 | DType::F32) {
        return Ok(());
    }
    Err(MoeError::invalid(
        "hidden_states",
        format!("device-all-to-all moves bf16, f16 or f32 rows; these are {dtype}"),
    ))
}

impl State {
    fn new(comm: &dyn Communicator, layer: &RankLayer, cuda: &CudaLayer) -> Result<State> {
        let dev = cuda.device().clone();
        // Every rank's id base (0 for renumbered slices, the first global id for a checkpoint's
        // contiguous slice): the ids a serving rank's layer knows its experts by.
        let bases = comm.all_gather(&(layer.id_base as u64).to_le_bytes())?;
        let base_of = |r: usize| -> Result<i32> {
            bases
                .get(r)
                .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
                .map(|b| u64::from_le_bytes(b) as i32)
                .ok_or_else(|| MoeError::Comm {
                    rank: comm.rank(),
                    why: format!("device all-to-all: rank {r} sent no id base"),
                })
        };
        let bases = (0..comm.size())
            .map(base_of)
            .collect::<Result<Vec<i32>>>()?;
        let ExpertTables { start, rank, id } = ExpertTables::new(&layer.layout.ep, &bases)?;
        let f = |entry: &str| dev.function(&ModuleKey::plain(Source::Ep), entry);
        Ok(State {
            plan: f(EpPlan::ENTRY)?,
            pack: f(EpPack::ENTRY)?,
            combine: dev.function(&ModuleKey::plain(Source::Combine), CombineRows::ENTRY)?,
            rep_start: dev.upload(&i32_bytes(&start))?,
            rep_rank: dev.upload(&i32_bytes(&rank))?,
            rep_id: dev.upload(&i32_bytes(&id))?,
            bufs: Bufs::default(),
            staged: None,
            dev,
        })
    }

    fn forward(
        &mut self,
        comm: &dyn Communicator,
        layer: &RankLayer,
        cuda: &CudaLayer,
        own: &Owned<'_>,
    ) -> Result<Vec<f32>> {
        let dtype = own.hidden.dtype;
        check_dtype(dtype)?;
        let staged = Staged {
            tokens: own.routes.tokens,
            top_k: own.routes.top_k,
            dtype,
            first: own.first,
        };
        let row_bytes = layer.global.hidden * dtype.size();
        // This rank's tokens and routes on the device (kept: `forward_staged` runs them again).
        self.staged = None;
        let b = &mut self.bufs;
        put(
            &self.dev,
            &mut b.hidden,
            &own.hidden.bytes[..staged.tokens * row_bytes],
        )?;
        put(&self.dev, &mut b.ids, &i32_bytes(&own.routes.ids))?;
        put(&self.dev, &mut b.weights, &f32_bytes(&own.routes.weights))?;
        self.staged = Some(staged);
        let at = self.staged_at(&layer.global, staged)?;
        self.exchange_and_compute(comm, layer, cuda, staged, at)?;
        let bytes = match &self.bufs.out {
            Some(buf) => self.dev.read(buf, staged.tokens * row_bytes)?,
            None => Vec::new(),
        };
        HostTensor::from_u8(dtype, vec![staged.tokens, layer.global.hidden], bytes)
            .to_f32_vec("output")
    }

    /// Where the staged tokens, routes and output are: this state's own buffers.
    fn staged_at(&mut self, global: &crate::config::LayerConfig, staged: Staged) -> Result<At> {
        let at = |slot: &Option<Buf>| slot.as_ref().map_or(0, Buf::ptr);
        let b = &mut self.bufs;
        let out = room(
            &self.dev,
            &mut b.out,
            staged.tokens * global.hidden * staged.dtype.size(),
        )?;
        Ok(At {
            hidden: at(&b.hidden),
            ids: at(&b.ids),
            weights: at(&b.weights),
            out,
        })
    }

    /// Plan, pack, exchange, compute, return and combine the tokens at `at`; the rank's output is
    /// in `at.out` once the device's stream has run what this enqueued last (the combine).
    fn exchange_and_compute(
        &mut self,
        comm: &dyn Communicator,
        layer: &RankLayer,
        cuda: &CudaLayer,
        staged: Staged,
        at: At,
    ) -> Result<()> {
        let (me, ranks) = (comm.rank(), comm.size());
        let Staged {
            tokens: t,
            top_k: k,
            dtype,
            first,
        } = staged;
        let (h, e) = (layer.global.hidden, layer.global.num_experts);
        check_tokens(t, k, (me, ranks))?;
        let row_bytes = h * dtype.size();
        let dev = self.dev.clone();
        let stream = dev.stream.cu_stream();
        let b = &mut self.bufs;
        let At {
            hidden,
            ids,
            weights,
            out,
        } = at;

        // Each record's row per destination.
        let dest_row = room(&dev, &mut b.dest_row, t * ranks * 4)?;
        let counts_at = room(&dev, &mut b.counts, 2 * ranks * 4)?;
        let first_token = first as i64;
        launch(
            &dev,
            stream,
            &self.plan,
            ep::plan_shape(),
            &EpPlan {
                topk_ids: In::new(ids),
                T: t as i32,
                K: k as i32,
                E: e as i32,
                first_token,
                rep_start: In::new(self.rep_start.ptr()),
                rep_rank: In::new(self.rep_rank.ptr()),
                G: ranks as i32,
                dest_row: Out::new(dest_row),
                send_counts: Out::new(counts_at),
            },
        )?;
        let counts = read_i32(&dev, &b.counts, 2 * ranks)?;
        let (send_count, send_first) = checked_counts(&counts, ranks, t)?;
        let rows: usize = send_count.iter().sum();
        let send_rows = room(&dev, &mut b.send_rows, rows * row_bytes)?;
        let send_ids = room(&dev, &mut b.send_ids, rows * k * 4)?;
        let send_w = room(&dev, &mut b.send_w, rows * k * 4)?;
        if t > 0 {
            launch(
                &dev,
                stream,
                &self.pack,
                ep::pack_shape(t, dev.sm_count),
                &EpPack {
                    hidden: In::new(hidden),
                    row_bytes: row_bytes as i32,
                    topk_ids: In::new(ids),
                    topk_w: In::new(weights),
                    T: t as i32,
                    K: k as i32,
                    E: e as i32,
                    first_token,
                    rep_start: In::new(self.rep_start.ptr()),
                    rep_rank: In::new(self.rep_rank.ptr()),
                    rep_id: In::new(self.rep_id.ptr()),
                    G: ranks as i32,
                    dest_row: In::new(dest_row),
                    send_rows: Out::new(send_rows),
                    send_ids: Out::new(send_ids),
                    send_w: Out::new(send_w),
                },
            )?;
        }

        // The counts through host memory (they size the exchanges), then the records.
        let sent: Vec<Vec<u8>> = send_count
            .iter()
            .map(|&c| (c as u64).to_le_bytes().to_vec())
            .collect();
        let recv_count = comm
            .all_to_all_v(sent)?
            .iter()
            .enumerate()
            .map(|(src, bytes)| {
                <[u8; 8]>::try_from(&bytes[..])
                    .map(|b| u64::from_le_bytes(b) as usize)
                    .map_err(|_| MoeError::Comm {
                        rank: me,
                        why: format!(
                            "device all-to-all: rank {src} sent a count of {} bytes",
                            bytes.len()
                        ),
                    })
            })
            .collect::<Result<Vec<usize>>>()?;
        let recv_first = exclusive_scan(&recv_count);
        let n_recv: usize = recv_count.iter().sum();
        let recv_rows = room(&dev, &mut b.recv_rows, n_recv * row_bytes)?;
        let recv_ids = room(&dev, &mut b.recv_ids, n_recv * k * 4)?;
        let recv_w = room(&dev, &mut b.recv_w, n_recv * k * 4)?;
        // The records are packed before a peer reads them, and the receive buffers (allocations
        // ordered on the device's stream) exist before the communicator's stream writes them.
        dev.sync()?;
        let part = |send: u64, recv: u64, unit: usize, outgoing: bool| {
            let (sf, sc, rf, rc) = if outgoing {
                (&send_first, &send_count, &recv_first, &recv_count)
            } else {
                (&recv_first, &recv_count, &send_first, &send_count)
            };
            DeviceExchange {
                send,
                send_regions: regions(sf, sc, unit),
                recv,
                recv_regions: regions(rf, rc, unit),
            }
        };
        comm.all_to_all_v_device(&[
            part(send_rows, recv_rows, row_bytes, true),
            part(send_ids, recv_ids, k * 4, true),
            part(send_w, recv_w, k * 4, true),
        ])?;

        // This rank's slots of every record it received, summed per record by its own pipeline.
        // (f32 sums: the owner adds the ranks' rows before the one rounding to its dtype)
        let sum_bytes = h * 4;
        let partial = room(&dev, &mut b.partial, n_recv * sum_bytes)?;
        // (allocated before the wait below: a buffer the communicator's own stream writes must
        // be ready — its allocation is ordered on the device's stream — before the exchange)
        let returned = room(&dev, &mut b.returned, rows * sum_bytes)?;
        if n_recv > 0 {
            let call = DeviceCall {
                tokens: n_recv,
                hidden: recv_rows,
                hidden_dtype: dtype,
                routes: DeviceRoutes::TopK {
                    ids: recv_ids,
                    weights: recv_w,
                },
                out: partial,
                out_dtype: DType::F32,
            };
            // SAFETY: every address is a live buffer of this rank's device sized for `n_recv`
            // records (input rows of `row_bytes`, f32 sums of `sum_bytes`, K ids and weights
            // each); the call runs on the device's own stream, which `sync` waits for below,
            // before any of them is reused.
            unsafe { cuda.enqueue_on(&call, None) }?;
        }
        dev.sync()?;

        // Each record's partial row back to its owner, which adds them in rank order.
        comm.all_to_all_v_device(&[part(partial, returned, sum_bytes, false)])?;
        if t > 0 {
            launch(
                &dev,
                stream,
                &self.combine,
                combine::shape(t, h, dev.sm_count),
                &CombineRows {
                    z: In::new(returned),
                    z_dtype: ElemCode::F32.code(),
                    z_stride: h as i32,
                    pair_pos: In::new(dest_row),
                    topk_w: In::NULL,
                    T: t as i32,
                    K: ranks as i32,
                    H: h as i32,
                    out: Out::new(out),
                    out_dtype: ElemCode::of(dtype)?.code(),
                },
            )?;
        }
        Ok(())
    }
}

/// The expert map as `ep.cu` reads it: expert e's replicas are `rank[start[e] .. start[e + 1])`,
/// with the id each replica's rank knows the expert by (its local index plus that rank's id base)
/// at the same index; global token g takes replica `start[e] + g mod count`, which is
/// [`ExpertMap::rank_for`]'s rule.
struct ExpertTables {
    start: Vec<i32>,
    rank: Vec<i32>,
    id: Vec<i32>,
}

impl ExpertTables {
    fn new(map: &ExpertMap, bases: &[i32]) -> Result<ExpertTables> {
        let (mut start, mut rank, mut id) = (vec![0i32], Vec::new(), Vec::new());
        for e in 0..map.num_experts() {
            for &r in map.holders(e) {
                let (Some(local), Some(&base)) = (map.local_id(e, r), bases.get(r)) else {
                    return Err(MoeError::invalid(
                        "expert map",
                        format!("expert {e} held by rank {r}, which does not hold it"),
                    ));
                };
                rank.push(r as i32);
                id.push(local as i32 + base);
            }
            start.push(rank.len() as i32);
        }
        Ok(ExpertTables { start, rank, id })
    }
}

/// `slot` with room for `bytes` (grown to the next power of two when short); its address.
fn room(dev: &Device, slot: &mut Option<Buf>, bytes: usize) -> Result<u64> {
    if slot.as_ref().is_none_or(|b| b.len < bytes) {
        *slot = None; // free the old one first
        *slot = Some(dev.alloc(bytes.max(1).next_power_of_two())?);
    }
    Ok(slot.as_ref().map_or(0, Buf::ptr))
}

/// `bytes` copied into `slot` (grown as `room` does); its address.
fn put(dev: &Device, slot: &mut Option<Buf>, bytes: &[u8]) -> Result<u64> {
    let at = room(dev, slot, bytes.len())?;
    if let Some(buf) = slot.as_mut() {
        dev.write(buf, 0, bytes)?;
    }
    Ok(at)
}

fn read_i32(dev: &Device, slot: &Option<Buf>, n: usize) -> Result<Vec<i32>> {
    let buf = slot.as_ref().ok_or_else(|| {
        MoeError::Cuda("internal: device all-to-all read an unmade buffer".into())
    })?;
    Ok(le_words(&dev.read(buf, n * 4)?, i32::from_le_bytes))
}

/// `ep_plan`'s counts (records per destination, then their first rows) as sizes, checked: a count
/// outside [0, T] or rows that do not follow one another is a kernel fault, not something to send.
fn checked_counts(counts: &[i32], ranks: usize, tokens: usize) -> Result<(Vec<usize>, Vec<usize>)> {
    let bad = || {
        MoeError::Cuda(format!(
            "internal: ep_plan wrote counts {counts:?} for {tokens} tokens over {ranks} ranks"
        ))
    };
    if counts.len() != 2 * ranks {
        return Err(bad());
    }
    let mut count = Vec::with_capacity(ranks);
    for &c in &counts[..ranks] {
        let c = usize::try_from(c).map_err(|_| bad())?;
        if c > tokens {
            return Err(bad());
        }
        count.push(c);
    }
    let first = exclusive_scan(&count);
    let written: Vec<usize> = counts[ranks..]
        .iter()
        .map(|&f| usize::try_from(f).unwrap_or(usize::MAX))
        .collect();
    if written != first {
        return Err(bad());
    }
    Ok((count, first))
}

fn exclusive_scan(counts: &[usize]) -> Vec<usize> {
    let mut run = 0;
    counts
        .iter()
        .map(|&c| {
            let at = run;
            run += c;
            at
        })
        .collect()
}

/// Byte regions (offset, length) of `count[i]` units from unit `first[i]`.
fn regions(first: &[usize], count: &[usize], unit: usize) -> Vec<(usize, usize)> {
    first
        .iter()
        .zip(count)
        .map(|(&f, &c)| (f * unit, c * unit))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_the_plan_are_checked_before_they_size_anything() {
        let (count, first) = checked_counts(&[2, 0, 3, 0, 2, 2], 3, 4).unwrap();
        assert_eq!((count, first), (vec![2, 0, 3], vec![0, 2, 2]));
        for bad in [
            &[2, 0, 3, 0, 2, 3][..], // rows that do not follow one another
            &[-1, 0, 3, 0, 0, 0],    // a negative count
            &[5, 0, 0, 0, 5, 5],     // more records than tokens
            &[1, 1, 0, 1],           // the wrong length
        ] {
            let err = checked_counts(bad, 3, 4).unwrap_err().to_string();
            assert!(err.contains("ep_plan"), "{err}");
        }
    }

    /// What `ep.cu`'s `ep_replica` computes from the tables — replica `start[e] + g mod count` —
    /// is the host's rule: `ExpertMap::rank_for`, and the serving rank's id for the expert.
    #[test]
    fn the_device_tables_pick_the_replica_the_host_does() {
        for (spec, ranks) in [
            ("0,0,1,1", 2),
            ("0,0,0,0,0,1,1,2", 3),
            ("0+1,0,0,1,1,1+0,2,2+1+0", 3),
        ] {
            let e = spec.split(',').count();
            let map = ExpertMap::parse(spec, e, ranks).unwrap();
            let bases: Vec<i32> = (0..ranks as i32).map(|r| 100 * r).collect();
            let t = ExpertTables::new(&map, &bases).unwrap();
            assert_eq!(t.start.len(), e + 1);
            for expert in 0..e {
                for token in 0..12usize {
                    let (s, c) = (t.start[expert], t.start[expert + 1] - t.start[expert]);
                    let i = (s + (token as i32 % c)) as usize;
                    let want = map.rank_for(expert as i32, token).unwrap();
                    assert_eq!(
                        t.rank[i] as usize, want,
                        "{spec}: expert {expert} token {token}"
                    );
                    let local = map.local_id(expert, want).unwrap() as i32;
                    assert_eq!(t.id[i], local + bases[want], "{spec}: expert {expert}");
                }
            }
        }
        let map = ExpertMap::parse("0,1", 2, 2).unwrap();
        let err = ExpertTables::new(&map, &[0])
            .err()
            .expect("a rank without a base");
        assert!(err.to_string().contains("rank 1"), "{err}");
    }

    #[test]
    fn absurd_token_counts_are_refused_before_they_size_anything() {
        assert!(check_tokens(1 << 20, 8, (0, 2)).is_ok());
        let err = check_tokens(usize::MAX / 2, 8, (1, 2))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("hidden_states") && err.contains("rank 1"),
            "{err}"
        );
        assert!(check_tokens(i32::MAX as usize / 8 + 1, 8, (0, 2)).is_err());
    }

    #[test]
    fn regions_are_the_units_of_each_destination() {
        assert_eq!(
            regions(&[0, 2, 2], &[2, 0, 3], 10),
            vec![(0, 20), (20, 0), (20, 30)]
        );
        assert_eq!(exclusive_scan(&[2, 0, 3]), vec![0, 2, 2]);
    }
}
