//! [`SocketComm`]: ranks as separate processes (or anything that can reach one TCP address),
//! talking over TCP through a hub, rank 0.
//!
//! Design decision: a star, not a mesh. Rank 0 listens; every other rank connects once and says
//! who it is (`hello`: a magic, the group's secret, its rank and the group size). A collective is
//! one frame from each rank to the hub and one frame back: the hub reads its peers in rank order,
//! arranges what each rank is owed and writes it back. The bytes cross the hub twice, which a CPU
//! rank does not notice; what this transport is for is the process model — a rank's death is a
//! closed socket, seen at once by whoever waits on it (`recv` returns end of file), so a killed
//! process stops its peers in bounded time without any heartbeat. The hub relays the first
//! failure it learns of (an abort, a closed connection, a timeout) to every other rank as an
//! `abort` frame naming the rank, and every wait is bounded by the group's timeout. (Rank 0 reads
//! its peers in rank order, so a rank that died while a lower one still computes is seen once that
//! one's frame has come: later, never unboundedly.)
//!
//! Frames (little-endian): `1` data — u64 collective number, u8 operation, u32 buffer count, then
//! per buffer u64 length and the bytes; `2` abort — u32 length and the UTF-8 reason. A frame's
//! buffer count must be the one its operation needs and no buffer may claim more than
//! [`MAX_BUFFER`] bytes; a buffer is read as its bytes arrive, so a hostile length allocates
//! nothing it was not sent.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::comm::Communicator;
use crate::error::{MoeError, Result};

/// The first bytes a joining rank sends.
const MAGIC: &[u8; 8] = b"MOERANK\x01";
/// The most bytes one buffer of one frame may carry (1 TiB: a guard against a corrupt length,
/// far above any layer's message).
pub const MAX_BUFFER: u64 = 1 << 40;
/// The longest abort reason relayed (longer ones are cut).
const MAX_REASON: usize = 1 << 16;
const DATA: u8 = 1;
const ABORT: u8 = 2;
const ACCEPTED: u8 = 1;
const REFUSED: u8 = 2;
/// The longest a connection may take to introduce itself: one that sends a partial hello cannot
/// hold up the ranks joining behind it for longer.
const HELLO_WAIT: Duration = Duration::from_secs(2);
/// How long an abort may spend writing its frame to a peer (abort never blocks for longer).
const ABORT_WRITE: Duration = Duration::from_millis(200);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    AllGather = 0,
    AllToAllV = 1,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllGather => "all_gather",
            Op::AllToAllV => "all_to_all_v",
        }
    }
}

/// One rank's end of a group of processes; see the module's documentation.
pub struct SocketComm {
    rank: usize,
    size: usize,
    timeout: Duration,
    /// Rank 0: the stream of rank r at index r − 1; any other rank: its stream to rank 0.
    links: Mutex<Links>,
    /// Clones of the streams, so that `abort` can shut them without waiting for a collective
    /// that holds `links`.
    shutters: Vec<TcpStream>,
    /// Why the group stopped, if it did (the first reason this rank learned).
    poisoned: Mutex<Option<String>>,
}

struct Links {
    streams: Vec<TcpStream>,
    /// The number of this rank's next collective.
    next: u64,
}

/// Why a read or write on a peer's link failed.
enum LinkError {
    /// The peer sent an abort frame with this reason.
    Aborted(String),
    /// No frame within the group's timeout.
    TimedOut,
    /// The connection closed or broke (the peer's process exited or was killed).
    Closed(String),
    /// The peer sent something this protocol does not allow.
    Malformed(String),
}

impl SocketComm {
    /// Rank 0 of a group of `size` ranks: accepts the other `size − 1` on `listener` (each must
    /// present `secret`), waiting at most `timeout` for all of them, then answers every one.
    pub fn host(
        listener: TcpListener,
        size: usize,
        secret: u64,
        timeout: Duration,
    ) -> Result<SocketComm> {
        Self::host_watching(listener, size, secret, timeout, || None)
    }

