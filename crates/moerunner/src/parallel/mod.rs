//! One layer split over several ranks: expert parallelism (EP), tensor parallelism (TP) and both
//! (TEP), with the tokens and partial sums moved between ranks by a [`Communicator`]
//! (docs/parallel.md).
//!
//! Design decision: tokens are partitioned — rank r owns a contiguous slice of the T tokens
//! (`T/R` each, the first `T mod R` ranks one more), routes them with the whole layer's router,
//! and gets back exactly its slice of the output; so each rank's input and output are what a
//! serving engine's data-parallel rank holds. A rank computes through an ordinary backend
//! ([`crate::runner::Runner`]) on its slice of the layer ([`crate::shard::shard_experts`]:
//! experts renumbered, I sliced), so every backend runs under every layout unchanged.
//! Two EP modes: [`EpMode::AllToAll`] sends each token's row only to the ranks that hold its
//! experts and combines the returned rows in slot order (bitwise the single-device result on
//! the CPU backend, see docs/parallel.md); [`EpMode::GatherScatter`] all-gathers every token to
//! every rank and reduce-scatters the partial sums (the only mode for TP and TEP);
//! [`EpMode::DeviceAllToAll`] dispatches and combines on the GPU, ranks computing through the CUDA
//! backend's device entry (`device_ep`).

pub mod comm;
pub mod expert_map;
pub mod thread_comm;
pub mod timing;

mod a2a;
/// Several ranks sharing one GPU through device-to-device copies, with the `cuda` feature.
#[cfg(feature = "cuda")]
pub mod device_comm;
/// All-to-all dispatch and combine on the GPU (EpMode::DeviceAllToAll), with the `cuda` feature.
#[cfg(feature = "cuda")]
mod device_ep;
mod gather;
/// NCCL behind the same trait (one rank per GPU), with the `cuda` feature.
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod socket_comm;
mod whole;
mod wire;

use std::ops::Range;
use std::time::Duration;

pub use comm::Communicator;
#[cfg(feature = "cuda")]
pub use device_ep::DeviceTokens;
pub use expert_map::ExpertMap;
pub use socket_comm::{RankEnv, SocketComm};
pub use thread_comm::ThreadComm;
pub use whole::forward_rank_whole;

use crate::backend::LoadedLayer;
use crate::config::LayerConfig;
use crate::error::{MoeError, Result};
use crate::forward::{self, ForwardInput, ForwardOutput};
use crate::routing::{self, Routes, RoutingInput};
use crate::runner::{BackendChoice, Runner};
use crate::tensor::{DType, HostTensor};
use crate::weights::MoeLayer;

/// How expert-parallel ranks exchange tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpMode {
    /// Dispatch each token's row to the ranks holding its experts, compute, send each
    /// (token, slot)'s row back, combine in slot order.
    AllToAll,
    /// All-gather every token, compute the local experts' partial sums, reduce-scatter them.
    GatherScatter,
    /// All-to-all with the tokens on the GPU (`device_ep`, the CUDA backend over the device or
    /// NCCL transport, EP only): each token's row goes once to each rank serving one of its slots
    /// with that rank's routes, the rank computes its slots' sum through the device entry, and
    /// the owner adds the returned partial rows in rank order.
    DeviceAllToAll,
}

impl std::str::FromStr for EpMode {
    type Err = MoeError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all-to-all" | "a2a" => Ok(EpMode::AllToAll),
            "gather-scatter" | "gather" => Ok(EpMode::GatherScatter),
            "device-all-to-all" | "device-a2a" => Ok(EpMode::DeviceAllToAll),
            _ => Err(MoeError::invalid(
                "ep mode",
                format!("`{s}`: use all-to-all, gather-scatter or device-all-to-all"),
            )),
        }
    }
}

/// The ranks of a run: `ep.ranks()` EP groups of `tp` TP ranks each; rank `i` is EP rank
/// `i / tp`, TP rank `i % tp`.
#[derive(Clone, Debug)]
pub struct Layout {
    pub ep: ExpertMap,
    pub tp: usize,
    pub mode: EpMode,
}

