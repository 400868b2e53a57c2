//! Stalled requests: `blob.bodyIdleTimeout` applied to one gateway request. A client that
//! sends its head and part of a body and then nothing, an upstream that stops reading the
//! upload, never begins its answer or stops mid-download: each would otherwise hold a
//! gateway connection and an upstream connection for ever. Progress is counted per request;
//! each body has its own timer that fails the body when its peer has sent nothing for the
//! limit (hyper then aborts that connection), and [`Progress::upstream_stalled`] covers the
//! time in which no body is being waited on: the upstream reading the upload, or answering.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

/// Which peer stopped, in the access log's `result` and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// The client sent part of its request body, then nothing.
    ClientBody,
    /// The upstream stopped reading the request body, or has not begun its answer.
    Upstream,
    /// The upstream stopped in the middle of its response body.
    UpstreamBody,
}

impl Stall {
    /// Short stable name for the access log and metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Self::ClientBody => "client-body-idle",
            Self::Upstream => "upstream-idle",
            Self::UpstreamBody => "upstream-body-idle",
        }
    }

    /// The code stored in [`Progress`]; 0 is "not stalled".
    fn code(self) -> u8 {
        match self {
            Self::ClientBody => 1,
            Self::Upstream => 2,
            Self::UpstreamBody => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::ClientBody),
            2 => Some(Self::Upstream),
            3 => Some(Self::UpstreamBody),
            _ => None,
        }
    }
}

/// The error a stalled body ends with; hyper aborts the connection the body belonged to.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no byte moved for {limit:?} ({})", stall.reason())]
pub struct StallError {
    /// Which peer stopped.
    pub stall: Stall,
    /// The limit it passed.
    pub limit: Duration,
}

/// One request's progress, shared by its bodies and the watchdog.
#[derive(Debug)]
pub struct Progress {
    /// The limit: `blob.bodyIdleTimeout`.
    limit: Duration,
    /// Origin of `last_ms`.
    start: Instant,
    /// Milliseconds from `start` to the last byte the client's body gave.
    last_ms: AtomicU64,
    /// Whether the request body is waiting for the client (its own timer then decides);
    /// false while the upstream has a frame to take, or once the body is complete.
    waiting_on_client: AtomicBool,
    /// [`Stall::code`] of the first stall seen, 0 while none.
    stalled: AtomicU8,
}

impl Progress {
    /// A request starting now, with `limit` as its idle limit.
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            waiting_on_client: AtomicBool::new(false),
            stalled: AtomicU8::new(0),
        }
    }

    /// The idle limit.
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// Which peer stalled, if one did.
    pub fn stall(&self) -> Option<Stall> {
        Stall::from_code(self.stalled.load(Ordering::Relaxed))
    }

    /// Records the first stall; later ones are consequences of it.
    fn set_stall(&self, stall: Stall) {
        let _ =
            self.stalled
                .compare_exchange(0, stall.code(), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Notes that the client's body moved now.
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the client's body last moved (or since the request began).
    fn idle_for(&self) -> Duration {
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Resolves once nothing has moved for the limit while the request body was not
    /// waiting on the client: the upstream is not reading the upload, or has not begun to
    /// answer. The caller drops the upstream request, which closes its connection.
    pub async fn upstream_stalled(&self) {
        loop {
            let idle = self.idle_for();
            if idle >= self.limit {
                if !self.waiting_on_client.load(Ordering::Relaxed) {
                    self.set_stall(Stall::Upstream);
                    return;
                }
                // The request body's own timer ends a client stall; look again later.
                tokio::time::sleep(self.limit).await;
            } else {
                tokio::time::sleep(self.limit - idle).await;
            }
        }
    }
}

/// A body that fails with [`StallError`] when its peer has given no frame for the limit.
/// Frames pass through untouched.
pub struct IdleBody<B> {
    /// The body from the peer being watched.
    inner: B,
    /// The request this body belongs to.
    progress: std::sync::Arc<Progress>,
    /// What a stall of this body is.
    stall: Stall,
    /// Fires the limit after the peer was first asked for a frame it did not have; boxed
    /// so the body stays `Unpin`.
    timer: Pin<Box<Sleep>>,
    /// Set after a frame: the next wait starts the clock afresh. Time in which nobody
    /// polled this body (the other side busy or slow to take the last frame) is not the
    /// peer's silence.
    rearm: bool,
}

impl<B> std::fmt::Debug for IdleBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleBody")
            .field("stall", &self.stall)
            .finish_non_exhaustive()
    }
}

impl<B> IdleBody<B> {
    /// The client's request body: its stalls are [`Stall::ClientBody`].
    pub fn request(inner: B, progress: std::sync::Arc<Progress>) -> Self {
        Self::new(inner, progress, Stall::ClientBody)
    }

    /// The upstream's response body: its stalls are [`Stall::UpstreamBody`].
    pub fn response(inner: B, progress: std::sync::Arc<Progress>) -> Self {
        Self::new(inner, progress, Stall::UpstreamBody)
    }

