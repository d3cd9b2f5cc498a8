//! NCCL behind the [`Communicator`] trait: one rank per GPU of this process (ranks as threads, as
//! `parallel::forward_split` runs them), the group made at once with `ncclCommInitAll`
//! through cudarc's NCCL bindings, loaded at run time like the rest of CUDA (a missing libnccl is
//! an error naming the library, never a panic).
//!
//! The trait's host-buffer calls stage their bytes through device memory (the device-buffer call,
//! `all_to_all_v_device`, sends and receives the caller's device regions directly): the lengths first (an all-gather of
//! u64s), then the bytes (an all-gather of padded buffers, or grouped `ncclSend`/`ncclRecv` for
//! all-to-all). Every wait is bounded: the stream is polled until the call's work completes or the
//! group's timeout passes, which poisons this rank's end (later calls fail at once, naming the
//! reason) — NCCL's own kernels of a peer that never came are then left to the process's exit.
//! NVLink multicast is kept off (`NCCL_NVLS_ENABLE=0`, unless the environment says otherwise).

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::safe::{group_end, group_start, Comm, Id};

use super::comm::DeviceExchange;
use super::{Communicator, SocketComm};
use crate::error::{MoeError, Result};

/// One rank's end of an NCCL group.
pub struct NcclComm {
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    timeout: Duration,
    /// Set by `abort` or a failed call: later calls fail with it.
    poisoned: Mutex<Option<String>>,
    /// One call at a time on this rank's communicator (NCCL's rule for a communicator).
    busy: Mutex<()>,
    /// Ranks in processes of their own: the rendezvous's sockets, kept open as the watchdog that
    /// ends a wait when a peer's process dies (and carries this rank's abort to its peers).
    watchdog: Option<Arc<SocketComm>>,
}

/// A communicator made on the NCCL init thread, handed back to the waiting one.
struct Made(std::result::Result<Comm, cudarc::nccl::result::NcclError>);
// SAFETY: the communicator is used by one thread at a time: made on the init thread, then only by
// the thread it is handed to.
unsafe impl Send for Made {}

// SAFETY: an NCCL communicator and its stream may be used from any thread as long as calls on it
// are not concurrent; every call here holds `busy`.
unsafe impl Send for NcclComm {}
// SAFETY: as above: `busy` serialises every use of `comm`.
unsafe impl Sync for NcclComm {}

/// Whether libnccl can be loaded (checked before any NCCL call, which would panic without it).
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