impl Layout {
    /// An even expert split over `ep` ranks, each split `tp` ways on I.
    pub fn even(num_experts: usize, ep: usize, tp: usize, mode: EpMode) -> Result<Self> {
        Self::new(ExpertMap::even(num_experts, ep)?, tp, mode)
    }
    pub fn new(ep: ExpertMap, tp: usize, mode: EpMode) -> Result<Self> {
        if tp == 0 {
            return Err(MoeError::invalid("tp", "needs at least one rank"));
        }
        if mode == EpMode::DeviceAllToAll && (tp > 1 || ep.ranks() > device_ep_max_ranks()) {
            return Err(MoeError::invalid(
                "ep mode",
                format!(
                    "device-all-to-all splits experts only (TP 1) over at most {} ranks; this \
                     layout has EP {} × TP {tp}",
                    device_ep_max_ranks(),
                    ep.ranks()
                ),
            ));
        }
        Ok(Layout { ep, tp, mode })
    }
    pub fn ranks(&self) -> usize {
        self.ep.ranks() * self.tp
    }
    /// (EP rank, TP rank) of rank `rank`.
    pub fn coords(&self, rank: usize) -> (usize, usize) {
        (rank / self.tp, rank % self.tp)
    }
}

/// The most EP ranks device all-to-all tells apart (a 32-bit destination mask per token).
fn device_ep_max_ranks() -> usize {
    32
}

/// One rank's share of a layer, loaded on a backend.
pub struct RankLayer {
    rank: usize,
    layout: Layout,
    loaded: Box<dyn LoadedLayer>,
    /// The whole layer's routing, E and H (a slice keeps them) and its router bias: a rank
    /// routes its own tokens.
    global: LayerConfig,
    router_bias: Option<Vec<f32>>,
    /// The slice's id of its first expert: 0 for [`crate::shard::shard_experts`] (experts
    /// renumbered), the global id for a contiguous slice read from a checkpoint.
    id_base: usize,
    /// Device all-to-all's tables and buffers, made at this rank's first such call.
    #[cfg(feature = "cuda")]
    device_ep: std::sync::Mutex<Option<device_ep::State>>,
}

impl RankLayer {
    /// Slices rank `rank`'s experts and I features out of `whole` and loads them on `choice`.
    pub fn load(
        whole: &MoeLayer,
        layout: &Layout,
        rank: usize,
        runner: &Runner,
        choice: &BackendChoice,
    ) -> Result<Self> {
        if layout.ep.num_experts() != whole.config().num_experts {
            return Err(MoeError::invalid(
                "expert map",
                format!(
                    "maps {} experts; the layer has E = {}",
                    layout.ep.num_experts(),
                    whole.config().num_experts
                ),
            ));
        }
        let (e, t) = layout.coords(rank);
        let experts = layout.ep.experts_of(e);
        let slice =
            crate::shard::shard_experts(whole, experts, (e, layout.ep.ranks()), (t, layout.tp))?;
        Self::new(slice, true, layout, rank, runner, choice)
    }

    /// Loads `slice`, rank `rank`'s part of the layer, on `choice`. Its experts must be the
    /// map's for this rank: `renumbered` (local ids `0..n` in the map's order, as
    /// [`crate::shard::shard_experts`] makes them), or else the same global range (a checkpoint
    /// read with this rank's [`crate::config::Parallelism`]).
    pub fn new(
        slice: MoeLayer,
        renumbered: bool,
        layout: &Layout,
        rank: usize,
        runner: &Runner,
        choice: &BackendChoice,
    ) -> Result<Self> {
        let cfg = slice.config().clone();
        let (e, _) = layout.coords(rank);
        let experts = layout.ep.experts_of(e);
        let held = cfg.local_experts.clone();
        let same_range = experts.first() == Some(&held.start)
            && experts.last().map(|x| x + 1) == Some(held.end)
            && experts.len() == held.len();
        let fits = if renumbered {
            held == (0..experts.len())
        } else {
            same_range
        };
        if layout.ep.num_experts() != cfg.num_experts || !fits {
            return Err(MoeError::invalid(
                "rank slice",
                format!(
                    "rank {rank} holds experts {held:?} of {}; the expert map gives it {experts:?} of {}",
                    cfg.num_experts,
                    layout.ep.num_experts()
                ),
            ));
        }
        Ok(RankLayer {
            rank,
            layout: layout.clone(),
            router_bias: slice.weights().router_bias.clone(),
            loaded: runner.load(slice, choice)?,
            id_base: held.start,
            global: cfg,
            #[cfg(feature = "cuda")]
            device_ep: std::sync::Mutex::new(None),
        })
    }
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn loaded(&self) -> &dyn LoadedLayer {
        &*self.loaded
    }
}

