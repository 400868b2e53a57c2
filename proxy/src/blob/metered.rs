//! A body passed through frame by frame (never collected) that counts its bytes, and can
//! run a closure with the count when it is dropped: the gateway writes its access-log line
//! then, so the line has the bytes really sent and the whole latency.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// What runs when a metered body is dropped, with the bytes it passed.
type OnEnd = Box<dyn FnOnce(u64) + Send + Sync>;

/// A counting pass-through body.
pub struct Metered<B> {
    /// The body.
    inner: B,
    /// Bytes passed so far; shared so the request side can read what the client sent.
    count: Arc<AtomicU64>,
    /// Run once, on drop.
    on_end: Option<OnEnd>,
}

impl<B> std::fmt::Debug for Metered<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered")
            .field("count", &self.count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<B> Metered<B> {
    /// Counts `inner`'s data bytes into `count`.
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            count,
            on_end: None,
        }
    }

    /// Runs `f` with the byte count when the body is dropped (finished or abandoned).
    pub fn on_end(mut self, f: impl FnOnce(u64) + Send + Sync + 'static) -> Self {
        self.on_end = Some(Box::new(f));
        self
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(self.count.load(Ordering::Relaxed));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::sync::Mutex;

    #[tokio::test]
    async fn counts_bytes_and_reports_them_on_drop() {
        let count = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(None));
        let seen2 = seen.clone();
        let body = Metered::new(Full::new(Bytes::from_static(b"hello")), count.clone())
            .on_end(move |n| *seen2.lock().unwrap() = Some(n));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello");
        assert_eq!(count.load(Ordering::Relaxed), 5);
        assert_eq!(*seen.lock().unwrap(), Some(5));
    }
}
