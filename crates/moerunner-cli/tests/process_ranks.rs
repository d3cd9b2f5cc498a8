//! `run --comm process`: ranks as separate processes over loopback TCP (docs/parallel.md, "Process
//! ranks"). The split equals the thread split bit for bit, and a rank whose process is killed
//! mid-run stops its peers with an error naming it, in bounded time (the two-GPU issue's third
//! item, on CPU ranks: the same process model NCCL ranks will use).

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{bin, make_input, make_layer, ok, TempDir};
use moerunner::layer_file;
use moerunner::parallel::{self, Communicator, EpMode, Layout, RankEnv, SocketComm};
use moerunner::{BackendChoice, ForwardInput, Runner};

/// The small mxfp4 layer of the CLI tests and `tokens` rows of f32 input for it.
fn make_files(dir: &TempDir, tokens: usize) -> (String, String) {
    let layer = make_layer(
        dir,
        "l.safetensors",
        &["--weight-format", "mxfp4", "--seed", "3"],
    );
    let extra = ["--dtype", "f32", "--seed", "5"];
    let input = make_input(dir, &layer, "in.safetensors", tokens, &extra);
    (layer, input)
}

fn output_bytes(path: &str) -> Vec<u8> {
    layer_file::read_output(Path::new(path)).unwrap().0.bytes[..].to_vec()
}

#[test]
fn process_ranks_equal_thread_ranks_bit_for_bit() {
    let dir = TempDir::new("process-ranks");
    for tokens in [0, 1, 37] {
        let (layer, input) = make_files(&dir, tokens);
        for split in [
            &["--ep", "2"][..],
            &["--ep", "3", "--expert-map", "0,0,0,0,0,1,1,2"],
            &["--tp", "2"],
            &["--ep", "2", "--tp", "2"],
        ] {
            let mut outs = Vec::new();
            for comm in ["thread", "process"] {
                let out = dir.s(&format!("{comm}.safetensors"));
                let base = [
                    "run",
                    "--layer",
                    &layer,
                    "--input",
                    &input,
                    "--output",
                    &out,
                    "--backend",
                    "cpu",
                    "--comm",
                    comm,
                ];
                let text = ok(&[&base[..], split].concat());
                assert!(text.contains(&format!("ranks through {comm}")), "{text}");
                outs.push(output_bytes(&out));
            }
            assert_eq!(outs[0], outs[1], "{split:?} T={tokens}");
        }
    }
}