/// Runs `f` for rank `comm.rank()`; when it fails with its own error, stops every other rank
/// (their calls then fail naming this one) and names the rank in the error.
pub fn guarded<T>(comm: &dyn Communicator, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let me = comm.rank();
    f().map_err(|e| match e {
        MoeError::Comm { .. } | MoeError::Rank { .. } => e,
        other => {
            comm.abort(&format!("rank {me} failed: {other}"));
            MoeError::Rank {
                rank: me,
                error: Box::new(other),
            }
        }
    })
}

/// This rank's tokens, routed, and where they sit among all ranks' tokens.
struct Owned<'a> {
    hidden: &'a HostTensor,
    routes: Routes,
    /// Every rank's token count.
    counts: Vec<usize>,
    /// The global index of this rank's first token.
    first: usize,
}

/// One forward call of rank `layer.rank()` over its own tokens `input` (hidden `[T_r, H]` and
/// their routing source); returns their output `[T_r, H]`. Every rank of the group calls it at
/// once; a failure on any rank makes every rank return an error naming it.
pub fn forward_rank(
    comm: &dyn Communicator,
    layer: &RankLayer,
    input: &ForwardInput<'_>,
) -> Result<ForwardOutput> {
    guarded(comm, || {
        check_rank(comm, layer)?;
        let own = front(comm, layer, input)?;
        let h = layer.global.hidden;
        let out = match layer.layout.mode {
            EpMode::AllToAll => a2a::forward(comm, layer, &own)?,
            EpMode::GatherScatter => gather::forward(comm, layer, &own)?,
            #[cfg(feature = "cuda")]
            EpMode::DeviceAllToAll => device_ep::forward(comm, layer, &own)?,
            #[cfg(not(feature = "cuda"))]
            EpMode::DeviceAllToAll => {
                return Err(MoeError::Cuda(
                    "device-all-to-all needs the `cuda` feature, which this build lacks".into(),
                ))
            }
        };
        let tokens = own.routes.tokens;
        let done = ForwardOutput {
            output: forward::output_like(input.hidden, &out, tokens, h),
            routes: own.routes,
        };
        if layer.layout.mode == EpMode::DeviceAllToAll {
            // (the host modes' partial rows come through the runner's checked layers; the device
            // entry's do not, so the overflow rule is applied to the sum here)
            forward::check_output(&done)?;
        }
        Ok(done)
    })
}

/// One device all-to-all call of rank `layer.rank()` ([`EpMode::DeviceAllToAll`]) whose tokens
/// already live on its GPU — what an engine with GPU-resident activations calls: `tokens` (hidden
/// states, and router logits, packed or given routes, all device memory of the rank's GPU, their
/// writes complete) in, this rank's `[T, H]` output (the hidden states' dtype) left in `out`.
/// Logits are routed on the device by the layer's router, bit for bit as the host routes them.
/// Returns once `out` holds the output. Every rank of the group calls it at once; a failure on any
/// rank makes every rank return an error naming it.
///
/// # Safety
/// `tokens`' addresses and `out` must be live device memory of the rank's GPU of the sizes the
/// call implies (`[T, H]` hidden states and output, `[T, E]` logits or `[T, K]` routes), untouched
/// by anything else until the call returns.
#[cfg(feature = "cuda")]
pub unsafe fn forward_rank_device(
    comm: &dyn Communicator,
    layer: &RankLayer,
    tokens: &DeviceTokens,
    out: u64,
) -> Result<()> {
    guarded(comm, || {
        check_rank(comm, layer)?;
        if layer.layout.mode != EpMode::DeviceAllToAll {
            return Err(MoeError::invalid(
                "ep mode",
                format!(
                    "a call on device memory runs device-all-to-all; this layout is {:?}",
                    layer.layout.mode
                ),
            ));
        }
        device_ep::forward_device(comm, layer, tokens, out)
    })
}

