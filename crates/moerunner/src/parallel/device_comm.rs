//! [`DeviceComm`]: several ranks as threads of this process sharing one GPU, their bytes moved by
//! device-to-device copies — the same parallel code on a single GPU as on NCCL ranks, without
//! NCCL (which puts at most one rank of a communicator on a device).
//!
//! Design decision: the device moves the data, a [`ThreadComm`] does the meeting. Each rank owns a
//! staging buffer for what it sends and one for what it receives (device memory on its own stream
//! of the GPU's one primary context, grown as needed). A collective uploads the rank's send bytes
//! to its send buffer and waits for them, publishes (device address, per-peer offset and length)
//! to its peers through the inner `ThreadComm` all-gather, copies every peer's region addressed to
//! it device to device into its receive buffer (`cuMemcpyDtoDAsync`, one address space: the ranks
//! share the context), downloads them, and meets its peers once more (a barrier), so no rank
//! overwrites or frees its send buffer while a peer still copies from it. So the inner group gives
//! the bounded waits, `abort`, a rank that panics and the rank naming, unchanged; every wait on the
//! GPU polls the stream and gives up after the group's timeout ([`wait_for_stream`], which NCCL
//! ranks use too). A rank whose device step fails aborts the group, so its peers stop at once
//! instead of timing out at the barrier. The sums are the trait's default methods: rank order.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};

use super::comm::DeviceExchange;
use super::{Communicator, ThreadComm};
use crate::error::{MoeError, Result};

/// One rank's end of a group of ranks sharing one GPU.
pub struct DeviceComm {
    meet: ThreadComm,
    stream: Arc<CudaStream>,
    ordinal: usize,
    timeout: Duration,
    /// This rank's staging buffers; the lock also keeps one call at a time on this end.
    staging: Mutex<Staging>,
}

#[derive(Default)]
struct Staging {
    send: Option<CudaSlice<u8>>,
    recv: Option<CudaSlice<u8>>,
}

/// How long [`wait_for_stream`] spins before it sleeps between polls.
const SPIN_FOR: Duration = Duration::from_micros(200);

/// How often [`wait_for_stream`] asks its watchdog whether a peer is gone.
const WATCH_EVERY: Duration = Duration::from_millis(1);

