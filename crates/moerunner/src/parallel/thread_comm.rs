//! [`ThreadComm`]: R ranks as threads of one process, exchanging host buffers through shared
//! memory guarded by one mutex and condition variable.
//!
//! Design decision: collectives are numbered per rank (every rank calls them in the same order),
//! and call n of every rank meets in round n of a shared table: each rank deposits its buffers,
//! waits until all R have, takes what is addressed to it, and the last to leave removes the round.
//! Rounds are keyed by number, so a fast rank may deposit into round n + 1 while a slow one still
//! reads round n. Failure is shared state too: `abort` (or a rank thread that panics, through
//! `Drop`) poisons the group and wakes every waiter; every wait is bounded by the group's timeout.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::comm::Communicator;
use crate::error::{MoeError, Result};

/// One call's meeting point: what each rank deposited (per destination rank), and how many
/// ranks have yet to take their part.
struct Round {
    op: &'static str,
    deposits: Vec<Option<Arc<Vec<Vec<u8>>>>>,
    readers_left: usize,
}

#[derive(Default)]
struct State {
    rounds: HashMap<u64, Round>,
    /// Why the group stopped (the first abort's message), if it did.
    poisoned: Option<String>,
}

struct Group {
    size: usize,
    timeout: Duration,
    state: Mutex<State>,
    wake: Condvar,
}

/// One rank of an in-process group; see [`ThreadComm::group`].
pub struct ThreadComm {
    rank: usize,
    group: Arc<Group>,
    /// The number of this rank's next collective.
    next: Mutex<u64>,
}

impl ThreadComm {
    /// A group of `size` ranks (hand one to each thread); a collective that waits longer than
    /// `timeout` for its peers fails (and stops the group).
    pub fn group(size: usize, timeout: Duration) -> Result<Vec<ThreadComm>> {
        if size == 0 {
            return Err(MoeError::invalid(
                "ranks",
                "a group needs at least one rank",
            ));
        }
        let group = Arc::new(Group {
            size,
            timeout,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        Ok((0..size)
            .map(|rank| ThreadComm {
                rank,
                group: group.clone(),
                next: Mutex::new(0),
            })
            .collect())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; the poisoned flag of our own
        // state (set through `Drop`) is what stops the group.
        self.group
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn stopped(&self, op: &str, why: &str) -> MoeError {
        MoeError::Comm {
            rank: self.rank,
            why: format!("{op} stopped: {why}"),
        }
    }

    /// Deposits `send` (one buffer per destination rank) into this rank's next round, waits for
    /// every rank's, and returns `pick(deposits)`.
    fn exchange<T>(
        &self,
        op: &'static str,
        send: Vec<Vec<u8>>,
        pick: impl Fn(&[Arc<Vec<Vec<u8>>>]) -> T,
    ) -> Result<T> {
        let n = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            *next += 1;
            *next - 1
        };
        let size = self.group.size;
        let mut state = self.lock();
        if let Some(why) = &state.poisoned {
            return Err(self.stopped(op, why));
        }
        let round = state.rounds.entry(n).or_insert_with(|| Round {
            op,
            deposits: vec![None; size],
            readers_left: size,
        });
        if round.op != op {
            let why = format!(
                "rank {} called {op} as collective #{n} where another rank called {}",
                self.rank, round.op
            );
            drop(state);
            self.abort(&why);
            return Err(MoeError::Comm {
                rank: self.rank,
                why,
            });
        }
        round.deposits[self.rank] = Some(Arc::new(send));
        self.group.wake.notify_all();
        let deadline = Instant::now() + self.group.timeout;
        loop {
            if let Some(why) = &state.poisoned {
                return Err(self.stopped(op, why));
            }
            let ready: Option<Vec<Arc<Vec<Vec<u8>>>>> = state
                .rounds
                .get(&n)
                .and_then(|r| r.deposits.iter().cloned().collect());
            if let Some(deposits) = ready {
                let out = pick(&deposits);
                if let Some(r) = state.rounds.get_mut(&n) {
                    r.readers_left -= 1;
                    if r.readers_left == 0 {
                        state.rounds.remove(&n);
                    }
                }
                return Ok(out);
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = state
                    .rounds
                    .get(&n)
                    .map(|r| (0..size).filter(|&s| r.deposits[s].is_none()).collect())
                    .unwrap_or_default();
                let why = format!(
                    "rank {} timed out after {:?} in {op} (collective #{n}) waiting for ranks {missing:?}",
                    self.rank, self.group.timeout
                );
                state.poisoned.get_or_insert(why.clone());
                self.group.wake.notify_all();
                return Err(MoeError::Comm {
                    rank: self.rank,
                    why,
                });
            }
            state = self
                .group
                .wake
                .wait_timeout(state, deadline - now)
                .map(|(s, _)| s)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.group.size
    }
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.exchange("all_gather", vec![mine.to_vec()], |d| {
            d.iter().map(|s| s[0].clone()).collect()
        })
    }
    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        if send.len() != self.group.size {
            let why = format!(
                "all_to_all_v: {} buffers for {} ranks",
                send.len(),
                self.group.size
            );
            self.abort(&format!("rank {} failed: {why}", self.rank));
            return Err(MoeError::Comm {
                rank: self.rank,
                why,
            });
        }
        let me = self.rank;
        self.exchange("all_to_all_v", send, |d| {
            d.iter().map(|s| s[me].clone()).collect()
        })
    }
    fn abort(&self, why: &str) {
        let mut state = self.lock();
        state.poisoned.get_or_insert_with(|| why.to_string());
        self.group.wake.notify_all();
    }
}

impl Drop for ThreadComm {
    /// A rank thread that panics stops its peers at once instead of leaving them to time out.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.abort(&format!("rank {} panicked", self.rank));
        }
    }
}