/// Rank `layer.rank()`'s last [`forward_rank`] call again on what it left on the device, its output
/// left there (device all-to-all only: [`EpMode::DeviceAllToAll`]); what a split's timing repeats.
fn forward_rank_again(comm: &dyn Communicator, layer: &RankLayer) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        guarded(comm, || device_ep::forward_staged(comm, layer))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (comm, layer);
        Err(MoeError::Cuda(
            "device-all-to-all needs the `cuda` feature, which this build lacks".into(),
        ))
    }
}

/// That `comm` is the end of the group `layer` was sliced for, at its rank.
fn check_rank(comm: &dyn Communicator, layer: &RankLayer) -> Result<()> {
    if comm.size() != layer.layout.ranks() || comm.rank() != layer.rank {
        return Err(MoeError::invalid(
            "communicator",
            format!(
                "rank {} of {} runs the layer slice of rank {} of {}",
                comm.rank(),
                comm.size(),
                layer.rank,
                layer.layout.ranks()
            ),
        ));
    }
    Ok(())
}

/// Checks and routes this rank's tokens, and learns every rank's token count (and that all
/// hidden states share one dtype).
fn front<'a>(
    comm: &dyn Communicator,
    layer: &RankLayer,
    input: &ForwardInput<'a>,
) -> Result<Owned<'a>> {
    let tokens = forward::check_hidden(layer.loaded.layer(), input.hidden)?;
    let g = &layer.global;
    let routes = routing::resolve(
        &g.routing,
        g.num_experts,
        tokens,
        &input.routing,
        layer.router_bias.as_deref(),
    )?;
    let mut mine = (tokens as u64).to_le_bytes().to_vec();
    mine.push(dtype_tag(input.hidden.dtype));
    let all = comm.all_gather(&mine)?;
    let mut counts = Vec::with_capacity(all.len());
    for (r, b) in all.iter().enumerate() {
        let (Ok(n), Some(&tag)) = (<[u8; 8]>::try_from(&b[..b.len().min(8)]), b.get(8)) else {
            return Err(MoeError::invalid(
                "token counts",
                format!("rank {r} sent {} bytes", b.len()),
            ));
        };
        if tag != dtype_tag(input.hidden.dtype) {
            return Err(MoeError::invalid(
                "hidden_states",
                format!(
                    "rank {} holds {} hidden states, rank {r} another dtype; every rank must use one",
                    comm.rank(),
                    input.hidden.dtype
                ),
            ));
        }
        counts.push(u64::from_le_bytes(n) as usize);
    }
    let first = counts[..comm.rank()].iter().sum();
    Ok(Owned {
        hidden: input.hidden,
        routes,
        counts,
        first,
    })
}

fn dtype_tag(d: DType) -> u8 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::F8E4M3 => 3,
        DType::U8 => 4,
        DType::I32 => 5,
    }
}

fn dtype_from_tag(tag: u8) -> Option<DType> {
    [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F8E4M3,
        DType::U8,
        DType::I32,
    ]
    .into_iter()
    .find(|&d| dtype_tag(d) == tag)
}

/// Rows `r` of `t` (`[T, …]`) as an owned tensor.
fn rows(t: &HostTensor, r: Range<usize>) -> Result<HostTensor> {
    let row = t.shape.iter().skip(1).product::<usize>() * t.dtype.size();
    let bytes = match t.shape.first() {
        Some(&n) if n >= r.end && t.bytes.len() >= r.end * row => {
            &t.bytes[r.start * row..r.end * row]
        }
        _ => {
            return Err(MoeError::shape(
                "input",
                format!("at least {} rows", r.end),
                &t.shape,
            ))
        }
    };
    let mut shape = t.shape.clone();
    shape[0] = r.len();
    Ok(HostTensor::from_u8(t.dtype, shape, bytes.to_vec()))
}