    fn new(inner: B, progress: std::sync::Arc<Progress>, stall: Stall) -> Self {
        let timer = Box::pin(tokio::time::sleep(progress.limit));
        Self {
            inner,
            progress,
            stall,
            timer,
            // The clock starts at the first wait, not here: dialling the upstream before
            // the request body is first asked for is not the client's silence.
            rearm: true,
        }
    }

    /// Notes whether the request body now waits on the client (the response body does not
    /// take part in the watchdog's view).
    fn waiting(&self, waiting: bool) {
        if self.stall == Stall::ClientBody {
            self.progress
                .waiting_on_client
                .store(waiting, Ordering::Relaxed);
        }
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if this.stall == Stall::ClientBody {
                    this.progress.touch();
                }
                this.waiting(false);
                this.rearm = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.waiting(false);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.waiting(false);
                Poll::Ready(None)
            }
            Poll::Pending => {
                this.waiting(true);
                if std::mem::take(&mut this.rearm) {
                    let next = tokio::time::Instant::now() + this.progress.limit;
                    this.timer.as_mut().reset(next);
                }
                if this.timer.as_mut().poll(cx).is_ready() {
                    this.waiting(false);
                    this.progress.set_stall(this.stall);
                    return Poll::Ready(Some(Err(Box::new(StallError {
                        stall: this.stall,
                        limit: this.progress.limit,
                    }))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::BodyExt;
    use http_body_util::StreamBody;
    use std::sync::Arc;

    type Chunk = Result<Frame<Bytes>, std::convert::Infallible>;

    /// A body fed by hand through a channel: it stalls when the test stops sending.
    fn channel_body() -> (
        tokio::sync::mpsc::Sender<Chunk>,
        StreamBody<tokio_stream_shim::Receiver>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        (tx, StreamBody::new(tokio_stream_shim::Receiver(rx)))
    }

    /// `tokio::sync::mpsc::Receiver` as a `Stream`, without the tokio-stream crate.
    mod tokio_stream_shim {
        use super::Chunk;
        use std::pin::Pin;
        use std::task::{Context, Poll};

        pub struct Receiver(pub tokio::sync::mpsc::Receiver<Chunk>);

        impl futures_util::stream::Stream for Receiver {
            type Item = Chunk;
            fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
                self.0.poll_recv(cx)
            }
        }
    }

    /// The limit in these tests: long against scheduling noise, short for the suite.
    const LIMIT: Duration = Duration::from_millis(400);

    #[tokio::test]
    async fn a_moving_body_passes_and_a_stalled_one_fails_after_the_limit() {
        let progress = Arc::new(Progress::new(LIMIT));
        let (tx, body) = channel_body();
        let mut body = IdleBody::request(body, progress.clone());
        // A frame every 250 ms for 1.25 s: slow, but never idle for the limit.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
                .await
                .unwrap();
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "x");
        }
        assert_eq!(progress.stall(), None);
        let before = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        let waited = before.elapsed();
        assert!(waited >= LIMIT && waited < LIMIT * 5, "{waited:?}");
        let stall = err.downcast_ref::<StallError>().unwrap();
        assert_eq!(stall.stall, Stall::ClientBody);
        assert_eq!(progress.stall(), Some(Stall::ClientBody));
        drop(tx);
    }

    #[tokio::test]
    async fn time_nobody_asked_for_a_frame_is_not_the_peers_silence() {
        let progress = Arc::new(Progress::new(LIMIT));
        let (tx, body) = channel_body();
        let mut body = IdleBody::response(body, progress.clone());
        tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .unwrap();
        body.frame().await.unwrap().unwrap();
        // The consumer takes its time (twice the limit) before it asks again; the next
        // frame arrives shortly after it does.
        tokio::time::sleep(LIMIT * 2).await;
        let sender = tokio::spawn(async move {
            tokio::time::sleep(LIMIT / 4).await;
            tx.send(Ok(Frame::data(Bytes::from_static(b"y"))))
                .await
                .unwrap();
            tx
        });
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "y");
        assert_eq!(progress.stall(), None);
        drop(sender.await.unwrap());
    }

    #[tokio::test]
    async fn the_watchdog_leaves_a_client_stall_to_the_body_and_catches_the_upstream() {
        let progress = Arc::new(Progress::new(LIMIT));
        let (tx, body) = channel_body();
        let mut body = IdleBody::request(body, progress.clone());
        tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .unwrap();
        body.frame().await.unwrap().unwrap();
        // The upstream takes no more (the body is not polled again): the watchdog fires.
        let before = Instant::now();
        progress.upstream_stalled().await;
        let waited = before.elapsed();
        assert!(waited >= LIMIT / 2 && waited < LIMIT * 5, "{waited:?}");
        assert_eq!(progress.stall(), Some(Stall::Upstream));

        // Waiting on the client: the body's timer, not the watchdog, ends it.
        let progress = Arc::new(Progress::new(LIMIT));
        let (_tx, body) = channel_body();
        let mut body = IdleBody::request(body, progress.clone());
        let watchdog = progress.upstream_stalled();
        tokio::select! {
            r = body.frame() => assert!(r.unwrap().is_err()),
            () = watchdog => panic!("the watchdog fired on a client stall"),
        }
        assert_eq!(progress.stall(), Some(Stall::ClientBody));
    }
}
