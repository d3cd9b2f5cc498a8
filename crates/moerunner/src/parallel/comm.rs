//! The collectives a parallel forward pass needs, behind one trait.
//!
//! Design decision: every operation is a collective over host byte buffers that every rank calls
//! in the same order, returns `Result`, and fails instead of hanging: a rank that fails calls
//! [`Communicator::abort`], which makes every pending and later call of every rank return an
//! error naming it, and a call waits for its peers at most a bounded time. Sums are over f32 in
//! rank order (0, 1, …, R−1), whatever the implementation, so a parallel run is deterministic.
//!
//! Seam for device buffers: the trait's buffers are host slices, whatever moves them — host memory
//! between threads ([`super::thread_comm::ThreadComm`]), NCCL between GPUs (`nccl::NcclComm`), or
//! device-to-device copies between ranks sharing one GPU (`device_comm::DeviceComm`); the two GPU
//! ones stage the host bytes through device memory for each call: ranks that compute through a
//! backend's host entry hold host tensors. Ranks that compute through the GPU's device entry
//! (device all-to-all, `device_ep`) move device memory with [`Communicator::all_to_all_v_device`],
//! added beside these with the same ordering and failure rules (NCCL and `DeviceComm` implement it;
//! the host transports refuse it).

use std::sync::Arc;

use crate::error::{MoeError, Result};

/// One rank's end of a group of `size()` ranks.
pub trait Communicator: Send + Sync {
    /// This rank, `0..size()`.
    fn rank(&self) -> usize;
    /// How many ranks the group has.
    fn size(&self) -> usize;
    /// Every rank's `mine`, indexed by rank.
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Sends `send[d]` to rank `d` (any length, empty included: the per-peer counts travel with
    /// the buffers) and returns what each rank sent to this one, indexed by source rank.
    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>>;
    /// Waits until every rank has called it.
    fn barrier(&self) -> Result<()> {
        self.all_gather(&[]).map(|_| ())
    }
    /// Makes every rank's pending and later calls fail with `why` (which names this rank); for
    /// a rank that cannot go on. Never blocks.
    fn abort(&self, why: &str);

    /// [`Self::all_to_all_v`] on device memory, for ranks that compute on the GPU
    /// (`parallel::device_ep`): every part of `parts` moves at once, and the call returns when this
    /// rank's `recv` regions hold what its peers sent. The caller's writes to its `send` buffers
    /// must be complete (its stream synchronized) before the call, and every rank's region for a
    /// peer must have the length that peer expects (the lengths travel first, through
    /// [`Self::all_to_all_v`]). The transports that move host bytes refuse it.
    fn all_to_all_v_device(&self, parts: &[DeviceExchange]) -> Result<()> {
        let _ = parts;
        Err(MoeError::Comm {
            rank: self.rank(),
            why: "this transport moves host buffers only: device all-to-all needs the device or \
                  nccl transport (--comm device|nccl)"
                .into(),
        })
    }

    /// The element-wise sum over ranks of `data` (same length on every rank), added in rank
    /// order: `((d_0 + d_1) + d_2) + …`, starting from `d_0` (so one rank gives its data back
    /// bit for bit).
    fn all_reduce_sum(&self, data: &[f32]) -> Result<Vec<f32>> {
        let parts = self.all_gather(&f32_bytes(data))?;
        sum_in_rank_order(self.rank(), &parts, 0..data.len(), data.len())
    }
    /// The element-wise sum over ranks of `data` (same length on every rank), of which this rank
    /// keeps its piece: rank `r` gets elements `[Σ_{s<r} counts[s], Σ_{s≤r} counts[s])`, added in
    /// rank order like [`Self::all_reduce_sum`].
    fn reduce_scatter_sum(&self, data: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        let (me, size) = (self.rank(), self.size());
        let total: usize = counts.iter().sum();
        if counts.len() != size || total != data.len() {
            let why = format!(
                "reduce_scatter: {} counts summing to {total} for {size} ranks and {} elements",
                counts.len(),
                data.len()
            );
            self.abort(&format!("rank {me} failed: {why}"));
            return Err(MoeError::Comm { rank: me, why });
        }
        let start: usize = counts[..me].iter().sum();
        // NOTE: the generic form moves every rank's whole buffer (all-gather); a real
        // reduce-scatter (NCCL) moves 1/R of it per rank, with the same sums.
        let parts = self.all_gather(&f32_bytes(data))?;
        sum_in_rank_order(me, &parts, start..start + counts[me], data.len())
    }
}

/// A boxed communicator is one (a split's ranks whose transport is chosen at run time:
/// `Transport::group`), and so is a shared one (a process rank's sockets, which an NCCL rank
/// also holds as its watchdog).
macro_rules! delegate_communicator {
    ($($ptr:ident),*) => {$(
        impl<C: Communicator + ?Sized> Communicator for $ptr<C> {
            fn rank(&self) -> usize {
                (**self).rank()
            }
            fn size(&self) -> usize {
                (**self).size()
            }
            fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
                (**self).all_gather(mine)
            }
            fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
                (**self).all_to_all_v(send)
            }
            fn abort(&self, why: &str) {
                (**self).abort(why)
            }
            fn all_to_all_v_device(&self, parts: &[DeviceExchange]) -> Result<()> {
                (**self).all_to_all_v_device(parts)
            }
        }
    )*};
}
delegate_communicator!(Box, Arc);

/// One buffer of a device all-to-all ([`Communicator::all_to_all_v_device`]): this rank's device
/// memory at `send`, of which rank d gets bytes `send_regions[d]` (offset, length), and at `recv`,
/// into which rank s's bytes for this one go at `recv_regions[s]`. Addresses are on the rank's own
/// GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceExchange {
    pub send: u64,
    pub send_regions: Vec<(usize, usize)>,
    pub recv: u64,
    pub recv_regions: Vec<(usize, usize)>,
}

impl DeviceExchange {
    /// The part's regions, checked against a group of `ranks`: one per rank, each inside
    /// `u64` addresses.
    pub fn check(&self, ranks: usize) -> std::result::Result<(), String> {
        for (name, regions, base) in [
            ("send", &self.send_regions, self.send),
            ("recv", &self.recv_regions, self.recv),
        ] {
            if regions.len() != ranks {
                return Err(format!(
                    "{} {name} regions for {ranks} ranks",
                    regions.len()
                ));
            }
            for &(off, len) in regions {
                let end = (off as u64).checked_add(len as u64);
                if end.and_then(|e| base.checked_add(e)).is_none() {
                    return Err(format!(
                        "a {name} region of {len} bytes at {off} overflows the address space"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// f32 values as little-endian bytes.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Little-endian bytes as f32 values (the length must be a multiple of 4).
pub fn f32_from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Elements `range` of the sum of every rank's `len` f32 values, in rank order.
fn sum_in_rank_order(
    me: usize,
    parts: &[Vec<u8>],
    range: std::ops::Range<usize>,
    len: usize,
) -> Result<Vec<f32>> {
    if let Some(r) = parts.iter().position(|p| p.len() != len * 4) {
        return Err(MoeError::Comm {
            rank: me,
            why: format!(
                "a sum over ranks got {} bytes from rank {r}, expected {} ({len} f32)",
                parts[r].len(),
                len * 4
            ),
        });
    }
    let (a, b) = (range.start * 4, range.end * 4);
    let mut acc = f32_from_bytes(parts.first().map_or(&[][..], |p| &p[a..b]));
    for p in parts.iter().skip(1) {
        for (x, y) in acc.iter_mut().zip(f32_from_bytes(&p[a..b])) {
            *x += y;
        }
    }
    Ok(acc)
}