/// Rank `r`'s tokens among `tokens` over `ranks`: contiguous, `T/R` each, the first `T mod R`
/// ranks one more.
pub fn token_slice(tokens: usize, ranks: usize, r: usize) -> Range<usize> {
    let (base, extra) = (tokens / ranks.max(1), tokens % ranks.max(1));
    let start = r * base + r.min(extra);
    start..start + base + usize::from(r < extra)
}

/// A routing source's rows `r`.
enum OwnedRouting {
    Logits(HostTensor),
    TopK(HostTensor, HostTensor),
    Packed(HostTensor),
}

impl OwnedRouting {
    fn slice(input: &RoutingInput<'_>, r: Range<usize>) -> Result<Self> {
        Ok(match input {
            RoutingInput::Logits(t) => OwnedRouting::Logits(rows(t, r)?),
            RoutingInput::TopK { ids, weights } => {
                OwnedRouting::TopK(rows(ids, r.clone())?, rows(weights, r)?)
            }
            RoutingInput::Packed(t) => OwnedRouting::Packed(rows(t, r)?),
        })
    }
    fn input(&self) -> RoutingInput<'_> {
        match self {
            OwnedRouting::Logits(t) => RoutingInput::Logits(t),
            OwnedRouting::TopK(ids, weights) => RoutingInput::TopK { ids, weights },
            OwnedRouting::Packed(t) => RoutingInput::Packed(t),
        }
    }
}

/// Where a split layer's ranks run — the first three are threads of this process, one per rank:
/// - `Threads`: talking through host memory ([`ThreadComm`]; every rank loads its slice through one
///   runner on the caller's backend choice: CPU ranks in CI, or with the CUDA backend ranks sharing
///   GPU 0 whose bytes still cross host memory);
/// - `Nccl`: one rank per GPU talking through NCCL (rank r loads on GPU r);
/// - `Device`: every rank on GPU [`DEVICE_GPU`], talking through device-to-device copies
///   (`device_comm::DeviceComm`; every rank loads through one runner of that GPU) — the in-process
///   device communicator that runs a split on a single GPU;
/// - `Processes`: one process per rank, talking over TCP through rank 0 ([`SocketComm`]); the
///   processes are started by `moerunner run --comm process` or an external launcher
///   ([`RankEnv`]), so this process holds only its own rank and [`forward_split`] refuses it;
/// - `NcclProcesses`: one process per GPU, talking through NCCL, the rendezvous's sockets kept as
///   the watchdog (`nccl::NcclComm::over_processes`); started like `Processes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Threads,
    Nccl,
    Device,
    Processes,
    NcclProcesses,
}

/// The GPU that `Transport::Device` ranks share (`CUDA_VISIBLE_DEVICES` picks which one it is).
pub const DEVICE_GPU: usize = 0;

