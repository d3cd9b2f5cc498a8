//! How long a split layer takes and how much of it is communication (`bench --ep/--tp --comm
//! thread|nccl`): the ranks load their slices once, then run the same call again and again, each
//! rank's collectives timed by a [`TimedComm`] around its communicator.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{
    forward_rank, guarded, join_outputs, on_rank_threads, Communicator, EpMode, Layout, RankLoader,
    Transport,
};
use crate::error::{MoeError, Result};
use crate::forward::ForwardInput;
use crate::forward::ForwardOutput;
use crate::runner::BackendChoice;
use crate::weights::MoeLayer;

/// A communicator that adds up the wall time its rank spends inside collectives (waiting for peers
/// included: that is what a rank loses to communication).
pub struct TimedComm<C> {
    inner: C,
    spent: Mutex<Duration>,
}

impl<C: Communicator> TimedComm<C> {
    pub fn new(inner: C) -> Self {
        TimedComm {
            inner,
            spent: Mutex::new(Duration::ZERO),
        }
    }
    /// The time spent in collectives since the last call, and a fresh start.
    pub fn take(&self) -> Duration {
        self.spent
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }
    fn timed<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let r = f();
        if let Ok(mut s) = self.spent.lock() {
            *s += start.elapsed();
        }
        r
    }
}

impl<C: Communicator> Communicator for TimedComm<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.timed(|| self.inner.all_gather(mine))
    }
    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        self.timed(|| self.inner.all_to_all_v(send))
    }
    fn abort(&self, why: &str) {
        self.inner.abort(why)
    }
    fn all_to_all_v_device(&self, parts: &[super::comm::DeviceExchange]) -> Result<()> {
        self.timed(|| self.inner.all_to_all_v_device(parts))
    }
}

/// One timed call of a split layer.
#[derive(Clone, Copy, Debug)]
pub struct SplitSample {
    /// From the ranks' common start to the last rank's end.
    pub wall_s: f64,
    /// The shortest time any rank spent inside collectives: the rank on the critical path (the
    /// one the others wait for) spends about that on moving data; the others' extra is waiting
    /// for it (load imbalance), not communication.
    pub comm_s: f64,
}

/// Runs `whole` over the ranks of `layout` (`choice` loads each slice where `transport` puts it),
/// a warm-up call and then `iters` timed calls of `input`; returns the warm-up call's output (the
/// ranks' outputs joined, as `forward_split` returns it) and the timed calls. Each call: rank 0 runs
/// `before_each` (the bench's cache flush) while the others wait, the ranks line up (a barrier, not
/// counted), run their share (`forward_rank`), and line up again; rank 0's clock between the two
/// barriers is the wall time, the ranks' collective times (gathered after the call) give the
/// communication.
pub fn time_split(
    whole: &MoeLayer,
    layout: &Layout,
    (choice, transport): (&BackendChoice, Transport),
    input: &ForwardInput<'_>,
    (timeout, iters): (Duration, usize),
    before_each: &(dyn Fn() + Sync),
) -> Result<(ForwardOutput, Vec<SplitSample>)> {
    crate::forward::validate_input(whole, input)?;
    let comms = transport.group(layout.ranks(), timeout)?;
    let loader = RankLoader::new(whole, layout, (choice, transport));
    let results = on_rank_threads(comms, input, |rank, comm, input| {
        let comm = TimedComm::new(comm);
        // (any failure stops the whole group at once instead of leaving peers waiting)
        guarded(&comm, || {
            let layer = loader.load(rank)?;
            let mut warm_up = None;
            let mut samples = Vec::with_capacity(iters);
            for i in 0..=iters {
                if rank == 0 {
                    before_each();
                }
                comm.barrier()?;
                comm.take();
                let start = Instant::now();
                // Device all-to-all times its calls as an engine whose tokens live on the GPU
                // would make them: the warm-up call stages the tokens and routes on the device,
                // the timed ones run again from there (docs/parallel.md, "Timing a split layer").
                let out = if i > 0 && layout.mode == EpMode::DeviceAllToAll {
                    super::forward_rank_again(&comm, &layer)?;
                    None
                } else {
                    Some(forward_rank(&comm, &layer, &input)?)
                };
                let mine = comm.take();
                comm.barrier()?;
                let wall_s = start.elapsed().as_secs_f64();
                let all = comm.all_gather(&mine.as_secs_f64().to_le_bytes())?;
                comm.take();
                let comm_s = all
                    .iter()
                    .map(|b| {
                        let bytes = b.get(..8).and_then(|b| b.try_into().ok());
                        f64::from_le_bytes(bytes.unwrap_or([0; 8]))
                    })
                    .fold(f64::INFINITY, f64::min);
                if i == 0 {
                    warm_up = out;
                } else {
                    samples.push(SplitSample { wall_s, comm_s });
                }
            }
            let out = warm_up.ok_or_else(|| MoeError::invalid("ranks", "no call ran"))?;
            Ok((out, samples))
        })
    })?;
    // rank 0's clock; every rank's warm-up output
    let mut samples = Vec::new();
    let mut outputs = Vec::with_capacity(results.len());
    for (rank, r) in results.into_iter().enumerate() {
        outputs.push(r.map(|(out, s)| {
            if rank == 0 {
                samples = s;
            }
            out
        }));
    }
    Ok((join_outputs(outputs)?, samples))
}