    /// [`Self::host`], calling `watch` between connection attempts: a reason it returns (a
    /// launched rank's process that exited before joining) stops the wait at once.
    pub fn host_watching(
        listener: TcpListener,
        size: usize,
        secret: u64,
        timeout: Duration,
        mut watch: impl FnMut() -> Option<String>,
    ) -> Result<SocketComm> {
        check_size(size)?;
        let setup = |why: String| MoeError::Comm { rank: 0, why };
        listener
            .set_nonblocking(true)
            .map_err(|e| setup(format!("listening for ranks: {e}")))?;
        let deadline = Instant::now() + timeout;
        let mut joined: Vec<Option<TcpStream>> = (1..size).map(|_| None).collect();
        while joined.iter().any(Option::is_none) {
            if let Some(why) = watch() {
                return Err(setup(format!("waiting for ranks to join: {why}")));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (1..size).filter(|&r| joined[r - 1].is_none()).collect();
                return Err(setup(format!(
                    "ranks {missing:?} did not join within {timeout:?} (listening on {})",
                    listener
                        .local_addr()
                        .map_or("?".to_string(), |a| a.to_string())
                )));
            }
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(setup(format!("accepting a rank: {e}"))),
            };
            // A connection that is not a rank of this group (another program, a wrong secret or
            // size, a rank already present) is answered with the reason and dropped; the group
            // keeps waiting for its real ranks.
            match read_hello(&mut stream, (deadline - now).min(HELLO_WAIT), secret, size) {
                Ok(r) if joined[r - 1].is_none() => joined[r - 1] = Some(stream),
                Ok(r) => send_reason(&stream, REFUSED, &format!("rank {r} has already joined")),
                Err(why) => send_reason(&stream, REFUSED, &why),
            }
        }
        let mut streams: Vec<TcpStream> = joined.into_iter().flatten().collect();
        for (i, s) in streams.iter_mut().enumerate() {
            let answered = s
                .set_nonblocking(false)
                .and_then(|_| s.set_nodelay(true))
                .and_then(|_| s.write_all(&[ACCEPTED]));
            answered.map_err(|e| setup(format!("answering rank {}: {e}", i + 1)))?;
        }
        Self::new(0, size, timeout, streams)
    }

    /// Rank `rank` (1 ≤ rank < size) joining the group whose rank 0 listens at `addr`: connects
    /// (retrying until rank 0 listens, at most `timeout`), presents `secret` and waits to be
    /// accepted, which happens once every rank has joined.
    pub fn join(
        addr: impl ToSocketAddrs,
        rank: usize,
        size: usize,
        secret: u64,
        timeout: Duration,
    ) -> Result<SocketComm> {
        check_size(size)?;
        let setup = |why: String| MoeError::Comm { rank, why };
        if rank == 0 || rank >= size {
            return Err(setup(format!(
                "a joining rank must be 1..{size} (rank 0 hosts the group)"
            )));
        }
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| setup(format!("the rendezvous address: {e}")))?
            .collect();
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            let tried = addrs
                .iter()
                .find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(1)).ok());
            if let Some(s) = tried {
                break s;
            }
            if Instant::now() >= deadline {
                return Err(setup(format!(
                    "rank 0 did not answer at {addrs:?} within {timeout:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&secret.to_le_bytes());
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(size as u32).to_le_bytes());
        stream
            .set_nodelay(true)
            .and_then(|_| stream.write_all(&hello))
            .map_err(|e| setup(format!("introducing itself to rank 0: {e}")))?;
        // Accepted only once every rank has joined: the wait is the group's start-up.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| setup(e.to_string()))?;
        let mut answer = [0u8];
        stream.read_exact(&mut answer).map_err(|e| {
            setup(format!(
                "rank 0 did not accept this rank within {timeout:?}: {e}"
            ))
        })?;
        match answer[0] {
            ACCEPTED => Self::new(rank, size, timeout, vec![stream]),
            REFUSED => {
                let why = read_reason(&mut stream).unwrap_or_else(|_| "no reason given".into());
                Err(setup(format!("rank 0 refused this rank: {why}")))
            }
            other => Err(setup(format!(
                "rank 0 answered {other}, not a known answer"
            ))),
        }
    }

    fn new(rank: usize, size: usize, timeout: Duration, streams: Vec<TcpStream>) -> Result<Self> {
        let shutters = streams
            .iter()
            .map(TcpStream::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| MoeError::Comm {
                rank,
                why: format!("cloning a rank's socket: {e}"),
            })?;
        for s in &streams {
            s.set_write_timeout(Some(timeout))
                .map_err(|e| MoeError::Comm {
                    rank,
                    why: e.to_string(),
                })?;
        }
        Ok(SocketComm {
            rank,
            size,
            timeout,
            links: Mutex::new(Links { streams, next: 0 }),
            shutters,
            poisoned: Mutex::new(None),
        })
    }

    fn poisoned(&self) -> Option<String> {
        self.poisoned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn poison(&self, why: &str) -> String {
        self.poisoned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| why.to_string())
            .clone()
    }

    fn stopped(&self, op: Op, why: &str) -> MoeError {
        MoeError::Comm {
            rank: self.rank,
            why: format!("{} stopped: {why}", op.name()),
        }
    }

    /// One collective: `send[d]` is what goes to rank d (all-gather: one buffer for everyone);
    /// returns what every rank sent to this one, indexed by source.
    fn exchange(&self, op: Op, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        if let Some(why) = self.poisoned() {
            return Err(self.stopped(op, &why));
        }
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let n = links.next;
        links.next += 1;
        let result = if self.rank == 0 {
            self.hub_round(&mut links.streams, op, n, send)
        } else {
            self.spoke_round(&mut links.streams[0], op, n, send)
        };
        drop(links);
        result.map_err(|why| {
            let why = self.poison(&why);
            if self.rank == 0 {
                // Every other rank hears it (they may be waiting for this round's answer).
                self.relay_abort(&why);
            }
            self.stopped(op, &why)
        })
    }

    /// Whether the group has stopped, asked without waiting — for a group whose sockets only
    /// watch while the data moves elsewhere (NCCL ranks of several processes): a peer whose
    /// connection closed, or an abort frame (the only frame that travels while they watch).
    /// Rank 0 relays what it finds to every other rank. None while a collective of this rank is
    /// in flight (that collective will see it).
    pub fn peer_gone(&self) -> Option<String> {
        if let Some(why) = self.poisoned() {
            return Some(why);
        }
        let found = {
            let Ok(mut links) = self.links.try_lock() else {
                return None;
            };
            let rank = self.rank;
            links.streams.iter_mut().enumerate().find_map(|(i, s)| {
                let peer = if rank == 0 { i + 1 } else { 0 };
                watch_link(s, peer)
            })
        }?;
        let why = self.poison(&found);
        if self.rank == 0 {
            self.relay_abort(&why);
        }
        Some(why)
    }

    /// Rank 0's side of collective `n`: every peer's frame in rank order, then each peer's answer.
    fn hub_round(
        &self,
        streams: &mut [TcpStream],
        op: Op,
        n: u64,
        own: Vec<Vec<u8>>,
    ) -> std::result::Result<Vec<Vec<u8>>, String> {
        let deadline = Instant::now() + self.timeout;
        let mut sent: Vec<Vec<Vec<u8>>> = Vec::with_capacity(self.size);
        sent.push(own);
        for (i, stream) in streams.iter_mut().enumerate() {
            let r = i + 1;
            let bufs = read_data(stream, deadline, op, n, self.expected(op))
                .map_err(|e| self.describe(e, r, op, n))?;
            sent.push(bufs);
        }
        let owed = |d: usize| -> Vec<Vec<u8>> {
            match op {
                Op::AllGather => sent.iter().map(|s| s[0].clone()).collect(),
                Op::AllToAllV => sent.iter().map(|s| s[d].clone()).collect(),
            }
        };
        for (i, stream) in streams.iter_mut().enumerate() {
            let r = i + 1;
            write_data(stream, op, n, &owed(r)).map_err(|e| {
                format!(
                    "rank {r}'s connection closed in {} (collective #{n}) while rank 0 answered it \
                     (its process exited or was killed): {e}",
                    op.name()
                )
            })?;
        }
        Ok(owed(0))
    }

    /// A non-hub rank's side of collective `n`: its frame to rank 0, then rank 0's answer.
    fn spoke_round(
        &self,
        stream: &mut TcpStream,
        op: Op,
        n: u64,
        send: Vec<Vec<u8>>,
    ) -> std::result::Result<Vec<Vec<u8>>, String> {
        write_data(stream, op, n, &send).map_err(|e| {
            format!(
                "rank 0's connection closed in {} (collective #{n}) (its process exited or was \
                 killed): {e}",
                op.name()
            )
        })?;
        let deadline = Instant::now() + self.timeout;
        read_data(stream, deadline, op, n, self.size).map_err(|e| self.describe(e, 0, op, n))
    }

    /// How many buffers a frame of `op` from a non-hub rank carries.
    fn expected(&self, op: Op) -> usize {
        match op {
            Op::AllGather => 1,
            Op::AllToAllV => self.size,
        }
    }

    /// A link failure with rank `peer` as the reason the group stops.
    fn describe(&self, e: LinkError, peer: usize, op: Op, n: u64) -> String {
        let (me, op) = (self.rank, op.name());
        match e {
            LinkError::Aborted(why) => why,
            LinkError::TimedOut => format!(
                "rank {me} timed out after {:?} in {op} (collective #{n}) waiting for rank {peer}",
                self.timeout
            ),
            LinkError::Closed(e) => format!(
                "rank {peer}'s connection closed in {op} (collective #{n}) (its process exited or \
                 was killed): {e}"
            ),
            LinkError::Malformed(what) => {
                format!("rank {peer} broke the protocol in {op} (collective #{n}): {what}")
            }
        }
    }

    /// Rank 0 tells every other rank that the group stopped, then closes its side (best effort,
    /// each write bounded by [`ABORT_WRITE`]).
    fn relay_abort(&self, why: &str) {
        for s in &self.shutters {
            send_abort(s, why);
            // Bytes a peer sent that rank 0 will never read would make closing the socket reset
            // the connection, which can drop the abort frame before the peer reads it.
            drain(s);
        }
    }
}

fn check_size(size: usize) -> Result<()> {
    if size == 0 || size > u32::MAX as usize {
        return Err(MoeError::invalid(
            "ranks",
            format!("a group of {size} ranks"),
        ));
    }
    Ok(())
}

/// Reads a joining rank's hello; its rank, or why it is not one of this group's.
fn read_hello(
    stream: &mut TcpStream,
    wait: Duration,
    secret: u64,
    size: usize,
) -> std::result::Result<usize, String> {
    stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_read_timeout(Some(wait.max(Duration::from_millis(1)))))
        .map_err(|e| e.to_string())?;
    let mut hello = [0u8; 24];
    stream
        .read_exact(&mut hello)
        .map_err(|e| format!("no complete hello: {e}"))?;
    if &hello[..8] != MAGIC {
        return Err("not a moerunner rank (wrong magic)".into());
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([hello[i], hello[i + 1], hello[i + 2], hello[i + 3]]);
    let (theirs, rank, their_size) = (
        u64::from_le_bytes(hello[8..16].try_into().unwrap_or_default()),
        u32_at(16) as usize,
        u32_at(20) as usize,
    );
    if theirs != secret {
        return Err("wrong group secret".into());
    }
    if their_size != size {
        return Err(format!(
            "it was started for {their_size} ranks, the group has {size}"
        ));
    }
    if rank == 0 || rank >= size {
        return Err(format!("rank {rank} is not 1..{size}"));
    }
    Ok(rank)
}

/// A `kind` byte and the reason `why` (cut to [`MAX_REASON`] bytes), best effort: the write gives
/// up after [`ABORT_WRITE`].
fn send_reason(stream: &TcpStream, kind: u8, why: &str) {
    let mut s = stream;
    let _ = stream.set_write_timeout(Some(ABORT_WRITE));
    let mut frame = vec![kind];
    frame.extend_from_slice(&reason_bytes(why));
    let _ = s.write_all(&frame);
}

fn reason_bytes(why: &str) -> Vec<u8> {
    let mut cut = why.len().min(MAX_REASON);
    while !why.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = (cut as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&why.as_bytes()[..cut]);
    out
}

fn read_reason(stream: &mut impl Read) -> std::io::Result<String> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = (u32::from_le_bytes(len) as usize).min(MAX_REASON);
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Writes an abort frame (bounded by [`ABORT_WRITE`]) and closes this side for writing, so the
/// peer reads the reason and then the end of the stream.
fn send_abort(stream: &TcpStream, why: &str) {
    send_reason(stream, ABORT, why);
    let _ = stream.shutdown(Shutdown::Write);
}

/// Why the link to `peer` says the group stopped, if it does, without waiting: the end of the
/// stream, an error, or a frame (read as an abort).
fn watch_link(stream: &mut TcpStream, peer: usize) -> Option<String> {
    let mut byte = [0u8];
    stream.set_nonblocking(true).ok()?;
    let peeked = stream.peek(&mut byte);
    let _ = stream.set_nonblocking(false);
    let closed = |e: &dyn std::fmt::Display| {
        format!("rank {peer}'s connection closed (its process exited or was killed): {e}")
    };
    match peeked {
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => Some(closed(&e)),
        Ok(0) => Some(closed(&"end of stream")),
        Ok(_) => {
            let deadline = Instant::now() + ABORT_WRITE;
            Some(
                match read_data(stream, deadline, Op::AllGather, u64::MAX, 0) {
                    Err(LinkError::Aborted(why)) => why,
                    _ => format!("rank {peer} sent a frame while the group's sockets only watch"),
                },
            )
        }
    }
}

/// Reads and discards whatever a peer has sent so far (nonblocking).
fn drain(stream: &TcpStream) {
    let mut s = stream;
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let mut sink = [0u8; 64 << 10];
    while let Ok(n) = s.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
    let _ = stream.set_nonblocking(false);
}

fn write_data(stream: &mut TcpStream, op: Op, n: u64, bufs: &[Vec<u8>]) -> std::io::Result<()> {
    let mut head = vec![DATA];
    head.extend_from_slice(&n.to_le_bytes());
    head.push(op as u8);
    head.extend_from_slice(&(bufs.len() as u32).to_le_bytes());
    stream.write_all(&head)?;
    for b in bufs {
        stream.write_all(&(b.len() as u64).to_le_bytes())?;
        stream.write_all(b)?;
    }
    stream.flush()
}

/// Reads one data frame of collective `n` of `op` with `count` buffers, waiting until `deadline`.
fn read_data(
    stream: &mut TcpStream,
    deadline: Instant,
    op: Op,
    n: u64,
    count: usize,
) -> std::result::Result<Vec<Vec<u8>>, LinkError> {
    let mut reader = Deadline { stream, deadline };
    let mut kind = [0u8];
    reader.read_exact(&mut kind).map_err(link_error)?;
    match kind[0] {
        DATA => {}
        ABORT => {
            let why = read_reason(&mut reader).map_err(link_error)?;
            return Err(LinkError::Aborted(why));
        }
        other => return Err(LinkError::Malformed(format!("frame kind {other}"))),
    }
    let mut head = [0u8; 13];
    reader.read_exact(&mut head).map_err(link_error)?;
    let their_n = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
    let their_op = head[8];
    let their_count = u32::from_le_bytes(head[9..13].try_into().unwrap_or_default()) as usize;
    if their_n != n || their_op != op as u8 {
        let theirs = match their_op {
            0 => "all_gather",
            1 => "all_to_all_v",
            _ => "an unknown operation",
        };
        return Err(LinkError::Malformed(format!(
            "it called {theirs} as collective #{their_n} where this rank called {} as #{n}",
            op.name()
        )));
    }
    if their_count != count {
        return Err(LinkError::Malformed(format!(
            "{their_count} buffers where {count} were due"
        )));
    }
    let mut bufs = Vec::with_capacity(count);
    for _ in 0..count {
        let mut len = [0u8; 8];
        reader.read_exact(&mut len).map_err(link_error)?;
        let len = u64::from_le_bytes(len);
        if len > MAX_BUFFER {
            return Err(LinkError::Malformed(format!(
                "a buffer of {len} bytes (the most is {MAX_BUFFER})"
            )));
        }
        // Grown as the bytes arrive: a length nobody sends allocates nothing.
        let mut buf = Vec::new();
        (&mut reader)
            .take(len)
            .read_to_end(&mut buf)
            .map_err(link_error)?;
        if buf.len() as u64 != len {
            return Err(LinkError::Closed(format!(
                "the stream ended after {} of a buffer's {len} bytes",
                buf.len()
            )));
        }
        bufs.push(buf);
    }
    Ok(bufs)
}

fn link_error(e: std::io::Error) -> LinkError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => LinkError::TimedOut,
        ErrorKind::UnexpectedEof => LinkError::Closed("end of stream".into()),
        _ => LinkError::Closed(e.to_string()),
    }
}