impl Transport {
    /// One communicator per rank, in rank order; a collective that waits longer than `timeout`
    /// for a peer fails.
    fn group(self, ranks: usize, timeout: Duration) -> Result<Vec<Box<dyn Communicator>>> {
        match self {
            Transport::Threads => Ok(boxed(ThreadComm::group(ranks, timeout)?)),
            Transport::Processes | Transport::NcclProcesses => Err(MoeError::invalid(
                "comm",
                "process ranks run one per process (`moerunner run --comm process`, or \
                 MOERUNNER_RANK and its peers set by a launcher), not as threads of this one",
            )),
            #[cfg(feature = "cuda")]
            Transport::Nccl => Ok(boxed(nccl::NcclComm::one_per_gpu(ranks, timeout)?)),
            #[cfg(feature = "cuda")]
            Transport::Device => Ok(boxed(device_comm::DeviceComm::group(
                ranks, DEVICE_GPU, timeout,
            )?)),
            #[cfg(not(feature = "cuda"))]
            Transport::Nccl | Transport::Device => Err(self.without_cuda()),
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn without_cuda(self) -> MoeError {
        MoeError::Cuda(format!(
            "{} need the `cuda` feature, which this build lacks (rebuild with `--features cuda`)",
            self.ranks()
        ))
    }

    /// What its ranks are, for errors.
    fn ranks(self) -> &'static str {
        match self {
            Transport::Threads => "thread ranks",
            Transport::Nccl => "NCCL ranks (one per GPU)",
            Transport::Device => "device ranks (sharing one GPU)",
            Transport::Processes => "process ranks",
            Transport::NcclProcesses => "NCCL process ranks (one process per GPU)",
        }
    }

    /// The most ranks this transport can hold here, or why it cannot run at all (a build without
    /// the `cuda` feature, no NVIDIA driver, no GPU, no libnccl): threads any number, NCCL one per
    /// GPU, device ranks any number on one GPU. Touches no GPU memory.
    pub fn max_ranks(self) -> Result<usize> {
        match self {
            Transport::Threads | Transport::Processes => Ok(usize::MAX),
            #[cfg(feature = "cuda")]
            Transport::Nccl | Transport::Device | Transport::NcclProcesses => {
                let why = |w: String| MoeError::Cuda(format!("{}: {w}", self.ranks()));
                // SAFETY: only tries to dlopen libcuda (calling into a missing library would panic).
                if !unsafe { cudarc::driver::sys::is_culib_present() } {
                    return Err(why(
                        "no NVIDIA driver library (libcuda.so) on this machine".into()
                    ));
                }
                let gpus = cudarc::driver::CudaContext::device_count()
                    .map_err(|e| why(format!("counting GPUs: {e:?}")))?
                    .max(0) as usize;
                if gpus == 0 {
                    return Err(why("no GPU is visible".into()));
                }
                if self == Transport::Device {
                    return Ok(usize::MAX);
                }
                if !nccl::available() {
                    return Err(why(
                        "libnccl (NCCL 2) was not found on the library path".into()
                    ));
                }
                Ok(gpus)
            }
            #[cfg(not(feature = "cuda"))]
            Transport::Nccl | Transport::Device | Transport::NcclProcesses => {
                Err(self.without_cuda())
            }
        }
    }
}

impl std::fmt::Display for Transport {
    /// The CLI's `--comm` names.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Threads => "thread",
            Transport::Nccl => "nccl",
            Transport::Device => "device",
            Transport::Processes => "process",
            Transport::NcclProcesses => "nccl-process",
        })
    }
}

impl std::str::FromStr for Transport {
    type Err = MoeError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "thread" => Ok(Transport::Threads),
            "nccl" => Ok(Transport::Nccl),
            "device" => Ok(Transport::Device),
            "process" => Ok(Transport::Processes),
            "nccl-process" => Ok(Transport::NcclProcesses),
            _ => Err(MoeError::invalid(
                "comm",
                format!("`{s}`: use thread, nccl, device, process or nccl-process"),
            )),
        }
    }
}

/// Communicators of one kind as the boxed ones a split runs over.
fn boxed<C: Communicator + 'static>(comms: Vec<C>) -> Vec<Box<dyn Communicator>> {
    comms
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Communicator>)
        .collect()
}

/// The runner each rank of a split loads through, as its transport puts it: one shared runner for
/// thread ranks (the caller's backend choice) and device ranks (the CUDA backend on
/// [`DEVICE_GPU`]), made on first use; each NCCL rank its own GPU's.
struct RankRunners {
    transport: Transport,
    shared: std::sync::OnceLock<Runner>,
}

impl RankRunners {
    fn new(transport: Transport) -> Self {
        RankRunners {
            transport,
            shared: std::sync::OnceLock::new(),
        }
    }
    fn with<T>(&self, rank: usize, f: impl FnOnce(&Runner) -> T) -> T {
        match self.transport {
            Transport::Threads | Transport::Processes => f(self.shared.get_or_init(Runner::new)),
            Transport::Device => f(self.shared.get_or_init(|| Runner::on_gpu(DEVICE_GPU))),
            Transport::Nccl | Transport::NcclProcesses => f(&Runner::on_gpu(rank)),
        }
    }
}

/// Loads rank r's slice of a split layer where its transport puts it.
struct RankLoader<'a> {
    whole: &'a MoeLayer,
    layout: &'a Layout,
    choice: &'a BackendChoice,
    runners: RankRunners,
}

