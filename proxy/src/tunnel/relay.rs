//! Bytes both ways through an established tunnel: two half-duplex copies in one task. Each
//! direction passes a FIN on as a write shutdown and keeps the other direction flowing; the
//! tunnel ends when both are done, when one side errors, when both directions have been idle
//! for `idleTimeout`, or when the proxy drains.
//!
//! Plain-TCP tunnels (the common case) wait for readiness without holding a buffer and
//! borrow one only while bytes are moving, so an idle tunnel costs its two sockets and a
//! small task, not 2 x 16 KiB or more of buffers. The buffer grows while reads fill it, to
//! cut syscalls per byte on bulk transfers.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::metrics::ByteCounters;

/// First buffer a direction borrows when bytes arrive. Interactive traffic (a TLS record, an
/// HTTP request) fits; the kernel's loopback and LAN segments are 64 KiB or less.
const MIN_BUF: usize = 16 * 1024;
/// Largest buffer a direction grows to when every read fills its buffer (a bulk upload). Measured
/// on loopback (docs/performance.md): past 256 KiB the syscall count stops mattering.
const MAX_BUF: usize = 256 * 1024;
/// Buffer of the generic (TLS client leg) path: one TLS record's plaintext is at most 16 KiB.
const GENERIC_BUF: usize = 16 * 1024;

/// Which leg an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The pod.
    Client,
    /// The destination.
    Upstream,
}

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Both sides sent FIN: the normal end.
    Done,
    /// Neither direction moved a byte for `idleTimeout`.
    Idle,
    /// The proxy's drain deadline passed.
    Drained,
    /// `maxTunnelDuration` passed.
    MaxDuration,
    /// A read or write on one leg failed (reset, broken pipe).
    Error(Side, io::ErrorKind),
}

impl Close {
    /// Short name for the access log.
    pub fn reason(&self) -> String {
        match self {
            Self::Done => "closed".into(),
            Self::Idle => "idle-timeout".into(),
            Self::Drained => "drain-deadline".into(),
            Self::MaxDuration => "max-duration".into(),
            Self::Error(Side::Client, k) => format!("client-error: {k}"),
            Self::Error(Side::Upstream, k) => format!("upstream-error: {k}"),
        }
    }
}

/// What a finished tunnel reports.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// Client -> upstream bytes.
    pub up: u64,
    /// Upstream -> client bytes.
    pub down: u64,
    /// How it ended.
    pub close: Close,
}

/// Limits applied to one tunnel.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Closed when both directions have been idle this long.
    pub idle: Duration,
    /// Closed after this long whatever happens; `None` = no limit.
    pub max_duration: Option<Duration>,
    /// Move bulk data with splice(2) through a pipe instead of copying it through a buffer.
    pub splice: bool,
}

/// Per-tunnel bookkeeping shared by the two directions and the idle watcher (all in one
/// task, atomics only because the future must be `Send`).
#[derive(Debug)]
pub struct Tracker {
    /// When the tunnel opened; activity is stored relative to it.
    start: Instant,
    /// Milliseconds from `start` to the last byte moved either way (idle timeout).
    last_ms: AtomicU64,
    /// Client -> upstream bytes so far.
    up: AtomicU64,
    /// Upstream -> client bytes so far.
    down: AtomicU64,
}

impl Tracker {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
        }
    }

    fn moved(&self, dir: Dir, n: usize, counters: &ByteCounters) {
        let n = n as u64;
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
        match dir {
            Dir::Up => {
                self.up.fetch_add(n, Ordering::Relaxed);
                counters.up.inc_by(n);
            }
            Dir::Down => {
                self.down.fetch_add(n, Ordering::Relaxed);
                counters.down.inc_by(n);
            }
        }
    }

    fn last_activity(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Direction of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Client -> upstream.
    Up,
    /// Upstream -> client.
    Down,
}

impl Dir {
    /// (side read from, side written to)
    fn sides(self) -> (Side, Side) {
        match self {
            Self::Up => (Side::Client, Side::Upstream),
            Self::Down => (Side::Upstream, Side::Client),
        }
    }
}

/// A failed copy, attributed to the leg that failed.
#[derive(Debug)]
pub struct LegError(Side, io::Error);

/// A client connection the proxy can relay: plain TCP takes the buffer-free fast path, TLS
/// the generic one.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Copies both ways until both directions are done or one fails.
    fn copy_both(
        self,
        upstream: TcpStream,
        tracker: &Tracker,
        counters: &ByteCounters,
        splice: bool,
    ) -> impl Future<Output = Result<(), LegError>> + Send;
}