/// A stream read with one deadline for a whole frame.
struct Deadline<'a> {
    stream: &'a mut TcpStream,
    deadline: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Communicator for SocketComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.exchange(Op::AllGather, vec![mine.to_vec()])
    }
    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        if send.len() != self.size {
            let why = format!(
                "all_to_all_v: {} buffers for {} ranks",
                send.len(),
                self.size
            );
            self.abort(&format!("rank {} failed: {why}", self.rank));
            return Err(MoeError::Comm {
                rank: self.rank,
                why,
            });
        }
        self.exchange(Op::AllToAllV, send)
    }
    fn abort(&self, why: &str) {
        let why = self.poison(why);
        match self.links.try_lock() {
            // No collective of this rank is in flight: tell the peers why, then close.
            Ok(_links) => {
                for s in &self.shutters {
                    send_abort(s, &why);
                }
            }
            // A collective of another thread holds the links: closing them ends its wait, and
            // the peers see the connection close.
            Err(_) => {
                for s in &self.shutters {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

impl Drop for SocketComm {
    /// A rank thread that panics stops its peers at once instead of leaving them to time out (a
    /// process that dies closes its sockets, which its peers see the same way).
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.abort(&format!("rank {} panicked", self.rank));
        }
    }
}

/// How a rank launched as a process learns its place (`moerunner run --comm process`: the first
/// process sets these for the ones it starts; an external launcher sets them for every rank, as
/// torchrun does): `MOERUNNER_RANK`, `MOERUNNER_WORLD_SIZE`, `MOERUNNER_RENDEZVOUS` (host:port rank
/// 0 listens on) and, optionally, `MOERUNNER_RANK_SECRET` (a u64 every rank presents; 0 if unset).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world_size: usize,
    pub rendezvous: String,
    pub secret: u64,
}

impl RankEnv {
    pub const RANK: &'static str = "MOERUNNER_RANK";
    pub const WORLD_SIZE: &'static str = "MOERUNNER_WORLD_SIZE";
    pub const RENDEZVOUS: &'static str = "MOERUNNER_RENDEZVOUS";
    pub const SECRET: &'static str = "MOERUNNER_RANK_SECRET";

    /// This process's place, if `MOERUNNER_RANK` is set (then the others must be too).
    pub fn from_env() -> Result<Option<RankEnv>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Self::from_env`] over any variable lookup.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<RankEnv>> {
        let Some(rank) = var(Self::RANK) else {
            return Ok(None);
        };
        let number = |key: &str, v: &str| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| MoeError::invalid(key, format!("`{v}` is not a number")))
        };
        let need = |key: &str| {
            var(key)
                .ok_or_else(|| MoeError::invalid(key, format!("must be set with {}", Self::RANK)))
        };
        let rank = number(Self::RANK, &rank)? as usize;
        let world_size = number(Self::WORLD_SIZE, &need(Self::WORLD_SIZE)?)? as usize;
        let rendezvous = need(Self::RENDEZVOUS)?;
        let secret = match var(Self::SECRET) {
            Some(s) => number(Self::SECRET, &s)?,
            None => 0,
        };
        if world_size == 0 || rank >= world_size {
            return Err(MoeError::invalid(
                Self::RANK,
                format!("rank {rank} of a group of {world_size}"),
            ));
        }
        Ok(Some(RankEnv {
            rank,
            world_size,
            rendezvous,
            secret,
        }))
    }

    /// This rank's end of the group: rank 0 listens on the rendezvous address and waits for the
    /// others; every other rank connects to it.
    pub fn connect(&self, timeout: Duration) -> Result<SocketComm> {
        if self.rank == 0 {
            let listener = TcpListener::bind(&self.rendezvous).map_err(|e| {
                MoeError::invalid(
                    Self::RENDEZVOUS,
                    format!("rank 0 cannot listen on `{}`: {e}", self.rendezvous),
                )
            })?;
            SocketComm::host(listener, self.world_size, self.secret, timeout)
        } else {
            SocketComm::join(
                self.rendezvous.as_str(),
                self.rank,
                self.world_size,
                self.secret,
                timeout,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(20);

    /// A rank that has failed stays up a moment before its sockets close, as a process does
    /// while it prints its error, so a relayed reason is read before the connection ends.
    fn linger(c: SocketComm) {
        std::thread::sleep(Duration::from_millis(300));
        drop(c);
    }

    /// A group of `size` socket ranks over loopback, each on its own thread running `body`.
    fn on_group<R: Send>(
        size: usize,
        timeout: Duration,
        body: impl Fn(SocketComm) -> R + Sync,
    ) -> Vec<R> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::scope(|s| {
            let body = &body;
            let mut handles =
                vec![s.spawn(move || body(SocketComm::host(listener, size, 7, timeout).unwrap()))];
            for r in 1..size {
                handles.push(
                    s.spawn(move || body(SocketComm::join(addr, r, size, 7, timeout).unwrap())),
                );
            }
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn collectives_deliver_what_each_rank_sent() {
        for size in 1..=4 {
            let results = on_group(size, T, |c| {
                let me = c.rank();
                let mut out = Vec::new();
                for round in 0..3u8 {
                    // Uneven and empty buffers.
                    let mine = vec![me as u8 + round; me * 3];
                    let g = c.all_gather(&mine).unwrap();
                    out.push(g);
                    let send: Vec<Vec<u8>> = (0..size)
                        .map(|d| vec![(10 * me + d) as u8; (me + d) % 3])
                        .collect();
                    out.push(c.all_to_all_v(send).unwrap());
                }
                let sum = c.all_reduce_sum(&[me as f32, 1.0]).unwrap();
                (me, out, sum)
            });
            for (me, out, sum) in results {
                for (i, got) in out.iter().enumerate() {
                    let round = (i / 2) as u8;
                    for (src, b) in got.iter().enumerate() {
                        let want = if i % 2 == 0 {
                            vec![src as u8 + round; src * 3]
                        } else {
                            vec![(10 * src + me) as u8; (src + me) % 3]
                        };
                        assert_eq!(b, &want, "size {size} rank {me} call {i} from {src}");
                    }
                }
                let want: f32 = (0..size).map(|r| r as f32).sum();
                assert_eq!(sum, vec![want, size as f32]);
            }
        }
    }

    #[test]
    fn an_abort_stops_every_rank_naming_the_failing_one() {
        let results = on_group(3, T, |c| {
            c.barrier().unwrap();
            if c.rank() == 2 {
                c.abort("rank 2 failed: tensor `hidden_states`: element [0, 3] is NaN");
                return String::new();
            }
            let e = c.barrier().unwrap_err().to_string();
            linger(c);
            e
        });
        for (r, e) in results.iter().enumerate().take(2) {
            assert!(
                e.starts_with(&format!("rank {r}: "))
                    && e.contains("rank 2 failed")
                    && e.contains("NaN"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_rank_that_vanishes_stops_its_peers_at_once() {
        for gone in [0, 1] {
            let started = Instant::now();
            let results = on_group(3, Duration::from_secs(60), |c| {
                c.barrier().unwrap();
                if c.rank() == gone {
                    // Dropped without a word, as a killed process's sockets close.
                    drop(c);
                    return String::new();
                }
                let e = c.barrier().unwrap_err().to_string();
                linger(c);
                e
            });
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{:?}",
                started.elapsed()
            );
            for (r, e) in results.iter().enumerate() {
                if r != gone {
                    assert!(
                        e.contains(&format!("rank {gone}'s connection closed")),
                        "rank {r}: {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_rank_that_never_calls_times_the_group_out() {
        let results = on_group(2, Duration::from_millis(300), |c| {
            if c.rank() == 1 {
                std::thread::sleep(Duration::from_millis(1500));
                return c.barrier().unwrap_err().to_string();
            }
            let e = c.barrier().unwrap_err().to_string();
            // Rank 0 stays up (as a process would while it reports), so the late rank reads why.
            std::thread::sleep(Duration::from_millis(2500));
            e
        });
        assert!(
            results[0].contains("timed out") && results[0].contains("waiting for rank 1"),
            "{}",
            results[0]
        );
        // Rank 1's late call finds rank 0's relayed reason.
        assert!(results[1].contains("timed out"), "{}", results[1]);
    }

    #[test]
    fn ranks_calling_different_collectives_fail() {
        let results = on_group(2, T, |c| {
            if c.rank() == 0 {
                c.barrier().map(|_| ()).unwrap_err().to_string()
            } else {
                c.all_to_all_v(vec![vec![], vec![]])
                    .map(|_| ())
                    .unwrap_err()
                    .to_string()
            }
        });
        assert!(
            results[0].contains("broke the protocol") && results[0].contains("all_to_all_v"),
            "{}",
            results[0]
        );
        assert!(
            results[1].contains("all_to_all_v stopped"),
            "{}",
            results[1]
        );
    }

    #[test]
    fn strangers_and_wrong_secrets_are_refused_while_the_group_forms() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::scope(|s| {
            let host = s.spawn(move || SocketComm::host(listener, 2, 7, T));
            // A connection that starts a hello and goes silent holds the group up at most
            // HELLO_WAIT, not the group's timeout.
            let mut silent = TcpStream::connect(addr).unwrap();
            silent.write_all(b"MOE").unwrap();
            // Not a rank at all.
            let mut stranger = TcpStream::connect(addr).unwrap();
            stranger
                .write_all(b"GET / HTTP/1.1\r\nHost: moerunner\r\n\r\n")
                .unwrap();
            let mut answer = [0u8];
            stranger.read_exact(&mut answer).unwrap();
            assert_eq!(answer[0], REFUSED);
            assert!(read_reason(&mut stranger).unwrap().contains("wrong magic"));
            let e = SocketComm::join(addr, 1, 2, 8, T)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("refused") && e.contains("secret"), "{e}");
            let e = SocketComm::join(addr, 1, 3, 7, T)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("refused") && e.contains("3 ranks"), "{e}");
            let formed = Instant::now();
            let joined = SocketComm::join(addr, 1, 2, 7, T).unwrap();
            let hosted = host.join().unwrap().unwrap();
            assert!(formed.elapsed() < HELLO_WAIT * 3, "{:?}", formed.elapsed());
            drop(silent);
            s.spawn(move || joined.barrier().unwrap());
            hosted.barrier().unwrap();
        });
    }

    /// A started rank's process that exits before joining stops rank 0's wait at once with the
    /// watcher's reason (not after the group's timeout).
    #[test]
    fn a_rank_that_exits_before_joining_stops_the_wait_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let started = Instant::now();
        let mut polls = 0;
        let err = SocketComm::host_watching(listener, 3, 7, Duration::from_secs(60), || {
            polls += 1;
            (polls > 3).then(|| "rank 2's process exited (exit status: 1) before joining".into())
        })
        .err()
        .unwrap()
        .to_string();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(
            err.starts_with("rank 0: waiting for ranks to join: rank 2's process exited"),
            "{err}"
        );
    }

    /// A raw connection that joins a 2-rank group (secret 7) at `addr` as rank 1, accepted.
    fn raw_rank_1(addr: SocketAddr) -> TcpStream {
        let mut raw = TcpStream::connect(addr).unwrap();
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&7u64.to_le_bytes());
        hello.extend_from_slice(&1u32.to_le_bytes());
        hello.extend_from_slice(&2u32.to_le_bytes());
        raw.write_all(&hello).unwrap();
        let mut answer = [0u8];
        raw.read_exact(&mut answer).unwrap();
        assert_eq!(answer[0], ACCEPTED);
        raw
    }

    #[test]
    fn a_hostile_buffer_length_is_refused_without_allocating_it() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::scope(|s| {
            let host = s.spawn(move || {
                let c = SocketComm::host(listener, 2, 7, T).unwrap();
                c.barrier().unwrap_err().to_string()
            });
            let mut raw = raw_rank_1(addr);
            let mut frame = vec![DATA];
            frame.extend_from_slice(&0u64.to_le_bytes());
            frame.push(Op::AllGather as u8);
            frame.extend_from_slice(&1u32.to_le_bytes());
            frame.extend_from_slice(&u64::MAX.to_le_bytes());
            raw.write_all(&frame).unwrap();
            let e = host.join().unwrap();
            assert!(
                e.contains("broke the protocol") && e.contains("the most is"),
                "{e}"
            );
        });
    }

    /// A joined peer that sends seeded garbage (whole frames' worth, cut anywhere, then silence or
    /// a close) makes rank 0's collective fail with a reason, never panic or wait past the timeout.
    #[test]
    fn garbage_from_a_peer_is_an_error_in_bounded_time() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut kinds = std::collections::BTreeSet::new();
        for case in 0..40 {
            let len = (next() % 200) as usize;
            let mut junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Half the cases start like a data frame, so the length and count checks are reached.
            if case % 2 == 0 && junk.len() > 14 {
                junk[0] = DATA;
                junk[1..9].copy_from_slice(&0u64.to_le_bytes());
                junk[9] = Op::AllGather as u8;
            }
            // Every fourth case a well-formed head whose one buffer is cut short: the wait for the
            // rest ends at the close or the timeout.
            if case % 4 == 1 {
                junk = vec![DATA];
                junk.extend_from_slice(&0u64.to_le_bytes());
                junk.push(Op::AllGather as u8);
                junk.extend_from_slice(&1u32.to_le_bytes());
                junk.extend_from_slice(&100u64.to_le_bytes());
                junk.extend((0..(next() % 100)).map(|_| next() as u8));
            }
            let close = case % 3 == 0;
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let started = Instant::now();
            let err = std::thread::scope(|s| {
                let host = s.spawn(move || {
                    let c = SocketComm::host(listener, 2, 7, Duration::from_millis(500)).unwrap();
                    c.barrier().map(|_| ()).unwrap_err().to_string()
                });
                let mut raw = raw_rank_1(addr);
                let _ = raw.write_all(&junk);
                if close {
                    drop(raw);
                    host.join().unwrap()
                } else {
                    let e = host.join().unwrap();
                    drop(raw);
                    e
                }
            });
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "case {case}: {:?}",
                started.elapsed()
            );
            kinds.insert(
                [
                    "timed out",
                    "connection closed",
                    "frame kind",
                    "buffers where",
                    "the most is",
                ]
                .into_iter()
                .find(|k| err.contains(k))
                .unwrap_or("other"),
            );
            assert!(
                err.starts_with("rank 0: barrier") || err.starts_with("rank 0: all_gather stopped"),
                "case {case}: {err}"
            );
        }
        // The draws reach every way a frame can be wrong.
        for k in [
            "timed out",
            "connection closed",
            "frame kind",
            "buffers where",
        ] {
            assert!(kinds.contains(k), "no case ended with `{k}`: {kinds:?}");
        }
    }

    #[test]
    fn the_rank_environment_is_read_and_checked() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(RankEnv::from_vars(vars(&[])).unwrap(), None);
        let env = RankEnv::from_vars(vars(&[
            ("MOERUNNER_RANK", "1"),
            ("MOERUNNER_WORLD_SIZE", "2"),
            ("MOERUNNER_RENDEZVOUS", "127.0.0.1:1234"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((env.rank, env.world_size, env.secret), (1, 2, 0));
        let e = RankEnv::from_vars(vars(&[("MOERUNNER_RANK", "1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("MOERUNNER_WORLD_SIZE"), "{e}");
        let e = RankEnv::from_vars(vars(&[
            ("MOERUNNER_RANK", "2"),
            ("MOERUNNER_WORLD_SIZE", "2"),
            ("MOERUNNER_RENDEZVOUS", "x"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("rank 2 of a group of 2"), "{e}");
    }
}