impl<'a> RankLoader<'a> {
    fn new(
        whole: &'a MoeLayer,
        layout: &'a Layout,
        (choice, transport): (&'a BackendChoice, Transport),
    ) -> Self {
        RankLoader {
            whole,
            layout,
            choice,
            runners: RankRunners::new(transport),
        }
    }
    fn load(&self, rank: usize) -> Result<RankLayer> {
        self.runners.with(rank, |runner| {
            RankLayer::load(self.whole, self.layout, rank, runner, self.choice)
        })
    }
}

/// Runs `whole` split by `layout` over `transport`'s ranks, each loading its slice on `choice` and
/// owning a contiguous slice of the tokens; returns the whole output, which equals a single-device
/// run's (docs/parallel.md). A collective that waits longer than `timeout` for a peer stops the run.
pub fn forward_split(
    whole: &MoeLayer,
    layout: &Layout,
    (choice, transport): (&BackendChoice, Transport),
    input: &ForwardInput<'_>,
    timeout: Duration,
) -> Result<ForwardOutput> {
    // The whole input is checked once here, so errors name tokens by their global index.
    forward::validate_input(whole, input)?;
    let comms = transport.group(layout.ranks(), timeout)?;
    let loader = RankLoader::new(whole, layout, (choice, transport));
    forward_with_comms(comms, layout, input, |rank| loader.load(rank))
}

/// [`forward_split`] on `layout.ranks()` CPU threads of this process (one per rank,
/// [`ThreadComm`]).
pub fn forward_threads(
    whole: &MoeLayer,
    layout: &Layout,
    choice: &BackendChoice,
    input: &ForwardInput<'_>,
    timeout: Duration,
) -> Result<ForwardOutput> {
    forward_split(whole, layout, (choice, Transport::Threads), input, timeout)
}

/// [`forward_split`] with each rank's layer made by `load(rank, runner)` on that rank's thread,
/// `runner` the one its transport loads through (a checkpoint slice read by the rank itself and
/// loaded with [`RankLayer::new`]: on its own GPU for NCCL ranks, on the shared GPU for device
/// ranks). Each rank checks its own tokens; a failure names the rank.
pub fn forward_split_with(
    layout: &Layout,
    transport: Transport,
    input: &ForwardInput<'_>,
    timeout: Duration,
    load: impl Fn(usize, &Runner) -> Result<RankLayer> + Sync,
) -> Result<ForwardOutput> {
    let comms = transport.group(layout.ranks(), timeout)?;
    let runners = RankRunners::new(transport);
    forward_with_comms(comms, layout, input, |rank| {
        runners.with(rank, |runner| load(rank, runner))
    })
}

/// [`forward_split`] with NCCL between the ranks: rank r runs on GPU r of this process (as many
/// GPUs as ranks), loading its slice there, and the collectives go through
/// [`nccl::NcclComm`]. One rank on one GPU is the single-GPU check of the NCCL path.
#[cfg(feature = "cuda")]
pub fn forward_nccl(
    whole: &MoeLayer,
    layout: &Layout,
    choice: &BackendChoice,
    input: &ForwardInput<'_>,
    timeout: Duration,
) -> Result<ForwardOutput> {
    forward_split(whole, layout, (choice, Transport::Nccl), input, timeout)
}

/// The ranks of `layout` on one thread each, talking through `comms` (one per rank, in rank
/// order), each loading its layer with `load(rank)` and owning a contiguous slice of the tokens.
pub fn forward_with_comms<C: Communicator>(
    comms: Vec<C>,
    layout: &Layout,
    input: &ForwardInput<'_>,
    load: impl Fn(usize) -> Result<RankLayer> + Sync,
) -> Result<ForwardOutput> {
    let ranks = layout.ranks();
    if comms.len() != ranks {
        return Err(MoeError::Comm {
            rank: 0,
            why: format!("{} communicators for {ranks} ranks", comms.len()),
        });
    }
    let results = on_rank_threads(comms, input, |rank, comm, input| {
        let layer = guarded(&comm, || load(rank))?;
        forward_rank(&comm, &layer, &input)
    })?;
    join_outputs(results)
}

/// Runs `body(rank, comm, that rank's slice of the input's tokens)` on one thread per communicator
/// (rank r owns `token_slice(T, R, r)`), and returns each rank's result in rank order (a thread that
/// panicked: an error naming its rank).
fn on_rank_threads<C, T, F>(
    comms: Vec<C>,
    input: &ForwardInput<'_>,
    body: F,
) -> Result<Vec<Result<T>>>
where
    C: Communicator + Send,
    T: Send,
    F: Fn(usize, C, ForwardInput<'_>) -> Result<T> + Sync,
{
    let ranks = comms.len();
    let tokens = input.hidden.shape.first().copied().unwrap_or(0);
    let slices = (0..ranks)
        .map(|r| {
            let s = token_slice(tokens, ranks, r);
            Ok((
                rows(input.hidden, s.clone())?,
                OwnedRouting::slice(&input.routing, s)?,
            ))
        })
        .collect::<Result<Vec<(HostTensor, OwnedRouting)>>>()?;
    Ok(std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip(&slices)
            .enumerate()
            .map(|(rank, (comm, (hidden, routing)))| {
                let body = &body;
                scope.spawn(move || {
                    let input = ForwardInput {
                        hidden,
                        routing: routing.input(),
                    };
                    body(rank, comm, input)
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(MoeError::Comm {
                        rank,
                        why: "the rank's thread panicked".into(),
                    })
                })
            })
            .collect()
    }))
}