impl ClientIo for TcpStream {
    async fn copy_both(
        self,
        upstream: TcpStream,
        tracker: &Tracker,
        counters: &ByteCounters,
        splice: bool,
    ) -> Result<(), LegError> {
        let up = pump_tcp(&self, &upstream, Dir::Up, tracker, counters, splice);
        let down = pump_tcp(&upstream, &self, Dir::Down, tracker, counters, splice);
        tokio::try_join!(up, down).map(|_| ())
    }
}

impl ClientIo for tokio_rustls::server::TlsStream<TcpStream> {
    async fn copy_both(
        self,
        mut upstream: TcpStream,
        tracker: &Tracker,
        counters: &ByteCounters,
        _splice: bool,
    ) -> Result<(), LegError> {
        let (client_r, client_w) = tokio::io::split(self);
        let (upstream_r, upstream_w) = upstream.split();
        let up = pump_io(client_r, upstream_w, Dir::Up, tracker, counters);
        let down = pump_io(upstream_r, client_w, Dir::Down, tracker, counters);
        tokio::try_join!(up, down).map(|_| ())
    }
}

/// Relays until the tunnel ends; `stop` resolving cuts it (drain deadline).
pub async fn relay<C: ClientIo>(
    client: C,
    upstream: TcpStream,
    limits: Limits,
    counters: &ByteCounters,
    stop: impl Future<Output = ()>,
) -> Stats {
    let tracker = Tracker::new();
    let close = tokio::select! {
        r = client.copy_both(upstream, &tracker, counters, limits.splice) => match r {
            Ok(()) => Close::Done,
            Err(LegError(side, e)) => Close::Error(side, e.kind()),
        },
        c = deadlines(&tracker, limits) => c,
        () = stop => Close::Drained,
    };
    Stats {
        up: tracker.up.load(Ordering::Relaxed),
        down: tracker.down.load(Ordering::Relaxed),
        close,
    }
}

/// Resolves once nothing has moved either way for the idle timeout, or the tunnel has
/// reached its maximum duration. One timer for both: a timer is a good part of what an idle
/// tunnel costs.
async fn deadlines(tracker: &Tracker, limits: Limits) -> Close {
    let end = limits.max_duration.map(|d| tracker.start + d);
    loop {
        let idle_at = tracker.last_activity() + limits.idle;
        let now = Instant::now();
        match end {
            Some(end) if now >= end => return Close::MaxDuration,
            _ if now >= idle_at => return Close::Idle,
            Some(end) => tokio::time::sleep_until(idle_at.min(end)).await,
            None => tokio::time::sleep_until(idle_at).await,
        }
    }
}

/// One direction over plain TCP. Waits for readability holding no buffer; borrows one while
/// the source has bytes and gives it back when the source runs dry.
async fn pump_tcp(
    src: &TcpStream,
    dst: &TcpStream,
    dir: Dir,
    tracker: &Tracker,
    counters: &ByteCounters,
    splice: bool,
) -> Result<(), LegError> {
    let (src_side, dst_side) = dir.sides();
    let mut cap = MIN_BUF;
    loop {
        if splice && cap > MIN_BUF {
            // A read has filled a buffer: this direction carries bulk data.
            return splice_pump(src, dst, dir, tracker, counters).await;
        }
        src.readable().await.map_err(|e| LegError(src_side, e))?;
        let mut buf = Pooled::take(cap);
        loop {
            buf.0.clear();
            match src.try_read_buf(&mut buf.0) {
                Ok(0) => {
                    shutdown_write(dst);
                    return Ok(());
                }
                Ok(n) => {
                    let full = n == buf.0.capacity();
                    write_all(dst, buf.0.get(..n).unwrap_or_default())
                        .await
                        .map_err(|e| LegError(dst_side, e))?;
                    tracker.moved(dir, n, counters);
                    if full && cap < MAX_BUF {
                        cap = (cap * 2).min(MAX_BUF);
                        buf = Pooled::take(cap);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(LegError(src_side, e)),
            }
        }
    }
}

/// Buffers kept per thread for reuse, per size class. Reuse avoids a malloc, and for the
/// larger sizes an mmap plus page faults, every time a direction wakes up; the cap bounds
/// what the process keeps when traffic stops (at most 8 x 256 KiB and a few smaller per
/// worker thread).
const POOL_PER_CLASS: usize = 8;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer borrowed from the thread's pool; given back on drop (to whichever thread the
/// task is on by then).
struct Pooled(Vec<u8>);

impl Pooled {
    fn take(cap: usize) -> Self {
        let reused = POOL.with(|p| {
            let mut p = p.borrow_mut();
            let i = p.iter().position(|b| b.capacity() == cap)?;
            Some(p.swap_remove(i))
        });
        Self(reused.unwrap_or_else(|| Vec::with_capacity(cap)))
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        let cap = buf.capacity();
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.iter().filter(|b| b.capacity() == cap).count() < POOL_PER_CLASS {
                p.push(buf);
            }
        });
    }
}