/// Rank `rank` of 2 as a `moerunner run --ep 2 --comm process` process placed by the environment
/// (as an external launcher starts it), rank 0 listening at `addr`.
fn launched_rank(dir: &TempDir, rank: usize, addr: &str, secret: u64) -> Child {
    rank_command(dir, rank, "2", addr)
        .env(RankEnv::SECRET, secret.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `moerunner run --ep 2 --comm process` on the test's files, as rank `rank` of `world`.
fn rank_command(dir: &TempDir, rank: usize, world: &str, addr: &str) -> std::process::Command {
    let mut cmd = process_run(dir, "2");
    cmd.env(RankEnv::RANK, rank.to_string())
        .env(RankEnv::WORLD_SIZE, world)
        .env(RankEnv::RENDEZVOUS, addr);
    cmd
}

/// `moerunner run --ep EP --comm process` on the test's files (CPU backend, a 120 s timeout).
fn process_run(dir: &TempDir, ep: &str) -> std::process::Command {
    let (layer, input, out) = (
        dir.s("l.safetensors"),
        dir.s("in.safetensors"),
        dir.s("o.safetensors"),
    );
    let mut cmd = bin();
    cmd.args([
        "run",
        "--layer",
        &layer,
        "--input",
        &input,
        "--output",
        &out,
        "--backend",
        "cpu",
        "--ep",
        ep,
        "--comm",
        "process",
        "--comm-timeout-s",
        "120",
    ]);
    cmd
}

/// This test's own rank of the 2-rank EP split: the layer's slice and the whole input.
fn own_rank(
    dir: &TempDir,
    rank: usize,
    comm: &SocketComm,
) -> moerunner::Result<moerunner::ForwardOutput> {
    let whole = layer_file::read_layer(&dir.path("l.safetensors")).unwrap();
    let input = layer_file::read_input(&dir.path("in.safetensors")).unwrap();
    let layout = Layout::even(whole.config().num_experts, 2, 1, EpMode::AllToAll).unwrap();
    let layer = parallel::RankLayer::load(
        &whole,
        &layout,
        rank,
        &Runner::new(),
        &BackendChoice::Named("cpu".into()),
    )
    .unwrap();
    parallel::forward_rank_whole(
        comm,
        &layer,
        &ForwardInput {
            hidden: &input.hidden,
            routing: input.routing_input(),
        },
    )
}

#[test]
fn a_rank_launched_by_a_launcher_computes_with_this_one() {
    let dir = TempDir::new("process-launched");
    let (layer, input) = make_files(&dir, 37);
    let whole = dir.s("whole.safetensors");
    ok(&[
        "run",
        "--layer",
        &layer,
        "--input",
        &input,
        "--output",
        &whole,
        "--backend",
        "cpu",
    ]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut child = launched_rank(&dir, 1, &addr, 99);
    let comm = SocketComm::host(listener, 2, 99, Duration::from_secs(60)).unwrap();
    let out = own_rank(&dir, 0, &comm).unwrap();
    drop(comm);
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "{}",
        String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr)
    );
    // All-to-all EP over processes is the unsplit CPU output, as over threads.
    assert_eq!(&out.output.bytes[..], &output_bytes(&whole)[..]);
}

#[test]
fn a_killed_rank_process_stops_its_peer_at_once_naming_it() {
    let dir = TempDir::new("process-killed");
    make_files(&dir, 37);
    // The launched process is rank 1: killed once it has joined (loading or waiting in its first
    // collective), this rank's forward stops with rank 1 named.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let child = launched_rank(&dir, 1, &addr, 5);
    let comm = SocketComm::host(listener, 2, 5, Duration::from_secs(120)).unwrap();
    kill_then_run(&dir, child, &comm, 1);

    // The launched process is rank 0 (listening on a port this test chose): killed after this
    // rank joined, this rank's forward stops with rank 0 named.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let child = launched_rank(&dir, 0, &port, 6);
    let comm = SocketComm::join(port.as_str(), 1, 2, 6, Duration::from_secs(120)).unwrap();
    kill_then_run(&dir, child, &comm, 0);
}

/// Kills the launched rank `dead` (SIGKILL; it must still be running), then runs this test's rank
/// of the split: it must fail within 10 s, naming the dead rank.
fn kill_then_run(dir: &TempDir, mut child: Child, comm: &SocketComm, dead: usize) {
    assert!(
        child.try_wait().unwrap().is_none(),
        "rank {dead} exited before it was killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let started = Instant::now();
    let me = comm.rank();
    let err = own_rank(dir, me, comm).unwrap_err().to_string();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.starts_with(&format!("rank {me}: "))
            && err.contains(&format!("rank {dead}'s connection closed")),
        "{err}"
    );
}

#[test]
fn the_process_that_writes_the_output_reports_a_peer_that_died() {
    let dir = TempDir::new("process-peer-died");
    make_files(&dir, 37);
    // `moerunner run` is rank 0; this test joins as rank 1 and vanishes without a word (its
    // sockets close as a killed process's do). Rank 0 exits 1 naming rank 1, well before its
    // 120 s timeout, and writes no output.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let child = launched_rank(&dir, 0, &port, 8);
    let started = Instant::now();
    let comm = SocketComm::join(port.as_str(), 1, 2, 8, Duration::from_secs(120)).unwrap();
    drop(comm);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error:") && stderr.contains("rank 1's connection closed"),
        "{stderr}"
    );
    assert!(!dir.path("o.safetensors").exists());
}

#[test]
fn a_wrong_rank_environment_is_refused() {
    let dir = TempDir::new("process-env");
    make_files(&dir, 3);
    let run = |world: &str| {
        let o = rank_command(&dir, 1, world, "127.0.0.1:9")
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = run("3");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("MOERUNNER_WORLD_SIZE is 3") && err.contains("2 ranks"),
        "{err}"
    );
    let (code, err) = run("x");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("MOERUNNER_WORLD_SIZE") && err.contains("not a number"),
        "{err}"
    );
}

/// The ranks `run --comm process` starts do not outlive it: with rank 0's process killed (SIGKILL,
/// no chance to clean up) while its ranks wait for it, they are gone within seconds — they die with
/// it (`PR_SET_PDEATHSIG` on Linux) or see its sockets close.
#[cfg(target_os = "linux")]
#[test]
fn started_ranks_die_with_the_process_that_started_them() {
    let dir = TempDir::new("process-orphans");
    make_files(&dir, 37);
    let mut parent = process_run(&dir, "3")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Stopped at once, so that its ranks are left waiting for it (they join its listener and wait
    // for the answer it will never give).
    let pid = parent.id();
    let signal = |sig: &str, pid: u32| {
        std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let children = loop {
        let found = children_of(pid);
        if found.len() == 2 {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "rank 0 did not start 2 ranks: {found:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(signal("-STOP", pid).success());
    assert!(children.iter().all(|&c| alive(c)), "{children:?}");
    parent.kill().unwrap();
    parent.wait().unwrap();
    let killed = Instant::now();
    while children.iter().any(|&c| alive(c)) {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "ranks {children:?} outlived rank 0 by 10 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!dir.path("o.safetensors").exists());
}

/// The processes whose parent is `pid` (from /proc).
#[cfg(target_os = "linux")]
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| stat(p).is_some_and(|(_, ppid)| ppid == pid))
        .collect()
}

/// A process's state letter and parent, from /proc/PID/stat.
#[cfg(target_os = "linux")]
fn stat(pid: u32) -> Option<(char, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid …": comm may hold spaces and parentheses; the state follows the last ')'
    let rest = &s[s.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    Some((state, fields.next()?.parse().ok()?))
}

/// Whether `pid` still runs (a zombie, dead but not yet reaped, does not).
#[cfg(target_os = "linux")]
fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}