impl NcclComm {
    /// A group of one rank per GPU in `ordinals` (distinct: NCCL does not put two ranks of one
    /// communicator on one device), in that order; each call waits for its peers at most
    /// `timeout`.
    pub fn group(ordinals: &[usize], timeout: Duration) -> Result<Vec<NcclComm>> {
        let fail = |why: String| MoeError::Comm { rank: 0, why };
        if ordinals.is_empty() {
            return Err(fail("an NCCL group needs at least one GPU".into()));
        }
        let mut seen = ordinals.to_vec();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != ordinals.len() {
            return Err(fail(format!(
                "GPUs {ordinals:?}: NCCL puts one rank of a group on each device, so they must differ"
            )));
        }
        preflight().map_err(fail)?;
        let streams = ordinals
            .iter()
            .map(|&o| {
                let ctx = CudaContext::new(o)
                    .map_err(|e| fail(format!("opening GPU {o} for NCCL: {e:?}")))?;
                ctx.new_stream()
                    .map_err(|e| fail(format!("a stream on GPU {o}: {e:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let comms = Comm::from_devices(streams.clone())
            .map_err(|e| fail(format!("ncclCommInitAll over GPUs {ordinals:?}: {e:?}")))?;
        let size = ordinals.len();
        Ok(comms
            .into_iter()
            .zip(streams)
            .enumerate()
            .map(|(rank, (comm, stream))| NcclComm::new(comm, stream, (rank, size), timeout, None))
            .collect())
    }

    /// This process's rank of a group whose ranks are processes (one per GPU), on GPU `ordinal`:
    /// `socket` is the group's rendezvous (its rank and size are this communicator's). Rank 0
    /// makes NCCL's unique id and hands it out over the sockets; the sockets then stay open as
    /// the watchdog: a wait — `ncclCommInitRank`, blocking, on a thread of its own, or any
    /// collective's — ends at once when a peer's connection closes or it aborts, naming it. A
    /// failure of this rank's own (no libnccl or GPU, a bad id, NCCL's init) stops its peers
    /// through the sockets, as any rank's failure does (`guarded`).
    pub fn over_processes(
        socket: Arc<SocketComm>,
        ordinal: usize,
        timeout: Duration,
    ) -> Result<NcclComm> {
        let (comm, stream) =
            super::guarded(&*socket, || Self::init_rank(&socket, ordinal, timeout))?;
        let ranks = (socket.rank(), socket.size());
        Ok(NcclComm::new(comm, stream, ranks, timeout, Some(socket)))
    }

    /// [`Self::over_processes`]'s communicator and stream. Errors of this rank's own are
    /// `MoeError::Cuda`; a peer's failure, or the group's timeout, is a `MoeError::Comm` the
    /// group already knows.
    fn init_rank(
        socket: &SocketComm,
        ordinal: usize,
        timeout: Duration,
    ) -> Result<(Comm, Arc<CudaStream>)> {
        let (rank, size) = (socket.rank(), socket.size());
        preflight().map_err(MoeError::Cuda)?;
        let mine: Vec<u8> = if rank == 0 {
            let id = Id::new().map_err(|e| MoeError::Cuda(format!("ncclGetUniqueId: {e:?}")))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let all = socket.all_gather(&mine)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        match all.first() {
            Some(id) if id.len() == internal.len() => {
                for (d, &b) in internal.iter_mut().zip(id) {
                    *d = b as std::ffi::c_char;
                }
            }
            other => {
                return Err(MoeError::Cuda(format!(
                    "rank 0 sent an NCCL unique id of {} bytes, not 128",
                    other.map_or(0, Vec::len)
                )))
            }
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| MoeError::Cuda(format!("opening GPU {ordinal} for NCCL: {e:?}")))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| MoeError::Cuda(format!("a stream on GPU {ordinal}: {e:?}")))?;
        // ncclCommInitRank blocks until every rank has called it: on a thread of its own, so
        // this one can watch the peers meanwhile (a peer that died leaves that thread blocked
        // until the process exits, which is what a rank does after this error).
        let (tx, rx) = mpsc::channel();
        let init_stream = stream.clone();
        std::thread::spawn(move || {
            let made = ctx
                .bind_to_thread()
                .map_err(|_| {
                    cudarc::nccl::result::NcclError(
                        cudarc::nccl::sys::ncclResult_t::ncclUnhandledCudaError,
                    )
                })
                .and_then(|_| Comm::from_rank(init_stream, rank, size, Id::uninit(internal)));
            let _ = tx.send(Made(made));
        });
        let deadline = Instant::now() + timeout;
        let stopped = |why: String| MoeError::Comm { rank, why };
        loop {
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(Made(made)) => {
                    let comm = made.map_err(|e| {
                        MoeError::Cuda(format!(
                            "ncclCommInitRank (rank {rank} of {size}, GPU {ordinal}): {e:?}"
                        ))
                    })?;
                    return Ok((comm, stream));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(why) = socket.peer_gone() {
                        return Err(stopped(format!("ncclCommInitRank stopped: {why}")));
                    }
                    if Instant::now() > deadline {
                        let why =
                            format!("rank {rank} timed out after {timeout:?} in ncclCommInitRank");
                        socket.abort(&why);
                        return Err(stopped(why));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(MoeError::Cuda(
                        "the NCCL init thread ended without an answer".into(),
                    ))
                }
            }
        }
    }

    fn new(
        comm: Comm,
        stream: Arc<CudaStream>,
        (rank, size): (usize, usize),
        timeout: Duration,
        watchdog: Option<Arc<SocketComm>>,
    ) -> Self {
        NcclComm {
            comm,
            stream,
            rank,
            size,
            timeout,
            poisoned: Mutex::new(None),
            busy: Mutex::new(()),
            watchdog,
        }
    }

    /// A group of `ranks` ranks, rank r on GPU r.
    pub fn one_per_gpu(ranks: usize, timeout: Duration) -> Result<Vec<NcclComm>> {
        Self::group(&(0..ranks).collect::<Vec<_>>(), timeout)
    }

    fn err(&self, why: impl Into<String>) -> MoeError {
        MoeError::Comm {
            rank: self.rank,
            why: why.into(),
        }
    }

    /// Fails at once when this end was poisoned; else runs `f` holding the call lock, and poisons
    /// this end when `f` fails (a half-done collective leaves the group unusable).
    fn call<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let _busy = self
            .busy
            .lock()
            .map_err(|_| self.err("the NCCL communicator's lock is poisoned"))?;
        if let Some(why) = self.poisoned.lock().ok().and_then(|p| p.clone()) {
            return Err(self.err(why));
        }
        let r = f();
        if let Err(e) = &r {
            if let Ok(mut p) = self.poisoned.lock() {
                p.get_or_insert_with(|| format!("rank {} failed in {what}: {e}", self.rank));
            }
        }
        r
    }

    /// Waits for this rank's stream, at most the group's timeout.
    fn wait(&self, what: &str) -> Result<()> {
        let watch = || self.watchdog.as_ref().and_then(|w| w.peer_gone());
        super::device_comm::wait_for_stream(
            &self.stream,
            self.timeout,
            "a peer did not arrive",
            &watch,
        )
        .map_err(|why| self.err(format!("{what}: {why}")))
    }

    fn upload(&self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        // (NCCL buffers may not be empty: one byte stands in for none)
        let data: &[u8] = if bytes.is_empty() { &[0] } else { bytes };
        self.stream
            .clone_htod(data)
            .map_err(|e| self.err(format!("copying to the GPU: {e:?}")))
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<u8>> {
        self.stream
            .alloc_zeros::<u8>(n.max(1))
            .map_err(|e| self.err(format!("allocating {n} bytes on the GPU: {e:?}")))
    }

    fn download(&self, buf: &CudaSlice<u8>) -> Result<Vec<u8>> {
        self.stream
            .clone_dtoh(buf)
            .map_err(|e| self.err(format!("copying from the GPU: {e:?}")))
    }

    /// Every rank's `n` bytes (the same `n` on every rank), concatenated in rank order.
    fn gather_fixed(&self, mine: &[u8], what: &str) -> Result<Vec<u8>> {
        let n = mine.len().max(1);
        let send = self.upload(mine)?;
        let mut recv = self.zeros(n * self.size)?;
        self.comm
            .all_gather(&send, &mut recv)
            .map_err(|e| self.err(format!("{what}: ncclAllGather: {e:?}")))?;
        self.wait(what)?;
        self.download(&recv)
    }

    /// Every rank's vector of u64 (the same length on every rank), indexed by rank.
    fn gather_u64(&self, mine: &[u64], what: &str) -> Result<Vec<Vec<u64>>> {
        let bytes: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = self.gather_fixed(&bytes, what)?;
        Ok(all
            .chunks(bytes.len().max(1))
            .map(|c| {
                c.chunks_exact(8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                    .collect()
            })
            .collect())
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.call("all_gather", || {
            let lens = self.gather_u64(&[mine.len() as u64], "all_gather (lengths)")?;
            let max = lens.iter().map(|l| l[0] as usize).max().unwrap_or(0).max(1);
            let mut padded = mine.to_vec();
            padded.resize(max, 0);
            let all = self.gather_fixed(&padded, "all_gather")?;
            Ok(all
                .chunks(max)
                .zip(&lens)
                .map(|(c, l)| c[..l[0] as usize].to_vec())
                .collect())
        })
    }
    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        self.call("all_to_all_v", || {
            if send.len() != self.size {
                return Err(self.err(format!(
                    "all_to_all_v: {} buffers for {} ranks",
                    send.len(),
                    self.size
                )));
            }
            let counts: Vec<u64> = send.iter().map(|b| b.len() as u64).collect();
            // counts[src][dst] for every pair, so each rank sizes what it receives
            let all = self.gather_u64(&counts, "all_to_all_v (counts)")?;
            let sends = send
                .iter()
                .map(|b| self.upload(b))
                .collect::<Result<Vec<_>>>()?;
            let mut recvs = (0..self.size)
                .map(|s| self.zeros(all[s][self.rank] as usize))
                .collect::<Result<Vec<_>>>()?;
            group_start().map_err(|e| self.err(format!("ncclGroupStart: {e:?}")))?;
            let mut issued = Ok(());
            for (peer, (s, r)) in sends.iter().zip(recvs.iter_mut()).enumerate() {
                // empty buffers travel as one byte (NCCL's counts must match on both sides)
                if let Err(e) = self.comm.send(s, peer as i32) {
                    issued = Err(self.err(format!("ncclSend to rank {peer}: {e:?}")));
                    break;
                }
                if let Err(e) = self.comm.recv(r, peer as i32) {
                    issued = Err(self.err(format!("ncclRecv from rank {peer}: {e:?}")));
                    break;
                }
            }
            group_end().map_err(|e| self.err(format!("ncclGroupEnd: {e:?}")))?;
            issued?;
            self.wait("all_to_all_v")?;
            (0..self.size)
                .map(|s| {
                    let mut v = self.download(&recvs[s])?;
                    v.truncate(all[s][self.rank] as usize);
                    Ok(v)
                })
                .collect()
        })
    }
    fn all_to_all_v_device(&self, parts: &[DeviceExchange]) -> Result<()> {
        self.call("all_to_all_v_device", || {
            for p in parts {
                p.check(self.size)
                    .map_err(|why| self.err(format!("all_to_all_v_device: {why}")))?;
            }
            let region = |ptr: u64, (off, len): (usize, usize)| Region {
                ptr: ptr + off as u64,
                len,
                stream: self.stream.clone(),
            };
            group_start().map_err(|e| self.err(format!("ncclGroupStart: {e:?}")))?;
            let mut issued = Ok(());
            'parts: for p in parts {
                for peer in 0..self.size {
                    // (a zero-length region on one side is zero-length on the other: the lengths
                    // travelled first, so both skip it)
                    let send = region(p.send, p.send_regions[peer]);
                    if send.len > 0 {
                        if let Err(e) = self.comm.send(&send, peer as i32) {
                            issued = Err(self.err(format!("ncclSend to rank {peer}: {e:?}")));
                            break 'parts;
                        }
                    }
                    let mut recv = region(p.recv, p.recv_regions[peer]);
                    if recv.len > 0 {
                        if let Err(e) = self.comm.recv(&mut recv, peer as i32) {
                            issued = Err(self.err(format!("ncclRecv from rank {peer}: {e:?}")));
                            break 'parts;
                        }
                    }
                }
            }
            group_end().map_err(|e| self.err(format!("ncclGroupEnd: {e:?}")))?;
            issued?;
            self.wait("all_to_all_v_device")
        })
    }
    fn abort(&self, why: &str) {
        if let Ok(mut p) = self.poisoned.lock() {
            p.get_or_insert_with(|| why.to_string());
        }
        // Peers in other processes learn it through the sockets (their waits watch them).
        if let Some(w) = &self.watchdog {
            w.abort(why);
        }
    }
}

/// Bytes of device memory the caller owns (a region of a device all-to-all's buffer), as NCCL's
/// point-to-point calls take them: the caller keeps the memory alive and orders its writes before
/// the call, so handing out the address asks the stream for nothing.
struct Region {
    ptr: u64,
    len: usize,
    stream: Arc<CudaStream>,
}

impl cudarc::driver::DeviceSlice<u8> for Region {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl cudarc::driver::DevicePtr<u8> for Region {
    fn device_ptr<'a>(
        &'a self,
        _stream: &'a CudaStream,
    ) -> (
        cudarc::driver::sys::CUdeviceptr,
        cudarc::driver::SyncOnDrop<'a>,
    ) {
        (self.ptr, cudarc::driver::SyncOnDrop::Sync(None))
    }
}

impl cudarc::driver::DevicePtrMut<u8> for Region {
    fn device_ptr_mut<'a>(
        &'a mut self,
        _stream: &'a CudaStream,
    ) -> (
        cudarc::driver::sys::CUdeviceptr,
        cudarc::driver::SyncOnDrop<'a>,
    ) {
        (self.ptr, cudarc::driver::SyncOnDrop::Sync(None))
    }
}

/// What every NCCL group needs before its first call: libcuda, libnccl, and NVLink multicast off
/// unless the environment says otherwise.
fn preflight() -> std::result::Result<(), String> {
    // SAFETY: only tries to dlopen libcuda (calling into a missing library would panic).
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no NVIDIA driver library (libcuda.so): NCCL ranks need GPUs".into());
    }
    if !available() {
        return Err(
            "libnccl (NCCL 2, e.g. the nvidia-nccl-cu13 wheel's lib folder) was not found on the library path"
                .into(),
        );
    }
    if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
        // Before the first NCCL call of the process reads it.
        std::env::set_var("NCCL_NVLS_ENABLE", "0");
    }
    Ok(())
}