/// The ranks' outputs joined in rank order, or the failing rank's own error (else the first).
fn join_outputs(results: Vec<Result<ForwardOutput>>) -> Result<ForwardOutput> {
    let mut outs = Vec::with_capacity(results.len());
    let mut first_err = None;
    for r in results {
        match r {
            Ok(o) => outs.push(o),
            Err(e @ MoeError::Rank { .. }) => return Err(e),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let Some(head) = outs.first() else {
        return Err(MoeError::invalid("ranks", "a run needs at least one rank"));
    };
    let (dtype, h, top_k, on_input) = (
        head.output.dtype,
        head.output.shape.get(1).copied().unwrap_or(0),
        head.routes.top_k,
        head.routes.weight_on_input,
    );
    let tokens: usize = outs.iter().map(|o| o.routes.tokens).sum();
    let mut bytes = Vec::new();
    let mut routes = Routes {
        tokens,
        top_k,
        ids: Vec::with_capacity(tokens * top_k),
        weights: Vec::with_capacity(tokens * top_k),
        weight_on_input: on_input,
    };
    for o in &outs {
        bytes.extend_from_slice(&o.output.bytes);
        routes.ids.extend_from_slice(&o.routes.ids);
        routes.weights.extend_from_slice(&o.routes.weights);
    }
    Ok(ForwardOutput {
        output: HostTensor::from_u8(dtype, vec![tokens, h], bytes),
        routes,
    })
}

/// Runs the rank's slice on `n` rows `x` (f32 `[n, H]`) with routes `ids`/`weights` (`[n, k]`,
/// local expert ids, −1 for a slot another rank computes); the f32 output `[n, H]`. F32 in and
/// out, so no rounding to the caller's dtype happens before the partial results are combined.
fn compute(
    layer: &RankLayer,
    x: &[f32],
    n: usize,
    ids: &[i32],
    weights: &[f32],
) -> Result<Vec<f32>> {
    let h = layer.global.hidden;
    if n == 0 {
        return Ok(Vec::new());
    }
    let k = ids.len() / n;
    let hidden = HostTensor::from_f32(vec![n, h], x);
    let base = layer.id_base as i32;
    let ids: Vec<i32> = ids
        .iter()
        .map(|&id| if id >= 0 { id + base } else { id })
        .collect();
    let ids = HostTensor::from_i32(vec![n, k], &ids);
    let weights = HostTensor::from_f32(vec![n, k], weights);
    let out = layer.loaded.forward(&ForwardInput {
        hidden: &hidden,
        routing: RoutingInput::TopK {
            ids: &ids,
            weights: &weights,
        },
    })?;
    out.output.to_f32_vec("output")
}