/// Pipe capacity for splice: as much as one wake-up of a busy loopback or LAN socket holds.
const PIPE_SIZE: i32 = 1 << 20;

/// One direction with splice(2): socket -> pipe -> socket, no copy through user space. Like
/// the buffer path, a pipe is borrowed from a per-thread pool only while bytes move.
async fn splice_pump(
    src: &TcpStream,
    dst: &TcpStream,
    dir: Dir,
    tracker: &Tracker,
    counters: &ByteCounters,
) -> Result<(), LegError> {
    use nix::fcntl::{SpliceFFlags, splice};
    use tokio::io::Interest;
    let (src_side, dst_side) = dir.sides();
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        src.readable().await.map_err(|e| LegError(src_side, e))?;
        let pipe = PooledPipe::take().map_err(|e| LegError(src_side, e))?;
        let (pipe_r, pipe_w) = pipe.ends().map_err(|e| LegError(src_side, e))?;
        loop {
            let read = src.try_io(Interest::READABLE, || {
                splice(src, None, pipe_w, None, PIPE_SIZE as usize, flags).map_err(io::Error::from)
            });
            let n = match read {
                Ok(0) => {
                    shutdown_write(dst);
                    return Ok(());
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(LegError(src_side, e)),
            };
            pipe.dirty.set(true);
            let mut left = n;
            while left > 0 {
                let wrote = dst.try_io(Interest::WRITABLE, || {
                    splice(pipe_r, None, dst, None, left, flags).map_err(io::Error::from)
                });
                match wrote {
                    Ok(0) => return Err(LegError(dst_side, io::ErrorKind::WriteZero.into())),
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        dst.writable().await.map_err(|e| LegError(dst_side, e))?;
                    }
                    Err(e) => return Err(LegError(dst_side, e)),
                }
            }
            pipe.dirty.set(false);
            tracker.moved(dir, n, counters);
        }
    }
}

thread_local! {
    static PIPES: std::cell::RefCell<Vec<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// A pipe borrowed from the thread's pool; returned on drop only if empty (`dirty` false).
struct PooledPipe {
    /// Read end and write end; `None` only while being dropped.
    fds: Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>,
    /// Bytes are in the pipe (a Cell: the ends stay borrowed while it changes).
    dirty: std::cell::Cell<bool>,
}

impl PooledPipe {
    fn take() -> io::Result<Self> {
        if let Some(fds) = PIPES.with(|p| p.borrow_mut().pop()) {
            return Ok(Self {
                fds: Some(fds),
                dirty: std::cell::Cell::new(false),
            });
        }
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A larger pipe moves more per syscall; if the system limit refuses, 64 KiB works.
        let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        Ok(Self {
            fds: Some((r, w)),
            dirty: std::cell::Cell::new(false),
        })
    }

    fn ends(&self) -> io::Result<(std::os::fd::BorrowedFd<'_>, std::os::fd::BorrowedFd<'_>)> {
        use std::os::fd::AsFd;
        self.fds
            .as_ref()
            .map(|(r, w)| (r.as_fd(), w.as_fd()))
            .ok_or_else(|| io::Error::other("pipe already returned"))
    }
}

impl Drop for PooledPipe {
    fn drop(&mut self) {
        // A pipe with bytes left in it is closed, which discards them; an empty one is kept.
        if let (false, Some(fds)) = (self.dirty.get(), self.fds.take()) {
            PIPES.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_PER_CLASS {
                    p.push(fds);
                }
            });
        }
    }
}

/// `write_all` on a shared `&TcpStream`.
async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match dst.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Passes a FIN on. A peer that is already gone makes this fail, which changes nothing: the
/// other direction will see the error itself.
fn shutdown_write(dst: &TcpStream) {
    let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
}

/// One direction over any stream (the TLS client leg), with one buffer for its life.
async fn pump_io<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut src: R,
    mut dst: W,
    dir: Dir,
    tracker: &Tracker,
    counters: &ByteCounters,
) -> Result<(), LegError> {
    let (src_side, dst_side) = dir.sides();
    let mut buf = vec![0u8; GENERIC_BUF];
    loop {
        let n = match src.read(&mut buf).await {
            Ok(n) => n,
            // A TLS peer that closes TCP without close_notify: treat as a FIN.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(LegError(src_side, e)),
        };
        if n == 0 {
            let _ = dst.shutdown().await;
            return Ok(());
        }
        let chunk = buf.get(..n).unwrap_or_default();
        dst.write_all(chunk)
            .await
            .map_err(|e| LegError(dst_side, e))?;
        dst.flush().await.map_err(|e| LegError(dst_side, e))?;
        tracker.moved(dir, n, counters);
    }
}