/// Waits until `stream`'s queued work is done, at most `timeout`, polling (never an unbounded
/// wait); past the timeout the error is `late` and the seconds waited. `watch` is asked about
/// every millisecond whether the wait is hopeless (a peer process that died: NCCL ranks of
/// several processes, `nccl::NcclComm::over_processes`), and a reason it gives ends the wait.
/// Ranks run on threads of their own: the query binds the stream's context to this thread.
pub(super) fn wait_for_stream(
    stream: &CudaStream,
    timeout: Duration,
    late: &str,
    watch: &dyn Fn() -> Option<String>,
) -> std::result::Result<(), String> {
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| format!("binding the GPU context: {e:?}"))?;
    let start = Instant::now();
    let mut watched = Duration::ZERO;
    loop {
        // SAFETY: a query of a live stream.
        let status = unsafe { cudarc::driver::sys::cuStreamQuery(stream.cu_stream()) };
        match status {
            cudarc::driver::sys::CUresult::CUDA_SUCCESS => return Ok(()),
            cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => {}
            other => return Err(format!("the GPU stream failed ({other:?})")),
        }
        let waited = start.elapsed();
        if waited > timeout {
            return Err(format!("{late} within {:.0} s", timeout.as_secs_f64()));
        }
        if waited >= watched + WATCH_EVERY {
            watched = waited;
            if let Some(why) = watch() {
                return Err(why);
            }
        }
        // Spin (yielding) through the first 200 µs: a collective waits for copies of a few µs
        // several times per call, and a 20 µs sleep per wait made that most of a small call's
        // communication (H100: 473 µs of 735 at T = 1, EP 2). Past that, sleep between polls.
        if waited < SPIN_FOR {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

impl DeviceComm {
    /// A group of `size` ranks on GPU `ordinal` (hand one to each thread); a collective that waits
    /// longer than `timeout` for its peers or the GPU fails (and stops the group).
    pub fn group(size: usize, ordinal: usize, timeout: Duration) -> Result<Vec<DeviceComm>> {
        let fail = |why: String| MoeError::Comm { rank: 0, why };
        // SAFETY: only tries to dlopen libcuda (calling into a missing library would panic).
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(fail(
                "no NVIDIA driver library (libcuda.so): ranks sharing a GPU need one".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| fail(format!("opening GPU {ordinal} for device ranks: {e:?}")))?;
        let meets = ThreadComm::group(size, timeout)?;
        meets
            .into_iter()
            .map(|meet| {
                let stream = ctx.new_stream().map_err(|e| {
                    fail(format!(
                        "a stream on GPU {ordinal} for rank {}: {e:?}",
                        meet.rank()
                    ))
                })?;
                Ok(DeviceComm {
                    meet,
                    stream,
                    ordinal,
                    timeout,
                    staging: Mutex::new(Staging::default()),
                })
            })
            .collect()
    }

    fn err(&self, why: impl std::fmt::Display) -> MoeError {
        MoeError::Comm {
            rank: self.meet.rank(),
            why: format!("GPU {}: {why}", self.ordinal),
        }
    }

    /// `buf` with room for `n` bytes (at least one: the driver refuses empty allocations), grown to
    /// the next power of two when short.
    fn room<'b>(
        &self,
        buf: &'b mut Option<CudaSlice<u8>>,
        n: usize,
    ) -> Result<&'b mut CudaSlice<u8>> {
        if buf.as_ref().is_none_or(|b| b.len() < n) {
            *buf = None; // free the old one first
            let grown = self
                .stream
                .alloc_zeros::<u8>(n.max(1).next_power_of_two())
                .map_err(|e| self.err(format!("allocating {n} bytes: {e:?}")))?;
            *buf = Some(grown);
        }
        buf.as_mut().ok_or_else(|| self.err("no staging buffer"))
    }

    fn wait(&self, what: &str) -> Result<()> {
        wait_for_stream(
            &self.stream,
            self.timeout,
            "the GPU's copies did not finish",
            &|| None,
        )
        .map_err(|why| self.err(format!("{what}: {why}")))
    }

    /// The collective both calls are: this rank's `bytes`, of which destination rank d gets
    /// `regions[d]` (offset, length); returns what each rank addressed to this one, by source.
    fn exchange(
        &self,
        what: &str,
        bytes: &[u8],
        regions: &[(usize, usize)],
    ) -> Result<Vec<Vec<u8>>> {
        let me = self.meet.rank();
        let mut staging = self
            .staging
            .lock()
            .map_err(|_| self.err("the staging buffers' lock is poisoned"))?;
        let Staging { send, recv } = &mut *staging;
        // Upload (and wait: a peer copies from it as soon as it hears the address).
        let uploaded = (|| {
            let send = self.room(send, bytes.len())?;
            if !bytes.is_empty() {
                self.stream
                    .memcpy_htod(bytes, send)
                    .map_err(|e| self.err(format!("{what}: copying to the GPU: {e:?}")))?;
                self.wait(what)?;
            }
            let (addr, _record) = send.device_ptr(&self.stream);
            Ok(addr)
        })();
        let addr = match uploaded {
            Ok(a) => a,
            Err(e) => return Err(self.fail(e)),
        };
        let mut header = addr.to_le_bytes().to_vec();
        for &(off, len) in regions {
            header.extend((off as u64).to_le_bytes());
            header.extend((len as u64).to_le_bytes());
        }
        let headers = self.meet.all_gather(&header)?;
        let copied = (|| {
            let ranks = headers.len();
            let mut from = Vec::with_capacity(ranks);
            for (src, h) in headers.iter().enumerate() {
                let field = |i: usize| {
                    h.get(i * 8..i * 8 + 8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_le_bytes)
                        .ok_or_else(|| self.err(format!("{what}: rank {src} sent a short header")))
                };
                from.push((field(0)?, field(1 + 2 * me)?, field(2 + 2 * me)? as usize));
            }
            let total: usize = from.iter().map(|f| f.2).sum();
            let recv = self.room(recv, total)?;
            let mut host = vec![0u8; total];
            if total > 0 {
                let (dst, record) = recv.device_ptr(&self.stream);
                let mut at = 0u64;
                for &(peer, off, len) in &from {
                    if len > 0 {
                        // SAFETY: both addresses are live allocations of this GPU's one context
                        // (a peer keeps its send buffer until every rank passed the barrier
                        // below); [off, off + len) lies in the peer's upload, [at, at + len) in
                        // `recv`, which has room for `total`.
                        unsafe {
                            cudarc::driver::result::memcpy_dtod_async(
                                dst + at,
                                peer + off,
                                len,
                                self.stream.cu_stream(),
                            )
                        }
                        .map_err(|e| self.err(format!("{what}: a device copy: {e:?}")))?;
                    }
                    at += len as u64;
                }
                drop(record);
                self.stream
                    .memcpy_dtoh(&recv.slice(..total), &mut host)
                    .map_err(|e| self.err(format!("{what}: copying from the GPU: {e:?}")))?;
                self.wait(what)?;
            }
            let mut out = Vec::with_capacity(ranks);
            let mut at = 0;
            for &(_, _, len) in &from {
                out.push(host[at..at + len].to_vec());
                at += len;
            }
            Ok(out)
        })();
        let out = match copied {
            Ok(o) => o,
            Err(e) => return Err(self.fail(e)),
        };
        self.meet.barrier()?;
        Ok(out)
    }

    /// [`Communicator::all_to_all_v_device`]: each rank publishes its parts' send addresses and
    /// regions, copies what its peers address to it device to device, waits, and meets them once
    /// more so no send buffer is reused while a peer still copies from it.
    fn exchange_device(&self, parts: &[DeviceExchange]) -> Result<()> {
        let (me, ranks) = (self.meet.rank(), self.meet.size());
        let _one_call = self
            .staging
            .lock()
            .map_err(|_| self.err("the staging buffers' lock is poisoned"))?;
        let mut header = Vec::new();
        for p in parts {
            if let Err(why) = p.check(ranks) {
                return Err(self.fail(self.err(format!("all_to_all_v_device: {why}"))));
            }
            header.extend(p.send.to_le_bytes());
            for &(off, len) in &p.send_regions {
                header.extend((off as u64).to_le_bytes());
                header.extend((len as u64).to_le_bytes());
            }
        }
        let headers = self.meet.all_gather(&header)?;
        let copied = (|| {
            // (the raw copies below need the GPU's context current on this rank's thread)
            self.stream
                .context()
                .bind_to_thread()
                .map_err(|e| self.err(format!("binding the GPU context: {e:?}")))?;
            // (per part: the send address, then (offset, length) per destination)
            let per_part = 8 * (1 + 2 * ranks);
            for (src, h) in headers.iter().enumerate() {
                if h.len() != per_part * parts.len() {
                    return Err(self.err(format!(
                        "all_to_all_v_device: rank {src} sent {} parts' addresses, this rank {}",
                        h.len() / per_part,
                        parts.len()
                    )));
                }
                let field =
                    |i: usize| u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
                for (k, p) in parts.iter().enumerate() {
                    let at = k * (1 + 2 * ranks);
                    let (addr, off, len) = (
                        field(at),
                        field(at + 1 + 2 * me),
                        field(at + 2 + 2 * me) as usize,
                    );
                    let (dst_off, want) = p.recv_regions[src];
                    if len != want {
                        return Err(self.err(format!(
                            "all_to_all_v_device: rank {src} sends {len} bytes of part {k}, this rank expects {want}"
                        )));
                    }
                    if len > 0 {
                        // SAFETY: both addresses are live device memory of this GPU's one context:
                        // the peer's send region (kept until every rank passed the barrier below)
                        // and this rank's receive region of `len` bytes (the caller's contract).
                        unsafe {
                            cudarc::driver::result::memcpy_dtod_async(
                                p.recv + dst_off as u64,
                                addr + off,
                                len,
                                self.stream.cu_stream(),
                            )
                        }
                        .map_err(|e| {
                            self.err(format!("all_to_all_v_device: a device copy: {e:?}"))
                        })?;
                    }
                }
            }
            self.wait("all_to_all_v_device")
        })();
        if let Err(e) = copied {
            return Err(self.fail(e));
        }
        self.meet.barrier()
    }

    /// Stops the group with this rank's own error (its peers' calls then fail naming it).
    fn fail(&self, e: MoeError) -> MoeError {
        self.meet
            .abort(&format!("rank {} failed: {e}", self.meet.rank()));
        e
    }
}

impl Communicator for DeviceComm {
    fn rank(&self) -> usize {
        self.meet.rank()
    }
    fn size(&self) -> usize {
        self.meet.size()
    }
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        // one upload, the same region for every peer
        self.exchange("all_gather", mine, &vec![(0, mine.len()); self.size()])
    }
    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        if send.len() != self.size() {
            let why = format!(
                "all_to_all_v: {} buffers for {} ranks",
                send.len(),
                self.size()
            );
            return Err(self.fail(MoeError::Comm {
                rank: self.rank(),
                why,
            }));
        }
        let mut regions = Vec::with_capacity(send.len());
        let mut at = 0;
        for b in &send {
            regions.push((at, b.len()));
            at += b.len();
        }
        self.exchange("all_to_all_v", &send.concat(), &regions)
    }
    fn barrier(&self) -> Result<()> {
        // nothing to move: the meeting alone
        self.meet.barrier()
    }
    fn all_to_all_v_device(&self, parts: &[DeviceExchange]) -> Result<()> {
        self.exchange_device(parts)
    }
    fn abort(&self, why: &str) {
        self.meet.abort(why)
    }
}
