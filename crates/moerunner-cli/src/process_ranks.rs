//! `run --ep/--tp … --comm process`: one process per rank, talking over TCP through rank 0
//! (`moerunner::parallel::SocketComm`, docs/parallel.md "Process ranks").
//!
//! Design decision: the first process is rank 0. It listens on a loopback port and starts the
//! other ranks as copies of itself (same arguments; their place in `MOERUNNER_RANK`,
//! `MOERUNNER_WORLD_SIZE`, `MOERUNNER_RENDEZVOUS` and a random `MOERUNNER_RANK_SECRET`). An external
//! launcher may set those variables for every process instead (rank 0 then listens on the address
//! given and starts nobody), as torchrun does. Every rank reads the layer (its slice) and the
//! input itself; the outputs are gathered and rank 0 alone writes the output file. A rank whose
//! process dies closes its sockets, which stops its peers at once; a started rank that exits before
//! joining stops rank 0's wait; on Linux a started rank dies with the process that started it.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use moerunner::parallel::{self, Communicator, RankEnv, SocketComm};
use moerunner::{ForwardInput, ForwardOutput, Runner};

/// How long rank 0 waits, once its own part is done, for the ranks it started to exit (they
/// finish the same last collective), before it kills them.
const CHILD_GRACE: Duration = Duration::from_secs(10);

/// Rank `rank`'s layer, loaded by the caller (`run`'s layer-file or checkpoint slice).
pub type LoadRank<'a> =
    dyn Fn(usize, &Runner) -> moerunner::Result<parallel::RankLayer> + Sync + 'a;

/// What this process is in a process group.
pub enum Role {
    /// Rank 0, which writes the output.
    First,
    /// Another rank: it computes its share and exits.
    Other,
}

/// Runs this process's rank of a `ranks`-rank split of `input` and returns the whole output and
/// this process's role. Starts the other ranks first unless a launcher did (`MOERUNNER_RANK`).
/// With `nccl`, rank r computes on GPU r (modulo the GPUs it sees) and the ranks talk through
/// NCCL, the sockets kept as the watchdog.
pub fn run(
    ranks: usize,
    nccl: bool,
    input: &ForwardInput<'_>,
    timeout: Duration,
    load: &LoadRank<'_>,
) -> anyhow::Result<(ForwardOutput, Role)> {
    let env = RankEnv::from_env().context("the rank environment")?;
    if let Some(env) = &env {
        if env.world_size != ranks {
            anyhow::bail!(
                "{} is {} but --ep/--tp make {ranks} ranks",
                RankEnv::WORLD_SIZE,
                env.world_size
            );
        }
    }
    let mut started = Vec::new();
    let comm = match env {
        Some(env) => env.connect(timeout)?,
        None => {
            let listener =
                TcpListener::bind("127.0.0.1:0").context("listening for the other ranks")?;
            let addr = listener.local_addr()?;
            let secret = RandomState::new().build_hasher().finish();
            for rank in 1..ranks {
                started.push((rank, start_rank(rank, ranks, &addr.to_string(), secret)?));
            }
            SocketComm::host_watching(listener, ranks, secret, timeout, || {
                exited(&mut started).map(|(r, status)| {
                    format!("rank {r}'s process exited ({status}) before joining")
                })
            })?
        }
    };
    let rank = comm.rank();
    let socket = Arc::new(comm);
    let (comm, runner): (Box<dyn Communicator>, Runner) = if nccl {
        let (comm, gpu) = nccl_rank(socket.clone(), timeout)?;
        (comm, Runner::on_gpu(gpu))
    } else {
        (Box::new(socket.clone()), Runner::new())
    };
    let out = parallel::guarded(&comm, || load(rank, &runner))
        .and_then(|layer| parallel::forward_rank_whole(&comm, &layer, input));
    // Closing this rank's sockets is what tells a peer still waiting that it is gone.
    drop(comm);
    drop(socket);
    let children = reap(&mut started, out.is_ok());
    let out = out?;
    children?;
    Ok((out, if rank == 0 { Role::First } else { Role::Other }))
}

/// This rank's NCCL communicator on GPU `rank mod GPUs`, and that GPU.
#[cfg(feature = "cuda")]
fn nccl_rank(
    socket: Arc<SocketComm>,
    timeout: Duration,
) -> anyhow::Result<(Box<dyn Communicator>, usize)> {
    let gpus = parallel::Transport::NcclProcesses
        .max_ranks()
        .context("--comm nccl-process")?;
    let gpu = socket.rank() % gpus.max(1);
    let comm = parallel::nccl::NcclComm::over_processes(socket, gpu, timeout)?;
    Ok((Box::new(comm), gpu))
}

#[cfg(not(feature = "cuda"))]
fn nccl_rank(_: Arc<SocketComm>, _: Duration) -> anyhow::Result<(Box<dyn Communicator>, usize)> {
    anyhow::bail!("--comm nccl-process needs the `cuda` feature, which this build lacks")
}

/// Starts rank `rank` as a copy of this process.
fn start_rank(rank: usize, size: usize, addr: &str, secret: u64) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("finding this program to start the other ranks")?;
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env(RankEnv::RANK, rank.to_string())
        .env(RankEnv::WORLD_SIZE, size.to_string())
        .env(RankEnv::RENDEZVOUS, addr)
        .env(RankEnv::SECRET, secret.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    die_with_parent(&mut cmd);
    cmd.spawn()
        .with_context(|| format!("starting rank {rank}'s process"))
}

#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_: &mut Command) {}

/// The first started rank that has exited, with its status.
fn exited(started: &mut [(usize, Child)]) -> Option<(usize, std::process::ExitStatus)> {
    started
        .iter_mut()
        .find_map(|(r, c)| c.try_wait().ok().flatten().map(|s| (*r, s)))
}

/// Waits (at most [`CHILD_GRACE`]) for the started ranks to exit, then kills any left. When this
/// rank succeeded, a started rank that failed is an error.
fn reap(started: &mut [(usize, Child)], this_rank_ok: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + CHILD_GRACE;
    let mut failed = Vec::new();
    for (rank, child) in started.iter_mut() {
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        match status {
            Some(s) if s.success() => {}
            Some(s) => failed.push(format!("rank {rank}'s process exited with {s}")),
            None => failed.push(format!(
                "rank {rank}'s process was still running {CHILD_GRACE:?} after rank 0 finished \
                 and was killed"
            )),
        }
    }
    if this_rank_ok && !failed.is_empty() {
        anyhow::bail!("{}", failed.join("; "));
    }
    Ok(())
}
